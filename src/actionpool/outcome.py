"""Results of a run: :class:`Status`, :class:`Outcome`, :class:`RunStatus`, :class:`Report`.

Every node of a run ends with exactly one :class:`Outcome`; a :class:`Report` holds
them all in plan order, with the merged state and the run's status.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, overload

from .errors import ActionFailed
from .plan import Node

__all__ = ["AttemptRecord", "Outcome", "Report", "RunStatus", "Status"]


class Status(StrEnum):
    """How one node ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the action raised (or could not be serialized)
    TIMED_OUT = "timed_out"  # it ran past its timeout
    CRASHED = "crashed"  # its worker process died
    CANCELLED = "cancelled"  # the run was cancelled before or while it ran
    SKIPPED = "skipped"  # an upstream node did not succeed, or validate said no
    # a run resumed from a journal found it started but never ended, and it is not
    # idempotent: whether its side effect happened is unknown
    IN_DOUBT = "in_doubt"

    def __str__(self) -> str:
        return self.value


class RunStatus(StrEnum):
    """How a whole run ended."""

    SUCCEEDED = "succeeded"  # every node succeeded
    PARTIAL = "partial"  # some nodes succeeded, some did not
    FAILED = "failed"  # no node succeeded, or fail_fast stopped the run
    CANCELLED = "cancelled"  # the run was cancelled

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class AttemptRecord:
    """One earlier attempt of a node: one that ran, did not succeed, and was retried.

    Attributes:
        started_at: ``time.time()`` seconds when it started, or None if unknown.
        finished_at: ``time.time()`` seconds when its end was recorded.
        pool: ``"cpu"``, ``"io"`` or ``"dask"``.
        worker: the worker's pid (cpu) or thread name (io), or None.
        status: how it ended: ``FAILED``, ``TIMED_OUT`` or ``CRASHED``.
        error: the exception it ended with.
    """

    started_at: float | None
    finished_at: float
    pool: str | None
    worker: int | str | None
    status: Status
    error: BaseException | None


@dataclass(frozen=True)
class Outcome:
    """The terminal record of one node.

    Attributes:
        node: the :class:`~actionpool.Node`.
        name: the node's name.
        status: how it ended (:class:`Status`).
        value: the return value when it succeeded, else ``None``.
        error: the exception when it did not succeed (the action's own exception, with
            its type and message; or an actionpool error saying why), else ``None``.
        traceback: the remote traceback, formatted, when the action raised; for a
            skipped node, the reason.
        attempts: how many attempts ran (0 when it never started).
        started_at: ``time.time()`` seconds when the last attempt started, or None.
        finished_at: ``time.time()`` seconds when it ended, or None.
        duration_s: seconds the last attempt ran, or None.
        pool: ``"cpu"``, ``"io"`` or ``"dask"``; ``None`` when it never ran.
        worker: the worker's pid (cpu) or thread name (io), or None; on a Dask
            cluster, ``"<worker address> pid <pid>"``.
        history: the attempts before the last one, in order (empty unless the node
            was retried): :class:`AttemptRecord`; ``started_at`` to ``worker`` above
            describe the last attempt.
    """

    node: Node
    name: str
    status: Status
    value: Any = None
    error: BaseException | None = None
    traceback: str | None = None
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    duration_s: float | None = None
    pool: str | None = None
    worker: int | str | None = None
    history: tuple[AttemptRecord, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the node succeeded."""
        return self.status is Status.SUCCEEDED

    def __repr__(self) -> str:
        extra = ""
        if self.error is not None:
            extra = f" error={type(self.error).__name__}: {self.error}"
        dur = f" {self.duration_s:.3f}s" if self.duration_s is not None else ""
        return f"<Outcome {self.name!r} {self.status.value}{dur}{extra}>"


class Report:
    """All outcomes of one run, in plan order, plus the merged state.

    ``report[node]`` (or ``report["name"]``) is a node's value; ``report.outcome(node)``
    its :class:`Outcome`.

    Attributes:
        status: the :class:`RunStatus`.
        outcomes: every node's outcome, in plan order.
        state: the run's state after the fan-in (deltas merged in plan order).
        run_id: the id of the run.
        started_at, finished_at: ``time.time()`` seconds of the run.
        recycled: the worker processes replaced during the run
            (``Runner(max_tasks_per_worker=..., max_worker_memory=...)``), in order: one
            dict per worker, ``{"node": the name of the node whose attempt was its
            last, "worker": pid, "reason": "max_tasks_per_worker" |
            "max_worker_memory", "tasks": attempts it ran, "rss": its resident set in
            bytes when measured, else None}``.
    """

    def __init__(
        self,
        outcomes: list[Outcome],
        state: Any,
        status: RunStatus,
        run_id: str,
        started_at: float,
        finished_at: float,
        recycled: list[dict[str, Any]] | None = None,
    ) -> None:
        self.recycled: tuple[dict[str, Any], ...] = tuple(recycled or ())
        self.outcomes = tuple(outcomes)
        self.state = state
        self.status = status
        self.run_id = run_id
        self.started_at = started_at
        self.finished_at = finished_at
        self._by_node = {o.node: o for o in self.outcomes}
        self._by_name = {o.name: o for o in self.outcomes}

    @property
    def duration_s(self) -> float:
        """Wall time of the run, seconds."""
        return self.finished_at - self.started_at

    def outcome(self, node: Node | str) -> Outcome:
        """The :class:`Outcome` of ``node`` (a :class:`Node` or a node name).

        Raises:
            KeyError: the node is not part of this run.
        """
        table: dict[Any, Outcome] = self._by_name if isinstance(node, str) else self._by_node
        try:
            return table[node]
        except KeyError:
            raise KeyError(f"{node!r} is not a node of this run") from None

    def __getitem__(self, node: Node | str) -> Any:
        """The value of ``node``.

        Raises:
            ActionFailed: the node did not succeed (its outcome is attached; the
                original error is the ``__cause__``).
            KeyError: the node is not part of this run.
        """
        out = self.outcome(node)
        if out.status is not Status.SUCCEEDED:
            why = f": {type(out.error).__name__}: {out.error}" if out.error is not None else ""
            raise ActionFailed(f"node {out.name!r} {out.status.value}{why}", out) from out.error
        return out.value

    def __iter__(self) -> Iterator[Outcome]:
        return iter(self.outcomes)

    def __len__(self) -> int:
        return len(self.outcomes)

    @property
    def values(self) -> dict[str, Any]:
        """``{name: value}`` of every node that succeeded, in plan order."""
        return {o.name: o.value for o in self.outcomes if o.status is Status.SUCCEEDED}

    def counts(self) -> dict[Status, int]:
        """How many nodes ended in each :class:`Status` (only statuses that occur)."""
        out: dict[Status, int] = {}
        for o in self.outcomes:
            out[o.status] = out.get(o.status, 0) + 1
        return out

    def failures(self) -> list[Outcome]:
        """The outcomes of the nodes that did not succeed, in plan order."""
        return [o for o in self.outcomes if o.status is not Status.SUCCEEDED]

    def raise_for_failures(self) -> None:
        """Raise every failed node's error together; do nothing when all succeeded.

        Skipped nodes are not repeated (their upstream's error is in the group).

        Raises:
            ExceptionGroup: the errors of every node that failed, timed out, crashed
                or was cancelled, in plan order.
        """
        errors: list[Exception] = []
        for o in self.outcomes:
            if o.status in (Status.SUCCEEDED, Status.SKIPPED):
                continue
            err = o.error
            if not isinstance(err, Exception):
                err = ActionFailed(f"node {o.name!r} {o.status.value}: {err!r}", o)
            errors.append(err)
        if errors:
            raise ExceptionGroup(
                f"{len(errors)} of {len(self.outcomes)} nodes did not succeed"
                f" (run {self.status.value})",
                errors,
            )

    def __repr__(self) -> str:
        counts = ", ".join(f"{n} {s.value}" for s, n in self.counts().items())
        return f"<Report {self.status.value}: {counts or 'no nodes'} in {self.duration_s:.3f}s>"

    def _repr_html_(self) -> str:
        """The report as HTML, for notebooks: a coloured header (run status, counts,
        wall time, speedup over the sum of action times), the nodes that did not
        succeed first with a collapsible traceback, then a table of the nodes
        (:func:`actionpool.views.report_html`)."""
        from .views import report_html

        return report_html(self)

    def plot(self, ax: Any = None) -> Any:
        """A Gantt chart of the run: a row per worker, a bar per attempt (retries
        included) from its start to its end in seconds since the run started, coloured
        by how it ended (:func:`actionpool.views.gantt`).

        Args:
            ax: a matplotlib ``Axes`` to draw on; None: a new figure.

        Returns:
            The matplotlib ``Figure`` (``fig.savefig("run.png")`` to keep it).

        Raises:
            ImportError: matplotlib is not installed
                (``pip install 'actionpool[plot]'``).
        """
        from .views import gantt

        return gantt(self, ax)

    @overload
    def to_chrome_trace(self, path: None = None) -> dict[str, Any]: ...

    @overload
    def to_chrome_trace(self, path: str | os.PathLike[str]) -> Path: ...

    def to_chrome_trace(self, path: str | os.PathLike[str] | None = None) -> dict[str, Any] | Path:
        """The run in the Chrome trace event format, for https://ui.perfetto.dev or
        chrome://tracing: a process per pool and a named thread per worker (numeric
        ids), one span per attempt (retries included), an instant for each node that
        never ran and each recycled worker; times in microseconds since the run
        started (:func:`actionpool.views.chrome_trace`).

        Args:
            path: where to write the JSON file.

        Returns:
            ``path`` (a :class:`~pathlib.Path`) once written; without ``path``, the
            trace as a dict (``{"traceEvents": [...]}``), which a notebook shows as
            one line.

        Raises:
            OSError: the file could not be written.
        """
        from .views import chrome_trace

        trace = chrome_trace(self)
        if path is None:
            return trace
        out = Path(path)
        with out.open("w", encoding="utf-8") as f:
            json.dump(trace, f)
        return out
