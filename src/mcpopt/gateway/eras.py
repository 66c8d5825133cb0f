"""Era adaptation: what changes when a client and an upstream speak different protocol eras.

The handshake era (2024-11-05..2025-11-25) and the stateless 2026-07-28 revision differ in the
request envelope (`_meta` keys describing the client's connection), in result fields
(`resultType`, SEP-2549's `ttlMs`/`cacheScope`, the `serverInfo` stamp) and in how a server asks
its client for input (server-to-client requests vs an `InputRequiredResult`, SEP-2322). The
gateway forwards what it does not need to understand; these functions adapt only the envelope,
top-level keys only, so they cost a few dict operations per call.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Mapping
from typing import Any

import mcp_types as types
from mcp.client._input_required import run_input_required_driver
from mcp.shared.exceptions import MCPError
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    INVALID_PARAMS,
    LOG_LEVEL_META_KEY,
    PROTOCOL_VERSION_META_KEY,
    SERVER_INFO_META_KEY,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from mcpopt.api import Caller, ClientLink

ENVELOPE_KEYS = (PROTOCOL_VERSION_META_KEY, CLIENT_INFO_META_KEY, CLIENT_CAPABILITIES_META_KEY, LOG_LEVEL_META_KEY)
"""2026-07-28 request `_meta` keys that describe the client's own connection: never forwarded."""
MODERN_RESULT_KEYS = ("resultType", "ttlMs", "cacheScope")
"""Result fields that exist only from 2026-07-28 on; dropped for handshake-era clients."""
MODERN = frozenset(MODERN_PROTOCOL_VERSIONS)
"""Protocol versions of the stateless era (2026-07-28 on)."""

INPUT_RESULT_TYPES: dict[str, Any] = {
    "sampling/createMessage": types.CreateMessageResult,
    "elicitation/create": types.ElicitResult,
    "roots/list": types.ListRootsResult,
}
"""The result model of each server-to-client request an upstream may make."""


HANDSHAKE_FORWARDED_CAPABILITIES = ("sampling", "elicitation", "roots", "experimental")
"""What a handshake-era client's `initialize` capabilities tell a 2026-07-28 upstream: what the
gateway can relay to that client (its 2025 `tasks` and any `extensions` are not 2026 surfaces)."""
_handshake_caps: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def client_capabilities(link: ClientLink, meta: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The calling client's capabilities, as a 2026-07-28 upstream should see them in its request's
    `_meta` (`io.modelcontextprotocol/clientCapabilities`), or None when the gateway has no client
    to speak for (its own calls: cache warm-up).

    The gateway asks its upstreams on the client's behalf, so an upstream must plan with the
    client's capabilities, not the gateway's: it asks only for input that client can give, and
    refuses with -32021 what needs a capability the client lacks (SEP-2575; a server MUST NOT rely
    on capabilities the client has not declared). A 2026-07-28 client's own per-request value is
    passed on as it is; a handshake-era client's comes from its `initialize` (computed once per
    connection), limited to `HANDSHAKE_FORWARDED_CAPABILITIES`.

    Args:
        link: the calling client.
        meta: the client's request `_meta` (raw, before the envelope keys are dropped).
    """
    if link.version in MODERN:
        caps = meta.get(CLIENT_CAPABILITIES_META_KEY) if meta else None
        return caps if isinstance(caps, dict) else None
    conn = link.connection
    if conn is None or conn.client_params is None:
        return None
    found = _handshake_caps.get(conn)
    if found is None:
        dumped = conn.client_params.capabilities.model_dump(by_alias=True, mode="json", exclude_none=True)
        found = _handshake_caps[conn] = {k: v for k, v in dumped.items() if k in HANDSHAKE_FORWARDED_CAPABILITIES}
    return found


RESOURCE_NOT_FOUND_HANDSHAKE = -32002
"""`resources/read` of an unknown URI through 2025-11-25; 2026-07-28 uses -32602 with the URI in
`data` (SEP-2164)."""


def resource_not_found(version: str, uri: str, message: str) -> MCPError:
    """The gateway's own "no such resource" error, in the client's era's code, naming `uri` in data."""
    code = INVALID_PARAMS if version in MODERN else RESOURCE_NOT_FOUND_HANDSHAKE
    return MCPError(code=code, message=message, data={"uri": uri})


def resource_error(version: str, exc: MCPError, uri: str, upstream_uri: str) -> MCPError:
    """An upstream's `resources/read` error for the client's era (SEP-2164).

    A handshake-era upstream's -32002 reaches a 2026-07-28 client as -32602; a 2026-07-28
    upstream's -32602 naming the URI it was asked for (`data.uri`, the SEP-2164 shape) reaches a
    handshake-era client as -32002. Either way `data.uri` is the client's (gateway) URI. Other
    errors pass unchanged.
    """
    err = exc.error
    data = err.data if isinstance(err.data, dict) else {}
    if version in MODERN and err.code == RESOURCE_NOT_FOUND_HANDSHAKE:
        return MCPError(code=INVALID_PARAMS, message=err.message, data={**data, "uri": uri})
    if version not in MODERN and err.code == INVALID_PARAMS and data.get("uri") == upstream_uri:
        return MCPError(code=RESOURCE_NOT_FOUND_HANDSHAKE, message=err.message, data={**data, "uri": uri})
    return exc


def forward_params(params: Mapping[str, Any] | None, **updates: Any) -> dict[str, Any]:
    """A copy of a client's request params for `Gateway.forward`: `updates` applied, the client's
    own 2026-07-28 envelope keys dropped from `_meta` (the upstream session stamps its own) except
    its `clientCapabilities`, which `Gateway.forward` hands on to a 2026-07-28 upstream (see
    `client_capabilities`) and drops for a handshake-era one."""
    out = dict(params or {})
    out.update(updates)
    meta = out.get("_meta")
    if isinstance(meta, Mapping):
        meta = {k: v for k, v in meta.items() if k not in ENVELOPE_KEYS or k == CLIENT_CAPABILITIES_META_KEY}
        if meta:
            out["_meta"] = meta
        else:
            del out["_meta"]
    return out


def envelope(version: str, result: dict[str, Any], stamp: dict[str, Any]) -> dict[str, Any]:
    """Adapt a forwarded result's envelope to the client's era (cheap: top-level keys only).

    A 2026-07-28 client gets `resultType` (default "complete") and the gateway's `serverInfo`
    stamp in `_meta`; a handshake-era client gets neither, nor the SEP-2549 cache hints.

    Args:
        version: the client's protocol version on this request.
        result: the raw result dict (not modified).
        stamp: `{"name", "version"}` of the gateway.
    """
    if version in MODERN:
        meta = result.get("_meta")
        result = dict(result)
        result.setdefault("resultType", "complete")
        result["_meta"] = (
            {**meta, SERVER_INFO_META_KEY: stamp} if isinstance(meta, dict) else {SERVER_INFO_META_KEY: stamp}
        )
        return result
    meta = result.get("_meta")
    if (
        "resultType" in result
        or "ttlMs" in result
        or "cacheScope" in result
        or (isinstance(meta, dict) and SERVER_INFO_META_KEY in meta)
    ):
        result = {k: v for k, v in result.items() if k not in MODERN_RESULT_KEYS}
        meta = result.get("_meta")
        if isinstance(meta, dict) and SERVER_INFO_META_KEY in meta:
            meta = {k: v for k, v in meta.items() if k != SERVER_INFO_META_KEY}
            if meta:
                result["_meta"] = meta
            else:
                del result["_meta"]
    return result


def modern_forwarded(method: str, result: dict[str, Any]) -> dict[str, Any]:
    """A non-tool result forwarded to a 2026-07-28 client: `resultType` (a handshake-era upstream
    gives none: "complete"), and for `resources/read` the SEP-2549 hints saying "not cacheable"."""
    result = dict(result)
    result.setdefault("resultType", "complete")
    if method == "resources/read":
        result.setdefault("ttlMs", 0)
        result.setdefault("cacheScope", "private")
    return result


async def ask_client(channel: Any, request: types.InputRequest) -> types.InputResponse:
    """Send a server-to-client request on the client's channel (on HTTP, the call's own stream).

    Raises:
        MCPError: the client answered with an error (or cannot be reached).
    """
    data = request.model_dump(by_alias=True, mode="json", exclude_none=True)
    params = data.get("params")
    if data["method"] == "elicitation/create" and isinstance(params, dict) and params.get("mode") == "url":
        # A 2026-07-28 upstream's URL elicitation has no `elicitationId` (removed in that revision);
        # handshake-era clients require one (2025-11-25): mint an opaque, unique one.
        params.setdefault("elicitationId", f"mcpopt-{uuid.uuid4().hex}")
    raw = await channel.send_raw_request(data["method"], params, None)
    result_type = INPUT_RESULT_TYPES[data["method"]]
    if data["method"] == "sampling/createMessage" and isinstance(raw.get("content"), list):
        result_type = types.CreateMessageResultWithTools
    return result_type.model_validate(raw, by_name=False)


async def drive_input_required(
    caller: Caller, server: str, request: Any, method: str, params: dict[str, Any], first: dict[str, Any]
) -> dict[str, Any]:
    """Resolve a 2026-07-28 `InputRequiredResult` for a handshake-era client (SEP-2322).

    The embedded input requests become server-to-client requests on the client's connection
    (sampling/createMessage, elicitation/create, roots/list); the original request is retried
    upstream with `inputResponses` and `requestState` until it completes.

    Args:
        caller: the client call in flight (its request channel).
        server: the upstream's name (for errors).
        request: `async (method, params) -> raw result` sending one request to that upstream.
        method, params: the original request.
        first: the upstream's first (input-required) result.

    Raises:
        MCPError: INVALID_PARAMS when the client connection cannot carry requests.
    """
    channel = caller.requests
    if channel is None:
        raise MCPError(
            code=INVALID_PARAMS,
            message=f"MCP server '{server}' needs input from the client (sampling, elicitation or roots), "
            "and this client connection cannot carry requests",
        )
    parsed = types.InputRequiredResult.model_validate(first, by_name=False)

    async def dispatch(_key: str, input_request: types.InputRequest) -> types.InputResponse | types.ErrorData:
        try:
            return await ask_client(channel, input_request)
        except MCPError as exc:
            return exc.error

    async def retry(responses: types.InputResponses | None, state: str | None) -> Any:
        again = dict(params)
        if responses is not None:
            again["inputResponses"] = {
                k: v.model_dump(by_alias=True, mode="json", exclude_none=True) for k, v in responses.items()
            }
        if state is not None:
            again["requestState"] = state
        raw = await request(method, again)
        if raw.get("resultType") == "input_required":
            return types.InputRequiredResult.model_validate(raw, by_name=False)
        return raw

    return await run_input_required_driver(parsed, dispatch=dispatch, retry=retry)


HANDSHAKE_ONLY = (
    "via server-initiated requests is unavailable on 2026-07-28",  # FastMCP 4.1: ctx.elicit / ctx.sample
    "no back-channel for server-initiated requests",  # the mcp SDK's NoBackChannelError
)
"""What servers say when a tool asks its client mid-call on a 2026-07-28 connection, which has no
channel for server-initiated requests (issue 11, failure 3)."""


def asks_the_handshake_way(result: Mapping[str, Any] | None = None, error: MCPError | None = None) -> bool:
    """True when a 2026-07-28 upstream's tool result (`isError`) or JSON-RPC error says the tool
    needed a server-initiated request (sampling, elicitation, roots) that era cannot carry."""
    if error is not None:
        text = error.error.message
    elif result is not None and result.get("isError"):
        content = result.get("content")
        text = " ".join(c.get("text", "") for c in content if isinstance(c, dict)) if isinstance(content, list) else ""
    else:
        return False
    return any(phrase in text for phrase in HANDSHAKE_ONLY)
