"""Pipeline filters: the result cache, invalidation on writes, and coalescing.

`CacheFilter` answers a read-only call with a TTL from the cache, and stores fresh results;
for any call to a tool that is not read-only it invalidates the server's cached reads before
the call is sent and again when it returns (a read that overlapped the write is never stored,
see `mcpopt.cache.store`). `CoalesceFilter` makes identical concurrent read-only calls share one
upstream call (the followers get the leader's result or its error).
"""

from __future__ import annotations

import asyncio
from typing import Any

from mcpopt.cache import ResultCache, cache_key, canonical_arguments
from mcpopt.pipeline import Next, ToolCall, ToolResult
from mcpopt.policy import ToolInfo


class CacheFilter:
    """Serve and fill the result cache; invalidate on writes.

    Args:
        cache: the gateway's `ResultCache`.
        server_tools: server name -> its current tool names (for `invalidates` globs).
    """

    def __init__(self, cache: ResultCache, server_tools: Any) -> None:
        self.cache = cache
        self.server_tools = server_tools

    def wanted(self, server: str, tool: str, info: ToolInfo) -> bool:
        """False for a read-only tool that is not cached (no TTL, or the cache off: `cache.enabled`
        is fixed for the cache's life, from `gateway.cache.enabled`): nothing to do."""
        return not info.read_only or (info.ttl_ms > 0 and self.cache.enabled)

    async def __call__(self, call: ToolCall, next: Next) -> ToolResult:
        info = call.info
        if not info.read_only:
            await self._invalidate(call)
            try:
                return await next(call)
            finally:
                await self._invalidate(call)
        if info.ttl_ms <= 0 or not self.cache.enabled:
            return await next(call)
        key = cache_key(call.server, call.tool, call.arguments, call.partition)
        hit = await self.cache.get(key)
        if hit is not None:
            call.attrs["cache"] = "hit"
            return hit
        call.attrs["cache"] = "miss"
        gen = self.cache.capture(key)
        result = await next(call)
        await self.cache.put(key, gen, result, info.ttl_ms)
        return result

    async def _invalidate(self, call: ToolCall) -> None:
        targets = call.info.invalidates
        if targets is None:
            await self.cache.invalidate(call.server)
        else:
            known = self.server_tools(call.server)
            await self.cache.invalidate(call.server, self.cache.matching_tools(call.server, targets, known))


class CoalesceFilter:
    """Identical concurrent read-only calls (same server, tool, arguments, partition) share one call.

    The first call (the leader) goes upstream; each identical call that arrives while it is in
    flight (a follower) waits on a future of its own, which the leader settles with its result or
    error. A follower's cancellation cancels only its own future; when the leader's client
    cancels, the waiting followers start over (the first becomes the new leader). So they do when
    the leader's result is not a complete one: a task (`resultType: "task"`, SEP-2663) or an
    `InputRequiredResult` belongs to the caller it was made for (a task shared would be cancelled
    for everyone by one client; a question may depend on the caller's capabilities).
    """

    def __init__(self) -> None:
        self._inflight: dict[tuple[str, str, str, bytes], list[asyncio.Future[ToolResult]]] = {}
        """Per (server, tool, partition, canonical arguments): the followers of the call in flight."""
        self.coalesced = 0
        """Calls answered by another call's upstream request."""

    def wanted(self, server: str, tool: str, info: ToolInfo) -> bool:
        """Only read-only calls are coalesced."""
        return info.read_only

    async def __call__(self, call: ToolCall, next: Next) -> ToolResult:
        if not call.info.read_only:
            return await next(call)
        # The arguments' canonical bytes themselves, not their digest (`cache_key`): a dict key
        # needs no cryptographic hash, only equality.
        key = (call.server, call.tool, call.partition, canonical_arguments(call.tool, call.params.get("arguments")))
        followers = self._inflight.get(key)
        if followers is not None:
            fut: asyncio.Future[ToolResult] = asyncio.get_running_loop().create_future()
            followers.append(fut)
            try:
                result = await fut
            except _LeaderCancelled:
                return await self(call, next)  # the leader's client cancelled it: the first follower leads
            self.coalesced += 1
            call.attrs["coalesced"] = True
            return result
        mine: list[asyncio.Future[ToolResult]] = []
        self._inflight[key] = mine
        try:
            result = await next(call)
        except BaseException as exc:
            self._settle(key, mine, None, _LeaderCancelled() if isinstance(exc, asyncio.CancelledError) else exc)
            raise
        self._settle(key, mine, result, None)
        return result

    def _settle(
        self,
        key: tuple[str, str, str, bytes],
        followers: list[asyncio.Future[ToolResult]],
        result: ToolResult | None,
        exc: BaseException | None,
    ) -> None:
        if self._inflight.get(key) is followers:
            del self._inflight[key]
        shared = exc is None and result is not None and result.get("resultType", "complete") == "complete"
        for fut in followers:
            if fut.done():
                continue  # that follower was cancelled
            if exc is not None:
                fut.set_exception(exc)
            elif shared:
                fut.set_result(result)  # type: ignore[arg-type]
            else:
                fut.set_exception(_LeaderCancelled())  # not shareable: each follower calls for itself


class _LeaderCancelled(Exception):
    """Told to followers when the leader was cancelled (or got a result only it may have): each then
    calls upstream itself."""
