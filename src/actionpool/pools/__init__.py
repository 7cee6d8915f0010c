"""Pools: where an attempt runs. One small interface, see :class:`Pool`.

A pool decides *where* an attempt runs, never *when*: the scheduler decides order and
admission and hands a pool only what may start now.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from .._worker import Result, Task

__all__ = ["Attempt", "Pool"]


class Attempt(Protocol):
    """Handle of one submitted attempt."""

    future: Future[Result]
    direct: bool  # its result was set on the scheduler's loop, between callbacks
    # when set (before the pool starts it), the result goes to on_result(result),
    # called by whoever reads it, and the future stays pending (it only fails or is
    # cancelled): the runner's direct calls (CallRun.start_direct)
    on_result: Callable[[Result], None] | None
    killed: str
    released: bool
    started_at: float | None  # time.time() when it started, once the pool knows
    worker: int | str | None

    def cancel(self, reason: str = "cancel") -> None:
        """Stop the attempt as hard as the pool can (kill a process, flag a thread)."""
        ...


class Pool(Protocol):
    """What the scheduler needs of a pool.

    ``on_started(worker, time)`` is called once the attempt really starts (worker: a
    pid or a thread name; time: ``time.time()`` seconds), ``on_event(kind, time, data)``
    for each ``ctx.emit`` / ``ctx.progress``; both from a pool thread, in order.
    """

    kind: str
    size: int

    def submit(
        self,
        task: Task,
        is_async: bool = False,
        on_started: Callable[[int | str, float], None] | None = None,
        on_event: Callable[[str, float, Any], None] | None = None,
    ) -> Attempt:
        """Start ``task`` (or queue it for the next free worker)."""
        ...

    def close(self, cancel: bool = False) -> None:
        """Stop the pool and wait for its workers; ``cancel`` stops running work."""
        ...
