"""What this platform offers the process pool, in one place.

The cpu pool (:mod:`actionpool.pools.process`) has two paths:

* the **zygote path** (Linux): workers forked from a zygote over ``AF_UNIX``
  ``SOCK_SEQPACKET`` sockets, reaped with ``os.waitid``, a pool's first worker
  watched through its pidfd, a start page in a memfd;
* the **portable path** (:mod:`actionpool.pools.portable`; macOS and other POSIX
  systems): workers started as fresh interpreters by loky, stream sockets, exits seen
  through each process's sentinel. ``ACTIONPOOL_PORTABLE=1`` forces it on Linux
  (``0`` forbids it: the zygote path or nothing).

:func:`process_path` picks one. Where neither can run (Windows: no ``SIGALRM`` for
the soft timeout, no process groups for a hard one), a runner still works, io actions
and plans of them included, and its cpu actions end ``FAILED`` with
:func:`cpu_unavailable`'s message, which names the platform, what is missing, and
what to use instead. Shared memory (``_posixshmem``) is optional everywhere: see
:data:`actionpool.shm.SHARED_MEMORY`.
"""

from __future__ import annotations

import functools
import os
import platform
import signal
import socket

__all__ = [
    "PORTABLE_ENV",
    "cpu_unavailable",
    "missing_for_portable",
    "missing_for_processes",
    "process_path",
]

PORTABLE_ENV = "ACTIONPOOL_PORTABLE"
"""Environment variable: ``1`` forces the portable process path, ``0`` forbids it."""


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


def missing_for_portable() -> list[str]:
    """What the portable process path needs that this platform lacks (empty: none):
    process groups (a hard timeout kills a worker and what it started), ``SIGALRM``
    (the soft timeout), ``AF_UNIX`` sockets, and ``_posixshmem`` (loky's process start
    imports it)."""
    missing = []
    if not hasattr(os, "killpg") or not hasattr(os, "setsid"):
        missing.append("process groups")
    if not hasattr(signal, "SIGALRM"):
        missing.append("SIGALRM")
    if not hasattr(socket, "AF_UNIX"):
        missing.append("AF_UNIX sockets")
    if not missing:
        try:  # loky's process start on POSIX imports it (for its resource tracker)
            import _posixshmem  # noqa: F401
        except ImportError:
            missing.append("_posixshmem")
    return missing


def process_path() -> tuple[str, list[str]]:
    """Which process path a pool made now takes: ``("zygote", [])``,
    ``("portable", [])``, or ``("none", what is missing)``.

    The zygote path where this platform has all it needs, unless ``ACTIONPOOL_PORTABLE=1``;
    else the portable path, unless ``ACTIONPOOL_PORTABLE=0`` or the platform lacks
    that too.

    Raises:
        ValueError: ``ACTIONPOOL_PORTABLE`` is set to something other than 0 or 1.
    """
    forced = os.environ.get(PORTABLE_ENV, "").strip()
    if forced not in ("", "0", "1"):
        raise ValueError(f"{PORTABLE_ENV} must be 0 or 1, got {forced!r}")
    missing = missing_for_processes()
    if not missing and forced != "1":
        return "zygote", []
    if forced == "0":
        return "none", missing
    missing_portable = missing_for_portable()
    if missing_portable:
        return "none", missing_portable
    return "portable", []


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
