"""Command line: ``python -m actionpool info [--dask ADDRESS] | demo``.

* ``info``: this machine's sizing (cores, memory, pool sizes and why, as a table of one
  row per number), versions, and the BLAS/OpenMP libraries threadpoolctl finds; with
  ``--dask ADDRESS``, the sizing a dask runner gets from the cluster at that address.
* ``demo``: the main job, on real input: measure every ``.py`` file of the standard
  library in parallel and compare with the same work done serially
  (see :mod:`actionpool.demo`).

Every line ``info`` prints stays under :data:`WIDTH` characters: the reasons are
wrapped, each under the row it explains.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sizing import Sizing

WIDTH = 99
"""The longest line ``info`` prints (a terminal of 100 columns shows it whole)."""

_QUANTITY = re.compile(r"(\d) (B|KiB|MiB|GiB|TiB|cores?|workers?)\b")


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
        out.append(f"  {'note':<15}")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m actionpool`` and the ``actionpool`` script."""
    parser = argparse.ArgumentParser(prog="python -m actionpool")
    sub = parser.add_subparsers(dest="command", required=True)
    info_parser = sub.add_parser("info", help="print this machine's sizing and environment")
    info_parser.add_argument(
        "--dask", metavar="ADDRESS", help="the sizing on the Dask cluster at ADDRESS instead"
    )
    sub.add_parser("demo", help="analyse the standard library in parallel", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return info() if args.dask is None else info_dask(args.dask)
    from .demo import main as demo_main

    return demo_main(rest)


if __name__ == "__main__":
    sys.exit(main())
