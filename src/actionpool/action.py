"""Declaring actions: ``@action``, the :class:`ActionSpec` of options, and :class:`Context`.

An *action* is a Python callable plus the options that tell the runner how to run it:
which pool (``kind``), how long it may take, how often to retry it, what it needs.
Options are validated when the action is declared, so a typo fails at import time,
naming the action and the option, instead of in the middle of a run.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import partial
from typing import Any, TypeVar, overload

from .resources import Resources

__all__ = ["ActionSpec", "Context", "action", "as_spec", "parse_memory"]

KINDS: tuple[str, ...] = ("cpu", "io")

F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS = (
    "kind",
    "name",
    "timeout",
    "retries",
    "retry_on",
    "backoff",
    "idempotent",
    "memory",
    "threads",
    "validate",
    "reconcile",
)

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_memory(value: int | float | str) -> int:
    """Parse a memory size into bytes.

    Args:
        value: a number of bytes (int or float), or a string such as ``"512MiB"``,
            ``"1.5GB"``, ``"2g"`` or ``"1024"``. Binary units (KiB, MiB, GiB, TiB) are
            powers of 1024, decimal ones (KB, MB, GB, TB, or K/M/G/T) powers of 1000,
            as in IEC 80000-13.

    Returns:
        int: the size in bytes, rounded down to a whole byte.

    Raises:
        ValueError: the value is negative, not finite, or not a size.
    """
    if isinstance(value, bool):
        raise ValueError(f"memory must be a size in bytes or a string like '512MiB', got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"memory must be a non-negative number of bytes, got {value!r}")
        return int(value)
    if isinstance(value, str):
        m = _MEMORY_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            # Fraction, not float: "2.01GB" must be 2_010_000_000 bytes exactly
            return int(Fraction(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(
        f"memory must be a size in bytes or a string like '512MiB' or '1.5GB', got {value!r}"
    )


def _wants_context(fn: Callable[..., Any]) -> bool:
    """True when ``fn``'s first parameter is named ``ctx`` or annotated ``Context``."""
    code = getattr(fn, "__code__", None)
    if code is not None and not hasattr(fn, "__wrapped__"):  # a plain function: cheap
        if code.co_argcount == 0:
            return False
        first = code.co_varnames[0]
        if first == "ctx":
            return True
        ann = getattr(fn, "__annotations__", {}).get(first)
        return ann is Context or (isinstance(ann, str) and ann.split(".")[-1] == "Context")
    if inspect.isbuiltin(fn):  # builtins never take a Context; their signatures are slow
        return False
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return False
    if not params or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        return False
    first = params[0]
    if first.name == "ctx":
        return True
    ann = first.annotation
    if ann is Context:
        return True
    # string annotations (from __future__ import annotations)
    return isinstance(ann, str) and ann.split(".")[-1] == "Context"


def _lookup(module: str, qualname: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _import_action(module: str, qualname: str) -> ActionSpec:
    obj = _lookup(module, qualname)
    return obj if isinstance(obj, ActionSpec) else as_spec(obj)


def _rebuild_action(fn: Callable[..., Any], options: dict[str, Any]) -> ActionSpec:
    return ActionSpec(fn=fn, **options)


@dataclass(frozen=True, eq=False)
class ActionSpec:
    """An action: a callable and its validated options.

    Calling an ``ActionSpec`` runs the function here, in this thread (with a fresh
    :class:`Context` when it takes one), so decorated functions stay usable directly.

    Attributes:
        fn: the user's callable.
        kind: ``"cpu"`` (process pool) or ``"io"`` (thread pool; ``async def`` actions
            run on the runner's event loop).
        name: the action's name, used in outcomes and error messages.
        timeout: seconds a single attempt may run, or ``None`` for no limit.
        retries: how many times to re-run an attempt that raised one of ``retry_on``.
        retry_on: the exception types that are retried.
        backoff: seconds to wait before the first retry, doubled each attempt, jittered.
        idempotent: whether the runner may re-run the action on its own after a crash
            of a pool it was running on (default True for cpu, False for io).
        memory: bytes the action needs, or ``None`` when undeclared.
        threads: CPU slots the action uses (its BLAS/OpenMP thread cap).
        validate: ``(state, *args, **kwargs) -> bool``, run in the parent before
            dispatch; ``False`` ends the node ``SKIPPED``.
        reconcile: ``(ctx) -> "done" | "retry"``, asked in the parent when a run
            resumed from a journal finds this action's node started but never ended
            and the action is not idempotent: ``"retry"`` runs it again, ``"done"``
            ends it ``SUCCEEDED`` with the value ``None``; without it such a node ends
            ``IN_DOUBT``.
    """

    fn: Callable[..., Any]
    kind: str = "cpu"
    name: str = ""
    timeout: float | None = None
    retries: int = 0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    backoff: float = 0.0
    idempotent: bool | None = None
    memory: int | None = None
    threads: int = 1
    validate: Callable[..., bool] | None = None
    reconcile: Callable[..., str] | None = None
    idempotent_by_default: bool = field(default=False, init=False, repr=False)
    wants_context: bool = field(default=False, init=False)
    is_async: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        fn = self.fn
        if not callable(fn):
            raise TypeError(f"an action must be callable, got {fn!r}")
        name = self.name or getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
        name = name or type(fn).__name__
        set_ = object.__setattr__
        set_(self, "name", name)
        if not isinstance(name, str) or not name:
            raise ValueError(f"action {fn!r}: option 'name' must be a non-empty string")

        def bad(option: str, why: str) -> ValueError:
            return ValueError(f"action {name!r}: option {option!r} {why}")

        if self.kind not in KINDS:
            raise bad("kind", f"must be one of {KINDS}, got {self.kind!r}")
        if self.timeout is not None:
            if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)):
                raise bad("timeout", f"must be a number of seconds or None, got {self.timeout!r}")
            if not math.isfinite(self.timeout) or self.timeout <= 0:
                raise bad("timeout", f"must be a positive number of seconds, got {self.timeout!r}")
            set_(self, "timeout", float(self.timeout))
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise bad("retries", f"must be a non-negative int, got {self.retries!r}")
        retry_on = self.retry_on
        if isinstance(retry_on, type):
            retry_on = (retry_on,)
        if not isinstance(retry_on, tuple) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in retry_on
        ):
            raise bad("retry_on", f"must be an exception type or a tuple of them, got {retry_on!r}")
        set_(self, "retry_on", retry_on)
        if (
            isinstance(self.backoff, bool)
            or not isinstance(self.backoff, (int, float))
            or not math.isfinite(self.backoff)
            or self.backoff < 0
        ):
            raise bad("backoff", f"must be a non-negative number of seconds, got {self.backoff!r}")
        if self.idempotent is None:
            set_(self, "idempotent", self.kind == "cpu")
            set_(self, "idempotent_by_default", True)
        elif not isinstance(self.idempotent, bool):
            raise bad("idempotent", f"must be True or False, got {self.idempotent!r}")
        if self.memory is not None:
            try:
                set_(self, "memory", parse_memory(self.memory))
            except ValueError as exc:
                raise bad("memory", str(exc).replace("memory must", "must")) from None
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise bad("threads", f"must be an int >= 1, got {self.threads!r}")
        if self.validate is not None and not callable(self.validate):
            raise bad("validate", f"must be callable or None, got {self.validate!r}")
        if self.reconcile is not None and not callable(self.reconcile):
            raise bad("reconcile", f"must be callable or None, got {self.reconcile!r}")
        set_(self, "wants_context", _wants_context(fn))
        set_(self, "is_async", inspect.iscoroutinefunction(fn))

    def options(self) -> dict[str, Any]:
        """The declared options as a dict (what :func:`action` accepts)."""
        opts = {k: getattr(self, k) for k in _OPTIONS}
        if self.idempotent_by_default:
            opts["idempotent"] = None
        return opts

    def with_options(self, **options: Any) -> ActionSpec:
        """A copy of this action with some options changed (validated the same way)."""
        _check_option_names(self.name, options)
        if self.idempotent_by_default and "idempotent" not in options:
            options["idempotent"] = None  # re-derive the default for a new kind
        return replace(self, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.wants_context:
            return self.fn(Context(state={}, node=self.name), *args, **kwargs)
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<action {self.name!r} kind={self.kind}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # Importable module-level actions travel by reference (a few bytes, and the
        # worker imports the module); the rest travel by value through cloudpickle.
        module = getattr(self.fn, "__module__", None)
        qualname = getattr(self.fn, "__qualname__", "")
        if module and module != "__main__" and "<locals>" not in qualname:
            try:
                found = _lookup(module, qualname)
            except Exception:  # noqa: BLE001 - anything that fails means "by value"
                found = None
            if found is self:
                return (_import_action, (module, qualname))
        return (_rebuild_action, (self.fn, self.options()))


def _check_option_names(name: str, options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(
            f"action {name!r}: unknown option {unknown[0]!r} (known options: {', '.join(_OPTIONS)})"
        )


@overload
def action(fn: F, /, **options: Any) -> ActionSpec: ...
@overload
def action(fn: None = None, /, **options: Any) -> Callable[[F], ActionSpec]: ...
def action(fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """Declare an action, as a decorator or a plain call.

    ``@action`` / ``@action(kind="io", timeout=5)`` decorate a function;
    ``action(fn, kind="io")`` declares one without a decorator.

    Args:
        fn: the callable; omitted when used as ``@action(...)``.
        **options: ``kind``, ``name``, ``timeout`` (seconds), ``retries``, ``retry_on``,
            ``backoff`` (seconds), ``idempotent``, ``memory`` (bytes or ``"512MiB"``),
            ``threads``, ``validate``, ``reconcile``; see :class:`ActionSpec`.

    Returns:
        ActionSpec: the action (or, without ``fn``, a decorator that makes one).

    Raises:
        ValueError: an unknown option or a bad value, naming the action and option.
        TypeError: ``fn`` is not callable.
    """

    def declare(f: Callable[..., Any]) -> ActionSpec:
        name = options.get("name") or getattr(f, "name", None)
        name = name or getattr(f, "__qualname__", None) or repr(f)
        _check_option_names(str(name), options)
        if isinstance(f, ActionSpec):
            return f.with_options(**options)
        return ActionSpec(fn=f, **options)

    if fn is None:
        return declare
    return declare(fn)


_DEFAULT_SPECS: dict[Any, ActionSpec] = {}
"""Specs of plain callables that travel by reference (module-level functions, builtins,
classes): their module keeps them alive anyway, so holding them here leaks nothing."""
_DEFAULT_SPECS_MAX = 4096

_LIVE_SPECS: weakref.WeakValueDictionary[Any, ActionSpec] = weakref.WeakValueDictionary()
"""Specs of every other plain callable (closures, lambdas, bound methods, partials),
only for as long as something else holds the spec (a call in flight, a map). A spec
holds its callable, so a strong cache would keep a closure, or a bound method's
object, alive for ever after the runner that ran it was shut down."""


def _is_static(fn: Any) -> bool:
    """Whether ``fn`` is what its module and qualified name lead to (a module-level
    function, a builtin, a class): alive as long as its module is."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<locals>" in qualname:
        return False
    try:
        return _lookup(module, qualname) is fn
    except Exception:  # noqa: BLE001 - not found under its name: not static
        return False


def as_spec(fn: Any) -> ActionSpec:
    """The :class:`ActionSpec` for ``fn``: itself when declared, defaults otherwise.

    ``functools.partial(action, ...)`` of a declared action keeps its options (but
    for positional arguments bound to an action that takes a Context).

    Specs of plain callables are cached (a hot ``submit`` loop builds one once), never
    keeping the callable alive longer than its own module or its caller would.

    Raises:
        TypeError: ``fn`` is not callable.
    """
    if isinstance(fn, ActionSpec):
        return fn
    if isinstance(fn, partial) and isinstance(fn.func, ActionSpec):
        # a declared action with some arguments bound keeps its options; bound
        # positional arguments of one that takes a Context would come before it
        inner = fn.func
        if not (inner.wants_context and fn.args):
            return ActionSpec(fn=partial(inner.fn, *fn.args, **fn.keywords), **inner.options())
    try:
        spec = _DEFAULT_SPECS.get(fn) or _LIVE_SPECS.get(fn)
    except TypeError:  # unhashable: built every time
        spec = None
    if spec is not None:
        return spec
    if not callable(fn):
        raise TypeError(f"an action must be callable, got {fn!r}")
    spec = ActionSpec(fn=fn)
    try:
        if _is_static(fn):
            if len(_DEFAULT_SPECS) >= _DEFAULT_SPECS_MAX:
                _DEFAULT_SPECS.clear()
            _DEFAULT_SPECS[fn] = spec
        else:
            _LIVE_SPECS[fn] = spec
    except TypeError:
        pass
    return spec


def wire_bytes(spec: ActionSpec) -> bytes | None:
    """The pickled wire form of ``spec``, cached, when it pickles by reference.

    A function pickled by reference (an importable module's, not ``__main__``'s, not a
    local one) is only a name: its bytes never go stale, so they are computed once.
    Returns None for anything that travels by value (its globals may change: callers
    pickle it once per run instead).
    """
    cached = spec.__dict__.get("_wire_bytes", False)
    if cached is False:
        cached = None
        target = wire_form(spec)
        module = getattr(target, "__module__", None)
        qualname = getattr(target, "__qualname__", "")
        if module and module != "__main__" and "<locals>" not in qualname:
            import pickle

            try:
                cached = pickle.dumps(target, protocol=5)  # plain pickle: by reference only
            except Exception:  # noqa: BLE001 - not by reference: no cache
                cached = None
        object.__setattr__(spec, "_wire_bytes", cached)
    result: bytes | None = cached
    return result


def wire_form(spec: ActionSpec) -> Any:
    """What travels to a worker for ``spec``: the spec itself when it pickles by
    reference (a module-level declared action), else just its function (the worker
    needs nothing else: deadlines and the Context come with the task)."""
    cached = spec.__dict__.get("_wire")
    if cached is None:
        module = getattr(spec.fn, "__module__", None)
        qualname = getattr(spec.fn, "__qualname__", "")
        by_ref = False
        if module and module != "__main__" and "<locals>" not in qualname:
            try:
                by_ref = _lookup(module, qualname) is spec
            except Exception:  # noqa: BLE001
                by_ref = False
        cached = (spec,) if by_ref else (spec.fn,)
        object.__setattr__(spec, "_wire", cached)
    return cached[0]


class Context:
    """What an action sees of its run; passed as the first argument when declared.

    An action receives a ``Context`` when its first parameter is named ``ctx`` or is
    annotated ``ap.Context``; callers never pass it.

    Attributes:
        state: this action's private copy of the run's state (a fresh unpickled copy:
            mutate it freely, nobody else sees it).
        node: the name of the node being run.
        run_id: the id of the run (a hex string; a run resumed from a journal keeps
            the id it had when it was first started).
        attempt: which attempt this is, starting at 1.
        resources: the runner's worker resources (``Runner(resources={name:
            factory})``), a read-only mapping of name -> instance: ``ctx.resources["db"]``
            makes the resource on its first use (once per cpu worker process; once
            per runner for io actions, shared by its threads) and returns the same
            instance afterwards; ``"db" in ctx.resources`` and ``list(ctx.resources)``
            make nothing. Unlike ``state``, a resource is shared, never copied:
            see ``docs/resources.md``. ``ctx.resources[name]`` raises ``KeyError`` for
            a name that was not declared (naming the declared ones) and
            :class:`~actionpool.ResourceError` when the factory raised.
    """

    __slots__ = (
        "_cancel",
        "_deadline",
        "_deltas",
        "_events",
        "_sink",
        "attempt",
        "node",
        "resources",
        "run_id",
        "state",
    )

    def __init__(
        self,
        state: Any,
        node: str,
        run_id: str = "",
        attempt: int = 1,
        deadline: float | None = None,
        cancel_event: threading.Event | None = None,
        sink: Callable[[str, float, Any], None] | None = None,
        resources: Resources | None = None,
    ) -> None:
        self.state = state
        self.node = node
        self.resources = resources if resources is not None else Resources(None, node)
        self.run_id = run_id
        self.attempt = attempt
        self._deadline = deadline
        self._cancel = cancel_event
        self._sink = sink
        self._deltas: dict[str, Any] = {}
        self._events: list[tuple[str, float, Any]] = []  # kept when there is no sink

    def update(self, changes: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        """Record state changes, merged into ``Report.state`` at the fan-in.

        Changes are applied in plan order after the run, never to other actions'
        copies. Later calls in the same action overwrite earlier ones per key.

        Raises:
            TypeError: a key is not a string.
        """
        items = dict(changes or {})
        items.update(kwargs)
        for key in items:
            if not isinstance(key, str):
                raise TypeError(f"node {self.node!r}: state keys must be strings, got {key!r}")
        self._deltas.update(items)
        if isinstance(self.state, dict):
            self.state.update(items)

    def emit(self, data: Any) -> None:
        """Report an event (``kind="emitted"``) to the parent's ``on_event``, in order."""
        self._report("emitted", data)

    def progress(self, done: float, total: float | None = None) -> None:
        """Report this action's progress (``kind="progress"``, data ``(done, total)``)."""
        self._report("progress", (done, total))

    def _report(self, kind: str, data: Any) -> None:
        if self._sink is not None:
            self._sink(kind, time.time(), data)
        else:
            self._events.append((kind, time.time(), data))

    def cancelled(self) -> bool:
        """True once the run is cancelled or this action's deadline has passed."""
        if self._cancel is not None and self._cancel.is_set():
            return True
        return self._deadline is not None and time.time() >= self._deadline

    @property
    def idempotency_key(self) -> str:
        """A key for this node of this run, the same for every attempt and after a
        resume from a journal (32 hex characters: the SHA-256 of the run id and the
        node's name, cut to 128 bits). Pass it to outside systems that deduplicate
        requests (payment APIs, queues), so that a re-run is recognized there."""
        import hashlib  # here: loading OpenSSL costs a cold start milliseconds

        digest = hashlib.sha256(f"{self.run_id}\x00{self.node}".encode()).hexdigest()
        return digest[:32]

    def __repr__(self) -> str:
        return f"<Context node={self.node!r} run_id={self.run_id!r} attempt={self.attempt}>"
