"""Worker resources (``Runner(resources=...)``, ``ctx.resources``), on real processes.

Factories here log each call to a file ("made <pid>") and their resources log their
close ("closed <pid>"): what the file says after the runner closed is what happened
in the workers.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest

import actionpool as ap
from actionpool.resources import ResourceRegistry, Resources, pack
from tests import helpers as h

# ---- factories and resources (module level: they travel to workers by reference) ----


def _log(path: str, line: str) -> None:
    with open(path, "a") as f:  # one short write per line: atomic on a local file
        f.write(f"{line}\n")


def lines(path: Path, word: str) -> list[int]:
    """The pids of the lines of ``path`` that start with ``word``."""
    if not path.exists():
        return []
    return [
        int(line.split()[1]) for line in path.read_text().splitlines() if line.split()[0] == word
    ]


class Logged:
    """A resource that logs its making and its close."""

    def __init__(self, path: str, delay: float = 0.0) -> None:
        time.sleep(delay)  # a slow factory: racing threads all arrive while it runs
        self.path = path
        _log(path, f"made {os.getpid()}")

    def close(self) -> None:
        _log(self.path, f"closed {os.getpid()}")


class Managed:
    """A context manager without ``close()``: closed through ``__exit__``."""

    def __init__(self, path: str) -> None:
        self.path = path
        _log(path, f"made {os.getpid()}")

    def __enter__(self) -> Managed:
        return self

    def __exit__(self, *exc: Any) -> None:
        _log(self.path, f"closed {os.getpid()} {exc}")


class BadClose(Logged):
    def close(self) -> None:
        raise OSError("cannot close")


class Unpicklable:
    """A resource that must never be pickled."""

    def __reduce__(self) -> Any:
        raise TypeError("a resource is never pickled")


def refusing(path: str) -> Any:
    _log(path, f"made {os.getpid()}")
    raise ConnectionError("connection refused")


def uses(ctx: ap.Context, name: str = "r") -> tuple[int, int]:
    """The worker's pid and the identity of the resource ``name`` there."""
    return os.getpid(), id(ctx.resources[name])


io_uses = ap.action(uses, kind="io", name="io_uses")

_BARRIER: list[threading.Barrier] = []  # io actions run in this process: shared here


@ap.action(kind="io")
def racing(ctx: ap.Context) -> int:
    _BARRIER[0].wait()  # every io thread asks at the same moment
    return id(ctx.resources["r"])


def lists_then_asks(ctx: ap.Context, name: str) -> Any:
    listed = (list(ctx.resources), "r" in ctx.resources, name in ctx.resources, len(ctx.resources))
    assert listed == (["r"], True, False, 1), listed
    return ctx.resources[name]


def uses_unpicklable(ctx: ap.Context) -> str:
    assert isinstance(ctx.resources["u"], Unpicklable)
    ctx.update(seen=ctx.state["k"] + 1)
    return "ok"


def item_uses(ctx: ap.Context, i: int) -> tuple[int, int]:
    return os.getpid(), id(ctx.resources["r"])


# ---- cpu workers: once per process, closed at the end -------------------------------


def test_cpu_resource_made_once_per_worker_and_closed(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with ap.Runner(cpu_workers=2, resources={"r": partial(Logged, str(log))}) as runner:
        seen = [f.result() for f in [runner.submit(uses) for _ in range(40)]]
        plan = ap.Plan()
        for i in range(10):
            plan.add(uses, name=f"n{i}")
        report = runner.run(plan)
        seen += [o.value for o in report.outcomes]
    made = lines(log, "made")
    assert made and max(Counter(made).values()) == 1, made  # at most once per pid
    workers = {pid for pid, _ in seen}
    assert set(made) == workers
    for pid in workers:  # one instance per process, whatever the attempt
        assert len({ident for p, ident in seen if p == pid}) == 1
    h.wait_for(lambda: sorted(lines(log, "closed")) == sorted(made), what="every close")


def test_map_chunk_items_share_the_workers_resource(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with ap.Runner(cpu_workers=2, resources={"r": partial(Logged, str(log))}) as runner:
        seen = list(runner.map(item_uses, range(500)))
        io_seen = list(runner.map(ap.action(item_uses, kind="io"), range(50)))
    assert len(seen) == 500
    by_pid: dict[int, set[int]] = {}
    for pid, ident in seen:
        by_pid.setdefault(pid, set()).add(ident)
    assert all(len(idents) == 1 for idents in by_pid.values()), by_pid
    assert len({ident for _, ident in io_seen}) == 1  # the runner's one io instance
    made = lines(log, "made")
    assert max(Counter(made).values()) <= 2  # a worker's, and the runner's (io) in here
    assert Counter(made)[os.getpid()] == 1
    assert set(by_pid) <= set(made)
    h.wait_for(lambda: sorted(lines(log, "closed")) == sorted(made), what="every close")


# ---- io threads: once per runner, even when they race --------------------------------


def test_io_resource_made_once_per_runner_by_racing_threads(tmp_path: Path) -> None:
    log = tmp_path / "log"
    _BARRIER[:] = [threading.Barrier(8, timeout=30)]
    factory = partial(Logged, str(log), 0.2)
    with ap.Runner(cpu_workers=1, io_workers=8, resources={"r": factory}) as runner:
        plan = ap.Plan()
        for i in range(8):
            plan.add(racing, name=f"n{i}")
        report = runner.run(plan)
        assert report.status is ap.RunStatus.SUCCEEDED, report
        assert len({o.value for o in report.outcomes}) == 1
        assert lines(log, "made") == [os.getpid()]
        assert lines(log, "closed") == []  # open while the runner is
        # a second runner with the very same factory has instances of its own
        with ap.Runner(cpu_workers=1, io_workers=1, resources={"r": factory}) as other:
            other_id = other.submit(io_uses).result()[1]
        assert other_id != report.outcomes[0].value
        assert lines(log, "closed") == [os.getpid()]  # the other runner's
    assert lines(log, "closed") == [os.getpid()] * 2
    assert lines(log, "made") == [os.getpid()] * 2


def test_context_manager_resource_is_exited(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with ap.Runner(cpu_workers=1, io_workers=1, resources={"r": partial(Managed, str(log))}) as r:
        cpu_pid, _ = r.submit(uses).result()
        r.submit(io_uses).result()
    assert sorted(lines(log, "made")) == sorted([cpu_pid, os.getpid()])
    h.wait_for(lambda: len(lines(log, "closed")) == 2, what="both exits")
    text = log.read_text()
    assert f"closed {cpu_pid} (None, None, None)" in text
    assert f"closed {os.getpid()} (None, None, None)" in text


def test_a_close_that_raises_is_a_warning_and_the_others_still_close(tmp_path: Path) -> None:
    log = tmp_path / "log"
    resources: dict[str, Any] = {"r": partial(Logged, str(log)), "bad": partial(BadClose, str(log))}
    with (
        pytest.warns(RuntimeWarning, match="closing resource 'bad' raised OSError"),
        ap.Runner(cpu_workers=1, io_workers=1, resources=resources) as runner,
    ):
        runner.submit(io_uses, "bad").result()
        runner.submit(io_uses, "r").result()
    assert lines(log, "closed") == [os.getpid()]


# ---- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cpu", "io"])
def test_a_factory_that_raises_fails_the_node_and_a_retry_calls_it_again(
    tmp_path: Path, kind: str
) -> None:
    log = tmp_path / "log"
    action = ap.action(uses, kind=kind, name="needs_db", retries=1)
    with ap.Runner(cpu_workers=1, io_workers=1, resources={"db": partial(refusing, str(log))}) as r:
        plan = ap.Plan()
        plan.add(action, "db", name="x")
        out = r.run(plan).outcomes[0]
    assert out.status is ap.Status.FAILED
    assert out.attempts == 2
    assert isinstance(out.error, ap.ResourceError)
    assert str(out.error).startswith("resource 'db' of node 'x': its factory raised")
    assert "ConnectionError: connection refused" in str(out.error)
    assert out.traceback is not None and "ConnectionError" in out.traceback
    assert len(lines(log, "made")) == 2  # not cached: called again on the retry


@pytest.mark.parametrize("kind", ["cpu", "io"])
def test_an_undeclared_name_is_a_key_error_naming_the_known_ones(tmp_path: Path, kind: str) -> None:
    log = tmp_path / "log"
    action = ap.action(lists_then_asks, kind=kind, name="asks")
    with ap.Runner(cpu_workers=1, io_workers=1, resources={"r": partial(Logged, str(log))}) as r:
        plan = ap.Plan()
        plan.add(action, "nope", name="x")
        out = r.run(plan).outcomes[0]
    assert out.status is ap.Status.FAILED
    assert isinstance(out.error, KeyError)
    assert "resource 'nope' of node 'x' was not declared; known resources: 'r'" in str(out.error)
    assert lines(log, "made") == []  # listing and `in` made nothing


def test_without_resources_ctx_resources_is_empty() -> None:
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        fut = r.submit(uses)
        with pytest.raises(KeyError, match="no resources were declared"):
            fut.result()
    ctx = ap.Context(state={}, node="direct")
    assert list(ctx.resources) == [] and "r" not in ctx.resources


def test_a_resource_is_neither_state_nor_pickled() -> None:
    resources = {"u": Unpicklable}
    with ap.Runner(cpu_workers=1, io_workers=1, resources=resources) as r:
        plan = ap.Plan()
        plan.add(uses_unpicklable, name="cpu")
        plan.add(ap.action(uses_unpicklable, kind="io", name="io"), name="io", after="cpu")
        report = r.run(plan, state={"k": 1}, reducers={"seen": max})
    assert report.status is ap.RunStatus.SUCCEEDED, [o.error for o in report.outcomes]
    assert report.state == {"k": 1, "seen": 2}


# ---- checked at Runner() --------------------------------------------------------------


def test_bad_resources_are_refused_before_anything_starts() -> None:
    children = psutil.Process().children(recursive=True)
    lock = threading.Lock()
    with pytest.raises(ap.SerializationError, match="resource 'held': its factory"):
        ap.Runner(resources={"held": lambda: lock})
    with pytest.raises(TypeError, match="mapping of name -> factory"):
        ap.Runner(resources=[("r", Logged)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="the name 1 must be a str"):
        ap.Runner(resources={1: dict})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="non-empty"):
        ap.Runner(resources={"": dict})
    with pytest.raises(TypeError, match=r"resources\['r'\] must be a factory"):
        ap.Runner(resources={"r": 42})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"resources\['r'\]: the factory must be callable with no"):
        ap.Runner(resources={"r": Logged})  # type: ignore[dict-item]
    assert psutil.Process().children(recursive=True) == children


# ---- the registry itself ----------------------------------------------------------------


def test_registry_makes_once_closes_last_made_first_and_then_refuses(tmp_path: Path) -> None:
    log = tmp_path / "log"
    payload = pack({"a": partial(Logged, str(log)), "b": partial(Managed, str(log))})
    assert payload is not None
    registry = ResourceRegistry(payload)  # factories unpickled on first use
    view = Resources(registry, "n")
    assert view["a"] is view["a"]
    view["b"]
    registry.close()
    assert [line.split()[0] for line in log.read_text().splitlines()] == [
        "made",
        "made",
        "closed",  # b, the last made
        "closed",
    ]
    assert log.read_text().splitlines()[2].endswith("(None, None, None)")
    with pytest.raises(ap.ResourceError, match="the resources are closed"):
        view["a"]


def test_a_lock_is_not_exited_at_close() -> None:
    payload = pack({"lock": threading.Lock})
    assert payload is not None
    registry = ResourceRegistry(payload)
    lock = Resources(registry, "n")["lock"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # releasing an unheld lock would warn
        registry.close()
    assert not lock.locked()


# ---- Dask: once per worker-local process ------------------------------------------------


@pytest.mark.slow
def test_dask_resources_once_per_worker_process_and_closed(
    dask_client: Any, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    resources = {"r": partial(Logged, str(log))}
    with ap.Runner(backend="dask", client=dask_client, resources=resources) as r:
        plan = ap.Plan()
        for i in range(12):
            plan.add(uses, name=f"n{i}")
        report = r.run(plan)
        assert report.status is ap.RunStatus.SUCCEEDED, [o.error for o in report.outcomes]
        seen = list(r.map(item_uses, range(40)))
    made = lines(log, "made")
    assert max(Counter(made).values()) == 1, made
    assert {pid for pid, _ in [o.value for o in report.outcomes] + seen} <= set(made)
    h.wait_for(lambda: sorted(lines(log, "closed")) == sorted(made), 30, "every close")
