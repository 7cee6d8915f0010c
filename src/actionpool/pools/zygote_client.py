"""The pool's client of its zygotes: how the CPU pool starts, stops and reaps processes.

Workers are forks of a *zygote* (:mod:`actionpool._zygote`), one small process per pool
that has already imported the worker side, so a worker (and each replacement after a
crash or a kill) starts without paying for a fresh interpreter. The zygote is a fork of
the parent when the parent runs a single thread at the pool's creation
(``worker_start="fork"``; workers inherit its modules, as with ``multiprocessing``'s
fork), else a fresh interpreter (``"fresh"``, like loky's processes: nothing inherited
but the environment); ``"auto"`` picks the first when it is safe. A thread-holding
parent is never forked. ``OMP_NUM_THREADS`` & co. are set in the zygote's environment,
never inherited from the parent (where, e.g., Dask's ``LocalCluster`` sets them to 1),
and threadpoolctl caps libraries already loaded.

Data flow (the pool's side of :mod:`actionpool._zygote`'s picture)::

    ProcessPool ─fork_worker()─► _Spawner ─ask(page, slot)─► _Zygote.ctl ═══► zygote
                                    │                                          │ fork
                ◄─(pid, socket, slot)── take() ◄──────── pid ─────────────────┤
                                                                            worker
    loop reader ◄── _Zygote.read_notice(): (pid, returncode) ◄── notify ── zygote reaps it
    the pool's first worker (Linux): forked by this process itself (_fork_first),
    watched through its pidfd and reaped here (reap_child), not by the zygote

Idle fresh zygotes (:class:`_IdleZygotes`, for a runner's pool: ``reuse``). In a
process that runs threads, a new pool's first result would wait for a fresh
interpreter's start and imports, and a notebook makes runner after runner. So a
closing pool does not drain its fresh zygote: once every worker's exit notice is read,
the zygote, alive, with no request pending and nothing unread, is kept idle (two at
most, the newest), and the next pool whose zygote would start the same way
(:class:`_FreshStart`: environment, ``sys.path``, working directory, BLAS cap,
authkey) adopts it at its creation; with none to adopt, it starts one then, not at its
first worker, so that the start overlaps what the caller does next. Forked zygotes
are never kept: they hold the parent's modules of their time. ::

    ProcessPool.close: _Spawner.drain() ─ the current fresh zygote is not drained
    ProcessPool.reap:  _Spawner.take_all() ── idle()? ──► _IDLE.put() ─► (the oldest of 3
                                                                         is closed)
    ProcessPool(): _Spawner.start_fresh() ◄── _IDLE.take(start) ─ idle()? else closed
    interpreter exit (atexit), stop_idle_zygotes(): _IDLE.clear() ─► close each
    a child forked from this process: forget_after_fork() closes its copies

An idle zygote ends with its parent however it dies: it exits when ``ctl`` closes, and
watches the parent's pidfd too (:func:`actionpool._zygote._watch_parent`), since a
child forked from the parent may hold a copy of ``ctl``.

Threads: the only lock here is :class:`_IdleZygotes`'s; nothing starts a thread. A
:class:`_Spawner` and its :class:`_Zygote` handles belong to the pool and are used
under the pool's lock (and in its ``__init__``, before another thread knows it), except
:meth:`_Zygote.read_notice`, called by the pool's loop reader alone (only that reader
reads ``notify``), and :meth:`_Zygote.close`, called once the zygote is out of the
pool's state (by the loop reader that saw it die, or by ``ProcessPool.reap``). An idle
zygote belongs to ``_IDLE`` while it is in its list, and it moves in or out only under
``_IDLE``'s lock (a pool's ``__init__`` or ``fork_worker`` takes one out, its ``reap``
puts one in, atexit or :func:`stop_idle_zygotes` empty it, from any thread); whoever
took it out owns it alone, and checks it (:meth:`_Zygote.idle`) or closes it without
that lock. Lock order: a pool's lock, then ``_IDLE``'s; under ``_IDLE``'s only its list
changes (no I/O, no wait), so no thread waits for anything while it holds it.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import multiprocessing
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import NamedTuple

from .. import _link, _worker, _zygote
from ..errors import WorkerCrashed

__all__ = [
    "WORKER_START_MODES",
    "describe_exit",
    "idle_zygote_pids",
    "prestart_idle_zygote",
    "resolve_worker_start",
    "stop_idle_zygotes",
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
_ZYGOTE_REPLY_S = 30.0  # a fork is quick: a reply this late means the zygote is stuck
_KEEP_IDLE = 2  # idle fresh zygotes kept for the next pools (_IdleZygotes)


class _FreshStart(NamedTuple):
    """What a fresh zygote bakes in when it starts, and hands down to every worker it
    forks: a pool may adopt an idle zygote (:class:`_IdleZygotes`) only if a zygote it
    would start now would get the same. Anything the interpreter reads only at its
    start belongs here: an ``os.environ`` or ``sys.path`` change, a ``chdir``, a new
    multiprocessing authkey all make a new zygote."""

    executable: str
    cwd: str | None
    path: str  # sys.path as JSON, the zygote's last argument
    env: tuple[tuple[str, str], ...]  # the whole environment, sorted
    blas_threads: int
    authkey: bytes

    @classmethod
    def now(cls, env: dict[str, str], blas_threads: int) -> _FreshStart:
        """The start of a fresh zygote launched now with overrides ``env``."""
        try:
            cwd: str | None = os.getcwd()
        except OSError:  # removed: the zygote would inherit it all the same
            cwd = None
        return cls(
            sys.executable,
            cwd,
            # str entries only: the import system skips any other (JSON could not carry it)
            json.dumps([p for p in sys.path if isinstance(p, str)]),
            tuple(sorted({**os.environ, **env}.items())),
            blas_threads,
            bytes(multiprocessing.current_process().authkey),
        )


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
        start: _FreshStart | None = None,
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
            start: for a fresh one, ``_FreshStart.now(env, blas_threads)`` if the
                caller has it already (else taken here).
        """
        ctl, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        notify, notify_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start: _FreshStart | None = None  # a fresh one's (see _IdleZygotes)
        try:
            if mode == "fork":
                if pools_loaded is None:
                    pools_loaded = _worker.native_pools_loaded()  # cheaper here than there
                _flush_std_streams()
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
                self.start = start = start or _FreshStart.now(env, blas_threads)
                # This process's multiprocessing authkey, through a pipe (never argv
                # or the environment, which other users may read), as multiprocessing's
                # spawn passes it: without it a Manager's proxies cannot be used in
                # the workers.
                key_r, key_w = os.pipe()
                try:
                    os.write(key_w, start.authkey)
                finally:
                    os.close(key_w)
                args = [str(ctl_child.fileno()), str(notify_child.fileno()), str(blas_threads)]
                args += [str(key_r), start.path]
                try:
                    self.proc = subprocess.Popen(
                        [start.executable, "-c", _LAUNCH, *args],
                        pass_fds=(ctl_child.fileno(), notify_child.fileno(), key_r),
                        env=dict(start.env),
                        start_new_session=True,
                    )
                finally:
                    os.close(key_r)
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

    def read_notice(self) -> tuple[int, int] | None:
        """On the pool's loop, ``notify`` being readable: (pid, return code) of a worker
        that exited, or None when the zygote itself is gone."""
        try:
            data = self.notify.recv(_zygote.NOTICE.size)
        except OSError:
            data = b""
        if not data:
            return None
        pid, returncode = _zygote.NOTICE.unpack(data)
        return pid, returncode

    def drain(self) -> None:
        """Tell the zygote that the pool is closing: it forks nothing more and exits
        after its last worker's exit notice (:data:`actionpool._zygote.DRAIN`)."""
        with contextlib.suppress(OSError):  # gone already: close() reaps it
            self.ctl.send(_zygote.DRAIN)

    def idle(self) -> bool:
        """Whether this fresh zygote, used by no pool, is alive and has nothing to tell:
        no request of ours pending, nothing unread in ``ctl`` or ``notify`` (a reply or a
        notice there would be about a worker that no pool knows of), its process not
        exited. Only such a zygote is kept for, or adopted by, another pool."""
        if self.closed or self.proc is None or self.asked is not None:
            return False
        if self.proc.poll() is not None:  # killed while idle: reaped now
            return False
        poller = select.poll()  # not select(): this process may hold fds past 1024
        poller.register(self.ctl, select.POLLIN)
        poller.register(self.notify, select.POLLIN)
        return not poller.poll(0)

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


class _IdleZygotes:
    """Fresh zygotes whose pools closed, kept idle for the next pool whose fresh zygote
    would start the same way (:class:`_FreshStart`): a fresh interpreter's start and
    imports are most of a runner's first result in a process that runs threads, and a
    notebook makes runner after runner. See the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Zygote] = []  # the oldest first
        self._closed = False  # the interpreter exits: nothing is kept from now on

    def put(self, zygote: _Zygote) -> list[_Zygote]:
        """Keep ``zygote`` (idle: :meth:`_Zygote.idle`); the zygotes the caller must
        close, outside any lock: the oldest beyond the few kept, or ``zygote`` itself
        once the interpreter exits."""
        with self._lock:
            if self._closed:
                return [zygote]
            self._idle.append(zygote)
            extra = self._idle[:-_KEEP_IDLE]
            del self._idle[:-_KEEP_IDLE]
        return extra

    def take(self, start: _FreshStart) -> _Zygote | None:
        """An idle zygote that started as ``start``, now the caller's; None if there is
        none. One that died or has a stray message is closed and skipped."""
        while True:
            with self._lock:
                found = next((z for z in reversed(self._idle) if z.start == start), None)
                if found is None:
                    return None
                self._idle.remove(found)
            if found.idle():
                return found
            found.close()

    def pids(self) -> list[int]:
        with self._lock:
            return [z.pid for z in self._idle]

    def clear(self, closing: bool = False) -> None:
        """Stop every idle zygote and wait for it to exit; ``closing`` (at the
        interpreter's exit): keep none from now on."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._closed = self._closed or closing
        for zygote in idle:
            zygote.close()

    def forget_after_fork(self) -> None:
        """In a child forked from this process: these zygotes are the parent's. Close
        the child's copies of their sockets (a copy left open would keep an idle
        zygote waiting on for as long as the child lives, its parent dead) and never
        wait for them; the lock may have been held by a thread the child lacks."""
        idle, self._idle = self._idle, []
        self._lock = threading.Lock()
        for zygote in idle:
            zygote.closed = True
            zygote.ctl.close()
            zygote.notify.close()
        # kept referenced: a Popen collected while its process runs warns
        # (ResourceWarning) and polls a pid that is not this child's child
        _FORKED_AWAY.extend(idle)


_IDLE = _IdleZygotes()
_FORKED_AWAY: list[_Zygote] = []
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_IDLE.forget_after_fork)
# Registered at import, before the runner module's hook (imported later), so that it
# runs after it and stops the zygotes of the runners closed at exit too (hooks run in
# reverse order); were it the other way round, a zygote put back after is closed then.
atexit.register(_IDLE.clear, closing=True)


def idle_zygote_pids() -> list[int]:
    """The pids of the idle fresh zygotes kept for the next pools (oldest first)."""
    return _IDLE.pids()


def prestart_idle_zygote(blas_threads: int) -> None:
    """Start a fresh zygote now, with the environment a pool of that BLAS cap would give
    it, and keep it idle for the first pool that would start one the same way (see the
    module docstring): that pool's first result then waits for no interpreter start.

    Raises:
        OSError: the zygote could not be started (no interpreter, no descriptors).
    """
    from ..sizing import worker_env

    env = worker_env(blas_threads)
    zygote = _Zygote("fresh", env, blas_threads, start=_FreshStart.now(env, blas_threads))
    for extra in _IDLE.put(zygote):
        extra.close()


def stop_idle_zygotes() -> None:
    """Stop the idle fresh zygotes kept for the next pools, and wait until each has
    exited (an idle zygote has no worker). A pool made later starts its own again."""
    _IDLE.clear()


class _Spawner:
    """Where a pool's worker processes come from: its zygotes (the current one last;
    older ones still reap their workers until they exit) and its first worker, when
    the pool's process forked that one itself. Used under the pool's lock."""

    def __init__(
        self,
        env: dict[str, str],
        blas_threads: int,
        page_fd: int,
        free_slots: list[int],
        reuse: bool = False,
    ) -> None:
        """No zygote yet: :meth:`start_forked`, :meth:`start_fresh` or the first
        :meth:`fork_worker` starts one.

        Args:
            env: environment overrides for the zygotes and their workers.
            blas_threads: the BLAS/OpenMP cap of every worker.
            page_fd: the pool's start page (-1: none), handed to each worker.
            free_slots: the pool's list of start-page slots no worker holds (shared: a
                worker's slot goes back to it when the pool handles its death).
            reuse: a fresh zygote comes from, and goes back to, the idle ones kept
                for the next pools (:class:`_IdleZygotes`).
        """
        self.env = env
        self.blas_threads = blas_threads
        self.page_fd = page_fd
        self.free_slots = free_slots
        self.reuse = reuse
        self.zygotes: list[_Zygote] = []  # the current one last; older ones still reap
        self.zygote: _Zygote | None = None
        self.keep: _Zygote | None = None  # not drained at the close: kept idle (take_all)
        # the first worker, when this process forked it (see _fork_first): its pid,
        # our end of its socket, its slot, its pidfd; it joins the pool on first use
        self.first: tuple[int, socket.socket, int, int] | None = None

    def start_forked(self, fork_first: bool) -> None:
        """Fork the zygote and, with ``fork_first`` (where pidfds exist: Linux), the
        first worker too; only while this process runs a single thread.

        A zygote's first worker is ready only after the zygote's own start (Python's
        after-fork work is mostly copy-on-write faults), its setup, then a second fork
        of the same size. Forked from this process at the same moment, the first worker
        skips the first two and is ready sooner, and its exit is seen here at once (its
        pidfd) rather than relayed by the zygote, whose own exit then overlaps it at
        shutdown. A cold start with a single call uses no other worker. The zygote
        forks every later worker.
        """
        pools_loaded = _worker.native_pools_loaded()
        first = None
        if fork_first:
            slot = self.free_slots.pop()
            pid, sock = _fork_first(self.page_fd, slot, self.env, self.blas_threads, pools_loaded)
            try:
                first = (pid, sock, slot, os.pidfd_open(pid))
            except OSError:  # not a kernel that has them after all: the zygote's way
                _end_first(pid, sock, -1)
                self.free_slots.append(slot)
        try:  # the zygote closes its copies of the first worker's socket and pidfd
            self.zygote = _Zygote(
                "fork",
                self.env,
                self.blas_threads,
                pools_loaded,
                () if first is None else (first[1].fileno(), first[3]),
            )
        except BaseException:
            if first is not None:
                _end_first(first[0], first[1], first[3])
            raise
        self.zygotes.append(self.zygote)
        self.first = first
        if first is None:  # forked by the zygote as soon as it is ready, unasked for
            self.zygote.ask(self.page_fd, self.free_slots.pop())

    def start_fresh(self) -> None:
        """Start the pool's fresh zygote now, not at the first worker: an idle one of
        an earlier pool if one started the same way (:class:`_IdleZygotes`), else a
        new interpreter, whose start then overlaps the caller's own work (a notebook's
        next cell, the rest of ``Runner()``). With ``reuse`` only: a zygote that no
        worker needed is then not wasted, the next pool adopts it. A zygote that
        cannot start (no interpreter at ``sys.executable``, no descriptors left) is
        not an error here: the first worker's start tries again, and its call says
        why if it fails."""
        if self.zygote is None:
            try:
                self.zygote = self._fresh()
            except OSError:
                return
            self.zygotes.append(self.zygote)

    def _fresh(self) -> _Zygote:
        start = _FreshStart.now(self.env, self.blas_threads)
        zygote = _IDLE.take(start) if self.reuse else None
        return zygote or _Zygote("fresh", self.env, self.blas_threads, start=start)

    def fork_worker(self) -> tuple[int, socket.socket, int, _Zygote | None, int]:
        """Have the zygote fork a worker: its pid, our end of its socket, its start-page
        slot, the zygote. The request may have been sent already (the first worker of a
        forked zygote). A zygote that is gone or stuck is replaced once (by a fresh
        interpreter: this process has threads now). The pool's first worker, when this
        process forked it itself, comes first (zygote None)."""
        if self.first is not None:
            pid, sock, slot, pidfd = self.first
            self.first = None
            return pid, sock, slot, None, pidfd
        for _ in range(2):
            zygote = self.zygote
            if zygote is None:
                zygote = self.zygote = self._fresh()
                self.zygotes.append(zygote)
            try:
                if zygote.asked is None:
                    zygote.ask(self.page_fd, self.free_slots[-1])
                    self.free_slots.pop()
                return (*zygote.take(), zygote, -1)
            except OSError:
                self.zygote = None  # its workers are handled when its notify socket closes
                self.drop_request(zygote)
                _kill_group(zygote.pid)
        raise WorkerCrashed("cannot start a worker process: its zygote process keeps failing")

    def drop_request(self, zygote: _Zygote) -> None:
        """Forget ``zygote``'s unanswered request, if any, and free its slot."""
        slot = zygote.drop_request()
        if slot is not None:
            self.free_slots.append(slot)

    def prestarted(self, full: bool) -> bool:
        """Whether the first worker, forked at the start (by this process, or by the
        zygote unasked), is known: forked here, or its zygote has answered (unless the
        pool is ``full``). Raises :class:`OSError` if the zygote is gone."""
        if self.first is not None:  # forked by this process: its pid is known
            return True
        zygote = self.zygote
        if zygote is None or zygote.asked is None or full:
            return False
        return zygote.answered()

    def lost(self, zygote: _Zygote) -> None:
        """``zygote`` died: its workers are orphans nobody reaps for us (the pool's
        loop reader kills their groups), and it forks nothing more."""
        with contextlib.suppress(ValueError):  # the pool is closing: not ours now
            self.zygotes.remove(zygote)
        if self.zygote is zygote:
            self.zygote = None
        self.drop_request(zygote)

    def drain(self) -> tuple[int, socket.socket, int, int] | None:
        """The pool closes: tell each zygote (it exits after its last worker's notice),
        and take the first worker if it was never used (its slot freed), for
        :func:`_end_first`. With ``reuse``, the current fresh zygote is not told: it
        is kept idle for the next pool once its workers are gone (:meth:`take_all`),
        unless a request is pending (its worker would be one no pool knows of)."""
        current = self.zygote
        if self.reuse and current is not None and current.start is not None:
            self.keep = current if current.asked is None else None
        for zygote in self.zygotes:  # each exits after its last worker's notice
            if zygote is self.keep:
                continue
            self.drop_request(zygote)  # its worker, if forked, finds its socket closed
            zygote.drain()
        first, self.first = self.first, None  # a first worker never used
        if first is not None:
            self.free_slots.append(first[2])
        return first

    def take_all(self) -> list[_Zygote]:
        """After the close, every worker's exit handled: every zygote, for the caller
        to close (:meth:`_Zygote.close`), none left; but the one kept, if it is idle,
        goes to the idle zygotes kept for the next pools (and any of those it pushes
        out is the caller's to close)."""
        zygotes, self.zygotes, self.zygote = self.zygotes, [], None
        keep, self.keep = self.keep, None
        if keep is not None and keep in zygotes and keep.idle():
            zygotes.remove(keep)
            zygotes += _IDLE.put(keep)
        return zygotes

    def pids(self) -> list[int]:
        """The pids of the zygotes not closed yet."""
        return [z.pid for z in self.zygotes if not z.closed]


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


def _fork_first(
    page_fd: int, slot: int, env: dict[str, str], blas_threads: int, pools_loaded: bool
) -> tuple[int, socket.socket]:
    """Fork a pool's first worker from this process, which runs a single thread (as for
    the zygote): its pid and our end of its socket. It does what the zygote does
    for itself and its workers, in a session of its own (no terminal: job control
    never stops it), and runs the worker loop."""
    sock, child = socket.socketpair()
    try:
        _flush_std_streams()
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
    _link.send_stop(conn)
    conn.close()
    if not _wait_exit(pid, None, 10.0):
        with contextlib.suppress(OSError):  # our child, not reaped: its pid is ours
            os.kill(pid, signal.SIGKILL)
        _wait_exit(pid, None, None)
    if pidfd >= 0:
        os.close(pidfd)


def reap_child(pid: int) -> int | None:
    """Kill the process group of our exited child ``pid`` and reap it, as a zygote does
    for its own workers: its return code, or None if someone else reaped it (an
    ``os.wait()`` in the user's code)."""
    try:
        # still a zombie, so its pid (its group's id) is not anyone else's yet
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        _kill_group(pid)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)
    except ChildProcessError:
        return None


def _kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (the worker and what it started).

    The zygote puts each worker in a group of its own before it tells us its pid, so
    the group exists from the start; once it is empty there is nothing to kill, and we
    never fall back to ``kill(pid)``: a reaped pid may already belong to someone else.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _flush_std_streams() -> None:
    """Flush this process's standard streams before a fork, as multiprocessing does:
    text still in their buffers would otherwise be written again by every child that
    flushes its copy (a worker does, when it exits)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed, replaced by None, ...
            if stream is not None:
                stream.flush()
