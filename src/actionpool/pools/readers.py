"""The CPU pool's reader: its workers' sockets, read on an asyncio loop or by the thread
that waits for a direct call's reply.

Data flow (the reading half of :mod:`.process`'s picture; frames: :mod:`actionpool._link`)::

    worker sockets ──► epoll set ──its fd readable──► loop: on_sockets ─► on_readable(w)
          │            (a waiting thread takes its socket                     │ recv
          │             out while it reads: modify(fd, 0))                    ▼
          └──► read_result(att), in the thread waiting for att ──recv──► apply(w, msg):
                 (polls w's socket and its wake eventfd)                the pool's state,
                                                                        under its _lock
                                                                              │
                                                                              ▼
                                                          notify(att, w, msg): att's callbacks
                                                          or its future, outside the _lock
    zygote notices, first worker's pidfd ──► loop: watch(fd, ...) ──► the pool's handlers
                                                 ──► exited(w): take w's socket back, read
                                                     what is left in it, then on_death(w)

Where there is no epoll (not Linux), each worker socket is a reader of the loop itself,
and :meth:`WorkerReader.read_result` leaves every reply to the loop.

Threads and locks:

* The loop (the runner's scheduler loop given to ``ProcessPool.attach``, else a thread
  of the reader's own, started at the first worker) alone registers and unregisters
  fds: ``_watched``, ``_by_fd``, the epoll set's members, and the loop's readers. Others
  get there through :meth:`WorkerReader.in_loop`. ``loop`` and ``_own_loop`` are set
  under the pool's ``_lock`` (``ProcessPool.attach``, :meth:`WorkerReader.ensure_loop`).
* A worker's socket is read only by whoever holds its ``reading`` lock: the loop's
  reader, or one thread in :meth:`WorkerReader.read_result`, which the loop asks to let
  go (:meth:`WorkerReader.exited`) by writing to the worker's ``wake`` eventfd.
* :meth:`WorkerReader.read_result` runs in any thread but the loop's. It looks up
  ``_by_fd`` without a lock (one dict lookup, atomic), and takes its socket out of the
  epoll set and puts it back with ``epoll.modify``: epoll lets any thread change the set
  while another thread polls it, so the loop is not asked. An event the loop got before
  the change may still come: :meth:`WorkerReader.on_readable` then finds ``reading``
  taken, or the socket polled empty, and reads nothing.
* ``_spinner`` lets one waiting thread at most spin; it is only tried, never waited for,
  and nothing is taken under it. ``recent_s`` is written by the pool's ``apply`` under
  ``_lock`` and read here without it (a stale value costs one spin decision at most).
* Lock order: a worker's ``reading``, then the pool's ``_lock`` (``apply`` and
  ``on_death`` take it with ``reading`` held). No thread waits for a ``reading`` while it
  holds ``_lock``: a thread in ``read_result`` holds nothing the loop needs when the loop
  asks it to let go. An attempt's callbacks (:meth:`WorkerReader.notify`) run outside
  ``_lock``: they may call back into the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import pickle
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from .. import _link
from .._threads import join_thread
from ..output import OUTPUT_KINDS

if TYPE_CHECKING:
    from .process import ProcessAttempt, _Worker

__all__ = ["WorkerReader"]

# A thread waiting for a direct call's result reads it from the worker's socket
# itself (WorkerReader.read_result): the worker sockets are then watched through an
# epoll set of the reader's own, from which any thread can take one out (Linux).
_READ_HERE = hasattr(select, "epoll") and hasattr(os, "eventfd")
# Spin, then block: read_result polls the socket without sleeping for up to _SPIN_S
# before it blocks, when the pool's recent actions ran for under _SPIN_IF_UNDER_S
# (a moving average) and a core is spare for it. A thread that blocks is woken
# noticeably later than one that polls, and a short action's reply comes back within
# about the time such a wake-up takes, so a short spin catches it; the parent's CPU
# per call does not grow, as the wake-up costs CPU too. The same trade as glibc's
# adaptive mutexes and OpenMP's KMP_BLOCKTIME.
_SPIN_S = 200e-6
_SPIN_IF_UNDER_S = 100e-6

# What the pool's apply found in a message for the attempt it concerns, for notify.
Found = tuple["ProcessAttempt", "_Worker", tuple[Any, ...]]


class WorkerReader:
    """Reads one :class:`~.process.ProcessPool`'s worker sockets, and watches the other
    fds the pool gives it, on the pool's loop (see the module docstring).

    The pool keeps the workers and their attempts; it hands the reader ``apply(w, msg)``
    (record a message in the pool's state, under its lock; what to tell the attempt)
    and ``on_death(w, returncode)`` (a worker's end, once its socket is drained), and
    shares its ``workers`` dict, which the reader only reads.

    Attributes:
        loop: the loop that reads, once attached or started (see the module docstring).
        cores: the logical CPUs this process may use, which bounds when a waiting thread
            may spin (:meth:`spin_for`).
        recent_s: the recent actions' mean run time (seconds, a moving average of 1 in
            5, kept by the pool's ``apply``).
    """

    def __init__(
        self,
        workers: dict[Connection, _Worker],
        apply: Callable[[_Worker, tuple[Any, ...]], Found | None],
        on_death: Callable[[_Worker, int | None], None],
        cores: int,
        read_here: bool = _READ_HERE,
    ) -> None:
        """Make the epoll set (where there is one, and ``read_here``: False on the
        portable path, which reads every socket on the loop): call it after the pool's
        forks, so that a forked child does not share it."""
        self._workers = workers
        self._apply = apply
        self._on_death = on_death
        self.cores = cores
        self.recent_s = 0.0
        # where the workers' output events go (the pool's set_output); None: to the
        # attempt's on_event, as other events (a Dask worker's pool sends them on)
        self.output: Callable[[str, str, Any], None] | None = None
        self._spinner = threading.Lock()  # who spins now (one thread at most)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._own_loop: threading.Thread | None = None
        self._watched: set[int] = set()  # fds with a reader on the loop
        # The worker sockets, from which a waiting thread may take one (read_result):
        # an epoll set that the loop watches.
        self._sockets: select.epoll | None = select.epoll() if read_here else None
        self._by_fd: dict[int, _Worker] = {}

    # ---- the loop ------------------------------------------------------------------------

    def ensure_loop(self) -> None:
        """Start a loop thread of the reader's own, if no loop was attached (the pool's
        lock held)."""
        if self.loop is None:  # a pool used on its own
            self.loop = asyncio.new_event_loop()
            self._own_loop = threading.Thread(
                target=self.loop.run_forever, name="actionpool-cpu-pool", daemon=True
            )
            self._own_loop.start()

    def close(self) -> None:
        """Stop the reader's own loop thread, if it has one, and close the epoll set
        (once nothing is left to read)."""
        loop = self.loop
        if self._own_loop is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
            join_thread(self._own_loop)
            loop.close()
        if self._sockets is not None:
            self._sockets.close()

    def on_loop(self) -> bool:
        """Whether this thread runs the loop."""
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def in_loop(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the loop: now if this is its thread, else soon; its future."""
        done: Future[Any] = Future()
        if self.on_loop():
            done.set_result(fn())
            return done
        assert self.loop is not None

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return done

    def watches(self, fd: int) -> bool:
        """Whether the loop has a reader of ``fd``."""
        return fd in self._watched

    def watch(self, fd: int, callback: Callable[..., Any], *args: Any) -> None:
        """On the loop: call ``callback(*args)`` whenever ``fd`` is readable."""
        assert self.loop is not None
        if fd not in self._watched and fd >= 0:
            self._watched.add(fd)
            self.loop.add_reader(fd, callback, *args)

    def unwatch(self, fd: int) -> None:
        """On the loop: stop watching ``fd`` (before it is closed)."""
        if fd in self._watched:
            self._watched.discard(fd)
            assert self.loop is not None
            self.loop.remove_reader(fd)

    def unwatch_set(self) -> None:
        """On the loop, once no socket is left in the epoll set: stop watching it."""
        if self._sockets is not None and not self._sockets.closed:
            self.unwatch(self._sockets.fileno())

    # ---- worker sockets, read on the loop -------------------------------------------------

    def watch_socket(self, w: _Worker) -> None:
        """On the loop: read ``w``'s socket from now on."""
        fd = w.conn.fileno()
        if self._sockets is None:
            self.watch(fd, self.on_readable, w)
            return
        self.watch(self._sockets.fileno(), self._on_sockets)
        self._by_fd[fd] = w
        self._sockets.register(fd, select.EPOLLIN)

    def unwatch_socket(self, w: _Worker) -> None:
        """On the loop: stop reading ``w``'s socket (before it is closed)."""
        if w.conn.closed:
            return
        fd = w.conn.fileno()
        if self._sockets is None:
            self.unwatch(fd)
        elif self._by_fd.get(fd) is w:
            del self._by_fd[fd]
            with contextlib.suppress(OSError):
                self._sockets.unregister(fd)

    def _on_sockets(self) -> None:
        """On the loop: some worker sockets have data (the epoll set is readable)."""
        assert self._sockets is not None
        for fd, _ in self._sockets.poll(0):
            w = self._by_fd.get(fd)
            if w is not None:
                self.on_readable(w)

    def on_readable(self, w: _Worker) -> None:
        """A worker's socket has data: one message, or its end (the exit notice follows).
        Nothing, if a thread waiting for its attempt's result reads it."""
        if not w.reading.acquire(blocking=False):
            return  # read_result has it, and took it out of the epoll set
        try:
            # The epoll set said readable, but a thread in read_result may have taken
            # that message since (while this loop handled another socket's result):
            # a read now would block this loop until the worker's next message.
            if w.poller is not None and not w.conn.closed:
                fd = w.conn.fileno()
                if not any(f == fd for f, _ in w.poller.poll(0)):
                    return
            if self._read(w):
                return
            self.unwatch_socket(w)
            w.eof = True
        finally:
            w.reading.release()

    def exited(self, w: _Worker, returncode: int | None) -> None:
        """On the loop: worker ``w`` exited and was reaped. What it sent before it died
        is still in its socket, and its results count: read them, then hand its death
        to the pool (``on_death``, ``w.reading`` held)."""
        if not w.reading.acquire(blocking=False):
            # A thread reads it for its attempt's result (read_result): ask it to let
            # go, which it does at once (nothing it holds meanwhile waits for the loop).
            if w.wake >= 0:
                os.eventfd_write(w.wake, 1)
            w.reading.acquire()
        try:
            while not w.eof and w.conn.poll(0):
                w.eof = not self._read(w)
            self._on_death(w, returncode)
        finally:
            w.reading.release()

    def _read(self, w: _Worker) -> bool:
        """Handle one message from ``w``'s socket (``w.reading`` held); False at its end."""
        msg = _link.recv(w.conn)
        if msg is None:
            return False
        found = self._apply(w, msg)
        if found is not None:
            self.notify(*found)
        return True

    def notify(self, att: ProcessAttempt, w: _Worker, msg: tuple[Any, ...]) -> None:
        """Tell ``att`` what its worker ``w`` sent (the pool's ``apply`` found it), outside
        the pool's lock: its callbacks may call back into the pool."""
        kind = msg[0]
        if kind == _link.STARTED:
            att.started_at, att.worker = msg[2], w.pid
            att.started = True
            att.on_started(w.pid, msg[2])
        elif kind == _link.EVENT:
            if msg[2] in OUTPUT_KINDS and self.output is not None:
                node = att.task.node if att.task.tagged else ""
                self.output(node, msg[2], pickle.loads(msg[4]))
            else:
                att.on_event(msg[2], msg[3], pickle.loads(msg[4]))
        elif kind == _link.RESULT and att.on_result is not None:
            att.on_result(msg[2])  # its owner ends it (the future stays pending)
        elif kind == _link.RESULT and not att.future.done():
            # in a reader callback on the runner's loop, with nothing else under way
            att.direct = self._own_loop is None
            att.future.set_result(msg[2])

    # ---- a direct call's reply, read in the thread that waits for it -----------------------

    def read_result(self, att: ProcessAttempt, timeout: float | None) -> None:
        """Wait for ``att``'s result in this thread, reading its worker's socket here:
        a thread that would wait for a result anyway gets it with one wake-up instead
        of two (the loop's, then its own), and the loop is not woken at all.

        Returns once the result was handed to ``att.on_result`` (in this thread), or
        without it, leaving the rest to the loop's reader as usual, when: another
        thread reads that socket, ``timeout`` seconds passed (None: no limit), the
        worker's socket ended (it died: its exit is handled on the loop), or the loop
        needs the socket back (:meth:`exited`). Never raises for the attempt's sake.
        Only an attempt whose ``on_result`` is set (its future stays pending) can be
        read so.
        """
        w = att.holder
        if self._sockets is None or w is None or att.on_result is None:
            return
        if not w.reading.acquire(blocking=False):
            return  # the loop's reader (or another thread) has it
        found = None
        try:
            if w.attempt is not att or w.conn.closed or self._by_fd.get(w.conn.fileno()) is not w:
                return
            fd = w.conn.fileno()
            try:
                self._sockets.modify(fd, 0)  # the loop stops watching it
            except OSError:
                return
            try:
                found = self._read_until(w, att, timeout)
            finally:
                with contextlib.suppress(OSError):
                    self._sockets.modify(fd, select.EPOLLIN)
        finally:
            w.reading.release()
        if found is not None:  # its result: handed over with the socket given back
            self.notify(*found)

    def _read_until(self, w: _Worker, att: ProcessAttempt, timeout: float | None) -> Found | None:
        """:meth:`read_result`'s wait (``w.reading`` held): ``att``'s result, applied to
        the pool, for :meth:`notify`; None when it gave up."""
        end = None if timeout is None else time.monotonic() + timeout
        spin = self.spin_for(timeout)
        while True:
            events = None
            if spin > 0 and self._spinner.acquire(blocking=False):
                try:
                    events = _spin(w.poller, spin)
                finally:
                    self._spinner.release()
            spin = 0.0
            if not events:
                left = None if end is None else max(0.0, end - time.monotonic())
                events = w.poller.poll(None if left is None else math.ceil(left * 1000))
            if not events:
                return None  # timed out
            for fd, _ in events:
                if fd == w.wake:
                    with contextlib.suppress(OSError):
                        os.eventfd_read(w.wake)
                    return None  # the loop needs the socket
            msg = _link.recv(w.conn)
            if msg is None:
                return None  # its end: the loop sees it too, and its exit follows
            found = self._apply(w, msg)
            if found is None:
                continue
            if msg[0] == _link.RESULT:
                return found
            self.notify(*found)  # STARTED (not sent for such an attempt), or output

    def spin_for(self, timeout: float | None) -> float:
        """How long :meth:`read_result` may spin (seconds): :data:`_SPIN_S` while the
        recent actions are short and a core is left after the busy workers, else 0."""
        if self.recent_s >= _SPIN_IF_UNDER_S:
            return 0.0
        busy = sum(1 for w in list(self._workers.values()) if w.attempt is not None)
        if busy >= self.cores:
            return 0.0
        return _SPIN_S if timeout is None else min(_SPIN_S, timeout)


def _spin(poller: Any, seconds: float) -> list[tuple[int, int]]:
    """Poll ``poller`` without sleeping for up to ``seconds``; its events, or []."""
    end = time.perf_counter() + seconds
    while True:
        events: list[tuple[int, int]] = poller.poll(0)
        if events or time.perf_counter() >= end:
            return events
