"""The I/O pool: threads for ``kind="io"`` actions; ``async def`` ones run on a loop.

Data flow::

    scheduler ─submit(Task)─► queue ─► pool thread: on_started, _worker.execute ─► Future
    scheduler ─submit(Task)─► the pool's event loop thread: _worker.execute_async ─► Future
    Runner.submit ─submit_if_idle(Task)─► queue ─► pool thread: execute ─► on_result
    Runner.submit ─submit_if_idle(Task, is_async)─► the pool's loop: execute_async ─► on_result

``async def`` actions get an event loop of their own, on a thread the pool owns, not
the scheduler's: an action that blocks its loop by mistake (``time.sleep`` in a
coroutine) then delays only the other async actions, never the scheduler.

The thread runs the same ``execute`` as a CPU worker, so an io action also unpickles
private copies of its arguments and state, and its result is pickled back.

A thread cannot be killed. Cancelling an attempt (timeout, cancel) sets its
``ctx.cancelled()`` flag, cancels an ``async def`` action's task, and *abandons* the
thread: its late result is ignored, it no longer counts toward the pool's size (a
fresh thread serves the next attempt), and closing the pool does not wait for it.
Pool threads are daemon threads for that reason: an abandoned thread stuck in a
blocking call must not keep the interpreter from exiting. Threads that are not
abandoned are always joined by :meth:`ThreadPool.close`.

States of a pool thread: idle (waiting on the queue) -> busy -> idle ..., or
abandoned (busy with an attempt nobody waits for; it exits when that returns).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .._threads import join_thread
from .._worker import Result, Task, execute, execute_async

__all__ = ["ThreadAttempt", "ThreadPool"]


class ThreadAttempt:
    """Handle of one attempt on the I/O pool.

    Attributes:
        future: resolves to the :class:`~actionpool._worker.Result` (cancelled when an
            ``async def`` action was cancelled, or withdrawn before a thread took it).
        cancel_event: what ``ctx.cancelled()`` reads; None for an action that takes
            no Context (nothing could read it, and an ``Event`` made per call would be
            pure overhead on every io call).
        killed: why it was asked to stop (``"timeout"``, ``"cancel"``), or "".
        direct: always False (see :class:`~actionpool.pools.Attempt`).
        on_result: when set (before the task is queued), the result goes to
            ``on_result(result)``, called by the pool thread (or the pool's loop) that
            ran it, and ``future`` stays pending (it is still cancelled when the
            attempt is withdrawn, and fails when an ``async def`` action is cancelled):
            the runner's direct io calls end their caller's future there, with no hop
            to the scheduler's loop.
    """

    recycled: dict[str, Any] | None = None  # a thread or cluster task is never recycled

    __slots__ = (
        "__weakref__",  # the scheduler's done-callback refers to it weakly
        "_pool",
        "cancel_event",
        "direct",
        "future",
        "killed",
        "on_result",
        "released",
        "run",
        "started_at",
        "worker",
    )

    def __init__(self, pool: ThreadPool, wants_context: bool = True) -> None:
        self._pool = pool
        self.cancel_event = threading.Event() if wants_context else None
        self.future: Future[Result] = Future()
        self.killed = ""
        self.direct = False  # set by a pool thread: never on the scheduler's loop
        self.on_result: Callable[[Result], None] | None = None
        self.run: Future[Any] | None = None  # a direct async def call's task, as a Future
        self.released = False  # the scheduler freed this attempt's slot
        self.started_at: float | None = None
        self.worker: int | str | None = None

    def wait_here(self, timeout: float | None) -> None:
        """Nothing to do here: the pool thread that runs it delivers its result."""

    def cancel(self, reason: str = "cancel") -> None:
        """Stop waiting for this attempt: flag it, cancel an async task, abandon the thread."""
        self.killed = self.killed or reason
        if self.cancel_event is not None:
            self.cancel_event.set()
        self.future.cancel()  # async: cancels the task; queued: withdrawn; running: no-op
        if self.run is not None:  # a direct async def call: its task
            self.run.cancel()
        self._pool.abandon(self)


class ThreadPool:
    """Daemon threads started on demand: one whenever an attempt finds none idle.

    ``size`` is the pool's capacity in slots: the scheduler (and a direct call's
    admission) keep the attempts in flight within it; the pool itself does not refuse
    an attempt past it."""

    kind = "io"
    label = "io"
    stops_by_kill = False  # a thread cannot be killed: a cancelled attempt is abandoned

    def __init__(self, size: int) -> None:
        self.size = size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: dict[threading.Thread, ThreadAttempt | None] = {}  # serving threads
        self._idle = 0
        self._names = iter(range(1 << 62))
        self._closed = False

    def submit(
        self,
        task: Task,
        is_async: bool = False,
        on_started: Callable[[int | str, float], None] | None = None,
        on_event: Callable[[str, float, Any], None] | None = None,
    ) -> ThreadAttempt:
        """Run ``task`` on a pool thread, or on the runner's loop for an ``async def`` action.

        Raises:
            RuntimeError: the pool is closed.
        """
        att = ThreadAttempt(self, task.wants_state)
        if is_async:
            loop = self._async_loop()  # raises before a coroutine is made for nothing

            async def run() -> Result:
                # asyncio passes a cancel of the returned future on to this task only on
                # a later turn of the loop: one withdrawn before it began must not start
                if att.future.cancelled():
                    raise asyncio.CancelledError
                if on_started is not None:
                    on_started(threading.current_thread().name, time.time())
                return await execute_async(task, on_event, att.cancel_event)

            att.future = asyncio.run_coroutine_threadsafe(run(), loop)
            return att
        with self._lock:
            if self._closed:
                raise RuntimeError("the io pool is closed")
            self._queue_attempt(att, task, on_started, on_event)
        return att

    def submit_if_idle(
        self,
        task: Task,
        on_event: Callable[[str, float, Any], None] | None = None,
        before_send: Callable[[ThreadAttempt], None] | None = None,
        is_async: bool = False,
    ) -> ThreadAttempt | None:
        """Queue ``task`` for a pool thread now (an ``async def`` action's: start it on
        the pool's loop), from any thread; None (nothing queued) when the pool is
        closed. A thread is started when none is idle: the caller keeps to the
        pool's ``size`` (the scheduler's slots).

        ``before_send(attempt)`` runs under the pool's lock just before the attempt is
        queued: what the caller must set up before it can end (on a pool thread).
        Same signature as :meth:`ProcessPool.submit_if_idle
        <actionpool.pools.process.ProcessPool.submit_if_idle>`, which the runner's
        :meth:`~actionpool.Runner.submit` uses the same way.
        """
        att = ThreadAttempt(self, task.wants_state)
        try:
            loop = self._async_loop() if is_async else None
        except RuntimeError:  # closed
            return None
        with self._lock:
            if self._closed:
                return None
            if before_send is not None:
                before_send(att)
            if loop is not None:
                att.run = asyncio.run_coroutine_threadsafe(_run_direct(att, task, on_event), loop)
            else:
                self._queue_attempt(att, task, None, on_event)
        return att

    def _queue_attempt(
        self,
        att: ThreadAttempt,
        task: Task,
        on_started: Callable[[int | str, float], None] | None,
        on_event: Callable[[str, float, Any], None] | None,
    ) -> None:
        """Queue ``att`` and wake an idle thread, or start one (lock held)."""
        self._queue.put((att, task, on_started, on_event))
        if self._idle > 0:
            self._idle -= 1
        else:
            t = threading.Thread(
                target=self._serve, name=f"actionpool-io-{next(self._names)}", daemon=True
            )
            self._threads[t] = None
            t.start()

    def _async_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise RuntimeError("the io pool is closed")
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._loop_thread = threading.Thread(
                    target=self._loop.run_forever, name="actionpool-async", daemon=True
                )
                self._loop_thread.start()
            return self._loop

    def _serve(self) -> None:
        me = threading.current_thread()
        while True:
            item = self._queue.get()
            if item is None:
                return
            go_on = self._serve_one(me, *item)
            # An idle thread waiting for work must not hold the last attempt: through
            # its callbacks, that would keep a finished run's records and values alive.
            del item
            if not go_on:
                return

    def _serve_one(
        self,
        me: threading.Thread,
        att: ThreadAttempt,
        task: Task,
        on_started: Callable[[int | str, float], None] | None,
        on_event: Callable[[str, float, Any], None] | None,
    ) -> bool:
        """Run one attempt on this thread; False when the thread was abandoned."""
        if not att.future.set_running_or_notify_cancel():
            self._done(me)  # withdrawn before it started
            return True
        with self._lock:
            self._threads[me] = att
        att.started_at, att.worker = time.time(), me.name
        if on_started is not None:
            on_started(me.name, att.started_at)
        try:
            result = execute(task, on_event, att.cancel_event)
        except BaseException as exc:  # noqa: BLE001 - execute never raises; belt and braces
            att.future.set_exception(exc)
        else:
            if att.on_result is not None:
                att.on_result(result)  # its owner ends it (the future stays pending)
            else:
                att.future.set_result(result)
        if att.killed:  # abandoned: the pool went on without this thread
            return False
        self._done(me)
        return True

    def _done(self, me: threading.Thread) -> None:
        with self._lock:
            self._threads[me] = None
            self._idle += 1

    def abandon(self, att: ThreadAttempt) -> None:
        """Stop counting the thread that runs ``att``; a fresh one serves the next attempt."""
        with self._lock:
            for t, running in self._threads.items():
                if running is att:
                    del self._threads[t]
                    return

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Nothing to attach: threads hand their reports to the scheduler's loop
        through its callbacks, and ``async def`` actions run on a loop of the pool's
        own (an action that blocks it must not stall the scheduler)."""

    def forget(self, prefix: str) -> None:
        """Nothing to forget: the threads share this process's mappings."""

    def pids(self) -> list[int]:
        """No processes: an empty list."""
        return []

    def describe(self) -> str:
        """One line for sizing reports."""
        return f"{self.size} threads in this process (async def actions on one event loop)"

    def reap(self) -> None:
        """Nothing to reap: the pool starts no process."""

    def close(self, cancel: bool = False, *, reap: bool = True) -> None:
        """Stop the pool; wait for every serving thread (abandoned ones are not waited for).

        Args:
            cancel: cancel (and so abandon) running attempts instead of waiting for them.
            reap: unused (the pool starts no process).
        """
        with self._lock:
            self._closed = True
            running = [a for a in self._threads.values() if a is not None]
        if cancel:
            for att in running:
                att.cancel("cancel")
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        for t in threads:
            join_thread(t)
        loop, thread = self._loop, self._loop_thread
        if loop is not None and thread is not None:
            if cancel:
                for task in asyncio.all_tasks(loop):
                    loop.call_soon_threadsafe(task.cancel)
            else:
                asyncio.run_coroutine_threadsafe(_all_done(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            join_thread(thread)
            loop.close()


async def _run_direct(
    att: ThreadAttempt, task: Task, on_event: Callable[[str, float, Any], None] | None
) -> None:
    """A direct ``async def`` call on the pool's loop: its result goes to
    ``att.on_result``; ``att.future`` only starts, and fails if the task is cancelled."""
    if not att.future.set_running_or_notify_cancel():
        return  # withdrawn before it started
    try:
        result = await execute_async(task, on_event, att.cancel_event)
    except BaseException as exc:  # CancelledError too: the attempt fails with it
        att.future.set_exception(exc)
        raise
    assert att.on_result is not None
    att.on_result(result)


async def _all_done() -> None:
    """Wait for every other task on this loop (the async actions still running)."""
    me = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not me]
    if others:
        await asyncio.wait(others)
