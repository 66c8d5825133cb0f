"""The HTTP front's edge: where it may listen, which Host/Origin a request may carry, what a JSON-RPC
request must look like, and what `/healthz` tells whom.

In front of every route (`/mcp`, `/metrics`, `/dashboard`, `/dashboard/data`, `/healthz`), in this
order (`wrap_http`):

1. `HostOriginGuard` -- DNS-rebinding protection (MCP transports, "Security Warning": servers MUST
   validate the Origin header, and answer 403 when it is invalid). A Host that is not allowed gets
   421 Misdirected Request (as the SDK answers), an Origin that is not allowed 403, both with a
   JSON-RPC error body without id. Allowed: localhost forms, the bound address, the machine's own
   name when bound to all interfaces, the IP address the request arrived on (an IP literal cannot
   be rebound), and `gateway.http.allowed_hosts` / `allowed_origins`.
2. the authentication layer, when one is given (`authenticate`).
3. `JsonRpcGuard` -- a `POST /mcp` body is read once (bounded by `gateway.http.max_body_bytes`) and
   parsed with orjson; a request whose id is not a string or an integer is answered 400 with
   -32600 and never runs (it used to get a silent 202 while the call still ran). The parsed
   message rides on in `scope["mcpopt.message"]` so nothing parses it again.
4. `SessionGuard` (`mcpopt.gateway.sessions`): session admission without lock-outs.

`bind_refusal` keeps `serve -t http` on a non-loopback address from starting without
authentication unless the operator opts out (`--allow-unauthenticated`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import orjson
from mcp_types import INVALID_REQUEST

from mcpopt.asgi import header_map
from mcpopt.config import Config
from mcpopt.gateway.sessions import PRINCIPAL_SCOPE_KEY, SessionGuard
from mcpopt.wire import request_id_problem

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY_SCOPE_KEY = "mcpopt.body"
MESSAGE_SCOPE_KEY = "mcpopt.message"
"""`scope` keys of a `POST /mcp` body read (bytes) and parsed (the JSON value) by `JsonRpcGuard`."""

_LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})


# ---- who may serve unauthenticated ---------------------------------------------------------
def auth_enabled(config: Config) -> bool:
    """Whether inbound authentication is configured (`gateway.auth` present and enabled)."""
    auth = getattr(config.gateway, "auth", None)
    if auth is None:
        return False
    return bool(getattr(auth, "enabled", True))


def is_loopback(host: str) -> bool:
    """True for `localhost`, loopback IP literals and names that resolve only to loopback addresses."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    if name in _WILDCARDS:
        return False
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def bind_refusal(config: Config, host: str, allow_unauthenticated: bool = False) -> str | None:
    """Why `serve -t http --host <host>` must not start, or None when it may.

    A non-loopback address without `gateway.auth` lets anyone who can reach it call every tool
    (issue 10); the operator may accept that with `--allow-unauthenticated` or
    `gateway.http.allow_unauthenticated: true`.
    """
    if is_loopback(host) or auth_enabled(config):
        return None
    if allow_unauthenticated or config.gateway.http.allow_unauthenticated:
        return None
    shown = host or "all interfaces"
    return (
        f"refusing to serve HTTP on {shown} without authentication: anyone who can reach this address could "
        "call every tool. Configure gateway.auth, bind 127.0.0.1 (the default), or pass --allow-unauthenticated "
        "(gateway.http.allow_unauthenticated: true) if a firewall or proxy in front already restricts who connects."
    )


# ---- Host / Origin -------------------------------------------------------------------------
def split_host(value: str) -> tuple[str, str | None]:
    """`("name", "port" | None)` of a Host header or `host[:port]` (IPv6 in brackets), lowercased."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value, None
        name, rest = value[: end + 1], value[end + 1 :]
        return name, rest[1:] if rest.startswith(":") else None
    if value.count(":") == 1:
        name, port = value.split(":")
        return name, port
    return value, None


def _bare(name: str) -> str:
    return name.strip("[]")


class HostPolicy:
    """Which Host and Origin values the HTTP front answers (see the module doc).

    Args:
        bind_host: the address the server listens on (`0.0.0.0`/`::` for all interfaces).
        allowed_hosts: extra Host values: `name` (any port), `name:port`, `name:*`, or `*` (any).
        allowed_origins: extra Origin values: `scheme://name[:port]`, `scheme://name:*`, or `*`.
    """

    def __init__(self, bind_host: str, allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = ()) -> None:
        hosts = [h.strip().lower() for h in allowed_hosts if h.strip()]
        origins = [o.strip().lower().rstrip("/") for o in allowed_origins if o.strip()]
        self.any_host = "*" in hosts
        self.any_origin = "*" in origins
        self.names: set[str] = set(_LOCAL_NAMES)
        """Host names accepted on any port."""
        self.exact: set[str] = set()
        """`name:port` values accepted."""
        bind = bind_host.strip().lower()
        if bind in _WILDCARDS:
            for name in _machine_names():
                self.names.add(name)
        elif bind:
            self.names.add(bind if ":" not in bind or bind.startswith("[") else f"[{bind}]")
            self.names.add(_bare(bind))
        for entry in hosts:
            if entry == "*":
                continue
            name, port = split_host(entry)
            if port in (None, "*"):
                self.names.add(name)
                self.names.add(_bare(name))
            else:
                self.exact.add(f"{name}:{port}")
        self.origins = {o for o in origins if o != "*" and not o.endswith(":*")}
        self.origin_prefixes = tuple(o[:-1] for o in origins if o.endswith(":*"))

    def host_ok(self, host: str | None, arrived_on: str | None = None) -> bool:
        """Whether a request with this Host header may be answered.

        Args:
            host: the Host header (None when absent: HTTP/1.1 requires one, so refused).
            arrived_on: the local IP address the connection came in on (`scope["server"][0]`).
        """
        if self.any_host:
            return True
        if not host:
            return False
        name, port = split_host(host)
        if name in self.names or _bare(name) in self.names:
            return True
        if port is not None and f"{name}:{port}" in self.exact:
            return True
        if arrived_on:
            try:
                return ipaddress.ip_address(_bare(name)) == ipaddress.ip_address(arrived_on.split("%")[0])
            except ValueError:
                return False
        return False

    def origin_ok(self, origin: str | None, arrived_on: str | None = None) -> bool:
        """Whether a request with this Origin may be answered (no Origin: not a browser, accepted)."""
        if origin is None or self.any_origin:
            return True
        value = origin.strip().lower().rstrip("/")
        if value in self.origins or (self.origin_prefixes and value.startswith(self.origin_prefixes)):
            return True
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
            return False  # "null" (sandboxed frames, file:// pages) and anything else odd
        return self.host_ok(rest, arrived_on)


def _machine_names() -> set[str]:
    """This machine's own names (a LAN client may use them when the server listens on all interfaces)."""
    names: set[str] = set()
    for get in (socket.gethostname, socket.getfqdn):
        try:
            value = get().strip().lower()
        except OSError:
            continue
        if value:
            names.add(value)
    return names


class HostOriginGuard:
    """ASGI layer: 421 for a Host, 403 for an Origin that `policy` does not allow, on every route."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = header_map(scope)
        raw_host = headers.get(b"host")
        raw_origin = headers.get(b"origin")
        host = raw_host.decode("latin-1") if raw_host is not None else None
        origin = raw_origin.decode("latin-1") if raw_origin is not None else None
        server = scope.get("server")
        arrived_on = server[0] if server else None
        policy = self.policy
        if not policy.host_ok(host, arrived_on):
            logger.warning("refused a request with Host %r (not in gateway.http.allowed_hosts)", host)
            return await _json_error(
                send,
                421,
                f"Misdirected Request: Host {host!r} is not served here (add it to gateway.http.allowed_hosts)",
            )
        if not policy.origin_ok(origin, arrived_on):
            logger.warning("refused a request with Origin %r (not in gateway.http.allowed_origins)", origin)
            return await _json_error(
                send, 403, f"Forbidden: Origin {origin!r} is not allowed (add it to gateway.http.allowed_origins)"
            )
        await self.app(scope, receive, send)


# ---- JSON-RPC shape of POST /mcp -----------------------------------------------------------
class JsonRpcGuard:
    """ASGI layer on `POST <path>`: read and parse the body once, refuse requests with invalid ids.

    Bodies that are not JSON (by Content-Type), too large, or do not parse go on unread or replayed
    to the SDK, which answers them as it always has (415/400, 413, -32700).
    """

    def __init__(self, app: ASGIApp, *, path: str, max_body_bytes: int) -> None:
        self.app = app
        self.path = path
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        headers = header_map(scope)
        ctype = headers.get(b"content-type")
        length = headers.get(b"content-length")
        if ctype is None or not ctype.lower().startswith(b"application/json"):
            return await self.app(scope, receive, send)
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay(chunks, True, message, receive), send)
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.limit:
                return await self.app(scope, _replay(chunks, more, None, receive), send)
            if not more:
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            msg = orjson.loads(body)
        except orjson.JSONDecodeError:
            return await self.app(scope, _replay([body], False, None, receive), send)
        for item in msg if isinstance(msg, list) else (msg,):
            problem = request_id_problem(item)
            if problem is not None:
                return await _json_error(send, 400, problem)
        scope[BODY_SCOPE_KEY] = body
        scope[MESSAGE_SCOPE_KEY] = msg
        await self.app(scope, _replay([body], False, None, receive), send)


def _replay(chunks: list[bytes], more: bool, trailing: dict[str, Any] | None, receive: Receive) -> Receive:
    """A `receive` that gives back what was already read, then continues with the real one."""
    queue: list[dict[str, Any]] = []
    if chunks:
        queue.append({"type": "http.request", "body": b"".join(chunks), "more_body": more})
    if trailing is not None:
        queue.append(trailing)

    async def replay() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        return await receive()

    return replay


async def _json_error(send: Send, status: int, message: str, code: int = INVALID_REQUEST) -> None:
    """An HTTP error whose body is a JSON-RPC error without id (MCP transports allow it on 403)."""
    body = orjson.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ---- /healthz ------------------------------------------------------------------------------
def may_see_details(config: Config, scope: Mapping[str, Any]) -> bool:
    """Whether a request may see per-server details on `/healthz` (states, protocol, last errors with
    upstream stderr text): an authenticated admin (`scope["mcpopt.principal"].admin`), or anyone on
    this machine when authentication is off. Everyone else gets the summary."""
    principal = scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is not None:
        return bool(getattr(principal, "admin", False))
    if auth_enabled(config):
        return False
    client = scope.get("client")
    if not client:
        return False
    try:
        return ipaddress.ip_address(str(client[0]).split("%")[0]).is_loopback
    except ValueError:
        return False


def health(rows: list[dict[str, Any]], detailed: bool) -> tuple[dict[str, Any], int]:
    """`/healthz`'s body and status: 200 when every server is ready, else 503.

    Returns:
        detailed: `{"ok", "servers": [row, ...]}` (`Gateway.status()` rows); otherwise
        `{"ok", "servers": {"total", "ready", "not_ready"}}` -- no names, states or error text.
    """
    ok = all(r["state"] == "ready" for r in rows)
    if detailed:
        return {"ok": ok, "servers": rows}, 200 if ok else 503
    ready = sum(1 for r in rows if r["state"] == "ready")
    summary = {"total": len(rows), "ready": ready, "not_ready": len(rows) - ready}
    return {"ok": ok, "servers": summary}, 200 if ok else 503


# ---- assembly ------------------------------------------------------------------------------
def wrap_http(
    app: ASGIApp,
    config: Config,
    bind_host: str,
    manager: Any,
    *,
    path: str = "/mcp",
    authenticate: Callable[[ASGIApp], ASGIApp] | None = None,
    shared_sessions: Callable[[SessionGuard], ASGIApp] | None = None,
) -> ASGIApp:
    """The edge around the HTTP front's app: Host/Origin -> [authenticate] -> JSON-RPC ->
    [shared sessions] -> sessions -> app.

    Args:
        app: the front (`HttpFront` over the SDK's Starlette app).
        config: the gateway's configuration (`gateway.http`).
        bind_host: the address the server listens on.
        manager: the SDK session manager behind `app` (for `SessionGuard`).
        authenticate: wraps an ASGI app in the authentication layer (sets `scope["mcpopt.principal"]`).
        shared_sessions: wraps the session guard in the layer that resumes sessions other replicas
            opened (`mcpopt.gateway.session_store.SharedSessions`).
    """
    http = config.gateway.http
    guard = SessionGuard(
        app, manager, max_sessions=http.max_sessions, max_sessions_per_client=http.max_sessions_per_client, path=path
    )
    inner: ASGIApp = guard if shared_sessions is None else shared_sessions(guard)
    inner = JsonRpcGuard(inner, path=path, max_body_bytes=http.max_body_bytes)
    if authenticate is not None:
        inner = authenticate(inner)
    return HostOriginGuard(inner, HostPolicy(bind_host, http.allowed_hosts, http.allowed_origins))
