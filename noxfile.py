"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s demo``, ``nox -s bench``,
``nox -s soak``, ``nox -s tests-python-3.13``, ``nox -s tests-portable``, ``nox -s docs``.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (the README's test command)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


PYTHONS = ["3.11", "3.12", "3.13"]


@nox.session(python=PYTHONS, name="tests-python")
def tests_python(session: nox.Session) -> None:
    """The whole suite under each of Python 3.11, 3.12, 3.13 (those installed), with
    DeprecationWarning as an error (Python 3.12+ warns about a fork with threads):
    ``nox -s tests-python-3.13``. CI runs the core of it (``.ci/cross_version_tests.txt``)
    under Python 3.13 besides its main one."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-W", "error::DeprecationWarning", *session.posargs)


@nox.session(name="tests-portable")
def tests_portable(session: nox.Session) -> None:
    """The whole suite on the portable process path (``ACTIONPOOL_PORTABLE=1``: the
    path macOS takes, forced on Linux); the zygote path's own tests are skipped. CI
    runs the process-pool part of it (``.ci/portable_tests.txt``)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs, env={"ACTIONPOOL_PORTABLE": "1"})


@nox.session
def soak(session: nox.Session) -> None:
    """100,000 tiny map items and a 10,000-node plan per round, twice after a warm-up:
    RSS must grow < 10%, fds, threads and /dev/shm entries must come back
    (``benchmarks/soak.py``; ``-- --rounds 8`` for longer)."""
    session.install("-e", ".")
    session.run("python", "benchmarks/soak.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format check) and mypy --strict on src/."""
    session.install("-e", ".[lint]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: analyse the standard library in parallel."""
    session.install("-e", ".")
    session.run("python", "-m", "actionpool", "demo", *session.posargs)


BENCH_PEERS = [
    "joblib",
    "loky",
    "mpire",
    "pebble",
    "dask[distributed]",
    "matplotlib",
    "pytest-benchmark",
]


@nox.session
def bench(session: nox.Session) -> None:
    """actionpool against its peers, W1-W11 and scaling curves, into docs/benchmarks/.

    ``nox -s bench -- --quick``: fewer rounds, smaller sizes (under 3 minutes on 2 cores);
    other arguments go to ``benchmarks/suite.py``. Ray takes part when it is installed.
    ``nox -s bench -- --micro``: the pytest-benchmark micro benchmarks instead.
    """
    session.install("-e", ".[bench]", *BENCH_PEERS)
    args = list(session.posargs)
    if "--micro" in args:
        args.remove("--micro")
        session.run(
            "python",
            "-m",
            "pytest",
            "benchmarks",
            "-p",
            "no:cacheprovider",
            "--benchmark-only",
            *args,
        )
        return
    session.run("python", "benchmarks/suite.py", "--out", "docs/benchmarks", *args)


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (MkDocs, Material theme, mkdocstrings), built with every
    warning an error (broken links and anchors, docstrings griffe cannot parse) into
    ``site/``, which git ignores. ``nox -s docs -- --site-dir DIR`` builds elsewhere;
    ``mkdocs serve`` (after ``pip install -e ".[docs]"``) previews it."""
    session.install("-e", ".[docs]")
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        "site",
        *session.posargs,
        env={"NO_MKDOCS_2_WARNING": "1"},  # Material's notice about its successor
    )
