"""The exception hierarchy: our types, which are also the standard ones that users of
``concurrent.futures`` and ``pickle`` catch."""

from __future__ import annotations

import pickle
from concurrent.futures import BrokenExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest

import actionpool as ap
from tests import fault_actions as fa
from tests.helpers import Unpicklable


def test_worker_crashed_is_a_broken_process_pool_and_keeps_its_details() -> None:
    err = ap.WorkerCrashed("node 'x': its worker was killed by SIGKILL", None, 9)
    assert isinstance(err, ap.ActionpoolError)
    assert isinstance(err, BrokenProcessPool) and isinstance(err, BrokenExecutor)
    assert err.signal == 9 and err.exitcode is None
    copy = pickle.loads(pickle.dumps(err))  # errors travel between processes
    assert type(copy) is ap.WorkerCrashed and copy.signal == 9 and str(copy) == str(err)


def test_serialization_error_is_a_pickling_error() -> None:
    err = ap.SerializationError("node 'x': argument 0 cannot be pickled")
    assert isinstance(err, ap.ActionpoolError) and isinstance(err, pickle.PicklingError)


def test_executor_users_catch_a_crash_and_a_pickling_failure_as_they_are_used_to() -> None:
    with ap.Runner(cpu_workers=1, io_workers=1) as r:
        with pytest.raises(BrokenProcessPool, match="exited with code 3"):
            r.submit(fa.exit_with, 3).result(timeout=60)
        with pytest.raises(pickle.PicklingError, match="argument 0"):
            r.submit(len, Unpicklable()).result(timeout=60)
