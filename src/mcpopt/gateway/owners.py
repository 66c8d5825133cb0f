"""Who owns an upstream session, and where an isolated session's messages go.

`isolation` (per server, `mcpopt.config.ServerConfig.isolation`) decides whose calls share an
upstream session: everyone's (`shared`), one principal's (`principal`: the default when
`gateway.auth` is on), or one client session's (`session`). The owner key of a call is "" for the
shared pool, else the principal's key or the client session id.

`OwnerListener` is the `UpstreamListener` of an isolated session: its server-to-client requests
(roots, sampling, elicitation) and log messages go only to the owner's calls in flight, its
resource updates only to the owner's subscribed connections, and its catalog changes are not
the gateway's (the shared pool's catalog is what clients list). Nothing an isolated session
says reaches another owner.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import mcp_types as types
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from mcpopt.catalog import Namer
from mcpopt.config import Config
from mcpopt.gateway.clients import Clients
from mcpopt.gateway.eras import MODERN, ask_client
from mcpopt.upstream.server import CatalogKind

ASK_WAIT_S = 10.0
"""How long an isolated session's request waits for its owner to be reachable (seconds)."""


def isolation_modes(config: Config) -> dict[str, str]:
    """Server name -> `shared`, `principal` or `session` (`auto` resolved: `principal` when
    `gateway.auth` is on, else `shared`)."""
    auth = config.gateway.auth.enabled
    modes: dict[str, str] = {}
    for name, cfg in config.active_servers().items():
        mode = cfg.isolation
        if mode == "auto":
            mode = "principal" if auth else "shared"
        modes[name] = mode
    return modes


def caller_key(server: str, owner: str) -> str:
    """The key under which calls in flight to one owner's session of `server` are registered."""
    return f"{server}\0{owner}" if owner else server


class OwnerListener:
    """The listener of one owner's isolated session of `server` (see the module docstring)."""

    def __init__(self, server: str, owner: str, clients: Clients, namer: Namer) -> None:
        self.server = server
        self.owner = owner
        self.key = caller_key(server, owner)
        self.clients = clients
        self.namer = namer

    async def catalog_changed(self, server: str, kinds: set[CatalogKind]) -> None:
        return None  # the shared session's lists are the gateway's

    async def resource_updated(self, server: str, uri: str) -> None:
        await self.clients.resource_updated(self.namer.uri(server, uri), owner=self.owner)

    async def log_message(self, server: str, params: types.LoggingMessageNotificationParams) -> None:
        data = params.model_dump(by_alias=True, mode="json", exclude_none=True)
        data["logger"] = f"{server}/{data['logger']}" if data.get("logger") else server
        await self.clients.log(self.key, params.level, data, broadcast=False)

    async def client_request(self, server: str, request: types.InputRequest) -> Any:
        """Ask the owner: on a call of its in flight, else on its latest connection's own channel;
        when neither is there yet but the owner is a handshake-era client (its stream may still be
        opening), wait up to `ASK_WAIT_S`."""
        for caller in reversed(self.clients.callers(self.key)):
            if caller.ask is not None:  # a 2026-07-28 client's call: asked in its next round (gateway.bridge)
                return await caller.ask(request)
        deadline = anyio.current_time() + ASK_WAIT_S
        while True:
            channel = self._channel(request.method)
            if channel is not None:
                try:
                    return await ask_client(channel, request)
                except MCPError as exc:
                    return exc.error
            conn = self.clients.owner_connection(self.owner)
            reachable = conn is not None and conn.protocol_version not in MODERN  # a 2026-07-28 client never is
            if not reachable or anyio.current_time() >= deadline:
                return types.ErrorData(
                    code=INVALID_PARAMS,
                    message=f"no client of this session can answer {request.method} for MCP server '{server}' "
                    "(no call in flight, no open stream)",
                )
            await anyio.sleep(0.05)

    async def elicitation_complete(self, server: str, elicitation_id: str) -> None:
        """To the owner's handshake-era call in flight only (never to other owners' connections)."""
        for caller in reversed(self.clients.callers(self.key)):
            if not caller.modern and caller.notify is not None:
                with contextlib.suppress(Exception):
                    await caller.notify("notifications/elicitation/complete", {"elicitationId": elicitation_id})
                return

    def _channel(self, method: str) -> Any:
        conn = self.clients.owner_connection(self.owner)
        standalone = (
            conn.outbound
            if conn is not None and conn.protocol_version not in MODERN and conn.has_standalone_channel
            else None
        )
        if method == "roots/list" and standalone is not None:
            # Roots are the client's, not a call's: asked on the client's own channel rather than on
            # the stream of whatever call is in flight (which may end before the answer comes).
            return standalone
        for caller in reversed(self.clients.callers(self.key)):
            if not caller.modern and caller.requests is not None:
                return caller.requests
        # Between calls (e.g. the server re-asks roots after `roots/list_changed`): the owner's own
        # latest connection, when it has a channel for server-to-client requests.
        return standalone
