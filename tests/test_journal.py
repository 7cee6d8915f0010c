"""Durable runs: the SQLite journal, resume after a real SIGKILL, IN_DOUBT, reconcile,
idempotency keys, refused journals; and ``max_parallel``."""

from __future__ import annotations

import asyncio
import os
import pickle
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

import actionpool as ap
from tests import journal_actions as ja
from tests.helpers import most_at_once, wait_for

ROOT = Path(__file__).resolve().parent.parent
MARKER = "ACTIONPOOL_JOURNAL_TEST"


def square(x: int) -> int:
    return x * x


def total(xs: list[int]) -> int:
    return sum(xs)


def record(path: str, tag: str) -> str:
    with open(path, "a") as f:
        f.write(tag + "\n")
    return tag


def fails_once(path: str) -> str:
    p = Path(path)
    if not p.exists():
        p.write_text("x")
        raise RuntimeError("first time")
    return "second"


def key_of(ctx: ap.Context, flaky: str) -> str:
    p = Path(flaky)
    with open(p.with_suffix(".keys"), "a") as f:
        f.write(ctx.idempotency_key + "\n")
    if not p.exists():
        p.write_text("x")
        raise RuntimeError("retry me")
    return ctx.idempotency_key


def small_plan(effects: Path) -> tuple[ap.Plan, ap.Node]:
    plan = ap.Plan()
    sq = [plan.add(square, i, name=f"sq{i}") for i in range(4)]
    io = ap.action(record, kind="io")
    plan.add(io, str(effects), "io-effect", name="io")
    t = plan.add(total, sq, name="total")
    return plan, t


def tagged(tag: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


# ---- a journal records a run; running again loads it ---------------------------------------


def test_a_finished_run_is_loaded_not_run_again(tmp_path: Path) -> None:
    effects = tmp_path / "effects.txt"
    journal = tmp_path / "run.db"
    plan, t = small_plan(effects)
    with ap.Runner(cpu_workers=2, io_workers=2) as runner:
        first = runner.run(plan, journal=journal)
        assert first.status is ap.RunStatus.SUCCEEDED
        assert stat.S_IMODE(journal.stat().st_mode) == 0o600
        again = runner.run(plan, journal=str(journal))
    assert again[t] == first[t] == 14
    assert effects.read_text().splitlines() == ["io-effect"]  # the io node ran once
    assert [o.status for o in again.outcomes] == [o.status for o in first.outcomes]
    assert [o.attempts for o in again.outcomes] == [o.attempts for o in first.outcomes]
    # a loaded outcome keeps its times and where it ran
    a, b = first.outcome("sq1"), again.outcome("sq1")
    assert (a.started_at, a.finished_at, a.pool, a.worker) == (
        b.started_at,
        b.finished_at,
        b.pool,
        b.worker,
    )
    assert again.run_id == first.run_id


def test_failed_nodes_run_again_on_resume_and_state_updates_are_kept(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    flag = tmp_path / "flag"
    plan = ap.Plan()
    up = plan.add(ja.part, 3, name="part3")
    flaky = plan.add(fails_once, str(flag), name="flaky")
    plan.add(total, [up], name="after_up")
    with ap.Runner(cpu_workers=2, io_workers=2) as runner:
        first = runner.run(plan, {"folder": str(tmp_path)}, journal=journal)
        assert first.outcome(flaky).status is ap.Status.FAILED
        second = runner.run(plan, {"folder": str(tmp_path)}, journal=journal)
    assert second.status is ap.RunStatus.SUCCEEDED
    assert second[flaky] == "second"
    assert second.state == {"folder": str(tmp_path), "part3": 9}  # the loaded node's update
    assert ja.effects(str(tmp_path)).count(f"part3 {_key(first.run_id, 'part3')}") == 1


def _key(run_id: str, node: str) -> str:
    return ap.Context({}, node, run_id).idempotency_key


def test_idempotency_key_is_stable_across_attempts_and_resumes(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    flaky = tmp_path / "flaky"
    plan = ap.Plan()
    act = ap.action(key_of, retries=1)
    n = plan.add(act, str(flaky), name="k")
    plan.add(square, 2, name="other")
    with ap.Runner(cpu_workers=1, io_workers=1) as runner:
        report = runner.run(plan, journal=journal)
    keys = flaky.with_suffix(".keys").read_text().split()
    assert len(keys) == 2 and keys[0] == keys[1] == report[n]
    assert report[n] == _key(report.run_id, "k")
    other = ap.Context({}, "other", report.run_id).idempotency_key
    assert other != report[n] and len(other) == 32


# ---- a real SIGKILL in the middle of a run ----------------------------------------------


def _run_and_kill(folder: Path, journal: Path) -> None:
    """Start the plan in a child process, wait until its slow nodes run, SIGKILL it."""
    tag = uuid.uuid4().hex
    env = {**os.environ, ja.BLOCK: "1", MARKER: tag}
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.journal_actions", str(folder), str(journal)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(
            lambda: (
                all((folder / f"{n}.started").exists() for n in ja.SLOW) or child.poll() is not None
            ),
            timeout=60,
            what="the slow nodes to start in the child",
        )
        assert child.poll() is None, child.communicate()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout:
            child.stdout.close()
        if child.stderr:
            child.stderr.close()
        # its workers notice their parent's death and kill themselves
        wait_for(lambda: not tagged(tag), timeout=30, what="the child's workers to exit")


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    killed = tmp_path / "killed"
    clean.mkdir()
    killed.mkdir()
    journal = killed / "run.db"
    _run_and_kill(killed, journal)
    before = Counter(line.split()[0] for line in ja.effects(str(killed)))
    assert before == {"part0": 1, "part1": 1, "part2": 1, "part3": 1, "pay": 1}
    doubt = killed / "doubt.db"  # the same journal, resumed below without reconcile
    shutil.copy(journal, doubt)
    # a killed run's last records are in its write-ahead log, beside the file
    shutil.copy(journal.with_name(journal.name + "-wal"), doubt.with_name(doubt.name + "-wal"))

    resumed = ja.run(str(killed), str(journal))
    reference = ja.run(str(clean), str(clean / "run.db"))

    assert resumed.status is reference.status is ap.RunStatus.SUCCEEDED
    assert [(o.name, o.status, o.value) for o in resumed.outcomes] == [
        (o.name, o.status, o.value) for o in reference.outcomes
    ]
    assert resumed.state == {**reference.state, "folder": str(killed)}
    after = Counter(line.split()[0] for line in ja.effects(str(killed)))
    # not idempotent: at most once, ever; loaded nodes not run again; crunch re-ran
    assert after == {
        **{f"part{i}": 1 for i in range(4)},
        "pay": 1,  # done before the kill: reconcile said "done"
        "mail": 1,  # killed before its effect: reconcile said "retry"
        "crunch": 1,  # idempotent: run again (it was killed before its effect)
    }
    # the idempotency key a node saw before the kill is the one it sees after
    started_key = (killed / "mail.started").read_text()
    assert f"mail {started_key}" in ja.effects(str(killed))

    # the copy, resumed by actions without reconcile: the two in doubt are not re-run
    plan, nodes = ja.build(pay=None, mail=None)
    count_before = len(ja.effects(str(killed)))
    with ap.Runner(cpu_workers=2, io_workers=4) as runner:
        doubtful = runner.run(plan, {"folder": str(killed)}, journal=doubt)
        third = runner.run(plan, {"folder": str(killed)}, journal=doubt)
    for report in (doubtful, third):
        assert report.outcome(nodes["pay"]).status is ap.Status.IN_DOUBT
        assert report.outcome(nodes["mail"]).status is ap.Status.IN_DOUBT
        assert "in doubt" in str(report.outcome(nodes["pay"]).error)
        assert "reconcile" in str(report.outcome(nodes["pay"]).error)
        assert report.outcome(nodes["summary"]).status is ap.Status.SKIPPED
        assert report.outcome(nodes["crunch"]).status is ap.Status.SUCCEEDED
        assert report.status is ap.RunStatus.PARTIAL
    new = Counter(line.split()[0] for line in ja.effects(str(killed))[count_before:])
    assert new == {"crunch": 1}  # crunch re-ran in the first of those; pay, mail never


def test_records_are_committed_before_what_depends_on_them(tmp_path: Path) -> None:
    # The dependent kills the whole process the moment it starts. On resume its
    # upstream is loaded, not run again: its end was committed before the dependent
    # started. And the dependent is in doubt, not run again: its start was committed
    # before it was dispatched.
    journal = tmp_path / "run.db"
    tag = uuid.uuid4().hex
    env = {**os.environ, ja.BLOCK: "1", MARKER: tag}
    child = subprocess.run(
        [sys.executable, "-m", "tests.journal_actions", str(tmp_path), str(journal), "kill"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    wait_for(lambda: not tagged(tag), timeout=30, what="the child's workers to exit")
    assert [line.split()[0] for line in ja.effects(str(tmp_path))] == ["part0"]

    report = ja.run(str(tmp_path), str(journal), "kill")
    assert report.outcome("part0").status is ap.Status.SUCCEEDED
    assert report.outcome("kill").status is ap.Status.IN_DOUBT
    assert [line.split()[0] for line in ja.effects(str(tmp_path))] == ["part0"]


def test_reconcile_that_raises_or_answers_nonsense_leaves_the_node_in_doubt(
    tmp_path: Path,
) -> None:
    journal = tmp_path / "run.db"
    _run_and_kill(tmp_path, journal)

    def broken(ctx: ap.Context) -> str:
        raise ConnectionError("ledger unreachable")

    plan, nodes = ja.build(pay=broken, mail=lambda ctx: "yes")
    with ap.Runner(cpu_workers=2, io_workers=4) as runner:
        report = runner.run(plan, {"folder": str(tmp_path)}, journal=journal)
    pay, mail = report.outcome(nodes["pay"]), report.outcome(nodes["mail"])
    assert pay.status is mail.status is ap.Status.IN_DOUBT
    assert "ConnectionError: ledger unreachable" in str(pay.error)
    assert isinstance(pay.error.__cause__, ConnectionError)
    assert "'yes'" in str(mail.error)


# ---- journals that are refused ------------------------------------------------------------


def test_a_journal_of_another_plan_is_refused_saying_what_differs(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    plan, _ = small_plan(tmp_path / "e.txt")
    other = ap.Plan()
    other.add(square, 5, name="sq0")
    other.add(total, [], name="sq1")
    other.add(square, 9, name="brand_new")
    with ap.Runner(cpu_workers=1, io_workers=1) as runner:
        runner.run(plan, journal=journal)
        before = journal.read_bytes()
        with pytest.raises(ap.JournalError) as info:
            runner.run(other, journal=journal)
        msg = str(info.value)
        assert str(journal) in msg and "another plan" in msg
        assert "'sq2'" in msg and "'brand_new'" in msg
        assert "node 'sq0' has other arguments" in msg
        assert "node 'sq1' runs action 'total', was 'square'" in msg
        with pytest.raises(ap.JournalError, match="initial state differs"):
            runner.run(plan, {"k": 1}, journal=journal)
    assert journal.read_bytes() == before  # refused journals are never written


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign_db"])
def test_a_damaged_or_foreign_file_is_refused_and_left_as_it_is(
    tmp_path: Path, damage: str
) -> None:
    journal = tmp_path / "run.db"
    plan, _ = small_plan(tmp_path / "e.txt")
    if damage == "garbage":
        journal.write_bytes(b"not a database at all" * 100)
    elif damage == "foreign_db":
        conn = sqlite3.connect(journal)
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.commit()
        conn.close()
    else:
        with ap.Runner(cpu_workers=1, io_workers=1) as runner:
            runner.run(plan, journal=journal)
        data = journal.read_bytes()
        journal.write_bytes(data[: len(data) // 2])
    before = journal.read_bytes()
    with ap.Runner(cpu_workers=1, io_workers=1) as runner, pytest.raises(ap.JournalError) as info:
        runner.run(plan, journal=journal)
    assert str(journal) in str(info.value)
    assert journal.read_bytes() == before


def test_a_value_that_does_not_match_its_sha256_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    plan, _ = small_plan(tmp_path / "e.txt")
    with ap.Runner(cpu_workers=1, io_workers=1) as runner:
        runner.run(plan, journal=journal)
        conn = sqlite3.connect(journal)
        conn.execute("UPDATE ends SET value = ? WHERE node = 'sq2'", (pickle.dumps(99),))
        conn.commit()
        conn.close()
        before = journal.read_bytes()
        with pytest.raises(ap.JournalError, match="node 'sq2' does not match its SHA-256"):
            runner.run(plan, journal=journal)
    assert journal.read_bytes() == before


def test_a_journal_in_use_by_another_run_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    gate = tmp_path / "release"
    started = tmp_path / "started"
    plan = ap.Plan()
    plan.add(ap.action(_gate, kind="io"), str(started), str(gate), name="wait")
    with ap.Runner(cpu_workers=1, io_workers=2) as runner:
        out: list[ap.Report] = []
        t = threading.Thread(target=lambda: out.append(runner.run(plan, journal=journal)))
        t.start()
        try:
            wait_for(started.exists, timeout=30, what="the first run's node to start")
            with pytest.raises(ap.JournalError, match="in use by another run"):
                runner.run(plan, journal=journal)
        finally:
            gate.write_text("go")
            t.join(30)
    assert out and out[0].status is ap.RunStatus.SUCCEEDED


def _gate(started: str, release: str) -> str:
    Path(started).write_text("x")
    deadline = time.monotonic() + 60
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return "released"


def test_a_lost_race_input_stays_cancelled_on_resume(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    gate = tmp_path / "never"
    plan = ap.Plan()
    fast = plan.add(ap.action(record, kind="io"), str(tmp_path / "e.txt"), "fast", name="fast")
    slow = plan.add(ap.action(_gate, kind="io"), str(tmp_path / "s"), str(gate), name="slow")
    race = plan.race([fast, slow], name="race")
    with ap.Runner(cpu_workers=1, io_workers=2) as runner:
        wait_for_slow = runner.run(plan, journal=journal)
        gate.write_text("go")  # release the abandoned thread
        again = runner.run(plan, journal=journal)
    for report in (wait_for_slow, again):
        assert report[race] == "fast"
        assert report.outcome(slow).status is ap.Status.CANCELLED
        assert report.status is ap.RunStatus.SUCCEEDED
    assert (tmp_path / "e.txt").read_text().splitlines() == ["fast"]


def test_arun_keeps_and_resumes_a_journal(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    effects = tmp_path / "effects.txt"
    plan, t = small_plan(effects)

    async def main() -> tuple[ap.Report, ap.Report]:
        with ap.Runner(cpu_workers=1, io_workers=1) as runner:
            a = await runner.arun(plan, journal=journal)
            b = await runner.arun(plan, journal=journal)
            return a, b

    a, b = asyncio.run(main())
    assert a[t] == b[t] == 14
    assert effects.read_text().splitlines() == ["io-effect"]


def test_bad_journal_and_max_parallel_arguments_are_refused(tmp_path: Path) -> None:
    plan, _ = small_plan(tmp_path / "e.txt")
    with ap.Runner(cpu_workers=1, io_workers=1) as runner:
        with pytest.raises(ap.PlanError, match="journal must be a file path"):
            runner.run(plan, journal=42)  # type: ignore[arg-type]
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ap.PlanError, match="max_parallel"):
                runner.run(plan, max_parallel=bad)  # type: ignore[arg-type]


# ---- max_parallel ----------------------------------------------------------------------------


def overlap(folder: str, i: int, seconds: float) -> int:
    """Record this call's entry and exit, with a time, in its own file."""
    p = Path(folder)
    (p / f"{i}.in").write_text(repr(time.monotonic()))
    time.sleep(seconds)
    (p / f"{i}.out").write_text(repr(time.monotonic()))
    return i


def _most_at_once(folder: Path, n: int) -> int:
    spans = [
        (float((folder / f"{i}.in").read_text()), float((folder / f"{i}.out").read_text()))
        for i in range(n)
    ]
    return most_at_once(spans)


@pytest.mark.parametrize("kind", ["io", "cpu"])
def test_max_parallel_caps_the_attempts_of_a_run(tmp_path: Path, kind: str) -> None:
    act = ap.action(overlap, kind=kind)
    plan = ap.Plan()
    for i in range(6):
        plan.add(act, str(tmp_path), i, 0.15, name=f"n{i}")
    with ap.Runner(cpu_workers=3, io_workers=6) as runner:
        report = runner.run(plan, max_parallel=2)
        assert report.status is ap.RunStatus.SUCCEEDED
        assert _most_at_once(tmp_path, 6) <= 2
        free = tmp_path / "free"
        free.mkdir()
        plan2 = ap.Plan()
        for i in range(6):
            plan2.add(act, str(free), i, 0.3, name=f"n{i}")
        runner.run(plan2)
    assert _most_at_once(free, 6) >= 3  # without the cap the same runner runs more at once


def test_a_journal_records_and_resumes_a_run_on_a_dask_cluster(
    dask_client: Any, tmp_path: Path
) -> None:
    # The journal is the scheduler's, whatever pool runs the attempts: the same records
    # on a cluster, and a resume loads them (here on the local backend: a journal does
    # not belong to a backend).
    journal = tmp_path / "run.db"
    effects = tmp_path / "effects.txt"
    plan, t = small_plan(effects)
    with ap.Runner(backend="dask", client=dask_client) as r:
        first = r.run(plan, journal=journal)
    assert first.status is ap.RunStatus.SUCCEEDED
    assert {o.pool for o in first.outcomes} == {"dask", "io"}
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        again = r.run(plan, journal=journal)
    assert again[t] == first[t] == 14
    assert [o.pool for o in again.outcomes] == [o.pool for o in first.outcomes]
    assert effects.read_text().splitlines() == ["io-effect"]
