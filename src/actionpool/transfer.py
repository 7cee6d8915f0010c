"""Pickling across the parent/worker boundary, with errors that name the culprit.

Everything a node sends or returns goes through :func:`dumps` / :func:`loads`
(cloudpickle, protocol 5), in both pools, so an io action gets a private copy of its
arguments and state exactly as a cpu action does. When pickling fails, the helpers
here find *which* argument, state key or return value failed and raise
:class:`~actionpool.SerializationError` naming it and the node.
"""

from __future__ import annotations

import _posixshmem
import contextlib
import itertools
import mmap
import os
import pickle
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cloudpickle

from .errors import SerializationError

__all__ = [
    "Arena",
    "Packed",
    "arena_for",
    "dumps",
    "dumps_call",
    "dumps_function",
    "dumps_state",
    "loads",
]

PROTOCOL = 5


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` with cloudpickle (functions and lambdas by value when needed)."""
    data: bytes = cloudpickle.dumps(obj, protocol=PROTOCOL)
    return data


loads = pickle.loads


def _why(obj: Any, exc: BaseException) -> str:
    return f"{type(obj).__name__} cannot be pickled ({type(exc).__name__}: {exc})"


def dumps_function(node: str, fn: Any) -> bytes:
    """Pickle an action's function (by reference when importable, else by value).

    Pickle it once per run and pass the bytes to :func:`dumps_call`: a function defined
    in ``__main__`` or a notebook travels by value, and pickling its code for every
    node of a 5,000-node plan was the largest cost of dispatch.

    Raises:
        SerializationError: naming ``node``.
    """
    try:
        return dumps(fn)
    except Exception as exc:
        raise SerializationError(f"node {node!r}: the action {_why(fn, exc)}") from exc


def dumps_call(
    node: str,
    fn: Any,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    arena: Arena | None = None,
    fn_bytes: bytes | None = None,
) -> Packed:
    """Pickle an action call ``(function bytes, args, kwargs)``; large buffers go to ``arena``.

    Args:
        fn_bytes: ``dumps_function(node, fn)`` when the caller has it already.

    Raises:
        SerializationError: naming ``node`` and the action, positional argument (by
            index) or keyword argument (by name) that cannot be pickled.
    """
    if fn_bytes is None:
        fn_bytes = dumps_function(node, fn)
    try:
        if arena is None:
            return dumps((fn_bytes, args, dict(kwargs))), ()
        return arena.dumps((fn_bytes, args, dict(kwargs)))
    except Exception as exc:  # noqa: BLE001 - pickling raises many types
        first = exc
    culprits: list[tuple[str, Any]] = []
    culprits += [(f"argument {i}", a) for i, a in enumerate(args)]
    culprits += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for what, obj in culprits:
        try:
            dumps(obj)
        except Exception as exc:
            raise SerializationError(f"node {node!r}: {what} {_why(obj, exc)}") from exc
    raise SerializationError(f"node {node!r}: the call cannot be pickled ({first})") from first


def dumps_state(state: Any, arena: Arena | None = None) -> Packed:
    """Pickle a run's state once; large buffers (arrays) go to ``arena``.

    Raises:
        SerializationError: naming the state key (for a mapping) that cannot be
            pickled; the caller adds the node that needed it.
    """
    try:
        return arena.dumps(state) if arena is not None else (dumps(state), ())
    except Exception as exc:  # noqa: BLE001
        first = exc
    if isinstance(state, Mapping):
        for key, value in state.items():
            try:
                dumps(value)
            except Exception as exc:
                raise SerializationError(f"state key {key!r}: {_why(value, exc)}") from exc
    raise SerializationError(f"the state {_why(state, first)}") from first


# ---- shared memory for large buffers ---------------------------------------------------
#
#   parent: Arena(prefix).dumps(args/state)      worker: worker_arena(prefix).loads(...)
#     large buffer ──copy once──► /dev/shm/<prefix>-<n> ──mmap, read-only view──► np.ndarray
#     a buffer already inside a mapped segment travels as (name, offset, nbytes): no copy
#   worker: results' large buffers ──► /dev/shm/<prefix>-w<pid>-<n> ──► parent claims it
#
# Pickle protocol 5 hands every contiguous buffer (numpy arrays, bytearrays...) to a
# callback; buffers of at least ``threshold`` bytes go out of band into a segment and
# come back as read-only memoryviews, so numpy rebuilds arrays on the shared pages
# without copying them, and ``flags.writeable`` is False: nobody shares *mutable* memory.

DEFAULT_SHM_THRESHOLD = 1 << 20
"""Buffers of at least this many bytes (1 MiB, as joblib's memmapping default) travel
through shared memory."""

Packed = tuple[bytes, tuple[tuple[str, int, int], ...]]
"""A pickle and the (segment name, offset, size) of each of its out-of-band buffers."""

_ARENAS: dict[str, Arena] = {}  # open arenas of this process, by prefix
_ARENAS_LOCK = threading.Lock()


def _address(view: memoryview) -> int:
    import numpy as np

    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


class _Segment:
    __slots__ = ("end", "mm", "name", "start")

    def __init__(self, name: str, mm: mmap.mmap) -> None:
        self.name = name
        self.mm = mm
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
    """

    def __init__(self, prefix: str, threshold: int | None, owner: bool = True) -> None:
        self.prefix = prefix
        self.threshold = threshold
        self.owner = owner
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
        if owner:
            with _ARENAS_LOCK:
                _ARENAS[prefix] = self

    # -- out-of-band pickling ----------------------------------------------------------

    def dumps(self, obj: Any) -> Packed:
        """Pickle ``obj``; its large buffers go to shared memory (once per arena)."""
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

    def _place(self, view: memoryview, keep: Any) -> tuple[str, int, int]:
        addr, size = _address(view), view.nbytes
        with self._lock:
            hit = self._sources.get((addr, size))
            if hit is not None:
                return hit[0]
            for (src, src_size), ((name, offset, _), _keep) in self._sources.items():
                if src <= addr and addr + size <= src + src_size:  # a view of a copied buffer
                    return (name, offset + addr - src, size)
            for seg in self._segments.values():  # already shared (a node's result)
                if seg.start <= addr and addr + size <= seg.end:
                    return (seg.name, addr - seg.start, size)
            desc = self._create(view)
            # keep the source alive so that its address cannot be reused by another
            # object while this arena maps it to a segment
            self._sources[(addr, size)] = (desc, keep)
            return desc

    def _create(self, view: memoryview) -> tuple[str, int, int]:
        suffix = f"w{os.getpid()}-{next(self._count)}" if not self.owner else str(next(self._count))
        name = f"/{self.prefix}-{suffix}"
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
            # fills the pages without a page fault per 4 KiB (measured 83 vs 150 ms
            # for 200 MB), and the writer never needs the pages mapped.
            data = view.cast("B")
            done = 0
            while done < size:
                done += os.pwrite(fd, data[done:], done)
        finally:
            os.close(fd)
        return (name, 0, size)

    def _view(self, name: str, offset: int, size: int) -> memoryview:
        with self._lock:
            seg = self._segments.get(name)
            if seg is None:
                fd = _posixshmem.shm_open(name, os.O_RDONLY, mode=0o600)
                try:
                    length = os.fstat(fd).st_size
                    mm = mmap.mmap(fd, length, prot=mmap.PROT_READ)
                finally:
                    os.close(fd)
                seg = self._segments[name] = _Segment(name, mm)
                if self.owner and name not in self._created:  # a worker's: ours now
                    _track(name)
                    self._tracked.add(name)
                    self._created.append(name)
        return memoryview(seg.mm)[offset : offset + size].toreadonly()

    # -- lifecycle -------------------------------------------------------------------

    def release_mappings(self) -> None:
        """Drop this process's mappings (arrays still using one keep it alive)."""
        with self._lock:
            segments, self._segments = self._segments, {}
            self._sources.clear()
        for seg in segments.values():
            with contextlib.suppress(BufferError):  # an array still points into it
                seg.mm.close()

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
        """
        with self._lock:
            if self.closed:
                return
            self.closed = True
            names = list(self._created)
        if self.owner:
            with _ARENAS_LOCK:
                _ARENAS.pop(self.prefix, None)
            if names and self.on_close is not None:  # workers may hold mappings
                self.on_close(self.prefix)
            if self.orphans_possible:  # a scan of /dev/shm costs; only after a crash/kill
                names += [f"/{p.name}" for p in _SHM_DIR.glob(f"{self.prefix}-*")]
            for name in dict.fromkeys(names):
                _unlink(name, name in self._tracked)
        self.release_mappings()


def arena_for(prefix: str, threshold: int | None) -> Arena:
    """The open arena of ``prefix`` in this process: the run's own in the parent (io
    threads), else this worker's arena for that run.

    A worker keeps a run's mappings from one attempt to the next (mapping a 200 MB
    segment costs ~15 ms of page faults each time) until the parent says the run is
    over (:func:`forget`)."""
    with _ARENAS_LOCK:
        arena = _ARENAS.get(prefix) or _WORKER_ARENAS.get(prefix)
        if arena is None:
            arena = _WORKER_ARENAS[prefix] = Arena(prefix, threshold, owner=False)
    return arena


def forget(prefix: str) -> None:
    """In a worker: the run of ``prefix`` is over; drop its mappings."""
    with _ARENAS_LOCK:
        arena = _WORKER_ARENAS.pop(prefix, None)
    if arena is not None:
        arena.release_mappings()


_WORKER_ARENAS: dict[str, Arena] = {}


_SHM_DIR = Path("/dev/shm")
_WORKER_CREATED: list[str] = []  # segments this worker created; the parent claims them


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


def unlink_worker_segments() -> None:
    """In a worker whose parent died: unlink the result segments nobody will claim."""
    for name in _WORKER_CREATED:
        with contextlib.suppress(OSError):
            _posixshmem.shm_unlink(name)
