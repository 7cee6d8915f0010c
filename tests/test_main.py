"""The command line: ``python -m actionpool`` (``--version``, every ``--help``),
``info``, ``demo`` on real input, and ``bench`` found, or not, as an installed wheel
sees it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import actionpool

ROOT = Path(__file__).resolve().parents[1]


def run(
    *args: str,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    setup: str = "",
) -> subprocess.CompletedProcess[str]:
    """``python -m actionpool ARGS`` in a fresh interpreter; with ``setup``, that code
    runs first in the interpreter (to hide a package, say) and then the same CLI."""
    cmd = (
        ["-c", f"import sys; {setup}; from actionpool.__main__ import main; sys.exit(main())"]
        if setup
        else ["-m", "actionpool"]
    )
    return subprocess.run(
        [sys.executable, *cmd, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
        cwd=cwd,
    )


HIDE = "sys.modules.update(dict.fromkeys({names}))"
"""``setup`` code for :func:`run`: the named modules fail to import, as if not installed."""


def flat(text: str) -> str:
    """``text`` with its line breaks and runs of spaces as one space: what ``info``
    says, however its table wrapped it."""
    return " ".join(text.split())


def test_version_prints_the_package_version() -> None:
    out = run("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"actionpool {actionpool.__version__}\n"


@pytest.mark.parametrize(
    ("command", "names"),
    [
        ((), ["info", "demo", "bench", "--version"]),
        (("info",), ["--dask ADDRESS", "ACTIONPOOL_CPU_WORKERS", "ACTIONPOOL_PORTABLE"]),
        (("demo",), ["--path", "--limit N", "--batch-bytes BYTES", "--no-serial", "tqdm"]),
        (
            ("bench",),
            ["--quick", "--full", "--out DIR", "--benchmarks DIR", "--workloads", "--only",
             "actionpool[bench]", "clone of the repository", "nox -s bench"],
        ),
    ],
)  # fmt: skip
def test_every_help_exits_0_and_names_its_options(
    command: tuple[str, ...], names: list[str]
) -> None:
    out = run(*command, "--help")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for name in names:
        assert name in flat(text), name
    # plain text: no reST markup of a docstring, no paragraph run into one line
    assert "``" not in text and ":mod:" not in text
    assert all(len(line) < 100 for line in text.splitlines()), text


def test_info_prints_the_sizing_as_a_table_with_each_reason_under_its_row() -> None:
    out = run("info")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    start = lines.index("sizing (this machine):")
    rows = [line.split()[:2] for line in lines[start + 1 :] if not line.startswith("    ")]
    labels = [" ".join(r) for r in rows[:5]]
    assert labels == ["cpu workers", "io workers", "memory budget", "BLAS threads", "cpu path"]
    text = flat(out.stdout)
    # each reason under its row, without repeating the row's name
    assert re.search(r"cpu workers \d+ (= min\(|from ACTIONPOOL_CPU_WORKERS)", text), text
    assert "physical cores [loky.cpu_count, affinity+cgroups]" in text
    assert "memory budget" in text and "% of" in text and "cpu_workers=" not in text
    assert "loky.cpu_count" in out.stdout and "physical" in out.stdout
    assert "versions: loky" in out.stdout


def test_info_lines_are_all_under_100_characters() -> None:
    out = run("info", env={"ACTIONPOOL_CPU_WORKERS": "3"})
    assert out.returncode == 0, out.stderr
    long = [line for line in out.stdout.splitlines() if len(line) >= 100]
    assert not long, long
    assert "cpu workers    3" in out.stdout and "from ACTIONPOOL_CPU_WORKERS" in out.stdout


def test_the_sizing_table_wraps_long_reasons_and_keeps_quantities_whole() -> None:
    from actionpool.__main__ import sizing_table
    from actionpool.sizing import Sizing

    cgroup = "/sys/fs/cgroup/" + "kubepods.slice/" * 8 + "memory.max"  # one 130-char word
    sizing = Sizing(
        cpu_workers=4,
        io_workers=64,
        memory_budget=3 * 2**30,
        blas_threads=2,
        reason="; ".join(
            [
                "8 usable cores: this runner was made inside an action of another runner's"
                " worker process, which may use 8 (its threads=)",
                "cpu_workers=4 = min(8 physical cores [loky.cpu_count, affinity+cgroups], 4 ="
                " budget 3.0 GiB / worker 700.0 MiB [measured]), limited by memory budget /"
                " worker footprint",
                "blas_threads=2 = 8 usable cores // 4 cpu workers",
                "io_workers=64 = max(32, 8 x 8 usable cores)",
                f"memory_budget=3.0 GiB = 80% of 3.8 GiB = cgroup v2 limit 4.0 GiB - usage"
                f" 0.2 GiB [{cgroup}], below the host's 60.0 GiB available [psutil]",
            ]
        ),
        usable_cores=8,
        physical_cores=8,
        available_memory=int(3.8 * 2**30),
        worker_footprint=700 * 2**20,
    )
    lines = sizing_table(sizing, ("zygote", "worker processes forked from a zygote process"))
    assert all(len(line) < 100 and line == line.rstrip() for line in lines), lines
    assert lines[0] == "sizing (this machine):"
    assert lines[1] == "  cpu workers    4"
    assert lines[2].startswith("    = min(8 physical cores")
    assert "  memory budget  3.0 GiB" in lines and "  cpu path       zygote" in lines
    text = "\n".join(lines)
    assert "700.0 MiB" in text  # a number and its unit never split over two lines
    assert cgroup in "".join(line.strip() for line in lines)  # broken, not cut off
    assert "  note" in text and "this runner was made inside an action" in flat(text)


@pytest.mark.parametrize(("portable", "path"), [("1", "portable"), ("0", "zygote")])
def test_info_says_which_process_path_cpu_actions_take(portable: str, path: str) -> None:
    if path == "zygote" and sys.platform != "linux":
        pytest.skip("the zygote path is Linux's")
    out = run("info", env={"ACTIONPOOL_PORTABLE": portable})
    assert out.returncode == 0, out.stderr
    assert f"  cpu path       {path}\n" in out.stdout
    assert "worker processes" in out.stdout
    if portable == "1":
        assert "ACTIONPOOL_PORTABLE=1 forces it" in out.stdout


def test_info_dask_prints_the_clusters_sizing(dask_client: object) -> None:
    address = dask_client.scheduler.address  # type: ignore[attr-defined]
    out = run("info", "--dask", address)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("sizing (dask, 3 workers):\n  cpu workers    3\n")
    assert f"3 threads of 3 Dask workers of the cluster at {address}" in flat(out.stdout)
    assert all(len(line) < 100 for line in out.stdout.splitlines()), out.stdout


def test_info_dask_names_an_unreachable_address() -> None:
    quick = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}  # Dask's own setting
    out = run("info", "--dask", "tcp://127.0.0.1:9", env=quick)
    assert out.returncode == 1
    assert "could not reach the Dask scheduler at 'tcp://127.0.0.1:9' within 2s" in out.stderr


def test_demo_on_part_of_the_stdlib_with_a_tqdm_bar_per_phase() -> None:
    pytest.importorskip("tqdm")
    out = run("demo", "--limit", "150", "--batch-bytes", "100000")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "files: 150" in text
    assert "sizing: cpu_workers=" in text
    assert "io (read)" in text and "cpu (" in text
    assert "ten most complex modules" in text
    assert "serial time of the same work" in text and "speedup:" in text
    assert "parallel and serial results agree" in text
    # the bars went to stderr, each drawn to the end
    assert "parallel: 100%" in out.stderr and "serial: 100%" in out.stderr
    assert out.stderr.count("150/150") >= 2


def test_demo_without_tqdm_prints_plain_progress_lines_per_phase() -> None:
    """With the line interval at 0, a line per batch: the progress moves per batch."""
    setup = HIDE.format(names="['tqdm']") + "; import actionpool.demo as d; d.PLAIN_EVERY_S = 0"
    out = run("demo", "--limit", "60", "--batch-bytes", "100000", setup=setup)
    assert out.returncode == 0, out.stderr
    assert "parallel and serial results agree" in out.stdout
    batches = int(out.stdout.split(" batches;")[0].rsplit(" ", 1)[1])
    for phase in ("parallel", "serial"):
        lines = [x for x in out.stderr.splitlines() if x.startswith(f"{phase}: ")]
        assert len(lines) == batches + 1, out.stderr  # one per batch, then the last count
        assert lines[-1].startswith(f"{phase}: 60/60 files in ")
        assert all(x.endswith(" s)") for x in lines[:-1]) and lines[0] != lines[-2]


@pytest.mark.slow
def test_demo_on_the_whole_stdlib_counts_every_file() -> None:
    import sysconfig
    from pathlib import Path

    from actionpool.demo import find_sources

    expected = len(find_sources(Path(sysconfig.get_paths()["stdlib"]).resolve()))
    out = run("demo", "--no-serial", timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"files: {expected} " in out.stdout
    assert "run succeeded" in out.stdout


def test_demo_rejects_a_missing_path(tmp_path: object) -> None:
    out = run("demo", "--path", "/nonexistent/dir")
    assert out.returncode == 2 and "not a directory" in out.stderr


def test_unknown_command() -> None:
    out = run("frobnicate")
    assert out.returncode == 2


def test_unknown_option_of_info_or_demo_is_an_error() -> None:
    out = run("info", "--frobnicate")
    assert out.returncode == 2 and "unrecognized arguments: --frobnicate" in out.stderr


def test_bench_without_the_benchmarks_folder_exits_2_saying_where_to_get_it(
    tmp_path: Path,
) -> None:
    """As an installed wheel: the package imported from a folder with no benchmarks/
    beside it, run from a folder without one either."""
    site = tmp_path / "site"
    shutil.copytree(
        ROOT / "src" / "actionpool",
        site / "actionpool",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    out = run("bench", env={"PYTHONPATH": str(site)}, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    err = flat(out.stderr)
    assert f"not found (looked in {tmp_path / 'benchmarks'})" in err  # and not in ROOT
    assert "It is not part of the installed package" in err
    assert "clone of the repository" in err
    assert "pip install -e '.[bench]' python -m actionpool bench" in err
    assert out.stdout == ""


def test_bench_with_a_folder_that_is_not_the_suite_exits_2(tmp_path: Path) -> None:
    out = run("bench", "--benchmarks", str(tmp_path))
    assert out.returncode == 2
    assert f"--benchmarks {tmp_path} does not hold it" in out.stderr


@pytest.mark.slow
def test_bench_runs_the_quick_suite_from_the_source_tree_and_names_missing_peers(
    tmp_path: Path,
) -> None:
    """From another folder: the suite is found beside the editable install's source;
    mpire and pebble hidden, the command says how to install them and goes on."""
    out = run(
        "bench", "--workloads", "W10", "--rounds", "1", "--small-sizes", "1000",
        "--no-dask", "--no-ray", "--out", str(tmp_path / "out"),
        setup=HIDE.format(names="['mpire', 'pebble']"), cwd=tmp_path, timeout=110,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    err = flat(out.stderr)
    # the hidden ones, and whatever else this environment lacks (CI has no bench extra)
    missing = err.split("not installed: ", 1)[1].split(";", 1)[0].split(", ")
    assert {"mpire", "pebble"} <= set(missing) and "pip install 'actionpool[bench]'" in err
    assert f"running {ROOT / 'benchmarks' / 'suite.py'} --quick --out {tmp_path / 'out'}" in err
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["args"]["quick"] is True
    assert {e["library"] for e in data["W10"]} >= {"actionpool", "multiprocessing"}


def test_analyse_source_measures_a_module() -> None:
    from actionpool.demo import analyse_source

    src = b"""
class A:
    def f(self, x):
        if x and x > 1:
            for i in range(x):
                pass
        return [y for y in range(3) if y]
"""
    m = analyse_source("m.py", src)
    assert (m.functions, m.classes, m.lines) == (1, 1, 7)
    # module 1 + function 1 + if 1 + and 1 + for 1 + comprehension-if 1
    assert m.complexity == 6
    assert m.max_nesting == 4  # class > def > if > for
    bad = analyse_source("bad.py", b"def (:\n")
    assert bad.error.startswith("SyntaxError")
