"""Results of a run: :class:`Status`, :class:`Outcome`, :class:`RunStatus`, :class:`Report`.

Every node of a run ends with exactly one :class:`Outcome`; a :class:`Report` holds
them all in plan order, with the merged state and the run's status.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .errors import ActionFailed
from .plan import Node

__all__ = ["Outcome", "Report", "RunStatus", "Status"]


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
        rows = []
        for o in self.outcomes:
            dur = f"{o.duration_s:.3f}" if o.duration_s is not None else ""
            err = html.escape(f"{type(o.error).__name__}: {o.error}") if o.error is not None else ""
            rows.append(
                f"<tr><td>{html.escape(o.name)}</td><td>{o.status.value}</td><td>{dur}</td>"
                f"<td>{o.attempts}</td><td>{o.pool or ''}</td>"
                f"<td>{html.escape(str(o.worker or ''))}</td>"
                f"<td>{err}</td></tr>"
            )
        head = (
            "<tr><th>node</th><th>status</th><th>seconds</th><th>attempts</th>"
            "<th>pool</th><th>worker</th><th>error</th></tr>"
        )
        return (
            f"<p><b>actionpool run {self.status.value}</b> in {self.duration_s:.3f} s</p>"
            f"<table>{head}{''.join(rows)}</table>"
        )

    def to_chrome_trace(self, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Export per-action spans in the Chrome trace event format.

        Open the file in https://ui.perfetto.dev or chrome://tracing. One complete
        (``"ph": "X"``) event per node that ran, on a track per pool and worker;
        times in microseconds since the run started.

        Args:
            path: where to write the JSON; ``None`` writes nothing.

        Returns:
            The trace as a dict (``{"traceEvents": [...]}``).
        """
        events: list[dict[str, Any]] = []
        for o in self.outcomes:
            if o.started_at is None or o.finished_at is None:
                continue
            events.append(
                {
                    "name": o.name,
                    "cat": o.pool or "",
                    "ph": "X",
                    "ts": (o.started_at - self.started_at) * 1e6,
                    "dur": max(0.0, o.finished_at - o.started_at) * 1e6,
                    "pid": o.pool or "none",
                    "tid": str(o.worker),
                    "args": {"status": o.status.value, "attempts": o.attempts},
                }
            )
        trace = {"traceEvents": events, "displayTimeUnit": "ms"}
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(trace, f)
        return trace
