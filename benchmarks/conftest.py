"""Fixtures for the micro benchmarks: the test suite's no-leftover-process checks.

``benchmarks/`` is not a package, so pytest puts this directory, not the repository
root, on ``sys.path``; the root is added here so that ``tests.conftest`` imports
whether pytest was started as ``python -m pytest`` (which adds the current directory)
or as the ``pytest`` script, and from any working directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.conftest import (  # noqa: E402
    no_leftover_processes,
    no_leftover_processes_per_module,
)

__all__ = ["no_leftover_processes", "no_leftover_processes_per_module"]
