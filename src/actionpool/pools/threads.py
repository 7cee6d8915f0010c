"""The I/O pool: a thread pool for ``kind="io"`` actions; ``async def`` ones run on a loop.

Data flow::

    scheduler ─submit(Task)─► ThreadPoolExecutor thread: on_started, _worker.execute ─► Future
    scheduler ─submit(Task)─► the runner's event loop: _worker.execute_async ─────────► Future

The thread runs the same ``execute`` as a CPU worker, so an io action also unpickles
private copies of its arguments and state, and its result is pickled back. A thread
cannot be killed: cancelling an attempt sets its ``ctx.cancelled()`` flag (and cancels
an ``async def`` action's task); the thread's late result is ignored.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .._worker import Result, Task, execute, execute_async

__all__ = ["ThreadAttempt", "ThreadPool"]


class ThreadAttempt:
    """Handle of one attempt on the I/O pool.

    Attributes:
        future: resolves to the :class:`~actionpool._worker.Result` (cancelled when an
            ``async def`` action was cancelled).
        cancel_event: what ``ctx.cancelled()`` reads.
        killed: why it was asked to stop (``"timeout"``, ``"cancel"``), or "".
    """

    __slots__ = ("cancel_event", "future", "killed")

    def __init__(self) -> None:
        self.cancel_event = threading.Event()
        self.future: Future[Result] = Future()
        self.killed = ""

    def cancel(self, reason: str = "cancel") -> None:
        """Ask the action to stop: ``ctx.cancelled()`` turns True; async tasks are cancelled."""
        self.killed = self.killed or reason
        self.cancel_event.set()
        self.future.cancel()  # async: cancels the task; threads: no-op once running


class ThreadPool:
    """A ``ThreadPoolExecutor`` of ``size`` threads; states idle/started/closed."""

    kind = "io"

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self.size = size
        self._loop = loop
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._lock = threading.Lock()

    def submit(
        self,
        task: Task,
        is_async: bool = False,
        on_started: Callable[[int | str, float], None] | None = None,
        on_event: Callable[[str, float, Any], None] | None = None,
    ) -> ThreadAttempt:
        """Run ``task`` on a thread, or on the runner's loop for an ``async def`` action.

        Raises:
            RuntimeError: the pool is closed.
        """
        att = ThreadAttempt()
        if is_async:

            async def run() -> Result:
                if on_started is not None:
                    on_started(threading.current_thread().name, time.time())
                return await execute_async(task, on_event, att.cancel_event)

            att.future = asyncio.run_coroutine_threadsafe(run(), self._loop)
            return att
        with self._lock:
            if self._closed:
                raise RuntimeError("the io pool is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.size, thread_name_prefix="actionpool-io")
            ex = self._executor

        def run_in_thread() -> Result:
            if on_started is not None:
                on_started(threading.current_thread().name, time.time())
            return execute(task, on_event, att.cancel_event)

        att.future = ex.submit(run_in_thread)
        return att

    def close(self, cancel: bool = False) -> None:
        """Shut the threads down, waiting for running actions (threads cannot be killed)."""
        with self._lock:
            self._closed = True
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=cancel)
