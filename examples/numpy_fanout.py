"""Fan-out / fan-in of heavy NumPy work: a Monte Carlo price, in parallel and serially.

What it shows:

* a CPU action (``@ap.action(kind="cpu")``) doing real NumPy work: it simulates
  geometric Brownian motion paths from its own seeded random stream and prices an
  Asian call option on them, returning partial sums;
* a plan that fans out ``--parts`` such actions and fans in with one node that takes
  the list of their results (``plan.add(combine, parts)``);
* that the parallel answer is the serial one: every part draws from its own child of
  one ``np.random.SeedSequence``, so the same parts computed one after another in
  this process give the same numbers (checked with ``np.allclose``);
* how the runner sized itself (``runner.sizing.reason``) and the speedup it got.

Run it::

    python examples/numpy_fanout.py                    # a few seconds on 2 cores
    python examples/numpy_fanout.py --parts 16 --size 400000

Exit status: 0 when the parallel and serial results agree, 1 otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import NamedTuple

import numpy as np

import actionpool as ap

SEED = 20240501
STEPS = 64  # time steps per path (one year, weekly-ish averaging)
BATCH = 25_000  # paths simulated at once: bounds each worker's memory (BATCH x STEPS floats)


class Partial(NamedTuple):
    """The partial sums one part contributes to the estimate."""

    n: int  # paths simulated
    total: float  # sum of discounted payoffs
    total_sq: float  # sum of squared discounted payoffs


class Estimate(NamedTuple):
    """The combined Monte Carlo estimate."""

    price: float  # mean discounted payoff
    stderr: float  # standard error of the mean
    n: int  # paths in all


@ap.action(kind="cpu")
def simulate_part(
    seed: np.random.SeedSequence,
    paths: int,
    spot: float = 100.0,
    strike: float = 100.0,
    rate: float = 0.03,
    vol: float = 0.25,
    years: float = 1.0,
) -> Partial:
    """Price an arithmetic-average Asian call on ``paths`` simulated paths.

    Args:
        seed: this part's own seed sequence (a child of the run's root seed).
        paths: how many price paths to simulate.
        spot, strike: initial price and strike, in currency units.
        rate: risk-free rate per year; vol: volatility per sqrt(year).
        years: time to expiry.

    Returns:
        The partial sums of the discounted payoffs.
    """
    rng = np.random.default_rng(seed)
    dt = years / STEPS
    drift = (rate - 0.5 * vol * vol) * dt
    shock = vol * math.sqrt(dt)
    discount = math.exp(-rate * years)
    total = 0.0
    total_sq = 0.0
    done = 0
    while done < paths:
        k = min(BATCH, paths - done)
        log_steps = drift + shock * rng.standard_normal((k, STEPS))
        prices = spot * np.exp(np.cumsum(log_steps, axis=1))  # (k, STEPS) price paths
        payoff = discount * np.maximum(prices.mean(axis=1) - strike, 0.0)
        total += float(payoff.sum())
        total_sq += float(payoff @ payoff)
        done += k
    return Partial(paths, total, total_sq)


def combine(parts: list[Partial]) -> Estimate:
    """Fan-in: combine the parts' partial sums into a price and its standard error."""
    n = sum(p.n for p in parts)
    total = math.fsum(p.total for p in parts)
    total_sq = math.fsum(p.total_sq for p in parts)
    mean = total / n
    var = max(0.0, total_sq / n - mean * mean)
    return Estimate(mean, math.sqrt(var / max(1, n - 1)), n)


def seeds(parts: int) -> list[np.random.SeedSequence]:
    """One independent, reproducible random stream per part."""
    return np.random.SeedSequence(SEED).spawn(parts)


def run_parallel(runner: ap.Runner, parts: int, size: int) -> tuple[Estimate, ap.Report]:
    """Fan out ``parts`` simulations on the runner's CPU pool, fan in with ``combine``."""
    plan = ap.Plan()
    sims = [
        plan.add(simulate_part, seed, size, name=f"part{i}") for i, seed in enumerate(seeds(parts))
    ]
    estimate = plan.add(combine, sims, name="combine")  # a list of nodes: waits for all
    report = runner.run(plan)
    report.raise_for_failures()
    return report[estimate], report


def run_serial(parts: int, size: int) -> Estimate:
    """The same computation, one part after another in this process."""
    return combine([simulate_part(seed, size) for seed in seeds(parts)])


def warm_up(runner: ap.Runner) -> None:
    """Start the worker processes (and import NumPy in them) before timing anything."""
    list(runner.map(np.sqrt, range(2 * runner.sizing.cpu_workers)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--parts", type=int, default=8, help="actions to fan out (default 8)")
    parser.add_argument("--size", type=int, default=250_000, help="paths per part (default 250000)")
    args = parser.parse_args(argv)
    if args.parts < 1 or args.size < 1:
        parser.error("--parts and --size must be >= 1")

    with ap.Runner() as runner:
        print(f"sizing: {runner.sizing.reason}")
        t0 = time.perf_counter()
        warm_up(runner)
        t_warm = time.perf_counter() - t0

        t0 = time.perf_counter()
        parallel, report = run_parallel(runner, args.parts, args.size)
        t_parallel = time.perf_counter() - t0

    t0 = time.perf_counter()
    serial = run_serial(args.parts, args.size)
    t_serial = time.perf_counter() - t0

    workers = {o.worker for o in report.outcomes if o.name.startswith("part")}
    print(f"{args.parts} parts x {args.size} paths on {len(workers)} worker process(es)")
    print(f"parallel: price={parallel.price:.6f} +/- {parallel.stderr:.6f}  ({t_parallel:.2f} s)")
    print(f"serial:   price={serial.price:.6f} +/- {serial.stderr:.6f}  ({t_serial:.2f} s)")
    print(f"worker start-up (not in the parallel time): {t_warm:.2f} s")
    print(f"speedup: {t_serial / t_parallel:.2f}x with {runner.sizing.cpu_workers} cpu workers")
    print(f"status: {report.status}")

    same = parallel.n == serial.n and np.allclose(
        [parallel.price, parallel.stderr], [serial.price, serial.stderr], rtol=1e-12, atol=0.0
    )
    if not same:
        print("MISMATCH: the parallel result differs from the serial one", file=sys.stderr)
        return 1
    print("results match: parallel == serial")
    return 0


if __name__ == "__main__":
    sys.exit(main())
