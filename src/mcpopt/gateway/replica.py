"""This process as one replica of several behind a load balancer: its name, and a graceful drain.

`ReplicaEdge` is the outermost ASGI layer of the HTTP front:

* every response carries `X-Mcpopt-Replica: <gateway.shared.replica>` (which replica served a
  request is visible to clients, balancer logs and tests);
* it counts the requests in flight (an open GET stream of a session is not one: it lasts as long
  as the session and carries no call);
* on `begin_drain()` (SIGTERM, via `DrainingServer`) `/healthz` answers 503 `{"ok": false,
  "draining": true}` so the balancer takes the replica out, and every new request is refused with
  503, `Retry-After: 1` and `Connection: close` before anything runs (a balancer that retries on
  503 -- HAProxy's `retry-on 503` -- sends it to another replica; nothing was executed). The
  requests already in flight are finished; then the process exits, at the latest after
  `gateway.http.drain_timeout_ms` (calls still running then are cut off, as on any exit).

A second SIGTERM, or SIGINT (Ctrl-C) while draining, exits at once (uvicorn's own behaviour).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import orjson
import uvicorn
from mcp_types import INTERNAL_ERROR

from mcpopt.asgi import header_map

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

REPLICA_HEADER = b"x-mcpopt-replica"
DRAINING_MESSAGE = "This gateway replica is shutting down; retry the request (another replica serves it)"


class ReplicaEdge:
    """ASGI layer: replica header, requests in flight, refusal while draining (module doc).

    Args:
        app: the HTTP front's app.
        replica: this replica's name (`gateway.shared.replica`).
        health_path: the readiness route answered 503 while draining.
        closers: coroutine functions `aclose` runs.

    `stamp` (default True): this layer adds the replica header to each response itself. The
    server sets it False when it adds `default_header()` to every response it writes (uvicorn's
    `Config(headers=...)`), which costs nothing per request.
    """

    def __init__(
        self, app: Any, replica: str, *, health_path: str = "/healthz", closers: list[Any] | None = None
    ) -> None:
        self.app = app
        self.closers = closers if closers is not None else []
        """Coroutine functions run by `aclose` (shared stores of the layers inside)."""
        self.replica = replica
        self._header = (REPLICA_HEADER, replica.encode("latin-1", "replace"))
        self.stamp = True
        self.health_path = health_path
        self.draining = False
        self.inflight = 0
        """HTTP requests being served now (not counting sessions' GET streams)."""
        self.refused = 0
        """Requests refused because the replica was draining."""
        self._idle = asyncio.Event()
        self._idle.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.draining:
            return await self._refuse(scope, send)
        named: Send = send
        if self.stamp:
            header = self._header

            async def named(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()), header]
                await send(message)

        if scope["method"] == "GET" and scope["path"] != self.health_path and _wants_stream(scope):
            return await self.app(scope, receive, named)  # a session's GET stream: not a request in flight
        self.inflight += 1
        self._idle.clear()
        try:
            await self.app(scope, receive, named)
        finally:
            self.inflight -= 1
            if not self.inflight:
                self._idle.set()

    def default_header(self) -> tuple[str, str]:
        """`(name, value)` of the replica header, for a server that adds it to every response."""
        return REPLICA_HEADER.decode(), self._header[1].decode("latin-1")

    def begin_drain(self) -> None:
        """Refuse new requests from now on; `/healthz` answers 503."""
        if not self.draining:
            self.draining = True
            logger.warning("draining: %d request(s) in flight; new requests get 503", self.inflight)

    async def drained(self, timeout_s: float) -> bool:
        """Wait until no request is in flight (True) or `timeout_s` passed (False)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False

    async def aclose(self) -> None:
        """Release what the layers inside hold (after the server stopped)."""
        for close in self.closers:
            try:
                await close()
            except Exception as exc:  # noqa: BLE001 - shutting down: note it, go on
                logger.debug("closing %r failed: %s", close, exc)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        self.refused += 1
        if scope["path"] == self.health_path:
            body = orjson.dumps({"ok": False, "draining": True})
        else:
            body = orjson.dumps(
                {"jsonrpc": "2.0", "id": None, "error": {"code": INTERNAL_ERROR, "message": DRAINING_MESSAGE}}
            )
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"),
            (b"connection", b"close"),
            *((self._header,) if self.stamp else ()),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _wants_stream(scope: Scope) -> bool:
    accept = header_map(scope).get(b"accept")
    return accept is not None and b"text/event-stream" in accept


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM drains (`ReplicaEdge`) before it exits.

    Args:
        config: uvicorn's config.
        edge: the app's `ReplicaEdge`.
        drain_timeout_s: the longest the requests in flight are waited for.
    """

    def __init__(self, config: uvicorn.Config, edge: ReplicaEdge, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.edge = edge
        self.drain_timeout_s = drain_timeout_s
        self._drain: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.edge.draining or self._loop is None:
            if self.edge.draining:
                self.force_exit = True
            super().handle_exit(sig, frame)
            return
        # Not recorded in `_captured_signals`: uvicorn would re-raise it after serving, which kills
        # the process before the gateway's own shutdown (upstream children, stores) has run.
        self.edge.begin_drain()
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        if not await self.edge.drained(self.drain_timeout_s):
            logger.warning(
                "drain timeout (gateway.http.drain_timeout_ms) reached with %d request(s) in flight; exiting",
                self.edge.inflight,
            )
        else:
            logger.warning("drained; exiting")
        # What is left open now is sessions' GET streams and idle keep-alive connections: uvicorn
        # would wait for them without bound.
        self.config.timeout_graceful_shutdown = 1
        self.should_exit = True
