"""W6: 20 x 50 ms sleeps on threads (actionpool ``kind="io"``).

Every thread pool has 20 threads, so the ideal wall is one sleep, 50 ms; the metric is
wall / ideal. Target: <= 1.1x. Dask runs it on its local threaded scheduler
(``scheduler="threads"``), the one Dask recommends for I/O-bound work; loky and Ray have
no thread pool.
"""

from __future__ import annotations

from typing import Any

from bench_tasks import nap
from harness import (
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
    best_peer,
    primary,
    verdict,
)

N = 20
SECONDS = 0.05

# ---- ops -------------------------------------------------------------------------------------


@op("w6", "actionpool")
def ap_w6(d: Any, n: int, seconds: float) -> dict[str, Any]:
    t, out = timed(lambda: list(d.runner.map(d.nap_io, [seconds] * n)))
    assert len(out) == n
    return {"t": t}


@op("w6_plan", "actionpool")
def ap_w6_plan(d: Any, n: int, seconds: float) -> dict[str, Any]:
    def run() -> Any:
        plan = d.ap.Plan()
        for _ in range(n):
            plan.add(d.nap_io, seconds)
        return d.run_plan(plan)

    t, _ = timed(run)
    return {"t": t}


@op("w6", "concurrent.futures", "multiprocessing")
def threads_map_w6(d: Any, n: int, seconds: float) -> dict[str, Any]:
    threads = d.thread_pool()
    t, _ = timed(lambda: list(threads.map(nap, [seconds] * n)))
    return {"t": t}


@op("w6", "mpire")
def mpire_w6(d: Any, n: int, seconds: float) -> dict[str, Any]:
    threads = d.thread_pool()
    t, _ = timed(lambda: threads.map(nap, [seconds] * n))
    return {"t": t}


@op("w6", "pebble")
def pebble_w6(d: Any, n: int, seconds: float) -> dict[str, Any]:
    threads = d.thread_pool()
    t, _ = timed(lambda: list(threads.map(nap, [seconds] * n).result()))
    return {"t": t}


@op("w6", "joblib")
def joblib_w6(d: Any, n: int, seconds: float) -> dict[str, Any]:
    t, _ = timed(lambda: d.par(IO_THREADS, nap, [seconds] * n, prefer="threads"))
    return {"t": t}


@op("w6", "dask")
def dask_w6(d: Any, n: int, seconds: float) -> dict[str, Any]:
    def run() -> Any:
        parts = [d.dask.delayed(nap, pure=False)(seconds) for _ in range(n)]
        return d.dask.compute(*parts, scheduler="threads", num_workers=IO_THREADS)

    t, _ = timed(run)
    return {"t": t}


# ---- measuring -------------------------------------------------------------------------------


def measure(s: Suite, cal: dict[str, Any]) -> dict[str, Any]:
    if "W6" not in s.args.workloads:
        return {}
    kw6 = {"n": N, "seconds": SECONDS}
    t = IO_THREADS
    entries = s.measure(
        "W6",
        [
            Entry(f'actionpool runner.map of a kind="io" action (io_workers={t})',
                  "actionpool", "w6", kw6, "actionpool"),
            Entry("actionpool plan of 20 io nodes (variant)", "actionpool", "w6_plan", kw6,
                  "actionpool-variant"),
            Entry(f"concurrent.futures ThreadPoolExecutor({t}).map", "concurrent.futures",
                  "w6", kw6, "peer"),
            Entry(f"multiprocessing.pool.ThreadPool({t}).map", "multiprocessing", "w6",
                  kw6, "peer"),
            Entry(f'joblib Parallel(n_jobs={t}, prefer="threads")', "joblib", "w6", kw6,
                  "peer"),
            Entry(f'mpire WorkerPool({t}, start_method="threading").map', "mpire", "w6",
                  kw6, "peer"),
            Entry(f"pebble ThreadPool({t}).map", "pebble", "w6", kw6, "peer"),
            Entry(f'dask.compute(scheduler="threads", num_workers={t})', "dask", "w6",
                  kw6, "peer"),
        ],
        s.args.rounds,
    )  # fmt: skip
    return {"W6": entries}


# ---- metric and verdict ----------------------------------------------------------------------


def _context(ctx: Context, entries: list[Entry], res: dict[str, Any]) -> None:
    ctx["ideal6"] = SECONDS  # N tasks on IO_THREADS >= N threads: one sleep


def _targets(tables: Tables, res: dict[str, Any], ctx: Context) -> list[Row]:
    p = primary(tables, "W6")
    if not p or p["median"] is None:
        return []
    b = best_peer(tables, "W6")
    shown = f"{p['median']:.2f}x ideal" + (f" (best peer {b['median']:.2f}x)" if b else "")
    return [verdict("W6", TITLE, "<= 1.1x ideal (50 ms)", p["median"], p["median"] <= 1.1,
                    shown, b["contender"] if b else "")]  # fmt: skip


TITLE = "20 x 50 ms sleeps on threads"
WORKLOADS = [
    Workload("W6", TITLE, "x ideal (wall / 50 ms)", higher=False,
             metric=lambda e, ctx: [t / ctx["ideal6"] for t in e.samples],
             context=_context, targets=_targets),
]  # fmt: skip

# compare.py: actionpool's side of W6, as (what, op, kw)
COMPARE = {"W6": lambda cal, args: [("runner.map of 20 x 50 ms io sleeps", "w6",
                                      {"n": N, "seconds": SECONDS})]}  # fmt: skip
