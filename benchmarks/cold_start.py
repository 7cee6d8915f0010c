"""W7 cold start: one sample per fresh interpreter; W7-threaded: one round per fresh
interpreter.

This module imports only the standard library, so that the process a sample runs in
holds what a user's script holds before it creates its pool: the library under test and
nothing else. (``suite.py`` imports NumPy, whose OpenBLAS starts threads at import time,
and that changes how some libraries start their workers: a sample run from it would
measure the benchmark's own imports.) Dask and Ray import NumPy themselves.

Run by ``suite.py`` as ``python -c 'import cold_start; cold_start.cold_main()' NAME N TMP``;
the sample's time goes to stdout as one JSON line. ``threaded_main()`` (W7-threaded)
likewise, with ``N RUNNERS SHIFT LIBS...``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def reply_channel() -> Any:
    """The replies go to a private copy of fd 1; fd 1 itself then points at stderr, so
    whatever a library prints (from C code or child processes too) cannot garble them."""
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return reply


def cold_actionpool(w: int) -> Callable[[], Any]:
    import actionpool as ap

    runner_cls = ap.Runner  # the lazy (PEP 562) import happens here, untimed

    def run() -> int:
        with runner_cls(cpu_workers=w) as r:
            pid: int = r.submit(os.getpid).result()
        return pid

    return run


def cold_futures(w: int) -> Callable[[], Any]:
    from concurrent.futures import ProcessPoolExecutor

    def run() -> int:
        with ProcessPoolExecutor(w) as ex:
            pid: int = ex.submit(os.getpid).result()
        return pid

    return run


def cold_multiprocessing(w: int) -> Callable[[], Any]:
    import multiprocessing
    import multiprocessing.pool  # what multiprocessing.Pool() would import, untimed

    def run() -> int:
        pool = multiprocessing.Pool(w)
        pid: int = pool.apply_async(os.getpid).get()
        pool.close()
        pool.join()
        return pid

    return run


def cold_joblib(w: int) -> Callable[[], Any]:
    import joblib
    from joblib.externals.loky import reusable_executor

    def run() -> int:
        pid: int = joblib.Parallel(n_jobs=w)([joblib.delayed(os.getpid)()])[0]
        ex = reusable_executor._executor
        if ex is not None:
            ex.shutdown(wait=True)
        return pid

    return run


def cold_loky(w: int) -> Callable[[], Any]:
    import loky

    def run() -> int:
        ex = loky.ProcessPoolExecutor(w)
        pid: int = ex.submit(os.getpid).result()
        ex.shutdown(wait=True)
        return pid

    return run


def cold_mpire(w: int) -> Callable[[], Any]:
    from mpire import WorkerPool

    def run() -> int:
        with WorkerPool(n_jobs=w) as pool:
            pid: int = pool.apply_async(os.getpid).get()
        return pid

    return run


def cold_pebble(w: int) -> Callable[[], Any]:
    import pebble

    def run() -> int:
        pool = pebble.ProcessPool(max_workers=w)
        pid: int = pool.schedule(os.getpid).result()
        pool.close()
        pool.join()
        return pid

    return run


def cold_dask(w: int, tmp: Path) -> Callable[[], Any]:
    import dask
    from bench_arrays import preserved_environ
    from distributed import Client, LocalCluster

    dask.config.set({"temporary-directory": str(tmp / "dask")})

    def run() -> int:
        with preserved_environ():
            cluster = LocalCluster(
                n_workers=w,
                threads_per_worker=1,
                processes=True,
                dashboard_address="127.0.0.1:0",
                silence_logs=logging.ERROR,
            )
            client = Client(cluster)
            pid: int = client.submit(os.getpid, pure=False).result()
            client.close()
            cluster.close()
        return pid

    return run


def cold_ray(w: int, tmp: Path) -> Callable[[], Any]:
    import ray
    from bench_arrays import ray_init

    def getpid() -> int:  # a nested function: Ray pickles it by value
        return os.getpid()

    def run() -> int:
        ray_init(w, tmp)
        pid: int = ray.get(ray.remote(num_cpus=1)(getpid).remote())
        ray.shutdown()
        return pid

    return run


COLD: dict[str, tuple[str, Callable[..., Callable[[], Any]]]] = {
    "actionpool": ("ap.Runner(cpu_workers=n) as r: submit, result", cold_actionpool),
    "actionpool-portable": (
        "the same, portable path (ACTIONPOOL_PORTABLE=1; variant)",
        cold_actionpool,
    ),
    "concurrent.futures": ("ProcessPoolExecutor(n) as ex: submit, result", cold_futures),
    "multiprocessing": ("Pool(n).apply_async().get(); close(); join()", cold_multiprocessing),
    "joblib": ("Parallel(n_jobs=n)([delayed(os.getpid)()]); executor shutdown", cold_joblib),
    "loky": ("loky.ProcessPoolExecutor(n): submit, result, shutdown", cold_loky),
    "mpire": ("WorkerPool(n) as pool: apply_async().get()", cold_mpire),
    "pebble": ("ProcessPool(n): schedule, result, close, join", cold_pebble),
    "dask": ("LocalCluster(n) + Client: submit, result, close", cold_dask),
    "ray": ("ray.init(num_cpus=n): one task, ray.shutdown()", cold_ray),
}


def cold_main() -> int:
    """One cold-start sample; argv: NAME N TMP (see the module docstring)."""
    name, w, tmp = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    reply = reply_channel()
    make = COLD[name][1]
    t0 = time.perf_counter()
    run = make(w, tmp) if name in ("dask", "ray") else make(w)
    import_s = time.perf_counter() - t0
    t, pid = timed(run)
    if pid == os.getpid():
        raise AssertionError(f"{name}: the task ran in this process")
    reply.write(json.dumps({"t": t, "import_s": import_s}) + "\n")
    reply.flush()
    return 0


def _threaded_pools(w: int) -> dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]]:
    """W7-threaded's contenders: how to make a pool, get one ``os.getpid`` result, and
    how to close it."""
    import actionpool as ap

    runner_cls = ap.Runner  # the lazy (PEP 562) import happens here, untimed
    from concurrent.futures import ProcessPoolExecutor

    def ap_first() -> Any:
        r = runner_cls(cpu_workers=w)
        return r, r.submit(os.getpid).result()

    def cf_first() -> Any:
        ex = ProcessPoolExecutor(w)
        return ex, ex.submit(os.getpid).result()

    return {
        "actionpool": (ap_first, lambda r: r.close()),
        "concurrent.futures": (cf_first, lambda ex: ex.shutdown(wait=True)),
    }


def threaded_main() -> int:
    """One round of W7-threaded; argv: N RUNNERS SHIFT LIBS... A thread blocked on an
    event runs beside the main one all along (as in a notebook's kernel). Then, RUNNERS
    times over, each library of LIBS makes a pool of N workers, gets one ``os.getpid``
    result (timed: from the pool's creation to the result) and closes it (timed apart),
    the libraries in an order rotated by SHIFT + the pool's index. One JSON line: per
    library, the seconds of each pool in the order made."""
    w, k, shift, libs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    reply = reply_channel()
    t0 = time.perf_counter()
    pools = _threaded_pools(w)
    import_s = time.perf_counter() - t0
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, name="another-thread")
    other.start()
    first: dict[str, list[float]] = {lib: [] for lib in libs}
    close: dict[str, list[float]] = {lib: [] for lib in libs}
    try:
        for i in range(k):
            j = (shift + i) % len(libs)
            for lib in libs[j:] + libs[:j]:
                make, end = pools[lib]
                t, (pool, pid) = timed(make)
                c, _ = timed(functools.partial(end, pool))
                if pid == os.getpid():
                    raise AssertionError(f"{lib}: the task ran in this process")
                first[lib].append(t)
                close[lib].append(c)
    finally:
        stop.set()
        other.join()
    reply.write(json.dumps({"first": first, "close": close, "import_s": import_s}) + "\n")
    reply.flush()
    return 0
