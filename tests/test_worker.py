"""The worker side (_worker.py): execute / execute_async on tasks built as the
scheduler builds them, errors that travel (or do not), the soft timeout in a real
worker process, and the watchdog that ends a worker whose parent died."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import actionpool as ap
from actionpool._worker import Result, execute, execute_async, rebuild_error
from tests import fault_actions as fa
from tests import helpers as h

REPO = Path(__file__).resolve().parents[1]

# ---- actions (module level: the task pickles them by reference) ---------------------


def grow(xs: list[int]) -> list[int]:
    xs.append(len(xs))
    return xs


def grow_state(ctx: ap.Context) -> list[str]:
    ctx.state["items"].append(ctx.node)
    return list(ctx.state["items"])


def context_fields(ctx: ap.Context) -> tuple[str, str, int, bool]:
    return ctx.node, ctx.run_id, ctx.attempt, ctx.cancelled()


def update_keys(ctx: ap.Context) -> None:
    ctx.update(a=1)
    ctx.update({"b": [2]}, a=3)


def update_with_a_lock(ctx: ap.Context) -> None:
    ctx.update(fine=1, lock=threading.Lock())


def report_events(ctx: ap.Context) -> str:
    ctx.emit({"loss": 0.5})
    ctx.progress(1, 3)
    ctx.emit("last")
    return "done"


def wait_for_cancelled(ctx: ap.Context) -> bool:
    """Poll ``ctx.cancelled()`` for up to 30 s; what it said at the end."""
    deadline = time.monotonic() + 30
    while not ctx.cancelled() and time.monotonic() < deadline:
        time.sleep(0.005)
    return ctx.cancelled()


class HoldsALock(Exception):
    """An exception that cannot be pickled at all."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_locked() -> None:
    raise HoldsALock("locked inside")


def exit_the_interpreter() -> None:
    sys.exit(3)


async def async_double(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


async def async_boom() -> None:
    await asyncio.sleep(0)
    raise KeyError("async key")


async def async_forever(started: str) -> None:
    h.write_atomic(started, "started")
    await asyncio.sleep(60)


def timed_out_where(mark: str) -> str:
    """Sleep into the soft timeout; record what was raised, and where."""
    try:
        time.sleep(30)
    except ap.ActionTimeout as exc:
        h.write_atomic(mark, f"{type(exc).__name__} in {os.getpid()}: {exc}")
        raise
    return "never"


# ---- execute: private copies ----------------------------------------------------------


def test_each_execution_gets_its_own_copy_of_the_arguments() -> None:
    data = [0]
    task = h.task_for(grow, (data,))
    # the same task run twice: the second does not see what the first appended
    assert h.result_value(execute(task)) == [0, 1]
    assert h.result_value(execute(task)) == [0, 1]
    assert data == [0]  # the caller's object is untouched


def test_each_execution_gets_its_own_copy_of_the_state() -> None:
    state = {"items": ["start"]}
    task = h.task_for(grow_state, node="n1", state=state)
    assert h.result_value(execute(task)) == ["start", "n1"]
    assert h.result_value(execute(task)) == ["start", "n1"]
    assert state == {"items": ["start"]}


def test_the_context_carries_the_tasks_node_run_and_attempt() -> None:
    task = h.task_for(context_fields, node="who", attempt=3)
    assert h.result_value(execute(task)) == ("who", "test-run", 3, False)


def test_state_updates_come_back_as_deltas() -> None:
    result = execute(h.task_for(update_keys))
    assert result.ok and result.deltas is not None
    data, buffers = result.deltas
    assert buffers == () and pickle.loads(data) == {"a": 3, "b": [2]}
    assert execute(h.task_for(grow, ([],))).deltas is None  # no Context, no deltas


def test_events_reach_the_sink_in_order() -> None:
    seen: list[tuple[str, Any]] = []
    result = execute(h.task_for(report_events), lambda kind, at, data: seen.append((kind, data)))
    assert h.result_value(result) == "done"
    assert seen == [("emitted", {"loss": 0.5}), ("progress", (1, 3)), ("emitted", "last")]


def test_the_deadline_and_the_cancel_event_turn_ctx_cancelled_true() -> None:
    # in a thread there is no alarm: the action sees its deadline through the Context
    start = time.monotonic()
    assert h.result_value(execute(h.task_for(wait_for_cancelled, timeout=0.2))) is True
    assert time.monotonic() - start < 25  # its deadline, not the 30 s poll's end
    cancel = threading.Event()
    timer = threading.Timer(0.1, cancel.set)
    timer.start()
    try:
        assert h.result_value(execute(h.task_for(wait_for_cancelled), cancel=cancel)) is True
    finally:
        timer.cancel()


# ---- execute: errors ----------------------------------------------------------------


def _travels(result: Result) -> None:
    """A Result holds only bytes and builtins: sending it cannot fail."""
    assert pickle.loads(pickle.dumps(result, protocol=5)) == result


def test_an_exception_comes_back_with_its_type_message_and_traceback() -> None:
    result = execute(h.task_for(h.boom, ("bad input 42",)))
    _travels(result)
    assert not result.ok and result.value is None
    assert (result.error_type, result.error_message) == ("ValueError", "bad input 42")
    assert "in boom" in result.traceback
    err = rebuild_error(result)
    assert type(err) is ValueError and str(err) == "bad input 42"


def test_even_system_exit_ends_as_the_attempts_failure() -> None:
    result = execute(h.task_for(exit_the_interpreter))
    assert not result.ok and result.error_type == "SystemExit"
    assert isinstance(rebuild_error(result), SystemExit)


def test_an_unpicklable_return_value_is_a_serialization_error_naming_the_node() -> None:
    result = execute(h.task_for(fa.return_lock, node="locker"))
    _travels(result)
    assert not result.ok
    err = rebuild_error(result)
    assert isinstance(err, ap.SerializationError)
    assert "node 'locker'" in str(err) and "return value" in str(err) and "lock" in str(err)


def test_an_unpicklable_state_update_is_a_serialization_error_naming_the_key() -> None:
    result = execute(h.task_for(update_with_a_lock, node="updater"))
    _travels(result)
    err = rebuild_error(result)
    assert isinstance(err, ap.SerializationError)
    assert "node 'updater'" in str(err) and "state update 'lock'" in str(err)


def test_an_exception_that_cannot_be_pickled_comes_back_as_remote_error() -> None:
    result = execute(h.task_for(raise_locked))
    _travels(result)
    assert not result.ok and result.error is None
    err = rebuild_error(result)
    assert isinstance(err, ap.RemoteError)
    assert err.type_name == f"{__name__}.HoldsALock" and err.message == "locked inside"
    assert "raise_locked" in err.remote_traceback


def test_an_exception_that_cannot_be_rebuilt_comes_back_as_remote_error() -> None:
    # it pickles, but its __init__ takes two arguments: unpickling it fails here
    result = execute(h.task_for(fa.raise_unrebuildable))
    _travels(result)
    assert result.error is not None
    err = rebuild_error(result)
    assert isinstance(err, ap.RemoteError)
    assert "NeedsTwoArgs" in err.type_name and err.message == "a=1 b=2"


def test_a_call_that_cannot_be_unpickled_names_the_node() -> None:
    task = h.task_for(h.add, (1, 2), node="broken")
    task = task._replace(call=(b"not a pickle", ()))
    err = rebuild_error(execute(task))
    assert isinstance(err, ap.SerializationError) and "node 'broken'" in str(err)


# ---- execute_async --------------------------------------------------------------------


def test_execute_async_awaits_the_action_on_the_callers_loop() -> None:
    assert h.result_value(asyncio.run(execute_async(h.task_for(async_double, (21,))))) == 42
    result = asyncio.run(execute_async(h.task_for(async_boom)))
    err = rebuild_error(result)
    assert isinstance(err, KeyError) and err.args == ("async key",)


def test_cancelling_execute_async_cancels_the_action(tmp_path: Path) -> None:
    started = tmp_path / "started"

    async def main() -> None:
        run = asyncio.ensure_future(execute_async(h.task_for(async_forever, (str(started),))))
        deadline = time.monotonic() + 30
        while not started.exists():
            assert time.monotonic() < deadline, "the async action never started"
            await asyncio.sleep(0.005)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    asyncio.run(main())


# ---- in a worker process ----------------------------------------------------------------


@pytest.fixture(scope="module")
def one_worker() -> Iterator[ap.Runner]:
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        yield r


def test_the_soft_timeout_raises_action_timeout_inside_the_action_in_its_worker(
    one_worker: ap.Runner, tmp_path: Path
) -> None:
    mark = tmp_path / "raised"
    plan = ap.Plan()
    node = plan.add(ap.action(timed_out_where, timeout=0.3), str(mark), name="slow")
    out = one_worker.run(plan).outcome(node)
    assert out.status is ap.Status.TIMED_OUT
    assert isinstance(out.error, ap.ActionTimeout)
    assert "node 'slow' ran past its timeout of 0.3 s" in str(out.error)
    worker = out.worker
    assert isinstance(worker, int) and worker != os.getpid()
    # raised by SIGALRM in the worker's main thread, inside the action
    assert mark.read_text().startswith(f"ActionTimeout in {worker}: node 'slow'")
    # a soft timeout costs no process
    assert one_worker.submit(h.pid).result(timeout=30) == worker


def test_the_alarm_of_an_attempt_that_ended_in_time_does_not_reach_the_next(
    one_worker: ap.Runner,
) -> None:
    plan = ap.Plan()
    quick = plan.add(ap.action(h.pid, timeout=0.3))
    worker = one_worker.run(plan)[quick]
    # on the same (only) worker, a call with no timeout runs past that 0.3 s
    assert one_worker.submit(h.sleep_then, worker, 0.6).result(timeout=30) == worker


_ORPHAN_SCRIPT = """
import json, os, sys
import psutil
import actionpool as ap
from tests import helpers as h

mark = sys.argv[1]
r = ap.Runner(cpu_workers=1, io_workers=1)
r.submit(h.start_child_then_sleep, mark, 60)
h.wait_for_path(mark, "the long action")
tree = [(p.pid, p.create_time()) for p in psutil.Process().children(recursive=True)]
print(json.dumps(tree), flush=True)
os._exit(0)  # no close, no atexit: as if killed
"""


def _same_process(pid: int, created: float) -> psutil.Process | None:
    """The live process ``pid`` if it is still the one created at ``created``."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - created) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def test_a_worker_whose_parent_died_exits_with_what_its_action_started(tmp_path: Path) -> None:
    mark, out = tmp_path / "pids", tmp_path / "out"
    # its output goes to a file: a pipe would stay open in the orphans, and reading
    # it to its end would wait for them to exit on their own
    with open(out, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_ORPHAN_SCRIPT), str(mark)],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            },
        )
        assert proc.wait(timeout=120) == 0, out.read_text()
    tree = {pid: created for pid, created in json.loads(out.read_text().splitlines()[-1])}
    worker, child = map(int, mark.read_text().split())
    assert worker in tree and child in tree  # the worker, and the process its action started
    deadline = time.monotonic() + 30
    left: list[psutil.Process] = []
    try:
        while True:
            left = [p for pid, t in tree.items() if (p := _same_process(pid, t)) is not None]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert not left, f"still running 30 s after their parent died: {left}"
    finally:
        for p in left:  # orphans are init's children now: no fixture would see them
            with contextlib.suppress(psutil.Error):
                p.kill()
