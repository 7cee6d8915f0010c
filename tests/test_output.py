"""Worker output in the parent (Runner(capture=)): prints, stderr and logging records
of cpu actions, written by the parent to its current streams and handlers, tagged with
the node, in order, before the node's result."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
from collections.abc import Iterator

import pytest

import actionpool as ap
from actionpool.output import write_here
from tests import helpers as h

pytestmark = pytest.mark.slow


def print_from_a_thread(tag: str) -> str:
    t = threading.Thread(target=print, args=(f"{tag} from a thread",))
    t.start()
    t.join()
    return tag


def print_then_crash(tag: str) -> None:
    print(f"{tag} last words")
    os._exit(3)


def log_an_exception() -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logging.getLogger("tests.chatty").exception("it failed")


def print_partial_lines() -> None:
    print("a", end="")
    print("b", end="")
    sys.stdout.flush()
    print("c")


@pytest.fixture
def runner() -> Iterator[ap.Runner]:
    with ap.Runner(cpu_workers=2, io_workers=2) as r:
        yield r


def test_prints_reach_the_parents_current_stdout_tagged_and_in_order(runner: ap.Runner) -> None:
    out, err = io.StringIO(), io.StringIO()
    plan = ap.Plan()
    plan.add(h.chatty, "a", 200, name="first")
    plan.add(h.chatty, "b", 3, name="second")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        report = runner.run(plan)  # the output is there once the run returns
    assert report.status is ap.RunStatus.SUCCEEDED
    lines = out.getvalue().splitlines()
    assert [x for x in lines if x.startswith("[first] ")] == [
        f"[first] a line {i}" for i in range(200)
    ]
    assert [x for x in lines if x.startswith("[second] ")] == [
        f"[second] b line {i}" for i in range(3)
    ]
    assert len(lines) == 203
    assert sorted(err.getvalue().splitlines()) == ["[first] a to stderr", "[second] b to stderr"]


def test_submit_and_map_calls_print_untagged_as_an_executors_workers(
    runner: ap.Runner,
) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert runner.submit(h.chatty, "s").result(timeout=60) == "s"
        assert list(runner.map(h.chatty, ["m0", "m1"], chunksize=1)) == ["m0", "m1"]
        assert list(runner.map(h.chatty, ["c0", "c1", "c2"], chunksize=3)) == ["c0", "c1", "c2"]
    lines = out.getvalue().splitlines()
    assert "s line 0" in lines
    assert {"m0 line 0", "m1 line 0"} <= set(lines)
    # a chunk's items print in order
    assert [x for x in lines if x.startswith("c")] == [f"c{i} line 0" for i in range(3)]


def test_logging_records_reach_the_parents_handlers_tagged(
    runner: ap.Runner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # the root level: what workers send
    plan = ap.Plan()
    plan.add(h.chatty, "x", name="talk")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        runner.run(plan)
        runner.submit(log_an_exception).result(timeout=60)  # a call: untagged
    records = [r for r in caplog.records if r.name == "tests.chatty"]
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("INFO", "[talk] x info"),
        ("WARNING", "[talk] x warning"),
        ("ERROR", "it failed"),
    ]
    assert records[0].actionpool_node == "talk"  # type: ignore[attr-defined]
    assert records[2].actionpool_node is None  # type: ignore[attr-defined]
    assert records[0].process != os.getpid()  # made in the worker
    assert records[2].exc_text and "ZeroDivisionError" in records[2].exc_text


def test_records_below_the_parents_root_level_are_not_sent(
    runner: ap.Runner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        runner.submit(h.chatty, "y").result(timeout=60)
    got = [r.getMessage() for r in caplog.records if r.name == "tests.chatty"]
    assert got == ["y warning"]


def test_threads_the_action_starts_print_through_it_too(runner: ap.Runner) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runner.submit(print_from_a_thread, "t").result(timeout=60)
    assert out.getvalue() == "t from a thread\n"


def test_what_a_worker_printed_before_it_crashed_is_kept(runner: ap.Runner) -> None:
    out = io.StringIO()
    plan = ap.Plan()
    plan.add(print_then_crash, "z", name="doomed")
    with contextlib.redirect_stdout(out):
        report = runner.run(plan)
    assert report.outcome("doomed").status is ap.Status.CRASHED
    assert out.getvalue() == "[doomed] z last words\n"


def test_a_line_written_in_pieces_is_tagged_once(runner: ap.Runner) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        plan = ap.Plan()
        plan.add(print_partial_lines, name="pieces")
        runner.run(plan)
    assert out.getvalue() == "[pieces] abc\n"


def test_capture_false_leaves_the_output_on_the_inherited_descriptors(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with ap.Runner(cpu_workers=1, io_workers=1, capture=False) as r:
        r.submit(h.chatty, "raw").result(timeout=60)
    out, err = capfd.readouterr()
    assert "raw line 0\n" in out and "[chatty]" not in out
    assert "raw to stderr" in err


def test_capture_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="capture must be True or False, got 'yes'"):
        ap.Runner(capture="yes")  # type: ignore[arg-type]


def test_write_here_keeps_a_node_line_open_across_pieces() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        write_here("n", "stdout", "one ")
        write_here("m", "stdout", "other\n")
        write_here("n", "stdout", "two\nthree\n")
    assert out.getvalue() == "[n] one [m] other\ntwo\n[n] three\n"
