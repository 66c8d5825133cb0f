"""`mcpopt bench shared`: what each piece of state shared over Redis costs per call (issue 12).

For each operation the request path performs against Redis, with the same operation on local
state beside it in the same run: p50 / p99 wall time, CPU time per operation (this process), and
Redis commands per operation (read from the server's own `INFO stats` counter, so the figure is
counted, not assumed). Plus the one-way delay of a `SharedBus` message between two connections
(what breaker, rules and notification propagation cost on top of their own work).

Operations, after `warmup` untimed runs each:
- cache hit: `ResultCache.get` on an L1 entry, memory only vs with the Redis L2 (generation check);
- cache miss + store: `get` of a missing key then `put` (a read that goes upstream);
- write invalidation: `invalidate(server, [tool])` (a write call does it twice: before and after);
- rate limit: `RateLimiter.hit` with one per-principal limit, `memory://` vs Redis, for the
  moving-window and sliding-window-counter strategies;
- bus: `SharedBus.publish` and its delivery to a second replica's bus.

Starts its own throwaway `redis-server` on an ephemeral port unless `redis_url` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


@contextlib.contextmanager
def _redis_server() -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (scripts/setup installs it), or pass --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.kill()
            proc.wait(5)


_SENT = [0]
"""Requests written to any Redis connection of this process (one per round trip; a pipeline is one)."""


def _count_round_trips() -> None:
    """Count requests at redis-py's connection (bench-only instrumentation of a private method;
    without it the round-trip column reads 0)."""
    from redis.asyncio.connection import AbstractConnection

    original = getattr(AbstractConnection, "_send_packed_command", None)
    if original is None or getattr(original, "_mcpopt_counted", False):
        return

    async def counted(self: Any, command: Any) -> None:
        _SENT[0] += 1
        await original(self, command)

    counted._mcpopt_counted = True  # type: ignore[attr-defined]
    AbstractConnection._send_packed_command = counted  # type: ignore[method-assign]


async def _commands(client: Any) -> int:
    info = await client.info("stats")
    return int(info["total_commands_processed"])


async def _measure(
    name: str, op: Callable[[], Awaitable[Any]], n: int, warmup: int, client: Any | None
) -> dict[str, Any]:
    for _ in range(warmup):
        await op()
    before = await _commands(client) if client is not None else 0
    sent = _SENT[0]
    lat: list[float] = []
    cpu0 = time.process_time()
    for _ in range(n):
        t = time.perf_counter()
        await op()
        lat.append((time.perf_counter() - t) * 1e6)
    cpu = (time.process_time() - cpu0) / n * 1e6
    trips = (_SENT[0] - sent) / n
    # The INFO call itself is one command: not counted against the operation. Commands run inside
    # a Lua script (the limiter's, ours) count one each on the server: more than the round trips.
    cmds = ((await _commands(client)) - before - 1) / n if client is not None else 0.0
    return {
        "operation": name,
        "p50_us": round(_pct(lat, 0.5), 1),
        "p99_us": round(_pct(lat, 0.99), 1),
        "cpu_us": round(cpu, 1),
        "round_trips": round(trips, 2),
        "redis_commands": round(cmds, 2),
    }


async def _run(n: int, warmup: int, url: str) -> dict[str, Any]:
    import redis.asyncio as aioredis

    from mcpopt.auth.ratelimit import RateLimiter
    from mcpopt.cache import ResultCache, cache_key
    from mcpopt.config import CacheSettings, LimitsSettings
    from mcpopt.state.redis import SharedBus

    _count_round_trips()
    client = aioredis.from_url(url)
    rows: list[dict[str, Any]] = []
    result = {"content": [{"type": "text", "text": "x" * 200}]}
    try:
        for label, l2 in (("memory", None), ("redis", url)):
            cache = ResultCache(CacheSettings(redis_url=l2))
            await cache.start()
            key = cache_key("bench", "read", {"a": 1})
            await cache.put(key, cache.capture(key), result, 600_000)
            watch = client if l2 else None

            async def hit(c: Any = cache, k: Any = key) -> None:
                await c.get(k)

            rows.append(await _measure(f"cache hit ({label})", hit, n, warmup, watch))
            i = 0

            async def miss_store(c: Any = cache) -> None:
                nonlocal i
                i += 1
                k = cache_key("bench", "read", {"i": i})
                await c.get(k)
                await c.put(k, c.capture(k), result, 600_000)

            rows.append(await _measure(f"cache miss + store ({label})", miss_store, n, warmup, watch))

            async def bump(c: Any = cache) -> None:
                await c.invalidate("bench", ["read"])

            rows.append(await _measure(f"write invalidation, once ({label})", bump, n, warmup, watch))
            await cache.close()
        for strategy in ("moving-window", "sliding-window-counter"):
            for label, storage in (("memory", "memory://"), ("redis", url)):
                limiter = RateLimiter(
                    LimitsSettings.model_validate(
                        {"storage": storage, "strategy": strategy, "per_principal": ["1000000000/minute"]}
                    )
                )

                async def limit(lim: Any = limiter) -> None:
                    await lim.hit(None, "bench__read")

                watch = client if storage != "memory://" else None
                rows.append(await _measure(f"rate limit, 1 limit, {strategy} ({label})", limit, n, warmup, watch))
        rows.append(await _measure("bare Redis PING (floor)", client.ping, n, warmup, client))
        # Bus: one-way delay from publish on replica a to the handler on replica b.
        a, b = SharedBus(url, "bench-a"), SharedBus(url, "bench-b")
        got: asyncio.Queue[float] = asyncio.Queue()

        async def on_msg(msg: dict[str, Any]) -> None:
            got.put_nowait(time.perf_counter() - float(msg["t"]))

        b.on("bench", on_msg)
        await a.start()
        await b.start()
        delays: list[float] = []
        for k in range(warmup + n):
            await a.publish("bench", t=time.perf_counter())
            d = await asyncio.wait_for(got.get(), 5)
            if k >= warmup:
                delays.append(d * 1e6)
        rows.append(
            {
                "operation": "bus message, publish -> other replica's handler",
                "p50_us": round(_pct(delays, 0.5), 1),
                "p99_us": round(_pct(delays, 0.99), 1),
                "cpu_us": None,
                "round_trips": 1.0,
                "redis_commands": 1.0,
            }
        )
        await a.aclose()
        await b.aclose()
    finally:
        await client.aclose()
    return {"calls": n, "warmup": warmup, "rows": rows}


def bench_shared(calls: int = 2000, warmup: int = 200, redis_url: str | None = None) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); `{calls, warmup, rows: [{operation, p50_us,
    p99_us, cpu_us, round_trips, redis_commands}]}`.

    Raises:
        RuntimeError: no `redis_url` and no `redis-server` to start.
    """
    if redis_url:
        return asyncio.run(_run(calls, warmup, redis_url))
    with _redis_server() as url:
        return asyncio.run(_run(calls, warmup, url))
