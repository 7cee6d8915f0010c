"""CPython's own ``concurrent.futures`` tests, run against :class:`actionpool.Runner`.

A runner is a ``concurrent.futures.Executor`` (docs/concepts.md, "The runner"), so it
should drop in wherever one is accepted. This module holds that promise to the standard
library's own test suite (``test.test_concurrent_futures``: ``ExecutorTest`` with the
process pool's additions, ``WaitTests``, ``AsCompletedTests``, ``ExecutorShutdownTest``
with the process pool's additions, ``ExecutorDeadlockTest``), imported from the
interpreter's ``test`` package and run through a small mixin that builds an
``ap.Runner`` where CPython's ``ExecutorMixin`` builds a ``ProcessPoolExecutor``.
Interpreters without that package (most distributions strip it; CPython 3.13 built by
pyenv ships it) skip the module.

Every suite runs with forked workers (``RunnerFork*``); those whose outcome may depend
on how workers start run again with workers from a fresh interpreter (``RunnerFresh*``).

* :data:`EXCLUDED` lists every test that is not run, with the reason: those that read
  ``ProcessPoolExecutor``'s private attributes, test its own options, patch its
  internals, or expect its whole pool to break where a runner fails one call by design.
* :data:`ADAPTED` holds the tests rewritten here: CPython's steps and assertions, less
  what names ``ProcessPoolExecutor`` or its private attributes (each docstring says
  what changed). :data:`ADDED` holds one test of our own in the same spirit.
* :data:`KNOWN_BREAKS` marks the tests that fail today (none, now), with the reason
  and the exception they fail with: ``xfail(strict=True, raises=...)``, so the day
  one passes the suite fails, and its entry must then go.

Run it alone (``python -m pytest tests/test_executor_conformance.py``): the fork
variant needs a process that runs no other thread when a runner starts.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import pickle
import sys
import tempfile
import threading
import time
import unittest
from concurrent.futures import BrokenExecutor
from concurrent.futures.process import BrokenProcessPool
from pickle import PicklingError
from typing import Any

import psutil
import pytest

import actionpool as ap

try:
    from test import support
    from test.support.script_helper import assert_python_ok
    from test.test_concurrent_futures import test_as_completed as cf_as_completed
    from test.test_concurrent_futures import test_deadlock as cf_deadlock
    from test.test_concurrent_futures import test_process_pool as cf_process_pool
    from test.test_concurrent_futures import test_shutdown as cf_shutdown
    from test.test_concurrent_futures import test_wait as cf_wait
    from test.test_concurrent_futures import util as cf_util
except ImportError as exc:  # pragma: no cover - depends on the interpreter's build
    pytest.skip(
        f"this interpreter ({sys.version.split()[0]}) has no test.test_concurrent_futures"
        f" (CPython's own test package is not installed: {exc})",
        allow_module_level=True,
    )

pytestmark = pytest.mark.filterwarnings(
    # test_ressources_gced_in_workers starts a multiprocessing Manager by fork while the
    # runner's threads run (CPython's own test does the same beside its pool's threads)
    "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"
)

# Each CPython test gets this many seconds (pytest-timeout's signal method: a timer
# thread would make this process multi-threaded, which worker_start="fork" refuses).
TEST_TIMEOUT_S = 60
# A runner's shutdown gets this long in tearDown before the test is failed as hung and
# the processes it started are killed (a dead scheduler thread made it wait for ever).
SHUTDOWN_TIMEOUT_S = 20.0
# _check_crash waits this long for a crashed call's future before it calls the pool
# deadlocked (CPython waits support.LONG_TIMEOUT, five minutes).
DEADLOCK_TIMEOUT_S = 20.0

_opened: list[ap.Runner] = []  # every runner the current test made, in order


def _make_runner(
    max_workers: int | None = None,
    mp_context: Any = None,
    *,
    worker_start: str = "fork",
    **options: Any,
) -> ap.Runner:
    """``ProcessPoolExecutor(max_workers, mp_context=...)``, as a runner.

    The context's start method picks how the workers start: ``"fork"`` forks this
    process's zygote, any other a fresh interpreter. A runner made while the test's
    first one is open cannot fork (that one's scheduler thread runs here, and
    ``worker_start="fork"`` refuses), so it starts fresh, as ``"auto"`` would.
    """
    if options:
        raise TypeError(f"Runner takes no ProcessPoolExecutor option {sorted(options)}")
    if mp_context is not None:
        worker_start = "fork" if mp_context.get_start_method() == "fork" else "fresh"
    try:
        runner = ap.Runner(cpu_workers=max_workers, io_workers=2, worker_start=worker_start)
    except RuntimeError:
        if worker_start != "fork" or not _opened:
            raise
        runner = ap.Runner(cpu_workers=max_workers, io_workers=2, worker_start="fresh")
    _opened.append(runner)
    return runner


def _shutdown_or_kill(runner: ap.Runner) -> str | None:
    """Shut ``runner`` down (waiting), on a thread of its own so that a hang cannot
    hold the suite; after SHUTDOWN_TIMEOUT_S, kill this process's children instead
    and say so."""
    done = threading.Thread(target=runner.shutdown, name="conformance-shutdown", daemon=True)
    done.start()
    done.join(SHUTDOWN_TIMEOUT_S)
    if not done.is_alive():
        return None
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" not in " ".join(child.cmdline()):
                child.kill()
    return f"{runner!r}: shutdown() did not return within {SHUTDOWN_TIMEOUT_S:g} s"


class _RunnerMixin:
    """What CPython's process-pool mixins add to a test case, for a runner.

    CPython's tests call ``self.executor_type(max_workers=..., mp_context=...)`` and
    use ``self.executor``, made by ``ExecutorMixin.setUp`` with ``worker_count`` (5)
    workers.
    """

    executor_type = staticmethod(_make_runner)
    worker_start = "fork"

    def setUp(self) -> None:
        _opened.clear()
        threads = psutil.Process().num_threads()
        # threads an earlier test module left (NumPy's BLAS pool) are not this test's
        self._threads_before = threads
        if self.worker_start == "fork" and threads > 1:
            # not ours: tearDown fails a test of this module that leaves a thread
            raise unittest.SkipTest(
                f"this process runs {threads} threads, left by an earlier test, and a"
                " runner cannot fork it: run this module alone"
            )
        super().setUp()  # type: ignore[misc]

    def tearDown(self) -> None:
        # Every runner the test made is shut down here, also those a failed assertion
        # left open (CPython's _check_crash shuts its pool only on success), so that
        # no process outlives the test and the next one can fork.
        hung = [why for r in _opened if (why := _shutdown_or_kill(r))]
        _opened.clear()
        # what the test itself started (a multiprocessing Manager), which its failed
        # assertion left running
        for proc in multiprocessing.active_children():
            proc.kill()
            proc.join()
        # the shutdown thread's OS thread ends a little after join() returns
        before = self._threads_before
        deadline = time.monotonic() + (0 if hung else 5.0)
        while (threads := psutil.Process().num_threads()) > before and (
            time.monotonic() < deadline
        ):
            time.sleep(0.01)
        super().tearDown()  # type: ignore[misc]
        if hung:
            raise AssertionError("; ".join(hung))
        if threads > before:  # a shut-down runner must leave none (and the next test forks)
            raise AssertionError(f"{threads - before} threads still run after every runner ended")


class RunnerForkMixin(_RunnerMixin, cf_util.ProcessPoolForkMixin):
    """CPython's ``ProcessPoolForkMixin``, with a runner whose zygote is forked."""


class RunnerFreshMixin(_RunnerMixin, cf_util.ProcessPoolSpawnMixin):
    """CPython's ``ProcessPoolSpawnMixin``, with a runner whose workers start from a
    fresh interpreter."""

    worker_start = "fresh"


def _fail_on_deadlock(self: unittest.TestCase, executor: ap.Runner) -> None:
    """CPython's terminates ``ProcessPoolExecutor._processes``; tearDown kills ours."""
    with tempfile.TemporaryFile(mode="w+") as f:
        faulthandler.dump_traceback(file=f)
        f.seek(0)
        tb = f.read()
    self.fail(f"Executor deadlock:\n\n{tb}")


# ---- CPython's tests, adapted --------------------------------------------------------
# Each is CPython's test with the same steps and assertions, but for what names
# ProcessPoolExecutor or its private attributes; the docstring says what changed.


def test_max_workers_negative(self: Any) -> None:
    """The message names the runner's parameter, ``cpu_workers``, where CPython's
    names ``max_workers``."""
    for number in (0, -1):
        with self.assertRaisesRegex(ValueError, "cpu_workers must be an int >= 1"):
            self.executor_type(max_workers=number)


def test_traceback(self: Any) -> None:
    """The remote traceback's type is the runner's, not ``ProcessPoolExecutor``'s
    private ``_RemoteTraceback``; its ``tb`` and what ``sys.excepthook`` prints are
    checked as CPython does."""
    future = self.executor.submit(cf_process_pool.ProcessPoolExecutorTest._test_traceback)
    with self.assertRaises(Exception) as cm:
        future.result()

    exc = cm.exception
    self.assertIs(type(exc), RuntimeError)
    self.assertEqual(exc.args, (123,))
    cause = exc.__cause__
    self.assertIn("raise RuntimeError(123) # some comment", cause.tb)

    with support.captured_stderr() as f1:
        try:
            raise exc
        except RuntimeError:
            sys.excepthook(*sys.exc_info())
    self.assertIn("raise RuntimeError(123) # some comment", f1.getvalue())


def test_context_manager_shutdown(self: Any) -> None:
    """A runner, not ``futures.ProcessPoolExecutor`` itself; its ``_processes`` are
    not joined (conftest's fixture checks that none is left)."""
    with self.executor_type(max_workers=5, mp_context=self.get_context()) as e:
        self.assertEqual(list(e.map(abs, range(-5, 5))), [5, 4, 3, 2, 1, 0, 1, 2, 3, 4])


def test_del_shutdown(self: Any) -> None:
    """A runner, not ``futures.ProcessPoolExecutor`` itself; its manager thread,
    processes and call queue are not joined."""
    executor = self.executor_type(max_workers=5, mp_context=self.get_context())
    res = executor.map(abs, range(-5, 5))
    del executor
    support.gc_collect()

    # Make sure the results were all computed before the executor got shutdown.
    assert all([r == abs(v) for r, v in zip(res, range(-5, 5), strict=True)])


def test_shutdown_no_wait(self: Any) -> None:
    """A runner, not ``futures.ProcessPoolExecutor`` itself; its manager thread,
    processes and call queue are not joined."""
    executor = self.executor_type(max_workers=5, mp_context=self.get_context())
    res = executor.map(abs, range(-5, 5))
    executor.shutdown(wait=False)

    # Make sure the results were all computed before the executor got shutdown.
    assert all([r == abs(v) for r, v in zip(res, range(-5, 5), strict=True)])


def test_shutdown_after_unconsumed_map_of_many_items(self: Any) -> None:
    """Not CPython's: ``test_del_shutdown`` with more items than a runner's map keeps
    in flight (ProcessPoolExecutor.map submits every item at once)."""
    res = self.executor.map(abs, range(-50, 50))
    self.executor.shutdown(wait=True)
    self.assertEqual(list(res), [abs(v) for v in range(-50, 50)])


def _run_script(self: Any, body: str, workers: int) -> tuple[bytes, bytes]:
    """``assert_python_ok`` of a script whose ``{make}`` makes a runner (CPython's
    makes ``{executor_type}(workers)``)."""
    make = f"ap.Runner({workers}, worker_start={self.worker_start!r})"
    _rc, out, err = assert_python_ok("-c", body.replace("{make}", make))
    return out, err


def test_interpreter_shutdown(self: Any) -> None:
    """The script's executor is a runner."""
    out, err = _run_script(
        self,
        """if 1:
            import actionpool as ap
            from test.test_concurrent_futures.test_shutdown import sleep_and_print
            if __name__ == "__main__":
                t = {make}
                t.submit(sleep_and_print, 1.0, "apple")
            """,
        5,
    )
    # Errors in atexit hooks don't change the process exit code, check stderr manually.
    self.assertFalse(err)
    self.assertEqual(out.strip(), b"apple")


def test_submit_after_interpreter_shutdown(self: Any) -> None:
    """The script's executor is a runner, whose message differs."""
    out, err = _run_script(
        self,
        """if 1:
            import atexit
            @atexit.register
            def run_last():
                try:
                    t.submit(id, None)
                except RuntimeError:
                    print("runtime-error")
                    raise
            import actionpool as ap
            if __name__ == "__main__":
                t = {make}
                t.submit(id, 42).result()
            """,
        5,
    )
    # Errors in atexit hooks don't change the process exit code, check stderr manually.
    self.assertIn("RuntimeError: cannot submit to a closed Runner", err.decode())
    self.assertEqual(out.strip(), b"runtime-error")


def test_hang_gh83386(self: Any) -> None:
    """shutdown(wait=False) doesn't hang at exit with running futures; the script's
    executor is a runner (CPython skips this test for ProcessPoolExecutor, which
    hangs)."""
    out, err = _run_script(
        self,
        """if True:
            import actionpool as ap
            from test.test_concurrent_futures.test_shutdown import sleep_and_print
            if __name__ == "__main__":
                t = {make}
                t.submit(sleep_and_print, 1.0, "apple")
                t.shutdown(wait=False)
            """,
        3,
    )
    self.assertFalse(err)
    self.assertEqual(out.strip(), b"apple")


def test_shutdown_deadlock_pickle(self: Any) -> None:
    """The pool's ``_executor_manager_thread`` is not joined at the end."""
    self.executor.shutdown(wait=True)
    with self.executor_type(max_workers=2, mp_context=self.get_context()) as executor:
        self.executor = executor  # Allow clean up in fail_on_deadlock
        executor.submit(id, 42).result()
        # Submit a task that fails at pickle and shutdown the executor without waiting
        f = executor.submit(id, cf_deadlock.ErrorAtPickle())
        executor.shutdown(wait=False)
        with self.assertRaises(PicklingError):
            f.result()


def test_ressources_gced_in_workers(self: Any) -> None:
    """CPython's, with its cleanup in a ``finally``: when the call fails, the object's
    ``__del__`` would otherwise run in a later test, against a manager gone."""
    mgr = self.get_context().Manager()
    obj = None
    try:
        obj = cf_process_pool.EventfulGCObj(mgr)
        future = self.executor.submit(id, obj)
        future.result()

        self.assertTrue(obj.event.wait(timeout=1))
    finally:
        # explicitly destroy the object to ensure that EventfulGCObj.__del__()
        # is called while manager is still running.
        support.gc_collect()
        obj = None
        support.gc_collect()

        mgr.shutdown()
        mgr.join()


ADAPTED: dict[str, Any] = {
    fn.__name__: fn
    for fn in (
        test_max_workers_negative,
        test_traceback,
        test_ressources_gced_in_workers,
        test_context_manager_shutdown,
        test_del_shutdown,
        test_shutdown_no_wait,
        test_interpreter_shutdown,
        test_submit_after_interpreter_shutdown,
        test_hang_gh83386,
        test_shutdown_deadlock_pickle,
    )
}
ADDED: dict[str, list[Any]] = {"ShutdownTest": [test_shutdown_after_unconsumed_map_of_many_items]}
del test_max_workers_negative, test_traceback, test_ressources_gced_in_workers
del test_context_manager_shutdown
del test_del_shutdown, test_shutdown_no_wait, test_interpreter_shutdown
del test_submit_after_interpreter_shutdown, test_hang_gh83386, test_shutdown_deadlock_pickle
del test_shutdown_after_unconsumed_map_of_many_items  # not pytest functions of this module

_PRIVATE = "reads ProcessPoolExecutor's private attributes"
_ONE_CALL_FAILS = (
    "by design, a call that cannot be unpickled fails alone (SerializationError) and the"
    " pool goes on; ProcessPoolExecutor breaks its whole pool (BrokenProcessPool)"
)
EXCLUDED: dict[str | tuple[str, str], str] = {
    # ExecutorTest, as test_process_pool extends it
    "test_max_workers_too_large": "Windows only; creates a futures.ProcessPoolExecutor itself",
    "test_killed_child": f"{_PRIVATE} (_processes) to kill a worker; and then expects every"
    " later submit to fail, where a runner heals by design (docs/concepts.md, 'Crashes';"
    " tests/test_faults.py covers it)",
    "test_saturation": f"{_PRIVATE} (_max_workers, _processes)",
    "test_idle_process_reuse_one": f"{_PRIVATE} (_max_workers, _processes)",
    "test_idle_process_reuse_multiple": f"{_PRIVATE} (_max_workers, _processes)",
    "test_max_tasks_per_child": "ProcessPoolExecutor's max_tasks_per_child option and"
    " _processes; a runner has no such option",
    "test_max_tasks_per_child_defaults_to_spawn_context": "ProcessPoolExecutor's"
    " max_tasks_per_child option and _mp_context",
    "test_max_tasks_early_shutdown": "ProcessPoolExecutor's max_tasks_per_child option",
    "test_python_finalization_error": "injects its failure by patching threading's thread"
    " start, which ProcessPoolExecutor uses for its manager thread; a runner starts no"
    " thread there, so nothing would be tested",
    # ExecutorShutdownTest, as ProcessPoolShutdownTest extends it
    "test_processes_terminate": f"{_PRIVATE} (_processes)",
    # ExecutorDeadlockTest
    "test_gh105829_should_not_deadlock_if_wakeup_pipe_full": "patches ProcessPoolExecutor's"
    " private _ExecutorManagerThread and _ThreadWakeup, which a runner does not use",
    ("Fresh", "test_map_timeout"): "map's timeout does not depend on how workers start,"
    " and the test sleeps for its 5 s timeout: it runs once, with forked workers",
    # By design (docs/concepts.md, "Crashes"; tests/test_faults.py covers ours): a
    # call whose call or result cannot be unpickled, even with SystemExit, fails alone
    # with SerializationError (a pickle.PicklingError) and the pool goes on, where
    # ProcessPoolExecutor marks its whole pool broken (BrokenProcessPool).
    "test_error_at_task_unpickle": _ONE_CALL_FAILS,
    "test_exit_at_task_unpickle": _ONE_CALL_FAILS,
    "test_error_during_result_unpickle_in_result_handler": _ONE_CALL_FAILS,
    "test_exit_during_result_unpickle_in_result_handler": _ONE_CALL_FAILS,
}

# (variant, or None for both; test) -> (why it fails today, what it raises then).
# xfail(strict=True, raises=...): a test that starts passing fails the suite, and its
# entry here must go; one that fails otherwise than noted here fails it too.
KNOWN_BREAKS: dict[tuple[str | None, str], tuple[str, type[BaseException]]] = {}


def _relay(name: str, test: Any) -> Any:
    """A function of its own for ``test`` (CPython's functions are shared by every
    variant: marks set on them would apply to all)."""

    def relayed(self: unittest.TestCase) -> None:
        test(self)

    relayed.__name__ = name
    relayed.__qualname__ = name
    relayed.__doc__ = test.__doc__
    return relayed


def _build(variant: str, mixin: type, suite_name: str, suite: type) -> type:
    body: dict[str, Any] = {
        "__module__": __name__,
        "TIMEOUT": DEADLOCK_TIMEOUT_S,
        "_fail_on_deadlock": _fail_on_deadlock,
    }
    tests = {name: getattr(suite, name) for name in dir(suite) if name.startswith("test")}
    tests.update((fn.__name__, fn) for fn in ADDED.get(suite_name, []))
    for name, test in tests.items():
        if name in EXCLUDED or (variant, name) in EXCLUDED:
            body[name] = None  # not callable: unittest (and so pytest) does not collect it
            continue
        relayed = _relay(name, ADAPTED.get(name, test))
        relayed = pytest.mark.timeout(TEST_TIMEOUT_S, method="signal")(relayed)
        known = KNOWN_BREAKS.get((variant, name)) or KNOWN_BREAKS.get((None, name))
        if known:
            reason, raises = known
            relayed = pytest.mark.xfail(strict=True, reason=reason, raises=raises)(relayed)
        body[name] = relayed
    return type(f"Runner{variant}{suite_name}", (suite, mixin, unittest.TestCase), body)


SUITES: dict[str, type] = {
    "ExecutorTest": cf_process_pool.ProcessPoolExecutorTest,
    "WaitTests": cf_wait.WaitTests,
    "AsCompletedTests": cf_as_completed.AsCompletedTests,
    "ShutdownTest": cf_shutdown.ProcessPoolShutdownTest,
    "DeadlockTest": cf_deadlock.ExecutorDeadlockTest,
}
# WaitTests and AsCompletedTests exercise futures.wait and as_completed, not how
# workers start, and spend most of their time in sleeps: they run once, forked.
VARIANTS: dict[str, tuple[type, tuple[str, ...]]] = {
    "Fork": (RunnerForkMixin, tuple(SUITES)),
    "Fresh": (RunnerFreshMixin, ("ExecutorTest", "ShutdownTest", "DeadlockTest")),
}

for _variant, (_mixin, _suites) in VARIANTS.items():
    for _suite_name in _suites:
        _cls = _build(_variant, _mixin, _suite_name, SUITES[_suite_name])
        globals()[_cls.__name__] = _cls
del _variant, _mixin, _suites, _suite_name, _cls  # else pytest collects _cls again


# ---- the standard library's exception types --------------------------------------------


def test_worker_crashed_is_a_broken_process_pool_and_keeps_its_attributes() -> None:
    err = ap.WorkerCrashed("node 'x': its worker died", exitcode=-9, signal=9)
    assert isinstance(err, BrokenProcessPool) and isinstance(err, BrokenExecutor)
    assert isinstance(err, ap.ActionpoolError) and isinstance(err, RuntimeError)
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), back.exitcode, back.signal) == (
        ap.WorkerCrashed,
        "node 'x': its worker died",
        -9,
        9,
    )


def test_serialization_error_is_a_pickling_error() -> None:
    err = ap.SerializationError("node 'x': argument 0 cannot be pickled")
    assert isinstance(err, PicklingError) and isinstance(err, ap.ActionpoolError)
    assert str(pickle.loads(pickle.dumps(err))) == str(err)
