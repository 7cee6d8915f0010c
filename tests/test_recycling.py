"""Worker recycling: ``Runner(max_tasks_per_worker=..., max_worker_memory=...)``.

Real worker processes: their pids change when they are replaced, a real leak grows a
real resident set, and the replaced processes really exit (checked with psutil).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psutil
import pytest

import actionpool as ap
from tests.helpers import gone, wait_for

_LEAK: list[bytearray] = []  # what leak() keeps, in each worker process


def pid_of(_: Any = None) -> int:
    return os.getpid()


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def leak(mib: int) -> tuple[int, int]:
    """Keep ``mib`` MiB for the life of this worker process (a leak), touched."""
    block = bytearray(mib * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    _LEAK.append(block)
    return os.getpid(), rss()


def chain_plan(n: int, fn: Any = pid_of) -> ap.Plan:
    """``n`` nodes one after another (one worker runs them in plan order)."""
    plan = ap.Plan()
    prev = None
    for i in range(n):
        prev = plan.add(fn, i, name=f"n{i}", after=[prev] if prev is not None else [])
    return plan


def test_a_worker_is_replaced_after_max_tasks(tmp_path: Path) -> None:
    events: list[ap.Event] = []
    with ap.Runner(cpu_workers=1, io_workers=1, max_tasks_per_worker=2) as runner:
        report = runner.run(chain_plan(6), on_event=events.append)
        pids = [o.value for o in report.outcomes]
        assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]
        assert len(set(pids)) == 3
        recycled = [e for e in events if e.kind == "recycled"]
        assert [e.name for e in recycled] == ["n1", "n3", "n5"]
        assert [r["node"] for r in report.recycled] == ["n1", "n3", "n5"]
        assert {(r["reason"], r["tasks"]) for r in report.recycled} == {("max_tasks_per_worker", 2)}
        assert [r["worker"] for r in report.recycled] == [pids[0], pids[2], pids[4]]
        # the replaced processes have exited, while the runner is still open
        for pid in set(pids):
            wait_for(lambda pid=pid: gone(pid), timeout=30, what=f"worker {pid} to exit")
        # submitted calls are recycled too
        more = [runner.submit(pid_of).result(timeout=30) for _ in range(4)]
        assert more[0] == more[1] != more[2] == more[3]


def test_a_worker_above_max_worker_memory_is_replaced_between_attempts() -> None:
    with ap.Runner(cpu_workers=1, io_workers=1) as probe:
        base = probe.submit(rss).result(timeout=60)
    limit = base + 150 * 1024 * 1024
    with ap.Runner(cpu_workers=1, io_workers=1, max_worker_memory=limit) as runner:
        plan = ap.Plan()
        prev = None
        for i in range(3):  # +100 MiB each: the second one crosses the limit
            prev = plan.add(leak, 100, name=f"leak{i}", after=[prev] if prev else [])
        report = runner.run(plan)
    assert report.status is ap.RunStatus.SUCCEEDED  # nothing was killed mid-attempt
    (p0, r0), (p1, r1), (p2, r2) = (o.value for o in report.outcomes)
    assert p0 == p1 != p2
    assert r0 < limit < r1 and r2 < limit
    assert len(report.recycled) == 1
    entry = report.recycled[0]
    assert entry["node"] == "leak1" and entry["reason"] == "max_worker_memory"
    assert entry["worker"] == p0 and entry["rss"] > limit


def _make(folder: str) -> Any:
    path = Path(folder) / "resources.txt"
    with open(path, "a") as f:
        f.write(f"made {os.getpid()}\n")

    class Thing:
        def close(self) -> None:
            with open(path, "a") as f:
                f.write(f"closed {os.getpid()}\n")

    return Thing()


def use_thing(ctx: ap.Context, i: int) -> int:
    ctx.resources["thing"]
    return os.getpid()


def test_a_recycled_worker_closes_its_resources(tmp_path: Path) -> None:
    log = tmp_path / "resources.txt"

    def lines(word: str) -> list[str]:
        return [ln for ln in log.read_text().splitlines() if ln.startswith(word)]

    with ap.Runner(
        cpu_workers=1,
        io_workers=1,
        max_tasks_per_worker=1,
        resources={"thing": lambda: _make(str(tmp_path))},
    ) as runner:
        report = runner.run(chain_plan(3, use_thing))
        pids = [o.value for o in report.outcomes]
        assert len(set(pids)) == 3
        # each replaced worker closed what it made before it exited; the runner is open
        wait_for(lambda: len(lines("closed")) == 3, timeout=30, what="three closes")
    assert sorted(lines("made")) == sorted(f"made {p}" for p in pids)
    assert sorted(lines("closed")) == sorted(f"closed {p}" for p in pids)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_tasks_per_worker": 0}, "max_tasks_per_worker must be an int >= 1"),
        ({"max_tasks_per_worker": 1.5}, "max_tasks_per_worker must be an int >= 1"),
        ({"max_tasks_per_worker": True}, "max_tasks_per_worker must be an int >= 1"),
        ({"max_worker_memory": "lots"}, "max_worker_memory"),
        ({"max_worker_memory": 0}, "max_worker_memory must be positive"),
        ({"max_tasks_per_worker": 3, "backend": "dask"}, "need backend='local'"),
    ],
)
def test_bad_recycling_options_are_refused(options: dict[str, Any], message: str) -> None:
    before = set(psutil.Process().children(recursive=True))
    with pytest.raises(ValueError, match=message):
        ap.Runner(cpu_workers=1, io_workers=1, **options)
    assert set(psutil.Process().children(recursive=True)) <= before
