"""Thread helpers shared by the pools and the shared-memory transfer."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

__all__ = ["in_parallel", "join_thread", "wait_thread_gone"]


def join_thread(thread: threading.Thread, timeout: float = 1.0) -> None:
    """Join ``thread``, then wait (at most ``timeout`` seconds) until the OS has ended it.

    ``Thread.join`` returns once the thread's Python part is over; the OS thread may
    run its exit path a little longer (rarely, and briefly: docs/performance.md). A
    pool created right after a runner closed counts the threads of this process to
    decide whether it may fork (``resolve_worker_start``), and must not see ours. Linux
    only (``/proc/self/task``); elsewhere a plain join.
    """
    thread.join()
    wait_thread_gone(thread.native_id, timeout)


def wait_thread_gone(native_id: int | None, timeout: float = 1.0) -> None:
    """Wait (at most ``timeout`` seconds) until the OS thread ``native_id`` of this
    process has ended, its Python part being over (see :func:`join_thread`)."""
    if native_id is None or not os.path.isdir("/proc/self/task"):
        return
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/self/task/{native_id}") and time.monotonic() < deadline:
        time.sleep(0.0001)  # the kernel offers no wait for one thread of our own


def in_parallel(size: int, parts: int, work: Callable[[int, int], None], align: int) -> None:
    """Call ``work(start, stop)`` over ``range(size)`` cut into ``parts`` pieces (each a
    multiple of ``align`` but the last), in this thread and ``parts - 1`` others that
    it starts and joins. ``work`` must release the GIL to gain anything (a NumPy
    copy, ``os.pwrite``). The first exception raised in any piece is raised here,
    after every piece has ended.
    """
    step = -(-size // max(1, parts))
    step = -(-step // align) * align
    errors: list[BaseException] = []

    def piece(start: int) -> None:
        try:
            work(start, min(size, start + step))
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            errors.append(exc)

    threads = [
        threading.Thread(target=piece, args=(start,), name="actionpool-copy", daemon=True)
        for start in range(step, size, step)
    ]
    for t in threads:
        t.start()
    piece(0)
    for t in threads:
        join_thread(t)
    if errors:
        raise errors[0]
