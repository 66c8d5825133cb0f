"""Reading newline-delimited JSON-RPC from the stdio client: bounded, and paused when asked.

asyncio's `StreamReader.readline` buffers a whole line before it can judge it: with the 1 GiB
limit the stdio front had, one long line grew the gateway to 1 GiB and then killed it (the
`ValueError` ended the reader; issue 10). `LineReader` is an `asyncio.Protocol` on the pipe that:

* hands out complete lines (bytes) up to `max_bytes`;
* for a longer line keeps only its first `HEAD_BYTES` (to recover its id) and discards the rest
  as it arrives, never buffering it, then hands out an `Oversized` in its place;
* pauses the pipe while more than `buffer_bytes` of complete lines wait to be taken (the front
  stops taking lines while its output to a client that does not read is above the high-water
  mark, so a flood stops at the pipe: the client's writes block), and resumes when they are taken.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

HEAD_BYTES = 4096
"""Bytes kept of an oversized line, to find its id."""


@dataclass(frozen=True, slots=True)
class Oversized:
    """A line longer than the limit, discarded; `head` is its first bytes."""

    head: bytes


class LineReader(asyncio.Protocol):
    """See the module doc. `await readline()` returns bytes (without the newline), an `Oversized`, or
    None at end of input.

    Args:
        max_bytes: the longest line handed out (bytes, without the newline).
        buffer_bytes: complete lines kept waiting before the pipe is paused.
    """

    def __init__(self, max_bytes: int, buffer_bytes: int = 1 << 16) -> None:
        self.max_bytes = max_bytes
        self.buffer_bytes = buffer_bytes
        self.transport: Any = None
        """The read pipe transport (asyncio's or uvloop's: both have pause_reading/resume_reading)."""
        self._buf = bytearray()
        self._scanned = 0
        """How much of `_buf` is known to hold no newline."""
        self._lines: deque[bytes | Oversized] = deque()
        self._queued = 0
        self._discarding: bytes | None = None
        """The head of the oversized line being discarded, while it lasts."""
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.take: Callable[[bytes], bool] | None = None
        """Offered each complete line while no line waits ahead of it (order is kept); True when it
        took the line -- the stdio front's `tools/call` fast path, served without waking the reader."""

    # ---- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if (
            not self._buf
            and self._discarding is None
            and self.take is not None
            and not self._lines
            and len(data) <= self.max_bytes
            and data.endswith(b"\n")
            and data.count(b"\n") == 1
        ):
            # The common case: one whole line per chunk, offered as it is (no buffer bookkeeping).
            line = data[:-1]
            if self.take(line) or not line.strip():
                return
            self._push(line)
            self._after()
            return
        if self._discarding is not None:
            nl = data.find(b"\n")
            if nl < 0:
                return  # still inside the oversized line: nothing is kept
            self._push(Oversized(self._discarding))
            self._discarding = None
            data = data[nl + 1 :]
        buf = self._buf
        buf += data
        start = 0
        while True:
            nl = buf.find(b"\n", max(start, self._scanned))
            if nl < 0:
                break
            if nl - start > self.max_bytes:
                self._push(Oversized(bytes(buf[start : start + HEAD_BYTES])))
            else:
                line = bytes(buf[start:nl])
                if line.strip() and not (self.take is not None and not self._lines and self.take(line)):
                    self._push(line)
            start = nl + 1
            self._scanned = start
        if start:
            del buf[:start]
        self._scanned = len(buf)
        if len(buf) > self.max_bytes:
            # A line still arriving is already too long: keep its head, drop the rest as it comes.
            self._discarding = bytes(buf[:HEAD_BYTES])
            buf.clear()
            self._scanned = 0
        self._after()

    def _after(self) -> None:
        self._wake()
        if not self._paused and self._queued > self.buffer_bytes and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()

    # ---- the reader's side -------------------------------------------------------------------
    async def readline(self) -> bytes | Oversized | None:
        while not self._lines:
            if self._eof:
                if self._discarding is not None:
                    self._push(Oversized(self._discarding))
                    self._discarding = None
                    continue
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._lines.popleft()
        self._queued -= len(item) if isinstance(item, bytes) else len(item.head)
        if self._paused and self._queued <= self.buffer_bytes // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return item

    def _push(self, item: bytes | Oversized) -> None:
        self._lines.append(item)
        self._queued += len(item) if isinstance(item, bytes) else len(item.head)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_SCALAR = re.compile(rb"-?[0-9][0-9.eE+-]*|true|false|null")
_WS = re.compile(rb"[ \t\r\n]*")


def recover_id(head: bytes) -> tuple[bool, Any]:
    """`(True, id)` if `head` -- the start of a JSON object -- has a top-level `"id"` member whose value
    is complete within it, else `(False, None)`. Values before it are skipped without parsing."""
    try:
        return _scan(head)
    except (IndexError, orjson.JSONDecodeError, ValueError):
        return False, None


def _scan(head: bytes) -> tuple[bool, Any]:
    i = _WS.match(head, 0).end()  # type: ignore[union-attr]
    if head[i : i + 1] != b"{":
        return False, None
    i += 1
    while True:
        i = _WS.match(head, i).end()  # type: ignore[union-attr]
        key = _STRING.match(head, i)
        if key is None:
            return False, None
        i = _WS.match(head, key.end()).end()  # type: ignore[union-attr]
        if head[i : i + 1] != b":":
            return False, None
        i = _WS.match(head, i + 1).end()  # type: ignore[union-attr]
        if key.group() == b'"id"':
            value = _STRING.match(head, i) or _SCALAR.match(head, i)
            if value is None or value.end() >= len(head):
                return False, None  # not there, or cut off by the head's end
            return True, orjson.loads(value.group())
        i = _skip(head, i)
        i = _WS.match(head, i).end()  # type: ignore[union-attr]
        if head[i : i + 1] != b",":
            return False, None
        i += 1


def _skip(head: bytes, i: int) -> int:
    """The index after the JSON value at `i` (raises IndexError when it runs past the head)."""
    first = head[i : i + 1]
    if first == b'"':
        m = _STRING.match(head, i)
        if m is None:
            raise IndexError
        return m.end()
    if first in (b"{", b"["):
        depth = 0
        while True:
            c = head[i : i + 1]
            if not c:
                raise IndexError
            if c == b'"':
                m = _STRING.match(head, i)
                if m is None:
                    raise IndexError
                i = m.end()
                continue
            if c in (b"{", b"["):
                depth += 1
            elif c in (b"}", b"]"):
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
    m = _SCALAR.match(head, i)
    if m is None:
        raise IndexError
    return m.end()
