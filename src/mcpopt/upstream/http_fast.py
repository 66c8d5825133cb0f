"""A lean JSON-RPC request channel beside the SDK session on a Streamable HTTP upstream.

The SDK's `ClientSession` over `streamable_http_client` owns the connection: the handshake
(which mints the `mcp-session-id`), lists, the GET stream, the server's own requests, and
session termination. Forwarded requests (`Upstream.request`), which only need "send these
params, give me the result dict", take this side channel instead: one POST per request,
written with orjson on a small pool of keep-alive HTTP/1.1 connections (a raw asyncio
protocol), the `application/json` or `text/event-stream` answer parsed here, the result
handed back as a plain dict.

This module holds the MCP side of that channel: `HttpFastChannel` (the SDK session's wiring,
building a request, what an answer's status, content type and messages mean, stream
resumption, cancellation) and `side_channel`, which attaches it to the SDK's streams. The
seams below it: `http_pool.ConnectionPool` (the channel's base class: which connection a
request takes, and when one is reused or closed) and `http_wire` (the bytes of HTTP/1.1
responses and SSE events). Each of the three is read and tested on its own terms (MCP
semantics, connection lifecycle, byte framing); a base class, not a held object, so the split
adds no call on the per-request path.

Why not httpx2, as the SDK? Measured here, one httpx2 POST costs ~2.4 ms of CPU against
~0.3 ms for the raw protocol (`http_wire`), and the SDK adds pydantic models, memory-stream hops and a task
per POST. The wire is the SDK's: its session's `mcp-session-id` (from the `initialize` answer
and its own requests, seen by httpx2 event hooks on its client), the headers the session's era
stamp computes for the request (`MCP-Protocol-Version`; on 2026-07-28 also `Mcp-Method`,
`Mcp-Name`, `Mcp-Param-*`), the client's headers (`cfg.headers`, user agent), and
`Accept: application/json, text/event-stream`.

On a request's SSE stream: the response ends it; `notifications/progress` for our token goes
to `on_progress`; everything else (sampling / elicitation / roots requests, log messages, other
notifications) is handed to the SDK session's read stream, as the SDK transport does, so the
session's callbacks answer them (their answers are POSTed by the SDK transport). A stream that
ends without the response is resumed with a GET carrying `Last-Event-ID` when the server gave
event ids, as the SDK does. Timeouts and cancellation close the connection; on the 2025 wire a
`notifications/cancelled` is POSTed too (on 2026-07-28 closing the stream is the cancel).

Falls back to the SDK session: when httpx2 would not use its own pool for the URL (a proxy
from the environment or `mounts`, a custom transport), when the client has an `httpx2.Auth`
flow, once the server sets cookies (they go to the SDK client's jar, and requests to its
path), and for header values that are not latin-1. Not done: redirects other than 307/308
within the origin (an error, as in the SDK), `Content-Encoding` (none is asked for).

Errors are `FastChannel`'s: `MCPError` for JSON-RPC errors (and HTTP errors, mapped as the SDK
maps them), `TimeoutError`, `ChannelClosed`. A refused connection ends the SDK session (so the
upstream restarts), as the SDK transport's own failure would; so does a 404 for our session,
the spec's "start a new session" (the SDK alone keeps failing every request then).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urljoin, urlsplit

import anyio
import mcp_types as types
import orjson
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from mcp_types import CONNECTION_CLOSED, INTERNAL_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR, REQUEST_TIMEOUT
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from mcpopt.upstream.fastpath import ChannelClosed
from mcpopt.upstream.http_pool import ConnectionPool
from mcpopt.upstream.http_wire import Eof, Response, SseParser, with_path
from mcpopt.wire import dumps_request

logger = logging.getLogger(__name__)

ProgressFn = Callable[[float, float | None, str | None], Awaitable[None]]
ID_PREFIX = "~"
_RECONNECT_ATTEMPTS = 2
_DEFAULT_RETRY_MS = 1000
_DROP = frozenset(
    {"accept", "accept-encoding", "content-type", "content-length", "host", "transfer-encoding", "connection"}
)
"""Client default headers the side channel sets itself (or does not send)."""
_SSE_ACCEPT = b"application/json, text/event-stream"


class HttpFastChannel(ConnectionPool):
    """Forwarded requests to one Streamable HTTP upstream, beside its SDK session.

    Build with `create` (None when the side channel cannot be used for this client), let the
    SDK session do the handshake, then `bind(session)`; `request` has `FastChannel.request`'s
    contract.
    """

    def __init__(self, url: str, base_headers: dict[str, str], http: Any) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        self._http = http
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rpartition("@")[2]
        headers = {k.lower(): v for k, v in base_headers.items() if k.lower() not in _DROP}
        if parts.username is not None:
            creds = f"{parts.username}:{parts.password or ''}".encode()
            headers["authorization"] = "Basic " + base64.b64encode(creds).decode()
        headers["accept"] = _SSE_ACCEPT.decode()
        headers["content-type"] = "application/json"
        self._static = {k: v for k, v in headers.items() if not k.startswith("mcp-")}
        self._host_header = host_header
        self._head_cache: tuple[tuple[Any, ...], bytes] | None = None
        """The last `(key, head without content-length)` built by `_head`."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._current: dict[str, Response] = {}
        """A request's resumption GET, while it is being read."""
        self._next = 0
        self._session: Any = None
        self._modern = False
        self.session_id: str | None = None
        self._inject: Callable[[Any], Awaitable[None]] | None = None
        self._on_dead: Callable[[], None] | None = None
        self.on_log: Callable[[Any], Awaitable[None]] | None = None
        """Takes `notifications/message` params from a request's own stream (set by the
        `Upstream`): awaited before the response that follows, so a call's log messages reach its
        client before its result (through the SDK they would be handled after it)."""

    @classmethod
    def create(cls, url: str, http: Any) -> HttpFastChannel | None:
        """A side channel for `url` beside the httpx2 client `http`, or None if it cannot match it."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        if getattr(http, "auth", None) is not None:
            return None  # an httpx2 auth flow (OAuth...) runs per request: leave it to the SDK
        if not _plain_transport(url, http):
            return None
        headers = dict(http.headers.items())
        for key, value in headers.items():
            if any(ch in key or ch in value for ch in "\r\n\0"):
                return None
            try:
                key.encode("latin-1")
                value.encode("latin-1")
            except UnicodeEncodeError:
                return None
        return cls(url, headers, http)

    # ---- wiring ---------------------------------------------------------------------------
    async def on_request(self, request: Any) -> None:
        """httpx2 request hook on the SDK's client: its session id is the one its requests carry."""
        sid = request.headers.get("mcp-session-id")
        if sid:
            self.session_id = sid

    async def on_response(self, response: Any) -> None:
        """httpx2 response hook: the id a session-less POST was given (the `initialize` answer).

        Seen before the SDK reads that answer, so it is known when the handshake returns (the
        SDK's own next request, which would carry it, may still be on its way then).
        """
        request = response.request
        if request.method == "POST" and "mcp-session-id" not in request.headers:
            sid = response.headers.get("mcp-session-id")
            if sid:
                self.session_id = sid

    def bind(self, session: Any) -> HttpFastChannel | None:
        """Start serving requests for `session` (after its handshake); None to leave it all to the SDK."""
        version = session.protocol_version
        if version is None or self._cookies():
            return None
        self._session = session
        self._modern = version in MODERN_PROTOCOL_VERSIONS
        if self._modern:
            self.session_id = None  # stateless era: the SDK sends none either
        return self

    def close(self) -> None:
        """Fail every waiting request and drop every connection: the session is gone."""
        super().close()
        for task in list(self._tasks):
            task.cancel()

    def _dead(self) -> None:
        """The upstream is unreachable or forgot our session: end the SDK session (it restarts)."""
        if self._on_dead is not None:
            self._on_dead()

    def _keep_cookies(self, head: bytes) -> None:
        """Store cookies a response set in the SDK client's jar: from now on requests take its path."""
        with contextlib.suppress(Exception):
            import httpx2

            raw: list[tuple[bytes, bytes]] = []
            for line in head.split(b"\r\n")[1:]:
                name, sep, value = line.partition(b":")
                if sep:
                    raw.append((name.strip(), value.strip()))
            self._http.cookies.extract_cookies(
                httpx2.Response(200, headers=raw, request=httpx2.Request("POST", self.url))
            )

    def _cookies(self) -> bool:
        jar = getattr(getattr(self._http, "cookies", None), "jar", None)
        if jar is None:
            return False
        # `len(jar)` walks every cookie through a generator (~10 us a request); the jar's own
        # domain table is empty until a first cookie arrives, which is all this asks.
        table = getattr(jar, "_cookies", None)
        return bool(table) if isinstance(table, dict) else bool(len(jar))

    # ---- requests -------------------------------------------------------------------------
    async def request(
        self, method: str, params: Mapping[str, Any], timeout_s: float, on_progress: ProgressFn | None = None
    ) -> dict[str, Any]:
        """Send one request and wait for its result dict.

        Raises:
            MCPError: the server answered with a JSON-RPC error (or an HTTP error the SDK maps to one).
            TimeoutError: no answer within `timeout_s` (the request is cancelled upstream).
            ChannelClosed: the connection failed or closed first.
            InvalidParams: the params cannot be serialized (nothing was sent).
        """
        if self._closed or self._session is None:
            raise ChannelClosed()
        session = self._session
        opts: dict[str, Any] = {}
        session._stamp({"method": method, "params": params}, opts)  # noqa: SLF001 - the era's headers
        stamped: dict[str, str] = opts.get("headers") or {}
        if self._cookies():
            return await self._via_sdk(method, params, opts, timeout_s, on_progress)
        self._next += 1
        rid = f"{ID_PREFIX}{self._next}"
        if on_progress is not None:
            meta = dict(params.get("_meta") or {})
            meta["progressToken"] = rid
            params = {**params, "_meta": meta}
        body = dumps_request({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}, method, params)
        try:
            data = self._head("POST", self._path, stamped, len(body)) + body
        except UnicodeEncodeError:
            return await self._via_sdk(method, params, opts, timeout_s, on_progress)
        resp: Response | None = None
        try:
            async with asyncio.timeout(timeout_s):
                resp = await self._send(data)
                for _ in range(5):  # redirects: as the SDK, 307/308 within the endpoint's origin only
                    path = self._redirect(resp)
                    if path is None:
                        break
                    await self._drain(resp)
                    data = with_path(data, path)
                    resp = None
                    resp = await self._send(data)
                return await self._answer(resp, rid, on_progress, stamped)
        except (TimeoutError, asyncio.CancelledError):
            self._abandon(resp)
            if not self._modern and not self._closed:
                # 2025 wire: tell the server to stop (2026: closing the stream is the cancel).
                reason = "timed out" if not _cancelling() else "cancelled by the client"
                self._spawn(self._notify_cancel(rid, reason, stamped))
            raise
        except Eof:
            self._abandon(resp)
            raise ChannelClosed() from None
        except BaseException:
            self._abandon(resp)
            raise

    async def _via_sdk(
        self,
        method: str,
        params: Mapping[str, Any],
        opts: dict[str, Any],
        timeout_s: float,
        on_progress: ProgressFn | None,
    ) -> dict[str, Any]:
        """The SDK session's own path, with this channel's error contract."""
        opts["timeout"] = timeout_s
        if on_progress is not None:
            opts["on_progress"] = on_progress
        try:
            return await self._session._dispatcher.send_raw_request(method, params or None, opts)  # noqa: SLF001
        except MCPError as exc:
            if exc.code == REQUEST_TIMEOUT:
                raise TimeoutError() from None
            if exc.code == CONNECTION_CLOSED:
                raise ChannelClosed() from None
            raise

    def _head(self, verb: str, path: str, stamped: Mapping[str, str], length: int | None, **extra: str) -> bytes:
        if extra or length is None:
            return self._build_head(verb, path, stamped, length, **extra)
        # A session's forwarded POSTs differ only in content-length: the rest is built once.
        key = (verb, path, self.session_id, tuple(stamped.items()))
        cached = self._head_cache
        if cached is None or cached[0] != key:
            cached = self._head_cache = (key, self._build_head(verb, path, stamped, None)[:-2])
        return b"%scontent-length: %d\r\n\r\n" % (cached[1], length)

    def _build_head(self, verb: str, path: str, stamped: Mapping[str, str], length: int | None, **extra: str) -> bytes:
        lines = [f"{verb} {path} HTTP/1.1", f"host: {self._host_header}"]
        for key, value in self._static.items():
            if key not in extra:
                lines.append(f"{key}: {value}")
        if self.session_id:
            lines.append(f"mcp-session-id: {self.session_id}")
        for key, value in stamped.items():
            lines.append(f"{key}: {value}")
        for key, value in extra.items():
            lines.append(f"{key}: {value}")
        if length is not None:
            lines.append(f"content-length: {length}")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1")

    async def _answer(
        self, resp: Response, rid: str, on_progress: ProgressFn | None, stamped: Mapping[str, str]
    ) -> dict[str, Any]:
        status = resp.status
        ctype = resp.headers.get("content-type", "").lower()
        if status == 202:
            await self._drain(resp)
            raise MCPError(code=INVALID_REQUEST, message="server answered a request with 202 Accepted")
        if 300 <= status < 400:
            await self._drain(resp)
            location = resp.headers.get("location", "")
            raise MCPError(
                code=INVALID_REQUEST,
                message=f"Redirect to {location} not followed; use that URL as the endpoint if it is the intended one",
            )
        if status >= 400:
            body = await resp.read_all()
            self._release(resp)
            if status == 404 and self.session_id is not None:
                # The server forgot our session (restarted, expired): the spec's remedy is a new
                # session, so the SDK session ends and the upstream reconnects.
                self._dead()
            if ctype.startswith("application/json"):
                # A spec-correct server may put the JSON-RPC error in a non-2xx body (as the SDK reads it).
                err = None
                with contextlib.suppress(orjson.JSONDecodeError):
                    msg = orjson.loads(body)
                    if isinstance(msg, dict) and isinstance(msg.get("error"), dict):
                        err = msg["error"]
                if err is not None:
                    raise _error(err)
            if status == 404:
                if self.session_id is None:
                    raise MCPError(code=METHOD_NOT_FOUND, message="Not Found")
                raise MCPError(code=INVALID_REQUEST, message="Session terminated")
            raise MCPError(code=INTERNAL_ERROR, message="Server returned an error response")
        if ctype.startswith("application/json"):
            body = await resp.read_all()
            self._release(resp)
            try:
                msg = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise MCPError(code=PARSE_ERROR, message=f"Failed to parse JSON response: {exc}") from None
            for item in msg if isinstance(msg, list) else [msg]:
                outcome = await self._offer(item, rid, on_progress)
                if outcome is not None:
                    return outcome
            raise MCPError(code=INTERNAL_ERROR, message="the JSON response carried no response to the request")
        if ctype.startswith("text/event-stream"):
            return await self._stream(resp, rid, on_progress, stamped)
        await self._drain(resp)
        raise MCPError(code=INVALID_REQUEST, message=f"Unexpected content type: {ctype}")

    def _redirect(self, resp: Response) -> str | None:
        """The path to re-send to, for a 307/308 within the endpoint's origin (as the SDK follows)."""
        if resp.status not in (307, 308):
            return None
        location = resp.headers.get("location")
        if not location:
            return None
        target = urlsplit(urljoin(self.url, location))
        port = target.port or (443 if target.scheme == "https" else 80)
        if (target.scheme, target.hostname, port) != (self._scheme, self._host, self._port) or target.username:
            return None
        return (target.path or "/") + (f"?{target.query}" if target.query else "")

    async def _stream(
        self, resp: Response, rid: str, on_progress: ProgressFn | None, stamped: Mapping[str, str]
    ) -> dict[str, Any]:
        try:
            return await self._stream_events(resp, rid, on_progress, stamped)
        except BaseException:
            self._abandon(self._current.pop(rid, resp))
            raise
        finally:
            self._current.pop(rid, None)

    async def _stream_events(
        self, resp: Response, rid: str, on_progress: ProgressFn | None, stamped: Mapping[str, str]
    ) -> dict[str, Any]:
        sse = SseParser()
        attempts = 0
        while True:
            try:
                while (piece := await resp.read()) is not None:
                    for event, data in sse.feed(piece):
                        if event != "message" or not data:
                            continue  # a priming event (empty data) or an unknown event type
                        try:
                            msg = orjson.loads(data)
                        except orjson.JSONDecodeError as exc:
                            raise MCPError(code=PARSE_ERROR, message=f"Failed to parse SSE message: {exc}") from None
                        for item in msg if isinstance(msg, list) else [msg]:
                            outcome = await self._offer(item, rid, on_progress)
                            if outcome is not None:
                                self._finish(resp)
                                return outcome
                self._release(resp)
            except Eof:
                self._abandon(resp)
            # The stream ended without the response: resume it if the server gave event ids.
            if not sse.last_id:
                raise ChannelClosed()
            while True:
                if attempts >= _RECONNECT_ATTEMPTS:
                    raise ChannelClosed()
                await asyncio.sleep((sse.retry if sse.retry is not None else _DEFAULT_RETRY_MS) / 1000)
                head = self._head(
                    "GET",
                    self._path,
                    stamped,
                    None,
                    accept="text/event-stream",
                    **{"last-event-id": sse.last_id},
                )
                try:
                    resp = await self._send(head)
                except (Eof, ChannelClosed):
                    attempts += 1
                    continue
                self._current[rid] = resp
                if resp.status != 200 or not resp.headers.get("content-type", "").lower().startswith(
                    "text/event-stream"
                ):
                    await self._drain(resp)
                    attempts += 1
                    continue
                attempts = 0
                sse.buf = b""
                break

    async def _offer(self, msg: Any, rid: str, on_progress: ProgressFn | None) -> dict[str, Any] | None:
        """The result if `msg` is the response; progress for our token is relayed; the rest goes to the SDK."""
        if isinstance(msg, dict):
            if "method" not in msg and ("result" in msg or "error" in msg):
                # Any response on a request's own stream answers that request (as in the SDK).
                if isinstance(msg.get("error"), dict):
                    raise _error(msg["error"])
                result = msg.get("result")
                return result if isinstance(result, dict) else {}
            if on_progress is not None and msg.get("method") == "notifications/progress":
                params = msg.get("params")
                if isinstance(params, dict) and params.get("progressToken") == rid:
                    with contextlib.suppress(Exception):
                        await on_progress(params.get("progress", 0), params.get("total"), params.get("message"))
                    return None
            if self.on_log is not None and msg.get("method") == "notifications/message" and "id" not in msg:
                with contextlib.suppress(Exception):
                    await self.on_log(msg.get("params"))
                return None
        if self._inject is not None:
            await self._inject(msg)
        return None

    async def _notify_cancel(self, rid: str, reason: str, stamped: Mapping[str, str]) -> None:
        body = orjson.dumps(
            {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": rid, "reason": reason}}
        )
        headers = {k: v for k, v in stamped.items() if k.lower() == "mcp-protocol-version"}
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                resp = await self._send(self._head("POST", self._path, headers, len(body)) + body)
                await self._drain(resp)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _error(err: dict[str, Any]) -> MCPError:
    return MCPError(
        code=int(err.get("code", INTERNAL_ERROR)), message=str(err.get("message", "")), data=err.get("data")
    )


def _cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task is not None and task.cancelling())


def _plain_transport(url: str, http: Any) -> bool:
    """Whether httpx2 would send requests for `url` straight over its own connection pool.

    Not so with a proxy (environment or `mounts`), or a custom transport (`transport=`).
    """
    try:
        import httpx2

        transport = http._transport_for_url(httpx2.URL(url))  # noqa: SLF001 - httpx2's own routing
        return transport is http._transport and isinstance(transport, httpx2.AsyncHTTPTransport)  # noqa: SLF001
    except Exception:  # noqa: BLE001 - anything unexpected: leave the requests to the SDK
        return False


class _WriteStream:
    """The SDK transport's write stream with the side channel attached (`.fast`, as on stdio)."""

    def __init__(self, inner: Any, fast: HttpFastChannel) -> None:
        self._inner = inner
        self.fast = fast

    async def send(self, item: Any) -> None:
        await self._inner.send(item)

    def close(self) -> None:
        self._inner.close()

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _WriteStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@asynccontextmanager
async def side_channel(url: str, http: Any, read: Any, write: Any) -> AsyncIterator[tuple[Any, Any]]:
    """Attach an `HttpFastChannel` to an SDK `streamable_http_client` stream pair.

    Yields the pair the `ClientSession` should use: the read stream gains the messages the side
    channel hands over (the SDK's own are pumped through unchanged), the write stream carries
    the channel as `.fast`. Yields the SDK's pair untouched when no side channel fits.
    """
    fast = HttpFastChannel.create(url, http)
    if fast is None:
        yield read, write
        return
    http.event_hooks["request"].append(fast.on_request)
    http.event_hooks["response"].append(fast.on_response)
    send, recv = anyio.create_memory_object_stream[SessionMessage | Exception](64)
    validate = types.jsonrpc_message_adapter.validate_python

    async def inject(obj: Any) -> None:
        try:
            msg = validate(obj, by_name=False)
        except Exception as exc:  # noqa: BLE001 - reported to the session like any bad message
            logger.debug("%s: unparsable message on a side-channel stream: %.200r", url, obj)
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                await send.send(exc)
            return
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await send.send(SessionMessage(msg))

    fast._inject = inject  # noqa: SLF001
    fast._on_dead = send.close  # noqa: SLF001 - the session sees EOF and the upstream restarts

    async def pump() -> None:
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            async with send:
                async for item in read:
                    await send.send(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(pump)
        try:
            yield recv, _WriteStream(write, fast)
        finally:
            fast.close()
            tg.cancel_scope.cancel()
