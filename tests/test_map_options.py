"""map and amap: their own options (ordered, return_exceptions, progress), which never
reach the action, and the async map's streaming, errors and cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import actionpool as ap
from actionpool.action import as_spec
from actionpool.events import Event
from actionpool.progress import EventBar
from tests import fault_actions as fa
from tests import helpers as h

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runner() -> Iterator[ap.Runner]:
    with ap.Runner(cpu_workers=2, io_workers=4) as r:
        yield r


def wait_then(x: int, path: str) -> int:
    """``x``, once the file ``path`` exists (``path`` empty: at once)."""
    if path:
        h.wait_for_path(path, f"item {x}")
    return x


def takes_timeout(x: int, timeout: float = 1.0) -> float:
    return x * timeout


@ap.action(kind="io")
def io_takes_timeout(x: int, timeout: float = 1.0) -> float:
    return x * timeout


def raise_timeout(x: int) -> int:
    raise TimeoutError(f"the action's own, at {x}")


def report_progress(ctx: ap.Context, steps: int) -> int:
    for i in range(steps):
        ctx.progress(i + 1, steps)
    return steps


def takes_any(x: int, **kwargs: object) -> tuple[int, dict[str, object]]:
    return x, kwargs


# ---- ordered=False -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cpu", "io"])
def test_unordered_map_hands_out_results_as_they_finish(
    runner: ap.Runner, tmp_path: Path, kind: str
) -> None:
    # item 0 waits until the caller has seen the three others: an ordered map would
    # wait for item 0 first, and its wait would fail after 30 s
    release = tmp_path / "release"
    action = ap.action(kind=kind)(wait_then)
    paths = [str(release), "", "", ""]
    it = runner.map(action, range(4), paths, ordered=False, chunksize=1)
    first = [next(it) for _ in range(3)]
    assert sorted(first) == [1, 2, 3]
    h.write_atomic(release, "go")
    assert list(it) == [0]


def test_unordered_map_of_batched_calls_returns_every_item_once(runner: ap.Runner) -> None:
    got = list(runner.map(h.square, range(2000), ordered=False))
    assert sorted(got) == [i * i for i in range(2000)]


# ---- errors: the item's index, and return_exceptions ----------------------------------


@pytest.mark.parametrize("chunksize", [1, 8])
def test_an_action_error_names_its_item_and_stops_the_map(
    runner: ap.Runner, chunksize: int
) -> None:
    with pytest.raises(ValueError, match="item 13") as info:
        list(runner.map(h.fail_at, range(40), bad=13, chunksize=chunksize))
    assert "in the map of 'fail_at', item 13" in info.value.__notes__


@pytest.mark.parametrize("chunksize", [1, 8, None])
def test_return_exceptions_puts_each_error_in_its_items_place(
    runner: ap.Runner, chunksize: int | None
) -> None:
    got = list(
        runner.map(h.fail_at, range(40), bad=13, chunksize=chunksize, return_exceptions=True)
    )
    assert len(got) == 40
    assert isinstance(got[13], ValueError)
    assert got[13].__notes__ == ["in the map of 'fail_at', item 13"]
    assert [x for i, x in enumerate(got) if i != 13] == [i for i in range(40) if i != 13]


def test_return_exceptions_with_a_crash_of_a_chunk_that_is_not_re_run(
    runner: ap.Runner,
) -> None:
    crashy = ap.action(kind="cpu", idempotent=False)(fa.crash_on)
    got = list(runner.map(crashy, range(6), bad=2, chunksize=3, return_exceptions=True))
    assert got[3:] == [30, 40, 50]
    assert all(isinstance(e, ap.WorkerCrashed) for e in got[:3])
    assert "items 0 to 2" in got[0].__notes__[0]
    assert "not re-run one by one" in str(got[0])


def test_a_crash_in_an_idempotent_chunk_costs_only_its_item(runner: ap.Runner) -> None:
    got = list(runner.map(fa.crash_on, range(6), bad=4, chunksize=3, return_exceptions=True))
    assert got[:4] == [0, 10, 20, 30] and got[5] == 50
    assert isinstance(got[4], ap.WorkerCrashed)
    assert got[4].__notes__ == ["in the map of 'crash_on', item 4"]


def test_an_action_that_raises_timeout_error_is_not_the_maps_timeout(
    runner: ap.Runner,
) -> None:
    with pytest.raises(TimeoutError, match="the action's own") as info:
        list(runner.map(raise_timeout, range(3), chunksize=1, timeout=60))
    assert info.value.__notes__ == ["in the map of 'raise_timeout', item 0"]


# ---- options never reach the action ---------------------------------------------------


def test_an_option_that_is_also_a_parameter_of_the_action_is_refused(
    runner: ap.Runner,
) -> None:
    with pytest.raises(TypeError, match=r"'timeout' is an option of map and also a parameter"):
        runner.map(takes_timeout, range(3), timeout=5)
    with pytest.raises(TypeError, match=r"functools\.partial"):
        runner.map(io_takes_timeout, range(3), timeout=5)
    with pytest.raises(TypeError, match=r"'timeout' is an option of amap"):
        runner.amap(takes_timeout, range(3), timeout=5)
    # bound by partial, the action's own is the action's and the map's is the map's
    bound = functools.partial(takes_timeout, timeout=2.0)
    assert list(runner.map(bound, range(3), timeout=60)) == [0.0, 2.0, 4.0]
    bound_io = functools.partial(io_takes_timeout, timeout=3.0)
    assert as_spec(bound_io).kind == "io"  # a declared action keeps its options
    assert list(runner.map(bound_io, range(3), timeout=60)) == [0.0, 3.0, 6.0]
    # keyword arguments that are not options go to the action
    assert list(runner.map(takes_timeout, range(2), chunksize=1)) == [0.0, 1.0]
    assert list(runner.map(takes_any, [1], progress=False, steps=3)) == [(1, {"steps": 3})]


def test_progress_true_is_an_option_not_an_argument_of_the_action(
    runner: ap.Runner, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tqdm")
    assert list(runner.map(h.square, range(50), progress=True)) == [i * i for i in range(50)]
    err = capsys.readouterr().err
    assert "map square" in err and "50/50 items" in err


@pytest.mark.parametrize(
    ("option", "value"),
    [("ordered", 1), ("progress", "yes"), ("return_exceptions", None), ("timeout", -1)],
)
def test_a_bad_option_value_is_refused_before_anything_runs(
    runner: ap.Runner, option: str, value: object
) -> None:
    with pytest.raises(ValueError, match=f"map: {option} must be"):
        runner.map(h.square, range(3), **{option: value})


# ---- progress bars --------------------------------------------------------------------


def test_a_map_bar_counts_failed_items_apart_and_turns_red(
    runner: ap.Runner, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tqdm")
    got = list(runner.map(h.fail_at, range(20), bad=7, progress=True, return_exceptions=True))
    assert isinstance(got[7], ValueError)
    err = capsys.readouterr().err
    last = err.split("\r")[-1]
    assert "20/20 items" in last and "1 failed" in last
    assert "\x1b[31m" in last  # red


def test_a_run_bar_shows_failures_and_skips_and_ends_red(
    runner: ap.Runner, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tqdm")
    plan = ap.Plan()
    bad = plan.add(h.boom, name="bad")
    plan.add(h.square, bad, name="after")
    for i in range(3):
        plan.add(h.square, i)
    report = runner.run(plan, progress=True)
    assert report.status is ap.RunStatus.PARTIAL
    last = capsys.readouterr().err.split("\r")[-1]
    assert "5/5 nodes" in last and "1 failed" in last and "1 skipped" in last
    assert "\x1b[31m" in last


def test_a_run_bar_that_succeeds_is_not_red(
    runner: ap.Runner, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tqdm")
    plan = ap.Plan()
    plan.add(h.square, 3)
    assert runner.run(plan, progress=True).status is ap.RunStatus.SUCCEEDED
    last = capsys.readouterr().err.split("\r")[-1]
    assert "1/1 nodes" in last and "\x1b[31m" not in last


def test_a_run_bar_moves_with_ctx_progress_of_running_nodes() -> None:
    pytest.importorskip("tqdm")
    bar = EventBar(None, 2)
    try:
        bar(Event("progress", "a", "a", 0.0, (1, 4)))
        assert bar.bar.tqdm.n == 0.25 and bar.bar.done == 0
        bar(Event("progress", "b", "b", 0.0, (3, 4)))
        assert bar.bar.tqdm.n == 1.0 and bar.bar.done == 0
        bar(Event("finished", "a", "a", 0.0, ap.Status.SUCCEEDED))
        assert bar.bar.tqdm.n == 1.75 and bar.bar.done == 1
        assert bar.bar.tqdm.format_dict["done"] == 1  # the count shows whole nodes
    finally:
        bar.close()


def test_a_run_with_progress_forwards_every_event_to_on_event(runner: ap.Runner) -> None:
    pytest.importorskip("tqdm")
    seen: list[str] = []
    plan = ap.Plan()
    plan.add(report_progress, 3)
    runner.run(plan, progress=True, on_event=lambda e: seen.append(e.kind))
    assert seen.count("progress") == 3 and seen[-1] == "finished"


def test_map_progress_without_tqdm_says_how_to_install_it(
    runner: ap.Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    h.hide_package(monkeypatch, "tqdm")
    with pytest.raises(ImportError, match=r"pip install 'actionpool\[progress\]'") as info:
        runner.map(h.square, range(3), progress=True)
    assert info.value.name == "tqdm"


# ---- amap -----------------------------------------------------------------------------


async def _collect(it: object) -> list[object]:
    return [x async for x in it]  # type: ignore[attr-defined]


@pytest.mark.parametrize("chunksize", [1, None])
def test_amap_streams_the_same_results_as_map(runner: ap.Runner, chunksize: int | None) -> None:
    got = asyncio.run(_collect(runner.amap(h.add, range(500), range(500), chunksize=chunksize)))
    assert got == [2 * i for i in range(500)]


def test_amap_of_io_and_async_actions(runner: ap.Runner) -> None:
    io_add = ap.action(kind="io")(h.add)
    assert asyncio.run(_collect(runner.amap(io_add, range(20), b=1))) == list(range(1, 21))
    assert asyncio.run(_collect(runner.amap(ap.action(kind="io")(h.async_square), range(5)))) == [
        0,
        1,
        4,
        9,
        16,
    ]


def test_amap_never_blocks_the_event_loop(runner: ap.Runner, tmp_path: Path) -> None:
    release = tmp_path / "release"

    async def main() -> tuple[list[object], int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                if ticks == 20:  # the loop runs while the map waits: let it finish
                    await asyncio.to_thread(h.write_atomic, release, "go")
                await asyncio.sleep(0.005)

        task = asyncio.create_task(ticker())
        got = await _collect(runner.amap(wait_then, range(4), [str(release)] * 4))
        stop.set()
        await task
        return got, ticks

    got, ticks = asyncio.run(main())
    assert got == [0, 1, 2, 3] and ticks >= 20


def test_amap_unordered_and_return_exceptions(runner: ap.Runner) -> None:
    got = asyncio.run(
        _collect(runner.amap(h.fail_at, range(30), bad=5, ordered=False, return_exceptions=True))
    )
    errors = [e for e in got if isinstance(e, ValueError)]
    assert len(got) == 30 and len(errors) == 1
    assert errors[0].__notes__ == ["in the map of 'fail_at', item 5"]
    assert sorted(x for x in got if not isinstance(x, ValueError)) == [
        i for i in range(30) if i != 5
    ]


def test_amap_raises_an_action_error_at_its_item(runner: ap.Runner) -> None:
    async def main() -> list[object]:
        seen = []
        async for x in runner.amap(h.fail_at, range(10), bad=4, chunksize=1):
            seen.append(x)
        return seen

    with pytest.raises(ValueError, match="item 4"):
        asyncio.run(main())


def test_amap_timeout_raises_without_blocking_the_loop(runner: ap.Runner, tmp_path: Path) -> None:
    never = str(tmp_path / "never")

    async def main() -> None:
        async for _ in runner.amap(wait_then, [0], [never], timeout=0.3):
            pass

    with pytest.raises(TimeoutError, match="map of 'wait_then': timed out"):
        asyncio.run(main())
    # the call in flight was stopped (its worker killed): the runner is free again
    assert runner.submit(h.square, 4).result(timeout=30) == 16


def test_cancelling_the_task_that_iterates_amap_kills_the_running_action(
    tmp_path: Path,
) -> None:
    mark, never = tmp_path / "mark", tmp_path / "never"
    with ap.Runner(cpu_workers=1, io_workers=1) as r:

        async def main() -> None:
            async def consume() -> None:
                async for _ in r.amap(h.gate, [str(mark)], [str(never)]):
                    pass

            task = asyncio.create_task(consume())
            await asyncio.to_thread(h.wait_for_path, mark, "the gate")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        asyncio.run(main())
        pid = h.pid_in(mark)
        h.wait_for(lambda: h.gone(pid), what=f"the worker {pid} running the cancelled item")
        assert r.submit(h.square, 5).result(timeout=30) == 25


def test_aclose_stops_the_calls_in_flight(tmp_path: Path) -> None:
    marks = [tmp_path / f"m{i}" for i in range(2)]
    never = str(tmp_path / "never")
    with ap.Runner(cpu_workers=2, io_workers=1) as r:

        async def main() -> None:
            it = r.amap(h.gate, [str(m) for m in marks], [never] * 2)
            first = asyncio.ensure_future(it.__anext__())
            for m in marks:  # both running, each in its worker
                await asyncio.to_thread(h.wait_for_path, m, "a gate")
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            await it.aclose()  # type: ignore[attr-defined]

        asyncio.run(main())
        for m in marks:
            pid = h.pid_in(m)
            h.wait_for(lambda pid=pid: h.gone(pid), what=f"worker {pid}")
        assert r.submit(os.getpid).result(timeout=30) != os.getpid()


def test_amap_from_a_thread_other_than_the_one_that_made_the_runner(runner: ap.Runner) -> None:
    out: list[object] = []
    t = threading.Thread(
        target=lambda: out.extend(asyncio.run(_collect(runner.amap(h.square, range(5)))))
    )
    t.start()
    t.join(60)
    assert out == [0, 1, 4, 9, 16]
