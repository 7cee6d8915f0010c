"""ProcessPool (pools/process.py) on its own, without a Runner: tasks built as the
scheduler builds them, run in real worker processes, which really die.

What the pool must do by the Pool protocol (pools/__init__.py): run attempts, report
what happened to each (a result, a death before or while running, a kill, a
withdrawal), take work only when it can, and close without leaving a process.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import actionpool as ap
from actionpool.pools.process import ProcessAttempt, ProcessPool
from tests import fault_actions as fa
from tests import helpers as h

pytestmark = pytest.mark.slow


def emit_twice(ctx: ap.Context) -> int:
    ctx.emit("first")
    ctx.progress(1, 2)
    ctx.emit("second")
    return os.getpid()


def touch(path: str) -> int:
    Path(path).write_text("ran")
    return os.getpid()


@pytest.fixture(params=["auto", "fresh"])
def pool1(request: pytest.FixtureRequest) -> Iterator[ProcessPool]:
    pool = ProcessPool(1, 1, request.param)
    try:
        yield pool
    finally:
        pool.close(cancel=True)


@pytest.fixture
def pool2() -> Iterator[ProcessPool]:
    pool = ProcessPool(2, 1)
    try:
        yield pool
    finally:
        pool.close(cancel=True)


def gated(pool: ProcessPool, tmp_path: Path, tag: str) -> tuple[ProcessAttempt, int, Path]:
    """Submit :func:`helpers.gate`; return its attempt, its worker's pid (once it
    runs) and the release file."""
    mark, release = tmp_path / f"{tag}.mark", tmp_path / f"{tag}.release"
    att = pool.submit(h.task_for(h.gate, (str(mark), str(release))))
    return att, h.pid_in(mark), release


def test_an_attempt_reports_its_start_its_events_in_order_and_its_result(
    pool1: ProcessPool,
) -> None:
    started: list[tuple[int | str, float]] = []
    events: list[tuple[str, Any]] = []
    before = time.time()
    att = pool1.submit(
        h.task_for(emit_twice),
        on_started=lambda worker, at: started.append((worker, at)),
        on_event=lambda kind, at, data: events.append((kind, data)),
    )
    result = att.future.result(timeout=60)
    pid = h.result_value(result)
    assert pid in pool1.pids() and att.worker == pid
    assert [w for w, _ in started] == [pid] and before <= started[0][1] <= time.time()
    assert att.started and att.started_at == started[0][1]
    assert events == [("emitted", "first"), ("progress", (1, 2)), ("emitted", "second")]


def test_an_action_error_is_a_result_and_the_worker_lives_on(pool1: ProcessPool) -> None:
    failed = pool1.submit(h.task_for(h.boom, ("no",))).future.result(timeout=60)
    assert not failed.ok and failed.error_type == "ValueError" and "no" in failed.error_message
    (pid,) = pool1.pids()
    again = pool1.submit(h.task_for(h.pid)).future.result(timeout=60)
    assert h.result_value(again) == pid


def test_submit_if_idle_takes_a_task_only_while_a_worker_is_free(
    pool1: ProcessPool, tmp_path: Path
) -> None:
    # a worker that is up and idle (a pool that does not fork this process starts its
    # first worker on demand, and a worker still starting cannot take a task at once)
    pid = h.result_value(pool1.submit(h.task_for(h.pid)).future.result(timeout=60))
    mark, release = tmp_path / "mark", tmp_path / "release"
    first = pool1.submit_if_idle(h.task_for(h.gate, (str(mark), str(release))))
    assert first is not None
    assert h.pid_in(mark) == pid
    assert pool1.submit_if_idle(h.task_for(h.pid)) is None  # its one worker is busy
    release.touch()
    assert h.result_value(first.future.result(timeout=60)) == pid
    second = pool1.submit_if_idle(h.task_for(h.pid))
    assert second is not None and h.result_value(second.future.result(timeout=60)) == pid


def test_a_queued_attempt_withdrawn_never_runs(pool1: ProcessPool, tmp_path: Path) -> None:
    running, _, release = gated(pool1, tmp_path, "gate")
    witness = tmp_path / "witness"
    queued = pool1.submit(h.task_for(touch, (str(witness),)))
    queued.cancel()
    assert queued.future.cancelled()
    release.touch()
    assert running.future.result(timeout=60).ok
    # the worker has taken whatever came after the gate by the time this one returns
    assert pool1.submit(h.task_for(h.pid)).future.result(timeout=60).ok
    assert not witness.exists()


def test_cancel_kills_a_running_attempt_and_its_worker_takes_nothing_more(
    pool1: ProcessPool, tmp_path: Path
) -> None:
    running, old, _ = gated(pool1, tmp_path, "gate")
    queued = pool1.submit(h.task_for(h.pid))  # waits for the one worker
    running.cancel()
    err = running.future.exception(timeout=60)
    assert isinstance(err, ap.WorkerCrashed) and "killed to stop it (cancel)" in str(err)
    assert running.killed == "cancel" and err.signal == signal.SIGKILL
    h.wait_for(lambda: h.gone(old), what="the killed worker's exit")
    # the queued attempt ran in a fresh worker, never in the one being killed
    assert h.result_value(queued.future.result(timeout=60)) != old


def test_a_worker_that_dies_mid_action_costs_only_its_own_attempt(
    pool2: ProcessPool, tmp_path: Path
) -> None:
    survivor, survivor_pid, release = gated(pool2, tmp_path, "gate")
    crashed = pool2.submit(h.task_for(fa.exit_with, (7,)))
    err = crashed.future.exception(timeout=60)
    assert isinstance(err, ap.WorkerCrashed) and err.exitcode == 7
    assert "while running it" in str(err)
    release.touch()
    assert h.result_value(survivor.future.result(timeout=60)) == survivor_pid
    # the pool still runs two attempts at once: the dead worker was replaced
    again = [gated(pool2, tmp_path, f"again{i}") for i in range(2)]
    for _, _, release_again in again:
        release_again.touch()
    pids = {h.result_value(att.future.result(timeout=60)) for att, _, _ in again}
    assert len(pids) == 2 and survivor_pid in pool2.pids()


def test_a_segfault_is_reported_with_its_signal(pool1: ProcessPool) -> None:
    err = pool1.submit(h.task_for(fa.segfault)).future.exception(timeout=60)
    assert isinstance(err, ap.WorkerCrashed) and err.signal == signal.SIGSEGV
    assert pool1.submit(h.task_for(h.pid)).future.result(timeout=60).ok


def test_close_lets_a_running_attempt_finish(tmp_path: Path) -> None:
    pool = ProcessPool(1, 1)
    running, pid, release = gated(pool, tmp_path, "gate")
    queued = pool.submit(h.task_for(h.pid))
    closer = threading.Thread(target=pool.close)
    closer.start()
    try:
        h.wait_for(lambda: queued.future.done(), what="the queued attempt's withdrawal")
        assert queued.future.cancelled()
        assert closer.is_alive() and not running.future.done()
        release.touch()
        assert h.result_value(running.future.result(timeout=60)) == pid
        closer.join(60)
        assert not closer.is_alive() and pool.pids() == [] and h.gone(pid)
    finally:
        release.touch()
        closer.join(60)


def test_close_with_cancel_kills_running_attempts_and_leaves_no_process(
    tmp_path: Path,
) -> None:
    pool = ProcessPool(2, 1)
    first, a, _ = gated(pool, tmp_path, "a")
    second, b, _ = gated(pool, tmp_path, "b")
    zygotes = pool.zygote_pids()
    pool.close(cancel=True)
    for att in (first, second):
        err = att.future.exception(timeout=0)
        assert isinstance(err, ap.WorkerCrashed) and att.killed == "cancel"
    assert pool.pids() == [] and all(h.gone(p) for p in (a, b, *zygotes))
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(h.task_for(h.pid))
    assert pool.submit_if_idle(h.task_for(h.pid)) is None


def test_describe_says_how_many_workers_and_how_they_start() -> None:
    pool = ProcessPool(3, 2, "fresh")
    try:
        line = pool.describe()
        assert "3 worker processes" in line and "fresh" in line and "BLAS threads 2" in line
        assert pool.kind == "cpu" and pool.size == 3 and pool.stops_by_kill
    finally:
        pool.close()
