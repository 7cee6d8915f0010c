"""The CPU pool: worker processes, each with its own socket, watched by one thread.

Data flow::

    scheduler ─submit(Task)─► pending ─► idle worker ─socket─► worker main thread
                                              ▲                     │
    scheduler ◄─callbacks/Future─ supervisor thread ◄─socket── "ready" / "started" /
                                  (connection.wait over         "event" / "result",
                                   every worker's socket)       or EOF = it died

Why not ``loky.ProcessPoolExecutor`` (or ``concurrent.futures``): there, one dead
worker marks the whole executor broken and fails every pending future, and killing
the worker of one timed-out call kills its siblings' work too. Here each worker has its
own socket, so the pool always knows which attempt runs where and whether it started:

* a worker that dies (segfault, ``os._exit``, SIGKILL, OOM kill) fails only the attempt
  it was running, with :class:`~actionpool.WorkerCrashed` (exit code or signal); an
  attempt it had received but not started is handed to a fresh worker;
* killing an attempt (hard timeout, cancel) kills only its worker's process group;
* the pool heals by starting replacements on demand.

Workers are fresh interpreters (``subprocess`` with ``start_new_session=True``), like
loky's processes: nothing of the parent is inherited but the environment, so user
scripts need no ``if __name__ == "__main__"`` guard for actionpool's sake, and a
thread-holding parent is never forked. ``OMP_NUM_THREADS`` & co. are set in their
environment before the interpreter starts, never inherited from the parent (where,
e.g., Dask's ``LocalCluster`` sets them to 1). Usable cores still come from
``loky.cpu_count`` (see :mod:`actionpool.sizing`).

States: a worker is STARTING (spawned, no "ready" yet), IDLE, BUSY, or gone; the pool
is open or closed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from enum import Enum
from multiprocessing.connection import Connection
from typing import Any

from .._worker import Result, Task
from ..errors import WorkerCrashed
from ..sizing import worker_env

__all__ = ["ProcessAttempt", "ProcessPool", "describe_exit"]

_LAUNCH = "import actionpool._worker as w; w.process_main()"
_MAX_STARTUP_FAILURES = 3


class WorkerState(Enum):
    """Lifecycle of one worker process."""

    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    GONE = "gone"


def describe_exit(returncode: int | None) -> tuple[str, int | None, int | None]:
    """``(text, exitcode, signal)`` for a process's return code (negative: a signal)."""
    if returncode is None:
        return "stopped answering", None, None
    if returncode < 0:
        sig = -returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"was killed by {name} (signal {sig})", None, sig
    return f"exited with code {returncode}", returncode, None


class _Worker:
    __slots__ = ("attempt", "conn", "pid", "proc", "state")

    def __init__(self, proc: subprocess.Popen[bytes], conn: Connection) -> None:
        self.proc = proc
        self.conn = conn
        self.pid = proc.pid
        self.state = WorkerState.STARTING
        self.attempt: ProcessAttempt | None = None


class ProcessAttempt:
    """Handle of one attempt submitted to the CPU pool.

    Attributes:
        future: resolves to the :class:`~actionpool._worker.Result`, or fails with
            :class:`~actionpool.WorkerCrashed` when the worker died; cancelled when the
            attempt was withdrawn before a worker took it.
        started: True once the worker said it started (a fact, not a guess).
        killed: why the pool was asked to stop it (``"timeout"``, ``"cancel"``), or "".
    """

    __slots__ = (
        "_pool",
        "future",
        "id",
        "killed",
        "on_event",
        "on_started",
        "released",
        "resubmits",
        "started",
        "started_at",
        "task",
        "worker",
    )

    def __init__(
        self,
        pool: ProcessPool,
        attempt_id: int,
        task: Task,
        on_started: Callable[[int | str, float], None],
        on_event: Callable[[str, float, Any], None],
    ) -> None:
        self._pool = pool
        self.id = attempt_id
        self.task = task
        self.on_started = on_started
        self.on_event = on_event
        self.future: Future[Result] = Future()
        self.started = False
        self.resubmits = 0  # times a worker died before it could start this attempt
        self.started_at: float | None = None
        self.worker: int | str | None = None
        self.killed = ""
        self.released = False  # the scheduler freed this attempt's slot

    def cancel(self, reason: str = "cancel") -> None:
        """Stop this attempt now: withdraw it, or kill its worker's process group."""
        self._pool.kill(self, reason)


class ProcessPool:
    """Up to ``size`` worker processes, started on demand and replaced when they die."""

    kind = "cpu"

    def __init__(self, size: int, blas_threads: int) -> None:
        self.size = size
        self.blas_threads = blas_threads
        self._lock = threading.RLock()
        self._workers: dict[Connection, _Worker] = {}
        self._pending: deque[ProcessAttempt] = deque()
        self._ids = itertools.count()
        self._closed = False
        self._startup_failures = 0
        self._wake_r, self._wake_w = _pipe()
        self._supervisor: threading.Thread | None = None
        self._env = {**os.environ, **worker_env(blas_threads)}
        self._env.pop("PYTHONSTARTUP", None)

    # ---- submitting and stopping -------------------------------------------------------

    def submit(
        self,
        task: Task,
        is_async: bool = False,
        on_started: Callable[[int | str, float], None] | None = None,
        on_event: Callable[[str, float, Any], None] | None = None,
    ) -> ProcessAttempt:
        """Queue ``task`` for the next free worker; returns its handle.

        Raises:
            RuntimeError: the pool is closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the cpu pool is closed")
            att = ProcessAttempt(
                self, next(self._ids), task, on_started or _ignore, on_event or _ignore
            )
            self._pending.append(att)
            self._assign()
        return att

    def kill(self, att: ProcessAttempt, reason: str = "cancel") -> None:
        """Withdraw ``att`` if no worker has it, else SIGKILL its worker's process group."""
        with self._lock:
            if att.future.done():
                return
            att.killed = att.killed or reason
            if att in self._pending:
                self._pending.remove(att)
                att.future.cancel()
                return
            for w in self._workers.values():
                if w.attempt is att:
                    _kill_group(w.pid)
                    return

    def forget(self, prefix: str) -> None:
        """Tell every worker that the run of ``prefix`` is over (drop its mappings)."""
        data = pickle.dumps(("forget", prefix), protocol=5)
        with self._lock:
            for w in self._workers.values():
                with contextlib.suppress(OSError):
                    w.conn.send_bytes(data)

    def pids(self) -> list[int]:
        """The pids of the live worker processes."""
        with self._lock:
            return [w.pid for w in self._workers.values() if w.state is not WorkerState.GONE]

    def close(self, cancel: bool = False) -> None:
        """Stop every worker and wait until each has exited.

        Args:
            cancel: kill running attempts (their futures fail) instead of letting idle
                workers finish; queued attempts are withdrawn either way.
        """
        with self._lock:
            self._closed = True
            for att in self._pending:
                att.future.cancel()
            self._pending.clear()
            for w in self._workers.values():
                if cancel or w.attempt is not None:
                    if w.attempt is not None:
                        w.attempt.killed = w.attempt.killed or "cancel"
                    _kill_group(w.pid)
                else:
                    _send_stop(w)
            supervisor = self._supervisor
        if supervisor is not None:
            self._wake()
            supervisor.join(timeout=10)
            if supervisor.is_alive():  # a worker ignored its stop: end it
                with self._lock:
                    for w in self._workers.values():
                        _kill_group(w.pid)
                self._wake()
                supervisor.join()
        self._wake_r.close()
        self._wake_w.close()

    # ---- internals (lock held unless said otherwise) ------------------------------------

    def _assign(self) -> None:
        while self._pending:
            worker = next(
                (
                    w
                    for w in self._workers.values()
                    if w.attempt is None and w.state is not WorkerState.GONE
                ),
                None,
            )
            if worker is None:
                if len(self._workers) >= self.size:
                    return
                worker = self._spawn()
            att = self._pending.popleft()
            worker.attempt = att
            if worker.state is WorkerState.IDLE:
                worker.state = WorkerState.BUSY
            with contextlib.suppress(OSError):  # it just died: the supervisor sees EOF, requeues
                worker.conn.send_bytes(pickle.dumps((att.id, att.task), protocol=5))

    def _spawn(self) -> _Worker:
        parent_sock, child_sock = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCH, str(child_sock.fileno()), str(self.blas_threads)],
                pass_fds=(child_sock.fileno(),),
                env=self._env,
                start_new_session=True,  # own process group: killpg takes its children too
            )
        finally:
            child_sock.close()
        worker = _Worker(proc, Connection(parent_sock.detach()))
        self._workers[worker.conn] = worker
        if self._supervisor is None:
            self._supervisor = threading.Thread(
                target=self._supervise, name="actionpool-supervisor", daemon=True
            )
            self._supervisor.start()
        else:
            self._wake()
        return worker

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send_bytes(b"w")

    def _supervise(self) -> None:
        """The supervisor thread: reads every worker's socket, notices deaths.

        One ``poll`` object lives as long as the thread (``connection.wait`` builds and
        fills a new selector on every call, a measurable cost per message); workers'
        sockets join it when they are spawned (see :meth:`_wake`).
        """
        import select

        poller = select.poll()
        watched: dict[int, Connection] = {}
        wake_fd = self._wake_r.fileno()
        poller.register(wake_fd, select.POLLIN)
        while True:
            with self._lock:
                live = {c.fileno(): c for c in self._workers}
                if self._closed and not live:
                    return
            for fd in watched.keys() - live.keys():
                poller.unregister(fd)
            for fd in live.keys() - watched.keys():
                poller.register(fd, select.POLLIN)
            watched = live
            for fd, _events in poller.poll():
                if fd == wake_fd:
                    try:
                        self._wake_r.recv_bytes()
                    except (EOFError, OSError):
                        return
                    continue
                conn = watched[fd]
                if conn.closed:
                    continue
                try:
                    data = conn.recv_bytes()
                except (EOFError, OSError):
                    self._on_death(conn)
                    continue
                self._on_message(conn, pickle.loads(data))

    def _on_message(self, conn: Connection, msg: tuple[Any, ...]) -> None:
        with self._lock:
            w = self._workers.get(conn)
            if w is None:
                return
            kind = msg[0]
            if kind == "ready":
                self._startup_failures = 0
                w.state = WorkerState.BUSY if w.attempt is not None else WorkerState.IDLE
                return
            att = w.attempt
            if att is None or att.id != msg[1]:
                return
            if kind == "result":
                w.attempt = None
                w.state = WorkerState.IDLE
                if not self._closed:
                    self._assign()
        # callbacks run outside the lock: they may call back into the pool
        if kind == "started":
            att.started_at, att.worker = msg[2], w.pid
            att.started = True
            att.on_started(w.pid, msg[2])
        elif kind == "event":
            att.on_event(msg[2], msg[3], pickle.loads(msg[4]))
        elif kind == "result" and not att.future.done():
            att.future.set_result(msg[2])

    def _on_death(self, conn: Connection) -> None:
        with self._lock:
            w = self._workers.pop(conn)
            w.state = WorkerState.GONE
        conn.close()
        # Kill the group (anything its action started) before reaping the leader:
        # while it is an unreaped zombie, its pid, the group's id, cannot be reused.
        _kill_group(w.pid)
        returncode: int | None = w.proc.wait()
        text, exitcode, sig = describe_exit(returncode)
        failed: list[tuple[ProcessAttempt, BaseException]] = []
        with self._lock:
            att = w.attempt
            if att is not None and not att.started and not att.killed and not self._closed:
                # The action was never called, so it cannot have had an effect: give it
                # to a new worker, unless workers keep dying before they can start it
                # (in the interpreter's start, or unpickling its call: importing its
                # modules), which would otherwise go on for ever.
                self._startup_failures += w.state is WorkerState.STARTING
                att.resubmits += 1
                if (
                    att.resubmits < _MAX_STARTUP_FAILURES
                    and self._startup_failures < _MAX_STARTUP_FAILURES
                ):
                    self._pending.appendleft(att)
                    att = None
            if att is not None:
                who = f"node {att.task.node!r}: its worker process (pid {w.pid})"
                if att.killed:
                    msg = f"{who} was killed to stop it ({att.killed})"
                elif att.started:
                    msg = f"{who} {text} while running it"
                else:
                    msg = (
                        f"{who} {text} before it could start it, {att.resubmits} times"
                        " (while starting, or unpickling its call and importing its modules)"
                    )
                failed.append((att, WorkerCrashed(msg, exitcode, sig)))
            if self._startup_failures >= _MAX_STARTUP_FAILURES:
                err = f"worker processes die before they start ({text}); last pid {w.pid}"
                while self._pending:
                    failed.append((self._pending.popleft(), WorkerCrashed(err, exitcode, sig)))
            if not self._closed:
                self._assign()
        for att, exc in failed:
            if not att.future.done():
                att.future.set_exception(exc)


def _pipe() -> tuple[Connection, Connection]:
    from multiprocessing import Pipe

    r, w = Pipe(duplex=False)
    return r, w


def _send_stop(w: _Worker) -> None:
    with contextlib.suppress(OSError):
        w.conn.send_bytes(b"")


def _kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (the worker and what it started).

    Workers start in their own session (``setsid`` before ``exec``), so the group
    exists from the start; once it is empty there is nothing to kill, and we never
    fall back to ``kill(pid)``: a reaped pid may already belong to someone else.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _ignore(*args: Any) -> None:
    pass
