"""examples/notebook.ipynb, run in a real Jupyter kernel (nbclient), cell by cell.

The kernel is a child of this process with threads of its own, as every kernel has:
the runner it makes starts its workers as fresh interpreters, and closes them before
the notebook ends (the fixture checks that no process is left).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "notebook.ipynb"


def _outputs(nb: object, source_start: str) -> list[dict]:
    """The outputs of the code cell whose source starts with ``source_start``."""
    (cell,) = [
        c
        for c in nb.cells  # type: ignore[attr-defined]
        if c.cell_type == "code" and c.source.startswith(source_start)
    ]
    return list(cell.outputs)


def _data(outputs: list[dict], mime: str) -> str:
    found = [o["data"][mime] for o in outputs if mime in o.get("data", {})]
    assert found, f"no {mime} output in {outputs}"
    return str(found[-1])


@pytest.mark.slow
def test_the_notebook_runs_in_a_real_kernel_without_errors(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError at the first cell that fails

    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o["output_type"] == "error"], cell.source

    report = _outputs(nb, "plan = ap.Plan()")
    page = _data(report, "text/html")
    assert "PARTIAL" in page and "part 3 is corrupt" in page
    assert "<details>" in page  # the failure's traceback, collapsed
    assert "<Report partial: 12 succeeded, 1 failed, 1 skipped" in _data(report, "text/plain")

    # the workers' prints and log records, written by the kernel to the cell, tagged
    streams = [o for o in report if o["output_type"] == "stream"]
    out = "".join(o["text"] for o in streams if o["name"] == "stdout")
    err = "".join(o["text"] for o in streams if o["name"] == "stderr")
    for p in range(6):
        assert f"[crunch{p}] crunching 1000 numbers\n" in out
    assert "[crunch3] giving up on part 3" in err
    if importlib.util.find_spec("ipywidgets") is not None:  # tqdm.auto draws a widget
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in report)

    notes = _data(_outputs(nb, "def check("), "text/plain")
    assert "in the map of 'check', item 7" in notes
    assert _data(_outputs(nb, "squares = ["), "text/plain") == str([n * n for n in range(7)])

    expected = sum(n * n for p in range(6) if p != 3 for n in range(p * 1_000, (p + 1) * 1_000))
    assert _data(_outputs(nb, 'report["total_without_3"]'), "text/plain") == str(expected)

    png = _data(_outputs(nb, "report.plot()"), "image/png")
    assert len(png) > 1_000  # a picture, base64

    trace = json.loads((tmp_path / "run-trace.json").read_text())
    spans = {e["name"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert {f"crunch{p}" for p in range(6)} <= spans
    assert "run-trace.json" in _data(_outputs(nb, "trace = "), "text/plain")


PRESTART_CELLS = [
    "import os, threading, time\nimport actionpool as ap\n"
    "from actionpool.pools import zygote_client as zc",
    # the zygote is started (and the runner's modules imported) on a thread of its own
    "for t in threading.enumerate():\n"
    "    if t.name == 'actionpool-prestart':\n"
    "        t.join(60)\n"
    "idle = zc.idle_zygote_pids()\nprint(idle)",
    "with ap.Runner(cpu_workers=2, io_workers=1) as r:\n"
    "    parent = r.submit(os.getppid).result(timeout=60)\n"
    "print(parent in idle, zc.idle_zygote_pids() == [])",
]


def _run_cells(cells: list[str], tmp_path: Path, env: dict[str, str]) -> list[str]:
    """Run ``cells`` in a fresh kernel with ``env`` added to its environment; each
    cell's printed text."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        client.execute()
    return ["".join(o.get("text", "") for o in c.outputs) for c in nb.cells]


@pytest.mark.slow
@pytest.mark.zygote_path
def test_in_a_kernel_the_first_runner_adopts_a_zygote_started_at_import(
    tmp_path: Path,
) -> None:
    out = _run_cells(PRESTART_CELLS, tmp_path, {"ACTIONPOOL_PRESTART": "1"})
    idle = json.loads(out[1])
    assert len(idle) == 1, out  # started ahead, kept idle
    assert out[2] == "True False\n", out  # the runner's workers are its children


@pytest.mark.slow
@pytest.mark.zygote_path
def test_prestart_0_starts_nothing_ahead(tmp_path: Path) -> None:
    out = _run_cells(PRESTART_CELLS[:2], tmp_path, {"ACTIONPOOL_PRESTART": "0"})
    assert out[1] == "[]\n", out
