"""Shared fixtures: every test must leave no child process behind.

The only children allowed to outlive a test are the two process-wide resource
trackers (loky's and multiprocessing's): each is a singleton per parent process,
started by the first pool and exiting when the parent does.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import psutil
import pytest

_TRACKERS = ("resource_tracker",)


def _is_tracker(proc: psutil.Process) -> bool:
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return True  # already gone
    return any(t in cmd for t in _TRACKERS)


def _alive(proc: psutil.Process) -> bool:
    """Running, not a zombie, not a tracker; a process that ends meanwhile is not."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and not _is_tracker(proc)
    except psutil.Error:
        return False


def _runner_workers(runners: list[object]) -> set[int]:
    pids: set[int] = set()
    for r in runners:
        if not getattr(r, "_closed", True):
            pids.update(r.worker_pids())  # type: ignore[attr-defined]
            pids.update(r._pools["cpu"].zygote_pids())  # type: ignore[attr-defined]
    return pids


def leftover_children(
    grace_s: float = 5.0, allowed: set[int] = frozenset()
) -> list[psutil.Process]:  # type: ignore[assignment]
    """Children still alive after ``grace_s`` seconds, except trackers and ``allowed`` pids."""
    me = psutil.Process(os.getpid())
    deadline = time.monotonic() + grace_s
    while True:
        alive = [p for p in me.children(recursive=True) if _alive(p) and p.pid not in allowed]
        if not alive or time.monotonic() > deadline:
            return alive
        psutil.wait_procs(alive, timeout=min(0.2, max(0.0, deadline - time.monotonic())))


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail the test if it leaves a child process running (and kill what it left).

    Workers of runners that were already open when the test began (module-scoped
    fixtures) belong to their fixture, not to the test; they are checked when the
    fixture's module ends.
    """
    from actionpool.runner import _LIVE

    before = list(_LIVE)
    yield
    alive = leftover_children(allowed=_runner_workers(before))
    if alive:
        desc = []
        for p in alive:
            try:
                desc.append(f"{p.pid}: {' '.join(p.cmdline())[:120]}")
            except psutil.Error:
                desc.append(str(p.pid))
            with contextlib.suppress(psutil.Error):
                p.kill()
        pytest.fail("test left child processes running:\n" + "\n".join(desc))


@pytest.fixture(scope="module", autouse=True)
def no_leftover_processes_per_module() -> Iterator[None]:
    """After each module's fixtures are torn down, no child process may remain."""
    yield
    alive = leftover_children()
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not alive, f"module left child processes running: {[p.pid for p in alive]}"


@pytest.fixture
def runner() -> Iterator[object]:
    """A small runner (2 cpu workers, 4 io threads), closed after the test."""
    import actionpool as ap

    with ap.Runner(cpu_workers=2, io_workers=4) as r:
        yield r
