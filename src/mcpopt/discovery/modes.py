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
from cachetools import LRUCache
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from mcpopt.api import nested_call

if TYPE_CHECKING:
    # The index (numpy, the embedding model, the dictionary) loads on the first catalog sync, not
    # when the gateway imports this module (issue 17: idle RSS).
    from mcpopt.api import ClientLink, GatewayAPI
    from mcpopt.catalog import GatewayCatalog
    from mcpopt.discovery.index import SearchHit, ToolDoc, ToolIndex
    from mcpopt.pipeline import Next, ToolCall, ToolResult

logger = logging.getLogger(__name__)

Exposure = Literal["full", "search", "code"]
EXPOSURES: tuple[Exposure, ...] = ("full", "search", "code")
Handler = Callable[[dict[str, Any], "ClientLink"], Awaitable[dict[str, Any]]]
LineFormat = Callable[["ToolDoc"], str]
SearchSource = Callable[[str, int, "ClientLink"], list[str]]
"""More `search_tools` result lines beside the tools: `(query, k, link) -> lines` (e.g. code mode's
skills of the caller: `CodeModeTool.search_lines`). Called on every search; keep it quick."""

MAX_K = 50
"""Most results one `search_tools` call returns."""
MAX_SESSIONS = 4096
"""Client sessions whose used servers are remembered (least recently used forgotten first)."""


def compact_line(doc: ToolDoc) -> str:
    """One line per tool: `name(arg: type, opt?: type) - purpose` (see `index.compact_line`)."""
    from mcpopt.discovery.index import compact_line as line

    return line(doc)


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


def uses_search(exposure: str, per_client: Iterable[str] = ()) -> bool:
    """Whether any client may be shown `search_tools` (exposure `search` or `code`, by default or per client)."""
    return exposure != "full" or any(mode != "full" for mode in per_client)


def _new_index() -> ToolIndex:
    """An index with the packaged embedding model (a worker thread runs this: it loads the model)."""
    from mcpopt.discovery.embed import default_embedder
    from mcpopt.discovery.index import ToolIndex

    return ToolIndex(default_embedder())


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
        eager: bool | None = None,
    ) -> None:
        self.gateway = gateway
        cfg = gateway.config.gateway
        self.eager = eager if eager is not None else uses_search(cfg.exposure, cfg.exposure_clients.values())
        """Index each catalog as it comes (a mode that lists search_tools), else on the first search."""
        self._latest: GatewayCatalog | None = None
        self._synced: GatewayCatalog | None = None
        self.prefix = f"{cfg.name}{cfg.separator}"
        self.pins = list(pins)
        self.default_k = default_k
        self.line_format = line_format
        self.schema_extra = schema_extra
        self.index = index
        self._fingerprints: dict[str, str] = {}
        self._sync = asyncio.Lock()
        self._used: LRUCache[str, dict[str, None]] = LRUCache(maxsize=MAX_SESSIONS)
        self.tools = discovery_tools(self.prefix, default_k=default_k)
        """search_tools, get_tool_schema, call_tool (search mode lists all three)."""
        self.search_name, self.schema_name, self.call_name = (t.name for t in self.tools)
        self.handlers: dict[str, Handler] = {
            self.search_name: self._search,
            self.schema_name: self._schema,
            self.call_name: self._call,
        }
        self._own_server = f"{cfg.name} (gateway)"
        self._own_stale = False
        self.sources: list[SearchSource] = []
        """Extra result sources (`add_source`), listed after the tools."""

    def add_source(self, source: SearchSource) -> None:
        """List `source`'s lines after the tools in every `search_tools` result (see `SearchSource`)."""
        if source not in self.sources:
            self.sources.append(source)

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
        """Take a new catalog: re-index the servers whose tools changed and drop servers that left --
        now if `eager`, else on the first search (a gateway in `full` mode that nobody searches never
        loads the model, the dictionary or numpy: issue 17, idle RSS).

        Embedding runs in a worker thread (a 30-tool server takes ~25 ms; the model loads once, ~1 s).

        Returns:
            the servers re-indexed or dropped (none when deferred).
        """
        self._latest = catalog
        if not self.eager:
            return []
        return await self._index(catalog)

    async def ready(self) -> None:
        """Bring the index up to the latest catalog if that was deferred (the first search waits here)."""
        catalog = self._latest if self._latest is not None else self.gateway.catalog
        if catalog is not self._synced or self._own_stale:
            await self._index(catalog)

    async def own_tools_changed(self) -> None:
        """The gateway's own tools changed (e.g. a workflow was created): index them again -- now if
        `eager`, else on the next search."""
        self._own_stale = True
        if self.eager:
            await self._index(self._latest if self._latest is not None else self.gateway.catalog)

    async def _index(self, catalog: GatewayCatalog) -> list[str]:
        by_server: dict[str, list[types.Tool]] = {}
        for tool in catalog.tools:
            route = catalog.tool_routes.get(tool.name)
            if route is not None:
                by_server.setdefault(route.server, []).append(tool)
        async with self._sync:
            if self.index is None:
                self.index = await anyio.to_thread.run_sync(_new_index)
            index = self.index
            changed: list[str] = []
            self._own_stale = False
            own = list(self.gateway.own_tools())
            fp = _fingerprint(own)
            own_changed = self._fingerprints.get(self._own_server) != fp
            if own_changed:
                await anyio.to_thread.run_sync(index.add_tools, self._own_server, own)
                self._fingerprints[self._own_server] = fp
            for server in [s for s in self._fingerprints if s not in by_server and s != self._own_server]:
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
            if changed or own_changed:
                await anyio.to_thread.run_sync(index.refresh)
            self._synced = catalog
            return changed

    def _doc(self, server: str, tool: types.Tool, catalog: GatewayCatalog) -> ToolDoc:
        from mcpopt.discovery.index import ToolDoc

        route = catalog.tool_routes.get(tool.name)
        return ToolDoc.of(
            server,
            tool,
            upstream_name=route.name if route else None,
            server_description=self.server_about(server),
        )

    def server_about(self, server: str) -> str:
        """What is known about a server: its config `description`, then what it says of itself
        (`serverInfo.title` / `description` and the handshake's `instructions`, from the first replica)."""
        up = self.gateway.upstreams.get(server)
        if up is None:
            return ""
        about: list[str] = [str(getattr(up.cfg, "description", None) or "")]
        for replica in getattr(up, "upstreams", ()):
            session = getattr(replica, "session", None)
            if session is None:
                continue
            info = getattr(session, "server_info", None)
            about += [str(getattr(info, "title", None) or ""), str(getattr(info, "description", None) or "")]
            about.append(str(getattr(session, "instructions", None) or ""))
            break
        return " ".join(dict.fromkeys(a.strip() for a in about if a and a.strip()))

    # ---- what a session used (ties go to its servers) ----
    def note_use(self, session_id: str, tool_name: str) -> None:
        """Remember that a client session used (called, or asked the schema of) a tool's server.

        Ties in later `search_tools` results of that session go to the servers it used. Unknown
        tool names and sessions without an id are ignored.
        """
        if not session_id:
            return
        route = self.gateway.catalog.tool_routes.get(tool_name)
        if route is not None:
            self.note_server(session_id, route.server)

    def note_server(self, session_id: str, server: str) -> None:
        """Remember that a client session used a server (see `note_use`); no-op without a session id."""
        if not session_id:
            return
        used = self._used.get(session_id)
        if used is None:
            used = self._used[session_id] = {}
        used.pop(server, None)
        used[server] = None

    async def record_use(self, call: ToolCall, next: Next) -> ToolResult:
        """A pipeline filter (outermost): every upstream call of a session -- from a client, the batch
        tool, `call_tool` or code mode -- marks its server as used by that session, then goes on."""
        self.note_server(call.session_id, call.server)
        return await next(call)

    def used_servers(self, session_id: str) -> list[str]:
        """The servers a session used, least recent first (empty for an unknown session)."""
        used = self._used.get(session_id) if session_id else None
        return list(used) if used else []

    # ---- handlers ----
    def search(self, query: str, k: int | None = None, prefer: Sequence[str] = ()) -> list[SearchHit]:
        """Hybrid search over the indexed catalog (empty before the first `on_catalog`).

        Args:
            query: what the caller wants to do.
            k: results (default `default_k`).
            prefer: servers whose tools win ties (the caller's session's servers).
        """
        if self.index is None:
            return []
        return self.index.search(query, k or self.default_k, prefer=frozenset(prefer))

    async def _search(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        query = arguments.get("query")
        if not isinstance(query, str) or not query.strip():
            raise MCPError(code=INVALID_PARAMS, message="search_tools: 'query' must be a non-empty string")
        k = arguments.get("k", self.default_k)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
            raise MCPError(code=INVALID_PARAMS, message=f"search_tools: 'k' must be an integer from 1 to {MAX_K}")
        await self.ready()
        prefer = self.used_servers(link.session_id)
        if link.principal is None or getattr(link.principal, "is_local", False):
            hits = self.search(query, k, prefer=prefer)
        else:
            # Only what this principal may call: rank among everything, then keep its first k.
            size = len(self.index) if self.index is not None else 0
            ranked = self.search(query, max(k, size), prefer=prefer)
            hits = [h for h in ranked if self.gateway.may_call(link.principal, h.doc.name)][:k]
        lines = [self.line_format(h.doc) for h in hits]
        for source in self.sources:
            try:
                lines.extend(source(query, k, link))
            except Exception as exc:  # noqa: BLE001 - an extra source never breaks tool search
                logger.warning("search_tools source %r failed: %s", source, exc)
        if not lines:
            return _text("No tool matches; try other words (what the tool does, not how).")
        return _text("\n".join(lines))

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
        if tool is not None and not self.gateway.may_call(link.principal, name):
            tool = None  # what a principal may not call does not exist for it
        if tool is None:
            near = [h.doc.name for h in self.search(name, 3) if self.gateway.may_call(link.principal, h.doc.name)]
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise MCPError(code=INVALID_PARAMS, message=f"get_tool_schema: no tool named {name!r}{hint}")
        self.note_use(link.session_id, name)
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
        self.note_use(link.session_id, name)
        params, nested = nested_call(name, args, link)
        return await self.gateway.call_tool(params, nested)
