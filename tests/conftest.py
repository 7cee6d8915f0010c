"""Shared fixtures: every test must leave no child process behind.

The only children allowed to outlive a test are the two process-wide resource
trackers (loky's and multiprocessing's): each is a singleton per parent process,
started by the first pool and exiting when the parent does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import psutil
import pytest

# A shell that starts the suite in the background (`cmd &` without job control) hands
# it SIGINT ignored, as POSIX says, and Python then installs no KeyboardInterrupt
# handler, and its children inherit the ignore: the Ctrl-C tests need the real one.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_TRACKERS = ("resource_tracker",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the zygote path's own tests where the cpu pool takes another path
    (``ACTIONPOOL_PORTABLE=1``, or a platform without the Linux facilities)."""
    from actionpool.platforms import process_path

    path, _ = process_path()
    if path == "zygote":
        return
    skip = pytest.mark.skip(reason=f"the cpu pool takes the {path} process path here")
    for item in items:
        if "zygote_path" in item.keywords:
            item.add_marker(skip)


def _is_tracker(proc: psutil.Process) -> bool:
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return True  # already gone
    return any(t in cmd for t in _TRACKERS)


def _alive(proc: psutil.Process) -> bool:
    """Running, not a zombie, not a tracker; a process that ends meanwhile is not."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and not _is_tracker(proc)
    except psutil.Error:
        return False


def _runner_workers(runners: list[object]) -> set[int]:
    pids: set[int] = set()
    for r in runners:
        if not getattr(r, "_closed", True):
            pids.update(r.worker_pids())  # type: ignore[attr-defined]
            zygotes = getattr(r._pools["cpu"], "zygote_pids", None)  # type: ignore[attr-defined]
            if zygotes is not None:  # a process pool of this process's own
                pids.update(zygotes())
            else:  # a dask runner: its worker-local pools live under the cluster's workers
                pids.update(_cluster_descendants())
    return pids


def _cluster_descendants() -> set[int]:
    pids: set[int] = set()
    for pid in _cluster_pids():
        with contextlib.suppress(psutil.Error):
            pids.update(p.pid for p in psutil.Process(pid).children(recursive=True))
    return pids


# The session's Dask LocalCluster (fixture dask_client): its worker processes (a
# restarted one included) belong to the session. Anything they start (a runner's
# worker-local pool) must be gone after each test, like any other pool.
_CLUSTER: list[object] = []  # the session's client, while it is open


def _cluster_pids() -> set[int]:
    if not _CLUSTER:
        return set()
    try:
        pids = _CLUSTER[0].run(os.getpid)  # type: ignore[attr-defined]
    except Exception:  # a cluster being torn down
        return set()
    return {int(pid) for pid in pids.values()}


def leftover_children(
    grace_s: float = 5.0, allowed: set[int] = frozenset()
) -> list[psutil.Process]:  # type: ignore[assignment]
    """Children still alive after ``grace_s`` seconds, except trackers and ``allowed`` pids."""
    me = psutil.Process(os.getpid())
    deadline = time.monotonic() + grace_s
    allowed = set(allowed) | _cluster_pids()
    while True:
        alive = [p for p in me.children(recursive=True) if _alive(p) and p.pid not in allowed]
        if not alive or time.monotonic() > deadline:
            return alive
        psutil.wait_procs(alive, timeout=min(0.2, max(0.0, deadline - time.monotonic())))


def check_idle_zygotes(stop: bool) -> tuple[list[str], set[int]]:
    """What is wrong with the idle zygotes that closed runners left for the next ones
    (see ``zygote_client._IdleZygotes``): an idle zygote must have no child (no
    worker); and their pids. ``stop``: stop them too (then no pid is returned)."""
    from actionpool.pools.zygote_client import idle_zygote_pids, stop_idle_zygotes

    wrong = []
    pids = set(idle_zygote_pids())
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            kids = [p.pid for p in psutil.Process(pid).children()]  # zombies too
            if kids:
                wrong.append(f"idle zygote {pid} has children {kids}")
    if stop or wrong:
        stop_idle_zygotes()
        pids = set()
    return wrong, pids


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail the test if it leaves a child process running (and kill what it left).

    Workers of runners that were already open when the test began (module-scoped
    fixtures) belong to their fixture, not to the test; they are checked when the
    fixture's module ends. The idle zygotes closed runners left are checked (no
    child) and kept for the module's next tests, as a process keeps them for its next
    runners; the module's end stops them.
    """
    from actionpool.runner import _LIVE

    before = list(_LIVE)
    yield
    wrong, idle = check_idle_zygotes(stop=False)
    alive = leftover_children(allowed=_runner_workers(before) | idle)
    if alive:
        desc = []
        for p in alive:
            try:
                desc.append(f"{p.pid}: {' '.join(p.cmdline())[:120]}")
            except psutil.Error:
                desc.append(str(p.pid))
            with contextlib.suppress(psutil.Error):
                p.kill()
        wrong.append("test left child processes running:\n" + "\n".join(desc))
    if wrong:
        pytest.fail("\n".join(wrong))


@pytest.fixture(scope="module", autouse=True)
def no_leftover_processes_per_module() -> Iterator[None]:
    """After each module's fixtures are torn down, no child process may remain (the
    idle zygotes its runners left are stopped, after checking that they are idle)."""
    yield
    wrong, _ = check_idle_zygotes(stop=True)
    alive = leftover_children()
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not wrong, wrong
    assert not alive, f"module left child processes running: {[p.pid for p in alive]}"


@pytest.fixture
def runner() -> Iterator[object]:
    """A small runner (2 cpu workers, 4 io threads), closed after the test."""
    import actionpool as ap

    with ap.Runner(cpu_workers=2, io_workers=4) as r:
        yield r


@pytest.fixture(scope="session")
def dask_client() -> Iterator[object]:
    """A Dask LocalCluster on loopback for the whole session: 3 worker processes of one
    thread each, configured as a dask runner configures the cluster it starts
    (allowed-failures 0, worker-saturation 1.0), and its client."""
    distributed = pytest.importorskip("distributed")
    import dask

    from actionpool.pools.dask import _BLAS_VARS

    before = {var: os.environ.get(var) for var in _BLAS_VARS}
    with dask.config.set(
        {
            "distributed.scheduler.allowed-failures": 0,
            "distributed.scheduler.worker-saturation": 1.0,
        }
    ):
        cluster = distributed.LocalCluster(
            n_workers=3,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        )
    for var, value in before.items():  # LocalCluster sets them to 1 in this process
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    client = distributed.Client(cluster)
    _CLUSTER.append(client)
    try:
        yield client
    finally:
        _CLUSTER.clear()
        client.close()
        cluster.close()


@pytest.fixture(params=["local", "dask"])
def backend(request: pytest.FixtureRequest) -> str:
    """Run the test on both backends (the dask one on the session's LocalCluster)."""
    return str(request.param)


def make_runner(backend: str, request: pytest.FixtureRequest, **kwargs: object) -> object:
    """A runner of ``backend``: local with ``kwargs``, or on the session's cluster
    (``cpu_workers`` there is the cluster's, 3)."""
    import actionpool as ap

    if backend == "local":
        return ap.Runner(**kwargs)  # type: ignore[arg-type]
    kwargs.pop("cpu_workers", None)
    client = request.getfixturevalue("dask_client")
    return ap.Runner(backend="dask", client=client, **kwargs)  # type: ignore[arg-type]
