"""Scale a plan out to a Dask cluster: the same plan, outcomes and events as locally.

What it shows:

* ``ap.Runner(backend="dask")``: with no ``--address`` the runner starts a
  ``distributed.LocalCluster`` on loopback of ``--workers`` processes of one thread
  each (``cpu_workers=``), and closes it with itself; with ``--address tcp://HOST:8786``
  it uses the cluster you started (``dask scheduler`` / ``dask worker``; see
  docs/scaling-out.md);
* ``runner.sizing``: the cluster's workers, threads and memory, and where each number
  came from;
* a fan-out of cpu actions, a Monte Carlo estimate of pi in ``--tasks`` parts with
  NumPy, each part drawing from its own child of one ``np.random.SeedSequence``; each
  runs inside a Dask worker, on that worker's own actionpool process; one fan-in node
  (``plan.add(combine, parts)``) adds them up;
* events from the cluster: ``warm_up`` calls ``ctx.emit`` and ``ctx.progress``, which
  reach ``on_event`` here while it runs;
* a timeout that really fires: ``@ap.action(timeout=0.5)`` on a busy loop that catches
  nothing ends ``timed_out`` (``ap.ActionTimeout`` is raised inside it), its Dask worker
  lives on, and nothing else in the plan is affected (the run's status is ``partial``);
* each outcome's ``pool`` (``dask``) and ``worker`` (``<worker address> pid <pid>``).

Run it::

    python examples/dask_cluster.py                      # a LocalCluster of 2 workers
    python examples/dask_cluster.py --tasks 32 --samples 2000000
    python examples/dask_cluster.py --address tcp://scheduler:8786

The actions are defined here, in ``__main__``, so they travel to the workers by value
(cloudpickle); the workers need NumPy and actionpool installed. Needs
``pip install 'actionpool[dask]'``.

Exit status: 0 when every part and the fan-in succeeded, the busy loop timed out and
the estimate is within 0.05 of pi; 1 otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import numpy as np

import actionpool as ap

SEED = 20240501


@ap.action(kind="cpu")
def estimate_part(seed: np.random.SeedSequence, samples: int) -> int:
    """Draw ``samples`` points in the unit square; return how many fall in the quarter
    circle (a part of the Monte Carlo estimate of pi)."""
    rng = np.random.default_rng(seed)
    inside = 0
    left = samples
    while left > 0:
        k = min(left, 1_000_000)  # bounds the memory of one batch
        xy = rng.random((k, 2))
        inside += int(np.count_nonzero((xy * xy).sum(axis=1) <= 1.0))
        left -= k
    return inside


@ap.action(kind="cpu")
def warm_up(ctx: ap.Context, steps: int) -> str:
    """A small job that reports as it goes: ``ctx.emit`` once, ``ctx.progress`` per step.
    The events travel from the Dask worker to ``on_event`` in this process."""
    ctx.emit(f"warming up in {steps} steps")
    total = 0.0
    for i in range(steps):
        total += float(np.linalg.norm(np.arange(10_000, dtype=float) + i))
        ctx.progress(i + 1, steps)
    return f"{steps} steps done"


@ap.action(kind="cpu", timeout=0.5)
def busy_loop() -> None:
    """Never returns: at 0.5 s ``ap.ActionTimeout`` is raised inside it (nothing here
    catches it), so the node ends ``timed_out``; one that caught it would have its
    process killed after ``timeout_grace``."""
    x = 0
    while True:
        x += 1


def combine(counts: list[int], samples: int) -> float:
    """Fan-in: pi from the parts' counts (each of ``samples`` points)."""
    return 4.0 * sum(counts) / (samples * len(counts))


def build_plan(tasks: int, samples: int) -> ap.Plan:
    """``warm_up`` and ``busy_loop`` beside a fan-out of ``tasks`` parts and their fan-in."""
    plan = ap.Plan()
    plan.add(warm_up, 5, name="warm_up")
    plan.add(busy_loop, name="busy_loop")
    seeds = np.random.SeedSequence(SEED).spawn(tasks)
    parts = [plan.add(estimate_part, s, samples, name=f"part{i}") for i, s in enumerate(seeds)]
    plan.add(combine, parts, samples, name="combine")  # a list of nodes: waits for all
    return plan


def check(report: ap.Report, tasks: int) -> list[str]:
    """What went wrong, if anything."""
    problems = []
    wanted = {f"part{i}" for i in range(tasks)} | {"warm_up", "combine"}
    for o in report.outcomes:
        if o.name in wanted and o.status is not ap.Status.SUCCEEDED:
            problems.append(f"{o.name} ended {o.status}: {o.error!r}")
    busy = report.outcome("busy_loop")
    if busy.status is not ap.Status.TIMED_OUT:
        problems.append(f"busy_loop ended {busy.status}, not timed_out: {busy.error!r}")
    if report.outcome("combine").status is ap.Status.SUCCEEDED:
        pi = report["combine"]
        if abs(pi - math.pi) > 0.05:
            problems.append(f"the estimate {pi} is not within 0.05 of pi")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument(
        "--address", help="a Dask scheduler, tcp://HOST:8786 (default: start a LocalCluster)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="LocalCluster workers, without --address (2)"
    )
    parser.add_argument("--tasks", type=int, default=8, help="parts to fan out (default 8)")
    parser.add_argument(
        "--samples", type=int, default=200_000, help="points per part (default 200000)"
    )
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.samples < 1 or args.workers < 1:
        parser.error("--tasks, --samples and --workers must be >= 1")

    events: list[ap.Event] = []
    options: dict[str, Any] = {"backend": "dask"}
    if args.address:
        options["address"] = args.address  # its workers are its own: no cpu_workers
    else:
        options["cpu_workers"] = args.workers

    t0 = time.perf_counter()
    with ap.Runner(**options) as runner:
        t_start = time.perf_counter() - t0
        print(f"sizing: {runner.sizing}")
        for line in runner.sizing.reason.split("; "):
            print(f"  {line}")
        report = runner.run(build_plan(args.tasks, args.samples), on_event=events.append)

    print(f"{'node':<10} {'status':<10} {'pool':<5} {'worker':<32} {'seconds':>8}")
    for o in report:
        seconds = f"{o.duration_s:.3f}" if o.duration_s is not None else "-"
        worker = "-" if o.worker is None else str(o.worker)
        print(f"{o.name:<10} {o.status!s:<10} {o.pool or '-':<5} {worker:<32} {seconds:>8}")
    from_warm_up = [e for e in events if e.name == "warm_up" and e.kind in ("emitted", "progress")]
    print(f"events from warm_up: {', '.join(f'{e.kind} {e.data}' for e in from_warm_up)}")
    print(f"busy_loop: {report.outcome('busy_loop').error}")
    if report.outcome("combine").status is ap.Status.SUCCEEDED:
        pi = report["combine"]
        print(
            f"pi ~= {pi:.5f} from {args.tasks} x {args.samples} points"
            f" (error {abs(pi - math.pi):.5f})"
        )
    print(f"status: {report.status}  ({report.duration_s:.2f} s run, {t_start:.2f} s to start)")

    problems = check(report, args.tasks)
    for problem in problems:
        print(f"CHECK FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
