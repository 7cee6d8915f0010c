"""The benchmark suite of issue 5: actionpool against its peers on workloads W1-W9.

Every peer that is installed takes part: joblib, loky, ``concurrent.futures``,
``multiprocessing``, mpire, pebble, Dask (``distributed``) and Ray (optional). Each
library runs in a *driver* process of its own (this module, imported as ``suite``), which
keeps its pools warm between measurements; this process (the parent) only sends each
driver "run one sample of workload X" and records what comes back. So a peer that
crashes, hangs or changes ``os.environ`` cannot take the others down: a failure is
recorded (with the tail of the driver's log) and the suite goes on.

Workloads (see ``issues show 5``; sizes are ``--quick`` / default):

* W1 map of tiny calls (``x + 1``), 5,000 / 20,000 items, tasks/s; each peer used the way
  its docs recommend for a map (``Pool.map``'s default chunksize, joblib
  ``batch_size="auto"``, mpire's automatic chunks; ``Executor.map`` / pebble with
  ``chunksize = ceil(n / (4 x workers))``, multiprocessing's default formula; Dask bag and
  Ray tasks over ``4 x workers`` partitions). A sample is the median of up to 5 maps
  within 50 ms (one for the slow peers).
* W2 submit + result round trip of a no-op with a warm pool, median in microseconds.
* W3 8 x 50 ms pure-Python busy tasks at n = physical cores; efficiency = ideal / wall,
  ideal = (8 tasks run serially in-process, measured in the same round) x ceil(8 /
  cores) / 8: the wall of equal, indivisible tasks perfectly spread, which is serial /
  cores up to 8 cores and one task's time beyond.
* W5 a 50 MB float64 array to 4 tasks that each sum it; effective bandwidth = 4 x 50 MB /
  wall, as a ratio to one memcpy of the array (``np.copyto`` into a pre-faulted array,
  as in ``bench_arrays.py``; each sample is the median of 5 copies).
* W6 20 x 50 ms sleeps on threads (actionpool ``kind="io"``), 20 threads everywhere, so
  ideal = ceil(20 / 20) x 50 ms = 50 ms; ratio = wall / ideal.
* W7 cold start: create a pool of n = cores workers, get the result of one ``os.getpid``
  call (a builtin: a fresh worker imports nothing for it), shut down (ms); every sample
  in a fresh interpreter; the library's modules are imported first, untimed (reported
  apart). Each library uses its default start method (fork for multiprocessing,
  concurrent.futures, mpire and pebble on Linux before Python 3.14).
* W8 mixed plan (actionpool only): cpu and io nodes in one plan; wall / max(cpu work /
  cores, io wait), cpu work measured serially in-process in the same round.
* W9 wide plan (actionpool only): 5,000 tiny cpu nodes + a fan-in node, nodes/s; and
  a chain and a diamond lattice of several sizes up to 10,000+ nodes: run time per
  (node + edge), which is constant when scheduling is linear in nodes + edges.
* Scaling: speedup (serial in-process time / parallel time) vs workers from 1 to the
  physical cores (powers of two and the core count), for ~1 ms, ~10 ms and ~100 ms busy
  tasks, for actionpool, ``concurrent.futures``, joblib and ``multiprocessing``.

Rounds are interleaved: round r runs every contender of a workload once, in an order
rotated by r, so drift on a shared machine hits all of them alike; tables give medians.
Tasks are module-level functions of this module, which every worker can import, so
every library pickles them by reference.

Output (``--out``, default ``docs/benchmarks/``): ``results.json`` (every sample, the
machine), ``results.md`` (medians, ratios to the best peer, targets), PNG plots
(``scaling_<g>.png`` per granularity, ``w9_overhead.png``). Afterwards the parent, a
child subreaper (Linux), checks that no process is left behind and that ``/dev/shm``
holds nothing new, and prints a line saying so.

Usage::

    python benchmarks/suite.py [--quick] [--out DIR] [--rounds N] [--workers N]
                               [--only actionpool,joblib,...] [--workloads W1,W2,...]
                               [--no-dask] [--no-ray]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import math
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_arrays import (  # noqa: E402  (the colleague's helpers: same checks, same machine info)
    become_subreaper,
    descendants,
    machine,
    preserved_environ,
    ray_init,
    shm_entries,
)
from cold_start import COLD, reply_channel  # noqa: E402  (W7: a stdlib-only module)

REL_TOL = 1e-9
IO_THREADS = 20  # W6: threads of every thread pool (>= 20 tasks: ideal = one sleep)
DIST = {  # library -> (module to find, distribution for the version)
    "actionpool": ("actionpool", "actionpool"),
    "concurrent.futures": ("concurrent.futures", None),
    "multiprocessing": ("multiprocessing", None),
    "joblib": ("joblib", "joblib"),
    "loky": ("loky", "loky"),
    "mpire": ("mpire", "mpire"),
    "pebble": ("pebble", "pebble"),
    "dask": ("distributed", "distributed"),
    "ray": ("ray", "ray"),
}
GRANULARITIES = {"1ms": 0.001, "10ms": 0.010, "100ms": 0.100}
SCALING_LIBS = ("actionpool", "concurrent.futures", "joblib", "multiprocessing")

# ---- the tasks (module level, importable as suite.*: pickled by reference) -----------------


def inc(x: int) -> int:
    return x + 1


def inc_chunk(xs: list[int]) -> list[int]:
    return [x + 1 for x in xs]


def noop() -> None:
    return None


def busy(n: int) -> int:
    """Pure-Python work: ``n`` loop iterations (the GIL is held throughout)."""
    x = 0
    for i in range(n):
        x += i
    return x


def busy_timed(n: int) -> float:
    t0 = time.perf_counter()
    busy(n)
    return time.perf_counter() - t0


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def task_sum(a: np.ndarray) -> float:
    """Read every byte of ``a`` (as ``bench_arrays.task_sum``)."""
    return float(a.sum())


def add2(a: int, b: int) -> int:
    return (a + b) % 1_000_003


def count_parts(*parts: list[Any]) -> int:
    return sum(len(p) for p in parts)


def mp_chunksize(n: int, workers: int) -> int:
    """multiprocessing.Pool.map's default chunksize: ceil(n / (4 x workers))."""
    chunk, extra = divmod(n, 4 * workers)
    return max(1, chunk + (1 if extra else 0))


def chunks(xs: list[int], k: int) -> list[list[int]]:
    size = max(1, math.ceil(len(xs) / k))
    return [xs[i : i + size] for i in range(0, len(xs), size)]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def timed_median(fn: Callable[[], Any], k: int = 5, budget_s: float = 0.05) -> tuple[float, Any]:
    """Median of up to ``k`` timings of ``fn`` and its last output; fewer once
    ``budget_s`` is spent (at least one). W1's maps take ~5 ms here: one timing per
    round was one scheduling hiccup of this VM away from a 0.6x or a 1.2x sample."""
    ts: list[float] = []
    out: Any = None
    end = time.perf_counter() + budget_s
    while len(ts) < k and (not ts or time.perf_counter() < end):
        t, out = timed(fn)
        ts.append(t)
    return statistics.median(ts), out


def roundtrips(call: Callable[[], Any], k: int, budget_s: float) -> dict[str, Any]:
    """Median of up to ``k`` round trips (at least 10; stops after ``budget_s``)."""
    rts: list[float] = []
    end = time.perf_counter() + budget_s
    for i in range(k):
        t0 = time.perf_counter()
        call()
        rts.append(time.perf_counter() - t0)
        if i >= 9 and time.perf_counter() > end:
            break
    rts.sort()
    return {
        "t": statistics.median(rts),
        "n": len(rts),
        "min": rts[0],
        "p90": rts[int(0.9 * (len(rts) - 1))],
    }


def check_values(out: list[Any], want: list[Any], what: str) -> None:
    if list(out) != want:
        raise AssertionError(f"{what}: wrong results (first {list(out)[:3]!r}...)")


def check_sums(out: list[float], want: float, n: int) -> None:
    if len(out) != n or not all(abs(x - want) <= REL_TOL * abs(want) for x in out):
        raise AssertionError(f"wrong sums {out!r}, want {n} x {want!r}")


# ---- drivers: one per library, each in its own process ------------------------------------


class Driver:
    """One library's pools, kept warm; ``op_<name>`` runs one sample and returns a dict
    with ``t`` (seconds) and whatever else is worth keeping. Ops a library has no
    equivalent for are simply absent."""

    dist: str | None = None

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.workers: int = cfg["workers"]
        self.tmp = Path(cfg["tmp"])
        self._array: tuple[int, np.ndarray, float] | None = None

    def hello(self) -> dict[str, Any]:
        version = platform.python_version()
        if self.dist:
            version = metadata.version(self.dist)
        return {"version": version, "pid": os.getpid()}

    def array(self, mb: int) -> tuple[np.ndarray, float]:
        if self._array is None or self._array[0] != mb:
            self._array = None
            a = np.random.default_rng(0).random(mb * 10**6 // 8)
            self._array = (mb, a, task_sum(a))
        return self._array[1], self._array[2]

    def op_drop_array(self) -> dict[str, Any]:
        self._array = None
        return {"t": 0.0}

    def close(self) -> None:
        pass


class BaselineDriver(Driver):
    """The yardsticks: serial work in-process, one memcpy, a raw pipe round trip."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self._pipe: Any = None
        self._echo: Any = None
        self._dst: np.ndarray | None = None

    def op_calibrate(self) -> dict[str, Any]:
        """Iterations of ``busy`` per second: the median of 5 runs of ~40 ms each."""
        n = 1_000_000
        busy(n)
        t = statistics.median(timed(lambda: busy(n))[0] for _ in range(5))
        return {"t": t, "iters_per_s": n / t}

    def op_contention(self, iters: int) -> dict[str, Any]:
        """How much slower one busy task runs when every core runs one (shared caches,
        SMT siblings, a busy host): a ceiling on W3's efficiency for any pool."""
        import multiprocessing

        w = self.workers
        with multiprocessing.get_context("fork").Pool(w) as pool:
            pool.map(busy_timed, [1000] * w, chunksize=1)
            alone = [pool.apply(busy_timed, (iters,)) for _ in range(5)]
            together = [t for _ in range(5) for t in pool.map(busy_timed, [iters] * w, 1)]
        a, b = statistics.median(alone), statistics.median(together)
        return {"t": b, "alone_s": a, "together_s": b, "ceiling": a / b}

    def op_serial(self, iters: int, tasks: int) -> dict[str, Any]:
        t, _ = timed(lambda: [busy(iters) for _ in range(tasks)])
        return {"t": t}

    def op_memcpy(self, mb: int) -> dict[str, Any]:
        a, _ = self.array(mb)
        if self._dst is None or self._dst.shape != a.shape:
            self._dst = np.empty_like(a)
            self._dst.fill(1.0)  # pre-fault every page
        dst = self._dst
        # the median of 5 copies: one copy alone is at the mercy of a neighbour's burst
        # (4.5-12 ms from round to round here), which flattered every ratio to it
        t = statistics.median(timed(lambda: np.copyto(dst, a))[0] for _ in range(5))
        return {"t": t}

    def op_pipe_roundtrip(self, k: int, budget_s: float) -> dict[str, Any]:
        import multiprocessing

        if self._pipe is None:
            here, there = multiprocessing.Pipe()
            self._echo = multiprocessing.get_context("fork").Process(
                target=_echo, args=(there,), daemon=True
            )
            self._echo.start()
            there.close()
            self._pipe = here
        conn = self._pipe

        def call() -> None:
            conn.send(1)
            conn.recv()

        return roundtrips(call, k, budget_s)

    def close(self) -> None:
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                self._pipe.send(None)
            self._echo.join(5)
            if self._echo.is_alive():
                self._echo.kill()
                self._echo.join()


def _echo(conn: Any) -> None:
    while (msg := conn.recv()) is not None:
        conn.send(msg)


class ActionpoolDriver(Driver):
    dist = "actionpool"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        import actionpool as ap

        self.ap = ap
        self.nap_io = ap.action(nap, kind="io", name="nap")
        self.runners: dict[int, Any] = {}
        self.runner = self.runner_for(self.workers)

    def runner_for(self, w: int) -> Any:
        if w not in self.runners:
            r = self.ap.Runner(cpu_workers=w, io_workers=IO_THREADS)
            plan = self.ap.Plan()
            for _ in range(2 * w):
                plan.add(nap, 0.05)
            r.run(plan).raise_for_failures()  # every worker started
            self.runners[w] = r
        return self.runners[w]

    def run_plan(self, plan: Any, runner: Any = None) -> Any:
        report = (runner or self.runner).run(plan)
        report.raise_for_failures()
        return report

    def op_w1(self, n: int) -> dict[str, Any]:
        xs = list(range(n))
        t, out = timed_median(lambda: list(self.runner.map(inc, xs)))
        check_values(out, [x + 1 for x in xs], "w1")
        return {"t": t}

    def op_w2(self, k: int, budget_s: float) -> dict[str, Any]:
        r = self.runner
        return roundtrips(lambda: r.submit(noop).result(), k, budget_s)

    def op_w3(self, iters: int, tasks: int) -> dict[str, Any]:
        t, out = timed(lambda: list(self.runner.map(busy, [iters] * tasks)))
        assert len(out) == tasks
        return {"t": t}

    def op_w3_plan(self, iters: int, tasks: int) -> dict[str, Any]:
        def run() -> Any:
            plan = self.ap.Plan()
            for _ in range(tasks):
                plan.add(busy, iters)
            return self.run_plan(plan)

        t, _ = timed(run)
        return {"t": t}

    def op_w5(self, mb: int, tasks: int) -> dict[str, Any]:
        a, want = self.array(mb)

        def run() -> list[float]:
            plan = self.ap.Plan()
            nodes = [plan.add(task_sum, a) for _ in range(tasks)]
            report = self.run_plan(plan)
            return [report[n] for n in nodes]

        t, out = timed(run)
        check_sums(out, want, tasks)
        return {"t": t}

    def op_w6(self, n: int, seconds: float) -> dict[str, Any]:
        t, out = timed(lambda: list(self.runner.map(self.nap_io, [seconds] * n)))
        assert len(out) == n
        return {"t": t}

    def op_w6_plan(self, n: int, seconds: float) -> dict[str, Any]:
        def run() -> Any:
            plan = self.ap.Plan()
            for _ in range(n):
                plan.add(self.nap_io, seconds)
            return self.run_plan(plan)

        t, _ = timed(run)
        return {"t": t}

    def op_w8(
        self, mode: str, cpu_nodes: int, iters: int, io_nodes: int, io_s: float
    ) -> dict[str, Any]:
        def run() -> Any:
            plan = self.ap.Plan()
            cpu = [plan.add(busy, iters) for _ in range(cpu_nodes if mode != "io" else 0)]
            io = [plan.add(self.nap_io, io_s) for _ in range(io_nodes if mode != "cpu" else 0)]
            plan.add(count_parts, cpu, io)
            return self.run_plan(plan)

        t, _ = timed(run)
        return {"t": t}

    def op_w9_wide(self, n: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        plan = self.ap.Plan()
        nodes = [plan.add(inc, i) for i in range(n)]
        total = plan.add(sum, nodes)
        t1 = time.perf_counter()
        report = self.run_plan(plan)
        t2 = time.perf_counter()
        assert report[total] == n * (n + 1) // 2
        return {"t": t2 - t1, "build_s": t1 - t0, "nodes": n + 1, "edges": n}

    def op_w9_chain(self, n: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        plan = self.ap.Plan()
        node = plan.add(inc, 0)
        for _ in range(n - 1):
            node = plan.add(inc, node)
        t1 = time.perf_counter()
        report = self.run_plan(plan)
        t2 = time.perf_counter()
        assert report[node] == n
        return {"t": t2 - t1, "build_s": t1 - t0, "nodes": n, "edges": n - 1}

    def op_w9_lattice(self, n: int, width: int) -> dict[str, Any]:
        """A diamond lattice: ``n // width`` layers; node (i, j) needs (i-1, j), (i-1, j+1)."""
        layers = max(2, n // width)
        t0 = time.perf_counter()
        plan = self.ap.Plan()
        row = [plan.add(inc, j) for j in range(width)]
        for _ in range(layers - 1):
            row = [plan.add(add2, row[j], row[(j + 1) % width]) for j in range(width)]
        t1 = time.perf_counter()
        report = self.run_plan(plan)
        t2 = time.perf_counter()
        assert isinstance(report[row[0]], int)
        nodes = layers * width
        return {"t": t2 - t1, "build_s": t1 - t0, "nodes": nodes, "edges": 2 * (nodes - width)}

    def op_scale(self, w: int, iters: int, tasks: int) -> dict[str, Any]:
        r = self.runner_for(w)
        t, out = timed(lambda: list(r.map(busy, [iters] * tasks)))
        assert len(out) == tasks
        return {"t": t}

    def op_trim(self, keep: list[int]) -> dict[str, Any]:
        for w in [w for w in self.runners if w not in keep and w != self.workers]:
            self.runners.pop(w).shutdown()
        return {"t": 0.0}

    def close(self) -> None:
        for r in self.runners.values():
            r.shutdown()
        self.runners.clear()


class ExecutorOps:
    """W1-W5 for anything with the ``concurrent.futures.Executor`` interface, as ``self.ex``."""

    ex: Any
    workers: int
    array: Any

    def op_w1(self, n: int) -> dict[str, Any]:
        xs = list(range(n))
        cs = mp_chunksize(n, self.workers)
        t, out = timed_median(lambda: list(self.ex.map(inc, xs, chunksize=cs)))
        check_values(out, [x + 1 for x in xs], "w1")
        return {"t": t}

    def op_w2(self, k: int, budget_s: float) -> dict[str, Any]:
        ex = self.ex
        return roundtrips(lambda: ex.submit(noop).result(), k, budget_s)

    def op_w3(self, iters: int, tasks: int) -> dict[str, Any]:
        t, _ = timed(lambda: list(self.ex.map(busy, [iters] * tasks)))
        return {"t": t}

    def op_w5(self, mb: int, tasks: int) -> dict[str, Any]:
        a, want = self.array(mb)
        t, out = timed(
            lambda: [f.result() for f in [self.ex.submit(task_sum, a) for _ in range(tasks)]]
        )
        check_sums(out, want, tasks)
        return {"t": t}


class FuturesDriver(ExecutorOps, Driver):
    """concurrent.futures: ProcessPoolExecutor (default start method) and threads."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.pools: dict[int, Any] = {}
        self.ex = self.pool_for(self.workers)
        self.threads: Any = None

    def pool_for(self, w: int) -> Any:
        from concurrent.futures import ProcessPoolExecutor

        if w not in self.pools:
            ex = ProcessPoolExecutor(w)
            list(ex.map(nap, [0.05] * (2 * w)))  # every worker started
            self.pools[w] = ex
        return self.pools[w]

    def op_w6(self, n: int, seconds: float) -> dict[str, Any]:
        from concurrent.futures import ThreadPoolExecutor

        if self.threads is None:
            self.threads = ThreadPoolExecutor(IO_THREADS)
        t, _ = timed(lambda: list(self.threads.map(nap, [seconds] * n)))
        return {"t": t}

    def op_scale(self, w: int, iters: int, tasks: int) -> dict[str, Any]:
        ex = self.pool_for(w)
        cs = mp_chunksize(tasks, w)
        t, _ = timed(lambda: list(ex.map(busy, [iters] * tasks, chunksize=cs)))
        return {"t": t}

    def op_trim(self, keep: list[int]) -> dict[str, Any]:
        for w in [w for w in self.pools if w not in keep and w != self.workers]:
            self.pools.pop(w).shutdown(wait=True)
        return {"t": 0.0}

    def close(self) -> None:
        for ex in self.pools.values():
            ex.shutdown(wait=True, cancel_futures=True)
        if self.threads is not None:
            self.threads.shutdown(wait=True)


class PoolOps:
    """W1-W5 for anything with ``multiprocessing.Pool``'s ``map`` / ``apply_async``, as
    ``self.pool`` (multiprocessing and mpire), each with its own default chunking."""

    pool: Any
    array: Any

    def op_w1(self, n: int) -> dict[str, Any]:
        xs = list(range(n))
        t, out = timed_median(lambda: self.pool.map(inc, xs))
        check_values(out, [x + 1 for x in xs], "w1")
        return {"t": t}

    def op_w2(self, k: int, budget_s: float) -> dict[str, Any]:
        pool = self.pool
        return roundtrips(lambda: pool.apply_async(noop).get(), k, budget_s)

    def op_w3(self, iters: int, tasks: int) -> dict[str, Any]:
        t, _ = timed(lambda: self.pool.map(busy, [iters] * tasks))
        return {"t": t}

    def op_w5(self, mb: int, tasks: int) -> dict[str, Any]:
        a, want = self.array(mb)

        def run() -> list[float]:
            rs = [self.pool.apply_async(task_sum, (a,)) for _ in range(tasks)]
            return [r.get() for r in rs]

        t, out = timed(run)
        check_sums(out, want, tasks)
        return {"t": t}


class MultiprocessingDriver(PoolOps, Driver):
    """multiprocessing.Pool (default start method) and multiprocessing.pool.ThreadPool."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self.pools: dict[int, Any] = {}
        self.pool = self.pool_for(self.workers)
        self.threads: Any = None

    def pool_for(self, w: int) -> Any:
        import multiprocessing

        if w not in self.pools:
            pool = multiprocessing.Pool(w)
            pool.map(nap, [0.05] * (2 * w), chunksize=1)
            self.pools[w] = pool
        return self.pools[w]

    def op_w6(self, n: int, seconds: float) -> dict[str, Any]:
        from multiprocessing.pool import ThreadPool

        if self.threads is None:
            self.threads = ThreadPool(IO_THREADS)
        t, _ = timed(lambda: self.threads.map(nap, [seconds] * n))
        return {"t": t}

    def op_scale(self, w: int, iters: int, tasks: int) -> dict[str, Any]:
        pool = self.pool_for(w)
        t, _ = timed(lambda: pool.map(busy, [iters] * tasks))
        return {"t": t}

    def op_trim(self, keep: list[int]) -> dict[str, Any]:
        for w in [w for w in self.pools if w not in keep and w != self.workers]:
            pool = self.pools.pop(w)
            pool.close()
            pool.join()
        return {"t": 0.0}

    def close(self) -> None:
        for pool in [*self.pools.values(), self.threads]:
            if pool is not None:
                pool.close()
                pool.join()


class JoblibDriver(Driver):
    """joblib.Parallel: loky backend (reusable executor, auto-memmapping), threads."""

    dist = "joblib"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        import joblib

        self.joblib = joblib
        self.par(self.workers, nap, [0.05] * (2 * self.workers))

    def par(self, n_jobs: int, fn: Callable[..., Any], xs: list[Any], **kw: Any) -> list[Any]:
        d = self.joblib.delayed(fn)
        out: list[Any] = self.joblib.Parallel(n_jobs=n_jobs, **kw)(d(x) for x in xs)
        return out

    def op_w1(self, n: int) -> dict[str, Any]:
        xs = list(range(n))
        t, out = timed_median(lambda: self.par(self.workers, inc, xs, batch_size="auto"))
        check_values(out, [x + 1 for x in xs], "w1")
        return {"t": t}

    def op_w3(self, iters: int, tasks: int) -> dict[str, Any]:
        t, _ = timed(lambda: self.par(self.workers, busy, [iters] * tasks))
        return {"t": t}

    def op_w5(self, mb: int, tasks: int) -> dict[str, Any]:
        a, want = self.array(mb)
        t, out = timed(lambda: self.par(self.workers, task_sum, [a] * tasks))
        check_sums(out, want, tasks)
        return {"t": t}

    def op_w6(self, n: int, seconds: float) -> dict[str, Any]:
        t, _ = timed(lambda: self.par(IO_THREADS, nap, [seconds] * n, prefer="threads"))
        return {"t": t}

    def op_scale_warm(self, w: int) -> dict[str, Any]:
        # the reusable executor is resized when n_jobs changes: do that untimed
        self.par(w, nap, [0.05] * (2 * w))
        return {"t": 0.0}

    def op_scale(self, w: int, iters: int, tasks: int) -> dict[str, Any]:
        t, _ = timed(lambda: self.par(w, busy, [iters] * tasks))
        return {"t": t}

    def close(self) -> None:
        from joblib.externals.loky import reusable_executor

        ex = reusable_executor._executor
        if ex is not None:
            ex.shutdown(wait=True, kill_workers=True)


class LokyDriver(ExecutorOps, Driver):
    """loky.get_reusable_executor (pickles arguments; no memmapping: that is joblib's)."""

    dist = "loky"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        import loky

        self.ex = loky.get_reusable_executor(max_workers=self.workers, timeout=3600)
        list(self.ex.map(nap, [0.05] * (2 * self.workers)))

    def close(self) -> None:
        self.ex.shutdown(wait=True, kill_workers=True)


class MpireDriver(PoolOps, Driver):
    """mpire.WorkerPool (its default start method, fork), kept alive between maps."""

    dist = "mpire"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        from mpire import WorkerPool

        self.WorkerPool = WorkerPool
        self.pool = WorkerPool(n_jobs=self.workers, keep_alive=True)
        self.pool.map(nap, [0.05] * (2 * self.workers))
        self.threads: Any = None

    def op_w6(self, n: int, seconds: float) -> dict[str, Any]:
        if self.threads is None:
            self.threads = self.WorkerPool(
                n_jobs=IO_THREADS, start_method="threading", keep_alive=True
            )
        t, _ = timed(lambda: self.threads.map(nap, [seconds] * n))
        return {"t": t}

    def close(self) -> None:
        for pool in (self.pool, self.threads):
            if pool is not None:
                pool.stop_and_join()


class PebbleDriver(Driver):
    """pebble.ProcessPool (default start method) and pebble.ThreadPool."""

    dist = "pebble"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        import pebble

        self.pebble = pebble
        self.pool = pebble.ProcessPool(max_workers=self.workers)
        list(self.pool.map(nap, [0.05] * (2 * self.workers)).result())
        self.threads: Any = None

    def op_w1(self, n: int) -> dict[str, Any]:
        xs = list(range(n))
        cs = mp_chunksize(n, self.workers)
        t, out = timed_median(lambda: list(self.pool.map(inc, xs, chunksize=cs).result()))
        check_values(out, [x + 1 for x in xs], "w1")
        return {"t": t}

    def op_w2(self, k: int, budget_s: float) -> dict[str, Any]:
        pool = self.pool
        return roundtrips(lambda: pool.schedule(noop).result(), k, budget_s)

    def op_w3(self, iters: int, tasks: int) -> dict[str, Any]:
        t, _ = timed(lambda: list(self.pool.map(busy, [iters] * tasks).result()))
        return {"t": t}

    def op_w5(self, mb: int, tasks: int) -> dict[str, Any]:
        a, want = self.array(mb)

        def run() -> list[float]:
            fs = [self.pool.schedule(task_sum, args=(a,)) for _ in range(tasks)]
            return [f.result() for f in fs]

        t, out = timed(run)
        check_sums(out, want, tasks)
        return {"t": t}

    def op_w6(self, n: int, seconds: float) -> dict[str, Any]:
        if self.threads is None:
            self.threads = self.pebble.ThreadPool(max_workers=IO_THREADS)
        t, _ = timed(lambda: list(self.threads.map(nap, [seconds] * n).result()))
        return {"t": t}

    def close(self) -> None:
        for pool in (self.pool, self.threads):
            if pool is not None:
                pool.close()
                pool.join()


class DaskDriver(Driver):
    """distributed.LocalCluster (processes, 1 thread each), started inside a save/restore
    of os.environ (it sets OMP_NUM_THREADS=1 and the like); W6 on dask's local threaded
    scheduler (``scheduler="threads"``), the one Dask recommends for I/O-bound work."""

    dist = "distributed"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        import dask
        from distributed import Client, LocalCluster

        self.dask = dask
        dask.config.set({"temporary-directory": str(self.tmp / "dask")})
        with preserved_environ():
            self.cluster = LocalCluster(
                n_workers=self.workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            self.client = Client(self.cluster)
            self.client.wait_for_workers(self.workers)
        self.client.gather([self.client.submit(nap, 0.05, pure=False) for _ in range(2)])

    def op_w1(self, n: int) -> dict[str, Any]:
        import dask.bag as db

        xs = list(range(n))
        bag = db.from_sequence(xs, npartitions=4 * self.workers)
        t, out = timed_median(lambda: bag.map(inc).compute())
        check_values(out, [x + 1 for x in xs], "w1")
        return {"t": t}

    def op_w2(self, k: int, budget_s: float) -> dict[str, Any]:
        c = self.client
        return roundtrips(lambda: c.submit(noop, pure=False).result(), k, budget_s)

    def op_w3(self, iters: int, tasks: int) -> dict[str, Any]:
        c = self.client
        t, _ = timed(lambda: c.gather(c.map(busy, [iters] * tasks, pure=False)))
        return {"t": t}

    def op_w5(self, mb: int, tasks: int) -> dict[str, Any]:
        a, want = self.array(mb)
        c = self.client

        def run() -> list[float]:
            fut = c.scatter(a, broadcast=True, hash=False)
            out: list[float] = c.gather([c.submit(task_sum, fut, pure=False) for _ in range(tasks)])
            return out

        t, out = timed(run)
        check_sums(out, want, tasks)
        return {"t": t}

    def op_w6(self, n: int, seconds: float) -> dict[str, Any]:
        d = self.dask

        def run() -> Any:
            parts = [d.delayed(nap, pure=False)(seconds) for _ in range(n)]
            return d.compute(*parts, scheduler="threads", num_workers=IO_THREADS)

        t, _ = timed(run)
        return {"t": t}

    def close(self) -> None:
        with preserved_environ():
            self.client.close()
            self.cluster.close()


class RayDriver(Driver):
    """ray.init(num_cpus=workers); tiny calls batched into 4 x workers tasks (Ray's advice
    against too fine-grained tasks); arrays through ray.put."""

    dist = "ray"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        import ray

        self.ray = ray
        ray_init(self.workers, self.tmp)
        self.r = {
            f.__name__: ray.remote(num_cpus=1)(f) for f in (inc_chunk, noop, busy, task_sum, nap)
        }
        ray.get([self.r["nap"].remote(0.05) for _ in range(2 * self.workers)])

    def op_w1(self, n: int) -> dict[str, Any]:
        xs = list(range(n))
        f = self.r["inc_chunk"]

        def run() -> list[int]:
            parts = self.ray.get([f.remote(c) for c in chunks(xs, 4 * self.workers)])
            return [y for part in parts for y in part]

        t, out = timed_median(run)
        check_values(out, [x + 1 for x in xs], "w1")
        return {"t": t}

    def op_w2(self, k: int, budget_s: float) -> dict[str, Any]:
        f = self.r["noop"]
        return roundtrips(lambda: self.ray.get(f.remote()), k, budget_s)

    def op_w3(self, iters: int, tasks: int) -> dict[str, Any]:
        f = self.r["busy"]
        t, _ = timed(lambda: self.ray.get([f.remote(iters) for _ in range(tasks)]))
        return {"t": t}

    def op_w5(self, mb: int, tasks: int) -> dict[str, Any]:
        a, want = self.array(mb)
        f = self.r["task_sum"]

        def run() -> list[float]:
            ref = self.ray.put(a)
            out: list[float] = self.ray.get([f.remote(ref) for _ in range(tasks)])
            return out

        t, out = timed(run)
        check_sums(out, want, tasks)
        return {"t": t}

    def close(self) -> None:
        with preserved_environ():
            self.ray.shutdown()


DRIVERS: dict[str, type[Driver]] = {
    "baseline": BaselineDriver,
    "actionpool": ActionpoolDriver,
    "concurrent.futures": FuturesDriver,
    "multiprocessing": MultiprocessingDriver,
    "joblib": JoblibDriver,
    "loky": LokyDriver,
    "mpire": MpireDriver,
    "pebble": PebbleDriver,
    "dask": DaskDriver,
    "ray": RayDriver,
}


def driver_main() -> int:
    """Entry point of a driver process: ``python -c 'import suite; suite.driver_main()'
    NAME CONFIG_JSON``; JSON lines in on stdin, JSON lines out."""
    name, cfg = sys.argv[1], json.loads(sys.argv[2])
    reply = reply_channel()

    def send(obj: dict[str, Any]) -> None:
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    def error(exc: BaseException) -> dict[str, Any]:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}

    try:
        drv = DRIVERS[name](cfg)
        send({"ok": True, "value": drv.hello()})
    except BaseException as exc:
        traceback.print_exc()
        send(error(exc))
        return 1
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        op = msg.pop("op")
        if op == "close":
            try:
                drv.close()
                send({"ok": True, "value": {}})
            except BaseException as exc:
                traceback.print_exc()
                send(error(exc))
            break
        fn = getattr(drv, f"op_{op}", None)
        if fn is None:
            send({"ok": False, "error": f"unsupported: {name} has no op {op!r}"})
            continue
        try:
            gc.collect()
            send({"ok": True, "value": fn(**msg)})
        except Exception as exc:
            traceback.print_exc()
            send(error(exc))
    return 0


# ---- the parent: driver processes, rounds, results ----------------------------------------


class DriverError(Exception):
    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def log_tail(path: Path, n: int = 6) -> str:
    with contextlib.suppress(OSError):
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
        return " | ".join(lines[-n:])[-800:]
    return ""


def kill_tree(pid: int) -> None:
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        for p in [*proc.children(recursive=True), proc]:
            with contextlib.suppress(psutil.Error):
                p.kill()


class DriverProc:
    """The parent's handle of one driver process."""

    def __init__(self, name: str, cfg: dict[str, Any], tmp: Path) -> None:
        self.name = name
        self.cfg = cfg
        self.log = tmp / f"driver-{name}.log"
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str] = queue.Queue()
        self.hello: dict[str, Any] = {}
        self.pids: set[int] = set()

    def start(self, timeout: float) -> None:
        code = "import sys, suite; sys.exit(suite.driver_main())"
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, self.name, json.dumps(self.cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=child_env(),
            )
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()
        self.hello = self._reply("start", timeout)

    @staticmethod
    def _read(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _reply(self, op: str, timeout: float) -> dict[str, Any]:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=0.25)
            except queue.Empty:
                self._note_pids()
                if self.proc.poll() is not None:
                    rc = self.proc.returncode
                    raise DriverError(
                        f"{self.name} driver exited (code {rc}) during {op}: {log_tail(self.log)}",
                        fatal=True,
                    ) from None
                if time.monotonic() > deadline:
                    self.kill()
                    raise DriverError(
                        f"{op} timed out after {timeout:.0f} s (driver killed)", fatal=True
                    ) from None
                continue
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if msg.get("ok"):
                value: dict[str, Any] = msg["value"]
                return value
            raise DriverError(str(msg.get("error")), fatal=op == "start")

    def call(self, op: str, timeout: float, **kw: Any) -> dict[str, Any]:
        if not self.alive():
            raise DriverError(f"{self.name} driver is not running", fatal=True)
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise DriverError(f"{self.name} driver: {exc!r}", fatal=True) from None
        out = self._reply(op, timeout)
        self._note_pids()
        return out

    def _note_pids(self) -> None:
        if self.proc is None:
            return
        self.pids.add(self.proc.pid)
        with contextlib.suppress(psutil.Error):
            self.pids.update(p.pid for p in psutil.Process(self.proc.pid).children(True))

    def close(self, timeout: float = 60.0) -> str | None:
        """Ask the driver to close its pools and exit; kill it if it will not."""
        if self.proc is None:
            return None
        err = None
        if self.alive():
            try:
                self.call("close", timeout)
            except DriverError as exc:
                err = str(exc)
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                err = err or "did not exit after close; killed"
        self.kill()
        self.proc.wait()
        self.proc = None
        return err

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._note_pids()
            kill_tree(self.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


@dataclass
class Entry:
    """One contender of one workload."""

    label: str
    lib: str  # a DRIVERS key
    op: str
    kw: dict[str, Any]
    kind: str  # "actionpool" | "peer" | "reference"
    samples: list[float] = field(default_factory=list)  # seconds, one per round
    rounds: list[int] = field(default_factory=list)  # the round of each sample
    extras: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dead: bool = False

    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


class Suite:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.cfg = {"workers": args.workers, "tmp": str(tmp)}
        self.drivers: dict[str, DriverProc] = {}
        self.failed_start: dict[str, str] = {}
        self.versions: dict[str, str] = {}
        self.all_pids: set[int] = set()
        self.t0 = time.perf_counter()

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {text}", file=sys.stderr, flush=True)

    def driver(self, lib: str) -> DriverProc:
        d = self.drivers.get(lib)
        if d is not None and d.alive():
            return d
        if lib in self.failed_start:
            raise DriverError(self.failed_start[lib], fatal=True)
        d = DriverProc(lib, self.cfg, self.tmp)
        self.drivers[lib] = d
        try:
            t, _ = timed(lambda: d.start(timeout=180))
        except DriverError as exc:
            self.failed_start[lib] = f"could not start: {exc}"
            d.close()
            raise DriverError(self.failed_start[lib], fatal=True) from None
        self.versions[lib] = d.hello.get("version", "?")
        self.say(f"{lib} driver ready ({t:.1f} s)")
        return d

    def call(self, lib: str, op: str, timeout: float | None = None, **kw: Any) -> dict[str, Any]:
        return self.driver(lib).call(op, timeout or self.args.op_timeout, **kw)

    def close(self, libs: list[str] | None = None) -> None:
        for lib in list(self.drivers) if libs is None else libs:
            d = self.drivers.pop(lib, None)
            if d is None:
                continue
            err = d.close()
            self.all_pids |= d.pids
            if err:
                self.say(f"closing {lib}: {err}")

    def measure(self, wid: str, entries: list[Entry], rounds: int) -> list[Entry]:
        """One untimed warm-up call per contender, then interleaved rounds."""
        entries = [e for e in entries if e.lib == "baseline" or e.lib in self.args.libs]
        for e in entries:
            self._sample(e, -1, warm=True)
        for r in range(rounds):
            live = [e for e in entries if not e.dead]
            if not live:
                break
            k = r % len(live)
            for e in live[k:] + live[:k]:
                self._sample(e, r)
            self.say(f"{wid}: round {r + 1}/{rounds}")
        return entries

    def _sample(self, e: Entry, rnd: int, warm: bool = False) -> None:
        if e.dead:
            return
        try:
            out = self.call(e.lib, e.op, **e.kw)
        except DriverError as exc:
            msg = str(exc)
            e.errors.append(("warm-up: " if warm else "") + msg)
            self.say(f"  {e.label}: FAILED: {msg}")
            if exc.fatal or warm or msg.startswith("unsupported") or len(e.errors) >= 2:
                e.dead = True
            return
        if not warm:
            e.samples.append(out["t"])
            e.rounds.append(rnd)
            e.extras.append(out)


# ---- workloads -----------------------------------------------------------------------------


def w3_rounds(rounds: int) -> int:
    """W3's rounds: ``2 x rounds + 1`` (11 quick, 15 by default). One W3 round takes
    ~2.3 s with every peer on 2 cores, and one sample's efficiency moved from 56% to
    154% within a run there (session 13): the median of 5 rounds was no verdict."""
    return 2 * rounds + 1


def workloads_w1_to_w6(s: Suite, cal: dict[str, Any]) -> dict[str, Any]:
    a, q = s.args, s.args.quick
    w = a.workers
    res: dict[str, Any] = {}
    rounds = a.rounds
    heavy = max(1, rounds - 2)  # W5 takes seconds per round
    n1 = 20_000
    if "W1" in a.workloads:
        cs = mp_chunksize(n1, w)
        kw = {"n": n1}
        res["W1"] = s.measure(
            "W1",
            [
                Entry("actionpool runner.map (auto batching)", "actionpool", "w1", kw,
                      "actionpool"),
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
            rounds,
        )  # fmt: skip
    if "W2" in a.workloads:
        kw2 = {"k": 100 if q else 300, "budget_s": 1.0 if q else 2.0}
        res["W2"] = s.measure(
            "W2",
            [
                Entry("actionpool runner.submit(noop).result()", "actionpool", "w2", kw2,
                      "actionpool"),
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
            rounds,
        )  # fmt: skip
    if "W3" in a.workloads:
        kw3 = {"iters": int(0.05 * cal["iters_per_s"]), "tasks": 8}
        res["W3"] = s.measure(
            "W3",
            [
                Entry("actionpool runner.map", "actionpool", "w3", kw3, "actionpool"),
                Entry("actionpool plan of 8 nodes (variant)", "actionpool", "w3_plan", kw3,
                      "actionpool-variant"),
                Entry("multiprocessing Pool.map", "multiprocessing", "w3", kw3, "peer"),
                Entry("concurrent.futures ProcessPoolExecutor.map", "concurrent.futures", "w3",
                      kw3, "peer"),
                Entry("joblib Parallel", "joblib", "w3", kw3, "peer"),
                Entry("loky reusable executor .map", "loky", "w3", kw3, "peer"),
                Entry("mpire WorkerPool.map", "mpire", "w3", kw3, "peer"),
                Entry("pebble ProcessPool.map", "pebble", "w3", kw3, "peer"),
                Entry("dask client.map + gather", "dask", "w3", kw3, "peer"),
                Entry("ray 8 tasks + ray.get", "ray", "w3", kw3, "peer"),
                Entry("8 tasks serially in-process (reference)", "baseline", "serial", kw3,
                      "reference"),
            ],
            w3_rounds(rounds),
        )  # fmt: skip
    if "W5" in a.workloads:
        kw5 = {"mb": 50, "tasks": 4}
        res["W5"] = s.measure(
            "W5",
            [
                Entry("actionpool plan, array argument (shared memory)", "actionpool", "w5",
                      kw5, "actionpool"),
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
                      "baseline", "memcpy", {"mb": 50}, "reference"),
            ],
            heavy,
        )  # fmt: skip
        for lib in list(s.drivers):  # free the 50 MB copies
            with contextlib.suppress(DriverError):
                s.call(lib, "drop_array")
    if "W6" in a.workloads:
        kw6 = {"n": 20, "seconds": 0.05}
        t = IO_THREADS
        res["W6"] = s.measure(
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
            rounds,
        )  # fmt: skip
    return res


def workload_w7(s: Suite) -> dict[str, Any]:
    """Cold start; each sample a fresh interpreter, contenders interleaved by round."""
    a = s.args
    rounds = a.cold_rounds
    entries = [
        Entry(f"{lib}: {COLD[lib][0]}", lib, "cold", {}, "actionpool" if lib == "actionpool"
              else "peer")
        for lib in COLD
        if lib in a.libs
    ]  # fmt: skip
    code = "import sys, cold_start; sys.exit(cold_start.cold_main())"
    for r in range(rounds):
        live = [e for e in entries if not e.dead]
        k = r % max(1, len(live))
        for e in live[k:] + live[:k]:
            log = s.tmp / f"cold-{e.lib}.log"
            try:
                with log.open("a") as err:
                    proc = subprocess.run(
                        [sys.executable, "-c", code, e.lib, str(a.workers), str(s.tmp)],
                        stdout=subprocess.PIPE,
                        stderr=err,
                        text=True,
                        env=child_env(),
                        timeout=120,
                        check=False,
                    )
                lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
                if proc.returncode != 0 or not lines:
                    raise RuntimeError(f"exit code {proc.returncode}: {log_tail(log)}")
                out = json.loads(lines[-1])
                e.samples.append(out["t"])
                e.rounds.append(r)
                e.extras.append(out)
            except Exception as exc:
                e.errors.append(f"{type(exc).__name__}: {exc}"[:600])
                s.say(f"  W7 {e.lib}: FAILED: {e.errors[-1]}")
                if len(e.errors) >= 2:
                    e.dead = True
        s.say(f"W7: round {r + 1}/{rounds}")
    return {"W7": entries}


def workload_scaling(s: Suite, cal: dict[str, Any]) -> dict[str, Any]:
    a = s.args
    maxw = a.workers
    ws = sorted({1, maxw, *(2**i for i in range(1, 12) if 2**i < maxw)})
    libs = [lib for lib in SCALING_LIBS if lib in a.libs]
    work_s = 0.4 if a.quick else 1.0
    rounds = 2 if a.quick else 3
    plan = {
        g: {"iters": max(1, int(sec * cal["iters_per_s"])),
            "tasks": max(4 * maxw, round(work_s / sec))}
        for g, sec in GRANULARITIES.items()
    }  # fmt: skip
    times: dict[str, dict[str, dict[str, list[float]]]] = {
        g: {lib: {} for lib in [*libs, "serial"]} for g in plan
    }
    errors: dict[str, list[str]] = {}
    dead: set[str] = set()
    for w in ws:
        for lib in libs:
            if lib in dead:
                continue
            try:
                if lib == "joblib":
                    s.call(lib, "scale_warm", w=w)
                else:
                    s.call(lib, "scale", w=w, iters=1, tasks=2 * w)  # pool of w started
            except DriverError as exc:
                errors.setdefault(lib, []).append(f"w={w} warm-up: {exc}")
                dead.add(lib) if exc.fatal else None
        for r in range(rounds):
            order = [*libs, "serial"]
            k = (r + w) % len(order)
            for g, p in plan.items():
                for lib in order[k:] + order[:k]:
                    if lib in dead:
                        continue
                    try:
                        if lib == "serial":
                            out = s.call("baseline", "serial", **p)
                        else:
                            out = s.call(lib, "scale", w=w, **p)
                    except DriverError as exc:
                        errors.setdefault(lib, []).append(f"w={w} {g}: {exc}")
                        if exc.fatal or len(errors[lib]) >= 3:
                            dead.add(lib)
                        continue
                    times[g][lib].setdefault(str(w), []).append(out["t"])
            s.say(f"scaling: workers={w}, round {r + 1}/{rounds}")
        for lib in libs:
            if lib not in dead and lib in ("actionpool", "concurrent.futures", "multiprocessing"):
                with contextlib.suppress(DriverError):
                    s.call(lib, "trim", keep=[])
    curves: dict[str, Any] = {}
    for g, by_lib in times.items():
        serial_all = [t for ts in by_lib["serial"].values() for t in ts]
        serial = statistics.median(serial_all) if serial_all else None
        curves[g] = {
            "iters": plan[g]["iters"],
            "tasks": plan[g]["tasks"],
            "serial_s": serial,
            "speedup": {
                lib: {
                    wk: serial / statistics.median(ts) for wk, ts in by_w.items() if ts and serial
                }
                for lib, by_w in by_lib.items()
                if lib != "serial"
            },
        }
    return {"workers": ws, "plan": plan, "samples": times, "curves": curves, "errors": errors}


def workload_w8(s: Suite, cal: dict[str, Any]) -> dict[str, Any]:
    a = s.args
    t = 0.2 if a.quick else 0.4
    w = a.workers
    cpu_nodes = 4 * w
    iters = int(t / 4 * cal["iters_per_s"])
    io_nodes = 8
    kw = {"cpu_nodes": cpu_nodes, "iters": iters, "io_nodes": io_nodes, "io_s": t}
    entries = s.measure(
        "W8",
        [
            Entry("actionpool mixed plan (cpu + io nodes)", "actionpool", "w8",
                  {"mode": "mixed", **kw}, "actionpool"),
            Entry("actionpool, the cpu nodes alone", "actionpool", "w8", {"mode": "cpu", **kw},
                  "actionpool-variant"),
            Entry("actionpool, the io nodes alone", "actionpool", "w8", {"mode": "io", **kw},
                  "actionpool-variant"),
            Entry("the cpu nodes' work serially in-process (reference)", "baseline", "serial",
                  {"iters": iters, "tasks": cpu_nodes}, "reference"),
        ],
        a.rounds,
    )  # fmt: skip
    return {"W8": entries, "W8_params": {**kw, "cores": w}}


def workload_w9(s: Suite) -> dict[str, Any]:
    a = s.args
    wide_n = 5_000
    wide = s.measure(
        "W9",
        [Entry(f"actionpool plan: {wide_n} tiny cpu nodes + fan-in", "actionpool", "w9_wide",
               {"n": wide_n}, "actionpool")],
        a.rounds,
    )  # fmt: skip
    sizes = [1_000, 2_500, 5_000, 10_000] if a.quick else [1_250, 2_500, 5_000, 10_000, 20_000]
    width = 10
    curve: dict[str, list[dict[str, Any]]] = {"chain": [], "lattice": []}
    errors: list[str] = []
    rounds = 2 if a.quick else 3  # one noisy sample per size made the fit flap
    if "actionpool" not in a.libs:
        return {"W9": wide}
    for r in range(rounds):
        for n in sizes if r % 2 == 0 else sizes[::-1]:
            for shape in ("chain", "lattice"):
                kw: dict[str, Any] = {"n": n} if shape == "chain" else {"n": n, "width": width}
                try:
                    out = s.call("actionpool", f"w9_{shape}", **kw)
                except DriverError as exc:
                    errors.append(f"{shape} n={n}: {exc}")
                    continue
                curve[shape].append(out)
        s.say(f"W9 curve: round {r + 1}/{rounds}")
    summary: dict[str, Any] = {}
    for shape, outs in curve.items():
        by_n: dict[int, list[dict[str, Any]]] = {}
        for o in outs:
            by_n.setdefault(o["nodes"], []).append(o)
        pts = []
        for nodes, os_ in sorted(by_n.items()):
            run = statistics.median(o["t"] for o in os_)
            build = statistics.median(o["build_s"] for o in os_)
            ne = nodes + os_[0]["edges"]
            pts.append({"nodes": nodes, "edges": os_[0]["edges"], "n_plus_e": ne,
                        "run_s": run, "build_s": build, "run_us_per_ne": run / ne * 1e6,
                        "build_us_per_ne": build / ne * 1e6})  # fmt: skip
        fit = linear_fit([p["n_plus_e"] for p in pts], [p["run_s"] for p in pts])
        per = [p["run_us_per_ne"] for p in pts]
        summary[shape] = {
            "points": pts,
            "fit": fit,
            "per_ne_spread": (max(per) / min(per)) if per else None,
        }
    return {"W9": wide, "W9_curve": {"raw": curve, "summary": summary, "errors": errors,
                                     "lattice_width": width}}  # fmt: skip


def linear_fit(x: list[float], y: list[float]) -> dict[str, float] | None:
    if len(x) < 2:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    pred = [slope * xi + intercept for xi in x]
    ss_res = sum((yi - pi) ** 2 for yi, pi in zip(y, pred, strict=True))
    mean = sum(y) / len(y)
    ss_tot = sum((yi - mean) ** 2 for yi in y) or 1e-30
    return {"slope_s": float(slope), "intercept_s": float(intercept), "r2": 1 - ss_res / ss_tot}


# ---- metrics, targets, report -------------------------------------------------------------

HIGHER = {"W1": True, "W2": False, "W3": True, "W5": True, "W6": False, "W7": False, "W8": False}
TITLES = {
    "W1": "map of tiny calls (x + 1)",
    "W2": "submit + result round trip (warm pool)",
    "W3": "8 x 50 ms pure-Python tasks at n = cores",
    "W5": "50 MB array to 4 tasks",
    "W6": "20 x 50 ms sleeps on threads",
    "W7": "cold start: create, first result, shutdown",
    "W8": "mixed plan: cpu and io nodes in one plan",
    "W9": "wide plan: 5,000 tiny cpu nodes + fan-in",
}


def metric_of(wid: str, e: Entry, ctx: dict[str, Any]) -> list[float]:
    """The workload's metric for each sample of ``e`` (see ``UNITS``).

    W3's, W5's and W8's metrics divide by a reference (the serial in-process time, one
    memcpy) measured in every round: each sample is judged against the reference of its
    own round, so the machine's drift between rounds cancels out of it (on the shared
    2-core machine the same serial work took 231-382 ms within one run). A round with no
    reference sample falls back to the reference's median over the run.
    """
    xs = e.samples
    rounds = e.rounds if len(e.rounds) == len(xs) else [-1] * len(xs)

    def ref(key: str) -> list[float | None]:
        """The reference of each sample's round (``None`` where there is none)."""
        by_round: dict[int, float] = ctx.get("ref_rounds", {}).get(wid, {})
        return [by_round.get(r, ctx.get(key)) for r in rounds]

    if e.kind == "reference" and wid in ("W3", "W8"):
        return []  # it defines the ideal
    if e.kind == "reference" and wid == "W5":
        return [ctx["memcpy"] / t for t in xs]  # the yardstick itself: ~1
    if wid == "W1":
        return [ctx["n1"] / t for t in xs]
    if wid == "W2":
        return [t * 1e6 for t in xs]
    if wid == "W3":
        if not ctx.get("serial3"):
            return []
        share = ctx["share3"]
        return [s * share / t for s, t in zip(ref("serial3"), xs, strict=True) if s]
    if wid == "W5":
        if not ctx.get("memcpy"):
            return []
        return [ctx["tasks5"] * m / t for m, t in zip(ref("memcpy"), xs, strict=True) if m]
    if wid == "W6":
        return [t / ctx["ideal6"] for t in xs]
    if wid == "W7":
        return [t * 1e3 for t in xs]
    if wid == "W8":
        if not ctx.get("ideal8"):
            return []
        io_s = ctx["io8"]
        return [t / max(s / ctx["workers"], io_s)
                for s, t in zip(ref("serial8"), xs, strict=True) if s]  # fmt: skip
    if wid == "W9":
        return [ex["nodes"] / ex["t"] for ex in e.extras]
    raise KeyError(wid)


UNITS = {
    "W1": "tasks/s",
    "W2": "µs",
    "W3": "efficiency (ideal / wall)",
    "W5": "x one memcpy (effective bandwidth)",
    "W6": "x ideal (wall / 50 ms)",
    "W7": "ms",
    "W8": "x ideal (wall / max(cpu work / cores, io wait))",
    "W9": "nodes/s",
}


def analyse(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    ctx: dict[str, Any] = {"n1": 20_000, "ideal6": 0.05, "tasks5": 4, "workers": args.workers}
    by = {wid: {e.op + e.label: e for e in res.get(wid, [])} for wid in TITLES}
    ctx["ref_rounds"] = {}

    def ref(wid: str) -> float | None:
        """The reference's median; its sample of each round goes to ``ref_rounds``."""
        for e in by[wid].values():
            if e.kind == "reference" and e.samples:
                ctx["ref_rounds"][wid] = dict(zip(e.rounds, e.samples, strict=False))
                return e.median()
        return None

    if (serial3 := ref("W3")) is not None:
        # W3's equal, indivisible tasks: the ideal wall is ceil(tasks / workers) tasks
        # one after another (serial / workers on 2 cores; one task, not serial / 16,
        # for 8 tasks on 16 cores, where serial / workers would cap efficiency at 50%)
        tasks3 = next(e.kw["tasks"] for e in by["W3"].values() if e.kind == "reference")
        ctx["share3"] = math.ceil(tasks3 / args.workers) / tasks3
        ctx["serial3"] = serial3
        ctx["ideal3"] = serial3 * ctx["share3"]
    ctx["memcpy"] = ref("W5")
    if (serial8 := ref("W8")) is not None and "W8_params" in res:
        ctx["serial8"] = serial8
        ctx["io8"] = res["W8_params"]["io_s"]
        ctx["ideal8"] = max(serial8 / args.workers, ctx["io8"])
    tables: dict[str, Any] = {}
    for wid in TITLES:
        entries: list[Entry] = res.get(wid, [])
        if not entries:
            continue
        rows = []
        for e in entries:
            m = metric_of(wid, e, ctx) if e.samples else []
            rows.append({
                "contender": e.label, "library": e.lib, "kind": e.kind, "op": e.op,
                "samples_s": e.samples, "rounds": e.rounds, "extras": e.extras, "metric": m,
                "median": statistics.median(m) if m else None,
                "min": min(m) if m else None, "max": max(m) if m else None,
                "median_s": e.median(), "errors": e.errors,
            })  # fmt: skip
        peers = [r for r in rows if r["kind"] == "peer" and r["median"] is not None]
        best = None
        if peers:
            pick = max if HIGHER.get(wid, True) else min
            best = pick(peers, key=lambda r: r["median"])
        if wid == "W7":  # the target compares with concurrent.futures
            cf = [r for r in rows if r["library"] == "concurrent.futures" and r["median"]]
            ctx["w7_cf"] = cf[0] if cf else None
        for r in rows:
            r["vs_best_peer"] = (
                r["median"] / best["median"] if best and r["median"] is not None else None
            )
        tables[wid] = {"title": TITLES[wid], "unit": UNITS[wid], "rows": rows,
                       "best_peer": best["contender"] if best else None}  # fmt: skip
    return {"tables": tables, "ctx": ctx, "targets": targets(tables, res, ctx)}


def per_round(p: dict[str, Any], b: dict[str, Any]) -> list[float]:
    """``p``'s metric over ``b``'s, round by round (the rounds both have a sample of).

    Both ran in the same round, minutes apart at most, so a drift of the machine's
    speed between rounds cancels out of each ratio, unlike out of a ratio of medians.
    """
    pm = dict(zip(p.get("rounds") or [], p["metric"], strict=False))
    bm = dict(zip(b.get("rounds") or [], b["metric"], strict=False))
    return [pm[r] / bm[r] for r in sorted(pm.keys() & bm.keys()) if bm[r]]


def round_note(ratios: list[float], op: str, limit: float) -> str:
    """'; per round 0.91-1.12x, met in 4 of 7' (empty without paired rounds)."""
    if not ratios:
        return ""
    met = sum(x >= limit if op == ">=" else x <= limit for x in ratios)
    return f"; per round {min(ratios):.2f}-{max(ratios):.2f}x, met in {met} of {len(ratios)}"


def paired_note(ratios: list[float]) -> str:
    """'; ours / the best peer's, same round: median 0.98x, ahead in 7 of 15' (higher is
    better; empty without paired rounds). A machine whose speed moves within a run
    moves both contenders of a round alike, so this ratio shows a gap between two pools
    that the efficiencies' own spread hides."""
    if not ratios:
        return ""
    ahead = sum(x > 1 for x in ratios)
    return (
        f"; ours / the best peer's, same round: median {statistics.median(ratios):.2f}x,"
        f" ahead in {ahead} of {len(ratios)}"
    )


def targets(tables: dict[str, Any], res: dict[str, Any], ctx: dict[str, Any]) -> list[dict]:
    out: list[dict[str, Any]] = []

    def primary(wid: str) -> dict[str, Any] | None:
        rows = tables.get(wid, {}).get("rows", [])
        return next((r for r in rows if r["kind"] == "actionpool"), None)

    def best(wid: str) -> dict[str, Any] | None:
        name = tables.get(wid, {}).get("best_peer")
        return next((r for r in tables[wid]["rows"] if r["contender"] == name), None)

    def add(wid: str, target: str, value: float | None, met: bool | None, shown: str,
            peer: str = "", title: str = "") -> None:  # fmt: skip
        out.append({"workload": wid, "title": title or TITLES.get(wid, wid), "target": target,
                    "value": value, "shown": shown, "met": met, "best_peer": peer})  # fmt: skip

    for wid, target, op, limit in (
        ("W1", ">= 1.0x the best peer's tasks/s", ">=", 1.0),
        ("W2", "<= 1.0x the best peer's round trip", "<=", 1.0),
    ):
        p, b = primary(wid), best(wid) if wid in tables else None
        if p and b and p["median"] is not None:
            ratio = p["median"] / b["median"]
            met = ratio >= limit if op == ">=" else ratio <= limit
            unit = tables[wid]["unit"]
            rounds = round_note(per_round(p, b), op, limit)
            add(wid, target, ratio, met,
                f"{ratio:.2f}x ({fmt(p['median'])} vs {fmt(b['median'])} {unit}{rounds})",
                b["contender"])  # fmt: skip
        elif wid in tables:
            add(wid, target, None, None, "not measured (no actionpool or peer result)")
    if (p := primary("W3")) and p["median"] is not None:
        b = best("W3")
        add("W3", ">= 95% efficiency at n = cores", p["median"], p["median"] >= 0.95,
            f"{p['median']:.0%} (rounds {p['min']:.0%}-{p['max']:.0%}"
            + (f"; best peer {b['median']:.0%}{paired_note(per_round(p, b))})" if b else ")"),
            b["contender"] if b else "")  # fmt: skip
    if (p := primary("W5")) and p["median"] is not None:
        b = best("W5")
        add("W5", ">= 2x one memcpy of effective bandwidth", p["median"], p["median"] >= 2.0,
            f"{p['median']:.2f}x memcpy (rounds {p['min']:.2f}-{p['max']:.2f}x"
            + (f"; best peer {b['median']:.2f}x)" if b else ")"),
            b["contender"] if b else "")  # fmt: skip
    if (p := primary("W6")) and p["median"] is not None:
        b = best("W6")
        add("W6", "<= 1.1x ideal (50 ms)", p["median"], p["median"] <= 1.1,
            f"{p['median']:.2f}x ideal" + (f" (best peer {b['median']:.2f}x)" if b else ""),
            b["contender"] if b else "")  # fmt: skip
    if (p := primary("W7")) and p["median"] is not None:
        cf = ctx.get("w7_cf")
        if cf:
            ratio = p["median"] / cf["median"]
            rounds = round_note(per_round(p, cf), "<=", 1.5)
            add("W7", "<= 1.5x concurrent.futures", ratio, ratio <= 1.5,
                f"{ratio:.2f}x ({p['median']:.0f} vs {cf['median']:.0f} ms{rounds})",
                cf["contender"])  # fmt: skip
    if (p := primary("W8")) and p["median"] is not None:
        add("W8", "wall <= 1.1x max(cpu work / cores, io wait)", p["median"],
            p["median"] <= 1.1, f"{p['median']:.2f}x")  # fmt: skip
    if (p := primary("W9")) and p["median"] is not None:
        add("W9", ">= 5,000 nodes/s (5,000 nodes + fan-in)", p["median"], p["median"] >= 5000,
            f"{p['median']:,.0f} nodes/s")  # fmt: skip
    out.extend(w9_curve_targets(res.get("W9_curve", {}).get("summary", {})))
    return out


def w9_curve_targets(curve: dict[str, Any]) -> list[dict[str, Any]]:
    """The W9 chain and lattice verdicts, from ``W9_curve``'s summary (also used by
    ``--render``, which has only results.json).

    Linear (not worse): the run time grows with nodes + edges no faster than
    linearly: the exponent ``b`` of a power-law fit over every size (``run = a
    (nodes + edges)^b``, least squares in log-log) is <= 1.1. Over the 16x range of
    sizes, b = 1.1 means the cost per node + edge grows 1.32x from the smallest to the
    largest. A fixed cost makes small plans dearer per node, which bends the curve
    below a straight line (b < 1): that is linear overhead too, so the straight line's
    R², the growth and the spread of the cost per node + edge are shown but not judged
    (an R² >= 0.98 rule failed a chain whose cost per node fell from 207 to 136 µs as
    it grew 16x).
    """
    out: list[dict[str, Any]] = []
    for shape, sm in curve.items():
        spread = sm.get("per_ne_spread")
        points = sm.get("points") or []
        if spread is None or len(points) < 2:
            continue
        r2 = (sm.get("fit") or {}).get("r2", float("nan"))
        first, last = points[0], points[-1]
        growth = last["run_us_per_ne"] / first["run_us_per_ne"]
        exponent = float(np.polyfit(
            [math.log(p["n_plus_e"]) for p in points], [math.log(p["run_s"]) for p in points], 1
        )[0])  # fmt: skip
        out.append({
            "workload": "W9",
            "title": f"{shape} of tiny cpu nodes, sizes up to {last['nodes']:,} nodes",
            "target": f"{shape}: overhead linear in nodes + edges (run time ~ (nodes +"
                      " edges)^b with b <= 1.1)",
            "value": growth,
            "shown": f"per node+edge {first['run_us_per_ne']:.0f} µs at {first['nodes']:,}"
                     f" nodes, {last['run_us_per_ne']:.0f} µs at {last['nodes']:,}"
                     f" ({growth:.2f}x; spread across sizes {spread:.2f}x); b = {exponent:.2f};"
                     f" straight line R² {r2:.4f}",
            "met": bool(exponent <= 1.1),
            "best_peer": "",
        })  # fmt: skip
    return out


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_metric(wid: str, x: float | None) -> str:
    if x is None:
        return "-"
    if wid == "W3":
        return f"{x:.1%}"
    return fmt(x)


def contention(data: dict[str, Any]) -> str:
    con = (data.get("calibration") or {}).get("contention")
    if not con:
        return ""
    cap = (
        f"at that moment this machine capped W3's efficiency at about {con['ceiling']:.0%}"
        " for any pool"
        if con["ceiling"] < 0.98
        else "no measurable slowdown at that moment"
    )
    return (
        f" Measured at the start: a 50 ms busy task took {con['alone_s'] * 1e3:.0f} ms alone"
        f" and {con['together_s'] * 1e3:.0f} ms with one such task on every core (medians"
        f" of 5): {cap}."
    )


def write_markdown(path: Path, data: dict[str, Any], plots: list[str]) -> None:
    an = data["analysis"]
    m = data["machine"]
    v = m.get("versions", {})
    a = data["args"]
    lines = [
        "# actionpool against its peers: workloads W1-W9 and scaling curves",
        "",
        f"Generated by `python benchmarks/suite.py{' --quick' if a['quick'] else ''}"
        f" --out {a['out']}` in {data['duration_s']:.0f} s"
        f" ({'quick mode: fewer rounds, smaller sizes' if a['quick'] else 'default sizes'},"
        f" {a['rounds']} interleaved rounds, W3 {w3_rounds(a['rounds'])},"
        f" W5 {max(1, a['rounds'] - 2)},"
        f" W7 {a['cold_rounds']} fresh processes each).",
        "",
        f"**Machine:** {m['cpu']}, {m['physical_cores']} physical cores"
        f" ({m['logical_cpus']} logical, affinity {m['affinity']}), {m['memory_gib']} GiB"
        f" memory, /dev/shm {m['dev_shm_gib']} GiB, {m['os']}; Python {m['python']};"
        f" start method {m['start_method']}; load average at start {m['loadavg_start']},"
        f" at end {m.get('loadavg_end')}.{contention(data)} Versions: "
        + ", ".join(f"{k} {x}" for k, x in sorted(v.items()))
        + ".",
        "",
        "**Absolute numbers are noisy.** This is a shared virtual machine with few cores;"
        " other jobs run beside the benchmark, and every idle pool's background threads"
        " (Dask's and Ray's heartbeats especially) compete with the measured work. Compare"
        " the contenders *with each other*, within this run (every workload interleaves"
        " them round by round and reports medians), not with other machines or runs.",
        "",
        "How it is measured: each library runs in a process of its own (a *driver*) that"
        " keeps its pools warm (workers started, one untimed call per workload) and times"
        " each sample itself; the parent only asks for samples, so a peer that fails or"
        " hangs is recorded and the rest go on. Every pool has as many worker processes as"
        " the machine has physical cores (W6: 20 threads everywhere). The task functions"
        " live in an importable module (`benchmarks/suite.py`), so every library pickles"
        " them by reference. Each library uses its default start method (fork for"
        " multiprocessing, concurrent.futures, mpire and pebble here; fresh interpreters"
        " for loky and joblib; Dask's and Ray's own; actionpool forks its workers from a"
        " zygote, which is a fork of the parent when the parent runs a single thread and"
        " a fresh interpreter otherwise: in the benchmark drivers, which import NumPy and"
        " so run OpenBLAS's threads, a fresh one). W7 starts a fresh interpreter per"
        " sample and times create + one `os.getpid` result + shutdown, with the library's"
        " modules already imported (and nothing else: there, actionpool's zygote is a"
        " fork).",
        "",
        "## Targets (issue 5)",
        "",
        "| workload | target | actionpool | best peer (same run) | met? |",
        "|---|---|---|---|---|",
    ]
    for t in an["targets"]:
        met = "-" if t["met"] is None else ("**yes**" if t["met"] else "**no**")
        lines.append(
            f"| {t['workload']} {t['title']} | {t['target']} | {t['shown']} |"
            f" {t['best_peer'] or '-'} | {met} |"
        )
    lines += [
        "",
        "Ratios: W1 actionpool's tasks/s / the best peer's; W2 actionpool's round trip /"
        " the best peer's; W3 ideal / wall, ideal = (the 8 tasks run serially in-process,"
        " measured in the same round) x ceil(8 / cores) / 8 (serial / cores up to 8"
        " cores); W5 4 x 50 MB / wall as a multiple of one"
        " memcpy's bandwidth (50 MB / memcpy time); W6 wall / 50 ms (20 threads everywhere,"
        " so one sleep is the ideal); W7 actionpool's cold start / concurrent.futures';"
        " W8 wall / max(the cpu nodes' serial in-process time / cores, io sleep)."
        " W3's, W5's and W8's samples are each divided by the reference (serial time,"
        " memcpy) measured in their own round, so the machine's drift between rounds"
        " cancels out of them; their verdict is the median of those per-round values."
        " The W1, W2 and W7 verdicts compare medians; *per round* gives their ratio"
        " within each round (both contenders measured minutes apart at most) and in how"
        " many rounds the target was met.",
        "",
        "## Medians per workload",
        "",
        "Every contender of a workload ran once per round, in an order rotated each round;"
        " each pool was created and warmed (and one untimed call made) before timing."
        " *vs best peer* is the contender's median divided by the best peer's"
        " (reference rows and actionpool variants are not peers).",
    ]
    for wid, tab in an["tables"].items():
        better = "higher is better" if HIGHER.get(wid, True) else "lower is better"
        lines += [
            "",
            f"### {wid} {tab['title']}",
            "",
            f"| contender | median {tab['unit']} | min-max | median s | vs best peer ({better}) |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in tab["rows"]:
            name = r["contender"]
            if r["kind"] == "actionpool":
                name = f"**{name}**"
            if r["median"] is None and r["kind"] == "reference" and r["median_s"]:
                lines.append(f"| {name} | (defines the ideal) | | {r['median_s']:.4f} | |")
                continue
            if r["median"] is None:
                err = "; ".join(r["errors"])[:300] or "no result"
                lines.append(f"| {name} | failed: {err} | | | |")
                continue
            vs = "-" if r["vs_best_peer"] is None else f"{r['vs_best_peer']:.2f}"
            lines.append(
                f"| {name} | {fmt_metric(wid, r['median'])} |"
                f" {fmt_metric(wid, r['min'])}-{fmt_metric(wid, r['max'])} |"
                f" {r['median_s']:.4f} |"
                f" {vs} |"
            )
        if wid == "W7":
            imp = [
                f"{e['library']} {statistics.median(x['import_s'] for x in e['extras']) * 1e3:.0f}"
                for e in data.get("W7", [])
                if e["extras"]
            ]
            lines += ["", "Import times (ms, not included above): " + ", ".join(imp) + "."]
        if wid == "W8" and "W8_params" in data:
            p = data["W8_params"]
            lines += [
                "",
                f"Plan: {p['cpu_nodes']} cpu nodes of ~{p['io_s'] / 4 * 1e3:.0f} ms busy work"
                f" and {p['io_nodes']} io nodes sleeping {p['io_s'] * 1e3:.0f} ms, plus a"
                f" fan-in node; {p['cores']} cpu workers, {IO_THREADS} io threads."
                f" Ideal = {an['ctx'].get('ideal8', 0):.3f} s.",
            ]
    sc = data.get("scaling")
    if sc:
        lines += [
            "",
            "## Scaling: speedup vs workers",
            "",
            "Speedup = (the tasks run serially in-process) / (the same tasks on *w* workers),"
            " medians; each library used as for W1 (actionpool `runner.map`, "
            "`ProcessPoolExecutor.map(chunksize=ceil(n / 4w))`, joblib `Parallel`,"
            " `Pool.map`). Workers: 1, powers of two, and the physical cores.",
            "",
            "| granularity | tasks | contender | "
            + " | ".join(f"w={w}" for w in sc["workers"])
            + " |",
            "|---|---:|---|" + "---:|" * len(sc["workers"]),
        ]
        for g, c in sc["curves"].items():
            for lib, sp in c["speedup"].items():
                cells = " | ".join(
                    f"{sp[str(w)]:.2f}" if str(w) in sp else "-" for w in sc["workers"]
                )
                lines.append(f"| ~{g} | {c['tasks']} | {lib} | {cells} |")
        if sc["errors"]:
            lines += ["", "Errors: " + "; ".join(f"{k}: {v[0]}" for k, v in sc["errors"].items())]
        lines += [""] + [f"![scaling {p}]({p})" for p in plots if p.startswith("scaling")]
    w9 = data.get("W9_curve")
    if w9:
        lines += [
            "",
            "## W9 scheduling overhead vs nodes + edges",
            "",
            f"A chain (each node needs the previous one) and a diamond lattice (width"
            f" {w9['lattice_width']}; each node needs two of the layer before) of tiny cpu"
            " nodes. *run* is `runner.run(plan)`, *build* the `plan.add` calls. Linear"
            " scheduling shows as a constant time per node + edge.",
            "",
            "| shape | nodes | edges | run s | build s | run µs per node+edge |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for shape, sm in w9["summary"].items():
            for p in sm["points"]:
                lines.append(
                    f"| {shape} | {p['nodes']:,} | {p['edges']:,} | {p['run_s']:.3f} |"
                    f" {p['build_s']:.3f} | {p['run_us_per_ne']:.1f} |"
                )
        for shape, sm in w9["summary"].items():
            if sm.get("fit"):
                f = sm["fit"]
                lines.append(
                    f"\n{shape}: run = {f['intercept_s'] * 1e3:.1f} ms +"
                    f" {f['slope_s'] * 1e6:.1f} µs x (nodes + edges), R² {f['r2']:.4f}."
                )
        if w9["errors"]:
            lines += ["", "Errors: " + "; ".join(w9["errors"][:5])]
        lines += [""] + [f"![W9 overhead]({p})" for p in plots if p.startswith("w9")]
    lines += ["", "## Peers that failed or were left out", ""]
    gone = data.get("not_run", {})
    failures = [
        f"- {wid}, {r['contender']}: {'; '.join(r['errors'])[:400]}"
        for wid, tab in an["tables"].items()
        for r in tab["rows"]
        if r["errors"]
    ]
    for key in ("scaling", "W9_curve"):
        errs = (data.get(key) or {}).get("errors") or {}
        items = errs.items() if isinstance(errs, dict) else [("actionpool", errs)]
        failures += [f"- {key}, {lib}: {'; '.join(v)[:400]}" for lib, v in items if v]
    failed = [f"- {lib}: {why}" for lib, why in gone.items()] + failures
    lines += failed or ["- No peer failed; every installed peer ran every workload it has."]
    lines += [
        "- Not applicable (no equivalent API): W2 joblib (no submit); W6 loky and Ray (no"
        " thread pool); W8 and W9 are plans, which no peer has. Scaling compares the main"
        " peers only (concurrent.futures, joblib, multiprocessing).",
        "",
        "## Left behind",
        "",
        data.get("left_behind_line", "not checked"),
        "",
        "## Reproduce",
        "",
        "```bash",
        "nox -s bench                      # default sizes, writes docs/benchmarks/",
        "nox -s bench -- --quick           # under 3 minutes on 2 cores",
        "python benchmarks/suite.py --quick --out /tmp/bench --workloads W1,W2"
        " --only actionpool,multiprocessing",
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


def make_plots(out: Path, data: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []
    sc = data.get("scaling")
    mach = data["machine"]
    where = f"{mach['physical_cores']} physical cores, {mach['cpu']}"[:70]
    if sc:
        for g, c in sc["curves"].items():
            fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
            ws = sc["workers"]
            ax.plot(ws, ws, "k--", lw=1, label="ideal")
            for lib, sp in c["speedup"].items():
                xs = [w for w in ws if str(w) in sp]
                if xs:
                    ax.plot(xs, [sp[str(w)] for w in xs], "o-", label=lib)
            ax.set_xlabel("workers")
            ax.set_ylabel("speedup vs serial in-process")
            ax.set_xticks(ws)
            ax.set_ylim(bottom=0)
            ax.set_title(f"~{g} busy tasks ({c['tasks']} tasks)\n{where}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            name = f"scaling_{g}.png"
            fig.savefig(out / name)
            plt.close(fig)
            made.append(name)
    w9 = data.get("W9_curve")
    if w9 and any(sm["points"] for sm in w9["summary"].values()):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
        for shape, sm in w9["summary"].items():
            pts = sm["points"]
            if not pts:
                continue
            x = [p["n_plus_e"] for p in pts]
            (line,) = a1.plot(x, [p["run_s"] for p in pts], "o", label=f"{shape}")
            if sm.get("fit"):
                f = sm["fit"]
                xx = [0, max(x)]
                a1.plot(xx, [f["intercept_s"] + f["slope_s"] * v for v in xx], "-",
                        color=line.get_color(), lw=1,
                        label=f"{shape} fit, R² {f['r2']:.3f}")  # fmt: skip
            a2.plot(x, [p["run_us_per_ne"] for p in pts], "o-", label=f"{shape} run")
            a2.plot(x, [p["build_us_per_ne"] for p in pts], "x:", label=f"{shape} build",
                    color=line.get_color())  # fmt: skip
        a1.set_xlabel("nodes + edges")
        a1.set_ylabel("runner.run(plan) seconds")
        a1.set_title("W9: run time vs plan size", fontsize=9)
        a2.set_xlabel("nodes + edges")
        a2.set_ylabel("µs per (node + edge)")
        a2.set_ylim(bottom=0)
        a2.set_title(f"W9: time per node + edge (flat = linear)\n{where}", fontsize=9)
        for ax in (a1, a2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "w9_overhead.png")
        plt.close(fig)
        made.append("w9_overhead.png")
    return made


def entries_json(entries: list[Entry]) -> list[dict[str, Any]]:
    return [
        {"contender": e.label, "library": e.lib, "op": e.op, "kw": e.kw, "kind": e.kind,
         "samples_s": e.samples, "rounds": e.rounds, "extras": e.extras, "errors": e.errors}
        for e in entries
    ]  # fmt: skip


def available(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    libs, left_out = [], {}
    for lib, (mod, _) in DIST.items():
        if args.only and lib not in args.only:
            continue
        if (lib == "dask" and args.no_dask) or (lib == "ray" and args.no_ray):
            left_out[lib] = "left out (--no-dask / --no-ray)"
            continue
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            libs.append(lib)
        else:
            left_out[lib] = "not installed"
    return libs, left_out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller sizes")
    parser.add_argument("--out", default="docs/benchmarks", help="output folder")
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds per workload (default 5 / 7; W3: twice as many plus one; W5: 2 fewer)",
    )
    parser.add_argument("--cold-rounds", type=int, help="W7 samples each (default 3 / 5)")
    parser.add_argument(
        "--workers",
        type=int,
        default=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        help="worker processes of every pool (default: physical cores)",
    )
    parser.add_argument("--only", help="comma-separated libraries (default: all installed)")
    parser.add_argument(
        "--workloads",
        default="W1,W2,W3,W5,W6,W7,W8,W9,scaling",
        help="comma-separated subset of W1,W2,W3,W5,W6,W7,W8,W9,scaling",
    )
    parser.add_argument("--no-dask", action="store_true", help="leave Dask out")
    parser.add_argument("--no-ray", action="store_true", help="leave Ray out")
    parser.add_argument("--op-timeout", type=float, default=180.0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rewrite results.md and the plots from --out's results.json",
    )
    args = parser.parse_args()
    if args.render:
        out = Path(args.out)
        data = json.loads((out / "results.json").read_text())
        an = data["analysis"]  # the W9 curve's verdicts as this version judges them
        an["targets"] = [t for t in an["targets"] if not t["target"].startswith(
            ("chain:", "lattice:"))] + w9_curve_targets(data.get("W9_curve", {}).get(
            "summary", {}))  # fmt: skip
        write_markdown(out / "results.md", data, make_plots(out, data))
        (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
        return 0
    args.only = [x.strip() for x in args.only.split(",")] if args.only else None
    args.workloads = {x.strip() for x in args.workloads.split(",")}
    args.rounds = args.rounds or (5 if args.quick else 7)
    args.cold_rounds = args.cold_rounds or (3 if args.quick else 5)
    args.libs, not_run = available(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    become_subreaper()
    shm_before = shm_entries()
    tmp = Path(tempfile.mkdtemp(prefix="ap_suite_"))
    info = machine(args.workers)
    import multiprocessing

    info["start_method"] = multiprocessing.get_start_method()
    info["loadavg_start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    suite = Suite(args, tmp)
    suite.say(f"libraries: {', '.join(args.libs)}; left out: {not_run or 'none'}")
    res: dict[str, Any] = {}
    cal: dict[str, Any] = {}
    try:
        cal = suite.call("baseline", "calibrate")
        suite.say(f"busy loop: {cal['iters_per_s'] / 1e6:.1f} M iterations/s")
        with contextlib.suppress(DriverError):
            con = suite.call("baseline", "contention", iters=int(0.05 * cal["iters_per_s"]))
            cal["contention"] = con
            suite.say(f"all cores busy: each task {1 / con['ceiling'] - 1:.0%} slower")
        if "W7" in args.workloads:  # first, while nothing else runs
            res.update(workload_w7(suite))
        res.update(workloads_w1_to_w6(suite, cal))
        keep = {"baseline", "actionpool", *SCALING_LIBS}
        suite.close([lib for lib in list(suite.drivers) if lib not in keep])
        if "scaling" in args.workloads:
            res["scaling"] = workload_scaling(suite, cal)
        suite.close([lib for lib in list(suite.drivers) if lib not in ("baseline", "actionpool")])
        if "W8" in args.workloads:
            res.update(workload_w8(suite, cal))
        if "W9" in args.workloads:
            res.update(workload_w9(suite))
    except KeyboardInterrupt:
        suite.say("interrupted: writing what was measured")
    finally:
        suite.close()
        shutil.rmtree(tmp, ignore_errors=True)

    # what was left behind: processes (we are their subreaper) and /dev/shm entries
    deadline = time.monotonic() + 15.0
    while (left := descendants()) and time.monotonic() < deadline:
        time.sleep(0.2)
    left_desc = []
    for p in left:
        with contextlib.suppress(psutil.Error):
            left_desc.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
            p.kill()
    new_shm = sorted(shm_entries() - shm_before)
    ours = [n for n in new_shm if any(str(pid) in n for pid in suite.all_pids)]
    line = (
        f"After the suite: processes left behind: {', '.join(left_desc) or 'none'};"
        f" /dev/shm: {len(shm_before)} entries before, {len(shm_before) + len(new_shm)}"
        f" after, new: {', '.join(new_shm) or 'none'}"
        + (f" (named after our processes: {', '.join(ours)})" if ours else "")
        + "."
    )
    print(line)
    info["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["versions"].update(
        {k: v for k, v in suite.versions.items() if DIST.get(k, (None, None))[1]}
    )
    duration = time.perf_counter() - suite.t0
    data: dict[str, Any] = {
        "machine": info,
        "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
        "calibration": cal,
        "duration_s": duration,
        "not_run": {**not_run, **suite.failed_start},
        "left_behind": {"processes": left_desc, "dev_shm_new": new_shm, "dev_shm_ours": ours},
        "left_behind_line": line,
    }
    for wid, val in res.items():
        data[wid] = entries_json(val) if isinstance(val, list) else val
    data["analysis"] = analyse(res, args)
    for tab in data["analysis"]["tables"].values():
        for r in tab["rows"]:
            r.pop("extras", None)  # already under data[wid]
    plots = make_plots(out, data)
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    write_markdown(out / "results.md", data, plots)
    print((out / "results.md").read_text())
    suite.say(f"done in {duration:.0f} s; wrote {out}/results.md, results.json, {', '.join(plots)}")
    return 1 if left_desc or ours else 0


if __name__ == "__main__":
    sys.exit(main())
