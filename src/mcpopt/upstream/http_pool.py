"""The keep-alive HTTP/1.1 connections of the HTTP side channel to its one upstream origin.

Holds `ConnectionPool`: opening connections (up to `_MAX_CONNECTIONS` at once, later requests
wait for one), writing a request and reading its response head (interim 1xx skipped), and each
response's end: back to the pool (at most `_MAX_IDLE` idle, none past its keep-alive), read past
later (`_finish`: the last chunk still on its way), drained (`_drain`), or closed (`_discard`,
`_abandon`). A keep-alive connection the server closed while idle is retried once on a new one.

Why the seam is here: this is connection lifecycle, with no idea of JSON-RPC, and the channel
(`http_fast.HttpFastChannel`) is a `ConnectionPool` that adds what the bytes mean. It is a base
class rather than an object the channel holds so that every pool step stays one method call on
the channel, as before the split (no extra attribute hop or wrapper on the per-request path).
The channel supplies two hooks: `_dead` (a refused connection: the upstream is gone) and
`_keep_cookies` (a response set cookies). The byte framing itself is `http_wire`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from urllib.parse import urlsplit

from mcpopt.upstream.fastpath import ChannelClosed
from mcpopt.upstream.http_wire import Connection, Eof, Response, response_headers

logger = logging.getLogger(__name__)

_MAX_IDLE = 16
"""Idle keep-alive connections kept per upstream."""
_MAX_CONNECTIONS = 100
"""Connections open at once per upstream (httpx2's default limit); more requests wait for one."""
_MAX_HEAD = 1 << 16
"""Bytes a response head may take before the connection is treated as broken."""


class ConnectionPool:
    """Pooled HTTP/1.1 connections to the origin (scheme, host, port) of `url`.

    Not used alone: `http_fast.HttpFastChannel` subclasses it and overrides the hooks `_dead`
    and `_keep_cookies`. Failures surface as `Eof` (the connection broke inside a response)
    or `ChannelClosed` (the pool is closed, or a connection could not be opened).
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self._scheme = parts.scheme
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            import httpcore2

            self._ssl = httpcore2.default_ssl_context()
        self._idle: list[Connection] = []
        self._active: set[Connection] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._opening = 0
        self._closed = False

    def close(self) -> None:
        """Drop every connection and wake every waiting request (which then fails): the pool is closed."""
        self._closed = True
        for conn in [*self._idle, *self._active]:
            conn.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _dead(self) -> None:
        """Hook: a connection to the origin could not be opened (the channel ends its session)."""

    def _keep_cookies(self, head: bytes) -> None:
        """Hook: the response `head` (raw bytes, status line first) sets cookies."""

    async def _send(self, data: bytes) -> Response:
        """Write one request on a pooled connection and read its response head.

        A keep-alive connection the server closed while idle is retried once on a new one
        (nothing of the response arrived, so the server never saw the request).
        """
        for _ in range(2):
            conn, reused = await self._acquire()
            conn.write(data)
            try:
                return await self._read_head(conn)
            except Eof:
                self._discard(conn)
                if reused and not conn.buf:
                    continue
                raise
        raise Eof()

    async def _acquire(self) -> tuple[Connection, bool]:
        while True:
            now = time.monotonic()
            while self._idle:
                conn = self._idle.pop()
                if conn.reusable(now):
                    self._active.add(conn)
                    return conn, True
                conn.close()
            if self._closed:
                raise ChannelClosed()
            if len(self._active) + self._opening < _MAX_CONNECTIONS:
                break
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        loop = asyncio.get_running_loop()
        self._opening += 1
        try:
            _, conn = await loop.create_connection(
                lambda: Connection(loop),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
            )
        except OSError as exc:
            logger.debug("%s: connection failed: %s", self.url, exc)
            self._dead()
            raise ChannelClosed() from exc
        finally:
            self._opening -= 1
            self._wake_one()
        if self._closed:
            conn.close()
            raise ChannelClosed()
        self._active.add(conn)
        return conn, False

    def _wake_one(self) -> None:
        """A connection was freed: let the first waiting request try again."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
                return

    def _release(self, resp: Response) -> None:
        if resp.settled:
            return
        resp.settled = True
        conn = resp.conn
        self._active.discard(conn)
        if resp.keep and resp.done and not self._closed and not conn.buf and len(self._idle) < _MAX_IDLE:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        if self._waiters:
            self._wake_one()

    def _discard(self, conn: Connection) -> None:
        self._active.discard(conn)
        conn.close()
        if self._waiters:
            self._wake_one()

    def _abandon(self, resp: Response | None) -> None:
        """Close the connection of a response not read to its end (unless already settled)."""
        if resp is not None and not resp.settled:
            resp.settled = True
            self._discard(resp.conn)

    async def _read_head(self, conn: Connection) -> Response:
        while True:
            buf = conn.buf
            while (end := buf.find(b"\r\n\r\n")) < 0:
                if len(buf) > _MAX_HEAD or not await conn.more():
                    raise Eof()
            head = bytes(buf[:end])
            del buf[: end + 4]
            first = head[: head.find(b"\r\n")].split(b" ", 2) if b"\r\n" in head else head.split(b" ", 2)
            try:
                status = int(first[1])
            except (IndexError, ValueError):
                raise Eof() from None
            if 100 <= status < 200 and status != 101:
                continue  # an interim response (100 Continue, 103 Early Hints)
            headers = response_headers(head)
            if "set-cookie" in headers:
                self._keep_cookies(head)
            return Response(conn, status, first[0], headers)

    def _finish(self, resp: Response) -> None:
        """Pool the connection of a response whose answer was read.

        What is left of the body (usually only the last chunk, still on its way) is read past
        when the connection is next taken from the pool; if it has not come by then, the
        connection is closed instead of reused.
        """
        if resp.finish_now():
            self._release(resp)
            return
        conn = resp.conn
        if resp.settled or not resp.keep or self._closed or len(self._idle) >= _MAX_IDLE:
            self._abandon(resp)
            return
        resp.settled = True
        self._active.discard(conn)
        conn.tail = resp
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        if self._waiters:
            self._wake_one()

    async def _drain(self, resp: Response, timeout_s: float = 5.0) -> None:
        """Read the rest of a body we do not need, then pool (or close) its connection."""
        try:
            async with asyncio.timeout(timeout_s):
                while await resp.read() is not None:
                    pass
        except (TimeoutError, Eof, asyncio.CancelledError):
            self._abandon(resp)
            return
        self._release(resp)
