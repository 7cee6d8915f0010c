"""The functions the benchmark's workers run.

They live here, at module level, so that every library pickles them by reference
(``bench_tasks.inc``) and every worker imports them by name, whatever its start method;
and this module imports only the standard library, so that a worker started as a fresh
interpreter (loky, joblib, actionpool's zygote) holds no more than a user's worker would.
The driver processes put ``benchmarks/`` on ``PYTHONPATH``, which their workers inherit.
"""

from __future__ import annotations

import math
import time
from typing import Any


def inc(x: int) -> int:
    return x + 1


def inc_chunk(xs: list[int]) -> list[int]:
    return [x + 1 for x in xs]


def noop() -> None:
    return None


def busy(n: int) -> int:
    """Pure-Python work: ``n`` loop iterations (the GIL is held throughout)."""
    x = 0
    for i in range(n):
        x += i
    return x


def busy_timed(n: int) -> float:
    t0 = time.perf_counter()
    busy(n)
    return time.perf_counter() - t0


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def task_sum(a: Any) -> float:
    """Read every byte of the NumPy array ``a`` (as ``bench_arrays.task_sum``)."""
    return float(a.sum())


def add2(a: int, b: int) -> int:
    return (a + b) % 1_000_003


def count_parts(*parts: list[Any]) -> int:
    return sum(len(p) for p in parts)


def mp_chunksize(n: int, workers: int) -> int:
    """multiprocessing.Pool.map's default chunksize: ceil(n / (4 x workers))."""
    chunk, extra = divmod(n, 4 * workers)
    return max(1, chunk + (1 if extra else 0))


def chunks(xs: list[int], k: int) -> list[list[int]]:
    size = max(1, math.ceil(len(xs) / k))
    return [xs[i : i + size] for i in range(0, len(xs), size)]
