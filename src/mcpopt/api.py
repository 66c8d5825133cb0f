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
from dataclasses import dataclass, replace
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


NESTED_PROGRESS_TOKEN = "mcpopt-nested"
"""The progress token of a call a gateway tool makes: any token works, as its relay is fixed."""


def nested_call(
    name: str, arguments: dict[str, Any], link: ClientLink, progress: ProgressFn | None = None
) -> tuple[dict[str, Any], ClientLink]:
    """The params and link of a `tools/call` a gateway tool makes for the client behind `link`.

    The nested call asks its upstream for progress when there is somewhere to send it: `progress`
    (e.g. a `ProgressSum` part), else the client's own token (`client_progress(link)`); without
    either it asks for none. Issue 11, failure 4: progress was lost through `call_tool` and `batch`.

    Returns:
        `({"name", "arguments", "_meta"?}, link)` for `GatewayAPI.call_tool`.
    """
    target = progress or client_progress(link)
    params: dict[str, Any] = {"name": name, "arguments": arguments}
    if target is None:
        return params, replace(link, progress_token=None)
    params["_meta"] = {"progressToken": NESTED_PROGRESS_TOKEN}
    return params, replace(link, relay=lambda _token: target, progress_token=None)


def client_progress(link: ClientLink) -> ProgressFn | None:
    """The relay of the progress token of the call a gateway tool is handling (None: the client
    asked for none)."""
    return link.relay(link.progress_token) if link.progress_token is not None else None


class ProgressSum:
    """Several nested calls' progress as one stream on the client's progress token.

    Each part reports `(progress, total, message)` as MCP does; its fraction done is
    `progress / total` (0 while it gives no total), and 1 once `done(i)`. The client sees
    `progress = sum of fractions` (strictly increasing: a report that would not raise it is not
    sent, as the spec requires progress to increase), with `total = parts` when the number of parts
    is known (`mcpopt__batch`) and no total otherwise (code mode, whose calls are not known
    beforehand). Messages name the part: `"<label>: <message>"`.

    Args:
        send: the client's relay (`ClientLink.progress`).
        parts: how many parts there are (None: unknown, parts are added as they start).
    """

    def __init__(self, send: ProgressFn, parts: int | None = None) -> None:
        self._send = send
        self._parts = parts
        self._fractions: list[float] = [0.0] * (parts or 0)
        self._sent = 0.0

    def part(self, index: int | None, label: str) -> tuple[int, ProgressFn]:
        """The relay of part `index` (a new part when None); returns `(index, relay)`."""
        if index is None:
            index = len(self._fractions)
            self._fractions.append(0.0)

        async def relay(progress: float, total: float | None, message: str | None) -> None:
            if total:
                self._fractions[index] = max(self._fractions[index], min(progress / total, 1.0))
            await self._report(f"{label}: {message}" if message else label)

        return index, relay

    async def done(self, index: int, label: str) -> None:
        """Part `index` finished (with a result or an error)."""
        self._fractions[index] = 1.0
        await self._report(f"{label}: done")

    async def _report(self, message: str) -> None:
        value = round(sum(self._fractions), 6)
        if value <= self._sent:
            return
        self._sent = value
        await self._send(value, float(self._parts) if self._parts else None, message)


@dataclass(slots=True)
class Caller:
    """A client call in flight to an upstream: where that upstream's requests and logs go."""

    modern: bool
    requests: Any
    notify: Callable[..., Awaitable[None]] | None
    log_level: str | None
    """The lowest level of log messages this client wants (None: none)."""
    ask: Callable[[types.InputRequest], Awaitable[types.InputResponse | types.ErrorData]] | None = None
    """How this call answers its upstream's server-to-client requests when the client cannot take
    them itself (a 2026-07-28 client: `mcpopt.gateway.bridge`); None: send them to `requests`."""


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
