"""Durable runs: a run recorded in SQLite, and resumed from it.

``runner.run(plan, journal="run.db")`` records the run in a SQLite database (stdlib
:mod:`sqlite3`, WAL mode)::

    header  the format, the run id, a fingerprint of the plan (per node: its action,
            its dependencies, a digest of its arguments) and of the initial state
    starts  one row per attempt, committed before the attempt is sent to its pool
    ends    one row per ended node: its outcome, its pickled value with the value's
            SHA-256, its pickled state updates; committed before any dependent starts

Running the same plan with the same journal resumes the run (:class:`Resume`):

* a node whose last end record is ``SUCCEEDED`` is not run again: its value and state
  updates are loaded from the journal (after its SHA-256 is checked);
* a node that started and has no end since, or whose attempt was stopped from outside
  (it ended ``CRASHED``, ``TIMED_OUT`` or ``CANCELLED`` while running), may have done
  its side effect: it runs again when its action is idempotent; otherwise its action's
  ``reconcile(ctx)`` decides (``"done"``: it ends ``SUCCEEDED`` with the value None;
  ``"retry"``: it runs again) and, without one, it ends ``IN_DOUBT`` and its
  dependents are skipped;
* every other node runs as in a new run (one that raised runs again, as a failed job
  does when it is resubmitted).

A journal of another plan (or another initial state) is refused with a
:class:`JournalError` that says what differs; a file that is not a journal, or a
damaged one, is refused too and never written to. The file is created owner-only
(mode 0600). Journals hold pickles: load one only from a source you trust.

Durability: commits use ``synchronous=NORMAL`` in WAL mode, so a record survives the
death of the process that wrote it (SIGKILL, OOM kill, a crash) once its commit
returns; a power loss may lose the last commits (SQLite, "Write-Ahead Logging").

Threads: a :class:`Journal` is opened, read and checked by the caller of
:meth:`Runner.run <actionpool.Runner.run>` before the run starts, then written only by
the scheduler's loop thread (:meth:`Journal.started`, :meth:`Journal.ended`), and
closed on that thread when the run ends. Never two threads at once, hence
``check_same_thread=False``. An exclusive lock (``locking_mode=EXCLUSIVE``) keeps a
second run, in this process or another, from writing the same journal meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import JournalError
from .plan import Graph, Node, resolve
from .transfer import dumps

if TYPE_CHECKING:
    from .records import NodeRecord

__all__ = ["FORMAT", "Journal", "JournalError", "Resume", "fingerprint"]

FORMAT = "actionpool-journal/1"
"""The format written in a journal's header; a journal of another format is refused."""

# No index: they are read once, on resume; every write of a run would update one.
_SCHEMA = """
CREATE TABLE header (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE starts (
    id INTEGER PRIMARY KEY, session INTEGER NOT NULL, node TEXT NOT NULL,
    attempt INTEGER NOT NULL, at REAL NOT NULL);
CREATE TABLE ends (
    id INTEGER PRIMARY KEY, session INTEGER NOT NULL, node TEXT NOT NULL,
    status TEXT NOT NULL, attempts INTEGER NOT NULL, started_at REAL, finished_at REAL,
    pool TEXT, worker TEXT, value BLOB, sha256 TEXT, deltas BLOB, error TEXT,
    lost INTEGER NOT NULL DEFAULT 0);
"""

_CHECKPOINT_PAGES = 4096
"""Pages (4 KiB) the write-ahead log may hold before SQLite copies it into the file: a
checkpoint syncs the file to disk, and at SQLite's default of 1000 a large plan's
commits paid for one every few hundred nodes."""

# A stopped attempt (killed, abandoned or cut short) may have done its side effect.
_STOPPED = ("crashed", "timed_out", "cancelled", "in_doubt")


class _NodeRef:
    """Stands for a node among another node's arguments, in a fingerprint."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return (_NodeRef, (self.name,))


def _digest(obj: Any) -> str:
    """A SHA-256 of ``obj``'s pickle (plain pickle first: it is deterministic for the
    builtins, arrays and dataclasses that arguments are made of; cloudpickle for the
    functions and lambdas it cannot pickle by reference; the type name when nothing
    pickles it)."""
    try:
        data = pickle.dumps(obj, protocol=5)
    except Exception:  # noqa: BLE001 - try the next way
        try:
            data = dumps(obj)
        except Exception:  # noqa: BLE001
            data = type(obj).__qualname__.encode()
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(graph: Graph, state: Any) -> dict[str, Any]:
    """What identifies a plan and its initial state in a journal's header.

    Returns:
        ``{"nodes": {name: {"action", "after", "args"}}, "state": digest}``, where
        ``after`` lists the names of the node's dependencies and ``args`` is a digest
        of its arguments with nodes replaced by their names.
    """
    nodes: dict[str, Any] = {}
    for node in graph.nodes:

        def ref(n: Node) -> _NodeRef:
            return _NodeRef(n.name)

        args = (resolve(node.args, ref), resolve(node.kwargs, ref))
        nodes[node.name] = {
            "action": node.action.name if node.join is None else f"<{node.join[0]}>",
            "after": [graph.nodes[d].name for d in graph.deps[node.index]],
            "args": _digest(args),
        }
    return {"nodes": nodes, "state": _digest(state)}


def _differences(was: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words (at most a few lines)."""
    out: list[str] = []
    old, new = was["nodes"], now["nodes"]
    gone = [n for n in old if n not in new]
    added = [n for n in new if n not in old]
    if gone:
        out.append(f"nodes no longer in the plan: {', '.join(map(repr, gone[:5]))}")
    if added:
        out.append(f"nodes not in the journal: {', '.join(map(repr, added[:5]))}")
    for name in new:
        if name not in old:
            continue
        a, b = old[name], new[name]
        if a["action"] != b["action"]:
            out.append(f"node {name!r} runs action {b['action']!r}, was {a['action']!r}")
        elif a["after"] != b["after"]:
            out.append(f"node {name!r} depends on {b['after']}, was {a['after']}")
        elif a["args"] != b["args"]:
            out.append(f"node {name!r} has other arguments")
        if len(out) >= 6:
            break
    if was["state"] != now["state"]:
        out.append("the initial state differs")
    return out


@dataclass
class Resume:
    """What a journal says about each node of the plan being resumed.

    Attributes:
        run_id: the id the run was first started with (kept, so that
            ``ctx.run_id`` and ``ctx.idempotency_key`` stay the same).
        session: how many times the run was started before this one.
        done: ``{node name: end record}`` of the nodes that succeeded; each record is
            a dict with ``value`` (unpickled), ``deltas``, ``attempts``,
            ``started_at``, ``finished_at``, ``pool``, ``worker``.
        in_doubt: ``{node name: attempt}``: nodes whose last attempt started and may
            have done its side effect, but never reported an end it gave itself.
        lost: ``{node name: error text}``: nodes cancelled because a race or quorum
            they were inputs of was decided without them (nothing waits for them).
    """

    run_id: str
    session: int
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    in_doubt: dict[str, int] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)


class Journal:
    """One journal file, open for one run.

    Args:
        path: the SQLite file; created (mode 0600) when it does not exist.
        graph: the run's checked plan.
        state: the run's initial state.
        run_id: the id for a new run (a resumed one keeps its first).

    Raises:
        JournalError: the file is not a journal, is damaged, belongs to another plan
            or initial state, or is in use by another run.
    """

    def __init__(self, path: str | os.PathLike[str], graph: Graph, state: Any, run_id: str):
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        where = str(self.path)
        fp = fingerprint(graph, state)
        created = False
        if not self.path.exists():
            # Created here, owner-only: sqlite would create it with the umask's mode.
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another run made it meanwhile: opened and checked below
            except OSError as exc:
                raise JournalError(f"journal {where}: cannot be created ({exc})") from exc
            else:
                os.close(fd)
                created = True
        try:
            conn = sqlite3.connect(
                self.path, timeout=0.5, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise JournalError(f"journal {where}: cannot be opened ({exc})") from exc
        try:
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            # The exclusive lock is taken by the first write and held until close.
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("COMMIT")
            conn.execute("PRAGMA synchronous=NORMAL")  # this connection's, new or resumed
            conn.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_PAGES}")
        except sqlite3.OperationalError as exc:
            conn.close()
            if "locked" in str(exc):
                raise JournalError(
                    f"journal {where} is in use by another run (in this process or"
                    " another): one run at a time may write a journal"
                ) from exc
            raise JournalError(f"journal {where}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise JournalError(
                f"journal {where} is damaged or not a journal ({exc}); it was left as it is"
            ) from exc
        self._conn = conn
        try:
            is_new = created or not self._tables()
            if is_new and not created and self.path.stat().st_size > 0:
                raise JournalError(
                    f"journal {where} is a SQLite database but not an actionpool journal"
                    " (no header table); it was left as it is"
                )
            if is_new:
                self._create(fp, run_id)
                self.resume = Resume(run_id, 0)
            else:
                self.resume = self._read(fp)
        except BaseException:
            self.close()
            raise
        self._session = self.resume.session

    # ---- opening -------------------------------------------------------------------------

    def _tables(self) -> set[str]:
        assert self._conn is not None
        try:
            rows = self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            return {r[0] for r in rows}
        except sqlite3.DatabaseError as exc:
            raise JournalError(
                f"journal {self.path} is damaged or not a journal ({exc}); it was left as it is"
            ) from exc

    def _create(self, fp: dict[str, Any], run_id: str) -> None:
        assert self._conn is not None
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")  # kept in the file
            self._conn.execute("BEGIN")
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    self._conn.execute(stmt)
            header = {
                "format": FORMAT,
                "run_id": run_id,
                "created_at": repr(time.time()),
                "sessions": "1",
                "fingerprint": json.dumps(fp, sort_keys=True),
            }
            self._conn.executemany("INSERT INTO header VALUES (?, ?)", header.items())
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise JournalError(f"journal {self.path}: cannot be written ({exc})") from exc

    def _read(self, fp: dict[str, Any]) -> Resume:
        conn = self._conn
        assert conn is not None
        name = str(self.path)
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise JournalError(
                    f"journal {name} is damaged (SQLite quick_check: {check}); it was left as it is"
                )
            if not {"header", "starts", "ends"} <= self._tables():
                raise JournalError(f"journal {name} is not an actionpool journal (tables missing)")
            header = dict(conn.execute("SELECT key, value FROM header").fetchall())
            if header.get("format") != FORMAT:
                raise JournalError(
                    f"journal {name} has format {header.get('format')!r}; this actionpool"
                    f" reads {FORMAT!r}"
                )
            was = json.loads(header["fingerprint"])
            diff = _differences(was, fp)
            if diff:
                raise JournalError(
                    f"journal {name} was written for another plan: " + "; ".join(diff)
                )
            session = int(header["sessions"])
            resume = Resume(header["run_id"], session)
            last_end = {
                row[0]: row
                for row in conn.execute(
                    "SELECT node, session, status, attempts, started_at, finished_at, pool,"
                    " worker, value, sha256, deltas, lost, error FROM ends ORDER BY id"
                )
            }
            # each node's last start, as (session, attempt): the order of its attempts
            last_start = {
                row[0]: (row[1], row[2])
                for row in conn.execute(
                    "SELECT node, session, attempt FROM starts WHERE id IN"
                    " (SELECT MAX(id) FROM starts GROUP BY node)"
                )
            }
        except (sqlite3.DatabaseError, KeyError, ValueError) as exc:
            raise JournalError(
                f"journal {name} is damaged or not a journal ({type(exc).__name__}: {exc});"
                " it was left as it is"
            ) from exc

        def after_last_start(node: str, end: tuple[Any, ...]) -> bool:
            # An end record carries the session and the attempts of that session.
            return (end[1], end[3]) >= last_start.get(node, (-1, 0))

        for node, end in last_end.items():
            if end[11] and after_last_start(node, end):
                resume.lost[node] = end[12] or "cancelled: its race or quorum was decided"
        for node, (_, attempt) in last_start.items():
            end = last_end.get(node)
            if node in resume.lost:
                continue
            # started, and no end since, or an end that says it was stopped from outside
            if end is None or not after_last_start(node, end) or end[2] in _STOPPED:
                resume.in_doubt[node] = int(attempt)
        for node, end in last_end.items():
            if end[2] != "succeeded" or node in resume.in_doubt:
                continue
            _, _, _, attempts, started_at, finished_at, pool, worker, value, sha, deltas = end[:11]
            if value is None or hashlib.sha256(value).hexdigest() != sha:
                raise JournalError(
                    f"journal {name}: the value of node {node!r} does not match its SHA-256"
                    " (the journal is damaged); it was left as it is"
                )
            try:
                loaded = pickle.loads(value)
                loaded_deltas = pickle.loads(deltas) if deltas is not None else None
            except Exception as exc:
                raise JournalError(
                    f"journal {name}: the value of node {node!r} cannot be unpickled here"
                    f" ({type(exc).__name__}: {exc})"
                ) from exc
            resume.done[node] = {
                "value": loaded,
                "deltas": loaded_deltas,
                "attempts": attempts,
                "started_at": started_at,
                "finished_at": finished_at,
                "pool": pool,
                "worker": _worker(worker),
            }
        # Counted only now, every check passed: a refused journal is never written.
        self._write(
            "UPDATE header SET value = ? WHERE key = 'sessions'", (str(resume.session + 1),)
        )
        return resume

    # ---- writing (the scheduler's loop thread) -------------------------------------------

    def started(self, rec: NodeRecord) -> None:
        """Record that attempt ``rec.attempts`` of ``rec`` is about to be dispatched.

        Raises:
            JournalError: the record could not be committed.
        """
        self._write(
            "INSERT INTO starts (session, node, attempt, at) VALUES (?, ?, ?, ?)",
            (self._session, rec.name, rec.attempts, time.time()),
        )

    def ended(self, rec: NodeRecord) -> None:
        """Record how ``rec`` ended (its value and state updates when it succeeded).

        Raises:
            JournalError: the record could not be committed, or the value cannot be
                pickled.
        """
        status = rec.state.value
        value = sha = deltas = None
        if status == "succeeded":
            try:
                value = dumps(rec.value)
                deltas = dumps(rec.deltas) if rec.deltas else None
            except Exception as exc:
                raise JournalError(
                    f"journal {self.path}: the value of node {rec.name!r} cannot be pickled"
                    f" ({type(exc).__name__}: {exc})"
                ) from exc
            sha = hashlib.sha256(value).hexdigest()
        error = None if rec.error is None else f"{type(rec.error).__name__}: {rec.error}"
        self._write(
            "INSERT INTO ends (session, node, status, attempts, started_at, finished_at,"
            " pool, worker, value, sha256, deltas, error, lost)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                self._session,
                rec.name,
                status,
                rec.attempts,
                rec.started_at,
                rec.finished_at,
                rec.pool,
                None if rec.worker is None else json.dumps(rec.worker),
                value,
                sha,
                deltas,
                error,
                int(rec.lost),
            ),
        )

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        conn = self._conn
        if conn is None:
            raise JournalError(f"journal {self.path} is closed")
        try:
            conn.execute(sql, params)  # autocommit: committed when this returns
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: cannot be written ({exc})") from exc

    def close(self) -> None:
        """Close the file (and release its lock); idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


def _worker(text: str | None) -> int | str | None:
    if text is None:
        return None
    value = json.loads(text)
    return value if isinstance(value, (int, str)) else str(value)
