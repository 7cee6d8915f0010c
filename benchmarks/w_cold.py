"""W7 cold start: create a pool, get one result, shut it down, in a fresh interpreter.

A pool of n = cores workers, the result of one ``os.getpid`` call (a builtin: a fresh
worker imports nothing for it), then shutdown, in ms. Every sample runs in a fresh
interpreter (``cold_start.py``, which imports only the standard library); the library's
modules are imported first, untimed (reported apart). Each library uses its default
start method. The contenders are interleaved round by round like the others, but
without warm drivers: this is the one workload whose subject is the start itself.
Target: <= 1.5x concurrent.futures. It runs first, while nothing else runs.

W7-threaded: pool after pool in a process that runs another thread (a thread blocked
on an event, as a notebook's kernel runs its own), the case of a user who makes a
runner in cell after cell. There actionpool never forks the process: its zygote is a
fresh interpreter, which a closed runner leaves idle for the next one to adopt
(``zygote_client._IdleZygotes``). Each round is one fresh interpreter
(``cold_start.threaded_main``) that imports both libraries (untimed), starts the
thread, then makes ``THREADED_POOLS`` pools of each, ``Runner(cpu_workers=n)``
against ``ProcessPoolExecutor(n)`` (its default start method), alternating: per pool,
from its creation to one ``os.getpid`` result, in ms; the close follows, timed apart.
The first pool of the process and the later ones are separate rows: a round's
sample of the later ones is their median. Target: actionpool's later runners <= 1.5x
``concurrent.futures``' later executors (median of the rounds); the first runner,
which starts the interpreter, is reported. ``--workloads W7`` takes it in,
``W7-threaded`` names it alone.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Any

from cold_start import COLD
from harness import (
    PORTABLE,
    VARIANTS,
    Entry,
    Suite,
    child_env,
    log_tail,
    takes_part,
)
from results import (
    Context,
    Row,
    Tables,
    Workload,
    per_round,
    primary,
    round_note,
    verdict,
)

THREADED_POOLS = 5  # per library and round: the process's first, then 4 later ones
THREADED_LIBS = ("actionpool", "concurrent.futures")


def measure(s: Suite, cal: dict[str, Any]) -> dict[str, Any]:
    """W7, then W7-threaded."""
    res = measure_w7(s, cal)
    if "W7" in s.args.workloads or "W7-threaded" in s.args.workloads:
        res.update(measure_threaded(s))
    return res


def measure_w7(s: Suite, cal: dict[str, Any]) -> dict[str, Any]:
    """Cold start; each sample a fresh interpreter, contenders interleaved by round."""
    a = s.args
    if "W7" not in a.workloads:
        return {}
    rounds = a.cold_rounds
    kinds = {"actionpool": "actionpool", PORTABLE: "actionpool-variant"}
    entries = [
        Entry(f"{lib}: {COLD[lib][0]}", lib, "cold", {}, kinds.get(lib, "peer"))
        for lib in COLD
        if takes_part(lib, a.libs)
    ]
    code = "import sys, cold_start; sys.exit(cold_start.cold_main())"
    for r in range(rounds):
        live = [e for e in entries if not e.dead]
        k = r % max(1, len(live))
        for e in live[k:] + live[:k]:
            log = s.tmp / f"cold-{e.lib}.log"
            try:
                with log.open("a") as err:
                    proc = subprocess.run(
                        [sys.executable, "-c", code, e.lib, str(a.workers), str(s.tmp)],
                        stdout=subprocess.PIPE,
                        stderr=err,
                        text=True,
                        env={**child_env(), **VARIANTS.get(e.lib, ("", {}))[1]},
                        cwd=s.tmp,
                        timeout=120,
                        check=False,
                    )
                lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
                if proc.returncode != 0 or not lines:
                    raise RuntimeError(f"exit code {proc.returncode}: {log_tail(log)}")
                out = json.loads(lines[-1])
                e.samples.append(out["t"])
                e.rounds.append(r)
                e.extras.append(out)
            except Exception as exc:
                e.errors.append(f"{type(exc).__name__}: {exc}"[:600])
                s.say(f"  W7 {e.lib}: FAILED: {e.errors[-1]}")
                if len(e.errors) >= 2:
                    e.dead = True
        s.say(f"W7: round {r + 1}/{rounds}")
    return {"W7": entries}


def measure_threaded(s: Suite) -> dict[str, Any]:
    """W7-threaded: a fresh interpreter per round, both libraries in it, alternating."""
    a = s.args
    libs = [lib for lib in THREADED_LIBS if takes_part(lib, a.libs)]
    if "actionpool" not in libs:
        return {}
    what = {
        "actionpool": "Runner(cpu_workers=n): submit, result",
        "concurrent.futures": "ProcessPoolExecutor(n): submit, result",
    }
    entries = {
        (lib, later): Entry(
            f"{lib}: {'later ones' if later else 'the first'}, {what[lib]}",
            lib,
            "threaded_later" if later else "threaded_first",
            {"pools": THREADED_POOLS},
            ("actionpool" if later else "actionpool-variant") if lib == "actionpool" else "peer",
        )
        for lib in libs
        for later in (True, False)
    }
    code = "import sys, cold_start; sys.exit(cold_start.threaded_main())"
    log = s.tmp / "cold-threaded.log"
    errors: list[str] = []
    for r in range(a.cold_rounds):
        argv = [str(a.workers), str(THREADED_POOLS), str(r), *libs]
        try:
            with log.open("a") as err:
                proc = subprocess.run(
                    [sys.executable, "-c", code, *argv],
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    env=child_env(),
                    cwd=s.tmp,
                    timeout=120,
                    check=False,
                )
            lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"exit code {proc.returncode}: {log_tail(log)}")
            out = json.loads(lines[-1])
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:600])
            s.say(f"  W7-threaded: FAILED: {errors[-1]}")
            if len(errors) >= 2:
                break
            continue
        for (lib, later), e in entries.items():
            ts = out["first"][lib]
            e.samples.append(statistics.median(ts[1:]) if later else ts[0])
            e.rounds.append(r)
            e.extras.append({"first_s": ts, "close_s": out["close"][lib]})
        s.say(f"W7-threaded: round {r + 1}/{a.cold_rounds}")
    for e in entries.values():
        e.errors += errors
    return {"W7-threaded": list(entries.values())}


def _targets(tables: Tables, res: dict[str, Any], ctx: Context) -> list[Row]:
    p = primary(tables, "W7")
    if not p or p["median"] is None:
        return []
    rows = [r for r in tables["W7"]["rows"] if r["library"] == "concurrent.futures" and r["median"]]
    ctx["w7_cf"] = cf = rows[0] if rows else None
    if not cf:
        return []
    ratio = p["median"] / cf["median"]
    rounds = round_note(per_round(p, cf), "<=", 1.5)
    shown = f"{ratio:.2f}x ({p['median']:.0f} vs {cf['median']:.0f} ms{rounds})"
    return [verdict("W7", TITLE, "<= 1.5x concurrent.futures", ratio, ratio <= 1.5, shown,
                    cf["contender"])]  # fmt: skip


def _notes(data: dict[str, Any], an: dict[str, Any]) -> list[str]:
    imp = [
        f"{e['library']} {statistics.median(x['import_s'] for x in e['extras']) * 1e3:.0f}"
        for e in data.get("W7", [])
        if e["extras"]
    ]
    return ["", "Import times (ms, not included above): " + ", ".join(imp) + "."]


def _row(tables: Tables, lib: str, op: str) -> Row | None:
    rows = tables.get("W7-threaded", {}).get("rows", [])
    return next((r for r in rows if r["library"] == lib and r["op"] == op and r["median"]), None)


def _threaded_targets(tables: Tables, res: dict[str, Any], ctx: Context) -> list[Row]:
    out = []
    for op, target, limit in (
        ("threaded_later", "later runners <= 1.5x concurrent.futures' later executors", 1.5),
        ("threaded_first", "the first runner of the process (reported)", None),
    ):
        p, cf = _row(tables, "actionpool", op), _row(tables, "concurrent.futures", op)
        if not p or not cf:
            continue
        ratio = p["median"] / cf["median"]
        rounds = round_note(per_round(p, cf), "<=", limit) if limit else ""
        shown = f"{ratio:.2f}x ({p['median']:.1f} vs {cf['median']:.1f} ms{rounds})"
        met = None if limit is None else ratio <= limit
        out.append(verdict("W7-threaded", THREADED_TITLE, target, ratio, met, shown,
                           cf["contender"]))  # fmt: skip
    return out


def _threaded_notes(data: dict[str, Any], an: dict[str, Any]) -> list[str]:
    closes = []
    for e in data.get("W7-threaded", []):
        if e["op"] == "threaded_later" and e["extras"]:
            c = statistics.median(x for ex in e["extras"] for x in ex["close_s"][1:])
            closes.append(f"{e['library']} {c * 1e3:.1f}")
    return [
        "",
        f"Each round: one process, {THREADED_POOLS} pools of each library made one after"
        " another while another thread runs; *later ones*: the median of pools 2 to"
        f" {THREADED_POOLS} of the round. Their close, not included above (ms, median):"
        f" {', '.join(closes) or '-'}.",
    ]


TITLE = "cold start: create, first result, shutdown"
THREADED_TITLE = "pool after pool in a process that runs another thread: create, first result"
WORKLOADS = [
    Workload("W7", TITLE, "ms", higher=False,
             metric=lambda e, ctx: [t * 1e3 for t in e.samples],
             targets=_targets, notes=_notes),
    Workload("W7-threaded", THREADED_TITLE, "ms", higher=False,
             metric=lambda e, ctx: [t * 1e3 for t in e.samples],
             targets=_threaded_targets, notes=_threaded_notes),
]  # fmt: skip
