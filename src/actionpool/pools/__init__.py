"""Pools: where an attempt runs. One protocol, :class:`Pool`, that every pool implements.

Data flow::

    Scheduler ─submit(Task)─► Pool ─► a worker (process, thread, cluster task)
        ▲                         │
        └── on_started / on_event ┤ (callbacks, in order, from a pool thread)
        └── attempt.future ◄──────┘ Result | NotStarted | WorkerCrashed | cancelled

A pool decides *where* an attempt runs, never *when* nor *whether again*: the scheduler
decides order, admission and re-runs, and hands a pool only what may start now. A
pool reports what happened to each attempt, through its :class:`Attempt`'s future:

* a :class:`~actionpool._worker.Result`: the action returned or raised;
* :class:`NotStarted`: its worker died before it started the attempt (nothing of the
  action ran; the scheduler may send it again);
* :class:`~actionpool.WorkerCrashed`: its worker died while running it, or was killed
  to stop it (``attempt.killed`` says why);
* cancelled: it was withdrawn before a worker took it.

A pool whose actions run in worker processes may also take ``set_output(output)``:
it then hands the workers' output events (``"stdout"``, ``"stderr"``, ``"log"``: see
:mod:`actionpool.output`) to ``output(node, kind, data)`` instead of to the attempt's
``on_event`` (the runner does so unless ``Runner(capture=False)``).

``runner.py`` and the scheduler use a pool only through this protocol; nothing outside
``pools/`` names a concrete pool's class or private attribute.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from .._worker import Result, Task
from ..errors import WorkerCrashed

__all__ = ["Attempt", "NotStarted", "Pool"]


class NotStarted(Exception):
    """An attempt's worker died before it started the attempt's action.

    Nothing of the action ran, so it can run elsewhere without a duplicated side
    effect; whether it does is the scheduler's decision. ``crash`` is the
    :class:`~actionpool.WorkerCrashed` that describes the death (exit code or signal).
    """

    def __init__(self, crash: WorkerCrashed) -> None:
        super().__init__(str(crash))
        self.crash = crash


def withdraw(future: Future[Any]) -> None:
    """Cancel an attempt's future that has not started, and tell its waiters: a future
    cancelled without ``set_running_or_notify_cancel`` is never seen done by
    ``concurrent.futures.wait`` (what a cancel that kills workers waits on, up to its
    deadline)."""
    if future.cancel():
        future.set_running_or_notify_cancel()


class Attempt(Protocol):
    """Handle of one submitted attempt.

    Attributes:
        future: what happened to it (see the module docstring).
        on_result: when set before the pool starts it, the result goes to
            ``on_result(result)``, called by whoever reads it, and ``future`` stays
            pending (it only fails or is cancelled): the runner's direct calls.
        direct: True when its future was set on the scheduler's loop by the pool's
            reader, between two loop callbacks (a done-callback may act at once).
        killed: why the pool was asked to stop it (``"timeout"``, ``"cancel"``), or "".
        released: owned by the scheduler: it freed this attempt's slot.
        started_at: ``time.time()`` when it started, once the pool knows.
        worker: the pid or thread name that runs it, once the pool knows.
        recycled: set by a pool that replaces the worker right after this attempt
            (worker recycling): ``{"reason", "worker", "tasks", "rss"}``; else None.
    """

    future: Future[Result]
    on_result: Callable[[Result], None] | None
    direct: bool
    killed: str
    released: bool
    started_at: float | None
    worker: int | str | None
    recycled: dict[str, Any] | None

    def cancel(self, reason: str = "cancel") -> None:
        """Stop the attempt as hard as the pool can: withdraw it if it has not started,
        else kill its process (:attr:`Pool.stops_by_kill`) or flag and abandon its
        thread."""
        ...

    def wait_here(self, timeout: float | None) -> None:
        """Deliver this attempt's result to ``on_result`` in the calling thread, if the
        pool can and the attempt has ``on_result``; return at once otherwise, or after
        ``timeout`` seconds (None: no limit), or when the pool needs the result read
        elsewhere. Never raises for the attempt's sake."""
        ...


class Pool(Protocol):
    """What the scheduler and the runner need of a pool.

    ``on_started(worker, time)`` is called once the attempt really starts (worker: a
    pid or a thread name; time: ``time.time()`` seconds), ``on_event(kind, time, data)``
    for each ``ctx.emit`` / ``ctx.progress``; both from a pool thread, in order.

    Attributes:
        kind: the action kind it serves (``"cpu"``, ``"io"``).
        label: its name in outcomes (:attr:`Outcome.pool <actionpool.Outcome>`):
            ``"cpu"``, ``"io"``, ``"dask"``.
        size: the attempts it runs at once at most (its capacity, in slots).
        stops_by_kill: True when :meth:`Attempt.cancel` of a running attempt kills
            what runs it, and the attempt's future is done once that is gone (a
            process); False when a running attempt can only be abandoned (a thread).
    """

    kind: str
    label: str
    size: int
    stops_by_kill: bool

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Report on ``loop`` (the scheduler's, running on a thread of its own until
        :meth:`close` returns) where the pool has a choice; call before the first
        submit."""
        ...

    def submit(
        self,
        task: Task,
        is_async: bool = False,
        on_started: Callable[[int | str, float], None] | None = None,
        on_event: Callable[[str, float, Any], None] | None = None,
    ) -> Attempt:
        """Start ``task`` (or queue it for the next free worker).

        Raises:
            RuntimeError: the pool is closed.
        """
        ...

    def submit_if_idle(
        self,
        task: Task,
        on_event: Callable[[str, float, Any], None] | None = None,
        before_send: Callable[[Any], None] | None = None,
        is_async: bool = False,
    ) -> Attempt | None:
        """Start ``task`` now from any thread if a worker can take it at once, else
        return None having done nothing (also when the pool is closed).
        ``before_send(attempt)`` runs under the pool's lock just before the task goes
        out: what the caller must set up before the attempt can end."""
        ...

    def forget(self, prefix: str) -> None:
        """The run whose shared-memory arena is ``prefix`` is over: workers may drop
        its mappings."""
        ...

    def close(self, cancel: bool = False, *, reap: bool = True) -> None:
        """Stop the pool and wait for its workers.

        Args:
            cancel: stop running attempts instead of letting them finish.
            reap: also wait for helper processes (:meth:`reap`); False leaves that to
                a later :meth:`reap`, so the caller can close other things meanwhile.
        """
        ...

    def reap(self) -> None:
        """After ``close(reap=False)``: wait for the pool's helper processes to exit."""
        ...

    def pids(self) -> list[int]:
        """The process ids of its live workers (empty for a pool of threads)."""
        ...

    def describe(self) -> str:
        """One line for sizing reports: what runs the attempts and how many at once."""
        ...
