"""mcpopt.pipeline.Pipeline: filter order, short-circuit, decoration, replacing the filter list."""

from __future__ import annotations

from typing import Any

import pytest

from mcpopt.pipeline import Next, Pipeline, ToolCall, ToolResult

pytestmark = pytest.mark.anyio


def _call(name: str = "srv__tool", **arguments: Any) -> ToolCall:
    return ToolCall("srv", "tool", name, {"name": "tool", "arguments": arguments})


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def terminal(self) -> Next:
        async def terminal(call: ToolCall) -> ToolResult:
            self.events.append("terminal")
            return {"content": [{"type": "text", "text": f"upstream {call.tool}"}], "isError": False}

        return terminal

    def decorating(self, label: str) -> Any:
        async def flt(call: ToolCall, next: Next) -> ToolResult:
            self.events.append(f"{label}:before")
            call.attrs.setdefault("path", []).append(label)
            result = await next(call)
            self.events.append(f"{label}:after")
            return {**result, "_meta": {**result.get("_meta", {}), label: True}}

        return flt

    def short_circuit(self, label: str, when: str) -> Any:
        async def flt(call: ToolCall, next: Next) -> ToolResult:
            self.events.append(f"{label}:check")
            if call.arguments.get("cached") == when:
                return {"content": [{"type": "text", "text": f"from {label}"}], "isError": False}
            return await next(call)

        return flt


async def test_no_filters_calls_the_terminal() -> None:
    rec = Recorder()
    result = await Pipeline(rec.terminal())(_call())
    assert result["content"][0]["text"] == "upstream tool"
    assert rec.events == ["terminal"]


async def test_decorators_run_outermost_first() -> None:
    rec = Recorder()
    pipe = Pipeline(rec.terminal(), [rec.decorating("a"), rec.decorating("b")])
    call = _call()
    result = await pipe(call)
    assert rec.events == ["a:before", "b:before", "terminal", "b:after", "a:after"]
    assert call.attrs["path"] == ["a", "b"]
    assert result["_meta"] == {"a": True, "b": True}
    assert result["content"][0]["text"] == "upstream tool"


async def test_short_circuit_skips_the_rest() -> None:
    rec = Recorder()
    pipe = Pipeline(
        rec.terminal(), [rec.decorating("outer"), rec.short_circuit("cache", "yes"), rec.decorating("inner")]
    )
    hit = await pipe(_call(cached="yes"))
    assert hit["content"][0]["text"] == "from cache"
    assert rec.events == ["outer:before", "cache:check", "outer:after"]
    assert hit["_meta"] == {"outer": True}

    rec.events.clear()
    miss = await pipe(_call(cached="no"))
    assert miss["content"][0]["text"] == "upstream tool"
    assert rec.events == ["outer:before", "cache:check", "inner:before", "terminal", "inner:after", "outer:after"]
    assert miss["_meta"] == {"outer": True, "inner": True}


async def test_set_filters_replaces_the_chain() -> None:
    rec = Recorder()
    pipe = Pipeline(rec.terminal(), [rec.short_circuit("cache", "yes")])
    assert (await pipe(_call(cached="yes")))["content"][0]["text"] == "from cache"
    pipe.set_filters([rec.decorating("only")])
    rec.events.clear()
    result = await pipe(_call(cached="yes"))
    assert result["content"][0]["text"] == "upstream tool"
    assert rec.events == ["only:before", "terminal", "only:after"]
    assert len(pipe.filters) == 1


async def test_filter_errors_propagate() -> None:
    async def failing(call: ToolCall, next: Next) -> ToolResult:
        raise RuntimeError("boom")

    rec = Recorder()
    pipe = Pipeline(rec.terminal(), [rec.decorating("outer"), failing])
    with pytest.raises(RuntimeError, match="boom"):
        await pipe(_call())
    assert rec.events == ["outer:before"]


class _Picky:
    """A filter wanted only for the tools in `tools`, whose answer can change (`plan_state`)."""

    def __init__(self, rec: Recorder, label: str, tools: set[str], *, rewrites: bool = False) -> None:
        self.rec, self.label, self.tools, self.rewrites = rec, label, tools, rewrites
        self.version = 0

    def wanted(self, server: str, tool: str, info: Any) -> bool:
        return tool in self.tools

    def plan_state(self) -> object:
        return self.version

    async def __call__(self, call: ToolCall, next: Next) -> ToolResult:
        self.rec.events.append(self.label)
        return await next(call)


async def test_per_tool_chain_skips_filters_with_nothing_to_do() -> None:
    rec = Recorder()
    picky = _Picky(rec, "picky", {"tool"})
    pipe = Pipeline(rec.terminal(), [rec.decorating("a"), picky])
    await pipe(_call())
    assert rec.events == ["a:before", "picky", "terminal", "a:after"]
    rec.events.clear()
    other = ToolCall("srv", "other", "srv__other", {"name": "other", "arguments": {}})
    await pipe(other)
    assert rec.events == ["a:before", "terminal", "a:after"]  # not wanted for `other`: not run
    assert pipe.chain("srv", "other") == pipe.filters[:1]

    # Its answer changes (and says so with a new plan state): every chain is rebuilt.
    picky.tools = {"other"}
    picky.version = 1_000_000  # an int object not cached by the interpreter: a new identity
    rec.events.clear()
    await pipe(other)
    await pipe(_call())
    assert rec.events == ["a:before", "picky", "terminal", "a:after", "a:before", "terminal", "a:after"]


async def test_a_rewriting_filter_keeps_every_later_filter() -> None:
    rec = Recorder()
    rules = _Picky(rec, "rules", {"tool"}, rewrites=True)
    later = _Picky(rec, "later", set())  # wanted for nothing by itself
    pipe = Pipeline(rec.terminal(), [rules, later])
    await pipe(_call())
    assert rec.events == ["rules", "later", "terminal"]  # the call may have been rewritten: `later` runs
    rec.events.clear()
    await pipe(ToolCall("srv", "other", "srv__other", {"name": "other", "arguments": {}}))
    assert rec.events == ["terminal"]


async def test_timed_terminal_leaves_out_terminal_timers() -> None:
    rec = Recorder()

    class Timer:
        times_terminal = True

        async def __call__(self, call: ToolCall, next: Next) -> ToolResult:
            rec.events.append("timer")
            return await next(call)

    assert len(Pipeline(rec.terminal(), [Timer()], timed_terminal=True).chain("srv", "tool")) == 0
    await Pipeline(rec.terminal(), [Timer()])(_call())
    assert rec.events == ["timer", "terminal"]
