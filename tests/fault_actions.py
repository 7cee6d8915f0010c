"""Module-level actions that fail in every way a worker can, for tests/test_faults.py."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import actionpool as ap
from tests.helpers import write_atomic


def write(path: str | None, text: str) -> None:
    if path:
        write_atomic(path, text)


def sleep_long(seconds: float = 30.0, mark: str | None = None) -> str:
    write(mark, str(os.getpid()))
    time.sleep(seconds)
    return "woke"


def spin_python(mark: str | None = None) -> None:
    write(mark, str(os.getpid()))
    while True:
        pass


def catch_timeout(mark: str) -> str:
    try:
        time.sleep(30)
    except ap.ActionTimeout:
        write(mark, "cleaned up")
        raise
    return "never"


def block_signals_and_sleep(mark: str | None = None) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    write(mark, str(os.getpid()))
    time.sleep(30)


def stuck_in_c(mark: str | None = None) -> None:
    # libc's sleep() restarts nowhere near the interpreter: with SIGALRM blocked, no
    # Python signal handler can run until it returns (in 30 s).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    write(mark, str(os.getpid()))
    ctypes.CDLL(None).sleep(30)


@ap.action(kind="io", timeout=0.3)
def io_until_cancelled(ctx: ap.Context, mark: str) -> str:
    while not ctx.cancelled():
        time.sleep(0.01)
    write(mark, f"saw cancelled at {time.time()}")
    return "stopped"


@ap.action(kind="io")
def io_until_run_cancelled(ctx: ap.Context, started: str, mark: str) -> str:
    """No deadline: only a cancel can turn ctx.cancelled() True (gives up after 20 s)."""
    write(started, "polling")
    end = time.monotonic() + 20
    while not ctx.cancelled() and time.monotonic() < end:
        time.sleep(0.01)
    write(mark, f"saw cancelled: {ctx.cancelled()}")
    return "stopped"


@ap.action(kind="io", timeout=0.3)
async def async_sleep(mark: str) -> str:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        write(mark, "cancelled")
        raise
    return "never"


def exit_with(code: int) -> None:
    os._exit(code)


def exit_after(seconds: float, code: int) -> None:
    time.sleep(seconds)  # the caller is waiting on the call by then (shutdown(wait=True))
    os._exit(code)


def start_child_then_exit(mark: str, code: int) -> None:
    import subprocess

    child = subprocess.Popen(["sleep", "60"])  # in this worker's process group
    write(mark, str(child.pid))
    os._exit(code)


def fork_keeper_then_exit(mark: str, code: int) -> None:
    """Fork a child that leaves this worker's session and process group (so killing
    the group spares it) and keeps every fd this worker had, its socket included;
    exit once it has."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            write(mark, str(os.getpid()))
            time.sleep(60)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 30
    while not (Path(mark).exists() and Path(mark).read_text().isdigit()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    os._exit(code)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def segfault() -> None:
    ctypes.string_at(0)


def allocate_then_wait(mark: str) -> None:
    block = bytearray(50 * 2**20)  # the kind of process the OOM killer picks
    write(mark, str(os.getpid()))
    time.sleep(30)
    del block


def crash_first_time(flag: str) -> str:
    if not Path(flag).exists():
        Path(flag).write_text("crashed once")
        os._exit(7)
    return "second attempt"


def stamp(tag: str, seconds: float = 0.0) -> tuple[str, float, float, int]:
    start = time.time()
    time.sleep(seconds)
    return tag, start, time.time(), os.getpid()


def fail() -> None:
    raise RuntimeError("first failure")


class NeedsTwoArgs(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"a={a} b={b}")
        self.a, self.b = a, b

    def __reduce__(self) -> tuple[Any, ...]:
        # One argument short, so unpickling always fails: pickle's default would too,
        # but importing distributed installs tblib's exception pickling, which rebuilds
        # any exception, in every process that imported it.
        return (NeedsTwoArgs, (self.a,))


def raise_unrebuildable() -> None:
    raise NeedsTwoArgs(1, 2)


def return_lock() -> Any:
    return threading.Lock()


@ap.action(kind="io", timeout=0.2)
def io_polls_fast(ctx: ap.Context) -> str:
    while not ctx.cancelled():
        time.sleep(0.001)
    return "returned after noticing"


def catch_timeout_and_return() -> str:
    try:
        time.sleep(30)
    except ap.ActionTimeout:
        return "finished late"
    return "never"


@ap.action(kind="io", timeout=0.2)
async def blocks_its_loop() -> str:
    time.sleep(1.5)  # a mistake: blocking inside a coroutine
    return "late"


def crash_on(x: int, bad: int) -> int:
    if x == bad:
        os._exit(9)
    return x * 10


def replace_alarm_handler() -> str:
    signal.signal(signal.SIGALRM, signal.SIG_IGN)  # an action that meddles
    return "replaced"


class CrashesWhenUnpickled:
    """An argument whose unpickling kills the worker (think of a broken C extension)."""

    def __reduce__(self) -> tuple[object, ...]:
        return (os._exit, (11,))


def slow_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def np_random_and_pid() -> tuple[float, int]:
    import numpy as np

    time.sleep(0.2)  # long enough for the other worker to take the next call
    return float(np.random.rand()), os.getpid()


class SlowToFree:
    """An argument whose copy in a worker takes ``seconds`` to free (think of a large
    structure of small objects); the process that made it frees its own at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.owner = os.getpid()

    def __del__(self) -> None:
        if os.getpid() != self.owner:
            time.sleep(self.seconds)


def worker_pid(_arg: object) -> int:
    return os.getpid()


def _crash_once(path: str) -> str:
    """Kill this worker the first time (no file at ``path`` yet), else return a value."""
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        os._exit(11)
    return "unpickled"


class CrashesWhenUnpickledOnce:
    """An argument whose first unpickling kills the worker; later ones work."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (_crash_once, (self.path,))


def _exit_now() -> None:
    raise SystemExit(3)


class ExitsWhenUnpickled:
    """An argument whose unpickling raises SystemExit in the worker."""

    def __reduce__(self) -> tuple[object, ...]:
        return (_exit_now, ())


def append_to(proxy: Any, item: Any) -> int:
    """Append ``item`` to a ``multiprocessing.Manager`` list proxy; its new length."""
    proxy.append(item)
    return len(proxy)
