"""The scheduler with real pools: retries, validate, fail_fast, events (the moves one by
one: test_lifecycle.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import actionpool as ap
from actionpool.scheduler import backoff_delay
from tests import helpers as h
from tests.conftest import make_runner


@pytest.fixture(scope="module", params=["local", "dask"])
def shared(request: pytest.FixtureRequest) -> Iterator[ap.Runner]:
    """A runner of each backend (the dask one on the session's LocalCluster)."""
    with make_runner(request.param, request, cpu_workers=2, io_workers=4) as r:
        yield r


def test_events_arrive_in_order_per_node(shared: ap.Runner) -> None:
    @ap.action(kind="io")
    def chatty(ctx: ap.Context) -> int:
        ctx.progress(1, 2)
        ctx.emit({"loss": 0.5})
        ctx.progress(2, 2)
        return 1

    events: list[ap.Event] = []
    threads = set()

    def on_event(e: ap.Event) -> None:
        events.append(e)
        threads.add(threading.current_thread().name)

    plan = ap.Plan()
    n = plan.add(chatty, name="chatty")
    shared.run(plan, on_event=on_event)
    assert [e.kind for e in events] == [
        "queued",
        "started",
        "progress",
        "emitted",
        "progress",
        "finished",
    ]
    assert all(e.node is n and e.name == "chatty" for e in events)
    assert events[2].data == (1, 2) and events[3].data == {"loss": 0.5}
    assert events[-1].data is ap.Status.SUCCEEDED
    assert len(threads) == 1  # one thread of the parent


def test_a_raising_on_event_warns_and_the_run_goes_on(shared: ap.Runner) -> None:
    def bad(_: ap.Event) -> None:
        raise RuntimeError("callback bug")

    plan = ap.Plan()
    n = plan.add(h.square, 5)
    with pytest.warns(RuntimeWarning, match="callback bug"):
        report = shared.run(plan, on_event=bad)
    assert report[n] == 25


def test_retries_rerun_an_action_that_raised(shared: ap.Runner, tmp_path: Path) -> None:
    counter = tmp_path / "count"

    @ap.action(retries=3, retry_on=OSError)
    def flaky(path: str) -> int:
        p = Path(path)
        n = int(p.read_text()) + 1 if p.exists() else 1
        p.write_text(str(n))
        if n < 3:
            raise OSError(f"attempt {n} failed")
        return n

    events: list[ap.Event] = []
    plan = ap.Plan()
    node = plan.add(flaky, str(counter))
    report = shared.run(plan, on_event=events.append)
    assert report[node] == 3
    assert report.outcome(node).attempts == 3
    assert [e.data["attempt"] for e in events if e.kind == "retrying"] == [1, 2]


def test_retries_keep_the_last_error_and_count_every_attempt(shared: ap.Runner) -> None:
    @ap.action(retries=2)
    def always(ctx: ap.Context) -> None:
        raise ValueError(f"attempt {ctx.attempt}")

    plan = ap.Plan()
    node = plan.add(always)
    out = shared.run(plan).outcome(node)
    assert out.status is ap.Status.FAILED and out.attempts == 3
    assert str(out.error) == "attempt 3"


def test_retry_on_limits_what_is_retried(shared: ap.Runner) -> None:
    @ap.action(retries=5, retry_on=OSError)
    def wrong_type() -> None:
        raise ValueError("not retried")

    plan = ap.Plan()
    node = plan.add(wrong_type)
    assert shared.run(plan).outcome(node).attempts == 1


def test_backoff_doubles_with_jitter() -> None:
    for attempt in (1, 2, 3):
        d = 0.1 * 2 ** (attempt - 1)
        samples = [backoff_delay(0.1, attempt) for _ in range(200)]
        assert all(d / 2 <= s <= d for s in samples)
        assert len(set(samples)) > 100  # jittered
    assert backoff_delay(0.0, 4) == 0.0


def test_backoff_waits_between_attempts(shared: ap.Runner) -> None:
    @ap.action(retries=2, backoff=0.2)
    def fails() -> None:
        raise OSError("x")

    plan = ap.Plan()
    plan.add(fails)
    start = time.monotonic()
    shared.run(plan)
    assert time.monotonic() - start >= 0.1 + 0.2  # at least half of 0.2 + 0.4


def test_validate_false_skips_the_node_and_its_dependents(shared: ap.Runner) -> None:
    def only_positive(state: dict[str, int], x: int) -> bool:
        return x > 0 and state["enabled"] == 1

    check = ap.action(h.square, validate=only_positive)
    plan = ap.Plan()
    yes = plan.add(check, 3)
    no = plan.add(check, -3)
    after_no = plan.add(h.add, no, 1)
    report = shared.run(plan, state={"enabled": 1})
    assert report[yes] == 9
    assert report.outcome(no).status is ap.Status.SKIPPED
    assert "validate returned False" in str(report.outcome(no).error)
    assert report.outcome(after_no).status is ap.Status.SKIPPED


def test_validate_sees_resolved_arguments(shared: ap.Runner) -> None:
    seen = []

    def record(state: object, x: int) -> bool:
        seen.append(x)
        return True

    plan = ap.Plan()
    a = plan.add(h.square, 4)
    plan.add(ap.action(h.square, validate=record), a)
    shared.run(plan)
    assert seen == [16]


def test_fail_fast_cancels_what_has_not_started(shared: ap.Runner) -> None:
    plan = ap.Plan()
    bad = plan.add(h.boom, name="bad")
    later = [plan.add(h.io_stamp, i, 0.0, name=f"later{i}", after=["slow"]) for i in range(3)]
    plan.add(h.io_stamp, "slow", 0.5, name="slow")
    report = shared.run(plan, failure="fail_fast")
    assert report.outcome(bad).status is ap.Status.FAILED
    assert {report.outcome(n).status for n in later} == {ap.Status.CANCELLED}
    assert report.status is ap.RunStatus.FAILED


def test_dispatch_follows_plan_order_among_ready_nodes() -> None:
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        plan = ap.Plan()
        nodes = [plan.add(h.io_stamp, i) for i in range(6)]
        report = r.run(plan)
    starts = [report[n][1] for n in nodes]
    assert starts == sorted(starts)


def test_a_10000_node_chain_with_a_failure_at_the_head_skips_without_recursion(
    shared: ap.Runner,
) -> None:
    plan = ap.Plan()
    prev = plan.add(ap.action(h.boom, kind="io"))
    for _ in range(10_000):
        prev = plan.add(h.add, prev, 1)
    report = shared.run(plan)
    assert report.counts() == {ap.Status.FAILED: 1, ap.Status.SKIPPED: 10_000}


def test_work_handed_over_from_threads_runs_on_the_loop_in_order() -> None:
    # Runner.submit and the io pool's threads hand work to the loop with from_thread,
    # which wakes the loop once per burst: nothing may be lost or reordered, and an
    # exception in one piece of work must not strand the ones queued after it.
    import asyncio

    from actionpool.scheduler import Scheduler

    loop = asyncio.new_event_loop()
    reported: list[BaseException | None] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx.get("exception")))
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        sched = Scheduler(loop, {}, 1.0, 0, 1, 0)
        seen: dict[int, list[int]] = {k: [] for k in range(4)}
        on_loop: list[bool] = []

        def note(k: int, i: int) -> None:
            on_loop.append(threading.current_thread() is thread)
            seen[k].append(i)

        def fail() -> None:
            raise ValueError("one piece of work failed")

        def hand_over(k: int) -> None:
            for i in range(2_000):
                sched.from_thread(note, k, i)
                if k == 0 and i == 1_000:
                    sched.from_thread(fail)

        senders = [threading.Thread(target=hand_over, args=(k,)) for k in range(4)]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        done = threading.Event()
        sched.from_thread(done.set)
        assert done.wait(30)
        assert all(seen[k] == list(range(2_000)) for k in range(4))
        assert all(on_loop) and len(on_loop) == 8_000
        assert [type(e) for e in reported] == [ValueError]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
