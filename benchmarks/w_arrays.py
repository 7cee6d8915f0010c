"""W5: a 50 MB float64 array to 4 tasks that each sum it.

Effective bandwidth = 4 x 50 MB / wall, as a multiple of one memcpy of the array
(``np.copyto`` into a pre-faulted array, as in ``bench_arrays.py``; each reference
sample is the median of 5 copies), judged against the memcpy of the sample's own
round. Target: >= 2x one memcpy (one copy into shared memory serves every task). The
longer study of a 200 MB array to 8 tasks is ``bench_arrays.py``.
"""

from __future__ import annotations

import contextlib
import statistics
from typing import Any

import numpy as np
from bench_tasks import task_sum
from harness import (
    PORTABLE,
    DriverError,
    Entry,
    Suite,
    check_sums,
    op,
    timed,
)
from results import (
    Context,
    Row,
    Tables,
    Workload,
    best_peer,
    primary,
    reference,
    round_refs,
    verdict,
)

MB = 50
TASKS = 4

# ---- ops -------------------------------------------------------------------------------------


@op("memcpy", "baseline")
def memcpy(d: Any, mb: int) -> dict[str, Any]:
    a, _ = d.array(mb)
    dst = d.prefaulted_like(a)
    # the median of 5 copies: one copy alone is at the mercy of a neighbour's burst,
    # which flattered every ratio to it
    t = statistics.median(timed(lambda: np.copyto(dst, a))[0] for _ in range(5))
    return {"t": t}


@op("w5", "actionpool")
def ap_w5(d: Any, mb: int, tasks: int) -> dict[str, Any]:
    a, want = d.array(mb)

    def run() -> list[float]:
        plan = d.ap.Plan()
        nodes = [plan.add(task_sum, a) for _ in range(tasks)]
        report = d.run_plan(plan)
        return [report[n] for n in nodes]

    t, out = timed(run)
    check_sums(out, want, tasks)
    return {"t": t}


@op("w5", "concurrent.futures", "loky")
def executor_w5(d: Any, mb: int, tasks: int) -> dict[str, Any]:
    a, want = d.array(mb)
    t, out = timed(lambda: [f.result() for f in [d.ex.submit(task_sum, a) for _ in range(tasks)]])
    check_sums(out, want, tasks)
    return {"t": t}


@op("w5", "multiprocessing", "mpire")
def pool_w5(d: Any, mb: int, tasks: int) -> dict[str, Any]:
    a, want = d.array(mb)

    def run() -> list[float]:
        rs = [d.pool.apply_async(task_sum, (a,)) for _ in range(tasks)]
        return [r.get() for r in rs]

    t, out = timed(run)
    check_sums(out, want, tasks)
    return {"t": t}


@op("w5", "joblib")
def joblib_w5(d: Any, mb: int, tasks: int) -> dict[str, Any]:
    a, want = d.array(mb)
    t, out = timed(lambda: d.par(d.workers, task_sum, [a] * tasks))
    check_sums(out, want, tasks)
    return {"t": t}


@op("w5", "pebble")
def pebble_w5(d: Any, mb: int, tasks: int) -> dict[str, Any]:
    a, want = d.array(mb)

    def run() -> list[float]:
        fs = [d.pool.schedule(task_sum, args=(a,)) for _ in range(tasks)]
        return [f.result() for f in fs]

    t, out = timed(run)
    check_sums(out, want, tasks)
    return {"t": t}


@op("w5", "dask")
def dask_w5(d: Any, mb: int, tasks: int) -> dict[str, Any]:
    a, want = d.array(mb)
    c = d.client

    def run() -> list[float]:
        fut = c.scatter(a, broadcast=True, hash=False)
        out: list[float] = c.gather([c.submit(task_sum, fut, pure=False) for _ in range(tasks)])
        return out

    t, out = timed(run)
    check_sums(out, want, tasks)
    return {"t": t}


@op("w5", "ray")
def ray_w5(d: Any, mb: int, tasks: int) -> dict[str, Any]:
    a, want = d.array(mb)
    f = d.r["task_sum"]

    def run() -> list[float]:
        ref = d.ray.put(a)
        out: list[float] = d.ray.get([f.remote(ref) for _ in range(tasks)])
        return out

    t, out = timed(run)
    check_sums(out, want, tasks)
    return {"t": t}


# ---- measuring -------------------------------------------------------------------------------


def measure(s: Suite, cal: dict[str, Any]) -> dict[str, Any]:
    if "W5" not in s.args.workloads:
        return {}
    kw5 = {"mb": MB, "tasks": TASKS}
    entries = s.measure(
        "W5",
        [
            Entry("actionpool plan, array argument (shared memory)", "actionpool", "w5",
                  kw5, "actionpool"),
            Entry("actionpool plan, portable path (variant)", PORTABLE, "w5", kw5,
                  "actionpool-variant"),
            Entry("joblib Parallel (auto-memmap)", "joblib", "w5", kw5, "peer"),
            Entry("concurrent.futures ProcessPoolExecutor.submit (pickled)",
                  "concurrent.futures", "w5", kw5, "peer"),
            Entry("multiprocessing Pool.apply_async (pickled)", "multiprocessing", "w5",
                  kw5, "peer"),
            Entry("loky reusable executor .submit (pickled)", "loky", "w5", kw5, "peer"),
            Entry("mpire apply_async (pickled)", "mpire", "w5", kw5, "peer"),
            Entry("pebble schedule (pickled)", "pebble", "w5", kw5, "peer"),
            Entry("dask scatter(broadcast=True) + submit", "dask", "w5", kw5, "peer"),
            Entry("ray.put + one task per ref", "ray", "w5", kw5, "peer"),
            Entry("one memcpy of the array (np.copyto, pre-faulted, median of 5; reference)",
                  "baseline", "memcpy", {"mb": MB}, "reference"),
        ],
        max(1, s.args.rounds - 2),  # a W5 round takes seconds
    )  # fmt: skip
    for lib in list(s.drivers):  # free the 50 MB copies
        with contextlib.suppress(DriverError):
            s.call(lib, "drop_array")
    return {"W5": entries}


# ---- metric and verdict ----------------------------------------------------------------------


def _context(ctx: Context, entries: list[Entry], res: dict[str, Any]) -> None:
    ctx["tasks5"] = TASKS
    ctx["memcpy"] = reference(ctx, "W5", entries)


def _metric(e: Entry, ctx: Context) -> list[float]:
    if e.kind == "reference":
        return [ctx["memcpy"] / t for t in e.samples]  # the yardstick itself: ~1
    if not ctx.get("memcpy"):
        return []
    return [ctx["tasks5"] * m / t for m, t in zip(round_refs(ctx, "W5", e, "memcpy"), e.samples,
                                                  strict=True) if m]  # fmt: skip


def _targets(tables: Tables, res: dict[str, Any], ctx: Context) -> list[Row]:
    p = primary(tables, "W5")
    if not p or p["median"] is None:
        return []
    b = best_peer(tables, "W5")
    shown = f"{p['median']:.2f}x memcpy (rounds {p['min']:.2f}-{p['max']:.2f}x" + (
        f"; best peer {b['median']:.2f}x)" if b else ")"
    )
    return [verdict("W5", TITLE, ">= 2x one memcpy of effective bandwidth", p["median"],
                    p["median"] >= 2.0, shown, b["contender"] if b else "")]  # fmt: skip


TITLE = "50 MB array to 4 tasks"
WORKLOADS = [
    Workload("W5", TITLE, "x one memcpy (effective bandwidth)", metric=_metric,
             context=_context, targets=_targets),
]  # fmt: skip

# compare.py: actionpool's side of W5, as (what, op, kw)
COMPARE = {
    "W5": lambda cal, args: [
        ("plan of 4 nodes taking a 50 MB array", "w5", {"mb": MB, "tasks": TASKS})
    ]
}
