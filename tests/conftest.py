"""Shared fixtures: every test must leave no child process behind.

The only children allowed to outlive a test are the two process-wide resource
trackers (loky's and multiprocessing's): each is a singleton per parent process,
started by the first pool and exiting when the parent does.
"""

from __future__ import annotations

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


def leftover_children(grace_s: float = 5.0) -> list[psutil.Process]:
    """Children of this process still alive after ``grace_s`` seconds (trackers excepted)."""
    me = psutil.Process(os.getpid())
    deadline = time.monotonic() + grace_s
    while True:
        alive = [
            p
            for p in me.children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and not _is_tracker(p)
        ]
        if not alive or time.monotonic() > deadline:
            return alive
        psutil.wait_procs(alive, timeout=min(0.2, max(0.0, deadline - time.monotonic())))


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail the test if it leaves a child process running (and kill what it left)."""
    yield
    alive = leftover_children()
    if alive:
        desc = []
        for p in alive:
            try:
                desc.append(f"{p.pid}: {' '.join(p.cmdline())[:120]}")
            except psutil.Error:
                desc.append(str(p.pid))
            try:
                p.kill()
            except psutil.Error:
                pass
        pytest.fail("test left child processes running:\n" + "\n".join(desc))


@pytest.fixture
def runner() -> Iterator[object]:
    """A small runner (2 cpu workers, 4 io threads), closed after the test."""
    import actionpool as ap

    with ap.Runner(cpu_workers=2, io_workers=4) as r:
        yield r
