"""The CPU pool: a loky process pool, created on first use, owned by one runner.

Data flow::

    scheduler --Task--> loky executor --call queue--> worker process: _worker.execute
    scheduler <--Future[Result]-- loky result thread <--result queue-- worker

Each worker starts with ``OMP_NUM_THREADS`` & co. set to ``blas_threads`` (passed as
loky's ``env``, so they are in place before the worker imports anything and are not
inherited from the parent, where e.g. a Dask ``LocalCluster`` may have set them to 1)
and with threadpoolctl limits for libraries already loaded.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import loky

from .._worker import Result, Task, execute, init_process
from ..sizing import worker_env

__all__ = ["ProcessPool"]


class ProcessPool:
    """A loky ``ProcessPoolExecutor`` of ``size`` workers; states idle/started/closed."""

    kind = "cpu"

    def __init__(self, size: int, blas_threads: int) -> None:
        self.size = size
        self.blas_threads = blas_threads
        self._executor: loky.ProcessPoolExecutor | None = None
        self._closed = False
        self._lock = threading.Lock()

    def _start(self) -> loky.ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("the cpu pool is closed")
            if self._executor is None:
                self._executor = loky.ProcessPoolExecutor(
                    max_workers=self.size,
                    initializer=init_process,
                    initargs=(self.blas_threads,),
                    env=worker_env(self.blas_threads),
                )
            return self._executor

    def submit(self, task: Task, is_async: bool = False) -> Future[Result]:
        """Run ``task`` in a worker process (``async def`` actions get their own loop)."""
        fut: Future[Result] = self._start().submit(execute, task)
        return fut

    def pids(self) -> list[int]:
        """The pids of the live worker processes (empty before the first submit)."""
        ex = self._executor
        if ex is None:
            return []
        return [p.pid for p in list(getattr(ex, "_processes", {}).values()) if p.pid]

    def close(self, cancel: bool = False) -> None:
        """Shut the executor down and join its workers; ``cancel`` kills running work."""
        with self._lock:
            self._closed = True
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=True, kill_workers=cancel)
