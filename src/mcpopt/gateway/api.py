"""`GatewayAPI`: the narrow interface the gateway offers its plugins.

Plugins -- the gateway's own tools, discovery (search), code mode, workflows, the monitor's tools
and dashboard -- depend on this protocol, never on the `Gateway` class, so there is no import
cycle between the gateway and what it is assembled from (ARCHITECTURE.md, "Who may know whom").
`mcpopt.gateway.assembly.build_gateway` builds the gateway and hands itself to each plugin as a
`GatewayAPI`.

Tool handlers have one shape everywhere: `async (arguments, link) -> dict`, the raw
`CallToolResult` wire dict (`{"content": [...], "structuredContent"?: {...}, "isError"?: bool}`);
they raise `mcp.shared.exceptions.MCPError` for protocol errors (e.g. `-32602` for bad arguments).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import mcp_types as types

from mcpopt.gateway.link import ClientLink

if TYPE_CHECKING:
    from mcpopt.cache import ResultCache
    from mcpopt.config import Config
    from mcpopt.gateway.catalog import GatewayCatalog
    from mcpopt.pipeline.shaping import ResultStore
    from mcpopt.upstream.pool import ServerPool

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

    config: Config
    catalog: GatewayCatalog
    upstreams: Mapping[str, ServerPool]
    cache: ResultCache
    results: ResultStore

    async def call_tool(self, params: Mapping[str, Any] | None, link: ClientLink) -> dict[str, Any]:
        """Run one `tools/call` (raw params: `{"name", "arguments"?, "_meta"?}`) through the whole
        request path -- policy, limits, pipeline, upstream -- as the client behind `link`.

        Raises:
            MCPError: unknown tool, refused by policy, bad params, upstream errors.
        """
        ...

    def own_tools(self) -> list[types.Tool]:
        """The gateway's own tools (batch, cache, monitor, ... and plugin tools), in listing order."""
        ...

    def add_tool(self, tool: types.Tool, handler: ToolHandler, *, listed: bool = True) -> None:
        """Register a gateway tool. `listed=False`: callable by name but not in `tools/list` in full
        mode (e.g. `execute_code`, which exposure modes list themselves)."""
        ...

    def status(self) -> list[dict[str, Any]]:
        """One row per upstream: server, state, transport, protocol, counts, restarts, error."""
        ...
