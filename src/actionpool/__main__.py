"""Command line: ``python -m actionpool {info,demo,bench}``, and ``--version``.

* ``info``: this machine's sizing (cores, memory, pool sizes and why, as a table of one
  row per number), versions, and the BLAS/OpenMP libraries threadpoolctl finds; with
  ``--dask ADDRESS``, the sizing a dask runner gets from the cluster at that address.
* ``demo``: the main job, on real input: measure every ``.py`` file of the standard
  library in parallel and compare with the same work done serially
  (see :mod:`actionpool.demo`).
* ``bench``: the benchmark suite against the peers, ``benchmarks/suite.py``, quick by
  default. The suite lives in the repository, not in the installed package: the
  command finds it in the source tree of an editable install or under the current
  directory, and says where to get it when neither has it (exit status 2).

Every line ``info`` prints stays under :data:`WIDTH` characters: the reasons are
wrapped, each under the row it explains.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sizing import Sizing

PROG = "python -m actionpool"

WIDTH = 99
"""The longest line ``info`` prints (a terminal of 100 columns shows it whole)."""

_QUANTITY = re.compile(r"(\d) (B|KiB|MiB|GiB|TiB|cores?|workers?)\b")

BENCH_PEERS = {"joblib": "joblib", "mpire": "mpire", "pebble": "pebble", "distributed": "dask"}
"""The ``bench`` extra's peers: module to find -> the name the suite gives it. loky,
multiprocessing and concurrent.futures are always there."""

BENCH_OUT = "bench-out"
"""``bench``'s default output folder, under the current directory: not the clone's
``docs/benchmarks/``, whose tracked results a quick run on another machine would
overwrite."""


# ---- info ----------------------------------------------------------------------------------------


def _wrap(text: str, indent: int, hang: int = 2) -> list[str]:
    """``text`` in lines of at most WIDTH characters, indented by ``indent`` spaces
    and continuation lines by ``hang`` more. A word longer than a line (a deep path)
    is broken rather than left to overflow."""
    glued = _QUANTITY.sub("\\1\u00a0\\2", text)  # "33.4 MiB" is never split over two lines
    lines = textwrap.wrap(
        glued,
        WIDTH,
        initial_indent=" " * indent,
        subsequent_indent=" " * (indent + hang),
        break_on_hyphens=False,
    )
    return [line.replace("\u00a0", " ") for line in lines]


def sizing_table(sizing: Sizing, path: tuple[str, str] | None = None) -> list[str]:
    """The sizing as a table: a row per number, the reason indented under it.

    Args:
        sizing: what to show.
        path: the cpu path row, ``(value, why)``; ``None`` leaves the row out.

    Returns:
        The lines, each at most :data:`WIDTH` characters.
    """
    from .sizing import _fmt_bytes

    rows = [
        ("cpu workers", "cpu_workers", str(sizing.cpu_workers)),
        ("io workers", "io_workers", str(sizing.io_workers)),
        ("memory budget", "memory_budget", _fmt_bytes(sizing.memory_budget)),
        ("BLAS threads", "blas_threads", str(sizing.blas_threads)),
    ]
    why: dict[str, list[str]] = {key: [] for _, key, _ in rows}
    notes: list[str] = []
    for line in filter(None, sizing.reason.split("; ")):
        key = line.partition("=")[0]
        if key not in why:  # the nested-runner cores, the Dask resources used
            notes.append(line)
            continue
        value = next(v for _, k, v in rows if k == key)
        prefix = f"{key}={value} "  # the row says it already
        why[key].append(line.removeprefix(prefix))
    where = (
        f"dask, {sizing.cluster_workers} workers" if sizing.backend == "dask" else "this machine"
    )
    out = [f"sizing ({where}):"]
    for label, key, value in rows:
        out.append(f"  {label:<15}{value}")
        for reason in why[key]:
            out += _wrap(reason, 4)
    if path is not None:
        out.append(f"  {'cpu path':<15}{path[0]}")
        out += _wrap(path[1], 4)
    for note in notes:
        out.append("  note")
        out += _wrap(note, 4)
    return out


def _cpu_path() -> tuple[str, str]:
    """The cpu path row of ``info``'s table: which path a pool made now takes, and why."""
    from .platforms import PORTABLE_ENV, cpu_unavailable, process_path

    path, missing = process_path()
    if path == "none":
        return "none", cpu_unavailable(missing)
    if path == "zygote":
        return path, (
            f"worker processes forked from a zygote process ({PORTABLE_ENV}=1 forces the"
            " portable path)"
        )
    forced = os.environ.get(PORTABLE_ENV, "").strip() == "1"
    return path, (
        "worker processes, each a fresh interpreter started by loky"
        + (f" ({PORTABLE_ENV}=1 forces it)" if forced else f" ({PORTABLE_ENV}=0 forbids it)")
    )


def info() -> int:
    """Print the sizing and environment; returns 0."""
    import cloudpickle
    import loky
    import numpy
    import psutil
    import threadpoolctl

    from . import __version__
    from .sizing import compute_sizing

    sizing = compute_sizing()
    lines = [
        f"actionpool {__version__} on Python {platform.python_version()} ({sys.platform})",
        f"machine: {platform.machine()}, {platform.processor() or 'unknown processor'}",
        f"cores: {sizing.usable_cores} usable, {sizing.physical_cores} physical"
        " (loky.cpu_count: affinity and cgroup quotas applied)",
        f"memory: {sizing.available_memory / 2**30:.1f} GiB available [psutil]",
        *sizing_table(sizing, _cpu_path()),
        *_wrap(
            f"versions: loky {loky.__version__}, cloudpickle {cloudpickle.__version__},"
            f" psutil {psutil.__version__}, numpy {numpy.__version__},"
            f" threadpoolctl {threadpoolctl.__version__}",
            0,
        ),
    ]
    pools = threadpoolctl.threadpool_info()
    lines.append(f"thread pools in this process ({len(pools)}):")
    for p in pools:
        lines.append(
            f"  {p.get('internal_api')} ({p.get('user_api')}): {p.get('num_threads')} threads"
        )
        lines += _wrap(str(p.get("filepath")), 4)  # on a line of its own: paths run long
    print("\n".join(lines))
    return 0


def info_dask(address: str) -> int:
    """Print the sizing of a dask runner on the cluster at ``address``; returns 0, or 1
    (with the reason on stderr) when the cluster cannot be reached."""
    from . import Runner

    try:
        with Runner(backend="dask", address=address) as runner:
            sizing = runner.sizing
    except (OSError, ImportError) as exc:
        print(f"actionpool info: {exc}", file=sys.stderr)
        return 1
    print("\n".join(sizing_table(sizing)))
    return 0


# ---- bench ---------------------------------------------------------------------------------------


def benchmark_places(explicit: Path | None = None) -> list[Path]:
    """Where ``bench`` looks for the benchmarks folder, in order: ``explicit`` (its
    ``--benchmarks``), the repository this package is imported from (an editable
    install: ``<clone>/src/actionpool`` -> ``<clone>/benchmarks``), and
    ``./benchmarks``."""
    if explicit is not None:
        return [explicit]
    places = []
    package = Path(__file__).resolve().parent
    if package.parent.name == "src":  # the repository's layout; a wheel's is site-packages
        places.append(package.parent.parent / "benchmarks")
    places.append(Path.cwd() / "benchmarks")
    return places


def find_benchmarks(explicit: Path | None = None) -> Path | None:
    """The first of :func:`benchmark_places` that holds the suite, or ``None``."""
    for place in benchmark_places(explicit):
        # harness.py too: a project of the user's own may have a benchmarks/suite.py
        if (place / "suite.py").is_file() and (place / "harness.py").is_file():
            return place
    return None


def bench(args: argparse.Namespace, rest: list[str]) -> int:
    """Run ``benchmarks/suite.py`` (quick unless ``--full``) with ``rest`` passed on;
    returns its exit status, or 2 when the suite is not found."""
    folder = find_benchmarks(args.benchmarks)
    if folder is None:
        looked = ", ".join(str(p) for p in benchmark_places(args.benchmarks))
        where = (
            f"--benchmarks {args.benchmarks} does not hold it (suite.py, harness.py)"
            if args.benchmarks is not None
            else f"looked in {looked}"
        )
        print(
            f"{PROG} bench: the benchmark suite was not found ({where}).\n"
            "It is not part of the installed package: it lives in the benchmarks/ folder"
            " of the\nactionpool repository. From a clone of the repository, run:\n\n"
            "    pip install -e '.[bench]'\n"
            f"    {PROG} bench          # or: nox -s bench -- --quick\n\n"
            f"or point at a clone's folder: {PROG} bench --benchmarks CLONE/benchmarks",
            file=sys.stderr,
        )
        return 2
    missing = [name for mod, name in BENCH_PEERS.items() if importlib.util.find_spec(mod) is None]
    chosen = any(a == "--only" or a.startswith("--only=") for a in rest)  # then it is no news
    if missing and not chosen:
        print(
            f"{PROG} bench: not installed: {', '.join(missing)}; they are left out of this"
            " run.\nTo compare against every peer: pip install 'actionpool[bench]'",
            file=sys.stderr,
        )
    cmd = [
        sys.executable,
        str(folder / "suite.py"),
        *([] if args.full else ["--quick"]),
        "--out",
        args.out,
        *rest,
    ]
    print(f"{PROG} bench: running {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached the suite too: it writes what it has measured, then exits
            continue


# ---- the parser ----------------------------------------------------------------------------------

MAIN_DESCRIPTION = """\
actionpool runs actions in parallel: CPU-bound ones on worker processes, I/O-bound
ones on threads, plans as dependency graphs, an outcome for every action."""

INFO_DESCRIPTION = """\
Print how actionpool sizes its pools on this machine: cpu workers, io workers,
memory budget and BLAS threads, each with where its number came from, and the
process path cpu actions take; then the versions of actionpool's dependencies and
the BLAS/OpenMP thread pools of this process (threadpoolctl).

Overrides: ACTIONPOOL_CPU_WORKERS, ACTIONPOOL_IO_WORKERS; ACTIONPOOL_PORTABLE=1
forces the portable process path."""

BENCH_DESCRIPTION = f"""\
Run the benchmark suite: actionpool against multiprocessing, concurrent.futures,
joblib, loky, mpire, pebble and Dask (Ray too when installed), on workloads
W1-W11 and the scaling curves. Quick by default (fewer rounds, smaller sizes:
about 3 minutes on 2 cores); --full gives the default sizes, as 'nox -s bench'.

The suite is benchmarks/suite.py in a clone of the repository, not part of the
installed package. It is looked for in --benchmarks DIR, else next to the
source tree actionpool is imported from (pip install -e .), else in
./benchmarks. Peers that are not installed are left out, with a note:
pip install 'actionpool[bench]' installs them.

Writes results.md, results.json and PNG plots to --out (default ./{BENCH_OUT})."""

BENCH_EPILOG = """\
other arguments go to benchmarks/suite.py, among them:
  --workloads W1,W2,W9       only these workloads
  --only actionpool,joblib   only these libraries
  --rounds N                 rounds per workload
  --workers N                worker processes per pool (default: physical cores)
  --no-dask, --no-ray        leave Dask or Ray out
  --render                   only rewrite results.md and the plots from --out
'python benchmarks/suite.py --help' lists them all.

examples:
  python -m actionpool bench
  python -m actionpool bench --workloads W1,W2 --only actionpool,multiprocessing
  python -m actionpool bench --full --out docs/benchmarks"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m actionpool`` and its subcommands."""
    from . import __version__
    from . import demo as demo_module

    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=MAIN_DESCRIPTION,
        epilog=f"'{PROG} COMMAND --help' describes each command.",
        formatter_class=raw,
    )
    parser.add_argument("--version", action="version", version=f"actionpool {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    info_parser = sub.add_parser(
        "info",
        help="print this machine's sizing and environment",
        description=INFO_DESCRIPTION,
        formatter_class=raw,
    )
    info_parser.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="the sizing a dask runner gets from the cluster at ADDRESS"
        " (tcp://HOST:8786) instead; needs actionpool[dask]",
    )

    demo_parser = sub.add_parser(
        "demo",
        help="analyse the standard library in parallel, then serially",
        description=demo_module.DESCRIPTION,
        formatter_class=raw,
    )
    demo_module.add_arguments(demo_parser)

    bench_parser = sub.add_parser(
        "bench",
        help="the benchmark suite against the peers (from a clone of the repository)",
        usage=f"{PROG} bench [-h] [--quick | --full] [--out DIR]\n"
        f"{' ' * len(f'usage: {PROG} bench ')}[--benchmarks DIR] [suite options ...]",
        description=BENCH_DESCRIPTION,
        epilog=BENCH_EPILOG,
        formatter_class=raw,
        allow_abbrev=False,  # a prefix of a suite option must reach the suite
    )
    size = bench_parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="fewer rounds, smaller sizes (the default)"
    )
    size.add_argument("--full", action="store_true", help="the suite's default sizes")
    bench_parser.add_argument(
        "--out",
        metavar="DIR",
        default=BENCH_OUT,
        help=f"where results.md, results.json and the plots go (default: ./{BENCH_OUT})",
    )
    bench_parser.add_argument(
        "--benchmarks",
        metavar="DIR",
        type=Path,
        help="the benchmarks/ folder of a clone of the repository (default: found)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m actionpool`` and the ``actionpool`` script."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return bench(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        return info() if args.dask is None else info_dask(args.dask)
    from .demo import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
