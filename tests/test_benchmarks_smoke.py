"""The micro benchmarks run in the normal suite, once each and untimed, so they cannot rot;
and the suite's verdicts are checked on made-up curves.

``benchmarks/test_micro.py`` checks every benchmark's result; with
``--benchmark-disable`` pytest-benchmark calls each benchmarked function once.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def _suite() -> Any:
    """benchmarks/suite.py as a module (its helpers are imported from benchmarks/)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_suite", ROOT / "benchmarks/suite.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_suite"] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_the_w9_verdict_passes_linear_and_concave_curves_and_fails_superlinear_ones() -> None:
    suite = _suite()
    sizes = [2_500, 5_000, 10_000, 20_000, 40_000]  # nodes + edges

    def verdict(times: list[float]) -> bool:
        points = [
            {"nodes": n // 2, "n_plus_e": n, "run_s": t, "run_us_per_ne": t / n * 1e6}
            for n, t in zip(sizes, times, strict=True)
        ]
        per = [p["run_us_per_ne"] for p in points]
        summary = {
            "chain": {
                "points": points,
                "fit": suite.linear_fit(sizes, times),
                "per_ne_spread": max(per) / min(per),
            }
        }
        (target,) = suite.w9_curve_targets(summary)
        return bool(target["met"])

    assert verdict([0.1 + 50e-6 * n for n in sizes])  # a fixed cost plus linear
    assert verdict([0.517, 1.09, 1.91, 3.49, 5.45])  # a measured chain: dearer when small
    assert not verdict([2e-9 * n * n for n in sizes])  # quadratic
    assert not verdict([50e-6 * n * (n / 2_500) ** 0.3 for n in sizes])  # n^1.3
    # n^1.14: the cost per node+edge grows only 1.47x over the sizes, and is not linear
    assert not verdict([50e-6 * n * (n / 2_500) ** 0.14 for n in sizes])
