"""Admission: which ready node may start now (docs/architecture.md, "The node lifecycle").

Data flow::

    Scheduler ─push(rec)─► ready heaps (one per pool, run then plan order)
    Scheduler._dispatch_ready ◄─ may_take(rec) ◄─ free slots per pool, memory budget,
                                                  backpressure (available memory, cgroup-aware)
    CallRun.start_direct ─admits_at_once(kind)─┘   (a direct call: from its own thread)
    direct calls ─direct_started / direct_ended─► slots they hold without a record

A node is admitted when a slot per declared ``threads`` is free in its pool and its
declared ``memory`` fits in what is left of the memory budget; smaller nodes may pass a
node that does not fit yet (backfilling). While available memory is below
``memory_floor`` nothing is admitted (backpressure).

Concurrency contract. Everything here is owned by the scheduler's loop thread, except:

* ``admits_at_once`` is read from submitting threads without a lock: a stale answer errs
  by one loop turn (the call then goes the loop's way), never past the pool's size,
  because the pool itself refuses a call when no worker is idle;
* ``direct_started[kind]`` is written by submitting threads under the runner's lock;
* ``direct_ended[kind]`` is written by any thread that ends a direct call, under
  ``CallRun``'s lock (:mod:`actionpool.calls`), its only writer;
* ``wants_slot[kind]`` is raised by the loop *before* it reads the slot counts, and an
  io thread that ends a direct call counts its slot *before* it reads the flag, so
  either the loop sees the slot or the thread sees the flag and wakes the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .records import NodeState
from .sizing import available_memory

if TYPE_CHECKING:
    from .action import ActionSpec
    from .records import NodeRecord

__all__ = ["MEM_RECHECK_S", "Admission"]

MEM_RECHECK_S = 0.05
"""Seconds between two reads of available memory while dispatching: reading
``/proc/meminfo`` for every node would cost a large plan more than its dispatch."""


class Admission:
    """Slots, memory and ready queues of every pool of one runner.

    Args:
        loop: the scheduler's loop.
        sizes: ``{pool kind: slots}``.
        memory_budget: bytes that running nodes' declared ``memory`` may add up to.
        memory_floor: bytes of available memory below which nothing is admitted.
        available: bytes of available memory just read by the caller (its sizing), or
            None; above ``memory_floor``, it counts as the first check.
        start: ``start(rec)`` starts a READY node that fits (the scheduler's).
        pressure: ``pressure(runs, low, {"available", "floor"})`` tells the runs with
            nodes waiting that dispatch paused (``low``) or resumed.
        from_thread: the scheduler's way to run a function on the loop from any thread.
        flushes: ``{pool kind: flush}`` for pools that hold submitted attempts back to
            send them together (the Dask pool's batches): called after each dispatch
            pass that started a node of that kind.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sizes: Mapping[str, int],
        memory_budget: int,
        memory_floor: int,
        available: int | None,
        start: Callable[[NodeRecord], None],
        pressure: Callable[[set[Any], bool, dict[str, int]], None],
        from_thread: Callable[..., None],
        flushes: Mapping[str, Callable[[], None]] | None = None,
    ) -> None:
        self.loop = loop
        self._flushes = dict(flushes or {})
        self._start = start
        self._pressure = pressure
        self._from_thread = from_thread
        self._dispatch_pending = False
        self._dispatching = False  # dispatch_now is on the stack
        self.memory_floor = memory_floor
        self.mem_free = memory_budget
        self.paused = False
        self.mem_checked = 0.0
        if available is not None and available >= memory_floor:
            self.mem_checked = time.monotonic()  # a runner's first call need not wait
        # Per pool, a heap of (rec.key, rec): the keys are unique, so ordering compares
        # int tuples in C and never calls the records' __lt__.
        self.ready: dict[str, list[tuple[tuple[int, int], NodeRecord]]] = {k: [] for k in sizes}
        self.free: dict[str, int] = dict(sizes)
        self.direct_started: dict[str, int] = dict.fromkeys(sizes, 0)
        self.direct_ended: dict[str, int] = dict.fromkeys(sizes, 0)
        self.wants_slot: dict[str, bool] = dict.fromkeys(sizes, False)

    def push(self, rec: NodeRecord) -> None:
        """Queue a READY node for its pool."""
        heapq.heappush(self.ready[rec.spec.kind], (rec.key, rec))

    def waiting(self) -> bool:
        """Whether any node waits in a ready queue."""
        return any(self.ready.values())

    def free_slots(self, kind: str) -> int:
        """Slots of the ``kind`` pool that no attempt holds, direct calls included."""
        return self.free[kind] - (self.direct_started[kind] - self.direct_ended[kind])

    def fits(self, spec: ActionSpec) -> bool:
        """Whether an attempt of ``spec`` fits in the free slots and memory now."""
        return spec.threads <= self.free_slots(spec.kind) and (spec.memory or 0) <= self.mem_free

    def take(self, spec: ActionSpec) -> None:
        """An attempt of ``spec`` starts: it holds its slots and memory."""
        self.free[spec.kind] -= spec.threads
        self.mem_free -= spec.memory or 0

    def give_back(self, spec: ActionSpec) -> None:
        """An attempt of ``spec`` no longer holds its slots and memory."""
        self.free[spec.kind] += spec.threads
        self.mem_free += spec.memory or 0

    def memory_stale(self) -> bool:
        """Whether available memory should be read again before admitting more."""
        return self.memory_floor > 0 and time.monotonic() - self.mem_checked >= MEM_RECHECK_S

    def admits_at_once(self, kind: str) -> bool:
        """Whether a one-slot node of ``kind`` would be dispatched at once: no node of
        that kind waits, a slot is free, and available memory was checked recently and
        is above the floor. Read from any thread (see the module's contract).

        Available memory is read here (:func:`~actionpool.sizing.available_memory`)
        when the last reading is stale; that reading then counts as the dispatcher's
        too, so that a call submitted after a pause does not go the loop's way only to
        have memory read there.
        """
        if self.ready[kind] or self.free_slots(kind) <= 0 or self.paused:
            return False
        if self.memory_floor <= 0:
            return True
        now = time.monotonic()
        if now - self.mem_checked < MEM_RECHECK_S:
            return True
        if available_memory() < self.memory_floor:
            return False  # the dispatcher pauses, and says so to the runs
        self.mem_checked = now
        return True

    def check_memory(self) -> tuple[bool, int | None]:
        """Backpressure (loop thread): ``(low, available)`` where ``available`` is the
        reading in bytes when one was taken and the paused state changed, else None.
        Memory is read at most every :data:`MEM_RECHECK_S` seconds while not paused."""
        if self.memory_floor <= 0 and not self.paused:
            return False, None
        now = time.monotonic()
        if not self.paused and now - self.mem_checked < MEM_RECHECK_S:
            return False, None
        self.mem_checked = now
        available = available_memory()
        low = available < self.memory_floor
        changed = low != self.paused
        self.paused = low
        return low, available if changed else None

    # ---- the dispatch loop (loop thread, except direct_ended_at) ----------------------

    def direct_ended_at(self, kind: str) -> None:
        """A direct call of ``kind`` gave its slot back (from any thread; its caller
        counted it in ``direct_ended``). The loop is woken only when it must act: a
        node may wait for that slot, or available memory needs a fresh reading
        (:meth:`slot_freed`)."""
        if asyncio._get_running_loop() is self.loop:
            self.slot_freed()
        elif self.wants_slot[kind] or self.memory_stale():
            with contextlib.suppress(RuntimeError):  # a closed loop: the runner is gone
                self._from_thread(self.slot_freed)

    def slot_freed(self) -> None:
        """A direct call's slot is free: dispatch what waits for it, now, and read
        available memory if the last reading is stale, so that the next direct call
        finds a fresh one rather than read it in the caller's thread."""
        if self.memory_stale():
            self.memory_low()
        if self.waiting():
            self.dispatch_now()

    def schedule_dispatch(self) -> None:
        """Dispatch on the next loop iteration (coalesces bursts of finished nodes)."""
        if not self._dispatch_pending:
            self._dispatch_pending = True
            self.loop.call_soon(self._dispatch)

    def dispatch_now(self) -> None:
        """Dispatch now what is ready: saves a loop turn for a lone call
        (:meth:`CallRun.add <actionpool.calls.CallRun.add>`), and for the node that
        waits for a worker whose result was just read (a loop turn lets go of the GIL,
        which the caller woken by that result would then hold while the worker waits).

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

    def _dispatch_ready(self) -> None:
        if not self.waiting() or self.memory_low():
            return
        ready_state, start = NodeState.READY, self._start
        for kind, heap in self.ready.items():
            if not heap:
                continue
            self.wants_slot[kind] = True  # before the slots are read: see the module's contract
            waiting: list[tuple[tuple[int, int], NodeRecord]] = []  # too big for now
            started = False
            while heap and self.free_slots(kind) > 0:
                entry = heapq.heappop(heap)
                rec = entry[1]
                if rec.state is not ready_state:
                    continue  # cancelled while it waited
                if not self.fits(rec.spec) or not rec.run.has_room():
                    waiting.append(entry)
                    continue
                start(rec)
                started = True
            for entry in waiting:
                heapq.heappush(heap, entry)
            self.wants_slot[kind] = bool(heap)
            if started and kind in self._flushes:
                self._flushes[kind]()

    def memory_low(self) -> bool:
        """Backpressure: True (and a recheck scheduled) while available memory is below
        the floor; ``paused`` and ``resumed`` events tell the runs that wait."""
        low, available = self.check_memory()
        if available is not None:  # it changed
            data = {"available": available, "floor": self.memory_floor}
            runs = {rec.run for heap in self.ready.values() for _, rec in heap}
            self._pressure(runs, low, data)
        if low:  # memory gives no notification: look again in a while
            self.loop.call_later(0.1, self.schedule_dispatch)
        return low
