"""Tool calls in, tool results out (``actionpool.tools``), with real runs and real workers.

The tools are module-level functions so that cpu ones pickle by reference. Timing
bounds are generous (the machine is shared); what is asserted is the exact result
dicts, the outcomes, and that no process is left behind (the conftest checks that).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import actionpool as ap
from actionpool import tools as tools_mod
from tests.helpers import most_at_once, wait_for_path, write_atomic

pytestmark = pytest.mark.slow

# ---- tools ---------------------------------------------------------------------------


def add(a: int, b: int) -> int:
    return a + b


@ap.action(kind="io")
def weather(city: str) -> str:
    if city == "Atlantis":
        raise ValueError("bad city")
    return f"sunny in {city}"


@ap.action(kind="io")
def nap(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


@ap.action(kind="io")
def io_wait(ctx: ap.Context, marker: str, seconds: float = 60.0) -> str:
    """Write ``marker``, then wait until cancelled or ``seconds`` passed."""
    write_atomic(marker, "started")
    deadline = time.monotonic() + seconds
    while not ctx.cancelled() and time.monotonic() < deadline:
        time.sleep(0.01)
    return "woke up"


def cpu_sleep(marker: str, seconds: float) -> str:
    write_atomic(marker, str(os.getpid()))
    time.sleep(seconds)
    return "slept"


def crash() -> None:
    os._exit(1)


@ap.action(kind="io", timeout=0.3)
def short_fuse(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


@ap.action(kind="io")
def record(folder: str, i: int, seconds: float) -> int:
    """Write this call's start and end times to ``folder/i``."""
    start = time.time()
    time.sleep(seconds)
    write_atomic(Path(folder, str(i)), f"{start} {time.time()}")
    return i


@ap.action(kind="io")
def echo_ctx(ctx: ap.Context, text: str) -> dict[str, Any]:
    return {"node": ctx.node, "text": text}


@ap.action(kind="io")
def labelled(*, name: str, after: int = 0) -> str:
    return f"{name}/{after}"


@dataclasses.dataclass
class Point:
    x: int
    y: int


@ap.action(kind="io")
def value_of(which: str) -> Any:
    values: dict[str, Any] = {
        "dict": {"a": 1, "b": [1, 2]},
        "list": [1, "two", None],
        "none": None,
        "int": 42,
        "float": 1.5,
        "bool": True,
        "bytes": "héllo".encode(),
        "point": Point(1, 2),
        "set": {3, 1, 2},
        "unicode": {"city": "Zürich"},
        "long": "x" * 5000,
    }
    if which == "raise long":
        raise RuntimeError("y" * 5000)
    return values[which]


@ap.action(kind="io")
def pid_io() -> int:
    return os.getpid()


TOOLS: dict[str, Any] = {
    "add": add,
    "weather": weather,
    "nap": nap,
    "io_wait": io_wait,
    "cpu_sleep": cpu_sleep,
    "crash": crash,
    "short_fuse": short_fuse,
    "record": record,
    "echo_ctx": echo_ctx,
    "labelled": labelled,
    "value_of": value_of,
}


# ---- the four shapes -----------------------------------------------------------------


def chat(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def responses(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {
        "type": "function_call",
        "id": f"fc_{call_id}",
        "call_id": call_id,
        "name": name,
        "arguments": args,
        "status": "completed",
    }


def anthropic(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


def langchain(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    return {"name": name, "args": arguments, "id": call_id, "type": "tool_call"}


SHAPES = {"chat": chat, "responses": responses, "anthropic": anthropic, "langchain": langchain}


def answer(shape: str, call_id: str, content: str, is_error: bool = False) -> dict[str, Any]:
    """The result dict that answers a call of ``shape``."""
    if shape == "chat":
        return {"role": "tool", "tool_call_id": call_id, "content": content}
    if shape == "responses":
        return {"type": "function_call_output", "call_id": call_id, "output": content}
    if shape == "anthropic":
        return {
            "type": "tool_result",
            "tool_use_id": call_id,
            "content": content,
            "is_error": is_error,
        }
    return {
        "type": "tool",
        "tool_call_id": call_id,
        "content": content,
        "status": "error" if is_error else "success",
    }


@pytest.fixture(scope="module")
def runner() -> Iterator[ap.Runner]:
    with ap.Runner(cpu_workers=2, io_workers=8) as r:
        yield r


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_shape_in_and_out(runner: ap.Runner, shape: str) -> None:
    make = SHAPES[shape]
    calls = [
        make("c1", "add", {"a": 2, "b": 3}),
        make("c2", "weather", {"city": "Oslo"}),
        make("c3", "weather", {"city": "Atlantis"}),
    ]
    results = ap.run_tool_calls(calls, TOOLS, runner=runner)
    assert isinstance(results, list)
    assert results == [
        answer(shape, "c1", "5"),
        answer(shape, "c2", "sunny in Oslo"),
        answer(shape, "c3", "Error: ValueError: bad city", is_error=True),
    ]
    assert all(type(r) is dict for r in results)


def test_mixed_shapes_in_one_batch(runner: ap.Runner) -> None:
    calls = [
        chat("a", "add", {"a": 1, "b": 1}),
        responses("b", "add", {"a": 2, "b": 2}),
        anthropic("c", "add", {"a": 3, "b": 3}),
        langchain("d", "add", {"a": 4, "b": 4}),
        {"id": "e", "name": "add", "args": {"a": 5, "b": 5}},  # LangChain without "type"
        {"id": "f", "function": {"name": "add", "arguments": '{"a": 6, "b": 6}'}},  # no "type"
    ]
    results = ap.run_tool_calls(calls, TOOLS, runner=runner)
    assert results == [
        answer("chat", "a", "2"),
        answer("responses", "b", "4"),
        answer("anthropic", "c", "6"),
        answer("langchain", "d", "8"),
        answer("langchain", "e", "10"),
        answer("chat", "f", "12"),
    ]


def test_input_order_is_kept_when_later_calls_finish_first(runner: ap.Runner) -> None:
    calls = [chat(f"c{i}", "nap", {"seconds": s, "value": i}) for i, s in enumerate([0.6, 0.3, 0])]
    results = ap.run_tool_calls(calls, TOOLS, runner=runner)
    assert [r["tool_call_id"] for r in results] == ["c0", "c1", "c2"]
    assert [r["content"] for r in results] == ["0", "1", "2"]
    finished = [o.finished_at for o in results.outcomes]
    assert finished[2] < finished[1] < finished[0]  # type: ignore[operator]
    assert [o.name for o in results.outcomes] == ["nap#0", "nap#1", "nap#2"]


def _spans(folder: Path, n: int) -> list[tuple[float, float]]:
    """The (start, end) times that ``record`` wrote for calls 0..n-1."""
    spans = []
    for i in range(n):
        start, end = (folder / str(i)).read_text().split()
        spans.append((float(start), float(end)))
    return spans


def test_a_batch_runs_its_calls_side_by_side(runner: ap.Runner, tmp_path: Path) -> None:
    # so a batch takes about as long as its slowest call: all 8 run at one moment
    calls = [
        anthropic(f"t{i}", "record", {"folder": str(tmp_path), "i": i, "seconds": 0.5})
        for i in range(8)
    ]
    results = ap.run_tool_calls(calls, TOOLS, runner=runner)
    assert [r["content"] for r in results] == [str(i) for i in range(8)]
    assert most_at_once(_spans(tmp_path, 8)) == 8


# ---- errors are results --------------------------------------------------------------


def test_unknown_tool(runner: ap.Runner) -> None:
    results = ap.run_tool_calls([chat("c1", "serach", {"q": "x"})], TOOLS, runner=runner)
    content = results[0]["content"]
    assert content.startswith("Error: unknown tool 'serach'; the tools are: add, ")
    assert "weather" in content
    out = results.outcomes[0]
    assert out.status is ap.Status.FAILED and out.attempts == 0
    assert isinstance(out.error, LookupError)
    assert out.name == "serach#0" and out.pool is None
    assert len(results.report) == 0  # nothing ran


def test_arguments_that_are_not_json(runner: ap.Runner) -> None:
    calls = [chat("c1", "add", '{"a": 1, "b":'), responses("r1", "add", "not json")]
    results = ap.run_tool_calls(calls, TOOLS, runner=runner)
    assert results[0]["content"].startswith(
        "Error: the arguments of tool 'add' are not valid JSON ("
    )
    assert results[1]["output"].startswith("Error: the arguments of tool 'add' are not valid JSON")
    assert all(isinstance(o.error, json.JSONDecodeError) for o in results.outcomes)
    assert all(o.attempts == 0 for o in results.outcomes)


@pytest.mark.parametrize(
    ("arguments", "what"),
    [("[1, 2]", "an array"), ('"text"', "a string"), ("3", "a number"), ("null", "null")],
)
def test_arguments_that_are_not_an_object(runner: ap.Runner, arguments: str, what: str) -> None:
    results = ap.run_tool_calls([chat("c1", "add", arguments)], TOOLS, runner=runner)
    assert (
        results[0]["content"]
        == f"Error: the arguments of tool 'add' must be a JSON object, got {what}"
    )
    assert isinstance(results.outcomes[0].error, TypeError)


def test_anthropic_input_that_is_not_an_object(runner: ap.Runner) -> None:
    results = ap.run_tool_calls([anthropic("t1", "add", [1, 2])], TOOLS, runner=runner)
    assert results == [
        answer(
            "anthropic",
            "t1",
            "Error: the arguments of tool 'add' must be a JSON object, got an array",
            is_error=True,
        )
    ]


def test_arguments_that_do_not_fit_the_signature(runner: ap.Runner) -> None:
    calls = [
        langchain("l1", "add", {"a": 1}),
        langchain("l2", "add", {"a": 1, "b": 2, "c": 3}),
        langchain("l3", "echo_ctx", {"ctx": 1, "text": "x"}),  # ctx is never the model's
    ]
    results = ap.run_tool_calls(calls, TOOLS, runner=runner)
    assert results == [
        answer(
            "langchain",
            "l1",
            "Error: bad arguments for tool 'add': missing a required argument: 'b'",
            True,
        ),
        answer(
            "langchain",
            "l2",
            "Error: bad arguments for tool 'add': got an unexpected keyword argument 'c'",
            True,
        ),
        answer(
            "langchain",
            "l3",
            "Error: bad arguments for tool 'echo_ctx': got an unexpected keyword argument 'ctx'",
            True,
        ),
    ]
    assert all(o.attempts == 0 and isinstance(o.error, TypeError) for o in results.outcomes)


def test_a_raise_keeps_its_traceback_in_the_outcome_only(runner: ap.Runner) -> None:
    results = ap.run_tool_calls([chat("c1", "weather", {"city": "Atlantis"})], TOOLS, runner=runner)
    assert results[0]["content"] == "Error: ValueError: bad city"
    out = results.outcomes[0]
    assert out.status is ap.Status.FAILED and out.attempts == 1
    assert isinstance(out.error, ValueError)
    assert out.traceback is not None and "bad city" in out.traceback


def test_a_cpu_tool_that_raises(runner: ap.Runner) -> None:
    results = ap.run_tool_calls([chat("c1", "add", {"a": 1, "b": "x"})], TOOLS, runner=runner)
    assert results[0]["content"] == (
        "Error: TypeError: unsupported operand type(s) for +: 'int' and 'str'"
    )
    assert results.outcomes[0].pool == "cpu"
    assert "Traceback" not in results[0]["content"]


def test_timeout_of_an_io_tool(runner: ap.Runner, tmp_path: Path) -> None:
    marker = str(tmp_path / "m")
    calls = [
        anthropic("t1", "io_wait", {"marker": marker}),
        anthropic("t2", "add", {"a": 1, "b": 2}),
    ]
    results = ap.run_tool_calls(calls, TOOLS, runner=runner, timeout=0.5)
    assert results == [
        answer("anthropic", "t1", "Error: tool 'io_wait' timed out after 0.5 s", True),
        answer("anthropic", "t2", "3"),
    ]
    assert results.outcomes[0].status is ap.Status.TIMED_OUT
    assert isinstance(results.outcomes[0].error, ap.ActionTimeout)


def test_timeout_of_a_cpu_tool(runner: ap.Runner, tmp_path: Path) -> None:
    calls = [responses("r1", "cpu_sleep", {"marker": str(tmp_path / "m"), "seconds": 30})]
    results = ap.run_tool_calls(calls, TOOLS, runner=runner, timeout=0.5)
    assert results == [
        answer("responses", "r1", "Error: tool 'cpu_sleep' timed out after 0.5 s", True)
    ]
    out = results.outcomes[0]
    assert out.status is ap.Status.TIMED_OUT and out.pool == "cpu"


def test_a_tools_own_shorter_timeout_wins(runner: ap.Runner) -> None:
    calls = [chat("c1", "short_fuse", {"seconds": 5}), chat("c2", "nap", {"seconds": 5})]
    start = time.monotonic()
    results = ap.run_tool_calls(calls, TOOLS, runner=runner, timeout=1)
    assert time.monotonic() - start < 4
    assert results == [
        answer("chat", "c1", "Error: tool 'short_fuse' timed out after 0.3 s", True),
        answer("chat", "c2", "Error: tool 'nap' timed out after 1 s", True),
    ]
    assert short_fuse.timeout == 0.3  # the user's action is not changed


def test_a_crashed_worker(runner: ap.Runner) -> None:
    calls = [langchain("l1", "crash", {}), langchain("l2", "add", {"a": 1, "b": 1})]
    results = ap.run_tool_calls(calls, TOOLS, runner=runner)
    assert results == [
        answer(
            "langchain",
            "l1",
            "Error: tool 'crash' crashed: its worker process exited with code 1",
            True,
        ),
        answer("langchain", "l2", "2"),
    ]
    out = results.outcomes[0]
    assert out.status is ap.Status.CRASHED and isinstance(out.error, ap.WorkerCrashed)


def _cancel_when(marker: Path, runner: ap.Runner) -> threading.Thread:
    def cancel() -> None:
        wait_for_path(marker, "the tool's start marker")
        runner.cancel()

    thread = threading.Thread(target=cancel)
    thread.start()
    return thread


@pytest.mark.parametrize("tool", ["cpu_sleep", "io_wait"])
def test_a_cancel(runner: ap.Runner, tmp_path: Path, tool: str) -> None:
    marker = tmp_path / "started"
    args: dict[str, Any] = {"marker": str(marker)}
    if tool == "cpu_sleep":
        args["seconds"] = 60
    thread = _cancel_when(marker, runner)
    try:
        # max_parallel=1: c2 has ended before c1 starts, and c1's start cancels the run
        results = ap.run_tool_calls(
            [chat("c2", "add", {"a": 1, "b": 1}), chat("c1", tool, args)],
            TOOLS,
            runner=runner,
            max_parallel=1,
        )
    finally:
        thread.join(60)
    assert results[1] == answer(
        "chat", "c1", f"Error: tool '{tool}' was cancelled before it finished", True
    )
    assert results[0] == answer("chat", "c2", "2")
    assert results.outcomes[1].status is ap.Status.CANCELLED
    assert results.report.status is ap.RunStatus.CANCELLED
    # the runner is usable again
    assert ap.run_tool_calls([chat("c3", "add", {"a": 2, "b": 2})], TOOLS, runner=runner) == [
        answer("chat", "c3", "4")
    ]


def test_a_malformed_call_with_an_id_is_an_error_result(runner: ap.Runner) -> None:
    results = ap.run_tool_calls(
        [{"type": "tool_use", "id": "t1", "input": {}}], TOOLS, runner=runner
    )
    assert results == [
        answer(
            "anthropic",
            "t1",
            "Error: malformed tool call: the call names no tool (name None)",
            True,
        )
    ]


def test_a_call_of_no_known_shape_raises_before_anything_runs(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    calls = [
        anthropic("t1", "cpu_sleep", {"marker": str(marker), "seconds": 0}),
        {"type": "text", "text": "hi"},
    ]
    with pytest.raises(
        ValueError,
        match=r"tool call 1: not a tool call of a known shape"
        r" \(type 'text', keys \['text', 'type'\]\)",
    ):
        ap.run_tool_calls(calls, TOOLS)
    with pytest.raises(ValueError, match="tool call 0: expected a dict"):
        ap.run_tool_calls(["add(1, 2)"], TOOLS)
    with pytest.raises(ValueError, match=r"tool call 0 \(chat shape\) has no 'id'"):
        ap.run_tool_calls([{"function": {"name": "add", "arguments": "{}"}}], TOOLS)
    assert not marker.exists()
    assert tools_mod._DEFAULT is None  # no runner was made for a batch that was refused


def test_bad_options_and_tools_raise() -> None:
    call = [chat("c1", "add", {"a": 1, "b": 2})]
    with pytest.raises(ValueError, match="timeout must be"):
        ap.run_tool_calls(call, TOOLS, timeout=0)
    with pytest.raises(ValueError, match="max_parallel must be"):
        ap.run_tool_calls(call, TOOLS, max_parallel=0)
    with pytest.raises(TypeError, match="calls must be a list"):
        ap.run_tool_calls(call[0], TOOLS)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tool 'add' must be callable"):
        ap.run_tool_calls(call, {"add": 3})
    with pytest.raises(ValueError, match="two tools are named 'add'"):
        ap.run_tool_calls(call, [add, ap.action(add, kind="io")])
    with pytest.raises(TypeError, match="tools must be a mapping"):
        ap.run_tool_calls(call, add)  # type: ignore[arg-type]


def test_an_empty_batch_runs_nothing() -> None:
    for calls in ([], None):
        results = ap.run_tool_calls(calls, TOOLS)
        assert results == [] and results.outcomes == () and len(results.report) == 0
    assert tools_mod._DEFAULT is None


# ---- values, context, tools as a list ------------------------------------------------


def test_values_that_are_not_strings_are_json(runner: ap.Runner) -> None:
    expected = {
        "dict": '{"a": 1, "b": [1, 2]}',
        "list": '[1, "two", null]',
        "none": "null",
        "int": "42",
        "float": "1.5",
        "bool": "true",
        "bytes": "héllo",
        "point": '{"x": 1, "y": 2}',
        "set": "[1, 2, 3]",
        "unicode": '{"city": "Zürich"}',
    }
    calls = [responses(k, "value_of", {"which": k}) for k in expected]
    results = ap.run_tool_calls(calls, TOOLS, runner=runner)
    assert {r["call_id"]: r["output"] for r in results} == expected


def test_long_values_are_kept_and_long_errors_are_cut(runner: ap.Runner) -> None:
    calls = [
        chat("c1", "value_of", {"which": "long"}),
        chat("c2", "value_of", {"which": "raise long"}),
    ]
    results = ap.run_tool_calls(calls, TOOLS, runner=runner)
    assert results[0]["content"] == "x" * 5000
    error = results[1]["content"]
    assert len(error) == tools_mod.MAX_ERROR_CHARS
    assert error.startswith("Error: RuntimeError: yyy") and error.endswith("y…")
    assert str(results.outcomes[1].error) == "y" * 5000


def test_a_tool_taking_ctx_and_keyword_only_name(runner: ap.Runner) -> None:
    calls = [
        chat("c1", "echo_ctx", {"text": "hi"}),
        chat("c2", "labelled", {"name": "n", "after": 3}),
    ]
    results = ap.run_tool_calls(calls, TOOLS, runner=runner)
    assert json.loads(results[0]["content"]) == {"node": "echo_ctx#0", "text": "hi"}
    assert results[1]["content"] == "n/3"


def test_tools_as_a_list_and_sdk_objects(runner: ap.Runner) -> None:
    class Dumped:
        def model_dump(self) -> dict[str, Any]:
            return anthropic("t1", "add", {"a": 1, "b": 2})

    @dataclasses.dataclass
    class Function:
        name: str
        arguments: str

    @dataclasses.dataclass
    class ToolCall:
        id: str
        function: Function
        type: str = "function"

    calls = [Dumped(), ToolCall("c1", Function("weather", '{"city": "Rome"}'))]
    results = ap.run_tool_calls(calls, [add, weather], runner=runner)
    assert results == [answer("anthropic", "t1", "3"), answer("chat", "c1", "sunny in Rome")]


def test_duplicate_ids_and_repeated_tools_are_separate_calls(runner: ap.Runner) -> None:
    calls = [chat("same", "add", {"a": 1, "b": 1}), chat("same", "add", {"a": 2, "b": 2})]
    results = ap.run_tool_calls(calls, TOOLS, runner=runner)
    assert [r["content"] for r in results] == ["2", "4"]
    assert [o.name for o in results.report.outcomes] == ["add#0", "add#1"]


def test_outcomes_line_up_with_results(runner: ap.Runner) -> None:
    calls = [
        chat("c1", "add", {"a": 1, "b": 2}),
        chat("c2", "nope", {}),
        chat("c3", "weather", {"city": "Atlantis"}),
    ]
    results = ap.run_tool_calls(calls, TOOLS, runner=runner)
    assert len(results.outcomes) == len(results) == 3
    assert [o.status for o in results.outcomes] == [
        ap.Status.SUCCEEDED,
        ap.Status.FAILED,
        ap.Status.FAILED,
    ]
    assert results.outcomes[0].value == 3 and results.outcomes[0].pool == "cpu"
    assert results.outcomes[2].pool == "io" and results.outcomes[2].attempts == 1
    assert [o.name for o in results.report.outcomes] == ["add#0", "weather#2"]
    assert results.report.outcome("add#0") is results.outcomes[0]


# ---- async, max_parallel, the default runner -----------------------------------------


def test_async_variant(runner: ap.Runner) -> None:
    async def main() -> tuple[tools_mod.ToolResults, float]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        task = asyncio.create_task(ticker())
        calls = [anthropic(f"t{i}", "nap", {"seconds": 0.4, "value": i}) for i in range(4)]
        calls.append(anthropic("t9", "nope", {}))
        results = await ap.arun_tool_calls(calls, TOOLS, runner=runner, timeout=10)
        task.cancel()
        return results, ticks

    results, ticks = asyncio.run(main())
    assert [r["content"] for r in results[:4]] == ["0", "1", "2", "3"]
    assert results[4]["is_error"] is True
    assert ticks >= 5  # the loop kept running while the calls ran


def test_max_parallel_caps_the_calls_running_at_once(runner: ap.Runner, tmp_path: Path) -> None:
    calls = [
        chat(f"c{i}", "record", {"folder": str(tmp_path), "i": i, "seconds": 0.2}) for i in range(6)
    ]
    results = ap.run_tool_calls(calls, TOOLS, runner=runner, max_parallel=2)
    assert [r["content"] for r in results] == [str(i) for i in range(6)]
    most = most_at_once(_spans(tmp_path, 6))
    assert most <= 2, f"{most} calls ran at once with max_parallel=2"


def test_the_default_runner() -> None:
    try:
        calls = [chat("c1", "add", {"a": 1, "b": 2}), chat("c2", "weather", {"city": "Lima"})]
        first = ap.run_tool_calls(calls, TOOLS)
        assert [r["content"] for r in first] == ["3", "sunny in Lima"]
        made = tools_mod._DEFAULT
        assert made is not None and made.sizing.io_workers == tools_mod.DEFAULT_IO_WORKERS

        async def again() -> tools_mod.ToolResults:
            return await ap.arun_tool_calls([anthropic("t1", "add", {"a": 2, "b": 2})], TOOLS)

        assert asyncio.run(again()) == [answer("anthropic", "t1", "4")]
        assert tools_mod._DEFAULT is made  # made once, then reused

        # threads share it; it is made once even when they race for it
        tools_mod._close_default()
        seen: list[ap.Runner] = []
        threads = [
            threading.Thread(target=lambda: seen.append(tools_mod._default_runner()))
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(seen) == 4 and len({id(r) for r in seen}) == 1
    finally:
        tools_mod._close_default()
    assert tools_mod._DEFAULT is None


def test_a_users_runner_is_not_closed() -> None:
    with ap.Runner(cpu_workers=1, io_workers=2) as mine:
        ap.run_tool_calls([chat("c1", "pid", {})], {"pid": pid_io}, runner=mine)
        assert not mine._closed
        assert tools_mod._DEFAULT is None
