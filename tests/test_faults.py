"""Every fault a parallel action can meet, with real processes and real signals.

Each test names the fault in docs/reliability.md's catalogue. Timing bounds are
generous (these machines are shared); what is asserted is the outcome, the error, and
that no process is left behind (the conftest fixture checks that after every test).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

import actionpool as ap
from actionpool._worker import Task
from actionpool.pools import NotStarted
from actionpool.pools.process import ProcessPool
from actionpool.transfer import dumps_call
from tests import fault_actions as fa
from tests.conftest import make_runner
from tests.helpers import Unpicklable, gone, pid_in, wait_for

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=["local", "dask"])
def shared(request: pytest.FixtureRequest) -> Iterator[ap.Runner]:
    """A runner of each backend (the dask one on the session's LocalCluster): every
    fault ends the same way on both."""
    with make_runner(request.param, request, cpu_workers=2, io_workers=4, timeout_grace=0.5) as r:
        yield r


def run_one(runner: ap.Runner, fn: object, *args: object) -> ap.Outcome:
    plan = ap.Plan()
    node = plan.add(fn, *args)  # type: ignore[arg-type]
    return runner.run(plan).outcome(node)


# ---- raise -------------------------------------------------------------------------------


def test_raise_keeps_type_message_and_remote_traceback(shared: ap.Runner) -> None:
    out = run_one(shared, fa.fail)
    assert out.status is ap.Status.FAILED
    assert type(out.error) is RuntimeError and str(out.error) == "first failure"
    assert out.traceback is not None and "in fail" in out.traceback


# ---- timeouts ------------------------------------------------------------------------------


def test_soft_timeout_raises_action_timeout_inside_python_code(shared: ap.Runner) -> None:
    for fn in (fa.sleep_long, fa.spin_python):
        out = run_one(shared, ap.action(fn, timeout=0.5))
        assert out.status is ap.Status.TIMED_OUT
        assert isinstance(out.error, ap.ActionTimeout)
        assert "ran past its timeout of 0.5 s" in str(out.error)
        # raised inside the action: the remote traceback goes through its frame
        assert out.traceback is not None and fn.__name__ in out.traceback
        assert out.duration_s is not None and 0.4 < out.duration_s < 3.0


def test_soft_timeout_can_be_caught_for_cleanup(shared: ap.Runner, tmp_path: Path) -> None:
    mark = tmp_path / "cleanup"
    out = run_one(shared, ap.action(fa.catch_timeout, timeout=0.3), str(mark))
    assert out.status is ap.Status.TIMED_OUT
    assert mark.read_text() == "cleaned up"


def test_soft_timeout_keeps_the_worker(shared: ap.Runner, tmp_path: Path) -> None:
    mark = tmp_path / "pid"
    out = run_one(shared, ap.action(fa.sleep_long, timeout=0.3), 30.0, str(mark))
    assert out.status is ap.Status.TIMED_OUT
    assert not gone(int(mark.read_text()))  # a soft timeout costs no process


@pytest.mark.parametrize("fn", [fa.block_signals_and_sleep])
def test_hard_timeout_kills_a_worker_that_blocks_signals(
    shared: ap.Runner, tmp_path: Path, fn: Callable[..., None]
) -> None:
    mark = tmp_path / "pid"
    start = time.monotonic()
    out = run_one(shared, ap.action(fn, timeout=0.3), str(mark))
    elapsed = time.monotonic() - start
    assert out.status is ap.Status.TIMED_OUT
    assert isinstance(out.error, ap.ActionTimeout)
    assert "its worker was killed" in str(out.error)
    assert 0.6 <= elapsed < 10  # timeout 0.3 + grace 0.5, not the action's 30 s
    wait_for(lambda: gone(int(mark.read_text())), 5)
    assert run_one(shared, fa.stamp, "after").status is ap.Status.SUCCEEDED  # healed


def test_hard_timeout_kills_a_worker_stuck_in_c_code(shared: ap.Runner, tmp_path: Path) -> None:
    mark = tmp_path / "pid"
    start = time.monotonic()
    out = run_one(shared, ap.action(fa.stuck_in_c, timeout=0.3), str(mark))
    assert out.status is ap.Status.TIMED_OUT and "killed" in str(out.error)
    assert time.monotonic() - start < 10
    wait_for(lambda: gone(int(mark.read_text())), 5)


def test_io_timeout_ends_the_node_and_sets_cancelled(shared: ap.Runner, tmp_path: Path) -> None:
    mark = tmp_path / "seen"
    start = time.monotonic()
    out = run_one(shared, fa.io_until_cancelled, str(mark))
    assert out.status is ap.Status.TIMED_OUT and isinstance(out.error, ap.ActionTimeout)
    assert time.monotonic() - start < 5
    wait_for(mark.exists, 5)  # the thread saw ctx.cancelled() turn True


def test_runner_cancel_sets_cancelled_for_a_running_io_action(tmp_path: Path) -> None:
    # Not a timeout (the action has none): the cancel itself must reach the thread.
    started, mark = tmp_path / "started", tmp_path / "seen"
    with ap.Runner(cpu_workers=1, io_workers=2) as r:
        plan = ap.Plan()
        n = plan.add(fa.io_until_run_cancelled, str(started), str(mark))
        canceller = threading.Thread(target=lambda: (wait_for(started.exists), r.cancel()))
        canceller.start()
        report = r.run(plan)
        canceller.join()
        assert report.outcome(n).status is ap.Status.CANCELLED
        wait_for(lambda: mark.exists() and "True" in mark.read_text(), 10)


def test_async_io_timeout_cancels_the_task(shared: ap.Runner, tmp_path: Path) -> None:
    mark = tmp_path / "cancelled"
    out = run_one(shared, fa.async_sleep, str(mark))
    assert out.status is ap.Status.TIMED_OUT
    # wait for the text, not the file: write_text creates it before writing
    wait_for(lambda: mark.exists() and mark.read_text() == "cancelled", 5)


def test_timed_out_io_threads_do_not_hold_the_runner(tmp_path: Path) -> None:
    start = time.monotonic()
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        slow = ap.action(fa.sleep_long, kind="io", timeout=0.2)
        outs = [run_one(r, slow, 30.0) for _ in range(3)]  # 1 io slot, 3 stuck threads
    assert [o.status for o in outs] == [ap.Status.TIMED_OUT] * 3
    assert time.monotonic() - start < 10  # neither the slots nor the exit waited 30 s


# ---- crashes -------------------------------------------------------------------------------


def test_os_exit_ends_the_node_crashed_with_the_exit_code(shared: ap.Runner) -> None:
    out = run_one(shared, fa.exit_with, 3)
    assert out.status is ap.Status.CRASHED
    assert isinstance(out.error, ap.WorkerCrashed)
    assert out.error.exitcode == 3 and out.error.signal is None
    assert "exited with code 3" in str(out.error) and "exit_with" in str(out.error)


def test_a_submitted_call_that_crashes_its_worker_is_not_run_again(
    shared: ap.Runner, tmp_path: Path
) -> None:
    # No timeout, no on_event: the worker sends no "started" message, and the pool
    # learns from the start page that the call had started (else it would be given to
    # a new worker, where crash_first_time returns "second attempt").
    with pytest.raises(ap.WorkerCrashed, match="exited with code 7 while running it"):
        shared.submit(fa.crash_first_time, str(tmp_path / "flag")).result(timeout=60)


@pytest.mark.zygote_path
def test_a_worker_that_dies_while_a_thread_reads_its_socket_fails_that_call(
    tmp_path: Path,
) -> None:
    # The thread in result() reads its call's reply from the worker's socket itself.
    # The worker exits, but a child of its own session keeps that socket open, so no
    # end of it ever reaches the reader: the pool, told of the exit, must wake the
    # reader and fail the call.
    mark = tmp_path / "keeper"
    with ap.Runner(cpu_workers=1, io_workers=1, memory_floor=0) as r:
        r.submit(abs, -1).result(timeout=30)  # the worker is up and idle
        fut = r.submit(fa.fork_keeper_then_exit, str(mark), 5)
        try:
            started = time.monotonic()
            with pytest.raises(ap.WorkerCrashed, match="exited with code 5"):
                fut.result(timeout=30)
            assert time.monotonic() - started < 20
            assert r.submit(abs, -2).result(timeout=30) == 2  # a fresh worker
        finally:
            keeper = pid_in(mark)
            os.kill(keeper, signal.SIGKILL)


def test_sigkill_ends_the_node_crashed_with_the_signal(shared: ap.Runner) -> None:
    out = run_one(shared, fa.kill_self)
    assert out.status is ap.Status.CRASHED
    assert isinstance(out.error, ap.WorkerCrashed) and out.error.signal == signal.SIGKILL
    assert "SIGKILL" in str(out.error)


def test_segfault_ends_the_node_crashed_with_sigsegv(shared: ap.Runner) -> None:
    out = run_one(shared, fa.segfault)
    assert out.status is ap.Status.CRASHED
    assert isinstance(out.error, ap.WorkerCrashed) and out.error.signal == signal.SIGSEGV


def test_oom_kill_ends_the_node_crashed(shared: ap.Runner, tmp_path: Path) -> None:
    # The kernel's OOM killer ends a process with SIGKILL; we deliver the same signal
    # from outside to a worker that holds memory, as the OOM killer would.
    mark = tmp_path / "pid"
    plan = ap.Plan()
    node = plan.add(fa.allocate_then_wait, str(mark))
    killer = threading.Thread(target=lambda: os.kill(pid_in(mark), signal.SIGKILL))
    killer.start()
    report = shared.run(plan)
    killer.join()
    out = report.outcome(node)
    assert out.status is ap.Status.CRASHED
    assert isinstance(out.error, ap.WorkerCrashed) and out.error.signal == signal.SIGKILL


def test_crash_does_not_affect_nodes_running_beside_it(shared: ap.Runner) -> None:
    plan = ap.Plan()
    beside = plan.add(fa.stamp, "beside", 1.0, name="beside")
    crash = plan.add(fa.segfault, name="crash", after=[plan.add(fa.stamp, "go", 0.2)])
    report = shared.run(plan)
    assert report.outcome(crash).status is ap.Status.CRASHED
    out = report.outcome(beside)
    assert out.status is ap.Status.SUCCEEDED and out.attempts == 1  # not re-run
    assert report[beside][0] == "beside"


def test_pool_heals_after_crashes(shared: ap.Runner) -> None:
    for _ in range(3):
        assert run_one(shared, fa.exit_with, 1).status is ap.Status.CRASHED
    results = list(shared.map(fa.stamp, ["a", "b", "c"]))
    assert [r[0] for r in results] == ["a", "b", "c"]
    assert len(shared.worker_pids()) <= 2  # dead workers were replaced, not added to


def test_the_pool_reports_an_attempt_that_never_started_and_does_not_resend_it() -> None:
    # Whether it runs again is the scheduler's decision, not the pool's.
    pool = ProcessPool(1, 1)
    try:
        call = dumps_call("stamp", fa.stamp, ("x",), {})
        task = Task("run", "stamp", 1, None, False, None, call, "ap-test-none", None, 1)
        att = pool.submit(task)
        (first,) = pool.pids()
        os.killpg(first, signal.SIGKILL)  # before its interpreter could even start
        err = att.future.exception(timeout=30)
        assert isinstance(err, NotStarted) and err.crash.signal == signal.SIGKILL
        assert "before it started it" in str(err) and not att.started
    finally:
        pool.close()


def test_a_call_whose_worker_dies_before_starting_it_is_sent_again(tmp_path: Path) -> None:
    # The first attempt's worker dies before the action is called (here: unpickling
    # its argument kills it, the first time only); nothing of it ran, so it is sent
    # to a fresh worker and succeeds, as a direct call and as a plan node.
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        first = fa.CrashesWhenUnpickledOnce(str(tmp_path / "direct"))
        assert r.submit(fa.stamp, first).result(timeout=60)[0] is not None
        plan = ap.Plan()
        node = plan.add(fa.stamp, fa.CrashesWhenUnpickledOnce(str(tmp_path / "node")))
        out = r.run(plan).outcome(node)
        assert out.status is ap.Status.SUCCEEDED and out.attempts == 1


def test_an_action_whose_module_kills_workers_on_import_ends_crashed_quickly(
    tmp_path: Path,
) -> None:
    # Every worker dies while unpickling the call (importing the action's module), so
    # every attempt would be sent again for ever: the startup guard ends the nodes
    # CRASHED, saying why, and the runner stays usable.
    (tmp_path / "dies_on_import.py").write_text(
        "import os\n"
        "import actionpool._worker as w\n"
        "if w._IN_PROCESS:\n"
        "    os._exit(3)\n"
        "def work(x):\n"
        "    return x\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import dies_on_import  # type: ignore[import-not-found]

        with ap.Runner(cpu_workers=2, io_workers=1, worker_start="fresh") as r:
            started = time.monotonic()
            plan = ap.Plan()
            nodes = [plan.add(dies_on_import.work, i) for i in range(6)]
            report = r.run(plan)
            direct = r.submit(dies_on_import.work, 1).exception(timeout=60)
            took = time.monotonic() - started
            for out in (report.outcome(n) for n in nodes):
                assert out.status is ap.Status.CRASHED and out.attempts <= 1
                assert isinstance(out.error, ap.WorkerCrashed) and out.error.exitcode == 3
                assert "worker processes die before they start it" in str(out.error)
            assert isinstance(direct, ap.WorkerCrashed)
            assert "die before they start" in str(direct)
            assert took < 30, took  # seconds, not a respawn loop
            assert r.submit(fa.stamp, "after").result(timeout=60)[0] == "after"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("dies_on_import", None)


def test_crash_is_retried_only_when_retry_on_names_worker_crashed(
    shared: ap.Runner, tmp_path: Path
) -> None:
    default = run_one(shared, ap.action(fa.crash_first_time, retries=3), str(tmp_path / "a"))
    assert default.status is ap.Status.CRASHED and default.attempts == 1
    consent = ap.action(fa.crash_first_time, retries=3, retry_on=ap.WorkerCrashed)
    out = run_one(shared, consent, str(tmp_path / "b"))
    assert out.status is ap.Status.SUCCEEDED and out.attempts == 2
    assert out.value == "second attempt"


# ---- serialization -----------------------------------------------------------------------


def test_unpicklable_argument_fails_only_its_node(shared: ap.Runner) -> None:
    plan = ap.Plan()
    bad = plan.add(fa.stamp, Unpicklable(), name="bad")
    ok = plan.add(fa.stamp, "ok", name="ok")
    report = shared.run(plan)
    err = report.outcome(bad).error
    assert isinstance(err, ap.SerializationError)
    assert "node 'bad'" in str(err) and "argument 0" in str(err)
    assert report.outcome(ok).status is ap.Status.SUCCEEDED


def test_unpicklable_result_fails_only_its_node(shared: ap.Runner) -> None:
    plan = ap.Plan()
    bad = plan.add(fa.return_lock, name="bad")
    ok = plan.add(fa.stamp, "ok", name="ok")
    report = shared.run(plan)
    err = report.outcome(bad).error
    assert isinstance(err, ap.SerializationError) and "return value" in str(err)
    assert report.outcome(ok).status is ap.Status.SUCCEEDED


def test_unpicklable_exception_arrives_as_remote_error(shared: ap.Runner) -> None:
    out = run_one(shared, fa.raise_unrebuildable)
    assert out.status is ap.Status.FAILED
    assert isinstance(out.error, ap.RemoteError)
    assert out.error.type_name.endswith("NeedsTwoArgs")
    assert out.error.message == "a=1 b=2"
    assert "raise NeedsTwoArgs(1, 2)" in out.error.remote_traceback


# ---- cancellation ------------------------------------------------------------------------


def test_runner_cancel_from_another_thread(tmp_path: Path) -> None:
    mark = tmp_path / "pid"
    with ap.Runner(cpu_workers=2, io_workers=2) as r:
        plan = ap.Plan()
        cpu = plan.add(fa.sleep_long, 30.0, str(mark), name="cpu")
        io = plan.add(ap.action(fa.sleep_long, kind="io"), 30.0, name="io")
        later = plan.add(fa.stamp, "later", name="later", after=[cpu])
        canceller = threading.Thread(target=lambda: (pid_in(mark), r.cancel()))
        canceller.start()
        start = time.monotonic()
        report = r.run(plan)
        assert time.monotonic() - start < 10
        canceller.join()
        assert report.status is ap.RunStatus.CANCELLED
        for n in (cpu, io, later):
            assert report.outcome(n).status is ap.Status.CANCELLED
        assert "runner.cancel()" in str(report.outcome(cpu).error)
        assert gone(int(mark.read_text()))  # cancel() returned after the kill
        # no on_event: the worker sent no "started"; the pool read it from the start page
        assert report.outcome(cpu).worker == int(mark.read_text())
        assert report.outcome(cpu).started_at is not None


def test_runner_is_usable_after_cancel(tmp_path: Path) -> None:
    mark = tmp_path / "pid"
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        fut = r.submit(fa.sleep_long, 30.0, str(mark))
        pid_in(mark)
        r.cancel()
        with pytest.raises(CancelledError):
            fut.result(timeout=10)
        assert r.submit(fa.stamp, "again").result(timeout=30)[0] == "again"
        plan = ap.Plan()
        n = plan.add(fa.stamp, "plan")
        assert r.run(plan)[n][0] == "plan"


def test_keyboard_interrupt_in_the_waiting_thread(tmp_path: Path) -> None:
    # What Jupyter's "interrupt kernel" and a terminal's Ctrl-C both do: SIGINT to
    # the process, KeyboardInterrupt in the thread waiting in run().
    mark = tmp_path / "pid"
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        plan = ap.Plan()
        plan.add(fa.sleep_long, 30.0, str(mark))
        threading.Thread(target=lambda: (pid_in(mark), os.kill(os.getpid(), signal.SIGINT))).start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt) as info:
            r.run(plan)
        assert time.monotonic() - start < 10
        report = info.value.report  # type: ignore[attr-defined]
        assert report.status is ap.RunStatus.CANCELLED
        assert "KeyboardInterrupt" in str(report.outcomes[0].error)
        wait_for(lambda: gone(int(mark.read_text())), 5)
        assert r.submit(fa.stamp, "still usable").result(timeout=30)[0] == "still usable"


SCRIPT = """
import sys, time
import actionpool as ap
from tests import fault_actions as fa

with ap.Runner(cpu_workers=2, io_workers=2) as r:
    plan = ap.Plan()
    plan.add(fa.sleep_long, 60.0, sys.argv[1])
    plan.add(fa.sleep_long, 60.0, sys.argv[2])
    r.run(plan)
"""


def start_script(tmp_path: Path) -> tuple[subprocess.Popen[str], list[int]]:
    marks = [tmp_path / "w1", tmp_path / "w2"]
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.Popen(
        [sys.executable, str(script), *map(str, marks)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, [pid_in(m) for m in marks]


def test_ctrl_c_in_a_script(tmp_path: Path) -> None:
    proc, workers = start_script(tmp_path)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    for pid in workers:
        wait_for(lambda pid=pid: gone(pid), 5)


def test_parent_sigkill_leaves_no_worker(tmp_path: Path) -> None:
    proc, workers = start_script(tmp_path)
    proc.kill()
    proc.wait(timeout=10)
    for pid in workers:
        wait_for(lambda pid=pid: gone(pid), 5)


def test_leaving_the_with_block_early_stops_running_actions(tmp_path: Path) -> None:
    mark = tmp_path / "pid"
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="user code failed"), ap.Runner(cpu_workers=1) as r:
        fut = r.submit(fa.sleep_long, 30.0, str(mark))
        pid_in(mark)
        raise RuntimeError("user code failed")
    assert time.monotonic() - start < 10
    assert gone(int(mark.read_text()))
    assert fut.cancelled() or isinstance(fut.exception(timeout=0), CancelledError)


def test_arun_cancelled_cancels_the_run(tmp_path: Path) -> None:
    mark = tmp_path / "pid"
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        plan = ap.Plan()
        plan.add(fa.sleep_long, 30.0, str(mark))

        async def main() -> None:
            task = asyncio.create_task(r.arun(plan))
            while not mark.exists():
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main())
        wait_for(lambda: gone(int(mark.read_text())), 5)
        assert r.submit(fa.stamp, "usable").result(timeout=30)[0] == "usable"


def test_fail_fast_stops_running_nodes(shared: ap.Runner, tmp_path: Path) -> None:
    mark = tmp_path / "pid"
    plan = ap.Plan()
    slow = plan.add(fa.sleep_long, 30.0, str(mark), name="slow")
    bad = plan.add(fa.fail, name="bad", after=[plan.add(fa.stamp, "wait", 0.3)])
    start = time.monotonic()
    report = shared.run(plan, failure="fail_fast")
    assert time.monotonic() - start < 10
    assert report.outcome(bad).status is ap.Status.FAILED
    assert report.outcome(slow).status is ap.Status.CANCELLED
    assert "fail_fast after node 'bad' failed" in str(report.outcome(slow).error)
    assert report.status is ap.RunStatus.FAILED
    wait_for(lambda: gone(int(mark.read_text())), 5)


# ---- race and quorum ---------------------------------------------------------------------


def test_race_takes_the_first_success_and_cancels_the_rest(
    shared: ap.Runner, tmp_path: Path
) -> None:
    mark = tmp_path / "pid"
    plan = ap.Plan()
    slow = plan.add(fa.sleep_long, 30.0, str(mark), name="slow")
    failing = plan.add(fa.fail, name="failing")
    fast = plan.add(fa.stamp, "fast", 0.3, name="fast")
    winner = plan.race([slow, failing, fast], name="first")
    after = plan.add(lambda v: v[0], winner, name="after")
    start = time.monotonic()
    report = shared.run(plan)
    assert time.monotonic() - start < 10
    assert report[after] == "fast"  # a failure does not win
    assert report.outcome(slow).status is ap.Status.CANCELLED
    assert "race 'first' was decided by 'fast'" in str(report.outcome(slow).error)
    assert report.status is ap.RunStatus.PARTIAL  # "failing" failed; losers do not count
    wait_for(lambda: gone(int(mark.read_text())), 5)


def test_race_fails_when_every_input_fails(shared: ap.Runner) -> None:
    plan = ap.Plan()
    r = plan.race([plan.add(fa.fail), plan.add(fa.exit_with, 2)])
    dep = plan.add(fa.stamp, r)
    report = shared.run(plan)
    assert report.outcome(r).status is ap.Status.FAILED
    assert "only 0 of its 2 inputs succeeded" in str(report.outcome(r).error)
    assert report.outcome(dep).status is ap.Status.SKIPPED


def test_quorum_takes_the_first_k_in_completion_order(shared: ap.Runner) -> None:
    plan = ap.Plan()
    ins = [
        plan.add(ap.action(fa.stamp, kind="io"), tag, delay, name=tag)
        for tag, delay in [("c", 0.6), ("a", 0.0), ("b", 0.3), ("d", 30.0)]
    ]
    q = plan.quorum(2, ins, name="q")
    report = shared.run(plan)
    assert [v[0] for v in report[q]] == ["a", "b"]
    assert report.outcome("d").status is ap.Status.CANCELLED
    assert report.status is ap.RunStatus.SUCCEEDED


def test_quorum_fails_once_it_cannot_be_reached(shared: ap.Runner) -> None:
    plan = ap.Plan()
    q = plan.quorum(2, [plan.add(fa.fail), plan.add(fa.fail), plan.add(fa.stamp, "x")])
    assert shared.run(plan).outcome(q).status is ap.Status.FAILED


def test_race_and_quorum_reject_bad_input() -> None:
    plan = ap.Plan()
    a = plan.add(fa.stamp, "a")
    with pytest.raises(ap.PlanError, match="at least one input"):
        plan.race([])
    with pytest.raises(ap.PlanError, match="k must be an int from 1 to 1"):
        plan.quorum(2, [a])
    with pytest.raises(ap.PlanError, match="not a node of this plan"):
        plan.race([ap.Plan().add(fa.stamp, "b")])


def test_a_worker_that_cannot_read_a_message_exits_instead_of_hanging() -> None:
    # A worker must never sit alive and deaf: a message it cannot unpickle (say, a
    # version skew between parent and worker) ends it, and the pool sees it die.
    pool = ProcessPool(1, 1)
    try:
        call = dumps_call("stamp", fa.stamp, ("x",), {})
        task = Task("run", "stamp", 1, None, False, None, call, "ap-test-none", None, 1)
        assert pool.submit(task).future.result(timeout=30).ok
        (pid,) = pool.pids()
        with pool._lock:
            (worker,) = pool._workers.values()
            worker.conn.send_bytes(b"not a pickle")
        # the pool has seen it go (a call sent before that goes to the dead worker and
        # ends NotStarted, which a runner sends again elsewhere)
        wait_for(lambda: gone(pid) and pid not in pool.pids(), 10)
        assert pool.submit(task).future.result(timeout=30).ok  # a fresh worker took over
    finally:
        pool.close()


# ---- regressions found by the fault-latency review ---------------------------------------


def test_an_io_action_that_notices_its_deadline_and_returns_is_still_timed_out(
    shared: ap.Runner,
) -> None:
    for _ in range(5):  # it used to race: returning before the timer fired "succeeded"
        out = run_one(shared, fa.io_polls_fast)
        assert out.status is ap.Status.TIMED_OUT, out


def test_a_cpu_action_that_catches_its_soft_timeout_and_returns_is_timed_out(
    shared: ap.Runner,
) -> None:
    out = run_one(shared, ap.action(fa.catch_timeout_and_return, timeout=0.3))
    assert out.status is ap.Status.TIMED_OUT
    assert "ActionTimeout was raised inside it" in str(out.error)


def test_a_crashed_or_cancelled_node_keeps_its_start_time_and_worker(
    shared: ap.Runner, tmp_path: Path
) -> None:
    out = run_one(shared, fa.segfault)
    # a pid here; on a cluster, the Dask worker's address and the pid there
    assert out.started_at is not None
    assert isinstance(out.worker, int if shared.backend == "local" else str)
    assert out.duration_s is not None


def test_serialization_errors_are_not_retried(shared: ap.Runner) -> None:
    out = run_one(shared, ap.action(fa.return_lock, retries=3))
    assert out.status is ap.Status.FAILED and out.attempts == 1


def test_a_blocking_async_action_does_not_stall_the_scheduler(shared: ap.Runner) -> None:
    plan = ap.Plan()
    blocker = plan.add(fa.blocks_its_loop, name="blocker")  # blocks its loop for 1.5 s
    quick = plan.add(fa.stamp, "quick", name="quick")
    t0 = time.time()
    report = shared.run(plan)
    finished = report.outcome(quick).finished_at
    assert finished is not None and finished - t0 < 1.0  # did not wait for the blocker
    assert report.outcome(blocker).status is ap.Status.TIMED_OUT


def test_map_finds_the_item_that_crashed_a_chunk_and_keeps_the_others(
    shared: ap.Runner,
) -> None:
    got: list[int] = []
    with pytest.raises(ap.WorkerCrashed) as info:
        for y in shared.map(fa.crash_on, range(40), bad=17, chunksize=10):
            got.append(y)
    assert got == [x * 10 for x in range(17)]  # every item before the crash, in order
    assert "crash_on" in str(info.value)


def test_map_does_not_rerun_a_crashed_chunk_of_a_non_idempotent_action(
    shared: ap.Runner,
) -> None:
    once = ap.action(fa.crash_on, idempotent=False)
    with pytest.raises(ap.WorkerCrashed, match="not idempotent"):
        list(shared.map(once, range(40), bad=17, chunksize=10))


def test_map_refuses_chunks_for_per_call_options(shared: ap.Runner) -> None:
    with pytest.raises(ValueError, match="'sleep_long' has a timeout"):
        shared.map(ap.action(fa.sleep_long, timeout=1), [1.0], chunksize=4)


def test_keyboard_interrupt_while_iterating_map_stops_its_running_calls(
    tmp_path: Path,
) -> None:
    mark = tmp_path / "pid"
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        it = r.map(fa.sleep_long, [30.0], [str(mark)], chunksize=1)
        threading.Thread(target=lambda: (pid_in(mark), os.kill(os.getpid(), signal.SIGINT))).start()
        with pytest.raises(KeyboardInterrupt):
            next(it)
        wait_for(lambda: gone(int(mark.read_text())), 5)


def test_an_action_that_replaces_the_alarm_handler_does_not_disarm_later_timeouts() -> None:
    with ap.Runner(cpu_workers=1, io_workers=1, timeout_grace=5.0) as r:
        assert run_one(r, fa.replace_alarm_handler).value == "replaced"
        start = time.monotonic()
        out = run_one(r, ap.action(fa.sleep_long, timeout=0.3), 30.0)
        assert out.status is ap.Status.TIMED_OUT
        assert time.monotonic() - start < 3.0  # the soft timeout, not the 5 s grace


def test_a_cancelled_node_keeps_its_start_time_and_worker(tmp_path: Path) -> None:
    mark = tmp_path / "pid"
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        plan = ap.Plan()
        n = plan.add(fa.sleep_long, 30.0, str(mark))
        canceller = threading.Thread(target=lambda: (pid_in(mark), r.cancel()))
        canceller.start()
        out = r.run(plan).outcome(n)
        canceller.join()
    assert out.status is ap.Status.CANCELLED
    assert out.started_at is not None and out.worker == int(mark.read_text())


def test_leaving_a_map_early_stops_its_running_calls(tmp_path: Path) -> None:
    marks = [tmp_path / f"m{i}" for i in range(2)]
    with ap.Runner(cpu_workers=2, io_workers=1, memory_floor=0) as r:
        # Both workers up and idle: the map's first two calls are sent by submit itself
        # (no record: CallRun.start_direct), the third waits for the scheduler; leaving
        # the map must stop both kinds. (The next test starts from cold workers.)
        warm = [r.submit(fa.stamp, "warm", 0.3) for _ in range(2)]
        assert [f.result(timeout=30)[0] for f in warm] == ["warm", "warm"]
        it = r.map(fa.sleep_long, [0.0, 30.0, 30.0], [None, *map(str, marks)], chunksize=1)
        assert next(it) == "woke"
        pids = [pid_in(m) for m in marks]
        it.close()  # the consumer breaks out of its loop
        for pid in pids:
            wait_for(lambda pid=pid: gone(pid), 5)


def test_breaking_out_of_a_for_loop_over_a_map_stops_its_running_calls(tmp_path: Path) -> None:
    marks = [tmp_path / f"m{i}" for i in range(2)]
    with ap.Runner(cpu_workers=2, io_workers=1) as r:
        pids = []
        for value in r.map(fa.sleep_long, [0.0, 30.0, 30.0], [None, *map(str, marks)]):
            assert value == "woke"
            pids = [pid_in(m) for m in marks]
            break  # the loop's iterator is dropped here, nothing else holds the map
        for pid in pids:
            wait_for(lambda pid=pid: gone(pid), 5)


def test_a_call_that_kills_every_worker_while_unpickling_ends_crashed(shared: ap.Runner) -> None:
    # It never starts, so it is handed to a fresh worker, but not for ever.
    out = run_one(shared, fa.stamp, fa.CrashesWhenUnpickled())
    assert out.status is ap.Status.CRASHED
    assert isinstance(out.error, ap.WorkerCrashed) and out.error.exitcode == 11
    assert "worker processes die before they start it" in str(out.error)
    assert "3 deaths in a row" in str(out.error)
    assert run_one(shared, fa.stamp, "after").status is ap.Status.SUCCEEDED


def test_the_timeout_counts_from_the_call_not_from_unpickling() -> None:
    # The first attempt on a fresh worker imports the test modules while unpickling
    # (~0.3 s here); a 0.5 s timeout must still leave the action its 0.5 s.
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        out = run_one(r, ap.action(fa.stamp, timeout=0.5), "x", 0.35)
        assert out.status is ap.Status.SUCCEEDED
