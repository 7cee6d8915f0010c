"""Command line: ``python -m actionpool info [--dask ADDRESS] | demo``.

* ``info``: this machine's sizing (cores, memory, pool sizes and why), versions, and the
  BLAS/OpenMP libraries threadpoolctl finds; with ``--dask ADDRESS``, the sizing a
  dask runner gets from the cluster at that address (workers, threads, memory).
* ``demo``: the main job, on real input: measure every ``.py`` file of the standard
  library in parallel and compare with the same work done serially
  (see :mod:`actionpool.demo`).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence


def info() -> int:
    """Print the sizing and environment; returns 0."""
    import cloudpickle
    import loky
    import numpy
    import psutil
    import threadpoolctl

    from . import __version__
    from .platforms import PORTABLE_ENV, cpu_unavailable, process_path
    from .sizing import compute_sizing

    sizing = compute_sizing()
    path, missing = process_path()
    print(f"actionpool {__version__} on Python {platform.python_version()} ({sys.platform})")
    print(f"machine: {platform.machine()}, {platform.processor() or 'unknown processor'}")
    print(
        f"cores: {sizing.usable_cores} usable, {sizing.physical_cores} physical "
        f"(loky.cpu_count: affinity and cgroup quotas applied)"
    )
    print(f"memory: {sizing.available_memory / 2**30:.1f} GiB available [psutil]")
    print(f"sizing: {sizing}")
    for line in sizing.reason.split("; "):
        print(f"  {line}")
    if path == "none":
        print(f"cpu actions: {cpu_unavailable(missing)}")
    else:
        print(
            f"cpu actions: worker processes on the {path} path ({PORTABLE_ENV}=1 forces"
            " the portable one)"
        )
    print(
        f"versions: loky {loky.__version__}, cloudpickle {cloudpickle.__version__}, "
        f"psutil {psutil.__version__}, numpy {numpy.__version__}, "
        f"threadpoolctl {threadpoolctl.__version__}"
    )
    pools = threadpoolctl.threadpool_info()
    print(f"thread pools in this process ({len(pools)}):")
    for p in pools:
        print(
            f"  {p.get('internal_api')} ({p.get('user_api')}): {p.get('num_threads')} threads,"
            f" {p.get('filepath')}"
        )
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
    print(f"sizing: {sizing}")
    for line in sizing.reason.split("; "):
        print(f"  {line}")
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
