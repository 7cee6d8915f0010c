"""Actions and a plan for the durable-run tests (tests/test_journal.py).

Importable by worker processes, and runnable as a program: ``python -m
tests.journal_actions FOLDER JOURNAL [main|kill]`` runs that plan with that journal and prints the
report's status; with ``ACTIONPOOL_TEST_BLOCK=1`` in its environment the slow nodes
mark that they started and then wait for ever, so the test can kill the process while
they run.

Every node appends a line ``<node> <idempotency key>`` to ``FOLDER/effects.txt`` for
each side effect it does, so the test counts how often each one happened.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import actionpool as ap
from tests.helpers import write_atomic

BLOCK = "ACTIONPOOL_TEST_BLOCK"


def _effect(folder: str, ctx: ap.Context) -> None:
    with open(Path(folder) / "effects.txt", "a") as f:
        f.write(f"{ctx.node} {ctx.idempotency_key}\n")
        f.flush()
        os.fsync(f.fileno())


def _mark_and_block(folder: str, ctx: ap.Context) -> None:
    """In the first session: say "started", then wait until the process is killed."""
    if os.environ.get(BLOCK) != "1":
        return
    write_atomic(Path(folder) / f"{ctx.node}.started", ctx.idempotency_key)
    while True:
        time.sleep(0.05)


def effects(folder: str) -> list[str]:
    path = Path(folder) / "effects.txt"
    return path.read_text().splitlines() if path.exists() else []


def _happened(ctx: ap.Context) -> str:
    folder = ctx.state["folder"]
    done = f"{ctx.node} {ctx.idempotency_key}" in effects(folder)
    return "done" if done else "retry"


@ap.action(kind="cpu")
def part(ctx: ap.Context, i: int) -> int:
    """Idempotent and quick: done before the kill, loaded on resume."""
    _effect(ctx.state["folder"], ctx)
    ctx.update({f"part{i}": i * i})
    return i * i


@ap.action(kind="cpu")
def crunch(ctx: ap.Context, xs: list[int]) -> int:
    """Idempotent, running when the process is killed: runs again on resume."""
    _mark_and_block(ctx.state["folder"], ctx)
    _effect(ctx.state["folder"], ctx)
    return sum(xs)


@ap.action(kind="io", idempotent=False, reconcile=_happened)
def pay(ctx: ap.Context, amount: int) -> None:
    """Not idempotent; its side effect happens, then the process is killed."""
    _effect(ctx.state["folder"], ctx)
    _mark_and_block(ctx.state["folder"], ctx)


@ap.action(kind="io", idempotent=False, reconcile=_happened)
def mail(ctx: ap.Context, to: str) -> None:
    """Not idempotent; killed before its side effect: reconcile says "retry"."""
    _mark_and_block(ctx.state["folder"], ctx)
    _effect(ctx.state["folder"], ctx)


@ap.action(kind="io")
def summary(total: int, paid: None, mailed: None) -> str:
    return f"total={total}"


SLOW = ("crunch", "pay", "mail")


def build(**reconcile: Any) -> tuple[ap.Plan, dict[str, ap.Node]]:
    """The plan; ``pay=fn`` / ``mail=fn`` replace those actions' ``reconcile`` (None:
    without one). The fingerprint does not include it, so the journal still fits."""
    plan = ap.Plan()
    parts = [plan.add(part, i, name=f"part{i}") for i in range(4)]
    c = plan.add(crunch, parts, name="crunch")
    pay_ = pay.with_options(reconcile=reconcile["pay"]) if "pay" in reconcile else pay
    mail_ = mail.with_options(reconcile=reconcile["mail"]) if "mail" in reconcile else mail
    p = plan.add(pay_, 10, name="pay", after=parts)
    m = plan.add(mail_, "a@b.c", name="mail", after=parts)
    s = plan.add(summary, c, p, m, name="summary")
    return plan, {"crunch": c, "pay": p, "mail": m, "summary": s}


@ap.action(kind="io", idempotent=False)
def kill_this_process(ctx: ap.Context, upstream: int) -> int:
    """In the first session: SIGKILL the runner's own process (an io action runs in
    it) the moment it starts, before its side effect."""
    if os.environ.get(BLOCK) == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    _effect(ctx.state["folder"], ctx)
    return upstream


def build_kill() -> tuple[ap.Plan, dict[str, ap.Node]]:
    """``part0`` then ``kill`` (which needs its value): the process dies as soon as the
    dependent starts, so the journal holds exactly what was committed before that."""
    plan = ap.Plan()
    first = plan.add(part, 0, name="part0")
    kill = plan.add(kill_this_process, first, name="kill")
    return plan, {"part0": first, "kill": kill}


PLANS = {"main": build, "kill": build_kill}


def run(folder: str, journal: str, which: str = "main", **runner_options: Any) -> ap.Report:
    plan, _ = PLANS[which]()
    with ap.Runner(cpu_workers=2, io_workers=4, **runner_options) as runner:
        return runner.run(plan, {"folder": folder}, journal=journal)


if __name__ == "__main__":
    report = run(sys.argv[1], sys.argv[2], *sys.argv[3:4])
    print(report.status)
