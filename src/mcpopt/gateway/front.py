"""Front transports: how clients reach the gateway (stdio, Streamable HTTP).

stdio reads and writes the process's own pipes with asyncio (no thread hop per line, unlike
the SDK's `stdio_server`, which is the single largest cost of a proxied call over stdio).
Streamable HTTP is the SDK's own app served by uvicorn, with `/healthz` beside `/mcp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from functools import partial
from typing import Any

import anyio
import mcp_types as types
import orjson
from mcp.server.runner import serve_dual_era_loop
from mcp.shared.message import SessionMessage
from mcp_types import PROTOCOL_VERSION_META_KEY
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from mcpopt import wire
from mcpopt.api import ClientLink, session_id_of
from mcpopt.errors import ConfigError
from mcpopt.gateway import faults
from mcpopt.gateway.lists import LIST_METHODS
from mcpopt.gateway.server import Gateway
from mcpopt.gateway.stdio_reader import LineReader, Oversized, recover_id
from mcpopt.monitor.dashboard import routes as dashboard_routes
from mcpopt.upstream.pipes import CorkedWriter, PipeWriter
from mcpopt.wire import valid_id

logger = logging.getLogger(__name__)


async def serve_stdio(gateway: Gateway) -> None:
    """Serve MCP on stdin/stdout until stdin closes.

    Limits (`gateway.stdio`): a line longer than `max_message_bytes` is discarded unread and answered
    -32600 (with its id when the line starts with it); a request with an invalid id gets -32600 and a
    line that is not JSON -32700, both with id null; reading pauses while `max_inflight` calls are
    being served or more than `output_high_water_bytes` wait to be written (a client that does not
    read is not buffered for without bound).
    """
    loop = asyncio.get_running_loop()
    limits = gateway.config.gateway.stdio
    freeze_startup_heap()  # the gateway has started (cli/serve.py): the same collector pauses as over HTTP
    # Private duplicates, and fd 1 pointed at stderr, so nothing else can write on the wire.
    in_fd = os.dup(0)
    out_fd = os.dup(1)
    os.dup2(2, 1)
    lines = LineReader(limits.max_message_bytes)
    r_transport, _ = await loop.connect_read_pipe(lambda: lines, os.fdopen(in_fd, "rb", buffering=0))
    w_transport, w_protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(out_fd, "wb", buffering=0)
    )
    writer = asyncio.StreamWriter(w_transport, w_protocol, None, loop)
    read_send, read_recv = anyio.create_memory_object_stream[SessionMessage | Exception](64)
    corked = CorkedWriter(writer)
    write_send = PipeWriter(corked)
    validate = types.jsonrpc_message_adapter.validate_python
    fast = FastFront(gateway, corked, max_inflight=limits.max_inflight)
    high_water = limits.output_high_water_bytes

    def answer(message: dict[str, Any]) -> None:
        corked.write(orjson.dumps(message) + b"\n")

    def take(line: bytes) -> bool:
        # A `tools/call` the fast path serves, taken in the pipe's data callback (one event-loop hop
        # less than the reader task); anything else, or any doubt, goes the reader's way below.
        if b'"tools/call"' not in line or fast.full or corked.over(high_water):
            return False
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            return False
        return isinstance(obj, dict) and wire.request_id_problem(obj) is None and fast.offer(obj)

    lines.take = take

    async def pump_in() -> None:
        async with read_send:
            while True:
                while corked.over(high_water) and not corked.is_closing():
                    with contextlib.suppress(Exception):
                        await corked.drain()  # backpressure: take nothing more until the client reads
                line = await lines.readline()
                if line is None:
                    return
                if isinstance(line, Oversized):
                    found, rid = recover_id(line.head)
                    rid = rid if found and valid_id(rid) else None
                    answer(wire.invalid_request(_too_long(limits.max_message_bytes), rid))
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    answer(wire.parse_error(exc))
                    continue
                for item in obj if isinstance(obj, list) else (obj,):
                    problem = wire.request_id_problem(item)
                    if problem is not None:
                        answer(wire.invalid_request(problem))
                        break
                else:
                    if fast.full:
                        await fast.room()
                    if fast.offer(obj):
                        continue
                    try:
                        msg: Any = validate(obj, by_name=False)
                    except Exception as exc:  # noqa: BLE001 - reported to the session, never fatal
                        await read_send.send(exc)
                        continue
                    await read_send.send(SessionMessage(msg))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump_in)
            await serve_dual_era_loop(
                gateway.server,
                read_recv,
                write_send,
                lifespan_state={},
                init_options=gateway.init_options,
            )
            tg.cancel_scope.cancel()
    finally:
        fast.cancel_all()
        r_transport.close()
        with contextlib.suppress(Exception):
            w_transport.close()


def _too_long(limit: int) -> str:
    return (
        f"Invalid Request: the message is longer than {limit} bytes (gateway.stdio.max_message_bytes); "
        "it was discarded unread"
    )


class FastFront:
    """`tools/call` on the stdio front without the SDK's per-request machinery.

    The SDK's server owns the connection: the handshake, lists, every other method, and the
    connection's state. Once a handshake-era connection is initialized (or for a request that
    carries a 2026-07-28 envelope), a `tools/call` line is answered here instead: parsed once
    with orjson, run through the same `Gateway.call_tool` (pipeline and all), and answered with
    one orjson line. Progress for the client's token and cancellation (`notifications/cancelled`
    for one of these ids) are handled here too; everything else goes to the SDK.
    """

    def __init__(self, gateway: Gateway, writer: CorkedWriter, max_inflight: int = 256) -> None:
        self.gateway = gateway
        self.writer = writer
        self.inflight: dict[Any, asyncio.Task[None]] = {}
        self.max_inflight = max_inflight
        self._freed: asyncio.Event | None = None
        self._link: ClientLink | None = None
        self._link_conn: Any = None

    @property
    def full(self) -> bool:
        """`max_inflight` calls are being served: take no more lines until one ends."""
        return len(self.inflight) >= self.max_inflight

    async def room(self) -> None:
        """Wait until fewer than `max_inflight` calls are being served."""
        while self.full:
            self._freed = asyncio.Event()
            await self._freed.wait()

    def offer(self, msg: Any) -> bool:
        if not isinstance(msg, dict):
            return False
        method = msg.get("method")
        if method == "tools/call" and "id" in msg:
            version = self._version(msg.get("params"))
            if version is None:
                return False
            rid = msg["id"]
            if rid in self.inflight:
                return False  # a duplicate id: let the SDK answer it as the protocol says
            # `_call` forgets its id itself when it ends (no done callback per call); a task
            # cancelled before it started never runs, so cancellation adds that callback.
            self.inflight[rid] = asyncio.get_running_loop().create_task(self._call(rid, msg.get("params"), version))
            return True
        if method in LIST_METHODS and "id" in msg:
            return self._prepared_list(msg)
        if method == "notifications/cancelled":
            params = msg.get("params")
            target = params.get("requestId") if isinstance(params, dict) else None
            found = self.inflight.get(target) if valid_id(target) else None
            if found is not None:
                found.cancel()
                found.add_done_callback(partial(self._done, target))
                return True
        return False

    def _prepared_list(self, msg: dict[str, Any]) -> bool:
        """Answer a handshake-era list request from the prepared lists (`mcpopt.gateway.lists`):
        the id spliced into the prepared bytes. False (the SDK answers, and prepares it) when there
        is none yet, or before the handshake."""
        conn = self.gateway.clients.latest
        if conn is None or not conn.initialize_accepted or conn.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return False
        if msg["id"] in self.inflight:
            return False  # a duplicate id: the SDK answers it as the protocol says
        data = self.gateway.prepared_list(msg, conn)
        if data is None:
            return False
        with contextlib.suppress(Exception):
            self.writer.write_now(data + b"\n")
        return True

    def _done(self, rid: Any, task: asyncio.Task[None]) -> None:
        if self.inflight.get(rid) is task:
            del self.inflight[rid]
        if self._freed is not None and not self.full:
            self._freed.set()

    def _version(self, params: Any) -> str | None:
        meta = params.get("_meta") if isinstance(params, dict) else None
        if isinstance(meta, dict) and PROTOCOL_VERSION_META_KEY in meta:
            version = meta[PROTOCOL_VERSION_META_KEY]
            return version if version in MODERN_PROTOCOL_VERSIONS else None
        conn = self.gateway.clients.latest
        if conn is None or not conn.initialize_accepted or conn.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return None
        return conn.protocol_version

    async def _call(self, rid: Any, params: Any, version: str) -> None:
        conn = self.gateway.clients.latest
        link = self._link
        if link is None or self._link_conn is not conn or link.version != version:
            link = self._link = self._new_link(conn, version)
            self._link_conn = conn
        task = self.inflight.get(rid)
        try:
            result = await self.gateway.call_tool(params, link)
            try:
                data = orjson.dumps({"jsonrpc": "2.0", "id": rid, "result": result})
            except TypeError:  # nested past orjson's limit: `encode_answer` says so for this id
                data = faults.encode_answer(
                    {"jsonrpc": "2.0", "id": rid, "result": result}, faults.what_of("tools/call", params)
                )
            self._send(data + b"\n")
        except asyncio.CancelledError:
            return  # cancelled by the client: no response (spec, basic/utilities/cancellation)
        except Exception as exc:  # noqa: BLE001 - one bad call never ends the connection (nor shows internals)
            what = faults.what_of("tools/call", params)
            self._write({"jsonrpc": "2.0", "id": rid, "error": faults.error_for(exc, what)}, what)
        finally:
            if task is not None:
                self._done(rid, task)

    def _new_link(self, conn: Any, version: str) -> ClientLink:
        """The `ClientLink` of calls from `conn` at `version` (one per connection and era, reused:
        nothing on the call path changes a link in place -- `dataclasses.replace` makes new ones)."""
        legacy = conn is not None and version not in MODERN_PROTOCOL_VERSIONS
        return ClientLink(
            version=version,
            connection=conn if legacy else None,
            requests=conn.outbound if legacy and conn is not None else None,
            notify=self._notify,
            relay=self._relay,
            session_id=session_id_of(conn),
        )

    async def _notify(self, method: str, params: Any = None, *_: Any) -> None:
        self._write({"jsonrpc": "2.0", "method": method, **({"params": params} if params is not None else {})})

    def _relay(self, token: Any) -> Any:
        async def relay(progress: float, total: float | None, message: str | None) -> None:
            params: dict[str, Any] = {"progressToken": token, "progress": progress}
            if total is not None:
                params["total"] = total
            if message is not None:
                params["message"] = message
            self._write({"jsonrpc": "2.0", "method": "notifications/progress", "params": params})

        return relay

    def _write(self, message: dict[str, Any], what: str = "tools/call") -> None:
        data = faults.encode_answer(message, what) if "id" in message else orjson.dumps(message)
        self._send(data + b"\n")

    def _send(self, line: bytes) -> None:
        try:  # (not `contextlib.suppress`: three Python calls per answer)
            if len(self.inflight) <= 1:
                self.writer.write_now(line)  # one call in flight: no batching to wait for
            else:
                self.writer.write(line)
        except Exception:  # noqa: BLE001, S110 - a client gone mid-answer: nothing to tell it
            pass

    def cancel_all(self) -> None:
        for task in list(self.inflight.values()):
            task.cancel()


def resource_url(gateway: Gateway, host: str, port: int | None) -> str:
    """The gateway's resource URL (`gateway.auth.resource`, else `http://host:port/mcp`).

    Raises:
        ConfigError: auth is on, no `resource` is set, and `host` is a wildcard or `port` unknown
            (no URL a client could use, hence no audience a token could carry).
    """
    auth = gateway.config.gateway.auth
    if auth.resource:
        return auth.resource
    if port is None or host in ("0.0.0.0", "::", ""):
        raise ConfigError(
            gateway.config.source,
            "gateway.auth.resource",
            "the URL clients use to reach the gateway's /mcp (e.g. https://mcp.example.com/mcp): "
            f"it is the audience of their tokens, and {host or '(no host)'} is no address a client can use",
        )
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/mcp"


def auth_layer(gateway: Gateway, host: str, port: int | None) -> Any:
    """`authenticate` for `wrap_http` when `gateway.auth` is on: wraps an ASGI app in
    `mcpopt.auth.asgi.AuthMiddleware` (its resource URL from `resource_url`; a principal whose policy
    grants `admin` is marked so, which the edge reads for `/healthz` details).

    Raises:
        ConfigError: no resource URL can be known (see `resource_url`).
    """
    from mcpopt.auth.asgi import AuthMiddleware

    settings = gateway.config.gateway.auth
    resource = resource_url(gateway, host, port)

    def is_admin(principal: Any) -> bool:
        return gateway.policy is not None and gateway.policy.grant(principal).admin

    def wrap(inner: Any) -> Any:
        layer = AuthMiddleware(inner, settings, resource, grant_admin=is_admin)
        gateway.authenticator = layer.authenticator
        return layer

    return wrap


def http_app(gateway: Gateway, host: str, authenticate: Any = None, port: int | None = None) -> Any:
    """The Starlette app: MCP at `/mcp` (Streamable HTTP, both eras), `/healthz`, and telemetry's
    `/metrics` (Prometheus) and `/dashboard`, behind the edge (`mcpopt.gateway.edge.wrap_http`:
    Host/Origin on every route, [authenticate], JSON-RPC ids, session admission).

    `HttpFront` answers handshake-era `tools/call` POSTs itself and passes the rest on;
    `HeaderNormalizer`, outermost, trims whitespace around header values (RFC 9110 section 5.5)
    before the edge or anything else reads them. `authenticate` wraps an ASGI app in the
    authentication layer (see `wrap_http`).
    With `gateway.auth` on and no `authenticate` given, `auth_layer` is that layer: every route
    needs a valid credential except the protected-resource metadata.
    """
    import gc
    import tracemalloc

    from mcp.server.transport_security import TransportSecuritySettings
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from mcpopt.gateway.edge import health, may_see_details, wrap_http
    from mcpopt.gateway.headers import HeaderNormalizer
    from mcpopt.gateway.http_front import HttpFront
    from mcpopt.gateway.replica import ReplicaEdge

    http = gateway.config.gateway.http

    parking: list[Any] = []

    async def healthz(request: Request) -> JSONResponse:
        detailed = may_see_details(gateway.config, request.scope)
        body, status = health(gateway.status(), detailed)
        if detailed and gateway.shared is not None:
            body["shared"] = gateway.shared.stats()  # replica id, bus link, adopted states, lags
        if detailed and parking:
            body["sessions"] = parking[0].stats()
        if detailed and tracemalloc.is_tracing():  # PYTHONTRACEMALLOC=1: memory benchmarks only
            gc.collect()  # count what is live, not garbage awaiting the cycle collector
            body["traced_bytes"] = tracemalloc.get_traced_memory()[0]
        return JSONResponse(body, status_code=status)

    app = gateway.server.streamable_http_app(
        streamable_http_path="/mcp",
        host=host,
        custom_starlette_routes=[Route("/healthz", healthz), *dashboard_routes(gateway.telemetry)],
        session_idle_timeout=http.session_idle_timeout_ms / 1000,
        # The edge's SessionGuard admits sessions (evicting idle ones); the SDK's cap, which refuses
        # everyone once full, stays only as a backstop well above it.
        max_sessions=2 * http.max_sessions + 64,
        max_request_body_size=http.max_body_bytes,
        # The edge's HostOriginGuard checks Host/Origin on every route, not only /mcp.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    front = HttpFront(gateway, app, "/mcp")
    manager = gateway.server._session_manager  # noqa: SLF001 - set by streamable_http_app
    if authenticate is None and gateway.config.gateway.auth.enabled:
        authenticate = auth_layer(gateway, host, port)
    closers: list[Any] = []
    shared_sessions = None
    shared = gateway.config.gateway.shared
    if shared.redis_url or http.session_park_ms:
        from mcpopt.gateway.parking import LocalRecords, SessionParking
        from mcpopt.gateway.session_store import SharedSessions
        from mcpopt.state.redis import RedisStateStore

        store: Any = RedisStateStore(shared.redis_url, prefix=shared.key_prefix) if shared.redis_url else LocalRecords()
        ttl_s = http.session_idle_timeout_ms / 1000

        def shared_sessions(guard: Any) -> Any:
            layer = SharedSessions(guard, gateway, manager, store, ttl_s=ttl_s, guard=guard)
            closers.extend([layer.aclose, store.aclose])
            if http.session_park_ms:
                parker = SessionParking(layer, guard, manager, park_s=http.session_park_ms / 1000, idle_timeout_s=ttl_s)
                layer.parking = parker
                parking.append(parker)
                closers.insert(0, parker.aclose)
            return layer

    edge = wrap_http(front, gateway.config, host, manager, authenticate=authenticate, shared_sessions=shared_sessions)
    return ReplicaEdge(HeaderNormalizer(edge), replica_name(gateway, port), closers=closers)


def replica_name(gateway: Gateway, port: int | None) -> str:
    """`gateway.shared.replica`, else `<hostname>:<port>` (`<hostname>:<pid>` without a port)."""
    import socket

    return gateway.config.gateway.shared.replica or f"{socket.gethostname()}:{port or os.getpid()}"


def freeze_startup_heap() -> int:
    """Move every object alive now (imports, SDK and pydantic models, config: ~100k objects) to the
    collector's permanent generation (`gc.freeze`), so a full collection no longer walks them.

    Measured here, a full collection of the started gateway's heap takes tens to hundreds of ms, and
    one falls during a burst of session openings or calls: the event loop stalls and every call in
    flight waits (the 1,000-client p99). Frozen objects are still freed by reference counting;
    only cycles among them are never collected. Returns how many objects were frozen.
    """
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def serve_http(gateway: Gateway, host: str, port: int, ready: anyio.Event | None = None) -> None:
    """Serve Streamable HTTP at http://host:port/mcp until cancelled or signalled.

    Connection limits (`gateway.http`): head and body read deadlines, a head-size cap, a
    keep-alive timeout and a connection cap that sheds stalled connections first
    (`mcpopt.gateway.http_limits`).
    """
    import uvicorn

    from mcpopt.gateway.http_limits import EdgeLimits, fit_connections, protocol_class, raise_file_limit
    from mcpopt.gateway.replica import DrainingServer

    http = gateway.config.gateway.http
    limits = EdgeLimits(
        max_connections=fit_connections(http.max_connections, raise_file_limit()),
        header_timeout_s=http.header_timeout_ms / 1000,
        body_timeout_s=http.body_timeout_ms / 1000,
        max_header_bytes=http.max_header_bytes,
    )
    app = http_app(gateway, host, port=port)
    app.stamp = False  # uvicorn writes the replica header on every response instead (no send wrapper)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="on",
        access_log=False,
        headers=[app.default_header()],
        http=protocol_class(limits),
        timeout_keep_alive=max(1, round(http.keep_alive_timeout_ms / 1000)),
    )
    server = DrainingServer(config, app, http.drain_timeout_ms / 1000)

    async def _started() -> None:
        while not server.started:
            await anyio.sleep(0.02)
        freeze_startup_heap()
        if ready is not None:
            ready.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(_started)
        await server.serve()
        tg.cancel_scope.cancel()
    await app.aclose()
    if server.should_exit and not sys.is_finalizing():
        logger.info("HTTP front stopped")
