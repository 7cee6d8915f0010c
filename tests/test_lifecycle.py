"""The node lifecycle, move by move, against an in-memory pool: no process, no thread.

Each test drives the real :class:`~actionpool.scheduler.Scheduler` and
:class:`~actionpool.planrun.PlanRun` on an event loop that the test turns itself, with
a pool that implements the :class:`~actionpool.pools.Pool` protocol in memory: the test
says when an attempt starts, returns (the action really runs, in this thread, through
the worker's own ``execute``), raises, dies before starting, dies while running, or is
killed. Every move of :data:`~actionpool.scheduler.MOVES` has a test here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest

import actionpool as ap
from actionpool._worker import Result, Task, execute
from actionpool.events import Event
from actionpool.planrun import PlanRun
from actionpool.pools import NotStarted
from actionpool.records import NodeRecord, NodeState
from actionpool.scheduler import MOVES, TERMINAL, TRANSITIONS, Scheduler
from actionpool.shm import Arena

P, R, X = NodeState.PENDING, NodeState.READY, NodeState.RUNNING


class MemAttempt:
    """One attempt in the in-memory pool; the test drives it."""

    recycled = None  # (its worker is never replaced)

    def __init__(
        self,
        pool: MemoryPool,
        task: Task,
        on_started: Callable[[int | str, float], None] | None,
        on_event: Callable[[str, float, Any], None] | None,
    ) -> None:
        self.pool = pool
        self.task = task
        self.on_started = on_started
        self.on_event = on_event
        self.future: Future[Result] = Future()
        self.on_result: Callable[[Result], None] | None = None
        self.direct = False
        self.killed = ""
        self.released = False
        self.started_at: float | None = None
        self.worker: int | str | None = None
        self.cancel_flag = threading.Event()

    # the protocol
    def cancel(self, reason: str = "cancel") -> None:
        self.killed = self.killed or reason
        self.cancel_flag.set()
        if self.future.done():
            return
        if self.started_at is None:
            self.future.cancel()  # withdrawn: no worker had it
        elif self.pool.stops_by_kill:
            self.future.set_exception(
                ap.WorkerCrashed(f"node {self.task.node!r}: killed ({reason})", None, 9)
            )

    def wait_here(self, timeout: float | None) -> None:
        pass

    # what the test makes happen
    def start(self) -> None:
        self.started_at, self.worker = time.time(), "mem-0"
        if self.on_started is not None:
            self.on_started(self.worker, self.started_at)

    def finish(self) -> None:
        """The action runs now, in this thread, as a worker would run it."""
        if self.started_at is None:
            self.start()
        self.future.set_result(execute(self.task, self.on_event, self.cancel_flag))

    def die_before_start(self, code: int = 1) -> None:
        crash = ap.WorkerCrashed(f"its worker exited with code {code}", code, None)
        self.future.set_exception(NotStarted(crash))

    def die_running(self) -> None:
        self.future.set_exception(ap.WorkerCrashed("its worker was killed by SIGSEGV", None, 11))


class MemoryPool:
    """A pool that holds its attempts in a list until the test acts on them."""

    def __init__(self, kind: str, size: int) -> None:
        self.kind = kind
        self.size = size
        self.stops_by_kill = kind == "cpu"
        self.label = kind
        self.attempts: list[MemAttempt] = []
        self.closed = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    def submit(
        self,
        task: Task,
        is_async: bool = False,
        on_started: Callable[[int | str, float], None] | None = None,
        on_event: Callable[[str, float, Any], None] | None = None,
    ) -> MemAttempt:
        if self.closed:
            raise RuntimeError(f"the {self.kind} pool is closed")
        att = MemAttempt(self, task, on_started, on_event)
        self.attempts.append(att)
        return att

    def submit_if_idle(self, *args: Any, **kwargs: Any) -> None:
        return None

    def forget(self, prefix: str) -> None:
        pass

    def close(self, cancel: bool = False, *, reap: bool = True) -> None:
        self.closed = True

    def reap(self) -> None:
        pass

    def pids(self) -> list[int]:
        return []

    def describe(self) -> str:
        return f"{self.size} attempts in memory"

    def last(self, node: str) -> MemAttempt:
        return [a for a in self.attempts if a.task.node == node][-1]


class Harness:
    """A scheduler on a loop that this thread turns, with in-memory pools."""

    def __init__(self, cpu: int = 2, io: int = 2, grace: float = 0.05) -> None:
        self.loop = asyncio.new_event_loop()
        self.pools = {"cpu": MemoryPool("cpu", cpu), "io": MemoryPool("io", io)}
        self.sched = Scheduler(self.loop, self.pools, grace, 1 << 40, 1, 0)
        self.events: list[Event] = []
        self.arenas: list[Arena] = []
        self.records: dict[int, list[NodeRecord]] = {}

    def start(self, plan: ap.Plan, failure: str = "collect", state: Any = None) -> PlanRun:
        from actionpool.transfer import dumps_state

        arena = Arena(f"ap-test-lifecycle-{len(self.arenas)}", None)
        self.arenas.append(arena)
        graph = plan.graph()
        state_bytes = dumps_state({} if state is None else state, arena)
        run = PlanRun(
            self.sched,
            graph,
            "run",
            arena,
            state,
            state_bytes,
            None,
            failure,
            self.events.append,
            None,
        )
        # a finished run lets go of its records (PlanRun._finish): keep them to look at
        self.records[id(run)] = list(run.recs)
        run.start()
        self.turn()
        return run

    def turn(self, seconds: float = 0.0) -> None:
        """Let the loop run its callbacks (and timers due within ``seconds``)."""
        self.loop.run_until_complete(asyncio.sleep(seconds))
        for _ in range(5):
            self.loop.run_until_complete(asyncio.sleep(0))

    def rec(self, run: PlanRun, name: str) -> NodeRecord:
        return next(r for r in self.records[id(run)] if r.name == name)

    def close(self) -> None:
        for arena in self.arenas:
            arena.close()
        self.loop.close()


@pytest.fixture
def hx() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def double(x: int) -> int:
    return 2 * x


def fail(x: int) -> int:
    raise ValueError(f"bad {x}")


def kinds(h: Harness, name: str) -> list[str]:
    return [e.kind for e in h.events if e.name == name]


# ---- the table --------------------------------------------------------------------------


def test_the_table_lists_every_move_once_and_nothing_leaves_a_terminal_state() -> None:
    expected = {
        (P, R),
        (P, NodeState.SKIPPED),
        (P, NodeState.CANCELLED),
        (P, NodeState.SUCCEEDED),
        (P, NodeState.FAILED),
        (P, NodeState.IN_DOUBT),  # a resumed run: see tests/test_journal.py
        (R, X),
        (R, NodeState.SKIPPED),
        (R, NodeState.FAILED),
        (R, NodeState.CANCELLED),
        (X, R),
        (X, NodeState.SUCCEEDED),
        (X, NodeState.FAILED),
        (X, NodeState.TIMED_OUT),
        (X, NodeState.CRASHED),
        (X, NodeState.CANCELLED),
    }
    assert set(MOVES) == expected
    assert set(TRANSITIONS) | TERMINAL == set(NodeState)
    assert {s.value for s in TERMINAL} == {s.value for s in ap.Status}
    assert all(frm not in TERMINAL for frm, _ in MOVES)


def test_a_move_the_table_does_not_list_is_refused(hx: Harness) -> None:
    plan = ap.Plan()
    plan.add(double, 1, name="a")
    plan.add(double, 2, name="b", after=["a"])
    run = hx.start(plan)
    b = hx.rec(run, "b")
    assert b.state is P
    with pytest.raises(AssertionError, match="'b': illegal transition pending -> running"):
        hx.sched.transition(b, X)
    assert b.state is P  # unchanged


# ---- PENDING -> ... ------------------------------------------------------------------------


def test_pending_to_ready_when_the_last_dependency_succeeds(hx: Harness) -> None:
    plan = ap.Plan()
    a = plan.add(double, 1, name="a")
    plan.add(double, a, name="b")
    run = hx.start(plan)
    assert hx.rec(run, "b").state is P and [t.task.node for t in hx.pools["cpu"].attempts] == ["a"]
    hx.pools["cpu"].last("a").finish()
    hx.turn()
    assert hx.rec(run, "b").state is X  # ready, then dispatched at once
    hx.pools["cpu"].last("b").finish()
    hx.turn()
    report = run.done.result()
    assert report[hx.rec(run, "b").node] == 4  # a's value became b's argument


def test_pending_to_skipped_names_the_upstream(hx: Harness) -> None:
    plan = ap.Plan()
    a = plan.add(fail, 1, name="a")
    plan.add(double, a, name="b")
    run = hx.start(plan)
    hx.pools["cpu"].last("a").finish()
    hx.turn()
    b = hx.rec(run, "b")
    assert b.state is NodeState.SKIPPED
    assert "upstream node 'a' failed (ValueError: bad 1)" in str(b.error)
    assert kinds(hx, "b") == ["finished"]  # it never ran


def test_pending_and_ready_to_cancelled_when_the_run_is_cancelled() -> None:
    hx = Harness(cpu=1)
    plan = ap.Plan()
    a = plan.add(double, 1, name="a")
    plan.add(double, 2, name="waits")  # ready, but the only slot is a's
    plan.add(double, a, name="after")
    run = hx.start(plan)
    assert hx.rec(run, "waits").state is R and hx.rec(run, "after").state is P
    run.cancel("the test cancelled it")
    hx.turn()
    for name in ("waits", "after"):
        rec = hx.rec(run, name)
        assert rec.state is NodeState.CANCELLED
        assert "cancelled: the test cancelled it" in str(rec.error)
    assert hx.rec(run, "a").state is NodeState.CANCELLED
    assert hx.pools["cpu"].last("a").killed == "cancel"
    assert [t.task.node for t in hx.pools["cpu"].attempts] == ["a"]  # nothing else ran
    assert run.done.result().status is ap.RunStatus.CANCELLED
    hx.close()


def test_pending_to_succeeded_and_failed_for_race_nodes(hx: Harness) -> None:
    plan = ap.Plan()
    won = plan.race([plan.add(double, 1, name="x1"), plan.add(double, 2, name="x2")], name="won")
    lost = plan.race([plan.add(fail, 3, name="y1"), plan.add(fail, 4, name="y2")], name="lost")
    run = hx.start(plan)
    cpu = hx.pools["cpu"]
    cpu.last("x2").finish()
    hx.turn()
    assert hx.rec(run, "won").state is NodeState.SUCCEEDED and hx.rec(run, "won").value == 4
    assert hx.rec(run, "x1").state is NodeState.CANCELLED and cpu.last("x1").killed == "cancel"
    for name in ("y1", "y2"):
        cpu.last(name).finish()
        hx.turn()
    assert hx.rec(run, "lost").state is NodeState.FAILED
    assert "needed a success but only 0 of its 2 inputs succeeded" in str(hx.rec(run, "lost").error)
    assert run.done.result().outcome(won).value == 4 and lost is not None


# ---- READY -> ... ----------------------------------------------------------------------------


def test_ready_to_running_sends_attempt_one_with_its_options(hx: Harness) -> None:
    plan = ap.Plan()
    plan.add(ap.action(double, timeout=5.0), 21, name="a")
    run = hx.start(plan)
    a = hx.rec(run, "a")
    att = hx.pools["cpu"].last("a")
    assert a.state is X and a.attempts == 1 and a.pool == "cpu"
    assert att.task.attempt == 1 and att.task.timeout == 5.0 and att.task.announce
    assert kinds(hx, "a") == ["queued"]
    att.finish()
    hx.turn()
    assert kinds(hx, "a") == ["queued", "started", "finished"]
    assert a.value == 42 and a.worker == "mem-0"


def test_ready_to_skipped_when_validate_says_no(hx: Harness) -> None:
    plan = ap.Plan()
    plan.add(ap.action(double, validate=lambda state, x: x > 0), -1, name="a")
    run = hx.start(plan)
    a = hx.rec(run, "a")
    assert a.state is NodeState.SKIPPED and "validate returned False" in str(a.error)
    assert hx.pools["cpu"].attempts == []


def test_ready_to_failed_when_an_argument_cannot_be_pickled(hx: Harness) -> None:
    plan = ap.Plan()
    plan.add(double, threading.Lock(), name="a")
    run = hx.start(plan)
    a = hx.rec(run, "a")
    assert a.state is NodeState.FAILED and isinstance(a.error, ap.SerializationError)
    assert "'a'" in str(a.error) and hx.pools["cpu"].attempts == []


def test_ready_to_failed_when_the_pool_refuses(hx: Harness) -> None:
    hx.pools["cpu"].closed = True
    plan = ap.Plan()
    plan.add(double, 1, name="a")
    run = hx.start(plan)
    a = hx.rec(run, "a")
    assert a.state is NodeState.FAILED and "pool is closed" in str(a.error)
    assert hx.sched.admission.free_slots("cpu") == 2  # its slot came back


# ---- RUNNING -> ... --------------------------------------------------------------------------


def test_running_to_succeeded_frees_the_slot(hx: Harness) -> None:
    plan = ap.Plan()
    plan.add(double, 5, name="a")
    run = hx.start(plan)
    assert hx.sched.admission.free_slots("cpu") == 1
    hx.pools["cpu"].last("a").finish()
    hx.turn()
    assert hx.rec(run, "a").state is NodeState.SUCCEEDED
    assert hx.sched.admission.free_slots("cpu") == 2


def test_running_to_failed_keeps_type_message_and_traceback(hx: Harness) -> None:
    plan = ap.Plan()
    plan.add(fail, 7, name="a")
    run = hx.start(plan)
    hx.pools["cpu"].last("a").finish()
    hx.turn()
    a = hx.rec(run, "a")
    assert a.state is NodeState.FAILED and type(a.error) is ValueError
    assert str(a.error) == "bad 7" and "in fail" in (a.traceback or "")


def test_running_to_ready_retries_with_the_users_consent(hx: Harness) -> None:
    plan = ap.Plan()
    plan.add(ap.action(fail, retries=1, retry_on=(ValueError,)), 1, name="a")
    run = hx.start(plan)
    cpu = hx.pools["cpu"]
    cpu.last("a").finish()
    hx.turn()
    a = hx.rec(run, "a")
    assert a.state is X and a.attempts == 2 and cpu.last("a").task.attempt == 2
    assert "retrying" in kinds(hx, "a")
    cpu.last("a").finish()
    hx.turn()
    assert a.state is NodeState.FAILED and a.attempts == 2  # no third attempt


def test_running_to_ready_uncounted_when_the_worker_died_before_starting(hx: Harness) -> None:
    plan = ap.Plan()
    plan.add(ap.action(double, idempotent=False), 3, name="a")
    run = hx.start(plan)
    cpu = hx.pools["cpu"]
    cpu.last("a").die_before_start()
    hx.turn()
    a = hx.rec(run, "a")
    assert a.state is X and a.attempts == 1 and len(cpu.attempts) == 2
    assert cpu.last("a").task.attempt == 1  # the same attempt, sent again
    cpu.last("a").finish()
    hx.turn()
    assert a.state is NodeState.SUCCEEDED and a.value == 6 and a.attempts == 1


def test_workers_that_keep_dying_before_starting_end_the_node_crashed(hx: Harness) -> None:
    plan = ap.Plan()
    plan.add(double, 3, name="a")
    run = hx.start(plan)
    cpu = hx.pools["cpu"]
    for _ in range(3):
        cpu.last("a").die_before_start(code=70)
        hx.turn()
    a = hx.rec(run, "a")
    assert a.state is NodeState.CRASHED and len(cpu.attempts) == 3
    assert isinstance(a.error, ap.WorkerCrashed) and a.error.exitcode == 70
    assert "worker processes die before they start it" in str(a.error)


def test_the_startup_guard_counts_deaths_in_a_row_across_nodes() -> None:
    plan = ap.Plan()
    for i in range(4):
        plan.add(double, i, name=f"n{i}")
    hx = Harness(cpu=4)
    run = hx.start(plan)
    cpu = hx.pools["cpu"]
    cpu.last("n0").die_before_start()
    cpu.last("n1").die_before_start()
    hx.turn()  # two deaths in a row: both sent again
    cpu.last("n2").die_before_start()  # the third in a row: the guard trips
    hx.turn()
    assert hx.rec(run, "n2").state is NodeState.CRASHED
    cpu.last("n3").finish()  # a start resets the count
    hx.turn()
    cpu.last("n0").finish()
    hx.turn()
    assert hx.rec(run, "n0").state is NodeState.SUCCEEDED
    assert hx.rec(run, "n3").state is NodeState.SUCCEEDED
    hx.close()


def test_running_to_crashed_when_the_worker_dies_while_running(hx: Harness) -> None:
    plan = ap.Plan()
    plan.add(double, 3, name="a")
    run = hx.start(plan)
    cpu = hx.pools["cpu"]
    cpu.last("a").start()
    cpu.last("a").die_running()
    hx.turn()
    a = hx.rec(run, "a")
    assert a.state is NodeState.CRASHED and a.error is not None and a.error.signal == 11  # type: ignore[attr-defined]
    assert len(cpu.attempts) == 1  # never re-run without consent


def test_running_to_timed_out_by_a_hard_kill_after_the_grace(hx: Harness) -> None:
    plan = ap.Plan()
    plan.add(ap.action(double, timeout=0.05), 3, name="a")
    run = hx.start(plan)
    att = hx.pools["cpu"].last("a")
    att.start()
    hx.turn()
    deadline = time.monotonic() + 30
    while hx.rec(run, "a").state is X and time.monotonic() < deadline:
        hx.turn(0.05)  # timeout 0.05 s + grace 0.05 s: the kill timer fires
    a = hx.rec(run, "a")
    assert att.killed == "timeout"
    assert a.state is NodeState.TIMED_OUT and isinstance(a.error, ap.ActionTimeout)
    assert "its worker was killed" in str(a.error)


def test_running_to_timed_out_for_a_result_past_its_deadline(hx: Harness) -> None:
    def slow(x: int) -> int:
        time.sleep(0.1)
        return x

    plan = ap.Plan()
    plan.add(ap.action(slow, timeout=0.01), 3, name="a")
    run = hx.start(plan)
    hx.pools["cpu"].last("a").finish()  # returns, 0.1 s after its start: late
    hx.turn()
    a = hx.rec(run, "a")
    assert a.state is NodeState.TIMED_OUT and "ran past its timeout of 0.01 s" in str(a.error)


def test_io_running_to_timed_out_at_the_deadline_and_its_slot_is_free(hx: Harness) -> None:
    plan = ap.Plan()
    plan.add(ap.action(double, kind="io", timeout=0.05), 3, name="a")
    run = hx.start(plan)
    att = hx.pools["io"].last("a")
    att.start()
    deadline = time.monotonic() + 30
    while hx.rec(run, "a").state is X and time.monotonic() < deadline:
        hx.turn(0.02)
    a = hx.rec(run, "a")
    assert a.state is NodeState.TIMED_OUT and att.killed == "timeout"
    assert att.cancel_flag.is_set()  # what ctx.cancelled() reads
    assert hx.sched.admission.free_slots("io") == 2  # the thread is abandoned


def test_running_to_cancelled_kills_a_process_and_abandons_a_thread(hx: Harness) -> None:
    plan = ap.Plan()
    plan.add(double, 1, name="c")
    plan.add(ap.action(double, kind="io"), 2, name="i")
    run = hx.start(plan)
    for pool in hx.pools.values():
        pool.attempts[0].start()
    hx.turn()
    run.cancel("stop")
    hx.turn()
    assert hx.pools["cpu"].last("c").killed == "cancel"
    assert hx.pools["io"].last("i").killed == "cancel"
    assert hx.sched.admission.free_slots("io") == 2  # abandoned at once
    hx.turn()
    assert hx.sched.admission.free_slots("cpu") == 2  # freed once the kill is reported
    assert {r.state for r in hx.records[id(run)]} == {NodeState.CANCELLED}
    assert all(r.started_at is not None for r in hx.records[id(run)])


def test_fail_fast_cancels_the_running_siblings(hx: Harness) -> None:
    plan = ap.Plan()
    plan.add(fail, 1, name="bad")
    plan.add(double, 2, name="sibling")
    run = hx.start(plan, failure="fail_fast")
    hx.pools["cpu"].last("bad").finish()
    hx.turn()
    sib = hx.rec(run, "sibling")
    assert sib.state is NodeState.CANCELLED and "fail_fast after node 'bad' failed" in str(
        sib.error
    )
    assert run.done.result().status is ap.RunStatus.FAILED


def test_a_late_report_of_a_stopped_attempt_changes_nothing(hx: Harness) -> None:
    plan = ap.Plan()
    plan.add(ap.action(double, kind="io", timeout=0.02), 1, name="a")
    run = hx.start(plan)
    att = hx.pools["io"].last("a")
    att.start()
    deadline = time.monotonic() + 30
    while hx.rec(run, "a").state is X and time.monotonic() < deadline:
        hx.turn(0.02)
    assert hx.rec(run, "a").state is NodeState.TIMED_OUT
    att.future.set_result(execute(att.task))  # the abandoned thread returns after all
    hx.turn()
    assert hx.rec(run, "a").state is NodeState.TIMED_OUT
    assert hx.sched.admission.free_slots("io") == 2  # released once, not twice
