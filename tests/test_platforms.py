"""Platforms without the Linux facilities: imports, io actions, and honest cpu errors.

Windows has no POSIX shared memory (``_posixshmem``) and neither Windows nor macOS has
``SOCK_SEQPACKET`` sockets. Each test runs a child interpreter from which those are
taken away before actionpool is imported, and checks what a user there would see.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import socket, sys
sys.modules["_posixshmem"] = None          # import _posixshmem raises ImportError
if {no_seqpacket}:
    del socket.SOCK_SEQPACKET              # as on macOS and Windows
import json
import numpy as np
import actionpool as ap


def square(x):
    return x * x


def total(a):
    return float(a.sum())


if __name__ == "__main__":
    out = {{}}
    with ap.Runner(cpu_workers=1, io_workers=2) as runner:
        io_square = ap.action(square, kind="io")
        plan = ap.Plan()
        parts = [plan.add(io_square, i, name=f"io{{i}}") for i in range(3)]
        plan.add(ap.action(sum, kind="io"), parts, name="sum")
        report = runner.run(plan)
        out["io"] = [report.status.value, report["sum"]]
        plan = ap.Plan()
        plan.add(total, np.ones(2_000_000), name="cpu")  # 16 MB: above shm_threshold
        cpu = runner.run(plan).outcome("cpu")
        out["cpu"] = [cpu.status.value, cpu.value, type(cpu.error).__name__, str(cpu.error)]
        out["shm_threshold"] = runner.shm_threshold
    print(json.dumps(out))
"""


def _run(tmp_path: Path, no_seqpacket: bool) -> dict:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD.format(no_seqpacket=no_seqpacket)))
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_without_the_process_facilities_io_runs_and_cpu_fails_naming_the_platform(
    tmp_path: Path,
) -> None:
    out = _run(tmp_path, no_seqpacket=True)
    assert out["io"] == ["succeeded", 0 + 1 + 4]
    status, value, error_type, message = out["cpu"]
    assert status == "failed" and value is None
    assert error_type == "PlatformUnsupported"
    assert "node 'cpu'" in message and "SOCK_SEQPACKET" in message
    assert "kind='io'" in message and "backend='dask'" in message
    assert out["shm_threshold"] is None  # no shared memory: arrays go in the pickle


def test_without_shared_memory_cpu_actions_still_run(tmp_path: Path) -> None:
    out = _run(tmp_path, no_seqpacket=False)
    assert out["io"] == ["succeeded", 5]
    assert out["cpu"][:2] == ["succeeded", 2_000_000.0]
    assert out["shm_threshold"] is None
