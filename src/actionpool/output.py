"""Worker output in the parent: ``print``, ``sys.stderr`` and ``logging`` records of
actions that run in worker processes, written by the parent, tagged with the node.

Why: a worker's own stdout is the parent's file descriptor, which Jupyter captures
only as a whole (untagged, and not at all where that capture is off), which a script
that redirects ``sys.stdout`` never sees, and which a Dask worker keeps to itself; and
a worker that starts as a fresh interpreter has none of the parent's logging handlers
(loky #372, joblib #1017).

Worker side (:class:`Capture`, in :mod:`actionpool._worker`): while an attempt runs,
``sys.stdout`` and ``sys.stderr`` are :class:`_Stream` objects that send each line as
an event of kind ``"stdout"`` / ``"stderr"`` on the worker's link, and the root logger
has only a :class:`_Forwarder`, which sends each record (its message formatted, its
traceback as text) as a ``"log"`` event, at the parent's root level or above. Events
go out in order on the one link, before the attempt's result; the worker never waits
for the parent to read them.

Parent side (:func:`write_here`): the pool's reader hands those events here, on the
runner's loop thread, in the order they came: text goes to the parent's *current*
``sys.stdout`` / ``sys.stderr`` (the notebook cell that runs, a redirected stream),
each line prefixed ``[node] ``; a record goes to the handlers of its logger in the
parent, its message prefixed the same way and its node in ``record.actionpool_node``.
The output of ``submit`` and ``map`` calls, which are not nodes, is written as it is,
as an ``Executor``'s workers' would be (``Task.tagged``).
On the Dask backend, the worker-local pool passes them to the attempt's events (the
Dask worker's ``log_event``), and the client's pool hands them here.

Threads: a worker's :class:`_Stream` may be written from any thread the action
started: its buffer takes its own lock, and the link's send takes the worker's send
lock (never the other way round). :func:`write_here` runs on the thread that read the
worker's socket: the runner's loop thread, or a thread that waits for a result and
reads it itself (:meth:`~actionpool.pools.readers.WorkerReader.read_result`), one
socket at a time; ``_lines_lock`` keeps the unfinished-line table whole between them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["OUTPUT_KINDS", "Capture", "write_here"]

OUTPUT_KINDS = frozenset({"stdout", "stderr", "log"})
"""Event kinds that carry a worker's output: never delivered to ``on_event``."""

_CHUNK = 1 << 16
"""Characters a stream buffers without a newline before it sends them anyway."""


class _Stream(io.TextIOBase):
    """A worker's ``sys.stdout`` or ``sys.stderr`` while an attempt runs: complete lines
    (and any run of :data:`_CHUNK` characters) go to ``send(kind, text)``."""

    def __init__(self, kind: str, send: Callable[[str, str], None], real: TextIO) -> None:
        super().__init__()
        self.kind = kind
        self._send = send
        self._real = real
        self._parts: list[str] = []
        self._size = 0
        self._lock = threading.Lock()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        # code that writes to the descriptor itself (faulthandler, a subprocess)
        # reaches the real one, untagged, rather than failing
        return self._real.fileno()

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self._lock:
            self._parts.append(text)
            self._size += len(text)
            if "\n" not in text and self._size < _CHUNK:
                return len(text)
            out = "".join(self._parts)
            cut = out.rfind("\n") + 1 if self._size < _CHUNK else len(out)
            self._parts = [out[cut:]] if cut < len(out) else []
            self._size = len(out) - cut
        self._send(self.kind, out[:cut])
        return len(text)

    def flush(self) -> None:
        with self._lock:
            out = "".join(self._parts)
            self._parts, self._size = [], 0
        if out:
            self._send(self.kind, out)


class _Forwarder(logging.Handler):
    """The root logger's one handler in a worker while an attempt runs: each record
    goes to ``send("log", fields)``, in the form ``logging.makeLogRecord`` takes."""

    def __init__(self, send: Callable[[str, Any], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # as logging.handlers.QueueHandler.prepare: the message merged with its
            # arguments and the traceback made text, so that the record pickles
            fields = dict(record.__dict__)
            fields["msg"] = record.getMessage()
            fields["args"] = None
            if record.exc_info:
                fields["exc_text"] = logging.Formatter().formatException(record.exc_info)
            fields["exc_info"] = None
            fields.pop("message", None)
            self._send("log", fields)
        except Exception:  # noqa: BLE001 - logging's own rule: a handler never raises
            self.handleError(record)


class Capture:
    """While it is entered (in a worker, around one attempt), the action's output goes
    to ``sink(kind, time, data)`` as events (see the module docstring).

    Args:
        sink: the attempt's event sink (``_worker._serve``'s).
        level: the parent's root logging level: records below it are not sent.
    """

    def __init__(self, sink: Callable[[str, float, Any], None], level: int) -> None:
        import time

        def send(kind: str, data: Any) -> None:
            sink(kind, time.time(), data)

        self._send = send
        self._level = level
        self._saved: tuple[Any, ...] = ()

    def __enter__(self) -> Capture:
        root = logging.getLogger()
        out = _Stream("stdout", self._send, sys.__stdout__ or sys.stdout)
        err = _Stream("stderr", self._send, sys.__stderr__ or sys.stderr)
        self._saved = (sys.stdout, sys.stderr, root.handlers[:], root.level)
        self._streams = (out, err)
        sys.stdout, sys.stderr = out, err
        # only ours: handlers a forked worker inherited from the parent would write
        # the same record again, untagged, to the parent's descriptors
        root.handlers = [_Forwarder(self._send)]
        if root.level != self._level:  # setLevel clears every logger's level cache
            root.setLevel(self._level)
        return self

    def flush(self) -> None:
        """Send what the action wrote and has not sent yet (an unfinished line)."""
        for stream in self._streams:
            with contextlib.suppress(Exception):
                stream.flush()

    def __exit__(self, *exc: object) -> None:
        stdout, stderr, handlers, level = self._saved
        self.flush()  # before the result goes out: output comes first
        sys.stdout, sys.stderr = stdout, stderr
        root = logging.getLogger()
        root.handlers = handlers
        if root.level != level:
            root.setLevel(level)


# ---- the parent's side ----------------------------------------------------------------

_open_lines: dict[tuple[str, str], bool] = {}  # (node, stream): a line is unfinished
_lines_lock = threading.Lock()


def write_here(node: str, kind: str, data: Any) -> None:
    """Write a worker's output (an event of one of :data:`OUTPUT_KINDS`) here: text to
    this process's current ``sys.stdout`` / ``sys.stderr``, each line prefixed with
    ``[node] ``; a log record (``data``: its fields) to its logger's handlers, when
    that logger is enabled for the record's level, its message prefixed likewise.
    ``node`` empty (a ``submit`` or ``map`` call, which has no node): as it is, as an
    ``Executor``'s workers would print it. Runs on one thread (the pool
    reader's, see the module docstring); a broken stream or handler is not the
    run's problem."""
    tag = f"[{node}] " if node else ""
    if kind == "log":
        record = logging.makeLogRecord(data)
        record.msg = f"{tag}{record.msg}"
        record.actionpool_node = node or None
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
        return
    stream = sys.stdout if kind == "stdout" else sys.stderr
    if stream is None:  # pythonw, or a closed stream: nowhere to write
        return
    text: str = data
    key = (node, kind)
    lines = text.splitlines(keepends=True)
    with _lines_lock:
        first = 1 if _open_lines.pop(key, False) else 0
        tagged = lines[:first] + [tag + line for line in lines[first:]]
        if lines and not lines[-1].endswith(("\n", "\r")):
            _open_lines[key] = True  # this node's next text goes on the same line
        with contextlib.suppress(Exception):
            stream.write("".join(tagged))
            stream.flush()
