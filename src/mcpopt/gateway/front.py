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
from typing import Any

import anyio
import mcp_types as types
from mcp.server.runner import serve_dual_era_loop
from mcp.shared.message import SessionMessage

from mcpopt.gateway.server import Gateway
from mcpopt.upstream.pipes import PipeWriter

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
    write_send = PipeWriter(writer)
    validate_json = types.jsonrpc_message_adapter.validate_json

    async def pump_in() -> None:
        async with read_send:
            while True:
                line = await reader.readline()
                if not line:
                    return
                if line.isspace():
                    continue
                try:
                    msg: Any = validate_json(line, by_name=False)
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
        r_transport.close()
        with contextlib.suppress(Exception):
            w_transport.close()


def http_app(gateway: Gateway, host: str) -> Any:
    """The Starlette app: MCP at `/mcp` (Streamable HTTP, both eras) and `/healthz`."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def healthz(request: Request) -> JSONResponse:
        rows = gateway.status()
        ok = all(r["state"] == "ready" for r in rows)
        return JSONResponse({"ok": ok, "servers": rows}, status_code=200 if ok else 503)

    return gateway.server.streamable_http_app(
        streamable_http_path="/mcp",
        host=host,
        custom_starlette_routes=[Route("/healthz", healthz)],
        session_idle_timeout=3600,
    )


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
