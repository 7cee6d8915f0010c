"""A mixed I/O + CPU plan: read files on threads, count words in processes, fan in.

What it shows:

* ``kind="io"`` actions (reading and writing files) run on the runner's thread pool,
  ``kind="cpu"`` actions (tokenising and counting) on its process pool; the router
  picks the pool from the declared kind, and each outcome says where its node ran
  (``outcome.pool`` is ``"io"`` or ``"cpu"``, ``outcome.worker`` a thread name or pid);
* data edges: a node passed as an argument is replaced by its value (``count`` gets
  the text that ``read`` returned; ``summarize`` gets the list of every count);
* ordering without data: the final ``mark_done`` node uses ``after=["write_json",
  "write_csv"]`` to write a ``_SUCCESS`` marker only once both outputs exist;
* the run's state: actions read their settings from ``ctx.state`` and record what they
  did with ``ctx.update(...)``; the updates are merged into ``report.state`` in plan
  order (``reducers=`` says how to add up a key that several parallel nodes update).

Run it::

    python examples/mixed_plan.py                     # on a generated corpus in a temp dir
    python examples/mixed_plan.py --files 12 --lines 20000
    python examples/mixed_plan.py notes.txt README.md  # on your own text files
    python examples/mixed_plan.py --out results/       # keep the outputs

Exit status: 0 when every node succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import operator
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import actionpool as ap

WORD = re.compile(r"[a-z']+")
SAMPLE_TEXT = (
    "the of and to in is that it was for on are with as his they be at one have this from "
    "or had by word but what some we can out other were all there when up use your how said "
    "an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound "
    "no most people my over know water than call first who may down side been now find "
    "action pool worker process thread plan node state event report outcome runner fan"
)
VOCABULARY = SAMPLE_TEXT.split()


class Counts(NamedTuple):
    """What one file contributed."""

    file: str
    lines: int
    words: int
    top: list[tuple[str, int]]  # the file's most common words, most common first
    counter: collections.Counter[str]


class Summary(NamedTuple):
    """The fan-in over every file."""

    files: int
    lines: int
    words: int
    distinct: int
    top: list[tuple[str, int]]  # most common words of the whole corpus
    per_file: dict[str, int]  # words per file


@ap.action(kind="io")
def read_text(path: str) -> str:
    """Read one text file (I/O: runs on a thread)."""
    return Path(path).read_text(encoding="utf-8", errors="replace")


@ap.action(kind="cpu")
def count_words(ctx: ap.Context, file: str, text: str) -> Counts:
    """Tokenise ``text`` and count its words (CPU: runs in a worker process).

    Reads its settings from the run's state (``min_length``, ``stopwords``) and adds
    its line count to the state key ``lines_read`` (summed by a reducer).
    """
    min_length: int = ctx.state["min_length"]
    stopwords = set(ctx.state["stopwords"])
    counter: collections.Counter[str] = collections.Counter()
    lines = 0
    for line in text.splitlines():
        lines += 1
        counter.update(
            w for w in WORD.findall(line.lower()) if len(w) >= min_length and w not in stopwords
        )
    ctx.update(lines_read=lines)
    return Counts(file, lines, sum(counter.values()), counter.most_common(5), counter)


@ap.action(kind="cpu")
def summarize(ctx: ap.Context, counts: list[Counts]) -> Summary:
    """Fan-in: merge every file's counts into corpus-wide totals."""
    total: collections.Counter[str] = collections.Counter()
    for c in counts:
        total.update(c.counter)
    top = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[: ctx.state["top"]]
    summary = Summary(
        files=len(counts),
        lines=sum(c.lines for c in counts),
        words=sum(c.words for c in counts),
        distinct=len(total),
        top=top,
        per_file={c.file: c.words for c in counts},
    )
    ctx.update(top_word=top[0][0] if top else None)
    return summary


@ap.action(kind="io")
def write_json(ctx: ap.Context, out_dir: str, summary: Summary) -> str:
    """Write the summary as JSON (I/O)."""
    path = Path(out_dir) / "summary.json"
    path.write_text(json.dumps(summary._asdict(), indent=2), encoding="utf-8")
    ctx.update(json_path=str(path))
    return str(path)


@ap.action(kind="io")
def write_csv(ctx: ap.Context, out_dir: str, summary: Summary) -> str:
    """Write the corpus's top words as CSV (I/O)."""
    path = Path(out_dir) / "top_words.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["word", "count"])
        writer.writerows(summary.top)
    ctx.update(csv_path=str(path))
    return str(path)


@ap.action(kind="io")
def mark_done(ctx: ap.Context, out_dir: str) -> str:
    """Write a ``_SUCCESS`` marker; the plan runs it after both writers (``after=``)."""
    path = Path(out_dir) / "_SUCCESS"
    path.write_text(f"run {ctx.run_id} finished at {time.ctime()}\n", encoding="utf-8")
    ctx.update(done_marker=str(path))
    return str(path)


def make_corpus(directory: Path, files: int, lines: int, seed: int = 7) -> list[Path]:
    """Write ``files`` text files of ``lines`` random sentences each (reproducible)."""
    rng = random.Random(seed)
    paths = []
    for i in range(files):
        path = directory / f"doc{i:02d}.txt"
        sentences = (
            " ".join(rng.choices(VOCABULARY, k=rng.randint(5, 15))).capitalize() + "."
            for _ in range(lines)
        )
        path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def build_plan(paths: list[Path], out_dir: Path) -> ap.Plan:
    """read (io) -> count (cpu) per file; summarize (cpu); write (io) x2; mark_done."""
    plan = ap.Plan()
    counts = []
    for i, path in enumerate(paths):
        label = f"{i}:{path.name}"  # unique even when two files share a name
        text = plan.add(read_text, str(path), name=f"read {label}")
        counts.append(plan.add(count_words, path.name, text, name=f"count {label}"))
    summary = plan.add(summarize, counts, name="summarize")
    plan.add(write_json, str(out_dir), summary, name="write_json")
    plan.add(write_csv, str(out_dir), summary, name="write_csv")
    # No data flows into mark_done: after= only orders it behind the two writers.
    plan.add(mark_done, str(out_dir), name="mark_done", after=["write_json", "write_csv"])
    return plan


def print_report(report: ap.Report) -> None:
    """One line per node: status, pool, worker, duration; then the state and totals."""
    print(f"{'node':<24} {'status':<10} {'pool':<5} {'worker':<22} {'seconds':>8}")
    for o in report.outcomes:
        seconds = f"{o.duration_s:.3f}" if o.duration_s is not None else "-"
        worker = "-" if o.worker is None else str(o.worker)
        print(f"{o.name:<24} {o.status!s:<10} {o.pool or '-':<5} {worker:<22} {seconds:>8}")
    print("state:")
    for key, value in report.state.items():
        if key != "stopwords":
            print(f"  {key} = {value!r}")


def check(report: ap.Report, summary: Summary) -> list[str]:
    """What went wrong, if anything, in terms a reader can verify by hand."""
    problems = []
    pools = {o.name: o.pool for o in report.outcomes}
    if {p for n, p in pools.items() if n.startswith("read ")} != {"io"}:
        problems.append(f"read nodes did not all run on the io pool: {pools}")
    if {p for n, p in pools.items() if n.startswith("count ")} != {"cpu"}:
        problems.append(f"count nodes did not all run on the cpu pool: {pools}")
    if report.state["lines_read"] != summary.lines:
        problems.append(f"state lines_read={report.state['lines_read']} != {summary.lines} lines")
    done = report.outcome("mark_done").started_at or 0.0
    writers_end = max(report.outcome(n).finished_at or 0.0 for n in ("write_json", "write_csv"))
    if done < writers_end:
        problems.append("mark_done started before both writers had finished")
    if not Path(report.state["done_marker"]).exists():
        problems.append("the _SUCCESS marker is missing")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="text files (default: generate)")
    parser.add_argument("--files", type=int, default=8, help="files to generate (default 8)")
    parser.add_argument("--lines", type=int, default=20_000, help="lines per file (default 20000)")
    parser.add_argument("--out", type=Path, help="output directory (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.files < 1 or args.lines < 1:
        parser.error("--files and --lines must be >= 1")

    with tempfile.TemporaryDirectory(prefix="actionpool-mixed-") as tmp:
        paths: list[Path] = args.paths or make_corpus(Path(tmp), args.files, args.lines)
        out_dir: Path = args.out or Path(tmp) / "out"
        out_dir.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {
            "min_length": 3,
            "stopwords": ["the", "and", "that", "for", "with", "was", "are", "from"],
            "top": 10,
            "lines_read": 0,
        }
        plan = build_plan(paths, out_dir)

        with ap.Runner() as runner:
            print(f"sizing: {runner.sizing}")
            report = runner.run(plan, state=state, reducers={"lines_read": operator.add})

        print_report(report)
        print(f"status: {report.status}  ({len(report)} nodes in {report.duration_s:.2f} s)")
        if report.status is not ap.RunStatus.SUCCEEDED:
            for o in report.failures():
                print(f"{o.name}: {o.status}: {o.error!r}", file=sys.stderr)
            return 1

        summary: Summary = report["summarize"]
        print(
            f"{summary.files} files, {summary.lines} lines, {summary.words} words,"
            f" {summary.distinct} distinct"
        )
        print("top words: " + ", ".join(f"{w} ({n})" for w, n in summary.top))
        problems = check(report, summary)
        where = out_dir if args.out else f"{out_dir} (a temp dir, removed on exit)"
        print(f"outputs: {', '.join(sorted(p.name for p in out_dir.iterdir()))} in {where}")
    for problem in problems:
        print(f"CHECK FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
