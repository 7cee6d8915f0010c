"""W1, W2, W3 and W9 on a Dask cluster: actionpool's Dask backend against plain ``distributed``.

Both sides run in the ``dask`` driver (``peers.DaskDriver``), on one ``LocalCluster``
on loopback: as many worker processes as the other pools have (``--workers``), one
thread each, configured as ``Runner(backend="dask")`` configures a cluster it starts
(``allowed-failures`` 0, ``worker-saturation`` 1.0). actionpool's side is
``Runner(backend="dask", client=client)`` on that cluster's client, so the two share
the scheduler, the workers and the client's event loop, and each workload interleaves
them round by round. Before each sample the driver waits out the client's message
batching (``DaskDriver.settle``), so that no sample pays for the release of the
previous one's futures. The workloads are the local ones, resized where Dask's cost per
task (one task per item: a few ms each here) would make a sample take a minute:

* W1-dask maps ``x + 1`` over ``W1_N`` items (not 20,000: plain ``client.map`` makes
  one Dask task per item): ``runner.map(inc, xs)`` against ``client.map(inc, xs,
  pure=False)`` + ``client.gather``, in tasks/s. Target: >= 1.0x plain ``client.map``.
* W2-dask is one ``submit`` of a no-op and its ``result()``, the median of up to 100
  sequential round trips within 0.5 s per sample (50 within 0.3 s with ``--quick``),
  in µs: ``runner.submit(noop).result()`` against ``client.submit(noop,
  pure=False).result()``. Dask's client sends its messages in batches every 10 ms
  (``BatchedSend``), so a sequential round trip is ~10 ms on either side. Target:
  <= 1.2x the plain round trip.
* W3-dask runs the 8 x 50 ms busy tasks of W3 at n = workers: ``runner.map(busy,
  ...)`` against ``client.map(busy, ..., pure=False)`` + ``gather``, wall in ms.
  Target: <= 1.0x the plain wall (at least as fast). The runner, warmed with an
  untimed map, knows ``busy``'s attempts are steady and sends them as Dask tasks of
  2 (``pools.dask.batch_count``), where ``client.map`` makes one per item. On a
  machine of a few cores the client, the scheduler and the workers' event loops take
  CPU from the actions, and more of it on actionpool's side (an event per task, a
  process hop on the worker); a cluster's client and scheduler run elsewhere. So W3-dask-spare
  runs the same, where there are 2 workers or more, on a LocalCluster of one worker
  fewer (the ``dask-spare`` driver, a cluster of its own, started for it and closed
  after): the client and the scheduler get a core of their own. Same target.
* W9-dask runs a plan of ``W9_N`` tiny cpu nodes + a fan-in node (the local W9 has
  5,000) on the Dask runner, in nodes/s; plain ``distributed``'s same graph
  (``client.map(inc, ...)`` + ``client.submit(sum, futures)``) is shown beside it.
  Target: >= 2,000 nodes/s.

``--workloads W1`` (W2, W3, W9) takes in its Dask rows; ``W1-dask`` etc. name them
alone. ``--no-dask`` leaves them out, with the ``dask`` driver.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench_tasks import busy, inc, noop
from harness import (
    DASK_SPARE,
    Entry,
    Suite,
    check_values,
    op,
    roundtrips,
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
    per_round,
    primary,
    round_note,
    verdict,
)
from w_maps import ratio_to_best_peer
from w_scaling import w3_kw, w3_rounds

W1_N = 500  # plain client.map: ~3 ms per item on 2 cores, 1.5 s a map
W9_N = 250  # runner.run on Dask: ~10 ms per node on 2 cores today
W9_TARGET = 2_000  # nodes/s

# ---- ops: actionpool's Dask backend, and plain distributed beside it ------------------------


@op("w1_ap", "dask")
def ap_dask_w1(d: Any, n: int) -> dict[str, Any]:
    r = d.ap_runner()
    xs = list(range(n))
    t, out = timed_median(lambda: list(r.map(inc, xs)))
    check_values(out, [x + 1 for x in xs], "w1_ap")
    return {"t": t}


@op("w1_map", "dask")
def plain_dask_w1(d: Any, n: int) -> dict[str, Any]:
    """One Dask task per item, as ``client.map`` makes them (the bag of W1 batches)."""
    c = d.client
    xs = list(range(n))
    t, out = timed_median(lambda: c.gather(c.map(inc, xs, pure=False)))
    check_values(out, [x + 1 for x in xs], "w1_map")
    return {"t": t}


@op("w2_ap", "dask")
def ap_dask_w2(d: Any, k: int, budget_s: float) -> dict[str, Any]:
    r = d.ap_runner()
    return roundtrips(lambda: r.submit(noop).result(), k, budget_s)


# plain distributed's W2 and W3 are the dask peer's ops of W2 (w_maps.dask_w2:
# client.submit(noop, pure=False).result()) and W3 (w_scaling.dask_w3: client.map +
# gather), run here with this module's sizes


@op("w3_ap", "dask")
def ap_dask_w3(d: Any, iters: int, tasks: int) -> dict[str, Any]:
    r = d.ap_runner()
    t, out = timed(lambda: list(r.map(busy, [iters] * tasks)))
    assert len(out) == tasks
    return {"t": t}


@op("w9_ap", "dask")
def ap_dask_w9(d: Any, n: int) -> dict[str, Any]:
    import actionpool as ap

    r = d.ap_runner()
    plan = ap.Plan()
    nodes = [plan.add(inc, i) for i in range(n)]
    total = plan.add(sum, nodes)
    t, report = timed(lambda: r.run(plan))
    report.raise_for_failures()
    assert report[total] == n * (n + 1) // 2
    return {"t": t, "nodes": n + 1}


@op("w9_plain", "dask")
def plain_dask_w9(d: Any, n: int) -> dict[str, Any]:
    c = d.client

    def run() -> int:
        futures = c.map(inc, range(n), pure=False)
        total: int = c.submit(sum, futures, pure=False).result()
        return total

    t, total = timed(run)
    assert total == n * (n + 1) // 2
    return {"t": t, "nodes": n + 1}


# ---- the contenders, measured in interleaved rounds ------------------------------------------


def w2_kw(quick: bool) -> dict[str, Any]:
    return {"k": 50 if quick else 100, "budget_s": 0.3 if quick else 0.5}


def sizes_of(a: Any) -> tuple[int, int]:
    """W1-dask's items and W9-dask's nodes: ``W1_N`` and ``W9_N``, or the hidden
    ``--dask-sizes N1,N9`` (the smoke test's tiny ones)."""
    given = getattr(a, "dask_sizes", None)
    if given:
        n1, n9 = (int(x) for x in str(given).split(","))
        return n1, n9
    return W1_N, W9_N


def wanted(a: Any, wid: str) -> bool:
    """Whether ``wid``'s Dask rows run: ``W1`` takes them in, ``W1-dask`` names them."""
    return wid in a.workloads or f"{wid}-dask" in a.workloads


def measure(s: Suite, cal: dict[str, Any]) -> dict[str, Any]:
    a = s.args
    res: dict[str, Any] = {}
    if "dask" not in a.libs:
        return res  # --no-dask, --only without it, or not installed: recorded as such
    w = a.workers
    n1, n9 = sizes_of(a)
    ours = f"actionpool Runner(backend='dask'), {w} workers:"
    if wanted(a, "W1"):
        kw = {"n": n1}
        res["W1-dask"] = s.measure(
            "W1-dask",
            [
                Entry(f"{ours} runner.map(inc, {n1:,} items)", "dask", "w1_ap", kw,
                      "actionpool"),
                Entry(f"distributed client.map(inc, {n1:,} items, pure=False) + gather",
                      "dask", "w1_map", kw, "peer"),
            ],
            a.rounds,
        )  # fmt: skip
    if wanted(a, "W2"):
        kw2 = w2_kw(a.quick)
        res["W2-dask"] = s.measure(
            "W2-dask",
            [
                Entry(f"{ours} runner.submit(noop).result()", "dask", "w2_ap", kw2,
                      "actionpool"),
                Entry("distributed client.submit(noop, pure=False).result()", "dask", "w2",
                      kw2, "peer"),
            ],
            a.rounds,
        )  # fmt: skip
    if wanted(a, "W3"):
        kw3 = w3_kw(cal)
        res["W3-dask"] = s.measure(
            "W3-dask",
            [
                Entry(f"{ours} runner.map(busy, 8 tasks)", "dask", "w3_ap", kw3, "actionpool"),
                Entry("distributed client.map(busy, 8 tasks, pure=False) + gather", "dask",
                      "w3", kw3, "peer"),
            ],
            w3_rounds(a.rounds),
        )  # fmt: skip
        if w > 1:  # the same on a cluster whose client and scheduler have a core of their own
            spare = w - 1
            workers = f"{spare} worker{'s' if spare > 1 else ''}"
            ours_spare = f"actionpool Runner(backend='dask'), {workers}:"
            res["W3-dask-spare"] = s.measure(
                "W3-dask-spare",
                [
                    Entry(f"{ours_spare} runner.map(busy, 8 tasks)", DASK_SPARE, "w3_ap", kw3,
                          "actionpool"),
                    Entry(f"distributed client.map(busy, 8 tasks, pure=False) + gather,"
                          f" {workers}", DASK_SPARE, "w3", kw3, "peer"),
                ],
                w3_rounds(a.rounds),
            )  # fmt: skip
            s.close([DASK_SPARE])  # its cluster's heartbeats beside no other sample
    if wanted(a, "W9"):
        kw9 = {"n": n9}
        res["W9-dask"] = s.measure(
            "W9-dask",
            [
                Entry(f"{ours} plan of {n9:,} tiny cpu nodes + fan-in", "dask", "w9_ap", kw9,
                      "actionpool"),
                Entry(f"distributed client.map(inc, {n9:,} items) + submit(sum, futures)"
                      " (the same graph, context)", "dask", "w9_plain", kw9, "peer"),
            ],
            a.rounds,
        )  # fmt: skip
    return res


# ---- metrics and verdicts --------------------------------------------------------------------


def _w3_targets(tables: Tables, res: dict[str, Any], ctx: Context) -> list[Row]:
    """actionpool's wall / plain client.map's: the median of the per-round ratios (both
    ran in the same round, so the machine's drift cancels out of each); for W3-dask and,
    where it ran, W3-dask-spare."""
    rows = []
    for wid, title in (("W3-dask", W3_TITLE), ("W3-dask-spare", W3_SPARE_TITLE)):
        if wid not in tables:
            continue
        target = "<= 1.0x plain client.map's wall (at least as fast)"
        p, b = primary(tables, wid), best_peer(tables, wid)
        if not (p and b and p["median"] is not None):
            rows.append(verdict(wid, title, target, None, None, "not measured (no result)"))
            continue
        ratios = per_round(p, b)
        if not ratios:
            rows.append(verdict(wid, title, target, None, None, "no paired rounds"))
            continue
        value = statistics.median(ratios)
        shown = (
            f"{value:.2f}x (median of the per-round ratios; medians {fmt(p['median'])} vs"
            f" {fmt(b['median'])} ms{round_note(ratios, '<=', 1.0)})"
        )
        rows.append(verdict(wid, title, target, value, value <= 1.0, shown, b["contender"]))
    return rows


def _w9_targets(tables: Tables, res: dict[str, Any], ctx: Context) -> list[Row]:
    if "W9-dask" not in tables:
        return []
    p, b = primary(tables, "W9-dask"), best_peer(tables, "W9-dask")
    n = next((e.kw["n"] for e in res.get("W9-dask", []) if e.kind == "actionpool"), W9_N)
    target = f">= {W9_TARGET:,} nodes/s ({n:,} nodes + fan-in)"
    if not (p and p["median"] is not None):
        return [verdict("W9-dask", W9_TITLE, target, None, None, "not measured (no result)")]
    shown = f"{p['median']:,.0f} nodes/s"
    if b and b["median"]:
        shown += f" (plain distributed's graph: {b['median']:,.0f} nodes/s)"
    met = p["median"] >= W9_TARGET
    return [verdict("W9-dask", W9_TITLE, target, p["median"], met, shown,
                    b["contender"] if b else "")]  # fmt: skip


def _notes(wid: str, text: str) -> Any:
    """Notes under ``wid``'s table: the setup, then ``text`` with ``{n}``, the size run."""

    def notes(data: dict[str, Any], an: dict[str, Any]) -> list[str]:
        n = next((e["kw"].get("n") for e in data.get(wid, []) if "n" in e["kw"]), None)
        return ["", SETUP + " " + text.format(n=f"{n:,}" if n else "?")]

    return notes


SETUP = (
    "Both rows ran in the `dask` driver, on one LocalCluster on loopback (a worker process"
    " per core, one thread each; `allowed-failures` 0, `worker-saturation` 1.0, as"
    " actionpool's Dask backend configures a cluster it starts), interleaved round by"
    " round; actionpool's side is `Runner(backend='dask', client=client)` on that"
    " cluster's client."
)
W1_TITLE = "Dask backend: map of tiny calls vs plain client.map"
W2_TITLE = "Dask backend: submit + result round trip vs plain client.submit"
W3_TITLE = "Dask backend: 8 x 50 ms busy tasks vs plain client.map"
W3_SPARE_TITLE = "Dask backend: W3-dask with a core to spare for the client and scheduler"
W9_TITLE = "Dask backend: wide plan of tiny cpu nodes + fan-in"
WORKLOADS = [
    Workload(
        "W1-dask", W1_TITLE, "tasks/s",
        metric=lambda e, ctx: [e.kw["n"] / t for t in e.samples],
        targets=lambda tables, res, ctx: ratio_to_best_peer(
            tables, "W1-dask", W1_TITLE, ">= 1.0x plain client.map's tasks/s", ">=", 1.0),
        notes=_notes("W1-dask", "{n} items, not W1's 20,000: plain `client.map` makes a Dask"
                     " task per item, a few ms each on a small machine."),
    ),
    Workload(
        "W2-dask", W2_TITLE, "µs", higher=False,
        metric=lambda e, ctx: [t * 1e6 for t in e.samples],
        targets=lambda tables, res, ctx: ratio_to_best_peer(
            tables, "W2-dask", W2_TITLE, "<= 1.2x plain client.submit's round trip", "<=",
            1.2),
        notes=_notes("W2-dask", "Sequential round trips; Dask's client batches its messages"
                     " every 10 ms, which bounds both sides."),
    ),
    Workload(
        "W3-dask", W3_TITLE, "ms (wall)", higher=False,
        metric=lambda e, ctx: [t * 1e3 for t in e.samples],
        targets=_w3_targets,
        notes=_notes("W3-dask", "The tasks of W3, at n = workers. The client, the scheduler"
                     " and the workers' event loops share the cores with the actions."),
    ),
    Workload(
        "W3-dask-spare", W3_SPARE_TITLE, "ms (wall)", higher=False,
        metric=lambda e, ctx: [t * 1e3 for t in e.samples],
        targets=lambda tables, res, ctx: [],  # judged with W3-dask (_w3_targets)
        notes=lambda data, an: ["", "As W3-dask, on a LocalCluster of one worker fewer than"
                                " cores (the `dask-spare` driver, a cluster of its own): the"
                                " client and the scheduler have a core to themselves, as"
                                " they do on a cluster, and every action a core of its own."],
    ),
    Workload(
        "W9-dask", W9_TITLE, "nodes/s",
        metric=lambda e, ctx: [ex["nodes"] / ex["t"] for ex in e.extras],
        targets=_w9_targets,
        notes=_notes("W9-dask", "{n} nodes, not W9's 5,000: a node is a Dask task. The"
                     " plain row runs the same graph (`client.map` + `client.submit(sum,"
                     " futures)`), for context; the target is absolute."),
    ),
]  # fmt: skip
