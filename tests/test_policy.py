"""Policy decisions, rate limits (memory and a real Redis), and isolated upstream sessions.

Policy: principals matched by sub, group, scope, API key, client id; grants merged; admin tools,
code mode, tool scopes; `LOCAL` gets everything. Rate limits: per principal / tool / global with
the `limits` library, the retry hint, Redis shared between two limiters (two gateway replicas),
Redis down -> in-process counters. Isolation: one upstream session per owner, bounded, reaped
when idle, with a real MCP server (mcp-server-time) behind each.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import free_port, time_entry, wait_dead
from mcpopt.auth.policy import Policy, PolicyDenied
from mcpopt.auth.principal import LOCAL, Principal
from mcpopt.auth.ratelimit import RateLimited, RateLimiter, shown_uri
from mcpopt.config import LimitsSettings, PolicySettings, ServerConfig, load_config
from mcpopt.errors import GATEWAY_REJECTED, POLICY_DENIED, RATE_LIMITED, ConfigError, GatewayError
from mcpopt.pipeline import Pipeline, ToolCall
from mcpopt.pipeline.access import PolicyFilter, RateLimitFilter
from mcpopt.upstream.isolation import IsolatedSessions, single_replica
from mcpopt.upstream.pool import ServerPool

pytestmark = pytest.mark.anyio

ALICE = Principal("alice", "jwt", issuer="https://idp", groups=frozenset({"ops"}), scopes=frozenset({"mcp:tools"}))
BOB = Principal("bob", "jwt", issuer="https://idp", scopes=frozenset({"mcp:tools"}))
CI = Principal("apikey:ci", "api_key", api_key="ci", scopes=frozenset({"mcp:tools", "deploy"}))
NOBODY = Principal("zed", "jwt", issuer="https://idp")


def policy(**settings: Any) -> Policy:
    return Policy(PolicySettings.model_validate(settings), "mcpopt__")


# ---- policy ----------------------------------------------------------------------------------
def test_rules_grant_servers_and_tools_by_principal() -> None:
    p = policy(
        rules=[
            {"name": "ops", "match": {"groups": ["ops"]}, "admin": True},
            {
                "name": "readers",
                "match": {"scopes": ["mcp:tools"]},
                "servers": ["time", "git"],
                "deny_tools": ["git__git_commit"],
            },
            {"name": "ci", "match": {"api_keys": ["c*"]}, "servers": ["git"], "tools": ["git__git_status"]},
        ],
        default={"servers": []},
    )
    assert p.check_tool(ALICE, "everything__echo", "everything").allowed  # ops: every server
    assert p.check_tool(ALICE, "mcpopt__cache_purge", None).allowed
    bob_echo = p.check_tool(BOB, "everything__echo", "everything")
    assert not bob_echo.allowed and "readers" in bob_echo.reason and "everything__echo" in bob_echo.reason
    assert p.check_tool(BOB, "git__git_log", "git").allowed
    assert not p.check_tool(BOB, "git__git_commit", "git").allowed  # denied by its rule
    assert not p.check_tool(BOB, "mcpopt__cache_purge", None).allowed
    assert p.check_tool(BOB, "mcpopt__batch", None).allowed  # non-admin gateway tools
    # The API key matches "readers" (its scope) and "ci": the union of both.
    assert p.check_tool(CI, "git__git_status", "git").allowed and p.check_tool(CI, "time__x", "time").allowed
    assert p.grant(CI).rules[0][0] == "readers" and [r for r, _ in p.grant(CI).rules] == ["readers", "ci"]
    # Nobody matches no rule: the default (here: nothing).
    assert not p.check_tool(NOBODY, "time__get_current_time", "time").allowed
    assert not p.allows_server(NOBODY, "time") and p.allows_server(BOB, "time")


def test_default_rule_out_of_the_box_and_local() -> None:
    p = policy()
    assert p.check_tool(NOBODY, "anything__at_all", "anything").allowed
    assert not p.check_tool(NOBODY, "mcpopt__run_performance_benchmark", None).allowed
    assert not p.check_tool(NOBODY, "mcpopt__apply_rules", None).allowed  # "*rule*"
    for who in (LOCAL, None):
        assert p.check_tool(who, "mcpopt__cache_purge", None).allowed
        assert p.check_tool(who, "mcpopt__execute_code", None, "full").allowed  # today's local behaviour


def test_code_mode_and_exposure() -> None:
    p = policy(
        rules=[
            {"match": {"subjects": ["alice"]}, "exposure": "code"},
            {"match": {"subjects": ["bob"]}, "code_mode": True, "exposure": "search"},
        ]
    )
    assert p.grant(ALICE).exposure == "code" and p.check_tool(ALICE, "mcpopt__execute_code", None).allowed
    assert p.grant(BOB).exposure == "search" and p.check_tool(BOB, "mcpopt__execute_code", None).allowed
    refused = p.check_tool(NOBODY, "mcpopt__execute_code", None, "full")
    assert not refused.allowed and "code mode" in refused.reason
    assert p.check_tool(NOBODY, "mcpopt__execute_code", None, "code").allowed  # its connection is in code mode


def test_tool_scopes_refuse_with_the_scopes_to_ask_for() -> None:
    p = policy(tool_scopes={"git__git_commit": ["deploy"], "git__*": ["mcp:tools"]})
    refused = p.check_tool(BOB, "git__git_commit", "git")
    assert not refused.allowed and refused.scopes == ("deploy", "mcp:tools")
    error = PolicyDenied(refused, server="git").to_error_data()
    assert error.code == POLICY_DENIED and error.data["requiredScopes"] == ["deploy", "mcp:tools"]
    assert p.check_tool(CI, "git__git_commit", "git").allowed


async def test_policy_filter_refuses_before_the_upstream() -> None:
    reached: list[str] = []

    async def terminal(call: ToolCall) -> dict[str, Any]:
        reached.append(call.name)
        return {"content": []}

    pipe = Pipeline(terminal, [PolicyFilter(policy(rules=[{"match": {"subjects": ["bob"]}, "servers": ["time"]}]))])
    ok = ToolCall("time", "t", "time__t", {"name": "t"}, principal=BOB)
    await pipe(ok)
    assert ok.attrs["decision"] == "allow" and reached == ["time__t"]
    no = ToolCall("git", "g", "git__g", {"name": "g"}, principal=BOB)
    with pytest.raises(PolicyDenied):
        await pipe(no)
    assert no.attrs["decision"] == "deny" and reached == ["time__t"]


def test_policy_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"gateway.policy.rules\[0\].rate_limits"):
        load_config(data={"gateway": {"policy": {"rules": [{"rate_limits": ["lots"]}]}}})
    with pytest.raises(ConfigError, match=r"gateway.policy.rules\[0\].match"):
        load_config(data={"gateway": {"policy": {"rules": [{"match": {"users": ["x"]}}]}}})


# ---- rate limits -----------------------------------------------------------------------------
async def test_limits_per_principal_tool_and_global_with_retry_hint() -> None:
    limiter = RateLimiter(
        LimitsSettings.model_validate(
            {"global": ["100/minute"], "per_tool": {"git__*": ["3/minute"]}, "per_principal": ["5/minute"]}
        )
    )
    for _ in range(5):
        await limiter.hit(ALICE, "time__t")
    with pytest.raises(RateLimited) as own:
        await limiter.hit(ALICE, "time__t")
    assert own.value.scope == "principal" and 1 <= own.value.retry_after_s <= 60
    assert "your limit (5 per 1 minute)" in str(own.value) and "retry in" in str(own.value)
    error = own.value.to_error_data()
    assert error.code == RATE_LIMITED and error.data["retryAfterSeconds"] == own.value.retry_after_s
    await limiter.hit(BOB, "time__t")  # another principal has its own budget
    for who in (BOB, CI, NOBODY):
        await limiter.hit(who, "git__git_log")
    with pytest.raises(RateLimited) as tool:
        await limiter.hit(LOCAL, "git__git_log")  # per tool: every caller together
    assert tool.value.scope == "tool" and "git__git_log" in str(tool.value)
    await limiter.hit(LOCAL, "git__git_status")  # each tool its own counter
    assert limiter.refused["principal"] == 1 and limiter.refused["tool"] == 1


async def test_a_rules_own_limits_replace_the_default_and_filter_marks_the_call() -> None:
    limiter = RateLimiter(LimitsSettings.model_validate({"per_principal": ["100/minute"]}))
    p = policy(rules=[{"match": {"subjects": ["bob"]}, "rate_limits": ["2/minute"]}])

    async def terminal(call: ToolCall) -> dict[str, Any]:
        return {"content": []}

    pipe = Pipeline(terminal, [PolicyFilter(p), RateLimitFilter(limiter, p)])
    for _ in range(2):
        await pipe(ToolCall("time", "t", "time__t", {"name": "t"}, principal=BOB))
    call = ToolCall("time", "t", "time__t", {"name": "t"}, principal=BOB)
    with pytest.raises(RateLimited) as limited:
        await pipe(call)
    assert limited.value.server == "time" and call.attrs["decision"] == "limit"
    assert call.attrs["policy_rule"] == "principal"
    for _ in range(5):
        await pipe(ToolCall("time", "t", "time__t", {"name": "t"}, principal=ALICE))  # the default 100/minute


@pytest.fixture
def redis_url(tmp_path: Path) -> Any:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (scripts/setup installs it)")
    port = free_port()
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


@pytest.mark.parametrize("strategy", ["moving-window", "sliding-window-counter", "fixed-window"])
async def test_redis_counters_are_shared_by_two_gateways(redis_url: str, strategy: str) -> None:
    settings = LimitsSettings.model_validate(
        {"storage": redis_url, "strategy": strategy, "per_principal": ["4/minute"]}
    )
    one, two = RateLimiter(settings), RateLimiter(settings)
    for limiter in (one, two, one, two):
        await limiter.hit(ALICE, "time__t")
    with pytest.raises(RateLimited):
        await two.hit(ALICE, "time__t")
    with pytest.raises(RateLimited):
        await one.hit(ALICE, "time__t")
    assert not one.stats()["fell_back"] and one.stats()["storage"] == redis_url
    assert shown_uri("redis://:hunter2@db:6379/0") == "redis://:***@db:6379/0"


async def test_redis_down_falls_back_to_local_counters(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RateLimiter(
        LimitsSettings.model_validate({"storage": f"redis://127.0.0.1:{free_port()}/0", "per_principal": ["2/minute"]})
    )
    await limiter.hit(ALICE, "time__t")  # no call fails for the outage
    await limiter.hit(ALICE, "time__t")
    with pytest.raises(RateLimited):
        await limiter.hit(ALICE, "time__t")
    assert limiter.stats()["fell_back"]
    assert sum("rate-limit storage" in r.message for r in caplog.records) == 1  # one warning


# ---- isolated upstream sessions ----------------------------------------------------------------
class Quiet:
    """A listener that ignores what the sessions say (the gateway's `OwnerListener` routes it)."""

    async def catalog_changed(self, server: str, kinds: set[str]) -> None: ...

    async def resource_updated(self, server: str, uri: str) -> None: ...

    async def log_message(self, server: str, params: Any) -> None: ...

    async def client_request(self, server: str, request: Any) -> Any:
        return None


def time_sessions(max_sessions: int, idle_ms: int = 60_000, clock: Any = time.monotonic) -> IsolatedSessions:
    cfg = ServerConfig.model_validate(
        {**time_entry(), "isolation": "principal", "isolation_max_sessions": max_sessions, "isolation_idle_ms": idle_ms}
    )
    return IsolatedSessions("time", cfg, lambda owner: ServerPool("time", single_replica(cfg), Quiet()), clock=clock)


def time_processes() -> list[psutil.Process]:
    """The mcp-server-time processes this test process started (one per open session)."""
    out = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and any("mcp-server-time" in a for a in proc.cmdline()):
                out.append(proc)
    return out


async def call_time(pool: ServerPool) -> str:
    result = await pool.request("tools/call", {"name": "get_current_time", "arguments": {"timezone": "UTC"}})
    return str(result["content"][0]["text"])


async def test_each_owner_gets_its_own_session_bounded_and_reaped() -> None:
    now = [0.0]
    sessions = time_sessions(2, idle_ms=1000, clock=lambda: now[0])
    others = {p.pid for p in time_processes()}  # other tests' servers (a session-wide gateway, ...)
    try:
        a = await sessions.get("alice")
        b = await sessions.get("bob")
        assert a is not b and await sessions.get("alice") is a
        assert "UTC" in await call_time(a) and "UTC" in await call_time(b)
        mine = [p for p in time_processes() if p.pid not in others]
        assert len(mine) == 2  # one server process per owner
        # A third owner: the least recently used idle one (bob: alice was used last) makes room.
        await sessions.get("alice")
        c = await sessions.get("carol")
        assert set(sessions.pools) == {"alice", "carol"} and sessions.evicted == 1
        assert b.state == "stopped"
        assert "UTC" in await call_time(c)
        # Idle past isolation_idle_ms (by the pools' own activity clock): reaped, processes gone.
        now[0] = time.monotonic() + 5
        # The background reaper may take some first; two reaps at once still close each session once.
        closed = await asyncio.gather(sessions.reap(), sessions.reap())
        assert sum(closed) <= 2 and not sessions.pools and sessions.reaped == 2, (closed, sessions.stats())
        assert a.state == "stopped" and c.state == "stopped"
        assert wait_dead(mine) == []  # alice's and bob's
        assert wait_dead([p for p in time_processes() if p.pid not in others]) == []  # carol's too
    finally:
        await sessions.aclose()


async def test_a_full_house_of_busy_sessions_rejects_the_next_owner() -> None:
    sessions = time_sessions(1)
    try:
        a = await sessions.get("alice")
        assert "UTC" in await call_time(a)
        a._active += 1  # noqa: SLF001 - a call in flight (as ServerPool._invoke counts one)
        try:
            with pytest.raises(GatewayError) as full:
                await sessions.get("bob")
            assert full.value.code == GATEWAY_REJECTED and "isolation_max_sessions 1" in str(full.value)
            assert sessions.rejected == 1
        finally:
            a._active -= 1  # noqa: SLF001
        assert await sessions.get("bob") is not a  # now alice is idle: she makes room
    finally:
        await sessions.aclose()


# ---- audit fields ----------------------------------------------------------------------------
def test_an_older_telemetry_file_gets_the_audit_columns(tmp_path: Path) -> None:
    import sqlite3

    from mcpopt.telemetry.record import FIELDS, CallRecord
    from mcpopt.telemetry.store import Store

    old = [f for f in FIELDS if f not in ("principal", "decision", "policy_rule")]
    path = tmp_path / "telemetry.db"
    db = sqlite3.connect(path)
    db.execute(f"CREATE TABLE calls (id INTEGER PRIMARY KEY, {', '.join(old)})")
    db.execute("INSERT INTO calls (ts, server, tool, outcome, total_ms) VALUES (1, 's', 't', 'ok', 1)")
    db.commit()
    db.close()
    store = Store(path)
    store.insert([CallRecord(2.0, "s", "t", "s__t", "denied", 0.1, principal="h1", decision="deny", policy_rule="r")])
    rows = list(store.calls())
    store.close()
    assert [r["outcome"] for r in rows] == ["ok", "denied"]
    assert rows[1]["principal"] == "h1" and rows[1]["decision"] == "deny" and rows[0]["decision"] is None


def test_the_shared_gateway_example_loads() -> None:
    from conftest import ROOT

    cfg = load_config(ROOT / "examples" / "shared-gateway.yaml")
    g = cfg.gateway
    assert g.auth.enabled and g.auth.resource == "https://mcp.example.com/mcp"
    assert [r.name for r in g.policy.rules] == ["platform-team", "engineers", "ci"] and g.limits.any
    assert cfg.mcpServers["time"].isolation == "shared" and cfg.mcpServers["everything"].isolation == "auto"


async def test_session_isolation_without_auth_keeps_each_clients_roots(tmp_path: Path) -> None:
    """`isolation: session` on an unauthenticated HTTP front: each client session its own upstream
    session (server-everything caches roots per session)."""
    import mcp_types as types
    from mcp import Client

    from conftest import everything_entry, popen_gateway, text_of, wait_http, write_config

    cfg = write_config(tmp_path / "s.yaml", {"everything": {**everything_entry(), "isolation": "session"}})
    port = free_port()

    def roots(uri: str) -> Any:
        async def callback(_context: Any) -> types.ListRootsResult:
            return types.ListRootsResult(roots=[types.Root(uri=uri, name=uri.rsplit("/", 1)[1])])

        return callback

    with popen_gateway(cfg, "-t", "http", "--port", str(port)) as proc:
        wait_http(port, proc, timeout=60)
        url = f"http://127.0.0.1:{port}/mcp"
        one = Client(url, mode="legacy", list_roots_callback=roots("file:///srv/one"))
        two = Client(url, mode="legacy", list_roots_callback=roots("file:///srv/two"))
        async with one as a, two as b:
            first = text_of(await a.call_tool("everything__get-roots-list", {}))
            second = text_of(await b.call_tool("everything__get-roots-list", {}))
    assert "file:///srv/one" in first and "file:///srv/two" not in first, first
    assert "file:///srv/two" in second and "file:///srv/one" not in second, second


def test_a_principal_survives_a_journal_round_trip() -> None:
    """What the workflow journal stores (`principal_json`) comes back as the same principal."""
    import json

    from mcpopt.gateway.assembly import build_gateway
    from mcpopt.workflows.service import principal_json

    gw = build_gateway(load_config(data={"mcpServers": {}}))
    alice = Principal(
        "alice", "jwt", issuer="https://idp", groups=frozenset({"ops"}), scopes=frozenset({"a", "b"}), claims={"x": 1}
    )
    back = gw.restore_principal(json.loads(json.dumps(principal_json(alice))))
    assert back == alice and back.key == alice.key and back.claims == {"x": 1}
    with pytest.raises(ValueError):
        gw.restore_principal({"nobody": 1})
