"""The micro benchmarks run in the normal suite, once each and untimed, so they cannot rot.

``benchmarks/test_micro.py`` checks every benchmark's result; with
``--benchmark-disable`` pytest-benchmark calls each benchmarked function once.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_micro_benchmarks_run_and_check_their_results() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks/test_micro.py",
            "-q",
            "--benchmark-disable",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
