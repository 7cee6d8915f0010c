"""State: one snapshot per run, deltas merged in plan order, conflicts and reducers."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import actionpool as ap
from actionpool.state import merge_state
from tests import helpers as h
from tests.conftest import make_runner


@pytest.fixture(scope="module", params=["local", "dask"])
def shared(request: pytest.FixtureRequest) -> Iterator[ap.Runner]:
    """A runner of each backend (the dask one on the session's LocalCluster).

    Three cpu workers: a plan of three writers that wait for each other needs all
    three running at once (see _reverse_completion_plan); the session's cluster has
    three workers of one thread."""
    with make_runner(request.param, request, cpu_workers=3, io_workers=8) as r:
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


def _reverse_completion_plan(
    tmp_path: Path, kind: str, updates: list[dict[str, Any]]
) -> tuple[ap.Plan, list[ap.Node], Callable[[ap.Event], None]]:
    """Unordered writers that finish in reverse plan order, provably: node i waits
    until the scheduler has seen node i + 1 finish (on_event writes a file then), so
    its result reaches the scheduler after that one's. Run it with the returned
    on_event."""
    action = ap.action(h.update_after, kind=kind)
    plan = ap.Plan()
    nodes = []
    for i, delta in enumerate(updates):
        last = i == len(updates) - 1
        wait = None if last else str(tmp_path / f"n{i + 1}.finished")
        nodes.append(plan.add(action, wait, delta, name=f"n{i}"))

    def on_event(ev: ap.Event) -> None:
        if ev.kind == "finished":
            (tmp_path / f"{ev.name}.finished").write_text(str(ev.data))

    return plan, nodes, on_event


def _finished_in_reverse(report: ap.Report, nodes: list[ap.Node]) -> None:
    """The premise of a test of merge order: the nodes did finish last-first."""
    assert report.status is ap.RunStatus.SUCCEEDED, report.outcomes
    ends = [report.outcome(n).finished_at for n in nodes]
    assert ends == sorted(ends, reverse=True), ends


@pytest.mark.parametrize("kind", ["cpu", "io"])
def test_final_state_does_not_depend_on_completion_order(
    shared: ap.Runner, tmp_path: Path, kind: str
) -> None:
    # Distinct keys and one reduced key, set by unordered nodes that finish in reverse
    # plan order: merged in completion order, the keys would come in the order
    # v2, v1, v0 and the log would read [2, 1, 0].
    updates: list[dict[str, Any]] = [{f"v{i}": i, "log": [i]} for i in range(3)]
    plan, nodes, on_event = _reverse_completion_plan(tmp_path, kind, updates)
    report = shared.run(plan, state={"log": []}, reducers={"log": operator.add}, on_event=on_event)
    _finished_in_reverse(report, nodes)
    assert report.state == {"log": [0, 1, 2], "v0": 0, "v1": 1, "v2": 2}
    assert list(report.state) == ["log", "v0", "v1", "v2"]  # inserted in plan order


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


def test_reducers_combine_unordered_writers_in_plan_order(
    shared: ap.Runner, tmp_path: Path
) -> None:
    # five writers of one key, the first in plan order the last to finish
    updates: list[dict[str, Any]] = [{"log": [i]} for i in range(5)]
    plan, nodes, on_event = _reverse_completion_plan(tmp_path, "io", updates)
    report = shared.run(plan, state={"log": []}, reducers={"log": operator.add}, on_event=on_event)
    _finished_in_reverse(report, nodes)
    assert report.state["log"] == [0, 1, 2, 3, 4]


def test_reducer_takes_the_first_update_when_the_key_is_new(
    shared: ap.Runner, tmp_path: Path
) -> None:
    # A reducer that shows both its order and its start: the first writer in plan
    # order (the last to finish) is taken as it is, never combined with a default.
    updates: list[dict[str, Any]] = [{"n": v} for v in ("a", "b", "c")]
    plan, nodes, on_event = _reverse_completion_plan(tmp_path, "io", updates)

    def join(old: str, new: str) -> str:
        return f"({old}+{new})"

    report = shared.run(plan, reducers={"n": join}, on_event=on_event)
    _finished_in_reverse(report, nodes)
    assert report.state == {"n": "((a+b)+c)"}


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
