"""Admission: CPU slots per threads=, declared memory, BLAS caps, backpressure."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

import actionpool as ap
from actionpool.pools.threads import ThreadPool
from actionpool.scheduler import Scheduler
from tests import helpers as h


@pytest.fixture(scope="module")
def shared() -> Iterator[ap.Runner]:
    with ap.Runner(cpu_workers=2, io_workers=2) as r:
        yield r


def blas_in_worker(size: int = 300) -> dict[str, object]:
    """Run a matmul, then report this worker's BLAS/OpenMP thread pools."""
    from threadpoolctl import threadpool_info

    a = np.random.default_rng(0).random((size, size))
    _ = a @ a
    return {
        "pid": os.getpid(),
        "pools": {p["internal_api"]: p["num_threads"] for p in threadpool_info()},
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
    }


def overlap(a: tuple[str, float, float], b: tuple[str, float, float]) -> bool:
    return max(a[1], b[1]) < min(a[2], b[2])


def test_threads_takes_that_many_cpu_slots(shared: ap.Runner) -> None:
    wide = ap.action(h.stamp, threads=2)
    plan = ap.Plan()
    x = plan.add(wide, "x", 0.3)
    y = plan.add(wide, "y", 0.3)
    report = shared.run(plan)
    assert not overlap(report[x], report[y])  # 2 slots each, 2 slots in all
    plan = ap.Plan()
    x = plan.add(h.stamp, "x", 0.3)
    y = plan.add(h.stamp, "y", 0.3)
    report = shared.run(plan)
    assert overlap(report[x], report[y])


def test_threads_sets_the_blas_cap_for_that_action_only(shared: ap.Runner) -> None:
    per_slot = shared.sizing.blas_threads
    plan = ap.Plan()
    wide = plan.add(ap.action(blas_in_worker, threads=2), name="wide")
    narrow = plan.add(blas_in_worker, name="narrow", after=[wide])
    report = shared.run(plan)
    if "openblas" not in report[wide]["pools"]:
        pytest.skip("numpy here is not linked to OpenBLAS")
    assert report[wide]["pools"]["openblas"] == 2 * per_slot
    assert report[narrow]["pools"]["openblas"] == per_slot  # restored afterwards


def test_a_matmul_heavy_plan_does_not_oversubscribe(shared: ap.Runner) -> None:
    plan = ap.Plan()
    nodes = [plan.add(blas_in_worker, 400) for _ in range(6)]
    report = shared.run(plan)
    cores = shared.sizing.usable_cores
    for n in nodes:
        out = report[n]
        assert out["env"]["OMP_NUM_THREADS"] == str(shared.sizing.blas_threads)
        for threads in out["pools"].values():
            assert threads * shared.sizing.cpu_workers <= cores


def test_declared_memory_is_admitted_within_the_budget(shared: ap.Runner) -> None:
    big = ap.action(h.stamp, memory=int(shared.sizing.memory_budget * 0.6))
    plan = ap.Plan()
    x = plan.add(big, "x", 0.3)
    y = plan.add(big, "y", 0.3)
    small = plan.add(h.stamp, "small", 0.3)  # undeclared: passes the waiting big one
    report = shared.run(plan)
    assert not overlap(report[x], report[y])
    assert overlap(report[small], report[x])


def test_a_node_that_can_never_fit_fails_at_run(shared: ap.Runner) -> None:
    plan = ap.Plan()
    plan.add(h.square, 2, name="fine")
    plan.add(ap.action(h.square, threads=3), 2, name="too_wide")
    with pytest.raises(ap.PlanError, match=r"'too_wide': threads=3 can never fit.*2 slots"):
        shared.run(plan)
    plan = ap.Plan()
    plan.add(ap.action(h.square, memory=shared.sizing.memory_budget + 1), 2, name="too_big")
    with pytest.raises(ap.PlanError, match=r"'too_big': memory=.*can never fit"):
        shared.run(plan)
    fut = shared.submit(ap.action(h.square, threads=5), 2)
    with pytest.raises(ap.PlanError, match="threads=5"):
        fut.result(timeout=10)


def test_dispatch_pauses_below_the_memory_floor(shared: ap.Runner) -> None:
    events: list[ap.Event] = []
    plan = ap.Plan()
    n = plan.add(h.square, 7)
    shared.memory_floor = 1 << 62  # more than any machine has: pause
    result: list[ap.Report] = []
    t = threading.Thread(target=lambda: result.append(shared.run(plan, on_event=events.append)))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while not any(e.kind == "paused" for e in events) and time.monotonic() < deadline:
            time.sleep(0.01)
        paused = [e for e in events if e.kind == "paused"]
        assert paused and paused[0].data["floor"] == 1 << 62 and paused[0].node is None
        assert not any(e.kind == "started" for e in events)
    finally:
        shared.memory_floor = 0
    t.join(timeout=10)
    assert result and result[0][n] == 49
    assert [e.kind for e in events if e.kind in ("paused", "resumed")] == ["paused", "resumed"]


def test_memory_floor_is_validated_before_anything_starts() -> None:
    threads = set(threading.enumerate())
    with pytest.raises(ValueError, match="memory_floor"):
        ap.Runner(cpu_workers=1, io_workers=1, memory_floor=-5)
    assert set(threading.enumerate()) == threads  # no scheduler thread left behind


def test_a_call_from_the_callers_thread_is_admitted_on_a_recent_or_a_fresh_memory_reading() -> None:
    # Runner.submit asks admits_at_once in the caller's thread: the sizing's reading
    # counts as the scheduler's first check, and a missing or stale one is read there
    loop = asyncio.new_event_loop()
    pool = ThreadPool(1)
    huge = 2**62  # more bytes than any machine has available
    try:

        def scheduler(floor: int, available: int | None) -> Scheduler:
            return Scheduler(loop, {"io": pool}, 1.0, 2**30, 1, floor, available)

        assert scheduler(huge, 2**63).admission.admits_at_once("io")  # the sizing's: not read again
        assert not scheduler(huge, 50).admission.admits_at_once("io")  # below the floor: read again
        assert not scheduler(huge, None).admission.admits_at_once("io")  # read now: below the floor
        assert scheduler(100, None).admission.admits_at_once("io")  # read now: above it
    finally:
        pool.close()
        loop.close()


def test_backpressure_reads_a_containers_cgroup_not_only_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A container's free memory is its cgroup limit minus its usage, whatever the
    # host's /proc/meminfo says: laid out here as cgroup v2 files the test rewrites
    from actionpool import sizing

    gib = 1 << 30
    root = tmp_path / "cg"
    (root / "box").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("memory\n")
    (root / "box" / "memory.max").write_text(f"{8 * gib}\n")
    usage = root / "box" / "memory.current"
    usage.write_text(f"{8 * gib - gib // 2}\n")  # half a GiB left: below the floor
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("0::/box\n")
    monkeypatch.setattr(sizing, "CGROUP_ROOT", root)
    monkeypatch.setattr(sizing, "PROC_CGROUP", proc)
    events: list[ap.Event] = []
    plan = ap.Plan()
    n = plan.add(h.square, 6)
    with ap.Runner(cpu_workers=1, io_workers=1, memory_floor=gib) as r:
        assert r.sizing.total_memory == min(8 * gib, psutil.virtual_memory().total)
        result: list[ap.Report] = []
        t = threading.Thread(target=lambda: result.append(r.run(plan, on_event=events.append)))
        t.start()
        h.wait_for(lambda: any(e.kind == "paused" for e in events), what="the pause")
        assert not any(e.kind == "started" for e in events)
        usage.write_text(f"{gib}\n")  # the container freed memory: 7 GiB left
        t.join(timeout=30)
        assert not t.is_alive()
    assert result and result[0][n] == 36
    assert [e.kind for e in events if e.kind in ("paused", "resumed")] == ["paused", "resumed"]
