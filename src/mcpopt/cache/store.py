"""Result stores: L1 in process (bounded in bytes, TTL + LRU), optional L2 in Redis.

Invalidation is generational: every server and every (server, tool) has a generation number,
and an entry is served only if both generations it was written under are still current. A
write to a server bumps a generation -- O(1), however many entries it drops -- and stale
entries age out of the LRU by themselves. A read that was in flight across a bump is not
stored (its result may predate the write): `capture()` before the call, `put(..., gen=...)`
after.

L2 keys embed the generations, and bumps are `INCR`s in Redis broadcast on a pub/sub channel,
so every gateway process stops serving the same entries at once. With L2, an L1 hit too is checked
against Redis's generations (one MGET of two keys) before it is served: the pub/sub message may
still be on its way when the next read comes, and "at once" must not depend on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from cachetools import TLRUCache

from mcpopt.state.redis import report_down, report_up

logger = logging.getLogger(__name__)

CHANNEL = "mcpopt:cache:invalidate"
"""Redis pub/sub channel carrying invalidations between gateway processes."""


_RAISE_TO = """
local out = {}
for i, k in ipairs(KEYS) do
  local cur = tonumber(redis.call('GET', k) or '0')
  local want = tonumber(ARGV[i])
  if cur < want then redis.call('SET', k, want); cur = want end
  out[i] = cur
end
return out
"""
"""Raise generation keys to at least the given values (after Redis lost them), atomically."""


@dataclass(slots=True)
class Entry:
    value: dict[str, Any]
    size: int
    expires: float
    server_gen: int
    tool_gen: int


@dataclass(frozen=True, slots=True)
class Generation:
    """The generations a read started under (see module docstring)."""

    server: int
    tool: int


class Generations:
    """Generation counters per server and per (server, tool)."""

    def __init__(self) -> None:
        self.server: dict[str, int] = {}
        self.tool: dict[tuple[str, str], int] = {}

    def current(self, server: str, tool: str) -> Generation:
        return Generation(self.server.get(server, 0), self.tool.get((server, tool), 0))

    def bump(self, server: str, tools: Iterable[str] | None) -> None:
        if tools is None:
            self.server[server] = self.server.get(server, 0) + 1
        else:
            for tool in tools:
                self.tool[(server, tool)] = self.tool.get((server, tool), 0) + 1

    def set(self, server: str, tool: str | None, value: int) -> None:
        """Adopt a generation from Redis (never going back: a lower value is ignored)."""
        if tool is None:
            self.server[server] = max(self.server.get(server, 0), value)
        else:
            self.tool[(server, tool)] = max(self.tool.get((server, tool), 0), value)


class MemoryStore:
    """L1: a byte-bounded LRU with per-entry expiry (cachetools `TLRUCache`).

    Args:
        max_bytes: total size of cached result bodies (JSON bytes) before LRU eviction.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, max_bytes: int, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self._cache: TLRUCache[tuple[str, str, str], Entry] = TLRUCache(
            maxsize=max(max_bytes, 1),
            ttu=lambda _k, v, _now: v.expires,
            timer=clock,
            getsizeof=lambda v: v.size,
        )

    def get(self, key: tuple[str, str, str], gen: Generation) -> Entry | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry.server_gen != gen.server or entry.tool_gen != gen.tool:
            with contextlib.suppress(KeyError):
                del self._cache[key]
            return None
        return entry

    def put(self, key: tuple[str, str, str], entry: Entry) -> None:
        if entry.size > self._cache.maxsize:
            return
        self._cache[key] = entry

    def clear(self) -> None:
        self._cache.clear()

    @property
    def bytes(self) -> int:
        return int(self._cache.currsize)

    def __len__(self) -> int:
        return len(self._cache)


class RedisStore:
    """L2 in Redis, shared by gateway processes; every failure degrades to L1 (never fails a call).

    Args:
        url: `redis://host:port/db`.
        on_remote_bump: called with (server, tool or None, generation) for invalidations
            published by other processes (and this one).
        on_reconnect: called when Redis is reachable again after an outage (the cache drops L1).
    """

    def __init__(self, url: str, on_remote_bump: Any, on_reconnect: Any = None) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self._redis = aioredis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
        self._on_remote_bump = on_remote_bump
        self._on_reconnect = on_reconnect
        self._task: asyncio.Task[None] | None = None
        self.healthy = False
        self._warned = False
        self._was_up = False
        """Redis was reachable once (a first connection after a down start is no re-connection)."""

    async def start(self) -> None:
        try:
            await self._redis.ping()
            self.healthy = True
        except Exception as exc:  # noqa: BLE001 - Redis down: L1 only, one warning; the listener retries
            self._warn(exc)
        self._task = asyncio.get_running_loop().create_task(self._listen())

    def _warn(self, exc: BaseException) -> None:
        self.healthy = False
        if not self._warned:
            self._warned = True
            report_down(self.url, "cache L2 (serving from L1 only)", exc)

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(CHANNEL)
                if not self.healthy:  # Redis is back: reads re-check generations (MGET), so this is safe
                    report_up(self.url, "cache L2 (serving from L1 only)")
                    self.healthy, self._warned = True, False
                    if self._on_reconnect is not None and self._was_up:
                        # Invalidations made by other processes during the outage never reached us,
                        # and Redis may have lost its generations: what L1 holds is not to be trusted.
                        self._on_reconnect()
                self._was_up = True
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    data = orjson.loads(message["data"])
                    self._on_remote_bump(data["server"], data.get("tool"), int(data["gen"]))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                self._warn(exc)
                await asyncio.sleep(1.0)

    @staticmethod
    def _key(key: tuple[str, str, str], gen: Generation) -> str:
        server, tool, digest = key
        return f"mcpopt:r:{server}:{gen.server}:{tool}:{gen.tool}:{digest}"

    async def get(self, key: tuple[str, str, str], gen: Generation) -> dict[str, Any] | None:
        """The entry for `key` under `gen`, checked against Redis's own generations in the same
        round trip (MGET), so an invalidation by another process is honoured before its pub/sub
        message arrives."""
        if not self.healthy:
            return None
        server, tool, _ = key
        try:
            g_server, g_tool, raw = await self._redis.mget(
                f"mcpopt:gen:{server}", f"mcpopt:gen:{server}:{tool}", self._key(key, gen)
            )
            remote = await self._repair(server, tool, gen, Generation(int(g_server or 0), int(g_tool or 0)))
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)
            return None
        if remote != gen:
            if remote.server > gen.server:
                self._on_remote_bump(server, None, remote.server)
            if remote.tool > gen.tool:
                self._on_remote_bump(server, tool, remote.tool)
            return None
        return orjson.loads(raw) if raw else None

    async def _repair(self, server: str, tool: str, gen: Generation, remote: Generation) -> Generation:
        """Redis's generations fell below ours: it lost its data (a restart without persistence).
        Raise them back to ours (never lowering one another process raised meanwhile)."""
        if remote.server >= gen.server and remote.tool >= gen.tool:
            return remote
        g_server, g_tool = await self._redis.eval(
            _RAISE_TO, 2, f"mcpopt:gen:{server}", f"mcpopt:gen:{server}:{tool}", gen.server, gen.tool
        )
        return Generation(int(g_server), int(g_tool))

    async def current(self, server: str, tool: str, gen: Generation) -> bool:
        """True when `gen` is still Redis's generation of (server, tool): one MGET, so an L1 hit is
        never served after another process's invalidation, even before its pub/sub message
        arrives. Newer generations are adopted. Redis down: True (L1 alone decides, one warning)."""
        if not self.healthy:
            return True
        try:
            g_server, g_tool = await self._redis.mget(f"mcpopt:gen:{server}", f"mcpopt:gen:{server}:{tool}")
            remote = await self._repair(server, tool, gen, Generation(int(g_server or 0), int(g_tool or 0)))
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)
            return True
        if remote.server > gen.server:
            self._on_remote_bump(server, None, remote.server)
        if remote.tool > gen.tool:
            self._on_remote_bump(server, tool, remote.tool)
        return remote == gen

    async def put(self, key: tuple[str, str, str], gen: Generation, body: bytes, ttl_ms: int) -> None:
        if not self.healthy:
            return
        try:
            await self._redis.set(self._key(key, gen), body, px=ttl_ms)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    async def bump(self, server: str, tools: Iterable[str] | None) -> None:
        """INCR the generation(s) in Redis (authoritative while Redis is up) and tell every process."""
        if not self.healthy:
            return
        try:
            for tool in [None] if tools is None else list(tools):
                name = f"mcpopt:gen:{server}" + (f":{tool}" if tool else "")
                gen = await self._redis.incr(name)
                self._on_remote_bump(server, tool, int(gen))
                await self._redis.publish(CHANNEL, orjson.dumps({"server": server, "tool": tool, "gen": gen}))
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(Exception):
            await self._redis.aclose()
