"""Parked HTTP sessions: an idle handshake-era session costs a record, not the SDK's machinery.

An open Streamable HTTP session holds, in the SDK, a transport, a JSON-RPC dispatcher, their
memory streams, a task in the session manager's task group and two tasks parked on streams:
about 31 KiB of the 40 KiB an idle session costs (issue 17 item 4; `/work/notes/done/lists.md`
has the tracemalloc breakdown). Most sessions of a busy gateway are idle most of the time.

`SessionParking` ends that machinery for a session that has been idle for
`gateway.http.session_park_ms` and keeps only its `SessionRecord` (`session_store`: protocol
version, the client's `initialize` params, the principal it is bound to, its log level, its
resource subscriptions; a few hundred bytes of JSON): in this process (`LocalRecords`) without
Redis, in Redis (the record the replicas share) with it, plus a copy here that resumes it when
Redis is down or lost the record (flushed, restarted empty). The session's next request finds its id
unknown to the SDK and is re-hydrated by `SharedSessions` exactly as a session moving between
replicas is: same session id, no second `initialize`, log level and subscriptions restored. The
client cannot tell, except that notifications that would have gone to a GET stream while it had
none are not delivered (as before: the SDK drops them too when no GET stream is open).

Idle means, at the sweep: no request in flight on the session (the edge's `SessionGuard` counts
them; an open GET stream is one), no SSE stream open on its transport, no server-to-client request
awaiting its answer and no client request being handled by its dispatcher, not being resumed
(`SharedSessions.hydrating`: its request is on the way to the guard), and its last request
ended at least `session_park_ms` ago. Only handshake-era sessions park (a 2026-07-28 client has
no session).

One timer for all sessions (`loop.call_later`, every `session_park_ms / 2`, at least 50 ms):
nothing runs per session while idle; each sweep also drops the expired `LocalRecords`. A parked
session counts toward `max_sessions` and is evicted as a record by the `SessionGuard`; it
expires `session_idle_timeout_ms` after its last request, as a live one would; a DELETE ends
it (re-hydrated, then deleted as any session).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from mcp.server.connection import Connection

from mcpopt.gateway.session_store import SharedSessions
from mcpopt.gateway.sessions import SessionGuard
from mcpopt.state.memory import MemoryStateStore

logger = logging.getLogger(__name__)

MIN_SWEEP_S = 0.05
"""The sweep never runs more often than this (seconds), whatever `session_park_ms` says."""


class LocalRecords(MemoryStateStore):
    """Session records in this process (no Redis): the `RecordStore` of `SharedSessions` then.

    Nobody else reads them, so `publish` has no one to tell. Unbounded in size on purpose: a
    record dropped to make room would be a session lost; their number is bounded by
    `gateway.http.max_sessions` (the guard evicts, and eviction deletes the record).
    """

    url: str | None = None
    prefix = ""

    def __init__(self) -> None:
        super().__init__(max_bytes=1 << 62)

    async def publish(self, channel: str, message: bytes) -> None:
        return None

    async def expire(self, key: str, ttl_s: float) -> bool:
        value = await self.get(key)
        if value is None:
            return False
        await self.set(key, value, ttl_s)
        return True

    async def update(
        self, key: str, change: Callable[[bytes | None], bytes], ttl_s: float, *, expect: bytes | None = None
    ) -> bytes:
        """Replace the value by `change(current)` (one process, no await in between: atomic;
        `expect` is not needed here)."""
        value = change(await self.get(key))
        await self.set(key, value, ttl_s)
        return value

    def purge(self) -> None:
        """Drop the expired records (a record is also checked when read)."""
        now = self._clock()
        for key in [k for k, (_, expires) in self._data.items() if expires <= now]:
            self._drop(key)


class SessionParking:
    """Parks idle sessions and counts them (see the module doc).

    Args:
        shared: the `SharedSessions` layer (records, re-hydration) in front of `guard`.
        guard: the edge's `SessionGuard` (requests in flight per session, `max_sessions`).
        manager: the SDK's `StreamableHTTPSessionManager`.
        park_s: idle time before a session parks (seconds, > 0).
        idle_timeout_s: `gateway.http.session_idle_timeout_ms` in seconds (a parked session's
            record expires that long after its last request).
    """

    def __init__(
        self, shared: SharedSessions, guard: SessionGuard, manager: Any, *, park_s: float, idle_timeout_s: float
    ) -> None:
        if park_s <= 0:
            raise ValueError("park_s must be > 0")
        self.shared = shared
        self.guard = guard
        self.manager = manager
        self.park_s = park_s
        self.idle_timeout_s = idle_timeout_s
        self.interval_s = max(MIN_SWEEP_S, park_s / 2)
        self.parked = guard.parked
        """Session id -> when its record expires (monotonic seconds); shared with the guard."""
        self.parks = 0
        self._parking: dict[str, asyncio.Event] = {}
        """Sessions being parked now. A request for one waits (`settled`) until it is parked or kept:
        while the SDK session is being discarded it is still listed as live, and a request let
        through then would reach a session that is gone (404)."""
        """Sessions parked so far (a session parked twice counts twice)."""
        self.resumes = 0
        """Parked sessions re-hydrated by a request."""
        self._timer: asyncio.TimerHandle | None = None
        self._sweeping: asyncio.Task[None] | None = None
        self._next_expiry = 0.0
        shared.on_resume = self._resumed
        shared.on_drop = self._dropped
        if isinstance(shared.store, LocalRecords):
            # An evicted session's record goes too, or its next request would resume it. (With Redis
            # the record stays, as `SharedSessions` keeps it for evicted live sessions: it may be
            # live on another replica by now; here the parked copy is only forgotten.)
            guard.on_evict = shared._drop_everywhere  # noqa: SLF001

    # ---- counters ----------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """`{"open", "parked", "parks", "resumes"}`: sessions with their SDK machinery, parked ones,
        and the totals since start (for `/healthz` details and tests)."""
        return {
            "open": len(self.manager._server_instances),  # noqa: SLF001
            "parked": len(self.parked),
            "parks": self.parks,
            "resumes": self.resumes,
        }

    def _resumed(self, sid: str) -> bool:
        if self.parked.pop(sid, None) is None:
            return False
        self.resumes += 1
        return True

    def _dropped(self, sid: str) -> None:
        self.parked.pop(sid, None)

    # ---- the one timer -----------------------------------------------------------------------
    def start(self) -> None:
        """Arm the sweep (idempotent; needs the running event loop)."""
        if self._timer is None and self._sweeping is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._sweeping = asyncio.ensure_future(self._sweep_then_rearm())

    async def _sweep_then_rearm(self) -> None:
        try:
            await self.sweep()
        except Exception:  # noqa: BLE001 - one bad sweep must not stop parking for good
            logger.exception("session parking sweep failed")
        finally:
            self._sweeping = None
            self.start()

    async def sweep(self) -> int:
        """Expire parked records past their time, park every idle session; the number parked."""
        now = time.monotonic()
        if self.parked and now >= self._next_expiry:
            self._expire(now)
        if isinstance(self.shared.store, LocalRecords):
            # Every sweep: records of sessions that ended unparked (idle timeout, crash) expire too.
            self.shared.store.purge()
        live = self.manager._server_instances  # noqa: SLF001
        if not live:
            return 0
        held = self.guard.held
        due = [
            sid
            for sid, transport in live.items()
            if (h := held.get(sid)) is not None
            and not h.inflight
            and now - h.last >= self.park_s
            and _quiet(transport)
            and not self.shared.hydrating(sid)
        ]
        if not due:
            return 0
        conns = {c.session_id: c for c in self.shared.gateway.clients.connections if c.session_id is not None}
        parked = 0
        for sid in due:
            if await self.park(sid, conns.get(sid)):
                parked += 1
        return parked

    def _expire(self, now: float) -> None:
        gone = [sid for sid, expires in self.parked.items() if expires <= now]
        for sid in gone:
            del self.parked[sid]
            self.guard.held.pop(sid, None)
        self._next_expiry = min(self.parked.values(), default=now + self.idle_timeout_s)

    async def settled(self, sid: str) -> None:
        """Return once `sid` is not being parked (at once, the usual case)."""
        event = self._parking.get(sid)
        if event is not None:
            await event.wait()

    async def park(self, sid: str, conn: Connection | None) -> bool:
        """End `sid`'s SDK session and keep its record; False when it is not one to park (now)."""
        if sid in self._parking:
            return False
        event = self._parking[sid] = asyncio.Event()
        try:
            return await self._park(sid, conn)
        finally:
            del self._parking[sid]
            event.set()

    async def _park(self, sid: str, conn: Connection | None) -> bool:
        transport = self.manager._server_instances.get(sid)  # noqa: SLF001
        held = self.guard.held.get(sid)
        if transport is None or held is None or held.inflight or conn is None or not _quiet(transport, conn):
            return False
        if self.shared.hydrating(sid):
            return False  # being resumed: its request has not reached the guard yet
        record = self.shared.record_of(sid, conn)
        if record is None:
            return False  # not an initialized handshake-era session
        ttl_s = self.idle_timeout_s - (time.monotonic() - held.last)
        if ttl_s <= 0:
            return False  # the SDK's idle timeout ends it now anyway
        try:
            # Merged into the stored record (compare-and-set): a change another replica stored meanwhile is
            # kept; one made here but not stored yet (Redis was down then) is announced, as any change is.
            await self.shared.store_record(sid, record, ttl_s, conn)
        except Exception as exc:  # noqa: BLE001 - store down: the session stays as it is
            logger.warning("cannot park MCP session %s (%s); it stays open", sid[:12], exc)
            return False
        # Anything could have happened during the await: park only a session still idle.
        if (
            self.manager._server_instances.get(sid) is not transport  # noqa: SLF001
            or held.inflight
            or not _quiet(transport, conn)
            or self.shared.hydrating(sid)
        ):
            return False
        self.parked[sid] = time.monotonic() + ttl_s
        self._next_expiry = min(self._next_expiry, self.parked[sid]) if self._next_expiry else self.parked[sid]
        self.parks += 1
        await self.manager._discard_session(sid, transport)  # noqa: SLF001 - forgets it, terminates it
        if transport.idle_scope is not None:
            transport.idle_scope.cancel()  # its server task and dispatcher end now
        self.shared.gateway.clients.forget(conn)  # the resumed session gets a new Connection
        return True

    async def aclose(self) -> None:
        """Stop the sweep."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sweeping is not None:
            self._sweeping.cancel()


def _quiet(transport: Any, conn: Connection | None = None) -> bool:
    """No request or stream open on the transport, nothing pending in the session's dispatcher."""
    if transport.is_terminated or transport._requests_in_flight or transport._request_streams:  # noqa: SLF001
        return False
    if conn is None:
        return True
    dispatcher = conn.outbound
    return not getattr(dispatcher, "_pending", None) and not getattr(dispatcher, "_in_flight", None)
