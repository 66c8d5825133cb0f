"""Reading an upstream's stdout as JSON-RPC lines, in the pipe's own data callback.

The asyncio way -- a `StreamReader` and a task looping on `readline()` -- costs a forwarded
call one event-loop hop (the reader task wakes, then wakes the waiting call) and a dozen Python
calls of buffer bookkeeping. `LineSink` takes the subprocess protocol's place of that
`StreamReader`: each chunk is split into lines as it arrives, and a response for the gateway's
side channel (`FastChannel.offer`) settles the waiting call right there. Every other message
(the SDK session's own responses, notifications, server-to-client requests) is queued, in
order, for one consumer task that hands it to the SDK; while that queue is over its high-water
mark the pipe is paused (backpressure), as a `StreamReader` would pause it.

Lines are limited to `max_line` bytes (a 1 GiB result is legal JSON-RPC, but not unbounded):
an overlong line is reported to the SDK as a `ValueError` and reading stops, as before.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

HIGH_WATER = 64
"""Messages queued for the SDK before the pipe is paused."""
LOW_WATER = 16
"""Queue length at which a paused pipe resumes."""


class LineSink:
    """Stands in for a subprocess's stdout `StreamReader` (the methods its protocol calls).

    Args:
        offer: `FastChannel.offer`: takes a parsed message that belongs to the side channel.
        max_line: the longest line accepted (bytes).
    """

    def __init__(self, offer: Callable[[Any], bool], max_line: int = 1 << 30) -> None:
        self._offer = offer
        self._max = max_line
        self._buf = bytearray()
        self._scan = 0
        self.queue: deque[Any] = deque()
        """Parsed messages (or exceptions) for the SDK, in arrival order."""
        self.eof = False
        self._wake: asyncio.Event = asyncio.Event()
        self._transport: Any = None
        self._paused = False

    # ---- the StreamReader surface the subprocess protocol uses ---------------------------
    def set_transport(self, transport: Any) -> None:
        self._transport = transport

    def feed_data(self, data: bytes) -> None:
        buf = self._buf
        if not buf and data.endswith(b"\n") and data.count(b"\n") == 1 and len(data) > 1:
            # The common case: one whole message per chunk (`_line`, inline: one frame less per answer).
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                if not data.isspace():
                    self._push(exc)
            else:
                if not self._offer(obj):
                    self._push(obj)
        else:
            buf += data
            start = 0
            while (end := buf.find(b"\n", self._scan)) >= 0:
                self._line(bytes(buf[start:end]))
                start = self._scan = end + 1
            if start:
                del buf[:start]
                self._scan = 0
            self._scan = len(buf)
            if len(buf) > self._max:
                self._push(ValueError(f"a line longer than {self._max:,} bytes on stdout"))
                buf.clear()
                self._scan = 0
                self.feed_eof()
                return
        if len(self.queue) > HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def feed_eof(self) -> None:
        self.eof = True
        self._wake.set()

    def set_exception(self, exc: BaseException) -> None:
        self._push(exc)
        self.feed_eof()

    def at_eof(self) -> bool:
        return self.eof and not self.queue

    # ---- parsing ------------------------------------------------------------------------
    def _line(self, line: bytes) -> None:
        if not line or line.isspace():
            return
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            self._push(exc)
            return
        if not self._offer(obj):
            self._push(obj)

    def _push(self, item: Any) -> None:
        self.queue.append(item)
        self._wake.set()

    # ---- the consumer side --------------------------------------------------------------
    async def next(self) -> Any | None:
        """The next message for the SDK (None at the end of the stream)."""
        while not self.queue:
            if self.eof:
                return None
            self._wake.clear()
            await self._wake.wait()
        item = self.queue.popleft()
        if self._paused and len(self.queue) <= LOW_WATER:
            self._paused = False
            self._transport.resume_reading()
        return item


def install(proc: asyncio.subprocess.Process, offer: Callable[[Any], bool]) -> LineSink | None:
    """Put a `LineSink` in place of `proc.stdout`'s `StreamReader`, before any data was read.

    Relies on `asyncio.subprocess.SubprocessStreamProtocol` feeding `protocol.stdout` (stable
    since Python 3.4, and what uvloop's subprocess transport calls too). Returns None -- and
    changes nothing -- when the process does not look like that, so the caller keeps reading
    `proc.stdout` itself.
    """
    protocol: Any = getattr(proc, "_protocol", None)
    reader: Any = getattr(protocol, "stdout", None)
    unread: Any = getattr(reader, "_buffer", b"?")
    if protocol is None or reader is None or reader is not proc.stdout or unread:
        return None
    transport = getattr(reader, "_transport", None)
    sink = LineSink(offer)
    sink.set_transport(transport)
    protocol.stdout = sink
    return sink
