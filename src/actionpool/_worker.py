"""The worker side: run one attempt of one node, in a CPU process or an I/O thread.

Data flow of one attempt::

    parent (scheduler + pool)                worker (process main loop, or I/O thread)
    -------------------------                -----------------------------------------
    (attempt id, Task) ── socket ─────────►  main thread
                        ◄─────────────────   (STARTED, id, time)
                                             unpickle call  -> private args
                                             unpickle state -> private Context.state
                                             Context.resources -> this process's
                                               registry (made once: resources.py)
                                             arm SIGALRM at the timeout (soft timeout)
                                             run the action
                        ◄─────────────────   (EVENT, id, kind, time, data)  (ctx.emit/progress)
                        ◄─────────────────   (RESULT, id, Result)

The frames and message kinds on that socket, and the start page, are
:mod:`actionpool._link`'s, which the pool imports too.

The same :func:`execute` runs in both pools, so an io action gets private copies and
its result is checked for picklability exactly like a cpu action's. A :class:`Result`
holds only bytes and builtins, so sending it can never fail: every pickling problem is
caught here and reported as a :class:`~actionpool.SerializationError`, or, for an
exception that cannot travel, a :class:`~actionpool.RemoteError`.

A worker process (:func:`process_main`) reads its socket and runs actions in its main
thread, so the soft timeout (``SIGALRM`` -> :class:`~actionpool.ActionTimeout`) reaches
Python code. A watchdog thread waits for the parent's end of the socket to close
(``poll`` for ``POLLRDHUP``, which reads nothing): that means the parent died, and the
worker kills its own process group (itself and anything its actions started) at once.
"""

from __future__ import annotations

import _thread
import contextlib
import inspect
import mmap
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

from . import _link
from .action import ActionSpec, Context
from .errors import ActionTimeout, RemoteError, SerializationError
from .output import Capture
from .resources import close_process_registries, view
from .shm import Arena, arena_for, forget, keep_mappings, unlink_worker_segments
from .transfer import Packed, dumps, loads

__all__ = [
    "ATTEMPT_EVENT",
    "Result",
    "Task",
    "execute",
    "execute_async",
    "portable_main",
    "process_main",
    "run_attempts",
]

Sink = Callable[[str, float, Any], None]


class Task(NamedTuple):
    """One attempt of one node, as sent to a worker (builtins and bytes only)."""

    run_id: str
    node: str
    attempt: int
    timeout: float | None  # seconds from the start of the attempt, or None
    wants_state: bool
    state: Packed | None  # the run's state, pickled once per run
    call: Packed  # (function bytes, args, kwargs), pickled by transfer.dumps_call
    shm_prefix: str  # the run's shared-memory arena (shm.Arena)
    shm_threshold: int | None  # bytes from which buffers travel through shared memory
    blas_threads: int  # BLAS/OpenMP threads for this attempt (threads x per-slot cap)
    announce: bool = True  # send a "started" message (else only the start page knows)
    memory: int = 0  # bytes the action declared (a cluster's "memory" resource)
    threads: int = 1  # slots the action declared (a cluster's "threads" resource)
    action: str = ""  # the action's name (a cluster pool measures durations by it)
    idempotent: bool = False  # it may run again unasked (a cluster keeps its value)
    resources: bytes | None = None  # the runner's resource factories (resources.pack)
    # 0: the action's output stays this worker's; else it goes to the parent as events
    # (output.Capture), with logging records at this level and above
    capture: int = 0
    tagged: bool = True  # its output is tagged with ``node`` in the parent (a plan's node)


class Result(NamedTuple):
    """What a worker sends back for one attempt (builtins and bytes only).

    ``ok`` is True when the action returned; then ``value`` holds the pickled return
    value. Otherwise ``error`` holds the pickled exception (or None if it could not be
    pickled) and ``error_type`` / ``error_message`` / ``traceback`` describe it.
    """

    ok: bool
    value: Packed | None
    error: bytes | None
    error_type: str
    error_message: str
    traceback: str
    deltas: Packed | None
    started_at: float
    finished_at: float
    worker: int | str


class _Alarm:
    """The soft timeout of the attempt running in this process's main thread."""

    armed = False
    node = ""
    timeout = 0.0


_IN_PROCESS = False
_BLAS_DEFAULT = 0  # the cap set in this worker's environment (0: not a worker)
# CPU slots the attempt running in this worker process declared (its action's
# ``threads=``), 0 between attempts: a Runner made inside the action sizes itself by
# it (sizing.nested_cores), not by the machine's cores, which its own runner shares out.
_ATTEMPT_THREADS = 0


def _on_alarm(signum: int, frame: Any) -> None:
    # Raise only while the action runs: a late alarm must not hit our own bookkeeping.
    if _Alarm.armed:
        _Alarm.armed = False
        raise ActionTimeout(f"node {_Alarm.node!r} ran past its timeout of {_Alarm.timeout:g} s")


def init_process(blas_threads: int, pools_loaded: bool | None = None) -> None:
    """Mark this process a worker and cap BLAS/OpenMP threads in it.

    Called once in the zygote, whose workers inherit it. The environment variables
    (``OMP_NUM_THREADS`` ...) are already set in the zygote's environment, for
    libraries loaded later; threadpoolctl covers libraries already loaded (a zygote
    forked from the parent may have inherited NumPy's BLAS, or an OpenMP runtime
    that has not started its threads yet).

    Args:
        blas_threads: the cap.
        pools_loaded: what :func:`native_pools_loaded` answered in the process this
            one was forked from, just before (the same libraries are mapped here, and
            asking there is cheaper: every page touched here is a copy-on-write
            fault); None to ask here.
    """
    global _IN_PROCESS, _BLAS_DEFAULT
    _IN_PROCESS = True
    _BLAS_DEFAULT = blas_threads
    if pools_loaded is None:
        pools_loaded = native_pools_loaded()
    if pools_loaded:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=blas_threads)


# The file-name prefixes by which threadpoolctl recognizes the libraries it controls
# (its controllers' ``filename_prefixes``: OpenBLAS, MKL, BLIS, FlexiBLAS, OpenMP).
_POOL_LIBRARIES = (
    b"libopenblas",
    b"libscipy_openblas",
    b"libblas",
    b"libmkl_rt",
    b"mkl_rt",
    b"libblis",
    b"libflexiblas",
    b"libiomp",
    b"libgomp",
    b"libomp",
    b"vcomp",
)


def native_pools_loaded() -> bool:
    """False when this process has certainly loaded none of the libraries threadpoolctl
    controls, so that capping them has nothing to do; True when it has, or cannot tell.

    Importing threadpoolctl and scanning the loaded libraries is slow, and it lies on
    the critical path of a runner's first result. The dynamic loader's own list of
    loaded objects (:func:`loaded_objects`) answers without importing anything; where
    it cannot be read, the file names in ``/proc/self/maps`` do, at a higher cost (the
    kernel writes that file a page per ``read``, several of them in a runner's
    process). Where neither can be read (not Linux), the answer is True and
    threadpoolctl runs.

    Call it only while this process runs a single thread (the zygote's fork, the
    zygote): the loader's list is read without the loader's lock.
    """
    names = loaded_objects()
    if names is None:
        names = mapped_files()
    return names is None or pool_library_in(names)


def pool_library_in(names: list[bytes]) -> bool:
    """Whether one of ``names`` (file paths) is a library threadpoolctl controls, by
    the file-name prefixes threadpoolctl itself matches."""
    return any(name.rpartition(b"/")[2].startswith(_POOL_LIBRARIES) for name in names)


def mapped_files() -> list[bytes] | None:
    """The words of ``/proc/self/maps``, the paths of the mapped files among them;
    None where it cannot be read."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return f.read().split()
    except OSError:
        return None


def loaded_objects() -> list[bytes] | None:
    """The file names of the shared objects loaded in this process (the main program's
    is empty), in load order, from the dynamic loader's link map: ``dlinfo(dlopen(NULL),
    RTLD_DI_LINKMAP)`` and its ``l_next`` chain, as glibc and musl keep it; the same
    list that ``dl_iterate_phdr`` (threadpoolctl's way) walks, without a callback per
    object. None where that is not available, or where :mod:`ctypes` is not imported
    yet (importing it here would cost more than it saves; loky has imported it in a
    runner's process).

    Only while no other thread can load or unload a library (see
    :func:`native_pools_loaded`).
    """
    if "ctypes" not in sys.modules:
        return None
    import ctypes

    try:

        class LinkMap(ctypes.Structure):  # <link.h> struct link_map, its public head
            _fields_ = (
                ("l_addr", ctypes.c_void_p),
                ("l_name", ctypes.c_char_p),
                ("l_ld", ctypes.c_void_p),
                ("l_next", ctypes.c_void_p),
                ("l_prev", ctypes.c_void_p),
            )

        main = ctypes.CDLL(None)
        dlinfo = main.dlinfo
        dlinfo.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        dlinfo.restype = ctypes.c_int
        head = ctypes.c_void_p()
        if dlinfo(main._handle, _RTLD_DI_LINKMAP, ctypes.byref(head)) != 0:
            return None
        names: list[bytes] = []
        entry = head.value
        while entry:
            link = LinkMap.from_address(entry)
            names.append(link.l_name or b"")
            entry = link.l_next
    except (OSError, AttributeError, ValueError):
        return None
    return names


_RTLD_DI_LINKMAP = 2  # <dlfcn.h>, glibc and musl


def _blas_limits(threads: int) -> Any:
    """Raise or lower BLAS/OpenMP pools for one attempt (``threads=`` of its action).

    Libraries read the worker's environment cap when they load; an action that takes
    several CPU slots gets ``threadpoolctl`` limits for its run, restored afterwards.
    """
    if not _IN_PROCESS or threads == _BLAS_DEFAULT:
        return None
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads)


_FUNCTIONS: dict[bytes, Any] = {}  # pickled function -> function, in this process


def _function(fn_bytes: bytes) -> Any:
    """Unpickle an action's function once per distinct pickle (a worker runs the same
    function for many nodes); a changed global of a by-value function changes the
    pickle, so it is never served stale."""
    fn = _FUNCTIONS.get(fn_bytes)
    if fn is None:
        fn = loads(fn_bytes)
        if isinstance(fn, ActionSpec):  # call the function itself: the Context is ours
            fn = fn.fn
        if len(_FUNCTIONS) >= 256:
            _FUNCTIONS.clear()
        _FUNCTIONS[fn_bytes] = fn
    return fn


def _worker_id() -> int | str:
    return os.getpid() if _IN_PROCESS else threading.current_thread().name


def _prepare(
    task: Task, sink: Sink | None, cancel: threading.Event | None, arena: Arena
) -> tuple[Any, tuple[Any, ...], dict[str, Any], Context | None]:
    """Unpickle the call (and the state, for a Context). The caller arms the Context's
    deadline once it knows when the action starts."""
    try:
        fn_bytes, args, kwargs = arena.loads(task.call)
        fn = _function(fn_bytes)
    except BaseException as exc:  # even SystemExit: the call failed, not the caller
        raise SerializationError(
            f"node {task.node!r}: its call could not be unpickled in the worker"
            f" ({type(exc).__name__}: {exc})"
        ) from exc
    preload = getattr(fn, "_actionpool_preload", None)
    if preload is not None:
        # a wrapper's own function (a map chunk's action) imported before the clock
        # starts, as a plain action's is: else a process's first chunk counts its
        # imports as the action's time, and the Dask pool's batch sizing reads them
        # as uneven attempts. Its failure is the wrapper's to report, when it runs.
        with contextlib.suppress(Exception):
            preload(*args)
    ctx = None
    if task.wants_state:
        state: Any = {}
        if task.state is not None:
            try:
                state = arena.loads(task.state)
            except BaseException as exc:  # even SystemExit: see above
                raise SerializationError(
                    f"node {task.node!r}: the state could not be unpickled in the worker"
                    f" ({type(exc).__name__}: {exc})"
                ) from exc
        # the registry of this process (cpu) or of the runner (io threads): the
        # same instances for every attempt here, whatever its Context
        resources = view(task.resources, task.node)
        ctx = Context(state, task.node, task.run_id, task.attempt, None, cancel, sink, resources)
    return fn, args, kwargs, ctx


def _success(task: Task, value: Any, ctx: Context | None, started: float, arena: Arena) -> Result:
    try:
        value_bytes = arena.dumps(value)
    except BaseException as exc:  # noqa: BLE001 - even SystemExit: the worker lives on
        if not isinstance(exc, Exception):  # sent back as it is, as concurrent.futures does
            return _failure(task, exc, started)
        err = SerializationError(
            f"node {task.node!r}: the return value of type {type(value).__name__}"
            f" cannot be pickled ({type(exc).__name__}: {exc})"
        )
        return _failure(task, err, started, tb="")
    deltas = _dump_deltas(task, ctx, arena)
    if isinstance(deltas, BaseException):
        return _failure(task, deltas, started, tb="")
    return Result(True, value_bytes, None, "", "", "", deltas, started, time.time(), _worker_id())


def _dump_deltas(
    task: Task, ctx: Context | None, arena: Arena
) -> Packed | SerializationError | None:
    if ctx is None or not ctx._deltas:
        return None
    try:
        return arena.dumps(ctx._deltas)
    except Exception:  # noqa: BLE001
        for key, value in ctx._deltas.items():
            try:
                dumps(value)
            except Exception as exc:  # noqa: BLE001
                return SerializationError(
                    f"node {task.node!r}: state update {key!r} of type {type(value).__name__}"
                    f" cannot be pickled ({type(exc).__name__}: {exc})"
                )
        return SerializationError(f"node {task.node!r}: its state updates cannot be pickled")


def _failure(task: Task, exc: BaseException, started: float, tb: str | None = None) -> Result:
    if tb is None:
        tb = "".join(traceback.format_exception(exc))
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    if type(exc).__module__ == "builtins":
        type_name = type(exc).__qualname__
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001
        message = f"<unprintable {type_name}>"
    try:
        error: bytes | None = dumps(exc)
    except Exception:  # noqa: BLE001 - the parent rebuilds a RemoteError from the text
        error = None
    return Result(
        False, None, error, type_name, message, tb, None, started, time.time(), _worker_id()
    )


def execute(
    task: Task,
    sink: Sink | None = None,
    cancel: threading.Event | None = None,
    on_start: Callable[[float], None] | None = None,
    keep: list[Any] | None = None,
) -> Result:
    """Run one attempt of a node (``async def`` callables get a fresh event loop).

    In a worker process the attempt's ``timeout`` is enforced softly: ``SIGALRM``
    raises :class:`~actionpool.ActionTimeout` inside the action at the deadline. The
    timeout counts from the moment the action is called, after its call and state
    were unpickled (a fresh worker may import the action's modules first).

    Args:
        task: the attempt.
        sink: receives ``(kind, time, data)`` for each ``ctx.emit`` / ``ctx.progress``.
        cancel: set when the attempt is cancelled (``ctx.cancelled()`` turns True).
        on_start: called with ``time.time()`` just before the action is called.
        keep: receives the call's arguments and return value, for the caller to
            drop once the result is sent (freeing a large map chunk's objects takes
            long enough that the parent, waiting for the result, would notice).

    Returns:
        The :class:`Result`; never raises for the action's sake.
    """
    started = time.time()
    alarm = _IN_PROCESS and task.timeout is not None
    arena = arena_for(task.shm_prefix, task.shm_threshold)
    try:
        return _execute(task, sink, cancel, started, alarm, arena, on_start, keep)
    finally:
        keep_mappings(arena)


def _execute(
    task: Task,
    sink: Sink | None,
    cancel: threading.Event | None,
    started: float,
    alarm: bool,
    arena: Arena,
    on_start: Callable[[float], None] | None = None,
    keep: list[Any] | None = None,
) -> Result:
    ctx: Context | None = None
    try:
        fn, args, kwargs, ctx = _prepare(task, sink, cancel, arena)
        started = time.time()  # the action's clock starts now, imports done
        if on_start is not None:
            on_start(started)
        if ctx is not None:
            if task.timeout is not None:
                ctx._deadline = started + task.timeout
            args = (ctx, *args)
        if alarm:
            assert task.timeout is not None
            # an earlier action may have replaced the handler: ours, for every attempt
            signal.signal(signal.SIGALRM, _on_alarm)
            _Alarm.node, _Alarm.timeout, _Alarm.armed = task.node, task.timeout, True
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, started + task.timeout - time.time()))
        limits = _blas_limits(task.blas_threads)
        global _ATTEMPT_THREADS
        if _IN_PROCESS:
            _ATTEMPT_THREADS = task.threads
        try:
            value = fn(*args, **kwargs)
            if inspect.iscoroutine(value):
                import asyncio

                value = asyncio.run(value)
        finally:
            _ATTEMPT_THREADS = 0
            if limits is not None:
                limits.restore_original_limits()
            if alarm:
                _Alarm.armed = False
                signal.setitimer(signal.ITIMER_REAL, 0)
    except BaseException as exc:  # noqa: BLE001 - even SystemExit ends as this node's failure
        return _failure(task, exc, started)
    if keep is not None:
        keep.append((args, kwargs, value))
    return _success(task, value, ctx, started, arena)


def _event_payload(data: Any) -> bytes:
    """An event's data, pickled; its ``repr`` where it cannot be (an event must not
    fail the action)."""
    try:
        return dumps(data)
    except Exception:  # noqa: BLE001
        return dumps(repr(data))


ATTEMPT_EVENT = "actionpool-attempt-event"
"""The event kind under which :func:`run_attempts` sends an event of one of its
attempts: ``(index, kind, pickled data)``."""


def run_attempts(ctx: Context, tasks: list[Task]) -> list[Result]:
    """Run several attempts one after another, each as :func:`execute` runs one, and
    return their results in order (the action of a chunk of a Dask worker's batch:
    :class:`~actionpool.pools.dask.WorkerSide`).

    One message to the process and one reply for the whole chunk, where each attempt
    sent alone is a round trip between the process and its pool's reader thread, which
    contends for the GIL with the Dask worker's own threads: the largest share of a
    tiny attempt's time there. Only attempts that nobody waits to see start are
    chunked (idempotent, no timeout: see ``Task.announce``), so none is started or
    timed by its own message. An attempt's ``ctx.emit``, ``ctx.progress`` and output
    go out as the chunk's events of kind :data:`ATTEMPT_EVENT`, tagged with its index.
    A process that dies in the middle loses the chunk's results; the caller runs its
    attempts again one by one, so the one that crashed ends alone.

    Args:
        ctx: the chunk's own Context, for its event sink.
        tasks: the attempts.
    """
    outer = ctx._sink
    index = 0

    def sink(kind: str, at: float, data: Any) -> None:
        if outer is not None:
            outer(ATTEMPT_EVENT, at, (index, kind, _event_payload(data)))

    results: list[Result] = []
    levels = {task.capture for task in tasks}
    if len(levels) == 1 and tasks[0].capture:
        # one capture for the chunk, not one per attempt (entering one makes a logging
        # handler and may set the root logger's level, which clears every logger's
        # cache), each attempt's unfinished line sent before the next begins, under
        # its own index
        with Capture(sink, tasks[0].capture) as capture:
            for index, task in enumerate(tasks):  # noqa: B007 - sink reads index
                results.append(execute(task, sink))
                capture.flush()
        return results
    for index, task in enumerate(tasks):  # noqa: B007 - sink reads index
        if task.capture:
            with Capture(sink, task.capture):
                results.append(execute(task, sink))
        else:
            results.append(execute(task, sink))
    return results


async def execute_async(
    task: Task, sink: Sink | None = None, cancel: threading.Event | None = None
) -> Result:
    """Run one attempt of an ``async def`` io action on the caller's event loop.

    Cancelling the awaiting task cancels the action (``CancelledError`` propagates).
    """
    started = time.time()
    arena = arena_for(task.shm_prefix, task.shm_threshold)
    try:
        fn, args, kwargs, ctx = _prepare(task, sink, cancel, arena)
        if ctx is not None:
            if task.timeout is not None:
                ctx._deadline = started + task.timeout
            args = (ctx, *args)
        value = await fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - CancelledError is a BaseException: it propagates
        return _failure(task, exc, started)
    return _success(task, value, ctx, started, arena)


def rebuild_error(result: Result) -> BaseException:
    """The exception a failed :class:`Result` carries, rebuilt in the parent.

    The original exception when it unpickles, else a :class:`RemoteError` with its
    type name, message and remote traceback.
    """
    exc: BaseException | None = None
    if result.error is not None:
        try:
            exc = loads(result.error)
        except Exception:  # noqa: BLE001
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(result.error_type, result.error_message, result.traceback)
    return exc


# ---- the worker process ------------------------------------------------------------


def _die_with_parent() -> None:
    # The parent is gone (killed, crashed): nobody will read our results or claim the
    # shared memory we made for them. Unlink it and stop now, with every process our
    # actions started (we lead our own process group).
    try:
        unlink_worker_segments()
        os.killpg(os.getpgid(0), signal.SIGKILL)
    finally:
        os._exit(1)


def _watch_parent(fd: int) -> None:
    """Watchdog thread: wait, reading nothing, until the parent's end of ``fd`` closes."""
    import select

    if hasattr(select, "POLLRDHUP"):  # Linux: woken by the close itself, never by data
        poller = select.poll()
        poller.register(fd, select.POLLRDHUP)
        while True:
            if poller.poll():
                _die_with_parent()
    parent = os.getppid()
    while os.getppid() == parent:  # elsewhere: a reparented worker has lost its parent
        time.sleep(0.5)
    _die_with_parent()


def _after_fork() -> None:
    """Give a freshly forked worker what a fresh interpreter would have had."""
    # Python's ``random`` reseeds itself in a forked child; NumPy's legacy global
    # generator does not, and every worker would draw the same "random" numbers.
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        np_random.seed()


def _batch_policy() -> None:
    """Put this worker under ``SCHED_BATCH`` (Linux; elsewhere, or if refused, nothing).

    sched(7): a batch thread is treated as CPU-bound and does not preempt the thread
    that wakes it, which is what a pool's worker is. Under the default policy a worker
    woken by its task could preempt the parent in the middle of its ``write``, while
    the parent still had a map's next chunk to send: on a machine with few cores, that
    write then lasted as long as the whole chunk of the worker it had woken, and the
    other workers waited for their chunks meanwhile. The worker's share of the CPU is
    unchanged. The parent and io threads keep their policy; an action's own child
    processes and threads inherit the worker's.
    """
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, policy, os.sched_param(0))


def process_main(fd: int, page_fd: int = -1, slot: int = 0) -> None:
    """The loop of a CPU worker process, on its socket ``fd``; returns when told to stop.

    Forked by the zygote (:mod:`actionpool._zygote`, which called :func:`init_process`
    once for all its workers) in a new session, so it leads its own process group and
    a terminal's Ctrl-C reaches only the parent.

    Args:
        fd: the worker's socket.
        page_fd: the pool's start page (shared memory, -1: none), in which this worker
            records each attempt it starts at ``_link.START.size * slot``. The parent reads it
            only when it must know (the worker died, or it is killing it), so a call
            that no one watches costs no "started" message and no wake-up.
        slot: this worker's slot in the page.
    """
    from multiprocessing.connection import Connection

    page: mmap.mmap | None = None
    if page_fd >= 0:
        page = mmap.mmap(page_fd, _link.START.size * (slot + 1))
        os.close(page_fd)
    _after_fork()
    _batch_policy()
    _serve(Connection(fd), page, _link.START.size * slot)


def portable_main(conn: Any, blas_threads: int, page_fd: int = -1, slot: int = 0) -> None:
    """The loop of a CPU worker process on the portable path; returns when told to stop.

    Started as a fresh interpreter by loky's process backend
    (:mod:`actionpool.pools.zygote_client`, ``_LokySpawner``), with the worker
    environment (BLAS caps) already in its environment. It leaves the parent's
    session first, as a zygote's worker does: it then leads its own process group,
    which a kill (hard timeout, cancel) ends with whatever its actions started, and a
    terminal's Ctrl-C reaches only the parent.

    Args:
        conn: the worker's end of its stream socket, a ``multiprocessing``
            ``Connection`` (length-prefixed frames).
        blas_threads: the BLAS/OpenMP thread cap (:func:`init_process`).
        page_fd: the pool's start page (-1: none; then the pool asks for a STARTED
            message with every task), as for :func:`process_main`.
        slot: this worker's slot in the page.
    """
    os.setsid()
    page: mmap.mmap | None = None
    if page_fd >= 0:
        page = mmap.mmap(page_fd, _link.START.size * (slot + 1))
        os.close(page_fd)
    init_process(blas_threads)
    _batch_policy()
    _serve(conn, page, _link.START.size * slot)
    # Now, as a zygote's worker does: the interpreter's own exit would first let the
    # watchdog see the pool close its end of the socket, and kill this process group.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _serve(conn: Any, page: mmap.mmap | None, offset: int) -> None:
    """Run the tasks that arrive on ``conn`` until :data:`_link.STOP` (see
    :mod:`actionpool._link`); the worker's side on both process paths."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C stops
    signal.signal(signal.SIGALRM, _on_alarm)
    send_lock = threading.Lock()

    def send(msg: tuple[Any, ...]) -> None:
        data = _link.encode(msg)
        with send_lock:  # ctx.emit may be called from threads the action started
            conn.send_bytes(data)

    # Not threading.Thread: its start() waits until the new thread runs, which on a
    # busy machine delays this worker's first task, on a cold start's critical path;
    # the watchdog is never joined, and the process ends with os._exit.
    _thread.start_new_thread(_watch_parent, (conn.fileno(),))
    send((_link.READY, os.getpid()))
    kept: list[Any] = []
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            _die_with_parent()
        if not data:  # _link.STOP: the pool is closing
            # a worker that is killed (hard timeout, crash, cancel) never gets here:
            # its resources die with it, unclosed
            close_process_registries()
            return
        msg = _link.decode(data)
        if msg[0] == _link.FORGET:  # a run is over: drop its shared-memory mappings
            forget(msg[1])
            continue
        attempt_id, task = msg
        # an action that blocked signals must not leave the next one without its alarm
        signal.pthread_sigmask(signal.SIG_SETMASK, set())

        def on_start(at: float, _id: int = attempt_id, _announce: bool = task.announce) -> None:
            if page is not None:
                _link.mark_started(page, offset, _id, at)
            if _announce:
                send((_link.STARTED, _id, at))

        def sink(kind: str, at: float, data: Any, _id: int = attempt_id) -> None:
            send((_link.EVENT, _id, kind, at, _event_payload(data)))

        if task.capture:
            with Capture(sink, task.capture):
                result = execute(task, sink, None, on_start, kept)
        else:
            result = execute(task, sink, None, on_start, kept)
        send((_link.RESULT, attempt_id, result))
        # The call's objects are freed only now, with the reply out (as Pool's worker
        # does): freeing them is the parent's wait otherwise.
        kept.clear()
