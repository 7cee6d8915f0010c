"""Runner: routing, submit, map, run/arun, closing, state isolation (real processes)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import gc
import itertools
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import actionpool as ap
from actionpool.maps import (
    MAP_ITEM_WIRE_S,
    MAP_TARGET_CHUNK_S,
    MAP_TASK_COST_S,
    _Batcher,
)
from tests import fault_actions as fa
from tests import helpers as h


@pytest.fixture(scope="module")
def shared() -> Iterator[ap.Runner]:
    with ap.Runner(cpu_workers=2, io_workers=8) as r:
        yield r


# ---- routing ------------------------------------------------------------------------


def test_cpu_actions_run_in_worker_processes_and_io_actions_in_threads(shared: ap.Runner) -> None:
    plan = ap.Plan()
    cpu = plan.add(h.pid, name="cpu")
    io = plan.add(h.io_stamp, "x", name="io")
    report = shared.run(plan)
    assert report.status is ap.RunStatus.SUCCEEDED
    assert report[cpu] != os.getpid()
    assert report.outcome(cpu).pool == "cpu"
    assert report.outcome(cpu).worker == report[cpu]
    _tag, _, _, thread = report[io]
    assert thread.startswith("actionpool-io")
    assert report.outcome(io).pool == "io"
    assert report.outcome(io).worker == thread


def test_async_io_action_runs_on_the_runners_async_loop(shared: ap.Runner) -> None:
    @ap.action(kind="io")
    async def fetch(x: int) -> tuple[int, str]:
        await asyncio.sleep(0.01)
        return x * 2, threading.current_thread().name

    # its own loop thread: a coroutine that blocks by mistake cannot stall the scheduler
    assert shared.submit(fetch, 21).result(timeout=10) == (42, "actionpool-async")


def test_async_cpu_action_runs_in_a_worker(shared: ap.Runner) -> None:
    async def double(x: int) -> tuple[int, int]:
        await asyncio.sleep(0)
        return 2 * x, os.getpid()

    value, worker_pid = shared.submit(double, 4).result(timeout=30)
    assert value == 8 and worker_pid != os.getpid()


# ---- submit -------------------------------------------------------------------------


def test_submit_returns_a_concurrent_future_with_the_value(shared: ap.Runner) -> None:
    fut = shared.submit(h.add, 2, b=3)
    assert isinstance(fut, cf.Future)
    assert fut.result(timeout=30) == 5


def test_submit_keeps_the_exception_type_message_and_remote_traceback(shared: ap.Runner) -> None:
    fut = shared.submit(h.boom, "bad input 42")
    with pytest.raises(ValueError, match="bad input 42") as info:
        fut.result(timeout=30)
    assert "in boom" in str(info.value.__cause__)  # the worker's traceback


def test_submit_pickles_arguments_at_submit_time(shared: ap.Runner) -> None:
    data = [1, 2, 3]
    fut = shared.submit(sum, data)
    data.append(100)  # the action got its own copy already
    assert fut.result(timeout=30) == 6


def test_a_future_cancelled_before_it_starts_never_runs(tmp_path: Path) -> None:
    # the only io thread is held by a gate until after the cancel: the second call
    # is certainly still queued then
    release = tmp_path / "release"
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        first = r.submit(ap.action(h.gate, kind="io"), str(tmp_path / "first"), str(release))
        second = r.submit(ap.action(fa.write, kind="io"), str(tmp_path / "second"), "ran")
        assert second.cancel()
        release.touch()
        assert first.result(timeout=30) == os.getpid()
        assert second.cancelled()
    assert not (tmp_path / "second").exists()


@contextlib.contextmanager
def _loop_held(r: ap.Runner) -> Iterator[None]:
    """Keep the runner's scheduler thread busy until the block ends (at most 60 s)."""
    busy, release = threading.Event(), threading.Event()

    def hold() -> None:
        busy.set()
        release.wait(60)

    r._loop.call_soon_threadsafe(hold)
    assert busy.wait(10), "the scheduler's loop never ran the hold"
    try:
        yield
    finally:
        release.set()


def _wait_until_started(marker: Path, what: str) -> None:
    """Wait (up to 30 s) for the action that creates ``marker`` to have started."""
    h.wait_for_path(marker, f"{what} never started")


def _wait_until(done: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``done()`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what} (waited {timeout:g} s)"
        time.sleep(0.005)


def _start_workers(r: ap.Runner, n: int, tmp_path: Path) -> list[int]:
    """Have ``n`` cpu workers up and idle: ``n`` calls that each hold a worker until
    all of them run (so no two share one); returns their pids."""
    release = tmp_path / "workers-up"
    marks = [tmp_path / f"worker-{i}" for i in range(n)]
    futs = [r.submit(h.gate, str(m), str(release)) for m in marks]
    for m in marks:
        _wait_until_started(m, "a warm-up call")
    release.touch()
    pids = [f.result(timeout=30) for f in futs]
    assert len(set(pids)) == n, pids
    return pids


def test_a_call_reaches_an_idle_worker_while_the_scheduler_thread_is_busy(
    tmp_path: Path,
) -> None:
    # submit sends a plain cpu call to an idle worker from the caller's thread; the
    # scheduler's thread only does the bookkeeping, when it gets to it (memory_floor=0:
    # no memory check due, which the scheduler's thread would have to make first)
    marker = tmp_path / "ran"
    with ap.Runner(cpu_workers=1, io_workers=1, memory_floor=0) as r:
        r.submit(h.square, 1).result(timeout=30)  # the worker is up and idle
        with _loop_held(r):
            fut = r.submit(h.mark_then_sleep, str(marker), 0.0)
            _wait_until_started(marker, "the call sent while the scheduler's thread was busy")
            assert not fut.cancel()  # it started: too late to withdraw it
        assert fut.exception(timeout=30) is None


@pytest.mark.zygote_path
def test_a_thread_waiting_on_a_call_reads_its_result_while_the_loop_is_busy() -> None:
    # The thread in result() reads a direct call's reply from the worker's socket
    # itself (CallFuture): the scheduler's loop, held busy, is needed neither to send
    # the call nor to end it, and the slot is given back all the same.
    with ap.Runner(cpu_workers=1, io_workers=1, memory_floor=0) as r:
        r.submit(h.square, 1).result(timeout=30)  # the worker is up and idle
        with _loop_held(r):  # both end while the loop is held
            assert r.submit(h.square, 3).result(timeout=30) == 9
            assert r.submit(h.square, 4).exception(timeout=30) is None
            assert not r._calls.direct and r._sched.admission.free_slots("cpu") == 1
        assert r.submit(h.square, 5).result(timeout=30) == 25


def test_a_result_timeout_hands_the_reading_back_to_the_loop() -> None:
    # A thread whose result(timeout) expires stops reading the worker's socket: the
    # loop reads the reply when it comes (cf.wait calls no result()), and a later
    # result() gets it.
    with ap.Runner(cpu_workers=1, io_workers=1, memory_floor=0) as r:
        r.submit(h.square, 1).result(timeout=30)  # the worker is up and idle
        fut = r.submit(h.sleep_then, 7, 0.5)
        with pytest.raises(cf.TimeoutError):
            fut.result(timeout=0.05)
        assert fut in cf.wait([fut], timeout=30).done
        assert fut.result(timeout=0) == 7
        slow = r.submit(h.sleep_then, 8, 0.5)
        with pytest.raises(cf.TimeoutError):
            slow.exception(timeout=0.05)
        assert slow.result(timeout=30) == 8


def test_a_freed_worker_gets_the_next_waiting_call_before_the_caller_is_woken() -> None:
    # One worker, three calls: the first is sent at once, the others wait for its slot.
    # When the loop reads a result, the worker's next call is sent before the caller's
    # future is set (whose done-callbacks run right there, on the loop): the caller,
    # woken, takes the GIL, and the worker would wait for it otherwise. Both paths:
    # the call sent from the caller's thread, and a call the scheduler dispatched.
    with ap.Runner(cpu_workers=1, io_workers=1, memory_floor=0) as r:
        r.submit(h.square, 1).result(timeout=30)  # the worker is up and idle
        pool = r._pools["cpu"]
        seen: dict[int, bool] = {}

        def busy_worker(i: int) -> Callable[[cf.Future[Any]], None]:
            def check(_: cf.Future[Any]) -> None:
                seen[i] = any(w.attempt is not None for w in list(pool._workers.values()))

            return check

        futs = [r.submit(h.sleep_then, i, 0.2) for i in range(3)]
        for i, fut in enumerate(futs):
            fut.add_done_callback(busy_worker(i))
        done, _ = cf.wait(futs, timeout=30)  # no result(): the loop reads every reply
        assert len(done) == 3
        assert [f.result() for f in futs] == [0, 1, 2]
        assert seen == {0: True, 1: True, 2: False}  # the last had no call behind it


@pytest.mark.zygote_path
def test_the_loop_does_not_block_on_a_socket_whose_message_another_thread_took() -> None:
    # The loop polls every worker socket, then reads each readable one; a thread in
    # read_result may take a message in between. Reading that socket then would block
    # the loop until the worker's next message: an idle worker sends none.
    with ap.Runner(cpu_workers=1, io_workers=1, memory_floor=0) as r:
        r.submit(h.square, 1).result(timeout=30)  # the worker is up and idle
        pool = r._pools["cpu"]
        (w,) = list(pool._workers.values())
        handled: cf.Future[None] = cf.Future()
        r._loop.call_soon_threadsafe(lambda: handled.set_result(pool._on_readable(w)))
        try:
            handled.result(timeout=10)
        finally:
            if not handled.done():  # it blocked: its read ends when the worker dies
                os.kill(w.pid, signal.SIGKILL)
        assert r.submit(h.square, 3).result(timeout=30) == 9


def test_a_waiting_thread_spins_only_after_short_actions_and_with_a_core_to_spare(
    tmp_path: Path,
) -> None:
    # read_result polls the socket without sleeping before it blocks (spin, then
    # block) only while the recent actions were short, and never while every core
    # has a busy worker: a spin would then take CPU from the workers.
    with ap.Runner(cpu_workers=1, io_workers=1, memory_floor=0) as r:
        pool = r._pools["cpu"]
        pool.cores = 2  # as on a machine with a core to spare, whatever this one has
        for _ in range(3):
            assert r.submit(h.sleep_then, 1, 0.05).result(timeout=30) == 1
        assert pool._spin_for(None) == 0  # 50 ms actions: a spin would be wasted
        for _ in range(40):
            assert r.submit(abs, -1).result(timeout=30) == 1
        assert 0 < pool._spin_for(None) <= 0.001  # no-ops: their replies come at once
        assert pool._spin_for(0.00001) <= 0.00001  # never past the caller's timeout
        pool.cores = 1
        busy = r.submit(h.gate, str(tmp_path / "busy"), str(tmp_path / "release"))
        _wait_until_started(tmp_path / "busy", "the busy call")
        assert pool._spin_for(None) == 0  # its worker has the only core
        (tmp_path / "release").touch()
        assert busy.result(timeout=30) in r.worker_pids()


def test_a_call_waits_for_a_free_cpu_slot_even_with_an_idle_worker(tmp_path: Path) -> None:
    # memory_floor=0: no memory check that would send a call through the scheduler anyway
    with ap.Runner(cpu_workers=2, io_workers=1, memory_floor=0) as r:
        _start_workers(r, 2, tmp_path)
        wide = ap.action(h.mark_then_sleep, threads=2)  # takes both cpu slots, one worker

        # 1. the scheduler has given both slots to a wide call: the idle worker is not free
        marker = tmp_path / "first"
        first = r.submit(wide, str(marker), 0.5)
        _wait_until_started(marker, "the wide call")
        later = r.submit(h.stamp, "later")
        _, first_end = first.result(timeout=30)
        assert later.result(timeout=30)[1] >= first_end - 0.01

        # 2. the scheduler has not seen the wide call yet: the next call waits behind it
        with _loop_held(r):
            second = r.submit(wide, str(tmp_path / "second"), 0.5)
            right_after = r.submit(h.stamp, "right after")
        _, second_end = second.result(timeout=30)
        assert right_after.result(timeout=30)[1] >= second_end - 0.01


def test_a_call_sent_from_the_callers_thread_holds_its_slot_until_it_ends(
    tmp_path: Path,
) -> None:
    # A plain call that finds an idle worker is sent by submit itself and has no
    # record on the scheduler's side; it must still count against the cpu slots: a
    # call needing both slots waits for it, then starts once it ends.
    with ap.Runner(cpu_workers=2, io_workers=1, memory_floor=0) as r:
        _start_workers(r, 2, tmp_path)
        marker = tmp_path / "narrow"
        narrow = r.submit(h.mark_then_sleep, str(marker), 0.5)
        _wait_until_started(marker, "the narrow call")
        wide = r.submit(ap.action(h.stamp, threads=2), "wide")  # a worker is idle
        _, narrow_end = narrow.result(timeout=30)
        _, wide_start, _ = wide.result(timeout=30)
        assert wide_start >= narrow_end - 0.01


def test_a_cancelled_or_crashed_call_gives_its_slot_back(tmp_path: Path) -> None:
    # One cpu slot: had a call sent by submit kept its slot after it was cancelled or
    # its worker died, no plan node could ever be dispatched again (the suite's
    # timeout ends the test).
    with ap.Runner(cpu_workers=1, io_workers=1, memory_floor=0) as r:
        r.submit(h.square, 1).result(timeout=30)  # the worker is up and idle
        marker = tmp_path / "long"
        long = r.submit(h.mark_then_sleep, str(marker), 60)
        _wait_until_started(marker, "the call")
        worker = r.worker_pids()[0]
        r.cancel()
        with pytest.raises(cf.CancelledError, match="cancelled"):
            long.result(timeout=0)  # ended by cancel() itself
        assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == "zombie"
        plan = ap.Plan()
        plan.add(h.square, 3)
        report = r.run(plan)  # hangs (pytest-timeout) if the slot was lost
        assert report.status is ap.RunStatus.SUCCEEDED and list(report.values.values()) == [9]

        crashed = r.submit(fa.exit_with, 3)
        with pytest.raises(ap.WorkerCrashed):
            crashed.result(timeout=30)
        plan = ap.Plan()
        plan.add(h.square, 4)
        report = r.run(plan)  # hangs (pytest-timeout) if the slot was lost
        assert report.status is ap.RunStatus.SUCCEEDED and list(report.values.values()) == [16]


def test_an_io_call_sent_from_the_callers_thread_holds_its_slot_and_wakes_a_waiting_node(
    tmp_path: Path,
) -> None:
    # A plain io call is queued for a thread by submit itself, and that thread ends
    # it, with no record and no hop to the scheduler's loop. It must still hold its io
    # slot (the node below waits for it), and its end must wake the loop for that node
    # (memory_floor=0: no memory reading wakes it otherwise; pytest-timeout if not).
    slow = ap.action(h.mark_then_sleep, kind="io")
    with ap.Runner(cpu_workers=1, io_workers=1, memory_floor=0) as r:
        marker = tmp_path / "call"
        call = r.submit(slow, str(marker), 0.5)
        assert len(r._calls.direct) == 1 and not r._calls.live  # no record
        _wait_until_started(marker, "the io call")
        plan = ap.Plan()
        plan.add(ap.action(h.stamp, kind="io"), "node")
        report = r.run(plan)
        _, call_end = call.result(timeout=30)
        ((_, node_start, _),) = report.values.values()
        assert node_start >= call_end - 0.01


def test_a_cancelled_io_call_gives_its_slot_back_at_once(tmp_path: Path) -> None:
    # A thread cannot be killed: a cancelled io call's thread is abandoned (it sleeps
    # on), and the call's slot is free at once, as a plan node's would be; else the
    # node below waits for the sleep to end.
    slow = ap.action(h.mark_then_sleep, kind="io")
    with ap.Runner(cpu_workers=1, io_workers=1, memory_floor=0) as r:
        marker = tmp_path / "call"
        call = r.submit(slow, str(marker), 10)
        _wait_until_started(marker, "the io call")
        started = time.time()
        r.cancel()
        with pytest.raises(cf.CancelledError, match="cancelled"):
            call.result(timeout=0)  # ended by cancel() itself
        plan = ap.Plan()
        plan.add(ap.action(h.stamp, kind="io"), "node")
        report = r.run(plan)
        ((_, node_start, _),) = report.values.values()
        assert node_start < started + 9  # the call's thread sleeps until started + ~10


def test_an_io_call_is_ended_by_its_thread_with_its_value_or_its_error() -> None:
    # The thread that ran a direct io call sets its future: a value or the action's
    # own exception; a map of many such calls keeps its order, and closing the
    # runner waits for those in flight.
    io_square = ap.action(h.square, kind="io")
    with ap.Runner(cpu_workers=1, io_workers=4, memory_floor=0) as r:
        assert r.submit(io_square, 7).result(timeout=30) == 49
        with pytest.raises(ValueError, match="boom"):
            r.submit(ap.action(h.boom, kind="io"), "boom").result(timeout=30)
        assert list(r.map(io_square, range(200))) == [i * i for i in range(200)]
        late = [r.submit(ap.action(h.sleep_then, kind="io"), i, 0.2) for i in range(4)]
    assert [f.result(timeout=0) for f in late] == [0, 1, 2, 3]  # the runner waited
    assert r._calls.handed == r._calls.ended and not r._calls.direct


def test_an_async_io_call_runs_on_the_pools_loop_without_a_record(tmp_path: Path) -> None:
    # A plain async def io call is started on the io pool's loop by submit itself and
    # ended there: its value or its error, no record. Cancelled while it runs, its
    # task is cancelled and its slot is free at once (else the node below waits).
    with ap.Runner(cpu_workers=1, io_workers=1, memory_floor=0) as r:
        assert r.submit(ap.action(h.async_square, kind="io"), 9).result(timeout=30) == 81
        marker = tmp_path / "call"
        call = r.submit(ap.action(h.async_mark_then_sleep, kind="io"), str(marker), 10)
        assert len(r._calls.direct) == 1 and not r._calls.live  # no record
        _wait_until_started(marker, "the async call")
        started = time.time()
        r.cancel()
        with pytest.raises(cf.CancelledError, match="cancelled"):
            call.result(timeout=0)  # ended by cancel() itself
        deadline = time.monotonic() + 30
        while marker.read_text() != "cancelled":  # the task itself was cancelled
            assert time.monotonic() < deadline, "the async call's task was not cancelled"
            time.sleep(0.005)
        plan = ap.Plan()
        plan.add(ap.action(h.stamp, kind="io"), "node")
        ((_, node_start, _),) = r.run(plan).values.values()
        assert node_start < started + 9  # the call would have slept until ~started + 10
        assert r.submit(ap.action(h.async_square, kind="io"), 3).result(timeout=30) == 9


def test_attempts_are_freed_without_the_cyclic_garbage_collector() -> None:
    # An attempt that lived on in a reference cycle (its future -> a done-callback ->
    # the attempt) was ~20 objects per node for the cyclic GC, which then took ~10%
    # of a 5,000-node plan's run. Here every attempt must go by reference counting:
    # none may be among the unreachable objects a collection finds.
    from actionpool.pools.process import ProcessAttempt
    from actionpool.pools.threads import ThreadAttempt
    from actionpool.scheduler import NodeRecord

    # Records an earlier test left alive (an abandoned io thread that still sleeps holds
    # its attempt) are not this test's: held here, so that no new record takes an id.
    earlier = [o for o in gc.get_objects() if isinstance(o, NodeRecord)]
    earlier_ids = {id(o) for o in earlier}
    with ap.Runner(cpu_workers=2, io_workers=2, memory_floor=0) as r:
        assert r.submit(h.square, 2).result(timeout=30) == 4
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            calls = [r.submit(h.square, i).result(timeout=30) for i in range(50)]
            plan = ap.Plan()
            cpu = [plan.add(h.square, i) for i in range(50)]
            io = [plan.add(ap.action(h.io_stamp, kind="io"), str(i)) for i in range(20)]
            plan.add(sum, cpu)
            status = r.run(plan).status  # (an assert's temporaries would keep the report)
            del plan, cpu, io
            gc.collect()
            attempts = [o for o in gc.garbage if isinstance(o, (ProcessAttempt, ThreadAttempt))]
            # and the finished run's records went by reference counting too (a finished
            # run lets go of them), and nothing kept them: an idle io thread once held
            # its last attempt, and through it every record
            released = sum(isinstance(o, NodeRecord) for o in gc.garbage)
            alive = sum(
                isinstance(o, NodeRecord) and id(o) not in earlier_ids for o in gc.get_objects()
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert calls == [i * i for i in range(50)]
        assert status is ap.RunStatus.SUCCEEDED
        assert attempts == [], [type(a).__name__ for a in attempts]
        assert released == 0, "released"
        assert alive == 0, "alive"


def test_runner_is_an_executor_for_run_in_executor(shared: ap.Runner) -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(shared, h.square, 7)

    assert asyncio.run(main()) == 49


def test_submit_to_a_closed_runner_raises() -> None:
    r = ap.Runner(cpu_workers=1, io_workers=1)
    r.close()
    with pytest.raises(RuntimeError, match="closed"):
        r.submit(h.square, 2)


# ---- map ----------------------------------------------------------------------------


def test_map_yields_in_input_order(shared: ap.Runner) -> None:
    # later items finish first: order must still follow the input
    delays = [0.3, 0.2, 0.1, 0.0]
    out = list(shared.map(h.sleep_then, range(4), delays))
    assert out == [0, 1, 2, 3]


def test_map_forwards_keyword_arguments(shared: ap.Runner) -> None:
    assert list(shared.map(h.add, range(5), b=10)) == [10, 11, 12, 13, 14]


def test_map_streams_an_endless_iterator_with_a_bounded_window(shared: ap.Runner) -> None:
    pulled = 0

    def numbers() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    results = shared.map(h.square, numbers(), window=4)
    first = list(itertools.islice(results, 20))
    assert first == [i * i for i in range(20)]
    assert pulled <= 20 + 4 + 1  # never more than the window ahead of the consumer
    results.close()  # type: ignore[attr-defined]


def test_map_raises_the_actions_exception_at_its_item(shared: ap.Runner) -> None:
    def maybe_fail(x: int) -> int:
        if x == 3:
            raise KeyError(f"item {x}")
        return x

    seen = []
    with pytest.raises(KeyError, match="item 3"):
        for y in shared.map(maybe_fail, range(10)):
            seen.append(y)
    assert seen == [0, 1, 2]


def test_map_with_chunks_keeps_order_and_errors(shared: ap.Runner) -> None:
    assert list(shared.map(h.square, range(23), chunksize=5)) == [i * i for i in range(23)]

    def fail_at_7(x: int) -> int:
        if x == 7:
            raise ValueError("seven")
        return x

    seen = []
    with pytest.raises(ValueError, match="seven"):
        for y in shared.map(fail_at_7, range(20), chunksize=4):
            seen.append(y)
    assert seen == list(range(7))


class _Items(list):  # type: ignore[type-arg]
    """A list subclass: sliced by islice, as any other iterable (it may slice oddly)."""


@pytest.mark.parametrize(
    "make",
    [list, tuple, lambda xs: range(len(xs)), _Items, iter],
    ids=["list", "tuple", "range", "list-subclass", "iterator"],
)
def test_map_of_a_list_tuple_or_range_sends_slices_with_the_same_results(
    shared: ap.Runner, make: Callable[[list[int]], Any]
) -> None:
    xs = list(range(23))
    assert list(shared.map(h.square, make(xs), chunksize=5)) == [i * i for i in xs]
    seen = []
    with pytest.raises(ValueError, match="seven"):  # a failed item within a slice
        for y in shared.map(h.fail_at, make(xs), bad=7, chunksize=4):
            seen.append(y)
    assert seen == list(range(7))
    # the chunks in flight: slices of the input's own type, else lists
    seq = make(xs)
    it = shared.map(h.square, seq, chunksize=5)
    assert next(it) == 0
    in_flight = [call[1] for call in it._tasks.gi_frame.f_locals["pending"]]
    sliced = type(seq) in (list, tuple, range)
    assert in_flight and {type(c) for c in in_flight} == ({type(seq)} if sliced else {list})
    assert list(it) == [i * i for i in xs[1:]]


def _sizes(b: _Batcher, n: int) -> list[int]:
    return [len(c) for c, _ in b.chunks(iter(range(n)))]


def test_map_chunks_start_at_an_even_share_with_a_budget_then_follow_the_measure() -> None:
    # nothing measured yet: an even share per worker, each with a time budget
    cold = _Batcher(None, 2, 20_000, 100_000)
    assert [(len(c), b) for c, b in cold.chunks(iter(range(20_000)))] == [
        (10_000, MAP_TARGET_CHUNK_S)
    ] * 2
    # ... unless the input is long: then the pipelined size, about sqrt(n x
    # MAP_TASK_COST_S / (2 x workers x MAP_ITEM_WIRE_S)) items, a whole number of
    # chunks per worker
    big = _Batcher(None, 2, 1_000_000, 100_000)
    best = math.sqrt(1_000_000 * MAP_TASK_COST_S / (2 * 2 * MAP_ITEM_WIRE_S))
    n = big.next_size()
    assert best <= n < 2 * best and big.budget() == MAP_TARGET_CHUNK_S
    sizes = _sizes(_Batcher(None, 2, 1_000_000, 100_000), 1_000_000)
    assert len(sizes) % 2 == 0 and len(set(sizes[:-1])) == 1 and sum(sizes) == 1_000_000
    # measured (here: 1 ms an item): multiprocessing.Pool.map's ceil(n / (4 x workers))
    # at most, cut to MAP_TARGET_CHUNK_S of work, with no budget; the rest of a
    # budgeted chunk is cut the same way
    cold.observe(elapsed=1e-3, count=1)
    assert cold.budget() is None and cold.next_size() == int(MAP_TARGET_CHUNK_S / 1e-3)
    assert [len(c) for c in cold.cut(range(120))] == [50, 50, 20]
    # tiny items (0.1 us): chunks grow to an even share per worker, not one item more,
    # and for a long map stay at the pipelined size
    tiny = {b"f": 1e-7}
    assert _sizes(_Batcher(None, 2, 20_000, 100_000, tiny, b"f"), 20_000) == [10_000] * 2
    assert _sizes(_Batcher(None, 2, 1_000_000, 100_000, tiny, b"f"), 1_000_000) == sizes
    # 1 ms items: Pool's size is already past MAP_MIN_CHUNK_S; MAP_TARGET_CHUNK_S caps it
    slow = {b"f": 1e-3}
    target = int(MAP_TARGET_CHUNK_S / 1e-3)
    assert _sizes(_Batcher(None, 2, 20_000, 100_000, slow, b"f"), 20_000)[:3] == [target] * 3
    # unknown length: one item until one is measured
    assert _Batcher(None, 2, None, 100_000).next_size() == 1
    # then 50 ms of work, at most a worker's share of the largest chunk, so that an
    # input that ends within one chunk still uses both workers
    assert _Batcher(None, 2, None, 100_000, tiny, b"f").next_size() == 50_000
    # a fixed chunksize is the caller's
    assert _sizes(_Batcher(7, 2, 20, 100_000, tiny, b"f"), 20) == [7, 7, 6]


def test_a_map_leaves_its_per_item_time_for_the_next_map_of_that_function() -> None:
    with ap.Runner(cpu_workers=2, io_workers=1) as r:
        assert list(r.map(h.square, range(1000))) == [i * i for i in range(1000)]
        (per_item,) = r._map_speeds.values()
        assert 0 < per_item < 0.01  # seconds per square(), measured in the workers
        b = _Batcher(None, 2, 1000, 100_000, r._map_speeds, next(iter(r._map_speeds)))
        assert b.per_item == per_item


def test_a_worker_sends_its_result_before_it_frees_the_calls_objects() -> None:
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        pid = r.submit(fa.slow_pid, 0).result(timeout=60)  # the worker is up
        t0 = time.monotonic()
        assert r.submit(fa.worker_pid, fa.SlowToFree(2.0)).result(timeout=60) == pid
        assert time.monotonic() - t0 < 1.0  # not after the 2 s its copy takes to free


def test_map_timeout_raises_timeout_error(shared: ap.Runner) -> None:
    it = shared.map(h.sleep_then, [1], [2.0], timeout=0.2)
    with pytest.raises(TimeoutError):
        next(it)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_map_rejects_bad_window_and_chunksize(shared: ap.Runner, bad: object) -> None:
    with pytest.raises(ValueError, match="window"):
        shared.map(h.square, range(3), window=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunksize"):
        shared.map(h.square, range(3), chunksize=bad)  # type: ignore[arg-type]


# ---- run ----------------------------------------------------------------------------


def test_run_resolves_nodes_in_arguments_lists_tuples_and_dicts(shared: ap.Runner) -> None:
    plan = ap.Plan()
    a = plan.add(h.add, 1, 2, name="a")
    b = plan.add(h.square, a, name="b")
    c = plan.add(h.io_stamp, "c", name="c")

    def combine(x: list[int], pair: tuple[int, int], d: dict[str, int]) -> int:
        return sum(x) + sum(pair) + sum(d.values())

    total = plan.add(combine, [a, b], (b, 1), {"a": a, "k": 5}, name="total")
    after = plan.add(h.add, 0, name="after", after=["total", c])
    report = shared.run(plan)
    assert report[total] == (3 + 9) + (9 + 1) + (3 + 5)
    assert report[after] == 0
    assert report.values["b"] == 9
    assert [o.name for o in report.outcomes] == ["a", "b", "c", "total", "after"]


def test_after_nodes_finish_before_the_node_starts(shared: ap.Runner) -> None:
    plan = ap.Plan()
    first = plan.add(h.stamp, "first", 0.2, name="first")
    second = plan.add(h.stamp, "second", name="second", after=[first])
    report = shared.run(plan)
    assert report[second][1] >= report[first][2]


def test_nodes_start_when_their_own_dependencies_finish(shared: ap.Runner) -> None:
    # slow (1.5 s) and fast (0 s) start together; child depends on fast only, so it
    # must start long before slow finishes: no level-by-level barrier.
    plan = ap.Plan()
    slow = plan.add(h.io_stamp, "slow", 1.5, name="slow")
    fast = plan.add(h.io_stamp, "fast", 0.0, name="fast")
    child = plan.add(h.io_stamp, "child", 0.0, name="child", after=[fast])
    report = shared.run(plan)
    assert report[child][1] < report[slow][2] - 0.5


def test_cpu_and_io_nodes_overlap(shared: ap.Runner) -> None:
    plan = ap.Plan()
    cpu = plan.add(h.stamp, "cpu", 0.6, name="cpu")
    io = plan.add(h.io_stamp, "io", 0.6, name="io")
    report = shared.run(plan)
    _, c0, c1 = report[cpu]
    _, i0, i1, _ = report[io]
    assert max(c0, i0) < min(c1, i1)  # the two intervals intersect


def test_arun_from_async_code(shared: ap.Runner) -> None:
    plan = ap.Plan()
    a = plan.add(h.square, 6)

    async def main() -> ap.Report:
        return await shared.arun(plan)

    assert asyncio.run(main())[a] == 36


def test_arun_does_not_block_the_callers_loop(shared: ap.Runner) -> None:
    plan = ap.Plan()
    plan.add(h.io_stamp, "slow", 0.5)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    async def main() -> None:
        t = asyncio.create_task(ticker())
        await shared.arun(plan)
        t.cancel()

    asyncio.run(main())
    assert ticks >= 5


def test_a_plan_can_run_twice(shared: ap.Runner) -> None:
    plan = ap.Plan()
    a = plan.add(h.square, 3)
    assert shared.run(plan)[a] == 9
    assert shared.run(plan)[a] == 9


def test_concurrent_runs_from_threads(shared: ap.Runner) -> None:
    def one(i: int) -> int:
        plan = ap.Plan()
        n = plan.add(h.square, i)
        return int(shared.run(plan)[n])

    with cf.ThreadPoolExecutor(4) as ex:
        assert list(ex.map(one, range(8))) == [i * i for i in range(8)]


def test_run_rejects_bad_options_before_running(shared: ap.Runner) -> None:
    plan = ap.Plan()
    plan.add(h.square, 1)
    with pytest.raises(ap.PlanError, match="failure"):
        shared.run(plan, failure="sometimes")
    with pytest.raises(ap.PlanError, match="reducer for state key 'k'"):
        shared.run(plan, reducers={"k": 3})  # type: ignore[dict-item]
    with pytest.raises(ap.PlanError, match="takes a Plan"):
        shared.run([h.square])  # type: ignore[arg-type]


def test_empty_plan_succeeds(shared: ap.Runner) -> None:
    report = shared.run(ap.Plan(), state={"a": 1})
    assert report.status is ap.RunStatus.SUCCEEDED
    assert report.outcomes == ()
    assert report.state == {"a": 1}


# ---- state isolation ------------------------------------------------------------------


@pytest.mark.parametrize("action", [h.mutate_state, h.io_mutate_state])
def test_every_action_gets_a_private_copy_of_the_state(
    shared: ap.Runner, action: ap.ActionSpec
) -> None:
    state = {"items": ["start"]}
    plan = ap.Plan()
    nodes = [plan.add(action, name=f"n{i}") for i in range(4)]
    report = shared.run(plan, state=state)
    for n in nodes:
        value = report[n]
        assert len(value) == 2 and value[0] == "start"  # never sees the others' appends
    assert state == {"items": ["start"]}  # the caller's object is untouched
    assert report.state == {"items": ["start"]}


def test_io_action_arguments_are_private_copies(shared: ap.Runner) -> None:
    @ap.action(kind="io")
    def grow(xs: list[int]) -> list[int]:
        xs.append(1)
        return xs

    data: list[int] = []
    plan = ap.Plan()
    a = plan.add(grow, data)
    b = plan.add(grow, data)
    report = shared.run(plan)
    assert report[a] == [1] and report[b] == [1] and data == []


def test_context_fields(shared: ap.Runner) -> None:
    def info(ctx: ap.Context) -> tuple[str, str, int, bool]:
        return ctx.node, ctx.run_id, ctx.attempt, ctx.cancelled()

    plan = ap.Plan()
    n = plan.add(info, name="who")
    report = shared.run(plan)
    assert report[n] == ("who", report.run_id, 1, False)


# ---- closing --------------------------------------------------------------------------


def test_no_worker_survives_the_with_block() -> None:
    with ap.Runner(cpu_workers=2, io_workers=2) as r:
        pids = set(r.map(h.pid, range(20)))
        assert os.getpid() not in pids
        assert all(psutil.pid_exists(p) for p in pids)
    for p in pids:
        assert not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE


def test_close_waits_for_submitted_work() -> None:
    r = ap.Runner(cpu_workers=1, io_workers=1)
    futs = [r.submit(h.sleep_then, i, 0.1) for i in range(3)]
    r.close()
    assert [f.result(timeout=0) for f in futs] == [0, 1, 2]


def test_a_result_that_arrives_after_its_call_was_cancelled_still_ends_it() -> None:
    # The loop is held while the worker replies and a cancel is queued, so the cancel
    # runs first and the reply is read after it: the call must end CancelledError and
    # still give its slot back (its attempt had no death to report it).
    with ap.Runner(cpu_workers=1, io_workers=1, memory_floor=0) as r:
        assert r.submit(h.square, 2).result(timeout=30) == 4  # warm: sent by submit
        (worker,) = list(r._pools["cpu"]._workers.values())
        with _loop_held(r):
            fut = r.submit(h.square, 3)
            # the reply (a plain call announces no start: the only message) is in the
            # socket; poll() reads nothing, and the held loop cannot read it yet
            assert worker.conn.poll(30), "the worker never replied"
            r._loop.call_soon_threadsafe(r._calls.stop_direct, "a test's cancel")
        # not fut.result(), which would read the reply itself (CallFuture), first
        assert fut in cf.wait([fut], timeout=30).done
        with pytest.raises(cf.CancelledError, match="a test's cancel"):
            fut.result(timeout=0)
        _wait_until(lambda: not r._calls.direct, "the cancelled call was never let go")
        assert r._sched.admission.free_slots("cpu") == 1
        assert r.submit(h.square, 4).result(timeout=30) == 16


def test_on_event_runs_on_the_scheduler_thread_which_refuses_run_and_takes_cancel() -> None:
    # on_event is called on the scheduler's own thread: a run() from there could only
    # deadlock (refused), and a cancel() from there must act at once, not wait for it.
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        refused: list[str] = []

        def on_event(ev: ap.Event) -> None:
            if ev.kind == "started" and not refused:
                try:
                    r.run(ap.Plan())
                except RuntimeError as exc:
                    refused.append(str(exc))
                r.cancel()

        plan = ap.Plan()
        plan.add(fa.sleep_long, 30.0, None)
        report = r.run(plan, on_event=on_event)
        assert report.status is ap.RunStatus.CANCELLED
        assert refused and "scheduler thread" in refused[0]


def test_close_waits_for_a_call_that_submit_sent_itself() -> None:
    r = ap.Runner(cpu_workers=1, io_workers=1, memory_floor=0)
    assert r.submit(h.square, 2).result(timeout=30) == 4  # the worker is up and idle
    fut = r.submit(h.sleep_then, 7, 0.3)  # sent by submit: no record on the loop
    r.close()
    assert fut.result(timeout=0) == 7


def test_close_waits_for_a_plan_running_in_another_thread(tmp_path: Path) -> None:
    r = ap.Runner(cpu_workers=1, io_workers=1)
    plan = ap.Plan()
    plan.add(h.mark_then_sleep, str(tmp_path / "started"), 0.3)
    reports: list[ap.Report] = []
    thread = threading.Thread(target=lambda: reports.append(r.run(plan)))
    thread.start()
    try:
        _wait_until_started(tmp_path / "started", "the plan's node")
    finally:
        r.close()  # no call in flight, but a run is
    assert [rep.status for rep in reports] == [ap.RunStatus.SUCCEEDED]
    thread.join(30)


def test_leaving_the_block_on_an_error_does_not_wait_for_queued_calls() -> None:
    start = time.monotonic()
    with (
        pytest.raises(RuntimeError, match="user error"),
        ap.Runner(cpu_workers=1, io_workers=1) as r,
    ):
        futs = [r.submit(h.io_stamp, i, 0.3) for i in range(10)]
        raise RuntimeError("user error")
    assert time.monotonic() - start < 3.0  # not 10 x 0.3 s
    assert sum(f.cancelled() for f in futs) >= 5


def test_an_idle_runner_starts_no_process() -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with ap.Runner(cpu_workers=2, io_workers=2) as r:
        assert r.submit(h.io_stamp, "x").result(timeout=30)[0] == "x"
        now = psutil.Process().children(recursive=True)
        assert not [
            p for p in now if p.pid not in before and "LokyProcess" in " ".join(p.cmdline())
        ]


def test_repr_and_sizing(shared: ap.Runner) -> None:
    assert isinstance(shared.sizing, ap.Sizing)
    assert shared.sizing.cpu_workers == 2 and shared.sizing.io_workers == 8
    assert "open" in repr(shared)


LIMIT = 5


def test_a_by_value_function_sees_changed_globals_in_the_next_run(shared: ap.Runner) -> None:
    # A function defined in a test body travels by value, with the globals it reads;
    # it is pickled once per run, so a global changed between runs is seen.
    global LIMIT

    def read_limit() -> int:
        return LIMIT

    plan = ap.Plan()
    n = plan.add(read_limit)
    assert shared.run(plan)[n] == 5
    LIMIT = 10
    try:
        assert shared.run(plan)[n] == 10
        assert shared.submit(read_limit).result(timeout=30) == 10
        assert list(shared.map(lambda _: LIMIT, range(3), chunksize=1)) == [10] * 3
    finally:
        LIMIT = 5


def test_progress_true_draws_a_tqdm_bar_to_the_end(
    shared: ap.Runner, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tqdm")
    plan = ap.Plan()
    for i in range(5):
        plan.add(h.square, i)
    report = shared.run(plan, progress=True)
    assert report.status is ap.RunStatus.SUCCEEDED
    err = capsys.readouterr().err
    assert "actionpool" in err and "5/5" in err


def test_progress_without_tqdm_is_an_import_error_saying_how_to_install_it(
    shared: ap.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    h.hide_package(monkeypatch, "tqdm")
    plan = ap.Plan()
    plan.add(h.square, 2)
    with pytest.raises(ImportError, match=r"pip install 'actionpool\[progress\]'") as info:
        shared.run(plan, progress=True)
    assert info.value.name == "tqdm"


def test_an_unknown_backend_or_a_dask_option_without_dask_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match=r"backend must be one of \('local', 'dask'\), got 'ray'"):
        ap.Runner(backend="ray")
    with pytest.raises(ValueError, match="address, io_on_cluster need backend='dask'"):
        ap.Runner(address="tcp://127.0.0.1:8786", io_on_cluster=True)


# ---- shutdown, as concurrent.futures.Executor has it ----------------------------------


def test_shutdown_cancel_futures_lets_running_calls_finish_and_cancels_queued_ones(
    tmp_path: Path,
) -> None:
    r = ap.Runner(cpu_workers=1, io_workers=1)
    mark, release = tmp_path / "running", tmp_path / "release"
    running = r.submit(h.gate, str(mark), str(release))
    h.wait_for_path(mark, "the running call")
    queued = [r.submit(h.square, i) for i in range(5)]
    releaser = threading.Timer(0.2, release.write_text, args=("go",))
    releaser.start()
    r.shutdown(wait=True, cancel_futures=True)
    releaser.join()
    assert running.result(timeout=0) > 0  # it ran to its end
    assert all(f.cancelled() for f in queued)
    assert cf.wait(queued, timeout=0).done == set(queued)  # waiters were told


@pytest.mark.parametrize("start", ["auto", "fresh"])  # fork: refused once tests run threads
def test_a_shutdown_that_waits_out_a_crashing_call_leaves_no_unread_error_behind(
    start: str, caplog: pytest.LogCaptureFixture
) -> None:
    # shutdown(wait=True) waits on asyncio copies of the calls' futures: a copy that
    # took a call's error and was never read made asyncio log "Future exception was
    # never retrieved" when it was collected (seen at the end of CPython's executor
    # tests, which do exactly this)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        r = ap.Runner(cpu_workers=1, io_workers=1, worker_start=start)
        f = r.submit(fa.exit_after, 0.1, 3)
        r.shutdown(wait=True)
        with pytest.raises(ap.WorkerCrashed):
            f.result()
        del r, f
        gc.collect()
    assert not [rec for rec in caplog.records if "never retrieved" in rec.getMessage()]


def test_shutdown_without_waiting_returns_at_once_and_the_calls_still_run(
    tmp_path: Path,
) -> None:
    r = ap.Runner(cpu_workers=1, io_workers=1)
    mark, release = tmp_path / "running", tmp_path / "release"
    running = r.submit(h.gate, str(mark), str(release))
    h.wait_for_path(mark, "the running call")
    later = r.submit(h.square, 7)  # queued behind it
    r.shutdown(wait=False)  # must not wait for the gate, which only this thread opens
    assert not running.done()
    with pytest.raises(RuntimeError, match="closed"):
        r.submit(h.square, 1)
    release.write_text("go")
    assert running.result(timeout=30) > 0 and later.result(timeout=30) == 49
    r.shutdown(wait=True)  # waits for the first shutdown's end: every worker gone
    assert r.worker_pids() == []


def test_shutdown_runs_every_item_of_a_map_never_iterated() -> None:
    r = ap.Runner(cpu_workers=2, io_workers=1)
    results = r.map(h.square, range(100))  # only a window is in flight
    io_results = r.map(ap.action(h.square, kind="io"), range(40), window=4)
    r.shutdown(wait=True)
    assert list(results) == [i * i for i in range(100)]
    assert list(io_results) == [i * i for i in range(40)]


class _Payload:
    pass


def _make_payload(_: int) -> _Payload:
    return _Payload()


@pytest.mark.parametrize("chunksize", [None, 1])
def test_map_keeps_no_reference_to_a_result_it_yielded(
    shared: ap.Runner, chunksize: int | None
) -> None:
    # CPython issue 14406: a consumer that lets go of a result frees it.
    import weakref

    for obj in shared.map(_make_payload, range(10), chunksize=chunksize):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None


def test_a_system_exit_while_unpickling_a_call_fails_that_call_only(shared: ap.Runner) -> None:
    err = shared.submit(h.square, fa.ExitsWhenUnpickled()).exception(timeout=30)
    assert isinstance(err, ap.SerializationError) and "SystemExit" in str(err)
    assert shared.submit(h.square, 3).result(timeout=30) == 9


def test_fresh_workers_share_the_parents_multiprocessing_authkey() -> None:
    import multiprocessing

    with (
        multiprocessing.Manager() as manager,
        ap.Runner(cpu_workers=1, io_workers=1, worker_start="fresh") as r,
    ):
        box = manager.list()
        assert r.submit(fa.append_to, box, "from a worker").result(timeout=60) == 1
        assert list(box) == ["from a worker"]
