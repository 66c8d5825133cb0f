"""Unit tests of replica routing: strategies, sticky sessions, the circuit breaker (fake clock),
adaptive timeouts, and the retry policy (which errors and tools are retried, and where)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError

from mcpopt.config import AdaptiveTimeoutConfig, BreakerConfig, load_config
from mcpopt.errors import (
    GATEWAY_REJECTED,
    UPSTREAM_CLOSED,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
    GatewayError,
    UpstreamClosed,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mcpopt.pipeline import ToolCall
from mcpopt.policy import UNKNOWN, ToolInfo
from mcpopt.upstream.pool import ServerPool
from mcpopt.upstream.routing import (
    EWMA_ALPHA,
    SAFE_METHODS,
    AdaptiveTimeouts,
    CircuitBreaker,
    LatencyWindow,
    NoReplicaAvailable,
    Replica,
    Router,
    backoff_s,
    may_retry,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def replicas(n: int, clock: Clock | None = None, **breaker: Any) -> list[Replica]:
    cfg = BreakerConfig(**breaker) if breaker else None
    return [Replica(i, SimpleNamespace(state="ready"), CircuitBreaker(cfg, clock=clock or Clock())) for i in range(n)]


def picks(router: Router, reps: list[Replica], n: int, **kw: Any) -> list[int]:
    out = []
    for _ in range(n):
        r = router.pick(reps, **kw)
        assert r is not None
        out.append(r.index)
    return out


# ---- strategies ---------------------------------------------------------------------------
def test_round_robin_cycles_over_ready_replicas() -> None:
    reps = replicas(3)
    got = picks(Router("round_robin"), reps, 9)
    assert Counter(got) == {0: 3, 1: 3, 2: 3}
    assert len(set(got[:3])) == 3
    reps[1].target.state = "down"
    got = picks(Router("round_robin"), reps, 10)
    assert set(got) == {0, 2} and Counter(got)[0] == 5


def test_least_inflight_prefers_the_least_busy_and_rotates_ties() -> None:
    reps = replicas(3)
    reps[0].inflight, reps[1].inflight, reps[2].inflight = 4, 1, 2
    assert picks(Router("least_inflight"), reps, 5) == [1] * 5
    for r in reps:
        r.inflight = 0
    assert Counter(picks(Router("least_inflight"), reps, 30)) == {0: 10, 1: 10, 2: 10}


def test_ewma_latency_scores_latency_times_inflight() -> None:
    reps = replicas(3)
    router = Router("ewma_latency")
    reps[0].observe(None, 10.0)
    reps[1].observe(None, 30.0)
    # replica 2 has no sample yet: tried first
    assert router.pick(reps).index == 2  # type: ignore[union-attr]
    reps[2].observe(None, 50.0)
    assert picks(router, reps, 4) == [0] * 4
    reps[0].inflight = 3  # 10 * 4 = 40 > 30 * 1
    assert router.pick(reps).index == 1  # type: ignore[union-attr]
    # EWMA with alpha: 10 -> 10 + a * (20 - 10)
    reps[0].observe(None, 20.0)
    assert reps[0].ewma_ms == pytest.approx(10 + EWMA_ALPHA * 10)


def test_weighted_is_nginx_smooth_weighted_round_robin() -> None:
    reps = replicas(3)
    router = Router("weighted", weights=[5, 1, 1])
    # nginx's own example (ngx_http_upstream_round_robin.c): {5,1,1} -> a a b a c a a
    assert picks(router, reps, 7) == [0, 0, 1, 0, 2, 0, 0]
    got = Counter(picks(Router("weighted", weights=[3, 1, 2]), reps, 600))
    assert got == {0: 300, 1: 100, 2: 200}


def test_weighted_skips_unavailable_replicas() -> None:
    reps = replicas(3)
    reps[0].target.state = "down"
    got = Counter(picks(Router("weighted", weights=[5, 1, 3]), reps, 400))
    assert got == {1: 100, 2: 300}


def test_predictive_uses_per_tool_history_then_replica_ewma() -> None:
    reps = replicas(2)
    router = Router("predictive")
    reps[0].observe("fast_on_a", 5.0)
    reps[0].observe("fast_on_b", 80.0)
    reps[1].observe("fast_on_b", 4.0)
    reps[1].observe("fast_on_a", 60.0)
    assert picks(router, reps, 3, tool="fast_on_a") == [0, 0, 0]
    assert picks(router, reps, 3, tool="fast_on_b") == [1, 1, 1]
    # a tool never seen: the replica EWMA decides (replica 1's overall EWMA is lower)
    assert reps[1].ewma_ms is not None and reps[0].ewma_ms is not None
    assert reps[1].ewma_ms < reps[0].ewma_ms
    assert router.pick(reps, tool="new_tool").index == 1  # type: ignore[union-attr]


def test_sticky_sessions_stay_while_available() -> None:
    reps = replicas(3)
    router = Router("round_robin", sticky_tools=["browser_*"])
    first = {s: router.pick(reps, tool="browser_click", session=s) for s in ("s1", "s2", "s3")}
    assert len({r.index for r in first.values() if r}) == 3  # spread by the strategy
    for _ in range(5):
        for s, r in first.items():
            assert router.pick(reps, tool="browser_type", session=s) is r
    # a non-sticky tool is routed freely
    assert len(set(picks(router, reps, 6, tool="other", session="s1"))) == 3
    # the pinned replica goes away: the session moves, and stays on its new replica
    pinned = first["s1"]
    assert pinned is not None
    pinned.target.state = "down"
    moved = router.pick(reps, tool="browser_click", session="s1")
    assert moved is not None and moved is not pinned
    pinned.target.state = "ready"
    assert all(router.pick(reps, tool="browser_click", session="s1") is moved for _ in range(5))


def test_pick_skips_open_breakers_and_prefers_untried() -> None:
    clock = Clock()
    reps = replicas(3, clock, failure_threshold=1, open_ms=1000)
    reps[0].breaker.record_failure()
    router = Router("round_robin")
    assert set(picks(router, reps, 6)) == {1, 2}
    assert set(picks(router, reps, 6, exclude=[1])) == {2}
    # everything tried: a tried replica is still better than none
    assert set(picks(router, reps, 4, exclude=[1, 2])) <= {1, 2}
    for r in reps:
        r.target.state = "down"
    assert router.pick(reps) is None


def test_unknown_strategy_and_bad_weights_are_rejected() -> None:
    with pytest.raises(ValueError, match="round_robin"):
        Router("random")
    with pytest.raises(ValueError, match="positive"):
        Router("weighted", weights=[1, 0])


# ---- circuit breaker ----------------------------------------------------------------------
def test_breaker_state_machine() -> None:
    clock = Clock()
    b = CircuitBreaker(BreakerConfig(failure_threshold=3, open_ms=5000, half_open_max=2), clock=clock)
    assert b.state == "closed"
    b.record_failure()
    b.record_failure()
    b.record_success()  # consecutive failures only
    b.record_failure()
    b.record_failure()
    assert b.state == "closed" and b.allows()
    b.record_failure()
    assert b.state == "open" and not b.allows()
    assert b.retry_in_s() == pytest.approx(5.0)
    clock.now += 4.999
    assert not b.allows()
    clock.now += 0.002
    assert b.allows() and b.state == "half_open"
    # half-open: at most half_open_max trials at once
    b.acquire()
    assert b.allows()
    b.acquire()
    assert not b.allows()
    b.release()  # a cancelled trial gives its slot back
    assert b.allows()
    b.record_failure()  # a failed trial opens it again
    assert b.state == "open" and not b.allows()
    clock.now += 5.0
    assert b.allows()
    b.acquire()
    b.record_success()  # a successful trial closes it
    assert b.state == "closed" and b.failures == 0


def test_breaker_ignores_late_success_while_open_and_can_be_disabled() -> None:
    clock = Clock()
    b = CircuitBreaker(BreakerConfig(failure_threshold=1, open_ms=1000), clock=clock)
    b.record_failure()
    b.record_success()  # an answer to a call sent before it opened
    assert b.state == "open"
    b.reset()
    assert b.state == "closed"
    off = CircuitBreaker(BreakerConfig(enabled=False, failure_threshold=1), clock=clock)
    for _ in range(10):
        off.record_failure()
    assert off.state == "closed" and off.allows()


# ---- adaptive timeouts --------------------------------------------------------------------
def test_latency_window_p99_nearest_rank() -> None:
    win = LatencyWindow(256)
    assert win.p99() == 0.0
    for ms in range(1, 101):
        win.add(float(ms))
    assert win.p99() == 99.0
    for _ in range(300):
        win.add(5.0)
    assert len(win) == 256 and win.p99() == 5.0


def test_adaptive_timeout_after_min_samples_clamped() -> None:
    cfg = AdaptiveTimeoutConfig(enabled=True, factor=3.0, floor_ms=100, ceiling_ms=2000, min_samples=20)
    t = AdaptiveTimeouts(cfg)
    for _ in range(19):
        t.observe("tool", 50.0)
    assert t.timeout_s("tool") is None  # not enough samples: the server's timeout applies
    t.observe("tool", 50.0)
    assert t.timeout_s("tool") == pytest.approx(0.150)
    for _ in range(20):
        t.observe("fast", 1.0)
    assert t.timeout_s("fast") == pytest.approx(0.100)  # floor
    for _ in range(20):
        t.observe("slow", 5000.0)
    assert t.timeout_s("slow") == pytest.approx(2.0)  # ceiling
    assert t.timeout_s("never") is None


# ---- retry policy -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("exc", "safe", "expected"),
    [
        (NoReplicaAvailable("none"), False, True),
        (UpstreamUnavailable("down"), False, True),
        (UpstreamUnavailable("down"), True, True),
        (UpstreamClosed("closed"), False, False),
        (UpstreamClosed("closed"), True, True),
        (UpstreamTimeout("slow"), False, False),
        (UpstreamTimeout("slow"), True, True),
        (MCPError(code=-32602, message="bad args"), True, False),
        (GatewayError("busy", code=GATEWAY_REJECTED), True, False),
        (RuntimeError("bug"), True, False),
    ],
)
def test_may_retry(exc: BaseException, safe: bool, expected: bool) -> None:
    assert may_retry(exc, safe) is expected


def test_safe_methods() -> None:
    assert "resources/read" in SAFE_METHODS and "prompts/get" in SAFE_METHODS
    assert "tools/call" not in SAFE_METHODS


def test_full_jitter_backoff_bounds() -> None:
    assert backoff_s(1, 25, 1000, rand=lambda: 1.0) == pytest.approx(0.025)
    assert backoff_s(3, 25, 1000, rand=lambda: 1.0) == pytest.approx(0.100)
    assert backoff_s(10, 25, 1000, rand=lambda: 1.0) == pytest.approx(1.0)  # capped
    assert backoff_s(3, 25, 1000, rand=lambda: 0.0) == 0.0
    assert 0 <= backoff_s(2, 25, 1000) <= 0.05


# ---- the pool's retry loop, on fake replicas ----------------------------------------------
class FakeUp:
    """Stands in for a replica's `Upstream`: records what was sent, fails as told."""

    def __init__(self, index: int, n: int) -> None:
        self.state = "ready"
        self.label = f"MCP server 'svc' (replica {index + 1} of {n})"
        self.last_error: str | None = None
        self.restarts = 0
        self.sent: list[str] = []
        self.fail: type[GatewayError] | None = None
        self.answer_error: MCPError | None = None

    async def request(self, method: str, params: Any, *, timeout_s: Any = None, on_progress: Any = None) -> dict:
        self.sent.append(method)
        if self.fail is not None:
            raise self.fail(f"{self.label} failed during {method}", server="svc")
        if self.answer_error is not None:
            raise self.answer_error
        return {"content": [], "isError": False}

    async def stop(self) -> None:
        self.state = "stopped"

    async def wait_ready(self, timeout_s: float) -> bool:
        return self.state == "ready"


class Quiet:
    async def catalog_changed(self, server: str, kinds: set[str]) -> None: ...
    async def resource_updated(self, server: str, uri: str) -> None: ...
    async def log_message(self, server: str, params: Any) -> None: ...
    async def client_request(self, server: str, request: Any) -> Any: ...


def fake_pool(n: int = 3, **extra: Any) -> tuple[ServerPool, list[FakeUp]]:
    entry = {"command": "unused", "replicas": n, "retry": {"attempts": 3, "initial_backoff_ms": 1}, **extra}
    cfg = load_config(data={"mcpServers": {"svc": entry}}).mcpServers["svc"]
    pool = ServerPool("svc", cfg, Quiet())  # type: ignore[arg-type]
    fakes = [FakeUp(i, n) for i in range(n)]
    for r, f in zip(pool.replicas, fakes, strict=True):
        r.target = f
    return pool, fakes


def tool_call(info: ToolInfo = UNKNOWN, tool: str = "t") -> ToolCall:
    return ToolCall("svc", tool, f"svc__{tool}", {"name": tool, "arguments": {}}, info=info)


def sends(fakes: list[FakeUp]) -> int:
    return sum(len(f.sent) for f in fakes)


READ_ONLY = ToolInfo(read_only=True, idempotent=True)
IDEMPOTENT = ToolInfo(idempotent=True)


@pytest.mark.anyio
@pytest.mark.parametrize("failure", [UpstreamClosed, UpstreamTimeout])
async def test_destructive_call_that_may_have_arrived_is_sent_once(failure: type[GatewayError]) -> None:
    pool, fakes = fake_pool()
    for f in fakes:
        f.fail = failure
    with pytest.raises(failure) as info:
        await pool.call(tool_call(UNKNOWN))
    assert sends(fakes) == 1
    assert "MCP server 'svc' (replica" in str(info.value)
    assert info.value.code in (UPSTREAM_CLOSED, UPSTREAM_TIMEOUT)


@pytest.mark.anyio
@pytest.mark.parametrize("info", [READ_ONLY, IDEMPOTENT])
async def test_safe_call_fails_over_to_another_replica(info: ToolInfo) -> None:
    pool, fakes = fake_pool()
    fakes[0].fail = UpstreamClosed
    fakes[1].fail = UpstreamClosed
    pool.router = Router("round_robin")
    pool.router._tick = -1  # noqa: SLF001 - start at replica 0
    result = await pool.call(tool_call(info))
    assert result["isError"] is False
    assert len(fakes[0].sent) == 1 and len(fakes[2].sent) == 1  # failed over, never the same replica twice
    assert len(fakes[1].sent) <= 1
    assert pool.replicas[2].failures == 0 and pool.replicas[0].failures == 1


@pytest.mark.anyio
async def test_timeout_is_retried_only_by_failover() -> None:
    pool, fakes = fake_pool(1)
    fakes[0].fail = UpstreamTimeout
    with pytest.raises(UpstreamTimeout):
        await pool.call(tool_call(READ_ONLY))
    assert sends(fakes) == 1  # the only replica timed out: not asked again


@pytest.mark.anyio
async def test_unavailable_is_retried_even_for_destructive_calls() -> None:
    pool, fakes = fake_pool(2)
    fakes[0].fail = UpstreamUnavailable
    pool.router = Router("round_robin")
    pool.router._tick = -1  # noqa: SLF001
    result = await pool.call(tool_call(UNKNOWN))
    assert result["isError"] is False
    assert [len(f.sent) for f in fakes] == [1, 1]


@pytest.mark.anyio
async def test_no_replica_is_retried_then_names_every_replica() -> None:
    pool, fakes = fake_pool(3)
    for f in fakes:
        f.state = "down"
        f.last_error = "connection closed"
    with pytest.raises(NoReplicaAvailable) as info:
        await pool.call(tool_call(UNKNOWN))
    msg = str(info.value)
    assert info.value.code == UPSTREAM_UNAVAILABLE
    assert "MCP server 'svc' has no replica available" in msg
    assert "replica 1: down (connection closed)" in msg and "replica 3:" in msg
    assert sends(fakes) == 0


@pytest.mark.anyio
async def test_jsonrpc_errors_are_not_retried_and_do_not_trip_the_breaker() -> None:
    pool, fakes = fake_pool(2, breaker={"failure_threshold": 1})
    for f in fakes:
        f.answer_error = MCPError(code=-32602, message="bad arguments")
    with pytest.raises(MCPError):
        await pool.call(tool_call(READ_ONLY))
    assert sends(fakes) == 1
    assert all(r.breaker.state == "closed" for r in pool.replicas)


@pytest.mark.anyio
async def test_breaker_opens_on_transport_failures_and_routes_around() -> None:
    pool, fakes = fake_pool(2, breaker={"failure_threshold": 2, "open_ms": 60_000})
    fakes[0].fail = UpstreamClosed
    pool.router = Router("round_robin")
    for _ in range(6):
        await pool.call(tool_call(READ_ONLY))
    assert pool.replicas[0].breaker.state == "open"
    assert len(fakes[0].sent) == 2  # then no more calls go there
    assert pool.stats()[0]["breaker"] == "open" and pool.stats()[0]["failures"] == 2


@pytest.mark.anyio
async def test_request_retries_safe_methods_only() -> None:
    pool, fakes = fake_pool(2)
    fakes[0].fail = UpstreamClosed
    pool.router = Router("round_robin")
    pool.router._tick = -1  # noqa: SLF001
    await pool.request("resources/read", {"uri": "x://y"})
    assert [len(f.sent) for f in fakes] == [1, 1]
    pool.router._tick = -1  # noqa: SLF001
    with pytest.raises(UpstreamClosed):
        await pool.request("tools/call", {"name": "t", "arguments": {}})
    assert [len(f.sent) for f in fakes] == [2, 1]


class FakeSession:
    def __init__(self, hang: bool = False) -> None:
        self.hang = hang
        self.sent: list[str] = []

    async def send_ping(self) -> None:
        self.sent.append("ping")
        if self.hang:
            import anyio

            await anyio.sleep(10)

    async def send_discover(self, version: str) -> dict:
        self.sent.append(f"server/discover {version}")
        return {}


@pytest.mark.anyio
async def test_health_checks_ping_or_discover_and_feed_the_breaker() -> None:
    pool, fakes = fake_pool(2, health_check={"interval_ms": 0, "timeout_ms": 50}, breaker={"failure_threshold": 1})
    legacy, modern = FakeSession(hang=True), FakeSession()
    fakes[0].session, fakes[0].modern, fakes[0].protocol_version = legacy, False, "2025-06-18"  # type: ignore[attr-defined]
    fakes[1].session, fakes[1].modern, fakes[1].protocol_version = modern, True, "2026-07-28"  # type: ignore[attr-defined]
    assert not await pool.check_health(pool.replicas[0])
    assert legacy.sent == ["ping"]
    assert pool.replicas[0].breaker.state == "open"
    assert "health check" in (pool.stats()[0]["last_error"] or "")
    assert await pool.check_health(pool.replicas[1])
    assert modern.sent == ["server/discover 2026-07-28"]
    assert pool.replicas[1].breaker.state == "closed"
