"""``Runner.map``: a bounded window of calls over an input of any length, in order.

Data flow::

    input iterator ─► _Batcher.chunks (adaptive sizes) ─► Runner._submit (a window of
    calls in flight) ─► futures, in input order ─► _drain ─► _MapIterator ─► caller

Tiny calls are batched: each task runs :func:`_run_chunk` over a chunk of items in
the worker, and reports how long it took, from which :class:`_Batcher` sizes the next
chunks. A worker that dies in the middle of a chunk costs that chunk's items one by
one again only for an idempotent action (DESIGN.md, "Crashes and recovery").

Runs in the thread that iterates the map (and, for the first window, the one that
called ``map``); it shares nothing with other threads but through the runner's
``submit`` and the futures it returns.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from functools import cache, partial
from itertools import repeat
from typing import TYPE_CHECKING, Any, cast

from .action import ActionSpec, as_spec, wire_form
from .errors import WorkerCrashed
from .transfer import dumps_function

if TYPE_CHECKING:
    from concurrent.futures import Future

    from .runner import Runner

__all__ = ["MAP_MAX_CHUNK", "MAP_MIN_CHUNK_S", "MAP_TARGET_CHUNK_S", "MapState", "map_calls"]


def map_calls(
    runner: Runner,
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    timeout: float | None,
    chunksize: int | None,
    window: int | None,
    kwargs: dict[str, Any],
) -> Iterator[Any]:
    """:meth:`Runner.map <actionpool.Runner.map>` (see there)."""
    spec = as_spec(fn)
    size = runner._pools[spec.kind].size
    for opt, val in (("chunksize", chunksize), ("window", window)):
        if val is None:
            continue
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"map: {opt} must be an int >= 1, got {val!r}")
    end = None if timeout is None else time.monotonic() + timeout
    per_call = spec.timeout is not None or spec.retries > 0 or spec.validate is not None
    if chunksize is not None and chunksize > 1 and per_call:
        raise ValueError(
            f"map: action {spec.name!r} has a timeout, retries or validate, which apply"
            f" per call; chunksize={chunksize} would run {chunksize} calls as one task"
        )
    items: Iterator[Any] = zip(*iterables, strict=False)
    total = None
    if all(hasattr(it, "__len__") for it in iterables):
        total = min(len(it) for it in iterables)  # type: ignore[arg-type]
    if chunksize == 1 or (chunksize is None and (per_call or spec.kind == "io")):
        fn_bytes = dumps_function(spec.name, wire_form(spec))  # once per map call
        calls: Iterator[tuple[Future[Any], Any]] = (
            (runner._submit(spec, a, kwargs, fn_bytes), None) for a in items
        )
        state = MapState(calls, window or 2 * size, total is not None)
        return _map_results(runner, spec, kwargs, state, end, None)
    tasks = 2 * size if window is None else min(2 * size, window)
    # tasks x chunk size <= window items: a chunk never exceeds window // tasks
    cap = MAP_MAX_CHUNK if window is None else max(1, window // tasks)
    fn_bytes = dumps_function(spec.name, wire_form(spec))
    batcher = _Batcher(chunksize, size, total, cap, runner._map_speeds, fn_bytes)
    runs_chunk = ActionSpec(
        _run_chunk, name=spec.name, kind=spec.kind, threads=spec.threads, memory=spec.memory
    )
    # Each chunk carries these bytes (a copy, not a pickling), and a worker unpickles
    # the function once (cached by its bytes).
    chunk_fn = _run_chunk_bytes()
    # one iterable: chunks of plain items, not of 1-tuples (a third of the pickling)
    batcher.single = len(iterables) == 1
    seq: Sequence[Any] | None = None
    if batcher.single:
        items = iter(iterables[0])
        if type(iterables[0]) in _SLICED:
            seq = cast("Sequence[Any]", iterables[0])
    head = (
        fn_bytes,
        spec.wants_context,
        spec.name,
        batcher.single,
    )
    calls = (
        (runner._submit(runs_chunk, (*head, chunk, kwargs), {}, chunk_fn), chunk)
        for chunk in batcher.chunks(items, seq)
    )
    return _map_results(
        runner, spec, kwargs, MapState(calls, tasks, total is not None), end, batcher
    )


class MapState:
    """A map's calls in flight, in input order, and the rest of its input.

    The thread that iterates the map refills ``pending`` as results are consumed;
    :meth:`Runner.shutdown <actionpool.Runner.shutdown>` may :meth:`flush` it from
    another thread; ``lock`` orders the two (a generator cannot be stepped from two
    threads at once).
    """

    __slots__ = ("__weakref__", "calls", "lock", "pending", "sized", "window")

    def __init__(self, calls: Iterator[tuple[Future[Any], Any]], window: int, sized: bool) -> None:
        self.calls = calls
        self.window = window
        self.sized = sized  # the input's length is known: flush ends
        self.pending: deque[tuple[Future[Any], Any]] = deque()
        self.lock = threading.Lock()

    def refill(self) -> None:
        """Submit calls until ``window`` are in flight (or the input ends)."""
        with self.lock:
            pending, window = self.pending, self.window
            for call in self.calls:
                pending.append(call)
                if len(pending) >= window:
                    break

    def flush(self) -> None:
        """Submit every call left, when the input's length is known (an endless one
        would never end): the runner is shutting down and waits for them."""
        if self.sized:
            with self.lock:
                self.pending.extend(self.calls)


def _map_results(
    runner: Runner,
    spec: ActionSpec,
    kwargs: dict[str, Any],
    state: MapState,
    end: float | None,
    batcher: _Batcher | None,
) -> Iterator[Any]:
    state.refill()  # start the first window now, like Executor.map does
    runner._maps.add(state)
    return _MapIterator(_drain(runner, spec, kwargs, state, end, batcher))


def _popping(values: list[Any]) -> Iterator[Any]:
    """The items of ``values`` in order, each taken out of the list as it is yielded,
    so that nothing here keeps a result alive once the consumer has let it go
    (CPython issue 14406); the iteration stays in C."""
    values.reverse()
    return map(list.pop, repeat(values, len(values)))


def _drain(
    runner: Runner,
    spec: ActionSpec,
    kwargs: dict[str, Any],
    state: MapState,
    end: float | None,
    batcher: _Batcher | None,
) -> Generator[Iterable[Any], None, None]:
    """The map's results, as one iterable per task in input order."""
    pending = state.pending
    try:
        while pending:
            fut, chunk = pending[0]
            left = None if end is None else max(0.0, end - time.monotonic())
            try:
                value = fut.result(timeout=left)
            except WorkerCrashed as crash:
                if chunk is None or len(chunk) == 1:
                    raise
                pending.popleft()
                if batcher is not None and batcher.single:
                    chunk = [(item,) for item in chunk]
                yield _rerun_chunk(runner, spec, kwargs, chunk, crash)
                continue
            pending.popleft()
            del fut  # it holds the value: only the list below may, while it is yielded
            state.refill()  # before yielding, to keep workers busy
            if batcher is None:
                values = [value]
                del value
                yield _popping(values)
                continue
            elapsed, values, errors = value
            del value
            batcher.observe(elapsed, len(values))
            if not errors:
                yield _popping(values)
            else:  # the items before the first failed one, then its error
                first = min(errors)
                del values[first:]
                yield _popping(values)
                raise errors[first]
    finally:
        # However the iteration ends early (an action's error, the consumer's
        # break, Ctrl-C, also Jupyter's interrupt), this map's calls in flight are
        # stopped, the running ones too: their results have nobody to go to.
        runner._maps.discard(state)
        live = [f for f, _ in pending if not f.done()]
        if live:
            runner._stop_calls(live, "the map stopped")


def _rerun_chunk(
    runner: Runner,
    spec: ActionSpec,
    kwargs: dict[str, Any],
    chunk: list[tuple[Any, ...]],
    crash: WorkerCrashed,
) -> Iterator[Any]:
    """A worker died in the middle of a chunk: find the item, keep the others'.

    Re-running the chunk's items one per task is a re-run nobody asked for, so it
    happens only for an idempotent action (DESIGN.md, "Crashes and recovery").
    """
    if not spec.idempotent:
        raise WorkerCrashed(
            f"map of {spec.name!r}: a worker died running a chunk of {len(chunk)}"
            f" items, which are not re-run one by one because the action is not"
            f" idempotent ({crash})",
            crash.exitcode,
            crash.signal,
        ) from crash
    singles = [runner.submit(spec, *args, **kwargs) for args in chunk]
    try:
        for single in singles:
            yield single.result()
    finally:
        live = [f for f in singles if not f.done()]
        if live:
            runner._stop_calls(live, "the map stopped")


MAP_TARGET_CHUNK_S = 0.05
"""Seconds of work an automatic ``map`` chunk aims at at most: long enough that what a
task costs the parent is a small fraction of it, short enough to balance workers and
stream results (docs/performance.md, "map")."""

MAP_MIN_CHUNK_S = 0.003
"""Seconds of work below which an automatic ``map`` chunk grows past
``multiprocessing.Pool``'s size (up to an even share per worker of the items): about
ten times what a task costs the parent (docs/performance.md), so that tiny calls are
not dominated by their tasks."""

MAP_MAX_CHUNK = 100_000

_SPEEDS_KEPT = 256  # per-item times remembered per runner (functions' bytes -> seconds)


_SLICED = (list, tuple, range)
"""The input types whose map chunks are slices (:meth:`_Batcher.chunks`); exact types
only, since a subclass may slice in its own way."""


class _Batcher:
    """Chunk sizes for :meth:`Runner.map`: fixed, or adapted to measured item time.

    Args:
        fixed: the caller's ``chunksize``, or ``None`` to adapt.
        workers: the pool's size.
        total: the number of items, when known.
        cap: the largest chunk (the window's share).
        speeds: the runner's per-item times of earlier maps, by function bytes; this
            map starts from ``speeds[key]`` and leaves its own measure there (joblib's
            ``batch_size="auto"`` likewise keeps its batch size across calls).
        key: this map's function bytes.
    """

    def __init__(
        self,
        fixed: int | None,
        workers: int,
        total: int | None,
        cap: int,
        speeds: dict[bytes, float] | None = None,
        key: bytes = b"",
    ) -> None:
        self.fixed = fixed if fixed is None else min(fixed, cap)
        self.cap = cap
        self.workers = workers
        self.left = total
        # multiprocessing.Pool.map's chunksize, ceil(n / (4 x workers)): kept to the end
        # (a share of what is *left* would shrink chunks into a tail of tiny tasks)
        self.start = None if total is None else -(-total // (4 * workers))
        self.share = None if total is None else -(-total // workers)  # an even share
        self.speeds = speeds
        self.key = key
        self.per_item: float | None = None  # seconds, moving average
        if speeds is not None and key in speeds:
            self.per_item = speeds[key]

    def next_size(self) -> int:
        """Items for the next chunk.

        Known length ``n``, per-item time ``p`` (seconds, measured): Pool's
        ``ceil(n / (4 x workers))`` (four chunks per worker balance uneven items),
        grown to ``MAP_MIN_CHUNK_S / p`` items if that is more, but never past an even
        share ``ceil(n / workers)``; then at most ``MAP_TARGET_CHUNK_S / p``. Unknown
        length: one item until one is measured, then ``MAP_TARGET_CHUNK_S / p``.
        """
        if self.fixed is not None:
            return self.fixed
        p = self.per_item
        if self.start is not None:
            n = self.start
            if p is not None and self.share is not None:
                tiny = int(MAP_MIN_CHUNK_S / max(p, 1e-9))
                n = max(n, min(tiny, self.share))
                n = min(n, max(1, int(MAP_TARGET_CHUNK_S / max(p, 1e-9))))
        elif p is None:
            return 1  # unknown length: measure before batching, as joblib does
        else:
            n = int(MAP_TARGET_CHUNK_S / max(p, 1e-9))
        return max(1, min(n, self.cap))

    def observe(self, elapsed: float, count: int) -> None:
        """A chunk of ``count`` items took ``elapsed`` seconds in its worker."""
        if count:
            per = elapsed / count
            self.per_item = per if self.per_item is None else 0.5 * (self.per_item + per)
            if self.speeds is not None:
                self.speeds[self.key] = self.per_item
                if len(self.speeds) > _SPEEDS_KEPT:
                    # the oldest; another thread's map may be at it too
                    with contextlib.suppress(RuntimeError, KeyError, StopIteration):
                        del self.speeds[next(iter(self.speeds))]

    single = False  # chunks hold plain items (one iterable), not argument tuples

    def chunks(self, items: Iterator[Any], seq: Sequence[Any] | None = None) -> Iterator[Any]:
        """The chunks of ``items``, sized by :meth:`next_size` as they are asked for.

        ``seq``: the map's one input when it is a list, tuple or range. Its chunks are
        then slices of it, read at the same moment the iterator's would be: slicing
        copies pointers in C, where ``list(islice(...))`` steps an iterator item by
        item. A range's slice is a range, which pickles in a few bytes.
        """
        pos = 0
        while True:
            if seq is not None:
                chunk: Any = seq[pos : pos + self.next_size()]
                pos += len(chunk)
            else:
                chunk = list(itertools.islice(items, self.next_size()))
            if not chunk:
                return
            if self.left is not None:
                self.left -= len(chunk)
            yield chunk


class _MapIterator(Iterator[Any]):
    """What :meth:`Runner.map` returns: its results in order, and ``close()``.

    The results come one iterable per task (a chunk's list of values) from a generator
    (``_drain``); ``for`` and ``list()`` iterate a ``chain`` of them, which walks each
    list in C and resumes the generator once per chunk, not once per item (a map of
    tiny calls spends a visible share of its time here). ``close()`` closes the
    generator, which stops the map's calls in flight, as closing a generator-based
    iterator does.
    """

    __slots__ = ("_chain", "_tasks")

    def __init__(self, tasks: Generator[Iterable[Any], None, None]) -> None:
        self._tasks = tasks
        self._chain = itertools.chain.from_iterable(tasks)

    def __iter__(self) -> Iterator[Any]:
        return self._chain  # shares its position with next(self)

    def __next__(self) -> Any:
        return next(self._chain)

    def close(self) -> None:
        """Stop the map: its calls in flight are cancelled (running ones killed)."""
        self._tasks.close()


@cache
def _run_chunk_bytes() -> bytes:
    """:func:`_run_chunk`, pickled (by reference) once per process, not once per map."""
    return dumps_function("map", _run_chunk)


def _run_chunk(
    fn_bytes: bytes,
    wants_context: bool,
    name: str,
    single: bool,
    chunk: list[Any],
    kwargs: dict[str, Any],
) -> tuple[float, list[Any], dict[int, BaseException]]:
    """Run an action (its pickled function) over a chunk of argument tuples.

    Returns ``(seconds the chunk took, values, {index: exception})``; a failed item's
    value is ``None``. The loop is tight (no per-item ``try`` or wrapper: this is what
    a map of tiny calls spends its time on); after an error it resumes at the next
    item, so no item ever runs twice.
    """
    from ._worker import _function

    start = time.perf_counter()
    fn: Callable[..., Any] = _function(fn_bytes)
    if wants_context:  # a fresh Context per call, as a direct call of the action gets
        fn = partial(_with_context, fn, name)
    values: list[Any] = []
    errors: dict[int, BaseException] = {}
    append = values.append
    rest = chunk
    while rest:
        try:
            if single and not kwargs:
                for item in rest:
                    append(fn(item))
            elif single:
                for item in rest:
                    append(fn(item, **kwargs))
            elif kwargs:
                for args in rest:
                    append(fn(*args, **kwargs))
            else:
                for args in rest:
                    append(fn(*args))
        except Exception as exc:  # noqa: BLE001 - raised again in the parent at its item
            errors[len(values)] = exc
            append(None)
            rest = chunk[len(values) :]
        else:
            break
    return time.perf_counter() - start, values, errors


def _with_context(fn: Callable[..., Any], name: str, *args: Any, **kwargs: Any) -> Any:
    from .action import Context

    return fn(Context(state={}, node=name), *args, **kwargs)
