"""The scheduler: decides what runs when. Lives on the runner's event-loop thread.

Data flow::

    Runner.run(plan) ─► PlanRun ─(ready nodes)─► Scheduler ready queues (per pool,
                                                 plan order) ─admission─► Pool
    Runner.submit()  ─► CallRun ─┘                                          │
                                                                            ▼
    Report ◄─ PlanRun._finish ◄─ transitions ◄─ _on_started / _on_result ◄─ the loop
                                   ▲ timers: soft deadline (io), hard kill (cpu)

Every node (a plan node or a submitted call) is a :class:`NodeRecord` whose lifecycle
is an explicit state machine::

    PENDING ──► READY ──► RUNNING ──► SUCCEEDED | FAILED | TIMED_OUT | CRASHED | CANCELLED
       │          │  ▲        │
       │          │  └────────┘ (retry after backoff)
       │          └──► SKIPPED (validate said no) | FAILED (cannot be serialized) | CANCELLED
       └──► SKIPPED (an upstream did not succeed) | CANCELLED
            | SUCCEEDED / FAILED (race and quorum nodes, decided by their inputs)

Only :meth:`Scheduler.transition` changes a record's state; it checks the move against
:data:`TRANSITIONS` and calls the one handler of the target state, so every rule about
a state lives in one function. The scheduler never touches processes (pools do) and a
pool never decides order (the scheduler does). All methods run on the loop thread;
pools report through :meth:`Scheduler.from_thread`, in the order things happened.

Failure rules (DESIGN.md, "Failure", "Timeouts", "Crashes and recovery"):

* an action that raised is retried while ``attempts <= retries`` and the error is one
  of ``retry_on``, after :func:`backoff_delay`; the last error is kept;
* cpu timeout: the worker raises :class:`~actionpool.ActionTimeout` inside the action
  at the deadline (soft); ``timeout_grace`` seconds later the scheduler kills the
  worker (hard);
* io timeout: at the deadline the node ends ``TIMED_OUT``, ``ctx.cancelled()`` turns
  True and an ``async def`` action is cancelled (a thread cannot be killed);
* an attempt that ran past its timeout ends ``TIMED_OUT`` whatever it did after the
  deadline (returned, raised, or caught the soft timeout to clean up): the soft
  timeout is for cleaning up, not for finishing late;
* a :class:`~actionpool.SerializationError` is never retried (it would fail again);
* a dead worker ends its node ``CRASHED`` with :class:`~actionpool.WorkerCrashed`; it
  is re-run only if ``retry_on`` names ``WorkerCrashed`` (the user's consent);
* ``fail_fast``: the first failure cancels every node that has not ended, running
  ones included.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future, InvalidStateError
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, Any

import psutil

from ._worker import Result, Task, rebuild_error
from .action import ActionSpec, wire_form
from .errors import (
    ActionFailed,
    ActionTimeout,
    PlanError,
    SerializationError,
    StateConflict,
    WorkerCrashed,
)
from .events import Event
from .outcome import Outcome, Report, RunStatus, Status
from .plan import Graph, Node, resolve
from .state import merge_state
from .transfer import Arena, Packed, dumps_call, dumps_function

if TYPE_CHECKING:
    from .pools import Attempt, Pool

__all__ = [
    "TRANSITIONS",
    "CallRun",
    "NodeRecord",
    "NodeState",
    "PlanRun",
    "Scheduler",
    "backoff_delay",
]


class NodeState(Enum):
    """Where a node is in its lifecycle (see the module docstring's diagram)."""

    # Identity hashing: Enum's own __hash__ is Python code, and every transition
    # hashes states a few times (a measurable share of a 5,000-node plan's dispatch).
    __hash__ = object.__hash__

    PENDING = "pending"  # waiting for its dependencies
    READY = "ready"  # dependencies met, waiting for a pool slot (or a retry's backoff)
    RUNNING = "running"  # handed to a pool
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CRASHED = "crashed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


_P, _R, _X = NodeState.PENDING, NodeState.READY, NodeState.RUNNING
TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    _P: frozenset(
        {_R, NodeState.SKIPPED, NodeState.CANCELLED, NodeState.SUCCEEDED, NodeState.FAILED}
    ),
    _R: frozenset({_X, NodeState.SKIPPED, NodeState.FAILED, NodeState.CANCELLED}),
    _X: frozenset(
        {
            _R,
            NodeState.SUCCEEDED,
            NodeState.FAILED,
            NodeState.TIMED_OUT,
            NodeState.CRASHED,
            NodeState.CANCELLED,
        }
    ),
}
"""The legal moves: ``TRANSITIONS[from]`` is the set of states a node may move to.
``PENDING -> SUCCEEDED/FAILED`` is only taken by race and quorum nodes."""

TERMINAL = frozenset(NodeState) - set(TRANSITIONS)

_MEM_RECHECK_S = 0.05  # seconds between two reads of available memory while dispatching


class NodeRecord:
    """The scheduler's record of one node during one run."""

    __slots__ = (
        "arena",
        "attempts",
        "call",
        "deltas",
        "deps_left",
        "early",
        "error",
        "finished_at",
        "handle",
        "index",
        "join_losses",
        "join_wins",
        "key",
        "lost",
        "name",
        "node",
        "pool",
        "run",
        "spec",
        "started_at",
        "state",
        "stop_reason",
        "traceback",
        "user_future",
        "value",
        "worker",
    )

    def __init__(
        self,
        run: _Run,
        index: int,
        name: str,
        spec: ActionSpec,
        node: Node | None,
        arena: Arena | None = None,
    ) -> None:
        self.run = run
        self.early = False  # user_future got its value before the outcome (_resolve_early)
        self.index = index
        self.name = name
        self.spec = spec
        self.node = node
        self.key = (run.seq, index)
        self.state = NodeState.PENDING
        self.deps_left = 0
        self.attempts = 0
        self.arena: Arena = arena if arena is not None else run.arena
        self.call: Packed | None = None
        self.value: Any = None
        self.error: BaseException | None = None
        self.traceback: str | None = None
        self.deltas: dict[str, Any] | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.worker: int | str | None = None
        self.pool: str | None = None
        self.user_future: Future[Any] | None = None
        self.handle: Attempt | None = None
        self.stop_reason = ""  # why the scheduler stopped the running attempt
        self.lost = False  # cancelled because a race/quorum was decided without it
        self.join_wins: list[NodeRecord] = []
        self.join_losses = 0

    def __lt__(self, other: NodeRecord) -> bool:  # run, then plan order (ready heaps use key)
        return self.key < other.key

    def __repr__(self) -> str:
        return f"<NodeRecord {self.name!r} {self.state.value}>"


class _Run:
    """What the scheduler needs of a run (a plan run or the runner's stream of calls)."""

    seq: int
    run_id: str
    arena: Arena
    state_bytes: Packed | None
    state_error: SerializationError | None
    on_event: Callable[[Event], Any] | None
    cancelled: bool = False
    functions: dict[ActionSpec, bytes]  # each action's pickled function, for this run

    def arguments(self, rec: NodeRecord) -> tuple[tuple[Any, ...], dict[str, Any]]:
        raise NotImplementedError

    def may_start(self, rec: NodeRecord) -> bool:
        return not self.cancelled

    def state_for_validate(self) -> Any:
        """A private copy of the state for a ``validate`` callable."""
        return self.arena.loads(self.state_bytes) if self.state_bytes is not None else {}

    def node_finished(self, rec: NodeRecord) -> None:
        raise NotImplementedError

    def live_records(self) -> list[NodeRecord]:
        raise NotImplementedError

    cancel_reason: str = ""

    def cancel(self, why: str) -> None:
        """End every node of this run that has not ended ``CANCELLED``."""
        self.cancelled = True
        self.cancel_reason = why
        for rec in self.live_records():
            self.sched.cancel_node(rec, why)  # type: ignore[attr-defined]


class Scheduler:
    """Admission, dispatch, deadlines and results for every run of one runner.

    Admission (DESIGN.md, "Admission"): a node is dispatched when a slot per declared
    ``threads`` is free in its pool and its declared ``memory`` fits in what is left of
    the memory budget; ready nodes are tried in plan order and smaller ones may pass a
    node that does not fit yet (backfilling). While ``psutil``'s available memory is
    below ``memory_floor``, nothing is dispatched (backpressure); ``paused`` and
    ``resumed`` events say so.

    Args:
        loop: the runner's event loop; every method runs on its thread.
        pools: ``{"cpu": pool, "io": pool}``.
        timeout_grace: seconds between a cpu action's soft timeout and the kill of
            its worker.
        memory_budget: bytes that running nodes' declared ``memory`` may add up to.
        blas_threads: BLAS/OpenMP threads per CPU slot.
        memory_floor: bytes of available memory below which dispatch pauses.
        available: bytes of available memory just read by the caller (its sizing), or
            None; above ``memory_floor``, it counts as this loop's first check.
    """

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
        self.memory_floor = memory_floor
        self._mem_free = memory_budget
        self._paused = False
        self._mem_checked = 0.0
        if available is not None and available >= memory_floor:
            self._mem_checked = time.monotonic()  # a runner's first call need not wait
        # Per pool, a heap of (rec.key, rec): the keys are unique, so ordering compares
        # int tuples in C and never the records (a Python __lt__ was called ~12 times
        # per node of a 5,000-node plan).
        self._ready: dict[str, list[tuple[tuple[int, int], NodeRecord]]] = {
            k: [] for k in self.pools
        }
        self._free: dict[str, int] = {k: p.size for k, p in self.pools.items()}
        # Direct calls (CallRun.start_direct) hold slots without a record, per pool:
        # started by submitting threads (under the runner's lock), ended on this loop
        # or by io threads (under _direct_lock; see direct_ended_at).
        self.direct_started: dict[str, int] = dict.fromkeys(self.pools, 0)
        self.direct_ended: dict[str, int] = dict.fromkeys(self.pools, 0)
        self._direct_lock = threading.Lock()
        # Per pool: the dispatcher may leave a node waiting for a slot. Set before it
        # reads the slots, so that a direct call ending in another thread either is
        # counted in that reading or sees the flag and wakes the loop.
        self._wants_slot: dict[str, bool] = dict.fromkeys(self.pools, False)
        self._dispatch_pending = False
        self._dispatching = False  # dispatch_now is on the stack
        self._seq = itertools.count(1)
        # Work handed over by other threads (from_thread): one loop wake-up per burst.
        self._inbox: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._inbox_lock = threading.Lock()
        self._inbox_woken = False

    def from_thread(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon, from any thread, in the order handed over.

        ``loop.call_soon_threadsafe`` writes to the loop's self-pipe every time (~16 µs
        of the caller's time here, and a loop turn); a burst of calls (a map's window
        of submits, io actions ending together) now wakes the loop once.

        Raises:
            RuntimeError: the loop is closed (the runner is gone).
        """
        with self._inbox_lock:
            self._inbox.append((fn, args))
            if self._inbox_woken:
                return  # a drain is on its way and takes this too
            self._inbox_woken = True
        self.loop.call_soon_threadsafe(self._drain_inbox)

    def _drain_inbox(self) -> None:
        while True:
            with self._inbox_lock:
                if not self._inbox:
                    self._inbox_woken = False
                    return
                fn, args = self._inbox.popleft()
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - as a failing loop callback would be
                self.loop.call_exception_handler(
                    {"message": f"exception in {fn!r}", "exception": exc}
                )

    def next_seq(self) -> int:
        """A sequence number for a new run (earlier runs dispatch first)."""
        return next(self._seq)

    # ---- the state machine -------------------------------------------------------

    def transition(self, rec: NodeRecord, to: NodeState, **info: Any) -> None:
        """Move ``rec`` to state ``to`` and run that state's handler.

        Raises:
            AssertionError: the move is not in :data:`TRANSITIONS` (a scheduler bug).
        """
        frm = rec.state
        if to not in TRANSITIONS.get(frm, ()):
            raise AssertionError(f"node {rec.name!r}: illegal transition {frm.value} -> {to.value}")
        rec.state = to
        _HANDLERS[to](self, rec, frm, **info)

    def _to_ready(
        self, rec: NodeRecord, frm: NodeState, delay: float = 0.0, now: bool = False
    ) -> None:
        rec.handle = None
        if delay > 0:
            self.loop.call_later(delay, self._enqueue, rec)
        elif now:  # the caller dispatches at once (dispatch_now)
            heapq.heappush(self._ready[rec.spec.kind], (rec.key, rec))
        else:
            self._enqueue(rec)

    def _to_running(self, rec: NodeRecord, frm: NodeState, task: Task) -> None:
        """Account for the attempt and submit ``task`` to its pool."""
        kind = rec.spec.kind
        rec.attempts += 1
        rec.pool = kind
        rec.stop_reason = ""
        rec.started_at = None
        rec.worker = None
        self._free[kind] -= rec.spec.threads
        self._mem_free -= rec.spec.memory or 0
        if kind == "cpu":  # a worker may write result segments until its attempt is over
            rec.arena.hold()
        self.emit(rec, "queued")
        attempt = rec.attempts
        on_started, on_event = self.callbacks(rec, attempt)
        wants_start = task.announce  # see _prepare
        try:
            handle = self.pools[kind].submit(
                task, rec.spec.is_async, on_started if wants_start else None, on_event
            )
        except Exception as exc:  # noqa: BLE001 - a closed pool fails this node
            self._free[kind] += rec.spec.threads
            self._mem_free += rec.spec.memory or 0
            if kind == "cpu":
                rec.arena.unhold()
            self.transition(rec, NodeState.FAILED, error=exc)
            return
        rec.handle = handle

        fast = rec.user_future is not None and rec.spec.timeout is None
        # The callback must not hold the attempt: the attempt's future holds the
        # callback, and the cycle would leave every attempt (its future, task and
        # callbacks, ~20 objects) for the cyclic GC, whose passes then cost a large
        # plan ~10% of its run (W9, docs/performance.md). Whoever resolves the future
        # holds the attempt meanwhile.
        handle_ref = weakref.ref(handle)

        def done(f: Future[Result]) -> None:
            handle = handle_ref()
            if handle is None:  # cannot happen: see above
                return
            if handle.direct:  # read on this loop, between callbacks
                if self._ready[kind]:  # the freed worker's next node goes out first
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

    def _resolve_early(self, rec: NodeRecord, f: Future[Result]) -> None:
        """Give a submitted call's value to its future as soon as the pool has it.

        The caller then wakes while the loop records the outcome (on the next loop
        turn, or after a hop from the io pool's thread). Only a plain success
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
        except Exception:  # noqa: BLE001 - the loop reports it as a SerializationError
            return
        rec.value = value
        rec.early = True
        with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
            fut.set_result(value)

    def _to_terminal(
        self,
        rec: NodeRecord,
        frm: NodeState,
        error: BaseException | None = None,
        traceback: str | None = None,
    ) -> None:
        if error is not None:
            rec.error = error
        if traceback is not None:
            rec.traceback = traceback
        # What only another attempt would need goes now, not when the run ends: the
        # attempt (its future, task and callbacks) and the pickled call. Kept, they
        # were ~15 objects per node for the cyclic GC to traverse again and again
        # while a large plan runs (W9: 5,000 nodes, docs/performance.md).
        rec.handle = None
        rec.call = None
        rec.finished_at = time.time()
        self.emit(rec, "finished", Status(rec.state.value))
        rec.run.node_finished(rec)

    # ---- queues and admission ----------------------------------------------------

    def _enqueue(self, rec: NodeRecord) -> None:
        if rec.state is not NodeState.READY:  # cancelled during a backoff
            return
        heapq.heappush(self._ready[rec.spec.kind], (rec.key, rec))
        self.schedule_dispatch()

    def direct_ended_at(self, kind: str) -> None:
        """A direct call of ``kind`` gave its slot back (from any thread). The loop is
        woken only when it must act: a node may wait for that slot, or available
        memory needs a fresh reading (:meth:`slot_freed`)."""
        with self._direct_lock:
            self.direct_ended[kind] += 1
        if asyncio._get_running_loop() is self.loop:
            self.slot_freed()
        elif self._wants_slot[kind] or (
            self.memory_floor > 0 and time.monotonic() - self._mem_checked >= _MEM_RECHECK_S
        ):
            with contextlib.suppress(RuntimeError):  # a closed loop: the runner is gone
                self.from_thread(self.slot_freed)

    def slot_freed(self) -> None:
        """A direct call's slot is free (:class:`CallRun`): dispatch what waits for it,
        now, and read available memory if the last reading is stale, so that the next
        direct call finds a fresh one (:meth:`admits_at_once`) rather than read it in
        the caller's thread: ~70 µs, ~270 µs after the process slept (W6's maps)."""
        if self.memory_floor > 0 and time.monotonic() - self._mem_checked >= _MEM_RECHECK_S:
            self._memory_low()
        if any(self._ready.values()):
            self.dispatch_now()

    def _release(self, rec: NodeRecord, handle: Attempt) -> None:
        """Free an attempt's slots and memory, exactly once: when its pool is done with
        it, or at once when an io attempt is abandoned (its thread no longer counts)."""
        if not handle.released:
            handle.released = True
            self._free[rec.spec.kind] += rec.spec.threads
            self._mem_free += rec.spec.memory or 0
            if any(self._ready.values()):  # else a dispatch would find nothing to do
                self.schedule_dispatch()

    def schedule_dispatch(self) -> None:
        """Dispatch on the next loop iteration (coalesces bursts of finished nodes)."""
        if not self._dispatch_pending:
            self._dispatch_pending = True
            self.loop.call_soon(self._dispatch)

    def dispatch_now(self) -> None:
        """Dispatch now what is ready (a dispatch already scheduled then finds less to
        do); saves a loop turn for a lone call (:meth:`CallRun.add`), and for the node
        that waits for a worker whose result was just read.

        A loop turn is not free: its ``epoll_wait`` lets go of the GIL, which the
        caller's thread, woken by the result, then holds while it consumes it (a map
        refills its window). A worker freed in the middle of a map of 50 ms tasks
        waited 0.1-0.45 ms for its next task that way on 2 cores.

        Called within a dispatch (a node's outcome recorded as it is dispatched), it
        leaves the work to a dispatch on the next loop turn.
        """
        if self._dispatching:
            self.schedule_dispatch()
            return
        self._dispatching = True
        try:
            self._dispatch_ready()
        finally:
            self._dispatching = False

    def _dispatch(self) -> None:
        self._dispatch_pending = False
        self.dispatch_now()

    def free_slots(self, kind: str) -> int:
        """Slots of the ``kind`` pool that no attempt holds, direct calls included."""
        return self._free[kind] - (self.direct_started[kind] - self.direct_ended[kind])

    def _dispatch_ready(self) -> None:
        if not any(self._ready.values()) or self._memory_low():
            return
        for kind, heap in self._ready.items():
            if not heap:
                continue
            self._wants_slot[kind] = True  # before the slots are read: direct_ended_at
            waiting: list[tuple[tuple[int, int], NodeRecord]] = []  # too big for now
            while heap and self.free_slots(kind) > 0:
                entry = heapq.heappop(heap)
                rec = entry[1]
                if rec.state is not NodeState.READY:
                    continue
                too_big = rec.spec.threads > self.free_slots(kind)
                if too_big or (rec.spec.memory or 0) > self._mem_free:
                    waiting.append(entry)
                    continue
                if not rec.run.may_start(rec):
                    self.transition(rec, NodeState.CANCELLED)
                    continue
                task = self._prepare(rec)
                if task is not None:
                    self.transition(rec, NodeState.RUNNING, task=task)
            for entry in waiting:
                heapq.heappush(heap, entry)
            self._wants_slot[kind] = bool(heap)

    def admits_at_once(self, kind: str) -> bool:
        """Whether a one-slot node of ``kind`` would be dispatched at once: no node of
        that kind waits, a slot is free, and available memory was checked recently and
        is above the floor. Read from any thread (:meth:`CallRun.start_direct`); a stale
        answer errs by one loop turn, and the pool never runs more than its size.

        Available memory is read here (psutil) when the last reading is older than the
        dispatcher's own recheck interval (:meth:`slot_freed` keeps it fresh while
        direct calls end); that reading then counts as the dispatcher's too. A call
        submitted after a pause of more than 50 ms (each map of W6's 50 ms sleeps)
        used to go the loop's way only to have memory read there.
        """
        if self._ready[kind] or self.free_slots(kind) <= 0 or self._paused:
            return False
        if self.memory_floor <= 0:
            return True
        now = time.monotonic()
        if now - self._mem_checked < _MEM_RECHECK_S:
            return True
        if psutil.virtual_memory().available < self.memory_floor:
            return False  # the dispatcher pauses, and says so to the runs
        self._mem_checked = now
        return True

    def _memory_low(self) -> bool:
        """Backpressure: True (and a recheck scheduled) while available memory < floor."""
        if self.memory_floor <= 0 and not self._paused:
            return False
        now = time.monotonic()
        if not self._paused and now - self._mem_checked < _MEM_RECHECK_S:
            return False  # read /proc/meminfo at most every 50 ms while dispatching
        self._mem_checked = now
        available = int(psutil.virtual_memory().available)
        low = available < self.memory_floor
        if low != self._paused:
            self._paused = low
            data = {"available": available, "floor": self.memory_floor}
            runs = {rec.run for heap in self._ready.values() for _, rec in heap}
            for run in runs:
                self._emit_run(run, "paused" if low else "resumed", data)
        if low:  # memory gives no notification: look again in a while
            self.loop.call_later(0.1, self.schedule_dispatch)
        return low

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
        self, run: _Run, spec: ActionSpec, name: str, attempt: int, call: Packed, arena: Arena
    ) -> Task:
        """The task of attempt ``attempt`` of node ``name`` of ``run``, its call pickled
        (:func:`~actionpool.transfer.dumps_call`) with ``arena``. Reads nothing that
        changes while a node waits, so a submitting thread may build it too
        (:meth:`CallRun.start_direct`)."""
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

    # ---- what the pools report ------------------------------------------------------

    def _current(self, rec: NodeRecord, attempt: int) -> bool:
        return rec.state is NodeState.RUNNING and rec.attempts == attempt

    def _on_started(self, rec: NodeRecord, attempt: int, worker: int | str, at: float) -> None:
        if not self._current(rec, attempt):
            return
        rec.started_at = at
        rec.worker = worker
        self.emit(rec, "started", at=at)
        timeout = rec.spec.timeout
        if timeout is None:
            return
        elapsed = max(0.0, time.time() - at)
        if rec.spec.kind == "cpu":  # the worker raises at the deadline; kill if it must
            delay = timeout + self.timeout_grace - elapsed
            self.loop.call_later(max(0.0, delay), self._hard_timeout, rec, attempt)
        else:
            self.loop.call_later(max(0.0, timeout - elapsed), self._io_timeout, rec, attempt)

    def _on_worker_event(
        self, rec: NodeRecord, attempt: int, kind: str, at: float, data: Any
    ) -> None:
        if self._current(rec, attempt):
            self.emit(rec, kind, data, at=at)

    def _hard_timeout(self, rec: NodeRecord, attempt: int) -> None:
        if self._current(rec, attempt) and rec.handle is not None:
            rec.stop_reason = "timeout"
            rec.handle.cancel("timeout")  # kills the worker; _on_result ends the node

    def _io_timeout(self, rec: NodeRecord, attempt: int) -> None:
        if not self._current(rec, attempt) or rec.handle is None:
            return
        rec.stop_reason = "timeout"
        rec.handle.cancel("timeout")  # ctx.cancelled() turns True; async tasks cancelled
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

    def _on_result(self, rec: NodeRecord, attempt: int, handle: Attempt) -> None:
        self._release(rec, handle)
        if rec.spec.kind == "cpu":
            if handle.future.cancelled() or handle.future.exception() is not None:
                rec.arena.orphans_possible = True  # it may have made segments, then died
            rec.arena.unhold()
        fut = handle.future
        if not self._current(rec, attempt):
            return  # stale: the node was cancelled, timed out or re-dispatched meanwhile
        if rec.started_at is None and handle.started_at is not None:
            rec.started_at, rec.worker = handle.started_at, handle.worker
        try:
            result = fut.result()
        except CancelledError:
            self._failed(rec, ActionFailed(f"node {rec.name!r}: its attempt was withdrawn"), None)
            return
        except WorkerCrashed as exc:
            self._on_crash(rec, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a pool failure ends the node
            self._failed(rec, exc, None)
            return
        if rec.started_at is None:
            rec.started_at = result.started_at
            rec.worker = result.worker
        timeout = rec.spec.timeout
        if timeout is not None and result.finished_at - result.started_at > timeout:
            # Past the deadline is TIMED_OUT, whatever the action did after it: an io
            # action that noticed ctx.cancelled() and returned, or a cpu action that
            # caught its soft ActionTimeout and returned, is still late.
            if rec.spec.kind == "io":
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
            except Exception as err:  # noqa: BLE001
                self._failed(rec, _unpickling_failed(rec.name, err), None)
                return
            self.transition(rec, NodeState.SUCCEEDED)
            return
        self._failed(rec, action_error(result), result.traceback or None)

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
        """End an attempt that did not succeed: retry it, or end the node."""
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
            delay = backoff_delay(spec.backoff, rec.attempts)
            self.emit(rec, "retrying", {"attempt": rec.attempts, "error": error, "delay_s": delay})
            self.transition(rec, NodeState.READY, delay=delay)
            return
        self.transition(rec, status, error=error, traceback=tb)

    # ---- cancellation ----------------------------------------------------------------

    def cancel_node(self, rec: NodeRecord, why: str) -> None:
        """End ``rec`` ``CANCELLED`` now; a running attempt is stopped (process killed)."""
        if rec.state in TERMINAL:
            return
        if rec.state is NodeState.RUNNING and rec.handle is not None:
            rec.stop_reason = "cancel"
            rec.handle.cancel("cancel")  # a cpu pool learns here if the attempt started
            if rec.started_at is None and rec.handle.started_at is not None:
                rec.started_at, rec.worker = rec.handle.started_at, rec.handle.worker
            if rec.spec.kind == "io":
                self._release(rec, rec.handle)  # the thread is abandoned
        err = ActionFailed(f"node {rec.name!r} cancelled: {why}")
        self.transition(rec, NodeState.CANCELLED, error=err)

    # ---- events --------------------------------------------------------------------

    def emit(self, rec: NodeRecord, kind: str, data: Any = None, at: float | None = None) -> None:
        """Deliver an event about ``rec`` to its run's ``on_event``."""
        self._emit_run(rec.run, kind, data, at, rec.node, rec.name)

    def _emit_run(
        self,
        run: _Run,
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


_HANDLERS: dict[NodeState, Callable[..., None]] = {
    NodeState.READY: Scheduler._to_ready,
    NodeState.RUNNING: Scheduler._to_running,
    **{s: Scheduler._to_terminal for s in TERMINAL},
}


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


def _unpickling_failed(name: str, err: Exception) -> SerializationError:
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


class PlanRun(_Run):
    """One execution of a :class:`~actionpool.Plan`; resolves to a :class:`Report`."""

    def __init__(
        self,
        sched: Scheduler,
        graph: Graph,
        run_id: str,
        arena: Arena,
        state: Any,
        state_bytes: Packed | None,
        state_error: SerializationError | None,
        failure: str,
        on_event: Callable[[Event], Any] | None,
        reducers: Mapping[str, Callable[[Any, Any], Any]] | None,
    ) -> None:
        self.sched = sched
        self.graph = graph
        self.seq = sched.next_seq()
        self.run_id = run_id
        self.arena = arena
        self.functions = {}
        self.initial_state = state
        self.state_bytes = state_bytes
        self.state_error = state_error
        self.failure = failure
        self.on_event = on_event
        self.reducers = reducers
        self.recs = [NodeRecord(self, n.index, n.name, n.action, n) for n in graph.nodes]
        for rec, deps in zip(self.recs, graph.deps, strict=True):
            rec.deps_left = len(deps)
        self.remaining = len(self.recs)
        self.started_at = time.time()
        self.failed_fast = False
        self.done: asyncio.Future[Report] = sched.loop.create_future()
        self._finished: deque[NodeRecord] = deque()
        self._draining = False

    def start(self) -> None:
        """Mark the nodes without dependencies ready (call on the loop thread)."""
        if not self.recs:
            self._finish()
            return
        for rec in self.recs:
            if rec.deps_left == 0 and rec.state is NodeState.PENDING:
                if rec.node is not None and rec.node.join is not None:
                    self._decide_join(rec)  # a race of nothing
                else:
                    self.sched.transition(rec, NodeState.READY)

    def live_records(self) -> list[NodeRecord]:
        return [r for r in self.recs if r.state not in TERMINAL]

    def arguments(self, rec: NodeRecord) -> tuple[tuple[Any, ...], dict[str, Any]]:
        node = rec.node
        assert node is not None
        if not node.deps:
            return node.args, node.kwargs

        def value_of(n: Node) -> Any:
            return self.recs[n.index].value

        return resolve(node.args, value_of), resolve(node.kwargs, value_of)

    def node_finished(self, rec: NodeRecord) -> None:
        # A worklist instead of recursion: a failure at the head of a 10,000-node chain
        # skips every node after it without growing the stack.
        self._finished.append(rec)
        if self._draining:
            return
        self._draining = True
        try:
            while self._finished:
                self._propagate(self._finished.popleft())
        finally:
            self._draining = False
        if self.remaining == 0 and not self.done.done():
            self._finish()

    def _propagate(self, rec: NodeRecord) -> None:
        self.remaining -= 1
        ok = rec.state is NodeState.SUCCEEDED
        for j in self.graph.dependents[rec.index]:
            dep = self.recs[j]
            if dep.state is not NodeState.PENDING:
                continue
            if dep.node is not None and dep.node.join is not None:
                if ok:
                    dep.join_wins.append(rec)
                else:
                    dep.join_losses += 1
                self._decide_join(dep)
            elif ok:
                dep.deps_left -= 1
                if dep.deps_left == 0:
                    self.sched.transition(dep, NodeState.READY)
            elif self.cancelled:  # a cancelled run's nodes end CANCELLED, not SKIPPED
                self.sched.cancel_node(dep, self.cancel_reason)
            else:
                why = f"upstream node {rec.name!r} {rec.state.value}"
                if rec.error is not None and rec.state is not NodeState.SKIPPED:
                    why += f" ({type(rec.error).__name__}: {rec.error})"
                err = ActionFailed(f"node {dep.name!r} skipped: {why}")
                self.sched.transition(dep, NodeState.SKIPPED, error=err, traceback=why)
        failed = rec.state in (NodeState.FAILED, NodeState.TIMED_OUT, NodeState.CRASHED)
        if failed and self.failure == "fail_fast" and not self.failed_fast:
            self.failed_fast = True
            for other in self.live_records():
                self.sched.cancel_node(
                    other, f"fail_fast after node {rec.name!r} {rec.state.value}"
                )

    def _decide_join(self, rec: NodeRecord) -> None:
        """Settle a race/quorum node once enough inputs succeeded or too many did not."""
        assert rec.node is not None and rec.node.join is not None
        kind, k = rec.node.join
        inputs = self.graph.deps[rec.index]
        wins = rec.join_wins
        if len(wins) >= k:
            rec.value = wins[0].value if kind == "race" else [w.value for w in wins[:k]]
            rec.started_at = time.time()
            self.sched.transition(rec, NodeState.SUCCEEDED)
            winners = ", ".join(repr(w.name) for w in wins[:k])
            for i in inputs:
                other = self.recs[i]
                if other.state not in TERMINAL:
                    other.lost = True
                    self.sched.cancel_node(other, f"{kind} {rec.name!r} was decided by {winners}")
        elif len(inputs) - rec.join_losses < k:
            need = "a success" if kind == "race" else f"{k} successes"
            err = ActionFailed(
                f"{kind} {rec.name!r} needed {need} but only {len(wins)} of its"
                f" {len(inputs)} inputs succeeded"
            )
            self.sched.transition(rec, NodeState.FAILED, error=err)

    def _finish(self) -> None:
        self.arena.close_when_idle()  # report values keep the segments they use mapped
        outcomes = [_outcome(rec) for rec in self.recs]
        deltas = [
            (i, self.recs[i].name, self.recs[i].deltas)
            for i in self.graph.order
            if self.recs[i].deltas and self.recs[i].state is NodeState.SUCCEEDED
        ]
        counted = [o for o, rec in zip(outcomes, self.recs, strict=True) if not rec.lost]
        status = run_status(counted, self.failed_fast, self.cancelled)
        try:
            state = merge_state(self.initial_state, deltas, self.graph.ancestors, self.reducers)  # type: ignore[arg-type]
        except (StateConflict, TypeError) as exc:
            report = Report(
                outcomes, self.initial_state, status, self.run_id, self.started_at, time.time()
            )
            setattr(exc, "report", report)  # noqa: B010 - no result is lost
            self.done.set_exception(exc)
            return
        self.done.set_result(
            Report(outcomes, state, status, self.run_id, self.started_at, time.time())
        )


class CallFuture(Future[Any]):
    """The :class:`concurrent.futures.Future` of a :meth:`Runner.submit` call.

    It is one in every way; what differs is where a direct cpu call's result is read
    (:meth:`CallRun.start_direct`). A thread that calls :meth:`result` or
    :meth:`exception` while the call runs reads its worker's reply itself
    (:meth:`ProcessPool.read_result <actionpool.pools.process.ProcessPool.read_result>`)
    rather than sleep until the scheduler's loop has read it and woken it: one
    wake-up per call instead of two, and the loop not woken at all (W2,
    docs/performance.md). Otherwise, and whenever that thread gives up (its timeout,
    the worker's death), the loop reads it as for every other call.
    """

    def __init__(self) -> None:
        super().__init__()
        # (the pool's read_result, a weak reference to the attempt): set before the
        # attempt is sent, for a direct cpu call only
        self._read_here: tuple[Callable[..., None], weakref.ref[Any]] | None = None

    def result(self, timeout: float | None = None) -> Any:
        if self._read_here is not None:
            timeout = self._wait_here(timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._read_here is not None:
            timeout = self._wait_here(timeout)
        return super().exception(timeout)

    def _wait_here(self, timeout: float | None) -> float | None:
        """Read the call's result in this thread if it can; the timeout left."""
        read_here = self._read_here
        handle = None if read_here is None else read_here[1]()
        if read_here is None or handle is None or self.done():
            return timeout
        if timeout is None:
            read_here[0](handle, None)
            return None
        end = time.monotonic() + timeout
        read_here[0](handle, timeout)
        return max(0.0, end - time.monotonic())


class _Direct:
    """A call that its submitting thread sent straight to its pool
    (:meth:`CallRun.start_direct`): it has no record and makes no transitions."""

    __slots__ = ("arena", "future", "kind", "name")

    def __init__(self, name: str, kind: str, future: Future[Any], arena: Arena) -> None:
        self.name = name
        self.kind = kind
        self.future = future
        self.arena = arena


def _value_of(entry: _Direct, result: Result) -> tuple[Any, BaseException | None]:
    """A direct call's value, or the error its future gets instead, from its attempt's
    result, as a record's outcome would have it (:meth:`Scheduler._on_result`)."""
    if not result.ok:
        return None, action_error(result)
    try:
        return (entry.arena.loads(result.value) if result.value is not None else None), None
    except Exception as err:  # noqa: BLE001
        return None, _unpickling_failed(entry.name, err)


def _end_future(fut: Future[Any], value: Any, error: BaseException | None) -> None:
    """Set ``fut`` (from any thread), unless a cancel ended it already."""
    with contextlib.suppress(InvalidStateError):  # a cancel ended it meanwhile
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)


def _deliver(entry: _Direct, result: Result) -> None:
    """End a direct call's future with its attempt's result (:meth:`CallRun._end`
    does the same for a record), unless a cancel ended it already."""
    if not entry.future.done():
        _end_future(entry.future, *_value_of(entry, result))


def _settle(entry: _Direct, f: Future[Result]) -> bool:
    """End a direct call's future from its attempt's (:func:`_deliver`).

    Returns:
        True when the attempt ended without a result (withdrawn, or its worker
        died): it may have left shared-memory segments behind.
    """
    try:
        error = f.exception()
    except CancelledError:
        error = ActionFailed(f"node {entry.name!r}: its attempt was withdrawn")
    if error is not None:
        with contextlib.suppress(InvalidStateError):  # a cancel ended it already
            entry.future.set_exception(error)
        return True
    _deliver(entry, f.result())
    return False


class CallRun(_Run):
    """The runner's stream of :meth:`Runner.submit` calls; each ends its own Future.

    A plain call that finds its pool ready to take it (an idle cpu worker, or a free
    io slot) is a *direct* call (:meth:`start_direct`): the submitting thread sends it,
    and whoever gets its result (the reader of the worker's socket, or the io thread
    that ran it) ends it, with no record, no state machine and no hop to the loop at
    submit. Every other call is a :class:`NodeRecord` that the scheduler runs like a
    plan node.
    """

    def __init__(self, sched: Scheduler, run_id: str) -> None:
        self.sched = sched
        self.seq = 0
        self.run_id = run_id
        self.functions = {}  # unused: submitted calls are pickled by the caller
        self.state_bytes = None
        self.state_error = None
        self.on_event = None
        self._index = itertools.count()
        self.live: dict[NodeRecord, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        # Calls recorded for the loop, and those of them add() took: one writer each
        # (submitting threads under the runner's lock; the loop).
        self.via_loop = 0
        self.taken = 0
        # Calls handed over (submitting threads, under the runner's lock) and ended
        # (the loop, and io threads ending direct calls, under _ended_lock): equal
        # when none is in flight, readable from any thread.
        self.handed = 0
        self.ended = 0
        self._ended_lock = threading.Lock()
        # Direct calls in flight, by attempt: added by submitting threads (under the
        # runner's lock), removed once their attempt is over by whoever ends them (the
        # loop; an io thread): popping the entry is what makes one the ender.
        self.direct: dict[Attempt, _Direct] = {}

    def start_direct(
        self, spec: ActionSpec, call: Packed, arena: Arena, future: Future[Any]
    ) -> bool:
        """In the submitting thread, under the runner's lock: send a plain call straight
        to its pool; False (nothing done) when it must be a record instead.

        Plain means what needs neither the loop's timers nor its admission nor a
        record's state machine: no timeout, ``validate``, ``memory``, ``threads`` > 1,
        ``retries`` or Context. It must also find the scheduler
        admitting at once (no node of its kind waits, a slot is free, memory was
        checked), a cpu call an idle worker, and no earlier call still waiting for
        the loop, so calls never overtake each other.

        The call then costs the parent less CPU than a record does (a quarter less
        for a cpu call, W2, and ~40% for an io call: docs/performance.md): whoever gets
        the result (the loop's reader of a cpu worker's socket, the io thread) sets
        ``future`` and frees the slot (:meth:`_direct_result`); a cancel stops it
        (:meth:`stop_direct`).
        """
        sched = self.sched
        submit_if_idle = getattr(sched.pools.get(spec.kind), "submit_if_idle", None)
        if (
            submit_if_idle is None
            or self.via_loop != self.taken
            or spec.timeout is not None
            or spec.validate is not None
            or spec.threads != 1
            or spec.memory
            or spec.retries
            or spec.wants_context
            or not sched.admits_at_once(spec.kind)
        ):
            return False
        task = sched.task(self, spec, spec.name, 1, call, arena)
        entry = _Direct(spec.name, spec.kind, future, arena)
        read_result = getattr(sched.pools[spec.kind], "read_result", None)

        def before_send(handle: Attempt) -> None:  # under the pool's lock
            future.set_running_or_notify_cancel()  # not given out yet: cannot be cancelled
            self.direct[handle] = entry
            sched.direct_started[spec.kind] += 1
            self.handed += 1
            # Neither refers to the attempt itself, which holds both (the cycle would
            # wait for the cyclic GC: Scheduler._to_running). A result goes straight to
            # _direct_result; the future only fails (the worker died) or is cancelled.
            ref = weakref.ref(handle)
            handle.on_result = partial(self._direct_result, ref)
            handle.future.add_done_callback(partial(self._direct_done, ref))
            if read_result is not None and isinstance(future, CallFuture):
                future._read_here = (read_result, ref)

        return submit_if_idle(task, None, before_send, spec.is_async) is not None

    def _direct_entry(self, ref: weakref.ref[Attempt]) -> tuple[Attempt, _Direct] | None:
        """The attempt behind ``ref`` and its call, if the call is still in flight."""
        handle = ref()  # alive while self.direct holds it
        entry = None if handle is None else self.direct.get(handle)
        return None if handle is None or entry is None else (handle, entry)

    def _direct_result(self, ref: weakref.ref[Attempt], result: Result) -> None:
        """A direct call's result (the attempt's ``on_result``): free its slot, then end
        its future. Called by the reader of a cpu worker's socket (the loop, or the
        caller's thread in ``result()``), or by the io thread that ran the call."""
        found = self._direct_entry(ref)
        if found is None:
            return  # cancelled, and its slot freed already (an io call: stop_direct)
        handle, entry = found
        if entry.future.done():  # a cancel ended it; its attempt's future is waited on
            handle.future.set_result(result)  # (and _direct_done ends the call)
            return
        # Ended here: on the loop, in the caller's thread (read_result) or in the io
        # thread that ran it. Off the loop there is no hop to it (it wakes only if a
        # node waits for the slot: Scheduler.direct_ended_at).
        # The value is read before the arena closes; the slot is given back, and a
        # call waiting for it sent, before the caller is woken.
        if self.direct.pop(handle, None) is None:
            return  # stop_direct ended it meanwhile
        value, error = _value_of(entry, result)
        self._release(entry, False)
        _end_future(entry.future, value, error)

    def _direct_done(self, ref: weakref.ref[Attempt], f: Future[Result]) -> None:
        """A direct call's attempt failed or was withdrawn (in the thread that learnt it:
        normally the loop's reader of the worker's socket): end its future, then free
        its slot."""
        found = self._direct_entry(ref)
        if found is None:
            return
        handle, entry = found
        orphans = _settle(entry, f)
        if asyncio._get_running_loop() is self.sched.loop:
            self._direct_end(handle, orphans)
        else:
            with contextlib.suppress(RuntimeError):  # a closed loop: the runner is gone
                self.sched.from_thread(self._direct_end, handle, orphans)

    def _direct_end(self, handle: Attempt, orphans: bool) -> None:
        """On the loop: a direct call's attempt is over (or abandoned); its arena and
        slot go."""
        entry = self.direct.pop(handle, None)
        if entry is not None:
            self._release(entry, orphans)

    def _release(self, entry: _Direct, orphans: bool) -> None:
        """A direct call that this thread took out of :attr:`direct` is over: close its
        arena, count it ended and give its slot back (from any thread)."""
        if orphans:  # it may have made segments, then died
            entry.arena.orphans_possible = True
        entry.arena.close()
        with self._ended_lock:
            self.ended += 1
        self.sched.direct_ended_at(entry.kind)

    def stop_direct(self, why: str, futures: set[Future[Any]] | None = None) -> list[Future[Any]]:
        """On the loop: cancel the direct calls in flight (those of ``futures`` only,
        if given): each future fails with ``CancelledError`` now. A cpu call's worker
        is killed; an io call's thread, which cannot be (and, a direct call taking no
        Context, cannot be told to stop either), is abandoned and its slot is free at
        once, as for a record (:meth:`Scheduler._io_timeout`). Returns the killed cpu
        attempts' futures, done once their workers are gone."""
        killed: list[Future[Any]] = []
        for handle, entry in list(self.direct.items()):
            if entry.future.done() or (futures is not None and entry.future not in futures):
                continue
            with contextlib.suppress(InvalidStateError):
                entry.future.set_exception(CancelledError(f"node {entry.name!r} cancelled: {why}"))
            handle.cancel("cancel")
            if entry.kind == "cpu":
                killed.append(handle.future)
            else:  # a thread cannot be killed: it no longer counts
                self._direct_end(handle, False)
        return killed

    def record(
        self, spec: ActionSpec, call: Packed, arena: Arena, future: Future[Any]
    ) -> NodeRecord:
        """A new call's record (in the submitting thread, under the runner's lock);
        queue :meth:`add` on the loop next, which takes it over.

        ``call`` is ``(spec, args, kwargs)`` already pickled by the submitting thread;
        ``future`` gets the call's value or error.
        """
        self.via_loop += 1
        self.handed += 1
        rec = NodeRecord(self, next(self._index), spec.name, spec, None, arena)
        rec.call = call
        rec.user_future = future
        return rec

    def add(self, rec: NodeRecord, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Take over a call from :meth:`record` (on the loop thread) and queue it.

        ``args`` and ``kwargs`` are kept only for the action's ``validate``.
        """
        self.live[rec] = (args, kwargs) if rec.spec.validate is not None else ((), {})
        self.taken += 1
        self.sched.transition(rec, NodeState.READY, now=True)
        self.sched.dispatch_now()  # a lone call need not wait for the next loop turn

    def live_records(self) -> list[NodeRecord]:
        return list(self.live)

    def cancel(self, why: str) -> None:
        super().cancel(why)
        self.cancelled = False  # the stream of calls goes on after a cancel

    def may_start(self, rec: NodeRecord) -> bool:
        assert rec.user_future is not None
        # A future the caller cancelled while it waited ends here, never runs.
        return rec.attempts > 0 or rec.user_future.set_running_or_notify_cancel()

    def arguments(self, rec: NodeRecord) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return self.live[rec]

    def node_finished(self, rec: NodeRecord) -> None:
        try:
            self._end(rec)
        finally:
            with self._ended_lock:
                self.ended += 1

    def _end(self, rec: NodeRecord) -> None:
        self.live.pop(rec, None)
        rec.arena.close_when_idle()
        fut = rec.user_future
        assert fut is not None
        if fut.done():  # cancelled before it started
            return
        if rec.state is NodeState.SUCCEEDED:
            fut.set_result(rec.value)
        elif rec.state is NodeState.CANCELLED and not fut.running():
            fut.cancel()
            fut.set_running_or_notify_cancel()
        elif rec.state is NodeState.CANCELLED:
            fut.set_exception(CancelledError(str(rec.error)))
        else:
            fut.set_exception(rec.error or ActionFailed(f"call {rec.name!r} {rec.state.value}"))


def _outcome(rec: NodeRecord) -> Outcome:
    assert rec.node is not None
    status = Status(rec.state.value)
    duration = None
    if rec.started_at is not None and rec.finished_at is not None:
        duration = max(0.0, rec.finished_at - rec.started_at)
    return Outcome(
        node=rec.node,
        name=rec.name,
        status=status,
        value=rec.value if status is Status.SUCCEEDED else None,
        error=rec.error,
        traceback=rec.traceback,
        attempts=rec.attempts,
        started_at=rec.started_at,
        finished_at=rec.finished_at,
        duration_s=duration,
        pool=rec.pool,
        worker=rec.worker,
    )


def run_status(
    outcomes: list[Outcome], failed_fast: bool = False, cancelled: bool = False
) -> RunStatus:
    """The :class:`RunStatus` of a run from its outcomes."""
    if cancelled:
        return RunStatus.CANCELLED
    ok = sum(o.status is Status.SUCCEEDED for o in outcomes)
    if ok == len(outcomes):
        return RunStatus.SUCCEEDED
    if failed_fast or ok == 0:
        return RunStatus.FAILED
    return RunStatus.PARTIAL


def check_failure_policy(failure: str) -> None:
    """Raise :class:`PlanError` unless ``failure`` is ``"collect"`` or ``"fail_fast"``."""
    if failure not in ("collect", "fail_fast"):
        raise PlanError(f"failure must be 'collect' or 'fail_fast', got {failure!r}")
