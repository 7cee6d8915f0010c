"""What this platform offers the process pool, in one place.

The cpu pool (:mod:`actionpool.pools.process`) is built on Linux facilities: workers
forked from a zygote over ``AF_UNIX`` ``SOCK_SEQPACKET`` sockets, reaped with
``os.waitid``, started with ``os.fork``. Where one of them is missing (Windows; macOS,
whose sockets have no ``SOCK_SEQPACKET``), a runner still works, io actions and plans
of them included, and its cpu actions end ``FAILED`` with :func:`cpu_unavailable`'s
message, which names the platform, what is missing, and what to use instead.
Shared memory (``_posixshmem``) is optional everywhere: see
:data:`actionpool.shm.SHARED_MEMORY`.
"""

from __future__ import annotations

import functools
import os
import platform
import socket

__all__ = ["cpu_unavailable", "missing_for_processes"]


def missing_for_processes() -> list[str]:
    """The facilities the cpu pool needs that this platform lacks (empty: none)."""
    missing = []
    if not hasattr(os, "fork"):
        missing.append("os.fork")
    if not hasattr(os, "waitid"):
        missing.append("os.waitid")
    if not hasattr(socket, "AF_UNIX"):
        missing.append("AF_UNIX sockets")
    if not _seqpacket_works():
        missing.append("SOCK_SEQPACKET sockets")
    return missing


@functools.cache
def _seqpacket_works() -> bool:
    # macOS defines the constant, but its AF_UNIX sockets refuse the type (EPROTONOSUPPORT)
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except (AttributeError, OSError):
        return False
    a.close()
    b.close()
    return True


def cpu_unavailable(missing: list[str]) -> str:
    """Why cpu actions cannot run here, and what to do instead (one sentence)."""
    return (
        f"cpu actions need worker processes, which actionpool cannot start on"
        f" {platform.system() or os.name} yet (it lacks {', '.join(missing)}): declare"
        " the action kind='io' to run it on a thread of this process, or run it on a"
        " Dask cluster with Runner(backend='dask')"
    )
