"""Pools: where an attempt runs. One small interface, see :class:`Pool`.

A pool decides *where* a task runs, never *when*: the scheduler decides order and
admission and hands a pool only what may start now.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

from .._worker import Result, Task

__all__ = ["Pool"]


class Pool(Protocol):
    """What the scheduler needs of a pool.

    States: *idle* (no workers yet) -> *started* (workers up, created on the first
    submit) -> *closed*. ``close`` is idempotent; a closed pool refuses ``submit``.
    """

    kind: str
    size: int

    def submit(self, task: Task, is_async: bool = False) -> Future[Result]:
        """Start ``task``; the future resolves to its :class:`Result`."""
        ...

    def close(self, cancel: bool = False) -> None:
        """Stop the pool and wait for its workers to exit; ``cancel`` stops running work."""
        ...
