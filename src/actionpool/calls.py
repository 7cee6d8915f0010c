"""The runner's submitted calls: :meth:`Runner.submit <actionpool.Runner.submit>` and
everything built on it (``map``).

Data flow::

    Runner.submit ─► CallRun.start_direct ─(plain call, pool idle)─► pool.submit_if_idle
        │                                  result ─► CallRun._direct_result ─► Future
        └─(otherwise)─► CallRun.record ─► loop: CallRun.add ─► Scheduler (a NodeRecord,
                                          like a plan node) ─► CallRun.node_finished ─► Future

A *direct* call has no record and makes no transitions: the submitting thread sends it,
and whoever gets its result ends it. Every other call is a
:class:`~actionpool.scheduler.NodeRecord` that the scheduler runs like a plan node.

Concurrency contract:

* ``start_direct`` and ``record`` run in submitting threads, under the runner's lock
  (so calls keep their order); ``add``, ``stop_direct`` and ``node_finished`` on the
  scheduler's loop thread;
* a direct call's result arrives on the loop (the reader of a cpu worker's socket), in
  the thread waiting in its future's ``result()`` (which reads the reply itself), or in
  the io thread that ran it; its death or withdrawal on the loop;
* ``direct`` (attempt -> call) says which direct calls are in flight, each with its
  :class:`CallState`; every move of a state is made under ``_moves``, so that of a
  result, a death and a cancel racing from three threads exactly one ends the call
  (:meth:`CallRun._end_direct`, the one place that does); ``ended`` and the
  admission's ``direct_ended`` are counted under ``_moves`` too.

Locks, in the order they may be taken: the runner's lock, then a pool's lock (inside
``submit_if_idle``), then ``_moves`` (in ``before_send``), a leaf otherwise. No lock
is held while a future is set or a pool is asked to cancel.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import weakref
from concurrent.futures import CancelledError, Future, InvalidStateError
from enum import Enum
from functools import partial
from typing import TYPE_CHECKING, Any

from ._worker import Result
from .action import ActionSpec
from .errors import ActionFailed
from .pools import NotStarted
from .records import NodeRecord, NodeState, RunBase
from .scheduler import MAX_STARTUP_DEATHS, Scheduler, action_error, unpickling_failed
from .shm import Arena
from .transfer import Packed

if TYPE_CHECKING:
    from .pools import Attempt

__all__ = ["CallFuture", "CallRun"]


class CallFuture(Future[Any]):
    """The :class:`concurrent.futures.Future` of a :meth:`Runner.submit` call.

    It is one in every way; what differs is where a direct call's result may be read
    (:meth:`CallRun.start_direct`). A thread that calls :meth:`result` or
    :meth:`exception` while the call runs first asks the attempt to deliver its result
    in this thread (:meth:`Attempt.wait_here <actionpool.pools.Attempt.wait_here>`):
    a pool that can (the process pool reads the worker's reply itself) saves the
    scheduler's loop a wake-up and the caller a hand-off; one that cannot returns at
    once. Whenever that thread gives up (its timeout, the worker's death), the loop
    reads the result as for every other call.
    """

    def __init__(self) -> None:
        super().__init__()
        # a weak reference to the direct call's attempt: set before it is sent
        self._attempt: weakref.ref[Any] | None = None

    def notify_if_cancelled(self) -> None:
        """Tell waiters (``concurrent.futures.wait``, ``as_completed``) about a cancel by
        the caller that no dispatch has reported: an executor must, or they wait for
        ever (``Future.set_running_or_notify_cancel``)."""
        with self._condition:
            if self._state == "CANCELLED":  # not yet CANCELLED_AND_NOTIFIED
                self.set_running_or_notify_cancel()

    def result(self, timeout: float | None = None) -> Any:
        if self._attempt is not None:
            timeout = self._wait_here(timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._attempt is not None:
            timeout = self._wait_here(timeout)
        return super().exception(timeout)

    def _wait_here(self, timeout: float | None) -> float | None:
        """Let the attempt deliver its result in this thread if it can; the timeout left."""
        ref = self._attempt
        handle = None if ref is None else ref()
        if handle is None or self.done():
            return timeout
        if timeout is None:
            handle.wait_here(None)
            return None
        end = time.monotonic() + timeout
        handle.wait_here(timeout)
        return max(0.0, end - time.monotonic())


class CallState(Enum):
    """Where a direct call is (:meth:`CallRun.start_direct`). A direct call has no
    record and no node state; its life is this small machine, every move of which is
    made under ``CallRun._moves`` so that a result, a death and a cancel racing each
    other from three threads agree on one winner::

        RUNNING ──result / death──────────────────────────► ENDED
           │  └──death before it started ─► (a record, sent again by the scheduler)
           └──cancel──► STOPPING (its worker being killed) ──its end reported──► ENDED
                   └── (a pool that abandons instead: at once) ──────────────► ENDED
    """

    RUNNING = "running"  # sent to its pool; it holds a slot; its future is running
    STOPPING = "stopping"  # cancelled (its future says so); its slot is held until
    # its pool reports the attempt's end (the worker killed, or a last result)
    ENDED = "ended"  # its slot is free and its arena closed (or handed to a record)


class _Direct:
    """A call that its submitting thread sent straight to its pool."""

    __slots__ = ("arena", "call", "future", "spec", "state")

    def __init__(self, spec: ActionSpec, call: Packed, future: Future[Any], arena: Arena) -> None:
        self.spec = spec
        self.call = call
        self.future = future
        self.arena = arena
        self.state = CallState.RUNNING


def _value_of(entry: _Direct, result: Result) -> tuple[Any, BaseException | None]:
    """A direct call's value, or the error its future gets instead, from its attempt's
    result, as a record's outcome would have it (:meth:`Scheduler._on_result`)."""
    if not result.ok:
        return None, action_error(result)
    try:
        return (entry.arena.loads(result.value) if result.value is not None else None), None
    except BaseException as err:  # noqa: BLE001 - even SystemExit: the reader goes on
        return None, unpickling_failed(entry.spec.name, err)


def _end_future(fut: Future[Any], value: Any, error: BaseException | None) -> None:
    """Set ``fut`` (from any thread), unless a cancel ended it already."""
    with contextlib.suppress(InvalidStateError):  # a cancel ended it meanwhile
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)


class CallRun(RunBase):
    tags_output = False  # submit and map calls print as an Executor's workers do

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
        # (the loop, and io threads ending direct calls, under _moves): equal
        # when none is in flight, readable from any thread.
        self.handed = 0
        self.ended = 0
        # Direct calls in flight, by attempt: added by submitting threads (under the
        # runner's lock and a pool's), moved and removed under _moves (CallState).
        self.direct: dict[Attempt, _Direct] = {}
        self._moves = threading.Lock()

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

        The call then costs the parent less CPU than a record does (no record, no
        hop to the loop): whoever gets the result (the loop's reader of a cpu
        worker's socket, the io thread) sets ``future`` and frees the slot
        (:meth:`_direct_result`); a cancel stops it (:meth:`stop_direct`).
        """
        sched = self.sched
        if (
            self.via_loop != self.taken
            or spec.timeout is not None
            or spec.validate is not None
            or spec.threads != 1
            or spec.memory
            or spec.retries
            or spec.wants_context
            or not sched.admission.admits_at_once(spec.kind)
        ):
            return False
        task = sched.task(self, spec, spec.name, 1, call, arena)
        entry = _Direct(spec, call, future, arena)
        direct_started = sched.admission.direct_started

        def before_send(handle: Attempt) -> None:  # under the pool's lock
            future.set_running_or_notify_cancel()  # not given out yet: cannot be cancelled
            with self._moves:
                self.direct[handle] = entry
            direct_started[spec.kind] += 1
            self.handed += 1
            # Neither refers to the attempt itself, which holds both (the cycle would
            # wait for the cyclic GC: Scheduler._to_running). A result goes straight to
            # _direct_result; the future only fails (the worker died) or is cancelled.
            ref = weakref.ref(handle)
            handle.on_result = partial(self._direct_result, ref)
            handle.future.add_done_callback(partial(self._direct_done, ref))
            if isinstance(future, CallFuture):
                future._attempt = ref

        pool = sched.pools[spec.kind]
        return pool.submit_if_idle(task, None, before_send, spec.is_async) is not None

    def _move(self, handle: Attempt, frm: CallState, to: CallState) -> _Direct | None:
        """Move the direct call of ``handle`` from ``frm`` to ``to`` (any thread); its
        entry if this thread made the move, None if the call was not in ``frm`` (another
        thread won). :meth:`_end_direct` then takes an ENDED call out of :attr:`direct`."""
        with self._moves:
            entry = self.direct.get(handle)
            if entry is None or entry.state is not frm:
                return None
            entry.state = to
            return entry

    def _end_direct(
        self, handle: Attempt, entry: _Direct, orphans: bool, close: bool = True
    ) -> None:
        """The one place where a direct call ends, after its move to ENDED (any thread):
        its arena closes (unless a record takes it over), it counts as ended, its slot
        is given back (waking the loop only if a node waits for it), and only then it
        leaves :attr:`direct`, so that whoever sees it gone sees all of that done."""
        kind = entry.spec.kind
        if close:
            if orphans:  # it may have made segments, then died
                entry.arena.orphans_possible = True
            entry.arena.close()
        admission = self.sched.admission
        with self._moves:
            self.ended += close
            admission.direct_ended[kind] += 1
        admission.direct_ended_at(kind)
        with self._moves:
            del self.direct[handle]

    def _direct_result(self, ref: weakref.ref[Attempt], result: Result) -> None:
        """A direct call's result (its attempt's ``on_result``): called by the reader of
        a cpu worker's socket (the loop, or the caller's thread in ``result()``), or by
        the io thread that ran the call. RUNNING -> ENDED: the value is read before the
        arena closes, and the slot given back (a call waiting for it sent) before the
        caller is woken."""
        handle = ref()  # alive while self.direct holds it
        if handle is None:
            return
        entry = self._move(handle, CallState.RUNNING, CallState.ENDED)
        if entry is not None:
            value, error = _value_of(entry, result)
            self._end_direct(handle, entry, False)
            _end_future(entry.future, value, error)
            return
        # STOPPING: the result came before the kill; its attempt's future is what
        # stop_direct's caller waits on, and its end (_direct_done) ends the call.
        with contextlib.suppress(InvalidStateError):
            handle.future.set_result(result)

    def _direct_done(self, ref: weakref.ref[Attempt], f: Future[Result]) -> None:
        """A direct call's attempt failed, was withdrawn or was stopped (in the thread
        that learnt it, normally the loop's reader of the worker's socket)."""
        handle = ref()
        if handle is None:
            return
        try:
            error = f.exception()
        except CancelledError:
            error = ActionFailed("its attempt was withdrawn")
        if isinstance(error, NotStarted):
            with self._moves:
                entry = self.direct.get(handle)
                running = entry is not None and entry.state is CallState.RUNNING
            if running:
                # Nothing of it ran: the scheduler decides whether it runs again.
                with contextlib.suppress(RuntimeError):  # a closed loop: the runner is gone
                    self.sched.from_thread(self._not_started, handle, error)
                return
        entry = self._move(handle, CallState.STOPPING, CallState.ENDED)
        if entry is not None:  # cancelled: its future says so already
            self._end_direct(handle, entry, True)
            return
        entry = self._move(handle, CallState.RUNNING, CallState.ENDED)
        if entry is None:
            return  # a result ended it
        self._end_direct(handle, entry, error is not None)
        if error is not None:
            if isinstance(error, NotStarted):
                error = error.crash
            _end_future(entry.future, None, error)
        else:  # a result set on the attempt's future, not given to on_result
            _end_future(entry.future, *_value_of(entry, f.result()))

    def _not_started(self, handle: Attempt, error: NotStarted) -> None:
        """On the loop: a direct call's worker died before it started it. Unless workers
        keep dying so, the call becomes a record that the scheduler sends again (its
        arena and counts go with it); else it ends ``CRASHED`` as a record would."""
        entry = self._move(handle, CallState.RUNNING, CallState.ENDED)
        if entry is None:  # a cancel came first: its future says so; it ends here
            entry = self._move(handle, CallState.STOPPING, CallState.ENDED)
            if entry is not None:
                self._end_direct(handle, entry, True)
            return
        if self.sched.note_not_started(entry.spec.kind) >= MAX_STARTUP_DEATHS:
            self._end_direct(handle, entry, True)
            _end_future(entry.future, None, self.sched.startup_crash(entry.spec.name, error, 1))
            return
        self._end_direct(handle, entry, True, close=False)
        rec = NodeRecord(self, next(self._index), entry.spec.name, entry.spec, None, entry.arena)
        rec.call = entry.call
        rec.user_future = entry.future
        rec.resubmits = 1
        self.live[rec] = ((), {})  # a direct call has no validate
        self.sched.transition(rec, NodeState.READY)

    def stop_direct(self, why: str, futures: set[Future[Any]] | None = None) -> list[Future[Any]]:
        """On the loop: cancel the direct calls in flight (those of ``futures`` only,
        if given): each future fails with ``CancelledError`` now. A cpu call's worker
        is killed (RUNNING -> STOPPING); an io call's thread, which cannot be (and, a
        direct call taking no Context, cannot be told to stop either), is abandoned and
        its slot is free at once (RUNNING -> ENDED), as for a record. Returns the
        futures of the attempts whose workers are being killed, done once they are
        gone."""
        killed: list[Future[Any]] = []
        for handle, entry in list(self.direct.items()):
            if futures is not None and entry.future not in futures:
                continue
            kills = self.sched.pools[entry.spec.kind].stops_by_kill
            to = CallState.STOPPING if kills else CallState.ENDED
            if self._move(handle, CallState.RUNNING, to) is None:
                continue  # it ended, or is being stopped, already
            with contextlib.suppress(InvalidStateError):
                entry.future.set_exception(
                    CancelledError(f"node {entry.spec.name!r} cancelled: {why}")
                )
            handle.cancel("cancel")
            if kills:
                killed.append(handle.future)
            else:  # a thread cannot be killed: it no longer counts
                self._end_direct(handle, entry, False)
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
        # A future the caller cancelled while it waited ends here, never runs; one
        # that runs already (an attempt, or a death before it started) goes on.
        return (
            rec.attempts > 0 or rec.resubmits > 0 or rec.user_future.set_running_or_notify_cancel()
        )

    def arguments(self, rec: NodeRecord) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return self.live[rec]

    def node_finished(self, rec: NodeRecord) -> None:
        try:
            self._end(rec)
        finally:
            with self._moves:
                self.ended += 1

    def _end(self, rec: NodeRecord) -> None:
        self.live.pop(rec, None)
        rec.arena.close_when_idle()
        fut = rec.user_future
        assert fut is not None
        # Its caller may cancel it from another thread until it runs: whoever comes
        # second finds it done, and the caller's cancel must still reach the waiters.
        with contextlib.suppress(InvalidStateError):
            if rec.state is NodeState.SUCCEEDED:
                if not rec.early:  # else its value went to it already
                    fut.set_result(rec.value)
            elif rec.state is NodeState.CANCELLED and not fut.running():
                fut.cancel()
            elif rec.state is NodeState.CANCELLED:
                fut.set_exception(CancelledError(str(rec.error)))
            else:
                fut.set_exception(rec.error or ActionFailed(f"call {rec.name!r} {rec.state.value}"))
        if isinstance(fut, CallFuture):
            fut.notify_if_cancelled()
