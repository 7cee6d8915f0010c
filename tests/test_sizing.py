"""Tests for sizing.py: pool sizes from this machine's cores and memory, and BLAS caps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import loky
import psutil
import pytest

import actionpool as ap
from actionpool import sizing
from actionpool.sizing import BLAS_ENV_VARS, compute_sizing, worker_env, worker_footprint

ENV_VARS = ("ACTIONPOOL_CPU_WORKERS", "ACTIONPOOL_IO_WORKERS")


@pytest.fixture(autouse=True)
def _no_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Size from the machine, whatever the caller's environment says."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


# ---- functions run inside CPU workers (module level: loky imports this module) ---------


def blas_env() -> dict[str, str | None]:
    return {var: os.environ.get(var) for var in BLAS_ENV_VARS}


def blas_pools() -> list[tuple[str, int]]:
    import numpy  # noqa: F401 - loads its BLAS so threadpoolctl can see it
    from threadpoolctl import threadpool_info

    return [(lib["internal_api"], lib["num_threads"]) for lib in threadpool_info()]


# ---- computed sizes -------------------------------------------------------------------


@pytest.fixture(scope="module")
def computed() -> ap.Sizing:
    # module scope runs before the function-scoped env fixture: clear the env here too
    with pytest.MonkeyPatch.context() as mp:
        for var in ENV_VARS:
            mp.delenv(var, raising=False)
        return compute_sizing()


def test_cpu_workers_is_min_of_physical_cores_and_memory(computed):
    s = computed
    physical = loky.cpu_count(only_physical_cores=True)
    assert s.usable_cores == loky.cpu_count()
    assert s.physical_cores == min(physical, s.usable_cores)
    assert s.worker_footprint > 0
    by_memory = s.memory_budget // s.worker_footprint
    assert s.cpu_workers == max(1, min(physical, by_memory))
    assert s.cpu_workers >= 1
    assert isinstance(s.cpu_workers, int)


def test_blas_threads_never_oversubscribe(computed):
    s = computed
    assert s.blas_threads >= 1
    assert s.blas_threads * s.cpu_workers <= loky.cpu_count()
    assert s.blas_threads == max(1, loky.cpu_count() // s.cpu_workers)


def test_memory_budget_is_a_fraction_of_available(computed):
    s = computed
    assert s.memory_budget == int(s.available_memory * sizing.MEMORY_FRACTION)
    now = psutil.virtual_memory().available
    # generous: other processes allocate and free memory between the two readings
    assert 0.5 * 0.8 * now <= s.memory_budget <= 1.5 * 0.8 * now
    assert s.memory_budget < psutil.virtual_memory().total


def test_io_workers(computed):
    s = computed
    assert s.io_workers >= 32
    assert s.io_workers >= sizing.IO_THREADS_PER_CORE * s.usable_cores or (
        "open-file limit" in s.reason
    )


def test_reason_mentions_every_number(computed):
    s = computed
    r = s.reason
    assert f"cpu_workers={s.cpu_workers}" in r
    assert f"io_workers={s.io_workers}" in r
    assert f"blas_threads={s.blas_threads}" in r
    assert f"{s.physical_cores} physical cores" in r
    assert f"{s.usable_cores} usable cores" in r
    assert str(s.memory_budget // s.worker_footprint) in r
    for n_bytes in (s.memory_budget, s.available_memory, s.worker_footprint):
        assert sizing._fmt_bytes(n_bytes) in r
    assert "\n" not in r  # one line
    # str() is the short form
    assert f"cpu_workers={s.cpu_workers}" in str(s)


def test_worker_footprint_is_a_plausible_number_of_bytes():
    fp = worker_footprint()
    assert isinstance(fp, int)
    assert 1024 * 1024 < fp < 1024**3  # a Python process is more than 1 MiB
    assert worker_footprint() == fp  # measured once


def test_cpu_workers_respect_cpu_affinity():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("os.sched_setaffinity is not available on this platform")
    code = textwrap.dedent(
        """
        import json, os
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        from actionpool.sizing import compute_sizing
        s = compute_sizing()
        print(json.dumps([s.cpu_workers, s.usable_cores, s.physical_cores, s.blas_threads]))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS and k != "LOKY_MAX_CPU_COUNT"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    cpu_workers, usable, physical, blas = json.loads(out.stdout.splitlines()[-1])
    assert (cpu_workers, usable, physical, blas) == (1, 1, 1, 1)


# ---- overrides ------------------------------------------------------------------------


def test_override_by_argument():
    s = compute_sizing(cpu_workers=3, io_workers=5)
    assert (s.cpu_workers, s.io_workers) == (3, 5)
    assert "cpu_workers=3 from argument" in s.reason
    assert "io_workers=5 from argument" in s.reason
    assert s.blas_threads == max(1, loky.cpu_count() // 3)


def test_override_by_environment(monkeypatch):
    monkeypatch.setenv("ACTIONPOOL_CPU_WORKERS", "2")
    monkeypatch.setenv("ACTIONPOOL_IO_WORKERS", " 7 ")
    s = compute_sizing()
    assert (s.cpu_workers, s.io_workers) == (2, 7)
    assert "from ACTIONPOOL_CPU_WORKERS" in s.reason
    assert "from ACTIONPOOL_IO_WORKERS" in s.reason


def test_empty_environment_variable_means_unset(monkeypatch, computed):
    monkeypatch.setenv("ACTIONPOOL_IO_WORKERS", "")
    assert compute_sizing(cpu_workers=1).io_workers == computed.io_workers


def test_argument_beats_environment(monkeypatch):
    monkeypatch.setenv("ACTIONPOOL_CPU_WORKERS", "2")
    monkeypatch.setenv("ACTIONPOOL_IO_WORKERS", "9")
    s = compute_sizing(cpu_workers=1, io_workers=3)
    assert (s.cpu_workers, s.io_workers) == (1, 3)
    assert "ACTIONPOOL_" not in s.reason


def test_argument_beats_a_bad_environment_variable(monkeypatch):
    monkeypatch.setenv("ACTIONPOOL_CPU_WORKERS", "lots")
    assert compute_sizing(cpu_workers=2).cpu_workers == 2


@pytest.mark.parametrize("bad", [0, -1, "abc", True, 2.0, "3"])
@pytest.mark.parametrize("arg", ["cpu_workers", "io_workers"])
def test_bad_argument_raises_naming_it(arg, bad):
    with pytest.raises(ValueError, match=arg):
        compute_sizing(**{arg: bad})


@pytest.mark.parametrize("bad", ["0", "-1", "abc", "True", "2.5"])
@pytest.mark.parametrize("var", ENV_VARS)
def test_bad_environment_variable_raises_naming_it(monkeypatch, var, bad):
    monkeypatch.setenv(var, bad)
    with pytest.raises(ValueError, match=var):
        compute_sizing()


def test_runner_takes_overrides_and_bad_ones_raise():
    with ap.Runner(cpu_workers=3) as runner:
        assert runner.sizing.cpu_workers == 3
        assert isinstance(runner.sizing, ap.Sizing)
    with ap.Runner(io_workers=6) as runner:
        assert runner.sizing.io_workers == 6
    with pytest.raises(ValueError, match="cpu_workers"):
        ap.Runner(cpu_workers=0)


def test_runner_reads_the_environment(monkeypatch):
    monkeypatch.setenv("ACTIONPOOL_CPU_WORKERS", "1")
    with ap.Runner() as runner:
        assert runner.sizing.cpu_workers == 1
    monkeypatch.setenv("ACTIONPOOL_CPU_WORKERS", "-3")
    with pytest.raises(ValueError, match="ACTIONPOOL_CPU_WORKERS"):
        ap.Runner()


# ---- BLAS caps inside workers ---------------------------------------------------------


def test_worker_env_sets_every_blas_variable():
    env = worker_env(3)
    assert set(env) == set(BLAS_ENV_VARS)
    assert set(env.values()) == {"3"}
    assert "OMP_NUM_THREADS" in env and "OPENBLAS_NUM_THREADS" in env


@pytest.mark.parametrize("cpu_workers", [1, 2])
def test_cpu_workers_get_blas_env_despite_parent_settings(monkeypatch, cpu_workers):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "7")
    with ap.Runner(cpu_workers=cpu_workers, io_workers=1) as runner:
        blas = runner.sizing.blas_threads
        assert blas == max(1, loky.cpu_count() // cpu_workers)
        env = runner.submit(blas_env).result(timeout=60)
        pools = runner.submit(blas_pools).result(timeout=60)
    assert env == {var: str(blas) for var in BLAS_ENV_VARS}
    # the BLAS numpy loaded in the worker runs at most blas_threads threads
    assert pools, "numpy loaded no BLAS that threadpoolctl can see"
    for api, threads in pools:
        assert threads <= blas, (api, threads, blas)


# ---- container-aware memory: cgroup limits ---------------------------------------------

GiB = 1 << 30


def _cgroup_tree(root, files):
    """Lay out cgroup files under ``root``: ``{"relative/path": "content"}``."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _proc(tmp_path, text):
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


def test_cgroup_v2_limit_and_usage_are_read(tmp_path):
    root = tmp_path / "cg"
    _cgroup_tree(
        root,
        {
            "cgroup.controllers": "cpu memory\n",
            "app/memory.max": f"{2 * GiB}\n",
            "app/memory.current": f"{GiB // 2}\n",
        },
    )
    cg = sizing.cgroup_memory(root, _proc(tmp_path, "0::/app\n"))
    assert cg == sizing.CgroupMemory(2 * GiB, GiB // 2, 2, str(root / "app"))
    assert cg.free == 3 * GiB // 2


def test_cgroup_v2_max_is_no_limit_and_an_ancestor_can_be_tighter(tmp_path):
    root = tmp_path / "cg"
    _cgroup_tree(
        root,
        {
            "cgroup.controllers": "memory\n",
            "a/memory.max": "max\n",
            "a/memory.current": "100\n",
            "b/memory.max": f"{GiB}\n",
            "b/c/memory.max": "max\n",
            "b/c/memory.current": "300\n",
        },
    )
    unlimited = sizing.cgroup_memory(root, _proc(tmp_path, "0::/a\n"))
    assert unlimited is not None and unlimited.limit is None and unlimited.free is None
    nested = sizing.cgroup_memory(root, _proc(tmp_path, "0::/b/c\n"))
    assert nested is not None and nested.limit == GiB and nested.usage == 300


def test_cgroup_v1_and_the_hybrid_layout_are_read(tmp_path):
    root = tmp_path / "cg"
    _cgroup_tree(
        root,
        {
            "unified/cgroup.procs": "",  # v2 mounted beside v1, without memory
            "memory/memory.limit_in_bytes": "9223372036854771712\n",  # v1's "no limit"
            "memory/job/memory.limit_in_bytes": f"{4 * GiB}\n",
            "memory/job/memory.usage_in_bytes": f"{GiB}\n",
        },
    )
    proc = _proc(tmp_path, "4:memory:/job\n1:cpu,cpuacct:/job\n0::/job\n")
    cg = sizing.cgroup_memory(root, proc)
    assert cg == sizing.CgroupMemory(4 * GiB, GiB, 1, str(root / "memory" / "job"))


def test_a_container_sees_its_own_cgroup_at_the_root_of_the_mount(tmp_path):
    # /proc/self/cgroup names the host's path; the container's mount holds only its own
    root = tmp_path / "cg"
    _cgroup_tree(
        root,
        {
            "cgroup.controllers": "memory\n",
            "memory.max": f"{2 * GiB}\n",
            "memory.current": f"{GiB}\n",
        },
    )
    cg = sizing.cgroup_memory(root, _proc(tmp_path, "0::/kubepods/pod42/ctr\n"))
    assert cg == sizing.CgroupMemory(2 * GiB, GiB, 2, str(root))


def test_no_cgroup_means_none(tmp_path):
    assert sizing.cgroup_memory(tmp_path / "absent", tmp_path / "absent-proc") is None
    empty = tmp_path / "cg"
    empty.mkdir()
    assert sizing.cgroup_memory(empty, _proc(tmp_path, "0::/\n")) is None


def test_this_machines_own_cgroup_reads_plausibly():
    cg = sizing.cgroup_memory()
    if cg is None:
        pytest.skip("this process is in no readable cgroup memory controller")
    assert cg.version in (1, 2)
    assert cg.usage > 0
    assert cg.limit is None or cg.limit > 0
    s = compute_sizing()
    assert s.available_memory <= psutil.virtual_memory().total
    if cg.free is not None and cg.free < psutil.virtual_memory().available:
        assert f"cgroup v{cg.version} limit" in s.reason


def test_a_cgroup_limit_below_the_hosts_memory_bounds_the_budget(tmp_path, monkeypatch):
    host = psutil.virtual_memory().available
    limit = min(2 * GiB, host // 4)
    root = tmp_path / "cg"
    _cgroup_tree(
        root,
        {
            "cgroup.controllers": "memory\n",
            "box/memory.max": f"{limit}\n",
            "box/memory.current": f"{limit // 4}\n",
        },
    )
    monkeypatch.setattr(sizing, "CGROUP_ROOT", root)
    monkeypatch.setattr(sizing, "PROC_CGROUP", _proc(tmp_path, "0::/box\n"))
    s = compute_sizing(cpu_workers=1)
    assert s.available_memory == limit - limit // 4
    assert s.memory_budget == int(s.available_memory * sizing.MEMORY_FRACTION)
    assert "cgroup v2 limit" in s.reason and str(root / "box") in s.reason
    assert "below the host's" in s.reason


def _nested_sizing(_: int = 0) -> tuple[int, int, str]:
    """Make a Runner inside an action, as a library that uses actionpool would."""
    with ap.Runner() as inner:
        s = inner.sizing
        inner.submit(abs, -1).result(timeout=60)  # it runs, too
    return s.cpu_workers, s.usable_cores, s.reason


def test_a_runner_made_inside_a_worker_takes_the_cores_of_its_action() -> None:
    with ap.Runner(cpu_workers=2, io_workers=1) as runner:
        cpu, usable, reason = runner.submit(_nested_sizing).result(timeout=120)
        assert (cpu, usable) == (1, 1)
        assert "inside an action of another runner's worker process" in reason
        if runner.sizing.usable_cores >= 2:  # an action that declares 2 slots gets 2
            two = ap.action(_nested_sizing, threads=2)
            cpu2, usable2, _ = runner.submit(two).result(timeout=120)
            assert usable2 == 2 and 1 <= cpu2 <= 2
    assert "inside an action" not in compute_sizing().reason  # here, in no worker
