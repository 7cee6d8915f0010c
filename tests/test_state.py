"""State: one snapshot per run, deltas merged in plan order, conflicts and reducers."""

from __future__ import annotations

import operator
from collections.abc import Iterator

import pytest

import actionpool as ap
from actionpool.state import merge_state
from tests import helpers as h


@pytest.fixture(scope="module")
def shared() -> Iterator[ap.Runner]:
    with ap.Runner(cpu_workers=2, io_workers=4) as r:
        yield r


def test_updates_are_merged_into_report_state(shared: ap.Runner) -> None:
    plan = ap.Plan()
    plan.add(h.set_key, "a", 1)
    plan.add(h.set_key, "b", 2)
    state = {"k": 0}
    report = shared.run(plan, state=state)
    assert report.state == {"k": 0, "a": 1, "b": 2}
    assert state == {"k": 0}


def test_ordered_writers_overwrite_in_dependency_order(shared: ap.Runner) -> None:
    # "late" is added first but runs after "early" (after= names a later node):
    # the merge follows the dependency order, not the plan's insertion order.
    plan = ap.Plan()
    plan.add(h.set_key, "x", "late", name="late", after=["early"])
    plan.add(h.set_key, "x", "early", name="early")
    assert shared.run(plan).state["x"] == "late"


def test_final_state_does_not_depend_on_completion_order(shared: ap.Runner) -> None:
    # a chain of writers where the first one is slowest: the result is the chain's last
    @ap.action
    def slow_set(ctx: ap.Context, value: int, seconds: float) -> None:
        import time

        time.sleep(seconds)
        ctx.update(x=value, **{f"v{value}": value})

    plan = ap.Plan()
    prev = None
    for i, delay in enumerate([0.3, 0.0, 0.1]):
        prev = plan.add(slow_set, i, delay, after=[prev] if prev else None)
    for _ in range(2):
        assert shared.run(plan).state == {"x": 2, "v0": 0, "v1": 1, "v2": 2}


def test_unordered_writers_of_one_key_raise_state_conflict(shared: ap.Runner) -> None:
    plan = ap.Plan()
    plan.add(h.set_key, "best", 1, name="left")
    plan.add(h.set_key, "best", 2, name="right")
    with pytest.raises(ap.StateConflict, match=r"'left' and 'right'.*'best'") as info:
        shared.run(plan)
    assert info.value.key == "best" and info.value.nodes == ("left", "right")
    report = info.value.report  # type: ignore[attr-defined]
    assert report.status is ap.RunStatus.SUCCEEDED  # no result is lost
    assert [o.value for o in report.outcomes] == [1, 2]


def test_reducers_combine_unordered_writers_in_plan_order(shared: ap.Runner) -> None:
    plan = ap.Plan()
    for i in range(5):
        plan.add(h.set_key, "log", [i], name=f"n{i}")
    report = shared.run(plan, state={"log": []}, reducers={"log": operator.add})
    assert report.state["log"] == [0, 1, 2, 3, 4]


def test_reducer_takes_the_first_update_when_the_key_is_new(shared: ap.Runner) -> None:
    plan = ap.Plan()
    for i in (3, 1, 2):
        plan.add(h.set_key, "n", i)
    assert shared.run(plan, reducers={"n": max}).state == {"n": 3}


def test_failed_nodes_do_not_update_the_state(shared: ap.Runner) -> None:
    @ap.action
    def set_then_fail(ctx: ap.Context) -> None:
        ctx.update(bad=True)
        raise RuntimeError("no")

    plan = ap.Plan()
    plan.add(set_then_fail)
    report = shared.run(plan)
    assert report.status is ap.RunStatus.FAILED and report.state == {}


def test_unpicklable_state_fails_only_the_nodes_that_read_it(shared: ap.Runner) -> None:
    plan = ap.Plan()
    reader = plan.add(h.set_key, "a", 1)
    plain = plan.add(h.square, 3)
    report = shared.run(plan, state={"ok": 1, "lock": h.Unpicklable()})
    assert report.outcome(reader).status is ap.Status.FAILED
    err = report.outcome(reader).error
    assert isinstance(err, ap.SerializationError)
    assert "state key 'lock'" in str(err) and "set_key" in str(err)
    assert report[plain] == 9


def test_unpicklable_update_names_the_key(shared: ap.Runner) -> None:
    plan = ap.Plan()
    n = plan.add(h.set_key, "handle", h.Unpicklable.__new__(h.Unpicklable))

    @ap.action
    def set_lock(ctx: ap.Context) -> int:
        import threading

        ctx.update(lock=threading.Lock())
        return 1

    m = plan.add(set_lock)
    report = shared.run(plan)
    assert report.outcome(n).ok  # an empty Unpicklable has no lock: it pickles
    err = report.outcome(m).error
    assert isinstance(err, ap.SerializationError) and "state update 'lock'" in str(err)


def test_update_on_a_non_mapping_state_is_a_clear_error(shared: ap.Runner) -> None:
    plan = ap.Plan()
    plan.add(h.set_key, "a", 1, name="writer")
    with pytest.raises(TypeError, match=r"'writer'.*not a mapping"):
        shared.run(plan, state=[1, 2])


def test_merge_state_checks_ancestry_not_plan_order() -> None:
    # three writers a -> b -> c ordered by edges: no conflict, last one wins
    anc = [0, 0b1, 0b11]
    out = merge_state({}, [(0, "a", {"k": 1}), (1, "b", {"k": 2}), (2, "c", {"k": 3})], lambda: anc)
    assert out == {"k": 3}
    # c not ordered after b: conflict names b and c
    anc = [0, 0b1, 0b1]
    with pytest.raises(ap.StateConflict, match="'b' and 'c'"):
        merge_state({}, [(0, "a", {"k": 1}), (1, "b", {"k": 2}), (2, "c", {"k": 3})], lambda: anc)
