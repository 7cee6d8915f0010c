"""Old against new: actionpool's side of chosen workloads, at a git ref and in the working tree.

How it runs::

    git archive GITREF src | tar -x -C TMP             the baseline's src/, nothing else
    driver "baseline"  PYTHONPATH=TMP/src:benchmarks    both run this tree's benchmark
    driver "current"   PYTHONPATH=src:benchmarks        code: peers.ActionpoolDriver and
                                                        the w_*.py ops
    for each workload's contender: a warm-up on each side, then rounds; round r runs
    the two sides in an order rotated by r (baseline first in even rounds)
    -> table: workload, baseline median, current median, current / baseline

Both sides run the same benchmark code, which uses only actionpool's public API
(``Runner``, ``.map``, ``.submit``, ``.run``, ``Plan``, ``action``), so a baseline whose
internals differ runs all the same; a workload the baseline cannot run is reported as
failed, and the rest go on. Each driver reports which ``actionpool/__init__.py`` it
imported, and the comparison stops if a side did not import its own copy. The
numbers are times (the median of each side's samples), so a ratio below 1.00 means
the working tree is faster; *per round* is current / baseline within each round, where
the machine's drift cancels out.

Usage::

    python benchmarks/compare.py --baseline GITREF [--workloads W1,W2,W3,W9]
                                 [--rounds N] [--workers N] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import suite  # noqa: E402  (every family's ops and COMPARE table)
from harness import Entry, Suite, calibrate_busy  # noqa: E402
from results import fmt_seconds  # noqa: E402

SIDES = {"baseline": "ap-baseline", "current": "ap-current"}
DEFAULT = "W1,W2,W3,W9"


def export(ref: str, dest: Path) -> tuple[Path, str]:
    """``ref``'s ``src/`` extracted under ``dest``; returns it and the commit's short id."""
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", f"{ref}^{{commit}}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if sha.returncode != 0:
        raise SystemExit(f"compare.py: {ref!r} is not a commit here: {sha.stderr.strip()}")
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "src"],
        capture_output=True, check=True,
    )  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar.stdout, check=True)
    src = dest / "src"
    if not (src / "actionpool" / "__init__.py").is_file():
        raise SystemExit(f"compare.py: {ref} has no src/actionpool/__init__.py")
    return src, sha.stdout.strip()


def contenders(
    workloads: list[str], cal: dict[str, Any], args: Any
) -> list[tuple[str, list[tuple[str, str, dict[str, Any]]]]]:
    """``[(workload, [(what, op, kw), ...]), ...]`` from the families' COMPARE tables."""
    table: dict[str, Any] = {}
    for fam in suite.FAMILIES:
        table.update(getattr(fam, "COMPARE", {}))
    unknown = [w for w in workloads if w not in table]
    if unknown:
        raise SystemExit(f"compare.py: no actionpool side for {unknown}; known: {sorted(table)}")
    return [(w, table[w](cal, args)) for w in workloads]


def paired(base: Entry, cur: Entry) -> list[float]:
    """current / baseline, round by round (the rounds both have a sample of)."""
    b = dict(zip(base.rounds, base.samples, strict=True))
    c = dict(zip(cur.rounds, cur.samples, strict=True))
    return [c[r] / b[r] for r in sorted(b.keys() & c.keys()) if b[r]]


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| workload | what | baseline median | current median | current / baseline |"
        " per round (median, min-max) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = (
            "-"
            if r["ratio"] is None
            else f"{r['ratio']:.2f}x"
            if r["ratio"] >= 0.1
            else f"{r['ratio']:.2g}x"
        )
        pr = r["per_round"]
        rounds = (
            f"{statistics.median(pr):.2f}x, {min(pr):.2f}-{max(pr):.2f}x ({len(pr)} rounds)"
            if pr
            else "; ".join(r["errors"])[:200] or "-"
        )
        lines.append(
            f"| {r['workload']} | {r['what']} | {fmt_seconds(r['baseline_s'])} |"
            f" {fmt_seconds(r['current_s'])} | {ratio} | {rounds} |"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git ref of the old actionpool")
    parser.add_argument("--workloads", default=DEFAULT, help=f"comma-separated (default {DEFAULT})")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per contender (default 7)")
    parser.add_argument(
        "--workers",
        type=int,
        default=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        help="cpu workers of each runner (default: physical cores)",
    )
    parser.add_argument("--quick", action="store_true", help="shorter W2 samples, W10 < 1e6")
    parser.add_argument("--small-sizes", help="W10's map sizes, comma-separated")
    parser.add_argument("--json", help="also write every sample to this file")
    parser.add_argument("--op-timeout", type=float, default=180.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.libs = list(SIDES.values())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="ap_compare_"))
    s: Suite | None = None
    try:
        base_src, sha = export(args.baseline, tmp)
        cur_src = ROOT / "src"
        cal = calibrate_busy()
        plan = contenders(args.workloads, cal, args)
        want = {SIDES["baseline"]: base_src, SIDES["current"]: cur_src}
        s = Suite(args, tmp, aliases={a: ("actionpool", [str(p)]) for a, p in want.items()})
        s.start(list(want))
        files = {alias: s.hellos.get(alias, {}).get("file") for alias in want}
        for alias, src in want.items():
            got = files[alias]
            if not got or not Path(got).resolve().is_relative_to(src.resolve()):
                why = s.failed_start.get(alias) or f"imported actionpool from {got}"
                raise SystemExit(f"compare.py: the {alias} driver {why}, not from {src}")
        rows: list[dict[str, Any]] = []
        for wid, items in plan:
            for what, op, kw in items:
                base = Entry(what, SIDES["baseline"], op, kw, "baseline")
                cur = Entry(what, SIDES["current"], op, kw, "current")
                s.measure(f"{wid} {what}", [base, cur], args.rounds)
                b, c = base.median(), cur.median()
                rows.append({
                    "workload": wid, "what": what, "op": op, "kw": kw,
                    "baseline_s": b, "current_s": c, "ratio": c / b if b and c else None,
                    "per_round": paired(base, cur), "errors": base.errors + cur.errors,
                    "baseline_samples": base.samples, "current_samples": cur.samples,
                })  # fmt: skip
    finally:
        if s is not None:
            s.close()
        shutil.rmtree(tmp, ignore_errors=True)
    head = (
        f"actionpool at {args.baseline} ({sha}) against the working tree: medians of"
        f" {args.rounds} interleaved rounds, {args.workers} cpu workers, one run on this"
        " machine. Times: below 1.00x the working tree is faster."
        f" Imported: baseline {files[SIDES['baseline']]}, current {files[SIDES['current']]}."
    )
    print("\n".join([head, "", *table(rows)]))
    ratios = [(r["ratio"], r) for r in rows if r["ratio"] is not None]
    if ratios:
        worst, r = max(ratios, key=lambda x: x[0])
        print(f"\nSlowest against the baseline: {r['workload']} {r['what']}, {worst:.2f}x.")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"baseline": args.baseline, "commit": sha, "imported": files, "rows": rows},
                indent=1,
            )
        )
    return 0 if len(ratios) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
