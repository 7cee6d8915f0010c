"""The CPU pool: worker processes, each with its own socket, read on an asyncio loop.

Data flow::

    scheduler ─submit(Task)─► pending ─► idle worker ─socket─► worker main thread
                                              ▲                     │
    scheduler ◄─callbacks/Future─ loop reader ◄─socket───────── "ready" / "started" /
                                  (an epoll set of the worker    "event" / "result",
                                   sockets, the zygotes' notify  or EOF; the zygote's
                                   sockets, first worker's pidfd) notice = it exited

A thread blocked in a direct call's ``result()`` reads that call's reply itself
(:meth:`ProcessPool.read_result`): it takes the worker's socket out of the loop's epoll
set while it waits, so the reply wakes one thread, not the loop and then the caller.

Why not ``loky.ProcessPoolExecutor`` (or ``concurrent.futures``): there, one dead
worker marks the whole executor broken and fails every pending future, and killing
the worker of one timed-out call kills its siblings' work too. Here each worker has its
own socket, so the pool always knows which attempt runs where and whether it started:

* a worker that dies (segfault, ``os._exit``, SIGKILL, OOM kill) fails only the attempt
  it was running, with :class:`~actionpool.WorkerCrashed` (exit code or signal); an
  attempt it had received but not started is handed to a fresh worker;
* killing an attempt (hard timeout, cancel) kills only its worker's process group;
* the pool heals by starting replacements on demand.

Workers are forks of a *zygote* (:mod:`actionpool._zygote`), one small process per pool
that has already imported the worker side: a worker starts in about a millisecond
instead of the ~50 ms of a fresh interpreter, and so does each replacement. The zygote
is a fork of the parent when the parent runs a single thread at the pool's creation
(``worker_start="fork"``; workers inherit its modules, as with ``multiprocessing``'s
fork), else a fresh interpreter (``"fresh"``, like loky's processes: nothing inherited
but the environment); ``"auto"`` picks the first when it is safe. A thread-holding
parent is never forked. ``OMP_NUM_THREADS`` & co. are set in the zygote's environment,
never inherited from the parent (where, e.g., Dask's ``LocalCluster`` sets them to 1),
and threadpoolctl caps libraries already loaded. Usable cores still come from
``loky.cpu_count`` (see :mod:`actionpool.sizing`).

States: a worker is STARTING (spawned, no "ready" yet), IDLE, BUSY, or gone; the pool
is open or closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import math
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from enum import Enum
from multiprocessing.connection import Connection
from typing import Any

import loky

from .. import _worker, _zygote
from .._threads import join_thread
from .._worker import Result, Task
from ..errors import WorkerCrashed
from ..sizing import worker_env

__all__ = [
    "WORKER_START_MODES",
    "ProcessAttempt",
    "ProcessPool",
    "describe_exit",
    "resolve_worker_start",
]

WORKER_START_MODES = ("auto", "fork", "fresh")
"""How a pool's zygote starts: see :func:`resolve_worker_start`."""

# A fresh zygote starts with this process's sys.path (its last argument), as
# multiprocessing's spawn and loky do: a module the caller put on the path (and
# actionpool itself, when it is not installed) must import in the workers too.
_LAUNCH = (
    "import json, sys; sys.path[:] = json.loads(sys.argv.pop());"
    " import actionpool._zygote as z; z.launch()"
)
_MAX_STARTUP_FAILURES = 3
_ZYGOTE_REPLY_S = 30.0  # a fork takes milliseconds; this long means the zygote is stuck
# Fork a pool's first worker from this process (ProcessPool._start_forked): where
# pidfds exist (Linux), by which this process watches its exit without the zygote.
_FORK_FIRST = hasattr(os, "pidfd_open")
# A thread waiting for a direct call's result reads it from the worker's socket
# itself (ProcessPool.read_result): the worker sockets are then watched through an
# epoll set of the pool's own, from which any thread can take one out (Linux).
_READ_HERE = hasattr(select, "epoll") and hasattr(os, "eventfd")
# Spin, then block: read_result polls the socket without sleeping for up to _SPIN_S
# before it blocks, when the pool's recent actions ran for under _SPIN_IF_UNDER_S
# (a moving average) and a core is spare for it. A thread that blocks is woken
# ~100 us later than one that polls here (W2: a no-op's round trip 225 -> 127 us,
# with the parent's CPU per call unchanged, as the wake-up costs CPU too), and its
# reply arrives 100-150 us after the call is sent (per-hop trace, docs/performance.md).
# The same trade as glibc's adaptive mutexes and OpenMP's KMP_BLOCKTIME (200 ms).
_SPIN_S = 200e-6
_SPIN_IF_UNDER_S = 100e-6


def resolve_worker_start(mode: str | None = None) -> str:
    """``"fork"`` or ``"fresh"``: how a pool created now starts its zygote.

    Args:
        mode: ``"auto"`` (default; also read from ``ACTIONPOOL_WORKER_START``): fork
            this process when it runs a single thread (``psutil``: native threads
            count, e.g. an OpenMP pool), else a fresh interpreter; ``"fork"``: always
            fork; ``"fresh"``: always a fresh interpreter.

    Raises:
        ValueError: an unknown mode.
        RuntimeError: ``"fork"`` asked for while this process runs other threads
            (a thread holding a lock at the fork would leave it locked for ever in
            the child), or on a platform without ``fork``.
    """
    if mode is None:
        mode = os.environ.get("ACTIONPOOL_WORKER_START") or "auto"
    if mode not in WORKER_START_MODES:
        raise ValueError(f"worker_start must be one of {WORKER_START_MODES}, got {mode!r}")
    if mode == "fresh":
        return mode
    threads = _thread_count()
    if hasattr(os, "fork") and threads == 1:
        return "fork"
    if mode == "auto":
        return "fresh"
    raise RuntimeError(
        f"worker_start='fork': this process runs {threads} threads, and forking it could"
        " leave a lock one of them holds locked for ever in the workers; create the"
        " Runner before starting threads, or use worker_start='auto' or 'fresh'"
    )


def _thread_count() -> int:
    import psutil

    try:
        return int(psutil.Process().num_threads())
    except psutil.Error:
        return 2  # unknown: assume the unsafe case


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


class _Zygote:
    """The parent's handle of a zygote process (see :mod:`actionpool._zygote`)."""

    def __init__(
        self,
        mode: str,
        env: dict[str, str],
        blas_threads: int,
        pools_loaded: bool | None = None,
        not_inherited: tuple[int, ...] = (),
    ) -> None:
        """Start a zygote: a fork of this process (``mode`` "fork"; only while this
        process runs a single thread) or a fresh interpreter ("fresh").

        Args:
            mode: "fork" or "fresh".
            env: environment overrides for the zygote and its workers.
            blas_threads: the BLAS/OpenMP cap of every worker.
            pools_loaded: for a fork, :func:`actionpool._worker.native_pools_loaded`
                if the caller asked it already (else asked here).
            not_inherited: descriptors of this process that a fork closes at once
                (the pool's end of its first worker's socket, and its pidfd).
        """
        ctl, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        notify, notify_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            if mode == "fork":
                if pools_loaded is None:
                    pools_loaded = _worker.native_pools_loaded()  # cheaper here than there
                self.pid = os.fork()
                if self.pid == 0:  # the zygote: this process had a single thread
                    try:
                        os.setsid()  # a terminal's Ctrl-C reaches only the parent
                        gc.freeze()  # never finalize the parent's objects in here
                        ctl.close()
                        notify.close()
                        for fd in not_inherited:
                            os.close(fd)
                        os.environ.update(env)
                        _zygote.main(
                            ctl_child.fileno(), notify_child.fileno(), blas_threads, pools_loaded
                        )
                    finally:
                        os._exit(1)
            else:
                args = [str(ctl_child.fileno()), str(notify_child.fileno()), str(blas_threads)]
                # str entries only: the import system skips any other (JSON could not carry it)
                args.append(json.dumps([p for p in sys.path if isinstance(p, str)]))
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", _LAUNCH, *args],
                    pass_fds=(ctl_child.fileno(), notify_child.fileno()),
                    env={**os.environ, **env},
                    start_new_session=True,
                )
                self.pid = self.proc.pid
        except BaseException:
            ctl.close()
            notify.close()
            raise
        finally:
            ctl_child.close()
            notify_child.close()
        ctl.settimeout(_ZYGOTE_REPLY_S)
        self.ctl = ctl
        self.notify = notify
        self.asked: tuple[socket.socket, int] | None = None  # a request whose reply is unread
        self.closed = False

    def ask(self, page_fd: int, slot: int) -> None:
        """Request a worker for start-page slot ``slot``; :meth:`take` reads the reply.

        Sent right after the zygote starts, the request waits in ``ctl`` until the
        zygote is ready, and the worker is forked while this process goes on.

        Raises:
            OSError: the zygote is gone.
        """
        sock, child = socket.socketpair()
        try:
            fds = [child.fileno()] if page_fd < 0 else [child.fileno(), page_fd]
            socket.send_fds(self.ctl, [_zygote.SPAWN.pack(slot)], fds)
        except BaseException:
            sock.close()
            raise
        finally:
            child.close()
        self.asked = (sock, slot)

    def take(self) -> tuple[int, socket.socket, int]:
        """The worker of the request sent: its pid, our end of its socket, its slot.

        Raises:
            OSError: the zygote is gone or stuck (the request stays, for
                :meth:`drop_request`).
        """
        assert self.asked is not None
        reply = self.ctl.recv(_zygote.PID.size)
        if len(reply) != _zygote.PID.size:
            raise ConnectionError("the zygote process is gone")
        (sock, slot), self.asked = self.asked, None
        pid: int = _zygote.PID.unpack(reply)[0]
        return pid, sock, slot

    def answered(self) -> bool:
        """Whether the reply to the request sent is in (:meth:`take` will not wait)."""
        return self.asked is not None and bool(select.select([self.ctl], [], [], 0)[0])

    def drop_request(self) -> int | None:
        """Forget an unanswered request; the slot it held, or None."""
        if self.asked is None:
            return None
        (sock, slot), self.asked = self.asked, None
        sock.close()
        return slot

    def drain(self) -> None:
        """Tell the zygote that the pool is closing: it forks nothing more and exits
        after its last worker's exit notice (:data:`actionpool._zygote.DRAIN`)."""
        with contextlib.suppress(OSError):  # gone already: close() reaps it
            self.ctl.send(_zygote.DRAIN)

    def close(self) -> None:
        """Let the zygote go (it kills what workers it still has) and reap it."""
        if self.closed:
            return
        self.closed = True
        self.drop_request()
        self.ctl.close()
        if not _wait_exit(self.pid, self.proc, 10.0):
            _kill_group(self.pid)
            _wait_exit(self.pid, self.proc, None)
        self.notify.close()


def _wait_exit(pid: int, proc: subprocess.Popen[bytes] | None, timeout: float | None) -> bool:
    """Reap our child ``pid``; False if it is still running after ``timeout`` seconds."""
    if proc is not None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    if timeout is not None and hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = -1
        if pidfd >= 0:
            try:
                if not select.select([pidfd], [], [], timeout)[0]:
                    return False
            finally:
                os.close(pidfd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    return True


class _Worker:
    __slots__ = (
        "attempt",
        "conn",
        "eof",
        "pid",
        "pidfd",
        "poller",
        "reading",
        "slot",
        "state",
        "wake",
        "zygote",
    )

    def __init__(
        self, pid: int, conn: Connection, zygote: _Zygote | None, slot: int, pidfd: int = -1
    ) -> None:
        self.conn = conn
        self.pid = pid
        self.slot = slot  # its slot in the pool's start page
        # it reaps this worker and reports its exit; None: the pool's first worker,
        # a child of this process, which watches its pidfd and reaps it itself
        self.zygote = zygote
        self.pidfd = pidfd  # -1 once reaped (or for a zygote's worker)
        self.eof = False  # its socket closed: its exit notice is on the way
        self.state = WorkerState.STARTING
        self.attempt: ProcessAttempt | None = None
        # Held by whoever reads the socket: the loop's reader, or a thread waiting for
        # its attempt's result (ProcessPool.read_result), which the loop asks to let go
        # by writing to ``wake``.
        self.reading = threading.Lock()
        self.wake = -1
        self.poller: Any = None
        if _READ_HERE:
            self.wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.poller = select.poll()
            self.poller.register(conn.fileno(), select.POLLIN)
            self.poller.register(self.wake, select.POLLIN)

    def close(self) -> None:
        """Close its socket and wake fd (on the loop, ``reading`` held)."""
        self.conn.close()
        if self.wake >= 0:
            os.close(self.wake)
            self.wake = -1


class ProcessAttempt:
    """Handle of one attempt submitted to the CPU pool.

    Attributes:
        future: resolves to the :class:`~actionpool._worker.Result`, or fails with
            :class:`~actionpool.WorkerCrashed` when the worker died; cancelled when the
            attempt was withdrawn before a worker took it.
        started: True once the worker is known to have started it (a fact, not a
            guess): from its "started" message, or, for an attempt that sends none,
            from the pool's start page when its worker died or is being killed.
        killed: why the pool was asked to stop it (``"timeout"``, ``"cancel"``), or "".
        direct: True when its result was set by the pool's reader on the loop given to
            :meth:`ProcessPool.attach`, between two loop callbacks: a done-callback may
            then act on it at once (other completions, such as a cancel, can happen in
            the middle of the caller's own bookkeeping).
        on_result: when set (before the task is sent), the worker's result goes to
            ``on_result(result)``, called by that reader, and ``future`` stays pending
            (it still fails or is cancelled as described): resolving a
            ``concurrent.futures.Future`` nobody waits on, then reading it back, was
            ~15% of the parent's CPU for a runner's direct call (W2).
    """

    __slots__ = (
        "__weakref__",  # the scheduler's done-callback refers to it weakly
        "_pool",
        "direct",
        "future",
        "holder",
        "id",
        "killed",
        "on_event",
        "on_result",
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
        self.on_result: Callable[[Result], None] | None = None
        self.future: Future[Result] = Future()
        self.started = False
        self.resubmits = 0  # times a worker died before it could start this attempt
        self.started_at: float | None = None
        self.worker: int | str | None = None
        self.killed = ""
        self.released = False  # the scheduler freed this attempt's slot
        self.direct = False  # resolved by a reader on the pool's loop (see ProcessPool.attach)
        self.holder: _Worker | None = None  # the worker it was sent to

    def cancel(self, reason: str = "cancel") -> None:
        """Stop this attempt now: withdraw it, or kill its worker's process group."""
        self._pool.kill(self, reason)


class ProcessPool:
    """Up to ``size`` worker processes, started on demand and replaced when they die."""

    kind = "cpu"

    def __init__(
        self,
        size: int,
        blas_threads: int,
        worker_start: str | None = None,
        cores: int | None = None,
    ) -> None:
        """Start the pool; its zygote at once if it forks this process (see
        :func:`resolve_worker_start`, whose errors it raises), else on first use.
        ``cores``: the logical CPUs this process may use (default
        ``loky.cpu_count()``), which bounds when a waiting thread may spin
        (:meth:`read_result`)."""
        self.size = size
        self.cores = cores if cores is not None else max(1, loky.cpu_count())
        # read_result's spin: the recent actions' mean run time (seconds, a moving
        # average of 1 in 5), and who spins now (one thread at most)
        self._recent_s = 0.0
        self._spinner = threading.Lock()
        self.blas_threads = blas_threads
        self.worker_start = resolve_worker_start(worker_start)
        self._lock = threading.RLock()
        self._workers: dict[Connection, _Worker] = {}
        self._pending: deque[ProcessAttempt] = deque()
        self._ids = itertools.count(1)  # 0: a start-page slot no attempt used yet
        self._closed = False
        self._startup_failures = 0
        # Worker sockets and zygote notices are read by callbacks on an asyncio loop:
        # the runner's scheduler loop (attach), else a private one started on demand.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._own_loop: threading.Thread | None = None
        self._watched: set[int] = set()  # fds with a reader on the loop
        self._all_gone = threading.Event()  # closed, and every worker's exit handled
        self._env = worker_env(blas_threads)
        self._zygotes: list[_Zygote] = []  # the current one last; older ones still reap
        self._zygote: _Zygote | None = None
        # The start page: one START slot per worker, written by the worker as it starts
        # an attempt, read here only when a worker died or is being killed.
        self._page_fd = -1
        self._page: mmap.mmap | None = None
        if hasattr(os, "memfd_create"):  # Linux; elsewhere every attempt is announced
            self._page_fd = os.memfd_create("actionpool-starts", os.MFD_CLOEXEC)
            os.ftruncate(self._page_fd, _worker.START.size * size)
            self._page = mmap.mmap(self._page_fd, _worker.START.size * size)
        self._free_slots = list(range(size - 1, -1, -1))
        # the first worker, when this process forked it (see _fork_first): its pid,
        # our end of its socket, its slot, its pidfd; it joins the pool on first use
        self._first: tuple[int, socket.socket, int, int] | None = None
        if self.worker_start == "fork":  # now, while this process has a single thread
            self._start_forked()
        # The worker sockets, from which a waiting thread may take one (read_result):
        # an epoll set that the loop watches (made after the forks: theirs to ignore).
        self._sockets: select.epoll | None = select.epoll() if _READ_HERE else None
        self._by_fd: dict[int, _Worker] = {}

    def _start_forked(self) -> None:
        """Fork the zygote and, where pidfds exist (Linux), the first worker too.

        A zygote's first worker is ready ~4 ms after the zygote's fork here: the
        zygote's own start (Python's after-fork work alone is ~200 copy-on-write
        faults at ~4 µs each), its setup, then a second fork of the same size. Forked
        from this process at the same moment, the first worker is ready ~2 ms sooner,
        and its exit is seen here at once (its pidfd) rather than relayed by the
        zygote, whose own exit then overlaps it at shutdown. A cold start with one
        call (W7) uses no other worker. The zygote forks every later worker.
        """
        pools_loaded = _worker.native_pools_loaded()
        first = None
        if _FORK_FIRST:
            slot = self._free_slots.pop()
            pid, sock = _fork_first(self._page_fd, slot, self._env, self.blas_threads, pools_loaded)
            try:
                first = (pid, sock, slot, os.pidfd_open(pid))
            except OSError:  # not a kernel that has them after all: the zygote's way
                _end_first(pid, sock, -1)
                self._free_slots.append(slot)
        try:  # the zygote closes its copies of the first worker's socket and pidfd
            self._zygote = _Zygote(
                "fork",
                self._env,
                self.blas_threads,
                pools_loaded,
                () if first is None else (first[1].fileno(), first[3]),
            )
        except BaseException:
            if first is not None:
                _end_first(first[0], first[1], first[3])
            raise
        self._zygotes.append(self._zygote)
        self._first = first
        if first is None:  # forked by the zygote as soon as it is ready, unasked for
            self._zygote.ask(self._page_fd, self._free_slots.pop())

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the workers' sockets on ``loop`` from now on (the runner's scheduler
        loop: its results then need no hop from another thread). ``loop`` must run in a
        thread of its own until :meth:`close` returns. Call it before the first submit;
        a pool never attached runs a loop thread of its own."""
        with self._lock:
            if self._loop is not None:
                raise RuntimeError("the cpu pool already reads its workers on a loop")
            self._loop = loop

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
        att = self._submit(task, on_started, on_event, False)
        assert att is not None
        return att

    def submit_if_idle(
        self,
        task: Task,
        on_event: Callable[[str, float, Any], None] | None = None,
        before_send: Callable[[ProcessAttempt], None] | None = None,
        is_async: bool = False,
    ) -> ProcessAttempt | None:
        """Send ``task`` to an idle worker now, from any thread; None (nothing sent)
        when no worker is idle, attempts wait for one, or the pool is closed.
        ``is_async`` changes nothing here: a worker runs an ``async def`` action on
        an event loop of its own.

        ``before_send(attempt)`` runs under the pool's lock once a worker is chosen,
        just before the task is written to it: what the caller must set up before the
        attempt can end (its result is read on another thread).

        The runner's :meth:`~actionpool.Runner.submit` uses it to reach a worker
        without waiting for its scheduler thread to wake up.
        """
        return self._submit(task, None, on_event, True, before_send)

    def _submit(
        self,
        task: Task,
        on_started: Callable[[int | str, float], None] | None,
        on_event: Callable[[str, float, Any], None] | None,
        only_if_idle: bool,
        before_send: Callable[[ProcessAttempt], None] | None = None,
    ) -> ProcessAttempt | None:
        if self._page is None and not task.announce:
            task = task._replace(announce=True)  # no start page: the message is all we have
        with self._lock:
            if self._closed:
                if only_if_idle:
                    return None
                raise RuntimeError("the cpu pool is closed")
            idle = None
            if only_if_idle and not self._pending:
                idle = self._idle_worker() or self._prestarted()
            if only_if_idle and idle is None:
                return None
            att = ProcessAttempt(
                self, next(self._ids), task, on_started or _ignore, on_event or _ignore
            )
            if idle is not None:
                if before_send is not None:
                    before_send(att)
                self._send(idle, att)
            else:
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
                    self._note_start(w)
                    _kill_worker(w)
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
            pids = [w.pid for w in self._workers.values() if w.state is not WorkerState.GONE]
            if self._first is not None:  # forked at the start, not used yet
                pids.append(self._first[0])
            return pids

    def zygote_pids(self) -> list[int]:
        """The pids of the pool's zygote processes (see :mod:`actionpool._zygote`)."""
        with self._lock:
            return [z.pid for z in self._zygotes if not z.closed]

    def close(self, cancel: bool = False, *, reap: bool = True) -> None:
        """Stop every worker and wait until each has exited.

        Args:
            cancel: kill running attempts (their futures fail) instead of letting idle
                workers finish; queued attempts are withdrawn either way.
            reap: also wait for the zygote processes to exit. False leaves that to
                :meth:`reap`, so that the caller can close other things meanwhile:
                each zygote exits on its own right after its last worker's exit
                notice, and its exit (the teardown of a fork of this process) takes
                ~1 ms here.
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
                    _kill_worker(w)
                else:
                    _send_stop(w)
            for zygote in self._zygotes:  # each exits after its last worker's notice
                self._drop_request(zygote)  # its worker, if forked, finds its socket closed
                zygote.drain()
            first, self._first = self._first, None  # a first worker never used
            if first is not None:
                self._free_slots.append(first[2])
            # with workers, the last one's exit unwatches the zygotes (on the loop)
            idle = not self._workers
            if idle:
                self._all_gone.set()
            loop = self._loop
        if loop is not None and self._on_loop():
            raise RuntimeError("the cpu pool cannot be closed from its own loop's thread")
        if first is not None:
            _end_first(first[0], first[1], first[3])
        if not self._all_gone.wait(10):  # a worker ignored its stop: end it
            with self._lock:
                for w in self._workers.values():
                    _kill_worker(w)
            self._all_gone.wait()
        if idle and loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing watches
                self._in_loop(self._unwatch_zygotes).result()
        if reap:
            self.reap()

    def reap(self) -> None:
        """After :meth:`close`: wait until every zygote has exited, then free the rest."""
        with self._lock:
            zygotes, self._zygotes, self._zygote = self._zygotes, [], None
            loop = self._loop
        for zygote in zygotes:
            zygote.close()
        if self._own_loop is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
            join_thread(self._own_loop)
            loop.close()
        if self._page is not None:
            self._page.close()
            os.close(self._page_fd)
            self._page = None
        if self._sockets is not None:
            self._sockets.close()

    def _unwatch_zygotes(self) -> None:
        """On the loop, once the pool is closed and its workers are gone: nothing more
        is to be heard from the zygotes (their sockets close when they exit), and
        :meth:`reap` closes them from another thread."""
        for z in self._zygotes:
            if not z.closed:
                self._unwatch(z.notify.fileno())
        if self._sockets is not None and not self._sockets.closed:  # no socket is left in it
            self._unwatch(self._sockets.fileno())

    # ---- internals (lock held unless said otherwise) ------------------------------------

    def _prestarted(self) -> _Worker | None:
        """The pool's first worker, forked at its start by this process or by the
        zygote unasked, when its pid is known (lock held; for the zygote's, once it
        has answered): it joins the pool now, in the caller's thread, and a task sent
        to it waits in its socket until it is ready. None if there is none, or the
        zygote's answer is not in yet."""
        if self._first is not None:  # forked by this process: its pid is known
            try:
                return self._spawn()
            except (OSError, WorkerCrashed):
                return None
        zygote = self._zygote
        if zygote is None or zygote.asked is None or len(self._workers) >= self.size:
            return None
        try:
            if not zygote.answered():
                return None
            return self._spawn()
        except (OSError, WorkerCrashed):
            return None  # the scheduler's own dispatch goes the long way and reports it

    def _idle_worker(self) -> _Worker | None:
        """A live worker with no attempt (lock held), or None."""
        for w in self._workers.values():
            if w.attempt is None and w.state is not WorkerState.GONE:
                return w
        return None

    def _assign(self) -> None:
        while self._pending:
            worker = self._idle_worker()
            if worker is None:
                if len(self._workers) >= self.size:
                    return
                try:
                    worker = self._spawn()
                except (OSError, WorkerCrashed) as exc:
                    # No worker can start now: fail what waits rather than leave it
                    # queued to run, unannounced, when a later call starts one (and
                    # never raise into the loop's reader, which calls us too).
                    while self._pending:
                        self._pending.popleft().future.set_exception(exc)
                    return
            self._send(worker, self._pending.popleft())

    def _send(self, worker: _Worker, att: ProcessAttempt) -> None:
        worker.attempt = att
        att.holder = worker
        if worker.state is WorkerState.IDLE:
            worker.state = WorkerState.BUSY
        with contextlib.suppress(OSError):  # it just died: its notice requeues it
            worker.conn.send_bytes(pickle.dumps((att.id, att.task), protocol=5))

    def _spawn(self) -> _Worker:
        pid, parent_sock, slot, zygote, pidfd = self._fork_worker()
        worker = _Worker(pid, Connection(parent_sock.detach()), zygote, slot, pidfd)
        self._workers[worker.conn] = worker
        if self._loop is None:  # a pool used on its own: a loop thread of its own
            self._loop = asyncio.new_event_loop()
            self._own_loop = threading.Thread(
                target=self._loop.run_forever, name="actionpool-cpu-pool", daemon=True
            )
            self._own_loop.start()
        zygotes = [z for z in self._zygotes if z.notify.fileno() not in self._watched]

        def watch() -> None:
            for z in zygotes:
                self._watch(z.notify.fileno(), self._on_notice, z)
            self._watch_socket(worker)
            if worker.pidfd >= 0:
                self._watch(worker.pidfd, self._on_exit, worker)

        self._in_loop(watch)
        return worker

    # ---- the loop side: readers of worker sockets and zygote notices ---------------------

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _in_loop(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the loop: now if this is its thread, else soon; its future."""
        done: Future[Any] = Future()
        if self._on_loop():
            done.set_result(fn())
            return done
        assert self._loop is not None

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                done.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return done

    def _watch(self, fd: int, callback: Callable[..., Any], *args: Any) -> None:
        """On the loop: call ``callback(*args)`` whenever ``fd`` is readable."""
        assert self._loop is not None
        if fd not in self._watched and fd >= 0:
            self._watched.add(fd)
            self._loop.add_reader(fd, callback, *args)

    def _unwatch(self, fd: int) -> None:
        """On the loop: stop watching ``fd`` (before it is closed)."""
        if fd in self._watched:
            self._watched.discard(fd)
            assert self._loop is not None
            self._loop.remove_reader(fd)

    def _watch_socket(self, w: _Worker) -> None:
        """On the loop: read ``w``'s socket from now on."""
        fd = w.conn.fileno()
        if self._sockets is None:
            self._watch(fd, self._on_readable, w)
            return
        self._watch(self._sockets.fileno(), self._on_sockets)
        self._by_fd[fd] = w
        self._sockets.register(fd, select.EPOLLIN)

    def _unwatch_socket(self, w: _Worker) -> None:
        """On the loop: stop reading ``w``'s socket (before it is closed)."""
        if w.conn.closed:
            return
        fd = w.conn.fileno()
        if self._sockets is None:
            self._unwatch(fd)
        elif self._by_fd.get(fd) is w:
            del self._by_fd[fd]
            with contextlib.suppress(OSError):
                self._sockets.unregister(fd)

    def _on_sockets(self) -> None:
        """On the loop: some worker sockets have data (the epoll set is readable)."""
        assert self._sockets is not None
        for fd, _ in self._sockets.poll(0):
            w = self._by_fd.get(fd)
            if w is not None:
                self._on_readable(w)

    def _on_readable(self, w: _Worker) -> None:
        """A worker's socket has data: one message, or its end (the exit notice follows).
        Nothing, if a thread waiting for its attempt's result reads it."""
        if not w.reading.acquire(blocking=False):
            return  # read_result has it, and took it out of the epoll set
        try:
            # The epoll set said readable, but a thread in read_result may have taken
            # that message since (while this loop handled another socket's result):
            # a read now would block this loop until the worker's next message.
            if w.poller is not None and not w.conn.closed:
                fd = w.conn.fileno()
                if not any(f == fd for f, _ in w.poller.poll(0)):
                    return
            if self._read(w):
                return
            self._unwatch_socket(w)
            w.eof = True
        finally:
            w.reading.release()

    def read_result(self, att: ProcessAttempt, timeout: float | None) -> None:
        """Wait for ``att``'s result in this thread, reading its worker's socket here:
        a thread that would wait for a result anyway gets it with one wake-up instead
        of two (the loop's, then its own), and the loop is not woken at all.

        Returns once the result was handed to ``att.on_result`` (in this thread), or
        without it, leaving the rest to the loop's reader as usual, when: another
        thread reads that socket, ``timeout`` seconds passed (None: no limit), the
        worker's socket ended (it died: its exit is handled on the loop), or the loop
        needs the socket back (:meth:`_exited`). Never raises for the attempt's sake.
        Only an attempt whose ``on_result`` is set (its future stays pending) can be
        read so.
        """
        w = att.holder
        if self._sockets is None or w is None or att.on_result is None:
            return
        if not w.reading.acquire(blocking=False):
            return  # the loop's reader (or another thread) has it
        found = None
        try:
            if w.attempt is not att or w.conn.closed or self._by_fd.get(w.conn.fileno()) is not w:
                return
            fd = w.conn.fileno()
            try:
                self._sockets.modify(fd, 0)  # the loop stops watching it
            except OSError:
                return
            try:
                found = self._read_until(w, att, timeout)
            finally:
                with contextlib.suppress(OSError):
                    self._sockets.modify(fd, select.EPOLLIN)
        finally:
            w.reading.release()
        if found is not None:  # its result: handed over with the socket given back
            self._notify(*found)

    def _read_until(
        self, w: _Worker, att: ProcessAttempt, timeout: float | None
    ) -> tuple[ProcessAttempt, _Worker, tuple[Any, ...]] | None:
        """:meth:`read_result`'s wait (``w.reading`` held): ``att``'s result, applied to
        the pool, for :meth:`_notify`; None when it gave up."""
        end = None if timeout is None else time.monotonic() + timeout
        spin = self._spin_for(timeout)
        while True:
            events = None
            if spin > 0 and self._spinner.acquire(blocking=False):
                try:
                    events = _spin(w.poller, spin)
                finally:
                    self._spinner.release()
            spin = 0.0
            if not events:
                left = None if end is None else max(0.0, end - time.monotonic())
                events = w.poller.poll(None if left is None else math.ceil(left * 1000))
            if not events:
                return None  # timed out
            for fd, _ in events:
                if fd == w.wake:
                    with contextlib.suppress(OSError):
                        os.eventfd_read(w.wake)
                    return None  # the loop needs the socket
            msg = _recv(w)
            if msg is None:
                return None  # its end: the loop sees it too, and its exit follows
            found = self._apply(w, msg)
            if found is None:
                continue
            if msg[0] == "result":
                return found
            self._notify(*found)  # "started", "event": not sent for such an attempt

    def _spin_for(self, timeout: float | None) -> float:
        """How long :meth:`_read_until` may spin (seconds): :data:`_SPIN_S` while the
        recent actions are short and a core is left after the busy workers, else 0."""
        if self._recent_s >= _SPIN_IF_UNDER_S:
            return 0.0
        busy = sum(1 for w in list(self._workers.values()) if w.attempt is not None)
        if busy >= self.cores:
            return 0.0
        return _SPIN_S if timeout is None else min(_SPIN_S, timeout)

    def _on_exit(self, w: _Worker) -> None:
        """On the loop: the pool's first worker, a child of this process, exited (its
        pidfd is readable). Kill its process group and reap it, as a zygote does for
        its own workers, then handle its death."""
        with self._lock:
            if w.pidfd < 0:
                return
            self._unwatch(w.pidfd)
            returncode = None
            try:
                # still a zombie, so its pid (its group's id) is not anyone else's yet
                os.waitid(os.P_PID, w.pid, os.WEXITED | os.WNOWAIT)
                _kill_group(w.pid)
                _, status = os.waitpid(w.pid, 0)
                returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                pass  # reaped by someone else (os.wait() in the user's code)
            os.close(w.pidfd)
            w.pidfd = -1  # reaped: never signal its pid again (_kill_worker)
        self._exited(w, returncode)

    def _fork_worker(self) -> tuple[int, socket.socket, int, _Zygote | None, int]:
        """Have the zygote fork a worker: its pid, our end of its socket, its start-page
        slot, the zygote. The request may have been sent already (the first worker of a
        forked zygote). A zygote that is gone or stuck is replaced once (by a fresh
        interpreter: this process has threads now). The pool's first worker, when this
        process forked it itself, comes first (zygote None)."""
        if self._first is not None:
            pid, sock, slot, pidfd = self._first
            self._first = None
            return pid, sock, slot, None, pidfd
        for _ in range(2):
            zygote = self._zygote
            if zygote is None:
                zygote = self._zygote = _Zygote("fresh", self._env, self.blas_threads)
                self._zygotes.append(zygote)
            try:
                if zygote.asked is None:
                    zygote.ask(self._page_fd, self._free_slots[-1])
                    self._free_slots.pop()
                return (*zygote.take(), zygote, -1)
            except OSError:
                self._zygote = None  # its workers are handled when its notify socket closes
                self._drop_request(zygote)
                _kill_group(zygote.pid)
        raise WorkerCrashed("cannot start a worker process: its zygote process keeps failing")

    def _read(self, w: _Worker) -> bool:
        """Handle one message from ``w``'s socket (``w.reading`` held); False at its end."""
        msg = _recv(w)
        if msg is None:
            return False
        found = self._apply(w, msg)
        if found is not None:
            self._notify(*found)
        return True

    def _on_notice(self, zygote: _Zygote) -> None:
        """A worker of ``zygote`` exited (or the zygote itself is gone)."""
        try:
            data = zygote.notify.recv(_zygote.NOTICE.size)
        except OSError:
            data = b""
        if data:
            pid, returncode = _zygote.NOTICE.unpack(data)
            with self._lock:
                dead = [
                    (w, returncode)
                    for w in self._workers.values()
                    if w.pid == pid and w.zygote is zygote
                ]
        else:  # the zygote died: its workers are orphans nobody reaps for us
            self._unwatch(zygote.notify.fileno())
            with self._lock:
                with contextlib.suppress(ValueError):  # the pool is closing: not ours now
                    self._zygotes.remove(zygote)
                if self._zygote is zygote:
                    self._zygote = None
                self._drop_request(zygote)
                dead = [(w, None) for w in self._workers.values() if w.zygote is zygote]
            for w, _ in dead:
                _kill_group(w.pid)
            zygote.close()
        for w, code in dead:
            self._exited(w, code)

    def _exited(self, w: _Worker, returncode: int | None) -> None:
        """On the loop: worker ``w`` exited and was reaped. What it sent before it died
        is still in its socket, and its results count: read them, then handle its
        death."""
        if not w.reading.acquire(blocking=False):
            # A thread reads it for its attempt's result (read_result): ask it to let
            # go, which it does at once (nothing it holds meanwhile waits for the loop).
            if w.wake >= 0:
                os.eventfd_write(w.wake, 1)
            w.reading.acquire()
        try:
            while not w.eof and w.conn.poll(0):
                w.eof = not self._read(w)
            self._on_death(w, returncode)
        finally:
            w.reading.release()

    def _drop_request(self, zygote: _Zygote) -> None:
        slot = zygote.drop_request()
        if slot is not None:
            self._free_slots.append(slot)

    def _note_start(self, w: _Worker) -> None:
        """Learn from the start page whether ``w``'s attempt started (lock held): for an
        attempt that sent no "started" message, when its worker died or is killed."""
        att = w.attempt
        if att is None or att.started or self._page is None:
            return
        offset = _worker.START.size * w.slot
        (attempt_id,) = struct.unpack_from("=q", self._page, offset)  # the id, then
        (at,) = struct.unpack_from("=d", self._page, offset + 8)  # its time (written first)
        if attempt_id == att.id:
            att.started, att.started_at, att.worker = True, at, w.pid

    def _apply(
        self, w: _Worker, msg: tuple[Any, ...]
    ) -> tuple[ProcessAttempt, _Worker, tuple[Any, ...]] | None:
        """Record a message of ``w`` in the pool's state (``w.reading`` held); what
        :meth:`_notify` must then tell its attempt, if anything."""
        with self._lock:
            if self._workers.get(w.conn) is not w:
                return None
            kind = msg[0]
            if kind == "ready":
                self._startup_failures = 0
                w.state = WorkerState.BUSY if w.attempt is not None else WorkerState.IDLE
                return None
            att = w.attempt
            if att is None or att.id != msg[1]:
                return None
            if kind == "result":
                res: Result = msg[2]  # every result counts for read_result's spin
                self._recent_s += 0.2 * (res.finished_at - res.started_at - self._recent_s)
                w.attempt = None
                w.state = WorkerState.IDLE
                if not self._closed:
                    self._assign()
        return att, w, msg

    def _notify(self, att: ProcessAttempt, w: _Worker, msg: tuple[Any, ...]) -> None:
        """Tell ``att`` what its worker ``w`` sent (:meth:`_apply`), outside the lock:
        its callbacks may call back into the pool."""
        kind = msg[0]
        if kind == "started":
            att.started_at, att.worker = msg[2], w.pid
            att.started = True
            att.on_started(w.pid, msg[2])
        elif kind == "event":
            att.on_event(msg[2], msg[3], pickle.loads(msg[4]))
        elif kind == "result" and att.on_result is not None:
            att.on_result(msg[2])  # its owner ends it (the future stays pending)
        elif kind == "result" and not att.future.done():
            # in a reader callback on the runner's loop, with nothing else under way
            att.direct = self._own_loop is None
            att.future.set_result(msg[2])

    def _on_death(self, w: _Worker, returncode: int | None) -> None:
        """Worker ``w`` exited with ``returncode`` (its zygote killed its group and
        reaped it; ``w.reading`` held); None: unknown (its zygote died too)."""
        conn = w.conn
        with self._lock:
            if self._workers.pop(conn, None) is None:
                return
            w.state = WorkerState.GONE
            self._note_start(w)
            self._free_slots.append(w.slot)
            if self._closed and not self._workers:
                self._unwatch_zygotes()
                self._all_gone.set()
        self._unwatch_socket(w)
        w.close()
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


def _recv(w: _Worker) -> tuple[Any, ...] | None:
    """The next message on ``w``'s socket (``w.reading`` held); None at its end."""
    if w.conn.closed:
        return None
    try:
        return pickle.loads(w.conn.recv_bytes())  # type: ignore[no-any-return]
    except (EOFError, OSError):
        return None


def _spin(poller: Any, seconds: float) -> list[tuple[int, int]]:
    """Poll ``poller`` without sleeping for up to ``seconds``; its events, or []."""
    end = time.perf_counter() + seconds
    while True:
        events: list[tuple[int, int]] = poller.poll(0)
        if events or time.perf_counter() >= end:
            return events


def _send_stop(w: _Worker) -> None:
    with contextlib.suppress(OSError):
        w.conn.send_bytes(b"")


def _kill_worker(w: _Worker) -> None:
    """SIGKILL worker ``w`` and its process group (lock held)."""
    _kill_group(w.pid)
    if w.pidfd >= 0:  # our own child, not reaped yet: it may not lead its group yet
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(w.pidfd, signal.SIGKILL)


def _fork_first(
    page_fd: int, slot: int, env: dict[str, str], blas_threads: int, pools_loaded: bool
) -> tuple[int, socket.socket]:
    """Fork a pool's first worker from this process, which runs a single thread (as for
    the zygote): its pid and our end of its socket. It does what the zygote does
    for itself and its workers, in a session of its own (no terminal: job control
    never stops it), and runs the worker loop."""
    sock, child = socket.socketpair()
    try:
        pid = os.fork()
        if pid == 0:
            try:
                gc.freeze()  # its collections never walk the parent's objects
                os.environ.update(env)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _worker.init_process(blas_threads, pools_loaded)
                _zygote.child_main(child.fileno(), page_fd, slot, (sock.fileno(),), True)
            finally:
                os._exit(1)
    except BaseException:
        sock.close()
        raise
    finally:
        child.close()
    return pid, sock


def _end_first(pid: int, sock: socket.socket, pidfd: int) -> None:
    """Stop and reap a pool's first worker that never joined the pool (it never ran an
    action: there is nothing in its process group to kill)."""
    conn = Connection(sock.detach())
    with contextlib.suppress(OSError):
        conn.send_bytes(b"")  # stop
    conn.close()
    if not _wait_exit(pid, None, 10.0):
        with contextlib.suppress(OSError):  # our child, not reaped: its pid is ours
            os.kill(pid, signal.SIGKILL)
        _wait_exit(pid, None, None)
    if pidfd >= 0:
        os.close(pidfd)


def _kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (the worker and what it started).

    The zygote puts each worker in a group of its own before it tells us its pid, so
    the group exists from the start; once it is empty there is nothing to kill, and we
    never fall back to ``kill(pid)``: a reaped pid may already belong to someone else.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _ignore(*args: Any) -> None:
    pass
