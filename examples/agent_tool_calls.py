"""An agent loop's tool calls, run in parallel: one result per call, errors as results.

What it shows:

* ``ap.run_tool_calls(calls, tools)`` takes the tool calls of a model's response as
  they come off the wire, in any of four shapes (OpenAI Chat Completions, OpenAI
  Responses, Anthropic Messages, LangChain), runs them in parallel, and returns one
  result per call, in order, in the shape the same API expects back;
* io tools (``ap.action(fn, kind="io")``, the usual case: HTTP, files, databases) run
  on threads, a cpu tool (``word_stats``) in a worker process;
* whatever goes wrong is that call's error result, which the model reads on its next
  turn: an unknown tool, a tool that raises, a tool past its ``timeout``;
* the same loop in ``async`` code with ``await ap.arun_tool_calls(...)``: here four
  conversations run at once on one event loop.

No model is called: each conversation replays a model's recorded responses
(hard-coded below), and the results are checked against what they must be.

Run it::

    python examples/agent_tool_calls.py

Exit status: 0 when every conversation got exactly the expected results, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import actionpool as ap

# ---- the tools -------------------------------------------------------------------------

FORECASTS = {"Oslo": ("snow", -3), "Lima": ("fog", 17), "Cairo": ("sun", 31)}


@ap.action(kind="io")
def get_weather(city: str) -> dict[str, Any]:
    """A weather service (an HTTP call in real life): 0.2 s of waiting."""
    time.sleep(0.2)
    if city not in FORECASTS:
        raise ValueError(f"no forecast for {city!r}")
    sky, celsius = FORECASTS[city]
    return {"city": city, "sky": sky, "celsius": celsius}


@ap.action(kind="io")
def search_docs(query: str, limit: int = 2) -> list[str]:
    """A document search (a database query in real life)."""
    time.sleep(0.2)
    docs = ["runner.md: pools and sizing", "plans.md: fan-out and fan-in", "tools.md: agents"]
    return [d for d in docs if any(w in d for w in query.lower().split())][:limit]


@ap.action(kind="io", timeout=0.5)
def fetch_page(ctx: ap.Context, url: str) -> str:
    """A slow web page: 2 s, longer than its 0.5 s timeout. It stops when told to."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if ctx.cancelled():  # the timeout passed: the result would be dropped anyway
            return ""
        time.sleep(0.01)
    return f"<html>{url}</html>"


def word_stats(text: str) -> dict[str, Any]:
    """CPU work (a plain function: kind "cpu", in a worker process)."""
    words = re.findall(r"[a-z']+", text.lower())
    top = collections.Counter(words).most_common(1)
    return {"words": len(words), "most_common": top[0][0] if top else None}


TOOLS = {
    "get_weather": get_weather,
    "search_docs": search_docs,
    "fetch_page": fetch_page,
    "word_stats": word_stats,
}

TEXT = "the pool runs the plan and the plan runs the actions"

# ---- recorded model responses, one conversation per API --------------------------------
# Each conversation: the model's first response (tool calls), then its final answer.


def _fn(call_id: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args)},
    }


CHAT = [
    {
        "choices": [
            {
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        _fn("call_w1", "get_weather", {"city": "Oslo"}),
                        _fn("call_w2", "get_weather", {"city": "Lima"}),
                        _fn("call_b1", "book_flight", {"to": "Lima"}),
                    ],
                },
            }
        ]
    },
    {"choices": [{"finish_reason": "stop", "message": {"role": "assistant", "content": "Lima."}}]},
]

RESPONSES = [
    {
        "output": [
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {
                "type": "function_call",
                "id": "fc_1",
                "call_id": "call_s1",
                "name": "search_docs",
                "arguments": '{"query": "plans and pools"}',
                "status": "completed",
            },
            {
                "type": "function_call",
                "id": "fc_2",
                "call_id": "call_c1",
                "name": "word_stats",
                "arguments": json.dumps({"text": TEXT}),
                "status": "completed",
            },
        ]
    },
    {"output": [{"type": "message", "role": "assistant", "content": "Found two pages."}]},
]

ANTHROPIC = [
    {
        "stop_reason": "tool_use",
        "content": [
            {"type": "text", "text": "Let me look at both."},
            {"type": "tool_use", "id": "toolu_p1", "name": "fetch_page", "input": {"url": "x.org"}},
            {
                "type": "tool_use",
                "id": "toolu_w1",
                "name": "get_weather",
                "input": {"city": "Cairo"},
            },
        ],
    },
    {"stop_reason": "end_turn", "content": [{"type": "text", "text": "Cairo is sunny."}]},
]

LANGCHAIN = [
    {
        "type": "ai",
        "content": "",
        "tool_calls": [
            {
                "name": "get_weather",
                "args": {"city": "Atlantis"},
                "id": "lc_1",
                "type": "tool_call",
            },
            {"name": "word_stats", "args": {"text": "to be or not to be"}, "id": "lc_2"},
        ],
    },
    {"type": "ai", "content": "Atlantis has no forecast.", "tool_calls": []},
]

# ---- what each API needs: where the calls are, how results go back ----------------------


def chat_calls(response: dict[str, Any]) -> list[Any]:
    return response["choices"][0]["message"].get("tool_calls") or []


def responses_calls(response: dict[str, Any]) -> list[Any]:
    return [item for item in response["output"] if item["type"] == "function_call"]


def anthropic_calls(response: dict[str, Any]) -> list[Any]:
    return [block for block in response["content"] if block["type"] == "tool_use"]


def langchain_calls(response: dict[str, Any]) -> list[Any]:
    return list(response["tool_calls"])


def chat_messages(response: dict[str, Any], results: list[dict[str, Any]]) -> list[Any]:
    return [response["choices"][0]["message"], *results]  # one "tool" message per call


def responses_messages(response: dict[str, Any], results: list[dict[str, Any]]) -> list[Any]:
    return [*response["output"], *results]  # input items for the next request


def anthropic_messages(response: dict[str, Any], results: list[dict[str, Any]]) -> list[Any]:
    # every tool_result block goes back in one user message
    return [
        {"role": "assistant", "content": response["content"]},
        {"role": "user", "content": results},
    ]


def langchain_messages(response: dict[str, Any], results: list[dict[str, Any]]) -> list[Any]:
    return [response, *results]  # ToolMessage dicts


API = dict[str, tuple[list[dict[str, Any]], Callable[..., list[Any]], Callable[..., list[Any]]]]
APIS: API = {
    "chat": (CHAT, chat_calls, chat_messages),
    "responses": (RESPONSES, responses_calls, responses_messages),
    "anthropic": (ANTHROPIC, anthropic_calls, anthropic_messages),
    "langchain": (LANGCHAIN, langchain_calls, langchain_messages),
}

EXPECTED: dict[str, list[dict[str, Any]]] = {
    "chat": [
        {
            "role": "tool",
            "tool_call_id": "call_w1",
            "content": '{"city": "Oslo", "sky": "snow", "celsius": -3}',
        },
        {
            "role": "tool",
            "tool_call_id": "call_w2",
            "content": '{"city": "Lima", "sky": "fog", "celsius": 17}',
        },
        {
            "role": "tool",
            "tool_call_id": "call_b1",
            "content": "Error: unknown tool 'book_flight'; the tools are:"
            " fetch_page, get_weather, search_docs, word_stats",
        },
    ],
    "responses": [
        {
            "type": "function_call_output",
            "call_id": "call_s1",
            "output": '["runner.md: pools and sizing", "plans.md: fan-out and fan-in"]',
        },
        {
            "type": "function_call_output",
            "call_id": "call_c1",
            "output": '{"words": 11, "most_common": "the"}',
        },
    ],
    "anthropic": [
        {
            "type": "tool_result",
            "tool_use_id": "toolu_p1",
            "content": "Error: tool 'fetch_page' timed out after 0.5 s",
            "is_error": True,
        },
        {
            "type": "tool_result",
            "tool_use_id": "toolu_w1",
            "content": '{"city": "Cairo", "sky": "sun", "celsius": 31}',
            "is_error": False,
        },
    ],
    "langchain": [
        {
            "type": "tool",
            "tool_call_id": "lc_1",
            "content": "Error: ValueError: no forecast for 'Atlantis'",
            "status": "error",
        },
        {
            "type": "tool",
            "tool_call_id": "lc_2",
            "content": '{"words": 6, "most_common": "to"}',
            "status": "success",
        },
    ],
}

# ---- the agent loops ----------------------------------------------------------------------


def agent_loop(api: str) -> tuple[list[Any], list[dict[str, Any]]]:
    """Replay one conversation: run each response's tool calls, feed the results back.

    Returns the conversation and every tool result it produced.
    """
    recorded, calls_of, messages_of = APIS[api]
    conversation: list[Any] = [{"role": "user", "content": "Where should I travel?"}]
    produced: list[dict[str, Any]] = []
    for response in recorded:  # in real life: response = client.create(conversation, ...)
        calls = calls_of(response)
        if not calls:
            conversation.append(response)  # the final answer
            break
        results = ap.run_tool_calls(calls, TOOLS, timeout=10)
        conversation += messages_of(response, results)
        produced += results
    return conversation, produced


async def async_agent_loop(api: str) -> tuple[list[Any], list[dict[str, Any]]]:
    """The same loop, for asyncio code: awaiting the calls never blocks the loop."""
    recorded, calls_of, messages_of = APIS[api]
    conversation: list[Any] = [{"role": "user", "content": "Where should I travel?"}]
    produced: list[dict[str, Any]] = []
    for response in recorded:  # in real life: response = await client.create(...)
        calls = calls_of(response)
        if not calls:
            conversation.append(response)
            break
        results = await ap.arun_tool_calls(calls, TOOLS, timeout=10)
        conversation += messages_of(response, results)
        produced += results
    return conversation, produced


def check(label: str, api: str, produced: list[dict[str, Any]], seconds: float) -> bool:
    ok = produced == EXPECTED[api]
    verdict = "as expected" if ok else "WRONG"
    print(f"{label}: {len(produced)} results in {seconds:.2f} s, {verdict}")
    for result in produced:
        print(f"    {result}")
    if not ok:
        for want in EXPECTED[api]:
            print(f"    expected {want}", file=sys.stderr)
    return ok


async def run_async() -> list[bool]:
    """Four conversations at once on one event loop."""
    start = time.perf_counter()
    done = await asyncio.gather(*(async_agent_loop(api) for api in APIS))
    seconds = time.perf_counter() - start
    return [
        check(f"{api} (async)", api, produced, seconds)
        for api, (_, produced) in zip(APIS, done, strict=True)
    ]


def main() -> int:
    verdicts: list[bool] = []
    for api in APIS:
        start = time.perf_counter()
        _, produced = agent_loop(api)
        verdicts.append(check(f"{api} (sync)", api, produced, time.perf_counter() - start))
    verdicts += asyncio.run(run_async())
    right = sum(verdicts)
    print(f"{right} of {len(verdicts)} conversations came back right")
    return 0 if right == len(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
