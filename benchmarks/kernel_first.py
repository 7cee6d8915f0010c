"""The first runner of a real Jupyter kernel: its first result, with and without the
zygote started at ``import actionpool`` (``ACTIONPOOL_PRESTART``), against
``concurrent.futures.ProcessPoolExecutor`` in the same kernel.

Each round starts a fresh kernel per setting (nbclient), runs ``import actionpool`` in
one cell, waits a second in the next (the user writing it), then times ``Runner()``
plus one ``os.getpid`` result, then the same for a ``ProcessPoolExecutor(2)``. The two
settings alternate round by round; medians are printed. Needs ``nbclient`` and
``ipykernel`` (the ``test`` extra). Not part of ``suite.py``: it starts kernels, not
pools. Usage: ``python benchmarks/kernel_first.py [ROUNDS]`` (default 5).
"""

from __future__ import annotations

import os
import statistics
import sys

import nbclient
import nbformat

CELLS = [
    "import time, os, concurrent.futures as cf\nimport actionpool as ap",
    "time.sleep(1.0)  # the user writes the next cell",
    "t = time.perf_counter()\nr = ap.Runner(cpu_workers=2, io_workers=2)\n"
    "r.submit(os.getpid).result()\nap_ms = (time.perf_counter() - t) * 1e3\nr.close()",
    "t = time.perf_counter()\nwith cf.ProcessPoolExecutor(2) as ex:\n"
    "    ex.submit(os.getpid).result()\n    cf_ms = (time.perf_counter() - t) * 1e3\n"
    "print(ap_ms, cf_ms)",
]


def one(prestart: str) -> tuple[float, float]:
    """(actionpool ms, concurrent.futures ms) in a fresh kernel."""
    os.environ["ACTIONPOOL_PRESTART"] = prestart
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    ap_ms, cf_ms = map(float, nb.cells[-1].outputs[0]["text"].split())
    return ap_ms, cf_ms


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    got: dict[str, list[tuple[float, float]]] = {"0": [], "1": []}
    for _ in range(rounds):
        for prestart in got:
            got[prestart].append(one(prestart))
    for prestart, pairs in got.items():
        a = statistics.median(p[0] for p in pairs)
        c = statistics.median(p[1] for p in pairs)
        print(
            f"ACTIONPOOL_PRESTART={prestart}: actionpool {a:.1f} ms,"
            f" concurrent.futures {c:.1f} ms, ratio {a / c:.2f}x (medians of {rounds})"
        )


if __name__ == "__main__":
    main()
