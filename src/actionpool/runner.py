"""The :class:`Runner`: owns the pools, the router and the scheduler.

Data flow::

    caller thread                         scheduler thread (one asyncio loop)
    -------------                         -----------------------------------
    run(plan)  ──graph check, pickle state──► PlanRun.start ──► Scheduler ──► pools
    submit(fn) ──pickle call────────────────► CallRun.add   ──┘
    map(fn, xs) = a window of submits
    ◄──── Report / Future result ─────────── transitions on results

Sync calls block on a ``concurrent.futures.Future`` of the loop; async calls await it;
so a runner works the same from scripts, threads and a notebook's running loop.
States: *open* -> *closed* (``close()``/``shutdown()``/leaving ``with``); a closed
runner refuses new work, and every worker process it started has exited.
"""

from __future__ import annotations

import _thread
import asyncio
import atexit
import contextlib
import itertools
import os
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_futures
from functools import cache, partial
from typing import Any, TypeVar, cast

import psutil

from ._threads import wait_thread_gone
from .action import ActionSpec, as_spec, wire_bytes, wire_form
from .errors import PlanError, SerializationError, WorkerCrashed
from .events import Event
from .outcome import Report
from .plan import Plan
from .pools import Pool
from .pools.process import ProcessAttempt, ProcessPool
from .pools.threads import ThreadPool
from .scheduler import CallFuture, CallRun, PlanRun, Scheduler, check_failure_policy
from .sizing import MEMORY_FLOOR_FRACTION, Sizing, compute_sizing
from .transfer import (
    DEFAULT_SHM_THRESHOLD,
    MAX_COPY_THREADS,
    Arena,
    Packed,
    SegmentPool,
    dumps_call,
    dumps_function,
    dumps_state,
    pool_free_limit,
)

__all__ = ["Runner"]

T = TypeVar("T")

_LIVE: weakref.WeakSet[Runner] = weakref.WeakSet()
"""Every open runner; closed at interpreter exit so no worker outlives its parent."""


@atexit.register
def _close_all() -> None:
    for runner in list(_LIVE):
        with contextlib.suppress(Exception):
            runner.shutdown(wait=False, cancel_futures=True)


class Runner(Executor):
    """Runs actions in parallel: CPU actions in processes, I/O actions in threads.

    A runner is a :class:`concurrent.futures.Executor` and a context manager::

        with ap.Runner() as runner:
            fut = runner.submit(simulate, 1, steps=1000)
            for y in runner.map(simulate, range(100), steps=1000): ...
            report = runner.run(plan, state={"k": 1})

    Args:
        cpu_workers: processes in the CPU pool; default from :func:`compute_sizing`
            (or ``ACTIONPOOL_CPU_WORKERS``).
        io_workers: threads in the I/O pool; default likewise (``ACTIONPOOL_IO_WORKERS``).
        backend: ``"local"`` (the only backend so far).
        timeout_grace: seconds a cpu action gets, after :class:`~actionpool.ActionTimeout`
            was raised inside it at its timeout, before its worker is killed.
        shm_threshold: buffers (NumPy arrays...) of at least this many bytes in
            arguments, state and results travel through shared memory, once per run,
            and arrive read-only; ``None`` pickles everything through the pipes.
        memory_floor: bytes of available memory (psutil) below which no node is
            dispatched until memory recovers (backpressure); default
            ``MEMORY_FLOOR_FRACTION`` of total memory; 0 turns it off. Settable later
            as ``runner.memory_floor``.
        worker_start: how CPU workers start. Every worker is forked from a *zygote*
            process that already imported actionpool's worker side (about 1 ms per
            worker instead of ~50 ms for a fresh interpreter, and so is each
            replacement after a crash). ``"fork"``: the zygote is a fork of this
            process, made now (workers inherit its imported modules and memory,
            copy-on-write, as with multiprocessing's fork start method; not its
            threads, and NumPy's global random state is reseeded in each worker);
            ``"fresh"``: the zygote is a new interpreter (workers inherit only the
            environment); ``"auto"`` (default, or ``ACTIONPOOL_WORKER_START``):
            ``"fork"`` when this process runs a single thread (a script, before it
            starts threads), else ``"fresh"`` (a notebook kernel, a second runner).

    Raises:
        ValueError: a worker count is not an int >= 1, ``timeout_grace`` is not a
            positive number, an unknown backend or ``worker_start``.
        RuntimeError: ``worker_start="fork"`` while this process runs other threads.
    """

    def __init__(
        self,
        cpu_workers: int | None = None,
        io_workers: int | None = None,
        *,
        backend: str = "local",
        timeout_grace: float = 1.0,
        shm_threshold: int | None = DEFAULT_SHM_THRESHOLD,
        memory_floor: int | None = None,
        worker_start: str | None = None,
    ) -> None:
        if backend != "local":
            raise ValueError(f"backend must be 'local', got {backend!r}")
        if (
            isinstance(timeout_grace, bool)
            or not isinstance(timeout_grace, (int, float))
            or not 0 < timeout_grace < float("inf")
        ):
            raise ValueError(
                f"timeout_grace must be a positive number of seconds, got {timeout_grace!r}"
            )
        if shm_threshold is not None and (
            isinstance(shm_threshold, bool)
            or not isinstance(shm_threshold, int)
            or shm_threshold < 0
        ):
            raise ValueError(
                f"shm_threshold must be a number of bytes >= 0 or None, got {shm_threshold!r}"
            )
        if memory_floor is not None:
            _check_memory_floor(memory_floor)  # before any process or thread starts
        self.shm_threshold = shm_threshold
        self.sizing: Sizing = compute_sizing(cpu_workers, io_workers)
        # The loop before the CPU pool forks this process (its zygote and first
        # worker, while it runs one thread): made after, each page it writes would
        # be copied first (~200 copy-on-write faults, ~0.7 ms on the way to the first
        # result here). The forks inherit its descriptors, unused.
        self._loop = asyncio.new_event_loop()
        io_pool = ThreadPool(self.sizing.io_workers)
        self._pools: dict[str, Pool] = {
            "cpu": ProcessPool(
                self.sizing.cpu_workers,
                self.sizing.blas_threads,
                worker_start,
                cores=self.sizing.usable_cores,
            ),
            "io": io_pool,
        }
        cpu = self._pools["cpu"]
        self._forget = cpu.forget if isinstance(cpu, ProcessPool) else None
        self._segments = SegmentPool(
            pool_free_limit(self.sizing.memory_budget),
            self._forget,
            min(MAX_COPY_THREADS, self.sizing.usable_cores),
        )
        # per-item seconds of earlier maps, by function bytes (see _Batcher); dict
        # operations are atomic, so maps in several threads may share it
        self._map_speeds: dict[bytes, float] = {}
        if isinstance(cpu, ProcessPool):
            cpu.attach(self._loop)  # worker results are read on the scheduler's thread
        # The scheduler thread. Not a threading.Thread: its start() waits until the new
        # thread runs, ~1.5 ms here (a tenth of a cold start, W7) while the zygote just
        # forked has the other core; nothing needs the loop running before a result
        # comes back. Like a daemon thread, it does not hold up the interpreter's exit.
        self._loop_ident: int | None = None  # set by the thread itself
        self._loop_native_id: int | None = None
        self._loop_done = threading.Event()
        _thread.start_new_thread(self._run_loop, ())
        if memory_floor is None:
            total = self.sizing.total_memory or psutil.virtual_memory().total
            memory_floor = int(total * MEMORY_FLOOR_FRACTION)
        self._sched = Scheduler(
            self._loop,
            self._pools,
            float(timeout_grace),
            self.sizing.memory_budget,
            self.sizing.blas_threads,
            memory_floor,
            self.sizing.available_memory,
        )
        self._calls = CallRun(self._sched, uuid.uuid4().hex[:12])
        self._call_ids = itertools.count()
        self._runs: set[PlanRun] = set()
        self._closed = False
        self._lock = threading.Lock()
        _LIVE.add(self)

    # ---- Executor API ----------------------------------------------------------------

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on the pool of its kind.

        The arguments are pickled now, in this thread (the action gets a private copy,
        whatever the caller does with them afterwards).

        Returns:
            A :class:`concurrent.futures.Future` of the value. Its exception is the
            action's own (type, message; remote traceback as ``__cause__``), or
            :class:`~actionpool.SerializationError` naming the argument that could not
            be pickled. ``future.cancel()`` works until the call starts; a plain call
            (no timeout, ``validate``, ``memory``, ``threads``, ``retries`` or
            Context) that finds a free slot (and, for a cpu call, an idle
            worker) is sent from this thread, so its future is running when
            ``submit`` returns; a thread then waiting in its ``result()`` reads a
            cpu call's reply from the worker itself (:class:`CallFuture`).

        Raises:
            RuntimeError: the runner is closed.
            TypeError: ``fn`` is not callable.
        """
        return self._submit(as_spec(fn), args, kwargs, None)

    def _submit(
        self,
        spec: ActionSpec,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        fn_bytes: bytes | None,
    ) -> Future[Any]:
        """:meth:`submit`, with the function already pickled when ``fn_bytes`` is given."""
        fut: Future[Any] = CallFuture()
        if self._closed:
            raise RuntimeError("cannot submit to a closed Runner")
        try:
            self._check_fits(spec, spec.name)
        except PlanError as exc:
            fut.set_exception(exc)
            return fut
        arena = self._new_arena(f"{self._calls.run_id}-{next(self._call_ids)}")
        if fn_bytes is None:
            fn_bytes = wire_bytes(spec)  # None unless it pickles by reference
        try:
            call = dumps_call(spec.name, wire_form(spec), args, kwargs, arena, fn_bytes)
        except SerializationError as exc:
            arena.close()
            fut.set_exception(exc)
            return fut
        with self._lock:
            if self._closed:
                arena.close()
                raise RuntimeError("cannot submit to a closed Runner")
            if self._calls.start_direct(spec, call, arena, fut):
                return fut
            rec = self._calls.record(spec, call, arena, fut)
            self._sched.from_thread(self._calls.add, rec, args, kwargs)
        return fut

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        window: int | None = None,
        **kwargs: Any,
    ) -> Iterator[T]:
        """``fn(*items, **kwargs)`` for each item of ``zip(*iterables)``, results in order.

        Streams: at most ``window`` items are in flight, and the input is read only as
        results are consumed, so an endless iterator runs in constant memory.

        Tiny calls are batched automatically (``chunksize=None``), from the per-item
        time measured in the workers (joblib's ``batch_size="auto"`` idea; the
        runner remembers it per function, so a later map of the same function starts
        from it). With the input's length ``n`` known, chunks hold
        ``ceil(n / (4 x workers))`` items (``multiprocessing.Pool.map``'s rule),
        grown for items so quick that a chunk would be under
        :data:`MAP_MIN_CHUNK_S` seconds of work (up to ``ceil(n / workers)``), and
        cut to :data:`MAP_TARGET_CHUNK_S` seconds of work for slow ones. With no
        length, one item until one is measured, then :data:`MAP_TARGET_CHUNK_S`
        seconds' worth.
        Actions with a ``timeout``, ``retries`` or ``validate`` keep one task per item,
        so that those apply per call.

        Args:
            fn: the action.
            *iterables: the positional arguments, zipped.
            timeout: seconds, from this call, after which waiting for a result raises
                ``TimeoutError`` (as in ``Executor.map``); ``None`` waits forever.
            chunksize: items per task; ``None`` adapts (see above).
            window: items in flight at most; default: two tasks per worker, whatever
                their chunk size.
            **kwargs: passed to every call.

        Returns:
            An iterator of results in input order. An action's exception is raised
            when its item is reached; the tasks still in flight are then cancelled,
            as they are by the iterator's ``close()`` (leaving a ``for`` loop early
            and dropping the iterator do the same).

        Raises:
            ValueError: ``chunksize`` or ``window`` is not an int >= 1, or a chunk
                size above 1 for an action with per-call options.
            SerializationError: the action itself cannot be pickled.
        """
        spec = as_spec(fn)
        size = self._pools[spec.kind].size
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
        if chunksize == 1 or (chunksize is None and (per_call or spec.kind == "io")):
            fn_bytes = dumps_function(spec.name, wire_form(spec))  # once per map call
            calls: Iterator[tuple[Future[Any], Any]] = (
                (self._submit(spec, a, kwargs, fn_bytes), None) for a in items
            )
            return self._map_results(spec, kwargs, calls, window or 2 * size, end, None)
        total = None
        if all(hasattr(it, "__len__") for it in iterables):
            total = min(len(it) for it in iterables)  # type: ignore[arg-type]
        tasks = 2 * size if window is None else min(2 * size, window)
        # tasks x chunk size <= window items: a chunk never exceeds window // tasks
        cap = MAP_MAX_CHUNK if window is None else max(1, window // tasks)
        fn_bytes = dumps_function(spec.name, wire_form(spec))
        batcher = _Batcher(chunksize, size, total, cap, self._map_speeds, fn_bytes)
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
            (self._submit(runs_chunk, (*head, chunk, kwargs), {}, chunk_fn), chunk)
            for chunk in batcher.chunks(items, seq)
        )
        return self._map_results(spec, kwargs, calls, tasks, end, batcher)

    def _map_results(
        self,
        spec: ActionSpec,
        kwargs: dict[str, Any],
        calls: Iterator[tuple[Future[Any], Any]],
        window: int,
        end: float | None,
        batcher: _Batcher | None,
    ) -> Iterator[Any]:
        pending: deque[tuple[Future[Any], Any]] = deque()
        for call in calls:  # start the first window now, like Executor.map does
            pending.append(call)
            if len(pending) >= window:
                break
        return _MapIterator(self._drain(spec, kwargs, pending, calls, window, end, batcher))

    def _drain(
        self,
        spec: ActionSpec,
        kwargs: dict[str, Any],
        pending: deque[tuple[Future[Any], Any]],
        calls: Iterator[tuple[Future[Any], Any]],
        window: int,
        end: float | None,
        batcher: _Batcher | None,
    ) -> Generator[Iterable[Any], None, None]:
        """The map's results, as one iterable per task in input order."""
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
                    yield self._rerun_chunk(spec, kwargs, chunk, crash)
                    continue
                pending.popleft()
                errors: dict[int, BaseException] = {}
                if batcher is not None:
                    elapsed, value, errors = value
                    batcher.observe(elapsed, len(value))
                for nxt in calls:  # refill before yielding, to keep workers busy
                    pending.append(nxt)
                    if len(pending) >= window:
                        break
                if batcher is None:
                    yield (value,)
                elif not errors:
                    yield value
                else:  # the items before the first failed one, then its error
                    first = min(errors)
                    yield value[:first]
                    raise errors[first]
        finally:
            # However the iteration ends early (an action's error, the consumer's
            # break, Ctrl-C, also Jupyter's interrupt), this map's calls in flight are
            # stopped, the running ones too: their results have nobody to go to.
            live = [f for f, _ in pending if not f.done()]
            if live:
                self._stop_calls(live, "the map stopped")

    def _rerun_chunk(
        self,
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
        singles = [self.submit(spec, *args, **kwargs) for args in chunk]
        try:
            for single in singles:
                yield single.result()
        finally:
            live = [f for f in singles if not f.done()]
            if live:
                self._stop_calls(live, "the map stopped")

    def _stop_calls(self, futures: list[Future[Any]], why: str) -> None:
        """Cancel the submitted calls behind ``futures``, killing running cpu ones."""
        wanted = set(futures)
        for fut in futures:
            fut.cancel()  # those that have not started: done here

        def stop() -> list[Future[Any]]:
            killed = []
            for rec in list(self._calls.live):
                if rec.user_future in wanted:
                    if isinstance(rec.handle, ProcessAttempt):
                        killed.append(rec.handle.future)
                    self._sched.cancel_node(rec, why)
            return killed + self._calls.stop_direct(why, wanted)

        if not self._loop.is_closed():
            wait_futures(self._on_loop(stop), timeout=10)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Close the runner: refuse new work, then stop the pools.

        Args:
            wait: wait for submitted calls and runs to finish and for every worker
                process to exit.
            cancel_futures: cancel the calls that have not started.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _LIVE.discard(self)
        if cancel_futures or not wait:
            self._cancel(None, "the runner was shut down")
        if wait:
            self._wait_idle()
        cpu = self._pools["cpu"]
        if isinstance(cpu, ProcessPool):  # its workers gone; its zygote reaped below
            cpu.close(cancel=not wait, reap=False)
        else:
            cpu.close(cancel=not wait)
        self._pools["io"].close(cancel=not wait)
        self._segments.close()  # unlinks the reusable shared-memory segments
        self._loop.call_soon_threadsafe(self._loop.stop)
        if isinstance(cpu, ProcessPool):  # its zygote exits while the loop's thread does
            cpu.reap()
        self._loop_done.wait()
        wait_thread_gone(self._loop_native_id)
        self._loop.close()

    @property
    def memory_floor(self) -> int:
        """Bytes of available memory below which dispatch pauses (0: never)."""
        return self._sched.memory_floor

    @memory_floor.setter
    def memory_floor(self, value: int) -> None:
        _check_memory_floor(value)
        self._sched.memory_floor = value
        self._loop.call_soon_threadsafe(self._sched.schedule_dispatch)

    def _check_fits(self, spec: ActionSpec, name: str) -> None:
        """Raise PlanError for an action that no amount of waiting could admit."""
        pool_size = self._pools[spec.kind].size
        if spec.threads > pool_size:
            raise PlanError(
                f"node {name!r}: threads={spec.threads} can never fit: the {spec.kind} pool"
                f" has {pool_size} slots"
            )
        budget = self.sizing.memory_budget
        if spec.memory is not None and spec.memory > budget:
            raise PlanError(
                f"node {name!r}: memory={spec.memory} bytes can never fit in the memory"
                f" budget of {budget} bytes ({self.sizing.reason.split('; ')[-1]})"
            )

    def cancel(self) -> None:
        """Cancel every run and submitted call in progress; the runner stays usable.

        Nodes and calls that had not started end ``CANCELLED`` at once; running cpu
        actions are stopped by killing their worker processes (this call returns once
        they are gone, at most a few seconds); running io actions end ``CANCELLED``
        at once, their ``ctx.cancelled()`` turns True and ``async def`` ones are
        cancelled. Runs in progress return reports with status ``CANCELLED``; the
        futures of cancelled calls are cancelled. Safe to call from any thread.
        """
        self._cancel(None, "runner.cancel()")

    def _cancel(self, runs: list[PlanRun] | None, why: str) -> None:
        def cancel_on_loop() -> list[Future[Any]]:
            targets: list[Any] = list(self._runs) if runs is None else list(runs)
            if runs is None:
                targets.append(self._calls)
            killed = []
            for run in targets:
                for rec in run.live_records():
                    if isinstance(rec.handle, ProcessAttempt):
                        killed.append(rec.handle.future)
                if run is self._calls:
                    killed += self._calls.stop_direct(why)
                run.cancel(why)
            return killed

        if self._loop.is_closed():
            return
        if self._on_scheduler_thread():
            cancel_on_loop()
            return
        killed = self._on_loop(cancel_on_loop)
        wait_futures(killed, timeout=10)  # the workers are gone when this returns

    def _new_arena(self, run_id: str) -> Arena:
        """The shared-memory arena of one run or call, leasing this runner's segments;
        workers keep its mappings until it closes (then told through ``on_close``)."""
        arena = Arena(f"ap-{os.getpid()}-{run_id}", self.shm_threshold, pool=self._segments)
        arena.on_close = self._forget
        return arena

    def worker_pids(self) -> list[int]:
        """The pids of the CPU pool's live worker processes (empty before first use)."""
        pool = self._pools["cpu"]
        return pool.pids() if isinstance(pool, ProcessPool) else []

    def close(self) -> None:
        """Same as ``shutdown(wait=True)``."""
        self.shutdown(wait=True)

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # Leaving the block on an error or Ctrl-C must not wait for queued work.
        self.shutdown(wait=exc_type is None, cancel_futures=exc_type is not None)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):  # best effort at interpreter exit
                self.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Runner {state} {self.sizing}>"

    # ---- plans ---------------------------------------------------------------------

    def run(
        self,
        plan: Plan,
        state: Any = None,
        *,
        failure: str = "collect",
        on_event: Callable[[Event], Any] | None = None,
        progress: bool = False,
        reducers: Mapping[str, Callable[[Any, Any], Any]] | None = None,
    ) -> Report:
        """Run every node of ``plan`` and return the :class:`~actionpool.Report`.

        Nodes start the moment their own dependencies have succeeded (no level-by-level
        barrier); among ready nodes, plan order decides.

        Args:
            plan: the :class:`~actionpool.Plan`.
            state: the run's initial state (usually a dict), pickled once; each action
                that takes a :class:`~actionpool.Context` gets its own copy. Never
                modified.
            failure: ``"collect"`` (every node gets an outcome; dependents of a node
                that did not succeed are ``SKIPPED``) or ``"fail_fast"`` (the first
                failure cancels what has not started).
            on_event: called with each :class:`~actionpool.Event`, on the scheduler
                thread.
            progress: show a progress bar (tqdm; notebook-aware).
            reducers: ``{state key: fn(current, new)}`` to combine updates of a key
                from nodes that the plan does not order.

        Returns:
            The report: an outcome per node in plan order, the merged state, a status.

        Raises:
            PlanError: the plan has an unknown ``after=`` name or a cycle, or an
                option is bad; nothing has run.
            StateConflict: two unordered nodes updated the same key without a reducer
                (the report is attached as ``.report``).
            RuntimeError: the runner is closed, or this is called from an ``on_event``
                callback (the scheduler thread).
        """
        if self._on_scheduler_thread():
            raise RuntimeError("Runner.run cannot be called from the scheduler thread (on_event)")
        run = self._start_run(plan, state, failure, on_event, progress, reducers)
        cf = asyncio.run_coroutine_threadsafe(self._await_run(run), self._loop)
        try:
            return cf.result()
        except KeyboardInterrupt as exc:
            # Ctrl-C (also Jupyter's interrupt): stop this run's actions, keep its report.
            self._cancel([run], "KeyboardInterrupt")
            with contextlib.suppress(Exception):
                exc.report = cf.result(timeout=10)  # type: ignore[attr-defined]
            raise

    async def arun(
        self,
        plan: Plan,
        state: Any = None,
        *,
        failure: str = "collect",
        on_event: Callable[[Event], Any] | None = None,
        progress: bool = False,
        reducers: Mapping[str, Callable[[Any, Any], Any]] | None = None,
    ) -> Report:
        """The same as :meth:`run`, for ``async`` code and notebooks.

        ``report = await runner.arun(plan)``; the run goes on on the runner's own
        scheduler thread, so a notebook's running loop is never blocked.
        """
        run = self._start_run(plan, state, failure, on_event, progress, reducers)
        cf = asyncio.run_coroutine_threadsafe(self._await_run(run), self._loop)
        return await asyncio.wrap_future(cf)

    def _start_run(
        self,
        plan: Plan,
        state: Any,
        failure: str,
        on_event: Callable[[Event], Any] | None,
        progress: bool,
        reducers: Mapping[str, Callable[[Any, Any], Any]] | None,
    ) -> PlanRun:
        if not isinstance(plan, Plan):
            raise PlanError(f"run() takes a Plan, got {type(plan).__name__}")
        check_failure_policy(failure)
        if on_event is not None and not callable(on_event):
            raise PlanError(f"on_event must be callable, got {on_event!r}")
        if reducers is not None:
            if not isinstance(reducers, Mapping):
                raise PlanError(
                    f"reducers must be a mapping of state key to function, got {reducers!r}"
                )
            for key, fn in reducers.items():
                if not callable(fn):
                    raise PlanError(f"reducer for state key {key!r} must be callable, got {fn!r}")
        graph = plan.graph()
        for node in graph.nodes:
            if node.join is None:
                self._check_fits(node.action, node.name)
        run_id = uuid.uuid4().hex[:12]
        arena = self._new_arena(run_id)
        state_bytes: Packed | None = None
        state_error: SerializationError | None = None
        if any(n.action.wants_context or n.action.validate for n in graph.nodes):
            try:
                state_bytes = dumps_state({} if state is None else state, arena)
            except SerializationError as exc:
                state_error = exc
        on_event = _with_progress(on_event, len(graph.nodes)) if progress else on_event
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot run a plan on a closed Runner")
            run = PlanRun(
                self._sched,
                graph,
                run_id,
                arena,
                state,
                state_bytes,
                state_error,
                failure,
                on_event,
                reducers,
            )
            self._runs.add(run)
        return run

    async def _await_run(self, run: PlanRun) -> Report:
        run.start()
        try:
            return await asyncio.shield(run.done)
        except asyncio.CancelledError:  # the awaiting task (arun) was cancelled
            run.cancel("the task awaiting the run was cancelled")
            raise
        finally:
            self._runs.discard(run)
            close = getattr(run.on_event, "close", None)
            if close is not None:
                close()

    # ---- helpers -------------------------------------------------------------------

    def _run_loop(self) -> None:
        """The scheduler thread: run the loop until :meth:`shutdown` stops it."""
        self._loop_ident = threading.get_ident()
        self._loop_native_id = threading.get_native_id()
        try:
            self._loop.run_forever()
        finally:
            self._loop_done.set()

    def _on_scheduler_thread(self) -> bool:
        return threading.get_ident() == self._loop_ident

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the scheduler thread and wait for it."""

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()

    def _wait_idle(self) -> None:
        """Block until every submitted call and every run has ended."""
        if not self._runs and self._calls.handed == self._calls.ended:
            return  # the runner is closed: nothing can start; no hop to the loop needed

        async def idle() -> None:
            while True:
                waits: list[asyncio.Future[Any]] = [r.done for r in self._runs]
                waits += [
                    asyncio.wrap_future(r.user_future)
                    for r in self._calls.live
                    if r.user_future is not None
                ]
                # a direct call is over with its future; after a cancel, which ends the
                # future at once, when its attempt's future says the worker is gone
                waits += [
                    asyncio.wrap_future(h.future if e.future.done() else e.future)
                    for h, e in list(self._calls.direct.items())
                ]
                if not waits:
                    return
                await asyncio.wait(waits)
                await asyncio.sleep(0)  # let finished runs leave self._runs

        asyncio.run_coroutine_threadsafe(idle(), self._loop).result()


def _check_memory_floor(value: Any) -> None:
    """Raise ValueError unless ``value`` is an int number of bytes >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"memory_floor must be a number of bytes >= 0, got {value!r}")


MAP_TARGET_CHUNK_S = 0.05
"""Seconds of work an automatic ``map`` chunk aims at at most: long enough that the
~0.3 ms a task costs is under 1%, short enough to balance workers and stream results."""

MAP_MIN_CHUNK_S = 0.003
"""Seconds of work below which an automatic ``map`` chunk grows past
``multiprocessing.Pool``'s size (up to an even share per worker of the items): about
ten times what a task costs the parent (W2 in ``docs/performance.md``, ~0.2-0.3 ms on
a 2-core machine), so that tiny calls are not dominated by their tasks."""

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
        then slices of it, read at the same moment the iterator's would be: a slice of
        10,000 list items took 16 µs here, ``list(islice(...))`` 82 µs, two of them
        per W1 map. A range's slice is a range, which pickles in a few bytes.
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
    list in C and resumes the generator once per chunk, not once per item (0.42 vs
    0.13 ms for 20,000 items here, about a tenth of a W1 map). ``close()`` closes the
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
    """:func:`_run_chunk`, pickled (by reference) once per process: 20-60 µs a map."""
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


class _Progress:
    """An ``on_event`` wrapper that drives a tqdm bar (notebook-aware)."""

    def __init__(self, inner: Callable[[Event], Any] | None, total: int) -> None:
        from tqdm.auto import tqdm

        self.inner = inner
        self.bar = tqdm(total=total, unit="node", desc="actionpool")

    def __call__(self, event: Event) -> None:
        if event.kind == "finished":
            self.bar.update(1)
        if self.inner is not None:
            self.inner(event)

    def close(self) -> None:
        self.bar.close()


def _with_progress(inner: Callable[[Event], Any] | None, total: int) -> Callable[[Event], Any]:
    try:
        return _Progress(inner, total)
    except ImportError as exc:
        raise PlanError("progress=True needs tqdm: pip install 'actionpool[progress]'") from exc
