"""Fault latency: how long from a fault to what the user gets back.

For each fault this script measures, over ``--rounds`` rounds, the time from the fault
to the node's outcome (``Outcome.finished_at``), or to the worker process being gone
where that is the point, and prints the medians as a markdown table (``--json`` also
writes every sample). Every case runs on
``ap.Runner(cpu_workers=2, io_workers=4, timeout_grace=0.5)``.

How each fault is timed:

* faults inside a worker (raise, ``os._exit``, SIGKILL of itself, segfault): the action
  writes ``time.time()`` to a file just before it faults;
* timeouts (``timeout=0.5``): from the deadline, ``Outcome.started_at + timeout``;
  the io case polls ``ctx.cancelled()`` every millisecond and returns at once, which
  once raced the deadline timer (the node could end ``SUCCEEDED``); an ``async def``
  action that blocks its event loop is timed likewise, with the time a cpu node and
  another ``async def`` node beside it took;
* OOM kill: simulated as the kernel's OOM killer does it, a SIGKILL from outside sent
  by this script to a worker that holds memory (256 MiB, touched); timed from the kill;
* unpicklable argument / result / exception: from the ``runner.run()`` call;
* a worker crash inside a ``runner.map`` chunk (``chunksize=10``, item 17 calls
  ``os._exit``), for an idempotent action (its chunk is re-run one item per task) and
  for one that is not: from the crash to ``WorkerCrashed`` out of the loop;
* ``runner.cancel()``, an interrupt of the waiting thread (what Jupyter's "interrupt
  kernel" does) in ``run()`` and while iterating ``runner.map``, leaving the ``with``
  block on an exception: from the call, signal or ``raise``;
* Ctrl-C in a script and parent death: a child process (this file, ``--child``) runs a
  runner; SIGINT to its process group (as a terminal sends it) or SIGKILL to it, then
  the time until it has exited and its workers are gone.

With ``--dask`` the cases that a cluster changes run on ``ap.Runner(backend="dask",
timeout_grace=0.5)`` over a ``LocalCluster`` of 2 one-thread workers (cpu actions on
the cluster, io actions local), with one more: SIGKILL of the Dask worker that runs a
non-idempotent action, timed from the kill to the node's outcome (the nanny then
starts a fresh worker). The cases that start runners of their own (the ``with``
block, Ctrl-C, parent death) are local only.

"Gone" means the pid no longer runs (exited, or a zombie not yet reaped). This script
makes itself a child subreaper (Linux) so that workers orphaned by the parent-death
case are reparented to it and reaped here; it leaves no process behind and says so.

Usage::

    python benchmarks/fault_latency.py [--rounds N] [--json out.json] [--dask]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil

import actionpool as ap

TIMEOUT = 0.5  # seconds: the timeout of the timeout cases
GRACE = 0.5  # seconds: Runner(timeout_grace=...), from the soft timeout to the kill
LONG = 30.0  # seconds a busy action would run if nothing stopped it
WAIT = 20.0  # seconds this script waits for anything before it gives up
HOG_MIB = 256  # memory held by the action of the OOM case
BLOCK = 1.5  # seconds the blocking async action blocks its event loop
MAP_ITEMS, MAP_CHUNK, MAP_BAD = 40, 10, 17  # the map-crash cases: item 17 of chunks of 10

# ---- actions (module level; this file runs as __main__, so cloudpickle sends them by value)


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def stamp(path: str) -> None:
    write_atomic(path, repr(time.time()))


def noop() -> None:
    return None


def nap() -> None:
    time.sleep(0.05)


def fail(path: str) -> None:
    stamp(path)
    raise ValueError("deliberate failure")


def sleep_long() -> None:
    time.sleep(LONG)


def sleep_with_sigalrm_blocked() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(LONG)  # what a C call that never returns to Python looks like


def loop_until_cancelled(ctx: ap.Context, path: str, poll: float = 0.005) -> None:
    stamp(f"{path}.started")
    while not ctx.cancelled():
        time.sleep(poll)
    stamp(path)


def sleep_catch_timeout_and_return() -> str:
    try:
        time.sleep(LONG)
    except ap.ActionTimeout:
        return "finished after its deadline"  # too late: the node is TIMED_OUT anyway
    return "never"


async def async_sleep_long(path: str) -> None:
    try:
        await asyncio.sleep(LONG)
    except asyncio.CancelledError:
        stamp(path)
        raise


async def async_blocks_its_loop(path: str) -> str:
    time.sleep(BLOCK)  # a mistake: blocking inside a coroutine, without awaiting
    stamp(path)
    return "late"


async def async_quick() -> float:
    await asyncio.sleep(0)
    return time.time()


def exit_3(path: str) -> None:
    stamp(path)
    os._exit(3)


def kill_self(path: str) -> None:
    stamp(path)
    os.kill(os.getpid(), signal.SIGKILL)


def segfault(path: str) -> None:
    stamp(path)
    ctypes.string_at(0)


def crash_on(x: int, bad: int, path: str) -> int:
    """Item ``bad`` appends the time to ``path`` and exits; the others return at once."""
    if x == bad:
        with open(path, "a") as f:
            f.write(f"{time.time()!r}\n")
        os._exit(9)
    return x * 10


def busy(pid_path: str, mib: int = 0, child: bool = False) -> int:
    """Hold ``mib`` MiB (touched), start a child process if asked, write the pids, sleep."""
    block = bytearray(mib << 20)
    if mib:
        block[::4096] = b"\1" * len(range(0, len(block), 4096))
    pids = [os.getpid()]
    if child:  # an action's own child process: it must go when the worker goes
        pids.append(subprocess.Popen(["sleep", str(LONG)]).pid)
    write_atomic(pid_path, json.dumps(pids))
    time.sleep(LONG)
    return len(block)


def return_lock() -> threading.Lock:
    return threading.Lock()


class LockedError(Exception):
    """An exception that cannot be pickled: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_unpicklable() -> None:
    raise LockedError("this exception holds a lock")


IO_LOOP = ap.action(loop_until_cancelled, kind="io")
IO_LOOP_TIMEOUT = ap.action(loop_until_cancelled, kind="io", timeout=TIMEOUT)
ASYNC_TIMEOUT = ap.action(async_sleep_long, kind="io", timeout=TIMEOUT)
ASYNC_BLOCKING = ap.action(async_blocks_its_loop, kind="io", timeout=TIMEOUT)
ASYNC_QUICK = ap.action(async_quick, kind="io")
SLEEP_TIMEOUT = ap.action(sleep_long, timeout=TIMEOUT)
CATCH_TIMEOUT = ap.action(sleep_catch_timeout_and_return, timeout=TIMEOUT)
CRASH_ONCE = ap.action(crash_on, idempotent=False)
BLOCKED_TIMEOUT = ap.action(sleep_with_sigalrm_blocked, timeout=TIMEOUT)
BUSY_ONCE = ap.action(busy, idempotent=False)


# ---- helpers -------------------------------------------------------------------------------


def new_runner() -> ap.Runner:
    return ap.Runner(cpu_workers=2, io_workers=4, timeout_grace=GRACE)


def wait_for(predicate: Callable[[], bool], what: str, limit: float = WAIT) -> None:
    end = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > end:
            raise RuntimeError(f"gave up after {limit:g} s waiting for {what}")
        time.sleep(0.001)


def read_when_there(path: Path, limit: float = WAIT) -> Any:
    wait_for(path.exists, str(path), limit)
    return json.loads(path.read_text())


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pid_of(worker: int | str | None) -> int:
    """The process id in an outcome's ``worker``: a pid, or on a Dask runner
    ``"<worker address> pid <pid>"``."""
    return worker if isinstance(worker, int) else int(str(worker).rsplit(" pid ", 1)[1])


def when_gone(pids: list[int], limit: float = WAIT) -> float:
    """``time.time()`` once none of ``pids`` runs any more."""
    wait_for(lambda: all(gone(p) for p in pids), f"pids {pids} to exit", limit)
    return time.time()


class Watch(threading.Thread):
    """Polls, beside whatever the caller does next, until none of ``pids`` runs."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.at = float("nan")
        self.start()

    def run(self) -> None:
        self.at = when_gone(self.pids)

    def result(self) -> float:
        self.join()
        return self.at


def reap(pids: list[int]) -> None:
    """Reap orphans reparented to this script (it is their subreaper); others are not ours."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def become_subreaper() -> None:
    if sys.platform == "linux":
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def warm(runner: ap.Runner) -> None:
    """Make sure both cpu workers exist (a crash leaves one; the next dispatch respawns)."""
    plan = ap.Plan()
    plan.add(nap)
    plan.add(nap)
    runner.run(plan)


def run_one(runner: ap.Runner, fn: Any, *args: Any) -> tuple[float, ap.Outcome]:
    plan = ap.Plan()
    node = plan.add(fn, *args)
    t0 = time.time()
    return t0, runner.run(plan).outcome(node)


def describe(o: ap.Outcome) -> str:
    text = str(o.status)
    err = o.error
    if err is not None:
        text += f", {type(err).__name__}"
        if isinstance(err, ap.WorkerCrashed):
            text += f" (exitcode={err.exitcode}, signal={err.signal})"
    stopped = (ap.Status.CRASHED, ap.Status.CANCELLED, ap.Status.TIMED_OUT)
    if o.status in stopped and o.attempts and (o.started_at is None or o.worker is None):
        text += " (started_at/worker MISSING)"  # it ran: the outcome must say when and where
    return text


def describe_future(fut: Future[Any]) -> str:
    if fut.cancelled():
        return "future cancelled"
    exc = fut.exception(timeout=0)
    return "future ok" if exc is None else f"future: {type(exc).__name__}"


class Started:
    """An ``on_event`` callback that notes when the named nodes have started."""

    def __init__(self, *names: str) -> None:
        self.left = set(names)
        self.all = threading.Event()

    def __call__(self, ev: ap.Event) -> None:
        if ev.kind == "started":
            self.left.discard(ev.name)
            if not self.left:
                self.all.set()


def busy_plan(d: Path, tag: str) -> tuple[ap.Plan, Path, Path]:
    """A cpu node (with a child process of its own) and an io node, both running long."""
    pid_file, io_file = d / f"{tag}.pids", d / f"{tag}.io"
    plan = ap.Plan()
    plan.add(busy, str(pid_file), 0, True, name="cpu")
    plan.add(IO_LOOP, str(io_file), name="io")
    return plan, pid_file, io_file


# ---- the cases: each returns ({interval: seconds}, what the user saw, messages) ------------

Result = tuple[dict[str, float], str, list[str]]


def in_worker(fn: Callable[[str], None]) -> Callable[[ap.Runner, Path], Result]:
    def case(runner: ap.Runner, d: Path) -> Result:
        mark = d / f"{fn.__name__}.stamp"
        _, o = run_one(runner, fn, str(mark))
        fault = float(mark.read_text())
        return {"fault -> outcome": o.finished_at - fault}, describe(o), [str(o.error)]

    return case


def case_soft_timeout(runner: ap.Runner, d: Path) -> Result:
    _, o = run_one(runner, SLEEP_TIMEOUT)
    deadline = o.started_at + TIMEOUT
    return {"deadline -> outcome": o.finished_at - deadline}, describe(o), [str(o.error)]


def case_hard_timeout(runner: ap.Runner, d: Path) -> Result:
    _, o = run_one(runner, BLOCKED_TIMEOUT)
    deadline = o.started_at + TIMEOUT
    gone_at = when_gone([pid_of(o.worker)])
    return (
        {
            "deadline -> outcome": o.finished_at - deadline,
            "kill (deadline + grace) -> outcome": o.finished_at - deadline - GRACE,
            "deadline -> worker gone (checked after the outcome)": gone_at - deadline,
        },
        describe(o),
        [str(o.error)],
    )


def case_catch_timeout(runner: ap.Runner, d: Path) -> Result:
    _, o = run_one(runner, CATCH_TIMEOUT)
    deadline = o.started_at + TIMEOUT
    return {"deadline -> outcome": o.finished_at - deadline}, describe(o), [str(o.error)]


def case_io_timeout(runner: ap.Runner, d: Path) -> Result:
    mark = d / "io_timeout"
    _, o = run_one(runner, IO_LOOP_TIMEOUT, str(mark), 0.001)  # returns 1 ms after it
    deadline = o.started_at + TIMEOUT
    wait_for(mark.exists, "the io thread to return")
    return (
        {
            "deadline -> outcome": o.finished_at - deadline,
            "deadline -> thread saw ctx.cancelled() and returned": float(mark.read_text())
            - deadline,
        },
        describe(o),
        [str(o.error)],
    )


def case_async_timeout(runner: ap.Runner, d: Path) -> Result:
    mark = d / "async_timeout"
    _, o = run_one(runner, ASYNC_TIMEOUT, str(mark))
    deadline = o.started_at + TIMEOUT
    wait_for(mark.exists, "the task's CancelledError")
    return (
        {
            "deadline -> outcome": o.finished_at - deadline,
            "deadline -> CancelledError inside the task": float(mark.read_text()) - deadline,
        },
        describe(o),
        [str(o.error)],
    )


def case_async_blocking(runner: ap.Runner, d: Path) -> Result:
    warm(runner)
    mark = d / "async_blocking"
    plan = ap.Plan()
    blocker = plan.add(ASYNC_BLOCKING, str(mark), name="blocker")
    cpu = plan.add(noop, name="cpu")
    other = plan.add(ASYNC_QUICK, name="other_async")
    t0 = time.time()
    report = runner.run(plan)
    wait_for(mark.exists, "the blocking coroutine to return")
    b, c, a = report.outcome(blocker), report.outcome(cpu), report.outcome(other)
    deadline = b.started_at + TIMEOUT
    return (
        {
            "deadline -> outcome": b.finished_at - deadline,
            "run() call -> outcome of a cpu node beside it": c.finished_at - t0,
            "run() call -> outcome of another async node beside it": a.finished_at - t0,
        },
        f"blocker {describe(b)}; cpu {describe(c)}; other async {describe(a)}",
        [str(b.error)],
    )


def case_oom(runner: ap.Runner, d: Path) -> Result:
    pid_file = d / "oom.pids"
    plan = ap.Plan()
    node = plan.add(busy, str(pid_file), HOG_MIB)
    killed: list[float] = []

    def oom_killer() -> None:
        (pid,) = read_when_there(pid_file)
        killed.append(time.time())
        os.kill(pid, signal.SIGKILL)

    t = threading.Thread(target=oom_killer)
    t.start()
    o = runner.run(plan).outcome(node)
    t.join()
    return {"SIGKILL -> outcome": o.finished_at - killed[0]}, describe(o), [str(o.error)]


def unpicklable(what: str) -> Callable[[ap.Runner, Path], Result]:
    def case(runner: ap.Runner, d: Path) -> Result:
        warm(runner)
        if what == "argument":
            t0, o = run_one(runner, noop_with_arg, threading.Lock())
        elif what == "result":
            t0, o = run_one(runner, return_lock)
        else:
            t0, o = run_one(runner, raise_unpicklable)
        return {"run() call -> outcome": o.finished_at - t0}, describe(o), [str(o.error)]

    return case


def noop_with_arg(x: Any) -> None:
    return None


def map_crash(idempotent: bool) -> Callable[[ap.Runner, Path], Result]:
    def case(runner: ap.Runner, d: Path) -> Result:
        warm(runner)
        stamps = d / "map_crash.stamps"
        fn = crash_on if idempotent else CRASH_ONCE
        n = MAP_ITEMS
        got: list[int] = []
        try:
            args = (range(n), [MAP_BAD] * n, [str(stamps)] * n)
            for y in runner.map(fn, *args, chunksize=MAP_CHUNK):
                got.append(y)
            raise RuntimeError("map did not raise WorkerCrashed")
        except ap.WorkerCrashed as exc:
            raised, err = time.time(), exc
        crashes = [float(x) for x in stamps.read_text().split()]
        intervals = {"first crash -> WorkerCrashed out of the loop": raised - crashes[0]}
        if idempotent:
            intervals["re-run item's crash -> WorkerCrashed out of the loop"] = raised - crashes[-1]
        what = (
            f"{len(got)} results, then WorkerCrashed (exitcode={err.exitcode});"
            f" item {MAP_BAD} crashed {len(crashes)} time(s)"
        )
        return intervals, what, [str(err)]

    return case


def interrupt_main(marks: dict[str, Any], ready: Callable[[], list[int]]) -> threading.Thread:
    """Start a thread that waits for ``ready()`` (the worker pids to watch), then sends
    SIGINT to the main thread, as Jupyter's interrupt does; it records ``pids``,
    ``sigint`` (time.time()) and ``gone`` (when every watched pid had exited) in
    ``marks``. The caller joins it."""
    main = threading.main_thread().ident
    assert main is not None

    def interrupter() -> None:
        try:
            marks["pids"] = ready()
        finally:
            watch = Watch(marks["pids"])
            marks["sigint"] = time.time()
            signal.pthread_kill(main, signal.SIGINT)
        marks["gone"] = watch.result()

    t = threading.Thread(target=interrupter)
    t.start()
    return t


def case_map_interrupt(runner: ap.Runner, d: Path) -> Result:
    warm(runner)
    pid_file = d / "map_interrupt.pids"
    marks: dict[str, Any] = {}
    t = interrupt_main(marks, lambda: read_when_there(pid_file))
    try:
        for _ in runner.map(busy, [str(pid_file)], [0], [True], chunksize=1):
            pass
        raise RuntimeError("map finished instead of raising KeyboardInterrupt")
    except KeyboardInterrupt:
        marks["raised"] = time.time()
    t.join()
    reap(marks["pids"][1:])
    _, after = run_one(runner, noop)
    s = marks["sigint"]
    return (
        {
            "SIGINT -> KeyboardInterrupt out of the loop": marks["raised"] - s,
            "SIGINT -> worker and its child gone": marks["gone"] - s,
        },
        f"KeyboardInterrupt; the running call's worker killed; next run {after.status}",
        [],
    )


def case_cancel(runner: ap.Runner, d: Path) -> Result:
    warm(runner)
    plan, pid_file, io_file = busy_plan(d, "cancel")
    started = Started("cpu", "io")
    marks: dict[str, Any] = {}

    def canceller() -> None:
        try:
            started.all.wait(WAIT)
            marks["pids"] = read_when_there(pid_file)
            wait_for(Path(f"{io_file}.started").exists, "the io action to start")
        finally:
            watch = Watch(marks["pids"])
            marks["cancel"] = time.time()
            runner.cancel()
            marks["returned"] = time.time()
        marks["gone"] = watch.result()

    t = threading.Thread(target=canceller)
    t.start()
    report = runner.run(plan, on_event=started)
    t.join()
    reap(marks["pids"][1:])
    wait_for(io_file.exists, "the io thread to return")
    c = marks["cancel"]
    cpu, io = report.outcome("cpu"), report.outcome("io")
    return (
        {
            "cancel() -> cpu outcome": cpu.finished_at - c,
            "cancel() -> io outcome": io.finished_at - c,
            "cancel() -> cancel() returned": marks["returned"] - c,
            "cancel() -> worker and its child gone": marks["gone"] - c,
            "cancel() -> io thread returned": float(io_file.read_text()) - c,
        },
        f"run {report.status}; cpu {describe(cpu)}; io {describe(io)}",
        [str(cpu.error), str(io.error)],
    )


def case_interrupt(runner: ap.Runner, d: Path) -> Result:
    warm(runner)
    plan, pid_file, io_file = busy_plan(d, "interrupt")
    started = Started("cpu", "io")
    marks: dict[str, Any] = {}

    def ready() -> list[int]:
        started.all.wait(WAIT)
        pids = read_when_there(pid_file)
        wait_for(Path(f"{io_file}.started").exists, "the io action to start")
        return pids

    t = interrupt_main(marks, ready)
    try:
        runner.run(plan, on_event=started)
        raise RuntimeError("run() returned instead of raising KeyboardInterrupt")
    except KeyboardInterrupt as exc:
        marks["raised"] = time.time()
        report = exc.report  # type: ignore[attr-defined]
    t.join()
    reap(marks["pids"][1:])
    _, after = run_one(runner, noop)
    s = marks["sigint"]
    cpu, io = report.outcome("cpu"), report.outcome("io")
    return (
        {
            "SIGINT -> cpu outcome": cpu.finished_at - s,
            "SIGINT -> io outcome": io.finished_at - s,
            "SIGINT -> KeyboardInterrupt out of run()": marks["raised"] - s,
            "SIGINT -> worker and its child gone": marks["gone"] - s,
        },
        f"KeyboardInterrupt, .report {report.status}; cpu {describe(cpu)}; io {describe(io)};"
        f" next run {after.status}",
        [str(cpu.error), str(io.error)],
    )


class _Leave(Exception):
    pass


def case_with_block(_: ap.Runner, d: Path) -> Result:
    pid_file, io_file = d / "with.pids", d / "with.io"
    marks: dict[str, Any] = {}
    try:
        with new_runner() as r:
            cpu = r.submit(busy, str(pid_file), 0, True)
            io = r.submit(IO_LOOP, str(io_file))
            marks["pids"] = read_when_there(pid_file)
            wait_for(Path(f"{io_file}.started").exists, "the io action to start")
            watch = Watch(marks["pids"])
            marks["raise"] = time.time()
            raise _Leave
    except _Leave:
        marks["left"] = time.time()
    marks["gone"] = watch.result()
    reap(marks["pids"][1:])
    r0 = marks["raise"]
    return (
        {
            "raise -> with block left": marks["left"] - r0,
            "raise -> worker and its child gone": marks["gone"] - r0,
        },
        f"cpu {describe_future(cpu)}; io {describe_future(io)}",
        [str(cpu.exception(timeout=0)), str(io.exception(timeout=0))],
    )


CHILDREN: list[subprocess.Popen[bytes]] = []  # killed by main() if a case fails midway


def start_child(mode: str, d: Path) -> tuple[subprocess.Popen[bytes], list[int]]:
    """This file as a child process (own process group) running a busy runner."""
    with open(d / f"{mode}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", mode, str(d)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    CHILDREN.append(proc)
    pids = read_when_there(d / f"{mode}.pids", limit=WAIT)
    if mode == "ctrl-c":
        wait_for(Path(f"{d / 'ctrl-c.io'}.started").exists, "the io action to start")
    return proc, pids


def case_ctrl_c(_: ap.Runner, d: Path) -> Result:
    proc, pids = start_child("ctrl-c", d)
    watch = Watch(pids)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the foreground group
    rc = proc.wait(WAIT)
    exited = time.time()
    gone_at = watch.result()
    reap(pids)
    child = json.loads((d / "ctrl-c.json").read_text())
    log = (d / "ctrl-c.log").read_text(errors="replace")
    saw = "KeyboardInterrupt" in log
    return (
        {
            "SIGINT -> with block left in the child": child["left"] - t0,
            "SIGINT -> child process exited": exited - t0,
            "SIGINT -> its worker and the worker's child gone": gone_at - t0,
        },
        f"child rc {rc}, KeyboardInterrupt traceback {'printed' if saw else 'MISSING'};"
        f" .report {child['status']}; {child['outcomes']}",
        child["errors"],
    )


def case_parent_death(_: ap.Runner, d: Path) -> Result:
    proc, pids = start_child("parent-death", d)
    watch = Watch(pids)
    t0 = time.time()
    proc.kill()
    rc = proc.wait(WAIT)
    gone_at = watch.result()
    reap(pids)
    return (
        {"SIGKILL of the parent -> its worker and the worker's child gone": gone_at - t0},
        f"parent rc {rc}; worker gone",
        [],
    )


def case_dask_worker_kill(runner: ap.Runner, d: Path) -> Result:
    warm(runner)
    client = DASK["client"]
    pid_file = d / "dask_worker.pids"
    plan = ap.Plan()
    node = plan.add(BUSY_ONCE, str(pid_file), name="cpu")
    started = Started("cpu")
    killed: list[float] = []

    def killer() -> None:
        started.all.wait(WAIT)
        (pid,) = read_when_there(pid_file)
        workers = set(client.run(os.getpid).values())
        proc = psutil.Process(pid)  # the action's process, under its Dask worker
        while proc.pid not in workers:
            proc = proc.parent()
        killed.append(time.time())
        os.kill(proc.pid, signal.SIGKILL)

    t = threading.Thread(target=killer)
    t.start()
    o = runner.run(plan, on_event=started).outcome(node)
    t.join()
    client.wait_for_workers(2, timeout=WAIT)  # the nanny's fresh worker
    return {"SIGKILL -> outcome": o.finished_at - killed[0]}, describe(o), [str(o.error)]


CASES: list[tuple[str, Callable[[ap.Runner, Path], Result]]] = [
    ("raise", in_worker(fail)),
    ("cpu timeout in Python (soft)", case_soft_timeout),
    (f"cpu timeout, SIGALRM blocked (hard kill, grace {GRACE:g} s)", case_hard_timeout),
    ("cpu timeout caught by the action, which returns", case_catch_timeout),
    ("io timeout (thread polls ctx.cancelled() every 1 ms, returns)", case_io_timeout),
    ("async io timeout", case_async_timeout),
    (f"async action blocking its loop for {BLOCK:g} s", case_async_blocking),
    ("os._exit(3)", in_worker(exit_3)),
    ("SIGKILL of itself", in_worker(kill_self)),
    ("segfault", in_worker(segfault)),
    ("OOM kill (simulated: SIGKILL from outside)", case_oom),
    ("map: crash in a chunk (idempotent: re-run one per task)", map_crash(True)),
    ("map: crash in a chunk (idempotent=False)", map_crash(False)),
    ("unpicklable argument", unpicklable("argument")),
    ("unpicklable result", unpicklable("result")),
    ("unpicklable exception", unpicklable("exception")),
    ("runner.cancel() from another thread", case_cancel),
    ("interrupt of the waiting thread (Jupyter)", case_interrupt),
    ("interrupt while iterating runner.map (Jupyter)", case_map_interrupt),
    ("leaving the with block on an exception", case_with_block),
    ("Ctrl-C in a script (subprocess)", case_ctrl_c),
    ("parent death (SIGKILL)", case_parent_death),
]


LOCAL_ONLY = {
    "leaving the with block on an exception",
    "Ctrl-C in a script (subprocess)",
    "parent death (SIGKILL)",
}
DASK_CASES = [(fault, case) for fault, case in CASES if fault not in LOCAL_ONLY] + [
    ("SIGKILL of the Dask worker (idempotent=False)", case_dask_worker_kill)
]
DASK: dict[str, Any] = {}  # --dask: the LocalCluster's client


@contextlib.contextmanager
def dask_runner() -> Any:
    """A runner of ``backend="dask"`` on a LocalCluster of 2 one-thread workers."""
    import distributed

    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        DASK["client"] = client
        with ap.Runner(backend="dask", client=client, timeout_grace=GRACE) as runner:
            yield runner


# ---- child processes (--child MODE DIR) ------------------------------------------------------


def child_main(mode: str, d: Path) -> None:
    if mode == "parent-death":
        r = new_runner()
        r.submit(busy, str(d / "parent-death.pids"), 0, True)
        time.sleep(LONG)  # until the benchmark kills this process
        return
    plan, _, _ = busy_plan(d, "ctrl-c")
    try:
        with new_runner() as r:
            r.run(plan)
    except KeyboardInterrupt as exc:
        report = getattr(exc, "report", None)
        info = {
            "left": time.time(),
            "status": str(report.status) if report else None,
            "outcomes": {o.name: describe(o) for o in report.outcomes} if report else {},
            "errors": [str(o.error) for o in report.outcomes] if report else [],
        }
        write_atomic(str(d / "ctrl-c.json"), json.dumps(info))
        raise


# ---- main -----------------------------------------------------------------------------------


def leftovers() -> list[str]:
    """Descendants of this process still running; zombies among them are reaped."""
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                reap([p.pid])
            elif "multiprocessing.resource_tracker" in " ".join(p.cmdline()):
                # the stdlib's tracker, started for the LocalCluster's spawned workers
                # (--dask): it exits with this process, when its pipe closes
                continue
            else:
                alive.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
        except psutil.NoSuchProcess:
            pass
    return alive


def outcomes_text(got: dict[str, int], rounds: int) -> str:
    """The outcome of every round, or each distinct one with its count when they differ."""
    if len(got) == 1:
        return next(iter(got))
    return "; ".join(f"**{n} of {rounds}:** {what}" for what, n in got.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per fault (default 5)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--dask", action="store_true", help="run the cases on a Dask runner (a LocalCluster)"
    )
    parser.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child[0], Path(args.child[1]))
        return 0
    become_subreaper()
    samples: dict[tuple[str, str], list[float]] = {}
    seen: dict[str, dict[str, int]] = {}  # fault -> {what the user got: rounds}
    messages: dict[str, list[str]] = {}  # fault -> error messages, one per distinct outcome
    start = time.monotonic()
    try:
        cases = DASK_CASES if args.dask else CASES
        make = dask_runner if args.dask else new_runner
        with tempfile.TemporaryDirectory(prefix="fault_latency_") as tmp, make() as runner:
            for rnd in range(args.rounds):
                for i, (fault, case) in enumerate(cases):
                    d = Path(tmp) / f"{rnd}-{i}"
                    d.mkdir()
                    intervals, what, msgs = case(runner, d)
                    for interval, s in intervals.items():
                        samples.setdefault((fault, interval), []).append(s)
                    got = seen.setdefault(fault, {})
                    if what not in got:
                        messages.setdefault(fault, []).extend(msgs)
                    got[what] = got.get(what, 0) + 1
    finally:
        for proc in CHILDREN:  # only if a case failed: each case waits for its child
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        time.sleep(0.1)  # let orphaned workers see their parent gone before the check
        left = leftovers()
        if left:
            print(f"processes left behind: {left}", file=sys.stderr)
    total = time.monotonic() - start

    rows = []
    for (fault, interval), xs in samples.items():
        rows.append(
            {
                "fault": fault,
                "interval": interval,
                "median_s": statistics.median(xs),
                "min_s": min(xs),
                "max_s": max(xs),
                "samples_s": xs,
                "outcomes": seen[fault],
            }
        )
    machine = (
        f"{platform.system()} {platform.machine()}, {psutil.cpu_count(logical=True)} cpus"
        f" (affinity {len(os.sched_getaffinity(0))}), Python {platform.python_version()},"
        f" actionpool {ap.__version__}"
    )
    print(f"# actionpool fault latency: {args.rounds} rounds, {machine}")
    runner_text = (
        f"ap.Runner(backend='dask', timeout_grace={GRACE:g}) on a LocalCluster of 2 workers"
        if args.dask
        else f"ap.Runner(cpu_workers=2, io_workers=4, timeout_grace={GRACE:g})"
    )
    print(
        f"\n{runner_text}; timeouts {TIMEOUT:g} s; times in ms, median (min-max) of"
        f" {args.rounds}.\n"
    )
    print("| fault | from -> to | median ms | min-max ms | what the user got |")
    print("|---|---|---:|---:|---|")
    last = None
    for row in rows:
        name = row["fault"] if row["fault"] != last else ""
        outcome = "" if row["fault"] == last else outcomes_text(row["outcomes"], args.rounds)
        last = row["fault"]
        print(
            f"| {name} | {row['interval']} | {1e3 * row['median_s']:.1f}"
            f" | {1e3 * row['min_s']:.1f}-{1e3 * row['max_s']:.1f} | {outcome} |"
        )
    print("\nError messages (one round of each distinct outcome):\n")
    for fault, texts in messages.items():
        for m in texts:
            print(f"- {fault}: {m}")
    print(f"\nTotal {total:.1f} s. Processes left behind: {', '.join(left) or 'none'}.")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine,
                    "rounds": args.rounds,
                    "timeout_s": TIMEOUT,
                    "timeout_grace_s": GRACE,
                    "results": rows,
                    "messages": messages,
                    "left_behind": left,
                    "total_s": total,
                },
                indent=2,
            )
        )
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
