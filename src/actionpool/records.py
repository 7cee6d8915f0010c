"""The records the scheduler keeps: a node's state and the facts of its attempts.

No rule about a node's life lives here (those are in :mod:`actionpool.scheduler`): only
the names of its states and the record itself, so that the modules around the
scheduler (admission, plan runs, calls) can name them without importing its rules.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from enum import Enum
from typing import TYPE_CHECKING, Any

from .action import ActionSpec
from .errors import SerializationError
from .events import Event
from .plan import Node
from .shm import Arena
from .transfer import Packed

if TYPE_CHECKING:
    from .pools import Attempt
    from .scheduler import Scheduler

__all__ = ["NodeRecord", "NodeState", "RunBase"]


class NodeState(Enum):
    """Where a node is in its lifecycle (see the module docstring's diagram)."""

    # Identity hashing: Enum's own __hash__ is Python code, and every transition
    # hashes states (a measurable share of a large plan's dispatch).
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
    IN_DOUBT = "in_doubt"  # resumed: started, never ended, not idempotent


class NodeRecord:
    """The scheduler's record of one node during one run.

    Besides ``state``, a record carries facts about its current attempt, not hidden
    states: ``stop_reason`` (why the scheduler stopped it: ``"timeout"``,
    ``"cancel"``), ``early`` (a call's value went to its future before the outcome was
    recorded), ``lost`` (cancelled because a race or quorum was decided without it),
    ``resubmits`` (times its worker died before starting the current attempt),
    ``loaded`` (a resumed run took its end from the journal: it did not run).
    """

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
        "history",
        "index",
        "join_losses",
        "join_wins",
        "key",
        "loaded",
        "lost",
        "name",
        "node",
        "pool",
        "resubmits",
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
        run: RunBase,
        index: int,
        name: str,
        spec: ActionSpec,
        node: Node | None,
        arena: Arena | None = None,
    ) -> None:
        self.run = run
        self.early = False
        self.index = index
        self.name = name
        self.spec = spec
        self.node = node
        self.key = (run.seq, index)
        self.state = NodeState.PENDING
        self.deps_left = 0
        self.attempts = 0
        self.resubmits = 0
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
        self.stop_reason = ""
        self.lost = False
        self.loaded = False  # its end was loaded from a journal (a resumed run)
        self.join_wins: list[NodeRecord] = []
        self.join_losses = 0
        # the attempts before the current one that ran and failed, each
        # (started_at, finished_at, pool, worker, status, error): for reports and traces
        self.history: list[tuple[Any, ...]] | None = None

    def __lt__(self, other: NodeRecord) -> bool:  # run, then plan order
        return self.key < other.key

    def __repr__(self) -> str:
        return f"<NodeRecord {self.name!r} {self.state.value}>"


class RunBase:
    """What the scheduler needs of a run (a plan run or the runner's stream of calls)."""

    sched: Scheduler
    seq: int
    run_id: str
    arena: Arena
    state_bytes: Packed | None
    state_error: SerializationError | None
    on_event: Callable[[Event], Any] | None
    cancelled: bool = False
    cancel_reason: str = ""
    # whether its attempts are nodes, whose output is tagged with their name (a plan
    # run's), or calls, whose output stays as it is, as an Executor's workers' does
    tags_output: bool = True
    max_parallel: int | None = None  # attempts of this run in flight at once, at most
    running: int = 0  # attempts of this run in flight now (the scheduler counts them)
    journal: Any = None  # a plan run's journal (actionpool.journal.Journal), or None
    functions: dict[ActionSpec, bytes]  # each action's pickled function, for this run

    def arguments(self, rec: NodeRecord) -> tuple[tuple[Any, ...], dict[str, Any]]:
        raise NotImplementedError

    def may_start(self, rec: NodeRecord) -> bool:
        return not self.cancelled

    def note_recycled(self, rec: NodeRecord, data: dict[str, Any]) -> None:
        """The worker that ran ``rec``'s attempt was replaced after it (recycling)."""

    def journal_ended(self, rec: NodeRecord) -> None:
        """Record ``rec``'s end in this run's journal (a run with a journal only)."""

    def has_room(self) -> bool:
        """Whether another attempt of this run may start now (``max_parallel``)."""
        return self.max_parallel is None or self.running < self.max_parallel

    def state_for_validate(self) -> Any:
        """A private copy of the state for a ``validate`` callable."""
        return self.arena.loads(self.state_bytes) if self.state_bytes is not None else {}

    def node_finished(self, rec: NodeRecord) -> None:
        raise NotImplementedError

    def live_records(self) -> list[NodeRecord]:
        raise NotImplementedError

    def cancel(self, why: str) -> None:
        """End every node of this run that has not ended ``CANCELLED``."""
        self.cancelled = True
        self.cancel_reason = why
        for rec in self.live_records():
            self.sched.cancel_node(rec, why)
