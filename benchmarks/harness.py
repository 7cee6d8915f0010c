"""The benchmark harness: driver processes, timing, interleaved rounds.

How one sample is taken::

    parent (suite.py, compare.py)                   a driver process per library
    Suite.measure(wid, entries, rounds)              python -c "import suite; ..."
      round r: every Entry once,                     driver_main(): the library's Driver
      in an order rotated by r                       (peers.py) keeps its pools warm
        Suite.call(lib, op, **kw)  -- JSON line -->    OPS[library, op](driver, **kw)
                                   <-- JSON line --    {"t": seconds, ...} timed there
        Entry.samples.append(t)
    results.analyse(): each Workload's metric per sample, medians, best peer, targets

The parent never times anything itself: an op times its own work inside its driver,
where the library's pools stay warm between samples. A library that crashes, hangs or
changes ``os.environ`` takes only its own driver down: the failure is recorded with the
tail of the driver's log, and the rest goes on. Rounds are interleaved (round r runs
every contender of a workload once, in an order rotated by r) so that a shared
machine's drift hits all of them alike; the tables give medians.

The workload modules (``w_*.py``) register their ops with ``@op("w1", "actionpool",
...)``; ``peers.py`` sets up each library's pools; ``bench_tasks.py`` holds what the
workers run; ``results.py`` turns samples into tables and verdicts.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from bench_tasks import busy, task_sum
from cold_start import reply_channel  # stdlib only, for W7's fresh interpreters: shared

HERE = Path(__file__).resolve().parent
REL_TOL = 1e-9

# ---- timing -------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def timed_median(
    fn: Callable[[], Any],
    k: int = 5,
    budget_s: float = 0.05,
    setup: Callable[[], Any] | None = None,
) -> tuple[float, Any]:
    """Median of up to ``k`` timings of ``fn`` and its last output; fewer once
    ``budget_s`` is spent (at least one). A map of a few milliseconds timed once per
    round is one scheduling hiccup of a shared VM away from an outlier sample.
    ``setup`` runs before each timing, untimed."""
    ts: list[float] = []
    out: Any = None
    end = time.perf_counter() + budget_s
    while len(ts) < k and (not ts or time.perf_counter() < end):
        if setup is not None:
            setup()
        t, out = timed(fn)
        ts.append(t)
    return statistics.median(ts), out


def roundtrips(call: Callable[[], Any], k: int, budget_s: float) -> dict[str, Any]:
    """Median of up to ``k`` round trips (at least 10; stops after ``budget_s``)."""
    rts: list[float] = []
    end = time.perf_counter() + budget_s
    for i in range(k):
        t0 = time.perf_counter()
        call()
        rts.append(time.perf_counter() - t0)
        if i >= 9 and time.perf_counter() > end:
            break
    rts.sort()
    return {
        "t": statistics.median(rts),
        "n": len(rts),
        "min": rts[0],
        "p90": rts[int(0.9 * (len(rts) - 1))],
    }


def calibrate_busy() -> dict[str, Any]:
    """Iterations of ``busy`` per second on this machine: the median of 5 runs of a
    million (the first, which warms the interpreter, untimed)."""
    n = 1_000_000
    busy(n)
    t = statistics.median(timed(lambda: busy(n))[0] for _ in range(5))
    return {"t": t, "iters_per_s": n / t}


def check_values(out: Iterable[Any], want: list[Any], what: str) -> None:
    got = list(out)
    if got != want:
        raise AssertionError(f"{what}: wrong results (first {got[:3]!r}...)")


def check_sums(out: list[float], want: float, n: int) -> None:
    if len(out) != n or not all(abs(x - want) <= REL_TOL * abs(want) for x in out):
        raise AssertionError(f"wrong sums {out!r}, want {n} x {want!r}")


# ---- the driver process: one library, its pools kept warm -----------------------------------

Op = Callable[..., dict[str, Any]]
OPS: dict[tuple[str, str], Op] = {}  # (driver name, op name) -> op(driver, **kw)


def op(name: str, *drivers: str) -> Callable[[Op], Op]:
    """Register the decorated function as op ``name`` of each of ``drivers`` (the keys
    of ``peers.DRIVERS``). It is called as ``fn(driver, **kw)`` in the driver process
    and returns a dict with ``t`` (seconds) and whatever else is worth keeping."""

    def register(fn: Op) -> Op:
        for d in drivers:
            OPS[d, name] = fn
        return fn

    return register


class Driver:
    """One library's pools, kept warm between samples (subclasses in ``peers.py``).
    Besides the registered ops, ``op_<name>`` methods are ops too."""

    dist: str | None = None
    module: str | None = None  # whose __file__ hello reports: which copy was imported

    def settle(self) -> None:
        """Called before each sample, untimed: let what the previous sample set going
        end first (nothing, unless a library batches its messages)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.workers: int = cfg["workers"]
        self.tmp = Path(cfg["tmp"])
        self._array: tuple[int, np.ndarray, float] | None = None

    def hello(self) -> dict[str, Any]:
        version = platform.python_version()
        if self.dist:
            version = metadata.version(self.dist)
        out: dict[str, Any] = {"version": version, "pid": os.getpid()}
        if self.module:
            out["file"] = getattr(sys.modules.get(self.module), "__file__", None)
        return out

    def array(self, mb: int) -> tuple[np.ndarray, float]:
        """A random float64 array of ``mb`` MB (kept for the next call) and its sum."""
        if self._array is None or self._array[0] != mb:
            self._array = None
            a = np.random.default_rng(0).random(mb * 10**6 // 8)
            self._array = (mb, a, task_sum(a))
        return self._array[1], self._array[2]

    def op_drop_array(self) -> dict[str, Any]:
        self._array = None
        return {"t": 0.0}

    def close(self) -> None:
        pass


def driver_main(drivers: dict[str, type[Driver]]) -> int:
    """Entry point of a driver process: argv is ``NAME CONFIG_JSON``; JSON lines in on
    stdin (``{"op": ..., **kw}``), JSON lines out (``{"ok": ..., "value" | "error"}``)."""
    name, cfg = sys.argv[1], json.loads(sys.argv[2])
    reply = reply_channel()

    def send(obj: dict[str, Any]) -> None:
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    def error(exc: BaseException) -> dict[str, Any]:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}

    try:
        drv = drivers[name](cfg)
        send({"ok": True, "value": drv.hello()})
    except BaseException as exc:
        traceback.print_exc()
        send(error(exc))
        return 1
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        name_of_op = msg.pop("op")
        if name_of_op == "close":
            try:
                drv.close()
                send({"ok": True, "value": {}})
            except BaseException as exc:
                traceback.print_exc()
                send(error(exc))
            break
        registered = OPS.get((name, name_of_op))
        method = getattr(drv, f"op_{name_of_op}", None)
        if registered is not None:
            method = functools.partial(registered, drv)
        if method is None:
            send({"ok": False, "error": f"unsupported: {name} has no op {name_of_op!r}"})
            continue
        try:
            gc.collect()  # a previous sample's garbage is not this sample's cost
            drv.settle()  # nor the messages it sent, or that freeing it sends
            send({"ok": True, "value": method(**msg)})
        except Exception as exc:
            traceback.print_exc()
            send(error(exc))
    return 0


# ---- the parent's side: driver processes and rounds -----------------------------------------


class DriverError(Exception):
    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


def child_env(first: Iterable[str] = ()) -> dict[str, str]:
    """This process's environment with ``first`` (then ``benchmarks/``) ahead on
    PYTHONPATH: workers inherit it, so they import ``bench_tasks`` and, with ``first``
    naming a ``src/`` folder, that copy of actionpool."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*first, str(HERE), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def log_tail(path: Path, n: int = 6) -> str:
    with contextlib.suppress(OSError):
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
        return " | ".join(lines[-n:])[-800:]
    return ""


def kill_tree(pid: int) -> None:
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        for p in [*proc.children(recursive=True), proc]:
            with contextlib.suppress(psutil.Error):
                p.kill()


PORTABLE = "actionpool-portable"
"""actionpool's driver on the portable process path (the one macOS takes), forced with
``ACTIONPOOL_PORTABLE=1``: a variant that runs wherever actionpool takes part."""
DASK_SPARE = "dask-spare"
"""The ``dask`` driver with one worker fewer than cores (at least one): its client and
scheduler get a core of their own, as they have on a cluster (W3-dask-spare)."""
SPARE_ENV = "BENCH_DASK_SPARE_CORE"

VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    PORTABLE: ("actionpool", {"ACTIONPOOL_PORTABLE": "1"}),
    DASK_SPARE: ("dask", {SPARE_ENV: "1"}),
}
"""Drivers that run another's code in another environment: name -> (driver, env)."""


def takes_part(lib: str, libs: Any) -> bool:
    """Whether ``lib`` (a library, or a variant of one) runs, given the libraries that
    take part."""
    return lib == "baseline" or VARIANTS.get(lib, (lib, {}))[0] in libs


class DriverProc:
    """The parent's handle of one driver process.

    ``name`` is how the parent calls it (a library, or ``compare.py``'s side);
    ``driver`` the ``peers.DRIVERS`` key it runs; ``pythonpath`` goes first on its
    PYTHONPATH. It runs in ``tmp``, so that ``-c``'s empty ``sys.path`` entry (the
    current directory) cannot put a stray module of the caller's folder first.
    """

    def __init__(
        self,
        name: str,
        cfg: dict[str, Any],
        tmp: Path,
        driver: str | None = None,
        pythonpath: Iterable[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.env = env or {}
        self.driver = driver or name
        self.cfg = cfg
        self.tmp = tmp
        self.pythonpath = list(pythonpath)
        self.log = tmp / f"driver-{name}.log"
        self.proc: subprocess.Popen[str] | None = None
        self.lines: queue.Queue[str] = queue.Queue()
        self.hello: dict[str, Any] = {}
        self.pids: set[int] = set()

    def launch(self) -> None:
        code = "import sys, suite; sys.exit(suite.driver_main())"
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, self.driver, json.dumps(self.cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env={**child_env(self.pythonpath), **self.env},
                cwd=self.tmp,
            )
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()

    def wait_ready(self, timeout: float) -> None:
        self.hello = self._reply("start", timeout)

    def start(self, timeout: float) -> None:
        self.launch()
        self.wait_ready(timeout)

    @staticmethod
    def _read(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _reply(self, op: str, timeout: float) -> dict[str, Any]:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=0.25)
            except queue.Empty:
                self._note_pids()
                if self.proc.poll() is not None:
                    rc = self.proc.returncode
                    raise DriverError(
                        f"{self.name} driver exited (code {rc}) during {op}: {log_tail(self.log)}",
                        fatal=True,
                    ) from None
                if time.monotonic() > deadline:
                    self.kill()
                    raise DriverError(
                        f"{op} timed out after {timeout:.0f} s (driver killed)", fatal=True
                    ) from None
                continue
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if msg.get("ok"):
                value: dict[str, Any] = msg["value"]
                return value
            raise DriverError(str(msg.get("error")), fatal=op == "start")

    def call(self, op: str, timeout: float, **kw: Any) -> dict[str, Any]:
        if not self.alive():
            raise DriverError(f"{self.name} driver is not running", fatal=True)
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise DriverError(f"{self.name} driver: {exc!r}", fatal=True) from None
        out = self._reply(op, timeout)
        self._note_pids()
        return out

    def _note_pids(self) -> None:
        if self.proc is None:
            return
        self.pids.add(self.proc.pid)
        with contextlib.suppress(psutil.Error):
            self.pids.update(p.pid for p in psutil.Process(self.proc.pid).children(True))

    def close(self, timeout: float = 60.0) -> str | None:
        """Ask the driver to close its pools and exit; kill it if it will not."""
        if self.proc is None:
            return None
        err = None
        if self.alive():
            try:
                self.call("close", timeout)
            except DriverError as exc:
                err = str(exc)
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                err = err or "did not exit after close; killed"
        self.kill()
        self.proc.wait()
        self.proc = None
        return err

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._note_pids()
            kill_tree(self.proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


@dataclass
class Entry:
    """One contender of one workload."""

    label: str
    lib: str  # the driver that runs it: a library, or compare.py's side
    op: str
    kw: dict[str, Any]
    kind: str  # "actionpool" | "actionpool-variant" | "peer" | "reference"
    samples: list[float] = field(default_factory=list)  # seconds, one per round
    rounds: list[int] = field(default_factory=list)  # the round of each sample
    extras: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dead: bool = False

    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


class Suite:
    """The parent's drivers and rounds.

    ``args`` needs ``workers``, ``libs`` (the libraries that take part; the
    ``baseline`` yardsticks always do) and ``op_timeout``. ``aliases`` maps a name to
    ``(driver, pythonpath)``: ``compare.py`` runs the actionpool driver twice that way,
    once per copy of ``src/``.
    """

    def __init__(
        self,
        args: Any,
        tmp: Path,
        aliases: dict[str, tuple[str, list[str]]] | None = None,
    ) -> None:
        self.args = args
        self.tmp = tmp
        self.cfg = {"workers": args.workers, "tmp": str(tmp)}
        self.aliases = aliases or {}
        self.drivers: dict[str, DriverProc] = {}
        self.failed_start: dict[str, str] = {}
        self.versions: dict[str, str] = {}
        self.hellos: dict[str, dict[str, Any]] = {}
        self.all_pids: set[int] = set()
        self.t0 = time.perf_counter()

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {text}", file=sys.stderr, flush=True)

    def _new(self, lib: str) -> DriverProc:
        base, env = VARIANTS.get(lib, (lib, {}))
        driver, path = self.aliases.get(lib, (base, []))
        d = DriverProc(lib, self.cfg, self.tmp, driver=driver, pythonpath=path, env=env)
        self.drivers[lib] = d
        return d

    def _ready(self, lib: str, d: DriverProc, t0: float) -> None:
        try:
            d.wait_ready(timeout=180)
        except DriverError as exc:
            self.failed_start[lib] = f"could not start: {exc}"
            d.close()
            raise DriverError(self.failed_start[lib], fatal=True) from None
        self.versions[lib] = d.hello.get("version", "?")
        self.hellos[lib] = d.hello
        self.say(f"{lib} driver ready ({time.perf_counter() - t0:.1f} s)")

    def driver(self, lib: str) -> DriverProc:
        d = self.drivers.get(lib)
        if d is not None and d.alive():
            return d
        if lib in self.failed_start:
            raise DriverError(self.failed_start[lib], fatal=True)
        t0 = time.perf_counter()
        d = self._new(lib)
        d.launch()
        self._ready(lib, d, t0)
        return d

    def start(self, libs: list[str]) -> None:
        """Start these drivers side by side (each imports its library and warms its
        pools), and wait until all are ready or have failed."""
        t0 = time.perf_counter()
        new = [(lib, self._new(lib)) for lib in libs if lib not in self.drivers]
        for _, d in new:
            d.launch()
        for lib, d in new:
            with contextlib.suppress(DriverError):
                self._ready(lib, d, t0)

    def call(self, lib: str, op: str, timeout: float | None = None, **kw: Any) -> dict[str, Any]:
        return self.driver(lib).call(op, timeout or self.args.op_timeout, **kw)

    def close(self, libs: list[str] | None = None) -> None:
        for lib in list(self.drivers) if libs is None else libs:
            d = self.drivers.pop(lib, None)
            if d is None:
                continue
            err = d.close()
            self.all_pids |= d.pids
            if err:
                self.say(f"closing {lib}: {err}")

    def measure(self, wid: str, entries: list[Entry], rounds: int) -> list[Entry]:
        """One untimed warm-up call per contender, then interleaved rounds."""
        entries = [e for e in entries if takes_part(e.lib, self.args.libs)]
        for e in entries:
            self._sample(e, -1, warm=True)
        for r in range(rounds):
            live = [e for e in entries if not e.dead]
            if not live:
                break
            k = r % len(live)
            for e in live[k:] + live[:k]:
                self._sample(e, r)
            self.say(f"{wid}: round {r + 1}/{rounds}")
        return entries

    def _sample(self, e: Entry, rnd: int, warm: bool = False) -> None:
        if e.dead:
            return
        try:
            out = self.call(e.lib, e.op, **e.kw)
        except DriverError as exc:
            msg = str(exc)
            e.errors.append(("warm-up: " if warm else "") + msg)
            self.say(f"  {e.label}: FAILED: {msg}")
            if exc.fatal or warm or msg.startswith("unsupported") or len(e.errors) >= 2:
                e.dead = True
            return
        if not warm:
            e.samples.append(out["t"])
            e.rounds.append(rnd)
            e.extras.append(out)
