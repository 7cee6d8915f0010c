"""The exception hierarchy of actionpool.

Every error actionpool raises on its own behalf derives from :class:`ActionpoolError`.
Errors raised *by user actions* are never wrapped: a failed node keeps its original
exception (type, message, remote traceback) in :attr:`actionpool.Outcome.error`.

A :class:`~actionpool.Runner` is a ``concurrent.futures.Executor``, so two of these are
also the standard library's: :class:`WorkerCrashed` is a
``concurrent.futures.process.BrokenProcessPool`` (hence a ``BrokenExecutor`` and a
``RuntimeError``) and :class:`SerializationError` is a ``pickle.PicklingError``: code
written for ``ProcessPoolExecutor`` catches them as it catches that executor's.
"""

from __future__ import annotations

import pickle
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .outcome import Outcome

__all__ = [
    "ActionFailed",
    "ActionTimeout",
    "ActionpoolError",
    "JournalError",
    "PlatformUnsupported",
    "PlanError",
    "RemoteError",
    "ResourceError",
    "SerializationError",
    "StateConflict",
    "WorkerCrashed",
]


class ActionpoolError(Exception):
    """Base class of every error raised by actionpool itself."""


class PlanError(ActionpoolError, ValueError):
    """A plan cannot run: a cycle, an unknown node or name, or a bad option.

    Raised by :meth:`Plan.add` or :meth:`Runner.run` before anything runs; the message
    names the nodes involved.
    """


class ActionFailed(ActionpoolError):
    """Raised by ``report[node]`` for a node that did not succeed.

    Attributes:
        outcome: the node's :class:`~actionpool.Outcome` (status, error, traceback).
    """

    def __init__(self, message: str, outcome: Outcome | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome


class ActionTimeout(ActionpoolError, TimeoutError):
    """An action ran past its ``timeout`` (seconds).

    Raised inside a CPU action at its deadline (the soft timeout), and recorded as the
    error of a node that ended ``TIMED_OUT``.
    """


class WorkerCrashed(ActionpoolError, BrokenProcessPool):
    """The worker process running a node died (segfault, ``os._exit``, OOM kill).

    Also a ``concurrent.futures.process.BrokenProcessPool``, what
    ``ProcessPoolExecutor`` raises for a call whose worker died (unlike that pool, the
    runner heals: only the calls that were running in the dead worker fail).

    Attributes:
        exitcode: the worker's exit code, or ``None`` when unknown.
        signal: the number of the signal that killed it, or ``None``.
    """

    def __init__(self, message: str, exitcode: int | None = None, signal: int | None = None):
        super().__init__(message)
        self.exitcode = exitcode
        self.signal = signal


class StateConflict(ActionpoolError):
    """Two nodes not ordered by a dependency path updated the same state key.

    Attributes:
        key: the state key.
        nodes: the names of the two nodes, in plan order.
    """

    def __init__(self, message: str, key: str = "", nodes: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.key = key
        self.nodes = nodes


class SerializationError(ActionpoolError, pickle.PicklingError):
    """Something a node needs to send or return could not be pickled.

    The message names the node and which argument, state key or return value failed.
    Also a ``pickle.PicklingError``, what ``ProcessPoolExecutor`` raises there.
    """


class ResourceError(ActionpoolError):
    """A worker resource (``Runner(resources=...)``) could not be made for an action.

    Raised inside the action by ``ctx.resources[name]`` when the resource's factory
    raised (the original exception is the ``__cause__``), when the factory could not be
    unpickled in the worker, or when the resources were already closed (a thread left
    running after its runner closed). The message names the resource and the node:
    ``resource 'db' of node 'load': its factory raised ConnectionError: ...``. Nothing
    is cached after a failure: the next access (a retry) calls the factory again.
    """


class RemoteError(ActionpoolError):
    """Stands in for an exception raised by an action that could not be rebuilt here.

    Raised when the original exception cannot be pickled or unpickled across the
    process boundary; keeps its type name, message and the remote traceback.

    Attributes:
        type_name: the qualified name of the original exception type.
        remote_traceback: the traceback formatted in the worker.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteError, (self.type_name, self.message, self.remote_traceback))


class JournalError(ActionpoolError):
    """A run's journal cannot be used: it belongs to another plan or initial state, it
    is damaged or not a journal, it is in use by another run, or it cannot be written.

    Raised by :meth:`Runner.run <actionpool.Runner.run>` before anything runs; the
    message names the file and what is wrong, and the file is left as it was. A
    journal that fails while a run writes it stops that run (its nodes end
    ``CANCELLED`` naming this error).
    """


class PlatformUnsupported(ActionpoolError, NotImplementedError):
    """What a cpu action ends with where this platform cannot start actionpool's
    worker processes (see the README's "Platforms"); the message names the platform,
    what it lacks, and what to use instead (``kind="io"``, ``backend="dask"``)."""
