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
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from mcp_types import PROTOCOL_VERSION_META_KEY
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from mcpopt.api import ClientLink, session_id_of
from mcpopt.gateway.server import Gateway
from mcpopt.monitor.dashboard import routes as dashboard_routes
from mcpopt.upstream.pipes import CorkedWriter, PipeWriter

logger = logging.getLogger(__name__)


async def serve_stdio(gateway: Gateway) -> None:
    """Serve MCP on stdin/stdout until stdin closes."""
    loop = asyncio.get_running_loop()
    # Private duplicates, and fd 1 pointed at stderr, so nothing else can write on the wire.
    in_fd = os.dup(0)
    out_fd = os.dup(1)
    os.dup2(2, 1)
    reader = asyncio.StreamReader(limit=1 << 30)
    r_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(in_fd, "rb", buffering=0)
    )
    w_transport, w_protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(out_fd, "wb", buffering=0)
    )
    writer = asyncio.StreamWriter(w_transport, w_protocol, None, loop)
    read_send, read_recv = anyio.create_memory_object_stream[SessionMessage | Exception](64)
    corked = CorkedWriter(writer)
    write_send = PipeWriter(corked)
    validate = types.jsonrpc_message_adapter.validate_python
    fast = FastFront(gateway, corked)

    async def pump_in() -> None:
        async with read_send:
            while True:
                line = await reader.readline()
                if not line:
                    return
                if line.isspace():
                    continue
                try:
                    obj = orjson.loads(line)
                    if fast.offer(obj):
                        continue
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


class FastFront:
    """`tools/call` on the stdio front without the SDK's per-request machinery.

    The SDK's server owns the connection: the handshake, lists, every other method, and the
    connection's state. Once a handshake-era connection is initialized (or for a request that
    carries a 2026-07-28 envelope), a `tools/call` line is answered here instead: parsed once
    with orjson, run through the same `Gateway.call_tool` (pipeline and all), and answered with
    one orjson line. Progress for the client's token and cancellation (`notifications/cancelled`
    for one of these ids) are handled here too; everything else goes to the SDK.
    """

    def __init__(self, gateway: Gateway, writer: CorkedWriter) -> None:
        self.gateway = gateway
        self.writer = writer
        self.inflight: dict[Any, asyncio.Task[None]] = {}

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
            task = asyncio.get_running_loop().create_task(self._call(rid, msg.get("params"), version))
            self.inflight[rid] = task
            task.add_done_callback(partial(self._done, rid))
            return True
        if method == "notifications/cancelled":
            params = msg.get("params")
            found = self.inflight.get(params.get("requestId")) if isinstance(params, dict) else None
            if found is not None:
                found.cancel()
                return True
        return False

    def _done(self, rid: Any, _task: asyncio.Task[None]) -> None:
        self.inflight.pop(rid, None)

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
        legacy = conn is not None and version not in MODERN_PROTOCOL_VERSIONS
        link = ClientLink(
            version=version,
            connection=conn if legacy else None,
            requests=conn.outbound if legacy and conn is not None else None,
            notify=self._notify,
            relay=self._relay,
            session_id=session_id_of(conn),
        )
        try:
            result = await self.gateway.call_tool(params, link)
            self._write({"jsonrpc": "2.0", "id": rid, "result": result})
        except asyncio.CancelledError:
            return  # cancelled by the client: no response (spec, basic/utilities/cancellation)
        except MCPError as exc:
            err = exc.error.model_dump(mode="json", exclude_none=True)
            self._write({"jsonrpc": "2.0", "id": rid, "error": err})
        except Exception as exc:  # noqa: BLE001 - one bad call never ends the connection
            logger.exception("tools/call failed inside the gateway")
            self._write({"jsonrpc": "2.0", "id": rid, "error": {"code": -32603, "message": f"mcpopt: {exc}"}})

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

    def _write(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            line = orjson.dumps(message) + b"\n"
            if len(self.inflight) <= 1:
                self.writer.write_now(line)  # one call in flight: no batching to wait for
            else:
                self.writer.write(line)

    def cancel_all(self) -> None:
        for task in list(self.inflight.values()):
            task.cancel()


def http_app(gateway: Gateway, host: str) -> Any:
    """The Starlette app: MCP at `/mcp` (Streamable HTTP, both eras), `/healthz`, and telemetry's
    `/metrics` (Prometheus) and `/dashboard`.

    `HttpFront` answers handshake-era `tools/call` POSTs itself and passes the rest on;
    `HeaderNormalizer` before it trims whitespace around header values (RFC 9110 section 5.5).
    """
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from mcpopt.gateway.headers import HeaderNormalizer
    from mcpopt.gateway.http_front import HttpFront

    async def healthz(request: Request) -> JSONResponse:
        rows = gateway.status()
        ok = all(r["state"] == "ready" for r in rows)
        return JSONResponse({"ok": ok, "servers": rows}, status_code=200 if ok else 503)

    app = gateway.server.streamable_http_app(
        streamable_http_path="/mcp",
        host=host,
        custom_starlette_routes=[Route("/healthz", healthz), *dashboard_routes(gateway.telemetry)],
        session_idle_timeout=3600,
    )
    return HeaderNormalizer(HttpFront(gateway, app, "/mcp"))


async def serve_http(gateway: Gateway, host: str, port: int, ready: anyio.Event | None = None) -> None:
    """Serve Streamable HTTP at http://host:port/mcp until cancelled or signalled."""
    import uvicorn

    app = http_app(gateway, host)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    if ready is not None:

        async def _announce() -> None:
            while not server.started:
                await anyio.sleep(0.02)
            ready.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(_announce)
            await server.serve()
            tg.cancel_scope.cancel()
    else:
        await server.serve()
    if server.should_exit and not sys.is_finalizing():
        logger.info("HTTP front stopped")
