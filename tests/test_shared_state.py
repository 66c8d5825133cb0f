"""Shared state across two real gateway replicas (issue 12, item 2): `mcpopt serve -t http` twice, one
real redis-server on an ephemeral port, real upstream MCP servers over Streamable HTTP
(`fixtures/shared_upstream.py`, which announces changes on the calling session only, so replica B
learns of what happened on A only through Redis).

Checked, in order (one pair of replicas for the module):
- a write through A invalidates a read B had cached, at once (the next read on B is fresh);
- a rate limit of N per minute for one principal holds across A and B (N allowed, within +1);
- a hung upstream opens A's circuit breaker and B adopts it (B refuses without trying), and the
  close after recovery reaches B too;
- a rule applied on A (its own rule file) takes effect on B, and its rollback on A is off on B;
- an upstream's tools/list_changed and resources/updated seen by A reach a client connected to B;
- Redis down: both replicas serve every call (local state, one warning each), and when Redis is
  back they share again (a write on A invalidates B's cached read once more).

Verdicts wait on conditions (generous timeouts), never on timings; the propagation delays are
read from /healthz (`shared.lag_ms`) and printed, for the README's figures.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from conftest import ROOT, free_port, popen_gateway, text_of, wait_http, write_config
from mcpopt.pipeline.rules import Action, Condition, Rule, RuleStore

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
UPSTREAM = str(ROOT / "tests" / "fixtures" / "shared_upstream.py")
WAIT_S = 30.0


# ---- real parts ----------------------------------------------------------------------------------
class RedisServer:
    """A throwaway redis-server on a fixed ephemeral port that can be stopped and started again."""

    def __init__(self, base: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (scripts/setup installs it)")
        self.exe = exe
        self.base = base
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--save", "", "--appendonly", "no", "--dir", str(self.base)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listened on {port} within {timeout} s")


@contextlib.contextmanager
def upstream() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, UPSTREAM, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_port(port, proc)
        yield f"http://127.0.0.1:{port}/mcp", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(5)
        if proc.stderr:
            proc.stderr.close()


class Replicas:
    def __init__(self, base: Path, redis: RedisServer, up: str, dead: str, dead_proc: subprocess.Popen[bytes]):
        self.base, self.redis, self.up, self.dead, self.dead_proc = base, redis, up, dead, dead_proc
        self.ports: dict[str, int] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}/mcp"

    def rules_path(self, name: str) -> Path:
        return self.base / name / "rules.json"

    def config(self, name: str) -> Path:
        (self.base / name).mkdir(exist_ok=True)
        servers = {
            "up": {"url": self.up, "protocol": "legacy", "cache": {"tools": {"read": {"ttl_ms": 600_000}}}},
            "dead": {
                "url": self.dead,
                "protocol": "legacy",
                "timeout_ms": 1500,
                "breaker": {"failure_threshold": 2, "open_ms": 4000},
                "retry": {"attempts": 1},
            },
        }
        gateway = {
            "shared": {"redis_url": self.redis.url, "replica": name},
            "limits": {"per_principal_tool": {"up__pid": ["5/minute"]}},
            "optimization": {"rules_path": str(self.rules_path(name))},
            "telemetry": {"data_dir": str(self.base / name)},
            "log_level": "warning",
        }
        return write_config(self.base / name / "gateway.yaml", servers, gateway)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    base = tmp_path_factory.mktemp("shared")
    redis = RedisServer(base)
    redis.start()
    try:
        with upstream() as (up, _), upstream() as (dead, dead_proc), contextlib.ExitStack() as stack:
            r = Replicas(base, redis, up, dead, dead_proc)
            for name in ("A", "B"):
                port = free_port()
                proc = stack.enter_context(popen_gateway(r.config(name), "-t", "http", "--port", str(port)))
                wait_http(port, proc)
                r.ports[name], r.procs[name] = port, proc
            yield r
    finally:
        redis.stop()


class Inbox:
    """The notifications a client received."""

    def __init__(self) -> None:
        self.notes: list[Any] = []

    async def __call__(self, message: Any) -> None:
        if isinstance(message, types.ServerNotification):
            self.notes.append(message.root if hasattr(message, "root") else message)
        elif not isinstance(message, Exception):
            self.notes.append(message)


@contextlib.asynccontextmanager
async def client(url: str, inbox: Inbox | None = None) -> Any:
    async with (
        httpx2.AsyncClient(timeout=30.0) as http,
        Client(
            streamable_http_client(url, http_client=http),
            mode="legacy",
            message_handler=inbox,
            read_timeout_seconds=60,
        ) as c,
    ):
        yield c


async def call(c: Any, tool: str, args: dict[str, Any] | None = None) -> str:
    result = await c.call_tool(tool, args or {})
    return text_of(result)


async def healthz(r: Replicas, name: str) -> dict[str, Any]:
    async with httpx2.AsyncClient(timeout=10.0) as http:
        resp = await http.get(f"http://127.0.0.1:{r.ports[name]}/healthz")
        return dict(resp.json())


async def until(check: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.1)


def breakers(health: dict[str, Any], server: str) -> list[str]:
    return next(row["breakers"] for row in health["servers"] if row["server"] == server)


# ---- the checks ----------------------------------------------------------------------------------
async def test_write_on_a_invalidates_cached_read_on_b(replicas: Replicas) -> None:
    async with client(replicas.url("A")) as a, client(replicas.url("B")) as b:
        first = await call(b, "up__read", {"key": "k"})
        assert await call(b, "up__read", {"key": "k"}) == first  # B serves it from its cache
        assert await call(a, "up__read", {"key": "k"}) == first  # ... and so does A (Redis L2)
        assert await call(a, "up__write", {"key": "k", "value": "v2"}) == "ok"
        fresh = await call(b, "up__read", {"key": "k"})  # the very next read on B, no waiting
        assert fresh.startswith("k=v2 ") and fresh != first


async def test_rate_limit_holds_across_replicas(replicas: Replicas) -> None:
    allowed, refused = 0, []
    async with client(replicas.url("A")) as a, client(replicas.url("B")) as b:
        for i in range(14):
            try:
                await call(a if i % 2 else b, "up__pid")
                allowed += 1
            except MCPError as exc:
                refused.append(str(exc))
    assert 5 <= allowed <= 6, (allowed, refused)  # 5/minute for the one principal, over both replicas
    assert all("rate limited" in m for m in refused)


async def test_breaker_opened_on_a_is_adopted_by_b(replicas: Replicas) -> None:
    async with client(replicas.url("A")) as a, client(replicas.url("B")) as b:
        assert await call(a, "dead__pid")  # both replicas' sessions to it are up
        assert await call(b, "dead__pid")
        os.kill(replicas.dead_proc.pid, signal.SIGSTOP)  # hung: calls time out
        try:
            for _ in range(2):
                with pytest.raises(MCPError):
                    await call(a, "dead__pid")
            assert breakers(await healthz(replicas, "A"), "dead") == ["open"]

            async def b_open() -> bool:
                return breakers(await healthz(replicas, "B"), "dead") == ["open"]

            await until(b_open, "B to adopt A's open breaker")
            with pytest.raises(MCPError) as refused:
                await call(b, "dead__pid")
            assert "circuit breaker" in str(refused.value)  # B did not try the hung server itself
        finally:
            os.kill(replicas.dead_proc.pid, signal.SIGCONT)

        async def a_recovers() -> bool:
            with contextlib.suppress(MCPError):
                return bool(await call(a, "dead__pid"))
            return False

        await until(a_recovers, "A's half-open trial to close the breaker")

        async def b_closed() -> bool:
            return breakers(await healthz(replicas, "B"), "dead") == ["closed"]

        await until(b_closed, "B to adopt A's closed breaker")
    lag = (await healthz(replicas, "B"))["shared"]["lag_ms"]
    print(f"\nbreaker propagation A->B (ms): {lag.get('breaker')}")


async def test_replica_started_while_a_breaker_is_open_adopts_it(replicas: Replicas, tmp_path: Path) -> None:
    """A replica that starts (or reconnects) while another holds a breaker open takes it from Redis."""
    from mcpopt.config import load_config
    from mcpopt.gateway.assembly import build_gateway

    def gateway(name: str) -> Any:
        cfg = load_config(
            data={
                "mcpServers": {"h": {"url": f"http://127.0.0.1:{free_port()}/mcp", "breaker": {"open_ms": 600_000}}},
                "gateway": {
                    "shared": {"redis_url": replicas.redis.url, "replica": name},
                    "telemetry": {"enabled": False},
                    "optimization": {"rules_path": str(tmp_path / f"{name}-rules.json")},
                },
            }
        )
        cfg.mcpServers["h"].url = "http://127.0.0.1:1/mcp"  # the same URL on both replicas
        return build_gateway(cfg)

    first, late = gateway("X"), gateway("Y")
    with anyio.fail_after(WAIT_S * 2):  # in process: a hang here must fail, not stall the run
        await first.shared.start()
        await _late_adopts(first, late)
        await first.shared.stop()


async def _late_adopts(first: Any, late: Any) -> None:
    try:
        breaker = first.upstreams["h"].replicas[0].breaker
        for _ in range(breaker.threshold):
            breaker.record_failure()  # what failed calls to it do
        assert breaker.state == "open"

        async def held() -> bool:
            return bool(await first.shared.bus.redis.keys("mcpopt:breaker:h:*"))

        await until(held, "the open breaker to be kept in Redis")
        await late.shared.start()
        try:
            assert late.upstreams["h"].replicas[0].breaker.state == "open"
            assert late.upstreams["h"].replicas[0].breaker.retry_in_s() > 500
        finally:
            await late.shared.stop()
    except BaseException:
        await first.shared.stop()
        raise


async def test_rule_applied_and_rolled_back_on_a_is_on_and_off_on_b(replicas: Replicas) -> None:
    def hints(result: Any) -> list[str]:
        meta = result.meta or {}
        return list(meta.get("mcpopt/hints") or [])

    async with client(replicas.url("B")) as b:
        assert hints(await b.call_tool("up__read", {"key": "rules"})) == []
        store = RuleStore(replicas.rules_path("A"))  # what the optimizer or `mcpopt rules` does on A
        store.add(
            Rule(
                id="shared-hint",
                condition=Condition(server="up", tool="read"),
                action=Action(type="batch_hint", message="sent together"),
            )
        )

        async def on_b() -> bool:
            return hints(await b.call_tool("up__read", {"key": "rules"})) == ["sent together"]

        await until(on_b, "the rule added on A to apply on B")
        RuleStore(replicas.rules_path("A")).rollback("shared-hint", reason="rolled back on A")

        async def off_b() -> bool:
            return hints(await b.call_tool("up__read", {"key": "rules"})) == []

        await until(off_b, "the rollback on A to take effect on B")
    b_file = RuleStore(replicas.rules_path("B"))
    assert b_file.version == RuleStore(replicas.rules_path("A")).version
    assert not b_file.get("shared-hint").enabled  # B's own file follows (its CLI shows the truth)
    lag = (await healthz(replicas, "B"))["shared"]["lag_ms"]
    print(f"\nrules propagation A->B (ms): {lag.get('rules')}")


async def test_notifications_seen_on_a_reach_clients_of_b(replicas: Replicas) -> None:
    inbox = Inbox()
    async with client(replicas.url("A")) as a, client(replicas.url("B"), inbox) as b:
        await b.subscribe_resource("up+shared://doc")
        assert "up__fresh" not in {t.name for t in (await b.list_tools()).tools}
        assert await call(a, "up__add_tool", {"name": "fresh"}) == "added"

        async def listed() -> bool:
            got = any(isinstance(n, types.ToolListChangedNotification) for n in inbox.notes)
            return got and "up__fresh" in {t.name for t in (await b.list_tools()).tools}

        await until(listed, "tools/list_changed from A's upstream to reach B's client")
        assert await call(b, "up__fresh") == "I am fresh"

        assert await call(a, "up__touch", {"uri": "shared://doc"}) == "touched"

        async def updated() -> bool:
            return any(
                isinstance(n, types.ResourceUpdatedNotification) and str(n.params.uri) == "up+shared://doc"
                for n in inbox.notes
            )

        await until(updated, "resources/updated from A's upstream to reach B's client")
        n_updates = sum(isinstance(n, types.ResourceUpdatedNotification) for n in inbox.notes)
        assert n_updates == 1
    lag = (await healthz(replicas, "B"))["shared"]["lag_ms"]
    print(f"\nnotification propagation A->B (ms): {lag}")


def test_round_trips_per_call(replicas: Replicas) -> None:
    """What `mcpopt bench shared` reports, as counted behaviour (not timings): a cache hit with the
    Redis L2 costs one round trip (the generation check), a miss + store two, one invalidation two
    (INCR + PUBLISH), a rate-limit check one per limit; local state costs none."""
    from mcpopt.bench.shared import bench_shared

    rows = {r["operation"]: r for r in bench_shared(calls=30, warmup=5, redis_url=replicas.redis.url)["rows"]}
    trips = {op: r["round_trips"] for op, r in rows.items()}
    assert trips["cache hit (memory)"] == 0 and trips["cache hit (redis)"] == 1
    assert trips["cache miss + store (redis)"] == 2
    assert trips["write invalidation, once (redis)"] == 2
    assert trips["rate limit, 1 limit, moving-window (redis)"] == 1
    assert trips["rate limit, 1 limit, sliding-window-counter (redis)"] == 1


async def test_redis_down_degrades_and_recovers(replicas: Replicas) -> None:
    replicas.redis.stop()
    try:
        async with client(replicas.url("A")) as a, client(replicas.url("B")) as b:
            for c in (a, b, a, b):
                assert (await call(c, "up__read", {"key": "down"})).startswith("down=")
                assert await call(c, "up__write", {"key": "down", "value": "x"}) == "ok"
            assert await call(a, "up__pid")  # local counters now: the shared budget is gone
            assert await call(b, "up__pid")
    finally:
        replicas.redis.start()

    async def both_back() -> bool:
        rows = [await healthz(replicas, n) for n in ("A", "B")]
        return all(h["shared"]["bus"]["connected"] for h in rows)

    await until(both_back, "both replicas to resubscribe once Redis is back")
    async with client(replicas.url("A")) as a, client(replicas.url("B")) as b:

        async def shared_again() -> bool:
            # Redis came back empty: the first reads refill it; then a write on A must reach B again.
            first = await call(b, "up__read", {"key": "again"})
            if await call(b, "up__read", {"key": "again"}) != first:
                return False
            await call(a, "up__write", {"key": "again", "value": first[-6:]})
            return (await call(b, "up__read", {"key": "again"})) != first

        await until(shared_again, "cache invalidations to be shared again")
    for name in ("A", "B"):
        proc = replicas.procs[name]
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        assert proc.stderr is not None
        log = proc.stderr.read().decode(errors="replace")
        warnings = [line for line in log.splitlines() if "unavailable" in line and "Redis" in line]
        assert len(warnings) == 1, (name, warnings)  # ONE warning per replica for the outage
        assert "Traceback" not in log, log[-3000:]
        # Each record names the replica that served it (item 3): one store may hold several replicas'.
        db = sqlite3.connect(replicas.base / name / "telemetry.db")
        replicas_seen = {row[0] for row in db.execute("SELECT DISTINCT gateway_replica FROM calls")}
        db.close()
        assert replicas_seen == {name}
