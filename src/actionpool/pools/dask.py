"""The Dask pool: attempts run on a ``dask.distributed`` cluster, each inside a Dask
worker on that worker's own actionpool process pool.

Data flow::

    Scheduler ─submit(Task)─► DaskPool ─flush: client.map(_run_on_worker, keys unique)─►
        Dask worker thread ─► WorkerSide (a WorkerPlugin) ─► its ProcessPool ─► process
        │  (a batch's quiet attempts: one chunk, run_attempts, in one process)
        │  started (where nobody waits, read from the pool's start page once it has
        │      run STARTED_DELAY_S; else those of one loop turn), ctx.emit, ctx.progress:
        │      worker.log_event(topic) ─► client's subscribe_topic handler ─►
        │      on_started / on_event
        ├► "ended" event (log_event, ahead of the task's end): the small outcomes ─►
        │      the client's loop ─► attempt.future
        └► _Outcomes: ("result", Result) | ("not-started", crash) | ("crashed", crash)
           ─► the client's loop (what the event did not carry, fetched from the worker
           the starts named) ─► attempt.future

Dask has no per-task timeout and cannot stop a running task (dask/distributed issues
391 and 4694): a cancelled future's thread runs on. So the action never runs in the
Dask worker itself: :class:`WorkerSide` owns a worker-local :class:`ProcessPool` of as
many processes as the worker has threads, and the Dask task only waits for it. Soft
timeouts (``ActionTimeout`` raised inside the action), hard ones (the process is
killed after the grace), crash isolation (a segfault costs one process, never the Dask
worker) and idempotency are then the local pool's, exactly. Stopping an attempt
cancels its Dask future; the worker sees its task leave ``executing`` and
:meth:`WorkerSide.transition` kills the process that runs it.

Every attempt gets a key of its own (``pure=False`` semantics and more): Dask never
deduplicates two calls, nor an attempt and its retry.

Batches. Scheduling a Dask task costs milliseconds (client, scheduler and worker
bookkeeping, and their messages), far more than a short action. So submitted attempts
are held until the scheduler's dispatch pass ends (:meth:`DaskPool.flush`) and sent
together from the client's loop, in one graph update, several to a Dask task where
attempts are known to be short (:func:`batch_count`); the task's :class:`WorkerSide`
queues them all on its pool at once, and each still starts, times out, crashes and
reports alone. Those that nobody waits to see start (quiet: idempotent, no timeout, no
``on_event``) go to one process as one chunk (:func:`~actionpool._worker.run_attempts`):
one round trip between the process and the pool's reader thread, which contends for the
GIL with the Dask worker's threads, instead of one per attempt; a chunk whose process
dies, or that is stopped, runs its attempts again one by one, so that one that crashed
ends alone and the others (idempotent) run again. A batch's Dask key is its own; an
attempt's key names it in events and on its worker. Stopping one attempt of a batch is a
``client.run`` message to its worker (to every worker when it has not started: the batch
may not have arrived anywhere yet); the batch's Dask task is cancelled once none of its
attempts is left.

Values. A run's arena is a :class:`ClusterArena`: large buffers in calls and state
are scattered once, and large values of idempotent actions stay on their workers, the
Dask futures of both passed to the tasks that need them (``refs``), whose
:class:`WorkerSide` resolves them before handing the attempt to its pool.

Cleanup. :class:`SchedulerSide`, a scheduler plugin registered with the worker plugin,
removes the latter when the runner's client leaves without doing so.

A Dask worker that dies (a killed machine) takes its attempts with it: one that had
started ends ``CRASHED`` with :class:`~actionpool.WorkerCrashed` (the scheduler re-runs
it only for an action that consents, as locally); one that had not is reported
:class:`~actionpool.pools.NotStarted` and sent again. With the cluster this pool
starts, the scheduler's ``allowed-failures`` is 0, so Dask itself never re-runs a task
whose worker died. Dask does re-run a task whose worker was retired gracefully, and,
below ``allowed-failures``, one whose worker died: so the pool also listens for the
scheduler's ``remove-worker`` event of each worker its attempts started on, ends those
attempts CRASHED and cancels their tasks. A copy that Dask started elsewhere meanwhile
is killed as soon as the cancel reaches its worker, but it may have begun: on a
cluster of your own, set ``allowed-failures`` to 0 (docs/scaling-out.md).

Threads: the caller's (submit, cancel, close); the Dask client's event loop runs the
topic handlers (:meth:`DaskPool._on_topic`, :meth:`DaskPool._on_worker`) and waits
for each attempt's Dask future (:meth:`DaskPool._follow`), which ends the attempt.
``DaskPool._lock`` guards ``_live`` (key -> attempt), ``_pending``, ``_batches``,
``_to_stop`` and the flags; it is never held while calling out (into Dask or a
callback). :meth:`DaskPool._flush_now` runs on the client's loop, scheduled by
:meth:`DaskPool.flush` (the scheduler's thread), or when no flush followed a submit
within :data:`LATE_FLUSH_S`. An attempt's
future is set once, by whoever pops it from ``_live`` first. On the Dask worker, the
worker's loop runs :meth:`WorkerSide.transition`, :meth:`WorkerSide.stop`,
:meth:`WorkerSide._send_started` and :meth:`WorkerSide._poll_starts`, the worker's
threads run :meth:`WorkerSide.run`, and its pool's reader thread queues starts
(``_started``, a deque, with the flag protocols of ``_send_started`` and
``_poll_starts``; a quiet attempt's start is reported by whoever pops it from
``_quiet`` first; a batch's end events are left in ``_at_end`` by its task's thread
and sent by :meth:`WorkerSide.transition` on the loop); ``WorkerSide._keys`` guards
``_running``, ``_withdrawn`` and
``_chunked``, which a stop and a run race for, and is never held while calling out;
its other dicts are plain (single operations are atomic). :class:`ClusterArena` is
the runner's, shared by the scheduler's thread and io threads under its lock; a
call's arena takes the lock of its map's arena
(:meth:`~actionpool.shm.Arena.link`) only while holding its own, never the other way.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, wait
from functools import cache
from typing import TYPE_CHECKING, Any, cast

from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from .._worker import ATTEMPT_EVENT, Result, Task, run_attempts
from ..errors import WorkerCrashed
from ..output import OUTPUT_KINDS
from ..shm import Arena, _address, arena_for
from ..transfer import PROTOCOL, Packed, dumps, dumps_function, loads
from . import NotStarted, withdraw

if TYPE_CHECKING:
    import asyncio

    from distributed import Client

__all__ = [
    "BALANCE",
    "DASK_TASK_COST_S",
    "MAX_BATCH",
    "SPREAD",
    "STEADY",
    "TASK_S",
    "ClusterArena",
    "ClusterLink",
    "DaskAttempt",
    "DaskPool",
    "SchedulerSide",
    "WorkerSide",
    "batch_count",
    "connect",
]

DASK_TASK_COST_S = 0.002
"""Seconds of scheduling a Dask task costs beyond its attempts' own time (client,
scheduler and worker bookkeeping, and the messages between them), at least: attempts
shorter than that share a task even when their durations vary (docs/scaling-out.md,
"Overhead")."""

TASK_S = 0.2
"""Seconds of attempts that one Dask task carries, about, once its action's attempts
are measured to be steady: the batch duration that joblib's automatic batching aims at
(``joblib.parallel.MIN_IDEAL_BATCH_DURATION``, 0.2 s). Each Dask task idles its
worker between the end of one task and the start of the next, a cost that short
attempts would pay once each (docs/performance.md, "Batches of about 0.2 s")."""

BALANCE = 2
"""Dask tasks per cluster thread that a flush makes at least, once its action's
attempts are measured (beside the tasks already running): a batch is pinned to the
worker that takes it, so with at least two per thread a worker that draws the slower
batches leaves the others idle for one batch at most."""

STEADY = 0.5
"""The mean deviation of an action's attempt durations, as a share of their mean,
above which its attempts of :data:`DASK_TASK_COST_S` or more go one to a Dask task: a
batch of uneven attempts holds the short ones' outcomes behind a long one and pins
the long ones together. The first attempt to end sets the deviation to its duration
(nothing is known of the spread yet), so about four steady attempts must end before
an action's attempts share tasks."""

MAX_BATCH = 256
"""Attempts one Dask task carries at most."""

SPREAD = 4
"""Dask tasks per cluster thread that a flush makes at least, while no attempt has
ended yet (their durations unknown, a long one must not hold many short ones)."""

LATE_FLUSH_S = 0.005
"""Seconds after a submit that its attempt is sent even if no flush came."""

ENDED_EVENT_BYTES = 64 * 1024
"""Bytes of pickled outcomes, at most, that a Dask worker sends with its batch's
"ended" event, so that the client ends those attempts without fetching the Dask
task's value (:meth:`WorkerSide._ended_items`); the others, and a value that stays on
the cluster, are fetched. The scheduler keeps the last events of each topic
(``distributed.admin.low-level-log-length``, 1,000) until the runner closes
(:meth:`ClusterLink.close` clears its topic)."""

RELEASE_AFTER_S = 0.05
"""Seconds an ended Dask task's future is held, at most, waiting for the next send to
go first (:meth:`DaskPool._hold`)."""

STARTED_DELAY_S = 0.1
"""Seconds an idempotent attempt that nobody waits to see start (no timeout, no
``on_event``: a quiet one) runs before its Dask worker reports its start; one that ends
sooner brings its start with its end (the batch's "ended" event). The worker reads the
starts from its pool's start page, which the attempt's process writes without a
message, at most every ``STARTED_DELAY_S / 2``, and sends those that fell due as one
event, so a start is reported within 1.5 x ``STARTED_DELAY_S``: about when a progress
bar redraws (tqdm's ``mininterval`` is 0.1 s). A report per attempt had cost a short
attempt a second event through the scheduler, and a poll every few ms the worker's loop
CPU that the actions on that machine need. A started attempt whose Dask worker dies
before its start was reported counts as not started and is sent again, which only an
idempotent action allows; the others' starts go at once."""

_PLUGIN_PREFIX = "actionpool-"
_STOPPING = frozenset({"cancelled", "released", "forgotten"})
_BLAS_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def batch_count(
    n: int,
    threads: int,
    attempt_s: float | None,
    running: int = 0,
    deviation_s: float = 0.0,
) -> int:
    """How many Dask tasks carry ``n`` attempts of one action sent together (0 for none).

    Before any attempt of the action has ended (its durations unknown), at least
    :data:`SPREAD` tasks per cluster thread, so that a long attempt holds few others.
    Once they are measured, attempts that are steady (mean deviation at most
    :data:`STEADY` x their mean) or shorter than :data:`DASK_TASK_COST_S` share tasks,
    ``TASK_S / attempt_s`` to a task (at most :data:`MAX_BATCH`), still at least
    :data:`BALANCE` tasks per cluster thread; uneven attempts of
    :data:`DASK_TASK_COST_S` or more go one to a task. The tasks already on the cluster
    (``running``) count towards those minimums: else, in a steady run, each batch's
    results would free its slots at once and its successors would go out split
    across all threads, halving batch after batch.

    Args:
        n: attempts to send.
        threads: the cluster's worker threads.
        attempt_s: seconds an attempt runs on its worker (a moving average), or None.
        running: this pool's Dask tasks on the cluster now.
        deviation_s: the moving mean absolute deviation of those seconds.

    Returns:
        The number of tasks, between 1 and ``n`` (0 when ``n`` is 0).
    """
    if n <= 0:
        return 0
    if attempt_s is None:
        wanted = max(threads * SPREAD - running, -(-n // MAX_BATCH))
    else:
        steady = attempt_s < DASK_TASK_COST_S or deviation_s <= STEADY * attempt_s
        per = int(TASK_S / max(attempt_s, 1e-9)) if steady else 1
        per = max(1, min(MAX_BATCH, per))
        wanted = max(threads * BALANCE - running, -(-n // per))
    return max(1, min(n, wanted))


class ClusterLink:
    """A runner's connection to one Dask cluster: its client, and the cluster and
    client it started itself (closed with it).

    Attributes:
        client: the ``distributed.Client``.
        address: the scheduler's address.
        owned: True when the runner started a ``LocalCluster`` for itself.
        topic: the event topic of this runner's attempts.
    """

    def __init__(self, client: Client, cluster: Any, own_client: bool, address: str) -> None:
        self.client: Any = client  # Any: distributed's own annotations are partial
        self._cluster = cluster
        self._own_client = own_client
        self.address = address
        self.owned = cluster is not None
        self.topic = f"actionpool-{uuid.uuid4().hex[:12]}"
        self.plugin = _PLUGIN_PREFIX + self.topic.split("-", 1)[1]
        self.pools: list[DaskPool] = []
        # One handler per topic and client (Client.subscribe_topic replaces any other).
        # The runner's own topic; and each worker's address, the topic under which the
        # scheduler logs that worker's removal, subscribed to when an attempt first
        # starts there (the cluster-wide "all" would displace a user's handler).
        self._watched: set[str] = set()  # worker addresses: touched on the client's loop
        client.subscribe_topic(self.topic, self._on_topic)

    def _on_topic(self, event: tuple[float, list[Any]]) -> None:
        _, (_key, kind, _at, data) = event
        if kind == "started":  # data: [(attempt key, time, "<address> pid <pid>")...]
            for _, _, running in data:
                where = str(running).split(" pid ", 1)[0]
                if where not in self._watched:
                    self._watched.add(where)
                    self.client.subscribe_topic(where, self._on_worker)
        for pool in self.pools:
            pool._on_topic(event)

    def _on_worker(self, event: tuple[float, Any]) -> None:
        for pool in self.pools:
            pool._on_worker(event)

    def workers(self) -> dict[str, dict[str, Any]]:
        """The scheduler's view of its workers: ``{address: info}`` (``nthreads``,
        ``memory_limit`` in bytes, ``resources``...). One request to the scheduler."""
        return dict(self.client.scheduler_info(n_workers=-1)["workers"])

    def has_workers(self) -> bool:
        """Whether the cluster has a worker. The client refreshes its view of the
        scheduler on its own loop (``distributed.client.scheduler-info-interval``);
        while that view counts a worker, no request is made (one on every submit
        delayed a burst of them by a round trip). Only while it counts none is the
        scheduler asked, every time, so that a new worker is seen at once."""
        seen = getattr(self.client, "_scheduler_identity", None) or {}
        if int(seen.get("n_workers", 0) or 0) > 0:
            return True
        return int(self.client.scheduler_info(n_workers=0).get("n_workers", 0)) > 0

    def cancel(self, fut: Any) -> None:
        """Cancel a Dask future from any thread, without waiting (on the client's loop,
        the client's ``cancel`` only returns a coroutine)."""
        client = self.client

        async def cancel() -> None:
            with contextlib.suppress(Exception):
                await client.cancel([fut], asynchronous=True)

        with contextlib.suppress(Exception):
            client.loop.add_callback(cancel)

    def close(self) -> None:
        """Close the client and cluster the runner started (a user's client stays), and
        have the scheduler forget the runner's events (it keeps a topic's last ones
        for ever)."""
        for topic in [self.topic, *self._watched]:
            with contextlib.suppress(Exception):
                self.client.unsubscribe_topic(topic)
        with contextlib.suppress(Exception):
            self.client.run_on_scheduler(_clear_topic, self.topic)
        if self._own_client:
            with contextlib.suppress(Exception):
                self.client.close()
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                self._cluster.close()


@cache
def _run_attempts_bytes() -> bytes:
    """:func:`~actionpool._worker.run_attempts`, pickled (by reference) once per
    process, as :func:`actionpool.maps._run_chunk_bytes` does for a map's chunks."""
    return dumps_function("chunk", run_attempts)


def _clear_topic(topic: str, dask_scheduler: Any = None) -> None:
    """Run on the scheduler: drop the events it keeps of ``topic`` (as it does for a
    worker's or a client's own topic when they leave)."""
    broker = getattr(dask_scheduler, "_broker", None)
    if broker is not None:
        broker.truncate(topic)


def connect(
    address: str | None,
    client: Any,
    security: Any,
    n_workers: int,
    memory_limit: int | None,
) -> ClusterLink:
    """Connect to the cluster at ``address``, or use ``client``, or start a
    ``LocalCluster`` on loopback of ``n_workers`` processes of one thread each.

    The ``LocalCluster`` gets ``allowed-failures`` 0 (Dask never re-runs a task whose
    worker died: the runner decides) and ``worker-saturation`` 1.0 (a worker gets no
    task beyond its threads while another is idle). Creating it sets
    ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``OPENBLAS_NUM_THREADS`` to 1 in this
    process's environment; they are restored, so local pools made afterwards are not
    slowed.

    Raises:
        ImportError: ``distributed`` is not installed (with the install command).
        ValueError: both ``address`` and ``client`` given.
        OSError: the scheduler at ``address`` could not be reached within
            ``distributed.comm.timeouts.connect``, or refused this client's TLS
            certificates, or is a ``tls://`` address and ``security`` has no
            certificates; the message names the address and the cause.
    """
    try:
        import dask
        import distributed
    except ImportError as exc:
        raise ImportError(
            "backend='dask' needs dask.distributed: pip install 'actionpool[dask]'"
        ) from exc
    if address is not None and client is not None:
        raise ValueError("backend='dask': give address= or client=, not both")
    if client is not None and security is not None:
        raise ValueError(
            "backend='dask': security= is for the connection the runner makes;"
            " a client= brings its own"
        )
    if client is not None and getattr(client, "asynchronous", False):
        raise ValueError(
            "backend='dask': client= must be a synchronous distributed.Client"
            " (the runner calls it from its own threads)"
        )
    if client is not None:
        return ClusterLink(client, None, False, str(client.scheduler.address))
    if address is not None:
        timeout = dask.config.get("distributed.comm.timeouts.connect")
        try:
            made = distributed.Client(address, security=security, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            # a refused or silent address retries until the timeout; a TLS handshake
            # that fails (certificates of another CA) ends at once, with its reason
            raise OSError(
                f"backend='dask': could not reach the Dask scheduler at {address!r}"
                f" within {timeout} ({type(exc).__name__}: {exc})"
            ) from exc
        except TypeError as exc:  # distributed's complaint of a tls:// address, no context
            raise OSError(
                f"backend='dask': the Dask scheduler at {address!r} is reached over TLS:"
                " give security=distributed.Security(...) with the cluster's CA, and this"
                f" client's certificate and key ({exc})"
            ) from exc
        return ClusterLink(made, None, True, address)
    before = {var: os.environ.get(var) for var in _BLAS_VARS}
    try:
        with dask.config.set(
            {
                "distributed.scheduler.allowed-failures": 0,
                "distributed.scheduler.worker-saturation": 1.0,
            }
        ):
            cluster = distributed.LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                # loopback, and a free port: None means 8787, and a second runner
                # (or the user's own cluster) there prints a warning
                dashboard_address="127.0.0.1:0",
                memory_limit=memory_limit if memory_limit else "auto",
                security=security,
            )
            made = distributed.Client(cluster, security=security)
    finally:
        for var, value in before.items():  # LocalCluster leaves them at 1 here
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    return ClusterLink(made, cluster, True, str(cluster.scheduler_address))


# ---- values that stay on the cluster ----------------------------------------------------

_BUFFER, _VALUE, _KEPT = 0, 1, -1  # what a ClusterArena's descriptor stands for
# Tokens are unique in this process, not only in their arena: a map's calls name the
# buffers of the map's own arena (Arena.link) beside their own.
_TOKENS = itertools.count()
_REFS = threading.local()  # .resolve: token -> object, while a pickle with refs loads


class _Ref:
    """Stands in a pickled call for a value that stays on the cluster."""

    __slots__ = ("token",)

    def __init__(self, token: str) -> None:
        self.token = token

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _resolve_ref, (self.token,)


def _resolve_ref(token: str) -> Any:
    return _REFS.resolve(token)


def _load(packed: Packed, buffers: list[Any], resolve: Callable[[str], Any]) -> Any:
    """Unpickle ``packed`` with its out-of-band ``buffers``, its value refs resolved
    by ``resolve(token)``."""
    _REFS.resolve = resolve
    try:
        return pickle.loads(packed[0], buffers=buffers)
    finally:
        _REFS.resolve = None


class ClusterArena(Arena):
    """The arena of one run (or call) on a Dask runner: what stays on the cluster.

    Mirrors :class:`~actionpool.shm.Arena` (shared memory), for a cluster:

    * a buffer (a NumPy array's data...) of at least ``threshold`` bytes in a call's
      arguments or the run's state is pickled out of band and kept here; the first
      attempt sent to the cluster that needs it scatters it (``client.scatter``),
      once per arena, and later attempts name the same Dask future;
    * a value of at least ``threshold`` pickled bytes that a cluster node of an
      idempotent action returned stays on its worker too (its Dask future is kept):
      a node that takes it as an argument (or inside a list, tuple or dict argument)
      gets a reference, which its worker fetches from the producer's worker, never
      through this process. Only an idempotent action's: if the worker holding the
      value is lost before a consumer fetched it, Dask recomputes it, running the
      action again.

    This process still receives every value (the report holds it). Attempts that run
    here (io actions on local threads) resolve the same references here: a buffer to a
    read-only view, a value to a private copy. Everything is released when the arena
    closes (the run ends).

    Args:
        prefix: the run's name, as for :class:`~actionpool.shm.Arena`.
        threshold: bytes from which buffers and values stay on the cluster; ``None``:
            never (everything is pickled into each attempt).
    """

    def __init__(self, prefix: str, threshold: int | None) -> None:
        super().__init__(prefix, None)  # no shared memory: Task.shm_threshold None
        self.keep_from = threshold
        self._buffers: dict[str, tuple[memoryview, Any]] = {}  # token -> (view, source)
        self._by_address: dict[tuple[int, int], str] = {}  # (address, size) -> token
        self._scattered: dict[str, Any] = {}  # token -> Dask future
        self._values: dict[int, tuple[Any, str]] = {}  # id(value) -> (value, token)
        self._objects: dict[str, Any] = {}  # token -> value
        self._remote: dict[str, tuple[Any, int]] = {}  # token -> (Dask future, index)

    @property
    def has_refs(self) -> bool:
        """Whether a call could hold a value that stays on the cluster."""
        return bool(self._values)

    def dumps(self, obj: Any) -> Packed:
        """Pickle ``obj`` (a call, the state, an io attempt's value): large buffers out
        of band (kept here), values that stay on the cluster as references."""
        if self.keep_from is None or self.closed:
            return dumps(obj), ()
        descs: list[tuple[str, int, int]] = []
        if self._values:
            obj = self._swap(obj, descs)

        def out_of_band(pb: pickle.PickleBuffer) -> bool:
            view = pb.raw()
            assert self.keep_from is not None
            if view.nbytes < self.keep_from:
                return True
            descs.append((self._keep_buffer(view, pb), _BUFFER, view.nbytes))
            return False

        import cloudpickle

        data: bytes = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=out_of_band)
        return data, tuple(descs)

    def loads(self, packed: Packed) -> Any:
        """Unpickle here: buffers become read-only views of the originals, references
        private copies of the values; a value marked as kept on the cluster (a cluster
        attempt's, see :meth:`keep`) is remembered, so that its consumers refer to it."""
        data, descs = packed
        if not descs:
            return pickle.loads(data)
        kept = None
        buffers: list[Any] = []
        for token, what, _ in descs:
            if what == _KEPT:
                kept = token
            elif what == _BUFFER:
                buffers.append(self._buffer_owner(token)._buffers[token][0].toreadonly())
        obj = _load(packed, buffers, self._copy_of)
        if kept is not None:
            with self._lock:
                self._values[id(obj)] = (obj, kept)
                self._objects[kept] = obj
        return obj

    def keep(self, fut: Any, index: int) -> str:
        """A cluster attempt's value, outcome ``index`` of Dask future ``fut``, stays
        there: the token to mark its result with (``(token, -1, size)``)."""
        token = f"dask-v{next(_TOKENS)}"
        with self._lock:
            self._remote[token] = (fut, index)
        return token

    def refs(self, packed: Packed | None, scatter: Callable[[memoryview], Any]) -> dict[str, Any]:
        """The Dask futures an attempt's ``packed`` call or state refers to (by token),
        scattering each buffer on its first use (``scatter(view)`` -> future)."""
        out: dict[str, Any] = {}
        if packed is None:
            return out
        for token, what, _ in packed[1]:
            if what == _VALUE:
                out[token] = self._remote[token]
            elif what == _BUFFER:
                owner = self._buffer_owner(token)  # the map's arena scatters it once
                with owner._lock:
                    fut = owner._scattered.get(token)
                if fut is None:
                    fut = scatter(owner._buffers[token][0])
                    with owner._lock:
                        fut = owner._scattered.setdefault(token, fut)
                out[token] = fut
        return out

    def _buffer_owner(self, token: str) -> ClusterArena:
        """This arena, or the map's arena it is linked to, whichever kept ``token``."""
        if token not in self._buffers and isinstance(self.inputs, ClusterArena):
            return self.inputs
        return self

    def close(self) -> None:
        """Release what this arena keeps (the cluster forgets its futures)."""
        super().close()
        with self._lock:
            for table in (self._buffers, self._by_address, self._scattered, self._values):
                table.clear()
            self._objects.clear()
            self._remote.clear()

    def _keep_buffer(self, view: memoryview, source: Any) -> str:
        at = (_address(view), view.nbytes)
        with self._lock:
            token = self._by_address.get(at)
            inputs = self.inputs
            if token is None and isinstance(inputs, ClusterArena):
                with inputs._lock:  # the lock order: ours, then the map's
                    if not inputs.closed:
                        token = inputs._by_address.get(at)
            if token is None:
                token = f"dask-b{next(_TOKENS)}"
                self._by_address[at] = token
                # the source stays alive: its address cannot be reused meanwhile
                self._buffers[token] = (view, source)
            return token

    def _swap(self, obj: Any, descs: list[tuple[str, int, int]]) -> Any:
        """``obj`` with each value that stays on the cluster replaced by a reference,
        looking into lists, tuples and dicts (as plans place node values)."""
        hit = self._values.get(id(obj))
        if hit is not None and hit[0] is obj:
            descs.append((hit[1], _VALUE, 0))
            return _Ref(hit[1])
        t = type(obj)
        if t is list or t is tuple:
            items = [self._swap(x, descs) for x in obj]
            if all(a is b for a, b in zip(items, obj, strict=True)):
                return obj
            return items if t is list else tuple(items)
        if t is dict:
            pairs = {k: self._swap(v, descs) for k, v in obj.items()}
            if all(pairs[k] is v for k, v in obj.items()):
                return obj
            return pairs
        return obj

    def _copy_of(self, token: str) -> Any:
        return loads(dumps(self._objects[token]))


def _localize(packed: Packed, refs: dict[str, Any]) -> Packed:
    """On a Dask worker: ``packed`` with its references resolved (``refs``: token ->
    the scattered buffer, or ``(the producer's Dask task's _Outcomes, index)``),
    pickled again whole for the worker's own pool."""
    if not packed[1]:
        return packed
    buffers = [refs[token] for token, what, _ in packed[1] if what == _BUFFER]

    def value(token: str) -> Any:
        outcomes, index = refs[token]
        what, result = outcomes.items[index]
        assert what == "result" and result.value is not None, (token, what)
        return pickle.loads(result.value[0])

    return dumps(_load(packed, buffers, value)), ()


class WorkerSide(WorkerPlugin):
    """The worker-local half: a Dask ``WorkerPlugin`` that owns an actionpool
    :class:`~actionpool.pools.process.ProcessPool` in each Dask worker, and runs the
    runner's attempts on it.

    Registered by :class:`DaskPool` under a name of its runner's own, so that two
    runners on one cluster keep their pools apart; torn down (its processes stopped)
    when the runner closes or the worker exits.
    """

    idempotent = False

    def __init__(self, name: str, topic: str, blas_threads: int) -> None:
        self.name = name
        self.topic = topic
        self.blas_threads = blas_threads
        self._pool: Any = None
        self._worker: Any = None
        self._running: dict[str, Any] = {}  # attempt key -> the local pool's attempt
        self._members: dict[str, list[str]] = {}  # Dask key of a batch -> attempt keys
        self._withdrawn: set[str] = set()  # attempt keys stopped before they arrived
        # Guards _running, _withdrawn and _chunked: a stop (the worker's loop thread) and a run
        # (a Dask task thread) race for one key, and a stop that fell between run's
        # check of _withdrawn and its entry in _running was lost: the attempt ran on
        # (a copy Dask started after retiring a worker ran for its full length).
        self._keys = threading.Lock()
        self._torn = False  # teardown began: nothing may run here any more

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_keys"]  # the plugin travels to the workers pickled; a lock cannot
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._keys = threading.Lock()
        self._started: deque[tuple[str, float, str]] = deque()  # (key, time, where)
        self._started_due = False  # a _send_started is scheduled on the worker's loop
        # attempts running quiet (no "started" message): key -> (the pool's attempt,
        # this worker's address), until _poll_starts or the batch's end reports them
        self._quiet: dict[str, tuple[Any, str]] = {}
        self._poll_due = False  # a _poll_starts is scheduled on the worker's loop
        # attempt keys of chunks running now (their _running entry is the chunk's): a
        # stop of one kills the chunk, and must keep that one from running again alone
        self._chunked: set[str] = set()
        # Dask key of a batch that ended -> the events for transition to send as its
        # task goes to memory ("started" of starts not reported yet, "ended")
        self._at_end: dict[str, list[list[Any]]] = {}

    def setup(self, worker: Any) -> None:
        """Start the pool: one process per Dask worker thread, each a fork of a fresh
        interpreter (a Dask worker runs threads, so it must not fork itself), or on
        the portable path, where this platform takes it (:mod:`actionpool.platforms`);
        where neither can run, each attempt here fails, saying why."""
        from ..platforms import process_path
        from .process import ProcessPool
        from .unavailable import UnavailablePool

        self._worker = worker
        size = max(1, int(worker.state.nthreads))
        path, missing = process_path()
        if path == "none":
            self._pool = UnavailablePool(size, missing)
        elif path == "portable":
            self._pool = ProcessPool(size, self.blas_threads, portable=True)
        else:
            self._pool = ProcessPool(size, self.blas_threads, "fresh")

    def teardown(self, worker: Any) -> None:
        """Stop the pool and its processes (running attempts are killed; idle
        processes are told to stop, so that each closes its resources first)."""
        pool, self._pool = self._pool, None
        with self._keys:
            self._torn = True  # a run() that is submitting now cancels its attempts
            running = list(self._running.values())
        if pool is not None:
            # A runner that closes has no attempt of its own left here; one that still
            # runs is a copy Dask started on its own (after retiring a worker) or
            # the attempt of a worker that leaves mid-attempt: killed. The others
            # exit at their stop, after closing what ctx.resources made in them (one
            # that ignores it is killed 10 s on).
            for att in {id(att): att for att in running}.values():  # a chunk's is many's
                att.cancel("cancel")
            pool.close()

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        """On the worker's loop. A batch's task went to ``memory``: send the events
        its run left for its end (:meth:`run`). A task left ``executing`` for
        ``released``/``cancelled``/``forgotten``: its future was cancelled; kill the
        process that runs its attempt.

        The events go from here, not from the task's thread: the worker calls this
        before it queues the task's end ("task-finished") on its stream to the
        scheduler, so the two leave in one batch, the events first. Sent from the
        task's thread, an event left at once and opened the stream's 2 ms batching
        interval (``BatchedSend``), which then held the task's end back, and with it
        the scheduler's next task for this worker."""
        if start not in ("executing", "long-running"):
            return
        at_end = self._at_end.pop(str(key), None)
        if finish == "memory":
            if at_end is not None and self._worker is not None and not self._torn:
                for msg in at_end:
                    self._worker.log_event(self.topic, msg)
        elif finish in _STOPPING:
            self.stop(self._members.get(str(key), [str(key)]))

    def stop(self, keys: list[str]) -> None:
        """Stop these attempts: kill the process of each that runs here, withdraw each
        that waits in the pool, and remember the others (their batch may not have
        arrived yet) so that they never start."""
        for key in keys:
            with self._keys:
                att = self._running.get(key)
                if att is None or key in self._chunked:
                    self._withdrawn.add(key)
            if att is not None:
                att.cancel("cancel")

    def run(
        self, tasks: list[Task], keys: list[str], dask_key: str, refs: dict[str, Any]
    ) -> list[tuple[str, Any]]:
        """Run ``tasks`` (one batch, the Dask task ``dask_key``) on the pool, all queued
        at once; wait for them (on this Dask worker thread). ``refs``: what their
        calls and states refer to on the cluster (:class:`ClusterArena`), fetched by
        Dask before this runs.

        The quiet attempts of a batch (idempotent, nobody waits to see them start:
        ``Task.announce`` off) go to one process together, as one chunk
        (:func:`~actionpool._worker.run_attempts`); should that process die or the
        chunk be stopped, they run again one by one, so that the one that crashed
        ends alone.

        Returns, per task in order: ``("result", Result)``, ``("not-started",
        WorkerCrashed)``, ``("crashed", WorkerCrashed)`` or ``("withdrawn", None)``
        (stopped before it started).
        """
        pool, worker = self._pool, self._worker
        if pool is None:
            raise RuntimeError(f"actionpool: the worker plugin {self.name!r} is torn down")
        where = str(worker.address)
        if len(keys) > 1:
            self._members[dask_key] = keys
        ready: list[tuple[int, Task]] = []
        for i, task in enumerate(tasks):
            # a quiet attempt sends no "started" message: the poll reads its start
            # from the pool's start page (see STARTED_DELAY_S)
            now = task.announce or not task.idempotent
            task = task._replace(shm_prefix="", shm_threshold=None, announce=now)
            if refs:
                state = None if task.state is None else _localize(task.state, refs)
                task = task._replace(call=_localize(task.call, refs), state=state)
            ready.append((i, task))
        atts: list[Any] = [None] * len(tasks)
        outcomes: list[tuple[str, Any]] = [("withdrawn", None)] * len(tasks)
        try:
            quiet = [(i, task) for i, task in ready if not task.announce]
            chunk = self._submit_chunk(pool, quiet, keys) if len(quiet) > 1 else None
            chunked = {i for i, _ in quiet} if chunk is not None else set()
            for i, task in ready:
                if i not in chunked:
                    atts[i] = self._submit(pool, task, keys[i], where)
            # one wake-up of this thread for the batch, not one per attempt: each
            # contends for the GIL with the worker's loop, which is busy meanwhile
            wait([att.future for att in (*atts, chunk) if att is not None])
            ended = (
                None if chunk is None else self._chunk_ended(chunk, quiet, keys, where, outcomes)
            )
            if ended is not None and self._torn:
                # the pool is closed: none runs again here, and, their starts unsent,
                # each counts as not started (they are idempotent: sent again)
                what, payload = ended
                for i, _ in quiet:
                    outcomes[i] = ("not-started", payload) if what == "crashed" else ended
            elif ended is not None:
                # its process died, or it was stopped: each runs again alone, so that
                # the one that crashed ends alone (those stopped meanwhile: withdrawn)
                for i, task in quiet:
                    atts[i] = self._submit(pool, task, keys[i], where)
                chunked = set()
                wait([att.future for att in atts if att is not None])
            for i, att in enumerate(atts):
                if i not in chunked:
                    outcomes[i] = self._wait(att, where)
            # the starts not reported yet: a chunk's, and those of quiet attempts
            held: dict[str, tuple[float, str]] = {}
            for i, (key, att, (what, payload)) in enumerate(zip(keys, atts, outcomes, strict=True)):
                if i not in chunked and (att is None or self._quiet.pop(key, None) is None):
                    continue  # reported, or never sent
                if what == "result":
                    held[key] = (payload.started_at, payload.worker)
                elif what == "crashed" and att is not None and att.started:  # its start page
                    held[key] = (att.started_at, f"{where} pid {att.worker}")
            items = self._ended_items(tasks, keys, outcomes, held)
            carried = {item[0] for item in items}
            late = [(key, *start) for key, start in held.items() if key not in carried]
            at_end: list[list[Any]] = []
            if late:  # the starts the "ended" event does not carry go before the end too
                at_end.append(_started_event(late))
            if items:
                at_end.append(["", "ended", 0.0, items])
            if at_end and not self._torn:  # see transition
                self._at_end[dask_key] = at_end
            return outcomes
        finally:
            with self._keys:
                for key in keys:
                    self._running.pop(key, None)
            self._members.pop(dask_key, None)

    def _submit(self, pool: Any, task: Task, key: str, where: str) -> Any:
        """Queue one attempt on the pool (None: stopped before it came here)."""
        with self._keys:
            if key in self._withdrawn:
                self._withdrawn.discard(key)
                return None
        topic, worker = self.topic, self._worker
        now = task.announce

        def on_started(pid: int | str, at: float) -> None:
            if now:
                self._started.append((key, at, f"{where} pid {pid}"))
                self._wake_started()
            # a quiet attempt's start comes here only where the pool has no start
            # page; the first of this and the poll reports it, and the poll, due
            # while the attempt was quiet, sends it
            elif self._quiet.pop(key, None) is not None:
                self._started.append((key, at, f"{where} pid {pid}"))

        def on_event(kind: str, at: float, data: Any) -> None:
            worker.log_event(topic, [key, kind, at, dumps(data)])

        att = pool.submit(task, False, on_started, on_event)
        if not now:
            self._quiet[key] = (att, where)
            self._arm_poll()
        with self._keys:  # a stop since the check above is in _withdrawn now
            self._running[key] = att
            stopped = key in self._withdrawn or self._torn
            self._withdrawn.discard(key)
        if stopped:
            att.cancel("cancel")
        return att

    def _submit_chunk(self, pool: Any, quiet: list[tuple[int, Task]], keys: list[str]) -> Any:
        """Queue the quiet attempts ``quiet`` (index in the batch, task) as one chunk
        (:func:`~actionpool._worker.run_attempts`); None where one of them was stopped
        before it came here (they then go one by one, as they are)."""
        members = [keys[i] for i, _ in quiet]
        with self._keys:
            if any(key in self._withdrawn for key in members):
                return None
        topic, worker = self.topic, self._worker
        first = quiet[0][1]
        # Tasks hold only builtins and bytes: plain pickle, as dumps_call does plain calls
        chunk_call: tuple[bytes, tuple[list[Task]], dict[str, Any]] = (
            _run_attempts_bytes(),
            ([task for _, task in quiet],),
            {},
        )
        call: Packed = (pickle.dumps(chunk_call, protocol=PROTOCOL), ())
        task = first._replace(
            timeout=None, wants_state=True, state=None, call=call, announce=False,
            action="", resources=None, capture=0, tagged=False,
        )  # fmt: skip

        def on_event(kind: str, at: float, data: Any) -> None:
            if kind == ATTEMPT_EVENT:
                index, kind, payload = data
                worker.log_event(topic, [members[index], kind, at, payload])

        att = pool.submit(task, False, None, on_event)
        with self._keys:
            for key in members:
                self._running[key] = att
                self._chunked.add(key)
            stopped = self._torn or any(key in self._withdrawn for key in members)
        if stopped:
            att.cancel("cancel")
        return att

    def _chunk_ended(
        self,
        att: Any,
        quiet: list[tuple[int, Task]],
        keys: list[str],
        where: str,
        outcomes: list[tuple[str, Any]],
    ) -> tuple[str, Any] | None:
        """The chunk ``att`` of ``quiet`` ended: set their ``outcomes`` from its results
        (one stopped as it ended: withdrawn), report their starts, and return None;
        or, where it brought none (its process died, it was stopped, or it failed),
        return its own outcome."""
        members = [keys[i] for i, _ in quiet]
        with self._keys:
            for key in members:
                self._running.pop(key, None)
                self._chunked.discard(key)
        what, payload = self._wait(att, where)
        if what != "result":
            return what, payload
        if not payload.ok:  # cannot happen: run_attempts returns every attempt's end
            return "crashed", WorkerCrashed(f"a chunk of attempts failed: {payload.error_message}")
        results = loads(payload.value[0])
        for (i, _), key, result in zip(quiet, members, results, strict=True):
            with self._keys:
                if key in self._withdrawn:  # stopped as the chunk ended
                    self._withdrawn.discard(key)
                    continue
            outcomes[i] = ("result", result._replace(worker=payload.worker))
        return None

    def _ended_items(
        self,
        tasks: list[Task],
        keys: list[str],
        outcomes: list[tuple[str, Any]],
        held: dict[str, tuple[float, str]],
    ) -> list[tuple[str, int, bytes, tuple[float, str] | None]]:
        """On the Dask task's thread, as the batch ends: the small outcomes, each
        ``(attempt key, index in the batch, pickled outcome, its start where it is in
        held (not reported yet) or None)``, for the "ended" event that
        :meth:`transition` sends ahead of the task's end, so that the client need not
        fetch them, a request and a reply away. A value that stays on the cluster
        (large, of an idempotent action: ClusterArena), and what goes beyond
        :data:`ENDED_EVENT_BYTES`, are left to that fetch. Nothing once teardown began:
        what it stopped is no outcome, and the client learns why."""
        if self._torn:
            return []
        items = []
        budget = ENDED_EVENT_BYTES
        for i, (task, key, (what, payload)) in enumerate(zip(tasks, keys, outcomes, strict=True)):
            if what == "withdrawn":
                continue
            if what == "result" and payload.value is not None:
                size = len(payload.value[0])
                if size >= budget or (
                    task.idempotent
                    and task.shm_threshold is not None
                    and size >= task.shm_threshold
                ):
                    continue
            # a Result holds builtins and bytes, a crash is an importable exception: the
            # C pickler, not cloudpickle's Python one, on this per-attempt path
            try:
                blob = pickle.dumps((what, payload), protocol=PROTOCOL)
            except Exception:  # noqa: BLE001 - it travels with the task's end instead
                continue
            if len(blob) <= budget:
                budget -= len(blob)
                items.append((key, i, blob, held.get(key)))
        return items

    def _wake_started(self) -> None:
        """From any thread: have :meth:`_send_started` run on the worker's loop, unless
        it is due already."""
        loop = self._worker.loop if self._worker is not None else None
        if loop is not None and not self._started_due:
            self._started_due = True
            loop.add_callback(self._send_started)

    def _arm_poll(self) -> None:
        """On a Dask task's thread: have :meth:`_poll_starts` run on the worker's loop
        within ``STARTED_DELAY_S / 2``, unless it is due already."""
        loop = self._worker.loop if self._worker is not None else None
        if loop is not None and not self._poll_due:
            self._poll_due = True
            # call_later is not thread-safe: armed from the loop itself
            loop.add_callback(loop.call_later, STARTED_DELAY_S / 2, self._poll_starts)

    def _poll_starts(self) -> None:
        """On the worker's loop: report the quiet attempts that have run for
        :data:`STARTED_DELAY_S`, their starts read from the pool's start page, and poll
        again while any is left: when the next start falls due, or, while one has not
        started, within ``STARTED_DELAY_S / 2``. The flag is cleared first: a quiet
        attempt added after the check below finds it clear and arms the next poll (two
        polls at worst)."""
        self._poll_due = False
        pool = self._pool
        noted = getattr(pool, "note_started", None)
        now = time.time()  # the clock of the start page's times
        next_s = STARTED_DELAY_S / 2
        for key, (att, where) in list(self._quiet.items()):
            if noted is None or not noted(att):
                continue
            left = att.started_at + STARTED_DELAY_S - now
            if left > 0:
                next_s = min(next_s, left)
            elif self._quiet.pop(key, None) is not None:
                self._started.append((key, att.started_at, f"{where} pid {att.worker}"))
        if self._started:
            self._send_started()
        if self._quiet and pool is not None and self._worker is not None:
            self._poll_due = True
            self._worker.loop.call_later(next_s, self._poll_starts)

    def _send_started(self) -> None:
        """On the worker's loop: send the "started" of every attempt that started since
        the last call, as one event (one per attempt kept the loop and the pool's
        reader thread handing the GIL back and forth through a batch of short ones).
        The flag is cleared before the queue is drained: an attempt queued after the
        drain finds it clear and schedules the next call (a call scheduled before
        finds the queue empty, which costs nothing)."""
        self._started_due = False
        items = []
        while self._started:
            items.append(self._started.popleft())
        if items and self._worker is not None:
            self._worker.log_event(self.topic, _started_event(items))

    @staticmethod
    def _wait(att: Any, where: str) -> tuple[str, Any]:
        if att is None:
            return "withdrawn", None
        try:
            result: Result = att.future.result()
        except CancelledError:
            return "withdrawn", None
        except NotStarted as exc:
            return "not-started", exc.crash
        except WorkerCrashed as exc:
            return "crashed", exc
        return "result", result._replace(worker=f"{where} pid {result.worker}")


def _started_event(items: list[tuple[str, float, str]]) -> list[Any]:
    """The "started" event of ``items``, each ``(attempt key, time, "<address> pid
    <pid>")`` (:meth:`DaskPool._on_topic`)."""
    return ["", "started", items[0][1], items]


class SchedulerSide(SchedulerPlugin):
    """On the scheduler: removes a runner's worker plugin (and so its processes on
    every worker), and the events the scheduler keeps of its topic, when the runner's
    client leaves without doing it, its process killed or its connection lost. A
    runner that closes does both itself.

    Args:
        name: this plugin's name.
        client_id: the runner's ``Client.id``.
        worker_plugin: the name of the :class:`WorkerSide` to remove.
        topic: the runner's event topic.
    """

    def __init__(self, name: str, client_id: str, worker_plugin: str, topic: str) -> None:
        self.name = name
        self.client_id = client_id
        self.worker_plugin = worker_plugin
        self.topic = topic
        self._cleanup: Any = None  # the cleanup task, held until it ends

    def remove_client(self, scheduler: Any, client: str) -> None:
        """A client left (on the scheduler's loop): if it is the runner's, clean up."""
        if client != self.client_id or self._cleanup is not None:
            return

        async def cleanup() -> None:
            with contextlib.suppress(Exception):
                _clear_topic(self.topic, scheduler)
            with contextlib.suppress(Exception):
                await scheduler.unregister_worker_plugin(None, self.worker_plugin)
            with contextlib.suppress(Exception):
                await scheduler.unregister_scheduler_plugin(self.name)

        import asyncio

        self._cleanup = asyncio.ensure_future(cleanup())


class _Opaque:
    """Arguments of a Dask task that Dask must not look into.

    ``client.submit`` walks every tuple, list and dict of a task's arguments, down to
    each field, looking for Dask futures (``dask._task_spec.parse_input``): a batch of
    :class:`~actionpool._worker.Task` tuples cost it thousands of calls per submit,
    the largest share of the client's time in a wide plan. A batch's tasks and keys
    hold no future (``refs`` does, and stays visible), so they travel wrapped in this.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        return _Opaque, (self.value,)


class _Outcomes:
    """A batch's outcomes, as its Dask task returns them: ``items``, per attempt in
    order, ``(what, payload)`` (:meth:`WorkerSide.run`).

    One object to Dask, pickled whole: a list it would serialize item by item, each a
    tuple it looks into in turn, which took a Dask worker 8-10 ms to send the outcomes
    of 125 tiny attempts. Its size, for Dask's memory accounting, is that of the
    pickled values it holds.
    """

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[str, Any]]) -> None:
        self.items = items

    def __reduce__(self) -> tuple[Any, tuple[list[tuple[str, Any]]]]:
        return _Outcomes, (self.items,)

    def __sizeof__(self) -> int:
        size = 64
        for what, payload in self.items:
            value = payload.value if what == "result" else None
            size += 256 + (len(value[0]) if value is not None else 0)
        return size


def _run_on_worker(plugin: str, batch: _Opaque, dask_key: str, refs: dict[str, Any]) -> _Outcomes:
    """The Dask task of a batch of attempts (``batch``: its tasks and their keys): hand
    it to this worker's :class:`WorkerSide`."""
    from distributed import get_worker

    worker = get_worker()
    side = worker.plugins.get(plugin)
    if not isinstance(side, WorkerSide):
        raise RuntimeError(
            f"actionpool: Dask worker {worker.address} has no plugin {plugin!r}"
            " (it joined after the runner started and did not get it, or the runner closed)"
        )
    tasks, keys = batch.value
    return _Outcomes(side.run(tasks, keys, dask_key, refs))


async def _stop_on_worker(plugin: str, keys: list[str], dask_worker: Any = None) -> None:
    """Run by ``client.run`` on a worker's loop: stop these attempts of a batch there
    (a coroutine: ``client.run`` does not wait only for those)."""
    side = dask_worker.plugins.get(plugin) if dask_worker is not None else None
    if isinstance(side, WorkerSide):
        side.stop(keys)


class DaskAttempt:
    """Handle of one attempt on the cluster (see :class:`~actionpool.pools.Attempt`).

    Attributes:
        key: its Dask key, unique to the attempt.
        dask: its batch's ``distributed.Future``; None before it is sent and once it
            ended.
    """

    recycled: dict[str, Any] | None = None  # a thread or cluster task is never recycled

    __slots__ = (
        "__weakref__",
        "_pool",
        "action",
        "arena",
        "asks",
        "batch",
        "dask",
        "direct",
        "future",
        "idempotent",
        "key",
        "killed",
        "node",
        "on_event",
        "on_result",
        "on_started",
        "refs",
        "released",
        "started_at",
        "task",
        "worker",
    )

    def __init__(self, pool: DaskPool, key: str, task: Task, asks: dict[str, float]) -> None:
        self._pool = pool
        self.key = key
        self.task: Task | None = task  # dropped once sent
        self.node = task.node if task.tagged else ""  # its output's tag (set_output)
        self.action = task.action
        self.idempotent = task.idempotent
        self.asks = asks
        self.batch: _Batch | None = None  # the Dask task it went in
        self.arena: ClusterArena | None = None  # its run's, where values stay
        self.refs: dict[str, Any] = {}  # what its call and state refer to there
        self.dask: Any = None
        self.future: Future[Result] = Future()
        self.killed = ""
        self.direct = False
        self.on_result: Callable[[Result], None] | None = None
        self.on_started: Callable[[int | str, float], None] | None = None
        self.on_event: Callable[[str, float, Any], None] | None = None
        self.released = False
        self.started_at: float | None = None
        self.worker: int | str | None = None

    def cancel(self, reason: str = "cancel") -> None:
        """Withdraw it if it has not started, else kill the process that runs it (its
        Dask future is cancelled; the worker's plugin kills the process)."""
        self.killed = self.killed or reason
        self._pool._stop(self)

    def wait_here(self, timeout: float | None) -> None:
        """Nothing to do here: the pool's results thread delivers the result."""


class _Batch:
    """One Dask task: the attempts it carries, in order."""

    __slots__ = ("atts", "dask", "key", "where")

    def __init__(self, key: str, atts: list[DaskAttempt]) -> None:
        self.key = key
        self.atts = atts
        self.dask: Any = None
        self.where: str | None = None  # the worker it started on, from a "started" event


class DaskPool:
    """Attempts of one kind on a Dask cluster (see the module docstring).

    Args:
        link: the cluster connection (:func:`connect`), shared by the runner's pools.
        kind: ``"cpu"`` (or ``"io"`` with ``io_on_cluster``).
        size: the attempts in flight at most (the admission's slots): several per
            cluster thread, so that the next ones wait on Dask's scheduler.
        threads: the cluster's threads (for :meth:`describe`).
        blas_threads: BLAS/OpenMP threads per worker-local process.
        resources: the Dask worker resources the cluster declares (``"memory"``,
            ``"threads"``): an action's ``memory=`` and ``threads=`` are asked for
            as those resources.
    """

    label = "dask"
    stops_by_kill = True

    def __init__(
        self,
        link: ClusterLink,
        kind: str,
        size: int,
        blas_threads: int,
        resources: frozenset[str] = frozenset(),
        threads: int = 0,
    ) -> None:
        self.kind = kind
        self.size = size
        self.threads = threads or size
        self.link = link
        self.resources = resources
        self._lock = threading.Lock()
        self._live: dict[str, DaskAttempt] = {}
        self._closed = False
        self._ids = itertools.count(1)
        self._tag = uuid.uuid4().hex[:8]
        self._pending: list[DaskAttempt] = []  # submitted, not yet sent (flush)
        # where the actions' output events go (set_output; on the client's loop)
        self._output: Callable[[str, str, Any], None] | None = None
        self._flush_armed = False  # a late flush is scheduled on the client's loop
        self._flush_due = False  # a _flush_now is scheduled on the client's loop
        # Dask futures of ended batches, released after the next send (on the client's
        # loop; see _hold): their release would hold that send back
        self._spent: list[Any] = []
        self._release_armed = False
        self._flushed = 0  # flushes so far
        self._batches: dict[str, _Batch] = {}  # Dask key -> batch, while it runs
        self._to_stop: list[tuple[str | None, str]] = []  # (worker or None, attempt key)
        # Seconds an attempt of each action runs on its worker (by the action's name;
        # absent: none ended yet): the moving average, and the moving mean absolute
        # deviation from it. How many attempts of it one Dask task should carry
        # (flush). Written on the client's loop, read by flush.
        self.attempt_s: dict[str, tuple[float, float]] = {}
        self._plugin = f"{link.plugin}-{kind}"
        self._guard = f"{self._plugin}-guard"
        link.client.register_plugin(
            WorkerSide(self._plugin, link.topic, blas_threads), name=self._plugin
        )
        link.client.register_plugin(
            SchedulerSide(self._guard, link.client.id, self._plugin, link.topic),
            name=self._guard,
        )
        link.pools.append(self)

    # ---- the Pool protocol ------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Nothing to attach: results arrive on the pool's own thread."""

    def submit(
        self,
        task: Task,
        is_async: bool = False,
        on_started: Callable[[int | str, float], None] | None = None,
        on_event: Callable[[str, float, Any], None] | None = None,
    ) -> DaskAttempt:
        """Send ``task`` to the cluster under a key of its own.

        Raises:
            RuntimeError: the pool is closed, or the cluster has no workers (a run
                would wait for ever); the message names the scheduler's address.
        """
        if self._closed:
            raise RuntimeError(f"the Dask {self.kind} pool is closed")
        client = self.link.client
        if client.status != "running":
            raise RuntimeError(
                f"the Dask cluster at {self.link.address} is lost (its client is"
                f" {client.status}): node {task.node!r} cannot run"
            )
        if not self.link.has_workers():
            raise RuntimeError(
                f"the Dask cluster at {self.link.address} has no workers: node"
                f" {task.node!r} cannot run (start workers, or use backend='local')"
            )
        key = f"{task.node}-{self._tag}-{next(self._ids)}"
        att = DaskAttempt(self, key, task, self._asks(task))
        att.on_started, att.on_event = on_started, on_event
        arena = arena_for(task.shm_prefix, None)
        if isinstance(arena, ClusterArena):
            att.arena = arena
            if task.call[1] or (task.state is not None and task.state[1]):
                att.refs = arena.refs(task.call, self._scatter)
                att.refs.update(arena.refs(task.state, self._scatter))
        with self._lock:
            self._live[key] = att
            self._pending.append(att)
            arm = not self._flush_armed
            self._flush_armed = True
            gen = self._flushed
        if arm:  # for a caller that never calls flush: the scheduler always does
            client.loop.add_callback(self._arm_late_flush, gen)
        return att

    def set_output(self, output: Callable[[str, str, Any], None]) -> None:
        """Hand the actions' output events (:data:`~actionpool.output.OUTPUT_KINDS`),
        which the worker-local pools send on as events, to ``output(node, kind,
        data)`` instead of to each attempt's ``on_event``; called on the client's
        loop, in the order the worker sent them."""
        self._output = output

    def flush(self) -> None:
        """Send the attempts submitted since the last flush (the scheduler calls this
        after each dispatch pass), from the client's loop (:meth:`_flush_now`).

        The loop sends what has come by the time it runs: the submits of a burst
        that the scheduler dispatched in several passes (a map's items, as its
        consumer hands them over) then go to Dask's scheduler as one graph update.
        A call from another thread costs one hop to the loop, which
        ``client.submit`` from that thread made all the same.
        """
        with self._lock:
            if self._flush_due or not self._pending:
                return
            self._flush_due = True
        self.link.client.loop.add_callback(self._flush_now)

    def _flush_now(self) -> None:
        """On the client's loop: send the attempts submitted so far, several to a
        Dask task where they are short.

        Attempts that ask for Dask resources go one to a task (a batch would hold the
        resources of one while running several). The others are cut into batches of
        one action each (:func:`batch_count`), from that action's :attr:`attempt_s`,
        in submission order, and sent in one graph update.
        """
        with self._lock:
            self._flush_due = False
            pending, self._pending = self._pending, []
            self._flush_armed = False
            self._flushed += 1
            live = self._live
            pending = [att for att in pending if att.key in live]  # not stopped meanwhile
        if not pending:
            return
        # (a batch is recomputed whole if Dask loses a value kept from it: never one
        # that mixes idempotent attempts with others, even of actions of one name)
        by_action: dict[tuple[str, bool], list[DaskAttempt]] = {}
        for att in pending:
            if att.asks:
                self._send([[att]], att.asks)
            else:
                by_action.setdefault((att.action, att.idempotent), []).append(att)
        groups: list[list[DaskAttempt]] = []
        for (action, _), atts in by_action.items():
            n = len(atts)
            mean, dev = self.attempt_s.get(action, (None, 0.0))
            count = batch_count(n, self.threads, mean, len(self._batches), dev)
            start = 0
            for i in range(count):
                stop = start + (n - start) // (count - i)
                groups.append(atts[start:stop])
                start = stop
        if groups:
            self._send(groups)
        if self._spent:  # on the loop: their releases go out after this send
            self._spent.clear()

    def _send(self, groups: list[list[DaskAttempt]], asks: dict[str, float] | None = None) -> None:
        """Submit one Dask task per group of attempts (a key of its own: a lone
        attempt's key, else a batch key), all in one graph update: one message to
        the scheduler, and one pass of its bookkeeping, for the whole flush."""
        client = self.link.client
        sent: list[tuple[_Batch, _Opaque, dict[str, Any]]] = []
        for atts in groups:
            key = atts[0].key if len(atts) == 1 else f"batch-{self._tag}-{next(self._ids)}"
            batch = _Batch(key, atts)
            tasks = []
            refs: dict[str, Any] = {}
            for att in atts:
                assert att.task is not None
                tasks.append(att.task)
                att.task = None  # the Dask future holds it now
                att.batch = batch
                refs.update(att.refs)
            sent.append((batch, _Opaque((tasks, [att.key for att in atts])), refs))
        with self._lock:
            for batch, _, _ in sent:
                self._batches[batch.key] = batch
        keys = [batch.key for batch, _, _ in sent]
        try:
            if len(sent) == 1:
                batch, opaque, refs = sent[0]
                futs = [
                    client.submit(
                        _run_on_worker, self._plugin, opaque, batch.key, refs,
                        key=batch.key, pure=False, retries=0, resources=asks,
                    )
                ]  # fmt: skip
            else:
                futs = client.map(
                    _run_on_worker,
                    [self._plugin] * len(sent),
                    [opaque for _, opaque, _ in sent],
                    keys,
                    [refs for _, _, refs in sent],
                    key=keys,
                    pure=False,
                    retries=0,
                    resources=asks,
                )
        except Exception as exc:  # noqa: BLE001 - a closed client: these attempts end
            for batch, _, _ in sent:
                self._end_batch(batch, None, exc)
            return
        for (batch, _, _), fut in zip(sent, futs, strict=True):
            atts = batch.atts
            batch.dask = fut
            for att in atts:
                att.dask = fut
            client.loop.add_callback(self._follow, batch)
            with self._lock:  # stopped while being sent (_stop saw no future to cancel)
                gone = [att.key for att in atts if att.key not in self._live]
            if len(gone) == len(atts):
                self.link.cancel(fut)
            for key in gone if len(gone) < len(atts) else ():
                self._stop_remote(None, key)

    def _scatter(self, view: memoryview) -> Any:
        """Send a large buffer to the cluster once (its workers share it from there)."""
        return self.link.client.scatter(view, hash=False)

    async def _arm_late_flush(self, gen: int) -> None:
        """On the client's loop: flush in :data:`LATE_FLUSH_S` unless a flush comes
        first (``gen``: the flush count when the first of these attempts came)."""
        import asyncio

        def late() -> None:
            if self._flushed == gen:
                self._flush_now()

        asyncio.get_running_loop().call_later(LATE_FLUSH_S, late)

    def submit_if_idle(
        self,
        task: Task,
        on_event: Callable[[str, float, Any], None] | None = None,
        before_send: Callable[[Any], None] | None = None,
        is_async: bool = False,
    ) -> DaskAttempt | None:
        """Never: a cluster call goes through the scheduler (its round trip dwarfs
        the hop saved)."""
        return None

    def forget(self, prefix: str) -> None:
        """Nothing to forget: no shared memory crosses to a cluster."""

    def close(self, cancel: bool = False, *, reap: bool = True) -> None:
        """Stop taking attempts; with ``cancel`` stop the running ones, else wait for
        them; then remove the worker plugin (its processes exit) and the topics."""
        with self._lock:
            self._closed = True
            live = list(self._live.values())
        if cancel:
            for att in live:
                att.cancel("cancel")
        for att in live:
            with contextlib.suppress(Exception):
                att.future.exception()
        client = self.link.client
        self._spent.clear()
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(self._plugin)
        with contextlib.suppress(Exception):
            client.unregister_scheduler_plugin(self._guard)
        with contextlib.suppress(ValueError):
            self.link.pools.remove(self)

    def reap(self) -> None:
        """Nothing to reap here: the cluster's processes are the cluster's."""

    def pids(self) -> list[int]:
        """None here: the workers are the cluster's processes."""
        return []

    def describe(self) -> str:
        """One line for sizing reports."""
        where = "a LocalCluster started for this runner" if self.link.owned else "a Dask cluster"
        return (
            f"{self.threads} Dask worker threads on {where} at {self.link.address},"
            f" up to {self.size} attempts in flight"
        )

    # ---- inside -------------------------------------------------------------------------

    def _asks(self, task: Task) -> dict[str, float]:
        """The Dask resources ``task``'s action asks for, of those the cluster declares:
        ``memory`` (bytes) and ``threads`` (slots)."""
        asks: dict[str, float] = {}
        if "memory" in self.resources and task.memory:
            asks["memory"] = task.memory
        if "threads" in self.resources:
            asks["threads"] = task.threads
        return asks

    def _stop(self, att: DaskAttempt) -> None:
        """End ``att`` now: killed if it had started, else withdrawn. A lone attempt's
        Dask future is cancelled (the worker's plugin kills its process); an attempt of
        a batch is stopped by a message to its worker (to every worker, if it has not
        started: its batch may be anywhere), and the batch's future is cancelled once
        none of its attempts is left."""
        with self._lock:
            live = self._live.pop(att.key, None)
            batch = att.batch
            alone = batch is not None and (
                len(batch.atts) == 1 or not any(a.key in self._live for a in batch.atts)
            )
        if batch is not None:
            if alone:
                if batch.dask is not None:
                    self.link.cancel(batch.dask)
            else:
                where = str(att.worker).split(" pid ", 1)[0] if att.worker else None
                self._stop_remote(where, att.key)
        if live is None:
            return
        if att.started_at is None:
            withdraw(att.future)
            return
        att.future.set_exception(
            WorkerCrashed(
                f"node attempt {att.key!r} was stopped ({att.killed}): its process on"
                f" {att.worker} was killed"
            )
        )

    def _stop_remote(self, where: str | None, key: str) -> None:
        """Ask the worker ``where`` (None: every worker) to stop attempt ``key``; the
        requests of one loop turn go together."""
        with self._lock:
            first = not self._to_stop
            self._to_stop.append((where, key))
        if first:
            with contextlib.suppress(Exception):
                self.link.client.loop.add_callback(self._send_stops)

    async def _send_stops(self) -> None:
        """On the client's loop: send the stop requests gathered so far, one
        ``client.run`` per worker (and one to all for attempts not started)."""
        with self._lock:
            todo, self._to_stop = self._to_stop, []
        by_worker: dict[str | None, list[str]] = {}
        for where, key in todo:
            by_worker.setdefault(where, []).append(key)
        client = self.link.client
        for where, keys in by_worker.items():
            with contextlib.suppress(Exception):
                await client.run(
                    _stop_on_worker,
                    self._plugin,
                    keys,
                    workers=None if where is None else [where],
                    wait=False,
                    asynchronous=True,
                )

    async def _follow(self, batch: _Batch) -> None:
        """On the client's loop: wait for ``batch``'s Dask future, fetch its values,
        and end its attempts (those not stopped first)."""
        try:
            outcomes = await self._fetch(batch)
        except BaseException as exc:  # noqa: BLE001 - every way a task can end
            self._end_batch(batch, None, exc)
        else:
            self._end_batch(batch, outcomes, None)

    async def _fetch(self, batch: _Batch) -> list[tuple[str, Any]]:
        """On the client's loop: ``batch``'s outcomes, once its Dask task has ended.

        None to fetch where the "ended" event ended every attempt (or they were
        stopped): an empty list. Else from the worker it started on, where a "started"
        event named it (they come before the task's end: :meth:`WorkerSide.run`), in
        one request: a plain ``gather`` asks the scheduler where the value is first, a
        second round trip per task, through the scheduler's loop. Else, or when the
        worker no longer has it, through ``client.gather``.
        """
        client, fut = self.link.client, batch.dask
        # the future's own state: a Dask future has no public wait that does not also
        # fetch the value (the way Client._gather waits)
        state = getattr(fut, "_state", None)
        if state is not None:
            from distributed.utils_comm import gather_from_workers

            await state.wait()
            if fut.status == "finished" and not any(a.key in self._live for a in batch.atts):
                return []
            if fut.status == "finished" and batch.where is not None:
                with contextlib.suppress(Exception):
                    data, _, _, _ = await gather_from_workers({fut.key: [batch.where]}, client.rpc)
                    if fut.key in data:
                        return cast("_Outcomes", data[fut.key]).items
        outcomes: _Outcomes = await client.gather(fut, direct=True, asynchronous=True)
        return outcomes.items

    def _end_batch(
        self, batch: _Batch, outcomes: list[tuple[str, Any]] | None, error: BaseException | None
    ) -> None:
        """End each attempt of ``batch`` still live: with its outcome, or ``error``."""
        with self._lock:
            self._batches.pop(batch.key, None)
        for att in batch.atts:  # no cycle for the GC to find (attempt <-> batch)
            att.batch = None
        for i, att in enumerate(batch.atts):
            with self._lock:
                live = self._live.pop(att.key, None)
            if live is None:
                continue  # stopped (_stop) or lost with its worker (_on_worker) meanwhile
            if outcomes is not None:
                self._end(att, *outcomes[i], i)
            else:
                assert error is not None
                self._fail(att, error)
        self._hold(batch)

    def _hold(self, batch: _Batch) -> None:
        """On the client's loop: keep ``batch``'s ended Dask future until the next send,
        or :data:`RELEASE_AFTER_S`, whichever comes first, then release it.

        Dask's client sends its messages at most every 10 ms, and releasing a future
        is a message: the attempts that the ended ones let start (a plan's next wave, a
        fan-in) were sent up to 10 ms later, behind the release. Held, the releases go
        with or after them.
        """
        fut = batch.dask
        if fut is None:
            return
        batch.dask = None
        for att in batch.atts:
            att.dask = None
        self._spent.append(fut)
        if not self._release_armed:
            self._release_armed = True
            with contextlib.suppress(Exception):
                self.link.client.loop.call_later(RELEASE_AFTER_S, self._release)

    def _release(self) -> None:
        """On the client's loop: release the held futures of ended batches."""
        self._release_armed = False
        self._spent.clear()

    def _end(
        self, att: DaskAttempt, what: str, payload: Any, index: int, keep: bool = True
    ) -> None:
        """End ``att`` with ``(what, payload)``, outcome ``index`` of its Dask task
        (``keep``: its value may stay on the cluster; False when it came here in an
        event)."""
        if what == "result":
            took = payload.finished_at - payload.started_at
            seen = self.attempt_s.get(att.action)
            if seen is None:
                # its spread unknown: as wide as its mean, so that a few steady
                # attempts (4) must end before its attempts share a task
                self.attempt_s[att.action] = (took, took)
            else:
                mean, dev = seen
                self.attempt_s[att.action] = (
                    0.8 * mean + 0.2 * took,
                    0.8 * dev + 0.2 * abs(took - mean),
                )
            arena, value = att.arena, payload.value
            size = 0 if value is None else len(value[0])
            # Only an idempotent action's: Dask recomputes a value whose worker was lost
            # when a consumer needs it, which runs the action again, unasked
            keep_from = arena.keep_from if arena is not None and att.idempotent else None
            if keep and arena is not None and keep_from is not None and size >= keep_from:
                token = arena.keep(att.dask, index)  # it stays there for its consumers
                payload = payload._replace(value=(value[0], ((token, _KEPT, size),)))
            att.future.set_result(payload)
        elif what == "not-started":
            att.future.set_exception(NotStarted(payload))
        elif what == "crashed":
            att.future.set_exception(payload)
        else:  # "withdrawn": stopped on its worker, but not here: cannot happen
            withdraw(att.future)

    def _fail(self, att: DaskAttempt, exc: BaseException) -> None:
        """``att``'s Dask task raised ``exc``, or was cancelled or lost."""
        if att.dask is not None and att.dask.status == "cancelled":
            # not by _stop (it pops the attempt first): the scheduler dropped the task,
            # which it does to every task when the client loses it (a lost cluster)
            crash = WorkerCrashed(
                f"the Dask cluster at {self.link.address} lost attempt {att.key!r}"
                f" (the connection to its scheduler was lost, or the task was cancelled"
                f" there): {exc}"
            )
            att.future.set_exception(crash if att.started_at is not None else NotStarted(crash))
        else:
            att.future.set_exception(self._lost(att, exc))

    def _lost(self, att: DaskAttempt, exc: BaseException) -> BaseException:
        """What a Dask error of ``att``'s task means here."""
        from distributed.scheduler import KilledWorker

        if isinstance(exc, KilledWorker):
            crash = WorkerCrashed(f"the Dask worker running {att.key!r} died ({exc})")
            return crash if att.started_at is not None else NotStarted(crash)
        return exc

    def _on_topic(self, event: tuple[float, list[Any]]) -> None:
        """Events from a worker (on the client's loop): ``started`` (of several
        attempts at once), or an attempt's ``ctx.emit`` / ``ctx.progress``."""
        _, (key, kind, at, data) = event
        if kind == "ended":  # outcomes, each with its start if not reported before
            for key, index, blob, start in data:
                with self._lock:
                    att = self._live.pop(key, None)
                if att is not None:  # not stopped, nor lost with its worker, meanwhile
                    if start is not None:
                        att.started_at, att.worker = start
                    what, payload = loads(blob)
                    self._end(att, what, payload, index, keep=False)
            return
        if kind == "started":
            for key, at, running in data:
                att = self._live.get(key)
                if att is not None:
                    att.started_at, att.worker = at, running
                    batch = att.batch
                    if batch is not None and batch.where is None:
                        batch.where = running.split(" pid ", 1)[0]
                    if att.on_started is not None:
                        att.on_started(running, at)
            return
        att = self._live.get(key)
        if att is None:
            return
        if kind in OUTPUT_KINDS and self._output is not None:
            self._output(att.node, kind, loads(data))
        elif att.on_event is not None:
            att.on_event(kind, at, loads(data))

    def _on_worker(self, event: tuple[float, dict[str, Any]]) -> None:
        """The scheduler removed a worker that ran attempts (on the client's loop):
        those that had started there end CRASHED now, and their tasks are cancelled,
        so that Dask, which re-runs a removed worker's tasks elsewhere (an expected
        removal, a graceful retirement, always; an unexpected one below
        ``allowed-failures``), stops the copy it may have started meanwhile."""
        _, msg = event
        if not isinstance(msg, dict) or msg.get("action") != "remove-worker":
            return
        for task_key in msg.get("processing-tasks", ()):
            batch = self._batches.get(str(task_key))
            if batch is None:
                continue
            for att in batch.atts:
                if att.started_at is None:
                    continue
                with self._lock:
                    live = self._live.pop(att.key, None)
                if live is None:
                    continue
                how = "was retired" if msg.get("expected") else "died or lost its scheduler"
                att.future.set_exception(
                    WorkerCrashed(f"the Dask worker {att.worker} running {att.key!r} {how}")
                )
                if len(batch.atts) > 1:  # a copy of the batch elsewhere must skip it
                    self._stop_remote(None, att.key)
            if not any(att.key in self._live for att in batch.atts) and batch.dask is not None:
                self.link.cancel(batch.dask)
