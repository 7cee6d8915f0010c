"""The zygote: one small single-threaded process that forks every CPU worker.

Starting a worker as a fresh interpreter pays for the interpreter's start, then for
importing actionpool's worker side; forking a process that already did both is far
cheaper (figures: docs/performance.md, "Workers forked from a zygote"). So the CPU
pool starts one *zygote* per runner, and every worker, each replacement after a crash
or a hard timeout included, is a fork of it, but one: where the kernel has pidfds
(Linux), the pool's first worker is forked by the parent itself, at the same moment as
the zygote, and the parent watches and reaps it (``ProcessPool._start_forked``)::

    parent (ProcessPool)                      zygote (this module)             worker
    --------------------                      --------------------             ------
    socketpair(); send_fds(ctl, SPAWN(slot),  fork() ───────────────────────► setpgid()
        [child end, start page]) ─────────►                                    process_main(fd)
                         ◄── ctl: pid ──────
    worker socket ◄══════════════════════════════════════════════════════════► (tasks, results)
                         ◄── notify: (pid, returncode) ── SIGCHLD: killpg, reap
    DRAIN (the pool closes) ──────────►  exits after its last worker's notice

The zygote itself starts one of two ways (``Runner(worker_start=...)``):

* ``"fork"``: a fork of the parent, made while the parent runs a single native thread
  (no other thread can hold a lock that the child would inherit locked; ``import
  numpy`` alone starts OpenBLAS's threads, and then the zygote is fresh). Workers then
  inherit the parent's imported modules and memory, copy-on-write, as with
  ``multiprocessing``'s fork start method, but not its threads, and the parent is
  forked once, at a moment known to be safe, never later.
* ``"fresh"``: a new interpreter (``python -c``), as loky and ``spawn`` do; workers
  inherit nothing of the parent but its environment. Used whenever the parent already
  runs threads (a notebook kernel, another runner), where forking is unsafe.

Only the zygote reaps workers (they are its children), so it reports each exit status
to the parent. It kills a dead worker's process group (anything its action started)
*before* reaping it: while the leader is an unreaped zombie, its pid, the group's id,
cannot be reused. When the parent's end of ``ctl`` closes (the pool closed, or the
parent died), or the parent's pidfd says it exited (Linux), the zygote kills every
worker's group, reaps them and exits. When the pool closes, it sends :data:`DRAIN`
with the stop requests to its workers: the zygote then forks nothing more and exits as
soon as its last worker is reaped and reported, so its own exit (the teardown of its
address space) overlaps the parent's handling of those notices instead of following
it. A fresh zygote of a runner's pool is not drained but kept idle, and serves the
next runner's pool (:class:`actionpool.pools.zygote_client._IdleZygotes`): it cannot
tell one pool from the next.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import sys
from typing import NoReturn

__all__ = ["DRAIN", "NOTICE", "PID", "SPAWN", "child_main", "main"]

DRAIN = b"drain"
"""A request with no descriptors: the pool is closing (it has asked its workers to stop);
fork nothing more, and exit once every worker has exited and been reported."""

NOTICE = struct.Struct("=qi")
"""A notify message: (worker pid, return code as ``subprocess`` gives it: -N = signal N)."""

PID = struct.Struct("=q")
"""The reply to a spawn request: the new worker's pid."""

SPAWN = struct.Struct("=i")
"""A spawn request: the new worker's slot in the pool's start page."""


def main(
    ctl_fd: int, notify_fd: int, blas_threads: int, pools_loaded: bool | None = None
) -> NoReturn:
    """Run the zygote until the parent closes ``ctl``; never returns.

    Args:
        ctl_fd: a ``SOCK_SEQPACKET`` socket: each request is :data:`SPAWN` and carries
            the worker's socket and, where there is one, the pool's start page
            (``SCM_RIGHTS``); the reply is the new worker's pid (:data:`PID`). Or
            :data:`DRAIN`, which has no reply. The
            parent may send its first request before the zygote is ready: the worker
            is forked as soon as it is, while the parent goes on with its own start.
        notify_fd: a ``SOCK_SEQPACKET`` socket on which each worker's exit is reported
            as :data:`NOTICE`.
        blas_threads: the BLAS/OpenMP cap of every worker.
        pools_loaded: passed on to :func:`actionpool._worker.init_process`.
    """
    code = 1
    try:
        ctl = socket.socket(fileno=ctl_fd)
        notify = socket.socket(fileno=notify_fd)
        # Preloaded here, once: every worker starts with them imported.
        from . import _worker

        _worker.init_process(blas_threads, pools_loaded)
        _serve(ctl, notify)
        code = 0
    finally:
        os._exit(code)


def _serve(ctl: socket.socket, notify: socket.socket) -> None:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C stops
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, _noop)  # a handler, so that the wakeup fd is written
    signal.set_wakeup_fd(wake_w)
    poller = select.poll()
    poller.register(ctl.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    parent = _watch_parent(poller)
    children: set[int] = set()
    draining = False
    while True:
        for fd, _events in poller.poll():
            if fd == parent:  # the parent died, while a copy of ctl lives on elsewhere
                return _stop(children)
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
                if not _reap(children, notify):
                    return _stop(children)
                if draining and not children:
                    return None
                continue
            try:
                msg, fds, _flags, _addr = socket.recv_fds(ctl, 16, 2)
            except OSError:
                msg, fds = b"", []
            if len(msg) != SPAWN.size or not fds:  # b"": the pool closed, or the parent died
                for fd_ in fds:
                    os.close(fd_)
                if msg == DRAIN:
                    draining = True
                    # a worker may have exited before its SIGCHLD was handled
                    if not _reap(children, notify):
                        return _stop(children)
                    if not children:
                        return None
                if msg:
                    continue
                return _stop(children)
            if draining:  # too late: the pool is closing
                for fd_ in fds:
                    os.close(fd_)
                continue
            (slot,) = SPAWN.unpack(msg)
            pid = os.fork()
            if pid == 0:
                page = fds[1] if len(fds) > 1 else -1
                own = (ctl.fileno(), notify.fileno(), wake_r, wake_w)
                child_main(fds[0], page, slot, own if parent < 0 else (*own, parent))
            # its own process group before the parent learns its pid (the child does
            # the same: whichever runs first), so that killpg(pid) always reaches it
            with contextlib.suppress(OSError):
                os.setpgid(pid, pid)
            for fd_ in fds:
                os.close(fd_)
            children.add(pid)
            try:
                ctl.sendall(PID.pack(pid))
            except OSError:
                return _stop(children)


def _watch_parent(poller: select.poll) -> int:
    """Watch the parent's pidfd (readable once it exits); the fd, or -1 without pidfds.

    ``ctl``'s end alone tells the zygote that its parent is gone only once every copy
    of the parent's end is closed, and a child the parent forked without exec (a
    ``multiprocessing`` fork, a C library's) may hold one for as long as it lives: a
    zygote kept idle for the next pool would outlive its parent meanwhile.
    """
    if not hasattr(os, "pidfd_open"):
        return -1
    parent = os.getppid()
    try:
        fd = os.pidfd_open(parent)
    except OSError:
        return -1
    if os.getppid() != parent:  # it died before the pidfd was open: that pid may be reused
        os.close(fd)
        return -1
    poller.register(fd, select.POLLIN)
    return fd


def _reap(children: set[int], notify: socket.socket) -> bool:
    """Kill the group of, reap and report every worker that exited; False when the
    parent no longer listens."""
    listening = True
    while children:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return listening
        if info is None:
            return listening
        pid = info.si_pid
        # the leader is still an unreaped zombie: its pid (the group id) is ours
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        children.discard(pid)
        try:
            notify.send(NOTICE.pack(pid, os.waitstatus_to_exitcode(status)))
        except OSError:
            listening = False
    return listening


def _stop(children: set[int]) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    for pid in children:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def child_main(
    fd: int, page: int, slot: int, inherited: tuple[int, ...], own_session: bool = False
) -> NoReturn:
    """In a new worker: leave the zygote's ways behind and run the worker loop.

    Args:
        fd: the worker's socket.
        page: the pool's start page, or -1.
        slot: the worker's slot in it.
        inherited: descriptors to close (the forking process's own).
        own_session: a session of its own (the pool's first worker, forked by the
            pool's process itself, whose session may have a terminal), not only a
            process group.
    """
    code = 0
    try:
        # its own process group: killpg takes what its actions start; the zygote's
        # session has no terminal, so a terminal's Ctrl-C reaches only the parent
        if own_session:
            os.setsid()
        else:
            os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd_ in inherited:
            os.close(fd_)
        from . import _worker

        _worker.process_main(fd, page, slot)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - report it, then exit non-zero
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _noop(signum: int, frame: object) -> None:
    pass


def launch() -> NoReturn:
    """Entry point of a fresh-interpreter zygote:
    ``python -c ... <ctl> <notify> <blas> <authkey pipe>``; the parent's
    multiprocessing authkey is read from the pipe, so the workers share it."""
    import multiprocessing

    key = b""
    with os.fdopen(int(sys.argv[4]), "rb") as pipe:
        key = pipe.read()
    if key:
        multiprocessing.current_process().authkey = key
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
