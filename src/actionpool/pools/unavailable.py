"""The cpu pool of a platform that cannot run actionpool's worker processes.

It takes no attempt: :meth:`UnavailablePool.submit` raises, and the scheduler ends the
node ``FAILED`` with that error (:mod:`actionpool.platforms` says why and what to use
instead). Everything else about the runner works: io actions, plans of them, events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .._worker import Task
from ..errors import PlatformUnsupported
from ..platforms import cpu_unavailable

__all__ = ["UnavailablePool"]


class UnavailablePool:
    """A :class:`~actionpool.pools.Pool` for cpu actions that refuses every attempt."""

    kind = "cpu"
    label = "cpu"
    stops_by_kill = True

    def __init__(self, size: int, missing: list[str]) -> None:
        self.size = size
        self.reason = cpu_unavailable(missing)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    def submit(
        self,
        task: Task,
        is_async: bool = False,
        on_started: Callable[[int | str, float], None] | None = None,
        on_event: Callable[[str, float, Any], None] | None = None,
    ) -> Any:
        raise PlatformUnsupported(f"node {task.node!r}: {self.reason}")

    def submit_if_idle(
        self,
        task: Task,
        on_event: Callable[[str, float, Any], None] | None = None,
        before_send: Callable[[Any], None] | None = None,
        is_async: bool = False,
    ) -> None:
        return None  # the scheduler's submit then fails the call, naming it

    def forget(self, prefix: str) -> None:
        pass

    def close(self, cancel: bool = False, *, reap: bool = True) -> None:
        pass

    def reap(self) -> None:
        pass

    def pids(self) -> list[int]:
        return []

    def describe(self) -> str:
        return "none: " + self.reason
