"""maps.py: chunk budgets and the rest of a chunk that ran out of time.

A map whose items were never measured sends each worker an even share with a time
budget; a worker that runs past it hands the rest back, which is cut finer and sent
again, whether or not anyone iterates the map.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import actionpool as ap
from actionpool.maps import _run_chunk
from actionpool.transfer import dumps_function
from tests import helpers as h

pytestmark = pytest.mark.slow


def _chunk(
    fn: object, chunk: list[object], budget: float | None, **kwargs: object
) -> tuple[float, list[object], dict[int, BaseException]]:
    return _run_chunk(dumps_function("f", fn), False, "f", True, chunk, kwargs, budget)


def test_a_budgeted_chunk_stops_after_the_run_that_passes_its_budget() -> None:
    # runs of 1, 2, 4 items of 10 ms: past a 25 ms budget after the second run
    elapsed, values, errors = _chunk(h.sleep_then, list(range(20)), 0.025, seconds=0.01)
    assert values == [0, 1, 2] and errors == {}
    assert elapsed >= 0.025
    # with no budget, or time to spare, every item runs
    assert _chunk(h.square, list(range(100)), None)[1] == [i * i for i in range(100)]
    assert _chunk(h.square, list(range(100)), 60.0)[1] == [i * i for i in range(100)]


def test_a_budgeted_chunk_goes_on_after_an_error_and_runs_no_item_twice() -> None:
    _, values, errors = _chunk(h.fail_at, list(range(10)), 60.0, bad=3)
    assert values == [0, 1, 2, None, 4, 5, 6, 7, 8, 9]
    assert list(errors) == [3] and "3" in str(errors[3])


def test_a_first_map_spreads_slow_items_over_every_worker(tmp_path: Path) -> None:
    # Half the items are instant and half take 40 ms, in that order. Cut in two even
    # shares, all the slow ones would run in one worker; the budget hands them back
    # after about MAP_TARGET_CHUNK_S and they are spread over both workers.
    n = 40
    with ap.Runner(cpu_workers=2, io_workers=1) as r:
        out = list(r.map(h.slow_from, range(n), first_slow=n // 2, seconds=0.04))
    assert [i for i, _ in out] == list(range(n))
    slow_pids = {pid for i, pid in out if i >= n // 2}
    assert len(slow_pids) == 2, out


def test_the_rest_of_a_chunk_runs_when_nobody_iterates_the_map(tmp_path: Path) -> None:
    # The chunks run out of their budget while nobody iterates: shutdown(wait=True)
    # still runs every item, as an Executor must.
    n = 30
    r = ap.Runner(cpu_workers=2, io_workers=1)
    it = r.map(h.touch_item, [str(tmp_path)] * n, range(n), [0.02] * n)
    r.shutdown(wait=True)
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == list(range(n))
    assert list(it) == list(range(n))


def test_stopping_a_map_stops_the_rest_of_its_chunks(tmp_path: Path) -> None:
    n = 200
    with ap.Runner(cpu_workers=2, io_workers=1) as r:
        it = r.map(h.touch_item, [str(tmp_path)] * n, range(n), [0.02] * n)
        assert next(it) == 0
        it.close()  # the rest of the first chunks, sent after their budget, stops too
        r.shutdown(wait=True)
    assert len(list(tmp_path.iterdir())) < n


@pytest.mark.parametrize(
    ("kind", "iterables", "where"),
    [
        ("cpu", [[1, 2, 3, 4, threading.Lock(), 6]], "map item 4: lock"),  # chunked
        ("cpu", [[1, 2, 3], [1, threading.Lock(), 3]], "map item 1, argument 1: lock"),
        ("io", [[1, 2, 3, threading.Lock()]], "map item 3: lock"),  # one call per item
    ],
)
def test_an_item_that_cannot_be_pickled_is_named_by_its_index(
    kind: str, iterables: list[list[object]], where: str
) -> None:
    with (
        ap.Runner(cpu_workers=1, io_workers=2) as r,
        pytest.raises(ap.SerializationError, match="cannot be pickled") as info,
    ):
        list(r.map(ap.action(h.add_all, kind=kind), *iterables))
    assert f"node 'add_all': {where}" in str(info.value)
