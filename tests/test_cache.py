"""The result cache: policy, invalidation, coalescing -- and the two failures measured on FastMCP's cache.

FastMCP 4.1.0's response cache (a) served a stale `get_current_time` after 2.5 s and (b) answered a
repeated `create_entities` from cache after a `delete_entities`, so the write was silently lost.
Both are reproduced here against the real servers, through the real gateway process.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from conftest import gateway_params, memory_entry, time_entry, write_config
from mcpopt.cache import ResultCache, cache_key
from mcpopt.config import CacheSettings, ServerConfig
from mcpopt.pipeline import Pipeline, ToolCall
from mcpopt.pipeline.cache import CacheFilter, CoalesceFilter
from mcpopt.policy import ToolInfo, tool_info

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _result(text: str, **extra: Any) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], **extra}


def _call(tool: str, info: ToolInfo, args: dict[str, Any] | None = None, partition: str = "") -> ToolCall:
    return ToolCall(
        "srv", tool, f"srv__{tool}", {"name": tool, "arguments": args or {}}, info=info, partition=partition
    )


READ = ToolInfo(read_only=True, idempotent=True, ttl_ms=1000)
WRITE = ToolInfo()


def _pipeline(cache: ResultCache, upstream: Any) -> Pipeline:
    return Pipeline(upstream, [CacheFilter(cache, lambda server: ["read", "other", "write"]), CoalesceFilter()])


# ---- unit: policy ---------------------------------------------------------------------------
def test_tool_info_from_annotations_and_config() -> None:
    import mcp_types as types

    cfg = ServerConfig(command="x", cache={"ttl_ms": 500, "tools": {"slow": {"ttl_ms": 9000}}}, read_only_tools=["q_*"])
    ro = types.Tool(name="a", input_schema={"type": "object"}, annotations=types.ToolAnnotations(read_only_hint=True))
    rw = types.Tool(name="b", input_schema={"type": "object"})
    declared = types.Tool(name="q_x", input_schema={"type": "object"})
    idem = types.Tool(
        name="c",
        input_schema={"type": "object"},
        annotations=types.ToolAnnotations(idempotent_hint=True, destructive_hint=False),
    )
    assert tool_info(cfg, ro) == ToolInfo(read_only=True, idempotent=True, ttl_ms=500)
    assert tool_info(cfg, rw) == ToolInfo()  # not read-only: never cached, whatever the TTL
    assert tool_info(cfg, declared).read_only and tool_info(cfg, declared).ttl_ms == 500
    assert tool_info(cfg, idem).idempotent and not tool_info(cfg, idem).read_only
    slow = types.Tool(name="slow", input_schema={"type": "object"}, annotations=ro.annotations)
    assert tool_info(cfg, slow).ttl_ms == 9000
    # default TTL is 0: read-only is not the same as unchanging
    assert tool_info(ServerConfig(command="x"), ro).ttl_ms == 0


def test_cache_key_is_canonical_and_partitioned() -> None:
    assert cache_key("s", "t", {"a": 1, "b": [1, 2]}) == cache_key("s", "t", {"b": [1, 2], "a": 1})
    assert cache_key("s", "t", {"a": 1}) != cache_key("s", "t", {"a": 2})
    assert cache_key("s", "t", {"a": 1}, "alice") != cache_key("s", "t", {"a": 1}, "bob")


# ---- unit: filter behaviour -----------------------------------------------------------------
async def test_hit_within_ttl_fresh_after() -> None:
    clock = FakeClock()
    cache = ResultCache(CacheSettings(), clock=clock)
    calls = 0

    async def upstream(call: ToolCall) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return _result(f"v{calls}")

    pipe = _pipeline(cache, upstream)
    assert (await pipe(_call("read", READ)))["content"][0]["text"] == "v1"
    assert (await pipe(_call("read", READ)))["content"][0]["text"] == "v1"
    clock.now += 1.001
    assert (await pipe(_call("read", READ)))["content"][0]["text"] == "v2"
    assert calls == 2


async def test_never_cached_errors_input_required_and_writes() -> None:
    cache = ResultCache(CacheSettings(), clock=FakeClock())
    results = [_result("boom", isError=True), {"resultType": "input_required", "requestState": "x"}, _result("ok")]
    seen = []

    async def upstream(call: ToolCall) -> dict[str, Any]:
        seen.append(call.tool)
        return results[len(seen) - 1] if len(seen) <= 3 else _result("again")

    pipe = _pipeline(cache, upstream)
    await pipe(_call("read", READ))  # isError
    await pipe(_call("read", READ))  # input_required
    await pipe(_call("read", READ))  # ok, stored
    await pipe(_call("read", READ))  # hit
    assert len(seen) == 3
    writes = 0

    async def writer(call: ToolCall) -> dict[str, Any]:
        nonlocal writes
        writes += 1
        return _result("written")

    wpipe = _pipeline(cache, writer)
    await wpipe(_call("write", ToolInfo(ttl_ms=10_000)))
    await wpipe(_call("write", ToolInfo(ttl_ms=10_000)))
    assert writes == 2  # a tool that is not read-only is sent every time


async def test_write_invalidates_and_overlapping_read_is_not_stored() -> None:
    cache = ResultCache(CacheSettings(), clock=FakeClock())
    state = {"value": "old"}
    gate = asyncio.Event()

    async def upstream(call: ToolCall) -> dict[str, Any]:
        if call.tool == "write":
            state["value"] = "new"
            return _result("done")
        if call.arguments.get("slow"):
            value = state["value"]  # read before the write lands...
            await gate.wait()  # ...and return after it
            return _result(value)
        return _result(state["value"])

    pipe = _pipeline(cache, upstream)
    assert (await pipe(_call("read", READ)))["content"][0]["text"] == "old"
    slow = asyncio.create_task(pipe(_call("read", READ, {"slow": True})))
    await asyncio.sleep(0)
    await pipe(_call("write", WRITE))
    gate.set()
    assert (await slow)["content"][0]["text"] == "old"  # it answered its own caller...
    assert (await pipe(_call("read", READ, {"slow": True})))["content"][0]["text"] == "new"  # ...but was not kept
    assert (await pipe(_call("read", READ)))["content"][0]["text"] == "new"  # the write dropped the old entry


async def test_invalidates_rule_drops_only_named_tools() -> None:
    cache = ResultCache(CacheSettings(), clock=FakeClock())
    n = 0

    async def upstream(call: ToolCall) -> dict[str, Any]:
        nonlocal n
        n += 1
        return _result(f"{call.tool}{n}")

    pipe = _pipeline(cache, upstream)
    await pipe(_call("read", READ))
    await pipe(_call("other", READ))
    await pipe(_call("write", ToolInfo(invalidates=("read",))))
    before = n
    await pipe(_call("other", READ))  # still cached
    await pipe(_call("read", READ))  # dropped by the rule
    assert n == before + 1


async def test_partitions_do_not_share_results() -> None:
    cache = ResultCache(CacheSettings(), clock=FakeClock())

    async def upstream(call: ToolCall) -> dict[str, Any]:
        return _result(call.partition)

    pipe = _pipeline(cache, upstream)
    assert (await pipe(_call("read", READ, partition="alice")))["content"][0]["text"] == "alice"
    assert (await pipe(_call("read", READ, partition="bob")))["content"][0]["text"] == "bob"


async def test_coalescing_shares_one_upstream_call() -> None:
    cache = ResultCache(CacheSettings(enabled=False))
    calls = 0
    release = asyncio.Event()

    async def upstream(call: ToolCall) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await release.wait()
        return _result("shared")

    pipe = _pipeline(cache, upstream)
    tasks = [asyncio.create_task(pipe(_call("read", ToolInfo(read_only=True)))) for _ in range(10)]
    await asyncio.sleep(0.01)
    release.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1 and all(r["content"][0]["text"] == "shared" for r in results)
    # writes are never coalesced
    calls = 0
    wtasks = [asyncio.create_task(pipe(_call("write", WRITE))) for _ in range(3)]
    await asyncio.gather(*wtasks)
    assert calls == 3


async def test_coalesced_error_reaches_every_caller() -> None:
    pipe = _pipeline(ResultCache(CacheSettings(enabled=False)), None)  # type: ignore[arg-type]
    gate = asyncio.Event()

    async def failing(call: ToolCall) -> dict[str, Any]:
        await gate.wait()
        raise RuntimeError("upstream broke")

    pipe = Pipeline(failing, [CoalesceFilter()])
    tasks = [asyncio.create_task(pipe(_call("read", ToolInfo(read_only=True)))) for _ in range(3)]
    await asyncio.sleep(0.01)
    gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)


async def test_coalescing_cancellation_touches_only_the_cancelled_call() -> None:
    calls = 0
    gate = asyncio.Event()

    async def upstream(call: ToolCall) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await gate.wait()
        return _result(f"answer {calls}")

    pipe = Pipeline(upstream, [CoalesceFilter()])
    leader = asyncio.create_task(pipe(_call("read", ToolInfo(read_only=True))))
    await asyncio.sleep(0.01)
    followers = [asyncio.create_task(pipe(_call("read", ToolInfo(read_only=True)))) for _ in range(3)]
    await asyncio.sleep(0.01)
    followers[0].cancel()  # a follower's client gives up: nobody else is affected
    leader.cancel()  # the leader's client gives up: the waiting followers call upstream themselves
    await asyncio.sleep(0.01)
    gate.set()
    outcomes = await asyncio.gather(leader, *followers, return_exceptions=True)
    assert isinstance(outcomes[0], asyncio.CancelledError) and isinstance(outcomes[1], asyncio.CancelledError)
    texts = [o["content"][0]["text"] for o in outcomes[2:]]  # type: ignore[index]
    # the two remaining followers: one became the new leader, the other coalesced onto it
    assert calls == 2 and texts == ["answer 2", "answer 2"]


async def test_a_task_or_an_input_request_is_never_shared_by_coalescing() -> None:
    # A CreateTaskResult (SEP-2663) or an InputRequiredResult belongs to the call it was made for.
    calls = 0
    gate = asyncio.Event()

    async def upstream(call: ToolCall) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        n = calls
        await gate.wait()
        if call.arguments.get("kind") == "task":
            return {"resultType": "task", "taskId": f"t{n}", "status": "working"}
        return {"resultType": "input_required", "inputRequests": {f"q{n}": {"method": "roots/list"}}}

    pipe = Pipeline(upstream, [CoalesceFilter()])
    for kind in ("task", "input"):
        calls = 0
        gate.clear()
        tasks = [asyncio.create_task(pipe(_call("read", ToolInfo(read_only=True), {"kind": kind}))) for _ in range(3)]
        await asyncio.sleep(0.01)
        gate.set()
        results = await asyncio.gather(*tasks)
        assert calls == 3
        keys = [r.get("taskId") or next(iter(r["inputRequests"])) for r in results]
        assert len(set(keys)) == 3, keys


# ---- integration: the two FastMCP failures, on the real servers -----------------------------
def _text(result: Any) -> str:
    return result.content[0].text


async def test_get_current_time_is_not_stale_after_its_ttl(tmp_path: Path) -> None:
    # A TTL long enough that the second call is inside it even on a loaded machine (800 ms was
    # not always), short enough for the test to wait it out.
    cfg = write_config(
        tmp_path / "c.yaml", {"time": time_entry(cache={"tools": {"get_current_time": {"ttl_ms": 3000}}})}
    )
    async with Client(gateway_params(cfg)) as client:
        first = json.loads(_text(await client.call_tool("time__get_current_time", {"timezone": "UTC"})))["datetime"]
        cached = json.loads(_text(await client.call_tool("time__get_current_time", {"timezone": "UTC"})))["datetime"]
        assert cached == first  # inside the TTL: served from cache
        await asyncio.sleep(3.2)  # past the TTL (and past a whole second, so the time has changed)
        fresh = json.loads(_text(await client.call_tool("time__get_current_time", {"timezone": "UTC"})))["datetime"]
        assert fresh != first
        stats = (await client.call_tool("mcpopt__cache_stats", {})).structured_content
        row = next(r for r in stats["tools"] if r["tool"] == "get_current_time")
        assert row["hits"] == 1 and row["misses"] == 2


async def test_create_delete_create_keeps_the_entity(tmp_path: Path) -> None:
    # Every memory tool gets a long TTL: only read-only ones may use it.
    cfg = write_config(
        tmp_path / "c.yaml", {"memory": {**memory_entry(tmp_path / "mem.jsonl"), "cache": {"ttl_ms": 60_000}}}
    )
    entity = {"entities": [{"name": "mcpopt-e", "entityType": "test", "observations": ["x"]}]}
    async with Client(gateway_params(cfg)) as client:
        await client.call_tool("memory__create_entities", entity)
        assert "mcpopt-e" in _text(await client.call_tool("memory__read_graph", {}))
        await client.call_tool("memory__delete_entities", {"entityNames": ["mcpopt-e"]})
        assert "mcpopt-e" not in _text(await client.call_tool("memory__read_graph", {}))
        await client.call_tool("memory__create_entities", entity)
        graph = _text(await client.call_tool("memory__read_graph", {}))
        assert "mcpopt-e" in graph  # the second create reached the server; the read is fresh
    # And the server's own file agrees: the write was not lost.
    assert "mcpopt-e" in (tmp_path / "mem.jsonl").read_text()


async def test_purge_tool_drops_cached_results(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", {"time": time_entry(cache={"ttl_ms": 60_000})})
    async with Client(gateway_params(cfg)) as client:
        a = _text(await client.call_tool("time__get_current_time", {"timezone": "UTC"}))
        await asyncio.sleep(1.1)
        assert _text(await client.call_tool("time__get_current_time", {"timezone": "UTC"})) == a
        await client.call_tool("mcpopt__cache_purge", {})
        assert _text(await client.call_tool("time__get_current_time", {"timezone": "UTC"})) != a


# ---- Redis L2 and its failure -----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_url(tmp_path: Path) -> Any:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (scripts/setup installs it)")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=5)


async def test_redis_l2_shares_results_and_invalidations(redis_url: str) -> None:
    a = ResultCache(CacheSettings(redis_url=redis_url))
    b = ResultCache(CacheSettings(redis_url=redis_url))
    await a.start()
    await b.start()
    try:
        key = cache_key("srv", "read", {"q": 1})
        assert await a.put(key, a.capture(key), _result("from-a"), 60_000)
        assert (await b.get(key)) == _result("from-a")  # b never saw it: L2 served it
        await a.invalidate("srv")  # b must stop serving it at once, before any pub/sub message lands
        assert (await b.get(key)) is None
        assert (await a.get(key)) is None
        # and a result stored after the write is shared again
        assert await b.put(key, b.capture(key), _result("from-b"), 60_000)
        assert (await a.get(key)) == _result("from-b")
    finally:
        await a.close()
        await b.close()


async def test_redis_down_degrades_to_l1(caplog: pytest.LogCaptureFixture) -> None:
    cache = ResultCache(CacheSettings(redis_url=f"redis://127.0.0.1:{_free_port()}/0"))
    await cache.start()
    key = cache_key("srv", "read", {})
    assert await cache.put(key, cache.capture(key), _result("l1"), 10_000)
    assert (await cache.get(key)) == _result("l1")
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1
    await cache.close()
