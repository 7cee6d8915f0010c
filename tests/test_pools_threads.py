"""ThreadPool (pools/threads.py) on its own, without a Runner: tasks built as the
scheduler builds them, run on pool threads or on the pool's event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import actionpool as ap
from actionpool._worker import Result, rebuild_error
from actionpool.pools.threads import ThreadPool
from tests import helpers as h

# ---- actions (module level: the task pickles them by reference) ---------------------


def thread_name() -> str:
    return threading.current_thread().name


def emit_then_return(ctx: ap.Context) -> str:
    ctx.emit("first")
    ctx.progress(1, 2)
    ctx.emit("second")
    return "done"


async def async_where(x: int) -> tuple[int, str, bool]:
    await asyncio.sleep(0)
    running = asyncio.get_running_loop() is not None
    return x * 2, threading.current_thread().name, running


def gated(ctx: ap.Context, mark: str, release: str, report: str) -> str:
    """Mark, wait for ``release`` (ignoring any cancel), then write what
    ``ctx.cancelled()`` says to ``report``."""
    h.write_atomic(mark, threading.current_thread().name)
    h.wait_for_path(release, "the gate's release")
    h.write_atomic(report, f"cancelled: {ctx.cancelled()}")
    return threading.current_thread().name


def until_cancelled(ctx: ap.Context, mark: str, report: str) -> str:
    """Mark, then poll ``ctx.cancelled()`` (up to 30 s) and report what it said."""
    h.write_atomic(mark, threading.current_thread().name)
    deadline = time.monotonic() + 30
    while not ctx.cancelled() and time.monotonic() < deadline:
        time.sleep(0.005)
    h.write_atomic(report, f"cancelled: {ctx.cancelled()}")
    return "stopped"


async def block_the_loop(mark: str, release: str) -> str:
    """Block the event loop it runs on (no await) until ``release`` exists."""
    h.write_atomic(mark, "blocking")
    h.wait_for_path(release, "the loop's release")
    return "unblocked"


class Occupancy:
    """How many calls of :func:`occupy` run at once, and the most there ever were."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0


OCCUPANCY = Occupancy()


def occupy(mark: str, release: str) -> None:
    with OCCUPANCY.lock:
        OCCUPANCY.now += 1
        OCCUPANCY.peak = max(OCCUPANCY.peak, OCCUPANCY.now)
    try:
        h.write_atomic(mark, "in")
        h.wait_for_path(release, "the occupants' release")
    finally:
        with OCCUPANCY.lock:
            OCCUPANCY.now -= 1


# ---- fixtures and helpers -----------------------------------------------------------


@pytest.fixture
def pool() -> Iterator[ThreadPool]:
    p = ThreadPool(2)
    try:
        yield p
    finally:
        p.close(cancel=True)


def _result(fut: Future[Result]) -> Result:
    return fut.result(timeout=30)


def _pool_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("actionpool-io")}


# ---- submit ---------------------------------------------------------------------------


def test_submit_runs_the_task_on_a_pool_thread_and_its_future_gets_the_result(
    pool: ThreadPool,
) -> None:
    att = pool.submit(h.task_for(h.add, (2,), {"b": 3}))
    result = _result(att.future)
    assert h.result_value(result) == 5
    assert result.worker == att.worker and str(att.worker).startswith("actionpool-io")
    assert att.started_at is not None and att.started_at <= result.finished_at
    assert h.result_value(_result(pool.submit(h.task_for(thread_name)).future)).startswith(
        "actionpool-io"
    )


def test_an_actions_exception_is_a_failed_result_not_a_failed_future(pool: ThreadPool) -> None:
    result = _result(pool.submit(h.task_for(h.boom, ("bad input",))).future)
    assert not result.ok and result.error_type == "ValueError"
    err = rebuild_error(result)
    assert isinstance(err, ValueError) and str(err) == "bad input"
    assert "in boom" in result.traceback


def test_on_started_then_on_event_then_the_result_in_order(pool: ThreadPool) -> None:
    seen: list[tuple[Any, ...]] = []
    att = pool.submit(
        h.task_for(emit_then_return),
        on_started=lambda worker, at: seen.append(("started", worker)),
        on_event=lambda kind, at, data: seen.append((kind, data)),
    )
    att.future.add_done_callback(lambda f: seen.append(("result", h.result_value(f.result()))))
    _result(att.future)
    assert seen == [
        ("started", att.worker),
        ("emitted", "first"),
        ("progress", (1, 2)),
        ("emitted", "second"),
        ("result", "done"),
    ]


def test_async_def_actions_run_on_the_pools_event_loop(pool: ThreadPool) -> None:
    started: list[Any] = []
    att = pool.submit(
        h.task_for(async_where, (21,)),
        is_async=True,
        on_started=lambda worker, at: started.append(worker),
    )
    value, where, on_a_loop = h.result_value(_result(att.future))
    assert (value, on_a_loop) == (42, True)
    # the pool's own loop thread, never a pool thread nor this one
    assert where == "actionpool-async" and started == ["actionpool-async"]


def test_cancelling_a_running_async_action_cancels_its_task(
    pool: ThreadPool, tmp_path: Path
) -> None:
    marker = tmp_path / "async"
    att = pool.submit(h.task_for(h.async_mark_then_sleep, (str(marker), 30.0)), is_async=True)
    h.wait_for_path(marker, "the async action never started")
    att.cancel("timeout")
    assert att.killed == "timeout"
    deadline = time.monotonic() + 30
    while marker.read_text() != "cancelled":
        assert time.monotonic() < deadline, "the async action's task was not cancelled"
        time.sleep(0.005)
    assert att.future.cancelled()


# ---- cancel ---------------------------------------------------------------------------


def test_cancelling_a_running_attempt_abandons_its_thread(tmp_path: Path) -> None:
    # One thread. The first attempt blocks until released, whatever its Context says;
    # cancelled, its thread no longer counts: a fresh one serves the next attempt at
    # once, while the first still runs (and its ctx.cancelled() is True).
    pool = ThreadPool(1)
    release = tmp_path / "release"
    try:
        args = (str(tmp_path / "first"), str(release), str(tmp_path / "report"))
        first = pool.submit(h.task_for(gated, args))
        h.wait_for_path(tmp_path / "first", "the first attempt never started")
        (thread,) = [t for t in _pool_threads() if t.name == first.worker]
        first.cancel("cancel")
        assert first.killed == "cancel"
        second = pool.submit(h.task_for(thread_name))
        other = h.result_value(_result(second.future))  # the first still blocks
        assert not first.future.done()
        assert other != first.worker and other.startswith("actionpool-io")
    finally:
        release.touch()
        pool.close()
    # the abandoned thread ends with its action (it never serves again); the
    # action saw the cancel
    assert h.result_value(_result(first.future)) == first.worker
    thread.join(30)
    assert not thread.is_alive(), "the abandoned thread went back to serving"
    assert (tmp_path / "report").read_text() == "cancelled: True"


def test_a_cancel_turns_a_polling_actions_ctx_cancelled_true(
    pool: ThreadPool, tmp_path: Path
) -> None:
    args = (str(tmp_path / "mark"), str(tmp_path / "report"))
    att = pool.submit(h.task_for(until_cancelled, args))
    h.wait_for_path(tmp_path / "mark", "the attempt never started")
    att.cancel("cancel")
    h.wait_for_path(tmp_path / "report", "the action never saw its cancel")
    assert (tmp_path / "report").read_text() == "cancelled: True"


def _withdraw_behind_a_blocked_loop(pool: ThreadPool, tmp_path: Path, started: list[str]) -> None:
    """Block the pool's loop with an async action (a mistake a user can make), so that
    the next async attempt waits in the loop's queue; cancel it there, unblock the
    loop, and check that the loop goes on to the next attempt."""
    release = tmp_path / "release"
    try:
        hog = pool.submit(
            h.task_for(block_the_loop, (str(tmp_path / "hog"), str(release))), is_async=True
        )
        h.wait_for_path(tmp_path / "hog", "the loop's hog never started")
        queued = pool.submit(
            h.task_for(h.async_mark_then_sleep, (str(tmp_path / "queued"), 0.0)),
            is_async=True,
            on_started=lambda worker, at: started.append("queued"),
        )
        queued.cancel("cancel")
        assert queued.future.cancelled()
    finally:
        release.touch()
    assert _result(hog.future).ok
    after = pool.submit(h.task_for(async_where, (1,)), is_async=True)
    assert h.result_value(_result(after.future))[0] == 2


def test_cancelling_a_queued_attempt_withdraws_it(pool: ThreadPool, tmp_path: Path) -> None:
    # (A thread attempt is never left queued: submit starts a thread when none is
    # idle, the caller keeping to the pool's size. An async attempt waits in the
    # pool's loop when the loop is busy.)
    _withdraw_behind_a_blocked_loop(pool, tmp_path, [])


def test_a_withdrawn_async_attempt_never_starts(pool: ThreadPool, tmp_path: Path) -> None:
    started: list[str] = []
    _withdraw_behind_a_blocked_loop(pool, tmp_path, started)
    assert started == [] and not (tmp_path / "queued").exists()


# ---- size and close -------------------------------------------------------------------


def test_never_more_than_size_threads_serve(tmp_path: Path) -> None:
    # The caller (the scheduler's slots) hands the pool at most `size` attempts at a
    # time; the pool serves them with at most `size` threads, reusing idle ones, and
    # replaces an abandoned thread by one fresh thread.
    pool = ThreadPool(2)
    before = _pool_threads()
    OCCUPANCY.peak = 0
    try:
        for round_ in range(3):
            release = tmp_path / f"release{round_}"
            atts = [
                pool.submit(h.task_for(occupy, (str(tmp_path / f"in{round_}-{i}"), str(release))))
                for i in range(2)
            ]
            for i in range(2):
                h.wait_for_path(tmp_path / f"in{round_}-{i}", f"attempt {i} never started")
            assert len(_pool_threads() - before) == 2  # the first round's two, reused
            release.touch()
            assert all(_result(a.future).ok for a in atts)
        assert OCCUPANCY.peak == 2

        # one of two running attempts abandoned: one fresh thread takes its place
        stuck = tmp_path / "release-stuck"
        args = (str(tmp_path / "stuck"), str(stuck), str(tmp_path / "report"))
        abandoned = pool.submit(h.task_for(gated, args))
        h.wait_for_path(tmp_path / "stuck", "the attempt to abandon never started")
        abandoned.cancel("cancel")
        atts = [pool.submit(h.task_for(thread_name)) for _ in range(2)]
        names = {h.result_value(_result(a.future)) for a in atts}
        assert abandoned.worker not in names
        assert len(_pool_threads() - before) == 3  # two serving, one abandoned
    finally:
        for i in range(3):
            (tmp_path / f"release{i}").touch()
        (tmp_path / "release-stuck").touch()
        pool.close()


def test_close_waits_for_running_threads_but_not_for_abandoned_ones(tmp_path: Path) -> None:
    pool = ThreadPool(2)
    kept, dropped = tmp_path / "release-kept", tmp_path / "release-dropped"
    try:
        running = pool.submit(
            h.task_for(gated, (str(tmp_path / "a"), str(kept), str(tmp_path / "ra")))
        )
        abandoned = pool.submit(
            h.task_for(gated, (str(tmp_path / "b"), str(dropped), str(tmp_path / "rb")))
        )
        h.wait_for_path(tmp_path / "a", "the running attempt never started")
        h.wait_for_path(tmp_path / "b", "the abandoned attempt never started")
        abandoned.cancel("cancel")
        closer = threading.Thread(target=pool.close)
        closer.start()
        closer.join(0.5)
        assert closer.is_alive(), "close() returned while an attempt still ran"
        kept.touch()
        closer.join(30)
        assert not closer.is_alive(), "close() waited for an abandoned thread"
        assert running.future.done() and _result(running.future).ok
        assert not abandoned.future.done()  # still blocked: close did not wait for it
    finally:
        kept.touch()
        dropped.touch()
        pool.close()
    assert _result(abandoned.future).ok  # it ends on its own once released


def test_close_with_cancel_abandons_running_attempts(tmp_path: Path) -> None:
    pool = ThreadPool(1)
    try:
        args = (str(tmp_path / "mark"), str(tmp_path / "report"))
        att = pool.submit(h.task_for(until_cancelled, args))
        h.wait_for_path(tmp_path / "mark", "the attempt never started")
        pool.close(cancel=True)
        assert att.killed == "cancel"
        h.wait_for_path(tmp_path / "report", "the action never saw its cancel")
        assert (tmp_path / "report").read_text() == "cancelled: True"
    finally:
        pool.close()


def test_submit_after_close_raises_runtime_error() -> None:
    pool = ThreadPool(1)
    assert _result(pool.submit(h.task_for(h.add, (1, 2))).future).ok
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(h.task_for(h.add, (1, 2)))
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(h.task_for(async_where, (1,)), is_async=True)


def test_close_waits_for_running_async_actions(tmp_path: Path) -> None:
    pool = ThreadPool(1)
    marker = tmp_path / "async"
    att = pool.submit(h.task_for(h.async_mark_then_sleep, (str(marker), 0.3)), is_async=True)
    h.wait_for_path(marker, "the async action never started")
    pool.close()
    assert att.future.done() and h.result_value(att.future.result()) == "slept"
