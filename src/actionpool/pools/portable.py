"""The portable process path: where a CPU pool's workers come from when the Linux
facilities of the zygote path are missing (macOS), or when ``ACTIONPOOL_PORTABLE=1``
asks for it on Linux.

The pool is the same :class:`~actionpool.pools.process.ProcessPool`, with the same
attempt states, kills, crash handling and recycling; only three things differ:

* **start**: each worker is a fresh interpreter started by loky's process backend
  (``loky.backend.get_context("loky")``: ``fork`` + ``exec`` of a clean interpreter on
  macOS and Linux, which is safe in a parent that runs threads, and imports nothing of
  the parent's ``__main__``), running :func:`actionpool._worker.portable_main`. There
  is no zygote, so each start, first or replacement, costs an interpreter's start.
  The pool's start page is an unlinked temporary file (no memfd) whose descriptor
  each worker inherits, so an attempt nobody watches costs no "started" message, as
  on the zygote path.
* **link**: a ``multiprocessing`` ``Connection`` over an ``AF_UNIX`` ``SOCK_STREAM``
  socket pair (length-prefixed frames; no ``SOCK_SEQPACKET``), read on the pool's
  asyncio loop with ``add_reader`` (kqueue on macOS; no epoll set of our own, no
  eventfd), so a thread waiting for a direct call's result leaves the read to the loop.
* **exit**: each worker's death is seen through its process's ``sentinel`` (a pipe
  that closes when the process ends; no pidfd, no ``waitid``), on the same loop.

Data flow::

    ProcessPool._spawn ─► _LokySpawner.start_worker() ─► loky Process(portable_main,
        │                     (pid, our socket end,        worker's socket end,
        │                      slot, process)              env = worker_env(blas))
        ▼
    loop reader ◄── worker socket (READY / STARTED / EVENT / RESULT)
    loop reader ◄── process.sentinel readable: the worker ended
                    ─► ProcessPool._on_sentinel: kill its group, join it, its death

Threads: nothing here takes a lock; a :class:`_LokySpawner` belongs to its pool and is
used under the pool's lock, like the zygote path's ``_Spawner``.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import threading
from multiprocessing.connection import Connection
from typing import Any

from .. import _worker

__all__ = ["_LokySpawner", "start_page_file"]

_STARTING = threading.Lock()  # held while a worker starts with the daemon flag lifted


def start_page_file(size: int) -> int:
    """A descriptor of ``size`` zero bytes to map as a pool's start page: a temporary
    file, unlinked at once (nothing to clean up, whatever ends this process).

    Raises:
        OSError: the temporary directory refused the file.
    """
    fd, path = tempfile.mkstemp(prefix="actionpool-starts-")
    try:
        os.unlink(path)
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _InheritedFd:
    """A descriptor that a loky-started worker receives as an argument: loky passes it
    to the child at its start (multiprocessing's ``DupFd``, as for a ``Connection``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing.reduction import DupFd

        return (_inherited, (DupFd(self.fd),))


def _inherited(dup: Any) -> int:
    return int(dup.detach())


class _LokySpawner:
    """Starts a portable pool's workers with loky's process backend. It has the parts
    of the zygote path's ``_Spawner`` that the pool calls, none of which has anything
    to do here: no zygote, no worker forked ahead."""

    zygote = None
    first = None

    def __init__(
        self, env: dict[str, str], blas_threads: int, page_fd: int, free_slots: list[int]
    ) -> None:
        """
        Args:
            env: environment overrides for every worker (``sizing.worker_env``).
            blas_threads: the BLAS/OpenMP cap of every worker.
            page_fd: the pool's start page (-1: none), handed to each worker.
            free_slots: the pool's free start-page slots (shared with the pool: a
                worker's slot goes back to it when the pool handles its death).
        """
        self.page_fd = page_fd
        from loky.backend import get_context

        self.env = env
        self.blas_threads = blas_threads
        self.free_slots = free_slots
        self.zygotes: list[Any] = []
        self._context = get_context("loky")

    def start_worker(self) -> tuple[int, Connection, int, Any]:
        """Start one worker: its pid, our end of its socket, its slot, its process.

        Raises:
            OSError: the process could not be started (no memory, no pids left...).
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        conn, child = Connection(ours.detach()), Connection(theirs.detach())
        # multiprocessing refuses children to a daemonic process (a Dask worker is one:
        # distributed.worker.daemon), lest they outlive it when it is ended abruptly.
        # Ours cannot: each watches its socket to this process and kills its own group
        # when it closes (actionpool._worker._watch_parent). The flag is lifted for the
        # start alone, under a lock of this module's: two pools (two runners on one
        # Dask worker) may start workers at once, and one must not take the other's
        # lifted flag for the original.
        slot = self.free_slots[-1]
        page = _InheritedFd(self.page_fd) if self.page_fd >= 0 else -1
        config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
        with _STARTING:
            daemon = config.get("daemon")
            try:
                process = self._context.Process(
                    target=_worker.portable_main,
                    args=(child, self.blas_threads, page, slot),
                    env=self.env,
                    name="actionpool-worker",
                )
                config["daemon"] = False
                process.start()
            except BaseException:
                conn.close()
                raise
            finally:
                if daemon is None:
                    config.pop("daemon", None)
                else:
                    config["daemon"] = daemon
                child.close()  # the worker has its own copy now
                if self.page_fd >= 0:  # loky made it inheritable for this start alone
                    os.set_inheritable(self.page_fd, False)
        self.free_slots.pop()
        return process.pid, conn, slot, process

    # ---- the rest of the spawner's interface: nothing to do on this path ------------------

    def prestarted(self, full: bool) -> bool:
        return False

    def lost(self, zygote: Any) -> None:
        pass

    def drain(self) -> None:
        return None

    def take_all(self) -> list[Any]:
        return []

    def pids(self) -> list[int]:
        return []
