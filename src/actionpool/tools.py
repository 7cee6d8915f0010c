"""Tool calls in, tool results out: run a model's tool calls as one plan.

A language model that asks for several tools at once sends a list of *tool calls*; the
agent loop must run them and send back one *tool result* per call. :func:`run_tool_calls`
(and :func:`arun_tool_calls`, for ``async`` code) does that on a :class:`~actionpool.Runner`,
so the calls run in parallel, each on the pool of its tool's kind, with hard timeouts and
an error result for anything that goes wrong instead of an exception.

Data flow::

    calls (any wire shape, per item)
      ── _parse ──► _Call(index, shape, call_id, tool, raw arguments)   or ValueError
      ── _Batch: tool known? arguments a JSON object? do they bind to the signature?
           yes ──► one node of a Plan per call (named "<tool>#<index>")
           no  ──► an Outcome(FAILED, attempts=0) at once, never dispatched
      ── runner.run(plan, failure="collect") ──► Report
      ── an Outcome per call, in input order ──► a result in the call's own shape
      ──► ToolResults (a list of result dicts; .outcomes, .report)

Concurrency contract: everything here runs on the caller's thread except the default
runner, which is created once per process under ``_DEFAULT_LOCK`` and may then be used
by any number of threads at once (``Runner.run`` is thread-safe).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .action import ActionSpec, as_spec
from .errors import RemoteError, WorkerCrashed
from .outcome import Outcome, Report, RunStatus, Status
from .plan import Node, Plan
from .planrun import check_max_parallel
from .runner import Runner

__all__ = ["ToolResults", "arun_tool_calls", "run_tool_calls"]

# The wire shapes, named after where they come from.
CHAT = "chat"  # OpenAI Chat Completions: message.tool_calls
RESPONSES = "responses"  # OpenAI Responses: output items of type "function_call"
ANTHROPIC = "anthropic"  # Anthropic Messages: content blocks of type "tool_use"
LANGCHAIN = "langchain"  # LangChain: AIMessage.tool_calls (ToolCall dicts)

DEFAULT_IO_WORKERS = 64
"""Threads of the default runner's io pool (unless ``ACTIONPOOL_IO_WORKERS`` is set):
enough for a whole batch of io tool calls to run at once."""

MAX_ERROR_CHARS = 2000
"""Model-facing error messages are cut to this many characters (the whole error stays
in the call's Outcome)."""

# What an object that is neither a dict nor has model_dump() is read for.
_FIELDS = ("type", "id", "call_id", "name", "function", "arguments", "input", "args")
_MISSING: Any = object()
# Plan.add's own keyword options ("name", "after"): a tool argument of the same name
# cannot be passed to it as a keyword
_PLAN_KEYWORDS = frozenset(
    p.name
    for p in inspect.signature(Plan.add).parameters.values()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


class ToolResults(list[dict[str, Any]]):
    """The results of one batch of tool calls: a ``list`` of result dicts, plus outcomes.

    Item ``i`` answers call ``i`` of the input, in the shape of that call (see
    :func:`run_tool_calls`); append the list to the conversation as it is.

    Attributes:
        outcomes: one :class:`~actionpool.Outcome` per call, in input order. A call
            that was rejected before it ran (unknown tool, arguments that are not a
            JSON object or do not fit the tool's signature) has status ``FAILED``,
            ``attempts == 0``, and the reason as ``error`` (``LookupError``,
            ``json.JSONDecodeError``, ``TypeError`` or ``ValueError``).
        report: the :class:`~actionpool.Report` of the run of the calls that passed
            those checks (its nodes are named ``"<tool>#<index>"``); rejected calls
            are not in it. With no call to run, an empty report that ran nothing.
    """

    def __init__(
        self,
        results: Iterable[dict[str, Any]],
        outcomes: Iterable[Outcome],
        report: Report,
    ) -> None:
        super().__init__(results)
        self.outcomes: tuple[Outcome, ...] = tuple(outcomes)
        self.report = report

    def __repr__(self) -> str:
        return f"ToolResults({list.__repr__(self)})"


@dataclass
class _Call:
    """One tool call as parsed from its wire shape."""

    index: int
    shape: str
    call_id: Any
    tool: Any  # the name the model sent (a str unless the call is malformed)
    arguments: Any  # a JSON string, a dict, or _MISSING


# ---- reading calls -------------------------------------------------------------------


def _as_dict(item: Any) -> dict[str, Any] | None:
    """``item`` as a dict: itself, ``item.model_dump()`` (SDK objects), or the
    attributes named like a call's fields; None when it has none of them."""
    if isinstance(item, Mapping):
        return dict(item)
    dump = getattr(item, "model_dump", None)
    if callable(dump):
        dumped = dump()
        if isinstance(dumped, Mapping):
            return dict(dumped)
    if isinstance(item, (str, bytes, int, float, list, tuple)) or item is None:
        return None
    found = {k: getattr(item, k) for k in _FIELDS if getattr(item, k, _MISSING) is not _MISSING}
    if "function" in found and not isinstance(found["function"], Mapping):
        found["function"] = _as_dict(found["function"])
    return found or None


def _parse(index: int, item: Any) -> _Call:
    """Recognize the wire shape of one call.

    Raises:
        ValueError: the item is no call of a known shape, or has no id to answer to.
    """
    d = _as_dict(item)
    if d is None:
        raise ValueError(
            f"tool call {index}: expected a dict (or an SDK object with model_dump()),"
            f" got {type(item).__name__} {_short(repr(item), 80)}"
        )
    kind = d.get("type")
    function = d.get("function")
    if kind == "function_call":
        call = _Call(
            index, RESPONSES, d.get("call_id"), d.get("name"), d.get("arguments", _MISSING)
        )
        id_key = "call_id"
    elif kind == "tool_use":
        call = _Call(index, ANTHROPIC, d.get("id"), d.get("name"), d.get("input", _MISSING))
        id_key = "id"
    elif isinstance(function, Mapping) and kind in (None, "function"):
        name = function.get("name")
        call = _Call(index, CHAT, d.get("id"), name, function.get("arguments", _MISSING))
        id_key = "id"
    elif "args" in d and "name" in d and kind in (None, "tool_call"):
        # LangChain's ToolCall.id is Optional: a call without one is answered with None
        call = _Call(index, LANGCHAIN, d.get("id"), d.get("name"), d["args"])
        return call
    else:
        raise ValueError(
            f"tool call {index}: not a tool call of a known shape (type {kind!r}, keys"
            f" {sorted(map(str, d))}); expected an OpenAI Chat Completions tool call"
            " ('id', 'function'), an OpenAI Responses 'function_call' item, an Anthropic"
            " 'tool_use' block or a LangChain tool call ('name', 'args', 'id');"
            " pass only the tool calls, not the other parts of the message"
        )
    if call.call_id is None:
        raise ValueError(f"tool call {index} ({call.shape} shape) has no {id_key!r} to answer to")
    return call


_JSON_TYPES = ((bool, "a boolean"), (str, "a string"), (int, "a number"), (float, "a number"))


def _arguments(raw: Any) -> dict[str, Any]:
    """The arguments of a call as a dict of keyword arguments.

    Raises:
        json.JSONDecodeError: a JSON string that does not parse.
        TypeError: the arguments are not a JSON object.
    """
    if raw is _MISSING or raw is None:
        return {}
    value = raw
    if isinstance(raw, (str, bytes, bytearray)):
        if not raw.strip():  # some providers send "" for a tool without parameters
            return {}
        value = json.loads(raw)
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"argument names must be strings, got {bad[0]!r}")
        return dict(value)
    what = "null" if value is None else "an array" if isinstance(value, list) else None
    for typ, name in _JSON_TYPES:
        if what is None and isinstance(value, typ):
            what = name
    raise TypeError(f"must be a JSON object, got {what or type(value).__name__}")


def _signature(spec: ActionSpec) -> inspect.Signature | None:
    """The parameters the model passes to ``spec`` (its ``ctx`` left out), or None when
    the callable has no signature to check (some builtins)."""
    try:
        sig = inspect.signature(spec.fn)
    except (TypeError, ValueError):
        return None
    if spec.wants_context:
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    return sig


def _bind(
    sig: inspect.Signature | None, arguments: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Bind ``arguments`` to a tool's signature, here, before anything runs:
    positional-or-keyword parameters become positional.

    Raises:
        TypeError: they do not fit (a missing or unexpected argument).
    """
    if sig is None:  # nothing to check: let it run
        return (), arguments
    bound = sig.bind(**arguments)
    return tuple(bound.args), dict(bound.kwargs)


def _apply(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs)


def _apply_with_context(ctx: Any, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return fn(ctx, *args, **kwargs)


def _not_run() -> None:  # the action of a rejected call's node, which never runs
    raise AssertionError("a rejected tool call is never run")


# ---- writing results ----------------------------------------------------------------


def _short(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _jsonable(obj: Any) -> Any:
    """What ``json.dumps`` writes for a value it does not know."""
    dump = getattr(obj, "model_dump", None)
    if callable(dump):  # pydantic models
        return dump()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):  # NumPy arrays and scalars
        return tolist()
    if isinstance(obj, (set, frozenset)):
        try:
            return sorted(obj)
        except TypeError:
            return list(obj)
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj).decode("utf-8", errors="replace")
    return str(obj)


def _content(value: Any) -> str:
    """A tool's return value as the text the model reads.

    Raises:
        Exception: whatever encoding the value raised.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    try:
        return json.dumps(value, default=_jsonable, ensure_ascii=False)
    except ValueError:  # a circular reference
        return str(value)


def _describe(error: BaseException) -> str:
    if isinstance(error, RemoteError):
        name, message = error.type_name.rsplit(".", 1)[-1], error.message
    else:
        name, message = type(error).__name__, str(error)
    return f"{name}: {message}" if message else name


def _error_text(tool: Any, spec: ActionSpec | None, outcome: Outcome) -> str:
    """The short, model-readable message for a call that did not succeed."""
    error = outcome.error
    status = outcome.status
    if status is Status.TIMED_OUT:
        after = f" after {spec.timeout:g} s" if spec is not None and spec.timeout else ""
        return f"Error: tool {tool!r} timed out{after}"
    if status is Status.CRASHED:
        how = "died"
        if isinstance(error, WorkerCrashed) and error.signal is not None:
            try:
                how = f"was killed by {signal.Signals(error.signal).name}"
            except ValueError:
                how = f"was killed by signal {error.signal}"
        elif isinstance(error, WorkerCrashed) and error.exitcode is not None:
            how = f"exited with code {error.exitcode}"
        return f"Error: tool {tool!r} crashed: its worker process {how}"
    if status is Status.CANCELLED:
        return f"Error: tool {tool!r} was cancelled before it finished"
    if status is Status.FAILED and error is not None:
        return f"Error: {_describe(error)}"
    why = f": {_describe(error)}" if error is not None else ""
    return f"Error: tool {tool!r} {status.value}{why}"


def _result(call: _Call, content: str, is_error: bool) -> dict[str, Any]:
    if call.shape == CHAT:
        return {"role": "tool", "tool_call_id": call.call_id, "content": content}
    if call.shape == RESPONSES:
        return {"type": "function_call_output", "call_id": call.call_id, "output": content}
    if call.shape == ANTHROPIC:
        return {
            "type": "tool_result",
            "tool_use_id": call.call_id,
            "content": content,
            "is_error": is_error,
        }
    return {
        "type": "tool",
        "tool_call_id": call.call_id,
        "content": content,
        "status": "error" if is_error else "success",
    }


# ---- one batch ----------------------------------------------------------------------


def _tool_table(tools: Any) -> dict[str, ActionSpec]:
    """``{name: spec}`` from a mapping of name to action, or a list of actions.

    Raises:
        TypeError: ``tools`` is neither, a tool is not callable, or a name is not a
            non-empty string.
        ValueError: two tools of a list have the same name.
    """
    table: dict[str, ActionSpec] = {}
    if isinstance(tools, Mapping):
        pairs = list(tools.items())
    elif isinstance(tools, (str, bytes)) or not isinstance(tools, Iterable):
        raise TypeError(
            "tools must be a mapping of tool name to action or a list of actions,"
            f" got {type(tools).__name__}"
        )
    else:
        pairs = []
        for fn in tools:
            name = fn.name if isinstance(fn, ActionSpec) else getattr(fn, "__name__", None)
            if any(name == n for n, _ in pairs):
                raise ValueError(f"two tools are named {name!r}; pass a mapping to name them")
            pairs.append((name, fn))
    for name, fn in pairs:
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"tool names must be non-empty strings, got {name!r} for {fn!r}"
                " (pass a mapping of name to action to name it)"
            )
        try:
            table[name] = as_spec(fn)
        except TypeError:
            raise TypeError(f"tool {name!r} must be callable, got {fn!r}") from None
    return table


def _check_limits(timeout: Any, max_parallel: Any) -> None:
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not 0 < timeout < float("inf")
    ):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    check_max_parallel(max_parallel)  # a PlanError, which is a ValueError


class _Batch:
    """One batch of calls: parsed and checked at construction, answered by ``finish``.

    Raises (at construction):
        TypeError, ValueError: as :func:`run_tool_calls` documents.
    """

    def __init__(self, calls: Any, tools: Any, timeout: float | None) -> None:
        if calls is None:  # OpenAI's message.tool_calls when the model called nothing
            calls = []
        if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Iterable):
            raise TypeError(
                f"calls must be a list of tool calls, got {type(calls).__name__}"
                " (wrap a single call in a list)"
            )
        self.calls = [_parse(i, item) for i, item in enumerate(calls)]
        self.tools = _tool_table(tools)
        self.plan = Plan()
        self.nodes: dict[int, Node] = {}  # call index -> node of self.plan
        self.rejected: dict[int, Outcome] = {}  # call index -> its outcome
        self.specs: dict[int, ActionSpec] = {}  # call index -> the spec it runs with
        self.messages: dict[int, str] = {}  # call index -> a rejected call's error text
        effective: dict[str, ActionSpec] = {}
        signatures: dict[str, inspect.Signature | None] = {}
        not_run = Plan()  # holds the nodes of rejected calls, so each outcome has one
        for call in self.calls:
            tool = call.tool
            named = isinstance(tool, str) and bool(tool)
            name = f"{tool}#{call.index}" if named else f"#{call.index}"
            spec = self.tools.get(tool) if named else None
            if spec is not None:
                if tool not in effective:
                    effective[tool] = _limited(spec, timeout)
                    signatures[tool] = _signature(spec)
                spec = self.specs[call.index] = effective[tool]
            error: Exception | None = None
            if not named:
                error = ValueError(f"the call names no tool (name {tool!r})")
                message = f"Error: malformed tool call: {error}"
            elif spec is None:
                known = ", ".join(sorted(self.tools)) or "none"
                error = LookupError(f"unknown tool {tool!r}; the tools are: {known}")
                message = f"Error: {error}"
            else:
                try:
                    arguments = _arguments(call.arguments)
                except json.JSONDecodeError as exc:
                    error = exc
                    message = f"Error: the arguments of tool {tool!r} are not valid JSON ({exc})"
                except TypeError as exc:
                    error = exc
                    message = f"Error: the arguments of tool {tool!r} {exc}"
                else:
                    try:
                        args, kwargs = _bind(signatures[tool], arguments)
                    except TypeError as exc:
                        error = exc
                        message = f"Error: bad arguments for tool {tool!r}: {exc}"
            if error is not None:
                placeholder = spec or ActionSpec(fn=_not_run, kind="io", name=name)
                node = not_run.add(placeholder, name=name)
                self.rejected[call.index] = Outcome(
                    node=node, name=name, status=Status.FAILED, error=error, attempts=0
                )
                self.messages[call.index] = message
                continue
            assert spec is not None
            if not _PLAN_KEYWORDS.isdisjoint(kwargs):
                # keyword-only parameters that Plan.add would take as its own options:
                # pass the call through a trampoline that takes them as a dict
                fn = _apply_with_context if spec.wants_context else _apply
                runs = ActionSpec(fn=fn, **spec.options())
                node = self.plan.add(runs, spec.fn, args, kwargs, name=name)
            else:
                node = self.plan.add(spec, *args, name=name, **kwargs)
            self.nodes[call.index] = node

    def empty_report(self) -> Report:
        now = time.time()
        return Report([], {}, RunStatus.SUCCEEDED, uuid.uuid4().hex[:12], now, now)

    def finish(self, report: Report) -> ToolResults:
        results: list[dict[str, Any]] = []
        outcomes: list[Outcome] = []
        for call in self.calls:
            outcome = self.rejected.get(call.index)
            if outcome is None:
                outcome = report.outcome(self.nodes[call.index])
            spec = self.specs.get(call.index)
            if outcome.status is Status.SUCCEEDED:
                try:
                    content, is_error = _content(outcome.value), False
                except Exception as exc:  # noqa: BLE001 - an error result, never a raise
                    content = f"Error: the result of tool {call.tool!r} could not be encoded"
                    content += f" as text ({_describe(exc)})"
                    is_error = True
            elif call.index in self.messages:
                content, is_error = self.messages[call.index], True
            else:
                content, is_error = _error_text(call.tool, spec, outcome), True
            results.append(_result(call, _short(content) if is_error else content, is_error))
            outcomes.append(outcome)
        return ToolResults(results, outcomes, report)


def _limited(spec: ActionSpec, timeout: float | None) -> ActionSpec:
    """``spec`` with at most ``timeout`` seconds per attempt (its own, when shorter)."""
    if timeout is None or (spec.timeout is not None and spec.timeout <= timeout):
        return spec
    return spec.with_options(timeout=timeout)


# ---- the default runner -------------------------------------------------------------

_DEFAULT: Runner | None = None
_DEFAULT_PID = 0  # the process that made _DEFAULT (a fork's child must make its own)
_DEFAULT_LOCK = threading.Lock()


def _default_runner() -> Runner:
    """The process-wide runner used when no runner is passed, made on first use.

    Sized from this machine like ``ap.Runner()``, with ``DEFAULT_IO_WORKERS`` io threads
    unless ``ACTIONPOOL_IO_WORKERS`` says otherwise; closed at interpreter exit (as
    every open runner is, by :mod:`actionpool.runner`'s ``atexit`` hook).
    """
    global _DEFAULT, _DEFAULT_PID
    with _DEFAULT_LOCK:
        runner = _DEFAULT
        if runner is None or runner._closed or os.getpid() != _DEFAULT_PID:
            io = None if os.environ.get("ACTIONPOOL_IO_WORKERS") else DEFAULT_IO_WORKERS
            runner = Runner(io_workers=io)
            _DEFAULT, _DEFAULT_PID = runner, os.getpid()
        return runner


def _close_default() -> None:
    """Close the default runner, if one was made (a later call makes a new one)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        runner, _DEFAULT = _DEFAULT, None
    if runner is not None and os.getpid() == _DEFAULT_PID:
        runner.close()


# ---- public API ---------------------------------------------------------------------


def run_tool_calls(
    calls: Iterable[Any] | None,
    tools: Mapping[str, Any] | Iterable[Any],
    *,
    runner: Runner | None = None,
    timeout: float | None = None,
    max_parallel: int | None = None,
) -> ToolResults:
    """Run a model's tool calls in parallel; return one tool result per call, in order.

    Each call becomes one node of a plan run with ``failure="collect"`` on ``runner``,
    on the pool of its tool's kind, so a batch takes about as long as its slowest call.
    Whatever goes wrong with a call becomes that call's error result: an unknown tool,
    arguments that are not a JSON object or do not fit the tool's signature (checked
    here, before anything runs), a raise, a timeout, a crashed worker, a cancel.

    Args:
        calls: the tool calls, each in one of these shapes (detected per item, so a
            list may mix them): an OpenAI Chat Completions tool call
            ``{"id", "type": "function", "function": {"name", "arguments": "<JSON>"}}``;
            an OpenAI Responses item ``{"type": "function_call", "call_id", "name",
            "arguments": "<JSON>"}``; an Anthropic block ``{"type": "tool_use", "id",
            "name", "input": {...}}``; a LangChain tool call ``{"id", "name", "args":
            {...}}`` (``"type": "tool_call"`` optional). Plain dicts, or objects with a
            ``model_dump()`` method returning one (SDK objects), or objects with
            attributes of those names. ``None`` is an empty batch.
        tools: ``{name: action}``, or a list of actions named by their ``.name`` (a
            plain callable by its ``__name__``). An action keeps its declared kind,
            timeout, retries and idempotency; a plain callable is a ``"cpu"`` action,
            so declare an io tool (HTTP, files, databases) with
            ``ap.action(fn, kind="io")``. A tool whose first parameter is ``ctx``
            receives an :class:`~actionpool.Context`; the model never passes it.
        runner: the :class:`~actionpool.Runner` to run on; it is not closed here. By
            default, a process-wide runner made on first use (sized from this
            machine, with 64 io threads unless ``ACTIONPOOL_IO_WORKERS`` is set) and
            closed at interpreter exit.
        timeout: seconds each call may run; a tool's own ``timeout`` wins when shorter.
            ``None``: only the tools' own timeouts.
        max_parallel: at most this many calls run at once; ``None``: as many as the
            runner's pools allow.

    Returns:
        ToolResults: a list with one dict per call, in input order, in the
        shape that answers it: Chat ``{"role": "tool", "tool_call_id", "content"}``;
        Responses ``{"type": "function_call_output", "call_id", "output"}``; Anthropic
        ``{"type": "tool_result", "tool_use_id", "content", "is_error"}``; LangChain
        ``{"type": "tool", "tool_call_id", "content", "status": "success" | "error"}``.
        The content is the tool's return value when it is a ``str``; ``bytes`` are
        decoded as UTF-8 (invalid bytes replaced); anything else is JSON
        (``json.dumps``, with pydantic models, dataclasses, NumPy values and sets
        converted, and ``str()`` of anything else). An error result's content is one
        line starting with ``"Error: "`` (e.g. ``"Error: ValueError: bad city"``,
        ``"Error: tool 'search' timed out after 2 s"``), never a traceback; the whole
        error is in ``.outcomes``, one :class:`~actionpool.Outcome` per call, and the
        run's report is ``.report``.

    Raises:
        ValueError: an item of ``calls`` is not a tool call of a known shape (the
            message names its index and keys) or has no id to answer to; two tools
            of a list share a name; ``timeout`` or ``max_parallel`` is out of range.
            Nothing has run.
        TypeError: ``calls`` is not a list, ``tools`` is not a mapping or list of
            callables. Nothing has run.
        RuntimeError: ``runner`` is closed.
        KeyboardInterrupt: Ctrl-C while waiting (the calls are cancelled first).
    """
    _check_limits(timeout, max_parallel)
    batch = _Batch(calls, tools, timeout)
    if not batch.nodes:
        return batch.finish(batch.empty_report())
    if runner is None:
        runner = _default_runner()
    report = runner.run(batch.plan, failure="collect", max_parallel=max_parallel)
    return batch.finish(report)


async def arun_tool_calls(
    calls: Iterable[Any] | None,
    tools: Mapping[str, Any] | Iterable[Any],
    *,
    runner: Runner | None = None,
    timeout: float | None = None,
    max_parallel: int | None = None,
) -> ToolResults:
    """The same as :func:`run_tool_calls`, for ``async`` agent loops.

    ``results = await ap.arun_tool_calls(calls, tools)``: the calls run on the runner's
    own threads and processes, so the event loop is never blocked (the default runner
    is made, on first use, in a worker thread). Cancelling the awaiting task cancels
    the calls and raises ``asyncio.CancelledError`` (no results).
    """
    _check_limits(timeout, max_parallel)
    batch = _Batch(calls, tools, timeout)
    if not batch.nodes:
        return batch.finish(batch.empty_report())
    if runner is None:
        runner = await asyncio.to_thread(_default_runner)
    report = await runner.arun(batch.plan, failure="collect", max_parallel=max_parallel)
    return batch.finish(report)
