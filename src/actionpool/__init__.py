"""actionpool: run actions in parallel, with an outcome for every one.

CPU-bound actions run in worker processes, I/O-bound ones on a thread pool; plans are
dependency graphs that run with as much parallelism as their edges allow.

>>> import actionpool as ap
>>> with ap.Runner(cpu_workers=1, io_workers=1) as runner:
...     list(runner.map(abs, [-1, -2]))
[1, 2]

Public names are imported on first use (PEP 562), so that a worker process, which
needs only the action and transfer modules, starts without importing the scheduler.
"""

from __future__ import annotations

import importlib
import sys as _sys
import threading as _threading
from typing import TYPE_CHECKING, Any

# Eager: the submodule ``actionpool.action`` would otherwise shadow the function
# ``action`` as a package attribute once anything imports it. It is light.
from .action import ActionSpec, Context, action

if TYPE_CHECKING:
    from .errors import (
        ActionFailed,
        ActionpoolError,
        ActionTimeout,
        JournalError,
        PlanError,
        PlatformUnsupported,
        RemoteError,
        ResourceError,
        SerializationError,
        StateConflict,
        WorkerCrashed,
    )
    from .events import Event
    from .outcome import AttemptRecord, Outcome, Report, RunStatus, Status
    from .plan import Node, Plan
    from .runner import Runner
    from .sizing import Sizing
    from .tools import arun_tool_calls, run_tool_calls

__version__ = "0.1.0"

_WHERE = {
    "ActionFailed": "errors",
    "ActionpoolError": "errors",
    "ActionTimeout": "errors",
    "JournalError": "errors",
    "PlanError": "errors",
    "PlatformUnsupported": "errors",
    "RemoteError": "errors",
    "ResourceError": "errors",
    "SerializationError": "errors",
    "StateConflict": "errors",
    "WorkerCrashed": "errors",
    "Event": "events",
    "AttemptRecord": "outcome",
    "Outcome": "outcome",
    "Report": "outcome",
    "RunStatus": "outcome",
    "Status": "outcome",
    "Node": "plan",
    "Plan": "plan",
    "Runner": "runner",
    "Sizing": "sizing",
    "arun_tool_calls": "tools",
    "run_tool_calls": "tools",
}

__all__ = [
    "ActionFailed",
    "ActionSpec",
    "ActionTimeout",
    "ActionpoolError",
    "AttemptRecord",
    "Context",
    "Event",
    "JournalError",
    "Node",
    "Outcome",
    "Plan",
    "PlanError",
    "PlatformUnsupported",
    "RemoteError",
    "ResourceError",
    "Report",
    "RunStatus",
    "Runner",
    "SerializationError",
    "Sizing",
    "StateConflict",
    "Status",
    "WorkerCrashed",
    "__version__",
    "action",
    "arun_tool_calls",
    "run_tool_calls",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'actionpool' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


def _prestart() -> None:
    from . import runner  # noqa: F401 - what the first ap.Runner would import
    from .backends import prestart_in_kernel

    prestart_in_kernel()


# A Jupyter kernel runs threads, so a runner's worker processes come from a fresh
# interpreter there: start it now, and import the runner's modules, while the user
# writes the next cells (backends.prestart_in_kernel).
if "ipykernel" in _sys.modules:
    _threading.Thread(target=_prestart, name="actionpool-prestart", daemon=True).start()
