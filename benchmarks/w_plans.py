"""W8 mixed plan and W9 wide plans: what no peer has, so actionpool alone.

* W8: one plan of cpu nodes (4 x cores of busy work) and io nodes (8 sleeps) plus a
  fan-in node; wall / max(cpu work / cores, io wait), the cpu work measured serially
  in-process in the same round. Target: <= 1.1x (the two pools overlap).
* W9: 5,000 tiny cpu nodes + a fan-in node, in nodes/s (target >= 5,000); and a chain
  and a diamond lattice of several sizes up to 10,000+ nodes: run time per (node +
  edge), which is constant when scheduling is linear in nodes + edges (the verdict is
  the power-law exponent; see ``w9_curve_targets``). Plot: ``w9_overhead.png``.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_tasks import add2, busy, count_parts, inc
from harness import (
    DriverError,
    Entry,
    Suite,
    op,
    timed,
)
from peers import IO_THREADS
from results import (
    Context,
    Row,
    Tables,
    Workload,
    plot_caption,
    primary,
    pyplot,
    reference,
    round_refs,
    verdict,
)

W9_WIDE = 5_000
LATTICE_WIDTH = 10

# ---- ops -------------------------------------------------------------------------------------


@op("w8", "actionpool")
def ap_w8(
    d: Any, mode: str, cpu_nodes: int, iters: int, io_nodes: int, io_s: float
) -> dict[str, Any]:
    def run() -> Any:
        plan = d.ap.Plan()
        cpu = [plan.add(busy, iters) for _ in range(cpu_nodes if mode != "io" else 0)]
        io = [plan.add(d.nap_io, io_s) for _ in range(io_nodes if mode != "cpu" else 0)]
        plan.add(count_parts, cpu, io)
        return d.run_plan(plan)

    t, _ = timed(run)
    return {"t": t}


@op("w9_wide", "actionpool")
def ap_w9_wide(d: Any, n: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    plan = d.ap.Plan()
    nodes = [plan.add(inc, i) for i in range(n)]
    total = plan.add(sum, nodes)
    t1 = time.perf_counter()
    report = d.run_plan(plan)
    t2 = time.perf_counter()
    assert report[total] == n * (n + 1) // 2
    return {"t": t2 - t1, "build_s": t1 - t0, "nodes": n + 1, "edges": n}


@op("w9_chain", "actionpool")
def ap_w9_chain(d: Any, n: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    plan = d.ap.Plan()
    node = plan.add(inc, 0)
    for _ in range(n - 1):
        node = plan.add(inc, node)
    t1 = time.perf_counter()
    report = d.run_plan(plan)
    t2 = time.perf_counter()
    assert report[node] == n
    return {"t": t2 - t1, "build_s": t1 - t0, "nodes": n, "edges": n - 1}


@op("w9_lattice", "actionpool")
def ap_w9_lattice(d: Any, n: int, width: int) -> dict[str, Any]:
    """A diamond lattice: ``n // width`` layers; node (i, j) needs (i-1, j), (i-1, j+1)."""
    layers = max(2, n // width)
    t0 = time.perf_counter()
    plan = d.ap.Plan()
    row = [plan.add(inc, j) for j in range(width)]
    for _ in range(layers - 1):
        row = [plan.add(add2, row[j], row[(j + 1) % width]) for j in range(width)]
    t1 = time.perf_counter()
    report = d.run_plan(plan)
    t2 = time.perf_counter()
    assert isinstance(report[row[0]], int)
    nodes = layers * width
    return {"t": t2 - t1, "build_s": t1 - t0, "nodes": nodes, "edges": 2 * (nodes - width)}


# ---- measuring -------------------------------------------------------------------------------


def w8_kw(quick: bool, workers: int, cal: dict[str, Any]) -> dict[str, Any]:
    t = 0.2 if quick else 0.4
    return {"cpu_nodes": 4 * workers, "iters": int(t / 4 * cal["iters_per_s"]), "io_nodes": 8,
            "io_s": t}  # fmt: skip


def measure_w8(s: Suite, cal: dict[str, Any]) -> dict[str, Any]:
    a = s.args
    if "W8" not in a.workloads:
        return {}
    kw = w8_kw(a.quick, a.workers, cal)
    entries = s.measure(
        "W8",
        [
            Entry("actionpool mixed plan (cpu + io nodes)", "actionpool", "w8",
                  {"mode": "mixed", **kw}, "actionpool"),
            Entry("actionpool, the cpu nodes alone", "actionpool", "w8", {"mode": "cpu", **kw},
                  "actionpool-variant"),
            Entry("actionpool, the io nodes alone", "actionpool", "w8", {"mode": "io", **kw},
                  "actionpool-variant"),
            Entry("the cpu nodes' work serially in-process (reference)", "baseline", "serial",
                  {"iters": kw["iters"], "tasks": kw["cpu_nodes"]}, "reference"),
        ],
        a.rounds,
    )  # fmt: skip
    return {"W8": entries, "W8_params": {**kw, "cores": a.workers}}


def measure_w9(s: Suite, cal: dict[str, Any]) -> dict[str, Any]:
    a = s.args
    if "W9" not in a.workloads:
        return {}
    wide = s.measure(
        "W9",
        [Entry(f"actionpool plan: {W9_WIDE} tiny cpu nodes + fan-in", "actionpool", "w9_wide",
               {"n": W9_WIDE}, "actionpool")],
        a.rounds,
    )  # fmt: skip
    sizes = [1_000, 2_500, 5_000, 10_000] if a.quick else [1_250, 2_500, 5_000, 10_000, 20_000]
    curve: dict[str, list[dict[str, Any]]] = {"chain": [], "lattice": []}
    errors: list[str] = []
    rounds = 2 if a.quick else 3  # one noisy sample per size made the fit flap
    if "actionpool" not in a.libs:
        return {"W9": wide}
    for r in range(rounds):
        for n in sizes if r % 2 == 0 else sizes[::-1]:
            for shape in ("chain", "lattice"):
                kw: dict[str, Any] = {"n": n}
                if shape == "lattice":
                    kw["width"] = LATTICE_WIDTH
                try:
                    out = s.call("actionpool", f"w9_{shape}", **kw)
                except DriverError as exc:
                    errors.append(f"{shape} n={n}: {exc}")
                    continue
                curve[shape].append(out)
        s.say(f"W9 curve: round {r + 1}/{rounds}")
    summary: dict[str, Any] = {}
    for shape, outs in curve.items():
        by_n: dict[int, list[dict[str, Any]]] = {}
        for o in outs:
            by_n.setdefault(o["nodes"], []).append(o)
        pts = []
        for nodes, os_ in sorted(by_n.items()):
            run = statistics.median(o["t"] for o in os_)
            build = statistics.median(o["build_s"] for o in os_)
            ne = nodes + os_[0]["edges"]
            pts.append({"nodes": nodes, "edges": os_[0]["edges"], "n_plus_e": ne,
                        "run_s": run, "build_s": build, "run_us_per_ne": run / ne * 1e6,
                        "build_us_per_ne": build / ne * 1e6})  # fmt: skip
        fit = linear_fit([p["n_plus_e"] for p in pts], [p["run_s"] for p in pts])
        per = [p["run_us_per_ne"] for p in pts]
        summary[shape] = {
            "points": pts,
            "fit": fit,
            "per_ne_spread": (max(per) / min(per)) if per else None,
        }
    return {"W9": wide, "W9_curve": {"raw": curve, "summary": summary, "errors": errors,
                                     "lattice_width": LATTICE_WIDTH}}  # fmt: skip


def linear_fit(x: list[float], y: list[float]) -> dict[str, float] | None:
    if len(x) < 2:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    pred = [slope * xi + intercept for xi in x]
    ss_res = sum((yi - pi) ** 2 for yi, pi in zip(y, pred, strict=True))
    mean = sum(y) / len(y)
    ss_tot = sum((yi - mean) ** 2 for yi in y) or 1e-30
    return {"slope_s": float(slope), "intercept_s": float(intercept), "r2": 1 - ss_res / ss_tot}


# ---- metrics and verdicts --------------------------------------------------------------------


def _w8_context(ctx: Context, entries: list[Entry], res: dict[str, Any]) -> None:
    serial8 = reference(ctx, "W8", entries)
    if serial8 is not None and "W8_params" in res:
        ctx["serial8"] = serial8
        ctx["io8"] = res["W8_params"]["io_s"]
        ctx["ideal8"] = max(serial8 / ctx["workers"], ctx["io8"])


def _w8_metric(e: Entry, ctx: Context) -> list[float]:
    if e.kind == "reference" or not ctx.get("ideal8"):
        return []  # the reference defines the ideal
    io_s = ctx["io8"]
    return [t / max(s / ctx["workers"], io_s)
            for s, t in zip(round_refs(ctx, "W8", e, "serial8"), e.samples, strict=True)
            if s]  # fmt: skip


def _w8_targets(tables: Tables, res: dict[str, Any], ctx: Context) -> list[Row]:
    p = primary(tables, "W8")
    if not p or p["median"] is None:
        return []
    return [verdict("W8", W8_TITLE, "wall <= 1.1x max(cpu work / cores, io wait)",
                    p["median"], p["median"] <= 1.1, f"{p['median']:.2f}x")]  # fmt: skip


def _w8_notes(data: dict[str, Any], an: dict[str, Any]) -> list[str]:
    if "W8_params" not in data:
        return []
    p = data["W8_params"]
    return [
        "",
        f"Plan: {p['cpu_nodes']} cpu nodes of ~{p['io_s'] / 4 * 1e3:.0f} ms busy work"
        f" and {p['io_nodes']} io nodes sleeping {p['io_s'] * 1e3:.0f} ms, plus a"
        f" fan-in node; {p['cores']} cpu workers, {IO_THREADS} io threads."
        f" Ideal = {an['ctx'].get('ideal8', 0):.3f} s.",
    ]


def _w9_targets(tables: Tables, res: dict[str, Any], ctx: Context) -> list[Row]:
    out = []
    if (p := primary(tables, "W9")) and p["median"] is not None:
        target = ">= 5,000 nodes/s (5,000 nodes + fan-in)"
        shown = f"{p['median']:,.0f} nodes/s"
        out.append(verdict("W9", W9_TITLE, target, p["median"], p["median"] >= 5000, shown))
    return out + w9_curve_targets(res.get("W9_curve", {}).get("summary", {}))


def w9_curve_targets(curve: dict[str, Any]) -> list[dict[str, Any]]:
    """The W9 chain and lattice verdicts, from ``W9_curve``'s summary (also used by
    ``--render``, which has only results.json).

    Linear (not worse): the run time grows with nodes + edges no faster than
    linearly: the exponent ``b`` of a power-law fit over every size (``run = a
    (nodes + edges)^b``, least squares in log-log) is <= 1.1. Over the 16x range of
    sizes, b = 1.1 means the cost per node + edge grows 1.32x from the smallest to the
    largest. A fixed cost makes small plans dearer per node, which bends the curve
    below a straight line (b < 1): that is linear overhead too, so the straight line's
    R², the growth and the spread of the cost per node + edge are shown but not judged
    (an R² >= 0.98 rule failed a measured chain whose cost per node fell by a third as
    it grew 16x).
    """
    out: list[dict[str, Any]] = []
    for shape, sm in curve.items():
        spread = sm.get("per_ne_spread")
        points = sm.get("points") or []
        if spread is None or len(points) < 2:
            continue
        r2 = (sm.get("fit") or {}).get("r2", float("nan"))
        first, last = points[0], points[-1]
        growth = last["run_us_per_ne"] / first["run_us_per_ne"]
        exponent = float(np.polyfit(
            [math.log(p["n_plus_e"]) for p in points], [math.log(p["run_s"]) for p in points], 1
        )[0])  # fmt: skip
        out.append(verdict(
            "W9",
            f"{shape} of tiny cpu nodes, sizes up to {last['nodes']:,} nodes",
            f"{shape}: overhead linear in nodes + edges (run time ~ (nodes +"
            " edges)^b with b <= 1.1)",
            growth,
            bool(exponent <= 1.1),
            f"per node+edge {first['run_us_per_ne']:.0f} µs at {first['nodes']:,}"
            f" nodes, {last['run_us_per_ne']:.0f} µs at {last['nodes']:,}"
            f" ({growth:.2f}x; spread across sizes {spread:.2f}x); b = {exponent:.2f};"
            f" straight line R² {r2:.4f}",
        ))  # fmt: skip
    return out


W8_TITLE = "mixed plan: cpu and io nodes in one plan"
W9_TITLE = "wide plan: 5,000 tiny cpu nodes + fan-in"
WORKLOADS = [
    Workload("W8", W8_TITLE, "x ideal (wall / max(cpu work / cores, io wait))", higher=False,
             metric=_w8_metric, context=_w8_context, targets=_w8_targets, notes=_w8_notes),
    Workload("W9", W9_TITLE, "nodes/s",
             metric=lambda e, ctx: [ex["nodes"] / ex["t"] for ex in e.extras],
             targets=_w9_targets),
]  # fmt: skip

# compare.py: actionpool's side, as (what, op, kw)
COMPARE = {
    "W8": lambda cal, args: [("mixed plan of cpu and io nodes", "w8",
                               {"mode": "mixed", **w8_kw(True, args.workers, cal)})],
    "W9": lambda cal, args: [
        (f"plan of {W9_WIDE:,} tiny nodes + fan-in", "w9_wide", {"n": W9_WIDE}),
        ("chain of 2,500 tiny nodes", "w9_chain", {"n": 2_500}),
        ("diamond lattice of 2,500 tiny nodes", "w9_lattice",
         {"n": 2_500, "width": LATTICE_WIDTH}),
    ],
}  # fmt: skip


# ---- the W9 curve's section of results.md, and its plot ----------------------------------------


def sections(data: dict[str, Any], plots: list[str]) -> list[str]:
    w9 = data.get("W9_curve")
    if not w9:
        return []
    lines = [
        "",
        "## W9 scheduling overhead vs nodes + edges",
        "",
        f"A chain (each node needs the previous one) and a diamond lattice (width"
        f" {w9['lattice_width']}; each node needs two of the layer before) of tiny cpu"
        " nodes. *run* is `runner.run(plan)`, *build* the `plan.add` calls. Linear"
        " scheduling shows as a constant time per node + edge.",
        "",
        "| shape | nodes | edges | run s | build s | run µs per node+edge |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for shape, sm in w9["summary"].items():
        for p in sm["points"]:
            lines.append(
                f"| {shape} | {p['nodes']:,} | {p['edges']:,} | {p['run_s']:.3f} |"
                f" {p['build_s']:.3f} | {p['run_us_per_ne']:.1f} |"
            )
    for shape, sm in w9["summary"].items():
        if sm.get("fit"):
            f = sm["fit"]
            lines.append(
                f"\n{shape}: run = {f['intercept_s'] * 1e3:.1f} ms +"
                f" {f['slope_s'] * 1e6:.1f} µs x (nodes + edges), R² {f['r2']:.4f}."
            )
    if w9["errors"]:
        lines += ["", "Errors: " + "; ".join(w9["errors"][:5])]
    return lines + [""] + [f"![W9 overhead]({p})" for p in plots if p.startswith("w9")]


def plots(out: Path, data: dict[str, Any]) -> list[str]:
    w9 = data.get("W9_curve")
    plt = pyplot()
    if not w9 or plt is None or not any(sm["points"] for sm in w9["summary"].values()):
        return []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for shape, sm in w9["summary"].items():
        pts = sm["points"]
        if not pts:
            continue
        x = [p["n_plus_e"] for p in pts]
        (line,) = a1.plot(x, [p["run_s"] for p in pts], "o", label=f"{shape}")
        if sm.get("fit"):
            f = sm["fit"]
            xx = [0, max(x)]
            fit = [f["intercept_s"] + f["slope_s"] * v for v in xx]
            label = f"{shape} fit, R² {f['r2']:.3f}"
            a1.plot(xx, fit, "-", color=line.get_color(), lw=1, label=label)
        a2.plot(x, [p["run_us_per_ne"] for p in pts], "o-", label=f"{shape} run")
        a2.plot(x, [p["build_us_per_ne"] for p in pts], "x:", label=f"{shape} build",
                color=line.get_color())  # fmt: skip
    a1.set_xlabel("nodes + edges")
    a1.set_ylabel("runner.run(plan) seconds")
    a1.set_title("W9: run time vs plan size", fontsize=9)
    a2.set_xlabel("nodes + edges")
    a2.set_ylabel("µs per (node + edge)")
    a2.set_ylim(bottom=0)
    a2.set_title(f"W9: time per node + edge (flat = linear)\n{plot_caption(data)}", fontsize=9)
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "w9_overhead.png")
    plt.close(fig)
    return ["w9_overhead.png"]
