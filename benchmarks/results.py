"""From samples to results: metrics, medians, the best peer, verdicts, tables, plots.

Each workload module describes its workloads with a ``Workload``: its unit, its metric
(a figure per sample), the context its metric needs (a reference measured in the same
rounds) and its targets. ``analyse`` turns the entries that ``harness.Suite.measure``
filled into the tables of ``results.json``; ``workload_table`` prints one of them for
``results.md``. The figures of the suite's ``analysis`` in ``results.json``
(``tables``, ``ctx``, ``targets``) come from here.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness import Entry

# ---- from samples to metrics and verdicts ----------------------------------------------------

Row = dict[str, Any]
Tables = dict[str, Any]
Context = dict[str, Any]


@dataclass(frozen=True)
class Workload:
    """How to judge one workload's entries.

    ``metric(entry, ctx)`` gives the workload's figure for each of the entry's samples;
    ``context(ctx, entries, res)`` runs first and puts in ``ctx`` what the metric needs
    (a reference's median, with ``reference()``); ``targets(tables, res, ctx)`` gives
    the verdict rows; ``notes(data, analysis)`` lines printed under the workload's
    table; ``group(entry)`` splits the best-peer comparison (W10: one per map size).
    """

    wid: str
    title: str
    unit: str
    metric: Callable[[Entry, Context], list[float]]
    higher: bool = True
    percent: bool = False
    context: Callable[[Context, list[Entry], dict[str, Any]], None] | None = None
    targets: Callable[[Tables, dict[str, Any], Context], list[Row]] | None = None
    notes: Callable[[dict[str, Any], dict[str, Any]], list[str]] | None = None
    group: Callable[[Entry], Any] | None = None


def reference(ctx: Context, wid: str, entries: list[Entry]) -> float | None:
    """The median of ``wid``'s reference entry (``None`` without one); its sample of
    each round goes to ``ctx["ref_rounds"][wid]`` for ``round_refs``."""
    for e in entries:
        if e.kind == "reference" and e.samples:
            ctx.setdefault("ref_rounds", {})[wid] = dict(zip(e.rounds, e.samples, strict=False))
            return e.median()
    return None


def round_refs(ctx: Context, wid: str, e: Entry, key: str) -> list[float | None]:
    """The reference of each of ``e``'s samples' own round, or ``ctx[key]`` (the
    reference's median) where that round has none.

    A metric that divides by a reference measured in every round (a serial time, a
    memcpy) is judged against its own round's: the machine's drift between rounds
    then cancels out (on a shared VM the same serial work takes visibly longer in some
    rounds than in others)."""
    rounds = e.rounds if len(e.rounds) == len(e.samples) else [-1] * len(e.samples)
    by_round: dict[int, float] = ctx.get("ref_rounds", {}).get(wid, {})
    return [by_round.get(r, ctx.get(key)) for r in rounds]


def analyse(res: dict[str, Any], workers: int, workloads: list[Workload]) -> dict[str, Any]:
    """Metrics, medians, the best peer of each workload and the verdicts."""
    ctx: Context = {"workers": workers, "ref_rounds": {}}
    for w in workloads:
        if w.context:
            w.context(ctx, res.get(w.wid, []), res)
    tables: Tables = {}
    for w in workloads:
        entries: list[Entry] = res.get(w.wid, [])
        if not entries:
            continue
        rows: list[Row] = []
        for e in entries:
            m = w.metric(e, ctx) if e.samples else []
            rows.append({
                "contender": e.label, "library": e.lib, "kind": e.kind, "op": e.op,
                "samples_s": e.samples, "rounds": e.rounds, "extras": e.extras, "metric": m,
                "median": statistics.median(m) if m else None,
                "min": min(m) if m else None, "max": max(m) if m else None,
                "median_s": e.median(), "errors": e.errors,
            })  # fmt: skip
            if w.group:
                rows[-1]["group"] = w.group(e)
        pick = max if w.higher else min
        best: Row | None = None
        for g in dict.fromkeys(r.get("group") for r in rows):
            peers = [r for r in rows if r["kind"] == "peer" and r["median"] is not None]
            peers = [r for r in peers if r.get("group") == g]
            b = pick(peers, key=lambda r: r["median"]) if peers else None
            best = best or b
            for r in rows:
                if r.get("group") == g:
                    ok = b is not None and r["median"] is not None
                    r["vs_best_peer"] = r["median"] / b["median"] if ok and b else None
        tables[w.wid] = {
            "title": w.title,
            "unit": w.unit,
            "rows": rows,
            "best_peer": best["contender"] if best and not w.group else None,
        }
    targets: list[Row] = []
    for w in workloads:
        if w.targets:
            targets.extend(w.targets(tables, res, ctx))
    return {"tables": tables, "ctx": ctx, "targets": targets}


def primary(tables: Tables, wid: str) -> Row | None:
    """The workload's actionpool row (not a variant)."""
    rows = tables.get(wid, {}).get("rows", [])
    return next((r for r in rows if r["kind"] == "actionpool"), None)


def best_peer(tables: Tables, wid: str) -> Row | None:
    name = tables.get(wid, {}).get("best_peer")
    return next((r for r in tables[wid]["rows"] if r["contender"] == name), None)


def verdict(
    wid: str, title: str, target: str, value: float | None, met: bool | None, shown: str,
    peer: str = "",
) -> Row:  # fmt: skip
    """One row of the targets table (``met`` None: reported, not judged)."""
    return {"workload": wid, "title": title, "target": target, "value": value,
            "shown": shown, "met": met, "best_peer": peer}  # fmt: skip


def per_round(p: Row, b: Row) -> list[float]:
    """``p``'s metric over ``b``'s, round by round (the rounds both have a sample of).

    Both ran in the same round, minutes apart at most, so a drift of the machine's
    speed between rounds cancels out of each ratio, unlike out of a ratio of medians.
    """
    pm = dict(zip(p.get("rounds") or [], p["metric"], strict=False))
    bm = dict(zip(b.get("rounds") or [], b["metric"], strict=False))
    return [pm[r] / bm[r] for r in sorted(pm.keys() & bm.keys()) if bm[r]]


def round_note(ratios: list[float], op: str, limit: float) -> str:
    """'; per round 0.91-1.12x, met in 4 of 7' (empty without paired rounds)."""
    if not ratios:
        return ""
    met = sum(x >= limit if op == ">=" else x <= limit for x in ratios)
    return f"; per round {min(ratios):.2f}-{max(ratios):.2f}x, met in {met} of {len(ratios)}"


def paired_note(ratios: list[float]) -> str:
    """'; ours / the best peer's, same round: median 0.98x, ahead in 7 of 15' (higher is
    better; empty without paired rounds). A machine whose speed moves within a run
    moves both contenders of a round alike, so this ratio shows a gap between two pools
    that the efficiencies' own spread hides."""
    if not ratios:
        return ""
    ahead = sum(x > 1 for x in ratios)
    return (
        f"; ours / the best peer's, same round: median {statistics.median(ratios):.2f}x,"
        f" ahead in {ahead} of {len(ratios)}"
    )


# ---- tables, JSON, plots ---------------------------------------------------------------------


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_seconds(t: float | None) -> str:
    """'2.91 ms', '145 µs', '1.20 s'."""
    if t is None:
        return "-"
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{fmt(t * 1e3)} ms"
    return f"{fmt(t * 1e6)} µs"


def workload_table(w: Workload, tab: dict[str, Any]) -> list[str]:
    """The markdown table of one workload's contenders."""

    def metric(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}" if w.percent else fmt(x)

    better = "higher is better" if w.higher else "lower is better"
    lines = [
        "",
        f"### {w.wid} {tab['title']}",
        "",
        f"| contender | median {tab['unit']} | min-max | median s | vs best peer ({better}) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in tab["rows"]:
        name = r["contender"]
        if r["kind"] == "actionpool":
            name = f"**{name}**"
        if r["median"] is None and r["kind"] == "reference" and r["median_s"]:
            lines.append(f"| {name} | (defines the ideal) | | {r['median_s']:.4f} | |")
            continue
        if r["median"] is None:
            err = "; ".join(r["errors"])[:300] or "no result"
            lines.append(f"| {name} | failed: {err} | | | |")
            continue
        vs = "-" if r.get("vs_best_peer") is None else f"{r['vs_best_peer']:.2f}"
        lines.append(
            f"| {name} | {metric(r['median'])} | {metric(r['min'])}-{metric(r['max'])} |"
            f" {r['median_s']:.4f} | {vs} |"
        )
    return lines


def entries_json(entries: list[Entry]) -> list[dict[str, Any]]:
    return [
        {"contender": e.label, "library": e.lib, "op": e.op, "kw": e.kw, "kind": e.kind,
         "samples_s": e.samples, "rounds": e.rounds, "extras": e.extras, "errors": e.errors}
        for e in entries
    ]  # fmt: skip


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or ``None`` when matplotlib is absent
    (the tables are written all the same)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_caption(data: dict[str, Any]) -> str:
    mach = data["machine"]
    return f"{mach['physical_cores']} physical cores, {mach['cpu']}"[:70]
