"""Passing one large NumPy array to N cpu tasks: actionpool against its peers.

One float64 array of ``--mb`` MB (random) goes to ``--tasks`` tasks that each read all
of it (``float(a.sum())``: every page is touched, the work itself stays small) and
return one float. Every contender uses the same number of worker processes
(``--workers``, default: this machine's physical cores); each pool is created and
warmed (workers started, one untimed round) before anything is timed, and only
"submit the tasks with the array and get their results" is timed.

Contenders:

* memcpy: ``np.copyto`` into a preallocated, pre-faulted array (the yardstick: "one
  memcpy of the array"), and into a fresh ``np.empty`` (page faults included);
* compute: one ``float(a.sum())`` in this process, i.e. one task's work;
* copy step: actionpool's one copy of the array alone (``Arena.dumps`` then
  ``close``), into a new /dev/shm segment per run (``pwrite``; no pool) and into a
  reused segment of a ``SegmentPool`` (a memcpy into pages kept mapped);
* actionpool (default ``Runner``): the array as an argument of each node of one plan
  (copied once per run into /dev/shm, read-only views in the workers), and the
  variant with the array in the run's ``state``, read through ``ctx.state``;
* actionpool with ``shm_threshold=None``: pickled through the pipes into every task;
* ``concurrent.futures.ProcessPoolExecutor`` (spawn; pickled into every task);
* ``joblib.Parallel(backend="loky")`` with its default auto-memmapping
  (``max_nbytes="1M"``: the array is dumped to a file once per call, memmapped);
* Dask (``distributed.LocalCluster``, processes): ``client.scatter(a, broadcast=True)``
  then one ``client.submit`` per task, and the array passed directly to each submit;
* Ray: ``ray.put(a)`` then one task per ref, and the array passed directly.

Dask and Ray are skipped when they are not installed. Rounds are interleaved: round r
runs every contender once, in an order rotated by r, so that drift of a shared machine
hits all of them alike; the table reports medians over ``--rounds``.

``--work page`` replaces the full sum by ``float(a[::512].sum())``: one float per 4 KiB
page, so every page is still touched (mapping and page-fault costs stay in) while the
arithmetic nearly vanishes; it separates the cost of the transfer from the tasks' work.

The script runs the measurements in a child process (itself, ``--child``) and, as that
child's subreaper (Linux), checks after it exited that no process is left behind and
that /dev/shm holds nothing new; it prints a line saying so.

Usage::

    python benchmarks/bench_arrays.py [--mb 200] [--tasks 8] [--rounds 5]
                                      [--workers N] [--work sum|page] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import psutil

SHM = Path("/dev/shm")
REL_TOL = 1e-9  # results must equal the parent's own sum (alignment may change rounding)

# ---- the tasks (module level: pickled by reference or, from __main__, by value) ------------


def task_sum(a: np.ndarray) -> float:
    """Read every byte of ``a``."""
    return float(a.sum())


def task_page(a: np.ndarray) -> float:
    """Read one float of every 4 KiB page of ``a`` (float64: 512 per page)."""
    return float(a[::512].sum())


def task_state_sum(ctx: Any) -> float:
    return float(ctx.state["a"].sum())


def task_state_page(ctx: Any) -> float:
    return float(ctx.state["a"][::512].sum())


def noop() -> None:
    return None


def nap(seconds: float) -> None:
    time.sleep(seconds)


TASKS = {"sum": (task_sum, task_state_sum), "page": (task_page, task_state_page)}

# ---- contenders -----------------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    run: Callable[[], list[float] | None]  # the timed call; returns the tasks' results
    close: Callable[[], None] = lambda: None
    kind: str = "peer"  # "memcpy" | "compute" | "actionpool" | "peer"
    note: str = ""
    samples: list[float] = field(default_factory=list)


@contextlib.contextmanager
def preserved_environ() -> Iterator[None]:
    """Undo what a library writes into os.environ (LocalCluster: OMP_NUM_THREADS=1 ...)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        if dict(os.environ) != saved:
            os.environ.clear()
            os.environ.update(saved)


def memcpy_contenders(a: np.ndarray) -> list[Contender]:
    dst = np.empty_like(a)
    dst.fill(1.0)  # pre-fault every page

    def warm() -> None:
        np.copyto(dst, a)

    def fresh() -> None:
        out = np.empty_like(a)
        np.copyto(out, a)

    return [
        Contender("memcpy (np.copyto, pre-faulted dst)", lambda: warm(), kind="memcpy"),
        Contender("memcpy into fresh np.empty", lambda: fresh(), kind="memcpy-fresh"),
    ]


def copy_step_contenders(a: np.ndarray) -> list[Contender]:
    """actionpool's copy of the array into shared memory, without the tasks."""
    from actionpool.shm import DEFAULT_SHM_THRESHOLD, Arena, SegmentPool

    pool = SegmentPool(max_free=4 * a.nbytes)
    count = iter(range(1 << 62))

    def copy(with_pool: bool) -> None:
        arena = Arena(
            f"ap-{os.getpid()}-copystep{next(count)}",
            DEFAULT_SHM_THRESHOLD,
            pool=pool if with_pool else None,
        )
        try:
            arena.dumps(a)
        finally:
            arena.close()

    return [
        Contender("copy step: new segment per run (pwrite)", lambda: copy(False), kind="copy"),
        Contender(
            "copy step: reused pool segment (memcpy)", lambda: copy(True), pool.close, "copy"
        ),
    ]


def compute_contender(a: np.ndarray, fn: Callable[[np.ndarray], float]) -> Contender:
    return Contender(f"one task's work in-process ({fn.__name__})", lambda: [fn(a)], kind="compute")


def actionpool_contenders(a: np.ndarray, args: argparse.Namespace) -> list[Contender]:
    import actionpool as ap

    fn, state_fn = TASKS[args.work]
    shm = ap.Runner(cpu_workers=args.workers, io_workers=2)
    pickled = ap.Runner(cpu_workers=args.workers, io_workers=2, shm_threshold=None)
    for r in (shm, pickled):  # start every worker
        plan = ap.Plan()
        for _ in range(2 * args.workers):
            plan.add(noop)
        r.run(plan).raise_for_failures()

    def by_arg(runner: ap.Runner) -> list[float]:
        plan = ap.Plan()
        nodes = [plan.add(fn, a, name=f"t{i}") for i in range(args.tasks)]
        report = runner.run(plan)
        return [report[n] for n in nodes]

    def by_state() -> list[float]:
        plan = ap.Plan()
        nodes = [plan.add(state_fn, name=f"t{i}") for i in range(args.tasks)]
        report = shm.run(plan, state={"a": a})
        return [report[n] for n in nodes]

    return [
        Contender("actionpool, shared memory (argument)", lambda: by_arg(shm), kind="actionpool"),
        Contender(
            "actionpool, shared memory (state, ctx.state)", by_state, shm.shutdown, "actionpool"
        ),
        Contender(
            "actionpool, shm_threshold=None (pickled)",
            lambda: by_arg(pickled),
            pickled.shutdown,
            "actionpool",
        ),
    ]


def ppe_contender(a: np.ndarray, args: argparse.Namespace) -> Contender:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    fn = TASKS[args.work][0]
    # spawn: this process has threads (actionpool's scheduler, Dask's loop); never fork it
    ex = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"))
    list(ex.map(nap, [0.2] * (2 * args.workers)))  # start every worker

    def run() -> list[float]:
        futs = [ex.submit(fn, a) for _ in range(args.tasks)]
        return [f.result() for f in futs]

    return Contender(
        "concurrent.futures.ProcessPoolExecutor (pickled)",
        run,
        lambda: ex.shutdown(wait=True, cancel_futures=True),
    )


def joblib_contender(a: np.ndarray, args: argparse.Namespace) -> Contender | None:
    try:
        import joblib
    except ImportError:
        return None
    fn = TASKS[args.work][0]

    def run() -> list[float]:
        out: list[float] = joblib.Parallel(n_jobs=args.workers, backend="loky")(
            joblib.delayed(fn)(a) for _ in range(args.tasks)
        )
        return out

    def close() -> None:
        from joblib.externals.loky import reusable_executor

        ex = reusable_executor._executor
        if ex is not None:
            ex.shutdown(wait=True, kill_workers=True)

    joblib.Parallel(n_jobs=args.workers, backend="loky")(
        joblib.delayed(nap)(0.2) for _ in range(2 * args.workers)
    )
    return Contender(
        "joblib.Parallel loky, auto-memmap (max_nbytes='1M')",
        run,
        close,
        note=f"temp folder: {os.environ.get('JOBLIB_TEMP_FOLDER', '/dev/shm when it fits')}",
    )


def dask_contenders(a: np.ndarray, args: argparse.Namespace, tmp: Path) -> list[Contender]:
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        return []
    dask.config.set({"temporary-directory": str(tmp / "dask")})  # not /tmp/dask-scratch-space
    fn = TASKS[args.work][0]
    with preserved_environ():
        cluster = LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.ERROR,
        )
        client = Client(cluster)
        client.wait_for_workers(args.workers)
        client.gather([client.submit(nap, 0.1, pure=False) for _ in range(args.workers)])

    def scattered() -> list[float]:
        # hash=False: a fresh key every round, so no round reuses the previous one's copy
        fut = client.scatter(a, broadcast=True, hash=False)
        futs = [client.submit(fn, fut, pure=False) for _ in range(args.tasks)]
        out: list[float] = client.gather(futs)
        del fut, futs
        return out

    def direct() -> list[float]:
        futs = [client.submit(fn, a, pure=False) for _ in range(args.tasks)]
        out: list[float] = client.gather(futs)
        del futs
        return out

    def close() -> None:
        with preserved_environ():
            client.close()
            cluster.close()

    return [
        Contender("dask, scatter(broadcast=True) + submit", scattered),
        Contender("dask, array passed to each submit", direct, close),
    ]


def ray_init(workers: int, tmp: Path) -> None:
    """Start a quiet local Ray with ``workers`` CPUs, its files under ``tmp``, leaving
    ``os.environ`` as it was."""
    import ray

    with preserved_environ():
        ray.init(
            num_cpus=workers,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            _temp_dir=str(tmp / "ray"),
        )


def ray_contenders(a: np.ndarray, args: argparse.Namespace, tmp: Path) -> list[Contender]:
    try:
        import ray
    except ImportError:
        return []
    fn = TASKS[args.work][0]
    ray_init(args.workers, tmp)
    remote = ray.remote(num_cpus=1)(fn)
    try:
        ray.get([ray.remote(num_cpus=1)(nap).remote(0.2) for _ in range(2 * args.workers)])
    except BaseException:
        ray.shutdown()
        raise

    def put() -> list[float]:
        ref = ray.put(a)
        out: list[float] = ray.get([remote.remote(ref) for _ in range(args.tasks)])
        del ref
        return out

    def direct() -> list[float]:
        out: list[float] = ray.get([remote.remote(a) for _ in range(args.tasks)])
        return out

    def close() -> None:
        with preserved_environ():
            ray.shutdown()

    return [
        Contender("ray, ray.put + one task per ref", put),
        Contender("ray, array passed to each task", direct, close),
    ]


# ---- measuring ------------------------------------------------------------------------------


def shm_entries() -> set[str]:
    return {p.name for p in SHM.iterdir()} if SHM.is_dir() else set()


def versions() -> dict[str, str]:
    out = {}
    for dist in ("actionpool", "numpy", "cloudpickle", "joblib", "dask", "distributed", "ray"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def machine(workers: int) -> dict[str, Any]:
    model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    shm = shutil.disk_usage(SHM) if SHM.is_dir() else None
    return {
        "cpu": model,
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cpus": psutil.cpu_count(logical=True),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "dev_shm_gib": round(shm.total / 2**30, 1) if shm else None,
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "versions": versions(),
        "workers": workers,
    }


def check(name: str, out: list[float] | None, want: float, n: int) -> None:
    if out is None:
        return
    if len(out) != n or not all(abs(x - want) <= REL_TOL * abs(want) for x in out):
        raise AssertionError(f"{name}: wrong results {out!r}, want {n} x {want!r}")


def child_main(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore", message=".*[Ll]arge (object|graph)")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    nbytes = args.mb * 10**6
    a = np.random.default_rng(0).random(nbytes // 8)
    fn = TASKS[args.work][0]
    want = fn(a)
    info = machine(args.workers)
    tmp = Path(tempfile.mkdtemp(prefix="bench_arrays_"))
    contenders: list[Contender] = []
    setup: dict[str, float] = {}

    def add(name: str, make: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        made = make()
        setup[name] = time.perf_counter() - t0
        if made is None:
            return
        contenders.extend(made if isinstance(made, list) else [made])

    try:
        add("memcpy", lambda: memcpy_contenders(a))
        add("compute", lambda: compute_contender(a, fn))
        add("copy step", lambda: copy_step_contenders(a))
        add("actionpool", lambda: actionpool_contenders(a, args))
        add("ProcessPoolExecutor", lambda: ppe_contender(a, args))
        add("joblib", lambda: joblib_contender(a, args))
        if not args.no_dask:
            add("dask", lambda: dask_contenders(a, args, tmp))
        if not args.no_ray:
            add("ray", lambda: ray_contenders(a, args, tmp))
        names = [c.name for c in contenders]
        print(f"contenders ready: {', '.join(names)}", file=sys.stderr, flush=True)
        print(f"setup seconds: { {k: round(v, 2) for k, v in setup.items()} }", file=sys.stderr)

        for c in contenders:  # warm-up round, untimed (and checked)
            check(c.name, c.run(), want, 1 if c.kind == "compute" else args.tasks)
        started = time.perf_counter()
        for r in range(args.rounds):
            k = r % len(contenders)
            for c in contenders[k:] + contenders[:k]:
                gc.collect()
                t0 = time.perf_counter()
                out = c.run()
                c.samples.append(time.perf_counter() - t0)
                check(c.name, out, want, 1 if c.kind == "compute" else args.tasks)
                del out
            print(
                f"round {r + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    finally:
        for c in reversed(contenders):
            try:
                c.close()
            except Exception as exc:
                print(f"closing {c.name}: {exc!r}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)

    rows = table_rows(contenders, nbytes)
    report(args, info, rows, nbytes)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": info,
                    "args": vars(args),
                    "array_bytes": nbytes,
                    "setup_s": setup,
                    "results": rows,
                    "targets": targets(rows),
                },
                indent=2,
            )
        )


def table_rows(contenders: list[Contender], nbytes: int) -> list[dict[str, Any]]:
    med = {c.name: statistics.median(c.samples) for c in contenders}
    memcpy = next(med[c.name] for c in contenders if c.kind == "memcpy")
    ap_ref = med["actionpool, shared memory (argument)"]
    return [
        {
            "contender": c.name,
            "kind": c.kind,
            "median_s": med[c.name],
            "min_s": min(c.samples),
            "max_s": max(c.samples),
            "samples_s": c.samples,
            "gb_per_s": nbytes / med[c.name] / 1e9,
            "x_memcpy": med[c.name] / memcpy,
            "x_actionpool": med[c.name] / ap_ref,
            "note": c.note,
        }
        for c in contenders
    ]


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["contender"]: r for r in rows}
    shm = by["actionpool, shared memory (argument)"]
    pickled = by["actionpool, shm_threshold=None (pickled)"]
    speedup = pickled["median_s"] / shm["median_s"]
    return {
        "x_memcpy": shm["x_memcpy"],
        "within_2x_memcpy": shm["x_memcpy"] <= 2.0,
        "speedup_vs_pickled": speedup,
        "at_least_5x_vs_pickled": speedup >= 5.0,
    }


def report(
    args: argparse.Namespace, info: dict[str, Any], rows: list[dict[str, Any]], nbytes: int
) -> None:
    v = info["versions"]
    print(
        f"# Passing a {nbytes / 1e6:.0f} MB array to {args.tasks} cpu tasks"
        f" ({args.workers} workers, work: {args.work}, {args.rounds} rounds)\n"
    )
    print(
        f"Machine: {info['cpu']}, {info['physical_cores']} physical cores"
        f" ({info['logical_cpus']} logical, affinity {info['affinity']}),"
        f" {info['memory_gib']} GiB memory, /dev/shm {info['dev_shm_gib']} GiB, {info['os']};"
        f" Python {info['python']}; " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".\n"
    )
    print(
        "Times: median (min-max) of the rounds, seconds. GB/s: array bytes / median."
        " x memcpy: median / one pre-faulted memcpy of the array. x actionpool:"
        " median / actionpool's (shared memory, argument).\n"
    )
    print("| contender | median s | min-max s | GB/s | x memcpy | x actionpool |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['contender']} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f}"
            f" | {r['gb_per_s']:.2f} | {r['x_memcpy']:.1f} | {r['x_actionpool']:.2f} |"
        )
    t = targets(rows)
    print(
        f"\nTargets: actionpool within 2x of one memcpy: {t['x_memcpy']:.1f}x ->"
        f" {'met' if t['within_2x_memcpy'] else 'NOT met'}; at least 5x faster than"
        f" pickling into every task: {t['speedup_vs_pickled']:.1f}x ->"
        f" {'met' if t['at_least_5x_vs_pickled'] else 'NOT met'}."
    )
    for r in rows:
        if r["note"]:
            print(f"- {r['contender']}: {r['note']}")


# ---- the supervisor: runs the child, then checks what it left -------------------------------


def become_subreaper() -> None:
    if sys.platform == "linux":
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def descendants() -> list[psutil.Process]:
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(p.pid, os.WNOHANG)
            else:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="array size in MB (default 200)")
    parser.add_argument("--tasks", type=int, default=8, help="tasks per call (default 8)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument(
        "--workers",
        type=int,
        default=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        help="worker processes of every pool (default: physical cores)",
    )
    parser.add_argument(
        "--work",
        choices=sorted(TASKS),
        default="sum",
        help="sum: float(a.sum()) (default); page: one float per 4 KiB page",
    )
    parser.add_argument("--no-dask", action="store_true", help="leave Dask out")
    parser.add_argument("--no-ray", action="store_true", help="leave Ray out")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return 0

    become_subreaper()
    before = shm_entries()
    child = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], check=False)
    deadline = time.monotonic() + 15.0  # Ray's and Dask's helpers may take a moment
    while (left := descendants()) and time.monotonic() < deadline:
        time.sleep(0.2)
    left_desc = []
    for p in left:
        with contextlib.suppress(psutil.Error):
            left_desc.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
            p.kill()  # ours: started by the child, reparented here
    new_shm = sorted(shm_entries() - before)
    print(
        f"\nAfter the benchmark process exited: processes left behind:"
        f" {', '.join(left_desc) or 'none'}; /dev/shm: {len(before)} entries before,"
        f" {len(before) + len(new_shm)} after, new: {', '.join(new_shm) or 'none'}."
    )
    if args.json and Path(args.json).exists():
        data = json.loads(Path(args.json).read_text())
        data["left_behind"] = {"processes": left_desc, "dev_shm": new_shm}
        Path(args.json).write_text(json.dumps(data, indent=2))
    return child.returncode or (1 if left_desc or new_shm else 0)


if __name__ == "__main__":
    sys.exit(main())
