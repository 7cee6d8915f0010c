"""The main job: measure every ``.py`` file of this interpreter's standard library.

``python -m actionpool demo`` builds one plan::

    read_batch (io) ──► analyse_batch (cpu) ──┐
    read_batch (io) ──► analyse_batch (cpu) ──┼──► aggregate (cpu, fan-in)
    ...                                       ┘

io actions read the files in batches of about ``batch_bytes``; cpu actions parse each
batch with :mod:`ast` and measure every module (functions, classes, lines, deepest
nesting, a cyclomatic-complexity estimate); the fan-in adds up the totals and picks the
ten most complex modules. The same work is then done serially in this process, in the
same run, and the speedup reported. Files that do not parse (the stdlib ships a few on
purpose, as test data) are counted and named, never dropped silently.
"""

from __future__ import annotations

import argparse
import ast
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .action import action
from .events import Event
from .plan import Plan

__all__ = [
    "DESCRIPTION",
    "ModuleStats",
    "Progress",
    "Summary",
    "add_arguments",
    "analyse_batch",
    "analyse_source",
    "main",
    "read_batch",
    "run",
]

DESCRIPTION = """\
Measure every .py file of this interpreter's standard library (or of --path) in
parallel, then do the same work serially in this process and print the speedup.

One plan:

    read_batch (io) --> analyse_batch (cpu) --.
    read_batch (io) --> analyse_batch (cpu) --+--> aggregate (cpu, fan-in)
    ...                                     --'

io actions read the files in batches of about --batch-bytes; cpu actions parse
each batch with ast and measure every module (functions, classes, lines, deepest
nesting, a cyclomatic-complexity estimate); the fan-in adds up the totals and
picks the ten most complex modules. Files that do not parse (the standard library
ships a few on purpose, as test data) are counted and named.

Progress of both phases goes to stderr: a tqdm bar when tqdm is installed
(pip install 'actionpool[progress]'), else a line every few seconds."""
"""The demo's ``--help`` text (the module docstring is reST, for the API reference)."""

PLAIN_EVERY_S = 2.0
"""Seconds between two plain progress lines (without tqdm)."""

# Decision points of McCabe's cyclomatic complexity (T. J. McCabe, "A Complexity
# Measure", IEEE TSE 1976), estimated from the AST the way the radon/mccabe tools do:
# each function (and the module body) counts 1, plus its branches, loops, except
# handlers, boolean operators, comprehension filters, match cases and asserts. A
# module's complexity is the sum over its functions and its body.
_BRANCHES = (
    ast.If,
    ast.IfExp,
    ast.For,
    ast.AsyncFor,
    ast.While,
    ast.ExceptHandler,
    ast.Assert,
    ast.match_case,
)
_BLOCKS = (
    ast.If,
    ast.For,
    ast.AsyncFor,
    ast.While,
    ast.With,
    ast.AsyncWith,
    ast.Try,
    ast.TryStar,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.Match,
    ast.ExceptHandler,
    ast.match_case,
)


@dataclass(frozen=True)
class ModuleStats:
    """Measurements of one module.

    Attributes:
        path: the file, relative to the analysed root.
        bytes: size of the file in bytes.
        lines: number of lines.
        functions: ``def`` and ``async def`` statements (methods included).
        classes: ``class`` statements.
        max_nesting: deepest nesting of block statements (a top-level ``def`` is 1).
        complexity: cyclomatic-complexity estimate of the whole module (see above).
        error: why it could not be parsed, or ``""``.
    """

    path: str
    bytes: int
    lines: int
    functions: int = 0
    classes: int = 0
    max_nesting: int = 0
    complexity: int = 0
    error: str = ""


@dataclass(frozen=True)
class Summary:
    """What the fan-in produces: totals and the ten most complex modules."""

    files: int
    bytes: int
    lines: int
    functions: int
    classes: int
    complexity: int
    max_nesting: int
    top: list[ModuleStats] = field(default_factory=list)
    errors: list[ModuleStats] = field(default_factory=list)


def analyse_source(path: str, source: bytes) -> ModuleStats:
    """Parse ``source`` and measure it (see :class:`ModuleStats`)."""
    lines = source.count(b"\n") + (0 if source.endswith(b"\n") or not source else 1)
    try:
        tree = ast.parse(source, filename=path)
    except (SyntaxError, ValueError, RecursionError) as exc:
        return ModuleStats(path, len(source), lines, error=f"{type(exc).__name__}: {exc}")
    functions = classes = 0
    complexity = 1
    max_depth = 0
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    while stack:  # explicit stack: deeply nested code must not hit the recursion limit
        node, depth = stack.pop()
        if isinstance(node, _BLOCKS):
            depth += 1
            max_depth = max(max_depth, depth)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions += 1
            complexity += 1
        elif isinstance(node, ast.Lambda):
            complexity += 1
        elif isinstance(node, ast.ClassDef):
            classes += 1
        if isinstance(node, _BRANCHES):
            complexity += 1
        elif isinstance(node, ast.BoolOp):
            complexity += len(node.values) - 1
        elif isinstance(node, ast.comprehension):
            complexity += len(node.ifs)
        stack.extend((child, depth) for child in ast.iter_child_nodes(node))
    return ModuleStats(path, len(source), lines, functions, classes, max_depth, complexity)


@action(kind="io")
def read_batch(root: str, paths: list[str]) -> list[tuple[str, bytes]]:
    """Read a batch of files (io action). Returns ``[(relative path, content)]``."""
    base = Path(root)
    return [(p, (base / p).read_bytes()) for p in paths]


@action(kind="cpu")
def analyse_batch(files: list[tuple[str, bytes]]) -> list[ModuleStats]:
    """Parse and measure a batch of files (cpu action)."""
    return [analyse_source(path, source) for path, source in files]


@action(kind="cpu")
def aggregate(batches: list[list[ModuleStats]], top: int = 10) -> Summary:
    """Fan-in: totals over every module and the ``top`` most complex ones."""
    mods = [m for batch in batches for m in batch]
    ok = [m for m in mods if not m.error]
    return Summary(
        files=len(mods),
        bytes=sum(m.bytes for m in mods),
        lines=sum(m.lines for m in mods),
        functions=sum(m.functions for m in ok),
        classes=sum(m.classes for m in ok),
        complexity=sum(m.complexity for m in ok),
        max_nesting=max((m.max_nesting for m in ok), default=0),
        top=sorted(ok, key=lambda m: (-m.complexity, m.path))[:top],
        errors=[m for m in mods if m.error],
    )


def find_sources(root: Path, limit: int | None = None) -> list[tuple[str, int]]:
    """Every ``.py`` file under ``root`` (site-packages excluded), sorted: ``[(path, bytes)]``."""
    found = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if "site-packages" in rel.parts or "dist-packages" in rel.parts or not f.is_file():
            continue
        found.append((rel.as_posix(), f.stat().st_size))
        if limit is not None and len(found) >= limit:
            break
    return found


def make_batches(files: Sequence[tuple[str, int]], batch_bytes: int) -> list[list[str]]:
    """Group files, in order, into batches of about ``batch_bytes`` bytes each."""
    batches: list[list[str]] = []
    current: list[str] = []
    size = 0
    for path, n in files:
        current.append(path)
        size += n
        if size >= batch_bytes:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    return batches


def build_plan(root: Path, batches: list[list[str]]) -> tuple[Plan, object]:
    """The demo's plan; returns it and its fan-in node."""
    plan = Plan()
    analysed = []
    for i, paths in enumerate(batches):
        raw = plan.add(read_batch, str(root), paths, name=f"read{i}")
        analysed.append(plan.add(analyse_batch, raw, name=f"analyse{i}"))
    total = plan.add(aggregate, analysed, name="aggregate")
    return plan, total


class Progress:
    """Files measured so far in one phase of the demo, shown on ``stream`` (stderr): a
    tqdm bar when tqdm is installed (``actionpool[progress]``), else a plain line every
    :data:`PLAIN_EVERY_S` seconds (``serial: 1200/4000 files (4 s)``) and one at the end.

    The phases call :meth:`add` once per batch of files, never per file, so a timed
    phase pays for about one call per batch: a clock read, and a line only when one is
    due (tqdm throttles its redraws the same way, every ``mininterval``).

    Threads: ``add`` comes from one thread at a time (the runner's scheduler thread,
    through ``on_event``, in the parallel phase; the main thread in the serial one);
    ``close`` once the phase has ended. No lock.

    Args:
        phase: the label, ``"parallel"`` or ``"serial"``.
        total: files in the phase.
        stream: where it goes (default: ``sys.stderr`` at the time of the call).
    """

    def __init__(self, phase: str, total: int, stream: TextIO | None = None) -> None:
        self.phase = phase
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.monotonic()
        self.next_line = self.t0 + PLAIN_EVERY_S
        self.bar: Any = None
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, desc=phase, unit="files", file=self.stream)

    def add(self, files: int) -> None:
        """``files`` more have been measured."""
        self.done += files
        if self.bar is not None:
            self.bar.update(files)
            return
        now = time.monotonic()
        if now >= self.next_line:
            self.next_line = now + PLAIN_EVERY_S
            print(
                f"{self.phase}: {self.done}/{self.total} files ({now - self.t0:.0f} s)",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        """The last count: the bar drawn full, or a final line."""
        if self.bar is not None:
            self.bar.close()
            return
        print(
            f"{self.phase}: {self.done}/{self.total} files in {time.monotonic() - self.t0:.1f} s",
            file=self.stream,
            flush=True,
        )


def run_serial(
    root: Path, batches: list[list[str]], on_batch: Callable[[int], Any] | None = None
) -> Summary:
    """The same work as the plan, one step after another in this process;
    ``on_batch(files)`` after each batch."""
    results = []
    for paths in batches:
        results.append(analyse_batch.fn(read_batch.fn(str(root), paths)))
        if on_batch is not None:
            on_batch(len(paths))
    summary: Summary = aggregate.fn(results)
    return summary


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, on ``parser`` (its own, or ``python -m actionpool demo``'s)."""
    parser.add_argument(
        "--path", type=Path, default=None, help="tree to analyse (default: the standard library)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, metavar="N", help="analyse only the first N files"
    )
    parser.add_argument(
        "--batch-bytes",
        type=int,
        default=512 * 1024,
        metavar="BYTES",
        help="bytes of files per batch, one io and one cpu action each (default: 524288)",
    )
    parser.add_argument("--no-serial", action="store_true", help="skip the serial comparison")


def _error(message: str) -> int:
    print(f"python -m actionpool demo: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed :func:`add_arguments` options; returns the exit status
    (0: parallel and serial results agree; 2: bad ``--path``)."""
    from .runner import Runner  # here: ``--help`` and ``--version`` need not import it

    root = (args.path or Path(sysconfig.get_paths()["stdlib"])).resolve()
    if not root.is_dir():
        return _error(f"--path {root} is not a directory")
    print(f"actionpool demo: Python {sys.version.split()[0]}, analysing {root}", flush=True)
    files = find_sources(root, args.limit)
    if not files:
        return _error(f"no .py files under {root}")
    batches = make_batches(files, args.batch_bytes)
    for paths in batches:  # warm the page cache so neither timing pays for the first read
        read_batch.fn(str(root), paths)

    plan, total = build_plan(root, batches)
    sizes = {f"analyse{i}": len(paths) for i, paths in enumerate(batches)}
    t0 = time.perf_counter()
    with Runner() as runner:
        print(f"sizing: {runner.sizing}", flush=True)  # 'info' prints why
        # made after the runner: tqdm starts a monitor thread, and a runner made while
        # this process runs one thread forks its zygote from it, the fast start
        progress = Progress("parallel", len(files))

        def on_event(event: Event) -> None:
            if event.kind == "finished" and event.name in sizes:
                progress.add(sizes[event.name])

        t1 = time.perf_counter()
        report = runner.run(plan, on_event=on_event)
        t2 = time.perf_counter()
        progress.close()
    t3 = time.perf_counter()
    report.raise_for_failures()
    summary: Summary = report[total]  # type: ignore[index]
    kinds: dict[str, int] = {}
    for o in report.outcomes:
        kinds[o.pool or "?"] = kinds.get(o.pool or "?", 0) + 1
    wall = t2 - t1

    print(
        f"files: {summary.files} ({_mb(summary.bytes)}, {summary.lines:,} lines) "
        f"in {len(batches)} batches; {len(summary.errors)} did not parse"
    )
    for m in summary.errors:
        print(f"  not parsed: {m.path}: {m.error.splitlines()[0][:100]}")
    print(
        f"actions: {kinds.get('io', 0)} io (read), {kinds.get('cpu', 0)} cpu "
        f"({len(batches)} analyse + 1 fan-in); run {report.status.value}"
    )
    print(
        f"totals: {summary.functions:,} functions, {summary.classes:,} classes, "
        f"complexity {summary.complexity:,}, deepest nesting {summary.max_nesting}"
    )
    print("ten most complex modules (cyclomatic estimate):")
    for m in summary.top:
        print(
            f"  {m.complexity:6,}  {m.path}  ({m.lines:,} lines, {m.functions} functions,"
            f" nesting {m.max_nesting})"
        )
    print(
        f"wall time: {wall:.2f} s for the run ({t3 - t0:.2f} s with pool start and shutdown)",
        flush=True,
    )
    if args.no_serial:
        return 0
    progress = Progress("serial", len(files))
    s0 = time.perf_counter()
    serial = run_serial(root, batches, progress.add)
    serial_s = time.perf_counter() - s0
    progress.close()
    print(f"serial time of the same work, same run: {serial_s:.2f} s")
    print(
        f"speedup: {serial_s / wall:.2f}x on {runner.sizing.cpu_workers} cpu workers"
        f" ({serial_s / (t3 - t0):.2f}x counting pool start and shutdown)"
    )
    if serial != summary:
        print("ERROR: the parallel and serial results differ", file=sys.stderr)
        return 1
    print("parallel and serial results agree")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo from its command line; returns the exit status (see :func:`run`)."""
    parser = argparse.ArgumentParser(
        prog="python -m actionpool demo",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
