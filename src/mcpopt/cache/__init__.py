"""A result cache that never lies.

Policy (issue #3, and the two failures measured on FastMCP 4.1.0's response cache):
- a `tools/call` result is cached only if the tool is read-only AND a TTL applies; the default
  TTL is 0 (off): read-only is not the same as unchanging;
- never cached: `isError` results, `InputRequiredResult`, anything from a tool that is not
  read-only;
- a call to a tool that is not read-only drops the server's cached reads (or, with an
  `invalidates` rule, the reads it names) before it is sent and again when it returns, so no
  read that overlaps a write can be served afterwards;
- upstream `list_changed` and `resources/updated` drop what they concern; `purge()` on demand;
- the key holds server, tool, canonical arguments (sorted-key JSON) and the caller's partition.

`ResultCache` is used by `CacheFilter` and the gateway; `stats()` gives per-tool hits, misses,
bytes and hit rate.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import orjson

from mcpopt.cache.store import Entry, Generation, Generations, MemoryStore, RedisStore
from mcpopt.config import CacheSettings
from mcpopt.wire import unencodable


def cache_key(server: str, tool: str, arguments: Any, partition: str = "") -> tuple[str, str, str]:
    """(server, tool, digest of canonical arguments + partition): equal for equal calls.

    Canonical arguments: JSON with sorted keys (orjson `OPT_SORT_KEYS`), so `{"a":1,"b":2}`
    and `{"b":2,"a":1}` share an entry. Digest: BLAKE2b-128.

    Raises:
        InvalidParams: the arguments cannot be serialized (nested deeper than orjson's 254 levels).
    """
    body = canonical_arguments(tool, arguments)
    digest = hashlib.blake2b(body + b"\x00" + partition.encode(), digest_size=16).hexdigest()
    return server, tool, digest


def canonical_arguments(tool: str, arguments: Any) -> bytes:
    """The arguments' canonical JSON (sorted keys): equal bytes for equal arguments.

    Raises:
        InvalidParams: the arguments cannot be serialized (naming the tool).
    """
    try:
        return orjson.dumps(arguments or {}, option=orjson.OPT_SORT_KEYS)
    except TypeError as exc:
        raise unencodable(exc, f"the arguments of tools/call {tool}", arguments) from None


@dataclass
class ToolStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    bytes_served: int = 0
    invalidations: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ResultCache:
    """L1 (+ optional L2) tool-result cache with generational invalidation.

    Args:
        settings: `gateway.cache` from the config.
        clock: monotonic seconds (tests inject a fake clock).
    """

    def __init__(self, settings: CacheSettings, clock: Any = time.monotonic) -> None:
        self.settings = settings
        self.enabled = settings.enabled
        self.clock = clock
        self.l1 = MemoryStore(settings.max_bytes, clock)
        self.gens = Generations()
        self.l2: RedisStore | None = None
        if settings.redis_url:
            self.l2 = RedisStore(settings.redis_url, self._remote_bump, self.l1.clear)
        self.stats: dict[tuple[str, str], ToolStats] = {}
        self._by_server: dict[str, dict[str, ToolStats]] = {}
        self._reading: set[str] = set()
        """Servers whose reads were ever looked up or captured: only they can hold results (in L1)."""

    async def start(self) -> None:
        if self.l2 is not None:
            await self.l2.start()

    async def close(self) -> None:
        if self.l2 is not None:
            await self.l2.close()

    def _stat(self, server: str, tool: str) -> ToolStats:
        st = self.stats.get((server, tool))
        if st is None:
            st = self.stats[(server, tool)] = ToolStats()
            self._by_server.setdefault(server, {})[tool] = st
        return st

    # ---- reads ----------------------------------------------------------------------------
    def capture(self, key: tuple[str, str, str]) -> Generation:
        """The generations before a read is sent upstream (pass to `put`)."""
        self._reading.add(key[0])
        return self.gens.current(key[0], key[1])

    async def get(self, key: tuple[str, str, str]) -> dict[str, Any] | None:
        """A fresh cached result, or None. Counts a hit or a miss."""
        self._reading.add(key[0])
        gen = self.gens.current(key[0], key[1])
        st = self._stat(key[0], key[1])
        entry = self.l1.get(key, gen)
        if entry is not None and self.l2 is not None and not await self.l2.current(key[0], key[1], gen):
            entry = None  # another process invalidated it: its generation moved on (adopted just now)
            gen = self.gens.current(key[0], key[1])
        if entry is not None:
            st.hits += 1
            st.bytes_served += entry.size
            return entry.value
        if self.l2 is not None:
            value = await self.l2.get(key, gen)
            if value is not None:
                st.hits += 1
                return value
        st.misses += 1
        return None

    async def put(self, key: tuple[str, str, str], gen: Generation, result: dict[str, Any], ttl_ms: int) -> bool:
        """Store `result` for `ttl_ms` if it is cacheable and no invalidation happened since `gen`.

        Returns True if stored.
        """
        if ttl_ms <= 0 or result.get("isError") or result.get("resultType", "complete") != "complete":
            return False
        if self.gens.current(key[0], key[1]) != gen:
            return False  # a write overlapped this read: its result may predate the write
        body = orjson.dumps(result)
        if len(body) > self.settings.max_entry_bytes:
            return False
        entry = Entry(result, len(body), self.clock() + ttl_ms / 1000, gen.server, gen.tool)
        self.l1.put(key, entry)
        if self.l2 is not None:
            await self.l2.put(key, gen, body, ttl_ms)
        self._stat(key[0], key[1]).stores += 1
        return True

    # ---- invalidation ---------------------------------------------------------------------
    async def invalidate(self, server: str, tools: Iterable[str] | None = None) -> None:
        """Drop `server`'s cached results: all of them (`tools=None`) or those of `tools`.

        Free for a server none of whose reads was ever cached or captured, when there is no L2: it
        holds nothing, and no read in flight can have captured an older generation (so skipping the
        bump cannot let a stale read be stored). With L2, other processes may hold its results.
        """
        if self.l2 is None and server not in self._reading:
            return
        tool_list = None if tools is None else list(tools)
        self.gens.bump(server, tool_list)
        for tool, st in self._by_server.get(server, {}).items():
            if tool_list is None or tool in tool_list:
                st.invalidations += 1
        if self.l2 is not None:
            await self.l2.bump(server, tool_list)

    def matching_tools(self, server: str, globs: Iterable[str], known: Iterable[str]) -> list[str]:
        """The tool names among `known` that any of `globs` matches (for `invalidates` rules)."""
        pats = list(globs)
        return [t for t in known if any(fnmatchcase(t, p) for p in pats)]

    def _remote_bump(self, server: str, tool: str | None, gen: int) -> None:
        self.gens.set(server, tool, gen)

    async def purge(self) -> int:
        """Drop everything (every server, L1 and L2 generations). Returns entries dropped from L1."""
        n = len(self.l1)
        self.l1.clear()
        servers = set(self.gens.server) | {s for s, _ in self.stats}
        for server in servers:
            await self.invalidate(server)
        return n

    def report(self) -> list[dict[str, Any]]:
        """Per-tool stats rows: server, tool, hits, misses, hit_rate, stores, bytes_served."""
        rows = []
        for (server, tool), st in sorted(self.stats.items()):
            rows.append(
                {
                    "server": server,
                    "tool": tool,
                    "hits": st.hits,
                    "misses": st.misses,
                    "hit_rate": round(st.hit_rate, 4),
                    "stores": st.stores,
                    "bytes_served": st.bytes_served,
                    "invalidations": st.invalidations,
                }
            )
        return rows
