"""W1 map of tiny calls and W2 submit + result round trip: the cost of one call.

* W1 maps ``x + 1`` over 20,000 items, in tasks/s. Each peer is used the way its docs
  recommend for a map: ``Pool.map``'s default chunksize, joblib ``batch_size="auto"``,
  mpire's automatic chunks; ``Executor.map`` / pebble with ``chunksize = ceil(n / (4 x
  workers))``, multiprocessing's default formula; a Dask bag and Ray tasks over ``4 x
  workers`` partitions. A sample is the median of up to 5 maps within 50 ms.
* W2 is one ``submit`` of a no-op and its ``result()`` on a warm pool, the median of up
  to 300 round trips per sample (100 with ``--quick``), in µs; a raw
  ``multiprocessing.Pipe`` round trip is the reference.

Targets: W1 >= 1.0x the best peer's tasks/s, W2 <= 1.0x the best peer's round trip.
"""

from __future__ import annotations

from typing import Any

from bench_tasks import chunks, inc, mp_chunksize, noop
from harness import (
    PORTABLE,
    Entry,
    Suite,
    check_values,
    op,
    roundtrips,
    timed_median,
)
from results import (
    Context,
    Row,
    Tables,
    Workload,
    best_peer,
    fmt,
    per_round,
    primary,
    round_note,
    verdict,
)

W1_N = 20_000

# ---- ops: what one sample is, per library ----------------------------------------------------


@op("w1", "actionpool")
def ap_w1(d: Any, n: int) -> dict[str, Any]:
    xs = list(range(n))
    t, out = timed_median(lambda: list(d.runner.map(inc, xs)))
    check_values(out, [x + 1 for x in xs], "w1")
    return {"t": t}


@op("w1", "concurrent.futures", "loky")
def executor_w1(d: Any, n: int) -> dict[str, Any]:
    xs = list(range(n))
    cs = mp_chunksize(n, d.workers)
    t, out = timed_median(lambda: list(d.ex.map(inc, xs, chunksize=cs)))
    check_values(out, [x + 1 for x in xs], "w1")
    return {"t": t}


@op("w1", "multiprocessing", "mpire")
def pool_w1(d: Any, n: int) -> dict[str, Any]:
    xs = list(range(n))
    t, out = timed_median(lambda: d.pool.map(inc, xs))
    check_values(out, [x + 1 for x in xs], "w1")
    return {"t": t}


@op("w1", "joblib")
def joblib_w1(d: Any, n: int) -> dict[str, Any]:
    xs = list(range(n))
    t, out = timed_median(lambda: d.par(d.workers, inc, xs, batch_size="auto"))
    check_values(out, [x + 1 for x in xs], "w1")
    return {"t": t}


@op("w1", "pebble")
def pebble_w1(d: Any, n: int) -> dict[str, Any]:
    xs = list(range(n))
    cs = mp_chunksize(n, d.workers)
    t, out = timed_median(lambda: list(d.pool.map(inc, xs, chunksize=cs).result()))
    check_values(out, [x + 1 for x in xs], "w1")
    return {"t": t}


@op("w1", "dask")
def dask_w1(d: Any, n: int) -> dict[str, Any]:
    import dask.bag as db

    xs = list(range(n))
    bag = db.from_sequence(xs, npartitions=4 * d.workers)
    t, out = timed_median(lambda: bag.map(inc).compute())
    check_values(out, [x + 1 for x in xs], "w1")
    return {"t": t}


@op("w1", "ray")
def ray_w1(d: Any, n: int) -> dict[str, Any]:
    """Tiny calls batched into 4 x workers tasks: Ray advises against tasks this small."""
    xs = list(range(n))
    f = d.r["inc_chunk"]

    def run() -> list[int]:
        parts = d.ray.get([f.remote(c) for c in chunks(xs, 4 * d.workers)])
        return [y for part in parts for y in part]

    t, out = timed_median(run)
    check_values(out, [x + 1 for x in xs], "w1")
    return {"t": t}


@op("w2", "actionpool")
def ap_w2(d: Any, k: int, budget_s: float) -> dict[str, Any]:
    r = d.runner
    return roundtrips(lambda: r.submit(noop).result(), k, budget_s)


@op("w2", "concurrent.futures", "loky")
def executor_w2(d: Any, k: int, budget_s: float) -> dict[str, Any]:
    ex = d.ex
    return roundtrips(lambda: ex.submit(noop).result(), k, budget_s)


@op("w2", "multiprocessing", "mpire")
def pool_w2(d: Any, k: int, budget_s: float) -> dict[str, Any]:
    pool = d.pool
    return roundtrips(lambda: pool.apply_async(noop).get(), k, budget_s)


@op("w2", "pebble")
def pebble_w2(d: Any, k: int, budget_s: float) -> dict[str, Any]:
    pool = d.pool
    return roundtrips(lambda: pool.schedule(noop).result(), k, budget_s)


@op("w2", "dask")
def dask_w2(d: Any, k: int, budget_s: float) -> dict[str, Any]:
    c = d.client
    return roundtrips(lambda: c.submit(noop, pure=False).result(), k, budget_s)


@op("w2", "ray")
def ray_w2(d: Any, k: int, budget_s: float) -> dict[str, Any]:
    f = d.r["noop"]
    return roundtrips(lambda: d.ray.get(f.remote()), k, budget_s)


# ---- the contenders, measured in interleaved rounds ------------------------------------------


def w2_kw(quick: bool) -> dict[str, Any]:
    return {"k": 100 if quick else 300, "budget_s": 1.0 if quick else 2.0}


def measure(s: Suite, cal: dict[str, Any]) -> dict[str, Any]:
    a = s.args
    w = a.workers
    res: dict[str, Any] = {}
    if "W1" in a.workloads:
        cs = mp_chunksize(W1_N, w)
        kw = {"n": W1_N}
        res["W1"] = s.measure(
            "W1",
            [
                Entry("actionpool runner.map (auto batching)", "actionpool", "w1", kw,
                      "actionpool"),
                Entry("actionpool runner.map, portable path (variant)", PORTABLE, "w1", kw,
                      "actionpool-variant"),
                Entry("multiprocessing Pool.map (default chunksize)", "multiprocessing", "w1",
                      kw, "peer"),
                Entry(f"concurrent.futures ProcessPoolExecutor.map(chunksize={cs})",
                      "concurrent.futures", "w1", kw, "peer"),
                Entry('joblib Parallel(batch_size="auto")', "joblib", "w1", kw, "peer"),
                Entry(f"loky reusable executor .map(chunksize={cs})", "loky", "w1", kw, "peer"),
                Entry("mpire WorkerPool.map (automatic chunks)", "mpire", "w1", kw, "peer"),
                Entry(f"pebble ProcessPool.map(chunksize={cs})", "pebble", "w1", kw, "peer"),
                Entry(f"dask.bag.map, {4 * w} partitions, distributed", "dask", "w1", kw, "peer"),
                Entry(f"ray, {4 * w} batched tasks", "ray", "w1", kw, "peer"),
            ],
            a.rounds,
        )  # fmt: skip
    if "W2" in a.workloads:
        kw2 = w2_kw(a.quick)
        res["W2"] = s.measure(
            "W2",
            [
                Entry("actionpool runner.submit(noop).result()", "actionpool", "w2", kw2,
                      "actionpool"),
                Entry("actionpool submit().result(), portable path (variant)", PORTABLE, "w2",
                      kw2, "actionpool-variant"),
                Entry("concurrent.futures ProcessPoolExecutor.submit", "concurrent.futures",
                      "w2", kw2, "peer"),
                Entry("multiprocessing Pool.apply_async().get()", "multiprocessing", "w2", kw2,
                      "peer"),
                Entry("loky reusable executor .submit", "loky", "w2", kw2, "peer"),
                Entry("mpire WorkerPool.apply_async().get()", "mpire", "w2", kw2, "peer"),
                Entry("pebble ProcessPool.schedule", "pebble", "w2", kw2, "peer"),
                Entry("dask client.submit(pure=False).result()", "dask", "w2", kw2, "peer"),
                Entry("ray f.remote() + ray.get", "ray", "w2", kw2, "peer"),
                Entry("raw multiprocessing.Pipe round trip (reference)", "baseline",
                      "pipe_roundtrip", kw2, "reference"),
            ],
            a.rounds,
        )  # fmt: skip
    return res


# ---- metrics and verdicts --------------------------------------------------------------------


def _w1_context(ctx: Context, entries: list[Entry], res: dict[str, Any]) -> None:
    ctx["n1"] = W1_N


def ratio_to_best_peer(
    tables: Tables, wid: str, title: str, target: str, op: str, limit: float
) -> list[Row]:
    """The verdict 'actionpool's median / the best peer's median, op limit'."""
    if wid not in tables:
        return []
    p, b = primary(tables, wid), best_peer(tables, wid)
    if not (p and b and p["median"] is not None):
        return [verdict(wid, title, target, None, None, "not measured (no actionpool or peer"
                        " result)")]  # fmt: skip
    ratio = p["median"] / b["median"]
    met = ratio >= limit if op == ">=" else ratio <= limit
    unit = tables[wid]["unit"]
    rounds = round_note(per_round(p, b), op, limit)
    shown = f"{ratio:.2f}x ({fmt(p['median'])} vs {fmt(b['median'])} {unit}{rounds})"
    return [verdict(wid, title, target, ratio, met, shown, b["contender"])]


W1_TITLE = "map of tiny calls (x + 1)"
W2_TITLE = "submit + result round trip (warm pool)"
WORKLOADS = [
    Workload(
        "W1", W1_TITLE, "tasks/s",
        metric=lambda e, ctx: [ctx["n1"] / t for t in e.samples],
        context=_w1_context,
        targets=lambda tables, res, ctx: ratio_to_best_peer(
            tables, "W1", W1_TITLE, ">= 1.0x the best peer's tasks/s", ">=", 1.0),
    ),
    Workload(
        "W2", W2_TITLE, "µs", higher=False,
        metric=lambda e, ctx: [t * 1e6 for t in e.samples],
        targets=lambda tables, res, ctx: ratio_to_best_peer(
            tables, "W2", W2_TITLE, "<= 1.0x the best peer's round trip", "<=", 1.0),
    ),
]  # fmt: skip

# compare.py: actionpool's side of these workloads, as (what, op, kw)
COMPARE = {
    "W1": lambda cal, args: [(f"runner.map of {W1_N:,} tiny calls", "w1", {"n": W1_N})],
    "W2": lambda cal, args: [("submit(noop).result() round trip", "w2", w2_kw(args.quick))],
}
