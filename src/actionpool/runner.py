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

Concurrency contract. Caller threads (any number) run ``submit``/``map``/``run``/
``cancel``/``shutdown``; the scheduler thread runs the loop (every ``PlanRun``/
``CallRun`` method but the submitting ones, and ``on_event``). ``_closed`` changes
only under ``_lock``, which also orders submitted calls (:mod:`actionpool.calls`);
``_runs`` is added to by callers under ``_lock`` and discarded from on the loop (set
operations are atomic); ``_map_speeds`` is shared by maps in any thread (dict
operations are atomic). Lock order: ``_lock``, then a pool's lock, then the locks of
:mod:`actionpool.calls`. Nothing waits for the loop while holding ``_lock``.
"""

from __future__ import annotations

import _thread
import asyncio
import atexit
import contextlib
import itertools
import os
import threading
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING, Any, TypeVar, cast

import psutil

from ._threads import wait_thread_gone
from .action import ActionSpec, Context, as_spec, parse_memory, wire_bytes, wire_form
from .backends import BACKENDS, build
from .calls import CallFuture, CallRun
from .errors import PlanError, SerializationError
from .events import Event
from .maps import (
    MAP_MAX_CHUNK,
    MAP_MIN_CHUNK_S,
    MAP_TARGET_CHUNK_S,
    MAP_TASK_COST_S,
    MapOptions,
    MapState,
    _Batcher,
    map_calls,
)
from .outcome import Report
from .output import write_here
from .plan import Plan
from .planrun import PlanRun, check_failure_policy, check_max_parallel
from .pools import Pool
from .progress import EventBar
from .records import NodeRecord, NodeState
from .resources import ResourceRegistry, pack, register, unregister, view
from .scheduler import Scheduler
from .shm import (
    DEFAULT_SHM_THRESHOLD,
    MAX_COPY_THREADS,
    Arena,
    SegmentPool,
    pool_free_limit,
    run_prefix,
)
from .sizing import MEMORY_FLOOR_FRACTION, Sizing
from .transfer import Packed, _plain, dumps, dumps_call, dumps_state, loads

__all__ = [
    "MAP_MAX_CHUNK",
    "MAP_MIN_CHUNK_S",
    "MAP_TARGET_CHUNK_S",
    "MAP_TASK_COST_S",
    "Runner",
    "_Batcher",
]

if TYPE_CHECKING:
    from .journal import Journal, Resume

T = TypeVar("T")

_LIVE: weakref.WeakSet[Runner] = weakref.WeakSet()
"""Every open runner; closed at interpreter exit so no worker outlives its parent."""


@atexit.register
def _close_all() -> None:
    # As concurrent.futures does at exit: what was submitted runs to its end.
    for runner in list(_LIVE):
        with contextlib.suppress(Exception):
            runner.shutdown(wait=True)


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
        backend: ``"local"`` (this machine's processes and threads) or ``"dask"``: cpu
            actions run on a Dask cluster (docs/scaling-out.md), each inside a Dask
            worker on that worker's own process pool, so timeouts, crashes and
            retries behave as locally; io actions stay on this machine's threads.
        timeout_grace: seconds a cpu action gets, after :class:`~actionpool.ActionTimeout`
            was raised inside it at its timeout, before its worker is killed.
        shm_threshold: buffers (NumPy arrays...) of at least this many bytes in
            arguments, state and results travel through shared memory, once per run,
            and arrive read-only; ``None`` pickles everything through the pipes. On
            a Dask cluster: such buffers are scattered once per run, and values of
            at least this many pickled bytes stay on the cluster between its nodes
            (docs/scaling-out.md).
        memory_floor: bytes of available memory (psutil) below which no node is
            dispatched until memory recovers (backpressure); default
            ``MEMORY_FLOOR_FRACTION`` of total memory; 0 turns it off. Settable later
            as ``runner.memory_floor``.
        worker_start: how CPU workers start. Every worker is forked from a *zygote*
            process that already imported actionpool's worker side, far faster than
            starting a fresh interpreter for each (docs/performance.md), and so is
            each replacement after a crash. ``"fork"``: the zygote is a fork of this
            process, made now (workers inherit its imported modules and memory,
            copy-on-write, as with multiprocessing's fork start method; not its
            threads, and NumPy's global random state is reseeded in each worker);
            ``"fresh"``: the zygote is a new interpreter (workers inherit only the
            environment); ``"auto"`` (default, or ``ACTIONPOOL_WORKER_START``):
            ``"fork"`` when this process runs a single thread (a script, before it
            starts threads), else ``"fresh"`` (a notebook kernel, a second runner).
            On the portable process path (macOS, or ``ACTIONPOOL_PORTABLE=1``; see
            :mod:`actionpool.platforms`) there is no zygote: every worker is a fresh
            interpreter started by loky, and ``"fork"`` is refused.
        address: ``backend="dask"``: the scheduler's address (``"tcp://host:8786"``).
            With neither ``address`` nor ``client``, the runner starts a
            ``distributed.LocalCluster`` on loopback, ``cpu_workers`` processes (default:
            this machine's sizing) of one thread each, and closes it with itself.
        client: ``backend="dask"``: an existing ``distributed.Client`` to use (it stays
            open when the runner closes).
        security: ``backend="dask"``: a ``distributed.Security`` (TLS certificates),
            passed to the client (and to the ``LocalCluster`` the runner starts).
        io_on_cluster: ``backend="dask"``: run io actions on the cluster too, instead
            of on this machine's threads.
        resources: ``{name: factory}``: objects that actions share on purpose (an
            HTTP session, a connection pool, a loaded model, a lock), which an action
            reads as ``ctx.resources[name]``. Each factory is a callable taking no
            arguments, called on a resource's first use: once per cpu worker
            process, once per runner for io actions (shared by the io threads, so
            the resource must be thread-safe). A resource is never pickled, copied
            or merged into the state; it is closed (its ``close()``, else its
            ``__exit__``) when its worker exits or, for io, when the runner closes.
            A factory is pickled now, once (cpu workers each call their own copy):
            see ``docs/resources.md``.
        max_tasks_per_worker: replace a cpu worker process after it ran this many
            attempts (None: never), as ``multiprocessing.Pool(maxtasksperchild=)``
            does: for actions that leak memory or other resources.
        max_worker_memory: replace a cpu worker process after an attempt when its
            resident set size (RSS) is above this, in bytes or a string such as
            ``"2GiB"``; measured (psutil) when the attempt's result arrives. Both
            act between attempts, never in the middle of one (a hard limit is the
            job of ``timeout`` and of the OOM rules); the worker closes its resources
            and exits, a fresh one takes its place, and each replacement is a
            ``"recycled"`` event and an entry of ``Report.recycled``. Local backend
            only.
        capture: ``True`` (default): what cpu actions print to ``sys.stdout`` and
            ``sys.stderr`` in their worker processes, and the ``logging`` records
            they make at this process's root level or above, are written here, by
            this process: text to its current ``sys.stdout`` / ``sys.stderr`` (the
            notebook cell that runs, a redirected stream), each line prefixed with
            ``[node] ``; records to the handlers of their logger here, the message
            prefixed likewise and the node in ``record.actionpool_node``. In order
            per node, before the node's result; on the Dask backend too. The output
            of ``submit`` and ``map`` calls, which are not nodes, is not tagged, as
            an ``Executor``'s workers' is not.
            ``False``: the workers write to the file descriptors they inherited, as
            plain processes do. io actions run in this process and print here
            either way, untagged.

    Raises:
        ValueError: a worker count is not an int >= 1, ``timeout_grace`` is not a
            positive number, an unknown backend or ``worker_start``; a Dask option
            with ``backend="local"``; ``cpu_workers`` with a cluster of the user's.
        ImportError: ``backend="dask"`` without dask.distributed installed.
        OSError: ``backend="dask"``: the scheduler at ``address`` could not be reached
            within Dask's connect timeout (``distributed.comm.timeouts.connect``).
        RuntimeError: ``worker_start="fork"`` while this process runs other threads, or
            on the portable process path.
        ValueError: ``max_tasks_per_worker`` is not an int >= 1, ``max_worker_memory``
            is not a positive size, or either is given with ``backend="dask"``;
            ``capture`` is not a bool.
        TypeError: ``resources`` is not a mapping, or one of its names is not a str,
            or one of its factories is not a callable taking no arguments (an
            empty name is a ValueError).
        SerializationError: a resource's factory cannot be pickled (naming it).
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
        address: str | None = None,
        client: Any = None,
        security: Any = None,
        io_on_cluster: bool = False,
        resources: Mapping[str, Callable[[], Any]] | None = None,
        max_tasks_per_worker: int | None = None,
        max_worker_memory: int | str | None = None,
        capture: bool = True,
    ) -> None:
        # checked and pickled before any process or thread starts
        self._resource_payload = pack(resources)
        if not isinstance(capture, bool):
            raise ValueError(f"capture must be True or False, got {capture!r}")
        if max_tasks_per_worker is not None and (
            isinstance(max_tasks_per_worker, bool)
            or not isinstance(max_tasks_per_worker, int)
            or max_tasks_per_worker < 1
        ):
            raise ValueError(
                f"max_tasks_per_worker must be an int >= 1 or None, got {max_tasks_per_worker!r}"
            )
        worker_memory = None
        if max_worker_memory is not None:
            try:
                worker_memory = parse_memory(max_worker_memory)
            except ValueError as exc:
                raise ValueError(f"max_worker_memory: {exc}") from None
            if worker_memory <= 0:
                raise ValueError(f"max_worker_memory must be positive, got {max_worker_memory!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
        # The loop before the CPU pool forks this process (its zygote and first
        # worker, while it runs one thread): made after, each page it writes would be
        # copied first, on the way to the first result. The forks inherit its
        # descriptors, unused.
        self._loop = asyncio.new_event_loop()
        try:
            made = build(
                backend,
                cpu_workers,
                io_workers,
                worker_start,
                address=address,
                client=client,
                security=security,
                io_on_cluster=io_on_cluster,
                max_tasks_per_worker=max_tasks_per_worker,
                max_worker_memory=worker_memory,
            )
        except BaseException:
            self._loop.close()
            raise
        self._backend = made
        self.backend = backend
        # no shared memory reaches a cluster's machines: large buffers and values
        # stay on the cluster instead (made.arena)
        self.shm_threshold = shm_threshold if made.shared_memory else None
        self._out_of_band = shm_threshold
        self.sizing: Sizing = made.sizing
        self._pools: dict[str, Pool] = made.pools
        self._segments = SegmentPool(
            pool_free_limit(self.sizing.memory_budget),
            self._forget,
            min(MAX_COPY_THREADS, self.sizing.usable_cores),
        )
        # per-item seconds of earlier maps, by function bytes (see _Batcher); dict
        # operations are atomic, so maps in several threads may share it
        self._map_speeds: dict[bytes, float] = {}
        for pool in self._pools.values():
            pool.attach(self._loop)  # e.g. worker results read on the scheduler's thread
        # The scheduler thread. Not a threading.Thread: its start() waits until the new
        # thread runs, while the zygote just forked has the other core, on a cold
        # start's critical path; nothing needs the loop running before a result comes
        # back. Like a daemon thread, it does not hold up the interpreter's exit.
        self._loop_ident: int | None = None  # set by the thread itself
        self._loop_native_id: int | None = None
        self._loop_done = threading.Event()
        _thread.start_new_thread(self._run_loop, ())
        if memory_floor is None and backend == "dask":
            memory_floor = 0  # this machine's memory is not where cpu actions run
        elif memory_floor is None:
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
        self._pools_closing = False  # set under _lock once shutdown has waited for calls
        self._closer: threading.Thread | None = None  # shutdown(wait=False)'s thread
        self._maps: weakref.WeakSet[MapState] = weakref.WeakSet()  # maps in progress
        self._lock = threading.Lock()
        # Made only now, after the pools forked this process: no worker inherits the
        # registry of this runner's io threads (resources.registry_for guards anyway).
        self._resources: ResourceRegistry | None = None
        if self._resource_payload is not None:
            assert resources is not None
            self._resources = register(self._resource_payload, resources)
            self._sched.resources = self._resource_payload
        self._sched.capture = capture
        if capture:
            for pool in self._pools.values():
                set_output = getattr(pool, "set_output", None)
                if set_output is not None:
                    set_output(write_here)
        _LIVE.add(self)

    # ---- Executor API ----------------------------------------------------------------

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on the pool of its kind.

        The arguments are pickled now, in this thread (the action gets a private copy,
        whatever the caller does with them afterwards).

        Returns:
            Future: a :class:`concurrent.futures.Future` of the value. Its exception is the
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
        closing_ok: bool = False,
        inputs: Arena | None = None,
    ) -> Future[Any]:
        """:meth:`submit`, with the function already pickled when ``fn_bytes`` is given.

        ``closing_ok``: also while :meth:`shutdown` waits for the calls in flight (the
        rest of a map's chunk, which belongs to a call already made; see
        :mod:`actionpool.maps`); refused once the pools are closing. ``inputs``: the
        arena of the map this call is part of (:meth:`_map_inputs`), whose buffers
        the call uses instead of copying them again.
        """
        fut: Future[Any] = CallFuture()
        if self._refuses(closing_ok):
            raise RuntimeError("cannot submit to a closed Runner")
        try:
            self._check_fits(spec, spec.name)
        except PlanError as exc:
            fut.set_exception(exc)
            return fut
        arena = self._new_arena(f"{self._calls.run_id}-{next(self._call_ids)}")
        if inputs is not None:
            arena.link(inputs)
        if fn_bytes is None:
            fn_bytes = wire_bytes(spec)  # None unless it pickles by reference
        try:
            call = dumps_call(spec.name, wire_form(spec), args, kwargs, arena, fn_bytes)
        except SerializationError as exc:
            arena.close()
            fut.set_exception(exc)
            return fut
        with self._lock:
            if self._refuses(closing_ok):
                arena.close()
                raise RuntimeError("cannot submit to a closed Runner")
            if self._calls.start_direct(spec, call, arena, fut):
                return fut
            rec = self._calls.record(spec, call, arena, fut)
            self._sched.from_thread(self._calls.add, rec, args, kwargs)
        return fut

    def _refuses(self, closing_ok: bool) -> bool:
        """Whether a call submitted now is refused (see :meth:`_submit`)."""
        return self._closed and (not closing_ok or self._pools_closing)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        window: int | None = None,
        ordered: bool = True,
        progress: bool = False,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> Iterator[T]:
        """``fn(*items, **kwargs)`` for each item of ``zip(*iterables)``: the results,
        in input order or as they finish.

        Streams: at most ``window`` items are in flight, and the input is read only as
        results are consumed, so an endless iterator runs in constant memory.

        The options below are keyword-only and are never passed to ``fn``; every other
        keyword argument is. An option that is also a parameter of ``fn`` is refused
        (``TypeError``) rather than guessed: bind the action's own with
        ``functools.partial(fn, timeout=...)``, which works for declared actions too.

        Tiny calls are batched automatically (``chunksize=None``), from the per-item
        time measured in the workers (joblib's ``batch_size="auto"`` idea; the
        runner remembers it per function, so a later map of the same function starts
        from it). With the input's length ``n`` known and nothing measured yet, each
        worker gets an even share, ``ceil(n / workers)`` items, which it runs until
        :data:`MAP_TARGET_CHUNK_S` seconds have passed, handing the rest back to be
        cut by the measure (one item per task when that share is at most four
        items). Once measured, chunks hold ``ceil(n / (4 x workers))`` items
        (``multiprocessing.Pool.map``'s rule), grown for items so quick that a
        chunk would be under :data:`MAP_MIN_CHUNK_S` seconds of work (up to
        ``ceil(n / workers)``), and cut to :data:`MAP_TARGET_CHUNK_S` seconds of
        work for slow ones. A long map of quick items is cut finer than an even
        share, in either case: into about ``sqrt(n)`` chunks, so that the parent's
        pickling of the first chunks and unpickling of the last results do not
        hold the workers back (:data:`MAP_TASK_COST_S`). With no length, one item
        until one is measured, then :data:`MAP_TARGET_CHUNK_S` seconds' worth.
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
            ordered: ``True``: results in input order. ``False``: as they finish (a
                chunk's items stay together, in order), like
                ``multiprocessing.Pool.imap_unordered``; return the item from ``fn``
                if you need to know which result is whose.
            progress: show a ``tqdm.auto`` bar of the items finished (a widget in
                Jupyter); it counts failed items apart and turns red at the first.
                Needs tqdm (``pip install 'actionpool[progress]'``).
            return_exceptions: ``False``: an action's exception is raised when its
                item is reached. ``True``: it takes the item's place among the
                results instead, and the map goes on (like ``asyncio.gather``'s
                ``return_exceptions``).
            **kwargs: passed to every call. Their large buffers (at least
                ``shm_threshold`` bytes) are copied to shared memory, or scattered to
                a cluster, once for the whole map, as they are when ``map`` is
                called, not once per task: a large array that every item reads
                belongs here.

        Returns:
            Iterator: the results. An exception raised (or returned) for an item has
            a note naming the item's index. When an exception is raised, the tasks
            still in flight are cancelled, as they are by the iterator's ``close()``
            (leaving a ``for`` loop early and dropping the iterator do the same).

        Raises:
            ValueError: ``chunksize`` or ``window`` is not an int >= 1, ``timeout`` is
                negative, a flag is not a bool, or a chunk size above 1 is asked for
                an action with per-call options.
            TypeError: an option is also a parameter of ``fn`` (see above).
            ImportError: ``progress=True`` without tqdm (``name="tqdm"``).
            SerializationError: the action itself cannot be pickled.
        """
        opts = MapOptions(timeout, chunksize, window, ordered, progress, return_exceptions)
        return cast("Iterator[T]", map_calls(self, fn, iterables, opts, kwargs))

    def amap(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        window: int | None = None,
        ordered: bool = True,
        progress: bool = False,
        return_exceptions: bool = False,
        **kwargs: Any,
    ) -> AsyncIterator[T]:
        """:meth:`map` for asyncio code: ``async for y in runner.amap(f, xs)``.

        The same streaming, window, batching, options and errors as :meth:`map`; the
        waits happen on the caller's event loop, never blocking it. The first window
        of calls is submitted (and pickled) here, in the calling thread. Cancelling
        the task that iterates, leaving ``async for`` early and calling ``aclose()``
        stop the calls in flight (the running ones killed); for a prompt stop after a
        ``break``, iterate inside ``contextlib.aclosing(runner.amap(...))``.

        Returns:
            AsyncIterator: the results (see :meth:`map`), with ``aclose()``.

        Raises:
            ValueError, TypeError, ImportError, SerializationError: as :meth:`map`.
        """
        opts = MapOptions(timeout, chunksize, window, ordered, progress, return_exceptions)
        return cast("AsyncIterator[T]", map_calls(self, fn, iterables, opts, kwargs, waits=True))

    def _stop_calls(self, futures: list[Future[Any]], why: str) -> None:
        """Cancel the submitted calls behind ``futures``, killing running cpu ones."""
        wanted = set(futures)
        for fut in futures:
            fut.cancel()  # those that have not started: done here

        def stop() -> list[Future[Any]]:
            killed = []
            for rec in list(self._calls.live):
                if rec.user_future in wanted:
                    killed += self._killed_by_cancel(rec)
                    self._sched.cancel_node(rec, why)
            return killed + self._calls.stop_direct(why, wanted)

        if not self._loop.is_closed():
            wait_futures(self._on_loop(stop), timeout=10)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Close the runner, as ``concurrent.futures.Executor.shutdown`` does: refuse
        new work; the calls and runs already submitted run to their end (use
        :meth:`cancel` to stop running work), then every worker process exits.

        A ``map`` that was not consumed to its end has only a window of its items in
        flight: with ``wait=True`` the rest of a map over an input of known length is
        submitted first, so that every item runs, as with ``Executor.map`` (which
        submits every item at once); a map over an input of unknown length (a
        generator) keeps its window only.

        Args:
            wait: block until every submitted call and run has ended and every worker
                process has exited. False returns at once and leaves that to a thread
                of the runner's, which the interpreter waits for at exit (as it does
                for ``ProcessPoolExecutor``'s).
            cancel_futures: cancel the submitted calls that have not started (their
                futures end cancelled); calls that run go on.
        """
        if wait:
            self._flush_maps()
        with self._lock:
            first = not self._closed
            self._closed = True
        if not first:  # a second call waits for the first one's end, if asked to
            closer = self._closer
            if wait and closer is not None and closer is not threading.current_thread():
                closer.join()
            return
        _LIVE.discard(self)
        if cancel_futures:
            self._cancel_queued("the runner was shut down")
        if wait:
            self._close_now()
            return
        # Not a daemon: the interpreter joins it at exit, so what was submitted runs.
        self._closer = threading.Thread(target=self._close_now, name="actionpool-shutdown")
        self._closer.start()

    def _close_now(self) -> None:
        """The end of :meth:`shutdown`: wait for what was submitted, then stop the pools
        (every worker process gone), the segments and the loop's thread."""
        while True:
            self._wait_idle()
            # a map's budgeted chunk that ended early sends the rest of its items from
            # its done-callback, after its call counted as ended: wait, then wait again
            sending = [ev for state in list(self._maps) for ev in state.sending()]
            if not sending:
                break
            wait_futures(sending)
        with self._lock:
            self._pools_closing = True
        for pool in self._pools.values():  # their workers gone; helpers reaped below
            pool.close(reap=False)
        if self._resource_payload is not None:  # the io threads are gone (but abandoned ones)
            unregister(self._resource_payload)
            if self._resources is not None:
                self._resources.close()
        self._segments.close()  # unlinks the reusable shared-memory segments
        self._loop.call_soon_threadsafe(self._loop.stop)
        for pool in self._pools.values():  # a zygote exits while the loop's thread does
            pool.reap()
        self._backend.close_link()  # the cluster and client it started, if any
        self._loop_done.wait()
        wait_thread_gone(self._loop_native_id)
        self._loop.close()

    def _cancel_queued(self, why: str) -> None:
        """Cancel the submitted calls that have not started (``cancel_futures``): on
        the loop, after every call handed to it so far, so none slips through."""

        def cancel_on_loop() -> None:
            for rec in list(self._calls.live):
                if rec.state is not NodeState.RUNNING:
                    self._sched.cancel_node(rec, why)

        if not self._loop.is_closed():
            done: Future[None] = Future()

            def run() -> None:
                try:
                    cancel_on_loop()
                finally:
                    done.set_result(None)

            self._sched.from_thread(run)
            done.result()

    def _flush_maps(self) -> None:
        """Submit the rest of every unconsumed map of known length (:meth:`shutdown`)."""
        for state in list(self._maps):
            state.flush()

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
        most = self.sizing.largest_worker_threads
        if "threads" in self.sizing.cluster_resources and spec.threads > most:
            raise PlanError(
                f"node {name!r}: threads={spec.threads} can never fit: an attempt runs on"
                f" one Dask worker, and the largest 'threads' resource declared is {most}"
            )
        largest = self.sizing.largest_worker_memory
        if spec.memory is not None and 0 < largest < spec.memory:
            raise PlanError(
                f"node {name!r}: memory={spec.memory} bytes can never fit: an attempt runs"
                f" on one Dask worker, and the largest memory limit is {largest} bytes"
            )
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
                    killed += self._killed_by_cancel(rec)
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

    def _map_inputs(self, kwargs: dict[str, Any]) -> Arena | None:
        """An arena with the large buffers of a map's keyword arguments, which every
        call of the map shares (:meth:`Arena.link <actionpool.shm.Arena.link>`): copied
        to shared memory, or scattered to a cluster, once per map and not once per
        call. ``None`` when they hold no such buffer. The map closes it when it ends
        (:meth:`Arena.close_when_idle <actionpool.shm.Arena.close_when_idle>`: once its
        last call has ended too)."""
        if not kwargs or _plain(kwargs):
            return None
        arena = self._new_arena(f"{self._calls.run_id}-{next(self._call_ids)}")
        try:
            _, placed = arena.dumps(kwargs)
        except Exception:  # noqa: BLE001 - each call raises the error naming the argument
            placed = ()
        if not placed:
            arena.close()
            return None
        return arena

    def _new_arena(self, run_id: str) -> Arena:
        """The shared-memory arena of one run or call, leasing this runner's segments;
        workers keep its mappings until it closes (then told through ``on_close``).
        On a cluster, the backend's (:class:`~actionpool.pools.dask.ClusterArena`)."""
        if self._backend.arena is not None:
            return self._backend.arena(run_prefix(run_id), self._out_of_band)
        arena = Arena(run_prefix(run_id), self.shm_threshold, pool=self._segments)
        arena.on_close = self._forget
        return arena

    def worker_pids(self) -> list[int]:
        """The pids of the live worker processes of every pool (empty before first use)."""
        return [pid for pool in self._pools.values() for pid in pool.pids()]

    def _forget(self, prefix: str) -> None:
        """The arena ``prefix`` closed: no worker needs its shared memory any more."""
        for pool in self._pools.values():
            pool.forget(prefix)

    def _killed_by_cancel(self, rec: NodeRecord) -> list[Future[Any]]:
        """The future that is done once ``rec``'s running attempt is stopped, when its
        pool stops attempts by killing their workers (else nothing to wait for: a
        thread is abandoned)."""
        handle = rec.handle
        if handle is None or not self._pools[rec.spec.kind].stops_by_kill:
            return []
        return [handle.future]

    def close(self) -> None:
        """Same as ``shutdown(wait=True)``."""
        self.shutdown(wait=True)

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # Leaving the block on an error or Ctrl-C stops what runs (a scope: nothing
        # started inside it outlives it), rather than wait for it.
        if exc_type is not None:
            self._cancel(None, f"the with block was left on {exc_type.__name__}")
        self.shutdown(wait=True)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):  # best effort at interpreter exit
                self.shutdown(wait=False)

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
        max_parallel: int | None = None,
        journal: str | os.PathLike[str] | None = None,
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
            progress: show a progress bar (tqdm; notebook-aware). Without tqdm
                installed, raises ``ImportError`` saying how to install it
                (``pip install 'actionpool[progress]'``).
            reducers: ``{state key: fn(current, new)}`` to combine updates of a key
                from nodes that the plan does not order.
            max_parallel: at most this many of the run's attempts in flight at once
                (None: as many as the pools' slots allow).
            journal: a SQLite file that records the run (created owner-only when it
                does not exist). Given a journal of an earlier, interrupted run of the
                same plan and initial state, the run resumes: nodes that succeeded are
                loaded, not run again; see :mod:`actionpool.journal` and
                ``docs/durable-runs.md``. Journals hold pickles: use only your own.

        Returns:
            Report: an outcome per node in plan order, the merged state, a status.

        Raises:
            PlanError: the plan has an unknown ``after=`` name or a cycle, or an
                option is bad; nothing has run.
            StateConflict: two unordered nodes updated the same key without a reducer
                (the report is attached as ``.report``).
            JournalError: the journal belongs to another plan or initial state, is
                damaged, is not a journal, or is in use by another run; nothing has run.
            RuntimeError: the runner is closed, or this is called from an ``on_event``
                callback (the scheduler thread).
        """
        if self._on_scheduler_thread():
            raise RuntimeError("Runner.run cannot be called from the scheduler thread (on_event)")
        run = self._start_run(
            plan, state, failure, on_event, progress, reducers, max_parallel, journal
        )
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
        max_parallel: int | None = None,
        journal: str | os.PathLike[str] | None = None,
    ) -> Report:
        """The same as :meth:`run`, for ``async`` code and notebooks.

        ``report = await runner.arun(plan)``; the run goes on on the runner's own
        scheduler thread, so a notebook's running loop is never blocked (opening a
        journal, and the ``reconcile`` calls of a resume, run on a worker thread).
        """
        args = (plan, state, failure, on_event, progress, reducers, max_parallel, journal)
        if journal is None:
            run = self._start_run(*args)
        else:
            run = await asyncio.to_thread(self._start_run, *args)
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
        max_parallel: int | None = None,
        journal_path: str | os.PathLike[str] | None = None,
    ) -> PlanRun:
        if not isinstance(plan, Plan):
            raise PlanError(f"run() takes a Plan, got {type(plan).__name__}")
        check_failure_policy(failure)
        check_max_parallel(max_parallel)
        if journal_path is not None and not isinstance(journal_path, (str, os.PathLike)):
            raise PlanError(f"journal must be a file path, got {journal_path!r}")
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
        arena = self._new_arena(run_id)  # per session: a resumed run's id is not unique
        bar: EventBar | None = None
        try:
            state_bytes: Packed | None = None
            state_error: SerializationError | None = None
            if any(n.action.wants_context or n.action.validate for n in graph.nodes):
                try:
                    state_bytes = dumps_state({} if state is None else state, arena)
                except SerializationError as exc:
                    state_error = exc
            journal: Journal | None = None
            reconciled: dict[str, str | BaseException] = {}
            if journal_path is not None:
                from .journal import Journal  # sqlite3: only for runs that keep a journal

                journal = Journal(journal_path, graph, state, run_id)
                try:
                    run_id = journal.resume.run_id
                    reconciled = _reconcile(
                        graph, journal.resume, state, run_id, self._resource_payload
                    )
                except BaseException:
                    journal.close()
                    raise
            if progress:
                bar = on_event = EventBar(on_event, len(graph.nodes))
            with self._lock:
                if self._closed:
                    if journal is not None:
                        journal.close()
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
                    max_parallel,
                    journal,
                    reconciled,
                )
                self._runs.add(run)
        except BaseException:  # a refused journal, a closed runner...: the run never starts
            arena.close()
            if bar is not None:
                bar.close()
            raise
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
            if run.journal is not None:
                run.journal.close()
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
                for w in waits:  # a copy's error is its call's, told there already
                    w.add_done_callback(_retrieved)
                await asyncio.wait(waits)
                await asyncio.sleep(0)  # let finished runs leave self._runs

        asyncio.run_coroutine_threadsafe(idle(), self._loop).result()


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """Mark ``fut``'s exception as seen: ``asyncio.wrap_future`` copies a call's error
    into an asyncio future that only waits, and asyncio logs "Future exception was
    never retrieved" for each such copy it collects."""
    if not fut.cancelled():
        fut.exception()


def _reconcile(
    graph: Any, resume: Resume, state: Any, run_id: str, resources: bytes | None
) -> dict[str, str | BaseException]:
    """Ask the ``reconcile`` of each non-idempotent node in doubt what to do, here in
    the caller's thread, before the run starts: ``{node name: answer or what it
    raised}`` (an answer other than "done" or "retry" is kept and reported). Its
    context has the runner's io resources (``ctx.resources``)."""
    answers: dict[str, str | BaseException] = {}
    state_bytes: bytes | None = None  # pickled once, unpickled for each context
    for node in graph.nodes:
        spec = node.action
        attempt = resume.in_doubt.get(node.name)
        if attempt is None or spec.idempotent or spec.reconcile is None:
            continue
        if state_bytes is None:
            state_bytes = dumps({} if state is None else state)
        copy = loads(state_bytes)
        ctx = Context(copy, node.name, run_id, attempt, resources=view(resources, node.name))
        try:
            answers[node.name] = spec.reconcile(ctx)
        except Exception as exc:  # noqa: BLE001 - reported in the node's IN_DOUBT outcome
            answers[node.name] = exc
    return answers


def _check_memory_floor(value: Any) -> None:
    """Raise ValueError unless ``value`` is an int number of bytes >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"memory_floor must be a number of bytes >= 0, got {value!r}")
