"""W3 busy tasks at n = cores, and the scaling curves: how well CPU work spreads.

* W3 runs 8 x 50 ms pure-Python busy tasks on as many workers as physical cores.
  Efficiency = ideal / wall, ideal = (the 8 tasks run serially in-process, measured in
  the same round) x ceil(8 / cores) / 8: the wall of equal, indivisible tasks perfectly
  spread, which is serial / cores up to 8 cores and one task's time beyond. Target:
  >= 95%. It runs ``2 x rounds + 1`` rounds (see ``w3_rounds``).
* Scaling: speedup (serial in-process time / parallel time) vs workers from 1 to the
  physical cores (powers of two and the core count), for ~1 ms, ~10 ms and ~100 ms busy
  tasks, for actionpool, ``concurrent.futures``, joblib and ``multiprocessing``; one
  plot per granularity (``scaling_<g>.png``).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from pathlib import Path
from typing import Any

from bench_tasks import busy, mp_chunksize
from harness import (
    DriverError,
    Entry,
    Suite,
    op,
    timed,
)
from results import (
    Context,
    Row,
    Tables,
    Workload,
    best_peer,
    paired_note,
    per_round,
    plot_caption,
    primary,
    pyplot,
    reference,
    round_refs,
    verdict,
)

GRANULARITIES = {"1ms": 0.001, "10ms": 0.010, "100ms": 0.100}
SCALING_LIBS = ("actionpool", "concurrent.futures", "joblib", "multiprocessing")

# ---- ops: W3 ---------------------------------------------------------------------------------


@op("w3", "actionpool")
def ap_w3(d: Any, iters: int, tasks: int) -> dict[str, Any]:
    t, out = timed(lambda: list(d.runner.map(busy, [iters] * tasks)))
    assert len(out) == tasks
    return {"t": t}


@op("w3_plan", "actionpool")
def ap_w3_plan(d: Any, iters: int, tasks: int) -> dict[str, Any]:
    def run() -> Any:
        plan = d.ap.Plan()
        for _ in range(tasks):
            plan.add(busy, iters)
        return d.run_plan(plan)

    t, _ = timed(run)
    return {"t": t}


@op("w3", "concurrent.futures", "loky")
def executor_w3(d: Any, iters: int, tasks: int) -> dict[str, Any]:
    t, _ = timed(lambda: list(d.ex.map(busy, [iters] * tasks)))
    return {"t": t}


@op("w3", "multiprocessing", "mpire")
def pool_w3(d: Any, iters: int, tasks: int) -> dict[str, Any]:
    t, _ = timed(lambda: d.pool.map(busy, [iters] * tasks))
    return {"t": t}


@op("w3", "joblib")
def joblib_w3(d: Any, iters: int, tasks: int) -> dict[str, Any]:
    t, _ = timed(lambda: d.par(d.workers, busy, [iters] * tasks))
    return {"t": t}


@op("w3", "pebble")
def pebble_w3(d: Any, iters: int, tasks: int) -> dict[str, Any]:
    t, _ = timed(lambda: list(d.pool.map(busy, [iters] * tasks).result()))
    return {"t": t}


@op("w3", "dask")
def dask_w3(d: Any, iters: int, tasks: int) -> dict[str, Any]:
    c = d.client
    t, _ = timed(lambda: c.gather(c.map(busy, [iters] * tasks, pure=False)))
    return {"t": t}


@op("w3", "ray")
def ray_w3(d: Any, iters: int, tasks: int) -> dict[str, Any]:
    f = d.r["busy"]
    t, _ = timed(lambda: d.ray.get([f.remote(iters) for _ in range(tasks)]))
    return {"t": t}


# ---- ops: scaling (a pool of w workers each) -------------------------------------------------


@op("scale", "actionpool")
def ap_scale(d: Any, w: int, iters: int, tasks: int) -> dict[str, Any]:
    r = d.runner_for(w)
    t, out = timed(lambda: list(r.map(busy, [iters] * tasks)))
    assert len(out) == tasks
    return {"t": t}


@op("scale", "concurrent.futures")
def futures_scale(d: Any, w: int, iters: int, tasks: int) -> dict[str, Any]:
    ex = d.pool_for(w)
    cs = mp_chunksize(tasks, w)
    t, _ = timed(lambda: list(ex.map(busy, [iters] * tasks, chunksize=cs)))
    return {"t": t}


@op("scale", "multiprocessing")
def mp_scale(d: Any, w: int, iters: int, tasks: int) -> dict[str, Any]:
    pool = d.pool_for(w)
    t, _ = timed(lambda: pool.map(busy, [iters] * tasks))
    return {"t": t}


@op("scale", "joblib")
def joblib_scale(d: Any, w: int, iters: int, tasks: int) -> dict[str, Any]:
    t, _ = timed(lambda: d.par(w, busy, [iters] * tasks))
    return {"t": t}


@op("scale_warm", "joblib")
def joblib_scale_warm(d: Any, w: int) -> dict[str, Any]:
    """joblib resizes its reusable executor when n_jobs changes: that, untimed."""
    from bench_tasks import nap

    d.par(w, nap, [0.05] * (2 * w))
    return {"t": 0.0}


@op("trim", "actionpool")
def ap_trim(d: Any, keep: list[int]) -> dict[str, Any]:
    for w in [w for w in d.runners if w not in keep and w != d.workers]:
        d.runners.pop(w).shutdown()
    return {"t": 0.0}


@op("trim", "concurrent.futures")
def futures_trim(d: Any, keep: list[int]) -> dict[str, Any]:
    for w in [w for w in d.pools if w not in keep and w != d.workers]:
        d.pools.pop(w).shutdown(wait=True)
    return {"t": 0.0}


@op("trim", "multiprocessing")
def mp_trim(d: Any, keep: list[int]) -> dict[str, Any]:
    for w in [w for w in d.pools if w not in keep and w != d.workers]:
        pool = d.pools.pop(w)
        pool.close()
        pool.join()
    return {"t": 0.0}


# ---- measuring -------------------------------------------------------------------------------


def w3_rounds(rounds: int) -> int:
    """W3's rounds: ``2 x rounds + 1`` (11 quick, 15 by default). On a shared VM one
    pool's efficiency swings widely from round to round while two pools in the same
    round stay close: a median of a handful of rounds is no verdict."""
    return 2 * rounds + 1


def w3_kw(cal: dict[str, Any]) -> dict[str, Any]:
    return {"iters": int(0.05 * cal["iters_per_s"]), "tasks": 8}


def measure_w3(s: Suite, cal: dict[str, Any]) -> dict[str, Any]:
    if "W3" not in s.args.workloads:
        return {}
    kw3 = w3_kw(cal)
    entries = s.measure(
        "W3",
        [
            Entry("actionpool runner.map", "actionpool", "w3", kw3, "actionpool"),
            Entry("actionpool plan of 8 nodes (variant)", "actionpool", "w3_plan", kw3,
                  "actionpool-variant"),
            Entry("multiprocessing Pool.map", "multiprocessing", "w3", kw3, "peer"),
            Entry("concurrent.futures ProcessPoolExecutor.map", "concurrent.futures", "w3",
                  kw3, "peer"),
            Entry("joblib Parallel", "joblib", "w3", kw3, "peer"),
            Entry("loky reusable executor .map", "loky", "w3", kw3, "peer"),
            Entry("mpire WorkerPool.map", "mpire", "w3", kw3, "peer"),
            Entry("pebble ProcessPool.map", "pebble", "w3", kw3, "peer"),
            Entry("dask client.map + gather", "dask", "w3", kw3, "peer"),
            Entry("ray 8 tasks + ray.get", "ray", "w3", kw3, "peer"),
            Entry("8 tasks serially in-process (reference)", "baseline", "serial", kw3,
                  "reference"),
        ],
        w3_rounds(s.args.rounds),
    )  # fmt: skip
    return {"W3": entries}


def measure_scaling(s: Suite, cal: dict[str, Any]) -> dict[str, Any]:
    """Speedup curves: for each worker count, rounds of every library and the serial
    reference over the three granularities, in an order rotated by round and count."""
    a = s.args
    maxw = a.workers
    ws = sorted({1, maxw, *(2**i for i in range(1, 12) if 2**i < maxw)})
    libs = [lib for lib in SCALING_LIBS if lib in a.libs]
    work_s = 0.4 if a.quick else 1.0
    rounds = 2 if a.quick else 3
    plan = {
        g: {"iters": max(1, int(sec * cal["iters_per_s"])),
            "tasks": max(4 * maxw, round(work_s / sec))}
        for g, sec in GRANULARITIES.items()
    }  # fmt: skip
    times: dict[str, dict[str, dict[str, list[float]]]] = {
        g: {lib: {} for lib in [*libs, "serial"]} for g in plan
    }
    errors: dict[str, list[str]] = {}
    dead: set[str] = set()
    for w in ws:
        for lib in libs:
            if lib in dead:
                continue
            try:
                if lib == "joblib":
                    s.call(lib, "scale_warm", w=w)
                else:
                    s.call(lib, "scale", w=w, iters=1, tasks=2 * w)  # pool of w started
            except DriverError as exc:
                errors.setdefault(lib, []).append(f"w={w} warm-up: {exc}")
                dead.add(lib) if exc.fatal else None
        for r in range(rounds):
            order = [*libs, "serial"]
            k = (r + w) % len(order)
            for g, p in plan.items():
                for lib in order[k:] + order[:k]:
                    if lib in dead:
                        continue
                    try:
                        if lib == "serial":
                            out = s.call("baseline", "serial", **p)
                        else:
                            out = s.call(lib, "scale", w=w, **p)
                    except DriverError as exc:
                        errors.setdefault(lib, []).append(f"w={w} {g}: {exc}")
                        if exc.fatal or len(errors[lib]) >= 3:
                            dead.add(lib)
                        continue
                    times[g][lib].setdefault(str(w), []).append(out["t"])
            s.say(f"scaling: workers={w}, round {r + 1}/{rounds}")
        for lib in libs:
            if lib not in dead and lib in ("actionpool", "concurrent.futures", "multiprocessing"):
                with contextlib.suppress(DriverError):
                    s.call(lib, "trim", keep=[])
    curves: dict[str, Any] = {}
    for g, by_lib in times.items():
        serial_all = [t for ts in by_lib["serial"].values() for t in ts]
        serial = statistics.median(serial_all) if serial_all else None
        curves[g] = {
            "iters": plan[g]["iters"],
            "tasks": plan[g]["tasks"],
            "serial_s": serial,
            "speedup": {
                lib: {
                    wk: serial / statistics.median(ts) for wk, ts in by_w.items() if ts and serial
                }
                for lib, by_w in by_lib.items()
                if lib != "serial"
            },
        }
    return {"workers": ws, "plan": plan, "samples": times, "curves": curves, "errors": errors}


# ---- W3's metric and verdict -----------------------------------------------------------------


def _w3_context(ctx: Context, entries: list[Entry], res: dict[str, Any]) -> None:
    serial3 = reference(ctx, "W3", entries)
    if serial3 is None:
        return
    # equal, indivisible tasks: the ideal wall is ceil(tasks / workers) tasks one after
    # another (serial / workers on 2 cores; one task, not serial / 16, for 8 tasks on 16
    # cores, where serial / workers would cap efficiency at 50%)
    tasks3 = next(e.kw["tasks"] for e in entries if e.kind == "reference")
    ctx["share3"] = math.ceil(tasks3 / ctx["workers"]) / tasks3
    ctx["serial3"] = serial3
    ctx["ideal3"] = serial3 * ctx["share3"]


def _w3_metric(e: Entry, ctx: Context) -> list[float]:
    if e.kind == "reference" or not ctx.get("serial3"):
        return []  # the reference defines the ideal
    share = ctx["share3"]
    return [s * share / t for s, t in zip(round_refs(ctx, "W3", e, "serial3"), e.samples,
                                          strict=True) if s]  # fmt: skip


def _w3_targets(tables: Tables, res: dict[str, Any], ctx: Context) -> list[Row]:
    p = primary(tables, "W3")
    if not p or p["median"] is None:
        return []
    b = best_peer(tables, "W3")
    shown = f"{p['median']:.0%} (rounds {p['min']:.0%}-{p['max']:.0%}" + (
        f"; best peer {b['median']:.0%}{paired_note(per_round(p, b))})" if b else ")"
    )
    return [verdict("W3", W3_TITLE, ">= 95% efficiency at n = cores", p["median"],
                    p["median"] >= 0.95, shown, b["contender"] if b else "")]  # fmt: skip


W3_TITLE = "8 x 50 ms pure-Python tasks at n = cores"
WORKLOADS = [
    Workload("W3", W3_TITLE, "efficiency (ideal / wall)", metric=_w3_metric, percent=True,
             context=_w3_context, targets=_w3_targets),
]  # fmt: skip

# compare.py: actionpool's side of W3, as (what, op, kw)
COMPARE = {"W3": lambda cal, args: [("runner.map of 8 x 50 ms busy tasks", "w3", w3_kw(cal))]}


# ---- the scaling section of results.md, and its plots -----------------------------------------


def sections(data: dict[str, Any], plots: list[str]) -> list[str]:
    sc = data.get("scaling")
    if not sc:
        return []
    lines = [
        "",
        "## Scaling: speedup vs workers",
        "",
        "Speedup = (the tasks run serially in-process) / (the same tasks on *w* workers),"
        " medians; each library used as for W1 (actionpool `runner.map`, "
        "`ProcessPoolExecutor.map(chunksize=ceil(n / 4w))`, joblib `Parallel`,"
        " `Pool.map`). Workers: 1, powers of two, and the physical cores.",
        "",
        "| granularity | tasks | contender | " + " | ".join(f"w={w}" for w in sc["workers"]) + " |",
        "|---|---:|---|" + "---:|" * len(sc["workers"]),
    ]
    for g, c in sc["curves"].items():
        for lib, sp in c["speedup"].items():
            cells = " | ".join(f"{sp[str(w)]:.2f}" if str(w) in sp else "-" for w in sc["workers"])
            lines.append(f"| ~{g} | {c['tasks']} | {lib} | {cells} |")
    if sc["errors"]:
        lines += ["", "Errors: " + "; ".join(f"{k}: {v[0]}" for k, v in sc["errors"].items())]
    return lines + [""] + [f"![scaling {p}]({p})" for p in plots if p.startswith("scaling")]


def plots(out: Path, data: dict[str, Any]) -> list[str]:
    sc = data.get("scaling")
    plt = pyplot()
    if not sc or plt is None:
        return []
    made = []
    for g, c in sc["curves"].items():
        fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
        ws = sc["workers"]
        ax.plot(ws, ws, "k--", lw=1, label="ideal")
        for lib, sp in c["speedup"].items():
            xs = [w for w in ws if str(w) in sp]
            if xs:
                ax.plot(xs, [sp[str(w)] for w in xs], "o-", label=lib)
        ax.set_xlabel("workers")
        ax.set_ylabel("speedup vs serial in-process")
        ax.set_xticks(ws)
        ax.set_ylim(bottom=0)
        ax.set_title(f"~{g} busy tasks ({c['tasks']} tasks)\n{plot_caption(data)}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"scaling_{g}.png"
        fig.savefig(out / name)
        plt.close(fig)
        made.append(name)
    return made
