"""``Runner.map`` and ``Runner.amap``: a bounded window of calls over an input of any
length, results in input order or as they finish.

Data flow::

    input iterator ─► _Batcher.chunks (adaptive sizes) ─► Runner._submit (a window of
    calls in flight) ─► futures ─► _drain ─► _MapIterator (map) or _AsyncMapIterator
    (amap) ─► caller

Tiny calls are batched: each task runs :func:`_run_chunk` over a chunk of items in
the worker, and reports how long it took, from which :class:`_Batcher` sizes the next
chunks. A worker that dies in the middle of a chunk costs that chunk's items one by
one again only for an idempotent action (docs/concepts.md, "Crashes").

:func:`_drain` is one generator for both: for ``map`` it waits on the futures itself;
for ``amap`` it never blocks, and yields a :class:`_Wait` instead, which the async
iterator awaits on the caller's event loop before stepping it again.

Runs in the thread that iterates the map (and, for the first window, the one that
called ``map``); it shares nothing with other threads but through the runner's
``submit`` and the futures it returns, and the done-callbacks of budgeted chunks
(:func:`_send_rest`, on whichever thread ends their future), which take the map's
``MapState.lock``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import itertools
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache, partial
from itertools import repeat
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .action import ActionSpec, as_spec, wire_form
from .errors import SerializationError, WorkerCrashed
from .transfer import dumps, dumps_function

if TYPE_CHECKING:
    from concurrent.futures import Future

    from .progress import Bar
    from .resources import Resources
    from .runner import Runner
    from .shm import Arena

__all__ = [
    "MAP_ITEM_WIRE_S",
    "MAP_MAX_CHUNK",
    "MAP_MIN_CHUNK_S",
    "MAP_TARGET_CHUNK_S",
    "MAP_TASK_COST_S",
    "MapOptions",
    "MapState",
    "map_calls",
]


@dataclass(frozen=True)
class MapOptions:
    """The options of one ``map`` or ``amap`` call (see :meth:`Runner.map
    <actionpool.Runner.map>`), which never reach the action."""

    timeout: float | None = None
    chunksize: int | None = None
    window: int | None = None
    ordered: bool = True
    progress: bool = False
    return_exceptions: bool = False

    def check(self, spec: ActionSpec, fn: Any, kwargs: dict[str, Any], where: str) -> None:
        """Raise on a bad option, or on one that is also a parameter of the action.

        Raises:
            ValueError: ``chunksize`` or ``window`` is not an int >= 1, ``timeout`` not
                a number of seconds >= 0, a flag not a bool, or a chunk size above 1
                for an action with per-call options.
            TypeError: an option given to ``map`` is also a parameter of the action
                that ``functools.partial`` has not bound: it would be ambiguous which
                one it is for.
        """
        for opt in ("chunksize", "window"):
            val = getattr(self, opt)
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ValueError(f"{where}: {opt} must be an int >= 1, got {val!r}")
        t = self.timeout
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0):
            raise ValueError(f"{where}: timeout must be a number of seconds >= 0, got {t!r}")
        for opt in ("ordered", "progress", "return_exceptions"):
            if not isinstance(getattr(self, opt), bool):
                raise ValueError(
                    f"{where}: {opt} must be True or False, got {getattr(self, opt)!r}"
                )
        per_call = spec.timeout is not None or spec.retries > 0 or spec.validate is not None
        if self.chunksize is not None and self.chunksize > 1 and per_call:
            raise ValueError(
                f"{where}: action {spec.name!r} has a timeout, retries or validate, which"
                f" apply per call; chunksize={self.chunksize} would run {self.chunksize}"
                " calls as one task"
            )
        given = [f for f in _OPTION_DEFAULTS if getattr(self, f) != _OPTION_DEFAULTS[f]]
        if given:
            clash = [f for f in given if f in _free_parameters(fn)]
            if clash:
                name = clash[0]
                raise TypeError(
                    f"{where}: {name!r} is an option of {where} and also a parameter of the"
                    f" action {spec.name!r}; {where}'s options never reach the action. To"
                    f" pass the action its own {name!r}, bind it first:"
                    f" {where}(functools.partial(f, {name}=...), xs, {name}=...)"
                )


_OPTION_DEFAULTS = {
    "timeout": None,
    "chunksize": None,
    "window": None,
    "ordered": True,
    "progress": False,
    "return_exceptions": False,
}


def _free_parameters(fn: Any) -> frozenset[str]:
    """The names the action ``fn`` takes as keyword arguments that a
    ``functools.partial`` around it has not bound (none when it takes ``**kwargs``
    only, or has no signature)."""
    bound: set[str] = set()
    while isinstance(fn, partial):
        bound.update(fn.keywords)
        fn = fn.func
    if isinstance(fn, ActionSpec):
        fn = fn.fn
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return frozenset()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params if p.kind in named) - bound


def map_calls(
    runner: Runner,
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    opts: MapOptions,
    kwargs: dict[str, Any],
    waits: bool = False,
) -> Iterator[Any] | AsyncIterator[Any]:
    """:meth:`Runner.map <actionpool.Runner.map>` (``waits=False``: an iterator) and
    :meth:`Runner.amap <actionpool.Runner.amap>` (``waits=True``: an async iterator)."""
    where = "amap" if waits else "map"
    spec = as_spec(fn)
    opts.check(spec, fn, kwargs, where)
    pool = runner._pools[spec.kind]
    size = pool.size
    # what runs at once: the pool's size, or a cluster's threads (a Dask pool's size is
    # the attempts it keeps in flight, most of them waiting)
    workers: int = getattr(pool, "threads", size)
    end = None if opts.timeout is None else time.monotonic() + opts.timeout
    per_call = spec.timeout is not None or spec.retries > 0 or spec.validate is not None
    chunksize, window = opts.chunksize, opts.window
    items: Iterator[Any] = zip(*iterables, strict=False)
    total = None
    if all(hasattr(it, "__len__") for it in iterables):
        total = min(len(it) for it in iterables)  # type: ignore[arg-type]
    bar = None
    if opts.progress:
        from .progress import Bar

        bar = Bar(total, "items", f"{where} {spec.name}")
    # the keyword arguments every item shares: their large buffers go to shared memory
    # (or to the cluster) once for the whole map, as of this call
    inputs = runner._map_inputs(kwargs)
    if chunksize == 1 or (chunksize is None and (per_call or spec.kind == "io")):
        fn_bytes = dumps_function(spec.name, wire_form(spec))  # once per map call
        calls: Iterator[_Call] = (
            (
                _name_item(
                    runner._submit(spec, a, kwargs, fn_bytes, inputs=inputs), spec.name, [a], i
                ),
                None,
                None,
                i,
            )
            for i, a in enumerate(items)
        )
        state = MapState(calls, window or 2 * size, total is not None, inputs)
        return _map_results(runner, spec, kwargs, state, end, None, opts, bar, waits)
    tasks = 2 * size if window is None else min(2 * size, window)
    # tasks x chunk size <= window items: a chunk never exceeds window // tasks
    cap = MAP_MAX_CHUNK if window is None else max(1, window // tasks)
    fn_bytes = dumps_function(spec.name, wire_form(spec))
    batcher = _Batcher(chunksize, workers, total, cap, runner._map_speeds, fn_bytes)
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
    state = MapState(iter(()), tasks, total is not None, inputs)
    # the items of a chunk that take a Context share the worker's resources
    resources = runner._resource_payload if spec.wants_context else None

    def send(chunk: Any, budget: float | None, offset: int, rest: bool = False) -> _Call:
        """Submit one chunk, whose first item is the map's item ``offset``; a chunk
        with a time ``budget`` may come back with only its first items run, and
        :func:`_send_rest` then sends the others (``rest``: pickled once already)."""
        fut = runner._submit(
            runs_chunk,
            (*head, chunk, kwargs, budget, resources),
            {},
            chunk_fn,
            closing_ok=rest,
            inputs=inputs,
        )
        if not rest:
            _name_item(fut, spec.name, chunk, offset, batcher.single)
        hold = None
        if budget is not None:
            hold = _Rest()
            state.holds.append(hold)
            fut.add_done_callback(partial(_send_rest, state, batcher, send, chunk, offset, hold))
        return fut, chunk, hold, offset

    def sent() -> Iterator[_Call]:
        offset = 0
        for chunk, budget in batcher.chunks(items, seq):
            yield send(chunk, budget, offset)
            offset += len(chunk)

    state.calls = sent()
    return _map_results(runner, spec, kwargs, state, end, batcher, opts, bar, waits)


class _Rest:
    """What became of the items a budgeted chunk did not run (:func:`_send_rest`).

    ``ready`` is done once the chunk's future is done and its rest, if any, was sent:
    ``rest`` then holds those calls, in input order, or ``error`` why they could not
    be sent; ``rest`` stays None when the map was stopped first. A future, not an
    event, so that ``amap`` can await it.
    """

    __slots__ = ("error", "ready", "rest")

    def __init__(self) -> None:
        self.ready: Future[None] = concurrent.futures.Future()
        self.rest: list[_Call] | None = None
        self.error: BaseException | None = None


def _name_item(
    fut: Future[Any], name: str, calls: Sequence[Any], first: int, single: bool = False
) -> Future[Any]:
    """``fut``, its SerializationError (if it failed so at once) made to name the map
    item that cannot be pickled: its index in the map (``first`` is ``calls[0]``'s), and
    which of its arguments; a chunk is one pickle, whose error could only say "argument
    4 list" (the chunk itself). ``calls``: argument tuples, or plain items (``single``)."""
    if not fut.done() or not isinstance(fut.exception(), SerializationError):
        return fut
    exc = fut.exception()
    for i, call in enumerate(calls):
        args = (call,) if single else call
        for j, arg in enumerate(args):
            try:
                dumps(arg)
            except Exception as why:  # noqa: BLE001 - pickling raises many types
                which = f", argument {j}" if len(args) > 1 else ""
                assert exc is not None
                exc.args = (
                    f"node {name!r}: map item {first + i}{which}: {type(arg).__name__}"
                    f" cannot be pickled ({type(why).__name__}: {why})",
                )
                return fut
    return fut


# A call of a map in flight: its future; its chunk of items (None for a single call,
# whose future's value is the action's); for a budgeted chunk, what became of the
# items it did not run; and the map's index of its (first) item.
_Call = tuple["Future[Any]", Any, "_Rest | None", int]


def _send_rest(
    state: MapState,
    batcher: _Batcher,
    send: Callable[[Any, float | None, int, bool], _Call],
    chunk: Any,
    offset: int,
    hold: _Rest,
    fut: Future[Any],
) -> None:
    """Done-callback of a budgeted chunk: send the items it did not run.

    It runs in whichever thread ends the chunk's future (the scheduler's loop, or
    the thread that waits for it), at once, so the rest runs whether or not anyone
    iterates the map (``shutdown(wait=True)`` waits for it: the rest is submitted
    before the chunk's call counts as ended); the thread that iterates the map puts
    those calls after the chunk (:func:`_drain`).
    """
    try:
        if fut.cancelled() or fut.exception() is not None:
            return
        elapsed, values, _errors = fut.result()
        done = len(values)
        if done >= len(chunk):
            return
        batcher.observe(elapsed, done)
        with state.lock:
            if state.stopped:
                return
            rest = []
            at = offset + done
            for piece in batcher.cut(chunk[done:]):
                rest.append(send(piece, None, at, True))
                at += len(piece)
            hold.rest = rest
    except BaseException as exc:  # noqa: BLE001 - a done-callback's error would be lost
        hold.error = exc
    finally:
        hold.ready.set_result(None)


class MapState:
    """A map's calls in flight, in input order, and the rest of its input.

    The thread that iterates the map refills ``pending`` as results are consumed;
    :meth:`Runner.shutdown <actionpool.Runner.shutdown>` may :meth:`flush` it from
    another thread; ``lock`` orders the two (a generator cannot be stepped from two
    threads at once).
    """

    __slots__ = (
        "__weakref__",
        "calls",
        "holds",
        "inputs",
        "lock",
        "pending",
        "sized",
        "stopped",
        "window",
    )

    def __init__(
        self, calls: Iterator[_Call], window: int, sized: bool, inputs: Arena | None = None
    ) -> None:
        self.calls = calls
        self.inputs = inputs  # the map's arena (Runner._map_inputs), closed when it ends
        self.window = window
        self.sized = sized  # the input's length is known: flush ends
        self.pending: deque[_Call] = deque()
        # Reentrant: a chunk whose future is already done when it is submitted runs
        # its done-callback (_send_rest, which takes the lock) inside refill.
        self.lock = threading.RLock()
        self.stopped = False  # the map is over: no rest of a chunk is sent any more
        self.holds: list[_Rest] = []  # one per budgeted chunk (the first ones only)

    def sending(self) -> list[Future[None]]:
        """The budgeted chunks whose rest may still have to be sent: a chunk's call
        ends before its done-callback sends the rest, so :meth:`Runner.shutdown
        <actionpool.Runner.shutdown>` waits for these, then for the calls again."""
        return [h.ready for h in self.holds if not h.ready.done()]

    def rests(self) -> list[Future[Any]]:
        """The calls sent for the rests of budgeted chunks (stopped with the map)."""
        return [call[0] for h in self.holds for call in h.rest or ()]

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
    opts: MapOptions,
    bar: Bar | None,
    waits: bool,
) -> Iterator[Any] | AsyncIterator[Any]:
    try:
        state.refill()  # start the first window now, like Executor.map does
    except BaseException:
        if bar is not None:
            bar.close()
        if state.inputs is not None:
            state.inputs.close_when_idle()
        raise
    runner._maps.add(state)
    tasks = _drain(runner, spec, kwargs, state, end, batcher, opts, bar, waits)
    if state.inputs is not None:
        # a map dropped before its first step never runs _drain's ``finally``
        weakref.finalize(tasks, state.inputs.close_when_idle)
    return _AsyncMapIterator(tasks) if waits else _MapIterator(tasks)  # type: ignore[arg-type]


_NUMBERS = frozenset({int, float, bool, type(None)})


def _handing(values: list[Any]) -> Iterator[Any]:
    """A chunk's values in order, for the consumer: :func:`_popping`, unless the chunk
    holds numbers (its first and last values are an int, float, bool or None), which
    are iterated in place: a number kept until the rest of its chunk is read costs
    no memory worth freeing, and taking each out of the list costs a map of tiny
    calls a visible share of its time. A chunk that mixes numbers with large objects
    keeps those until its last value is read."""
    if values and type(values[0]) in _NUMBERS and type(values[-1]) in _NUMBERS:
        return iter(values)
    return _popping(values)


def _popping(values: list[Any]) -> Iterator[Any]:
    """The items of ``values`` in order, each taken out of the list as it is yielded,
    so that nothing here keeps a result alive once the consumer has let it go
    (CPython issue 14406); the iteration stays in C."""
    values.reverse()
    return map(list.pop, repeat(values, len(values)))


_E = TypeVar("_E", bound=BaseException)


class _Wait:
    """What :func:`_drain` yields, for ``amap``, instead of blocking: wait until one of
    ``futures`` is done, or ``timeout`` seconds (``None``: no limit) have passed."""

    __slots__ = ("futures", "timeout")

    def __init__(self, futures: list[Future[Any]], timeout: float | None) -> None:
        self.futures = futures
        self.timeout = timeout


def _left(end: float | None) -> float | None:
    return None if end is None else max(0.0, end - time.monotonic())


def _take(
    pending: deque[_Call], ordered: bool, end: float | None, name: str, waits: bool
) -> Generator[_Wait, None, _Call]:
    """The next call whose result to hand out: the first in input order, or (not
    ``ordered``) any that is done, waiting for one. For ``map`` in order, the caller
    waits on the first future itself (with ``Future.result``'s timeout, the fastest
    wait); otherwise this waits (``waits``: yields a :class:`_Wait` to the async
    iterator, which awaits it). Raises TimeoutError once ``end`` has passed."""
    while True:
        if ordered:
            call = pending[0]
            if not waits or call[0].done():
                return call
            futures = [call[0]]
        else:
            for call in pending:
                if call[0].done():
                    return call
            futures = [c[0] for c in pending]
        left = _left(end)
        if left == 0.0:
            raise TimeoutError(f"map of {name!r}: timed out")
        if waits:
            yield _Wait(futures, left)
        else:
            concurrent.futures.wait(futures, left, concurrent.futures.FIRST_COMPLETED)


def _note(exc: _E, name: str, first: int, count: int = 1) -> _E:
    """``exc``, with a note naming the map item(s) it is the error of."""
    where = f"item {first}" if count == 1 else f"items {first} to {first + count - 1}"
    note = f"in the map of {name!r}, {where}"
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)
    return exc


def _drain(
    runner: Runner,
    spec: ActionSpec,
    kwargs: dict[str, Any],
    state: MapState,
    end: float | None,
    batcher: _Batcher | None,
    opts: MapOptions,
    bar: Bar | None,
    waits: bool,
) -> Generator[Iterable[Any] | _Wait, None, None]:
    """The map's results, as one iterable per task (and, with ``waits``, the
    :class:`_Wait` of each wait in between)."""
    pending = state.pending
    ordered, keep = opts.ordered, opts.return_exceptions
    try:
        while pending:
            call = yield from _take(pending, ordered, end, spec.name, waits)
            fut, chunk, hold, first = call
            count = 1 if chunk is None else len(chunk)
            try:
                value = fut.result(timeout=_left(end))
            except WorkerCrashed as crash:
                pending.remove(call)
                single = batcher is not None and batcher.single
                again = _after_crash(
                    runner, spec, kwargs, chunk, first, single, crash, state.inputs
                )
                if isinstance(again, list):
                    _put_back(pending, again, ordered)
                    continue
                if not keep:
                    raise again from None
                yield _failed(bar, again, count)
                continue
            except Exception as exc:
                if not fut.done():  # the map's own timeout, not the action's error
                    raise TimeoutError(f"map of {spec.name!r}: timed out") from None
                _note(exc, spec.name, first, count)
                if not keep:
                    raise
                pending.remove(call)
                yield _failed(bar, exc, count)
                continue
            pending.remove(call)
            del fut, call  # they hold the value: only the list below may, while it is yielded
            if chunk is None:  # a single call: its value is the action's
                state.refill()  # before yielding, to keep workers busy
                values = [value]
                del value
                if bar is not None:
                    bar.finished(1)
                yield _popping(values)
                continue
            assert batcher is not None
            elapsed, values, errors = value
            del value
            if hold is not None and len(values) < len(chunk):
                # A budgeted chunk ran out of time: _send_rest sent the rest (and
                # measured it), as calls that come next, before any later chunk.
                rest = yield from _rest_of(hold, bool(errors), end, spec.name, waits)
                _put_back(pending, rest, ordered)
            else:
                batcher.observe(elapsed, len(values))
            state.refill()  # before yielding, to keep workers busy
            if errors and not keep:  # the items before the first failed one, then its error
                at = min(errors)
                del values[at:]
                if bar is not None:
                    bar.finished(len(values))
                yield _handing(values)
                raise _note(errors[at], spec.name, first + at)
            for at, error in errors.items():
                values[at] = _note(error, spec.name, first + at)
            if bar is not None:
                bar.finished(len(values), len(errors))
            yield _handing(values)
    except GeneratorExit:  # the consumer stopped early: nothing failed
        raise
    except BaseException:
        if bar is not None:
            bar.turn_red()
        raise
    finally:
        # However the iteration ends early (an action's error, the consumer's
        # break, Ctrl-C, also Jupyter's interrupt), this map's calls in flight are
        # stopped, the running ones too: their results have nobody to go to.
        if bar is not None:
            bar.close()
        with state.lock:
            state.stopped = True
        runner._maps.discard(state)
        live = [c[0] for c in pending if not c[0].done()]
        live += [f for f in state.rests() if not f.done()]
        if live:
            runner._stop_calls(live, "the map stopped")
        if state.inputs is not None:  # closes once the calls stopped above have ended
            state.inputs.close_when_idle()


def _rest_of(
    hold: _Rest, errors: bool, end: float | None, name: str, waits: bool
) -> Generator[_Wait, None, list[_Call]]:
    """The calls that :func:`_send_rest` made for the items a budgeted chunk did not
    run, once it has made them: its done-callback may still be at it in another
    thread when the chunk's result is read here (``waits``: yields the wait)."""
    if not hold.ready.done():
        if waits:
            yield _Wait([hold.ready], _left(end))
        with contextlib.suppress(concurrent.futures.TimeoutError):
            hold.ready.result(_left(end))
        if not hold.ready.done():
            raise TimeoutError(f"map of {name!r}: timed out")
    if hold.error is not None:
        raise hold.error
    if hold.rest is None and not errors:
        raise RuntimeError(
            f"map of {name!r}: the rest of a chunk was not sent (the map was stopped)"
        )
    return hold.rest or []


def _after_crash(
    runner: Runner,
    spec: ActionSpec,
    kwargs: dict[str, Any],
    chunk: Any,
    first: int,
    single: bool,
    crash: WorkerCrashed,
    inputs: Arena | None,
) -> list[_Call] | WorkerCrashed:
    """A worker died running the call of map items ``first``... (``chunk``: its items,
    or None for a single call). For a chunk of an idempotent action: its items, each
    sent again as a call of its own, to find the one that kills its worker and keep the
    others' results. Else the error that those items end with (a re-run nobody asked
    for happens only for an idempotent action: docs/concepts.md, "Crashes")."""
    count = 1 if chunk is None else len(chunk)
    if count == 1:
        return _note(crash, spec.name, first)
    if spec.idempotent:
        return [
            (
                runner._submit(spec, (a,) if single else a, kwargs, None, inputs=inputs),
                None,
                None,
                i,
            )
            for i, a in enumerate(chunk, first)
        ]
    error = WorkerCrashed(
        f"map of {spec.name!r}: a worker died running a chunk of {count} items, which"
        f" are not re-run one by one because the action is not idempotent ({crash})",
        crash.exitcode,
        crash.signal,
    )
    return _note(error, spec.name, first, count)


def _put_back(pending: deque[_Call], calls: Sequence[_Call], ordered: bool) -> None:
    """Put ``calls`` (that stand for items of a call just taken) in ``pending``: first,
    in order, for an ordered map; else anywhere."""
    if ordered:
        pending.extendleft(reversed(calls))
    else:
        pending.extend(calls)


def _failed(bar: Bar | None, exc: BaseException, count: int) -> list[BaseException]:
    """``count`` items' results, all ``exc`` (``return_exceptions``), counted failed."""
    if bar is not None:
        bar.finished(count, count)
    return [exc] * count


MAP_TARGET_CHUNK_S = 0.05
"""Seconds of work an automatic ``map`` chunk aims at at most: long enough that what a
task costs the parent is a small fraction of it, short enough to balance workers and
stream results (docs/performance.md, "map"). Also the budget of a chunk sized before
any item was measured, after which its worker hands the rest back."""

MAP_MIN_CHUNK_S = 0.003
"""Seconds of work below which a measured ``map`` chunk grows past
``multiprocessing.Pool``'s size (within :meth:`_Batcher._pipelined`): about ten
times what a task costs the parent (``MAP_TASK_COST_S``), so that tiny calls are not
dominated by their tasks."""

MAP_TASK_COST_S = 0.0003
"""Seconds a ``map`` task costs the parent beyond its items (docs/performance.md,
"map"); sizes chunks with ``MAP_ITEM_WIRE_S`` (:meth:`_Batcher._pipelined`)."""

MAP_ITEM_WIRE_S = 5e-8
"""Seconds the parent spends on a small item of a ``map`` beyond its call: pickling
its argument and unpickling its result (docs/performance.md, "map")."""


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
        self.total = total
        self.start = None if total is None else -(-total // (4 * workers))
        self.share = None if total is None else -(-total // workers)  # an even share
        self.speeds = speeds
        self.key = key
        self.per_item: float | None = None  # seconds, moving average
        if speeds is not None and key in speeds:
            self.per_item = speeds[key]

    def next_size(self) -> int:
        """Items for the next chunk.

        Known length ``n``: at most :meth:`_pipelined` items, so that the parent's
        pickling of the first chunks and unpickling of the last ones stays short.
        Nothing measured yet: that many, sent with a time budget (:meth:`budget`),
        so that tiny items need few tasks and slow ones come back after
        ``MAP_TARGET_CHUNK_S`` to be cut finer; but one item per task where
        ``multiprocessing.Pool``'s size ``ceil(n / (4 x workers))`` is 1 (at most
        four items per worker: little to save, and each result comes as soon as
        its item is done). Per-item time ``p`` measured (seconds): Pool's size,
        grown to ``MAP_MIN_CHUNK_S / p`` items if that is more (tiny items), and
        within :meth:`_pipelined`; then at most ``MAP_TARGET_CHUNK_S / p``. Unknown
        length: one item until one is measured, then ``MAP_TARGET_CHUNK_S`` of
        work, at most ``cap // workers`` items.
        """
        if self.fixed is not None:
            return self.fixed
        p = self.per_item
        if self.start is not None and self.share is not None:
            n = self._pipelined() if self._probing() else self.start
            if p is not None:
                n = max(n, int(MAP_MIN_CHUNK_S / max(p, 1e-9)))
                n = min(n, self._pipelined(), int(MAP_TARGET_CHUNK_S / max(p, 1e-9)))
        elif p is None:
            return 1  # unknown length: measure before batching, as joblib does
        else:
            # at most a worker's share of the largest chunk: an input that ends
            # within one chunk (of unknown length, it may) still uses every worker
            n = min(int(MAP_TARGET_CHUNK_S / max(p, 1e-9)), max(1, self.cap // self.workers))
        return max(1, min(n, self.cap))

    def _pipelined(self) -> int:
        """The chunk size, in items, that keeps the workers busiest for a map of
        ``total`` items on ``workers`` workers, whatever the calls cost.

        The parent pickles a chunk whole before its worker starts on it, and
        unpickles a result whole before the caller sees its values, so the first
        chunks and the last results cost ``n x MAP_ITEM_WIRE_S`` each on the
        critical path (``n`` items a chunk), and each of the ``total / n`` tasks
        costs ``MAP_TASK_COST_S`` (``task``). Their sum, ``total x task / (workers x
        n) + 2 x n x wire``, is least at ``n = sqrt(total x task / (2 x workers x
        wire))``: an even share per worker up to tens of thousands of items, then
        more chunks, growing as the square root of the map. The chunk count is
        rounded down to a multiple of the workers (so that they end together; at
        the margin a task's cost is certain and the gain is not). The model and its
        fit: docs/performance.md, "map".
        """
        total, workers = self.total or 1, self.workers
        best = math.sqrt(total * MAP_TASK_COST_S / (2 * workers * MAP_ITEM_WIRE_S))
        rounds = max(1, int(total / (workers * best)))  # chunks per worker
        return -(-total // (rounds * workers))

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

    def _probing(self) -> bool:
        """Whether the next chunk is an even share sized before any item was measured
        (known length, automatic size, Pool's size above 1): see :meth:`next_size`."""
        start = self.start
        return self.fixed is None and self.per_item is None and start is not None and start > 1

    def budget(self) -> float | None:
        """Seconds the next chunk may run before its worker hands the rest back, or
        None (run it whole): ``MAP_TARGET_CHUNK_S`` for a chunk sized before any item
        was measured (:meth:`next_size`)."""
        return MAP_TARGET_CHUNK_S if self._probing() else None

    def cut(self, items: Sequence[Any]) -> Iterator[Sequence[Any]]:
        """``items`` (the rest of a chunk) as slices sized by :meth:`next_size`."""
        pos = 0
        while pos < len(items):
            size = self.next_size()
            yield items[pos : pos + size]
            pos += size

    single = False  # chunks hold plain items (one iterable), not argument tuples

    def chunks(
        self, items: Iterator[Any], seq: Sequence[Any] | None = None
    ) -> Iterator[tuple[Any, float | None]]:
        """The chunks of ``items``, sized by :meth:`next_size` as they are asked for,
        each with its :meth:`budget`.

        ``seq``: the map's one input when it is a list, tuple or range. Its chunks are
        then slices of it, read at the same moment the iterator's would be: slicing
        copies pointers in C, where ``list(islice(...))`` steps an iterator item by
        item. A range's slice is a range, which pickles in a few bytes.
        """
        pos = 0
        while True:
            budget = self.budget()
            if seq is not None:
                chunk: Any = seq[pos : pos + self.next_size()]
                pos += len(chunk)
            else:
                chunk = list(itertools.islice(items, self.next_size()))
            if not chunk:
                return
            if self.left is not None:
                self.left -= len(chunk)
            yield chunk, budget


class _MapIterator(Iterator[Any]):
    """What :meth:`Runner.map` returns: its results, and ``close()``.

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


class _AsyncMapIterator(AsyncIterator[Any]):
    """What :meth:`Runner.amap` returns: its results for ``async for``, and ``aclose()``.

    It steps the same generator as :class:`_MapIterator`, which never blocks here: it
    yields a :class:`_Wait` where ``map`` would wait, and this awaits it on the
    caller's event loop. However the iteration ends early (``aclose()``, the awaiting
    task cancelled, or the iterator dropped), the map's calls in flight are stopped.
    """

    __slots__ = ("_tasks", "_values")

    def __init__(self, tasks: Generator[Iterable[Any] | _Wait, None, None]) -> None:
        self._tasks = tasks
        self._values: Iterator[Any] = iter(())

    def __aiter__(self) -> _AsyncMapIterator:
        return self

    async def __anext__(self) -> Any:
        for value in self._values:
            return value
        try:
            while True:
                try:
                    step = next(self._tasks)
                except StopIteration:
                    raise StopAsyncIteration from None
                if isinstance(step, _Wait):
                    await _await_any(step)
                    continue
                self._values = iter(step)
                for value in self._values:
                    return value
        except BaseException:
            self._tasks.close()  # cancelled while awaiting: stop the map's calls
            raise

    async def aclose(self) -> None:
        """Stop the map: its calls in flight are cancelled (running ones killed)."""
        self._tasks.close()


async def _await_any(step: _Wait) -> None:
    """Wait on this event loop until one of ``step.futures`` is done, or its timeout.

    Not through ``asyncio.wrap_future``: the copies of the futures it makes would be
    left with the errors of calls this map stops, which asyncio then logs as never
    retrieved. A cancelled wait leaves the futures running: the map stops them.
    """
    loop = asyncio.get_running_loop()
    woken = loop.create_future()

    def wake(_: Future[Any]) -> None:  # on whichever thread ends the future
        # the loop may be gone: a call that ends after the map is over wakes nobody
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_set, woken)

    for fut in step.futures:
        fut.add_done_callback(wake)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(woken, step.timeout)


def _set(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


@cache
def _run_chunk_bytes() -> bytes:
    """:func:`_run_chunk`, pickled (by reference) once per process, not once per map."""
    return dumps_function("map", _run_chunk)


def _run_chunk(
    fn_bytes: bytes,
    wants_context: bool,
    name: str,
    single: bool,
    chunk: Sequence[Any],
    kwargs: dict[str, Any],
    budget: float | None = None,
    resources: bytes | None = None,
) -> tuple[float, list[Any], dict[int, BaseException]]:
    """Run an action (its pickled function) over a chunk of items or argument tuples.

    Returns ``(seconds the chunk took, values, {index: exception})``; a failed item's
    value is ``None``. With a ``budget`` (seconds), the items run in runs of 1, 2, 4,
    ... and the chunk stops after the first run that ends past the budget: ``values``
    then covers only the first items, and the parent sends the others again
    (:func:`_send_rest`). After an error it resumes at the next item, so no item ever
    runs twice.

    ``resources``: the runner's resource factories (``Task.resources``): the items
    that take a Context share this worker's resources, as separate tasks would.
    """
    from ._worker import _function

    start = time.perf_counter()
    fn: Callable[..., Any] = _function(fn_bytes)
    if wants_context:  # a fresh Context per call, as a direct call of the action gets
        from .resources import view

        fn = partial(_with_context, fn, name, view(resources, name))
    values: list[Any] = []
    errors: dict[int, BaseException] = {}
    if budget is None:
        _run_items(fn, single, kwargs, chunk, values, errors)
    else:
        end = start + budget
        pos, step = 0, 1
        while pos < len(chunk):
            _run_items(fn, single, kwargs, chunk[pos : pos + step], values, errors)
            pos += step
            if time.perf_counter() >= end:
                break
            step *= 2
    return time.perf_counter() - start, values, errors


def _preload(fn_bytes: bytes, *_: Any) -> None:
    """Unpickle a chunk's action (imports and all) before its attempt's clock starts
    (:func:`actionpool._worker._prepare`); :func:`_run_chunk` finds it cached."""
    from ._worker import _function

    _function(fn_bytes)


_run_chunk._actionpool_preload = _preload  # type: ignore[attr-defined]


def _run_items(
    fn: Callable[..., Any],
    single: bool,
    kwargs: dict[str, Any],
    items: Sequence[Any],
    values: list[Any],
    errors: dict[int, BaseException],
) -> None:
    """Append ``fn``'s value for each of ``items`` to ``values`` (``None`` and an entry
    in ``errors``, by index in ``values``, for one that raised). The loop runs in C
    (``list.extend`` over ``map``/``starmap``, no per-item ``try`` or wrapper): this is
    what a map of tiny calls spends its time on. ``extend`` keeps the values it
    appended before a raise, so the failed item's index is ``len(values)``."""
    if kwargs:
        fn = partial(fn, **kwargs)
    each = map if single else itertools.starmap
    rest = items
    while rest:
        first = len(values)
        try:
            values.extend(each(fn, rest))
        except Exception as exc:  # noqa: BLE001 - raised again in the parent at its item
            errors[len(values)] = exc
            values.append(None)
            rest = rest[len(values) - first :]
        else:
            break


def _with_context(
    fn: Callable[..., Any], name: str, resources: Resources, *args: Any, **kwargs: Any
) -> Any:
    from .action import Context

    return fn(Context(state={}, node=name, resources=resources), *args, **kwargs)
