"""Platforms without the Linux facilities: imports, io actions, the portable path,
and honest cpu errors.

macOS has no ``SOCK_SEQPACKET`` sockets (nor pidfds, ``waitid`` or memfds): cpu actions
take the portable path there. Windows has no POSIX shared memory (``_posixshmem``) and
no process groups either: cpu actions end FAILED, saying why. Each test runs a child
interpreter from which those are taken away before actionpool is imported, and checks
what a user there would see.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import actionpool as ap

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import os, socket, sys
if {no_shm}:
    sys.modules["_posixshmem"] = None      # import _posixshmem raises ImportError
if {no_seqpacket}:
    del socket.SOCK_SEQPACKET              # as on macOS and Windows
if {no_groups}:
    del os.killpg                          # as on Windows
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
        out["cpu_pool"] = runner.sizing.cpu_pool
    print(json.dumps(out))
"""


def _run(
    tmp_path: Path,
    *,
    no_shm: bool = False,
    no_seqpacket: bool = False,
    no_groups: bool = False,
    portable: str = "",
) -> dict:
    script = tmp_path / "child.py"
    code = CHILD.format(no_shm=no_shm, no_seqpacket=no_seqpacket, no_groups=no_groups)
    script.write_text(textwrap.dedent(code))
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env={**os.environ, "ACTIONPOOL_PORTABLE": portable},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_without_seqpacket_sockets_cpu_actions_take_the_portable_path(tmp_path: Path) -> None:
    out = _run(tmp_path, no_seqpacket=True)  # as on macOS
    assert out["io"] == ["succeeded", 0 + 1 + 4]
    assert out["cpu"][:2] == ["succeeded", 2_000_000.0]
    assert "portable path" in out["cpu_pool"]
    assert out["shm_threshold"] is not None  # the array went through shared memory


def test_without_process_groups_io_runs_and_cpu_fails_naming_the_platform(
    tmp_path: Path,
) -> None:
    out = _run(tmp_path, no_shm=True, no_seqpacket=True, no_groups=True)  # as on Windows
    assert out["io"] == ["succeeded", 0 + 1 + 4]
    status, value, error_type, message = out["cpu"]
    assert status == "failed" and value is None
    assert error_type == "PlatformUnsupported"
    assert "node 'cpu'" in message and "process groups" in message
    assert "kind='io'" in message and "backend='dask'" in message
    assert out["cpu_pool"].startswith("none: ")
    assert out["shm_threshold"] is None  # no shared memory: arrays go in the pickle


def test_portable_0_forbids_the_portable_path(tmp_path: Path) -> None:
    out = _run(tmp_path, no_seqpacket=True, portable="0")
    status, _, error_type, message = out["cpu"]
    assert (status, error_type) == ("failed", "PlatformUnsupported")
    assert "SOCK_SEQPACKET" in message


def test_portable_1_forces_the_portable_path_on_linux(tmp_path: Path) -> None:
    out = _run(tmp_path, portable="1")
    assert out["cpu"][:2] == ["succeeded", 2_000_000.0]
    assert "portable path" in out["cpu_pool"]


def test_a_bad_portable_value_is_refused_naming_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("ACTIONPOOL_PORTABLE", "yes")
    with pytest.raises(ValueError, match="ACTIONPOOL_PORTABLE must be 0 or 1, got 'yes'"):
        ap.Runner(cpu_workers=1)


@pytest.mark.zygote_path
def test_without_shared_memory_cpu_actions_still_run(tmp_path: Path) -> None:
    out = _run(tmp_path, no_shm=True)
    assert out["io"] == ["succeeded", 5]
    assert out["cpu"][:2] == ["succeeded", 2_000_000.0]
    assert out["shm_threshold"] is None


def test_fork_is_refused_on_the_portable_path_saying_why(monkeypatch) -> None:
    monkeypatch.setenv("ACTIONPOOL_PORTABLE", "1")
    with pytest.raises(RuntimeError, match="worker_start='fork' needs the zygote path"):
        ap.Runner(cpu_workers=1, worker_start="fork")
