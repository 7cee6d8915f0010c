"""The scheduler: every rule about a node's life. Lives on the runner's event-loop thread.

Data flow::

    PlanRun / CallRun ─transition(READY)─► Admission ready queues ─(slots, memory)─►
        _start_attempt ─► Pool.submit ─► worker
    Pool ─on_started / on_event / attempt future─► from_thread ─► loop:
        _on_started, _on_worker_event, _on_result ─► one transition ─► run.node_finished
                                    ▲ timers: soft deadline (io), hard kill (cpu)

Every node (a plan node, or a submitted call that is not a direct call: see
:mod:`actionpool.calls`) is a :class:`NodeRecord` whose lifecycle is one table of
moves, :data:`MOVES`, each with one function::

    PENDING ──► READY ──► RUNNING ──► SUCCEEDED | FAILED | TIMED_OUT | CRASHED | CANCELLED
       │          │  ▲        │
       │          │  └────────┘ (retry after backoff; or its worker died before starting it)
       │          └──► SKIPPED (validate said no) | FAILED (cannot be serialized) | CANCELLED
       └──► SKIPPED (an upstream did not succeed) | CANCELLED
            | SUCCEEDED / FAILED (race and quorum nodes, decided by their inputs;
              nodes loaded from a journal) | IN_DOUBT (resumed: see actionpool.journal)

Only :meth:`Scheduler.transition` changes a record's state: it looks the move up in
:data:`MOVES` (refusing one the table does not list) and calls that move's function,
so cancel, timeout, crash, retry and skip each have exactly one place. The decisions
*which* move to make are taken by the handlers of what pools report
(:meth:`Scheduler._on_result`) and of the scheduler's own timers, and by the runs
(:mod:`actionpool.planrun`: dependencies; :mod:`actionpool.calls`: calls).

The scheduler never touches processes (pools do) and a pool never decides order or
re-runs (the scheduler does): a pool reports that an attempt returned, raised, died
while running, was killed, or that its worker died *before starting* it
(:class:`~actionpool.pools.NotStarted`), and the scheduler alone decides whether that
attempt runs again.

Failure rules (docs/concepts.md, "Failures"; docs/reliability.md, "Design"):

* an action that raised is retried while ``attempts <= retries`` and the error is one
  of ``retry_on``, after :func:`backoff_delay`; the last error is kept;
* cpu timeout: the worker raises :class:`~actionpool.ActionTimeout` inside the action
  at the deadline (soft); ``timeout_grace`` seconds later the scheduler kills the
  worker (hard);
* io timeout: at the deadline the node ends ``TIMED_OUT``, ``ctx.cancelled()`` turns
  True and an ``async def`` action is cancelled (a thread cannot be killed);
* an attempt that ran past its timeout ends ``TIMED_OUT`` whatever it did after the
  deadline: the soft timeout is for cleaning up, not for finishing late;
* a :class:`~actionpool.SerializationError` is never retried (it would fail again);
* a worker that died before it started an attempt cost nothing: the attempt is sent
  again (not counted), unless workers of that pool keep dying before they start
  anything (:data:`MAX_STARTUP_DEATHS` in a row), or this attempt's workers did: then
  it ends ``CRASHED`` saying so;
* a dead worker ends its node ``CRASHED`` with :class:`~actionpool.WorkerCrashed`; it
  is re-run only if ``retry_on`` names ``WorkerCrashed`` (the user's consent);
* ``fail_fast``: the first failure cancels every node that has not ended, running
  ones included.

Concurrency contract: every method runs on the loop thread, except
:meth:`Scheduler.from_thread` (any thread, without a lock: see there),
:meth:`Scheduler.task` (pure) and what
:class:`~actionpool.admission.Admission` says of its own fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import TYPE_CHECKING, Any

from ._worker import Result, Task, rebuild_error
from .action import ActionSpec, wire_form
from .admission import Admission
from .errors import ActionFailed, ActionTimeout, SerializationError, WorkerCrashed
from .events import Event
from .outcome import Status
from .plan import Node
from .pools import NotStarted
from .records import NodeRecord, NodeState, RunBase
from .shm import Arena
from .transfer import Packed, dumps_call, dumps_function

if TYPE_CHECKING:
    from .pools import Attempt, Pool

__all__ = [
    "MAX_STARTUP_DEATHS",
    "MOVES",
    "TERMINAL",
    "TRANSITIONS",
    "NodeRecord",
    "NodeState",
    "RunBase",
    "Scheduler",
    "action_error",
    "backoff_delay",
    "unpickling_failed",
]


MAX_STARTUP_DEATHS = 3
"""Worker deaths before an attempt starts, in a row in one pool (or for one attempt),
after which the attempt ends ``CRASHED`` instead of being sent again: a worker that
dies at every start (its interpreter fails, or importing the action's module kills
it) would otherwise be replaced for as long as attempts keep coming."""


class Scheduler:
    """The node lifecycle, dispatch and what the pools report, for every run of one runner.

    Args:
        loop: the runner's event loop; every method runs on its thread (but see the
            module's concurrency contract).
        pools: ``{"cpu": pool, "io": pool}``, each a :class:`~actionpool.pools.Pool`.
        timeout_grace: seconds between a cpu action's soft timeout and the kill of
            its worker.
        memory_budget: bytes that running nodes' declared ``memory`` may add up to.
        blas_threads: BLAS/OpenMP threads per CPU slot.
        memory_floor: bytes of available memory below which dispatch pauses.
        available: bytes of available memory just read by the caller (its sizing), or
            None; above ``memory_floor``, it counts as this loop's first check.
    """

    resources: bytes | None = None
    """The runner's resource factories (:func:`actionpool.resources.pack`), set by the
    runner: what a task of an action that takes a Context carries to its worker."""

    capture = False
    """Whether the actions' output in worker processes comes to the parent
    (``Runner(capture=)``, :mod:`actionpool.output`); set by the runner."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pools: Mapping[str, Pool],
        timeout_grace: float,
        memory_budget: int,
        blas_threads: int,
        memory_floor: int,
        available: int | None = None,
    ) -> None:
        self.loop = loop
        self.pools = dict(pools)
        self.timeout_grace = timeout_grace
        self.blas_threads = blas_threads
        self.admission = Admission(
            loop,
            {k: p.size for k, p in self.pools.items()},
            memory_budget,
            memory_floor,
            available,
            self.start,
            self._paused,
            self.from_thread,
            {k: p.flush for k, p in self.pools.items() if hasattr(p, "flush")},
        )
        self.schedule_dispatch = self.admission.schedule_dispatch
        self.dispatch_now = self.admission.dispatch_now
        # Per pool: worker deaths before an attempt started, in a row (MAX_STARTUP_DEATHS)
        self._startup_deaths: dict[str, int] = dict.fromkeys(self.pools, 0)
        self._seq = itertools.count(1)
        # Work handed over by other threads (from_thread): one loop wake-up per burst.
        self._inbox: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._inbox_woken = False  # a drain is scheduled or running

    @property
    def memory_floor(self) -> int:
        """Bytes of available memory below which nothing is dispatched (0: never)."""
        return self.admission.memory_floor

    @memory_floor.setter
    def memory_floor(self, value: int) -> None:
        self.admission.memory_floor = value

    def from_thread(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon, from any thread, in the order handed over.

        ``loop.call_soon_threadsafe`` writes to the loop's self-pipe every time; a
        burst of calls (a map's window of submits, io actions ending together) wakes
        the loop once this way.

        Raises:
            RuntimeError: the loop is closed (the runner is gone).
        """
        # No lock: a handing thread appends, then reads the flag; the drain clears the
        # flag, then looks at the inbox once more. Whatever the interleaving, an item
        # is seen by a drain that is running or by one its thread schedules; at worst
        # a drain finds nothing to do.
        self._inbox.append((fn, args))
        if not self._inbox_woken:
            self._inbox_woken = True
            self.loop.call_soon_threadsafe(self._drain_inbox)

    def _drain_inbox(self) -> None:
        inbox = self._inbox
        while True:
            while inbox:
                fn, args = inbox.popleft()
                try:
                    fn(*args)
                except Exception as exc:  # noqa: BLE001 - as a failing loop callback would be
                    self.loop.call_exception_handler(
                        {"message": f"exception in {fn!r}", "exception": exc}
                    )
            self._inbox_woken = False
            if not inbox:
                return
            self._inbox_woken = True

    def next_seq(self) -> int:
        """A sequence number for a new run (earlier runs dispatch first)."""
        return next(self._seq)

    # ---- the state machine: one function per move ------------------------------------

    def transition(self, rec: NodeRecord, to: NodeState, **info: Any) -> None:
        """Move ``rec`` to state ``to`` and run that move's function (:data:`MOVES`).

        Raises:
            AssertionError: the move is not in :data:`MOVES` (a scheduler bug).
        """
        move = MOVES.get((rec.state, to))
        if move is None:
            raise AssertionError(
                f"node {rec.name!r}: illegal transition {rec.state.value} -> {to.value}"
            )
        if rec.state is NodeState.RUNNING:
            run = rec.run
            run.running -= 1
            if run.max_parallel is not None and self.admission.waiting():
                self.schedule_dispatch()  # a node of this run may wait for the room
        rec.state = to
        move(self, rec, **info)

    def _deps_met(self, rec: NodeRecord, now: bool = False) -> None:
        """PENDING -> READY: its dependencies succeeded (or a call arrived); queue it.
        ``now``: the caller dispatches at once (``dispatch_now``)."""
        self.admission.push(rec)
        if not now:
            self.schedule_dispatch()

    def _start_attempt(self, rec: NodeRecord, task: Task) -> None:
        """READY -> RUNNING: account for the attempt and submit ``task`` to its pool."""
        spec = rec.spec
        kind = spec.kind
        rec.attempts += 1
        rec.run.running += 1
        rec.pool = self.pools[kind].label
        rec.stop_reason = ""
        rec.started_at = None
        rec.worker = None
        journal = rec.run.journal
        if journal is not None:  # committed before the attempt can start anywhere
            try:
                journal.started(rec)
            except Exception as exc:  # noqa: BLE001 - the node fails; nothing was sent
                self.transition(rec, NodeState.FAILED, error=exc)
                return
        self.admission.take(spec)
        if kind == "cpu":  # a worker may write result segments until its attempt is over
            rec.arena.hold()
        self.emit(rec, "queued")
        attempt = rec.attempts
        on_started, on_event = self.callbacks(rec, attempt)
        try:
            handle = self.pools[kind].submit(
                task, spec.is_async, on_started if task.announce else None, on_event
            )
        except Exception as exc:  # noqa: BLE001 - a closed pool fails this node
            self.admission.give_back(spec)
            if kind == "cpu":
                rec.arena.unhold()
            self.transition(rec, NodeState.FAILED, error=exc)
            return
        rec.handle = handle
        fast = rec.user_future is not None and spec.timeout is None
        # The callback must not hold the attempt: the attempt's future holds the
        # callback, and the cycle would leave every attempt (its future, task and
        # callbacks) for the cyclic GC, whose passes then slow a large plan down.
        # Whoever resolves the future holds the attempt meanwhile.
        handle_ref = weakref.ref(handle)
        ready = self.admission.ready[kind]

        def done(f: Future[Result]) -> None:
            handle = handle_ref()
            if handle is None:  # cannot happen: see above
                return
            if handle.direct:  # read on this loop, between callbacks
                if ready:  # the freed worker's next node goes out first
                    self._release(rec, handle)
                    self.dispatch_now()
                if fast:  # the caller wakes while the outcome is recorded
                    self._resolve_early(rec, f)
                self._on_result(rec, attempt, handle)
                return
            if fast:
                self._resolve_early(rec, f)
            if asyncio._get_running_loop() is self.loop:
                # resolved here, inside other bookkeeping (a cancel withdrew it): later
                self.loop.call_soon(self._on_result, rec, attempt, handle)
                return
            with contextlib.suppress(RuntimeError):
                self.from_thread(self._on_result, rec, attempt, handle)

        handle.future.add_done_callback(done)

    def _retry(self, rec: NodeRecord, delay: float = 0.0, counted: bool = True) -> None:
        """RUNNING -> READY: the attempt failed and will run again, after ``delay``
        seconds; ``counted=False``: its worker died before starting it, so it does not
        count as an attempt."""
        rec.handle = None
        if not counted:
            rec.attempts -= 1
        if delay > 0:
            self.loop.call_later(delay, self._requeue, rec)
        else:
            self._requeue(rec)

    def _requeue(self, rec: NodeRecord) -> None:
        if rec.state is NodeState.READY:  # else cancelled during a backoff
            self.admission.push(rec)
            self.schedule_dispatch()

    def _succeed(self, rec: NodeRecord) -> None:
        """RUNNING -> SUCCEEDED (its value and deltas are read already)."""
        self._end(rec)

    def _fail(self, rec: NodeRecord, error: BaseException, traceback: str | None = None) -> None:
        """RUNNING -> FAILED: the action raised, with no retry left or asked for."""
        self._end(rec, error, traceback)

    def _time_out(
        self, rec: NodeRecord, error: BaseException, traceback: str | None = None
    ) -> None:
        """RUNNING -> TIMED_OUT."""
        self._end(rec, error, traceback)

    def _crash(self, rec: NodeRecord, error: BaseException, traceback: str | None = None) -> None:
        """RUNNING -> CRASHED: its worker process died (or workers die before starting)."""
        self._end(rec, error, traceback)

    def _cancel_running(self, rec: NodeRecord, error: BaseException) -> None:
        """RUNNING -> CANCELLED: stop the attempt as hard as its pool can (a process is
        killed; a thread is abandoned, its slot free at once)."""
        handle = rec.handle
        if handle is not None:
            rec.stop_reason = "cancel"
            handle.cancel("cancel")  # a cpu pool learns here whether the attempt started
            if rec.started_at is None and handle.started_at is not None:
                rec.started_at, rec.worker = handle.started_at, handle.worker
            if not self.pools[rec.spec.kind].stops_by_kill:
                self._release(rec, handle)  # the thread is abandoned
        self._end(rec, error)

    def _cancel_waiting(self, rec: NodeRecord, error: BaseException) -> None:
        """PENDING or READY -> CANCELLED: nothing runs; it leaves its queue lazily."""
        self._end(rec, error)

    def _skip(self, rec: NodeRecord, error: BaseException, traceback: str | None = None) -> None:
        """PENDING -> SKIPPED (an upstream did not succeed) or READY -> SKIPPED
        (``validate`` said no)."""
        self._end(rec, error, traceback)

    def _fail_unstarted(self, rec: NodeRecord, error: BaseException) -> None:
        """READY -> FAILED: it cannot run (its arguments or state cannot be pickled,
        ``validate`` raised)."""
        self._end(rec, error)

    def _join_decided(self, rec: NodeRecord, error: BaseException | None = None) -> None:
        """PENDING -> SUCCEEDED / FAILED: a race or quorum node decided by its inputs,
        or a node whose end a resumed run loaded from its journal."""
        self._end(rec, error)

    def _in_doubt(self, rec: NodeRecord, error: BaseException) -> None:
        """PENDING -> IN_DOUBT: a resumed run found it started but never ended, and it
        may not run again unasked (not idempotent, and no ``reconcile`` said so)."""
        self._end(rec, error)

    def _end(
        self, rec: NodeRecord, error: BaseException | None = None, traceback: str | None = None
    ) -> None:
        """What every move into a terminal state does last: record, report, propagate."""
        if error is not None:
            rec.error = error
        if traceback is not None:
            rec.traceback = traceback
        # What only another attempt would need goes now, not when the run ends: kept,
        # the attempt and the pickled call are objects for the cyclic GC to traverse
        # again and again while a large plan runs.
        rec.handle = None
        rec.call = None
        rec.finished_at = time.time()
        if rec.run.journal is not None:  # committed before any dependent can start
            rec.run.journal_ended(rec)
        self.emit(rec, "finished", Status(rec.state.value))
        rec.run.node_finished(rec)

    # ---- decisions: what the pools and timers report ------------------------------------

    def callbacks(
        self, rec: NodeRecord, attempt: int
    ) -> tuple[Callable[[int | str, float], None], Callable[[str, float, Any], None]]:
        """``(on_started, on_event)`` for a pool: they hop to this loop (from any thread)."""
        call_soon = self.from_thread

        def on_started(worker: int | str, at: float) -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop: the runner is gone
                call_soon(self._on_started, rec, attempt, worker, at)

        def on_event(kind: str, at: float, data: Any) -> None:
            with contextlib.suppress(RuntimeError):
                call_soon(self._on_worker_event, rec, attempt, kind, at, data)

        return on_started, on_event

    def _current(self, rec: NodeRecord, attempt: int) -> bool:
        return rec.state is NodeState.RUNNING and rec.attempts == attempt

    def _on_started(self, rec: NodeRecord, attempt: int, worker: int | str, at: float) -> None:
        if not self._current(rec, attempt):
            return
        self._startup_deaths[rec.spec.kind] = 0
        rec.started_at = at
        rec.worker = worker
        self.emit(rec, "started", at=at)
        timeout = rec.spec.timeout
        if timeout is None:
            return
        elapsed = max(0.0, time.time() - at)
        if self.pools[rec.spec.kind].stops_by_kill:  # the worker raises at the deadline
            delay = timeout + self.timeout_grace - elapsed
            self.loop.call_later(max(0.0, delay), self._hard_timeout, rec, attempt)
        else:
            self.loop.call_later(max(0.0, timeout - elapsed), self._soft_timeout, rec, attempt)

    def _on_worker_event(
        self, rec: NodeRecord, attempt: int, kind: str, at: float, data: Any
    ) -> None:
        if self._current(rec, attempt):
            self.emit(rec, kind, data, at=at)

    def _hard_timeout(self, rec: NodeRecord, attempt: int) -> None:
        """A cpu attempt outlived its timeout and grace: kill its worker; the pool then
        reports it killed (:meth:`_on_result`)."""
        if self._current(rec, attempt) and rec.handle is not None:
            rec.stop_reason = "timeout"
            rec.handle.cancel("timeout")

    def _soft_timeout(self, rec: NodeRecord, attempt: int) -> None:
        """An io attempt reached its deadline: it ends now (a thread cannot be killed:
        it is abandoned, ``ctx.cancelled()`` turns True, an async task is cancelled)."""
        if not self._current(rec, attempt) or rec.handle is None:
            return
        rec.stop_reason = "timeout"
        rec.handle.cancel("timeout")
        self._release(rec, rec.handle)  # the thread is abandoned
        how = (
            "its task was cancelled"
            if rec.spec.is_async
            else "its thread was asked to stop: ctx.cancelled() is True"
        )
        err = ActionTimeout(
            f"node {rec.name!r} ran past its timeout of {rec.spec.timeout:g} s ({how})"
        )
        self._failed(rec, err, None)

    def _resolve_early(self, rec: NodeRecord, f: Future[Result]) -> None:
        """Give a submitted call's value to its future as soon as the pool has it.

        The caller then wakes while the loop records the outcome. Only a plain success
        qualifies (no timeout that could make it late, no state updates); anything
        else, and the outcome itself, is the loop's to decide as always.
        """
        if f.cancelled() or f.exception() is not None:
            return
        result = f.result()
        fut = rec.user_future
        if not result.ok or result.deltas is not None or fut is None or fut.done():
            return
        try:
            value = rec.arena.loads(result.value) if result.value is not None else None
        except BaseException:  # noqa: BLE001 - the loop reports it as a SerializationError
            return
        rec.value = value
        rec.early = True
        with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
            fut.set_result(value)

    def _on_result(self, rec: NodeRecord, attempt: int, handle: Attempt) -> None:
        """The pool is done with an attempt: decide the node's next move."""
        self._release(rec, handle)
        recycled = handle.recycled
        if recycled is not None:  # its worker is being replaced (max_tasks, memory)
            rec.run.note_recycled(rec, recycled)
            self.emit(rec, "recycled", recycled)
        fut = handle.future
        if rec.spec.kind == "cpu":
            if fut.cancelled() or fut.exception() is not None:
                rec.arena.orphans_possible = True  # it may have made segments, then died
            rec.arena.unhold()
        if not self._current(rec, attempt):
            return  # stale: the node was cancelled, timed out or re-dispatched meanwhile
        if rec.started_at is None and handle.started_at is not None:
            rec.started_at, rec.worker = handle.started_at, handle.worker
        try:
            result = fut.result()
        except CancelledError:
            self._failed(rec, ActionFailed(f"node {rec.name!r}: its attempt was withdrawn"), None)
            return
        except NotStarted as exc:
            self._not_started(rec, exc)
            return
        except WorkerCrashed as exc:
            self._on_crash(rec, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a pool failure ends the node
            self._failed(rec, exc, None)
            return
        self._startup_deaths[rec.spec.kind] = 0
        if rec.started_at is None:
            rec.started_at = result.started_at
            rec.worker = result.worker
        timeout = rec.spec.timeout
        if timeout is not None and result.finished_at - result.started_at > timeout:
            # Past the deadline is TIMED_OUT, whatever the action did after it: an io
            # action that noticed ctx.cancelled() and returned, or a cpu action that
            # caught its soft ActionTimeout and returned, is still late.
            if not self.pools[rec.spec.kind].stops_by_kill:  # a thread, not a process
                kept = "its thread was asked to stop: ctx.cancelled() is True"
            else:
                kept = "ActionTimeout was raised inside it"
            err = ActionTimeout(f"node {rec.name!r} ran past its timeout of {timeout:g} s ({kept})")
            if not result.ok:
                err.__cause__ = rebuild_error(result)
            self._failed(rec, err, result.traceback or None)
            return
        if result.ok and rec.early:
            self.transition(rec, NodeState.SUCCEEDED)
            return
        if result.ok:
            try:
                rec.value = rec.arena.loads(result.value) if result.value is not None else None
                rec.deltas = rec.arena.loads(result.deltas) if result.deltas is not None else None
            except BaseException as err:  # noqa: BLE001 - even SystemExit: the loop goes on
                self._failed(rec, unpickling_failed(rec.name, err), None)
                return
            self.transition(rec, NodeState.SUCCEEDED)
            return
        self._failed(rec, action_error(result), result.traceback or None)

    def _not_started(self, rec: NodeRecord, exc: NotStarted) -> None:
        """Its worker died before it started the attempt: nothing of the action ran, so
        sending it again is safe; unless workers keep dying before they start."""
        in_a_row = self.note_not_started(rec.spec.kind)
        rec.resubmits += 1
        if (
            rec.resubmits < MAX_STARTUP_DEATHS
            and in_a_row < MAX_STARTUP_DEATHS
            and not rec.run.cancelled
        ):
            self.transition(rec, NodeState.READY, counted=False)
            return
        self._failed(rec, self.startup_crash(rec.name, exc, max(rec.resubmits, in_a_row)), None)

    def note_not_started(self, kind: str) -> int:
        """A worker of the ``kind`` pool died before it started an attempt; how many did
        so in a row (any thread that is the loop's: a direct call's report too)."""
        self._startup_deaths[kind] += 1
        return self._startup_deaths[kind]

    def startup_crash(self, name: str, exc: NotStarted, times: int) -> WorkerCrashed:
        """The error of node ``name`` when workers keep dying before they start it."""
        crash = exc.crash
        return WorkerCrashed(
            f"node {name!r}: worker processes die before they start it ({crash};"
            f" {times} deaths in a row, while starting, or unpickling its call and"
            " importing its modules)",
            crash.exitcode,
            crash.signal,
        )

    def _on_crash(self, rec: NodeRecord, exc: WorkerCrashed) -> None:
        if rec.stop_reason == "timeout":
            grace = self.timeout_grace
            err = ActionTimeout(
                f"node {rec.name!r} ran past its timeout of {rec.spec.timeout:g} s and did not"
                f" stop within {grace:g} s of the soft timeout, so its worker was killed"
            )
            self._failed(rec, err, None)
        else:
            self._failed(rec, exc, None)

    def _failed(self, rec: NodeRecord, error: BaseException, tb: str | None) -> None:
        """An attempt did not succeed: retry it, or end the node with the status that
        ``error`` says (CRASHED, TIMED_OUT, FAILED)."""
        spec = rec.spec
        if isinstance(error, WorkerCrashed):
            consented = any(issubclass(t, WorkerCrashed) for t in spec.retry_on)
            status = NodeState.CRASHED
        else:
            consented = isinstance(error, spec.retry_on) and not isinstance(
                error, SerializationError
            )
            status = NodeState.TIMED_OUT if isinstance(error, ActionTimeout) else NodeState.FAILED
        if consented and rec.attempts <= spec.retries and not rec.run.cancelled:
            if rec.history is None:
                rec.history = []
            rec.history.append(
                (rec.started_at, time.time(), rec.pool, rec.worker, Status(status.value), error)
            )
            delay = backoff_delay(spec.backoff, rec.attempts)
            self.emit(rec, "retrying", {"attempt": rec.attempts, "error": error, "delay_s": delay})
            self.transition(rec, NodeState.READY, delay=delay)
            return
        self.transition(rec, status, error=error, traceback=tb)

    def cancel_node(self, rec: NodeRecord, why: str) -> None:
        """End ``rec`` ``CANCELLED`` now, whatever state it is in (a running attempt is
        stopped: :meth:`_cancel_running`); a no-op for a node that has ended."""
        if rec.state not in TERMINAL:
            err = ActionFailed(f"node {rec.name!r} cancelled: {why}")
            self.transition(rec, NodeState.CANCELLED, error=err)

    # ---- dispatch -----------------------------------------------------------------------

    def _release(self, rec: NodeRecord, handle: Attempt) -> None:
        """Free an attempt's slots and memory, exactly once: when its pool is done with
        it, or at once when an io attempt is abandoned (its thread no longer counts)."""
        if not handle.released:
            handle.released = True
            self.admission.give_back(rec.spec)
            if self.admission.waiting():  # else a dispatch would find nothing to do
                self.schedule_dispatch()

    def start(self, rec: NodeRecord) -> None:
        """Start a READY node that admission let through: its next attempt goes to its
        pool, unless its run says it may not start or it cannot run (then it ends)."""
        if not rec.run.may_start(rec):
            self.cancel_node(rec, rec.run.cancel_reason or "its call was cancelled")
            return
        task = self._prepare(rec)
        if task is not None:
            self.transition(rec, NodeState.RUNNING, task=task)

    def _paused(self, runs: set[RunBase], low: bool, data: dict[str, int]) -> None:
        """Tell the runs whose nodes wait that dispatch paused or resumed (memory)."""
        for run in runs:
            self._emit_run(run, "paused" if low else "resumed", data)

    def _prepare(self, rec: NodeRecord) -> Task | None:
        """Build the task for ``rec``'s next attempt; end the node if it cannot run."""
        run, spec = rec.run, rec.spec
        needs_state = spec.wants_context or spec.validate is not None
        if needs_state and run.state_error is not None:
            err = SerializationError(f"node {rec.name!r}: {run.state_error}")
            self.transition(rec, NodeState.FAILED, error=err)
            return None
        validating = rec.attempts == 0 and spec.validate is not None
        if validating or rec.call is None:  # first attempt: arguments are needed
            try:
                args, kwargs = run.arguments(rec)
            except Exception as exc:  # noqa: BLE001 - a bad argument ends the node, never hangs the run
                self.transition(rec, NodeState.FAILED, error=exc)
                return None
            if validating and not self._validate(rec, args, kwargs):
                return None
            if rec.call is None:
                try:
                    fn_bytes = run.functions.get(spec)
                    if fn_bytes is None:  # once per action per run (globals stay fresh)
                        fn_bytes = run.functions[spec] = dumps_function(rec.name, wire_form(spec))
                    rec.call = dumps_call(rec.name, None, args, kwargs, rec.arena, fn_bytes)
                except SerializationError as exc:
                    self.transition(rec, NodeState.FAILED, error=exc)
                    return None
        return self.task_for(rec)

    def task_for(self, rec: NodeRecord) -> Task:
        """The task of ``rec``'s next attempt, its call pickled already (``rec.call``)."""
        assert rec.call is not None
        return self.task(rec.run, rec.spec, rec.name, rec.attempts + 1, rec.call, rec.arena)

    def task(
        self, run: RunBase, spec: ActionSpec, name: str, attempt: int, call: Packed, arena: Arena
    ) -> Task:
        """The task of attempt ``attempt`` of node ``name`` of ``run``, its call pickled
        (:func:`~actionpool.transfer.dumps_call`) with ``arena``. Reads nothing that
        changes while a node waits, so a submitting thread may build it too
        (:meth:`CallRun.start_direct <actionpool.calls.CallRun.start_direct>`)."""
        return Task(
            run.run_id,
            name,
            attempt,
            spec.timeout,
            spec.wants_context,
            run.state_bytes if spec.wants_context else None,
            call,
            arena.prefix,
            arena.threshold,
            spec.threads * self.blas_threads,
            # "started" crosses to this thread only when something here needs it at
            # once (a deadline, or on_event); else the pool learns it when it must
            spec.timeout is not None or run.on_event is not None,
            spec.memory or 0,
            spec.threads,
            spec.name,
            bool(spec.idempotent),
            self.resources if spec.wants_context else None,
            (logging.getLogger().getEffectiveLevel() or 1) if self.capture else 0,
            run.tags_output,
        )

    def _validate(self, rec: NodeRecord, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Run the action's ``validate`` in the parent; end the node unless it says yes."""
        assert rec.spec.validate is not None
        try:
            ok = rec.spec.validate(rec.run.state_for_validate(), *args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self.transition(rec, NodeState.FAILED, error=exc)
            return False
        if not ok:
            reason = ActionFailed(f"node {rec.name!r} skipped: validate returned {ok!r}")
            self.transition(rec, NodeState.SKIPPED, error=reason)
            return False
        return True

    # ---- events -------------------------------------------------------------------------

    def emit(self, rec: NodeRecord, kind: str, data: Any = None, at: float | None = None) -> None:
        """Deliver an event about ``rec`` to its run's ``on_event``."""
        self._emit_run(rec.run, kind, data, at, rec.node, rec.name)

    def _emit_run(
        self,
        run: RunBase,
        kind: str,
        data: Any = None,
        at: float | None = None,
        node: Node | None = None,
        name: str = "",
    ) -> None:
        """Deliver an event to ``run``'s ``on_event`` (errors there become warnings)."""
        cb = run.on_event
        if cb is None:
            return
        try:
            cb(Event(kind, node, name, time.time() if at is None else at, data))
        except Exception as exc:  # noqa: BLE001 - a broken callback must not break the run
            warnings.warn(
                f"on_event raised {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=1
            )


_P, _R, _X = NodeState.PENDING, NodeState.READY, NodeState.RUNNING
S = Scheduler
MOVES: dict[tuple[NodeState, NodeState], Callable[..., None]] = {
    (_P, _R): S._deps_met,
    (_P, NodeState.SKIPPED): S._skip,
    (_P, NodeState.CANCELLED): S._cancel_waiting,
    (_P, NodeState.SUCCEEDED): S._join_decided,
    (_P, NodeState.FAILED): S._join_decided,
    (_P, NodeState.IN_DOUBT): S._in_doubt,
    (_R, _X): S._start_attempt,
    (_R, NodeState.SKIPPED): S._skip,
    (_R, NodeState.FAILED): S._fail_unstarted,
    (_R, NodeState.CANCELLED): S._cancel_waiting,
    (_X, _R): S._retry,
    (_X, NodeState.SUCCEEDED): S._succeed,
    (_X, NodeState.FAILED): S._fail,
    (_X, NodeState.TIMED_OUT): S._time_out,
    (_X, NodeState.CRASHED): S._crash,
    (_X, NodeState.CANCELLED): S._cancel_running,
}
"""The node lifecycle: every legal move ``(from, to)`` and the one function that makes
it. ``PENDING -> SUCCEEDED/FAILED`` is only taken by race and quorum nodes and by
nodes a resumed run loads from its journal; ``PENDING -> IN_DOUBT`` only on resume."""
del S

TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    frm: frozenset(to for f, to in MOVES if f is frm) for frm in (_P, _R, _X)
}
"""The legal moves by state: ``TRANSITIONS[from]`` is the set of states a node may move
to (derived from :data:`MOVES`)."""

TERMINAL = frozenset(NodeState) - set(TRANSITIONS)
"""The states a node never leaves."""


class _RemoteTraceback(Exception):
    """Carries a worker's formatted traceback as the ``__cause__`` of its exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def action_error(result: Result) -> BaseException:
    """The exception an action raised, rebuilt from its failed ``result``; the worker's
    traceback is its ``__cause__`` unless it has a cause of its own."""
    error = rebuild_error(result)
    if result.traceback and error.__cause__ is None:
        error.__cause__ = _RemoteTraceback(result.traceback)
    return error


def unpickling_failed(name: str, err: BaseException) -> SerializationError:
    """The error of a node whose return value could not be unpickled in the parent."""
    return SerializationError(
        f"node {name!r}: its return value could not be unpickled here ({type(err).__name__}: {err})"
    )


def backoff_delay(base: float, attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based).

    Exponential backoff with "equal jitter" (AWS Architecture Blog, "Exponential
    Backoff And Jitter", 2015): ``d = base * 2**(attempt-1)``, then a uniform draw in
    ``[d/2, d]`` so that retries of many nodes do not synchronise.
    """
    if base <= 0:
        return 0.0
    d = base * 2 ** (attempt - 1)
    return float(d / 2 + random.uniform(0, d / 2))
