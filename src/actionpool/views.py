"""What a :class:`~actionpool.Report` looks like to people and to tools: its HTML view
in a notebook, its Gantt chart (matplotlib), and its Chrome trace (Perfetto).

All three are built from the report's outcomes alone, after the run, in the caller's
thread: one span per attempt (:attr:`Outcome.history <actionpool.Outcome>` holds the
retried ones), on a track per pool and worker, coloured by status. matplotlib is an
optional dependency (``pip install 'actionpool[plot]'``), imported only by
:func:`gantt`.
"""

from __future__ import annotations

import functools
import html
import io
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .outcome import Outcome, RunStatus, Status

if TYPE_CHECKING:
    from .outcome import Report

__all__ = ["RUN_COLOURS", "STATUS_COLOURS", "ChromeTrace", "chrome_trace", "gantt", "report_html"]

STATUS_COLOURS: dict[Status, str] = {
    Status.SUCCEEDED: "#2e7d32",
    Status.FAILED: "#c62828",
    Status.TIMED_OUT: "#ef6c00",
    Status.CRASHED: "#6a1b9a",
    Status.CANCELLED: "#546e7a",
    Status.SKIPPED: "#9e9e9e",
    Status.IN_DOUBT: "#f9a825",
}
"""One colour per node status, shared by the HTML view and the Gantt chart."""

RUN_COLOURS: dict[RunStatus, str] = {
    RunStatus.SUCCEEDED: STATUS_COLOURS[Status.SUCCEEDED],
    RunStatus.PARTIAL: STATUS_COLOURS[Status.TIMED_OUT],
    RunStatus.FAILED: STATUS_COLOURS[Status.FAILED],
    RunStatus.CANCELLED: STATUS_COLOURS[Status.CANCELLED],
}
"""One colour per run status (the HTML header)."""

MAX_HTML_ROWS = 200
"""Nodes listed in the HTML table at most (failed ones first); the rest are counted."""


# ---- attempts: the spans every view draws ---------------------------------------------------


def attempts(o: Outcome) -> Iterator[tuple[int, float, float, str | None, Any, Status, Any]]:
    """Every attempt of ``o`` that ran and has a known start: ``(number, started_at,
    finished_at, pool, worker, status, error)``, the retried ones first."""
    for i, a in enumerate(o.history, 1):
        if a.started_at is not None:
            yield i, a.started_at, a.finished_at, a.pool, a.worker, a.status, a.error
    if o.started_at is not None and o.finished_at is not None:
        yield o.attempts, o.started_at, o.finished_at, o.pool, o.worker, o.status, o.error


def busy_s(report: Report) -> float:
    """Seconds that actions ran, over every attempt of every node."""
    return sum(max(0.0, end - start) for o in report for _, start, end, *_ in attempts(o))


def _track(pool: str | None, worker: Any) -> str:
    if pool == "cpu":
        return f"cpu pid {worker}"
    return f"{pool or 'none'} {worker}"


# ---- HTML --------------------------------------------------------------------------------------


def _chip(text: str, colour: str) -> str:
    return (
        f'<span style="background:{colour};color:#fff;padding:1px 7px;border-radius:9px;'
        f'font-size:0.85em;white-space:nowrap">{html.escape(text)}</span>'
    )


def _error_line(o: Outcome) -> str:
    if o.error is None:
        return ""
    return f"{type(o.error).__name__}: {o.error}"


def report_html(report: Report, max_rows: int = MAX_HTML_ROWS) -> str:
    """The report as HTML: a header (run status, node counts per status, wall time,
    speedup over the sum of the actions' run times), the nodes that did not succeed
    first with their error and a collapsible traceback, then a table of the nodes
    (those that did not succeed first, at most ``max_rows``)."""
    wall = report.duration_s
    busy = busy_s(report)
    speedup = f" · speedup {busy / wall:.1f}x over the sum of action times ({busy:.3f} s)"
    head = (
        f"{_chip(report.status.value.upper(), RUN_COLOURS[report.status])} "
        f"<b>{len(report)} nodes</b> in {wall:.3f} s"
        f"{speedup if wall > 0 and busy > 0 else ''}"
        f' <span style="color:#777">run {html.escape(report.run_id)}</span>'
    )
    counts = " ".join(
        _chip(f"{n} {s.value}", STATUS_COLOURS[s]) for s, n in report.counts().items()
    )
    bad = [o for o in report if o.status not in (Status.SUCCEEDED, Status.SKIPPED)]
    details = []
    for o in bad[:max_rows]:
        tb = (
            f'<pre style="white-space:pre-wrap;margin:4px 0 8px 16px">'
            f"{html.escape(o.traceback)}</pre>"
            if o.traceback
            else ""
        )
        summary = (
            f"{_chip(o.status.value, STATUS_COLOURS[o.status])} <b>{html.escape(o.name)}</b>"
            f" {html.escape(_error_line(o))}"
        )
        details.append(
            f"<details><summary>{summary}</summary>{tb}</details>"
            if tb
            else f"<div>{summary}</div>"
        )
    failures = (
        f'<div style="margin:6px 0"><b>Did not succeed</b>{"".join(details)}</div>'
        if details
        else ""
    )
    ordered = bad + [o for o in report if o.status in (Status.SUCCEEDED, Status.SKIPPED)]
    rows = []
    for o in ordered[:max_rows]:
        dur = f"{o.duration_s:.3f}" if o.duration_s is not None else ""
        rows.append(
            f"<tr><td>{html.escape(o.name)}</td>"
            f"<td>{_chip(o.status.value, STATUS_COLOURS[o.status])}</td>"
            f'<td style="text-align:right">{dur}</td>'
            f'<td style="text-align:right">{o.attempts}</td><td>{o.pool or ""}</td>'
            f"<td>{html.escape(str(o.worker or ''))}</td>"
            f"<td>{html.escape(_error_line(o))}</td></tr>"
        )
    more = len(ordered) - max_rows
    tail = (
        f'<p style="color:#777">... and {more} more nodes (all are in report.outcomes)</p>'
        if more > 0
        else ""
    )
    table_head = (
        "<tr><th>node</th><th>status</th><th>seconds</th><th>attempts</th>"
        "<th>pool</th><th>worker</th><th>error</th></tr>"
    )
    return (
        f'<div class="actionpool-report"><div style="margin:4px 0">{head}</div>'
        f'<div style="margin:4px 0">{counts}</div>{failures}'
        f'<table class="actionpool-nodes">{table_head}{"".join(rows)}</table>{tail}</div>'
    )


# ---- the Gantt chart -----------------------------------------------------------------------


def gantt(report: Report, ax: Any = None) -> Any:
    """A Gantt chart of the report's attempts: one row per worker (``"cpu pid N"``, an
    io thread's name, a Dask worker), one bar per attempt from its start to its end,
    in seconds since the run started, coloured by how the attempt ended
    (:data:`STATUS_COLOURS`). Nodes that never ran (skipped, cancelled before they
    started) have no bar; the title counts them.

    Args:
        ax: a matplotlib ``Axes`` to draw on; None: a new figure.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'actionpool[plot]'``).
    """
    if ax is None:
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError(
                "report.plot() needs matplotlib: pip install 'actionpool[plot]'"
            ) from exc
    spans: dict[str, dict[Status, list[tuple[float, float]]]] = {}
    for o in report:
        for _, start, end, pool, worker, status, _ in attempts(o):
            by_status = spans.setdefault(_track(pool, worker), {})
            by_status.setdefault(status, []).append(
                (start - report.started_at, max(end - start, 0.0))
            )
    tracks = sorted(spans, key=_track_order)
    if ax is None:
        fig = _figure_class(Figure)(
            figsize=(10, max(2.0, 0.9 + 0.35 * len(tracks))), layout="constrained"
        )
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    seen: set[Status] = set()
    for y, track in enumerate(tracks):
        for status, bars in spans[track].items():
            ax.broken_barh(
                bars,
                (y - 0.4, 0.8),
                facecolors=STATUS_COLOURS[status],
                edgecolors="white",  # two attempts back to back stay two bars
                linewidth=0.5,
                label=None if status in seen else status.value,
            )
            seen.add(status)
    ax.set_yticks(range(len(tracks)), tracks)
    ax.set_ylim(len(tracks) - 0.5, -0.5)
    ax.set_xlim(0, max(report.duration_s, 1e-6))
    ax.set_xlabel("seconds since the run started")
    never = sum(1 for o in report if o.started_at is None)
    title = f"run {report.status.value}: {len(report)} nodes in {report.duration_s:.3f} s"
    ax.set_title(title + (f" ({never} never ran)" if never else ""))
    if seen:
        ax.legend(loc="upper right", fontsize="small")
    return fig


@functools.cache
def _figure_class(figure: type) -> type:
    """A matplotlib ``Figure`` that a notebook shows as a PNG by itself.

    Not pyplot's: pyplot would keep it open (and show it a second time in a notebook,
    at the cell's end), and a kernel registers how to show a plain ``Figure`` only
    where pyplot's inline backend was loaded.
    """

    class GanttFigure(figure):  # type: ignore[misc]
        def _repr_png_(self) -> bytes:
            buf = io.BytesIO()
            self.savefig(buf, format="png", dpi=100)
            return buf.getvalue()

    return GanttFigure


def _track_order(track: str) -> tuple[int, str, int]:
    pool, _, rest = track.partition(" ")
    number = rest.rsplit(" ", 1)[-1]
    return (
        {"cpu": 0, "dask": 1, "io": 2}.get(pool, 3),
        rest if not number.isdigit() else "",
        int(number) if number.isdigit() else 0,
    )


# ---- the Chrome trace ------------------------------------------------------------------------


class ChromeTrace(dict[str, Any]):
    """A Chrome trace (``{"traceEvents": [...], "displayTimeUnit": "ms"}``): a plain
    dict, shown in a notebook as one line rather than every event."""

    def __repr__(self) -> str:
        return (
            f"<ChromeTrace of {len(self.get('traceEvents', ()))} events: write it with"
            " report.to_chrome_trace(path) and open it in https://ui.perfetto.dev>"
        )

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


_PIDS = {"cpu": 1, "io": 2, "dask": 3}


def chrome_trace(report: Report) -> ChromeTrace:
    """The report in the Chrome trace event format (times in µs since the run began).

    A process per pool (pid 1 cpu, 2 io, 3 dask) and a thread per worker (tid: the
    worker's pid for cpu, else a number per io thread or Dask worker), each named by a
    metadata event; one complete event (``"ph": "X"``) per attempt, retries included
    (``args``: node, attempt, status, error); an instant event (``"ph": "i"``) for each
    node that never ran (skipped, cancelled) and each recycled worker. The format:
    https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU
    """
    events: list[dict[str, Any]] = []
    tids: dict[tuple[str, Any], int] = {}
    names: set[int] = set()

    def where(pool: str | None, worker: Any) -> tuple[int, int]:
        label = pool or "none"
        pid = _PIDS.get(label, 4)
        if pid not in names:
            names.add(pid)
            events.append(
                {"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                 "args": {"name": f"{label} pool"}}
            )  # fmt: skip
        key = (label, worker)
        if key not in tids:
            tid = worker if label == "cpu" and isinstance(worker, int) else len(tids) + 1
            tids[key] = tid
            events.append(
                {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                 "args": {"name": _track(pool, worker)}}
            )  # fmt: skip
        return pid, tids[key]

    t0 = report.started_at
    events.append({"ph": "M", "name": "process_name", "pid": 0, "tid": 0, "args": {"name": "run"}})
    for o in report:
        ran = False
        for n, start, end, pool, worker, status, error in attempts(o):
            ran = True
            pid, tid = where(pool, worker)
            args: dict[str, Any] = {"node": o.name, "attempt": n, "status": status.value}
            if error is not None:
                args["error"] = f"{type(error).__name__}: {error}"
            events.append(
                {"name": o.name, "cat": pool or "", "ph": "X", "pid": pid, "tid": tid,
                 "ts": (start - t0) * 1e6, "dur": max(0.0, end - start) * 1e6, "args": args}
            )  # fmt: skip
        if not ran:
            at = (o.finished_at if o.finished_at is not None else report.finished_at) - t0
            events.append(
                {"name": f"{o.name} {o.status.value}", "cat": "node", "ph": "i", "s": "g",
                 "pid": 0, "tid": 0, "ts": max(0.0, at) * 1e6,
                 "args": {"node": o.name, "status": o.status.value,
                          "reason": o.traceback or _error_line(o)}}
            )  # fmt: skip
    for r in report.recycled:
        pid, tid = where("cpu", r.get("worker"))
        last = report.outcome(r["node"]) if "node" in r else None
        at = last.finished_at if last is not None and last.finished_at else report.finished_at
        events.append(
            {"name": "worker recycled", "cat": "worker", "ph": "i", "s": "t", "pid": pid,
             "tid": tid, "ts": max(0.0, at - t0) * 1e6, "args": dict(r)}
        )  # fmt: skip
    return ChromeTrace(traceEvents=events, displayTimeUnit="ms")
