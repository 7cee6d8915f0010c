"""The link between the CPU pool and one worker process: its socket's frames, and the
start page.

Both ends import this one module: the worker (:func:`actionpool._worker.process_main`)
and the pool (:mod:`actionpool.pools.process`). It sits below both (it imports only the
standard library), so that :mod:`actionpool._worker` can import it without importing
the pools.

Data flow on one worker's socket (a ``multiprocessing`` :class:`Connection`: each frame
is a length-prefixed pickle, or the empty :data:`STOP` frame)::

    pool (parent)                                     worker main thread
    -------------                                     ------------------
                       ◄─────────────────────────     (READY, pid)
    (attempt id, Task) ─────────────────────────►     run it
                                                      START slot ◄─ (id, time) in the page
                       ◄─────────────────────────     (STARTED, id, time)  if task.announce
                       ◄─────────────────────────     (EVENT, id, kind, time, data)  0..n
                       ◄─────────────────────────     (RESULT, id, Result)
    (FORGET, run prefix) ───────────────────────►     drop the run's mappings
    STOP ───────────────────────────────────────►     return (the process exits)

An attempt's frame has no kind: its first item is the attempt id, an int, which no
kind is. The pool reads a worker's socket on its loop, or in the thread that waits for
that attempt's result; the worker writes from its main thread and from any thread an
action started (``ctx.emit``), under its own send lock. Nothing here takes a lock.

The start page is shared memory with one :data:`START` slot per worker. A worker writes
the attempt it starts there (:func:`mark_started`), the time first and the id last; the
pool reads it (:func:`read_started`) only when it must know whether an attempt started
(its worker died or is being killed), so an attempt nobody watches costs no "started"
frame and no wake-up of the pool.
"""

from __future__ import annotations

import contextlib
import pickle
import struct
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

__all__ = [
    "EVENT",
    "FORGET",
    "READY",
    "RESULT",
    "START",
    "STARTED",
    "STOP",
    "decode",
    "encode",
    "mark_started",
    "read_started",
    "recv",
    "send",
    "send_stop",
]

READY = "ready"
"""Worker to pool, once, when it can take a task: ``(READY, pid)``."""
STARTED = "started"
"""Worker to pool, as it calls the action: ``(STARTED, attempt id, time.time())``."""
EVENT = "event"
"""Worker to pool, for each ``ctx.emit`` / ``ctx.progress``:
``(EVENT, attempt id, kind, time.time(), pickled data)``."""
RESULT = "result"
"""Worker to pool, last for an attempt: ``(RESULT, attempt id, Result)``."""
FORGET = "forget"
"""Pool to worker: a run is over, drop its shared-memory mappings: ``(FORGET, prefix)``."""

STOP = b""
"""Pool to worker: the pool is closing, return. No pickle is empty, so no message is
mistaken for it."""

START = struct.Struct("=qd")
"""A worker's slot in its pool's start page: (attempt id, ``time.time()`` it started)."""
_START_ID = struct.Struct("=q")  # at the slot's offset
_START_AT = struct.Struct("=d")  # right after it
_START_AT_OFFSET = _START_ID.size


def encode(msg: tuple[Any, ...]) -> bytes:
    """One frame's bytes for ``msg`` (to send the same frame to several workers)."""
    return pickle.dumps(msg, protocol=5)


def decode(data: bytes) -> tuple[Any, ...]:
    """The message in a frame that is not :data:`STOP`."""
    return pickle.loads(data)  # type: ignore[no-any-return]


def send(conn: Connection, msg: tuple[Any, ...]) -> None:
    """Write ``msg`` as one frame on ``conn``.

    Raises:
        OSError: the other end is gone.
    """
    conn.send_bytes(pickle.dumps(msg, protocol=5))


def recv(conn: Connection) -> tuple[Any, ...] | None:
    """The next message on ``conn``; None at its end (closed here, or by the other end)."""
    if conn.closed:
        return None
    try:
        return pickle.loads(conn.recv_bytes())  # type: ignore[no-any-return]
    except (EOFError, OSError):
        return None


def send_stop(conn: Connection) -> None:
    """Ask the worker at the other end of ``conn`` to return (nothing if it is gone)."""
    with contextlib.suppress(OSError):
        conn.send_bytes(STOP)


def mark_started(page: Any, offset: int, attempt_id: int, at: float) -> None:
    """In the worker: record in its start-page slot (at ``offset``) that it starts
    ``attempt_id`` at ``at``. The time goes first, then the id: a reader that sees the
    id sees its time."""
    _START_AT.pack_into(page, offset + _START_AT_OFFSET, at)
    _START_ID.pack_into(page, offset, attempt_id)


def read_started(page: Any, offset: int) -> tuple[int, float]:
    """In the pool: the (attempt id, start time) last recorded in the slot at ``offset``
    (id 0: none yet)."""
    (attempt_id,) = _START_ID.unpack_from(page, offset)  # the id, then
    (at,) = _START_AT.unpack_from(page, offset + _START_ID.size)  # its time (written first)
    return attempt_id, at
