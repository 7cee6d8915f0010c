"""Tests for action.py: declaring actions, validating options, Context injection, pickling.

No ``from __future__ import annotations`` here on purpose: the Context-injection tests
need both real annotation objects and string annotations.
"""

import asyncio
import gc
import math
import pickle
import re
import weakref

import cloudpickle
import pytest

import actionpool as ap
from actionpool.action import ActionSpec, as_spec, parse_memory
from actionpool.transfer import dumps, loads

# ---- module-level actions (importable, so they pickle by reference) -------------------


def _always(state, *args, **kwargs):
    return True


@ap.action
def double(x):
    return 2 * x


def _decide(ctx):
    return "retry"


@ap.action(
    kind="io",
    name="fetch-it",
    timeout=5,
    retries=3,
    retry_on=(OSError, KeyError),
    backoff=0.5,
    idempotent=True,
    memory="512MiB",
    threads=2,
    validate=_always,
    reconcile=_decide,
)
def full_options(x):
    return x


@ap.action(kind="cpu")
def with_ctx(ctx, x):
    ctx.update(seen=ctx.state.get("seen", 0) + 1)
    return ctx, x


@ap.action(kind="io")
async def async_io(x):
    await asyncio.sleep(0)
    return x + 1


def plain(x):
    return x + 100


# A spec of a module-level function, bound to another name: the module attribute
# ``plain`` is the bare function, so this spec must travel by value, options included.
plain_as_io = ap.action(plain, kind="io", retries=2)


def _has_both(*words: str) -> str:
    """A regex matching a message that contains every one of ``words`` (any order)."""
    return "(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words)


# ---- declaring ------------------------------------------------------------------------


def test_bare_decorator_gives_spec_with_defaults():
    assert isinstance(double, ActionSpec)
    assert double.fn.__name__ == "double"
    assert double.name == "double"
    assert double.kind == "cpu"
    assert double.timeout is None
    assert double.retries == 0
    assert double.retry_on == (Exception,)
    assert double.backoff == 0.0
    assert double.idempotent is True
    assert double.memory is None
    assert double.threads == 1
    assert double.validate is None
    assert double.wants_context is False
    assert double.is_async is False


def test_decorator_with_every_option():
    s = full_options
    assert s.kind == "io"
    assert s.name == "fetch-it"
    assert s.timeout == 5.0 and isinstance(s.timeout, float)
    assert s.retries == 3
    assert s.retry_on == (OSError, KeyError)
    assert s.backoff == 0.5
    assert s.idempotent is True
    assert s.memory == 512 * 1024**2
    assert s.threads == 2
    assert s.validate is _always
    assert s.reconcile is _decide
    assert s.options() == {
        "kind": "io",
        "name": "fetch-it",
        "timeout": 5.0,
        "retries": 3,
        "retry_on": (OSError, KeyError),
        "backoff": 0.5,
        "idempotent": True,
        "memory": 512 * 1024**2,
        "threads": 2,
        "validate": _always,
        "reconcile": _decide,
    }


def test_plain_call_form_declares_without_decorator():
    spec = ap.action(plain, kind="io", timeout=1.5, memory=1000)
    assert isinstance(spec, ActionSpec)
    assert spec.fn is plain
    assert spec.kind == "io"
    assert spec.timeout == 1.5
    assert spec.memory == 1000
    assert spec.name == "plain"
    # the function itself is left alone
    assert plain(1) == 101


def test_single_exception_type_for_retry_on_becomes_a_tuple():
    spec = ap.action(plain, retry_on=OSError)
    assert spec.retry_on == (OSError,)


def test_action_of_a_spec_changes_its_options():
    spec = ap.action(double, timeout=2, name="dbl")
    assert spec is not double
    assert spec.fn is double.fn
    assert (spec.timeout, spec.name) == (2.0, "dbl")
    assert double.timeout is None and double.name == "double"


def test_as_spec_returns_declared_spec_itself_and_wraps_plain_callables():
    assert as_spec(double) is double
    spec = as_spec(plain)
    assert spec.fn is plain and spec.kind == "cpu"
    with pytest.raises(TypeError):
        as_spec(42)


def test_non_callable_is_rejected():
    with pytest.raises(TypeError, match="callable"):
        ap.action(42)
    with pytest.raises(TypeError, match="callable"):
        ap.action(kind="io")("not a function")


# ---- validation at declaration --------------------------------------------------------

BAD_OPTIONS = [
    ("kind", "gpu"),
    ("kind", None),
    ("timeout", -1),
    ("timeout", 0),
    ("timeout", math.nan),
    ("timeout", math.inf),
    ("timeout", "5"),
    ("timeout", True),
    ("memory", "12 parsecs"),
    ("memory", -1),
    ("memory", "abc"),
    ("retries", -1),
    ("retries", 1.5),
    ("retries", True),
    ("retry_on", int),
    ("retry_on", "ValueError"),
    ("retry_on", (ValueError, 3)),
    ("retry_on", ValueError("not a type")),
    ("backoff", -0.1),
    ("backoff", math.nan),
    ("idempotent", "yes"),
    ("threads", 0),
    ("threads", -2),
    ("threads", 1.5),
    ("validate", 42),
    ("validate", "always"),
    ("reconcile", "done"),
]


@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS)
def test_bad_option_names_action_and_option_decorator_form(option, value):
    with pytest.raises(ValueError, match=_has_both("'my_task'", f"'{option}'")):

        @ap.action(name="my_task", **{option: value})
        def task(x):
            return x


@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS)
def test_bad_option_names_action_and_option_call_form(option, value):
    # The default name is the function's qualified name.
    with pytest.raises(ValueError, match=_has_both("'plain'", f"'{option}'")):
        ap.action(plain, **{option: value})


@pytest.mark.parametrize(("option", "value"), BAD_OPTIONS)
def test_bad_option_in_with_options(option, value):
    with pytest.raises(ValueError, match=_has_both("'double'", f"'{option}'")):
        double.with_options(**{option: value})


def test_unparseable_memory_message_keeps_the_value():
    with pytest.raises(ValueError, match=_has_both("'plain'", "'memory'", "12 parsecs")):
        ap.action(plain, memory="12 parsecs")


def test_unknown_option_names_action_and_option():
    with pytest.raises(ValueError, match=_has_both("'plain'", "'retires'")):
        ap.action(plain, retires=3)
    with pytest.raises(ValueError, match=_has_both("'my_task'", "'timout'")):

        @ap.action(name="my_task", timout=3)
        def task():
            return None

    with pytest.raises(ValueError, match=_has_both("'double'", "'colour'")):
        double.with_options(colour="red")


# ---- parse_memory ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * 1024**2),
        ("1.5GB", 1_500_000_000),
        ("2g", 2_000_000_000),
        ("2G", 2_000_000_000),
        ("1024", 1024),
        ("1 KiB", 1024),
        (" 3 mib ", 3 * 1024**2),
        ("10kb", 10_000),
        ("1TiB", 1024**4),
        ("7b", 7),
        (".5KiB", 512),
        ("0", 0),
        (4096, 4096),
        (0, 0),
        (1.5e3, 1500),
        (10.9, 10),
    ],
)
def test_parse_memory(text, expected):
    got = parse_memory(text)
    assert got == expected
    assert isinstance(got, int)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2.01GB", 2_010_000_000), ("2.01MB", 2_010_000), ("4.06KB", 4060)],
)
def test_parse_memory_is_exact_for_decimal_sizes(text, expected):
    assert parse_memory(text) == expected


NOT_SIZES = [-1, -0.5, "-5MiB", "abc", "", "12 parsecs", "MiB", "1.5.2GB", True, False]
NOT_SIZES += [math.nan, math.inf, None, [512]]


@pytest.mark.parametrize("bad", NOT_SIZES)
def test_parse_memory_rejects(bad):
    with pytest.raises(ValueError):
        parse_memory(bad)


# ---- idempotent defaults --------------------------------------------------------------


def test_idempotent_defaults_by_kind():
    assert ap.action(plain).idempotent is True
    assert ap.action(plain, kind="cpu").idempotent is True
    assert ap.action(plain, kind="io").idempotent is False
    assert ap.action(plain, kind="io", idempotent=True).idempotent is True
    assert ap.action(plain, kind="cpu", idempotent=False).idempotent is False


@pytest.mark.parametrize(("start", "to", "expected"), [("cpu", "io", False), ("io", "cpu", True)])
def test_redeclaring_kind_rederives_the_default_idempotent(start, to, expected):
    spec = ap.action(plain, kind=start)
    assert ap.action(spec, kind=to).idempotent is expected
    assert spec.with_options(kind=to).idempotent is expected
    # also after a trip by value (the spec is not a module attribute)
    assert loads(dumps(spec)).with_options(kind=to).idempotent is expected


@pytest.mark.parametrize("declared", [True, False])
def test_declared_idempotent_survives_a_kind_change(declared):
    spec = ap.action(plain, kind="cpu", idempotent=declared)
    assert spec.with_options(kind="io").idempotent is declared
    assert ap.action(spec, kind="io").with_options(kind="cpu").idempotent is declared


# ---- Context injection ----------------------------------------------------------------


def ctx_named(ctx, x):
    return x


def ctx_annotated(c: ap.Context, x):
    return x


def ctx_annotated_string(c: "ap.Context", x):  # a string on purpose
    return x


def ctx_annotated_bare_string(c: "Context", x):  # noqa: F821 - a string on purpose
    return x


def ctx_later(x, ctx):
    return x


def ctx_keyword_only(*, ctx):
    return ctx


def ctx_varargs(*ctx):
    return ctx


def other_annotation(c: int, x):
    return x


class CallableWithCtx:
    def __call__(self, ctx, x):
        return ctx, x


@pytest.mark.parametrize(
    ("fn", "wants"),
    [
        (ctx_named, True),
        (ctx_annotated, True),
        (ctx_annotated_string, True),
        (ctx_annotated_bare_string, True),
        (lambda ctx: ctx, True),
        (CallableWithCtx(), True),
        (ctx_later, False),
        (ctx_keyword_only, False),
        (ctx_varargs, False),
        (other_annotation, False),
        (plain, False),
        (lambda: None, False),
        (abs, False),
        (max, False),  # no signature
    ],
)
def test_context_injection_detection(fn, wants):
    assert ap.action(fn).wants_context is wants


def test_context_detection_under_future_annotations():
    # Under ``from __future__ import annotations`` every annotation is a string.
    ns: dict = {}
    exec(
        "from __future__ import annotations\n"
        "import actionpool as ap\n"
        "def f(context: ap.Context, x): return x\n"
        "def g(x, c: ap.Context): return x\n",
        ns,
    )
    assert ap.action(ns["f"]).wants_context is True
    assert ap.action(ns["g"]).wants_context is False


# ---- calling an action directly -------------------------------------------------------


def test_calling_a_decorated_action_runs_it():
    assert double(21) == 42
    assert double(x=4) == 8


def test_calling_a_context_action_passes_a_fresh_context():
    ctx1, x = with_ctx(5)
    assert x == 5
    assert isinstance(ctx1, ap.Context)
    assert ctx1.node == "with_ctx"
    assert ctx1.attempt == 1
    assert ctx1.state == {"seen": 1}
    assert ctx1.cancelled() is False
    # a second call gets a new Context with a new, empty state: nothing leaks
    ctx2, _ = with_ctx(6)
    assert ctx2 is not ctx1
    assert ctx2.state == {"seen": 1}


def test_calling_an_annotated_context_action():
    @ap.action
    def f(c: ap.Context, y):
        return type(c), y

    assert f(3) == (ap.Context, 3)


def test_async_detection_and_direct_call():
    assert async_io.is_async is True
    assert double.is_async is False
    assert asyncio.run(async_io(1)) == 2

    @ap.action(kind="io")
    async def with_context(ctx):
        return ctx.node

    assert with_context.is_async is True
    assert with_context.wants_context is True
    assert asyncio.run(with_context()) == with_context.name


# ---- pickling -------------------------------------------------------------------------


@pytest.mark.parametrize("dump", [pickle.dumps, dumps, cloudpickle.dumps])
@pytest.mark.parametrize("spec", [double, full_options, with_ctx, async_io])
def test_importable_actions_pickle_by_reference(dump, spec):
    data = dump(spec)
    assert len(data) < 200, len(data)
    assert spec.fn.__module__.encode() in data
    assert pickle.loads(data) is spec


def test_lambda_action_pickles_by_value():
    spec = ap.action(lambda x: x * 3, kind="io", timeout=2, retries=1, memory="1KiB")
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        pickle.dumps(spec)  # the stdlib cannot pickle a lambda: proves it goes by value
    back = loads(dumps(spec))
    assert isinstance(back, ActionSpec)
    assert back is not spec
    assert back(4) == 12
    assert back.options() | {"validate": None} == spec.options() | {"validate": None}
    assert back.name == spec.name and spec.name.endswith("<lambda>")


def test_local_function_action_pickles_by_value_with_its_closure():
    offset = 7

    @ap.action(kind="cpu", retries=2, validate=lambda state, x: x > 0)
    def local(x):
        return x + offset

    back = loads(dumps(local))
    assert back is not local
    assert back(1) == 8
    assert back.retries == 2
    assert back.validate({}, 1) is True and back.validate({}, -1) is False
    assert back.name == local.name and "<locals>" in back.name


def test_spec_bound_under_another_name_keeps_its_options_through_pickle():
    for data in (pickle.dumps(plain_as_io), dumps(plain_as_io)):
        back = pickle.loads(data)
        assert back.fn is plain
        assert back.kind == "io"
        assert back.retries == 2
        assert back.idempotent is False


def test_local_action_runs_in_a_cpu_worker():
    factor = 5

    @ap.action(kind="cpu")
    def local(ctx, x):
        import os

        return os.getpid(), ctx.node, x * factor

    with ap.Runner(cpu_workers=1, io_workers=1) as runner:
        pid, node, value = runner.submit(local, 3).result(timeout=60)
    import os

    assert pid != os.getpid()
    assert node == local.name
    assert value == 15


# ---- with_options ---------------------------------------------------------------------


def test_with_options_returns_a_validated_copy():
    spec = full_options.with_options(timeout=9, retries=0, name="other")
    assert spec is not full_options
    assert (spec.timeout, spec.retries, spec.name) == (9.0, 0, "other")
    # untouched options carry over; the original is unchanged
    assert spec.kind == "io" and spec.memory == 512 * 1024**2 and spec.threads == 2
    assert (full_options.timeout, full_options.retries, full_options.name) == (5.0, 3, "fetch-it")
    assert spec.fn is full_options.fn


def test_with_options_parses_memory_and_recomputes_flags():
    spec = with_ctx.with_options(memory="2g")
    assert spec.memory == 2_000_000_000
    assert spec.wants_context is True and spec.is_async is False
    assert spec.with_options().options() == spec.options()


def test_wire_bytes_are_cached_only_for_functions_pickled_by_reference():
    import tests.helpers as helpers
    from actionpool.action import as_spec, wire_bytes

    by_ref = as_spec(helpers.square)
    first = wire_bytes(by_ref)
    assert first is not None and wire_bytes(by_ref) is first  # a name: computed once
    assert len(first) < 200

    def local(x):
        return x

    assert wire_bytes(as_spec(local)) is None  # by value: pickled once per run instead


# ---- the spec cache of plain callables --------------------------------------------------


def test_as_spec_builds_a_module_level_function_spec_once_and_keeps_it():
    # kept although nobody holds it: the function lives as long as its module anyway,
    # and its spec caches the function's pickled bytes for every later submit
    for fn in (plain, pow):  # pow: a builtin's module keeps it alive too
        spec_ref = weakref.ref(as_spec(fn))
        gc.collect()
        assert spec_ref() is not None and as_spec(fn) is spec_ref()


def test_as_spec_shares_a_closure_spec_only_while_something_holds_it():
    def local(x):
        return x

    first = as_spec(local)
    assert as_spec(local) is first  # a hot submit loop of one closure builds it once
    spec_ref = weakref.ref(first)
    del first
    gc.collect()
    assert spec_ref() is None  # the cache itself does not hold it
    assert as_spec(local).fn is local


def test_as_spec_of_an_unhashable_callable_is_built_each_time():
    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, x):
            return x

    fn = Unhashable()
    assert as_spec(fn).fn is fn and as_spec(fn) is not as_spec(fn)


def test_submitted_closure_and_bound_method_are_collected_after_the_runner_shuts_down():
    # The spec cache used to hold every plain callable submitted (up to 4,096), so a
    # closure, and a bound method's object (CPython's test_no_stale_references), stayed
    # alive for the life of the process, with whatever they referenced.
    class Holder:
        def method(self):
            return "method"

    holder = Holder()
    payload = bytearray(1000)

    def closure(x):
        return x + len(payload)

    with ap.Runner(cpu_workers=1, io_workers=1) as runner:
        assert runner.submit(closure, 1).result(timeout=30) == 1001
        assert runner.submit(holder.method).result(timeout=30) == "method"
        assert runner.submit(ap.action(closure, kind="io"), 2).result(timeout=30) == 1002
    refs = {"closure": weakref.ref(closure), "holder": weakref.ref(holder)}
    del closure, holder
    gc.collect()
    assert {name: ref() for name, ref in refs.items()} == {"closure": None, "holder": None}
    assert runner is not None  # the closed runner itself is still referenced here
