"""W10 small maps at every size and W11 a short batch: small work on 2 workers.

* W10 maps a builtin, ``abs``, over 1,000, 10,000, 100,000 and 1,000,000 integers
  (``--quick`` leaves the million out; ``--small-sizes`` picks others) on pools of 2
  workers: actionpool's ``Runner.map`` against ``multiprocessing.Pool.map`` (default
  chunksize), ``ProcessPoolExecutor.map`` and loky's ``.map`` with Pool's chunksize
  formula, and joblib ``batch_size="auto"``. A builtin is pickled by name and imports
  nothing in a worker, so what is timed is each library's per-item and per-call
  overhead. A sample is the median of up to 5 maps within 50 ms; each of actionpool's
  maps is the runner's first map of ``abs`` (the per-item time it measured before is
  forgotten), the harder case: later maps start from that measure. Target:
  actionpool's tasks/s >= 1.0x Pool.map's at every size.
* W11 runs 6 tasks of 50 ms busy work on 2 workers: a batch too short for a pool to
  amortise a slow start or an uneven split. Efficiency = ideal / wall, ideal = (the 6
  tasks serially in-process, same round) x ceil(6 / 2) / 6. Reported for every
  contender, with no target.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench_tasks import busy, mp_chunksize
from harness import (
    Entry,
    Suite,
    check_values,
    op,
    timed,
    timed_median,
)
from results import (
    Context,
    Row,
    Tables,
    Workload,
    best_peer,
    fmt,
    paired_note,
    per_round,
    plot_caption,
    primary,
    pyplot,
    reference,
    round_refs,
    verdict,
)

WORKERS = 2
SIZES = (1_000, 10_000, 100_000, 1_000_000)
QUICK_SIZES = SIZES[:3]
W11_TASKS = 6
W11_SECONDS = 0.05

_items: dict[int, tuple[list[int], list[int]]] = {}


def items(n: int) -> tuple[list[int], list[int]]:
    """``n`` integers around zero and their absolute values; the last size is kept,
    so the lists are built once per size and driver, outside every timing."""
    if n not in _items:
        _items.clear()
        xs = list(range(-(n // 2), n - n // 2))
        _items[n] = (xs, [abs(x) for x in xs])
    return _items[n]


# ---- ops: W10 --------------------------------------------------------------------------------


@op("w10", "actionpool")
def ap_w10(d: Any, n: int) -> dict[str, Any]:
    xs, want = items(n)
    r = d.runner_for(WORKERS)
    # Each sample is the runner's first map of abs, as a user's first map of a new
    # function is: the per-item time earlier maps measured is forgotten (a runner
    # without that memory has nothing to forget).
    speeds = getattr(r, "_map_speeds", None)
    forget = speeds.clear if isinstance(speeds, dict) else None
    t, out = timed_median(lambda: list(r.map(abs, xs)), setup=forget)
    check_values(out, want, "w10")
    return {"t": t}


@op("w10", "multiprocessing")
def pool_w10(d: Any, n: int) -> dict[str, Any]:
    xs, want = items(n)
    pool = d.pool_for(WORKERS)
    t, out = timed_median(lambda: pool.map(abs, xs))
    check_values(out, want, "w10")
    return {"t": t}


@op("w10", "concurrent.futures", "loky")
def executor_w10(d: Any, n: int) -> dict[str, Any]:
    xs, want = items(n)
    ex = d.pool_for(WORKERS)
    cs = mp_chunksize(n, WORKERS)
    t, out = timed_median(lambda: list(ex.map(abs, xs, chunksize=cs)))
    check_values(out, want, "w10")
    return {"t": t}


@op("w10", "joblib")
def joblib_w10(d: Any, n: int) -> dict[str, Any]:
    xs, want = items(n)
    t, out = timed_median(lambda: d.par(WORKERS, abs, xs, batch_size="auto"))
    check_values(out, want, "w10")
    return {"t": t}


# ---- ops: W11 --------------------------------------------------------------------------------


@op("w11", "actionpool")
def ap_w11(d: Any, iters: int, tasks: int) -> dict[str, Any]:
    r = d.runner_for(WORKERS)
    t, out = timed(lambda: list(r.map(busy, [iters] * tasks)))
    assert len(out) == tasks
    return {"t": t}


@op("w11", "multiprocessing")
def pool_w11(d: Any, iters: int, tasks: int) -> dict[str, Any]:
    pool = d.pool_for(WORKERS)
    t, _ = timed(lambda: pool.map(busy, [iters] * tasks))
    return {"t": t}


@op("w11", "concurrent.futures", "loky")
def executor_w11(d: Any, iters: int, tasks: int) -> dict[str, Any]:
    ex = d.pool_for(WORKERS)
    t, _ = timed(lambda: list(ex.map(busy, [iters] * tasks)))
    return {"t": t}


@op("w11", "joblib")
def joblib_w11(d: Any, iters: int, tasks: int) -> dict[str, Any]:
    t, _ = timed(lambda: d.par(WORKERS, busy, [iters] * tasks))
    return {"t": t}


# ---- measuring -------------------------------------------------------------------------------


def sizes_of(args: Any) -> list[int]:
    if getattr(args, "small_sizes", None):
        return [int(x) for x in str(args.small_sizes).split(",") if x.strip()]
    return list(QUICK_SIZES if args.quick else SIZES)


def w11_kw(cal: dict[str, Any]) -> dict[str, Any]:
    return {"iters": int(W11_SECONDS * cal["iters_per_s"]), "tasks": W11_TASKS}


def measure(s: Suite, cal: dict[str, Any]) -> dict[str, Any]:
    a = s.args
    res: dict[str, Any] = {}
    w = WORKERS
    if "W10" in a.workloads:
        entries = []
        for n in sizes_of(a):
            cs = mp_chunksize(n, w)
            kw = {"n": n}
            entries += [
                Entry(f"actionpool runner.map, {n:,} items", "actionpool", "w10", kw,
                      "actionpool"),
                Entry(f"multiprocessing Pool.map, {n:,} items", "multiprocessing", "w10", kw,
                      "peer"),
                Entry(f"concurrent.futures ProcessPoolExecutor.map(chunksize={cs}), {n:,}"
                      " items", "concurrent.futures", "w10", kw, "peer"),
                Entry(f"loky .map(chunksize={cs}), {n:,} items", "loky", "w10", kw, "peer"),
                Entry(f'joblib Parallel(batch_size="auto"), {n:,} items', "joblib", "w10", kw,
                      "peer"),
            ]  # fmt: skip
        res["W10"] = s.measure("W10", entries, max(1, a.rounds - 2))  # 2 fewer, as W5
    if "W11" in a.workloads:
        kw11 = w11_kw(cal)
        res["W11"] = s.measure(
            "W11",
            [
                Entry("actionpool runner.map", "actionpool", "w11", kw11, "actionpool"),
                Entry("multiprocessing Pool.map", "multiprocessing", "w11", kw11, "peer"),
                Entry("concurrent.futures ProcessPoolExecutor.map", "concurrent.futures",
                      "w11", kw11, "peer"),
                Entry("loky .map", "loky", "w11", kw11, "peer"),
                Entry("joblib Parallel", "joblib", "w11", kw11, "peer"),
                Entry(f"{W11_TASKS} tasks serially in-process (reference)", "baseline",
                      "serial", kw11, "reference"),
            ],
            a.rounds,
        )  # fmt: skip
    return res


# ---- metrics and verdicts --------------------------------------------------------------------


def vs_pool(tables: Tables) -> dict[int, tuple[Row | None, Row | None]]:
    """Size -> (actionpool's row, Pool.map's row) of W10."""
    out: dict[int, tuple[Row | None, Row | None]] = {}
    for r in tables.get("W10", {}).get("rows", []):
        ours, pool = out.get(r["group"], (None, None))
        if r["kind"] == "actionpool":
            ours = r
        elif r["library"] == "multiprocessing":
            pool = r
        out[r["group"]] = (ours, pool)
    return out


def _w10_targets(tables: Tables, res: dict[str, Any], ctx: Context) -> list[Row]:
    if "W10" not in tables:
        return []
    target = ">= 1.0x Pool.map's tasks/s at every size"
    ratios: dict[int, float | None] = {}
    for n, (ours, pool) in vs_pool(tables).items():
        ok = ours and pool and ours["median"] is not None and pool["median"] is not None
        ratios[n] = ours["median"] / pool["median"] if ok and ours and pool else None
    if not ratios or None in ratios.values():
        why = "not measured (no actionpool or Pool.map result at some size)"
        return [verdict("W10", W10_TITLE, target, None, None, why)]
    worst = min(r for r in ratios.values() if r is not None)
    shown = ", ".join(f"{n:,}: {r:.2f}x" for n, r in ratios.items())
    shown += " (ours / Pool.map's, medians)"
    return [
        verdict("W10", W10_TITLE, target, worst, worst >= 1.0, shown, "multiprocessing Pool.map")
    ]


def _w11_context(ctx: Context, entries: list[Entry], res: dict[str, Any]) -> None:
    serial = reference(ctx, "W11", entries)
    if serial is not None:
        tasks = next(e.kw["tasks"] for e in entries if e.kind == "reference")
        ctx["share11"] = math.ceil(tasks / WORKERS) / tasks
        ctx["serial11"] = serial


def _w11_metric(e: Entry, ctx: Context) -> list[float]:
    if e.kind == "reference" or not ctx.get("serial11"):
        return []  # the reference defines the ideal
    share = ctx["share11"]
    return [s * share / t for s, t in zip(round_refs(ctx, "W11", e, "serial11"), e.samples,
                                          strict=True) if s]  # fmt: skip


def _w11_targets(tables: Tables, res: dict[str, Any], ctx: Context) -> list[Row]:
    p = primary(tables, "W11")
    if not p or p["median"] is None:
        return []
    b = best_peer(tables, "W11")
    shown = f"{p['median']:.0%} (rounds {p['min']:.0%}-{p['max']:.0%}" + (
        f"; best peer {b['median']:.0%}{paired_note(per_round(p, b))})" if b else ")"
    )
    return [verdict("W11", W11_TITLE, "efficiency (ideal / wall), reported", p["median"], None,
                    shown, b["contender"] if b else "")]  # fmt: skip


W10_TITLE = "small maps of abs at every size, 2 workers"
W11_TITLE = f"short batch: {W11_TASKS} x 50 ms busy tasks on 2 workers"
WORKLOADS = [
    Workload("W10", W10_TITLE, "tasks/s",
             metric=lambda e, ctx: [e.kw["n"] / t for t in e.samples],
             targets=_w10_targets, group=lambda e: e.kw["n"]),
    Workload("W11", W11_TITLE, "efficiency (ideal / wall)", metric=_w11_metric, percent=True,
             context=_w11_context, targets=_w11_targets),
]  # fmt: skip

# compare.py: actionpool's side, as (what, op, kw)
COMPARE = {
    "W10": lambda cal, args: [(f"runner.map(abs) of {n:,} items, 2 workers", "w10", {"n": n})
                              for n in sizes_of(args)],
    "W11": lambda cal, args: [(f"runner.map of {W11_TASKS} x 50 ms busy tasks, 2 workers",
                               "w11", w11_kw(cal))],
}  # fmt: skip


# ---- the W10 section of results.md: ours / Pool.map's, size by size, and its plot -------------


def sections(data: dict[str, Any], plots: list[str]) -> list[str]:
    tab = data["analysis"]["tables"].get("W10")
    if not tab:
        return []
    sizes = sorted({r["group"] for r in tab["rows"]})
    pool = {r["group"]: r["median"] for r in tab["rows"] if r["library"] == "multiprocessing"}
    libs = list(dict.fromkeys((r["library"], r["kind"]) for r in tab["rows"]))
    lines = [
        "",
        "## W10 small maps: tasks/s per size, and the ratio to Pool.map's",
        "",
        f"`abs` mapped over each number of integers on {WORKERS} workers; each cell is the"
        " median tasks/s and, in brackets, that median over `multiprocessing.Pool.map`'s"
        " at the same size (higher is better).",
        "",
        "| contender | " + " | ".join(f"{n:,} items" for n in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for lib, kind in libs:
        cells = []
        for n in sizes:
            row = next((r for r in tab["rows"] if r["library"] == lib and r["group"] == n), None)
            m = row["median"] if row else None
            base = pool.get(n)
            cells.append("-" if m is None else f"{fmt(m)} ({m / base:.2f}x)" if base else fmt(m))
        name = f"**{lib}**" if kind == "actionpool" else lib
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""] + [f"![W10 small maps]({p})" for p in plots if p.startswith("w10")]


def plots(out: Path, data: dict[str, Any]) -> list[str]:
    tab = data["analysis"]["tables"].get("W10")
    plt = pyplot()
    if not tab or plt is None:
        return []
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    for lib in dict.fromkeys(r["library"] for r in tab["rows"]):
        pts = sorted((r["group"], r["median"]) for r in tab["rows"]
                     if r["library"] == lib and r["median"] is not None)  # fmt: skip
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=lib)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("items mapped")
    ax.set_ylabel("tasks/s (median)")
    ax.set_title(f"W10: map(abs) on {WORKERS} workers\n{plot_caption(data)}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "w10_small_maps.png")
    plt.close(fig)
    return ["w10_small_maps.png"]
