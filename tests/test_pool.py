"""Replicas with real servers: calls spread over 3 copies of mcp-server-time behind the gateway,
failover when one is SIGKILLed mid-load, a non-idempotent call never repeated (counted on the
server side), the concurrency limit's rejection, lazy start and idle stop/restart."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from mcp import Client, MCPError

from conftest import poll, text_of, time_entry
from mcpopt.config import load_config
from mcpopt.errors import GATEWAY_REJECTED, UPSTREAM_CLOSED
from mcpopt.gateway.assembly import build_gateway
from mcpopt.pipeline import ToolCall
from mcpopt.policy import ToolInfo
from mcpopt.upstream.pool import ServerPool

pytestmark = pytest.mark.anyio

COUNTER = str(Path(__file__).resolve().parent / "fixtures" / "counter_server.py")
FAST_RESTART = {"restart": {"initial_backoff_ms": 200, "max_backoff_ms": 1000}}


def counter_entry(counter_file: Path, tag: str, **extra: Any) -> dict[str, Any]:
    """The counter fixture; `tag` is an extra argv word to find its processes."""
    return {"command": sys.executable, "args": [COUNTER, tag], "env": {"COUNTER_FILE": str(counter_file)}, **extra}


def own_children(word: str) -> list[psutil.Process]:
    """This test process's live child processes whose command line contains `word`."""
    out = []
    for proc in psutil.Process().children(recursive=False):
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and any(word in part for part in proc.cmdline()):
                out.append(proc)
    return out


def counted(path: Path, tool: str) -> int:
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.split(" ")[0] == tool)


@contextlib.asynccontextmanager
async def gateway(servers: dict[str, Any]) -> Any:
    gw = build_gateway(load_config(data={"mcpServers": servers, "gateway": FAST_RESTART}))
    async with gw.running(), Client(gw.server, mode="legacy") as client:
        yield gw, client


# ---- 3 replicas of mcp-server-time --------------------------------------------------------
@pytest.fixture(scope="module")
async def time3() -> Any:
    async with gateway({"time": time_entry(replicas=3)}) as pair:
        yield pair


async def test_calls_spread_over_replicas(time3: Any) -> None:
    gw, client = time3
    pool = gw.upstreams["time"]
    assert isinstance(pool, ServerPool) and pool.state == "ready"
    assert len(own_children("mcp-server-time")) == 3
    before = [row["calls"] for row in pool.stats()]
    for _ in range(30):
        result = await client.call_tool("time__get_current_time", {"timezone": "UTC"})
        assert not result.is_error
    spread = [row["calls"] - b for row, b in zip(pool.stats(), before, strict=True)]
    assert sum(spread) == 30
    assert all(n >= 5 for n in spread), spread  # least_inflight rotates ties: ~10 each
    assert all(row["ewma_ms"] is not None and row["breaker"] == "closed" for row in pool.stats())


async def test_sigkill_one_replica_read_only_calls_keep_succeeding(time3: Any) -> None:
    gw, client = time3
    pool = gw.upstreams["time"]
    catalog_before = gw.catalog
    victims = own_children("mcp-server-time")
    assert len(victims) == 3
    results: list[Any] = []
    errors: list[BaseException] = []

    async def worker(zone: str) -> None:
        # one zone per worker: concurrent identical read-only calls would be coalesced into one
        for _ in range(25):
            try:
                results.append(await client.call_tool("time__get_current_time", {"timezone": zone}))
            except MCPError as exc:  # would mean a read-only call was not failed over
                errors.append(exc)

    before = sum(row["calls"] for row in pool.stats())
    async with anyio.create_task_group() as tg:
        for zone in ("UTC", "Europe/Paris", "Asia/Tokyo", "America/New_York"):
            tg.start_soon(worker, zone)
        while sum(row["calls"] for row in pool.stats()) < before + 20:
            await anyio.sleep(0.005)
        os.kill(victims[0].pid, signal.SIGKILL)
    assert not errors, errors
    assert len(results) == 100 and not any(r.is_error for r in results)
    assert pool.state == "ready"
    # A replica restarting does not make the gateway's tool list flap.
    assert gw.catalog is catalog_before

    async def all_back() -> bool:
        return all(row["state"] == "ready" for row in pool.stats())

    assert await poll(all_back), pool.stats()
    assert pool.restarts >= 1
    assert gw.catalog is catalog_before


# ---- the counter fixture: never repeat what may have run ----------------------------------
@pytest.fixture(scope="module")
def counter_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("counter") / "count.log"


@pytest.fixture(scope="module")
async def counter3(counter_file: Path) -> Any:
    entry = counter_entry(
        counter_file,
        "counter3",
        replicas=3,
        max_concurrency=2,
        max_queue=1,
        retry={"attempts": 3, "initial_backoff_ms": 10, "max_backoff_ms": 100},
    )
    async with gateway({"counter": entry}) as pair:
        yield pair


async def test_concurrency_limit_rejects_when_queue_full(counter3: Any) -> None:
    gw, client = counter3
    outcomes: list[Any] = []

    async def one(n: int) -> None:
        try:  # distinct arguments: identical read-only calls would be coalesced into one
            outcomes.append(await client.call_tool("counter__sleep", {"seconds": 0.5 + n / 1000}))
        except MCPError as exc:
            outcomes.append(exc)

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for n in range(4):  # 2 run, 1 waits, 1 is rejected
            tg.start_soon(one, n)
    rejected = [o for o in outcomes if isinstance(o, MCPError)]
    assert len(rejected) == 1, outcomes
    err = rejected[0]
    assert err.error.code == GATEWAY_REJECTED
    msg = str(err)
    assert "'counter'" in msg and "max_concurrency 2" in msg and "max_queue 1" in msg, msg
    assert sum(1 for o in outcomes if not isinstance(o, MCPError) and text_of(o) == "slept") == 3
    assert time.monotonic() - started >= 0.9  # the queued call waited for a slot


async def test_non_idempotent_call_to_a_dying_replica_is_not_repeated(counter3: Any, counter_file: Path) -> None:
    gw, client = counter3
    assert text_of(await client.call_tool("counter__increment", {})) == "1"
    with pytest.raises(MCPError) as info:
        await client.call_tool("counter__increment", {"crash": True})
    err = info.value
    assert err.error.code == UPSTREAM_CLOSED
    msg = str(err)
    assert "MCP server 'counter' (replica" in msg and "of 3)" in msg and "closed the connection" in msg, msg
    await anyio.sleep(0.3)  # nothing is re-sent later either
    assert counted(counter_file, "increment") == 2  # one plain call + the crashing one, exactly once
    # The other replicas keep serving.
    assert text_of(await client.call_tool("counter__increment", {})) == "3"


async def test_read_only_call_to_a_dying_replica_is_retried(counter3: Any, counter_file: Path) -> None:
    gw, client = counter3
    pool = gw.upstreams["counter"]

    async def all_ready() -> bool:
        return all(row["state"] == "ready" for row in pool.stats())

    assert await poll(all_ready), pool.stats()
    with pytest.raises(MCPError) as info:
        await client.call_tool("counter__read_then_crash", {})
    # read-only: repeated on other replicas (each of which also dies), up to retry.attempts
    assert counted(counter_file, "read_then_crash") == 3
    assert info.value.error.code == UPSTREAM_CLOSED


# ---- lazy start, idle stop ----------------------------------------------------------------
class Events:
    def __init__(self) -> None:
        self.catalog: list[set[str]] = []

    async def catalog_changed(self, server: str, kinds: set[str]) -> None:
        self.catalog.append(set(kinds))

    async def resource_updated(self, server: str, uri: str) -> None: ...

    async def log_message(self, server: str, params: Any) -> None: ...

    async def client_request(self, server: str, request: Any) -> Any: ...


def pid_call() -> ToolCall:
    return ToolCall("lazy", "pid", "lazy__pid", {"name": "pid", "arguments": {}}, info=ToolInfo(read_only=True))


async def test_lazy_server_starts_on_first_call_and_idle_server_stops_and_restarts(tmp_path: Path) -> None:
    entry = counter_entry(tmp_path / "count.log", "lazytest", lazy=True, idle_timeout_ms=700)
    cfg = load_config(data={"mcpServers": {"lazy": entry}}).mcpServers["lazy"]
    events = Events()
    pool = ServerPool("lazy", cfg, events, restart_initial_s=0.2)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run)
        assert pool.lazy
        assert not await pool.wait_ready(5)  # a lazy pool does not start with the gateway
        await anyio.sleep(0.3)
        assert pool.state == "idle" and not own_children("lazytest")

        first = await pool.call(pid_call())  # starts it
        pid1 = int(first["content"][0]["text"])
        assert pool.state == "ready" and [p.pid for p in own_children("lazytest")] == [pid1]
        assert events.catalog and {t.name for t in pool.catalog.tools} >= {"pid", "increment"}

        async def idle() -> bool:
            return pool.state == "idle" and not own_children("lazytest")

        assert await poll(idle, interval=0.1), pool.stats()
        assert {t.name for t in pool.catalog.tools} >= {"pid", "increment"}  # the last catalog is kept

        second = await pool.call(pid_call())  # restarts it
        assert int(second["content"][0]["text"]) != pid1
        assert pool.state == "ready"
        await pool.stop()
    assert pool.state == "stopped"
