"""actionpool: run actions in parallel, with an outcome for every one.

CPU-bound actions run on a loky process pool, I/O-bound ones on a thread pool; plans
are dependency graphs that run with as much parallelism as their edges allow.

>>> import actionpool as ap
>>> with ap.Runner() as runner:
...     list(runner.map(abs, [-1, -2]))
[1, 2]
"""

from .action import ActionSpec, Context, action
from .errors import (
    ActionFailed,
    ActionpoolError,
    ActionTimeout,
    PlanError,
    RemoteError,
    SerializationError,
    StateConflict,
    WorkerCrashed,
)
from .events import Event
from .outcome import Outcome, Report, RunStatus, Status
from .plan import Node, Plan
from .runner import Runner
from .sizing import Sizing

__version__ = "0.1.0"

__all__ = [
    "ActionFailed",
    "ActionSpec",
    "ActionTimeout",
    "ActionpoolError",
    "Context",
    "Event",
    "Node",
    "Outcome",
    "Plan",
    "PlanError",
    "RemoteError",
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
]
