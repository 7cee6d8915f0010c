"""What a report looks like: its HTML view, its Gantt chart, its Chrome trace.

One real run (cpu and io nodes, a failure, skipped dependents, a node retried twice)
feeds every test; the views are checked for what they show, not for their markup.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import actionpool as ap
from actionpool.views import RUN_COLOURS, STATUS_COLOURS
from tests import helpers as h


@ap.action(retries=2, retry_on=ValueError, backoff=0)
def fails_twice(counter: str) -> int:
    """Raise ValueError on the first two calls (counted in the file ``counter``)."""
    p = Path(counter)
    calls = int(p.read_text()) if p.exists() else 0
    p.write_text(str(calls + 1))
    if calls < 2:
        raise ValueError(f"call {calls} is not good enough")
    return calls


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ap.Report]:
    counter = tmp_path_factory.mktemp("views") / "calls"
    plan = ap.Plan()
    plan.add(h.add, 1, 2, name="ok")
    bad = plan.add(h.boom, "broken input", name="bad")
    child = plan.add(h.square, bad, name="child")
    plan.add(h.add, child, 1, name="grandchild")
    plan.add(fails_twice, str(counter), name="flaky")
    plan.add(ap.action(h.io_stamp, kind="io"), "io", name="io")
    with ap.Runner(cpu_workers=2, io_workers=2) as r:
        yield r.run(plan)


def test_the_run_behind_the_views(report: ap.Report) -> None:
    flaky = report.outcome("flaky")
    assert (flaky.status, flaky.value, flaky.attempts) == (ap.Status.SUCCEEDED, 2, 3)
    assert [a.status for a in flaky.history] == [ap.Status.FAILED, ap.Status.FAILED]
    assert [str(a.error) for a in flaky.history] == [
        "call 0 is not good enough",
        "call 1 is not good enough",
    ]
    first, second = flaky.history
    assert first.started_at is not None and second.started_at is not None
    assert first.started_at <= first.finished_at <= second.started_at
    assert second.finished_at <= (flaky.started_at or 0)
    assert all(a.pool == "cpu" and isinstance(a.worker, int) for a in flaky.history)
    assert report.outcome("ok").history == ()


# ---- HTML ------------------------------------------------------------------------------


def test_html_header_gives_status_counts_wall_time_and_speedup(report: ap.Report) -> None:
    page = report._repr_html_()
    assert "PARTIAL" in page and RUN_COLOURS[ap.RunStatus.PARTIAL] in page
    assert "<b>6 nodes</b>" in page
    assert f"in {report.duration_s:.3f} s" in page
    for text in ("3 succeeded", "1 failed", "2 skipped"):
        assert text in page
    speedup = re.search(r"speedup ([\d.]+)x over the sum of action times \(([\d.]+) s\)", page)
    assert speedup is not None
    busy = sum(
        (a.finished_at - a.started_at)
        for o in report
        for a in o.history
        if a.started_at is not None
    ) + sum(o.duration_s or 0.0 for o in report)
    assert float(speedup.group(2)) == pytest.approx(busy, abs=2e-3)


def test_html_lists_what_failed_first_with_a_collapsible_traceback(report: ap.Report) -> None:
    page = report._repr_html_()
    failures = page[page.index("Did not succeed") : page.index("<table")]
    assert "bad" in failures and "broken input" in failures
    assert "<details><summary>" in failures and "Traceback" in failures
    assert "flaky" not in failures and "child" not in failures  # retried to success; skipped
    table = page[page.index("<table") :]
    names = re.findall(r"<tr><td>([^<]+)</td>", table)
    assert names[0] == "bad"  # what did not succeed comes first, then plan order
    assert names[1:] == ["ok", "child", "grandchild", "flaky", "io"]
    assert STATUS_COLOURS[ap.Status.FAILED] in table
    assert STATUS_COLOURS[ap.Status.SKIPPED] in table


def test_html_of_a_large_run_is_capped_and_says_how_many_are_left_out(report: ap.Report) -> None:
    from actionpool.views import report_html

    page = report_html(report, max_rows=2)
    assert len(re.findall(r"<tr><td>", page)) == 2
    assert "and 4 more nodes" in page


# ---- the Gantt chart -----------------------------------------------------------------------


def _bars(fig: object) -> dict[str, list[tuple[float, float, str]]]:
    """{track: [(start, width, colour)]} from the figure's broken_barh collections."""
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import to_hex

    (ax,) = fig.axes  # type: ignore[attr-defined]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    out: dict[str, list[tuple[float, float, str]]] = {}
    for coll in ax.collections:
        assert isinstance(coll, PolyCollection)
        colour = to_hex(coll.get_facecolor()[0])
        for path in coll.get_paths():
            (x0, y0), (x1, y1) = path.get_extents().get_points()
            track = labels[round((y0 + y1) / 2)]
            out.setdefault(track, []).append((x0, x1 - x0, colour))
    return out


def test_plot_draws_a_bar_per_attempt_on_its_workers_row(report: ap.Report) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    fig = report.plot()
    assert isinstance(fig, Figure)
    assert fig._repr_png_().startswith(b"\x89PNG")  # how a notebook shows it
    bars = _bars(fig)
    attempts = sum(len(b) for b in bars.values())
    assert attempts == 3 + 1 + 1 + 1  # flaky's three, ok, bad, io: skipped nodes never ran
    io_rows = [t for t in bars if t.startswith("io ")]
    assert len(io_rows) == 1 and [c for _, _, c in bars[io_rows[0]]] == [
        STATUS_COLOURS[ap.Status.SUCCEEDED]
    ]
    cpu = [c for t, bs in bars.items() if t.startswith("cpu pid ") for _, _, c in bs]
    failed = STATUS_COLOURS[ap.Status.FAILED]
    assert cpu.count(failed) == 1 + 2  # bad, and flaky's two retried attempts
    flaky = report.outcome("flaky")
    assert f"cpu pid {flaky.worker}" in bars
    for start, width, _ in (b for bs in bars.values() for b in bs):
        assert start >= 0 and start + width <= report.duration_s + 1e-6
    (ax,) = fig.axes
    assert "2 never ran" in ax.get_title()
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert legend == {"succeeded", "failed"}


def test_plot_without_matplotlib_says_how_to_install_it(
    report: ap.Report, monkeypatch: pytest.MonkeyPatch
) -> None:
    h.hide_package(monkeypatch, "matplotlib")
    with pytest.raises(ImportError, match=r"pip install 'actionpool\[plot\]'"):
        report.plot()


# ---- the Chrome trace ------------------------------------------------------------------------


def test_chrome_trace_file_has_numeric_tracks_named_and_a_span_per_attempt(
    report: ap.Report, tmp_path: Path
) -> None:
    out = report.to_chrome_trace(tmp_path / "run.json")
    assert out == tmp_path / "run.json"
    events = json.loads(out.read_text())["traceEvents"]
    assert all(isinstance(e["pid"], int) and isinstance(e["tid"], int) for e in events)
    names = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e["ph"] == "M" and e["name"] == "thread_name"
    }
    pools = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert pools[1] == "cpu pool" and pools[2] == "io pool"
    spans = [e for e in events if e["ph"] == "X"]
    by_node: dict[str, list[dict]] = {}
    for e in spans:
        by_node.setdefault(e["name"], []).append(e)
        assert names[(e["pid"], e["tid"])]  # every span sits on a named track
        assert e["dur"] >= 0 and e["ts"] >= 0
    assert sorted(by_node) == ["bad", "flaky", "io", "ok"]
    assert [e["args"]["attempt"] for e in by_node["flaky"]] == [1, 2, 3]
    assert [e["args"]["status"] for e in by_node["flaky"]] == ["failed", "failed", "succeeded"]
    assert "call 0 is not good enough" in by_node["flaky"][0]["args"]["error"]
    cpu = [e for e in spans if e["pid"] == 1]
    assert all(names[(1, e["tid"])] == f"cpu pid {e['tid']}" for e in cpu)
    never = [e for e in events if e["ph"] == "i"]
    assert sorted(e["args"]["node"] for e in never) == ["child", "grandchild"]
    assert all(e["args"]["status"] == "skipped" for e in never)


def test_chrome_trace_without_a_path_is_a_dict_shown_as_one_line(report: ap.Report) -> None:
    trace = report.to_chrome_trace()
    assert isinstance(trace, dict) and trace["displayTimeUnit"] == "ms"
    shown = repr(trace)
    assert shown.startswith("<ChromeTrace of ") and "\n" not in shown and len(shown) < 200
    assert json.loads(json.dumps(trace)) == dict(trace)


def test_a_crashed_attempt_that_was_retried_is_in_the_history(tmp_path: Path) -> None:
    from tests import fault_actions as fa

    again = ap.action(fa.crash_first_time, retries=1, retry_on=(ap.WorkerCrashed,))
    plan = ap.Plan()
    plan.add(again, str(tmp_path / "flag"), name="crashy")
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        out = r.run(plan).outcome("crashy")
    assert (out.status, out.attempts) == (ap.Status.SUCCEEDED, 2)
    (first,) = out.history
    assert first.status is ap.Status.CRASHED
    assert isinstance(first.error, ap.WorkerCrashed)
    assert first.pool == "cpu" and first.worker != out.worker  # a fresh worker ran it again
