"""The worker side: run one attempt of one node, in a CPU process or an I/O thread.

Data flow of one attempt::

    parent (scheduler)                      worker (loky process or I/O thread)
    ------------------                      -----------------------------------
    Task(meta, state bytes, call bytes) --> execute(task)
                                              unpickle call  -> private args
                                              unpickle state -> private Context.state
                                              run the action
                                              pickle value, deltas, exception
    Result tuple  <-----------------------  return Result

The same function runs in both pools, so an io action gets private copies and its
result is checked for picklability exactly like a cpu action's. The result is a
plain tuple of bytes and builtins, so returning it can never fail: every pickling
problem is caught here and reported as a :class:`~actionpool.SerializationError` or,
for an exception that cannot travel, a :class:`~actionpool.RemoteError`.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import traceback
from typing import Any, NamedTuple

from .action import ActionSpec, Context
from .errors import RemoteError, SerializationError
from .transfer import dumps, loads

__all__ = ["Result", "Task", "execute", "execute_async", "init_process"]


class Task(NamedTuple):
    """One attempt of one node, as sent to a worker (builtins and bytes only)."""

    run_id: str
    node: str
    attempt: int
    deadline: float | None  # time.time() seconds, or None
    wants_state: bool
    state: bytes | None  # the run's state, pickled once per run
    call: bytes  # (fn, args, kwargs), pickled by transfer.dumps_call


class Result(NamedTuple):
    """What a worker sends back for one attempt (builtins and bytes only).

    ``ok`` is True when the action returned; then ``value`` holds the pickled return
    value. Otherwise ``error`` holds the pickled exception (or None if it could not be
    pickled) and ``error_type`` / ``error_message`` / ``traceback`` describe it.
    """

    ok: bool
    value: bytes | None
    error: bytes | None
    error_type: str
    error_message: str
    traceback: str
    deltas: bytes | None
    events: list[tuple[str, float, Any]]
    started_at: float
    finished_at: float
    worker: int | str


_IN_PROCESS = False


def init_process(blas_threads: int) -> None:
    """loky initializer: mark this process a worker and cap BLAS/OpenMP threads.

    The environment variables (``OMP_NUM_THREADS`` ...) are set by the pool before
    this process imports anything; threadpoolctl covers libraries already loaded.
    """
    global _IN_PROCESS
    _IN_PROCESS = True
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=blas_threads)


def _worker_id() -> int | str:
    return os.getpid() if _IN_PROCESS else threading.current_thread().name


def _prepare(task: Task) -> tuple[Any, tuple[Any, ...], dict[str, Any], Context | None]:
    try:
        fn, args, kwargs = loads(task.call)
        if isinstance(fn, ActionSpec):  # call the function itself: the Context is ours to make
            fn = fn.fn
    except Exception as exc:
        raise SerializationError(
            f"node {task.node!r}: its call could not be unpickled in the worker"
            f" ({type(exc).__name__}: {exc})"
        ) from exc
    ctx = None
    if task.wants_state:
        state: Any = {}
        if task.state is not None:
            try:
                state = loads(task.state)
            except Exception as exc:
                raise SerializationError(
                    f"node {task.node!r}: the state could not be unpickled in the worker"
                    f" ({type(exc).__name__}: {exc})"
                ) from exc
        ctx = Context(state, task.node, task.run_id, task.attempt, task.deadline)
    return fn, args, kwargs, ctx


def _success(task: Task, value: Any, ctx: Context | None, started: float) -> Result:
    try:
        value_bytes = dumps(value)
    except Exception as exc:  # noqa: BLE001
        err = SerializationError(
            f"node {task.node!r}: the return value of type {type(value).__name__}"
            f" cannot be pickled ({type(exc).__name__}: {exc})"
        )
        return _failure(task, err, ctx, started, tb="")
    deltas = _dump_deltas(task, ctx)
    if isinstance(deltas, BaseException):
        return _failure(task, deltas, ctx, started, tb="")
    events = ctx._events if ctx is not None else []
    return Result(
        True, value_bytes, None, "", "", "", deltas, events, started, time.time(), _worker_id()
    )


def _dump_deltas(task: Task, ctx: Context | None) -> bytes | SerializationError | None:
    if ctx is None or not ctx._deltas:
        return None
    try:
        return dumps(ctx._deltas)
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


def _failure(
    task: Task, exc: BaseException, ctx: Context | None, started: float, tb: str | None = None
) -> Result:
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
    events = ctx._events if ctx is not None else []
    return Result(
        False, None, error, type_name, message, tb, None, events, started, time.time(), _worker_id()
    )


def execute(task: Task) -> Result:
    """Run one attempt of a node (sync callables; ``async def`` ones get a fresh loop).

    Never raises for the action's sake: every error is in the :class:`Result`.
    """
    started = time.time()
    ctx: Context | None = None
    try:
        fn, args, kwargs, ctx = _prepare(task)
        if ctx is not None:
            args = (ctx, *args)
        value = fn(*args, **kwargs)
        if asyncio.iscoroutine(value):
            value = asyncio.run(value)
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt in a worker is a failure too
        return _failure(task, exc, ctx, started)
    return _success(task, value, ctx, started)


async def execute_async(task: Task) -> Result:
    """Run one attempt of an ``async def`` io action on the caller's event loop."""
    started = time.time()
    ctx: Context | None = None
    try:
        fn, args, kwargs, ctx = _prepare(task)
        if ctx is not None:
            args = (ctx, *args)
        value = await fn(*args, **kwargs)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001
        return _failure(task, exc, ctx, started)
    return _success(task, value, ctx, started)


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
