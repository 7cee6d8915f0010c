"""Outcomes and reports: statuses, errors with remote tracebacks, skips, exports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import actionpool as ap
from tests import helpers as h


@pytest.fixture(scope="module")
def report() -> Iterator[ap.Report]:
    plan = ap.Plan()
    plan.add(h.add, 1, 2, name="ok")
    bad = plan.add(h.boom, "broken input", name="bad")
    child = plan.add(h.square, bad, name="child")
    plan.add(h.add, child, 1, name="grandchild")
    plan.add(h.io_stamp, "io", name="io")
    with ap.Runner(cpu_workers=2, io_workers=2) as r:
        yield r.run(plan)


def test_every_node_has_exactly_one_outcome_in_plan_order(report: ap.Report) -> None:
    assert [o.name for o in report.outcomes] == ["ok", "bad", "child", "grandchild", "io"]
    assert len(report) == 5


def test_statuses(report: ap.Report) -> None:
    st = {o.name: o.status for o in report}
    assert st == {
        "ok": ap.Status.SUCCEEDED,
        "bad": ap.Status.FAILED,
        "child": ap.Status.SKIPPED,
        "grandchild": ap.Status.SKIPPED,
        "io": ap.Status.SUCCEEDED,
    }
    assert report.status is ap.RunStatus.PARTIAL
    assert report.counts() == {ap.Status.SUCCEEDED: 2, ap.Status.FAILED: 1, ap.Status.SKIPPED: 2}


def test_failed_node_keeps_type_message_and_remote_traceback(report: ap.Report) -> None:
    out = report.outcome("bad")
    assert type(out.error) is ValueError and str(out.error) == "broken input"
    assert out.traceback is not None and "in boom" in out.traceback
    assert "raise ValueError(msg)" in out.traceback
    assert out.attempts == 1 and out.pool == "cpu" and isinstance(out.worker, int)
    assert out.duration_s is not None and out.duration_s >= 0
    assert out.started_at is not None and out.finished_at is not None


def test_skipped_dependents_name_the_upstream(report: ap.Report) -> None:
    child = report.outcome("child")
    assert "upstream node 'bad' failed" in str(child.error)
    assert "ValueError: broken input" in str(child.error)
    grandchild = report.outcome("grandchild")
    assert "upstream node 'child' skipped" in str(grandchild.error)
    assert child.attempts == 0 and child.started_at is None and child.pool is None


def test_getitem_returns_values_and_raises_action_failed(report: ap.Report) -> None:
    assert report["ok"] == 3
    with pytest.raises(ap.ActionFailed, match="node 'bad' failed: ValueError: broken input") as e:
        report["bad"]
    assert e.value.outcome is report.outcome("bad")
    assert isinstance(e.value.__cause__, ValueError)
    with pytest.raises(ap.ActionFailed, match="'child' skipped"):
        report["child"]
    with pytest.raises(KeyError, match="nope"):
        report["nope"]


def test_raise_for_failures_groups_every_failure(report: ap.Report) -> None:
    with pytest.raises(ExceptionGroup) as info:
        report.raise_for_failures()
    assert [type(e) for e in info.value.exceptions] == [ValueError]
    assert "1 of 5 nodes did not succeed" in str(info.value)


def test_raise_for_failures_is_a_no_op_when_all_succeeded(runner: ap.Runner) -> None:
    plan = ap.Plan()
    plan.add(h.square, 2)
    rep = runner.run(plan)
    assert rep.raise_for_failures() is None
    assert rep.status is ap.RunStatus.SUCCEEDED


def test_all_failed_is_a_failed_run(runner: ap.Runner) -> None:
    plan = ap.Plan()
    plan.add(h.boom)
    assert runner.run(plan).status is ap.RunStatus.FAILED


def test_chrome_trace(report: ap.Report, tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    assert report.to_chrome_trace(path) == path
    loaded = json.loads(path.read_text())
    assert loaded == report.to_chrome_trace()
    spans = [e for e in loaded["traceEvents"] if e["ph"] == "X"]
    assert {e["name"] for e in spans} == {"ok", "bad", "io"}  # skipped nodes never ran
    assert all(e["dur"] >= 0 for e in spans)


def test_reprs(report: ap.Report) -> None:
    assert "partial" in repr(report)
    html = report._repr_html_()
    assert "<table" in html and "broken input" in html
    assert "failed" in repr(report.outcome("bad"))
