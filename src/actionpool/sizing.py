"""How big the pools are: :class:`Sizing`, read from this machine, never hard-coded.

Formulas (each number's origin is repeated in :attr:`Sizing.reason`):

* ``usable_cores = loky.cpu_count()``: logical CPUs this process may use, after CPU
  affinity and cgroup CPU quotas (loky implements both; we do not re-implement them).
* ``physical_cores = loky.cpu_count(only_physical_cores=True)``, same limits applied.
* ``memory_budget = MEMORY_FRACTION x available``, ``available`` the smaller of
  ``psutil.virtual_memory().available`` (the host's) and, in a cgroup with a memory
  limit (a container), that limit minus the cgroup's usage (:func:`cgroup_memory`;
  psutil reads the host's ``/proc/meminfo``, which a container does not change), bytes.
* ``worker_footprint``: bytes one worker needs. First estimated, for free, as this
  process's RSS (a worker imports at most what its parent imported, so this is an
  upper bound in practice); only when that estimate would make memory the binding
  limit is a worker really measured: the unique memory (USS) of a freshly started
  Python process that has imported the worker's modules, once per interpreter
  (``worker_footprint()``: a whole interpreter start and import, hence the free
  estimate first). Most machines never pay for the probe.
* ``cpu_workers = max(1, min(physical_cores, memory_budget // worker_footprint))``.
* ``blas_threads = max(1, usable_cores // cpu_workers)``: BLAS/OpenMP threads per
  worker, so that workers x threads <= usable cores (no oversubscription).
* ``io_workers = max(32, IO_THREADS_PER_CORE x usable_cores)``, capped by a quarter of the
  soft open-file limit (each I/O action may hold a few descriptors).
  CPython's ``ThreadPoolExecutor`` default is ``min(32, cpu_count + 4)``; I/O actions
  spend their time waiting, so we keep at least its 32 and grow with the cores.

Overrides: ``Runner(cpu_workers=..., io_workers=...)`` arguments first, then the
``ACTIONPOOL_CPU_WORKERS`` / ``ACTIONPOOL_IO_WORKERS`` environment variables.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import loky
import psutil

__all__ = [
    "BLAS_ENV_VARS",
    "IO_THREADS_PER_CORE",
    "MEMORY_FLOOR_FRACTION",
    "MEMORY_FRACTION",
    "CgroupMemory",
    "Sizing",
    "available_memory",
    "cgroup_memory",
    "cluster_sizing",
    "compute_sizing",
    "worker_env",
    "worker_footprint",
]

MEMORY_FRACTION = 0.8
"""Share of the available memory that actions may use; the rest is left to the OS."""

MEMORY_FLOOR_FRACTION = 0.05
"""Default backpressure floor: dispatch pauses while available memory is below this
share of total memory (see ``Runner(memory_floor=...)``)."""

IO_THREADS_PER_CORE = 8
"""I/O threads per usable core beyond CPython's floor of 32."""

CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where Linux mounts the cgroup hierarchies."""

PROC_CGROUP = Path("/proc/self/cgroup")
"""This process's cgroups, one line per hierarchy."""

_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as LONG_MAX rounded down to a page

_FOOTPRINT: int | None = None
_FOOTPRINT_PROBE = (
    "import actionpool._worker, psutil;"
    "m = psutil.Process().memory_full_info();"
    "print(getattr(m, 'uss', m.rss))"
)


@dataclass(frozen=True)
class Sizing:
    """The pool sizes of a runner and how they were reached.

    Attributes:
        cpu_workers: processes in the CPU pool.
        io_workers: threads in the I/O pool.
        memory_budget: bytes that actions' declared ``memory`` may add up to.
        blas_threads: BLAS/OpenMP threads allowed inside each CPU worker.
        reason: one line per number saying where it came from.
        usable_cores: logical CPUs usable by this process (affinity, cgroups).
        physical_cores: physical cores among them.
        available_memory: bytes available when measured: ``psutil.virtual_memory()
            .available``, or less in a cgroup with a memory limit (:func:`cgroup_memory`).
        worker_footprint: measured memory of one idle worker, bytes (0 if not measured).
        total_memory: ``psutil.virtual_memory().total``, or a cgroup's memory limit
            when smaller, bytes, read with ``available_memory`` (0: not measured).
        backend: ``"local"`` or ``"dask"``; for ``"dask"``, ``cpu_workers`` is the
            cluster's threads (the cpu attempts it runs at once), and the memory
            figures are the sum of its workers' memory limits.
        cluster_workers: the Dask workers (0 for ``"local"``).
        cluster_resources: the Dask worker resources the cluster declares that an
            action's ``memory=`` and ``threads=`` map to (``"memory"``, ``"threads"``).
        largest_worker_memory: bytes, the largest memory limit of one Dask worker
            (an action runs on one; 0 for ``"local"``).
        largest_worker_threads: the largest ``threads`` resource one Dask worker
            declares (0: none declares it, or ``"local"``).
        cpu_pool: what runs the cpu actions, in one line (the pool's ``describe()``:
            for ``"local"``, which process path, see :mod:`actionpool.platforms`);
            empty until a runner has made its pools.
    """

    cpu_workers: int
    io_workers: int
    memory_budget: int
    blas_threads: int
    reason: str
    usable_cores: int
    physical_cores: int
    available_memory: int
    worker_footprint: int
    total_memory: int = 0
    backend: str = "local"
    cluster_workers: int = 0
    cluster_resources: frozenset[str] = frozenset()
    largest_worker_memory: int = 0
    largest_worker_threads: int = 0
    cpu_pool: str = ""

    def __str__(self) -> str:
        if self.backend == "dask":
            return (
                f"dask: {self.cluster_workers} workers, cpu_workers={self.cpu_workers}"
                f" threads, io_workers={self.io_workers},"
                f" memory_budget={_fmt_bytes(self.memory_budget)}"
            )
        return (
            f"cpu_workers={self.cpu_workers} io_workers={self.io_workers} "
            f"blas_threads={self.blas_threads} memory_budget={_fmt_bytes(self.memory_budget)}"
        )


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def worker_footprint() -> int:
    """Unique memory (bytes) of a fresh worker process, measured once per interpreter.

    Starts ``python -c 'import actionpool._worker'`` and reads its USS with psutil
    (RSS where USS is unavailable).

    Raises:
        RuntimeError: the probe process failed.
    """
    global _FOOTPRINT
    if _FOOTPRINT is None:
        out = subprocess.run(
            [sys.executable, "-c", _FOOTPRINT_PROBE],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
        )
        if out.returncode != 0:
            raise RuntimeError(f"could not measure a worker's memory: {out.stderr.strip()}")
        _FOOTPRINT = int(out.stdout.split()[-1])
    return _FOOTPRINT


def _override(arg: int | None, var: str) -> tuple[int | None, str]:
    if arg is not None:
        if isinstance(arg, bool) or not isinstance(arg, int) or arg < 1:
            raise ValueError(f"{var.split('_', 1)[1].lower()} must be an int >= 1, got {arg!r}")
        return arg, "argument"
    raw = os.environ.get(var)
    if raw is None or raw.strip() == "":
        return None, ""
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"environment variable {var} must be an int >= 1, got {raw!r}")
    return value, var


@dataclass(frozen=True)
class CgroupMemory:
    """This process's cgroup memory, as :func:`cgroup_memory` read it.

    Attributes:
        limit: bytes, the tightest limit of the cgroup and its ancestors; None: none.
        usage: bytes the cgroup uses now (page cache included, as the kernel counts it).
        version: 1 or 2, the cgroup hierarchy read.
        path: the cgroup directory whose usage was read.
    """

    limit: int | None
    usage: int
    version: int
    path: str

    @property
    def free(self) -> int | None:
        """Bytes left below the limit (``limit - usage``, at least 0); None: no limit."""
        return None if self.limit is None else max(0, self.limit - self.usage)


def _read_int(path: Path) -> int | None:
    """An int file of a cgroup (None: absent, unreadable, or ``max``: no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    value = int(text)
    return None if value >= _NO_LIMIT else value


def _tightest(leaf: Path, top: Path, name: str) -> int | None:
    """The smallest limit in file ``name`` of ``leaf`` and its ancestors up to ``top``."""
    limits = []
    here = leaf
    while True:
        value = _read_int(here / name)
        if value is not None:
            limits.append(value)
        if here == top or top not in here.parents:
            break
        here = here.parent
    return min(limits) if limits else None


def cgroup_memory(root: Path | None = None, proc_cgroup: Path | None = None) -> CgroupMemory | None:
    """This process's cgroup memory limit and usage, or None where none can be read
    (not Linux, no cgroup filesystem, no memory controller).

    Reads ``proc_cgroup`` for the process's cgroup, then under ``root``: the v1 memory
    controller where there is one (``memory/<path>/memory.limit_in_bytes`` and
    ``memory.usage_in_bytes``; also the hybrid layout, v2 mounted at ``unified``),
    else v2 (``<path>/memory.max`` and ``memory.current``). A container sees its own
    cgroup at the root of the mount while ``/proc/self/cgroup`` may show the host's
    path, so the root is tried when the path is not there. The limit is the tightest
    of the cgroup and its ancestors within the mount (kernel docs,
    admin-guide/cgroup-v2.rst "memory.max"; cgroup-v1/memory.rst).

    Args:
        root: the cgroup mount; default :data:`CGROUP_ROOT`.
        proc_cgroup: the process's cgroup file; default :data:`PROC_CGROUP`.
    """
    root = CGROUP_ROOT if root is None else root
    proc_cgroup = PROC_CGROUP if proc_cgroup is None else proc_cgroup
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    v1_path = v2_path = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if "memory" in controllers.split(","):
            v1_path = path
        elif hierarchy == "0" and controllers == "":
            v2_path = path
    if v1_path is not None:
        top = root / "memory"
        for leaf in (top / v1_path.lstrip("/"), top):
            usage = _read_int(leaf / "memory.usage_in_bytes")
            if usage is not None:
                limit = _tightest(leaf, top, "memory.limit_in_bytes")
                return CgroupMemory(limit, usage, 1, str(leaf))
    if v2_path is not None:
        top = root if (root / "cgroup.controllers").exists() else root / "unified"
        for leaf in (top / v2_path.lstrip("/"), top):
            usage = _read_int(leaf / "memory.current")
            if usage is not None:
                limit = _tightest(leaf, top, "memory.max")
                return CgroupMemory(limit, usage, 2, str(leaf))
    return None


# (usage file, limit) of this process's cgroup, found once by available_memory; None:
# no limit to respect. Found again when CGROUP_ROOT or PROC_CGROUP change (tests).
_CGROUP_SEEN: tuple[Path, Path, tuple[Path, int] | None] | None = None


def available_memory() -> int:
    """Bytes of memory available now: the host's (``psutil.virtual_memory()
    .available``), or, in a cgroup with a memory limit, that limit minus the cgroup's
    current usage when smaller. Backpressure reads this (:mod:`actionpool.admission`).

    The cgroup and its limit are found once (:func:`cgroup_memory`); later calls read
    only the usage file.
    """
    global _CGROUP_SEEN
    host = int(psutil.virtual_memory().available)
    seen = _CGROUP_SEEN
    if seen is None or seen[0] != CGROUP_ROOT or seen[1] != PROC_CGROUP:
        cg = cgroup_memory()
        where = None
        if cg is not None and cg.limit is not None:
            name = "memory.usage_in_bytes" if cg.version == 1 else "memory.current"
            where = (Path(cg.path) / name, cg.limit)
        seen = _CGROUP_SEEN = (CGROUP_ROOT, PROC_CGROUP, where)
    if seen[2] is None:
        return host
    usage_file, limit = seen[2]
    usage = _read_int(usage_file)
    return host if usage is None else min(host, max(0, limit - usage))


def nested_cores() -> int | None:
    """The CPU slots of the attempt this process runs, when it is an actionpool
    worker process in the middle of an attempt (its action's ``threads=``, at least
    1); None elsewhere. A runner made inside an action takes that many cores, not the
    machine's: its parent runner already gave each of its workers their share, and
    ``workers x workers`` processes would oversubscribe the machine."""
    worker = sys.modules.get("actionpool._worker")
    if worker is None or not getattr(worker, "_IN_PROCESS", False):
        return None
    threads: int = getattr(worker, "_ATTEMPT_THREADS", 0)  # 0 between attempts
    return threads or None


def compute_sizing(cpu_workers: int | None = None, io_workers: int | None = None) -> Sizing:
    """Size the pools from this machine's cores and memory (see the module docstring).

    Args:
        cpu_workers: force the CPU pool's size (else ``ACTIONPOOL_CPU_WORKERS``, else
            computed).
        io_workers: force the I/O pool's size (else ``ACTIONPOOL_IO_WORKERS``, else
            computed).

    Returns:
        The :class:`Sizing`.

    Raises:
        ValueError: an override is not an int >= 1 (naming the argument or variable).
    """
    cpu_forced, cpu_src = _override(cpu_workers, "ACTIONPOOL_CPU_WORKERS")
    io_forced, io_src = _override(io_workers, "ACTIONPOOL_IO_WORKERS")
    usable = max(1, loky.cpu_count())
    physical = max(1, min(usable, loky.cpu_count(only_physical_cores=True)))
    reasons: list[str] = []
    nested = nested_cores()
    if nested is not None and nested < usable:
        usable, physical = nested, min(physical, nested)
        reasons.append(
            f"{nested} usable core{'s' if nested > 1 else ''}: this runner was made inside"
            f" an action of another runner's worker process, which may use {nested}"
            " (its threads=)"
        )
    memory = psutil.virtual_memory()
    available = int(memory.available)
    source = f"{_fmt_bytes(available)} available [psutil]"
    cgroup = cgroup_memory()
    if cgroup is not None and cgroup.free is not None and cgroup.free < available:
        assert cgroup.limit is not None
        available = cgroup.free
        source = (
            f"{_fmt_bytes(available)} = cgroup v{cgroup.version} limit"
            f" {_fmt_bytes(cgroup.limit)} - usage {_fmt_bytes(cgroup.usage)} [{cgroup.path}],"
            f" below the host's {_fmt_bytes(int(memory.available))} available [psutil]"
        )
    budget = int(available * MEMORY_FRACTION)
    footprint = 0
    if cpu_forced is not None:
        cpu = cpu_forced
        reasons.append(f"cpu_workers={cpu} from {cpu_src}")
    else:
        footprint = int(psutil.Process().memory_info().rss)
        how = "<= this process's RSS"
        if budget // max(1, footprint) < physical:  # memory might bind: measure a worker
            footprint, how = worker_footprint(), "measured"
        by_memory = max(1, budget // max(1, footprint))
        cpu = max(1, min(physical, by_memory))
        limit = "physical cores" if physical <= by_memory else "memory budget / worker footprint"
        reasons.append(
            f"cpu_workers={cpu} = min({physical} physical cores [loky.cpu_count, affinity+cgroups],"
            f" {by_memory} = budget {_fmt_bytes(budget)} / worker {_fmt_bytes(footprint)}"
            f" [{how}]), limited by {limit}"
        )
    blas = max(1, usable // cpu)
    reasons.append(f"blas_threads={blas} = {usable} usable cores // {cpu} cpu workers")
    if io_forced is not None:
        io = io_forced
        reasons.append(f"io_workers={io} from {io_src}")
    else:
        wanted = max(32, IO_THREADS_PER_CORE * usable)
        cap = wanted
        try:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft != resource.RLIM_INFINITY:
                cap = max(1, soft // 4)
        except (ImportError, OSError, ValueError):  # not on POSIX
            pass
        io = max(1, min(wanted, cap))
        why = f"max(32, {IO_THREADS_PER_CORE} x {usable} usable cores)"
        if cap < wanted:
            why += f", capped at a quarter of the open-file limit ({cap})"
        reasons.append(f"io_workers={io} = {why}")
    reasons.append(f"memory_budget={_fmt_bytes(budget)} = {MEMORY_FRACTION:.0%} of {source}")
    return Sizing(
        cpu_workers=cpu,
        io_workers=io,
        memory_budget=budget,
        blas_threads=blas,
        reason="; ".join(reasons),
        usable_cores=usable,
        physical_cores=physical,
        available_memory=available,
        worker_footprint=footprint,
        total_memory=min(
            int(memory.total),
            cgroup.limit if cgroup is not None and cgroup.limit is not None else int(memory.total),
        ),
    )


def cluster_sizing(
    workers: dict[str, dict[str, object]], address: str, owned: bool, local: Sizing
) -> Sizing:
    """The sizing of a Dask backend, from the scheduler's view of its workers
    (``Client.scheduler_info()["workers"]``: ``nthreads``, ``memory_limit`` in bytes,
    ``resources``) and this machine's ``local`` sizing (its io threads).

    ``cpu_workers`` is the cluster's threads (at least 1: a cluster without workers
    fails each node with a clear error instead of a run that waits for ever);
    ``memory_budget`` ``MEMORY_FRACTION`` of the sum of the workers' memory limits;
    ``blas_threads`` this machine's per-worker share for a cluster the runner started
    on it, else 1 (a remote machine's cores are not known here).
    """
    threads = sum(int(str(w.get("nthreads", 0) or 0)) for w in workers.values())
    limits = [int(str(w.get("memory_limit", 0) or 0)) for w in workers.values()]
    memory = sum(limits)
    declared = {
        str(name)
        for w in workers.values()
        for name in dict(w.get("resources") or {})  # type: ignore[call-overload]
    }
    declared_threads = [
        float(dict(w.get("resources") or {}).get("threads", 0))  # type: ignore[call-overload]
        for w in workers.values()
    ]
    where = "a LocalCluster started for this runner" if owned else "the cluster"
    reasons = [
        f"cpu_workers={max(1, threads)} = {threads} threads of {len(workers)} Dask workers"
        f" of {where} at {address} [Client.scheduler_info]",
        f"memory_budget={_fmt_bytes(int(memory * MEMORY_FRACTION))} = {MEMORY_FRACTION:.0%}"
        f" of {_fmt_bytes(memory)}, the sum of the workers' memory limits",
        f"io_workers={local.io_workers} threads here (io actions run in this process)",
    ]
    resources = frozenset(declared & {"memory", "threads"})
    if resources:
        reasons.append(f"Dask worker resources used: {', '.join(sorted(resources))}")
    blas = local.blas_threads if owned else 1
    return Sizing(
        cpu_workers=max(1, threads),
        io_workers=local.io_workers,
        memory_budget=int(memory * MEMORY_FRACTION),
        blas_threads=blas,
        reason="; ".join(reasons),
        usable_cores=max(1, threads),
        physical_cores=max(1, threads),
        available_memory=memory,
        worker_footprint=0,
        total_memory=memory,
        backend="dask",
        cluster_workers=len(workers),
        cluster_resources=resources,
        largest_worker_memory=max(limits, default=0),
        largest_worker_threads=int(max(declared_threads, default=0)),
    )


BLAS_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMEXPR_MAX_THREADS",
    "POLARS_MAX_THREADS",
    "RAYON_NUM_THREADS",
)
"""Environment variables set in every CPU worker to ``blas_threads`` before any import,
for the libraries that read their thread count from the environment at import time."""


def worker_env(blas_threads: int) -> dict[str, str]:
    """The environment overrides for CPU workers (see :data:`BLAS_ENV_VARS`)."""
    return {var: str(blas_threads) for var in BLAS_ENV_VARS}
