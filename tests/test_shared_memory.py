"""Zero-copy arrays: shared memory once per run, read-only views, nothing left in /dev/shm.

Segments of a Runner's pool (``ap-<pid>-pool-<n>``, reused from run to run) may stay
while that Runner is open; nothing may survive its close.
"""

from __future__ import annotations

import gc
import glob
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import actionpool as ap
from actionpool import shm
from actionpool.shm import Arena, open_pool_segments, segment_of
from tests import fault_actions as fa
from tests import helpers as h

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def segments(pattern: str = "ap-*") -> list[str]:
    return sorted(glob.glob(f"/dev/shm/{pattern}"))


def mine() -> list[str]:
    """This process's segments, except those of the pools of open Runners."""
    pooled = open_pool_segments()
    return [s for s in segments(f"ap-{os.getpid()}-*") if os.path.basename(s) not in pooled]


@pytest.fixture(scope="module")
def shared() -> Iterator[ap.Runner]:
    with ap.Runner(cpu_workers=2, io_workers=2, timeout_grace=0.3) as r:
        yield r


@pytest.fixture(autouse=True)
def no_leftover_segments() -> Iterator[None]:
    yield
    assert mine() == [], "a run left shared memory behind"


# ---- actions (module level: workers import them by reference) --------------------------


def describe(ctx: ap.Context, a: np.ndarray) -> dict[str, object]:
    """What the action sees of its argument and of the state's array."""
    s = ctx.state.get("big")
    try:
        a[0] = -1.0
        wrote = True
    except ValueError:
        wrote = False
    return {
        "writeable": a.flags.writeable,
        "wrote": wrote,
        "sum": float(a.sum()),
        "segment": segment_of(a),
        "state_segment": None if s is None else segment_of(s),
        "state_writeable": None if s is None else s.flags.writeable,
        "pid": os.getpid(),
    }


def ones(n: int) -> np.ndarray:
    return np.ones(n)


def total(x: np.ndarray) -> tuple[bool, float]:
    return x.flags.writeable, float(x.sum())


def identity(x: np.ndarray) -> np.ndarray:
    return x


@ap.action(kind="io")
def io_describe(a: np.ndarray) -> tuple[bool, float]:
    return a.flags.writeable, float(a.sum())


# ---- behaviour -----------------------------------------------------------------------------


def test_a_large_argument_arrives_read_only_and_the_callers_array_is_untouched(
    shared: ap.Runner,
) -> None:
    a = np.arange(1_000_000, dtype=np.float64)  # 8 MB
    plan = ap.Plan()
    n = plan.add(describe, a)
    out = shared.run(plan)[n]
    assert out["writeable"] is False and out["wrote"] is False
    assert out["sum"] == float(a.sum())
    assert out["pid"] != os.getpid()
    assert a.flags.writeable and a[0] == 0.0  # ours: writeable, unchanged


def test_one_segment_per_array_per_run_however_many_nodes_read_it(shared: ap.Runner) -> None:
    a = np.random.default_rng(0).random(2_000_000)  # 16 MB
    plan = ap.Plan()
    nodes = [plan.add(describe, a) for _ in range(8)]
    report = shared.run(plan, state={"big": a})  # the same array as state, too
    outs = [report[n] for n in nodes]
    names = {o["segment"] for o in outs} | {o["state_segment"] for o in outs}
    assert len(names) == 1 and None not in names  # one copy for 8 args + the state
    assert all(o["state_writeable"] is False for o in outs)
    assert len({o["pid"] for o in outs}) >= 1


def test_small_arrays_stay_in_the_pickle_and_are_writeable(shared: ap.Runner) -> None:
    a = np.arange(1000, dtype=np.float64)  # 8 KB < 1 MiB
    plan = ap.Plan()
    n = plan.add(describe, a)
    out = shared.run(plan)[n]
    assert out["writeable"] is True and out["segment"] is None


def test_the_threshold_is_configurable() -> None:
    a = np.arange(10_000, dtype=np.float64)  # 80 KB
    with ap.Runner(cpu_workers=1, io_workers=1, shm_threshold=64 * 1024) as r:
        plan = ap.Plan()
        n = plan.add(describe, a)
        assert r.run(plan)[n]["segment"] is not None
    with ap.Runner(cpu_workers=1, io_workers=1, shm_threshold=None) as r:
        plan = ap.Plan()
        n = plan.add(describe, np.arange(1_000_000, dtype=np.float64))
        out = r.run(plan)[n]
        assert out["segment"] is None and out["writeable"] is True  # a pickled copy
    with pytest.raises(ValueError, match="shm_threshold"):
        ap.Runner(shm_threshold=-1)


def test_node_to_node_values_travel_through_shared_memory(shared: ap.Runner) -> None:
    plan = ap.Plan()
    made = plan.add(ones, 1_000_000)
    passed = plan.add(identity, made)
    used = plan.add(total, passed)
    report = shared.run(plan)
    assert report[used] == (False, 1_000_000.0)
    value = report[made]
    assert isinstance(value, np.ndarray) and not value.flags.writeable
    assert float(value.sum()) == 1_000_000.0  # still readable after the run's cleanup


def test_io_actions_get_read_only_views_too(shared: ap.Runner) -> None:
    a = np.ones(500_000)
    plan = ap.Plan()
    n = plan.add(io_describe, a)
    assert shared.run(plan)[n] == (False, 500_000.0)


def test_submit_and_map_use_shared_memory_too(shared: ap.Runner) -> None:
    a = np.ones(300_000)
    assert shared.submit(total, a).result(timeout=30) == (False, 300_000.0)
    assert list(shared.map(total, [a, a])) == [(False, 300_000.0)] * 2


def test_a_large_value_returned_by_a_call_sent_from_submit_is_cleaned_up() -> None:
    # A warm worker: the call is sent by submit itself and has no record; the worker
    # writes its result to a segment of the call's own arena, which must go when the
    # call ends, while the value stays readable.
    with ap.Runner(cpu_workers=1, io_workers=1, memory_floor=0) as r:
        assert r.submit(total, np.ones(10)).result(timeout=30) == (True, 10.0)  # warm
        value = r.submit(ones, 1_000_000).result(timeout=30)
        assert isinstance(value, np.ndarray) and not value.flags.writeable  # shared
    assert float(value.sum()) == 1_000_000.0
    # (the autouse fixture then checks that no segment of this process is left)


def test_arena_places_each_buffer_once() -> None:
    arena = Arena(f"ap-{os.getpid()}-unit", MiB)
    try:
        a = np.ones(MiB)
        _, first = arena.dumps((a, a[: MiB // 2]))
        _, again = arena.dumps({"x": a})
        assert len(first) == 2 and len({d[0] for d in first}) == 1  # a view of a: same segment
        assert again == first[:1]
        b = arena.loads(arena.dumps(a))
        assert not b.flags.writeable and np.array_equal(a, b)
        assert len(mine()) == 1
    finally:
        arena.close()
    assert mine() == []


# ---- reusable segments (the Runner's SegmentPool) -----------------------------------------


def where(a: np.ndarray) -> tuple[str | None, float]:
    """The segment the worker sees ``a`` in, and its sum."""
    return segment_of(a), float(a.sum())


def cached_pool_mappings() -> list[str]:
    return sorted(shm._POOL_MAPPINGS)


def first_half(x: np.ndarray) -> np.ndarray:
    return x[: len(x) // 2]


@ap.action(kind="io")
def io_identity(x: np.ndarray) -> np.ndarray:
    return x


def pool_of(runner: ap.Runner) -> Any:
    return runner._segments


def test_later_runs_reuse_the_segment_and_see_their_own_data() -> None:
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        seen = []
        for k in range(3):
            a = np.full(500_000, float(k))  # 4 MB, other data each run
            plan = ap.Plan()
            n = plan.add(where, a)
            seen.append(r.run(plan)[n])
        pool = pool_of(r)
        names = {name for name, _ in seen}
        assert len(names) == 1 and None not in names  # one segment, reused
        assert [total for _, total in seen] == [0.0, 500_000.0, 1_000_000.0]
        assert pool.created == 1 and pool.reused == 2
        assert os.path.exists(f"/dev/shm/{names.pop().lstrip('/')}")  # kept while open
        kept = pool.names()
    assert kept and not any(os.path.exists(f"/dev/shm/{n}") for n in kept)  # closed: gone


@pytest.mark.parametrize("how", ["cpu identity", "cpu slice", "io identity", "submit"])
def test_a_value_that_points_into_an_input_segment_is_never_overwritten(how: str) -> None:
    n = 500_000
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        a = np.arange(n, dtype=np.float64)
        if how == "submit":
            value = r.submit(identity, a).result(timeout=60)
        else:
            fn = {"cpu identity": identity, "cpu slice": first_half, "io identity": io_identity}
            plan = ap.Plan()
            node = plan.add(fn[how], a)
            value = r.run(plan)[node]
        assert not value.flags.writeable
        want = a[: len(value)].copy()
        assert np.array_equal(value, want)
        pool = pool_of(r)
        for k in range(3):  # later runs with other data of the same size
            plan = ap.Plan()
            m = plan.add(where, np.full(n, -1.0 - k))
            assert r.run(plan)[m][1] == n * (-1.0 - k)
        # checked only now: a submit's future may resolve before its arena closes
        assert pool.discarded == 1  # not recycled: it is in use
        assert np.array_equal(value, want)  # unchanged under the user
    assert np.array_equal(value, want)  # and after the runner closed


def test_workers_drop_their_mapping_of_a_segment_the_pool_unlinked() -> None:
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        plan = ap.Plan()
        n = plan.add(where, np.ones(500_000))
        name, _ = r.run(plan)[n]
        plan = ap.Plan()
        probe = plan.add(cached_pool_mappings)
        assert r.run(plan)[probe] == [name]  # kept from one run to the next
        pool = pool_of(r)
        pool.max_free = 0  # from now on every released segment is unlinked at once
        plan = ap.Plan()
        n = plan.add(where, np.ones(500_000))
        assert r.run(plan)[n][0] == name  # reused, then released and trimmed
        assert pool.trimmed == 1 and pool.names() == set()
        plan = ap.Plan()
        probe = plan.add(cached_pool_mappings)
        assert r.run(plan)[probe] == []  # the broadcast reached the worker first


@ap.action(kind="io")
def io_total(a: np.ndarray) -> float:
    return float(a.sum())


def test_calls_in_flight_together_keep_their_shared_memory_apart() -> None:
    # Each call has an arena of its own, named by a prefix of its own: the first call's
    # end must not unlink, unmap or unregister what the second one has not read yet.
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        first, second = np.full(MiB // 4, 1.0), np.full(MiB // 4, 2.0)
        futures = [r.submit(io_total, a) for a in (first, second)]  # one io thread: in turn
        futures += [r.submit(where, a) for a in (first, second)]
        got = [f.result(timeout=60) for f in futures]
        assert got[:2] == [MiB / 4, MiB / 2]
        assert [total for _, total in got[2:]] == [MiB / 4, MiB / 2]
    assert len({shm.run_prefix("same-run") for _ in range(1000)}) == 1000


# ---- a map's shared keyword arguments: one copy for the whole map ----------------------


def where_item(i: int, big: np.ndarray) -> tuple[str | None, float]:
    """The segment the worker sees the map's shared array in, and item ``i`` of it."""
    return segment_of(big), float(big[i])


io_where_item = ap.action(where_item, kind="io", name="io_where_item")


def crash_or_read(i: int, big: np.ndarray, bad: int) -> float:
    if i == bad:
        os._exit(9)
    return float(big[i])


def stores(r: ap.Runner) -> int:
    """Buffers copied into the runner's segment pool so far."""
    return int(pool_of(r).created + pool_of(r).reused)


@pytest.mark.parametrize(
    ("fn", "chunksize"),
    [(where_item, 1), (where_item, None), (io_where_item, None)],
    ids=["cpu calls", "cpu chunks", "io calls"],
)
def test_a_map_copies_an_array_that_every_item_shares_once(fn: Any, chunksize: Any) -> None:
    big = np.arange(MiB // 4, dtype=np.float64) * 2  # 2 MiB
    with ap.Runner(cpu_workers=2, io_workers=2) as r:
        before = stores(r)
        out = list(r.map(fn, range(0, 60_000, 1000), big=big, chunksize=chunksize))
        assert [v for _, v in out] == [2.0 * i for i in range(0, 60_000, 1000)]
        names = {name for name, _ in out}
        assert len(names) == 1 and None not in names, names  # one segment for every call
        assert stores(r) - before == 1  # one copy for the whole map
        big[0] = 5.0
        again = list(r.map(fn, [0, 1], big=big, chunksize=chunksize))
        assert [v for _, v in again] == [5.0, 2.0]  # a new map: a new copy
        assert stores(r) - before == 2


def test_a_map_stopped_early_or_dropped_unread_releases_its_shared_array() -> None:

    big = np.ones(MiB // 4)
    before = set(shm._ARENAS)  # other tests' runs may be open still

    def open_arenas() -> set[str]:
        return set(shm._ARENAS) - before

    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        it = r.map(where_item, range(50), big=big, chunksize=1)
        assert next(it)[1] == 1.0
        it.close()
        h.wait_for(lambda: not open_arenas(), what="the stopped map's arenas to close")
        dropped = r.map(where_item, range(50), big=big, chunksize=1)  # never read
        assert open_arenas()
        del dropped
        gc.collect()
        h.wait_for(lambda: not open_arenas(), what="the dropped map's arenas to close")
        assert pool_of(r).free_bytes > 0  # the map's segment went back to the pool


def test_the_items_of_a_crashed_chunk_are_sent_again_with_the_map_s_shared_array() -> None:
    big = np.arange(MiB // 4, dtype=np.float64)
    with ap.Runner(cpu_workers=2, io_workers=1) as r:
        before = stores(r)
        got: list[float] = []
        with pytest.raises(ap.WorkerCrashed):
            for y in r.map(crash_or_read, range(40), big=big, bad=17, chunksize=10):
                got.append(y)
        assert got == [float(i) for i in range(17)]  # the items before the crash, in order
        assert stores(r) - before == 1  # the chunk's items, sent again, used the same copy


@pytest.mark.parametrize("why", ["closed runner", "foreign journal"])
def test_a_run_refused_before_it_starts_gives_back_its_state_s_shared_memory(
    tmp_path: Path, why: str
) -> None:
    before = set(shm._ARENAS)
    plan = ap.Plan()
    plan.add(h.set_key, "seen", 1)  # takes a Context: the state is pickled for the run
    r = ap.Runner(cpu_workers=1, io_workers=1)
    journal = None
    if why == "closed runner":
        r.close()
    else:
        journal = tmp_path / "run.db"
        journal.write_bytes(b"not a database at all" * 100)
    try:
        with pytest.raises((RuntimeError, ap.JournalError)):
            r.run(plan, state={"big": np.ones(MiB)}, journal=journal)
        assert set(shm._ARENAS) <= before  # the run's arena closed
        if why == "foreign journal":
            assert pool_of(r).free_bytes > 0  # the state's segment went back to the pool
    finally:
        r.close()


# ---- cleanup after every kind of ending --------------------------------------------------


def sleep_with(a: np.ndarray, seconds: float) -> float:
    time.sleep(seconds)
    return float(a.sum())


def crash_with(a: np.ndarray) -> None:
    os._exit(1)


def return_big_then_crash(flag: str) -> np.ndarray:
    return np.ones(1_000_000)


class _DiesWhenPickled:
    def __reduce__(self) -> tuple[object, ...]:
        os._exit(3)  # in the worker, after the array before it went to a segment


def big_then_die() -> tuple[np.ndarray, _DiesWhenPickled]:
    return np.ones(1_000_000), _DiesWhenPickled()


def test_no_segment_survives_a_call_whose_worker_died_while_returning() -> None:
    # The worker writes the array to a segment of the call's own arena, then dies
    # pickling the rest: nobody will claim the segment, so the call's end must find it
    # (a call sent by submit itself, to a warm worker, has no record to do it).
    with ap.Runner(cpu_workers=1, io_workers=1, memory_floor=0) as r:
        assert r.submit(ones, 10).result(timeout=30).shape == (10,)  # warm
        with pytest.raises(ap.WorkerCrashed):
            r.submit(big_then_die).result(timeout=30)
        deadline = time.monotonic() + 5
        while mine() and time.monotonic() < deadline:  # cleaned once the death is seen
            time.sleep(0.01)
        assert mine() == []


@pytest.mark.parametrize("ending", ["crash", "timeout", "cancel", "fail_fast"])
def test_no_segment_survives_a_run_that_ended_badly(shared: ap.Runner, ending: str) -> None:
    a = np.ones(1_000_000)
    plan = ap.Plan()
    if ending == "crash":
        plan.add(crash_with, a)
        plan.add(ones, 1_000_000)  # a worker-made result segment beside the crash
    elif ending == "timeout":
        plan.add(ap.action(sleep_with, timeout=0.3), a, 30.0)
    elif ending == "fail_fast":
        plan.add(sleep_with, a, 30.0)
        plan.add(fa.fail, after=[plan.add(fa.stamp, "x", 0.2)])
    else:
        plan.add(sleep_with, a, 30.0)
        import threading

        threading.Timer(0.5, shared.cancel).start()
    report = shared.run(plan, failure="fail_fast" if ending == "fail_fast" else "collect")
    assert report.status is not ap.RunStatus.SUCCEEDED
    deadline = time.monotonic() + 5
    while mine() and time.monotonic() < deadline:  # the arena closes once workers are gone
        time.sleep(0.01)
    assert mine() == []


def test_parent_death_leaves_nothing_in_dev_shm(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    mark = tmp_path / "pid"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import numpy as np
            import actionpool as ap
            from tests import fault_actions as fa

            def hold(a, mark):
                return fa.sleep_long(60.0, mark)

            with ap.Runner(cpu_workers=1) as r:
                plan = ap.Plan()
                plan.add(hold, np.ones(2_000_000), sys.argv[1])
                r.run(plan)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), str(mark)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 30
        while not mark.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert segments(f"ap-{proc.pid}-*"), "the run should have a segment while it runs"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while segments(f"ap-{proc.pid}-*") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert segments(f"ap-{proc.pid}-*") == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_segment_names_fit_macos_limit_of_31_characters() -> None:
    # macOS refuses longer names (PSHMNAMLEN); its pids have at most 5 digits. The
    # longest name of a run: a worker's segment, with the largest pid and a count
    # far beyond what one worker makes in one run.

    prefix = shm.run_prefix("0123456789ab").replace(str(os.getpid()), "99998")
    assert re.fullmatch(r"ap-99998-012[0-9a-z]{5}", prefix), prefix
    name = shm.segment_name(prefix, 36**5 - 1, worker=True).replace(
        shm._base36(os.getpid()), shm._base36(99998)
    )
    assert name == f"/{prefix}-w255q-zzzzz"
    assert len(name) <= shm.NAME_MAX
    assert len(shm.segment_name(prefix, 10**9, worker=False)) <= shm.NAME_MAX
