"""Every ``examples/*.py`` runs as a real program and exits 0.

Each example is started the way a user starts it (``python examples/x.py ...``, from the
repository root), with small arguments so the whole file stays fast on 2 cores. A new
example is picked up by the glob automatically; give it small arguments and the lines
its output must contain in ``ARGS`` / ``EXPECT``.

The examples start their own worker processes, which are not children of the test
process once the example has exited, so the conftest check cannot see them: each run
is tagged with an environment variable that its workers inherit, and the test fails if
a tagged process is still alive after the example exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
MARKER = "ACTIONPOOL_EXAMPLE_RUN"

ARGS: dict[str, list[str]] = {
    "agent_tool_calls.py": [],
    "numpy_fanout.py": ["--parts", "4", "--size", "20000"],
    "mixed_plan.py": ["--files", "3", "--lines", "200"],
    "dask_cluster.py": ["--tasks", "4", "--samples", "50000"],
}
"""Small arguments per example (examples not listed run with none)."""

EXPECT: dict[str, list[str]] = {
    "numpy_fanout.py": [
        "sizing: cpu_workers=",
        "4 parts x 20000 paths",
        "speedup:",
        "status: succeeded",
        "results match: parallel == serial",
    ],
    "mixed_plan.py": [
        "read 0:doc00.txt         succeeded  io",
        "count 0:doc00.txt        succeeded  cpu",
        "mark_done                succeeded  io",
        "lines_read = 600",
        "status: succeeded",
        "3 files, 600 lines",
        "_SUCCESS, summary.json, top_words.csv",
    ],
    "agent_tool_calls.py": [
        "chat (sync): 3 results in",
        "anthropic (async): 2 results in",
        "Error: unknown tool 'book_flight'",
        "Error: tool 'fetch_page' timed out after 0.5 s",
        "Error: ValueError: no forecast for 'Atlantis'",
        "'status': 'success'",
        "8 of 8 conversations came back right",
    ],
    "dask_cluster.py": [
        "sizing: dask: 2 workers, cpu_workers=2 threads",
        "busy_loop  timed_out  dask  tcp://127.0.0.1:",
        "events from warm_up: emitted warming up in 5 steps, progress (1, 5)",
        "combine    succeeded  dask",
        "status: partial",
    ],
}
"""Lines (substrings) each example's standard output must contain."""


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes whose environment has ``MARKER=tag`` (the example's workers)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:  # gone, or not ours to read
            continue
    return found


def test_examples_are_found() -> None:
    assert EXAMPLES, "no examples/*.py found"
    missing = sorted(set(ARGS) - {p.name for p in EXAMPLES})
    assert not missing, f"ARGS names examples that do not exist: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path: Path) -> None:
    tag = uuid.uuid4().hex
    env = {**os.environ, MARKER: tag, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(path), *ARGS.get(path.name, [])]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
        )
    finally:
        deadline = time.monotonic() + 5.0
        left = tagged_processes(tag)
        while left and time.monotonic() < deadline:
            psutil.wait_procs(left, timeout=0.2)
            left = tagged_processes(tag)
        for p in left:
            p.kill()
    output = f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{output}"
    for line in EXPECT.get(path.name, []):
        assert line in proc.stdout, f"{line!r} missing from the output of {path.name}\n{output}"
    assert not left, f"{path.name} left processes running: {[p.pid for p in left]}"
