"""Soak: many tiny actions, twice over, on one runner; does anything grow?

Each round sends 100,000 tiny calls through ``runner.map`` and runs a plan of 10,000
tiny nodes (cpu nodes, io nodes, and a fan-in over them). A first round warms up
(imports, caches, pools at full size); then the parent's and each worker's resident
set size (RSS), the parent's open file descriptors and threads, and the files in
``/dev/shm`` are read, two more rounds run, and they are read again.

Pass: RSS grew less than 10% (parent, and the workers' total), and the counts of file
descriptors, threads and ``/dev/shm`` entries are back to their values after the
warm-up. Prints a markdown table; exits 1 on a failure.

Usage: ``python benchmarks/soak.py [--items 100000] [--nodes 10000] [--rounds 2]``
(``nox -s soak``); the figures in ``docs/reliability.md`` come from it.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import psutil

import actionpool as ap

RSS_GROWTH_LIMIT = 0.10


def tiny(x: int) -> int:
    return x + 1


def total(xs: list[int]) -> int:
    return sum(xs)


def plan_of(n: int) -> ap.Plan:
    plan = ap.Plan()
    io_tiny = ap.action(tiny, kind="io", name="io_tiny")
    nodes = [plan.add(tiny if i % 2 else io_tiny, i, name=f"n{i}") for i in range(n)]
    plan.add(total, nodes, name="total")
    return plan


def shm_entries() -> int | None:
    path = Path("/dev/shm")
    return len(list(path.iterdir())) if path.is_dir() else None


def reading(runner: ap.Runner) -> dict[str, Any]:
    gc.collect()
    me = psutil.Process()
    workers = []
    for pid in runner.worker_pids():
        try:
            workers.append(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            continue
    return {
        "parent_rss": me.memory_info().rss,
        "workers_rss": sum(workers),
        "workers": len(workers),
        "fds": me.num_fds() if hasattr(me, "num_fds") else None,
        "threads": me.num_threads(),
        "shm": shm_entries(),
    }


def one_round(runner: ap.Runner, items: int, plan: ap.Plan, n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    count = 0
    for y in runner.map(tiny, range(items)):
        count += y
    assert count == items * (items + 1) // 2, count
    t1 = time.perf_counter()
    report = runner.run(plan)
    assert report.status is ap.RunStatus.SUCCEEDED, report
    assert report["total"] == sum(i + 1 for i in range(n))
    return t1 - t0, time.perf_counter() - t1


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    plan = plan_of(args.nodes)
    with ap.Runner() as runner:
        warm = one_round(runner, args.items, plan, args.nodes)
        before = reading(runner)
        times = [one_round(runner, args.items, plan, args.nodes) for _ in range(args.rounds)]
        after = reading(runner)
        sizing = runner.sizing
    print(
        f"soak: {args.items:,} map items and a {args.nodes:,}-node plan per round;"
        f" warm-up, then {args.rounds} rounds. {platform.system()} {platform.machine()},"
        f" Python {sys.version.split()[0]}, {sizing}"
    )
    print(f"warm-up: map {warm[0]:.2f} s, plan {warm[1]:.2f} s")
    for i, (m, p) in enumerate(times, 1):
        print(f"round {i}: map {m:.2f} s ({args.items / m:,.0f} items/s), plan {p:.2f} s")
    print()
    print("| reading | after warm-up | after the rounds | change | limit | ok |")
    print("|---|---|---|---|---|---|")
    failed = False
    for key, label in (("parent_rss", "parent RSS"), ("workers_rss", "workers' RSS (total)")):
        a, b = before[key], after[key]
        growth = (b - a) / a if a else 0.0
        ok = growth < RSS_GROWTH_LIMIT
        failed |= not ok
        print(
            f"| {label} | {mib(a)} | {mib(b)} | {growth:+.1%} | < +{RSS_GROWTH_LIMIT:.0%}"
            f" | {'yes' if ok else 'NO'} |"
        )
    for key, label in (
        ("workers", "worker processes"),
        ("fds", "parent's open fds"),
        ("threads", "parent's threads"),
        ("shm", "/dev/shm entries"),
    ):
        a, b = before[key], after[key]
        if a is None:
            continue
        ok = b == a
        failed |= not ok
        print(f"| {label} | {a} | {b} | {b - a:+d} | same | {'yes' if ok else 'NO'} |")
    print(f"\npid {os.getpid()}: {'FAILED' if failed else 'passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
