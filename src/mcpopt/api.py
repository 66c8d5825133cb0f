"""The interface between the gateway and what it is assembled from.

- `ClientLink`: how the gateway reaches the client behind one request (its era, channels,
  partition, session and principal). The fronts build one per request; the dispatcher and every
  plugin pass it along.
- `GatewayAPI`: the narrow protocol the gateway offers its plugins -- the gateway's own tools,
  discovery (search), code mode, workflows, the monitor's tools and dashboard. Plugins depend on
  this module, never on the `Gateway` class, so there is no import cycle between the gateway and
  its parts (ARCHITECTURE.md, "Who may know whom"); `mcpopt.gateway.assembly.build_gateway`
  builds the gateway and hands it to each plugin as a `GatewayAPI`.

Tool handlers have one shape everywhere: `async (arguments, link) -> dict`, the raw
`CallToolResult` wire dict (`{"content": [...], "structuredContent"?: {...}, "isError"?: bool}`);
they raise `mcp.shared.exceptions.MCPError` for protocol errors (e.g. `-32602` for bad arguments).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import mcp_types as types
from mcp.server.connection import Connection

from mcpopt.upstream.server import ProgressFn

if TYPE_CHECKING:
    from mcpopt.cache import ResultCache
    from mcpopt.catalog import GatewayCatalog
    from mcpopt.config import Config
    from mcpopt.pipeline.shaping import ResultStore
    from mcpopt.upstream.pool import ServerPool


async def no_progress(progress: float, total: float | None, message: str | None) -> None:
    """A progress relay that drops everything (a caller that asked for no progress)."""
    return None


@dataclass(slots=True)
class ClientLink:
    """How the gateway reaches the client behind one request.

    Attributes:
        version: the protocol version the client speaks on this request.
        connection: the SDK `Connection` (None when not known).
        requests: has `send_raw_request(method, params, opts)` for server-to-client requests,
            or None when the client cannot take requests (2026-07-28, or no back-channel).
        notify: `async (method, params)` sending a notification tied to this request.
        relay: builds the progress relay for the client's progress token.
        partition: the caller's auth partition: results are never shared across partitions.
        session_id: an id of the client's connection (sticky routing, telemetry).
        principal: who is calling (None on a front without authentication, e.g. stdio).
        progress_token: the progress token of the call a gateway tool is handling (None: the
            client asked for no progress); the tool reports with `relay(progress_token)`.
    """

    version: str
    connection: Connection | None
    requests: Any
    notify: Callable[..., Awaitable[None]] | None
    relay: Callable[[Any], ProgressFn]
    partition: str = ""
    session_id: str = ""
    principal: Any = None
    progress_token: Any = None


@dataclass(slots=True)
class Caller:
    """A client call in flight to an upstream: where that upstream's requests and logs go."""

    modern: bool
    requests: Any
    notify: Callable[..., Awaitable[None]] | None
    log_level: str | None
    """The lowest level of log messages this client wants (None: none)."""


def session_id_of(conn: Connection | None) -> str:
    """The client connection's id: the Streamable HTTP session id, else one per connection object."""
    if conn is None:
        return ""
    return conn.session_id or f"conn-{id(conn):x}"


def partition_of(authorization: str | None) -> str:
    """A caller's auth partition: BLAKE2b-64 of its Authorization header ("" without one).

    Cached and coalesced results are never shared across partitions.
    """
    return hashlib.blake2b(authorization.encode(), digest_size=8).hexdigest() if authorization else ""


ToolHandler = Callable[[dict[str, Any], ClientLink], Awaitable[dict[str, Any]]]
"""`async (arguments, link) -> raw CallToolResult dict` (see the module docstring)."""


class GatewayAPI(Protocol):
    """What a plugin may use of the gateway.

    Attributes:
        config: the loaded configuration.
        catalog: the current aggregated catalog (swapped whole on every change; read it again
            rather than keeping it).
        upstreams: server name -> its replica pool (state, catalog, capabilities; read-only use).
        cache: the result cache (purge, invalidate, stats).
        results: shaped results kept whole (`mcpopt://results/<id>`).
    """

    @property
    def config(self) -> Config: ...

    @property
    def catalog(self) -> GatewayCatalog: ...

    @property
    def upstreams(self) -> Mapping[str, ServerPool]: ...

    @property
    def cache(self) -> ResultCache: ...

    @property
    def results(self) -> ResultStore: ...

    async def call_tool(self, params: Mapping[str, Any] | None, link: ClientLink) -> dict[str, Any]:
        """Run one `tools/call` (raw params: `{"name", "arguments"?, "_meta"?}`) through the whole
        request path -- policy, limits, pipeline, upstream -- as the client behind `link`.

        Raises:
            MCPError: unknown tool, refused by policy, bad params, upstream errors.
        """
        ...

    def may_call(self, principal: Any, name: str, exposure: str | None = None) -> bool:
        """True when `principal` (a `mcpopt.auth.Principal`, None for the local user) may call the
        tool `name`: lists and search results show exactly these."""
        ...

    def own_tools(self) -> list[types.Tool]:
        """The gateway's own tools (batch, cache, monitor, ... and plugin tools), in listing order."""
        ...

    def add_tool(self, tool: types.Tool, handler: ToolHandler, *, listed: bool = True) -> None:
        """Register a gateway tool (replacing one of the same name). `listed=False`: callable by
        name but not in `tools/list` in full mode (e.g. `execute_code`, which exposure modes list
        themselves)."""
        ...

    def remove_tool(self, name: str) -> None:
        """Withdraw a gateway tool (no-op when there is none of that name)."""
        ...

    async def tools_changed(self) -> None:
        """Tell connected clients the tool list changed (`notifications/tools/list_changed`), after
        a plugin added or removed tools while the gateway runs."""
        ...

    def status(self) -> list[dict[str, Any]]:
        """One row per upstream: server, state, transport, protocol, counts, restarts, error."""
        ...
