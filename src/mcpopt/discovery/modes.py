"""Exposure modes: which tools a client is shown, and the discovery tools that replace the rest.

- `full`: every upstream tool plus the gateway's own.
- `search`: `search_tools`, `get_tool_schema`, `call_tool`, plus the tools pinned `always_visible`.
- `code`: `search_tools`, `get_tool_schema`, `execute_code` (defined by code mode), plus pins.

Hidden tools stay callable by exact name (the gateway routes any catalog name), so a client that
already knows a name needs no search. The discovery tools are named like the gateway's own tools
(`{gateway.name}{separator}search_tools`, ...), and their handlers have the same shape as
`GatewayTools.handlers`: `async (arguments, link) -> raw CallToolResult dict`.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import anyio
import mcp_types as types
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from mcpopt.discovery.embed import default_embedder
from mcpopt.discovery.index import SearchHit, ToolDoc, ToolIndex, compact_line

if TYPE_CHECKING:
    from mcpopt.api import ClientLink, GatewayAPI
    from mcpopt.catalog import GatewayCatalog

logger = logging.getLogger(__name__)

Exposure = Literal["full", "search", "code"]
EXPOSURES: tuple[Exposure, ...] = ("full", "search", "code")
Handler = Callable[[dict[str, Any], "ClientLink"], Awaitable[dict[str, Any]]]
LineFormat = Callable[[ToolDoc], str]

MAX_K = 50
"""Most results one `search_tools` call returns."""


def discovery_tools(prefix: str, *, with_call: bool = True, default_k: int = 10) -> list[types.Tool]:
    """The definitions of `search_tools`, `get_tool_schema` and (if `with_call`) `call_tool`.

    Args:
        prefix: `{gateway.name}{separator}`.
        with_call: include `call_tool` (search mode; code mode calls tools from `execute_code`).
        default_k: results `search_tools` returns when `k` is not given.

    Descriptions are kept short: these three definitions are what a client pays for every turn.
    """
    tools = [
        types.Tool(
            name=f"{prefix}search_tools",
            description=(
                "Find tools for a task among all servers' tools (most are not listed). "
                "Returns one line per tool: name(arguments) - purpose."
            ),
            input_schema={
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "what you want to do"},
                    "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": default_k},
                },
                "required": ["query"],
            },
            annotations=types.ToolAnnotations(read_only_hint=True, idempotent_hint=True),
        ),
        types.Tool(
            name=f"{prefix}get_tool_schema",
            description="Full definition (description and JSON input schema) of a tool found by search_tools.",
            input_schema={
                "type": "object",
                "properties": {"name": {"type": "string"}},
                "required": ["name"],
            },
            annotations=types.ToolAnnotations(read_only_hint=True, idempotent_hint=True),
        ),
    ]
    if with_call:
        tools.append(
            types.Tool(
                name=f"{prefix}call_tool",
                description="Call any tool by its exact name (listed or found by search_tools).",
                input_schema={
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "arguments": {"type": "object"}},
                    "required": ["name"],
                },
                annotations=types.ToolAnnotations(read_only_hint=False, open_world_hint=True),
            )
        )
    return tools


def _text(text: str, *, is_error: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {"content": [{"type": "text", "text": text}]}
    if is_error:
        result["isError"] = True
    return result


def _fingerprint(tools: Sequence[types.Tool]) -> str:
    h = hashlib.sha1()
    for t in tools:
        h.update(t.model_dump_json(by_alias=True, exclude_none=True).encode())
    return h.hexdigest()


def pinned(tools: Iterable[types.Tool], patterns: Sequence[str]) -> list[types.Tool]:
    """Tools whose name matches one of `patterns` (exact names or `fnmatch` globs, e.g. `memory__*`)."""
    if not patterns:
        return []
    exact = set(patterns)
    globs = [p for p in patterns if any(c in p for c in "*?[")]
    return [t for t in tools if t.name in exact or any(fnmatch.fnmatchcase(t.name, g) for g in globs)]


class SearchTools:
    """The discovery tools of one gateway, with a search index kept in sync with its catalog.

    Args:
        gateway: the gateway (its config names the tools; `call_tool` goes through its pipeline).
        pins: `always_visible` tool names or globs, listed in every mode.
        default_k: results per search when the caller gives no `k`.
        index: a prepared index (tests); by default one with the packaged embedding model, loaded
            in a worker thread on the first `on_catalog`.
        line_format: one result line per tool (code mode may show Python call signatures instead).
        schema_extra: more text for `get_tool_schema` by tool name (code mode: the Python stub), or None.

    Lifecycle: call `await on_catalog(gateway.catalog)` whenever the catalog changes (and once after
    start); only servers whose tool definitions changed are re-indexed.
    """

    def __init__(
        self,
        gateway: GatewayAPI,
        *,
        pins: Sequence[str] = (),
        default_k: int = 10,
        index: ToolIndex | None = None,
        line_format: LineFormat = compact_line,
        schema_extra: Callable[[str], str | None] | None = None,
    ) -> None:
        self.gateway = gateway
        cfg = gateway.config.gateway
        self.prefix = f"{cfg.name}{cfg.separator}"
        self.pins = list(pins)
        self.default_k = default_k
        self.line_format = line_format
        self.schema_extra = schema_extra
        self.index = index
        self._fingerprints: dict[str, str] = {}
        self._sync = asyncio.Lock()
        self.tools = discovery_tools(self.prefix, default_k=default_k)
        """search_tools, get_tool_schema, call_tool (search mode lists all three)."""
        self.search_name, self.schema_name, self.call_name = (t.name for t in self.tools)
        self.handlers: dict[str, Handler] = {
            self.search_name: self._search,
            self.schema_name: self._schema,
            self.call_name: self._call,
        }
        self._own_server = f"{cfg.name} (gateway)"

    # ---- what a client sees ----
    def listed(self, exposure: Exposure, extra: Sequence[types.Tool] = ()) -> list[types.Tool]:
        """The tools/list of a connection in `exposure` mode.

        Args:
            exposure: `full`, `search` or `code`.
            extra: in code mode, the `execute_code` definition (owned by code mode).

        Returns:
            full: the catalog's tools then the gateway's own; search: the three discovery tools then
            the pins; code: search_tools, get_tool_schema, `extra`, then the pins.

        Raises:
            ValueError: an unknown exposure.
        """
        catalog = self.gateway.catalog.tools
        own = self.gateway.own_tools()
        if exposure == "full":
            return catalog + own
        pins = pinned([*catalog, *own], self.pins)
        if exposure == "search":
            return self.tools + pins
        if exposure == "code":
            return self.tools[:2] + list(extra) + pins
        raise ValueError(f"exposure must be one of {', '.join(EXPOSURES)} (got {exposure!r})")

    # ---- index maintenance ----
    async def on_catalog(self, catalog: GatewayCatalog) -> list[str]:
        """Re-index the servers whose tools changed since the last call; drop servers that left.

        Embedding runs in a worker thread (a 30-tool server takes ~25 ms; the model loads once, ~1 s).

        Returns:
            the servers re-indexed or dropped.
        """
        by_server: dict[str, list[types.Tool]] = {}
        for tool in catalog.tools:
            route = catalog.tool_routes.get(tool.name)
            if route is not None:
                by_server.setdefault(route.server, []).append(tool)
        async with self._sync:
            if self.index is None:
                self.index = ToolIndex(await anyio.to_thread.run_sync(default_embedder))
                own = self.gateway.own_tools()
                await anyio.to_thread.run_sync(self.index.add_tools, self._own_server, own)
            index = self.index
            changed: list[str] = []
            for server in [s for s in self._fingerprints if s not in by_server]:
                index.remove_server(server)
                del self._fingerprints[server]
                changed.append(server)
            for server, tools in by_server.items():
                fp = _fingerprint(tools)
                if self._fingerprints.get(server) == fp:
                    continue
                docs = [self._doc(server, t, catalog) for t in tools]
                await anyio.to_thread.run_sync(index.add_tools, server, docs)
                self._fingerprints[server] = fp
                changed.append(server)
            if changed:
                await anyio.to_thread.run_sync(index.refresh)
            return changed

    def _doc(self, server: str, tool: types.Tool, catalog: GatewayCatalog) -> ToolDoc:
        route = catalog.tool_routes.get(tool.name)
        up = self.gateway.upstreams.get(server)
        about: list[str] = []
        if up is not None:
            about.append(str(getattr(up.cfg, "description", None) or ""))
            session = getattr(up, "session", None)
            about.append(str(getattr(session, "instructions", None) or "") if session is not None else "")
        return ToolDoc.of(
            server,
            tool,
            upstream_name=route.name if route else None,
            server_description=" ".join(a for a in about if a),
        )

    # ---- handlers ----
    def search(self, query: str, k: int | None = None) -> list[SearchHit]:
        """Hybrid search over the indexed catalog (empty before the first `on_catalog`)."""
        if self.index is None:
            return []
        return self.index.search(query, k or self.default_k)

    async def _search(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        query = arguments.get("query")
        if not isinstance(query, str) or not query.strip():
            raise MCPError(code=INVALID_PARAMS, message="search_tools: 'query' must be a non-empty string")
        k = arguments.get("k", self.default_k)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
            raise MCPError(code=INVALID_PARAMS, message=f"search_tools: 'k' must be an integer from 1 to {MAX_K}")
        hits = self.search(query, k)
        if not hits:
            return _text("No tool matches; try other words (what the tool does, not how).")
        return _text("\n".join(self.line_format(h.doc) for h in hits))

    def _definition(self, name: str) -> types.Tool | None:
        for tool in self.gateway.catalog.tools:
            if tool.name == name:
                return tool
        for tool in self.gateway.own_tools():
            if tool.name == name:
                return tool
        return None

    async def _schema(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        name = arguments.get("name")
        if not isinstance(name, str) or not name:
            raise MCPError(code=INVALID_PARAMS, message="get_tool_schema: 'name' must be a tool name")
        tool = self._definition(name)
        if tool is None:
            near = [h.doc.name for h in self.search(name, 3)]
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise MCPError(code=INVALID_PARAMS, message=f"get_tool_schema: no tool named {name!r}{hint}")
        body = tool.model_dump(by_alias=True, exclude_none=True, mode="json")
        body.pop("_meta", None)
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        extra = self.schema_extra(name) if self.schema_extra is not None else None
        return _text(f"{text}\n\n{extra}" if extra else text)

    async def _call(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        name = arguments.get("name")
        if not isinstance(name, str) or not name:
            raise MCPError(code=INVALID_PARAMS, message="call_tool: 'name' must be a tool name")
        if name == self.call_name:
            raise MCPError(code=INVALID_PARAMS, message="call_tool: cannot call itself")
        args = arguments.get("arguments") or {}
        if not isinstance(args, dict):
            raise MCPError(code=INVALID_PARAMS, message="call_tool: 'arguments' must be an object")
        if name in self.handlers:
            return await self.handlers[name](args, link)
        return await self.gateway.call_tool({"name": name, "arguments": args}, link)
