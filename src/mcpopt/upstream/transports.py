"""Client transports to upstream servers: stdio (own, reaps children), Streamable HTTP and SSE (SDK).

Each transport is an async context manager yielding the SDK's `(read_stream, write_stream)`
pair of `SessionMessage`s, so `mcp.client.session.ClientSession` runs on top unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import mcp_types as types
import orjson
from mcp.client._transport import TransportStreams
from mcp.shared.message import SessionMessage

from mcpopt.config import ServerConfig
from mcpopt.upstream import lines, process
from mcpopt.upstream.fastpath import FastChannel
from mcpopt.upstream.pipes import CorkedWriter, PipeWriter

logger = logging.getLogger(__name__)

STDERR_TAIL_LINES = 20


class StderrTail:
    """The last lines an upstream wrote to stderr, quoted in errors when it fails to start."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.lines: deque[str] = deque(maxlen=STDERR_TAIL_LINES)

    def text(self) -> str:
        return "\n".join(self.lines)


@asynccontextmanager
async def stdio_transport(server: str, cfg: ServerConfig, stderr: StderrTail) -> AsyncIterator[TransportStreams]:
    """Spawn `cfg.command` and exchange newline-delimited JSON-RPC over its stdin/stdout.

    The child runs in its own process group with a parent-death signal (see `process`);
    leaving the context stops it (stdin close, SIGTERM, SIGKILL of the whole group).

    Raises:
        OSError: the command cannot be started.
    """
    assert cfg.command is not None
    proc = await process.spawn(cfg.command, cfg.args, cfg.env, cfg.cwd)
    assert proc.stdin and proc.stdout and proc.stderr
    stdin, stdout, err = proc.stdin, proc.stdout, proc.stderr
    read_send, read_recv = anyio.create_memory_object_stream[SessionMessage | Exception](64)
    corked = CorkedWriter(stdin)
    write_send = PipeWriter(corked)
    channel = FastChannel(corked)
    write_send.fast = channel  # the gateway's forwarding side channel (see fastpath)
    write_send.pid = proc.pid  # for the resource watch (`Upstream.pid`)
    validate = types.jsonrpc_message_adapter.validate_python

    sink = lines.install(proc, channel.offer)  # side-channel responses settle in the pipe's callback

    async def reader() -> None:
        async with read_send:
            try:
                await (read_sink() if sink is not None else read_lines())
            finally:
                channel.close()

    async def read_sink() -> None:
        assert sink is not None
        while (item := await sink.next()) is not None:
            if isinstance(item, BaseException):
                logger.debug("%s: unreadable stdout: %s", server, item)
                await read_send.send(item)  # type: ignore[arg-type]
                if isinstance(item, ValueError) and sink.eof:
                    return
                continue
            try:
                msg: Any = validate(item, by_name=False)
            except Exception as exc:  # noqa: BLE001 - a malformed message is reported, not fatal
                logger.debug("%s: invalid JSON-RPC message on stdout: %.200r", server, item)
                await read_send.send(exc)
                continue
            await read_send.send(SessionMessage(msg))

    async def read_lines() -> None:
        while True:
            try:
                line = await stdout.readline()
            except (ValueError, asyncio.LimitOverrunError) as exc:  # a line over the 1 GiB limit
                await read_send.send(exc)
                return
            if not line:
                return  # EOF: the server exited or closed stdout
            if line.isspace():
                continue
            try:
                obj = orjson.loads(line)
                if channel.offer(obj):
                    continue
                msg: Any = validate(obj, by_name=False)
            except Exception as exc:  # noqa: BLE001 - a malformed line is reported, not fatal
                logger.debug("%s: unparsable stdout line: %.200r", server, line)
                await read_send.send(exc)
                continue
            await read_send.send(SessionMessage(msg))

    async def drain_stderr() -> None:
        while True:
            line = await err.readline()
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            stderr.lines.append(text)
            logger.debug("[%s stderr] %s", server, text)

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        tg.start_soon(drain_stderr)
        try:
            yield read_recv, write_send
        finally:
            with anyio.CancelScope(shield=True):
                write_send.close()
                read_recv.close()
                await process.stop(proc)
            tg.cancel_scope.cancel()


@asynccontextmanager
async def http_transport(cfg: ServerConfig) -> AsyncIterator[TransportStreams]:
    """Streamable HTTP via the SDK, one persistent `httpx` client for the session's lifetime.

    Forwarded requests take the `http_fast` side channel (`write_stream.fast`) once bound.
    """
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    from mcpopt.upstream.http_fast import side_channel

    assert cfg.url is not None
    async with create_mcp_http_client(headers=cfg.headers or None) as http:
        async with streamable_http_client(cfg.url, http_client=http) as streams:
            async with side_channel(cfg.url, http, streams[0], streams[1]) as (read, write):
                yield read, write


@asynccontextmanager
async def sse_transport(cfg: ServerConfig) -> AsyncIterator[TransportStreams]:
    """Legacy HTTP+SSE (2024-11-05) via the SDK."""
    from mcp.client.sse import sse_client

    assert cfg.url is not None
    async with sse_client(cfg.url, headers=cfg.headers or None) as streams:
        yield streams[0], streams[1]


def open_transport(server: str, cfg: ServerConfig, stderr: StderrTail) -> contextlib.AbstractAsyncContextManager[Any]:
    """The transport context manager for one upstream, by `cfg.kind`."""
    if cfg.kind == "stdio":
        return stdio_transport(server, cfg, stderr)
    if cfg.kind == "sse":
        return sse_transport(cfg)
    return http_transport(cfg)
