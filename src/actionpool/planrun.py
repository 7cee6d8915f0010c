"""One execution of a :class:`~actionpool.Plan`: graph bookkeeping, joins, fan-in.

Data flow::

    Runner.run(plan) ─► PlanRun.start ─(nodes without dependencies)─► Scheduler
    Scheduler ─node_finished(rec)─► PlanRun._propagate ─► dependents: READY (all
        dependencies succeeded) | SKIPPED (one did not) | CANCELLED (the run was);
        race/quorum nodes decided; fail_fast cancels the rest
    last node ended ─► PlanRun._finish ─► outcomes + merged state ─► Report (run.done)

A plan run never changes a node's state itself: it asks the scheduler for each move
(:meth:`Scheduler.transition <actionpool.scheduler.Scheduler.transition>`), so the
rules of a node's life stay in :mod:`actionpool.scheduler`. Everything here runs on
the scheduler's loop thread.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import ActionFailed, PlanError, SerializationError, StateConflict
from .events import Event
from .outcome import AttemptRecord, Outcome, Report, RunStatus, Status
from .plan import Graph, Node, resolve
from .scheduler import TERMINAL, NodeRecord, NodeState, RunBase, Scheduler
from .shm import Arena
from .state import merge_state
from .transfer import Packed

if TYPE_CHECKING:
    from .journal import Journal, Resume

__all__ = ["PlanRun", "check_failure_policy", "check_max_parallel", "run_status"]


_FAILED = frozenset((NodeState.FAILED, NodeState.TIMED_OUT, NodeState.CRASHED, NodeState.IN_DOUBT))
"""The ends that make a ``fail_fast`` run stop."""


class PlanRun(RunBase):
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
        max_parallel: int | None = None,
        journal: Journal | None = None,
        reconciled: Mapping[str, str | BaseException] | None = None,
    ) -> None:
        self.sched = sched
        self.max_parallel = max_parallel
        self.journal = journal
        # what reconcile said of in-doubt nodes: "done", "retry", or what it raised
        self.reconciled = dict(reconciled or {})
        # nodes a resumed run settles at its start (loaded, in doubt, lost): no
        # upstream's end may make them ready
        self._settled: set[int] = set()
        self.journal_error: BaseException | None = None
        self.recycled: list[dict[str, Any]] = []  # workers replaced after its attempts
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
        """Mark the nodes without dependencies ready (call on the loop thread); on a
        resume, first settle what the journal knows (:meth:`_resume`)."""
        if not self.recs:
            self._finish()
            return
        if self.journal is not None and self.journal.resume.session > 0:
            self._resume(self.journal.resume)
        for rec in self.recs:
            if rec.deps_left == 0 and rec.state is NodeState.PENDING:
                if rec.node is not None and rec.node.join is not None:
                    self._decide_join(rec)  # a race of nothing
                else:
                    self.sched.transition(rec, NodeState.READY)

    def _resume(self, resume: Resume) -> None:
        """Settle, in dependency order, the nodes whose fate the journal decides: load
        the succeeded ones, end lost race/quorum inputs ``CANCELLED`` again, and end
        ``IN_DOUBT`` the non-idempotent ones that started and never ended (unless
        ``reconcile`` said ``"done"``, or ``"retry"``: then they run like the rest)."""
        settle: list[tuple[NodeRecord, str]] = []
        for i in self.graph.order:
            rec = self.recs[i]
            name = rec.name
            if name in resume.done:
                settle.append((rec, "done"))
            elif name in resume.lost:
                settle.append((rec, "lost"))
            elif name in resume.in_doubt and not rec.spec.idempotent:
                said = self.reconciled.get(name)
                if said == "done":
                    settle.append((rec, "reconciled"))
                elif said != "retry":
                    settle.append((rec, "in_doubt"))
        self._settled = {rec.index for rec, _ in settle}
        for rec, how in settle:
            if rec.state is not NodeState.PENDING:
                continue  # cancelled meanwhile
            name = rec.name
            if how == "done":
                end = resume.done[name]
                rec.value, rec.deltas = end["value"], end["deltas"]
                rec.attempts = end["attempts"]
                rec.started_at, rec.pool, rec.worker = end["started_at"], end["pool"], end["worker"]
                rec.loaded = True
                self.sched.transition(rec, NodeState.SUCCEEDED)
                rec.finished_at = end["finished_at"]
            elif how == "reconciled":
                rec.value = None
                self.sched.transition(rec, NodeState.SUCCEEDED)
            elif how == "lost":
                rec.lost = True
                rec.loaded = True
                text = resume.lost[name].removeprefix("ActionFailed: ")
                self.sched.transition(rec, NodeState.CANCELLED, error=ActionFailed(text))
            else:
                err = _in_doubt(name, resume.in_doubt[name], self.reconciled.get(name))
                self.sched.transition(rec, NodeState.IN_DOUBT, error=err)

    def journal_ended(self, rec: NodeRecord) -> None:
        """Commit ``rec``'s end to the journal (not for an end loaded from it). A journal
        that cannot be written stops the run: no node starts that it could not record."""
        if rec.loaded or self.journal is None or self.journal_error is not None:
            return
        try:
            self.journal.ended(rec)
        except Exception as exc:  # noqa: BLE001 - the outcome stays; the run stops
            self.journal_error = exc
            self.sched.loop.call_soon(self.cancel, f"its journal failed: {exc}")

    def may_start(self, rec: NodeRecord) -> bool:
        return not self.cancelled and self.journal_error is None

    def note_recycled(self, rec: NodeRecord, data: dict[str, Any]) -> None:
        self.recycled.append({"node": rec.name, **data})

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
            if dep.state is not NodeState.PENDING or j in self._settled:
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
        failed = rec.state in _FAILED
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
        # The records refer to this run and it to them: a cycle that only the cyclic GC's
        # rarest pass would free, keeping every value of a large plan alive (and the
        # parent's memory growing run after run) long after the report was handed out.
        recs, self.recs = self.recs, []
        deltas = [
            (i, recs[i].name, recs[i].deltas)
            for i in self.graph.order
            if recs[i].deltas and recs[i].state is NodeState.SUCCEEDED
        ]
        counted = [o for o, rec in zip(outcomes, recs, strict=True) if not rec.lost]
        status = run_status(counted, self.failed_fast, self.cancelled)
        try:
            state = merge_state(self.initial_state, deltas, self.graph.ancestors, self.reducers)  # type: ignore[arg-type]
        except (StateConflict, TypeError) as exc:
            report = Report(
                outcomes,
                self.initial_state,
                status,
                self.run_id,
                self.started_at,
                time.time(),
                self.recycled,
            )
            setattr(exc, "report", report)  # noqa: B010 - no result is lost
            self.done.set_exception(exc)
            return
        self.done.set_result(
            Report(
                outcomes, state, status, self.run_id, self.started_at, time.time(), self.recycled
            )
        )


def _in_doubt(name: str, attempt: int, said: str | BaseException | None) -> ActionFailed:
    """The error of a node left ``IN_DOUBT``, saying what its ``reconcile`` did."""
    why = (
        f"node {name!r} is in doubt: attempt {attempt} started in an earlier session of"
        " this run and never ended, and its action is not idempotent, so it was not run"
        " again"
    )
    if isinstance(said, BaseException):
        why += f" (its reconcile raised {type(said).__name__}: {said})"
    elif said is not None:
        why += f" (its reconcile answered {said!r}, not 'done' or 'retry')"
    else:
        why += " (declare reconcile= on the action to decide)"
    err = ActionFailed(why)
    if isinstance(said, BaseException):
        err.__cause__ = said
    return err


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
        history=tuple(AttemptRecord(*a) for a in rec.history) if rec.history else (),
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


def check_max_parallel(max_parallel: Any) -> None:
    """Raise :class:`PlanError` unless ``max_parallel`` is None or an int >= 1."""
    if max_parallel is not None and (
        isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1
    ):
        raise PlanError(f"max_parallel must be an int >= 1 or None, got {max_parallel!r}")


def check_failure_policy(failure: str) -> None:
    """Raise :class:`PlanError` unless ``failure`` is ``"collect"`` or ``"fail_fast"``."""
    if failure not in ("collect", "fail_fast"):
        raise PlanError(f"failure must be 'collect' or 'fail_fast', got {failure!r}")
