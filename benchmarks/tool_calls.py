"""Tool-call batches: what ``ap.run_tool_calls`` adds over the calls themselves.

A batch of N tool calls, each sleeping ``--seconds`` (0.2 s), should take about as long
as its slowest call when the pool has a worker per call. This script measures, for
N = 1, 8 and 64 calls of an io tool and N = 8 calls of a cpu tool, the wall time of
``ap.run_tool_calls`` on the default runner (warmed up first) and prints the medians
over ``--rounds`` rounds as a markdown table:

* *ideal*: ``ceil(N / workers) x seconds``, the time the calls themselves need on the
  pool of their kind (for io, one thread per call; for cpu, the pool's processes);
* *overhead*: median wall time minus ideal: parsing, checks, the plan, dispatch,
  the results;
* for io rows, the same batch as ``concurrent.futures.ThreadPoolExecutor.map`` (a pool
  of 64 threads, kept warm), the floor a plain thread pool gives.

Usage::

    python benchmarks/tool_calls.py [--rounds N] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import actionpool as ap
from actionpool import tools as tools_mod


@ap.action(kind="io")
def io_sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "ok"


def cpu_sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "ok"


TOOLS = {"io_sleep": io_sleep, "cpu_sleep": cpu_sleep}


def calls(tool: str, n: int, seconds: float) -> list[dict[str, Any]]:
    args = json.dumps({"seconds": seconds})
    return [
        {"id": f"c{i}", "type": "function", "function": {"name": tool, "arguments": args}}
        for i in range(n)
    ]


def batch_time(tool: str, n: int, seconds: float) -> float:
    batch = calls(tool, n, seconds)
    start = time.perf_counter()
    results = ap.run_tool_calls(batch, TOOLS)
    took = time.perf_counter() - start
    bad = [r for r in results if r["content"] != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} calls did not succeed: {bad[0]}")
    return took


def threads_time(pool: ThreadPoolExecutor, n: int, seconds: float) -> float:
    start = time.perf_counter()
    list(pool.map(time.sleep, [seconds] * n))
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.2)
    args = parser.parse_args()
    seconds = args.seconds

    runner = tools_mod._default_runner()
    sizing = runner.sizing
    # warm up: the default runner's threads, its cpu workers, the plan machinery
    for _ in range(2):
        batch_time("io_sleep", 64, 0.01)
        batch_time("cpu_sleep", 2 * sizing.cpu_workers, 0.01)

    cases = [("io_sleep", 1), ("io_sleep", 8), ("io_sleep", 64), ("cpu_sleep", 8)]
    rows = []
    with ThreadPoolExecutor(64) as pool:
        threads_time(pool, 64, 0.01)
        for tool, n in cases:
            workers = sizing.io_workers if tool == "io_sleep" else sizing.cpu_workers
            ideal = math.ceil(n / workers) * seconds
            walls = [batch_time(tool, n, seconds) for _ in range(args.rounds)]
            base = ""
            if tool == "io_sleep":
                tp = [threads_time(pool, n, seconds) for _ in range(args.rounds)]
                base = f"{(statistics.median(tp) - ideal) * 1e3:.1f}"
            med = statistics.median(walls)
            rows.append(
                f"| {n} | {tool.split('_')[0]} | {ideal:.2f} | {med:.3f} |"
                f" {(med - ideal) * 1e3:.1f} | {(min(walls) - ideal) * 1e3:.1f} |"
                f" {(max(walls) - ideal) * 1e3:.1f} | {base} |"
            )
    tools_mod._close_default()

    print(
        f"tool-call batches, tools sleeping {seconds:g} s, median of {args.rounds} rounds;"
        f" {platform.system()} {platform.machine()}, Python {platform.python_version()};"
        f" default runner: cpu_workers={sizing.cpu_workers} io_workers={sizing.io_workers}"
    )
    print()
    print(
        "| calls | kind | ideal (s) | median wall (s) | overhead (ms) | min (ms) | max (ms)"
        " | ThreadPoolExecutor overhead (ms) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
