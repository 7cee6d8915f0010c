"""The Dask backend on a real LocalCluster: the same semantics as the local runner.

Most tests use the session's cluster (conftest.dask_client: 3 worker processes of one
thread); the ones about starting, sizing and bad addresses make their own.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil
import pytest

import actionpool as ap
from tests import fault_actions as fa
from tests import helpers as h
from tests.conftest import make_runner

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow


def dask_runner(client: Any, **kwargs: Any) -> ap.Runner:
    return ap.Runner(backend="dask", client=client, **kwargs)


@contextlib.contextmanager
def cluster_runner(**cluster_kw: Any) -> Iterator[tuple[Any, Any, ap.Runner]]:
    """A LocalCluster of the test's own (loopback, one thread per worker, no
    dashboard), its client, and a dask runner on it; all closed after."""
    cluster_kw.setdefault("threads_per_worker", 1)
    cluster_kw.setdefault("dashboard_address", "127.0.0.1:0")
    with (
        distributed.LocalCluster(host="127.0.0.1", **cluster_kw) as cluster,
        distributed.Client(cluster) as client,
        dask_runner(client) as r,
    ):
        yield cluster, client, r


def in_background(r: ap.Runner, plan: ap.Plan) -> Future[ap.Report]:
    """``r.run(plan)`` on a thread of its own, while the test acts on the run."""
    fut: Future[ap.Report] = Future()

    def run() -> None:
        try:
            fut.set_result(r.run(plan))
        except BaseException as exc:
            fut.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return fut


def worker_pids(client: Any) -> dict[str, int]:
    return {addr: int(pid) for addr, pid in client.run(os.getpid).items()}


def dask_worker_of(pid: int, client: Any) -> int:
    """The Dask worker process above the action's process ``pid``."""
    workers = set(worker_pids(client).values())
    for parent in psutil.Process(pid).parents():
        if parent.pid in workers:
            return parent.pid
    raise AssertionError(f"process {pid} runs under none of the Dask workers {workers}")


def wait_start_reported(r: ap.Runner) -> None:
    """Until the runner has heard from the cluster that an attempt started. A quiet
    attempt's worker reports its start once it has run ``STARTED_DELAY_S``: one whose
    worker dies before that counts as not started, and is sent again."""
    pools = r._backend.link.pools  # type: ignore[attr-defined]

    def reported() -> bool:
        return any(att.started_at is not None for p in pools for att in list(p._live.values()))

    h.wait_for(reported, timeout=60, what="an attempt's start reported to the runner")


def emit_then_wait(ctx: ap.Context, release: str) -> int:
    ctx.emit("first")
    ctx.progress(1, 2)
    h.wait_for_path(release, "the test's release, sent when 'first' reached on_event")
    return os.getpid()


def append_line(path: str) -> int:
    with open(path, "a") as f:
        f.write("ran\n")
    return os.getpid()


@ap.action(timeout=0.5)
def ignores_its_timeout(mark: str) -> None:
    h.write_atomic(mark, str(os.getpid()))
    while True:
        with contextlib.suppress(ap.ActionTimeout):  # and on: only the hard timeout stops it
            time.sleep(30)


def pid_then_sleep(mark: str) -> str:
    h.write_atomic(mark, str(os.getpid()))
    time.sleep(60)
    return "woke"


def here() -> int:
    return os.getpid()


# ---- starting, sizing, bad addresses ------------------------------------------------------


def test_a_runner_starts_its_own_local_cluster_sized_and_restores_the_blas_variables() -> None:
    os.environ["OMP_NUM_THREADS"] = "3"
    os.environ.pop("MKL_NUM_THREADS", None)
    try:
        with ap.Runner(backend="dask", cpu_workers=2) as r:
            # LocalCluster set all three to 1 in this process; the runner put them back
            assert os.environ.get("OMP_NUM_THREADS") == "3"
            assert "MKL_NUM_THREADS" not in os.environ
            assert r.sizing.backend == "dask" and r.sizing.cluster_workers == 2
            assert r.sizing.cpu_workers == 2 and r.sizing.memory_budget > 0
            assert "LocalCluster started for this runner" in r.sizing.reason
            assert str(r.sizing).startswith("dask: 2 workers")
            assert r.submit(h.square, 7).result(timeout=60) == 49
            assert r.submit(here).result(timeout=60) != os.getpid()
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)


def test_an_unreachable_address_fails_within_the_connect_timeout_naming_it() -> None:
    import dask

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    address = f"tcp://127.0.0.1:{port}"
    t0 = time.monotonic()
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
        pytest.raises(OSError, match=f"Dask scheduler at '{address}' within 1s"),
    ):
        ap.Runner(backend="dask", address=address)
    assert time.monotonic() - t0 < 20


def test_a_cluster_without_workers_fails_each_node_clearly_instead_of_hanging() -> None:
    with cluster_runner(n_workers=0) as (_, _, r):
        with pytest.raises(RuntimeError, match="has no workers: node 'square'"):
            r.submit(h.square, 2).result(timeout=60)
        plan = ap.Plan()
        plan.add(h.square, 3, name="sq")
        report = r.run(plan)
        assert report.outcome("sq").status is ap.Status.FAILED
        assert "has no workers" in str(report.outcome("sq").error)


def test_cpu_workers_with_a_cluster_of_ones_own_is_refused(dask_client: Any) -> None:
    with pytest.raises(ValueError, match="cpu_workers sizes the LocalCluster"):
        ap.Runner(backend="dask", client=dask_client, cpu_workers=2)


def test_sizing_reports_the_session_cluster(dask_client: Any) -> None:
    with dask_runner(dask_client) as r:
        assert r.sizing.cluster_workers == 3 and r.sizing.cpu_workers == 3
        assert dask_client.scheduler.address in r.sizing.reason


# ---- routing, keys, events ----------------------------------------------------------------


def test_io_actions_stay_here_unless_io_on_cluster(dask_client: Any) -> None:
    io_here = ap.action(here, kind="io")
    with dask_runner(dask_client) as r:
        assert r.submit(io_here).result(timeout=60) == os.getpid()
        assert r.submit(here).result(timeout=60) != os.getpid()
    with dask_runner(dask_client, io_on_cluster=True) as r:
        assert r.submit(io_here).result(timeout=60) != os.getpid()


def test_every_call_runs_even_when_identical(dask_client: Any, tmp_path: Path) -> None:
    log = tmp_path / "log"
    with dask_runner(dask_client) as r:
        futs = [r.submit(append_line, str(log)) for _ in range(4)]
        for f in futs:
            f.result(timeout=60)
    assert log.read_text().count("ran") == 4  # Dask deduplicated none of them


def test_events_reach_on_event_while_the_action_runs(dask_client: Any, tmp_path: Path) -> None:
    release = tmp_path / "release"
    seen: list[tuple[str, Any]] = []

    def on_event(ev: ap.Event) -> None:
        seen.append((ev.kind, ev.data))
        if ev.kind == "emitted" and ev.data == "first":
            release.write_text("go")  # the action waits for this: the event came live

    plan = ap.Plan()
    plan.add(emit_then_wait, str(release), name="talk")
    with dask_runner(dask_client) as r:
        report = r.run(plan, on_event=on_event)
    out = report.outcome("talk")
    assert out.status is ap.Status.SUCCEEDED and out.pool == "dask"
    assert isinstance(out.worker, str) and out.worker.startswith("tcp://127.0.0.1:")
    kinds = [k for k, _ in seen]
    assert kinds.index("started") < kinds.index("emitted") < kinds.index("progress")
    assert kinds[-1] == "finished"


def test_a_progress_bar_counts_cluster_nodes_to_the_end(
    dask_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tqdm")
    plan = ap.Plan()
    for i in range(5):
        plan.add(h.square, i)
    with dask_runner(dask_client) as r:
        report = r.run(plan, progress=True)
    assert report.status is ap.RunStatus.SUCCEEDED
    assert [o.value for o in report] == [0, 1, 4, 9, 16]
    err = capsys.readouterr().err
    assert "actionpool" in err and "5/5" in err


def test_prints_and_log_records_on_the_cluster_reach_the_client_tagged(
    dask_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    out, err = io.StringIO(), io.StringIO()
    plan = ap.Plan()
    plan.add(h.chatty, "d", 50, name="remote")
    with (
        dask_runner(dask_client) as r,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        report = r.run(plan)
    assert report.outcome("remote").pool == "dask"
    assert out.getvalue().splitlines() == [f"[remote] d line {i}" for i in range(50)]
    assert err.getvalue() == "[remote] d to stderr\n"
    got = [r.getMessage() for r in caplog.records if r.name == "tests.chatty"]
    assert got == ["[remote] d info", "[remote] d warning"]


def test_a_map_and_its_chunks_run_on_the_cluster(dask_client: Any) -> None:
    with dask_runner(dask_client) as r:
        assert list(r.map(h.square, range(2_000))) == [i * i for i in range(2_000)]
        assert list(r.map(h.square, range(50), chunksize=1)) == [i * i for i in range(50)]


# ---- timeouts, crashes, cancel: the worker-local pool's, exactly ----------------------


def test_a_hard_timeout_kills_the_action_and_its_dask_worker_lives_on(
    dask_client: Any, tmp_path: Path
) -> None:
    before = worker_pids(dask_client)
    mark = tmp_path / "pid"
    with dask_runner(dask_client, timeout_grace=0.5) as r:
        plan = ap.Plan()
        plan.add(ignores_its_timeout, str(mark), name="stuck")
        report = r.run(plan)
        out = report.outcome("stuck")
        assert out.status is ap.Status.TIMED_OUT, out.error
        assert "did not stop within 0.5 s" in str(out.error)
        pid = h.pid_in(mark)
        h.wait_for(lambda: h.gone(pid), what=f"the timed-out action's process {pid} to exit")
        assert r.submit(h.square, 3).result(timeout=60) == 9
    assert worker_pids(dask_client) == before


def test_a_soft_timeout_is_raised_inside_the_action(dask_client: Any, tmp_path: Path) -> None:
    mark = tmp_path / "cleaned"
    with dask_runner(dask_client) as r:
        plan = ap.Plan()
        plan.add(ap.action(fa.catch_timeout, timeout=0.3), str(mark), name="t")
        out = r.run(plan).outcome("t")
    assert out.status is ap.Status.TIMED_OUT
    assert mark.read_text() == "cleaned up"


@pytest.mark.parametrize("crash", [fa.segfault, fa.kill_self])
def test_a_crash_costs_only_its_own_node_and_never_the_dask_worker(
    dask_client: Any, crash: Any
) -> None:
    before = worker_pids(dask_client)
    plan = ap.Plan()
    plan.add(crash, name="bad")
    plan.add(h.square, 4, name="good")
    with dask_runner(dask_client) as r:
        report = r.run(plan)
    assert report.outcome("bad").status is ap.Status.CRASHED
    assert isinstance(report.outcome("bad").error, ap.WorkerCrashed)
    assert report.outcome("good").value == 16
    assert worker_pids(dask_client) == before


def _where() -> str:
    """The command line of the process that runs this action."""
    return " ".join(psutil.Process().cmdline())


@pytest.mark.slow
def test_on_the_portable_path_each_dask_worker_runs_actions_on_its_own_loky_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Dask worker process is daemonic, and multiprocessing refuses children to one:
    # the worker-local pool must still start its loky processes there.
    monkeypatch.setenv("ACTIONPOOL_PORTABLE", "1")  # inherited by the cluster's workers
    plan = ap.Plan()
    plan.add(_where, name="where")
    plan.add(fa.kill_self, name="bad")
    plan.add(h.square, 4, name="good")
    with ap.Runner(backend="dask", cpu_workers=1, io_workers=2) as r:
        report = r.run(plan)
    assert "loky" in report["where"], report["where"]
    assert report.outcome("bad").status is ap.Status.CRASHED
    assert report.outcome("good").value == 16


def test_a_crash_is_retried_only_with_consent(dask_client: Any, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    again = ap.action(fa.crash_first_time, retries=1, retry_on=(ap.WorkerCrashed,))
    once = ap.action(fa.crash_first_time, retries=1)  # retries, but not after crashes
    with dask_runner(dask_client) as r:
        plan = ap.Plan()
        plan.add(again, str(flag), name="c")
        assert r.run(plan).outcome("c").value == "second attempt"
        flag.unlink()
        plan = ap.Plan()
        plan.add(once, str(flag), name="c")
        assert r.run(plan).outcome("c").status is ap.Status.CRASHED


def test_cancel_stops_what_runs_on_the_cluster(dask_client: Any, tmp_path: Path) -> None:
    mark = tmp_path / "pid"
    with dask_runner(dask_client) as r:
        fut = r.submit(pid_then_sleep, str(mark))
        pid = h.pid_in(mark)
        r.cancel()
        with pytest.raises((ap.WorkerCrashed, Exception)):
            fut.result(timeout=60)
        h.wait_for(lambda: h.gone(pid), what=f"the cancelled action's process {pid} to exit")
        assert r.submit(h.square, 5).result(timeout=60) == 25  # usable again


def test_an_unpicklable_result_is_the_same_serialization_error(
    backend: str, request: pytest.FixtureRequest
) -> None:
    with make_runner(backend, request, cpu_workers=2) as r:  # type: ignore[attr-defined]
        plan = ap.Plan()
        plan.add(fa.return_lock, name="lock")
        out = r.run(plan).outcome("lock")
    assert out.status is ap.Status.FAILED
    assert isinstance(out.error, ap.SerializationError)
    assert "lock" in str(out.error)


def test_a_dead_dask_worker_ends_its_running_node_crashed_and_the_run_goes_on(
    dask_client: Any, tmp_path: Path
) -> None:
    mark = tmp_path / "pid"
    plan = ap.Plan()
    plan.add(pid_then_sleep, str(mark), name="doomed")
    plan.add(h.square, 2, name="a")
    plan.add(h.square, 3, name="b")
    with dask_runner(dask_client) as r:
        running = in_background(r, plan)
        victim = dask_worker_of(h.pid_in(mark), dask_client)
        wait_start_reported(r)  # else it counts as not started, and is sent again
        os.kill(victim, 9)  # the machine under it is gone
        report = running.result(timeout=120)
        out = report.outcome("doomed")
        assert out.status is ap.Status.CRASHED, out.error
        assert "died" in str(out.error)
        assert report.outcome("a").value == 4 and report.outcome("b").value == 9
        assert r.submit(h.square, 6).result(timeout=60) == 36
    dask_client.wait_for_workers(3, timeout=60)  # the nanny restarts it for later tests


def test_the_same_plan_ends_with_the_same_outcomes_on_both_backends(
    dask_client: Any, tmp_path: Path
) -> None:
    def plan() -> ap.Plan:
        p = ap.Plan()
        ok = p.add(h.square, 3, name="ok")
        fails = p.add(fa.fail, name="fails")
        p.add(h.square, fails, name="skipped")
        p.add(fa.exit_with, 3, name="crashes")
        p.add(ap.action(fa.spin_python, timeout=0.3), name="times_out")
        p.add(h.square, ok, name="after")
        return p

    statuses = {}
    values = {}
    for backend in ("local", "dask"):
        kwargs: dict[str, Any] = {"timeout_grace": 0.3}
        if backend == "dask":
            kwargs.update(backend="dask", client=dask_client)
        else:
            kwargs.update(cpu_workers=2)
        with ap.Runner(**kwargs) as r:
            report = r.run(plan())
        statuses[backend] = {o.name: o.status for o in report}
        values[backend] = {o.name: o.value for o in report}
    assert statuses["local"] == statuses["dask"]
    assert values["local"] == values["dask"]
    assert statuses["dask"]["crashes"] is ap.Status.CRASHED
    assert statuses["dask"]["times_out"] is ap.Status.TIMED_OUT
    assert statuses["dask"]["skipped"] is ap.Status.SKIPPED


def test_a_lost_cluster_ends_the_running_nodes_crashed_and_the_report_says_so(
    tmp_path: Path,
) -> None:
    mark = tmp_path / "pid"
    plan = ap.Plan()
    plan.add(pid_then_sleep, str(mark), name="running")
    cluster = distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    )
    with distributed.Client(cluster) as client, dask_runner(client) as r:
        running = in_background(r, plan)
        pid = h.pid_in(mark)
        wait_start_reported(r)  # else it counts as not started, and fails to be sent
        cluster.close()  # scheduler and workers gone, mid-run
        report = running.result(timeout=120)
        out = report.outcome("running")
        assert out.status is ap.Status.CRASHED
        # whichever the client heard first: the workers' removal, or the lost scheduler
        assert "Dask" in str(out.error) and "lost" in str(out.error), out.error
        with pytest.raises(RuntimeError, match="is lost"):
            r.submit(h.square, 2).result(timeout=60)
    h.wait_for(lambda: h.gone(pid), what=f"the action's process {pid} to exit with its worker")


def test_memory_and_threads_become_dask_resources_where_workers_declare_them(
    tmp_path: Path,
) -> None:
    mark = tmp_path / "pid"
    heavy = ap.action(pid_then_sleep, memory=2**30, threads=1)
    resources = {"memory": 4 * 2**30, "threads": 1}
    with cluster_runner(n_workers=1, resources=resources) as (_, client, r):
        assert r.sizing.cluster_resources == {"memory", "threads"}
        fut = r.submit(heavy, str(mark))
        h.pid_in(mark)

        def restrictions(dask_scheduler: Any) -> list[dict[str, float]]:
            return [
                dict(ts.resource_restrictions or {})
                for ts in dask_scheduler.tasks.values()
                if ts.state == "processing"
            ]

        assert client.run_on_scheduler(restrictions) == [{"memory": 2**30, "threads": 1}]
        fut.cancel()
        r.cancel()
        # more than any worker declares could never run: refused, not queued for ever
        wide = ap.action(h.square, threads=2)
        with pytest.raises(ap.PlanError, match="largest 'threads' resource declared is 1"):
            r.submit(wide, 2).result(timeout=60)


def test_an_action_larger_than_any_worker_is_refused_before_it_waits_for_ever(
    dask_client: Any,
) -> None:
    with dask_runner(dask_client) as r:
        largest = r.sizing.largest_worker_memory
        assert largest > 0
        too_big = ap.action(h.square, memory=largest + 1)
        with pytest.raises(ap.PlanError, match="largest memory limit"):
            r.submit(too_big, 2).result(timeout=60)


def test_security_with_a_client_of_ones_own_is_refused(dask_client: Any) -> None:
    with pytest.raises(ValueError, match="a client= brings its own"):
        ap.Runner(backend="dask", client=dask_client, security=object())


def log_pid_then_sleep(log: str) -> str:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(60)
    with open(log, "a") as f:
        f.write("woke\n")
    return "woke"


def test_a_retired_worker_ends_its_started_node_crashed_and_no_copy_runs_on(
    tmp_path: Path,
) -> None:
    # Dask re-runs the tasks of a worker it retires gracefully (adaptive scale-down
    # does), whatever allowed-failures says: the pool ends the attempt and cancels it
    log = tmp_path / "starts"
    plan = ap.Plan()
    plan.add(log_pid_then_sleep, str(log), name="long")
    with cluster_runner(n_workers=2) as (_, client, r):
        running = in_background(r, plan)
        h.wait_for(lambda: log.exists() and log.read_text().strip() != "", what="the start")
        first = int(log.read_text().split()[0])
        victim = dask_worker_of(first, client)
        address = next(a for a, pid in worker_pids(client).items() if pid == victim)
        wait_start_reported(r)
        client.retire_workers([address])
        report = running.result(timeout=120)
        out = report.outcome("long")
        assert out.status is ap.Status.CRASHED
        assert "was retired" in str(out.error), out.error
    # A copy Dask started on the other worker (after the retirement, even late) is
    # stopped: none woke, and the runner's close did not wait for one to finish.
    lines = log.read_text().split()
    assert "woke" not in lines, lines
    for pid in map(int, lines):
        h.wait_for(lambda pid=pid: h.gone(pid), what=f"the action's process {pid}")


# ---- batches: short attempts travel several to a Dask task -------------------------------


def mark_then_sleep(folder: str, i: int) -> int:
    h.write_atomic(Path(folder, str(i)), str(os.getpid()))
    time.sleep(60)
    return i


def test_short_nodes_travel_several_to_a_dask_task_each_with_its_own_outcome(
    dask_client: Any,
) -> None:
    plan = ap.Plan()
    nodes = [plan.add(h.square, i, name=f"sq{i}") for i in range(60)]
    total = plan.add(sum, nodes, name="total")
    with dask_runner(dask_client) as r, distributed.get_task_stream(dask_client) as stream:
        report = r.run(plan)
    assert report.status is ap.RunStatus.SUCCEEDED
    assert report[total] == sum(i * i for i in range(60))
    for i in range(60):
        out = report.outcome(f"sq{i}")
        assert out.pool == "dask" and out.worker is not None
        assert str(out.worker).startswith("tcp://127.0.0.1:"), out.worker
    keys = {str(t["key"]) for t in stream.data}
    assert any(k.startswith("batch-") for k in keys), keys
    assert len(keys) < 61, f"{len(keys)} Dask tasks for 61 nodes: nothing was batched"


def steady(x: int) -> int:
    time.sleep(0.04)
    return x


def uneven(x: int) -> int:
    time.sleep(0.3 if x % 3 == 0 else 0.005)
    return x


def test_measured_steady_attempts_share_dask_tasks_and_uneven_ones_do_not(
    dask_client: Any,
) -> None:
    from actionpool.pools.dask import BALANCE, TASK_S

    tasks: dict[str, int] = {}
    with dask_runner(dask_client) as r:
        for fn in (steady, uneven):
            assert list(r.map(fn, range(12))) == list(range(12))  # durations measured
            with distributed.get_task_stream(dask_client) as stream:
                assert list(r.map(fn, range(12))) == list(range(12))
            tasks[fn.__name__] = len({str(t["key"]) for t in stream.data})
    # 40 ms each: TASK_S / 0.04 s = 5 to a task, but BALANCE tasks per thread of the
    # 3 one-thread workers: 6 tasks of 2
    assert int(TASK_S / 0.04) == 5 and BALANCE == 2
    assert tasks["steady"] == 6, tasks
    # 5 ms and 300 ms: each of its own, so that no short one waits behind a long one
    assert tasks["uneven"] == 12, tasks


def test_batch_count_spreads_unknown_attempts_and_sizes_measured_ones() -> None:
    from actionpool.pools.dask import MAX_BATCH, SPREAD, batch_count

    assert batch_count(0, 2, None) == 0
    assert batch_count(100, 2, None) == 2 * SPREAD  # unknown: SPREAD tasks per thread
    assert batch_count(3, 2, None) == 3  # never more tasks than attempts
    assert batch_count(8, 2, 0.05) == 4  # 0.2 s / 50 ms = 4 to a task, 2 per thread
    assert batch_count(1000, 2, 0.001) == 5  # 200 to a task
    assert batch_count(10_000, 2, 1e-6) == -(-10_000 // MAX_BATCH)  # at most MAX_BATCH each
    assert batch_count(8, 2, 0.05, running=4) == 2  # the running ones count
    assert batch_count(8, 2, 0.05, deviation_s=0.04) == 8  # uneven: one to a task
    assert batch_count(8, 2, 0.05, deviation_s=0.05) == 8  # one measured: spread unknown
    assert batch_count(1000, 2, 0.001, deviation_s=0.004) == 5  # shorter than a task's cost
    assert batch_count(8, 2, 0.5) == 8  # longer than TASK_S: one to a task


def in_chunk(x: int) -> tuple[int, bool]:
    """``x``, and whether this attempt runs in a chunk of its batch (run_attempts)."""
    frame: Any = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "run_attempts":
            return x, True
        frame = frame.f_back
    return x, False


def test_the_short_nodes_of_a_batch_run_as_one_chunk_each_with_its_own_outcome(
    dask_client: Any,
) -> None:
    # 60 nodes of unknown duration on 3 one-thread workers: 12 batches of 5
    plan = ap.Plan()
    nodes = [plan.add(in_chunk, i, name=f"n{i}") for i in range(60)]
    with dask_runner(dask_client) as r:
        report = r.run(plan)
    assert [report[n] for n in nodes] == [(i, True) for i in range(60)]
    starts = set()
    for i in range(60):
        out = report.outcome(f"n{i}")
        assert str(out.worker).startswith("tcp://127.0.0.1:"), out.worker
        assert out.started_at is not None and out.duration_s is not None
        starts.add(out.started_at)
    assert len(starts) == 60, "each attempt's own start, not its chunk's"


def test_a_crash_in_a_chunk_costs_only_its_own_node(dask_client: Any) -> None:
    before = worker_pids(dask_client)
    plan = ap.Plan()
    for i in range(60):  # 12 chunks of 5, one with a crash in the middle
        plan.add(fa.crash_on, i, 17, name=f"c{i}")
    with dask_runner(dask_client) as r:
        report = r.run(plan)
    bad = report.outcome("c17")
    assert bad.status is ap.Status.CRASHED and isinstance(bad.error, ap.WorkerCrashed)
    assert bad.attempts == 1
    assert all(report.outcome(f"c{i}").value == i * 10 for i in range(60) if i != 17)
    assert worker_pids(dask_client) == before


def test_the_output_of_chunked_nodes_is_tagged_with_each_node_in_order(
    dask_client: Any,
) -> None:
    out = io.StringIO()
    plan = ap.Plan()
    for i in range(30):  # 12 batches of 2 or 3
        plan.add(h.chatty, f"t{i}", 3, name=f"p{i}")
    with dask_runner(dask_client) as r, contextlib.redirect_stdout(out):
        report = r.run(plan)
    assert report.status is ap.RunStatus.SUCCEEDED
    lines = out.getvalue().splitlines()
    for i in range(30):
        assert [x for x in lines if x.startswith(f"[p{i}] ")] == [
            f"[p{i}] t{i} line {k}" for k in range(3)
        ]
    assert len(lines) == 90


def _count(handler_name: str, dask_server: Any) -> int:
    """Count the requests of ``handler_name`` that this scheduler or worker serves from
    now on (``client.run``/``run_on_scheduler`` pass ``dask_server`` as
    ``dask_worker``/``dask_scheduler``); returns the count so far."""
    handlers = dask_server.handlers
    handler = handlers[handler_name]
    if not hasattr(handler, "calls"):
        takes_comm = next(iter(inspect.signature(handler).parameters), "") == "comm"

        async def counted(comm: Any, **msg: Any) -> Any:
            counted.calls += 1  # type: ignore[attr-defined]
            out = handler(comm, **msg) if takes_comm else handler(**msg)
            return await out if inspect.isawaitable(out) else out

        counted.calls = 0  # type: ignore[attr-defined]
        handlers[handler_name] = counted
    return int(handlers[handler_name].calls)


def _who_has_calls(dask_scheduler: Any) -> int:
    return _count("who_has", dask_scheduler)


def _get_data_calls(dask_worker: Any) -> int:
    return _count("get_data", dask_worker)


def test_results_come_from_the_worker_that_ran_them_without_asking_the_scheduler(
    dask_client: Any,
) -> None:
    before = dask_client.run_on_scheduler(_who_has_calls)
    with dask_runner(dask_client) as r:
        assert [r.submit(h.square, i).result(timeout=60) for i in range(5)] == [
            i * i for i in range(5)
        ]
        assert sorted(r.map(h.square, range(20))) == [i * i for i in range(20)]
    assert dask_client.run_on_scheduler(_who_has_calls) == before


class _Sequence(distributed.diagnostics.plugin.SchedulerPlugin):
    """Records, in order, one client's graph updates (their keys) and the releases of
    the values of its tasks."""

    name = "test-sequence"

    def __init__(self, client: str) -> None:
        self.client = client
        self.seen: list[tuple[str, list[str]]] = []

    def update_graph(self, scheduler: Any, *, client: str, keys: Any, **kwargs: Any) -> None:
        if client == self.client:
            self.seen.append(("update", [str(k) for k in keys]))

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if start == "memory" and finish in ("released", "forgotten"):
            self.seen.append(("released", [str(key)]))


def _sequence(dask_scheduler: Any) -> list[tuple[str, list[str]]]:
    return list(dask_scheduler.plugins[_Sequence.name].seen)


def test_a_burst_of_calls_goes_to_dask_s_scheduler_in_few_graph_updates(
    dask_client: Any,
) -> None:
    # a map hands its calls over one by one, each dispatched in a pass of its own; one
    # graph update each made Dask's scheduler do its bookkeeping 40 times
    dask_client.register_plugin(_Sequence(dask_client.id), name=_Sequence.name)
    try:
        with dask_runner(dask_client) as r:
            assert list(r.map(h.square, range(40), chunksize=1)) == [i * i for i in range(40)]
            seen = dask_client.run_on_scheduler(_sequence)
    finally:
        dask_client.unregister_scheduler_plugin(_Sequence.name)
    updates = sum(1 for what, _ in seen if what == "update")
    assert 1 <= updates <= 20, f"{updates} graph updates for 40 calls"


def test_the_next_wave_goes_out_before_the_release_of_the_one_that_let_it_start(
    dask_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dask's client sends its messages at most every 10 ms: a release sent as the
    # wave ended held the fan-in back behind it
    from actionpool.pools import dask as apd

    monkeypatch.setattr(apd, "RELEASE_AFTER_S", 30.0)  # only a send lets them go
    dask_client.register_plugin(_Sequence(dask_client.id), name=_Sequence.name)
    try:
        with dask_runner(dask_client) as r:
            plan = ap.Plan()
            nodes = [plan.add(h.square, i, name=f"w{i}") for i in range(12)]
            plan.add(sum, nodes, name="total")
            assert r.run(plan)["total"] == sum(i * i for i in range(12))
            seen = dask_client.run_on_scheduler(_sequence)
    finally:
        dask_client.unregister_scheduler_plugin(_Sequence.name)
    updates = [i for i, (what, keys) in enumerate(seen) if what == "update"]
    fan_in = next(i for i in updates if any(k.startswith("total-") for k in seen[i][1]))
    wave = {k for i in updates if i < fan_in for k in seen[i][1]}
    early = [keys for what, keys in seen[:fan_in] if what == "released" and keys[0] in wave]
    assert wave and not early, f"released before the fan-in was sent: {early}"


def _watch_ends(dask_scheduler: Any, topic: str) -> None:
    """From now on, note for each "ended" event of ``topic`` that reaches this
    scheduler whether its worker's next "task-finished" came in the same message (the
    scheduler handles one message's items without a turn of its loop in between)."""
    handlers = dask_scheduler.stream_handlers
    on_event, on_finished = handlers["log-event"], handlers["task-finished"]
    waiting: dict[str, list[bool]] = {}  # worker -> [its loop turned since the event]
    same: list[bool] = []

    def log_event(**msg: Any) -> Any:
        event = msg.get("msg")
        if msg.get("topic") == topic and isinstance(event, (list, tuple)) and event[1] == "ended":
            turned = waiting[msg["worker"]] = [False]
            dask_scheduler.loop.add_callback(turned.__setitem__, 0, True)
        return on_event(**msg)

    def task_finished(**msg: Any) -> Any:
        turned = waiting.pop(msg.get("worker", ""), None)
        if turned is not None:
            same.append(not turned[0])
        return on_finished(**msg)

    handlers["log-event"], handlers["task-finished"] = log_event, task_finished
    dask_scheduler._test_ends = (on_event, on_finished, same)


def _unwatch_ends(dask_scheduler: Any) -> list[bool]:
    on_event, on_finished, same = dask_scheduler._test_ends
    del dask_scheduler._test_ends
    dask_scheduler.stream_handlers["log-event"] = on_event
    dask_scheduler.stream_handlers["task-finished"] = on_finished
    return same


def test_a_batch_s_outcomes_leave_its_worker_in_one_message_with_its_end(
    dask_client: Any,
) -> None:
    # Sent from the task's thread, the "ended" event left at once and opened the
    # worker stream's 2 ms batching interval, which held the task's end back behind it,
    # and with it the worker's next task
    with dask_runner(dask_client) as r:
        dask_client.run_on_scheduler(_watch_ends, topic=r._backend.link.topic)
        try:
            assert [r.submit(h.square, i).result(timeout=60) for i in range(4)] == [
                0, 1, 4, 9,
            ]  # fmt: skip
            assert list(r.map(h.square, range(20), chunksize=1)) == [i * i for i in range(20)]
        finally:
            same = dask_client.run_on_scheduler(_unwatch_ends)
    assert len(same) >= 4 and all(same), same


def test_small_outcomes_come_with_their_batch_s_end_and_are_not_fetched(
    dask_client: Any,
) -> None:
    before = sum(dask_client.run(_get_data_calls).values())
    with dask_runner(dask_client) as r:
        assert [r.submit(h.square, i).result(timeout=60) for i in range(5)] == [
            i * i for i in range(5)
        ]
        plan = ap.Plan()
        nodes = [plan.add(h.square, i) for i in range(30)]
        total = plan.add(sum, nodes)
        report = r.run(plan)
        assert report[total] == sum(i * i for i in range(30))
        crash = ap.Plan()
        crash.add(fa.segfault, name="bad")
        bad = r.run(crash).outcome("bad")
        assert bad.status is ap.Status.CRASHED
        assert bad.started_at is not None and str(bad.worker).startswith("tcp://"), bad
    assert sum(dask_client.run(_get_data_calls).values()) == before
    # the scheduler keeps a topic's last events: the runner's go with it
    events = dask_client.run_on_scheduler(
        lambda dask_scheduler, topic=r._backend.link.topic: len(dask_scheduler.get_events(topic))
    )
    assert events == 0


def test_a_timeout_in_a_batch_costs_only_its_own_node(dask_client: Any, tmp_path: Path) -> None:
    # 3 workers: before any attempt has ended, more than 12 attempts share Dask tasks
    plan = ap.Plan()
    plan.add(ignores_its_timeout, str(tmp_path / "pid"), name="stuck")
    for i in range(23):
        plan.add(h.square, i, name=f"sq{i}")
    with dask_runner(dask_client) as r:
        report = r.run(plan)
        assert report.outcome("stuck").status is ap.Status.TIMED_OUT
        assert all(report.outcome(f"sq{i}").value == i * i for i in range(23))
        pid = h.pid_in(tmp_path / "pid")
        h.wait_for(lambda: h.gone(pid), what=f"the timed-out action's process {pid} to exit")


def test_cancel_stops_the_running_and_the_queued_attempts_of_every_batch(
    dask_client: Any, tmp_path: Path
) -> None:
    # 24 attempts of unknown duration on 3 one-thread workers go as 12 batches of 2:
    # three batches run their first attempt, their second waits on the worker, nine
    # batches wait on the scheduler
    folder = tmp_path / "marks"
    folder.mkdir()
    plan = ap.Plan()
    for i in range(24):
        plan.add(mark_then_sleep, str(folder), i, name=f"n{i}")
    with dask_runner(dask_client) as r:
        running = in_background(r, plan)
        h.wait_for(lambda: len(list(folder.iterdir())) == 3, what="three attempts to start")
        pids = [int(p.read_text()) for p in folder.iterdir()]
        t0 = time.monotonic()
        r.cancel()
        # it waits for the killed processes, up to 10 s: withdrawn attempts that never
        # started must count as done at once, or it always waits out the 10 s
        assert time.monotonic() - t0 < 8.0
        report = running.result(timeout=120)
        assert report.status is ap.RunStatus.CANCELLED
        assert all(o.status is not ap.Status.SUCCEEDED for o in report.outcomes)
        for pid in pids:
            h.wait_for(lambda pid=pid: h.gone(pid), what=f"the cancelled action's process {pid}")
        # the workers run what comes next (FIFO behind anything left of the batches),
        # and none of the withdrawn attempts ever starts
        after = ap.Plan()
        for i in range(6):
            after.add(h.square, i)
        assert r.run(after).status is ap.RunStatus.SUCCEEDED
    assert len(list(folder.iterdir())) == 3, sorted(p.name for p in folder.iterdir())


# ---- values stay on the cluster; large arrays are scattered once ---------------------------


def big_array(n: int) -> Any:
    import numpy as np

    return np.arange(n, dtype=np.float64)


def gated_sum(arr: Any, release: str, mark: str = "") -> float:
    if mark:
        Path(mark).touch()
    h.wait_for_path(release, "the test's release")
    arr[0] = -1.0  # a private copy: nobody else sees this
    return float(arr[1:].sum())


def io_len(arr: Any) -> int:
    return len(arr)


io_len_action = ap.action(io_len, kind="io")


def scheduler_view(dask_scheduler: Any) -> dict[str, list[str]]:
    return {str(k): [str(d.key) for d in ts.dependencies] for k, ts in dask_scheduler.tasks.items()}


def test_a_large_value_goes_from_node_to_node_on_the_cluster_not_through_the_client(
    dask_client: Any, tmp_path: Path
) -> None:
    n = 1 << 19  # 4 MiB of float64, above the 1 MiB threshold
    release, mark = tmp_path / "release", tmp_path / "started"
    plan = ap.Plan()
    produced = plan.add(big_array, n, name="produce")
    plan.add(gated_sum, produced, str(release), str(mark), name="consume")
    plan.add(io_len_action, produced, name="local")  # an io node here gets it too
    with dask_runner(dask_client) as r:
        running = in_background(r, plan)
        h.wait_for_path(mark, "the consumer to start")
        deps = dask_client.run_on_scheduler(scheduler_view)
        consumer = [k for k in deps if k.startswith("consume-")]
        assert len(consumer) == 1, deps
        # its Dask task depends on the producer's: its worker fetched the value there
        assert any(d.startswith("produce-") for d in deps[consumer[0]]), deps
        release.touch()
        report = running.result(timeout=120)
    assert report.status is ap.RunStatus.SUCCEEDED, report
    assert report["consume"] == float(sum(range(1, n)))
    assert report["local"] == n
    assert report["produce"][0] == 0.0  # the consumer's write went to its own copy


def test_a_value_that_is_not_idempotent_never_waits_on_the_cluster_to_be_recomputed(
    dask_client: Any, tmp_path: Path
) -> None:
    # Dask recomputes a lost value that a consumer needs, running its action again:
    # only an idempotent action's value is left on the cluster for its consumers
    n = 1 << 19
    release, mark = tmp_path / "release", tmp_path / "started"
    plan = ap.Plan()
    produced = plan.add(ap.action(big_array, idempotent=False), n, name="produce")
    plan.add(gated_sum, produced, str(release), str(mark), name="consume")
    with dask_runner(dask_client) as r:
        running = in_background(r, plan)
        h.wait_for_path(mark, "the consumer to start")
        deps = dask_client.run_on_scheduler(scheduler_view)
        consumer = [k for k in deps if k.startswith("consume-")]
        assert len(consumer) == 1, deps
        # it came from here (scattered, so without lineage), not from the producer's task
        assert not any(d.startswith("produce-") for d in deps[consumer[0]]), deps
        assert all(d.startswith("memoryview-") for d in deps[consumer[0]]), deps
        release.touch()
        report = running.result(timeout=120)
    assert report.status is ap.RunStatus.SUCCEEDED, report
    assert report["consume"] == float(sum(range(1, n)))


def test_a_large_array_is_scattered_once_for_every_node_that_takes_it(
    dask_client: Any, tmp_path: Path
) -> None:
    arr = big_array(1 << 19)
    release, mark = tmp_path / "release", tmp_path / "started"
    plan = ap.Plan()
    for i in range(6):
        plan.add(gated_sum, arr, str(release), str(mark), name=f"sum{i}")
    with dask_runner(dask_client) as r:
        running = in_background(r, plan)
        h.wait_for_path(mark, "a node to start")
        keys = dask_client.run_on_scheduler(scheduler_view)
        scattered = [k for k in keys if k.startswith("memoryview-")]
        assert len(scattered) == 1, keys
        release.touch()
        report = running.result(timeout=120)
        assert report.status is ap.RunStatus.SUCCEEDED, report
        assert {report[f"sum{i}"] for i in range(6)} == {float(arr[1:].sum())}
        assert arr[0] == 0.0
        # the run is over: the cluster forgets the array
        h.wait_for(
            lambda: not [k for k in dask_client.run_on_scheduler(scheduler_view)
                         if k.startswith("memoryview-")],
            what="the scattered array to be released",
        )  # fmt: skip


def gated_item(i: int, arr: Any, release: str, mark: str) -> float:
    Path(mark).touch()
    h.wait_for_path(release, "the test's release")
    return float(arr[i])


@pytest.mark.parametrize("chunksize", [1, None], ids=["calls", "chunks"])
def test_a_map_scatters_an_array_that_every_item_shares_once(
    dask_client: Any, tmp_path: Path, chunksize: Any
) -> None:
    arr = big_array(1 << 19)
    release, mark = tmp_path / "release", tmp_path / "started"
    items = range(0, 12_000, 1000)
    with dask_runner(dask_client) as r:
        out: Future[list[float]] = Future()

        def iterate() -> None:
            try:
                it = r.map(gated_item, items, arr=arr, release=str(release), mark=str(mark),
                           chunksize=chunksize)  # fmt: skip
                out.set_result(list(it))
            except BaseException as exc:
                out.set_exception(exc)

        threading.Thread(target=iterate, daemon=True).start()
        h.wait_for_path(mark, "an item to start")
        keys = dask_client.run_on_scheduler(scheduler_view)
        calls = [k for k in keys if not k.startswith("memoryview-")]
        assert len(calls) > 1, keys  # several calls of the map in flight...
        scattered = [k for k in keys if k.startswith("memoryview-")]
        assert len(scattered) == 1, keys  # ...share one copy of the array
        release.touch()
        assert out.result(timeout=120) == [float(i) for i in items]
        # the map is over: the cluster forgets the array
        h.wait_for(
            lambda: not [k for k in dask_client.run_on_scheduler(scheduler_view)
                         if k.startswith("memoryview-")],
            what="the scattered array to be released",
        )  # fmt: skip


def io_item(i: int, arr: Any) -> float:
    return float(arr[i])


def test_an_io_map_on_a_dask_runner_reads_the_map_s_array_here(dask_client: Any) -> None:
    # io calls stay on this machine: each resolves the map's kept array here, through
    # the arena of the map its own arena is linked to
    arr = big_array(1 << 19)
    items = range(0, 12_000, 1000)
    with dask_runner(dask_client) as r:
        got = list(r.map(ap.action(io_item, kind="io"), items, arr=arr))
    assert got == [float(i) for i in items]


# ---- a runner whose process dies leaves nothing on the cluster -------------------------------

_ABANDONING = """
import os, sys, time
import actionpool as ap

def pid() -> int:
    return os.getpid()

r = ap.Runner(backend="dask", address=sys.argv[1])
print(r.submit(pid).result(timeout=60), flush=True)
time.sleep(600)
"""


def plugins_on_workers(dask_worker: Any) -> list[str]:
    return [str(name) for name in dask_worker.plugins]


def test_a_runner_killed_without_closing_leaves_no_plugin_or_process_on_the_workers(
    dask_client: Any, tmp_path: Path
) -> None:
    import subprocess
    import sys

    script = tmp_path / "abandon.py"
    script.write_text(_ABANDONING)
    before = {name for names in dask_client.run(plugins_on_workers).values() for name in names}
    proc = subprocess.Popen(
        [sys.executable, str(script), dask_client.scheduler.address],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        local = int(proc.stdout.readline())  # the action's process, under a Dask worker
        assert psutil.pid_exists(local)
        added = {
            name for names in dask_client.run(plugins_on_workers).values() for name in names
        } - before
        assert added, "the runner registered no worker plugin"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    h.wait_for(lambda: h.gone(local), timeout=60, what=f"the dead runner's process {local}")

    def plugins_left() -> set[str]:
        now = {name for names in dask_client.run(plugins_on_workers).values() for name in names}
        return now & added

    h.wait_for(lambda: not plugins_left(), timeout=60, what="its worker plugins to go")
