"""Workers are forked from a zygote: how it starts, what workers inherit, and what
happens when the zygote itself dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import actionpool as ap
from actionpool.pools.process import ProcessPool, resolve_worker_start
from actionpool.pools.zygote_client import idle_zygote_pids, stop_idle_zygotes
from tests import fault_actions as fa
from tests.helpers import pid, wait_for_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _start_with_no_idle_zygote() -> Iterator[None]:
    """These tests count idle zygotes: none is left from the module's earlier tests
    (conftest keeps them within a module)."""
    stop_idle_zygotes()
    yield


def run_script(code: str, timeout: float = 120, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (one thread at the start, as in a script)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "ACTIONPOOL_WORKER_START": "",
            **env,
        },
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.zygote_path
def test_a_script_forks_its_zygote_and_workers_inherit_its_modules() -> None:
    out = run_script(
        """
        import actionpool as ap
        from tests import helpers

        helpers.INHERITED = "set in the parent before the runner"
        with ap.Runner(cpu_workers=2) as r:
            print(r._pools["cpu"].worker_start)
            print(r.submit(getattr, helpers, "INHERITED", None).result())
        with ap.Runner(cpu_workers=2, worker_start="fresh") as r:
            print(r._pools["cpu"].worker_start)
            print(r.submit(getattr, helpers, "INHERITED", None).result())
        """
    )
    assert out.split("\n")[:4] == [
        "fork",
        "set in the parent before the runner",
        "fresh",
        "None",
    ]


@pytest.mark.zygote_path
def test_forked_workers_do_not_share_numpy_random_state() -> None:
    out = run_script(
        """
        import numpy as np
        import actionpool as ap
        from tests.fault_actions import np_random_and_pid

        np.random.seed(0)
        with ap.Runner(cpu_workers=2, worker_start="fork") as r:
            draws = {}
            for _ in range(20):  # one draw from each worker: two at once, each waits
                for f in [r.submit(np_random_and_pid) for _ in range(2)]:
                    value, pid = f.result()
                    draws.setdefault(pid, value)
                if len(draws) == 2:
                    break
        print(len(set(draws.values())), np.random.rand() == np.random.RandomState(0).rand())
        """,
        OPENBLAS_NUM_THREADS="1",  # else importing NumPy starts threads: no fork then
    )
    assert out.split() == ["2", "True"]


@pytest.mark.zygote_path
def test_a_closed_runner_leaves_no_thread_that_would_stop_the_next_fork() -> None:
    # A joined thread may still be ending in the OS; a runner created right after the
    # previous one closed must find this process single-threaded again, every time.
    out = run_script(
        """
        import os
        import actionpool as ap
        for i in range(150):
            with ap.Runner(cpu_workers=1, io_workers=1, worker_start="fork") as r:
                if i % 50 == 0:
                    assert r.submit(os.getpid).result(timeout=60) != os.getpid()
                    assert r.submit(ap.action(os.getpid, kind="io")).result(60) == os.getpid()
        print("ok")
        """
    )
    assert out.split() == ["ok"]


@pytest.mark.zygote_path
def test_fork_is_refused_while_other_threads_run() -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        with pytest.raises(RuntimeError, match=r"worker_start='fork': this process runs \d+"):
            ap.Runner(cpu_workers=1, worker_start="fork")
        assert resolve_worker_start("auto") == "fresh"
    finally:
        stop.set()
        t.join()


def test_unknown_worker_start_is_refused() -> None:
    with pytest.raises(ValueError, match="worker_start must be one of"):
        ap.Runner(cpu_workers=1, worker_start="spawn")


@pytest.mark.zygote_path
def test_the_zygote_is_preloaded_and_its_workers_are_its_children() -> None:
    with ap.Runner(cpu_workers=2, worker_start="fresh") as r:
        pids = {f.result(timeout=60) for f in [r.submit(fa.slow_pid, 0.3) for _ in range(2)]}
        (zygote,) = r._pools["cpu"].zygote_pids()
        assert pids == set(r.worker_pids())
        for p in pids:
            proc = psutil.Process(p)
            assert proc.ppid() == zygote
            assert os.getpgid(p) == p  # a process group of its own: killpg reaches it


@pytest.mark.zygote_path
@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_cpu_workers_run_as_batch_and_the_parent_and_io_threads_keep_their_policy() -> None:
    code = """
        import json, os
        import actionpool as ap

        def policies(start):
            parent = os.sched_getscheduler(0)
            with ap.Runner(cpu_workers=2, io_workers=2, worker_start=start) as r:
                cpu = r.submit(os.sched_getscheduler, 0).result(timeout=60)
                io = r.submit(ap.action(os.sched_getscheduler, kind="io"), 0).result(timeout=60)
                workers = {os.sched_getscheduler(p) for p in r.worker_pids()}
            return [parent, cpu, io, sorted(workers), os.sched_getscheduler(0)]

        print(json.dumps({start: policies(start) for start in ("fork", "fresh")}))
    """
    out = json.loads(run_script(code).splitlines()[-1])
    other, batch = os.SCHED_OTHER, os.SCHED_BATCH
    for start in ("fork", "fresh"):
        assert out[start] == [other, batch, other, [batch], other], start


@pytest.mark.zygote_path
def test_a_fresh_zygote_imports_what_the_callers_sys_path_holds(tmp_path: Path) -> None:
    (tmp_path / "on_my_path.py").write_text("import os\ndef where():\n    return os.getpid()\n")
    out = run_script(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import actionpool as ap
        import on_my_path
        with ap.Runner(cpu_workers=1, worker_start="fresh") as r:
            print(r.submit(on_my_path.where).result(timeout=60) in r.worker_pids())
        """
    )
    assert out.splitlines()[-1] == "True"


@pytest.mark.zygote_path
def test_a_killed_zygote_costs_its_running_actions_and_the_pool_heals(tmp_path: Path) -> None:
    mark = tmp_path / "started"
    with ap.Runner(cpu_workers=2, worker_start="fresh") as r:
        assert r.submit(pid).result(timeout=60) > 0
        (zygote,) = r._pools["cpu"].zygote_pids()
        running = r.submit(fa.sleep_long, 30, str(mark))
        wait_for_path(mark, "the call to lose with its zygote never started")
        os.kill(zygote, signal.SIGKILL)
        with pytest.raises(ap.WorkerCrashed, match="stopped answering"):
            running.result(timeout=60)
        # a new zygote starts on demand, and the old one's workers are gone
        assert r.submit(pid).result(timeout=60) not in (None, 0)
        (new,) = r._pools["cpu"].zygote_pids()
        assert new != zygote


@pytest.mark.zygote_path
def test_a_pool_closes_its_zygote() -> None:
    pool = ProcessPool(1, 1, "fresh")
    try:
        assert pool.zygote_pids() == []  # a fresh zygote starts on first use only
    finally:
        pool.close()
    # a runner's pool keeps it idle for the next runner instead (test_zygote_reuse.py)
    with ap.Runner(cpu_workers=1, worker_start="fresh") as r:
        r.submit(pid).result(timeout=60)
        (zygote,) = r._pools["cpu"].zygote_pids()
    assert idle_zygote_pids() == [zygote]
    stop_idle_zygotes()
    assert not psutil.pid_exists(zygote) or psutil.Process(zygote).status() == "zombie"


@pytest.mark.zygote_path
def test_a_draining_zygote_exits_after_its_last_worker_while_the_pool_holds_it() -> None:
    # A closing pool asks its workers to stop and its zygote to drain: the zygote exits
    # as soon as its last worker has been reaped and reported, without waiting for
    # the pool to let it go (its exit then overlaps the pool's own shutdown).
    with ap.Runner(cpu_workers=1, worker_start="fresh") as r:
        worker = r.submit(pid).result(timeout=60)
        pool = r._pools["cpu"]
        zygote = pool._zygote
        zygote.drain()
        proc = psutil.Process(zygote.pid)
        assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE  # a worker lives
        os.kill(worker, signal.SIGKILL)
        proc.wait(30)  # while the pool still holds it open (its loop reaps it)
        deadline = time.monotonic() + 30
        while pool.pids():  # the worker's death was reported before the zygote left
            assert time.monotonic() < deadline, f"the pool still lists {pool.pids()}"
            time.sleep(0.01)


@pytest.mark.zygote_path
def test_a_call_whose_worker_cannot_start_fails_and_never_runs_later(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mark = tmp_path / "ran"
    with monkeypatch.context() as m:
        # from the start: a runner's fresh zygote starts with it
        m.setattr(sys, "executable", str(tmp_path / "no-such-python"))
        r = ap.Runner(cpu_workers=1, worker_start="fresh")
        with pytest.raises(FileNotFoundError):
            r.submit(fa.write, str(mark), "ran").result(timeout=60)
    with r:
        assert r.submit(pid).result(timeout=60) > 0  # the pool starts once it can
        assert r._pools["cpu"]._pending == deque()
    assert not mark.exists()  # the failed call was not left queued, to run later


@pytest.mark.zygote_path
def test_the_first_worker_starts_with_the_runner_and_a_dead_one_is_replaced() -> None:
    # A forking runner forks its first worker itself, with its zygote; the zygote forks
    # every later one, the replacement of a first worker that died unused included.
    out = run_script(
        """
        import os, signal, time
        import psutil
        import actionpool as ap

        me = psutil.Process()
        with ap.Runner(cpu_workers=2, worker_start="fork") as r:
            (first,) = r.worker_pids()  # forked before any call
            print(psutil.Process(first).ppid() == os.getpid())
            print(r.submit(os.getpid).result(timeout=60) == first)
        print(psutil.pid_exists(first) is False)  # reaped by the runner at its close
        with ap.Runner(cpu_workers=2, worker_start="fork") as r:
            (first,) = r.worker_pids()
            (zygote,) = r._pools["cpu"].zygote_pids()
            os.kill(first, signal.SIGKILL)  # dies before it is ever used
            got = r.submit(os.getpid).result(timeout=60)
            print(got not in (first, os.getpid()), psutil.Process(got).ppid() == zygote)
            print(r.worker_pids() == [got])
        """
    )
    assert out.split() == ["True", "True", "True", "True", "True", "True"]


@pytest.mark.zygote_path
def test_the_runners_own_first_worker_crashes_times_out_and_is_cancelled_as_any_other(
    tmp_path: Path,
) -> None:
    # The first worker is the runner's child, watched on its pidfd and reaped by the
    # pool rather than by the zygote: each way a worker ends must still kill what its
    # action started, report the same outcome and leave a pool that heals. A fresh
    # runner each time, so that the first worker is the one that ends.
    out = run_script(
        f"""
        import os, signal, time
        from concurrent.futures import CancelledError
        import psutil
        import actionpool as ap
        from tests import fault_actions as fa
        from tests.helpers import wait_for_path

        def gone(pid):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                        return True
                except psutil.NoSuchProcess:
                    return True
                time.sleep(0.01)
            return False

        def runner():
            r = ap.Runner(cpu_workers=1, worker_start="fork", timeout_grace=0.3)
            (first,) = r.worker_pids()
            assert psutil.Process(first).ppid() == os.getpid()
            return r, first

        mark = {str(tmp_path / "child")!r}
        r, first = runner()
        with r:
            plan = ap.Plan()
            crash = plan.add(fa.start_child_then_exit, mark, 3)
            out = r.run(plan).outcome(crash)
            print(out.status is ap.Status.CRASHED, out.error.exitcode == 3, out.worker == first)
            print(gone(int(open(mark).read())), gone(first))  # its group was killed
            print(r.submit(os.getpid).result(timeout=60) not in (first, os.getpid()))

        r, first = runner()
        with r:
            try:
                r.submit(fa.segfault).result(timeout=60)
            except ap.WorkerCrashed as exc:
                print(exc.signal == signal.SIGSEGV)

        r, first = runner()
        with r:
            plan = ap.Plan()
            stuck = plan.add(ap.action(fa.stuck_in_c, timeout=0.3))
            out = r.run(plan).outcome(stuck)
            print(out.status is ap.Status.TIMED_OUT, gone(first))

        r, first = runner()
        with r:
            running = {str(tmp_path / "running")!r}
            fut = r.submit(fa.sleep_long, 30.0, running)
            wait_for_path(running, "the call to cancel")
            r.cancel()  # a running call: its worker is killed
            try:
                fut.result(timeout=60)
            except CancelledError:
                print(gone(first))

        print(not psutil.pid_exists(first))  # reaped, not left a zombie

        start = time.monotonic()
        r, first = runner()
        r.close()  # never used
        print(not psutil.pid_exists(first), time.monotonic() - start < 10)
        """
    )
    assert out.split() == ["True"] * 13


@pytest.mark.zygote_path
def test_without_pidfds_the_zygote_forks_the_first_worker_unasked() -> None:
    out = run_script(
        """
        import os, signal, time
        import psutil
        import actionpool as ap
        import actionpool.pools.process as process

        def first_child(zygote):
            deadline = time.monotonic() + 60
            while not psutil.Process(zygote).children():
                assert time.monotonic() < deadline, "the zygote forked no worker unasked"
                time.sleep(0.01)
            (first,) = psutil.Process(zygote).children()
            return first

        process._FORK_FIRST = False  # as where the kernel has no pidfds
        with ap.Runner(cpu_workers=2, worker_start="fork") as r:
            (zygote,) = r._pools["cpu"].zygote_pids()
            first = first_child(zygote)  # forked before any call
            print(r.submit(os.getpid).result(timeout=60) == first.pid)
        with ap.Runner(cpu_workers=2, worker_start="fork") as r:
            (zygote,) = r._pools["cpu"].zygote_pids()
            first = first_child(zygote)
            first.kill()  # dies before it is ever used: its call goes to a new worker
            first.wait(60)
            got = r.submit(os.getpid).result(timeout=60)
            print(got not in (first.pid, os.getpid()))
        """
    )
    assert out.split() == ["True", "True"]


@pytest.mark.zygote_path
@pytest.mark.parametrize("fork_first", [True, False])
def test_a_scripts_first_call_goes_from_its_thread_to_the_first_worker(
    fork_first: bool, tmp_path: Path
) -> None:
    # The first worker is forked at the start (by this process, or by the zygote
    # unasked); once its pid is known, a call joins it to the pool and starts on it
    # from the caller's thread, without waiting for the scheduler's (held busy here
    # until the call has run).
    mark = tmp_path / "ran"
    out = run_script(
        f"""
        import threading, time
        import actionpool as ap
        import actionpool.pools.process as process
        from tests import fault_actions as fa
        from tests.helpers import wait_for_path

        process._FORK_FIRST = {fork_first}
        with ap.Runner(cpu_workers=1, worker_start="fork", memory_floor=0) as r:
            zygote = r._pools["cpu"]._zygote
            deadline = time.monotonic() + 60
            while not {fork_first} and not zygote.answered():
                assert time.monotonic() < deadline, "the zygote never answered"
                time.sleep(0.005)
            busy, release = threading.Event(), threading.Event()
            r._loop.call_soon_threadsafe(lambda: (busy.set(), release.wait(60)))
            assert busy.wait(10)
            try:  # held until the call has run: one that waits for the loop never does
                before = len(r.worker_pids())
                call = r.submit(fa.write, {str(mark)!r}, "ran")
                wait_for_path({str(mark)!r}, "the call sent while the loop was held")
            finally:
                release.set()
            print(before == {int(fork_first)}, call.exception(timeout=60) is None)
        """
    )
    assert out.split() == ["True", "True"]


@pytest.mark.parametrize("source", ["loaded_objects", "mapped_files"])
def test_native_pools_loaded_sees_a_blas_library(source: str) -> None:
    # both sources native_pools_loaded answers from: the loader's link map (once ctypes
    # is imported, as loky does in a runner's process), else /proc/self/maps
    out = run_script(
        f"""
        import ctypes
        from actionpool._worker import {source} as names, native_pools_loaded, pool_library_in
        before = pool_library_in(names()), native_pools_loaded()
        import numpy
        print(*before, pool_library_in(names()), native_pools_loaded())
        """
    )
    assert out.split() == ["False", "False", "True", "True"]


@pytest.mark.zygote_path
def test_the_link_map_lists_the_shared_objects_the_kernel_has_mapped() -> None:
    # the fast answer of native_pools_loaded must see what /proc/self/maps sees
    out = run_script(
        """
        import ctypes, json, os
        import numpy
        from actionpool._worker import loaded_objects
        linked = {os.path.realpath(n) for n in map(os.fsdecode, loaded_objects()) if "/" in n}
        with open("/proc/self/maps") as f:
            fields = [line.split(None, 5) for line in f]
        paths = {f[5].strip() for f in fields if len(f) == 6}
        mapped = {p for p in paths if p.startswith("/") and ".so" in os.path.basename(p)}
        print(json.dumps([sorted(linked - mapped), sorted(mapped - linked), len(linked)]))
        """
    )
    only_linked, only_mapped, count = json.loads(out)
    assert only_linked == [] and only_mapped == []
    assert count > 10  # libc, libpython or the like, NumPy's modules and its BLAS


@pytest.mark.zygote_path
def test_a_forked_zygote_caps_a_blas_library_the_parent_loaded() -> None:
    import loky

    if loky.cpu_count() < 2:
        pytest.skip("one usable core: the cap (1) equals the parent's own")
    out = run_script(
        """
        import numpy  # one OpenBLAS thread (the environment says so): no threads start
        import actionpool as ap
        from tests.test_sizing import blas_pools

        with ap.Runner(cpu_workers=1, worker_start="fork") as r:
            pools = r.submit(blas_pools).result(timeout=60)
            print(r.sizing.blas_threads, sorted({n for _, n in pools}))
        """,
        OPENBLAS_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
    )
    cap, threads = out.strip().split(maxsplit=1)
    assert int(cap) >= 2
    assert threads == f"[{cap}]"  # raised from the parent's 1 by threadpoolctl in the zygote
