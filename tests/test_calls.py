"""Submitted calls (``calls.py``): direct calls and records, with a result, a cancel and
a caller's timeout racing each other from several threads.

Every future must end exactly once with the right outcome (its value, or
``CancelledError`` when a cancel reached it first), and when all have ended every slot
is free and no call is left in flight: a call ended twice would free its slot twice
(more free slots than the pool has), and one never ended would hold it for ever.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from typing import Any

import pytest

import actionpool as ap
from tests import helpers as h

io_square = ap.action(h.square, kind="io")
async_square = ap.action(h.async_square, kind="io")


def _hammer(r: ap.Runner, seed: int, calls: int) -> list[tuple[Future[Any], int, list[int]]]:
    """Submit ``calls`` calls from three threads while a fourth cancels at random; each
    submitter also cancels single calls, waits for some with tiny timeouts (the
    caller's thread then reads the reply itself, and gives up mid-read), and leaves
    others alone."""
    done: list[tuple[Future[Any], int, list[int]]] = []
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def submitter(k: int) -> None:
        rng = random.Random(seed * 100 + k)
        try:
            for i in range(calls // 3):
                fn = rng.choice([h.square, h.square, io_square, async_square])
                fut = r.submit(fn, i)
                ends: list[int] = []
                fut.add_done_callback(lambda _f, ends=ends: ends.append(1))
                move = rng.random()
                if move < 0.15:
                    fut.cancel()  # works while it waits for the loop; a no-op once running
                elif move < 0.3:
                    r._stop_calls([fut], "a submitter stopped it")  # as map's close does
                elif move < 0.6:
                    with contextlib.suppress(FutureTimeout, CancelledError):
                        fut.result(timeout=rng.choice([0.0, 1e-5, 1e-4, 1e-3]))
                with lock:
                    done.append((fut, i, ends))
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    def canceller() -> None:
        rng = random.Random(seed)
        while not stop.wait(rng.uniform(0.002, 0.02)):
            r.cancel()

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(3)]
    chaos = threading.Thread(target=canceller)
    chaos.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    chaos.join(30)
    assert not errors, errors
    assert not any(t.is_alive() for t in (*threads, chaos))
    return done


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_racing_results_cancels_and_timeouts_end_every_call_exactly_once(seed: int) -> None:
    with ap.Runner(cpu_workers=2, io_workers=2, memory_floor=0) as r:
        done = _hammer(r, seed, 1_500)
        futures = [f for f, _, _ in done]
        _, pending = wait_futures(futures, timeout=60)
        assert not pending, f"{len(pending)} calls never ended"
        outcomes = {"value": 0, "cancelled": 0}
        for fut, i, ends in done:
            assert ends == [1], f"call {i} ended {len(ends)} times"
            try:
                value = fut.result(timeout=0)
            except CancelledError:
                outcomes["cancelled"] += 1
                continue
            assert value == i * i, f"call {i}: {value!r}"
            outcomes["value"] += 1
        # both outcomes happened, or the race was not exercised
        assert outcomes["value"] > 100 and outcomes["cancelled"] > 100, outcomes
        # A cancelled call ends at once, but its slot comes back only when its pool
        # reports the attempt's end (the killed worker's death): wait for both.
        adm = r._sched.admission
        deadline = time.monotonic() + 30

        def settled() -> bool:
            calls = not r._calls.direct and r._calls.handed == r._calls.ended
            return calls and adm.free_slots("cpu") == 2 and adm.free_slots("io") == 2

        while not settled():
            assert time.monotonic() < deadline, (
                len(r._calls.direct),
                r._calls.handed,
                r._calls.ended,
                adm.free_slots("cpu"),
                adm.free_slots("io"),
            )
            time.sleep(0.01)
        # and the runner still works, directly and through the loop
        assert r.submit(h.square, 7).result(timeout=30) == 49
        assert [*r.map(h.square, range(5))] == [0, 1, 4, 9, 16]


def test_a_direct_calls_result_and_its_cancel_race_to_one_end() -> None:
    # The caller's thread reads the reply itself while the loop cancels the call: one of
    # them wins; the call ends once, and the slot comes back once.
    with ap.Runner(cpu_workers=1, io_workers=1, memory_floor=0) as r:
        assert r.submit(h.square, 1).result(timeout=30) == 1  # warm: calls go direct
        ended = {"value": 0, "cancelled": 0}
        for i in range(1_000):
            fut = r.submit(h.square, i)
            racer = threading.Thread(target=r._stop_calls, args=([fut], "raced"))
            racer.start()
            try:
                assert fut.result(timeout=30) == i * i
                ended["value"] += 1
            except CancelledError:
                ended["cancelled"] += 1
            # what it waits for (a worker killed, an attempt withdrawn) takes
            # milliseconds; its own limit is 10 s: reaching it means it missed an end
            racer.join(5)
            assert not racer.is_alive(), f"call {i}: the cancel waited for an end that came"
        deadline = time.monotonic() + 30
        while r._calls.direct:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert r._sched.admission.free_slots("cpu") == 1
        assert r._calls.handed == r._calls.ended
        assert ended["value"] + ended["cancelled"] == 1_000
