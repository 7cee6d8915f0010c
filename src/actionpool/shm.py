"""Shared memory for large buffers: a run's :class:`Arena`, the runner's reusable
:class:`SegmentPool`, and a worker's mappings of them (POSIX shared memory, Linux and
macOS). Pickling itself is :mod:`actionpool.transfer`'s.

Threads: an :class:`Arena` is shared by the io threads and the scheduler (its
``_lock``); a :class:`SegmentPool` by the threads that open and close arenas (its own
lock); module-level tables (``_ARENAS``, ``_WORKER_ARENAS``, ``_POOL_MAPPINGS``) are
guarded by ``_ARENAS_LOCK``, taken last. A call's arena may hold its lock while it
takes the lock of the arena it is linked to (:meth:`Arena.link`), never the other way.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import mmap
import os
import pickle
import re
import sys
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle

from ._threads import in_parallel
from .platforms import PORTABLE_ENV
from .transfer import PROTOCOL, Packed, _plain, dumps

try:  # POSIX shared memory: absent on Windows, where arrays travel in the pickle
    import _posixshmem
except ImportError:  # pragma: no cover - exercised by tests/test_platforms.py in a child
    _posixshmem = None

SHARED_MEMORY = _posixshmem is not None
"""Whether this platform offers POSIX shared memory (``shm_open``): without it, a
runner sends every buffer inside its pickle (``shm_threshold`` is ignored)."""

# Linux fills a new segment with pwrite (no page fault per page) and reserves its
# capacity with posix_fallocate; macOS's shared-memory objects take neither read/write
# calls nor fallocate, only a mapping, which the portable path (ACTIONPOOL_PORTABLE=1,
# see actionpool.platforms) also uses on Linux so that the way macOS takes is tested.
_SYSCALL_WRITES = sys.platform.startswith("linux") and os.environ.get(PORTABLE_ENV) != "1"

NAME_MAX = 31
"""The longest shared-memory name macOS accepts (``PSHMNAMLEN``), leading ``/``
included: every name made here fits it where pids have at most 5 digits (macOS)."""

__all__ = [
    "DEFAULT_SHM_THRESHOLD",
    "Arena",
    "SegmentPool",
    "arena_for",
    "forget",
    "keep_mappings",
]


# ---- shared memory for large buffers ---------------------------------------------------
#
#   parent: Arena(prefix).dumps(args/state)      worker: worker_arena(prefix).loads(...)
#     large buffer ──copy once──► /dev/shm/<prefix>-<n> ──mmap, read-only view──► np.ndarray
#     a buffer already inside a mapped segment travels as (name, offset, nbytes): no copy
#   worker: results' large buffers ──► /dev/shm/<prefix>-w<pid>-<n> ──► parent claims it
#
# With a SegmentPool (every Runner has one), the parent's copy goes instead into a
# reusable segment /dev/shm/ap-<pid>-pool-<n> that it keeps mapped and faulted, and
# workers keep their mapping of it from run to run: no fresh tmpfs pages to allocate and
# zero, no page faults. A segment is recycled only when its arena has closed and no
# value in the parent still points into it (see Arena.close and SegmentPool).
#
# Pickle protocol 5 hands every contiguous buffer (numpy arrays, bytearrays...) to a
# callback; buffers of at least ``threshold`` bytes go out of band into a segment and
# come back as read-only memoryviews, so numpy rebuilds arrays on the shared pages
# without copying them, and ``flags.writeable`` is False: nobody shares *mutable* memory.

DEFAULT_SHM_THRESHOLD = 1 << 20
"""Buffers of at least this many bytes (1 MiB, as joblib's memmapping default) travel
through shared memory."""

_ARENAS: dict[str, Arena] = {}  # open arenas of this process, by prefix
_ARENAS_LOCK = threading.Lock()


def _address(view: memoryview) -> int:
    import numpy as np

    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


class _Segment:
    __slots__ = ("cached", "end", "mm", "name", "start")

    def __init__(self, name: str, mm: mmap.mmap, cached: bool = False) -> None:
        self.name = name
        self.mm = mm
        self.cached = cached  # a worker's mapping of a pool segment: outlives the run
        self.start = _address(memoryview(mm)) if len(mm) else 0
        self.end = self.start + len(mm)


class Arena:
    """The shared-memory segments of one run (or one submitted call).

    In the parent (``owner=True``) it creates segments for large arguments and state,
    claims the segments workers create for large results, and unlinks all of them in
    :meth:`close` (the segments are also registered with multiprocessing's resource
    tracker, which unlinks them if this process dies first). In a worker
    (``owner=False``) it maps segments for one attempt and creates segments for its
    results, which the parent then owns.

    States: open -> closed. Thread-safe (io threads and the scheduler share one).

    Args:
        prefix: segment names start with ``/<prefix>-``.
        threshold: buffers of at least this many bytes go to shared memory; ``None``
            keeps everything in the pickle.
        pool: in the parent, the :class:`SegmentPool` to lease segments from instead
            of creating one per buffer; each leased segment goes back when this arena
            closes (or is unlinked, if a value still points into it).
    """

    def __init__(
        self,
        prefix: str,
        threshold: int | None,
        owner: bool = True,
        pool: SegmentPool | None = None,
    ) -> None:
        self.prefix = prefix
        self.threshold = threshold
        self.owner = owner
        self.pool = pool if owner else None
        self._leased: dict[str, _PoolSegment] = {}  # pool segments this arena wrote
        self._lock = threading.RLock()
        self._segments: dict[str, _Segment] = {}
        self._sources: dict[tuple[int, int], tuple[tuple[str, int, int], Any]] = {}
        self._created: list[str] = []
        self._count = itertools.count()
        self._tracked: set[str] = set()
        self._holds = 0  # attempts that may still create segments (see hold)
        self._close_wanted = False
        self.on_close: Any = None  # called with the prefix once closed (the pool's forget)
        self.orphans_possible = False  # a worker died mid-attempt: look for its segments
        self.closed = False
        self.inputs: Arena | None = None  # the arena of the map this call is part of
        if owner:
            with _ARENAS_LOCK:
                _ARENAS[prefix] = self

    # -- out-of-band pickling ----------------------------------------------------------

    @property
    def has_refs(self) -> bool:
        """Whether a call may refer to values kept elsewhere (a cluster's arena)."""
        return False

    def dumps(self, obj: Any) -> Packed:
        """Pickle ``obj``; its large buffers go to shared memory (once per arena)."""
        if _plain(obj):
            return pickle.dumps(obj, protocol=PROTOCOL), ()
        descs: list[tuple[str, int, int]] = []
        if self.threshold is None or self.closed:
            return dumps(obj), ()

        def out_of_band(pb: pickle.PickleBuffer) -> bool:
            view = pb.raw()
            assert self.threshold is not None
            if view.nbytes < self.threshold:
                return True  # small: in the pickle
            descs.append(self._place(view, pb))
            return False

        data: bytes = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=out_of_band)
        return data, tuple(descs)

    def loads(self, packed: Packed) -> Any:
        """Unpickle; out-of-band buffers become read-only views of the shared pages."""
        data, descs = packed
        if not descs:
            return pickle.loads(data)
        views = [self._view(name, offset, size) for name, offset, size in descs]
        return pickle.loads(data, buffers=views)

    def link(self, inputs: Arena) -> None:
        """Use the buffers that ``inputs`` placed instead of copying them again.

        A map's keyword arguments are placed once, in an arena of the map's own
        (``inputs``), and each of its calls' arenas links to it: a large array that
        every item shares is copied to shared memory (or scattered) once per map, not
        once per call, while what one call alone sends or returns stays in that call's
        arena and goes when the call ends. ``inputs`` stays open until every arena
        linked to it has closed (a link counts as a :meth:`hold`). If ``inputs`` has
        closed already, nothing is linked: this arena copies what it needs itself.
        """
        with inputs._lock:
            if inputs.closed:
                return
            inputs._holds += 1
        self.inputs = inputs

    def _placed(self, addr: int, size: int) -> tuple[str, int, int] | None:
        """Where this arena put the buffer at ``addr`` (or the buffer that one is a
        view of), if it did and is open."""
        with self._lock:
            if self.closed:
                return None
            hit = self._sources.get((addr, size))
            if hit is not None:
                return hit[0]
            for (src, src_size), ((name, offset, _), _keep) in self._sources.items():
                if src <= addr and addr + size <= src + src_size:  # a view of a copied buffer
                    return (name, offset + addr - src, size)
        return None

    def _owns(self, name: str) -> bool:
        """Whether segment ``name`` is one this arena created or leased."""
        with self._lock:
            return name in self._leased or name in self._created

    def _place(self, view: memoryview, keep: Any) -> tuple[str, int, int]:
        addr, size = _address(view), view.nbytes
        with self._lock:
            placed = self._placed(addr, size)
            if placed is not None:
                return placed
            for seg in self._segments.values():  # already shared (a node's result)
                if seg.start <= addr and addr + size <= seg.end:
                    return (seg.name, addr - seg.start, size)
            if self.inputs is not None:  # the map's (the lock order: ours, then its)
                placed = self.inputs._placed(addr, size)
                if placed is not None:
                    return placed
            desc = self._create(view)
            # keep the source alive so that its address cannot be reused by another
            # object while this arena maps it to a segment
            self._sources[(addr, size)] = (desc, keep)
            return desc

    def _create(self, view: memoryview) -> tuple[str, int, int]:
        if self.pool is not None and not self.closed:  # closed: close() took the leases
            seg = self.pool.store(view)
            if seg is not None:
                self._leased[seg.name] = seg
                return (seg.name, 0, view.nbytes)
        name = segment_name(self.prefix, next(self._count), worker=not self.owner)
        size = view.nbytes
        fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        if self.owner:
            _track(name)
            self._tracked.add(name)
        else:
            _WORKER_CREATED.append(name)
        self._created.append(name)
        try:
            os.ftruncate(fd, max(size, 1))
            # The one copy. pwrite, not a store through a fresh mapping: the kernel
            # fills the pages without the page fault per 4 KiB that a store through a
            # fresh mapping pays on top of the copy (docs/performance.md), and the
            # writer never needs the pages mapped.
            data = view.cast("B")
            if not _SYSCALL_WRITES:
                _store_mapped(fd, data)
            else:
                done = 0
                while done < size:
                    done += os.pwrite(fd, data[done:], done)
        finally:
            os.close(fd)
        return (name, 0, size)

    def _view(self, name: str, offset: int, size: int) -> memoryview:
        inputs = self.inputs
        if inputs is not None and inputs._owns(name):  # not ours to claim or unlink
            return inputs._view(name, offset, size)
        pooled = _is_pool_name(name)
        with self._lock:
            seg = self._segments.get(name)
            if seg is None:
                if pooled and (self.closed or (_pool_pid(name) == os.getpid() and not self.owner)):
                    # the arena that leased it has closed (an io action that outlived
                    # its run): the segment may hold another run's data by now
                    raise FileNotFoundError(
                        errno.ENOENT, "the run is over: its shared memory was released", name
                    )
                if pooled and _pool_pid(name) != os.getpid():  # a worker: keep it mapped
                    seg = _pool_mapping(name)
                else:
                    seg = _Segment(name, _map(name, populate=False))
                self._segments[name] = seg
                if self.owner and not pooled and name not in self._created:
                    _track(name)  # a worker's result segment: ours now
                    self._tracked.add(name)
                    self._created.append(name)
            # made under the lock: close() sees this export when it checks the mapping
            return memoryview(seg.mm)[offset : offset + size].toreadonly()

    # -- lifecycle -------------------------------------------------------------------

    def release_mappings(self) -> set[str]:
        """Drop this process's mappings (arrays still using one keep it alive).

        A worker's mappings of pool segments stay cached for later runs (see
        :func:`forget`).

        Returns:
            The names of the segments whose mapping is still in use (an array, a
            memoryview... points into it), so that it could not be closed.
        """
        if not self._segments and not self._sources:  # mapped and placed nothing
            return set()
        with self._lock:
            segments, self._segments = self._segments, {}
            self._sources.clear()
        busy = set()
        for seg in segments.values():
            if seg.cached:
                continue
            try:
                seg.mm.close()
            except BufferError:  # an array still points into it: it keeps the mapping
                busy.add(seg.name)
        return busy

    def hold(self) -> None:
        """A worker attempt that may create segments for this arena has started."""
        with self._lock:
            self._holds += 1

    def unhold(self) -> None:
        """That attempt is over; close now if :meth:`close_when_idle` was asked for."""
        with self._lock:
            self._holds -= 1
            now = self._close_wanted and self._holds == 0
        if now:
            self.close()

    def close_when_idle(self) -> None:
        """Close once no held attempt is left (a killed worker may still be writing)."""
        with self._lock:
            self._close_wanted = True
            now = self._holds == 0
        if now:
            self.close()

    def close(self) -> None:
        """Unlink every segment of this arena, also those a crashed worker left behind.

        Arrays that still use a segment (values in a report) stay valid: unlinking
        removes the name, and the memory goes when the last mapping does.

        Leased pool segments go back to the pool, except one that a value in this
        process still points into (a node that returned a view of its input array):
        that one is unlinked and leaves the pool, so that no later run overwrites it.
        """
        with self._lock:
            if self.closed:
                return
            self.closed = True
            names = list(self._created)
            leased, self._leased = self._leased, {}
        if self.owner:
            with _ARENAS_LOCK:
                _ARENAS.pop(self.prefix, None)
            if (names or leased) and self.on_close is not None:  # workers may hold mappings
                self.on_close(self.prefix)
            if self.orphans_possible:  # a scan of /dev/shm costs; only after a crash/kill
                names += [f"/{p.name}" for p in _SHM_DIR.glob(f"{self.prefix}-*")]
            for name in dict.fromkeys(names):
                _unlink(name, name in self._tracked)
        busy = self.release_mappings()
        if self.pool is not None:
            for name, seg in leased.items():
                if name in busy:
                    self.pool.discard(seg)
                else:
                    self.pool.release(seg)
        if self.inputs is not None:  # after ours: the last call of a map closes the map's
            self.inputs.unhold()


def arena_for(prefix: str, threshold: int | None) -> Arena:
    """The open arena of ``prefix`` in this process: the run's own in the parent (io
    threads), else this worker's arena for that run, else a new one that this worker
    keeps only if it maps something (:func:`keep_mappings`).

    A worker keeps a run's mappings from one attempt to the next (a fresh mapping of a
    large segment pays a page fault per page on each attempt) until the parent says the
    run is over (:func:`forget`)."""
    with _ARENAS_LOCK:
        arena = _ARENAS.get(prefix) or _WORKER_ARENAS.get(prefix)
    return arena if arena is not None else Arena(prefix, threshold, owner=False)


def keep_mappings(arena: Arena) -> None:
    """In a worker, after an attempt: keep ``arena`` (from :func:`arena_for`) for the
    run's next attempts if it maps segments; one that maps nothing is dropped (most
    calls carry no large buffer, and a new arena per call costs less than keeping,
    then forgetting, each one)."""
    if arena.owner or not arena._segments:
        return
    with _ARENAS_LOCK:
        _WORKER_ARENAS.setdefault(arena.prefix, arena)


def forget(prefix: str) -> None:
    """In a worker: the run of ``prefix`` is over; drop its mappings.

    ``prefix`` may also name a pool segment (``"ap-<pid>-pool-<n>"``, as the parent
    broadcasts when it unlinks one): then this worker's cached mapping of it goes.
    """
    if _is_pool_name(prefix):
        name = "/" + prefix.lstrip("/")
        with _ARENAS_LOCK:
            seg = _POOL_MAPPINGS.pop(name, None)
        if seg is not None:
            with contextlib.suppress(BufferError):  # an array of a live run still uses it
                seg.mm.close()
        return
    with _ARENAS_LOCK:
        arena = _WORKER_ARENAS.pop(prefix, None)
    if arena is not None:
        arena.release_mappings()


_WORKER_ARENAS: dict[str, Arena] = {}


_SHM_DIR = Path("/dev/shm")
_WORKER_CREATED: list[str] = []  # segments this worker created; the parent claims them


_PREFIXES = itertools.count()
_PREFIX_SPAN = 36**5


def run_prefix(run_id: str) -> str:
    """The segment-name prefix of one run or call of this process, unique among its
    open arenas: ``ap-<pid>-<3 hex digits of the run id><5 base-36 digits of a count>``.

    Unique, not derived from the run id alone: every arena registers, cleans up and
    tells the workers to forget by its prefix, so two arenas with one prefix would
    unlink and unmap each other's segments (the calls of one runner share its run
    id). The count wraps after 36**5 (60 million) arenas, by when the arena that had
    the same count has long closed; the run id's digits keep apart the leftovers of
    a dead process whose pid came back. 8 characters, so that names fit macOS's 31
    (:data:`NAME_MAX`)."""
    count = _base36(next(_PREFIXES) % _PREFIX_SPAN).rjust(5, "0")
    return f"ap-{os.getpid()}-{run_id[:3]}{count}"


def segment_name(prefix: str, n: int, worker: bool) -> str:
    """The name of a run's ``n``-th segment made by its owner (the parent), or by a
    worker (``worker``: its pid and number in base 36, to stay within
    :data:`NAME_MAX`)."""
    if worker:
        return f"/{prefix}-w{_base36(os.getpid())}-{_base36(n)}"
    return f"/{prefix}-{n}"


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, d = divmod(n, 36)
        out = digits[d] + out
        if n == 0:
            return out


def _store_mapped(fd: int, data: memoryview) -> None:
    """Copy ``data`` into the start of the segment ``fd`` through a mapping (where
    ``pwrite`` cannot write to shared memory: macOS)."""
    if data.nbytes == 0:
        return
    with mmap.mmap(fd, data.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_WRITE) as mm:
        mm[:] = data


def _map(name: str, populate: bool, write: bool = False) -> mmap.mmap:
    """Map the whole segment ``name``; ``populate`` maps every page now (MAP_POPULATE)."""
    fd = _posixshmem.shm_open(name, os.O_RDWR if write else os.O_RDONLY, mode=0o600)
    try:
        length = os.fstat(fd).st_size
        flags = mmap.MAP_SHARED | (_MAP_POPULATE if populate else 0)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
        return mmap.mmap(fd, length, flags=flags, prot=prot)
    finally:
        os.close(fd)


def _pool_mapping(name: str) -> _Segment:
    """A worker's mapping of the pool segment ``name``, made once and kept until the
    parent unlinks the segment (:func:`forget`). Populated at once: one MAP_POPULATE
    maps every page in a single call, far cheaper than a fault per 4 KiB page while
    the action reads it (docs/performance.md)."""
    with _ARENAS_LOCK:
        seg = _POOL_MAPPINGS.get(name)
    if seg is None:
        new = _Segment(name, _map(name, populate=True), cached=True)
        with _ARENAS_LOCK:
            seg = _POOL_MAPPINGS.setdefault(name, new)
        if seg is not new:  # another thread mapped it meanwhile
            new.mm.close()
    return seg


def _track(name: str) -> None:
    # multiprocessing's resource tracker unlinks what is registered if we die first
    from multiprocessing import resource_tracker

    resource_tracker.register(name, "shared_memory")


def _unlink(name: str, tracked: bool) -> None:
    with contextlib.suppress(FileNotFoundError):
        _posixshmem.shm_unlink(name)
    if tracked:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(name, "shared_memory")


# ---- reusable segments ---------------------------------------------------------------------
#
# Copying into a *fresh* tmpfs file pays for allocating and zeroing every page, several
# times the cost of a plain memcpy into pages that are already there and mapped; a
# worker's first read through a fresh mapping pays a page fault per page, through one
# it kept none (figures: docs/performance.md, "Shared-memory arrays"). So each Runner
# keeps the segments of finished runs (a SegmentPool) and workers keep their mappings
# of them (_POOL_MAPPINGS) until the parent unlinks one.

_PAGE = mmap.PAGESIZE
_MAP_POPULATE: int = getattr(mmap, "MAP_POPULATE", 0)  # Linux: map every page at once
_POOL_NAME = re.compile(r"^/?ap-(\d+)-pool-\d+$")
_POOL_COUNT = itertools.count()  # pool segment numbers, unique in this process
_POOL_MAPPINGS: dict[str, _Segment] = {}  # a worker's mappings of pool segments, by name

POOL_FREE_FRACTION_OF_BUDGET = 8
"""A pool keeps at most ``memory_budget // 8`` bytes of free segments (see
:func:`pool_free_limit`)."""

POOL_FREE_FRACTION_OF_SHM = 4
"""... and at most a quarter of the space /dev/shm had free when the pool was made."""


def _is_pool_name(name: str) -> bool:
    return "-pool-" in name and _POOL_NAME.match(name) is not None


def _pool_pid(name: str) -> int:
    m = _POOL_NAME.match(name)
    return int(m.group(1)) if m else -1


def capacity_for(size: int) -> int:
    """Bytes of a new pool segment for a buffer of ``size`` bytes.

    ``size`` rounded up to a multiple of ``max(page, 2 ** (size.bit_length() - 4))``:
    at most 1/8 of ``size`` more (or one page, for small buffers), and buffers of
    nearly the same size share a capacity, so that their segments are interchangeable.
    """
    step = max(_PAGE, 1 << max(0, size.bit_length() - 4))
    return max(step, -(-size // step) * step)


def pool_free_limit(memory_budget: int, shm_dir: Path = Path("/dev/shm")) -> int:
    """Bytes of free segments a Runner's pool keeps:
    ``min(memory_budget // 8, free bytes of /dev/shm now // 4)``."""
    try:
        st = os.statvfs(shm_dir)
        shm_free = st.f_bavail * st.f_frsize
    except OSError:
        shm_free = 0
    return max(
        0, min(memory_budget // POOL_FREE_FRACTION_OF_BUDGET, shm_free // POOL_FREE_FRACTION_OF_SHM)
    )


COPY_CHUNK = 8 << 20
"""Bytes that one copying thread gets at least: enough that the copy takes far longer
than starting the thread does (docs/performance.md)."""

MAX_COPY_THREADS = 8
"""Threads that copy one buffer at most: memory bandwidth, not cores, bounds a copy."""


class _PoolSegment:
    __slots__ = ("capacity", "mm", "name")

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name  # "/ap-<pid>-pool-<n>"
        self.capacity = capacity  # bytes
        self.mm: mmap.mmap | None = None  # this process's read-write mapping, once reused


class SegmentPool:
    """Reusable shared-memory segments of one Runner, in the parent.

    :meth:`store` copies a buffer into a free segment that fits (``size <= capacity
    <= 1.25 x size + one page``; the smallest such, the most recently freed of equal
    ones) through a read-write mapping kept faulted in, or else into a new segment of
    :func:`capacity_for` bytes (``pwrite``, then ``posix_fallocate`` of the rest, so
    that a later copy into it never meets an unallocated page and dies of SIGBUS when
    /dev/shm is full). The arena that stored it gives it back with :meth:`release`
    (free again) or :meth:`discard` (a value still points into it: unlinked).

    Segments are named ``/ap-<pid>-pool-<n>`` and registered with multiprocessing's
    resource tracker, which unlinks them if this process dies. At most ``max_free``
    bytes of free segments are kept; beyond that the oldest free ones are unlinked,
    and ``on_unlink`` is called with each unlinked name (without the leading ``/``)
    so that the workers drop their mappings (``ProcessPool.forget``).

    States: open -> closed (:meth:`close` unlinks every segment; a segment stored
    before and released after is only unmapped). Thread-safe.

    Workers cannot report that they still use a mapping: an action that keeps its
    input array past its task (a global cache) sees it change when a later run reuses
    the segment, and must keep a copy instead.

    Copies of at least ``2 x COPY_CHUNK`` bytes are cut across up to ``copy_threads``
    threads (started per copy, so none lingers): one core cannot saturate memory
    bandwidth, as Ray's object store also finds (its ``parallel_memcopy``,
    ``src/ray/util/memory.h``); docs/performance.md has the figures for one thread
    against two.

    Args:
        max_free: bytes of free segments to keep (see :func:`pool_free_limit`).
        on_unlink: called with the name of each segment unlinked while open.
        copy_threads: threads that may copy one large buffer (the runner passes its
            usable cores, at most :data:`MAX_COPY_THREADS`).
    """

    def __init__(
        self,
        max_free: int,
        on_unlink: Callable[[str], Any] | None = None,
        copy_threads: int = 1,
    ) -> None:
        self.max_free = max_free
        self.on_unlink = on_unlink
        self.copy_threads = max(1, copy_threads)
        self.closed = False
        self.free_bytes = 0  # bytes of capacity in the free list
        self.created = self.reused = self.discarded = self.trimmed = 0  # counters
        self._lock = threading.Lock()
        self._free: list[_PoolSegment] = []  # oldest first
        self._live: dict[str, _PoolSegment] = {}  # every segment not yet unlinked
        with _ARENAS_LOCK:
            _OPEN_POOLS.add(self)

    def names(self) -> set[str]:
        """The names (without ``/``) of this pool's segments in /dev/shm, free or leased."""
        with self._lock:
            return {name.lstrip("/") for name in self._live}

    def store(self, view: memoryview) -> _PoolSegment | None:
        """Copy ``view`` (contiguous) to the start of a pool segment; ``None`` if closed.

        Raises:
            OSError: /dev/shm refused a new segment (ENOSPC...).
        """
        size = view.nbytes
        data = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        with self._lock:
            if self.closed:
                return None
            seg = self._take(size)
        if seg is None:
            return self._create(data)
        try:
            if seg.mm is None:  # first reuse: map it once, every page at once
                seg.mm = _map(seg.name, populate=True, write=True)
            self._copy(seg.mm, data)  # a memcpy into pages that are there and mapped
        except BaseException:
            self.discard(seg)
            raise
        return seg

    def _threads_for(self, size: int) -> int:
        return max(1, min(self.copy_threads, size // COPY_CHUNK))

    def _copy(self, mm: mmap.mmap, data: memoryview) -> None:
        """``mm[:len(data)] = data``, cut across threads when it is large."""
        size = data.nbytes
        parts = self._threads_for(size)
        if parts == 1:
            with memoryview(mm) as mv:
                mv[:size] = data
            return
        import numpy as np  # its copy releases the GIL; a memoryview's does not

        arrays = [np.frombuffer(mm, dtype=np.uint8, count=size), np.frombuffer(data, np.uint8)]

        def copy(start: int, stop: int) -> None:
            dst, src = arrays
            np.copyto(dst[start:stop], src[start:stop])

        try:
            in_parallel(size, parts, copy, _PAGE)
        finally:
            arrays.clear()  # no export of the mapping may outlive the copy (it closes later)

    def _take(self, size: int) -> _PoolSegment | None:
        best: tuple[int, int] | None = None
        limit = size + size // 4 + _PAGE
        for i, seg in enumerate(self._free):
            if size <= seg.capacity <= limit and (best is None or seg.capacity <= best[0]):
                best = (seg.capacity, i)
        if best is None:
            return None
        seg = self._free.pop(best[1])
        self.free_bytes -= seg.capacity
        self.reused += 1
        return seg

    def _create(self, data: memoryview) -> _PoolSegment:
        size = data.nbytes
        seg = _PoolSegment(f"/ap-{os.getpid()}-pool-{next(_POOL_COUNT)}", capacity_for(size))
        fd = _posixshmem.shm_open(seg.name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        _track(seg.name)
        try:
            os.ftruncate(fd, seg.capacity)
            # pwrite, not a store through a fresh mapping: the kernel fills new pages
            # without the fault per 4 KiB that such a store pays on top of the copy
            # (docs/performance.md)

            def write(start: int, stop: int) -> None:
                while start < stop:
                    start += os.pwrite(fd, data[start:stop], start)

            if not _SYSCALL_WRITES:
                _store_mapped(fd, data)
            else:
                in_parallel(size, self._threads_for(size), write, _PAGE)
                if seg.capacity > size:
                    os.posix_fallocate(fd, size, seg.capacity - size)
        except BaseException:
            _unlink(seg.name, tracked=True)
            raise
        finally:
            os.close(fd)
        with self._lock:
            self._live[seg.name] = seg
            self.created += 1
        return seg

    def release(self, seg: _PoolSegment) -> None:
        """The arena that stored ``seg`` has closed and nothing points into it: free it.

        Then unlinks the oldest free segments while more than ``max_free`` bytes are free.
        """
        with self._lock:
            if seg.name not in self._live:  # close() unlinked it already
                drop, unlink = [seg], False
            elif self.closed:
                del self._live[seg.name]
                drop, unlink = [seg], True
            else:
                self._free.append(seg)
                self.free_bytes += seg.capacity
                drop, unlink = [], True
                while self.free_bytes > self.max_free and self._free:
                    old = self._free.pop(0)
                    self.free_bytes -= old.capacity
                    del self._live[old.name]
                    self.trimmed += 1
                    drop.append(old)
        for old in drop:
            self._drop(old, unlink)

    def discard(self, seg: _PoolSegment) -> None:
        """Unlink ``seg`` instead of freeing it (a value still points into it)."""
        with self._lock:
            unlink = self._live.pop(seg.name, None) is not None
            self.discarded += 1
        self._drop(seg, unlink)

    def _drop(self, seg: _PoolSegment, unlink: bool) -> None:
        if seg.mm is not None:
            with contextlib.suppress(BufferError):  # never exported for long; be safe
                seg.mm.close()
        if unlink:
            _unlink(seg.name, tracked=True)
            if self.on_unlink is not None and not self.closed:
                with contextlib.suppress(Exception):  # a closed worker pool: nobody to tell
                    self.on_unlink(seg.name.lstrip("/"))

    def close(self) -> None:
        """Unlink every segment (free or leased); later stores return ``None``."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            live, self._live = self._live, {}
            free, self._free = self._free, []
            self.free_bytes = 0
        with _ARENAS_LOCK:
            _OPEN_POOLS.discard(self)
        free_names = {seg.name for seg in free}
        for seg in live.values():
            if seg.name in free_names:
                self._drop(seg, unlink=True)
            else:  # leased: a copy may be using its mapping; release() unmaps it
                _unlink(seg.name, tracked=True)


_OPEN_POOLS: weakref.WeakSet[SegmentPool] = weakref.WeakSet()


def open_pool_segments() -> set[str]:
    """Names (without ``/``) of the segments of every open pool of this process."""
    with _ARENAS_LOCK:
        pools = list(_OPEN_POOLS)
    return set().union(*(p.names() for p in pools))


def segment_of(buf: Any) -> str | None:
    """The name of the shared-memory segment that ``buf`` (an array, a memoryview...)
    lies in, among this process's mappings; ``None`` if it is not in one."""
    import numpy as np

    addr = int(np.asarray(buf).__array_interface__["data"][0])
    with _ARENAS_LOCK:
        arenas = [*_ARENAS.values(), *_WORKER_ARENAS.values()]
        segs = list(_POOL_MAPPINGS.values())
    for arena in arenas:
        with arena._lock:
            segs += arena._segments.values()
    for seg in segs:
        if seg.start <= addr < seg.end:
            return seg.name
    return None


def unlink_worker_segments() -> None:
    """In a worker whose parent died: unlink the result segments nobody will claim."""
    for name in _WORKER_CREATED:
        with contextlib.suppress(OSError):
            _posixshmem.shm_unlink(name)
