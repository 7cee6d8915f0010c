"""Tests for transfer.py and the worker's error paths, through a real Runner.

Every error that crosses the parent/worker boundary must name its culprit and keep the
action's exception type, message and remote traceback, in both pools.
"""

from __future__ import annotations

import os
import threading

import pytest

import actionpool as ap
from actionpool.shm import Arena
from actionpool.transfer import dumps, dumps_call, dumps_state, loads
from tests.helpers import Unpicklable, add

KINDS = ["cpu", "io"]


# ---- module-level actions and exceptions (importable by the workers) ------------------


class TwoArgError(Exception):
    """Pickles fine, but cannot be unpickled: ``cls(*self.args)`` lacks an argument."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code {code}: {detail}")
        self.code = code


class LockedError(Exception):
    """Cannot even be pickled: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_two_arg_error() -> None:
    raise TwoArgError(7, "disk on fire")


def raise_locked_error() -> None:
    raise LockedError("cannot travel")


def raise_key_error_deep(key: str) -> None:
    _inner_lookup({}, key)


def _inner_lookup(mapping: dict, key: str) -> None:
    mapping[key]


def return_lock() -> threading.Lock:
    return threading.Lock()


def identity(x):
    return x


def read_state(ctx: ap.Context, key: str):
    return ctx.state.get(key)


def return_two_arg_error() -> TwoArgError:
    return TwoArgError(3, "returned, not raised")


def update_with_lock(ctx: ap.Context) -> int:
    ctx.update(fine=1, lock=threading.Lock())
    return 1


def _refuse_to_unpickle() -> None:
    raise RuntimeError("no unpickling here")


class BreaksOnLoad:
    """Pickles fine; unpickling it (in the worker) raises."""

    def __reduce__(self):
        return (_refuse_to_unpickle, ())


class CallableWithLock:
    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self) -> int:
        return 1


def _run_one(runner, fn, kind, *args, **kwargs) -> ap.Outcome:
    """Run ``fn`` as a one-node plan of ``kind`` and return its outcome."""
    plan = ap.Plan()
    node = plan.add(ap.action(fn, kind=kind), *args, name="the_node", **kwargs)
    report = runner.run(plan)
    return report.outcome(node)


# ---- dumps / loads --------------------------------------------------------------------


def test_dumps_loads_round_trip_including_lambdas():
    value = {"a": [1, 2.5, "x"], "f": lambda y: y + 1}
    back = loads(dumps(value))
    assert back["a"] == [1, 2.5, "x"]
    assert back["f"](1) == 2


def test_dumps_call_round_trip():
    data, buffers = dumps_call("n", add, (1,), {"b": 2})
    assert buffers == ()  # without an arena everything is in the pickle
    fn_bytes, args, kwargs = loads(data)
    fn = loads(fn_bytes)  # the function travels pickled once, apart from the arguments
    assert fn is add
    assert fn(*args, **kwargs) == 3


def test_dumps_call_names_positional_argument():
    with pytest.raises(ap.SerializationError) as info:
        dumps_call("load_data", add, (1, Unpicklable(), 3), {})
    msg = str(info.value)
    assert "'load_data'" in msg
    assert "argument 1" in msg
    assert "Unpicklable" in msg
    assert "argument 0" not in msg and "argument 2" not in msg
    assert info.value.__cause__ is not None  # the pickling error is kept


def test_dumps_call_names_keyword_argument():
    with pytest.raises(ap.SerializationError) as info:
        dumps_call("load_data", add, (1,), {"ok": 2, "x": Unpicklable()})
    msg = str(info.value)
    assert "'load_data'" in msg
    assert "keyword argument 'x'" in msg
    assert "'ok'" not in msg


def test_dumps_call_names_nested_unpicklable_by_its_argument():
    with pytest.raises(ap.SerializationError, match=r"'n'.*argument 0"):
        dumps_call("n", add, ([1, {"deep": Unpicklable()}],), {})


def test_dumps_call_names_the_action_itself():
    with pytest.raises(ap.SerializationError, match=r"'n'.*the action.*CallableWithLock"):
        dumps_call("n", CallableWithLock(), (1,), {})


def test_serialization_error_is_an_actionpool_error():
    assert issubclass(ap.SerializationError, ap.ActionpoolError)


def test_dumps_state_round_trip():
    state = {"k": 1, "items": [1, 2]}
    data, buffers = dumps_state(state)
    assert buffers == () and loads(data) == state


def test_dumps_state_names_the_bad_key():
    with pytest.raises(ap.SerializationError) as info:
        dumps_state({"fine": 1, "conn": Unpicklable(), "also_fine": [2]})
    msg = str(info.value)
    assert "state key 'conn'" in msg
    assert "Unpicklable" in msg
    assert "'fine'" not in msg


def test_dumps_state_of_a_non_mapping():
    with pytest.raises(ap.SerializationError, match=r"state.*Unpicklable"):
        dumps_state(Unpicklable())


# ---- through a runner: arguments ------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_submit_with_unpicklable_argument_fails_the_future(runner, kind):
    fut = runner.submit(ap.action(identity, kind=kind), Unpicklable())
    exc = fut.exception(timeout=30)
    assert isinstance(exc, ap.SerializationError)
    assert "argument 0" in str(exc)
    assert "identity" in str(exc)
    with pytest.raises(ap.SerializationError):
        fut.result()
    # the runner goes on
    assert runner.submit(ap.action(identity, kind=kind), 5).result(timeout=30) == 5


@pytest.mark.parametrize("kind", KINDS)
def test_submit_with_unpicklable_keyword_argument(runner, kind):
    fut = runner.submit(ap.action(identity, kind=kind), x=Unpicklable())
    exc = fut.exception(timeout=30)
    assert isinstance(exc, ap.SerializationError)
    assert "keyword argument 'x'" in str(exc)


@pytest.mark.parametrize("kind", KINDS)
def test_plan_node_with_unpicklable_argument_fails_and_others_succeed(runner, kind):
    action = ap.action(identity, kind=kind)
    plan = ap.Plan()
    before = plan.add(action, 1, name="before")
    bad = plan.add(action, [Unpicklable()], name="bad")
    after = plan.add(action, 2, name="after")
    downstream = plan.add(action, bad, name="downstream")
    report = runner.run(plan)
    out = report.outcome(bad)
    assert out.status is ap.Status.FAILED
    assert isinstance(out.error, ap.SerializationError)
    assert "'bad'" in str(out.error) and "argument 0" in str(out.error)
    assert out.attempts == 0  # it never ran
    assert report[before] == 1 and report[after] == 2
    assert report.outcome(downstream).status is ap.Status.SKIPPED
    assert report.status is ap.RunStatus.PARTIAL
    with pytest.raises(ap.ActionFailed):
        report[bad]


@pytest.mark.parametrize("kind", KINDS)
def test_unpicklable_state_key_fails_only_the_nodes_that_read_state(runner, kind):
    plan = ap.Plan()
    reader = plan.add(ap.action(read_state, kind=kind), "k", name="reader")
    other = plan.add(ap.action(identity, kind=kind), 3, name="other")
    report = runner.run(plan, state={"k": 1, "sock": Unpicklable()})
    out = report.outcome(reader)
    assert out.status is ap.Status.FAILED
    assert isinstance(out.error, ap.SerializationError)
    assert "'reader'" in str(out.error) and "state key 'sock'" in str(out.error)
    assert report[other] == 3


# ---- through a runner: return values --------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_unpicklable_return_value_fails_naming_the_return_value(runner, kind):
    out = _run_one(runner, return_lock, kind)
    assert out.status is ap.Status.FAILED
    assert isinstance(out.error, ap.SerializationError)
    msg = str(out.error)
    assert "return value" in msg
    assert "'the_node'" in msg
    assert "lock" in msg
    assert out.attempts == 1


@pytest.mark.parametrize("kind", KINDS)
def test_unpicklable_return_value_through_submit(runner, kind):
    exc = runner.submit(ap.action(return_lock, kind=kind)).exception(timeout=30)
    assert isinstance(exc, ap.SerializationError)
    assert "return value" in str(exc)


# ---- through a runner: exceptions -----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_exception_that_cannot_be_unpickled_arrives_as_remote_error(runner, kind):
    out = _run_one(runner, raise_two_arg_error, kind)
    assert out.status is ap.Status.FAILED
    err = out.error
    assert isinstance(err, ap.RemoteError)
    assert err.type_name.endswith("TwoArgError")
    assert err.message == "code 7: disk on fire"
    assert "TwoArgError" in str(err) and "disk on fire" in str(err)
    assert "raise_two_arg_error" in err.remote_traceback
    assert "TwoArgError: code 7: disk on fire" in err.remote_traceback
    assert out.traceback is not None and "raise_two_arg_error" in out.traceback


@pytest.mark.parametrize("kind", KINDS)
def test_exception_that_cannot_be_pickled_arrives_as_remote_error(runner, kind):
    out = _run_one(runner, raise_locked_error, kind)
    assert out.status is ap.Status.FAILED
    err = out.error
    assert isinstance(err, ap.RemoteError)
    assert err.type_name.endswith("LockedError")
    assert err.message == "cannot travel"
    assert "raise_locked_error" in err.remote_traceback


def test_remote_error_pickles():
    err = ap.RemoteError("pkg.Boom", "it broke", "Traceback ...\n")
    back = loads(dumps(err))
    assert isinstance(back, ap.RemoteError)
    assert (back.type_name, back.message, back.remote_traceback) == (
        "pkg.Boom",
        "it broke",
        "Traceback ...\n",
    )
    assert str(back) == "pkg.Boom: it broke"


@pytest.mark.parametrize("kind", KINDS)
def test_ordinary_exception_keeps_type_message_and_worker_traceback(runner, kind):
    out = _run_one(runner, raise_key_error_deep, kind, "missing-key")
    assert out.status is ap.Status.FAILED
    assert type(out.error) is KeyError
    assert out.error.args == ("missing-key",)
    tb = out.traceback
    assert tb is not None
    # the worker's frames, innermost last
    assert "raise_key_error_deep" in tb and "_inner_lookup" in tb
    assert tb.index("raise_key_error_deep") < tb.index("_inner_lookup")
    assert "KeyError: 'missing-key'" in tb
    assert out.pool == kind


@pytest.mark.parametrize("kind", KINDS)
def test_submit_exception_keeps_type_and_remote_traceback_as_cause(runner, kind):
    exc = runner.submit(ap.action(raise_key_error_deep, kind=kind), "k2").exception(timeout=30)
    assert type(exc) is KeyError
    assert exc.args == ("k2",)
    assert exc.__cause__ is not None
    assert "_inner_lookup" in str(exc.__cause__)


# ---- through a runner: the worker's other pickling paths ------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_return_value_that_cannot_be_unpickled_in_the_parent(runner, kind):
    out = _run_one(runner, return_two_arg_error, kind)
    assert out.status is ap.Status.FAILED
    assert isinstance(out.error, ap.SerializationError)
    assert "'the_node'" in str(out.error) and "return value" in str(out.error)


@pytest.mark.parametrize("kind", KINDS)
def test_argument_that_cannot_be_unpickled_in_the_worker(runner, kind):
    out = _run_one(runner, identity, kind, BreaksOnLoad())
    assert out.status is ap.Status.FAILED
    assert isinstance(out.error, ap.SerializationError)
    msg = str(out.error)
    assert "'the_node'" in msg and "unpickled" in msg and "no unpickling here" in msg


@pytest.mark.parametrize("kind", KINDS)
def test_state_that_cannot_be_unpickled_in_the_worker(runner, kind):
    plan = ap.Plan()
    reader = plan.add(ap.action(read_state, kind=kind), "k", name="reader")
    report = runner.run(plan, state={"k": BreaksOnLoad()})
    out = report.outcome(reader)
    assert out.status is ap.Status.FAILED
    assert isinstance(out.error, ap.SerializationError)
    assert "'reader'" in str(out.error) and "state" in str(out.error)


@pytest.mark.parametrize("kind", KINDS)
def test_unpicklable_state_update_names_the_key(runner, kind):
    plan = ap.Plan()
    node = plan.add(ap.action(update_with_lock, kind=kind), name="updater")
    report = runner.run(plan, state={})
    out = report.outcome(node)
    assert out.status is ap.Status.FAILED
    assert isinstance(out.error, ap.SerializationError)
    assert "'updater'" in str(out.error) and "'lock'" in str(out.error)
    assert report.state == {}  # nothing of the failed node is merged


# ---- the reusable shared-memory segments (SegmentPool) ------------------------------------


MiB = 1 << 20


def _shm_exists(name: str) -> bool:
    import os

    return os.path.exists("/dev/shm/" + name.lstrip("/"))


def test_capacity_classes_waste_at_most_an_eighth_or_a_page():
    import mmap

    from actionpool.shm import capacity_for

    for size in [0, 1, 4095, 4097, MiB - 1, MiB, MiB + 1, 50_000_000, 3 * 10**9 + 7]:
        cap = capacity_for(size)
        assert cap >= max(size, 1)
        assert cap - size <= max(size // 8, mmap.PAGESIZE)
    assert capacity_for(50_000_000) == capacity_for(49_000_000)  # nearby sizes share


def test_pool_reuses_a_released_segment_and_copies_into_it():
    import numpy as np

    from actionpool.shm import SegmentPool

    pool = SegmentPool(max_free=100 * MiB)
    try:
        a = np.arange(MiB, dtype=np.uint8)
        first = pool.store(memoryview(a))
        assert first is not None and pool.created == 1
        pool.release(first)
        b = np.full(MiB - 100, 7, dtype=np.uint8)  # a little smaller: same segment
        again = pool.store(memoryview(b))
        assert again is first and pool.reused == 1 and pool.free_bytes == 0
        with open("/dev/shm/" + again.name.lstrip("/"), "rb") as f:
            assert f.read(b.nbytes) == b.tobytes()
        assert pool.store(memoryview(np.zeros(MiB // 2, np.uint8))) is not first  # leased
        pool.release(again)
        assert pool.store(memoryview(np.zeros(MiB // 4, np.uint8))) is not first  # too big
        assert pool.names() >= {first.name.lstrip("/")}
    finally:
        pool.close()
    assert not _shm_exists(first.name) and pool.names() == set()
    assert pool.store(memoryview(np.zeros(MiB, np.uint8))) is None  # closed


def test_a_large_buffer_is_copied_by_several_threads_byte_for_byte():
    import threading

    import numpy as np

    from actionpool.shm import COPY_CHUNK, SegmentPool

    size = 3 * COPY_CHUNK + 12_345  # pieces on page boundaries, and a ragged last one
    pool = SegmentPool(max_free=100 * size, copy_threads=3)
    seen: set[str] = set()
    start = threading.Thread.start

    def counting_start(self: threading.Thread) -> None:
        seen.add(self.name)
        start(self)

    threading.Thread.start = counting_start  # type: ignore[method-assign]
    try:
        for fill in (1, 2):  # a new segment (pwrite), then a reused one (memcpy)
            data = np.random.default_rng(fill).integers(0, 256, size, dtype=np.uint8)
            seg = pool.store(memoryview(data))
            assert seg is not None and pool.created == 1 and pool.reused == fill - 1
            with open("/dev/shm/" + seg.name.lstrip("/"), "rb") as f:
                assert f.read(size) == data.tobytes()
            pool.release(seg)
    finally:
        threading.Thread.start = start  # type: ignore[method-assign]
        pool.close()
    assert seen == {"actionpool-copy"}  # the copies were cut across threads...
    assert not [t for t in threading.enumerate() if t.name == "actionpool-copy"]  # ...all joined


def test_pool_keeps_at_most_max_free_bytes_and_says_which_it_unlinked():
    import numpy as np

    from actionpool.shm import SegmentPool, capacity_for

    told: list[str] = []
    pool = SegmentPool(max_free=2 * capacity_for(MiB), on_unlink=told.append)
    try:
        segs = [pool.store(memoryview(np.ones(MiB, np.uint8))) for _ in range(3)]
        assert all(s is not None for s in segs)
        for s in segs:
            assert s is not None
            pool.release(s)
        oldest = segs[0]
        assert oldest is not None
        assert pool.trimmed == 1 and told == [oldest.name.lstrip("/")]
        assert not _shm_exists(oldest.name)
        assert all(s is not None and _shm_exists(s.name) for s in segs[1:])
        assert pool.free_bytes == 2 * capacity_for(MiB)
    finally:
        pool.close()
    assert not any(s is not None and _shm_exists(s.name) for s in segs)
    assert len(told) == 1  # close does not broadcast: the workers are gone by then


def test_arena_returns_its_segment_to_the_pool_unless_a_view_still_uses_it():
    import os

    import numpy as np

    from actionpool.shm import Arena, SegmentPool

    pool = SegmentPool(max_free=100 * MiB)
    try:
        arena = Arena(f"ap-{os.getpid()}-pooltest1", MiB, pool=pool)
        view = arena.loads(arena.dumps(np.ones(MiB)))  # a read-only view into the segment
        arena.close()
        assert pool.discarded == 1 and pool.free_bytes == 0 and pool.names() == set()
        assert float(view.sum()) == MiB  # still mapped, and nobody will overwrite it

        arena = Arena(f"ap-{os.getpid()}-pooltest2", MiB, pool=pool)
        packed = arena.dumps(np.ones(MiB))
        del view
        assert float(arena.loads(packed).sum()) == MiB  # the view dies at once here
        arena.close()
        assert pool.discarded == 1 and pool.free_bytes > 0  # recycled
        with pytest.raises(FileNotFoundError, match="run is over"):
            arena.loads(packed)  # an io action that outlived its run reads nothing
    finally:
        pool.close()


def test_short_containers_of_atoms_and_of_anything_else_both_round_trip() -> None:
    # Atoms and short containers of atoms take the C pickler; a container holding
    # anything else (here a local function, which only cloudpickle can carry) must not.
    def local(x: int) -> int:
        return x + 1

    arena = Arena(f"ap-{os.getpid()}-plain", 1 << 20)
    try:
        for plain in [None, 3, (1.5, "a"), [b"x", 2], {"k": 1}]:
            assert arena.loads(arena.dumps(plain)) == plain
        assert arena.loads(arena.dumps([local]))[0](1) == 2
        assert arena.loads(arena.dumps((local,)))[0](1) == 2
        assert arena.loads(arena.dumps({"f": local}))["f"](1) == 2
        packed = dumps_call("n", None, ((1, 2), [local]), {"g": {"h": local}}, arena, b"f")
        _, args, kwargs = loads(packed[0])
        assert args[0] == (1, 2) and args[1][0](2) == 3 and kwargs["g"]["h"](3) == 4
    finally:
        arena.close()
