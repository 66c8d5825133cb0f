"""The bytes of HTTP/1.1 responses and of `text/event-stream` bodies, for the HTTP side channel.

Holds the framing that `http_fast`'s raw-protocol client reads off the socket, and nothing about
MCP or about which connection a request takes: `Connection` (an asyncio protocol: a byte buffer
and one waiter, no StreamReader machinery), `Response` (a response head and an incremental reader
of its length-delimited, chunked or close-delimited body), `response_headers` (the headers the
channel reads, in one scan of the head), `with_path` (request bytes re-aimed at another path, for
redirects) and `SseParser` (WHATWG event-stream framing: events, last event id, retry).

Why the seam is here: this is the part that follows RFC 9112 and the SSE spec, byte for byte,
and is tested and read as such; the connection pool (`http_pool`) decides when a connection is
opened, reused or closed, and the channel (`http_fast`) decides what the bytes mean for a
JSON-RPC request. Every name here is called per request, so they stay plain functions and
methods (no wrapper between the channel and the socket).
"""

from __future__ import annotations

import asyncio
import re

_DEFAULT_KEEPALIVE_S = 4.0
"""Idle connections older than this are not reused (or than the server's `Keep-Alive: timeout=N`, less 0.5 s)."""


class Eof(Exception):
    """The connection closed before the response was complete."""


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: a byte buffer and a waiter (no StreamReader machinery)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buf = bytearray()
        self.eof = False
        self.waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.keepalive_s = _DEFAULT_KEEPALIVE_S
        self.tail: Response | None = None
        """A response whose rest (usually just the last chunk) had not arrived when it was pooled."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def more(self) -> bool:
        """Wait for more bytes; False once the peer closed (nothing more will come)."""
        if self.eof:
            return False
        waiter = self.loop.create_future()
        self.waiter = waiter
        await waiter
        return True

    def write(self, data: bytes) -> None:
        """Queue `data` on the transport (after `connection_made`)."""
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        """Abort the connection (no FIN handshake); a pending `more` returns."""
        self.eof = True
        if self.transport is not None:
            self.transport.abort()

    def reusable(self, now: float) -> bool:
        """Whether an idle connection can carry a next request at `now` (`time.monotonic()`, s).

        Reads past a pooled response's buffered tail first; False if the tail is still due, the
        peer closed, stray bytes arrived, or the connection outlived its keep-alive.
        """
        if self.tail is not None:
            if not self.tail.finish_now():
                return False
            self.tail = None
        t = self.transport
        return (
            t is not None
            and not self.eof
            and not t.is_closing()
            and not self.buf
            and now - self.idle_since < self.keepalive_s
        )


class Response:
    """The head of one response and an incremental reader of its body."""

    __slots__ = ("conn", "status", "headers", "chunked", "remaining", "keep", "done", "settled")

    def __init__(self, conn: Connection, status: int, version: bytes, headers: dict[str, str]) -> None:
        self.conn = conn
        self.status = status
        self.headers = headers
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self.remaining: int | None = None
        if length is not None and not self.chunked:
            if not length.isdigit():
                raise Eof()  # a malformed response: treated as a broken connection
            self.remaining = int(length)
        connection = headers.get("connection", "").lower()
        if version == b"HTTP/1.1":
            self.keep = "close" not in connection
        else:
            self.keep = "keep-alive" in connection
        if not self.chunked and self.remaining is None:
            self.keep = False  # delimited by the close
        self.done = False
        self.settled = False
        """The connection went back to the pool, was closed, or was handed to a drain task."""
        ka = headers.get("keep-alive")
        if ka:
            for part in ka.split(","):
                key, _, value = part.strip().partition("=")
                if key.strip().lower() == "timeout" and value.strip().isdigit():
                    conn.keepalive_s = max(0.0, int(value.strip()) - 0.5)

    async def read(self) -> bytes | None:
        """The next piece of the body, or None at its end.

        Raises:
            Eof: the connection closed inside a length- or chunk-delimited body.
        """
        if self.done:
            return None
        c = self.conn
        buf = c.buf
        if self.chunked:
            while True:
                i = buf.find(b"\r\n")
                if i >= 0:
                    break
                if not await c.more():
                    raise Eof()
            try:
                size = int(bytes(buf[:i]).split(b";", 1)[0], 16)
            except ValueError:
                raise Eof() from None
            if size == 0:
                while True:
                    end = buf.find(b"\r\n\r\n", i)
                    if end >= 0:
                        del buf[: end + 4]
                        break
                    if not await c.more():
                        raise Eof()
                self.done = True
                return None
            need = i + 2 + size + 2
            while len(buf) < need:
                if not await c.more():
                    raise Eof()
            data = bytes(buf[i + 2 : i + 2 + size])
            del buf[:need]
            return data
        if self.remaining is not None:
            if self.remaining == 0:
                self.done = True
                return None
            while not buf:
                if not await c.more():
                    raise Eof()
            n = min(len(buf), self.remaining)
            data = bytes(buf[:n])
            del buf[:n]
            self.remaining -= n
            return data
        while not buf:
            if not await c.more():
                self.done = True
                return None
        data = bytes(buf)
        buf.clear()
        return data

    async def read_all(self) -> bytes:
        """The rest of the body at once.

        Raises:
            Eof: the connection closed inside a length- or chunk-delimited body.
        """
        if self.remaining is not None and not self.chunked:
            c = self.conn
            while len(c.buf) < self.remaining:
                if not await c.more():
                    raise Eof()
            data = bytes(c.buf[: self.remaining])
            del c.buf[: self.remaining]
            self.remaining = 0
            self.done = True
            return data
        parts = []
        while (piece := await self.read()) is not None:
            parts.append(piece)
        return b"".join(parts)

    def finish_now(self) -> bool:
        """Read past what is left of the body if it is all buffered (no await); True once it has ended."""
        if self.done:
            return True
        buf = self.conn.buf
        if self.chunked:
            while True:
                i = buf.find(b"\r\n")
                if i < 0:
                    return False
                try:
                    size = int(bytes(buf[:i]).split(b";", 1)[0], 16)
                except ValueError:
                    return False
                if size == 0:
                    end = buf.find(b"\r\n\r\n", i)
                    if end < 0:
                        return False
                    del buf[: end + 4]
                    self.done = True
                    return True
                need = i + 2 + size + 2
                if len(buf) < need:
                    return False
                del buf[:need]
        if self.remaining is not None:
            n = min(len(buf), self.remaining)
            del buf[:n]
            self.remaining -= n
            self.done = self.remaining == 0
        return self.done


class SseParser:
    """Minimal `text/event-stream` parser (WHATWG): `(event, data)` pairs, last event id, retry."""

    __slots__ = ("buf", "last_id", "retry")

    def __init__(self) -> None:
        self.buf = b""
        self.last_id: str | None = None
        self.retry: int | None = None

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        """The `(event type, data)` of every event `data` completes (a partial one is kept for the next piece)."""
        buf = self.buf + data if self.buf else data
        if b"\r" in buf:
            cr = buf.endswith(b"\r")  # may be the first half of a CRLF split across pieces
            if cr:
                buf = buf[:-1]
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if cr:
                buf += b"\r"
        blocks = buf.split(b"\n\n")
        self.buf = blocks.pop()
        events = []
        for block in blocks:
            event = "message"
            data_lines: list[bytes] | None = None
            for line in block.split(b"\n"):
                if not line or line[0] == 0x3A:  # empty, or a ":" comment
                    continue
                name, sep, value = line.partition(b":")
                if sep and value[:1] == b" ":
                    value = value[1:]
                if name == b"data":
                    if data_lines is None:
                        data_lines = [value]
                    else:
                        data_lines.append(value)
                elif name == b"event":
                    event = value.decode("utf-8", "replace") or "message"
                elif name == b"id":
                    if b"\0" not in value:
                        self.last_id = value.decode("utf-8", "replace")
                elif name == b"retry" and value.isdigit():
                    self.retry = int(value)
            if data_lines is not None:
                events.append((event, data_lines[0] if len(data_lines) == 1 else b"\n".join(data_lines)))
        return events


_WANTED = re.compile(
    rb"\r\n(content-type|content-length|transfer-encoding|connection|keep-alive|location|set-cookie):([^\r\n]*)",
    re.IGNORECASE,
)
"""The response headers the side channel reads (one scan of the head: no per-line parsing)."""


def response_headers(head: bytes) -> dict[str, str]:
    """The wanted headers of a response head (names are case-insensitive; repeats are joined)."""
    headers: dict[str, str] = {}
    for match in _WANTED.finditer(head):
        name = match[1].decode("latin-1").lower()
        value = match[2].strip().decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def with_path(data: bytes, path: str) -> bytes:
    """The same request bytes, sent to another path."""
    verb, _, rest = data.partition(b" ")
    _, _, rest = rest.partition(b" ")
    return verb + b" " + path.encode("latin-1") + b" " + rest
