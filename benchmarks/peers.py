"""Each library's pools, as a driver process keeps them: created once, warmed, closed.

One ``Driver`` subclass per library (and ``BaselineDriver``, the yardsticks). A driver
starts its pools with as many workers as the run's ``--workers`` (physical cores by
default) and makes every worker start (a first map of short sleeps) before any sample
is timed. What each workload does with them is in the ``w_*.py`` modules, as ops
registered for these drivers' names (the keys of ``DRIVERS``).

Every library uses its default start method. Dask's ``LocalCluster`` and Ray set
``OMP_NUM_THREADS=1`` and the like in ``os.environ``; they start inside
``preserved_environ()``, so the driver's later samples see the environment it had.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from bench_arrays import preserved_environ, ray_init
from bench_tasks import busy, busy_timed, inc_chunk, nap, noop, task_sum
from harness import SPARE_ENV, Driver, calibrate_busy, roundtrips, timed

DASK_CONFIG = {  # the dask driver's cluster, as actionpool.pools.dask.connect's LocalCluster
    "distributed.scheduler.allowed-failures": 0,
    "distributed.scheduler.worker-saturation": 1.0,
}
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


def _echo(conn: Any) -> None:
    while (msg := conn.recv()) is not None:
        conn.send(msg)


class BaselineDriver(Driver):
    """The yardsticks: serial work in-process, one memcpy, a raw pipe round trip."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        self._pipe: Any = None
        self._echo: Any = None
        self._dst: np.ndarray | None = None

    def op_calibrate(self) -> dict[str, Any]:
        return calibrate_busy()

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
        """``tasks`` busy tasks one after another in this process: the reference of
        W3, W8, W11 and the scaling curves."""
        t, _ = timed(lambda: [busy(iters) for _ in range(tasks)])
        return {"t": t}

    def prefaulted_like(self, a: np.ndarray) -> np.ndarray:
        """A destination for one memcpy of ``a`` whose pages are already faulted in."""
        if self._dst is None or self._dst.shape != a.shape:
            self._dst = np.empty_like(a)
            self._dst.fill(1.0)
        return self._dst

    def op_pipe_roundtrip(self, k: int, budget_s: float) -> dict[str, Any]:
        """A round trip through a raw ``multiprocessing.Pipe`` to a forked echo."""
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


class ActionpoolDriver(Driver):
    """``ap.Runner(cpu_workers=w, io_workers=20)``, one per worker count asked for.

    Only the public API (``Runner``, ``map``, ``submit``, ``run``, ``Plan``,
    ``action``) is used here and in the ops: ``compare.py`` runs this driver against
    an older copy of ``src/`` whose internals may differ."""

    dist = "actionpool"
    module = "actionpool"

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

    def close(self) -> None:
        for r in self.runners.values():
            r.shutdown()
        self.runners.clear()


class FuturesDriver(Driver):
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

    def thread_pool(self) -> Any:
        from concurrent.futures import ThreadPoolExecutor

        if self.threads is None:
            self.threads = ThreadPoolExecutor(IO_THREADS)
        return self.threads

    def close(self) -> None:
        for ex in self.pools.values():
            ex.shutdown(wait=True, cancel_futures=True)
        if self.threads is not None:
            self.threads.shutdown(wait=True)


class MultiprocessingDriver(Driver):
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

    def thread_pool(self) -> Any:
        from multiprocessing.pool import ThreadPool

        if self.threads is None:
            self.threads = ThreadPool(IO_THREADS)
        return self.threads

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

    def close(self) -> None:
        from joblib.externals.loky import reusable_executor

        ex = reusable_executor._executor
        if ex is not None:
            ex.shutdown(wait=True, kill_workers=True)


class LokyDriver(Driver):
    """loky.get_reusable_executor (pickles arguments; no memmapping: that is joblib's);
    another worker count gets an executor of its own, not a resize of the shared one."""

    dist = "loky"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        import loky

        self.loky = loky
        self.ex = loky.get_reusable_executor(max_workers=self.workers, timeout=3600)
        list(self.ex.map(nap, [0.05] * (2 * self.workers)))
        self.others: dict[int, Any] = {}

    def pool_for(self, w: int) -> Any:
        if w == self.workers:
            return self.ex
        if w not in self.others:
            ex = self.loky.ProcessPoolExecutor(max_workers=w)
            list(ex.map(nap, [0.05] * (2 * w)))
            self.others[w] = ex
        return self.others[w]

    def close(self) -> None:
        for ex in self.others.values():
            ex.shutdown(wait=True, kill_workers=True)
        self.ex.shutdown(wait=True, kill_workers=True)


class MpireDriver(Driver):
    """mpire.WorkerPool (its default start method, fork), kept alive between maps."""

    dist = "mpire"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        from mpire import WorkerPool

        self.WorkerPool = WorkerPool
        self.pool = WorkerPool(n_jobs=self.workers, keep_alive=True)
        self.pool.map(nap, [0.05] * (2 * self.workers))
        self.threads: Any = None

    def thread_pool(self) -> Any:
        if self.threads is None:
            self.threads = self.WorkerPool(
                n_jobs=IO_THREADS, start_method="threading", keep_alive=True
            )
        return self.threads

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

    def thread_pool(self) -> Any:
        if self.threads is None:
            self.threads = self.pebble.ThreadPool(max_workers=IO_THREADS)
        return self.threads

    def close(self) -> None:
        for pool in (self.pool, self.threads):
            if pool is not None:
                pool.close()
                pool.join()


class DaskDriver(Driver):
    """distributed.LocalCluster on loopback (processes, 1 thread each), started inside a
    save/restore of os.environ (it sets OMP_NUM_THREADS=1 and the like), and, once a
    ``w_dask`` op asks for it, an actionpool ``Runner(backend="dask", client=...)`` on
    the same cluster.

    The cluster is configured as ``Runner(backend="dask")`` configures the one it starts
    for itself (``actionpool.pools.dask.connect``): ``allowed-failures`` 0 and
    ``worker-saturation`` 1.0 (Dask's default is 1.1: with one thread per worker, a
    second task queued on each worker). One cluster serves both the plain ``distributed``
    ops and actionpool's Dask backend (``w_dask.py``), so the two are compared on the
    very same scheduler and workers, in the same process, round by round; and a single
    cluster's heartbeats, not two, run beside every other library's samples.
    """

    dist = "distributed"

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        import dask
        from distributed import Client, LocalCluster

        if os.environ.get(SPARE_ENV) == "1":  # the dask-spare variant (harness.DASK_SPARE)
            self.workers = max(1, self.workers - 1)
        self.dask = dask
        dask.config.set({"temporary-directory": str(self.tmp / "dask")})
        with preserved_environ(), dask.config.set(DASK_CONFIG):
            self.cluster = LocalCluster(
                n_workers=self.workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                silence_logs=logging.ERROR,
            )
            self.client = Client(self.cluster)
            self.client.wait_for_workers(self.workers)
        self.client.gather([self.client.submit(nap, 0.05, pure=False) for _ in range(2)])
        self._ap_runner: Any = None

    def settle(self) -> None:
        """Wait out the client's message batching before a sample. Dask's client sends
        its messages to the scheduler at most once per interval (``BatchedSend``, 10
        ms): the release of the previous sample's futures, sent as it ends, would hold
        this sample's first submit back for up to that interval. Both contenders share
        this client, so each sample would pay for the one before it, whoever ran it."""
        comm = getattr(self.client, "scheduler_comm", None)
        time.sleep(2 * float(getattr(comm, "interval", 0.01)))

    def ap_runner(self) -> Any:
        """actionpool's ``Runner(backend="dask")`` on this driver's client, made on first
        use (a warm-up call, untimed) and warmed as ``ActionpoolDriver``'s: a plan of
        short sleeps starts every worker-local process."""
        if self._ap_runner is None:
            import actionpool as ap

            with preserved_environ():
                r = ap.Runner(backend="dask", client=self.client)
            plan = ap.Plan()
            for _ in range(2 * self.workers):
                plan.add(nap, 0.05)
            r.run(plan).raise_for_failures()
            self._ap_runner = r
        return self._ap_runner

    def close(self) -> None:
        if self._ap_runner is not None:
            self._ap_runner.shutdown()  # its worker plugin (and processes) first
        with preserved_environ():
            self.client.close()
            self.cluster.close()


class RayDriver(Driver):
    """ray.init(num_cpus=workers), the task functions as remote functions."""

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


def available(
    only: list[str] | None, no_dask: bool = False, no_ray: bool = False
) -> tuple[list[str], dict[str, str]]:
    """The installed libraries that take part, and why the others do not."""
    libs, left_out = [], {}
    for lib, (mod, _) in DIST.items():
        if only and lib not in only:
            continue
        if lib == "dask" and no_dask:
            left_out[lib] = "left out (--no-dask), and with it the Dask backend's rows (W*-dask)"
            continue
        if lib == "ray" and no_ray:
            left_out[lib] = "left out (--no-ray)"
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
