"""Events: what actions and the scheduler report while a run is under way.

Each node's events reach ``on_event`` in this order: ``queued`` (handed to a pool),
``started``, then any ``progress`` / ``emitted`` the action reported, then
``finished`` (with its status); ``retrying`` comes between attempts. ``paused`` and
``resumed`` (``node`` None) say that dispatch stopped because available memory fell
below the runner's ``memory_floor``, and started again. They are delivered on the
runner's scheduler thread, one at a time; keep ``on_event`` quick.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["EVENT_KINDS", "Event"]

EVENT_KINDS = (
    "queued",
    "started",
    "progress",
    "emitted",
    "retrying",
    "finished",
    "paused",
    "resumed",
)


@dataclass(frozen=True)
class Event:
    """One event of a run.

    Attributes:
        kind: one of :data:`EVENT_KINDS`.
        node: the :class:`~actionpool.Node` (``None`` for calls made with ``submit``).
        name: the node's name.
        time: ``time.time()`` seconds when it happened (in the worker for ``started``,
            ``progress`` and ``emitted``).
        data: ``emitted``: what the action passed to ``ctx.emit``; ``progress``:
            ``(done, total)``; ``finished``: the :class:`~actionpool.Status`;
            ``retrying``: ``{"attempt", "error", "delay_s"}``; ``paused`` / ``resumed``:
            ``{"available", "floor"}`` in bytes; else None.
    """

    kind: str
    node: Any
    name: str
    time: float
    data: Any = None
