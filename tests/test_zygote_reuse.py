"""A closed runner's fresh zygote is kept idle, and the next runner that would start the
same one adopts it (``zygote_client._IdleZygotes``): in a process that runs threads (a
notebook's kernel), a runner made after another starts without a fresh interpreter."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import actionpool as ap
from actionpool.pools.process import resolve_worker_start
from actionpool.pools.zygote_client import idle_zygote_pids, stop_idle_zygotes
from tests import fault_actions as fa
from tests import helpers as h

pytestmark = pytest.mark.zygote_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _start_with_no_idle_zygote() -> Iterator[None]:
    """These tests count idle zygotes: none is left from the module's earlier tests
    (conftest keeps them within a module)."""
    stop_idle_zygotes()
    yield


@pytest.fixture
def threaded() -> Iterator[None]:
    """This process runs one more thread (blocked on an event) during the test, as a
    notebook's kernel does: its runners' zygotes are fresh interpreters."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="blocked-on-an-event")
    thread.start()
    try:
        assert resolve_worker_start() == "fresh"
        yield
    finally:
        stop.set()
        thread.join(30)


def zygote_of(r: ap.Runner) -> int:
    (zygote,) = r._pools["cpu"].zygote_pids()  # type: ignore[attr-defined]
    return int(zygote)


def children_of(pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(pid).children()]


def wait_dead(pid: int, what: str, timeout: float = 30.0) -> None:
    """Wait until ``pid`` has exited (a zombie counts: its parent has not reaped it)."""

    def dead() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    h.wait_for(dead, timeout, what)


def run_script(code: str, timeout: float = 120) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "ACTIONPOOL_WORKER_START": "",
        },
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_next_runner_adopts_the_last_ones_idle_zygote(threaded: None) -> None:
    with ap.Runner(cpu_workers=2, io_workers=1) as r:
        zygote = zygote_of(r)
        assert r.submit(os.getppid).result(timeout=60) == zygote  # a fork of the zygote
        assert list(r.map(h.square, range(6))) == [0, 1, 4, 9, 16, 25]
        assert children_of(zygote)
    # kept: alive, with no worker left under it
    assert idle_zygote_pids() == [zygote]
    assert psutil.Process(zygote).status() != psutil.STATUS_ZOMBIE
    assert children_of(zygote) == []
    with ap.Runner(cpu_workers=2, io_workers=1) as r:
        assert zygote_of(r) == zygote  # adopted when the runner was made
        assert idle_zygote_pids() == []
        worker = r.submit(os.getppid).result(timeout=60)
        assert worker == zygote
        assert r.submit(h.add, 2, 3).result(timeout=60) == 5
    assert idle_zygote_pids() == [zygote]
    stop_idle_zygotes()
    wait_dead(zygote, "the idle zygote did not stop")
    assert idle_zygote_pids() == []


def test_a_zygote_whose_worker_crashed_is_kept_and_serves_the_next_runner(
    threaded: None,
) -> None:
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        zygote = zygote_of(r)
        with pytest.raises(ap.WorkerCrashed):
            r.submit(fa.kill_self).result(timeout=60)
        assert r.submit(os.getppid).result(timeout=60) == zygote  # its replacement
    assert idle_zygote_pids() == [zygote] and children_of(zygote) == []
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        assert r.submit(os.getppid).result(timeout=60) == zygote


def test_a_killed_idle_zygote_is_not_adopted_and_the_next_runner_works(
    threaded: None,
) -> None:
    with ap.Runner(cpu_workers=2, io_workers=1) as r:
        assert r.submit(h.square, 3).result(timeout=60) == 9
        zygote = zygote_of(r)
    assert idle_zygote_pids() == [zygote]
    os.kill(zygote, signal.SIGKILL)
    wait_dead(zygote, "the killed zygote did not die")
    with ap.Runner(cpu_workers=2, io_workers=1) as r:
        new = zygote_of(r)
        assert new != zygote
        assert r.submit(os.getppid).result(timeout=60) == new
        assert list(r.map(h.square, range(4))) == [0, 1, 4, 9]
        assert not psutil.pid_exists(zygote)  # reaped when it was passed over
    assert idle_zygote_pids() == [new]


def test_only_a_zygote_started_the_same_way_is_adopted(
    threaded: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        first = zygote_of(r)
        assert r.submit(os.getenv, "AP_REUSE_MARK").result(timeout=60) is None
    # another environment: a zygote of its own, which sees it
    monkeypatch.setenv("AP_REUSE_MARK", "set")
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        second = zygote_of(r)
        assert second != first
        assert r.submit(os.getenv, "AP_REUSE_MARK").result(timeout=60) == "set"
    assert idle_zygote_pids() == [first, second]
    # another sys.path and working directory: the same
    with monkeypatch.context() as m:
        m.syspath_prepend(str(tmp_path))
        m.chdir(tmp_path)
        with ap.Runner(cpu_workers=1, io_workers=1) as r:
            third = zygote_of(r)
            assert third not in (first, second)
            assert r.submit(os.getcwd).result(timeout=60) == str(tmp_path)
    # two are kept, the newest: the oldest was stopped
    assert idle_zygote_pids() == [second, third]
    wait_dead(first, "the oldest idle zygote was not stopped")
    with ap.Runner(cpu_workers=1, io_workers=1) as r:  # as the second: adopts it
        assert zygote_of(r) == second
        assert r.submit(os.getenv, "AP_REUSE_MARK").result(timeout=60) == "set"
    assert idle_zygote_pids() == [third, second]


def test_runners_made_and_closed_on_several_threads_share_the_idle_zygotes(
    threaded: None,
) -> None:
    errors: list[BaseException] = []
    zygotes: set[int] = set()

    def make_runners() -> None:
        try:
            for i in range(3):
                with ap.Runner(cpu_workers=1, io_workers=1) as r:
                    assert r.submit(h.add, i, 1).result(timeout=60) == i + 1
                    zygotes.add(r.submit(os.getppid).result(timeout=60))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=make_runners) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(zygotes) < 9  # some runner adopted another's
    idle = idle_zygote_pids()
    assert 1 <= len(idle) <= 2 and set(idle) <= zygotes
    for pid in idle:
        assert children_of(pid) == []
    for pid in zygotes - set(idle):
        wait_dead(pid, f"zygote {pid} is neither kept nor stopped")


def test_idle_zygotes_stop_at_the_interpreters_exit() -> None:
    out = run_script(
        """
        import atexit, os, threading
        zygotes = []

        @atexit.register  # the first registered: it runs after actionpool's hooks
        def last() -> None:
            print("alive after exit hooks:", [p for p in zygotes if os.path.exists(f"/proc/{p}")])

        import actionpool as ap
        from actionpool.pools.zygote_client import idle_zygote_pids

        threading.Thread(target=threading.Event().wait, daemon=True).start()
        with ap.Runner(cpu_workers=1, io_workers=1) as r:
            assert r.submit(abs, -1).result(timeout=60) == 1
        zygotes += idle_zygote_pids()
        os.environ["AP_REUSE_MARK"] = "set"  # a zygote of its own, not the idle one
        left_open = ap.Runner(cpu_workers=1, io_workers=1)  # closed at exit, kept idle
        assert left_open.submit(abs, -2).result(timeout=60) == 2
        zygotes += left_open._pools["cpu"].zygote_pids()
        print("zygotes:", len(set(zygotes)))
        """
    )
    # stopped and reaped by the script's exit hooks: gone, not even zombies
    assert out.splitlines() == ["zygotes: 2", "alive after exit hooks: []"]


def test_an_idle_zygote_ends_with_its_parent_whoever_holds_its_socket() -> None:
    # The parent dies by SIGKILL: no atexit. A child it started holds a copy of the
    # zygote's control socket, so the zygote never reads its end: it sees the
    # parent's death itself.
    holder = None
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import os, signal, subprocess, sys, threading
                import actionpool as ap
                from actionpool.pools import zygote_client as zc

                threading.Thread(target=threading.Event().wait, daemon=True).start()
                with ap.Runner(cpu_workers=1, io_workers=1) as r:
                    assert r.submit(abs, -1).result(timeout=60) == 1
                (zygote,) = zc._IDLE._idle
                ctl = zygote.ctl.fileno()
                holder = subprocess.Popen(
                    [sys.executable, "-c", "import time; time.sleep(120)"], pass_fds=(ctl,)
                )
                print(zygote.pid, holder.pid, flush=True)
                sys.stdin.read()
                os.kill(os.getpid(), signal.SIGKILL)
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "ACTIONPOOL_WORKER_START": ""},
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        zygote, holder = (int(p) for p in proc.stdout.readline().split())
        assert psutil.Process(zygote).ppid() == proc.pid
        proc.stdin.close()  # the script kills itself
        assert proc.wait(60) == -signal.SIGKILL
        assert psutil.Process(holder).is_running()  # it still holds the socket
        wait_dead(zygote, "the idle zygote outlived its parent")
    finally:
        if holder is not None:  # not our child now: the fixture would not see it
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(holder).kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_forked_child_never_adopts_its_parents_idle_zygote() -> None:
    out = run_script(
        """
        import os
        import actionpool as ap
        from actionpool.pools.zygote_client import idle_zygote_pids, stop_idle_zygotes

        def zygote(r):
            (pid,) = r._pools["cpu"].zygote_pids()
            return pid

        with ap.Runner(cpu_workers=1, io_workers=1, worker_start="fresh") as r:
            assert r.submit(abs, -1).result(timeout=60) == 1
            parents = zygote(r)
        pid = os.fork()
        if pid == 0:
            ok = idle_zygote_pids() == []
            with ap.Runner(cpu_workers=1, io_workers=1, worker_start="fresh") as r:
                ok = ok and zygote(r) != parents and r.submit(abs, -2).result(timeout=60) == 2
            stop_idle_zygotes()
            os._exit(0 if ok else 1)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        with ap.Runner(cpu_workers=1, io_workers=1, worker_start="fresh") as r:
            print(zygote(r) == parents, r.submit(abs, -3).result(timeout=60))
        """
    )
    assert out.split() == ["True", "3"]


def test_prestart_happens_only_in_a_kernel_and_a_bad_switch_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from actionpool.backends import PRESTART_ENV, prestart_in_kernel

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert prestart_in_kernel() is False  # a script: nothing ahead
    monkeypatch.setitem(sys.modules, "ipykernel", sys.modules[__name__])
    monkeypatch.setenv(PRESTART_ENV, "yes")
    with pytest.warns(RuntimeWarning, match="ACTIONPOOL_PRESTART must be '0' or '1', got 'yes'"):
        assert prestart_in_kernel() is False
    monkeypatch.setenv(PRESTART_ENV, "0")
    assert prestart_in_kernel() is False
