"""Backends: which pools a :class:`~actionpool.Runner` gets, and how big they are.

``"local"``: a :class:`~actionpool.pools.process.ProcessPool` for cpu actions and a
:class:`~actionpool.pools.threads.ThreadPool` for io ones, sized from this machine
(:func:`~actionpool.sizing.compute_sizing`).

``"dask"``: a :class:`~actionpool.pools.dask.DaskPool` for cpu actions (and io ones
with ``io_on_cluster``), on the cluster at ``address``, or ``client``'s, or a
``LocalCluster`` started for the runner; io actions stay on local threads otherwise.
Sized from the cluster (:func:`~actionpool.sizing.cluster_sizing`).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

# Imported with the module, not in build(): a Runner's creation is what users time
# (a cold start), and these imports are most of it; dask's stay in build().
from .platforms import process_path
from .pools import Pool
from .pools.process import ProcessPool
from .pools.threads import ThreadPool
from .pools.unavailable import UnavailablePool
from .pools.zygote_client import prestart_idle_zygote, resolve_worker_start
from .shm import SHARED_MEMORY
from .sizing import Sizing, cluster_sizing, compute_sizing

if TYPE_CHECKING:
    from .shm import Arena

__all__ = ["BACKENDS", "DASK_IN_FLIGHT", "PRESTART_ENV", "Backend", "build", "prestart_in_kernel"]

BACKENDS = ("local", "dask")

DASK_IN_FLIGHT = 128
"""Attempts a dask runner keeps in flight per thread of the cluster (docs/scaling-out.md,
"Overhead"): one runs, the others wait on Dask's scheduler or on their worker, where
short steady ones travel several to a Dask task (:func:`~actionpool.pools.dask.batch_count`);
enough of them that a batch is full."""


@dataclass
class Backend:
    """What :func:`build` made: the sizing, the pools by kind, and the cluster
    connection (``link``, the Dask backend's; closed after the pools)."""

    sizing: Sizing
    pools: dict[str, Pool]
    link: Any = None
    shared_memory: bool = True  # whether arrays may travel through /dev/shm
    # makes a run's arena (prefix, threshold) where it is not shared memory's
    arena: Callable[[str, int | None], Arena] | None = None
    notes: list[str] = field(default_factory=list)

    def close_link(self) -> None:
        """Close the cluster and client the runner started (after its pools)."""
        if self.link is not None:
            self.link.close()


def _given(**options: Any) -> list[str]:
    """The names of the options that are not None, in the order given."""
    return [name for name, value in options.items() if value is not None]


def build(
    backend: str,
    cpu_workers: int | None,
    io_workers: int | None,
    worker_start: str | None,
    *,
    address: str | None = None,
    client: Any = None,
    security: Any = None,
    io_on_cluster: bool = False,
    max_tasks_per_worker: int | None = None,
    max_worker_memory: int | None = None,
) -> Backend:
    """Make the pools of ``backend`` (see the module docstring).

    Raises:
        ValueError: an unknown backend; a Dask option (``address``, ``client``,
            ``security``, ``io_on_cluster``) with ``backend="local"``; ``cpu_workers``
            with a cluster of the user's (its workers are its own); a worker count
            that is not an int >= 1.
        ImportError: ``backend="dask"`` without ``distributed`` installed.
        OSError: the Dask scheduler at ``address`` could not be reached.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "local":
        given = _given(
            address=address, client=client, security=security, io_on_cluster=io_on_cluster or None
        )
        if given:
            raise ValueError(f"{', '.join(given)} need backend='dask'")
        sizing = compute_sizing(cpu_workers, io_workers)
        path, missing = process_path()
        cpu: Pool
        if path == "none":  # io actions still run; each cpu action fails, saying why
            cpu = UnavailablePool(sizing.cpu_workers, missing)
        else:
            cpu = ProcessPool(
                sizing.cpu_workers,
                sizing.blas_threads,
                worker_start,
                cores=sizing.usable_cores,
                max_tasks=max_tasks_per_worker,
                max_memory=max_worker_memory,
                portable=path == "portable",
                reuse_zygote=True,
            )
        return Backend(
            replace(sizing, cpu_pool=cpu.describe()),
            {"cpu": cpu, "io": ThreadPool(sizing.io_workers)},
            shared_memory=SHARED_MEMORY,
        )
    recycling = _given(
        max_tasks_per_worker=max_tasks_per_worker, max_worker_memory=max_worker_memory
    )
    if recycling:
        raise ValueError(
            f"{', '.join(recycling)} recycle this machine's worker processes and need"
            " backend='local' (on Dask, use its own worker lifetime options:"
            " distributed.worker.lifetime)"
        )
    from .pools.dask import ClusterArena, DaskPool, connect

    if cpu_workers is not None and (address is not None or client is not None):
        raise ValueError(
            "cpu_workers sizes the LocalCluster a dask runner starts; a cluster at"
            " address= or client= has its own workers"
        )
    local = compute_sizing(cpu_workers, io_workers)
    # the workers' limits are the available memory; the budget takes its fraction once
    per_worker = local.available_memory // max(1, local.cpu_workers)
    link = connect(address, client, security, local.cpu_workers, per_worker)
    try:
        sizing = cluster_sizing(link.workers(), link.address, link.owned, local)
        # Attempts in flight: DASK_IN_FLIGHT per cluster thread, the rest queued on
        # Dask's scheduler, so that a worker's next task is there when it finishes,
        # not one client round trip later (queued ones have not started: their
        # timeouts do not run, and a cancel withdraws them)
        in_flight = sizing.cpu_workers * DASK_IN_FLIGHT
        pools: dict[str, Pool] = {
            "cpu": DaskPool(
                link,
                "cpu",
                in_flight,
                sizing.blas_threads,
                sizing.cluster_resources,
                sizing.cpu_workers,
            )
        }
        if io_on_cluster:
            pools["io"] = DaskPool(
                link,
                "io",
                in_flight,
                sizing.blas_threads,
                sizing.cluster_resources,
                sizing.cpu_workers,
            )
        else:
            pools["io"] = ThreadPool(sizing.io_workers)
    except BaseException:
        link.close()
        raise
    sizing = replace(sizing, cpu_pool=pools["cpu"].describe())
    return Backend(sizing, pools, link, shared_memory=False, arena=ClusterArena)


PRESTART_ENV = "ACTIONPOOL_PRESTART"
"""``"0"``: no zygote is started ahead in a Jupyter kernel (:func:`prestart_in_kernel`);
``"1"`` (or unset): one is."""


def prestart_in_kernel() -> bool:
    """In a Jupyter (IPython) kernel, start the zygote of the first local runner now
    and keep it idle; whether one was started. ``import actionpool`` calls it on a
    thread of its own in a kernel, so that the imports and the start overlap the
    user's next cells.

    A kernel runs threads, so a runner's zygote there is a fresh interpreter, whose
    start and imports were most of the first runner's first result; users import the
    library cells before they make a runner. The zygote is made for the default sizing
    (:func:`~actionpool.sizing.compute_sizing`) and kept idle: a runner whose zygote
    would start the same way (same BLAS cap, environment, ``sys.path``) adopts it, any
    other starts its own. It stops at the interpreter's exit, or with the kernel.
    Only on the zygote path, with ``worker_start`` resolving to ``"fresh"``, and unless
    ``ACTIONPOOL_PRESTART=0``; a zygote that cannot start is no error here (the
    runner's own start says why).
    """
    if "ipykernel" not in sys.modules:
        return False
    value = os.environ.get(PRESTART_ENV, "1")
    if value not in ("0", "1"):
        warnings.warn(
            f"{PRESTART_ENV} must be '0' or '1', got {value!r}: no zygote is started ahead",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    if value == "0" or process_path()[0] != "zygote":
        return False
    try:
        if resolve_worker_start() != "fresh":
            return False
        prestart_idle_zygote(compute_sizing().blas_threads)
    except (OSError, RuntimeError, ValueError):
        return False
    return True
