"""W7 cold start: create a pool, get one result, shut it down, in a fresh interpreter.

A pool of n = cores workers, the result of one ``os.getpid`` call (a builtin: a fresh
worker imports nothing for it), then shutdown, in ms. Every sample runs in a fresh
interpreter (``cold_start.py``, which imports only the standard library); the library's
modules are imported first, untimed (reported apart). Each library uses its default
start method. The contenders are interleaved round by round like the others, but
without warm drivers: this is the one workload whose subject is the start itself.
Target: <= 1.5x concurrent.futures. It runs first, while nothing else runs.
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


def measure(s: Suite, cal: dict[str, Any]) -> dict[str, Any]:
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


TITLE = "cold start: create, first result, shutdown"
WORKLOADS = [
    Workload("W7", TITLE, "ms", higher=False,
             metric=lambda e, ctx: [t * 1e3 for t in e.samples],
             targets=_targets, notes=_notes),
]  # fmt: skip
