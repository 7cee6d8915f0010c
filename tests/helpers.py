"""Module-level actions for tests: importable, so loky workers load them by reference."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

import actionpool as ap


def add(a: int, b: int = 0) -> int:
    return a + b


def square(x: int) -> int:
    return x * x


def fail_at(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError("seven" if bad == 7 else f"item {x}")
    return x


def add_all(*xs: object) -> int:
    """The number of arguments (each may be anything)."""
    return len(xs)


def boom(msg: str = "boom") -> None:
    raise ValueError(msg)


def pid(_: Any = None) -> int:
    return os.getpid()


def sleep_then(value: Any, seconds: float) -> Any:
    time.sleep(seconds)
    return value


def stamp(tag: str, seconds: float = 0.0) -> tuple[str, float, float]:
    """Sleep ``seconds`` and return (tag, start, end) in time.time() seconds."""
    start = time.time()
    time.sleep(seconds)
    return tag, start, time.time()


def mark_then_sleep(path: str, seconds: float) -> tuple[float, float]:
    """Create the file ``path``, sleep ``seconds``; (start, end) in time.time() seconds."""
    start = time.time()
    with open(path, "w"):
        pass
    time.sleep(seconds)
    return start, time.time()


@ap.action(kind="io")
def io_stamp(tag: str, seconds: float = 0.0) -> tuple[str, float, float, str]:
    import threading

    start = time.time()
    time.sleep(seconds)
    return tag, start, time.time(), threading.current_thread().name


@ap.action(kind="cpu")
async def async_mark_then_sleep(path: str, seconds: float) -> str:
    """Create ``path``, then ``asyncio.sleep(seconds)``; if cancelled, write
    "cancelled" to it first."""
    import asyncio

    write_atomic(path, "started")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        write_atomic(path, "cancelled")
        raise
    return "slept"


async def async_square(x: int) -> int:
    return x * x


def set_key(ctx: ap.Context, key: str, value: Any) -> Any:
    ctx.update({key: value})
    return value


@ap.action(kind="cpu")
def mutate_state(ctx: ap.Context) -> Any:
    ctx.state["items"].append(os.getpid())
    return list(ctx.state["items"])


@ap.action(kind="io")
def io_mutate_state(ctx: ap.Context) -> Any:
    ctx.state["items"].append("io")
    return list(ctx.state["items"])


class Unpicklable:
    """Cannot be pickled (holds a lock)."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()


def hide_package(monkeypatch: Any, package: str) -> None:
    """Make ``package`` and its submodules fail to import for the rest of the test,
    as if it were not installed (already imported ones included)."""
    import sys

    for name in [m for m in sys.modules if m == package or m.startswith(f"{package}.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that whoever sees the file sees all of it.

    ``Path.write_text`` creates the file before it writes: a test that waits for
    the path and then reads it can read an empty file in between.
    """
    part = f"{path}.{os.getpid()}.part"
    Path(part).write_text(text)
    os.replace(part, path)


def wait_for_path(path: str | Path, what: str, timeout: float = 30.0) -> None:
    """Wait (up to ``timeout`` seconds) until the file ``path`` exists.

    Raises:
        AssertionError: naming ``what`` when it never appeared (in an action, the
            node fails with it instead of hanging the test).
    """
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{what}: {path} did not appear in {timeout:g} s"
        time.sleep(0.005)


def update_after(ctx: ap.Context, wait_for: str | None, updates: dict[str, Any]) -> None:
    """Wait until the file ``wait_for`` exists (None: do not wait), then
    ``ctx.update(updates)``: a writer that provably finishes after whatever creates
    that file."""
    if wait_for is not None:
        wait_for_path(wait_for, f"node {ctx.node!r}")
    ctx.update(updates)


def gate(mark: str, release: str) -> int:
    """Write this process's pid to ``mark``, then wait until ``release`` exists: an
    action that holds its worker (or thread) exactly as long as the test wants."""
    write_atomic(mark, str(os.getpid()))
    wait_for_path(release, "the gate's release")
    return os.getpid()


def task_for(
    fn: Any,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    node: str = "node",
    state: Any = None,
    timeout: float | None = None,
    attempt: int = 1,
) -> Any:
    """A :class:`~actionpool._worker.Task` of one call of ``fn`` (a function or an
    ``ap.action``), built as the scheduler builds one: the call pickled by
    ``dumps_call``, the state by ``dumps_state`` when the action takes a Context, no
    shared memory (every buffer stays in the pickle)."""
    from actionpool._worker import Task
    from actionpool.transfer import dumps_call, dumps_state

    spec = fn if isinstance(fn, ap.ActionSpec) else ap.action(fn, kind="io")
    wants = spec.wants_context
    return Task(
        run_id="test-run",
        node=node,
        attempt=attempt,
        timeout=timeout,
        wants_state=wants,
        state=dumps_state({} if state is None else state) if wants else None,
        call=dumps_call(node, spec.fn, args, kwargs or {}),
        shm_prefix=f"aptest-{os.getpid()}",
        shm_threshold=None,
        blas_threads=1,
    )


def result_value(result: Any) -> Any:
    """The value a successful :class:`~actionpool._worker.Result` carries (in the pickle)."""
    import pickle

    assert result.ok, (result.error_type, result.error_message, result.traceback)
    data, buffers = result.value
    assert buffers == ()  # task_for sends no buffer through shared memory
    return pickle.loads(data)


def start_child_then_sleep(mark: str, seconds: float) -> None:
    """Start a ``sleep`` child process (in this worker's process group), write
    ``"<this pid> <child pid>"`` to ``mark``, then sleep ``seconds``."""
    import subprocess

    child = subprocess.Popen(["sleep", str(int(seconds) + 30)])
    write_atomic(mark, f"{os.getpid()} {child.pid}")  # whoever sees it sees both pids
    time.sleep(seconds)


def slow_from(i: int, first_slow: int, seconds: float) -> tuple[int, int]:
    """``(i, this process's pid)``, after sleeping ``seconds`` when ``i >= first_slow``:
    a map whose work is all in its second half."""
    if i >= first_slow:
        time.sleep(seconds)
    return i, os.getpid()


def touch_item(folder: str, i: int, seconds: float = 0.0) -> int:
    """Sleep ``seconds``, then create ``folder/<i>``: a map whose side effects show
    which items ran."""
    time.sleep(seconds)
    (Path(folder) / str(i)).touch()
    return i


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Wait for an event outside this process (a file, a process exit), up to
    ``timeout`` seconds; ``what`` names it in the failure."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.01)


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie counts: it runs nothing more)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def pid_in(path: Path) -> int:
    """The pid an action wrote to ``path``, once it is there."""
    wait_for(lambda: path.exists() and path.read_text().strip().isdigit(), what=f"a pid in {path}")
    return int(path.read_text())


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most ``(start, end)`` spans that overlapped at one instant (an end sorts
    before a start at the same instant)."""
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def chatty(tag: str, lines: int = 1) -> str:
    """Print ``lines`` numbered lines to stdout, one to stderr, and log at INFO and
    WARNING (logger ``tests.chatty``); returns ``tag``."""
    import logging
    import sys

    for i in range(lines):
        print(f"{tag} line {i}")
    print(f"{tag} to stderr", file=sys.stderr)
    log = logging.getLogger("tests.chatty")
    log.info("%s info", tag)
    log.warning("%s warning", tag)
    return tag
