"""The gateway's own tools, listed beside the upstreams' (named `{gateway.name}{separator}...`).

- `batch`: runs a list of tool calls concurrently (bounded) through the same pipeline as any
  call, and returns every result in order, each with its own error if it failed -- the fix
  for sequential independent calls.
- `cache_purge`: drops cached results (all, or one server's).
- `cache_stats`: per-tool hits, misses, hit rate and bytes served.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import mcp_types as types
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from mcpopt.api import ProgressSum, client_progress, nested_call

if TYPE_CHECKING:
    from mcpopt.api import ClientLink, GatewayAPI, ToolHandler
    from mcpopt.pipeline.cache import CoalesceFilter


def batch_tool_name(config: Any) -> str:
    """`{gateway.name}{separator}batch`: the batch tool's name under a config."""
    return f"{config.gateway.name}{config.gateway.separator}batch"


def _text_result(payload: Any, *, is_error: bool = False) -> dict[str, Any]:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    result: dict[str, Any] = {"content": [{"type": "text", "text": text}]}
    if isinstance(payload, dict):
        result["structuredContent"] = payload
    if is_error:
        result["isError"] = True
    return result


def _label(index: int, item: Any) -> str:
    name = item.get("name") if isinstance(item, dict) else None
    return f"[{index}] {name}" if isinstance(name, str) else f"[{index}]"


class GatewayTools:
    """The batch and cache tools, registered on a gateway (`GatewayAPI.add_tool`) when built.

    Args:
        gateway: the gateway whose pipeline and cache the tools use.
        coalescer: the pipeline's coalescing filter (its count goes into `cache_stats`).
    """

    def __init__(self, gateway: GatewayAPI, coalescer: CoalesceFilter | None = None) -> None:
        self.gateway = gateway
        self.coalescer = coalescer
        cfg = gateway.config.gateway
        prefix = f"{cfg.name}{cfg.separator}"
        self.batch_name = batch_tool_name(gateway.config)
        if cfg.batch.enabled:
            self._add(
                types.Tool(
                    name=self.batch_name,
                    description=(
                        "Run several independent tool calls at once and get every result in order. "
                        f"Use it instead of calling tools one after another when no call needs another's result "
                        f"(up to {cfg.batch.max_calls} calls, {cfg.batch.concurrency} at a time)."
                    ),
                    input_schema={
                        "type": "object",
                        "properties": {
                            "calls": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": cfg.batch.max_calls,
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "name": {"type": "string", "description": "tool name as listed"},
                                        "arguments": {"type": "object"},
                                    },
                                    "required": ["name"],
                                },
                            }
                        },
                        "required": ["calls"],
                    },
                    annotations=types.ToolAnnotations(read_only_hint=False, open_world_hint=True),
                ),
                self._batch,
            )
        self._add(
            types.Tool(
                name=f"{prefix}cache_purge",
                description="Drop cached tool results: all of them, or those of one server.",
                input_schema={
                    "type": "object",
                    "properties": {"server": {"type": "string", "description": "only this server's results"}},
                },
                annotations=types.ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True),
            ),
            self._cache_purge,
        )
        self._add(
            types.Tool(
                name=f"{prefix}cache_stats",
                description="Result cache statistics per tool: hits, misses, hit rate, bytes served.",
                input_schema={"type": "object", "properties": {}},
                annotations=types.ToolAnnotations(read_only_hint=True),
            ),
            self._cache_stats,
        )

    def _add(self, tool: types.Tool, handler: ToolHandler) -> None:
        self.gateway.add_tool(tool, handler)

    async def _batch(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        cfg = self.gateway.config.gateway.batch
        calls = arguments.get("calls")
        if not isinstance(calls, list) or not calls:
            raise MCPError(code=INVALID_PARAMS, message="batch: 'calls' must be a non-empty list")
        if len(calls) > cfg.max_calls:
            raise MCPError(code=INVALID_PARAMS, message=f"batch: at most {cfg.max_calls} calls (got {len(calls)})")
        limit = asyncio.Semaphore(cfg.concurrency)
        # The client's progress token (if any) follows the whole batch: each call's own progress
        # and its completion move it (total = the number of calls).
        client = client_progress(link)
        combined = ProgressSum(client, len(calls)) if client is not None else None

        async def one(index: int, item: Any) -> dict[str, Any]:
            try:
                return await run(index, item)
            finally:
                if combined is not None:
                    await combined.done(index, _label(index, item))

        async def run(index: int, item: Any) -> dict[str, Any]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                return {"index": index, "ok": False, "error": {"code": INVALID_PARAMS, "message": "needs 'name'"}}
            name = item["name"]
            if name == self.batch_name:
                return {
                    "index": index,
                    "name": name,
                    "ok": False,
                    "error": {"code": INVALID_PARAMS, "message": "a batch cannot contain a batch"},
                }
            relay = combined.part(index, _label(index, item))[1] if combined is not None else None
            params, nested = nested_call(name, item.get("arguments") or {}, link, relay)
            async with limit:
                try:
                    result = await self.gateway.call_tool(params, nested)
                except MCPError as exc:
                    return {
                        "index": index,
                        "name": name,
                        "ok": False,
                        "error": {"code": exc.error.code, "message": exc.error.message},
                    }
            result = {k: v for k, v in result.items() if k not in ("resultType", "_meta")}
            return {"index": index, "name": name, "ok": not result.get("isError", False), "result": result}

        results = await asyncio.gather(*(one(i, c) for i, c in enumerate(calls)))
        failed = sum(1 for r in results if not r["ok"])
        return _text_result({"results": list(results), "succeeded": len(results) - failed, "failed": failed})

    async def _cache_purge(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        server = arguments.get("server")
        cache = self.gateway.cache
        if server:
            if server not in self.gateway.upstreams:
                raise MCPError(code=INVALID_PARAMS, message=f"cache_purge: unknown server {server!r}")
            await cache.invalidate(server)
            return _text_result({"purged": server})
        dropped = await cache.purge()
        return _text_result({"purged": "all", "entries": dropped})

    async def _cache_stats(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        cache = self.gateway.cache
        return _text_result(
            {
                "entries": len(cache.l1),
                "bytes": cache.l1.bytes,
                "max_bytes": cache.settings.max_bytes,
                "redis": None if cache.l2 is None else {"url": cache.l2.url, "healthy": cache.l2.healthy},
                "coalesced": self.coalescer.coalesced if self.coalescer is not None else 0,
                "tools": cache.report(),
            }
        )
