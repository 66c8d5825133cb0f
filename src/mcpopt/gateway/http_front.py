"""`tools/call` on the Streamable HTTP front without the SDK's per-POST machinery.

The SDK's app (`Server.streamable_http_app`) owns the HTTP front: sessions (`initialize`, the
`mcp-session-id`, DELETE, idle reaping), the GET stream, every method but one, and every error
answer. `HttpFront` is an ASGI layer in front of it that answers only this: a `POST /mcp`
carrying one `tools/call` request on an initialized handshake-era session the SDK's session
manager knows. Such a request is read once, parsed with orjson, run through the same
`Gateway.call_tool` (pipeline and all), and answered with one `application/json` body (the
spec lets a server answer a POST with JSON when the client accepts it) -- no per-POST task
group, memory streams, pydantic models or sse_starlette response.

Messages that belong to the call's own stream are kept: the first notification (log message,
progress for the client's token) or server-to-client request (sampling, elicitation, roots,
relayed from an upstream) switches the answer to `text/event-stream` before the response head
is sent, and the response then ends that stream, as on the SDK's path. Requests go out through
the session's own SDK dispatcher (routed onto this POST's stream the way the SDK's transport
routes a request's messages), so the client's answer POST is correlated by the SDK. A call
running longer than 15 s without output is switched to SSE as well and pinged, as sse_starlette
does. A client's `notifications/cancelled` for a call served here cancels it (answered with the
SDK's 2025-era `-32800 Request cancelled`); session idle tracking is kept as the SDK's
transport keeps it (a call in flight holds the session).

Checks are the SDK's, in its order, and anything that does not pass goes to the SDK app
unchanged (with the body replayed), which then answers exactly as it would have: a missing or
unknown session id, a terminated or reaped session, Host/Origin/Content-Type rejected by the
session's `TransportSecurityMiddleware` settings, an `Accept` without both JSON and SSE, a body
over the size limit, a 2026-07-28 request (`MCP-Protocol-Version` header or `_meta` envelope),
an uninitialized connection, a session bound to another principal than the request's (the
SDK's session manager answers 404), duplicate ids, any other method, batches,
notifications, responses, GET and DELETE. The session's `Connection` is the one the gateway's
middleware has seen (`Gateway.clients`, by `Connection.session_id`).

It runs behind the edge (`mcpopt.gateway.edge.wrap_http`), which has already checked Host and
Origin (the SDK's own check is off), refused invalid ids, and usually read and parsed the body
(`scope["mcpopt.message"]`, used here instead of parsing again). A failure of the call is that
call's JSON-RPC error (`mcpopt.gateway.faults.error_for`: never code 0 or Python text).

Limits: a call in flight is not cancelled when its session is deleted or reaped (the SDK's
dispatcher would cancel it), and a client that disconnects is noticed only when the answer is
written (a 2025-era client's `notifications/cancelled` is honoured, as above).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import weakref
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import anyio
import orjson
from mcp.server.auth.middleware.bearer_auth import authorization_context
from mcp.server.connection import Connection
from mcp.shared.exceptions import MCPError
from mcp.shared.jsonrpc_dispatcher import JSONRPCDispatcher
from mcp_types import PROTOCOL_VERSION_META_KEY
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

from mcpopt.api import ClientLink, partition_of, session_id_of
from mcpopt.asgi import header_map
from mcpopt.auth.asgi import METADATA_URL_KEY, principal_of
from mcpopt.auth.metadata import challenge
from mcpopt.errors import POLICY_DENIED, RATE_LIMITED
from mcpopt.gateway import faults
from mcpopt.gateway.edge import BODY_SCOPE_KEY, MESSAGE_SCOPE_KEY
from mcpopt.gateway.lists import LIST_METHODS
from mcpopt.gateway.server import Gateway

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

REQUEST_CANCELLED = -32800
"""The SDK's 2025-era answer to a request cancelled by the client (`mcp.server.streamable_http`)."""
ASK_DRAIN_S = 30.0
"""How long a call's response waits for the client's answers to requests carried on its stream."""
PING_S = 15.0
"""sse_starlette's default ping interval: a long call's stream is kept alive as on the SDK's path."""
_STREAM_BUFFER = 16
_HANDSHAKE = frozenset(HANDSHAKE_PROTOCOL_VERSIONS)
_MODERN = frozenset(MODERN_PROTOCOL_VERSIONS)
_SSE_HEADERS = [
    (b"cache-control", b"no-cache, no-transform"),
    (b"connection", b"keep-alive"),
    (b"content-type", b"text/event-stream"),
    (b"x-accel-buffering", b"no"),
]


class HttpFront:
    """ASGI app: the `tools/call` fast path, then the SDK's Starlette app for everything else."""

    def __init__(self, gateway: Gateway, app: Any, path: str = "/mcp") -> None:
        self.gateway = gateway
        self.app = app
        self.path = path
        self._by_sid: dict[str, weakref.ref[Connection]] = {}
        self._inflight: dict[tuple[str, Any], _Exchange] = {}
        """Calls being served, oldest first."""
        self._pings: asyncio.TimerHandle | None = None
        """When the oldest call not yet pinged is `PING_S` old (one timer for all calls)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == self.path:
            await self._post(scope, receive, send)
            return
        await self.app(scope, receive, send)

    # ---- the fast path -------------------------------------------------------------------
    async def _post(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = header_map(scope)
        sid = headers.get(b"mcp-session-id")
        manager = getattr(self.gateway.server, "_session_manager", None)
        if sid is None or manager is None or manager.stateless or manager.json_response:
            return await self.app(scope, receive, send)
        session_id = sid.decode("latin-1")
        user = scope.get("user")
        owners = manager._session_owners  # noqa: SLF001
        if (owners or user is not None) and (user is None or owners.get(session_id) != session_owner(user)):
            # A session bound to another credential (or a credential on an unbound session): the
            # SDK answers it (404, as if the session did not exist).
            return await self.app(scope, receive, send)
        transport = manager._server_instances.get(session_id)  # noqa: SLF001
        if transport is None or transport.is_terminated:
            return await self.app(scope, receive, send)
        idle = transport.idle_scope
        if idle is not None and idle.cancel_called:
            return await self.app(scope, receive, send)
        version = headers.get(b"mcp-protocol-version")
        if version is not None and version.decode("latin-1") not in _HANDSHAKE:
            return await self.app(scope, receive, send)  # the 2026-07-28 entry
        if not _secure(transport._security.settings, headers):  # noqa: SLF001
            return await self.app(scope, receive, send)
        if not _accepts_json_and_sse(headers.get(b"accept")):
            return await self.app(scope, receive, send)
        limit = manager.max_request_body_size
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self.app(scope, receive, send)
        conn = self._connection(session_id)
        if conn is None or not conn.initialize_accepted or conn.protocol_version in _MODERN:
            return await self.app(scope, receive, send)

        # The body: read once, replayed to the SDK app if this is not ours. The edge's JsonRpcGuard
        # has usually read and parsed it already (and replays it to whoever reads `receive`).
        if MESSAGE_SCOPE_KEY in scope:
            body, msg = scope[BODY_SCOPE_KEY], scope[MESSAGE_SCOPE_KEY]
            again = receive
        else:
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
                if size > limit:
                    return await self.app(scope, _replay(chunks, more, None, receive), send)
                if not more:
                    break
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            try:
                msg = orjson.loads(body)
            except orjson.JSONDecodeError:
                msg = None
            again = _replay([body], False, None, receive)
        call = _fast_call(msg)
        if call is None and isinstance(msg, dict) and msg.get("method") in LIST_METHODS:
            if str(msg.get("id")) not in transport._request_streams:  # noqa: SLF001 - else a duplicate id: the SDK's
                data = self.gateway.prepared_list(msg, conn, principal_of(scope))
                if data is not None:
                    await _json_answer(send, sid, data)
                    _touch(transport, idle)
                    return
        if call is None:
            if isinstance(msg, dict) and msg.get("method") == "notifications/cancelled" and "id" not in msg:
                params = msg.get("params")
                target = params.get("requestId") if isinstance(params, dict) else None
                exchange = self._inflight.get((session_id, target)) if isinstance(target, (int, str)) else None
                if exchange is not None:
                    exchange.cancel()
                    await _accepted(send, sid)
                    return
            return await self.app(scope, again, send)
        rid, params = call
        key = (session_id, rid)
        if key in self._inflight or str(rid) in transport._request_streams:  # noqa: SLF001
            return await self.app(scope, again, send)

        principal = principal_of(scope)
        if principal is not None:
            partition = principal.key
        else:
            auth = headers.get(b"authorization")
            partition = partition_of(auth.decode("latin-1") if auth else None)
        exchange = _Exchange(send, sid, rid, conn, transport, principal, scope.get(METADATA_URL_KEY))
        loop = asyncio.get_running_loop()
        exchange.started = loop.time()
        self._inflight[key] = exchange
        if self._pings is None:
            self._pings = loop.call_at(exchange.started + PING_S, self._ping_due)
        tracked = idle is not None and transport._idle_timeout is not None  # noqa: SLF001
        if tracked:
            # As the SDK's transport does per request: a request in flight holds the session.
            assert idle is not None
            transport._requests_in_flight += 1  # noqa: SLF001
            idle.deadline = math.inf
        try:
            await exchange.run(self.gateway, params, partition)
        finally:
            del self._inflight[key]
            if tracked:
                assert idle is not None
                transport._requests_in_flight -= 1  # noqa: SLF001
                if not transport._requests_in_flight:  # noqa: SLF001
                    idle.deadline = anyio.current_time() + transport._idle_timeout  # noqa: SLF001

    def _ping_due(self) -> None:
        """Start the pinger of every call silent for `PING_S`, then wait for the next one to be."""
        self._pings = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for exchange in list(self._inflight.values()):
            if exchange.pinger is not None or exchange.done:
                continue
            due = exchange.started + PING_S
            if due > now:
                self._pings = loop.call_at(due, self._ping_due)  # the calls after it are younger
                return
            exchange.start_pinger()

    def _connection(self, session_id: str) -> Connection | None:
        """The SDK `Connection` of a session, as the gateway's middleware has seen it."""
        ref = self._by_sid.get(session_id)
        conn = ref() if ref is not None else None
        if conn is not None and conn in self.gateway.clients.connections:
            return conn  # (a session parked and resumed has a new Connection: the old one is forgotten)
        known = list(self.gateway.clients.connections)
        if len(self._by_sid) > 2 * len(known) + 64:
            self._by_sid = {k: r for k, r in self._by_sid.items() if r() is not None}
        for candidate in known:
            if candidate.session_id == session_id:
                self._by_sid[session_id] = weakref.ref(candidate)
                return candidate
        return None


class _Exchange:
    """One `tools/call` POST: JSON answer unless the call's stream carries something first.

    Nothing is allocated per call beyond the exchange itself while the call has no output: no
    cancel scope (a client's cancel cancels the serving task, see `cancel`), no lock until a
    second writer (a notification, a ping, a request on the stream) appears, no event until the
    stream carries a request, and no timer (`HttpFront` starts the pinger of a long call).
    """

    def __init__(
        self,
        send: Send,
        sid: bytes,
        rid: Any,
        conn: Connection,
        transport: Any,
        principal: Any = None,
        metadata_url: str | None = None,
    ) -> None:
        self.principal = principal
        self.metadata_url = metadata_url
        self.send = send
        self.sid = sid
        self.rid = rid
        self.conn = conn
        self.transport = transport
        self.sse = False
        self.done = False
        self.lock: asyncio.Lock | None = None
        """Serializes writes once something besides the answer writes (created then: `_writing`)."""
        self.task: asyncio.Task[Any] | None = None
        """The task serving the call while `Gateway.call_tool` runs (None before and after)."""
        self.cancelled = False
        self.started = 0.0
        """When the call started (event-loop time; `HttpFront` pings a call silent for `PING_S`)."""
        self.route: Any = None
        self.pump: asyncio.Task[None] | None = None
        self.pinger: asyncio.Task[None] | None = None
        self.what = "tools/call"
        self.asking = 0
        """Server-to-client requests carried on this call's stream and not yet answered."""
        self.answered: asyncio.Event | None = None
        """Set when `asking` drops to 0 (created by the first request carried on the stream)."""

    async def run(self, gateway: Gateway, params: Mapping[str, Any], partition: str) -> None:
        conn = self.conn
        link = ClientLink(
            version=conn.protocol_version,
            connection=conn,
            requests=self,
            notify=self.notify,
            relay=self.relay,
            partition=partition,
            session_id=session_id_of(conn),
            principal=self.principal,
        )
        message: dict[str, Any]
        self.what = faults.what_of("tools/call", params)
        status: int = 200
        headers: list[tuple[bytes, bytes]] = []
        task = asyncio.current_task()
        try:
            self.task = task
            try:
                result = await gateway.call_tool(params, link)
            finally:
                self.task = None
            if self.cancelled and task is not None:
                task.uncancel()  # the cancel came too late to interrupt the call (or it was absorbed)
            message = {"jsonrpc": "2.0", "id": self.rid, "result": result}
        except asyncio.CancelledError:
            if not self.cancelled or task is None or task.uncancel() > 0:
                self.done = True  # not the client's cancel (server shutdown): no answer
                self._drop_route()
                raise
            message = {
                "jsonrpc": "2.0",
                "id": self.rid,
                "error": {"code": REQUEST_CANCELLED, "message": "Request cancelled"},
            }
        except Exception as exc:  # noqa: BLE001 - that call's error (-32602/-32603, never code 0 or internals)
            if self.cancelled and task is not None:
                # The call absorbed the client's cancel and then failed: withdraw the request as on
                # success, or a later timeout scope in this task (the drain below) would misread it.
                task.uncancel()
            message = {"jsonrpc": "2.0", "id": self.rid, "error": faults.error_for(exc, self.what)}
            if isinstance(exc, MCPError):
                status, headers = _refusal_status(exc, self.metadata_url)
        except BaseException:
            self.done = True  # this request is being torn down (server shutdown): no answer
            self._drop_route()
            raise
        finally:
            if self.pinger is not None:
                self.pinger.cancel()
        try:
            if self.asking and self.answered is not None:
                # A request the upstream sent on this call's stream (e.g. roots/list) is still out: the
                # stream ends with the response, so the response waits for its answer (bounded).
                with anyio.move_on_after(ASK_DRAIN_S):
                    await self.answered.wait()
            await self._unroute()
            await self._finish(message, status, headers)
        finally:
            if self.pinger is not None:
                # The ping timer may have started one during the drain (it keeps that wait alive);
                # the stream has ended, so stop it now rather than after its next `PING_S` sleep.
                self.pinger.cancel()

    def cancel(self) -> None:
        """The client cancelled the call: interrupt `Gateway.call_tool` (answered -32800)."""
        task = self.task
        if task is not None and not self.cancelled:
            self.cancelled = True
            task.cancel()

    def _writing(self) -> asyncio.Lock:
        """The lock every write but a plain JSON answer takes (created by the first such writer)."""
        lock = self.lock
        if lock is None:
            lock = self.lock = asyncio.Lock()
        return lock

    # ---- the client link -----------------------------------------------------------------
    async def notify(self, method: str, params: Any = None, *_: Any) -> None:
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        await self._event(orjson.dumps(message))

    def relay(self, token: Any) -> Callable[[float, float | None, str | None], Awaitable[None]]:
        async def relay(progress: float, total: float | None, message: str | None) -> None:
            params: dict[str, Any] = {"progressToken": token, "progress": progress}
            if total is not None:
                params["total"] = total
            if message is not None:
                params["message"] = message
            with contextlib.suppress(Exception):
                await self.notify("notifications/progress", params)

        return relay

    async def send_raw_request(self, method: str, params: Mapping[str, Any] | None, opts: Any = None) -> Any:
        """A server-to-client request on this call's stream, correlated by the session's SDK dispatcher."""
        outbound = self.conn.outbound
        if not isinstance(outbound, JSONRPCDispatcher) or self.done:
            return await outbound.send_raw_request(method, params, opts)
        self.asking += 1
        if self.answered is None:
            self.answered = asyncio.Event()
        self.answered.clear()
        try:
            async with self._writing():
                await self._start_sse()
            self._route()
            return await outbound.send_raw_request(method, params, opts, _related_request_id=self.rid)
        finally:
            self.asking -= 1
            if not self.asking:
                self.answered.set()

    # ---- the wire ------------------------------------------------------------------------
    async def _start_sse(self) -> None:
        if not self.sse:
            self.sse = True
            await self.send({"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, self._sid()]})

    def _sid(self) -> tuple[bytes, bytes]:
        return (b"mcp-session-id", self.sid)

    async def _event(self, data: bytes, more: bool = True) -> None:
        async with self._writing():
            if self.done:
                return
            await self._start_sse()
            if not more:
                self.done = True
            await self.send(
                {
                    "type": "http.response.body",
                    "body": b"event: message\r\ndata: " + data + b"\r\n\r\n",
                    "more_body": more,
                }
            )

    async def _finish(
        self, message: dict[str, Any], status: int = 200, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Answer with `message`: a JSON body with `status` (and `extra` headers) when nothing was
        streamed yet, else the last event of the call's SSE stream (whose status was 200)."""
        data = faults.encode_answer(message, self.what)
        try:
            if self.sse:
                await self._event(data, more=False)
                return
            if self.lock is None:
                # Nothing else ever wrote (no lock yet): nothing is mid-write. Done is set before
                # the first await, so a writer that comes later writes nothing.
                self.done = True
                await self._json(data, status, extra)
                return
            async with self.lock:
                if not self.sse:  # (else a ping or a late notification started the stream meanwhile)
                    self.done = True
                    await self._json(data, status, extra)
                    return
            await self._event(data, more=False)
        except Exception as exc:  # noqa: BLE001 - the client went away
            logger.debug("tools/call response not delivered: %s", exc)

    async def _json(self, data: bytes, status: int, extra: list[tuple[bytes, bytes]] | None) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            self._sid(),
            *(extra or ()),
        ]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": data, "more_body": False})

    def start_pinger(self) -> None:
        """Keep the stream of a long call alive: switch to SSE and ping every `PING_S`."""
        if not self.done and self.pinger is None:
            self.pinger = asyncio.ensure_future(self._ping())

    async def _ping(self) -> None:
        with contextlib.suppress(Exception):
            while not self.done:
                async with self._writing():
                    if self.done:
                        return
                    await self._start_sse()
                    stamp = datetime.now(UTC).isoformat(sep=" ")
                    await self.send(
                        {"type": "http.response.body", "body": f": ping - {stamp}\r\n\r\n".encode(), "more_body": True}
                    )
                await asyncio.sleep(PING_S)

    # ---- requests routed by the SDK ------------------------------------------------------
    def _route(self) -> None:
        """Have the SDK transport's message router put this request's messages on our stream."""
        if self.route is not None:
            return
        streams = self.transport._request_streams  # noqa: SLF001
        key = str(self.rid)
        if key in streams:
            return
        pair = anyio.create_memory_object_stream[Any](_STREAM_BUFFER)
        streams[key] = pair
        self.route = pair
        self.pump = asyncio.ensure_future(self._pump(pair[1]))

    async def _pump(self, receive: Any) -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.EndOfStream):
            async with receive:
                async for event in receive:
                    await self._event(event.message.model_dump_json(by_alias=True, exclude_unset=True).encode())

    async def _unroute(self) -> None:
        """Stop routing; what the router already delivered is written before the response."""
        if self.route is None:
            return
        pump = self.pump
        self._drop_route(cancel=False)
        if pump is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await pump
            pump.cancel()

    def _drop_route(self, cancel: bool = True) -> None:
        if self.route is None:
            return
        streams = self.transport._request_streams  # noqa: SLF001
        key = str(self.rid)
        if streams.get(key) is self.route:
            del streams[key]
        self.route[0].close()
        self.route = None
        if cancel and self.pump is not None:
            self.pump.cancel()


def session_owner(user: Any) -> Any:
    """The principal a session is bound to, as the SDK's session manager records it."""
    cached = getattr(user, "session_owner", None)
    return cached if cached is not None else authorization_context(user)


def _refusal_status(exc: MCPError, metadata_url: str | None) -> tuple[int, list[tuple[bytes, bytes]]]:
    """HTTP status and headers for a call refused before it reached an upstream: 429 with
    `Retry-After` for a rate limit (RFC 6585 §4, RFC 9110 §10.2.3), 403 with an
    `insufficient_scope` challenge for a tool whose scopes the token lacks (the MCP authorization
    spec's step-up signal); 200 otherwise (the JSON-RPC error says the rest)."""
    data = exc.error.data if isinstance(exc.error.data, dict) else {}
    retry = data.get("retryAfterSeconds")
    if exc.error.code == RATE_LIMITED and isinstance(retry, (int, float)) and "scope" in data:  # the gateway's own
        return 429, [(b"retry-after", str(max(1, int(retry))).encode())]
    if exc.error.code == POLICY_DENIED and data.get("requiredScopes") and metadata_url:
        value = challenge(metadata_url, list(data["requiredScopes"]), "insufficient_scope", exc.error.message)
        return 403, [(b"www-authenticate", value.encode("latin-1", "replace"))]
    return 200, []


def _fast_call(msg: Any) -> tuple[Any, dict[str, Any]] | None:
    """`(id, params)` of a handshake-era `tools/call` this front serves, else None."""
    if not isinstance(msg, dict) or msg.get("method") != "tools/call" or msg.get("jsonrpc") != "2.0":
        return None
    rid = msg.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (int, str)):
        return None
    params = msg.get("params")
    if not isinstance(params, dict):
        return None
    meta = params.get("_meta")
    if meta is not None:
        if not isinstance(meta, dict) or PROTOCOL_VERSION_META_KEY in meta:
            return None  # a 2026-07-28 envelope (or a malformed `_meta`): the SDK's path
        token = meta.get("progressToken")
        if token is not None and (isinstance(token, bool) or not isinstance(token, (int, str))):
            return None
    return rid, params


def _secure(settings: Any, headers: Mapping[bytes, bytes]) -> bool:
    """The SDK's checks for a POST (`TransportSecurityMiddleware`, `_check_content_type`), without logging."""
    if not _json_content_type(headers.get(b"content-type")):
        return False
    if not settings.enable_dns_rebinding_protection:
        return True
    host = headers.get(b"host")
    if not host:
        return False
    h = host.decode("latin-1")
    if h not in settings.allowed_hosts and not any(
        a.endswith(":*") and h.startswith(a[:-2] + ":") for a in settings.allowed_hosts
    ):
        return False
    origin = headers.get(b"origin")
    if origin:
        o = origin.decode("latin-1")
        if o not in settings.allowed_origins and not any(
            a.endswith(":*") and o.startswith(a[:-2] + ":") for a in settings.allowed_origins
        ):
            return False
    return True


@functools.lru_cache(maxsize=64)  # a client sends the same Content-Type on every POST
def _json_content_type(ctype: bytes | None) -> bool:
    """`mcp.server.streamable_http._check_content_type`: the media type is `application/json`."""
    if ctype is None:
        return False
    content_type = ctype.decode("latin-1")
    if not content_type.lower().startswith("application/json"):
        return False
    return any(p.strip() == "application/json" for p in content_type.split(";")[0].split(","))


@functools.lru_cache(maxsize=64)  # a client sends the same Accept on every POST
def _accepts_json_and_sse(accept: bytes | None) -> bool:
    """`mcp.server.streamable_http.check_accept_headers`: both JSON and SSE must be acceptable."""
    types = [t.strip().split(";")[0].strip().lower() for t in (accept or b"").decode("latin-1").split(",")]
    wildcard = "*/*" in types
    json_ok = wildcard or "application/json" in types or "application/*" in types
    sse_ok = wildcard or "text/event-stream" in types or "text/*" in types
    return json_ok and sse_ok


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


async def _json_answer(send: Send, sid: bytes, data: bytes) -> None:
    """200 with one JSON-RPC response as `application/json` (the client accepts it: checked before)."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"mcp-session-id", sid),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def _touch(transport: Any, idle: Any) -> None:
    """A request answered here keeps the session alive, as one through the SDK's transport would."""
    timeout = transport._idle_timeout  # noqa: SLF001
    if idle is not None and timeout is not None and not transport._requests_in_flight:  # noqa: SLF001
        idle.deadline = anyio.current_time() + timeout


async def _accepted(send: Send, sid: bytes) -> None:
    """202 Accepted for a notification, as the SDK's transport answers one."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"0"), (b"mcp-session-id", sid)]
    await send({"type": "http.response.start", "status": 202, "headers": headers})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
