"""What a journal costs per node: the same plans with and without ``journal=``.

Plans of N independent tiny nodes (a cpu action that returns its argument, and an io
one), run on one warm runner, alternately with a fresh journal and without one, for
``--rounds`` interleaved rounds; medians. Also a resume: the same plan run again with
its finished journal (every node loaded, none run).

Usage: ``python benchmarks/journal_overhead.py [--nodes 2000] [--rounds 7]``;
prints a markdown table (the figures in ``docs/durable-runs.md`` come from it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import actionpool as ap


def ident(x: int) -> int:
    return x


def build(n: int, kind: str) -> ap.Plan:
    act = ap.action(ident, kind=kind, name=f"ident_{kind}")
    plan = ap.Plan()
    for i in range(n):
        plan.add(act, i, name=f"n{i}")
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    n = args.nodes
    rows = []
    with ap.Runner() as runner, tempfile.TemporaryDirectory() as tmp:
        for kind in ("cpu", "io"):
            plan = build(n, kind)
            runner.run(plan)  # warm up the pool
            plain: list[float] = []
            kept: list[float] = []
            resumed: list[float] = []
            for r in range(args.rounds):
                t0 = time.perf_counter()
                runner.run(plan)
                plain.append(time.perf_counter() - t0)
                journal = Path(tmp) / f"{kind}{r}.db"
                t0 = time.perf_counter()
                report = runner.run(plan, journal=journal)
                kept.append(time.perf_counter() - t0)
                assert report.status is ap.RunStatus.SUCCEEDED
                t0 = time.perf_counter()
                runner.run(plan, journal=journal)
                resumed.append(time.perf_counter() - t0)
            p, k, s = (statistics.median(x) for x in (plain, kept, resumed))
            rows.append((kind, p, k, s))
        sizing = runner.sizing
    print(f"{n} tiny nodes per plan, {args.rounds} interleaved rounds, medians; {sizing}")
    print()
    print("| action kind | no journal | with journal | per node | resume (all loaded) |")
    print("|---|---|---|---|---|")
    for kind, p, k, s in rows:
        per_node = (k - p) / n * 1e6
        print(
            f"| {kind} | {p * 1e3:.0f} ms | {k * 1e3:.0f} ms | +{per_node:.0f} µs"
            f" ({k / p:.2f}x) | {s * 1e3:.0f} ms |"
        )


if __name__ == "__main__":
    main()
