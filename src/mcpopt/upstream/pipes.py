"""A `WriteStream` that writes JSON-RPC lines straight into an asyncio pipe.

The SDK's stdio transports put a memory stream and a writer task between the dispatcher and
the pipe: one extra event-loop hop per message. On the gateway's hot path a call crosses two
pipes out and two back, so both stdio ends write directly instead. `write()` appends to the
transport's buffer atomically, so concurrent senders cannot interleave lines.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

import anyio
from mcp.shared.message import SessionMessage

_HIGH_WATER = 1 << 16
"""Bytes buffered before a sender waits for the pipe to drain (backpressure)."""


class PipeWriter:
    """Serializes each `SessionMessage` as one line onto an asyncio `StreamWriter`."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._closed = False
        self.fast: Any = None
        """A `FastChannel` on the same pipe, when the transport offers one."""

    async def send(self, item: SessionMessage, /) -> None:
        if self._closed or self._writer.is_closing():
            raise anyio.ClosedResourceError
        data = item.message.model_dump_json(by_alias=True, exclude_unset=True).encode()
        try:
            self._writer.write(data + b"\n")
            if self._writer.transport.get_write_buffer_size() > _HIGH_WATER:
                await self._writer.drain()
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            raise anyio.BrokenResourceError from None

    def close(self) -> None:
        self._closed = True

    async def aclose(self) -> None:
        self._closed = True

    async def __aenter__(self) -> PipeWriter:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed = True
