"""Writing JSON-RPC lines into an asyncio pipe: `CorkedWriter` and the SDK-facing `PipeWriter`.

The SDK's stdio transports put a memory stream and a writer task between the dispatcher and
the pipe: one extra event-loop hop per message. On the gateway's hot path a call crosses two
pipes out and two back, so both stdio ends write directly instead.

Every writer of one pipe (the SDK's `PipeWriter`, the `FastChannel`/`FastFront` fast paths)
shares one `CorkedWriter`: lines written during one event-loop iteration leave together in one
`write(2)` at the end of it. A pipe write that wakes the reader is the single most expensive
step of a forwarded call here (~15 us of a VM's vCPU wake-up, measured with py-spy), and under
concurrency many calls finish in the same iteration; at concurrency 1 the cost is one extra
`call_soon` (~1-2 us). Lines stay in the order they were written, and whole: one buffer, one
flush.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

import anyio
from mcp.shared.message import SessionMessage

_HIGH_WATER = 1 << 16
"""Bytes buffered before a sender waits for the pipe to drain (backpressure)."""


class CorkedWriter:
    """Buffers lines written in one event-loop iteration; flushes them in one pipe write.

    Must be created inside the running loop that will use it.
    """

    __slots__ = ("_writer", "_transport", "_loop", "_buf", "_queued", "_scheduled")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._transport = writer.transport
        self._loop = asyncio.get_running_loop()
        self._buf: list[bytes] = []
        self._queued = 0
        self._scheduled = False

    def write(self, data: bytes) -> None:
        """Queue `data` (one or more whole lines) for the flush at the end of this iteration."""
        self._buf.append(data)
        self._queued += len(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def write_now(self, data: bytes) -> None:
        """Write `data` at once when nothing is queued (else queue it behind what is, keeping order).

        For a writer that knows it is alone -- one call in flight -- waiting for the end of the
        iteration buys no batching and costs the call one event-loop hop each way.
        """
        if self._buf or self._transport.is_closing():
            self.write(data)
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        self._scheduled = False
        buf, self._buf = self._buf, []
        self._queued = 0
        if not buf or self._transport.is_closing():
            return  # the pipe is closing: its reader fails whoever waits for an answer
        self._transport.write(buf[0] if len(buf) == 1 else b"".join(buf))

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def over(self, limit: int) -> bool:
        """More than `limit` bytes wait to be written (queued here or in the transport)."""
        return self._queued + self._transport.get_write_buffer_size() > limit

    async def drain(self) -> None:
        """Flush now and wait until the transport's buffer is below its high-water mark."""
        if self._buf:
            self._flush()
        await self._writer.drain()


class PipeWriter:
    """Serializes each `SessionMessage` as one line onto a `CorkedWriter`."""

    def __init__(self, writer: CorkedWriter) -> None:
        self._writer = writer
        self._closed = False
        self.fast: Any = None
        """A `FastChannel` on the same pipe, when the transport offers one."""
        self.pid: int | None = None
        """The process at the other end of the pipe (the stdio transport sets it; the resource watch reads it)."""

    async def send(self, item: SessionMessage, /) -> None:
        if self._closed or self._writer.is_closing():
            raise anyio.ClosedResourceError
        data = item.message.model_dump_json(by_alias=True, exclude_unset=True).encode()
        try:
            self._writer.write(data + b"\n")
            if self._writer.over(_HIGH_WATER):
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
