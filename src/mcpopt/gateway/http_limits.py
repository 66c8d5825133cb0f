"""Connection limits of the HTTP front: read deadlines, a head-size cap, and a connection cap that
sheds stalled connections first, on top of uvicorn's httptools protocol.

uvicorn has a keep-alive timeout but no deadline for a request head that never finishes, no
head-size limit on its httptools protocol, and `limit_concurrency` answers 503 to *new* requests
when full -- so 1,100 connections that send half a head and stall filled the process's 1,024 file
descriptors and shut every other client out (issue 10). `EdgeHttpProtocol` adds:

* a head deadline (`header_timeout_ms`, from the connection's first byte or the end of the
  previous response): 408 and close;
* a body deadline (`body_timeout_ms` after the head): close;
* a head-size cap (`max_header_bytes`): 431 and close;
* a connection cap (`max_connections`, lowered to fit the file-descriptor limit): a new
  connection over it closes the oldest connection still sending its head, else the oldest idle
  keep-alive one, else is itself refused with 503. Connections serving a request are never shed.

It also writes a response's head and its first body chunk in one `write` when the app sends both
in the same event-loop iteration (uvicorn writes each ASGI message at once: two syscalls and two
wake-ups of the client per JSON answer). The head waits at most until the loop's next iteration,
so a streamed response whose first event comes later is not delayed by more than that.

The file-descriptor soft limit is raised to the hard limit at start (`raise_file_limit`), as
servers commonly do; `max_connections` is then capped at the limit minus a reserve for upstream
pipes and sockets, telemetry files and connections being accepted (asyncio accepts up to its
backlog before a protocol sees them).

Timeout values follow nginx (`client_header_timeout`, `client_body_timeout`: 60 s) and Apache's
mod_reqtimeout (`header=20-40`); the head-size cap follows nginx's `large_client_header_buffers`
order of magnitude (4 x 8 KiB; 64 KiB here, as SSE/JWT headers can be long).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

FILE_RESERVE = 256
"""File descriptors kept for everything but client connections (upstreams, files, accept bursts)."""


class EdgeLimits:
    """The limits one server applies; seconds and bytes."""

    __slots__ = ("max_connections", "header_timeout_s", "body_timeout_s", "max_header_bytes", "shed", "refused")

    def __init__(self, max_connections: int, header_timeout_s: float, body_timeout_s: float, max_header_bytes: int):
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_header_bytes = max_header_bytes
        self.shed = 0
        """Connections closed to make room for new ones."""
        self.refused = 0
        """New connections refused because every open one was busy."""


_HEAD, _BUSY, _IDLE = 0, 1, 2


class EdgeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above (`limits` is set by `protocol_class`)."""

    limits: ClassVar[EdgeLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _HEAD
        self._since = 0.0
        self._head_bytes = 0
        self._due: float | None = None
        """When the current deadline expires (event-loop time; None: no deadline)."""
        self._due_phase = _HEAD
        """The phase that deadline is for (`_HEAD`: 408, `_BUSY`: the body's; close)."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # ---- lifecycle -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._enter_head()
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == _IDLE:
            self._enter_head()
        super().data_received(data)
        if self._phase == _HEAD and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._reject(431, b"Request Header Fields Too Large")

    # ---- parser callbacks ------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self._phase = _BUSY
        self._set_deadline(_BUSY, self.limits.body_timeout_s)
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.transport is self.transport:
            cycle.transport = _HeadWithBody(self.transport, cycle, self.loop)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self._cancel_deadline()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._phase = _IDLE  # uvicorn's keep-alive timer runs until the next request starts
            self._since = self.loop.time()

    # ---- deadlines -------------------------------------------------------------------------
    # One timer per connection, moved lazily: a request sets a deadline (a float), and the timer,
    # when it fires before the deadline now due, re-arms itself for it. A connection serving
    # request after request schedules about one timer per deadline length, not two per request.
    def _enter_head(self) -> None:
        self._phase = _HEAD
        self._since = self.loop.time()
        self._head_bytes = 0
        self._set_deadline(_HEAD, self.limits.header_timeout_s)

    def _set_deadline(self, phase: int, seconds: float) -> None:
        due = self.loop.time() + seconds
        self._due = due
        self._due_phase = phase
        timer = self._timer
        if timer is None or self._timer_at > due:
            if timer is not None:
                timer.cancel()
            self._timer_at = due
            self._timer = self.loop.call_at(due, self._deadline_reached)

    def _cancel_deadline(self) -> None:
        self._due = None  # (the timer, if armed, finds nothing due and stops)

    def _stop_timer(self) -> None:
        self._due = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deadline_reached(self) -> None:
        self._timer = None
        due = self._due
        if due is None:
            return
        if self.loop.time() < due:
            self._timer_at = due
            self._timer = self.loop.call_at(due, self._deadline_reached)
            return
        self._due = None
        if self._due_phase == _HEAD:
            self._head_expired()
        else:
            self._body_expired()

    def _head_expired(self) -> None:
        if self._phase == _HEAD and not self.transport.is_closing():
            self._reject(408, b"Request Timeout")

    def _body_expired(self) -> None:
        if not self.transport.is_closing():
            logger.info("closing a connection whose request body took over %g s", self.limits.body_timeout_s)
            self.transport.close()

    def _reject(self, status: int, reason: bytes) -> None:
        self._stop_timer()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-length: 0\r\nconnection: close\r\n\r\n" % (status, reason))
        self.transport.close()

    # ---- the connection cap ----------------------------------------------------------------
    def _make_room(self) -> None:
        """Close the oldest stalled head, else the oldest idle keep-alive connection, else refuse this one."""
        oldest: dict[int, tuple[float, EdgeHttpProtocol]] = {}
        for conn in self.connections:
            if conn is self or not isinstance(conn, EdgeHttpProtocol) or conn.transport.is_closing():
                continue
            phase = conn._phase
            if phase == _BUSY:
                continue
            best = oldest.get(phase)
            if best is None or conn._since < best[0]:
                oldest[phase] = (conn._since, conn)
        victim = (oldest.get(_HEAD) or oldest.get(_IDLE) or (0.0, None))[1]
        if victim is not None:
            self.limits.shed += 1
            if victim._phase == _HEAD:
                victim._reject(408, b"Request Timeout")
            else:
                victim.transport.close()
            return
        self.limits.refused += 1
        self._reject(503, b"Service Unavailable")


class _HeadWithBody:
    """The transport one request's response is written to: the head is held until the body's first
    write in the same loop iteration (one syscall for both), else written on the next iteration.

    Only uvicorn's `RequestResponseCycle` uses it (`write`, `close`, `is_closing`).
    """

    __slots__ = ("transport", "cycle", "loop", "held", "handle", "head_seen")

    def __init__(self, transport: asyncio.Transport, cycle: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.cycle = cycle
        self.loop = loop
        self.held: bytes | None = None
        self.handle: asyncio.Handle | None = None
        self.head_seen = False

    def write(self, data: bytes) -> None:
        held = self.held
        if held is not None:
            self.held = None
            if self.handle is not None:
                self.handle.cancel()
                self.handle = None
            self.transport.write(held + data)
            return
        if not self.head_seen and self.cycle.response_started:  # uvicorn writes the head right after setting this
            self.head_seen = True
            if not self.transport.is_closing():
                self.held = data
                self.handle = self.loop.call_soon(self.flush)
                return
        self.transport.write(data)

    def flush(self) -> None:
        self.handle = None
        held = self.held
        if held is not None:
            self.held = None
            if not self.transport.is_closing():
                self.transport.write(held)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


def protocol_class(limits: EdgeLimits) -> type[EdgeHttpProtocol]:
    """An `EdgeHttpProtocol` subclass bound to `limits` (uvicorn instantiates the class itself)."""
    return type("BoundEdgeHttpProtocol", (EdgeHttpProtocol,), {"limits": limits})


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (capped at 1,048,576); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    target = min(target, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft
    return target


def fit_connections(wanted: int, file_limit: int) -> int:
    """`wanted` connections, or fewer if the file limit cannot hold them with `FILE_RESERVE` to spare."""
    room = max(16, file_limit - FILE_RESERVE)
    if wanted > room:
        logger.warning(
            "HTTP front: gateway.http.max_connections %d lowered to %d to fit the file-descriptor limit %d",
            wanted,
            room,
            file_limit,
        )
        return room
    return wanted
