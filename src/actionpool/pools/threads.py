"""The I/O pool: a thread pool for ``kind="io"`` actions; ``async def`` ones run on a loop.

Data flow::

    scheduler --Task--> ThreadPoolExecutor thread: _worker.execute --> Future[Result]
    scheduler --Task--> the runner's event loop: _worker.execute_async --> Future[Result]

The thread runs the same ``execute`` as a CPU worker, so an io action also unpickles
private copies of its arguments and state, and its result is pickled back.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from .._worker import Result, Task, execute, execute_async

__all__ = ["ThreadPool"]


class ThreadPool:
    """A ``ThreadPoolExecutor`` of ``size`` threads; states idle/started/closed."""

    kind = "io"

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self.size = size
        self._loop = loop
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._lock = threading.Lock()

    def submit(self, task: Task, is_async: bool = False) -> Future[Result]:
        """Run ``task`` on a thread, or on the runner's loop for an ``async def`` action."""
        if is_async:
            return asyncio.run_coroutine_threadsafe(execute_async(task), self._loop)
        with self._lock:
            if self._closed:
                raise RuntimeError("the io pool is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.size, thread_name_prefix="actionpool-io")
            ex = self._executor
        return ex.submit(execute, task)

    def close(self, cancel: bool = False) -> None:
        """Shut the threads down, waiting for running actions (threads cannot be killed)."""
        with self._lock:
            self._closed = True
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=cancel)
