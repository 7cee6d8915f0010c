"""Micro benchmarks of actionpool's hot paths (pytest-benchmark).

Run the timings with::

    python -m pytest benchmarks/test_micro.py --benchmark-only

and with ``--benchmark-disable`` to run every benchmark once, as a test
(``tests/test_benchmarks_smoke.py`` does that in the normal suite). Every benchmark
also checks its result, so the smoke run checks behaviour, not only that it runs.

What is measured (benchmark group: what one timed call is):

* ``dispatch``: one ``submit`` + ``result()`` round trip on a warm runner (cpu: a
  worker process; io: a pool thread), and 100 calls in flight at once;
* ``fan-in``: a plan of N tiny nodes feeding one node that sums their values;
  ``extra_info["per_node_us"]`` is the median divided by the number of nodes;
* ``run``: a whole plan of 2,000 independent no-op nodes (per node likewise), and
  the same calls on a bare ``ThreadPoolExecutor`` as the yardstick;
* ``state``: ``transfer.dumps_state`` of a realistic state dict (without and with
  shared memory), ``state.merge_state`` of 1,000 deltas (disjoint keys, a reducer,
  the conflict check over a 1,000-node plan with its ancestors computed, a conflict
  found) and ``Graph.ancestors`` alone;
* ``plan``: ``Plan.add`` x 10,000 + ``Plan.graph()`` (a chain and a fan-out), and
  ``Plan.graph()`` alone on those plans;
* ``transfer``: ``Arena.dumps`` / ``Arena.loads`` of a 50 MB array (with plain
  copies of the same array as the yardstick) and ``dumps_call`` of small arguments.

The actions are builtins (``abs``, ``operator.add``...): they import by reference in a
worker from any directory, so the benchmarks time actionpool, not unpickling code.
"""

from __future__ import annotations

import operator
import os
import pickle
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import actionpool as ap
from actionpool.action import wire_form
from actionpool.errors import StateConflict
from actionpool.plan import Graph
from actionpool.shm import DEFAULT_SHM_THRESHOLD, Arena
from actionpool.state import merge_state
from actionpool.transfer import dumps_call, dumps_state, loads

pytest.importorskip("pytest_benchmark")

IO_ABS = ap.action(abs, kind="io", name="io_abs")
IO_SUM = ap.action(sum, kind="io", name="io_sum")
CPU = "cpu"
IO = "io"
KINDS = (CPU, IO)


def _noop(kind: str) -> ap.ActionSpec | Callable[..., Any]:
    return abs if kind == CPU else IO_ABS


def _total(kind: str) -> ap.ActionSpec | Callable[..., Any]:
    return sum if kind == CPU else IO_SUM


def _per_node(benchmark: Any, nodes: int) -> None:
    """Record the time per node (median / nodes) in the benchmark's extra_info."""
    benchmark.extra_info["nodes"] = nodes
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None with --benchmark-disable
        benchmark.extra_info["per_node_us"] = round(stats.stats.median / nodes * 1e6, 2)


@pytest.fixture(scope="module")
def runner() -> Iterator[ap.Runner]:
    """A warm runner: both cpu workers started and the io threads in use."""
    with ap.Runner(cpu_workers=2, io_workers=4) as r:
        # two overlapping calls make the pool start both workers
        warm = [r.submit(time.sleep, 0.2) for _ in range(2)]
        warm += [r.submit(IO_ABS, -i) for i in range(8)]
        for fut in warm:
            fut.result(timeout=60)
        assert len(r.worker_pids()) == 2
        yield r


@pytest.fixture
def arenas() -> Iterator[list[Arena]]:
    """Arenas a benchmark opens; all closed after it, and their segments must be gone."""
    opened: list[Arena] = []
    yield opened
    for arena in opened:
        arena.close()
    prefixes = {a.prefix for a in opened}
    left = [p.name for p in Path("/dev/shm").iterdir() if p.name.rsplit("-", 1)[0] in prefixes]
    assert not left, f"shared-memory segments left behind: {left}"


def _new_arena(opened: list[Arena], threshold: int | None = DEFAULT_SHM_THRESHOLD) -> Arena:
    arena = Arena(f"apbench-{os.getpid()}-{uuid.uuid4().hex[:8]}", threshold)
    opened.append(arena)
    return arena


# ---- dispatch ------------------------------------------------------------------------


@pytest.mark.benchmark(group="dispatch")
@pytest.mark.parametrize("kind", KINDS)
def test_dispatch_round_trip(benchmark: Any, runner: ap.Runner, kind: str) -> None:
    fn = _noop(kind)
    value = benchmark(lambda: runner.submit(fn, -7).result(timeout=30))
    assert value == 7


@pytest.mark.benchmark(group="dispatch")
@pytest.mark.parametrize("kind", KINDS)
def test_dispatch_100_in_flight(benchmark: Any, runner: ap.Runner, kind: str) -> None:
    fn = _noop(kind)

    def hundred() -> list[int]:
        futures = [runner.submit(fn, -i) for i in range(100)]
        return [f.result(timeout=30) for f in futures]

    values = benchmark.pedantic(hundred, rounds=20, warmup_rounds=1)
    assert values == list(range(100))
    _per_node(benchmark, 100)


# ---- result fan-in ---------------------------------------------------------------------


def _fan_in_plan(kind: str, n: int) -> tuple[ap.Plan, ap.Node]:
    plan = ap.Plan()
    parts = [plan.add(_noop(kind), -i) for i in range(n)]
    return plan, plan.add(_total(kind), parts, name="total")


@pytest.mark.benchmark(group="fan-in")
@pytest.mark.parametrize(("kind", "n"), [(CPU, 200), (IO, 500)])
def test_fan_in(benchmark: Any, runner: ap.Runner, kind: str, n: int) -> None:
    plan, total = _fan_in_plan(kind, n)
    report = benchmark.pedantic(runner.run, args=(plan,), rounds=5, warmup_rounds=1)
    assert report.status is ap.RunStatus.SUCCEEDED
    assert report[total] == n * (n - 1) // 2
    assert report.outcome(total).pool == kind
    _per_node(benchmark, n + 1)


# ---- a whole run -------------------------------------------------------------------------

RUN_NODES = 2000


@pytest.mark.benchmark(group="run")
@pytest.mark.parametrize("kind", KINDS)
def test_run_2000_noop_nodes(benchmark: Any, runner: ap.Runner, kind: str) -> None:
    plan = ap.Plan()
    nodes = [plan.add(_noop(kind), -i) for i in range(RUN_NODES)]
    report = benchmark.pedantic(runner.run, args=(plan,), rounds=3)
    assert report.status is ap.RunStatus.SUCCEEDED
    assert [report[n] for n in nodes] == list(range(RUN_NODES))
    assert {o.pool for o in report.outcomes} == {kind}
    _per_node(benchmark, RUN_NODES)


@pytest.mark.benchmark(group="run")
def test_yardstick_thread_pool_2000_calls(benchmark: Any) -> None:
    """The same 2,000 no-op calls on a bare ThreadPoolExecutor(4): no scheduler,
    no pickled copies; what a thread hop and a Future cost on this machine."""
    with ThreadPoolExecutor(4) as pool:

        def calls() -> list[int]:
            futures = [pool.submit(abs, -i) for i in range(RUN_NODES)]
            return [f.result() for f in futures]

        values = benchmark.pedantic(calls, rounds=5, warmup_rounds=1)
    assert values == list(range(RUN_NODES))
    _per_node(benchmark, RUN_NODES)


# ---- state: snapshot and merge ---------------------------------------------------------


def _realistic_state() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "config": {
            "model": "resnet50",
            "lr": 1e-3,
            "layers": [64, 128, 256, 512],
            "tags": {f"tag{i}": i for i in range(50)},
        },
        "records": [
            {"id": i, "name": f"item-{i}", "score": i * 0.5, "ok": i % 3 == 0} for i in range(2000)
        ],
        "lookup": {f"key-{i}": i for i in range(2000)},
        "weights": rng.standard_normal(100_000),  # 800 kB: under the threshold, in-band
        "matrix": rng.standard_normal((512, 512)),  # 2 MiB: shared memory with an arena
    }


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        a["config"] == b["config"]
        and a["records"] == b["records"]
        and a["lookup"] == b["lookup"]
        and np.array_equal(a["weights"], b["weights"])
        and np.array_equal(a["matrix"], b["matrix"])
    )


@pytest.mark.benchmark(group="state")
def test_dumps_state_in_band(benchmark: Any) -> None:
    state = _realistic_state()
    data, descs = benchmark(dumps_state, state)
    assert descs == ()
    assert _same_state(loads(data), state)


@pytest.mark.benchmark(group="state")
def test_dumps_state_with_arena(benchmark: Any, arenas: list[Arena]) -> None:
    """As a run does it: a fresh arena per run, so the 2 MiB matrix is copied each time."""
    state = _realistic_state()

    def fresh() -> tuple[tuple[Arena], dict[str, Any]]:
        for old in arenas:  # keep /dev/shm small: only the last round's segment stays
            old.close()
        return (_new_arena(arenas),), {}

    box: list[Arena] = []

    def snapshot(arena: Arena) -> Any:
        box[:] = [arena]
        return dumps_state(state, arena)

    packed = benchmark.pedantic(snapshot, setup=fresh, rounds=50)
    data, descs = packed
    assert len(descs) == 1 and descs[0][2] == state["matrix"].nbytes
    assert len(data) < state["matrix"].nbytes // 2  # the matrix is not in the pickle
    back = box[0].loads(packed)
    assert _same_state(back, state)
    assert not back["matrix"].flags.writeable


K_DELTAS = 1000


def _chain_graph(n: int) -> Graph:
    plan = ap.Plan()
    prev = plan.add(abs, 0)
    for _ in range(n - 1):
        prev = plan.add(abs, prev)
    return plan.graph()


def _layered_graph(width: int, depth: int) -> Graph:
    """``depth`` layers of ``width`` nodes; each node waits for two of the layer above."""
    plan = ap.Plan()
    layer = [plan.add(abs, i) for i in range(width)]
    for _ in range(depth - 1):
        layer = [plan.add(operator.add, layer[i], layer[(i + 1) % width]) for i in range(width)]
    return plan.graph()


@pytest.fixture(scope="module")
def chain_1000() -> Graph:
    return _chain_graph(K_DELTAS)


@pytest.fixture(scope="module")
def layered_1000() -> Graph:
    return _layered_graph(100, 10)


def _must_not_be_called() -> list[int]:
    raise AssertionError("ancestors were computed, but no key has two writers")


@pytest.mark.benchmark(group="state")
def test_merge_state_disjoint_keys(benchmark: Any) -> None:
    initial = {"base": 1}
    deltas = [(i, f"n{i}", {f"k{i}": i, f"v{i}": [i]}) for i in range(K_DELTAS)]
    state = benchmark(merge_state, initial, deltas, _must_not_be_called)
    assert len(state) == 2 * K_DELTAS + 1
    assert state["k999"] == 999 and state["v3"] == [3] and initial == {"base": 1}


@pytest.mark.benchmark(group="state")
def test_merge_state_with_reducers(benchmark: Any) -> None:
    deltas = [(i, f"n{i}", {"total": i, "count": 1, f"own{i}": i}) for i in range(K_DELTAS)]
    reducers = {"total": operator.add, "count": operator.add}
    state = benchmark(merge_state, {"count": 0}, deltas, _must_not_be_called, reducers)
    assert state["total"] == K_DELTAS * (K_DELTAS - 1) // 2
    assert state["count"] == K_DELTAS
    assert len(state) == K_DELTAS + 2


@pytest.mark.benchmark(group="state")
def test_merge_state_conflict_check_chain_1000(benchmark: Any, chain_1000: Graph) -> None:
    """Every node of a 1,000-node chain sets "last": ordered, so no conflict, but the
    check computes the plan's ancestors (bitsets) and walks every pair of writers."""
    deltas = [(i, f"n{i}", {"last": i, f"own{i}": i}) for i in chain_1000.order]
    state = benchmark(merge_state, None, deltas, chain_1000.ancestors)
    assert state["last"] == K_DELTAS - 1
    assert len(state) == K_DELTAS + 1


@pytest.mark.benchmark(group="state")
def test_merge_state_conflict_found_layered_1000(benchmark: Any, layered_1000: Graph) -> None:
    """1,000 deltas over a 10x100 layered plan; the last two set the same key and no
    path orders them: ancestors are computed, then StateConflict names them."""
    order = layered_1000.order
    deltas = [(i, f"n{i}", {f"own{i}": i}) for i in order[:-2]]
    deltas += [(i, f"n{i}", {"shared": i}) for i in order[-2:]]

    def merge() -> StateConflict:
        with pytest.raises(StateConflict) as info:
            merge_state({}, deltas, layered_1000.ancestors)
        return info.value

    err = benchmark(merge)
    assert err.key == "shared"  # type: ignore[attr-defined]
    assert err.nodes == (f"n{order[-2]}", f"n{order[-1]}")  # type: ignore[attr-defined]


@pytest.mark.benchmark(group="state")
def test_graph_ancestors_layered_1000(benchmark: Any, layered_1000: Graph) -> None:
    anc = benchmark(layered_1000.ancestors)
    assert len(anc) == 1000
    assert anc[0] == 0  # a root
    last = anc[999]  # layer 10 sees layers 1-9, minus what two parents per layer miss
    assert not (last >> 999) & 1 and bin(last).count("1") == 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 + 10
    assert (anc[999] >> 899) & 1 and (anc[999] >> 800) & 1  # its parents, in layer 9


# ---- plan scheduling ---------------------------------------------------------------------

PLAN_NODES = 10_000


def _build_chain(n: int) -> ap.Plan:
    plan = ap.Plan()
    prev = plan.add(abs, 0)
    for _ in range(n - 1):
        prev = plan.add(abs, prev)
    return plan


def _build_fan_out(n: int) -> ap.Plan:
    plan = ap.Plan()
    root = plan.add(abs, 0)
    for _ in range(n - 1):
        plan.add(abs, root)
    return plan


SHAPES = {"chain": _build_chain, "fan_out": _build_fan_out}


def _check_graph(shape: str, graph: Graph) -> None:
    assert len(graph.nodes) == PLAN_NODES
    assert graph.order == tuple(range(PLAN_NODES))
    if shape == "chain":
        assert graph.deps[0] == () and graph.deps[-1] == (PLAN_NODES - 2,)
        assert graph.dependents[5] == (6,)
    else:
        assert graph.dependents[0] == tuple(range(1, PLAN_NODES))
        assert all(d == (0,) for d in graph.deps[1:])


@pytest.mark.benchmark(group="plan")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_plan_add_and_graph_10000(benchmark: Any, shape: str) -> None:
    build = SHAPES[shape]
    graph = benchmark.pedantic(lambda: build(PLAN_NODES).graph(), rounds=5, warmup_rounds=1)
    _check_graph(shape, graph)
    _per_node(benchmark, PLAN_NODES)


@pytest.mark.benchmark(group="plan")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_plan_graph_only_10000(benchmark: Any, shape: str) -> None:
    """What every ``runner.run`` pays before dispatching: resolve, check, order."""
    plan = SHAPES[shape](PLAN_NODES)
    graph = benchmark.pedantic(plan.graph, rounds=10, warmup_rounds=1)
    _check_graph(shape, graph)
    _per_node(benchmark, PLAN_NODES)


# ---- transfer ------------------------------------------------------------------------------

BIG = 50_000_000  # bytes


@pytest.fixture(scope="module")
def big_array() -> np.ndarray:
    return np.random.default_rng(1).random(BIG // 8)


def _spot_check(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal at 1,000 spread positions and at both ends (cheap, touches few pages)."""
    idx = np.linspace(0, len(b) - 1, 1000).astype(np.int64)
    return a.shape == b.shape and bool(np.array_equal(a[idx], b[idx]))


@pytest.mark.benchmark(group="transfer")
def test_yardstick_copy_50mb(benchmark: Any, big_array: np.ndarray) -> None:
    """One memcpy into a fresh array (page faults included): what one copy costs."""
    out = benchmark.pedantic(big_array.copy, rounds=10, warmup_rounds=1)
    assert np.array_equal(out, big_array)


@pytest.mark.benchmark(group="transfer")
def test_arena_dumps_50mb(benchmark: Any, big_array: np.ndarray, arenas: list[Arena]) -> None:
    """A run's first use of an array: one segment created and written (the one copy)."""

    def fresh() -> tuple[tuple[Arena], dict[str, Any]]:
        for old in arenas:
            old.close()
        return (_new_arena(arenas),), {}

    box: list[Arena] = []

    def dump(arena: Arena) -> Any:
        box[:] = [arena]
        return arena.dumps(big_array)

    packed = benchmark.pedantic(dump, setup=fresh, rounds=10, warmup_rounds=1)
    data, descs = packed
    assert len(data) < 1000 and len(descs) == 1 and descs[0][2] == BIG
    back = box[0].loads(packed)
    assert np.array_equal(back, big_array) and not back.flags.writeable


@pytest.mark.benchmark(group="transfer")
def test_arena_dumps_50mb_again(benchmark: Any, big_array: np.ndarray, arenas: list[Arena]) -> None:
    """The same array again in the same run (a second node's argument): no copy."""
    arena = _new_arena(arenas)
    first = arena.dumps(big_array)
    packed = benchmark(arena.dumps, big_array)
    assert packed[1] == first[1]


@pytest.mark.benchmark(group="transfer")
def test_arena_loads_50mb(benchmark: Any, big_array: np.ndarray, arenas: list[Arena]) -> None:
    """A worker's first look at the segment: map it and wrap it, no copy."""
    owner = _new_arena(arenas)
    packed = owner.dumps(big_array)
    readers: list[Arena] = []

    def fresh() -> tuple[tuple[Arena], dict[str, Any]]:
        reader = Arena(owner.prefix, owner.threshold, owner=False)
        readers.append(reader)
        return (reader,), {}

    try:
        back = benchmark.pedantic(
            lambda reader: reader.loads(packed), setup=fresh, rounds=50, warmup_rounds=1
        )
        assert isinstance(back, np.ndarray) and not back.flags.writeable
        assert _spot_check(back, big_array)
    finally:
        for reader in readers:
            reader.close()


@pytest.mark.benchmark(group="transfer")
def test_dumps_call_small_args(benchmark: Any, arenas: list[Arena]) -> None:
    arena = _new_arena(arenas)
    fn = wire_form(ap.action(operator.add))
    args = (3, "text", [1, 2, 3], {"a": 1.5})
    kwargs = {"flag": True, "scale": 2.0}
    data, descs = benchmark(dumps_call, "node", fn, args, kwargs, arena)
    assert descs == ()
    sent_fn, sent_args, sent_kwargs = pickle.loads(data)
    if isinstance(sent_fn, bytes):  # the function may travel pickled on its own
        sent_fn = pickle.loads(sent_fn)
    assert (sent_fn, sent_args, sent_kwargs) == (operator.add, args, kwargs)
