"""The CPU pool: worker processes, each with its own socket, read on an asyncio loop.

Data flow (messages: :mod:`actionpool._link`; processes: :mod:`.zygote_client`; the
loop reader and a waiting thread's read: :mod:`.readers`)::

    scheduler ─submit(Task)─► pending ─► idle worker ─socket─► worker main thread
                                              ▲                     │
    scheduler ◄─callbacks/Future─ loop reader ◄─socket───────── READY / STARTED /
                                  (an epoll set of the worker    EVENT / RESULT,
                                   sockets, the zygotes' notify  or EOF; the zygote's
                                   sockets, first worker's pidfd) notice = it exited

A thread blocked in a direct call's ``result()`` reads that call's reply itself
(:meth:`ProcessPool.read_result`, the reader's): it takes the worker's socket out of the
loop's epoll set while it waits, so the reply wakes one thread, not the loop and then
the caller.

Why not ``loky.ProcessPoolExecutor`` (or ``concurrent.futures``): there, one dead
worker marks the whole executor broken and fails every pending future, and killing
the worker of one timed-out call kills its siblings' work too. Here each worker has its
own socket, so the pool always knows which attempt runs where and whether it started:

* a worker that dies (segfault, ``os._exit``, SIGKILL, OOM kill) fails only the attempt
  it was running, with :class:`~actionpool.WorkerCrashed` (exit code or signal); an
  attempt it had received but not started is handed to a fresh worker;
* killing an attempt (hard timeout, cancel) kills only its worker's process group;
* the pool heals by starting replacements on demand.

Workers are forks of a *zygote*, so that a worker and each replacement start without
a fresh interpreter's cost; how the zygote starts (a fork of this process, or a fresh
interpreter) and how workers are forked and reaped is :mod:`.zygote_client`'s. Usable
cores still come from ``loky.cpu_count`` (see :mod:`actionpool.sizing`).

The pool keeps its workers and their attempts (submit, assign, kill, close, deaths);
reading the workers' sockets is its :class:`~.readers.WorkerReader`'s job, which hands
each message back to :meth:`ProcessPool._apply` and each drained worker's end to
:meth:`ProcessPool._on_death`.

States: a worker is STARTING (spawned, no READY yet), IDLE, BUSY, or GONE; the pool
is open or closed.

Threads and locks (the reader's side: :mod:`.readers`):

* any thread calls ``submit``, ``submit_if_idle``, ``kill``, ``forget``, ``pids`` and
  ``close`` (never the loop's own thread); they change the pool's state under
  ``_lock`` (an ``RLock``), which guards ``_workers``, ``_pending``, ``_closed``, the
  startup-failure count, each worker's ``state`` and ``attempt``, and the
  :class:`~.zygote_client._Spawner` (zygotes, first worker, free start-page slots);
* the loop (the runner's scheduler loop given to :meth:`ProcessPool.attach`, else a
  thread of the reader's own) runs the readers: worker sockets, zygote notices, the
  first worker's pidfd, and every death;
* Lock order: a worker's ``reading``, then ``_lock``. No thread waits for a
  ``reading`` while it holds ``_lock`` (the reading thread may need ``_lock`` to let
  go). An attempt's callbacks (``on_started``, ``on_event``, ``on_result``, its
  future) run outside ``_lock``: they may call back into the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import mmap
import os
import select
import signal
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from enum import Enum
from multiprocessing.connection import Connection
from typing import Any

import loky
import psutil

from .. import _link
from .._worker import Result, Task
from ..errors import WorkerCrashed
from ..sizing import worker_env
from . import NotStarted, withdraw
from .portable import _LokySpawner, start_page_file
from .readers import _READ_HERE, Found, WorkerReader
from .zygote_client import (
    WORKER_START_MODES,
    _end_first,
    _kill_group,
    _Spawner,
    _Zygote,
    describe_exit,
    reap_child,
    resolve_worker_start,
)

__all__ = [
    "WORKER_START_MODES",
    "ProcessAttempt",
    "ProcessPool",
    "describe_exit",
    "resolve_worker_start",
]

# Fork a pool's first worker from this process (ProcessPool._start_forked): where
# pidfds exist (Linux), by which this process watches its exit without the zygote.
_FORK_FIRST = hasattr(os, "pidfd_open")


class WorkerState(Enum):
    """Lifecycle of one worker process."""

    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    KILLED = "killed"  # SIGKILL sent, its exit not seen yet: it takes no attempt
    RETIRING = "retiring"  # recycled: told to stop after its last result; takes none
    GONE = "gone"


class _Worker:
    __slots__ = (
        "attempt",
        "conn",
        "eof",
        "pid",
        "pidfd",
        "poller",
        "process",
        "reading",
        "slot",
        "state",
        "tasks",
        "wake",
        "zygote",
    )

    def __init__(
        self,
        pid: int,
        conn: Connection,
        zygote: _Zygote | None,
        slot: int,
        pidfd: int = -1,
        process: Any = None,
        read_here: bool = _READ_HERE,
    ) -> None:
        self.conn = conn
        self.pid = pid
        self.slot = slot  # its slot in the pool's start page
        # it reaps this worker and reports its exit; None: the pool's first worker,
        # a child of this process, which watches its pidfd and reaps it itself
        self.zygote = zygote
        self.pidfd = pidfd  # -1 once reaped (or for a zygote's worker)
        # the portable path's worker: its loky process, None once joined
        self.process = process
        self.eof = False  # its socket closed: its exit notice is on the way
        self.state = WorkerState.STARTING
        self.attempt: ProcessAttempt | None = None
        self.tasks = 0  # results it sent (for max_tasks recycling)
        # Held by whoever reads the socket: the loop's reader, or a thread waiting for
        # its attempt's result (ProcessPool.read_result), which the loop asks to let go
        # by writing to ``wake``.
        self.reading = threading.Lock()
        self.wake = -1
        self.poller: Any = None
        if read_here:
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
            ``concurrent.futures.Future`` nobody waits on, then reading it back, was a
            large share of the parent's CPU for a runner's direct call.
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
        "recycled",
        "released",
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
        self.started_at: float | None = None
        self.worker: int | str | None = None
        self.killed = ""
        self.released = False  # the scheduler freed this attempt's slot
        self.direct = False  # resolved by a reader on the pool's loop (see ProcessPool.attach)
        self.holder: _Worker | None = None  # the worker it was sent to
        # why its worker was replaced right after it ({"reason", "worker", "tasks",
        # "rss"}), or None: set before its result is delivered
        self.recycled: dict[str, Any] | None = None

    def cancel(self, reason: str = "cancel") -> None:
        """Stop this attempt now: withdraw it, or kill its worker's process group."""
        self._pool.kill(self, reason)

    def wait_here(self, timeout: float | None) -> None:
        """Read this attempt's result from its worker's socket in this thread
        (:meth:`ProcessPool.read_result`)."""
        self._pool.read_result(self, timeout)


class ProcessPool:
    """Up to ``size`` worker processes, started on demand and replaced when they die."""

    kind = "cpu"
    label = "cpu"
    stops_by_kill = True  # cancel kills the worker's process group
    # The reader's, bound in __init__: a waiting thread (ProcessAttempt.wait_here) goes
    # straight to it. _on_readable and _spin_for are there for the tests.
    read_result: Callable[[ProcessAttempt, float | None], None]
    _on_readable: Callable[[_Worker], None]
    _spin_for: Callable[[float | None], float]

    def __init__(
        self,
        size: int,
        blas_threads: int,
        worker_start: str | None = None,
        cores: int | None = None,
        max_tasks: int | None = None,
        max_memory: int | None = None,
        portable: bool = False,
        reuse_zygote: bool = False,
    ) -> None:
        """Start the pool; its zygote at once if it forks this process (see
        :func:`resolve_worker_start`, whose errors it raises), else on first use.
        ``reuse_zygote``: a fresh zygote starts at once too, or rather an idle one an
        earlier pool left is adopted, and at the close this pool's is left idle for
        the next (:class:`.zygote_client._IdleZygotes`).
        ``portable``: start workers on the portable path (:mod:`.portable`: loky's
        processes, stream sockets, no zygote, no start page) instead.
        ``cores``: the logical CPUs this process may use (default
        ``loky.cpu_count()``), which bounds when a waiting thread may spin
        (:meth:`read_result`). ``max_tasks``: a worker is replaced after this many
        attempts; ``max_memory``: after an attempt whose result arrives while the
        worker's resident set is above this many bytes (None: never)."""
        self.size = size
        self.max_tasks = max_tasks
        self.max_memory = max_memory
        self.blas_threads = blas_threads
        self.portable = portable
        if portable:  # every worker is a fresh interpreter; the mode is checked all the same
            if worker_start not in (None, *WORKER_START_MODES):
                resolve_worker_start(worker_start)  # raises, naming the modes
            if worker_start == "fork":
                raise RuntimeError(
                    "worker_start='fork' needs the zygote path, and cpu actions take the"
                    " portable process path here (see actionpool.platforms; on Linux, unset"
                    " ACTIONPOOL_PORTABLE): use worker_start='auto' or 'fresh'"
                )
            self.worker_start = "fresh"
        else:
            self.worker_start = resolve_worker_start(worker_start)
        self._lock = threading.RLock()
        self._workers: dict[Connection, _Worker] = {}
        self._pending: deque[ProcessAttempt] = deque()
        self._ids = itertools.count(1)  # 0: a start-page slot no attempt used yet
        self._closed = False
        self._all_gone = threading.Event()  # closed, and every worker's exit handled
        # The start page: one START slot per worker, written by the worker as it starts
        # an attempt, read here only when a worker died or is being killed.
        self._page_fd = -1
        self._page: mmap.mmap | None = None
        if portable:  # no memfd (macOS): an unlinked temporary file, shared the same way
            self._page_fd = start_page_file(_link.START.size * size)
        elif hasattr(os, "memfd_create"):  # elsewhere every attempt is announced
            self._page_fd = os.memfd_create("actionpool-starts", os.MFD_CLOEXEC)
            os.ftruncate(self._page_fd, _link.START.size * size)
        if self._page_fd >= 0:
            self._page = mmap.mmap(self._page_fd, _link.START.size * size)
        self._free_slots = list(range(size - 1, -1, -1))
        # its zygotes and the first worker, if this process forks it (zygote_client);
        # on the portable path, loky's processes
        self._spawner: _Spawner | _LokySpawner
        if portable:
            self._spawner = _LokySpawner(
                worker_env(blas_threads), blas_threads, self._page_fd, self._free_slots
            )
        else:
            self._spawner = _Spawner(
                worker_env(blas_threads),
                blas_threads,
                self._page_fd,
                self._free_slots,
                reuse=reuse_zygote,
            )
        if (
            self.worker_start == "fork" and not portable
        ):  # now, while this process has a single thread
            self._start_forked()
        elif reuse_zygote and isinstance(self._spawner, _Spawner):
            self._spawner.start_fresh()
        # Worker sockets and zygote notices are read by callbacks on an asyncio loop:
        # the runner's scheduler loop (attach), else a private one started on demand.
        # Made after the forks: its epoll set is theirs to ignore.
        self._reader = WorkerReader(
            self._workers,
            self._apply,
            self._on_death,
            cores if cores is not None else max(1, loky.cpu_count()),
            read_here=_READ_HERE and not portable,
        )
        self.read_result = self._reader.read_result
        self._on_readable = self._reader.on_readable
        self._spin_for = self._reader.spin_for

    @property
    def cores(self) -> int:
        """The logical CPUs this process may use (bounds a waiting thread's spin)."""
        return self._reader.cores

    @cores.setter
    def cores(self, cores: int) -> None:
        self._reader.cores = cores

    def _start_forked(self) -> None:
        """Fork the zygote and, where pidfds exist (Linux), the first worker too
        (:meth:`_Spawner.start_forked`); never on the portable path."""
        assert isinstance(self._spawner, _Spawner)
        self._spawner.start_forked(_FORK_FIRST)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the workers' sockets on ``loop`` from now on (the runner's scheduler
        loop: its results then need no hop from another thread). ``loop`` must run in a
        thread of its own until :meth:`close` returns. Call it before the first submit;
        a pool never attached runs a loop thread of its own."""
        with self._lock:
            if self._reader.loop is not None:
                raise RuntimeError("the cpu pool already reads its workers on a loop")
            self._reader.loop = loop

    def set_output(self, output: Callable[[str, str, Any], None]) -> None:
        """Hand the workers' output events (:data:`~actionpool.output.OUTPUT_KINDS`)
        to ``output(node, kind, data)`` from now on, instead of to each attempt's
        ``on_event`` (the runner's :func:`~actionpool.output.write_here`)."""
        self._reader.output = output

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
                withdraw(att.future)
                return
            for w in self._workers.values():
                if w.attempt is att:
                    self._note_start(w)
                    _kill_worker(w)
                    return

    def forget(self, prefix: str) -> None:
        """Tell every worker that the run of ``prefix`` is over (drop its mappings)."""
        data = _link.encode((_link.FORGET, prefix))
        with self._lock:
            for w in self._workers.values():
                with contextlib.suppress(OSError):
                    w.conn.send_bytes(data)

    def pids(self) -> list[int]:
        """The pids of the live worker processes."""
        with self._lock:
            pids = [w.pid for w in self._workers.values() if w.state is not WorkerState.GONE]
            first = self._spawner.first
            if first is not None:  # forked at the start, not used yet
                pids.append(first[0])
            return pids

    def describe(self) -> str:
        """One line for sizing reports."""
        if self.portable:
            return (
                f"{self.size} worker processes (portable path: fresh interpreters started"
                f" by loky), BLAS threads {self.blas_threads} each"
            )
        start = "forked from this process" if self.worker_start == "fork" else "fresh"
        return (
            f"{self.size} worker processes (zygote {start}), BLAS threads {self.blas_threads} each"
        )

    def zygote_pids(self) -> list[int]:
        """The pids of the pool's zygote processes (see :mod:`actionpool._zygote`)."""
        with self._lock:
            return self._spawner.pids()

    @property
    def _zygote(self) -> _Zygote | None:
        """The zygote that forks the next worker, if started (for tests)."""
        return self._spawner.zygote

    def close(self, cancel: bool = False, *, reap: bool = True) -> None:
        """Stop every worker and wait until each has exited.

        Args:
            cancel: kill running attempts (their futures fail with
                :class:`~actionpool.WorkerCrashed`) instead of waiting for them to
                finish; queued attempts are withdrawn either way.
            reap: also wait for the zygote processes to exit. False leaves that to
                :meth:`reap`, so that the caller can close other things meanwhile:
                each zygote exits on its own right after its last worker's exit
                notice, and its exit (the teardown of a fork of this process's address
                space) is not free.
        """
        with self._lock:
            self._closed = True
            for att in self._pending:
                withdraw(att.future)
            self._pending.clear()
            for w in self._workers.values():
                if cancel:
                    if w.attempt is not None:
                        w.attempt.killed = w.attempt.killed or "cancel"
                    _kill_worker(w)
                else:  # a busy worker reads its stop after sending its result
                    _link.send_stop(w.conn)
            # each zygote exits after its last worker's notice; a first worker never
            # used comes back, to be stopped below
            first = self._spawner.drain()
            # with workers, the last one's exit unwatches the zygotes (on the loop)
            idle = not self._workers
            if idle:
                self._all_gone.set()
            loop = self._reader.loop
        if loop is not None and self._reader.on_loop():
            raise RuntimeError("the cpu pool cannot be closed from its own loop's thread")
        if first is not None:
            _end_first(first[0], first[1], first[3])
        # An idle worker exits at its stop at once; one that is still there 10 s on
        # ignored it and is killed. A running attempt is waited for, however long.
        while not self._all_gone.wait(10):
            with self._lock:
                for w in self._workers.values():
                    if w.attempt is None and w.state is not WorkerState.KILLED:
                        _kill_worker(w)
        if idle and loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing watches
                self._reader.in_loop(self._unwatch_zygotes).result()
        if reap:
            self.reap()

    def reap(self) -> None:
        """After :meth:`close`: wait until every zygote has exited, then free the rest."""
        with self._lock:
            zygotes = self._spawner.take_all()
        for zygote in zygotes:
            zygote.close()
        self._reader.close()  # its loop stops before the page goes (deaths read it)
        if self._page is not None:
            self._page.close()
            os.close(self._page_fd)
            self._page = None

    def _unwatch_zygotes(self) -> None:
        """On the loop, once the pool is closed and its workers are gone: nothing more
        is to be heard from the zygotes (their sockets close when they exit), and
        :meth:`reap` closes them from another thread."""
        for z in self._spawner.zygotes:
            if not z.closed:
                self._reader.unwatch(z.notify.fileno())
        self._reader.unwatch_set()  # no socket is left in it

    # ---- internals (lock held unless said otherwise) ------------------------------------

    def _prestarted(self) -> _Worker | None:
        """The pool's first worker, forked at its start by this process or by the
        zygote unasked, when its pid is known (lock held; for the zygote's, once it
        has answered): it joins the pool now, in the caller's thread, and a task sent
        to it waits in its socket until it is ready. None if there is none, or the
        zygote's answer is not in yet."""
        try:
            if not self._spawner.prestarted(len(self._workers) >= self.size):
                return None
            return self._spawn()
        except (OSError, WorkerCrashed):
            return None  # the scheduler's own dispatch goes the long way and reports it

    def _idle_worker(self) -> _Worker | None:
        """A live worker with no attempt (lock held), or None."""
        for w in self._workers.values():
            # Not a killed one: a result it sent before the kill frees it, and an
            # attempt sent to it then would die with it, never started.
            if w.attempt is None and w.state not in _TAKES_NONE:
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
            _link.send(worker.conn, (att.id, att.task))

    def _spawn(self) -> _Worker:
        if isinstance(self._spawner, _LokySpawner):
            pid, conn, slot, process = self._spawner.start_worker()
            worker = _Worker(pid, conn, None, slot, process=process, read_here=False)
        else:
            pid, parent_sock, slot, zygote, pidfd = self._spawner.fork_worker()
            worker = _Worker(pid, Connection(parent_sock.detach()), zygote, slot, pidfd)
        self._workers[worker.conn] = worker
        reader = self._reader
        reader.ensure_loop()
        zygotes = [z for z in self._spawner.zygotes if not reader.watches(z.notify.fileno())]

        def watch() -> None:
            for z in zygotes:
                reader.watch(z.notify.fileno(), self._on_notice, z)
            reader.watch_socket(worker)
            if worker.pidfd >= 0:
                reader.watch(worker.pidfd, self._on_exit, worker)
            if worker.process is not None:
                reader.watch(worker.process.sentinel, self._on_sentinel, worker)

        reader.in_loop(watch)
        return worker

    # ---- deaths, and what the reader hands back (on the loop, or in read_result) --------

    def _on_exit(self, w: _Worker) -> None:
        """On the loop: the pool's first worker, a child of this process, exited (its
        pidfd is readable). Kill its process group and reap it, as a zygote does for
        its own workers, then handle its death."""
        with self._lock:
            if w.pidfd < 0:
                return
            self._reader.unwatch(w.pidfd)
            returncode = reap_child(w.pid)
            os.close(w.pidfd)
            w.pidfd = -1  # reaped: never signal its pid again (_kill_worker)
        self._reader.exited(w, returncode)

    def _on_sentinel(self, w: _Worker) -> None:
        """On the loop: a portable path's worker ended (its process's sentinel is
        readable). Kill its process group while it is a zombie (its pid, the group's
        id, is nobody else's yet), join it, then handle its death."""
        with self._lock:
            process = w.process
            if process is None:
                return
            self._reader.unwatch(process.sentinel)
            _kill_group(w.pid)
            process.join()
            returncode = process.exitcode
            w.process = None  # joined: never signal its pid again (_kill_worker)
        self._reader.exited(w, returncode)

    def _on_notice(self, zygote: _Zygote) -> None:
        """A worker of ``zygote`` exited (or the zygote itself is gone)."""
        notice = zygote.read_notice()
        if notice is not None:
            pid, returncode = notice
            with self._lock:
                dead: list[tuple[_Worker, int | None]] = [
                    (w, returncode)
                    for w in self._workers.values()
                    if w.pid == pid and w.zygote is zygote
                ]
        else:  # the zygote died: its workers are orphans nobody reaps for us
            self._reader.unwatch(zygote.notify.fileno())
            with self._lock:
                self._spawner.lost(zygote)
                dead = [(w, None) for w in self._workers.values() if w.zygote is zygote]
            for w, _ in dead:
                _kill_group(w.pid)
            zygote.close()
        for w, code in dead:
            self._reader.exited(w, code)

    def note_started(self, att: ProcessAttempt) -> bool:
        """Whether ``att`` has started, read from the start page where it sent no
        "started" message (then its ``started_at`` and ``worker`` are set too); from
        any thread."""
        with self._lock:
            w = att.holder
            if not att.started and w is not None and w.attempt is att:
                self._note_start(w)
            return att.started

    def _note_start(self, w: _Worker) -> None:
        """Learn from the start page whether ``w``'s attempt started (lock held): for an
        attempt that sent no "started" message, when its worker died or is killed."""
        att = w.attempt
        if att is None or att.started or self._page is None:
            return
        attempt_id, at = _link.read_started(self._page, _link.START.size * w.slot)
        if attempt_id == att.id:
            att.started, att.started_at, att.worker = True, at, w.pid

    def _apply(self, w: _Worker, msg: tuple[Any, ...]) -> Found | None:
        """Record a message of ``w`` in the pool's state (``w.reading`` held); what
        the reader must then tell its attempt (:meth:`.WorkerReader.notify`), if
        anything."""
        with self._lock:
            if self._workers.get(w.conn) is not w:
                return None
            kind = msg[0]
            if kind == _link.READY:
                if w.state is WorkerState.STARTING:
                    w.state = WorkerState.BUSY if w.attempt is not None else WorkerState.IDLE
                return None
            att = w.attempt
            if att is None or att.id != msg[1]:
                return None
            if kind == _link.RESULT:
                res: Result = msg[2]  # every result counts for read_result's spin
                reader = self._reader
                reader.recent_s += 0.2 * (res.finished_at - res.started_at - reader.recent_s)
                w.attempt = None
                w.tasks += 1
                if w.state is not WorkerState.KILLED:
                    w.state = WorkerState.IDLE
                    if self.max_tasks is not None or self.max_memory is not None:
                        self._recycle_if_due(w, att)
                if not self._closed:
                    self._assign()
        return att, w, msg

    def _recycle_if_due(self, w: _Worker, att: ProcessAttempt) -> None:
        """Between two attempts (its result just read, lock held): retire ``w`` if it
        ran ``max_tasks`` attempts or its resident set is above ``max_memory``. It is
        told to stop, as at a pool's close: it closes its resources and exits, and its
        exit notice frees its place for a fresh worker (:meth:`_on_death`)."""
        reason = ""
        rss = None
        if self.max_tasks is not None and w.tasks >= self.max_tasks:
            reason = "max_tasks_per_worker"
        if self.max_memory is not None:
            with contextlib.suppress(psutil.Error):  # gone already: its death says so
                rss = psutil.Process(w.pid).memory_info().rss
            if not reason and rss is not None and rss > self.max_memory:
                reason = "max_worker_memory"
        if not reason:
            return
        w.state = WorkerState.RETIRING
        att.recycled = {"reason": reason, "worker": w.pid, "tasks": w.tasks, "rss": rss}
        _link.send_stop(w.conn)  # (nothing if it died meanwhile: its notice says so)

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
        self._reader.unwatch_socket(w)
        w.close()
        text, exitcode, sig = describe_exit(returncode)
        with self._lock:
            att = w.attempt
            if not self._closed:
                self._assign()
        if att is None:
            return
        # What happened, not what to do about it: whether the attempt runs again is
        # the scheduler's decision (a death before the start cost nothing).
        who = f"node {att.task.node!r}: its worker process (pid {w.pid})"
        exc: Exception
        if att.killed:
            exc = WorkerCrashed(f"{who} was killed to stop it ({att.killed})", exitcode, sig)
        elif att.started:
            exc = WorkerCrashed(f"{who} {text} while running it", exitcode, sig)
        else:
            crash = WorkerCrashed(
                f"{who} {text} before it started it (while starting, or unpickling its"
                " call and importing its modules)",
                exitcode,
                sig,
            )
            exc = NotStarted(crash)
        with contextlib.suppress(InvalidStateError):
            att.future.set_exception(exc)


_TAKES_NONE = frozenset((WorkerState.GONE, WorkerState.KILLED, WorkerState.RETIRING))
"""Worker states that never take another attempt (a killed worker's last result frees
it, and an attempt sent then would die with it, never started)."""


def _kill_worker(w: _Worker) -> None:
    """SIGKILL worker ``w`` and its process group (lock held)."""
    w.state = WorkerState.KILLED
    _kill_group(w.pid)
    if w.process is not None:  # not joined yet, so its pid is still ours; it may not
        with contextlib.suppress(OSError):  # lead its group yet (before its setsid)
            os.kill(w.pid, signal.SIGKILL)
    if w.pidfd >= 0:  # our own child, not reaped yet: it may not lead its group yet
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(w.pidfd, signal.SIGKILL)


def _ignore(*args: Any) -> None:
    pass
