"""Client sessions any replica can serve: handshake-era session records in Redis (sliding TTL).

Behind a round-robin balancer a handshake-era client's next request lands on any replica, and
the replica that created its session may die. The SDK keeps a session (`Mcp-Session-Id`, its
transport, its `Connection`) in one process, so another replica would answer 404 "Session not
found" and the client would have to initialize again. `SharedSessions`, an ASGI layer in front of
the session guard, keeps a record of each session in the shared store instead:

* **what a record holds**: the negotiated protocol version (hence the era), the client's
  `initialize` params (capabilities, `clientInfo`), the principal the session is bound to (the
  SDK's `AuthorizationContext`), its `logging/setLevel`, and its resource subscriptions (with
  the isolation owner they belong to). Pagination cursors need nothing: the gateway's cursors
  are offsets into lists every replica builds the same way from the same config.
* **when it is written**: before the answer to `initialize` reaches the client (so the client's
  very next request, e.g. `notifications/initialized` on another replica, finds it), and before
  the answer to a `logging/setLevel`, `resources/subscribe` or `resources/unsubscribe` that
  changed it (before each body chunk of that answer, so also once its handler has ended: an SSE
  answer may send a chunk first), and when the session parks (`mcpopt.gateway.parking`; that
  write also stores a change Redis could not take when it was made); a write that changed the
  stored record is published so replicas holding a copy apply it at once
  (`SharedSessions.store_record`). A client's DELETE removes the record and ends the copies on
  every replica.
* **concurrent writers**: a write is a compare-and-set (`RecordStore.update`: a Lua script, one
  round trip, or a WATCH/MULTI/EXEC transaction where Redis refuses scripts; retried on what is
  stored when another replica wrote in between) that merges this replica's changes since the
  record it last wrote or read into the stored one (`SessionRecord.merge`; each write adds one to
  the record's `version`), so two replicas changing one session at once both keep their change,
  and a removal is never undone. An announced record is applied the same way: onto what this
  replica changed since it last wrote or read the record (a request's handler changes the live
  session before its answer's write), and read again when this replica wrote the record while
  reading it (not by version: an older release's records have none); one heard while the session
  is being opened here from its record is heard again once it is open.
* **re-hydration**: a request whose session id this replica does not know is looked up (one
  GET); when a record exists and the request's credential is the one the session is bound to,
  and the session guard admits it as it would a new session (room made at `max_sessions`, else
  503), the replica opens a local session under the same id -- an initialized SDK `Connection` with
  the recorded version and client params, the log level and subscriptions restored (upstream
  subscriptions are made again on this replica, in the background) -- and the request is served
  as if the session had always been here. No 404, no second `initialize`. Without a record
  (expired, deleted, never existed), with another credential, or with a record whose client
  params do not validate (logged), the SDK answers 404 as before. A session this replica parked
  (`mcpopt.gateway.parking`) is resumed from the copy kept here when Redis is down or lost it.
* **sliding TTL**: the record lives `gateway.http.session_idle_timeout_ms` after the session's
  last request on any replica; a replica refreshes it (`PEXPIRE`, in the background) at most
  once per quarter TTL per session, so an ordinary call costs no Redis round trip at all.

Upstream sessions stay per replica (the gateway's pools, opened on demand); a 2026-07-28 client
has no session and needs none of this (every request carries its own envelope).

Why a store and not an encrypted session id (agentgateway's way): an `Mcp-Session-Id` is fixed
when the session opens, but a session's log level and subscriptions change later, and a DELETE
must end the session everywhere; a self-contained id can carry neither. README "Scale-out" has
the cost per request of both.

Redis down: sessions stay local to the replica that has them (one warning, then one when Redis
is back); no request fails because of it. Only Redis errors count as an outage: a failure while
applying another replica's announcement is logged and the listener goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import anyio
import orjson
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, authorization_context
from mcp.server.connection import Connection
from mcp.server.runner import serve_connection
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.shared.jsonrpc_dispatcher import JSONRPCDispatcher
from mcp_types import InitializeRequestParams
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from pydantic import ValidationError

from mcpopt.gateway.clients import LEVELS
from mcpopt.gateway.edge import MESSAGE_SCOPE_KEY
from mcpopt.gateway.sessions import SessionGuard, client_key, discard_only_own, refuse, session_id_of
from mcpopt.state import StateUnavailable
from mcpopt.state.redis import RedisStateStore, report_down, report_up

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

CHANNEL = "sessions"
"""Pub/sub channel (under the key prefix) on which a changed or deleted session is announced."""
RETRY_S = 1.0
"""After a store failure, unknown sessions are not looked up for this long (each lookup would wait
for the store's connect timeout); the listener and refreshes keep probing, and the first success
ends it."""
ANNOUNCE_RETRY_S = 1.0
"""An announcement that failed after its write was stored is sent again after this long (seconds),
and at once after the store's next success here, until sent."""
REREADS = 3
"""An announced record is read again at most this many times when this replica wrote the session's
record while reading it (`SharedSessions._remote_change`)."""
_STATEFUL = frozenset({"logging/setLevel", "resources/subscribe", "resources/unsubscribe"})
_HANDSHAKE = frozenset(HANDSHAKE_PROTOCOL_VERSIONS)


class RecordStore(Protocol):
    """Where session records live: `RedisStateStore` (replicas), or this process's own records
    (`mcpopt.gateway.parking.LocalRecords`, for parked sessions without Redis)."""

    url: str | None
    """The Redis URL (None: this process only, nothing to listen to)."""
    prefix: str

    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...
    async def delete(self, key: str) -> None: ...
    async def publish(self, channel: str, message: bytes) -> None: ...
    async def expire(self, key: str, ttl_s: float) -> bool: ...
    async def update(
        self, key: str, change: Callable[[bytes | None], bytes], ttl_s: float, *, expect: bytes | None = None
    ) -> bytes:
        """Replace the value by `change(current)` atomically (compare-and-set, starting from the
        guess `expect`, retried on what is stored when another writer got in between); the value
        written."""
        ...


def session_key(session_id: str) -> str:
    """The store key of a session's record."""
    return f"session:{session_id}"


@dataclass(slots=True)
class SessionRecord:
    """What any replica needs to serve a handshake-era session (JSON in the store)."""

    protocol_version: str
    client: dict[str, Any]
    """The client's `initialize` params (JSON, wire names)."""
    owner: dict[str, Any] | None = None
    """The SDK's `AuthorizationContext` the session is bound to (None: unauthenticated)."""
    log_level: str | None = None
    subscriptions: list[str] = field(default_factory=list)
    sub_owner: str = ""
    """The isolation owner key of the subscriptions ("" for the shared upstream session)."""
    version: int = 0
    """Writes so far (each compare-and-set write adds one; `merge`); 0 in a record written by an
    older release (no such field), which current replicas read and merge onto like any other."""

    def encode(self) -> bytes:
        # orjson's bytes keep the 4 KiB buffer it wrote into (tracemalloc: 4,089 B for a 214-byte
        # record); a record is kept per session (parked, or `_saved`), so keep an exact-size copy.
        return bytes(memoryview(orjson.dumps(asdict(self), option=orjson.OPT_SORT_KEYS)))

    @classmethod
    def decode(cls, raw: bytes) -> SessionRecord | None:
        """The record in `raw`, or None when it is not one (a store may be shared: check it all)."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict):
            return None
        version, client, owner = data.get("protocol_version"), data.get("client"), data.get("owner")
        level, subs, sub_owner = data.get("log_level"), data.get("subscriptions", []), data.get("sub_owner", "")
        writes = data.get("version", 0)
        if not isinstance(writes, int) or isinstance(writes, bool) or writes < 0:
            return None
        if version not in _HANDSHAKE or not isinstance(client, dict):
            return None
        if owner is not None and not (isinstance(owner, dict) and set(owner) == {"client_id", "issuer", "subject"}):
            return None
        if level is not None and level not in LEVELS:
            return None
        if not isinstance(subs, list) or not all(isinstance(u, str) for u in subs) or not isinstance(sub_owner, str):
            return None
        return cls(version, client, owner, level, subs, sub_owner, writes)

    def merge(self, base: SessionRecord | None, current: SessionRecord | None) -> SessionRecord:
        """This replica's record (`self`, its live state) merged into the stored one (`current`):
        the changes made here since `base` (the record this replica last wrote or read) are applied
        to `current`, so a change another replica stored meanwhile is kept, not overwritten. With no
        `base` (nothing written or read here yet) but a stored record, nothing here is known to be a
        change: the stored state wins, so a subscription another replica removed is never brought
        back. The result's version is one more than `current`'s."""
        if current is None:
            return SessionRecord(**{**asdict(self), "version": (base.version if base else 0) + 1})
        if base is None:
            return SessionRecord(**{**asdict(current), "version": current.version + 1})
        before, ours = set(base.subscriptions), set(self.subscriptions)
        added, removed = ours - before, before - ours
        subs = [u for u in current.subscriptions if u not in removed]
        subs += sorted(added - set(subs))
        level = self.log_level if self.log_level != base.log_level else current.log_level
        return SessionRecord(
            self.protocol_version,
            self.client,
            self.owner,
            level,
            subs,
            self.sub_owner if (subs or self.subscriptions) else current.sub_owner,
            current.version + 1,
        )


class SharedSessions:
    """ASGI layer: session records in the shared store, re-hydration on any replica (module doc).

    Args:
        app: the next layer (the session guard, in front of the MCP endpoint).
        gateway: the `Gateway` (its `clients` registry: connections, log levels, subscriptions).
        manager: the SDK's `StreamableHTTPSessionManager` behind `app`.
        store: the shared store (`gateway.shared.redis_url`).
        ttl_s: sliding TTL of a record (seconds; the session idle timeout).
        guard: the `SessionGuard` behind this layer (a re-hydrated session is admitted there).
        path: the MCP endpoint's path.
    """

    def __init__(
        self,
        app: Any,
        gateway: Any,
        manager: Any,
        store: RecordStore,
        *,
        ttl_s: float,
        guard: SessionGuard | None = None,
        path: str = "/mcp",
        on_resume: Callable[[str], bool] | None = None,
    ) -> None:
        self.app = app
        self.gateway = gateway
        self.manager = manager
        discard_only_own(manager)  # ids are reused here: a late discard must not end the new session
        self.store = store
        self.ttl_s = ttl_s
        self.guard = guard
        self.path = path
        self.token = f"{os.getpid()}:{id(self):x}:{time.time_ns()}"
        """Who published a change (a replica ignores its own announcements)."""
        self._saved: dict[str, tuple[bytes, float]] = {}
        """Session id -> (the record last written or read, when its TTL was last refreshed)."""
        self._hydrating: dict[str, asyncio.Future[str | None]] = {}
        self._unannounced: set[str] = set()
        """Sessions whose stored change's announcement failed (`store_record`): sent again by
        `_announce_pending` (a repeated announcement is harmless, a lost one leaves copies stale)."""
        self._announcing: asyncio.Task[None] | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._down = False
        self._retry_at = 0.0
        self.rehydrated = 0
        """Sessions opened here from a record another replica wrote (for status pages and tests)."""
        self.on_resume = on_resume
        """Called with the session id once a session is opened here from its record; True when it was
        parked here (`mcpopt.gateway.parking`: routine, not worth an info line each time)."""
        self.on_drop: Callable[[str], None] | None = None
        """Called with the session id when its record is deleted (DELETE, eviction)."""
        self.parking: Any = None
        """The `SessionParking` of this process, if sessions park (its sweep starts with the first request)."""

    # ---- the request path --------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        sid = session_id_of(scope)
        if self._listener is None and isinstance(self.store, RedisStateStore):
            self._listener = asyncio.ensure_future(self._listen())
        if self.parking is not None:
            self.parking.start()
        method = scope["method"]
        msg = scope.get(MESSAGE_SCOPE_KEY)
        if sid is None:
            if method == "POST" and isinstance(msg, dict) and msg.get("method") == "initialize":
                return await self.app(scope, receive, self._recording(send, None))
            return await self.app(scope, receive, send)
        if self.parking is not None:
            await self.parking.settled(sid)  # mid-park, the session is listed but going: wait, then resume it
        live = self.manager._server_instances  # noqa: SLF001 - the SDK keeps no public view
        if sid not in live:
            refusal = await self._rehydrate(sid, scope)
            if refusal is not None:
                return await refuse(send, refusal)
        else:
            self._touch(sid)
        if method == "DELETE":
            status: list[int] = []
            await self.app(scope, receive, _status_watch(send, status))
            if status and status[0] < 400 and sid not in live:
                await self._drop_everywhere(sid)
            return
        if method == "POST" and isinstance(msg, dict) and msg.get("method") in _STATEFUL:
            return await self.app(scope, receive, self._recording(send, sid))
        return await self.app(scope, receive, send)

    def _recording(self, send: Send, sid: str | None) -> Send:
        """`send`, but the session's record is written before each body chunk of the answer goes out
        (written only when it changed): the first one (e.g. the `initialize` answer, which the
        client's next request on another replica must find), and the last one, when the request's
        handler has ended and the session's state is final (an SSE answer may start with a chunk,
        a ping or a notification, before the handler changed anything)."""
        state: dict[str, Any] = {"sid": sid, "ok": True, "conn": None}

        async def recording(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["ok"] = message.get("status", 500) < 400
                if state["sid"] is None:
                    for key, value in message.get("headers", ()):
                        if key.lower() == b"mcp-session-id":
                            state["sid"] = value.decode("latin-1")
                            break
            elif (
                message["type"] == "http.response.body"
                and state["ok"]
                and state["sid"] is not None
                and (message.get("body") or not message.get("more_body", False))
            ):
                state["conn"] = await self._save(state["sid"], conn=state["conn"])
            await send(message)

        return recording

    # ---- records -----------------------------------------------------------------------------
    def record_of(self, sid: str, conn: Connection | None = None) -> SessionRecord | None:
        """The record of a session this replica serves, from its live state (None: not one);
        `conn`: its `Connection` when the caller knows it (saves a scan of all connections)."""
        conn = conn or self.gateway.clients.by_session_id(sid)
        if conn is None or conn.client_params is None or conn.protocol_version not in _HANDSHAKE:
            return None
        level, uris, sub_owner = self.gateway.clients.session_state(conn)
        owner = self.manager._session_owners.get(sid)  # noqa: SLF001
        client = conn.client_params.model_dump(mode="json", by_alias=True, exclude_none=True)
        return SessionRecord(conn.protocol_version, client, dict(owner) if owner else None, level, uris, sub_owner)

    async def write(self, sid: str, record: SessionRecord, ttl_s: float, conn: Connection | None = None) -> bytes:
        """Store `record` (this replica's view of `sid`) by compare-and-set: merged into the stored
        record (`SessionRecord.merge`, against the one this replica last wrote or read), so a change
        another replica stored meanwhile is kept; a change merged in from there is applied to the
        live session here too (`conn`, when known). Not announced (`store_record` announces). The
        bytes stored; raises `StateUnavailable`."""
        return (await self._write(sid, record, ttl_s, conn))[0]

    async def store_record(
        self, sid: str, record: SessionRecord, ttl_s: float, conn: Connection | None = None
    ) -> bytes:
        """`write`, then announce the change on `CHANNEL` so replicas holding `sid` live apply it at
        once -- only when the write changed the stored record (anything but its `version`) and this
        replica had written or read it before (else no other replica can hold it: it was just
        opened here). Every record write of a live session goes through here (a stateful answer's,
        a parking one's). The bytes stored; raises `StateUnavailable` (the write's or the publish's)."""
        known = sid in self._saved
        raw, changed = await self._write(sid, record, ttl_s, conn)
        if changed and known:
            self._unannounced.add(sid)
        if self._unannounced:
            try:
                await self._announce(sid if sid in self._unannounced else None)
            except StateUnavailable:
                self._retry_announcements(after=ANNOUNCE_RETRY_S)
                raise
        return raw

    async def _announce(self, first: str | None) -> None:
        """Publish every pending announcement (`first`'s first); raises `StateUnavailable`, keeping
        the ones not sent yet pending."""
        for sid in ([first] if first is not None else []) + sorted(self._unannounced - {first}):
            if sid in self._unannounced:
                await self.store.publish(CHANNEL, orjson.dumps({"sid": sid, "from": self.token}))
                self._unannounced.discard(sid)

    def _retry_announcements(self, *, after: float = 0.0) -> None:
        """Send the pending announcements in the background (one task at a time), `after` seconds
        from now, then every `ANNOUNCE_RETRY_S` until sent (or the layer is closed)."""
        if self._closed:  # a write that finished after `aclose` spawns nothing that would outlive it
            return
        if self._unannounced and (self._announcing is None or self._announcing.done()):
            self._announcing = asyncio.ensure_future(self._announce_pending(after))
            self._tasks.add(self._announcing)
            self._announcing.add_done_callback(self._tasks.discard)

    async def _announce_pending(self, after: float) -> None:
        await asyncio.sleep(after)
        while self._unannounced and not self._closed:
            try:
                await self._announce(None)
            except StateUnavailable as exc:
                self._warn(exc)
                await asyncio.sleep(ANNOUNCE_RETRY_S)

    async def _write(
        self, sid: str, record: SessionRecord, ttl_s: float, conn: Connection | None
    ) -> tuple[bytes, bool]:
        """`write`; and whether the stored record changed (absent before, or other than its version)."""
        previous = self._saved.get(sid)
        base = SessionRecord.decode(previous[0]) if previous is not None else None
        merged: list[SessionRecord] = []
        changed = [True]

        def change(current: bytes | None) -> bytes:  # run again on what is stored when the guess was wrong
            stored = SessionRecord.decode(current) if current is not None else None
            merged[:] = [record.merge(base, stored)]
            changed[0] = stored is None or _content(stored) != _content(merged[0])
            return merged[0].encode()

        raw = await self.store.update(session_key(sid), change, ttl_s, expect=previous[0] if previous else None)
        self._saved[sid] = (raw, time.monotonic())
        result = merged[0]
        if result.subscriptions != record.subscriptions or result.log_level != record.log_level:
            conn = conn or self.gateway.clients.by_session_id(sid)
            now = self.record_of(sid, conn) if conn is not None else None
            if conn is not None:
                # Onto the live state as it is now: a change made here while this write was in
                # flight (another request on the session) is kept, as `merge` keeps it in a write.
                self._apply(conn, now.merge(record, result) if now is not None else result)
        return raw, changed[0]

    async def _save(self, sid: str, *, again: bool = False, conn: Connection | None = None) -> Connection | None:
        """Write `sid`'s record when it changed since last written or read (`again`: even if not);
        `conn`: its `Connection` if known. Its `Connection` (None: not a session to record)."""
        conn = conn or self.gateway.clients.by_session_id(sid)
        record = self.record_of(sid, conn)
        if record is None:
            return conn
        previous = self._saved.get(sid)
        if previous is not None and not again:
            base = SessionRecord.decode(previous[0])
            if base is not None and _content(record) == _content(base):
                return conn
        self._prune()
        try:
            await self.store_record(sid, record, self.ttl_s, conn)
            self._up()
        except StateUnavailable as exc:
            if previous is None:
                # Kept so a refresh writes it once the store is back; a later write merges against it.
                self._saved[sid] = (record.encode(), time.monotonic())
            self._warn(exc)
        return conn

    def _touch(self, sid: str) -> None:
        """Slide the record's TTL, at most once per quarter TTL per session, off the request path."""
        item = self._saved.get(sid)
        if item is None:
            return
        now = time.monotonic()
        if now - item[1] < self.ttl_s / 4:
            return
        self._saved[sid] = (item[0], now)
        self._spawn(self._refresh(sid, item[0]))

    async def _refresh(self, sid: str, raw: bytes) -> None:
        try:
            if not await self.store.expire(session_key(sid), self.ttl_s):
                # Gone from Redis (flushed, or Redis restarted empty) while the session lives here.
                if self.record_of(sid) is not None:
                    await self._save(sid, again=True)
                else:
                    await self.store.set(session_key(sid), raw, self.ttl_s)
            self._up()
        except Exception as exc:  # noqa: BLE001 - Redis down: the session stays local
            self._warn(exc)

    def _prune(self) -> None:
        live = self.manager._server_instances  # noqa: SLF001
        parked = self.guard.parked if self.guard is not None else {}
        if len(self._saved) > 2 * (len(live) + len(parked)) + 64:
            # A parked session's copy stays: it is what resumes it when the store is down or lost it.
            self._saved = {sid: item for sid, item in self._saved.items() if sid in live or sid in parked}

    async def _drop_everywhere(self, sid: str) -> None:
        self._saved.pop(sid, None)
        self._unannounced.discard(sid)  # its deletion is announced instead
        if self.on_drop is not None:
            self.on_drop(sid)
        try:
            await self.store.delete(session_key(sid))
            await self.store.publish(CHANNEL, orjson.dumps({"sid": sid, "from": self.token, "deleted": True}))
        except StateUnavailable as exc:
            self._warn(exc)

    # ---- re-hydration ------------------------------------------------------------------------
    def _parked_copy(self, sid: str) -> bytes | None:
        """The record of a session this replica parked and still holds as parked (not expired)."""
        if self.guard is None or self.guard.parked.get(sid, 0.0) <= time.monotonic():
            return None
        item = self._saved.get(sid)
        return item[0] if item is not None else None

    def hydrating(self, sid: str) -> bool:
        """Whether `sid` is being opened here from its record now. Between `_open` listing it (the
        SDK's manager lists it at once) and its request reaching the `SessionGuard`, such a session
        looks idle (nothing in flight, last request long ago): `SessionParking` must not park it."""
        return sid in self._hydrating

    async def _rehydrate(self, sid: str, scope: Scope) -> str | None:
        """Open `sid` here from its record when there is one for this credential; the refusal text
        (answered 503) when the session guard cannot make room for it."""
        pending = self._hydrating.get(sid)
        if pending is not None:
            return await asyncio.shield(pending)  # the same answer as the request that opens it
        local = self._parked_copy(sid)
        lookup = not (self._down and time.monotonic() < self._retry_at)
        if not lookup and local is None:
            return None  # Redis just failed: no 1 s connect timeout per unknown session meanwhile
        done: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._hydrating[sid] = done
        refusal: str | None = None
        try:
            raw: bytes | None = None
            if lookup:
                try:
                    raw = await self.store.get(session_key(sid))
                    self._up()
                except StateUnavailable as exc:
                    self._warn(exc)
            restore = raw is None and local is not None and lookup and not self._down
            if raw is None:
                # Parked here, and the store is down or lost it (flushed, restarted empty): the copy kept.
                raw = local
            record = SessionRecord.decode(raw) if raw is not None else None
            if record is None:
                return None
            user = scope.get("user")
            requestor = authorization_context(user) if isinstance(user, AuthenticatedUser) else None
            if (dict(requestor) if requestor is not None else None) != record.owner:
                return None  # another credential: the SDK answers 404, as for a session that does not exist
            try:
                params = InitializeRequestParams.model_validate(record.client, by_name=False)
            except ValidationError as exc:
                logger.warning("stored record of MCP session %s is not usable, session unknown: %s", sid[:12], exc)
                return None  # the SDK answers 404: the client starts a new session
            if self.guard is not None and sid not in self.guard.parked and scope["method"] != "DELETE":
                # A session new to this replica is admitted as a new one (a parked one is counted already).
                refusal = await self.guard._make_room(client_key(scope))  # noqa: SLF001
                if refusal is not None:
                    self.guard.refused += 1
                    return refusal
            if sid in self.manager._server_instances:  # noqa: SLF001
                return None
            assert raw is not None
            # The base of this replica's writes, before the session is listed: a request on it may be
            # answered (and its record merged against this) before `_open` returns here.
            kept = self._saved.get(sid)  # a parked session's copy: kept if the session cannot open
            saved = self._saved[sid] = (raw, time.monotonic())
            try:
                await self._open(sid, record, params, requestor)
            except BaseException:
                if self._saved.get(sid) is saved:
                    if kept is not None:
                        self._saved[sid] = kept
                    else:
                        del self._saved[sid]
                raise
            if restore:
                self._spawn(self._refresh(sid, raw))  # and the store has it again
            self.rehydrated += 1
            if self.guard is not None:
                self.guard.adopt(sid, client_key(scope))
            if self.on_resume is not None and self.on_resume(sid):
                logger.debug("parked MCP session %s resumed", sid[:12])
            else:
                logger.info("MCP session %s resumed on this replica from the shared store", sid[:12])
            return None
        finally:
            del self._hydrating[sid]
            done.set_result(refusal)

    async def _open(self, sid: str, record: SessionRecord, params: InitializeRequestParams, requestor: Any) -> None:
        """A local SDK session under `sid`, initialized as `record` says (as the SDK's manager opens one)."""
        manager = self.manager
        transport = StreamableHTTPServerTransport(
            mcp_session_id=sid,
            is_json_response_enabled=manager.json_response,
            event_store=manager.event_store,
            security_settings=manager.security_settings,
            retry_interval=manager.retry_interval,
            idle_timeout=manager.session_idle_timeout,
        )
        manager._server_instances[sid] = transport  # noqa: SLF001
        if requestor is not None:
            manager._session_owners[sid] = requestor  # noqa: SLF001

        async def run_server(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            async with transport.connect() as (read_stream, write_stream):
                try:
                    idle_scope = transport.idle_scope or anyio.CancelScope()
                    with idle_scope:
                        dispatcher: JSONRPCDispatcher[Any] = JSONRPCDispatcher(
                            read_stream, write_stream, inline_methods=frozenset({"initialize"})
                        )
                        conn = Connection.for_loop(dispatcher, session_id=sid)
                        conn.client_params = params
                        conn.protocol_version = record.protocol_version
                        conn.initialized.set()
                        self._restore(conn, record)
                        task_status.started()
                        await serve_connection(
                            manager.app, dispatcher, connection=conn, lifespan_state=manager._lifespan_state
                        )
                except Exception:
                    logger.exception("resumed MCP session %s crashed", sid[:12])
                finally:
                    await manager._discard_session(sid, transport)  # noqa: SLF001

        try:
            await manager._task_group.start(run_server)  # noqa: SLF001
        except BaseException:
            await manager._discard_session(sid, transport)  # noqa: SLF001
            raise

    def _restore(self, conn: Connection, record: SessionRecord) -> None:
        clients = self.gateway.clients
        clients.seen(conn)
        if record.log_level is not None:
            clients.set_log_level(conn, record.log_level)
        for uri in record.subscriptions:
            clients.subscribe(uri, conn, record.sub_owner)
        if record.subscriptions:
            self._spawn(self._subscribe_upstream(record.subscriptions, record.sub_owner))

    async def _subscribe_upstream(self, uris: list[str], owner: str) -> None:
        """This replica's upstream sessions subscribe too (the creating replica's may be gone)."""
        gw = self.gateway
        for uri in uris:
            route = gw.namer.resolve_uri(uri)
            if route is None or route.server not in gw.upstreams:
                continue
            try:
                await (await gw.pool_for(route.server, owner)).subscribe(route.name)
            except Exception as exc:  # noqa: BLE001 - the client still gets what other replicas relay
                logger.warning("resumed subscription to %s on %s failed: %s", uri, route.server, exc)

    # ---- changes from other replicas ---------------------------------------------------------
    async def _listen(self) -> None:
        import redis.asyncio as aioredis
        import redis.exceptions

        # Its own connection, without the store's per-command timeout: a subscriber waits.
        client = aioredis.from_url(str(self.store.url), socket_connect_timeout=1.0, health_check_interval=30)
        try:
            while True:
                pubsub = client.pubsub()
                try:
                    await pubsub.subscribe(self.store.prefix + CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            await self._heard(message["data"])
                except asyncio.CancelledError:
                    raise
                except (redis.exceptions.RedisError, OSError) as exc:  # Redis down: sessions stay local meanwhile
                    self._warn(exc)
                    await asyncio.sleep(1.0)
                except Exception:  # noqa: BLE001 - not an outage: the listener goes on after a pause
                    logger.exception("shared session listener failed; it subscribes again")
                    await asyncio.sleep(1.0)
                finally:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()  # the old subscription's connection, before a new one
        finally:
            await client.aclose()

    async def _heard(self, data: bytes) -> None:
        """Apply one announcement; a failure other than the store's is logged, not an outage."""
        try:
            await self._remote_change(data)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one bad change must not stop the others
            logger.exception("applying a session change announced by another replica failed")

    async def _remote_change(self, data: bytes) -> None:
        try:
            note = orjson.loads(data)
            sid, origin = str(note["sid"]), note.get("from")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        live = self.manager._server_instances  # noqa: SLF001
        if origin == self.token:
            return
        pending = self._hydrating.get(sid)
        if pending is not None:
            # Being opened here from a record that may predate this change (or deletion): heard
            # again once it is open (before, it is not listed, or has no `Connection` yet).
            self._spawn(self._once_open(pending, data))
        if note.get("deleted"):
            self._saved.pop(sid, None)
            if self.on_drop is not None:
                self.on_drop(sid)  # parked here: ended by a DELETE on another replica
        if sid not in live:
            return
        conn = self.gateway.clients.by_session_id(sid)
        if note.get("deleted"):
            transport = live.get(sid)
            if transport is not None:
                await self.manager._discard_session(sid, transport)  # noqa: SLF001
                if transport.idle_scope is not None:
                    transport.idle_scope.cancel()
            return
        for _ in range(REREADS):
            before = self._saved.get(sid)
            try:
                raw = await self.store.get(session_key(sid))
            except StateUnavailable as exc:
                self._warn(exc)
                return
            record = SessionRecord.decode(raw) if raw is not None else None
            if record is None or conn is None:
                return
            previous = self._saved.get(sid)
            if (previous[0] if previous else None) is (before[0] if before else None):
                break
            # Written (or read) here during the GET: its answer may be older than the record this
            # replica holds now, so it is not applied; but the change announced may not be in that
            # record either (this write was stored first, and answered here after the announcement
            # came), so the record is read again -- a GET sent now sees both. Not a version
            # comparison: a replica of an older release writes no version (read as 0), and a current
            # one merging onto such a record counts again from 1, so versions do not order records
            # across a rolling deploy.
        else:
            return  # written here during every read: the next write here applies what it merges in
        # What this replica changed since it last wrote or read the record (a request's handler may
        # have, its answer's write still to come) is kept: the changes stored since are applied onto it.
        base = SessionRecord.decode(previous[0]) if previous is not None else None
        live = self.record_of(sid, conn)
        self._apply(conn, live.merge(base, record) if live is not None else record)
        assert raw is not None
        self._saved[sid] = (raw, previous[1] if previous is not None else time.monotonic())

    async def _once_open(self, pending: asyncio.Future[str | None], data: bytes) -> None:
        await asyncio.shield(pending)
        await self._heard(data)

    def _apply(self, conn: Connection, record: SessionRecord) -> None:
        """Make the live session's log level and subscriptions what `record` says."""
        clients = self.gateway.clients
        level, uris, _ = clients.session_state(conn)
        if record.log_level is not None and record.log_level != level:
            clients.set_log_level(conn, record.log_level)
        for uri in set(uris) - set(record.subscriptions):
            clients.unsubscribe(uri, conn)
        added = [u for u in record.subscriptions if u not in uris]
        for uri in added:
            clients.subscribe(uri, conn, record.sub_owner)
        if added:
            self._spawn(self._subscribe_upstream(added, record.sub_owner))

    # ---- housekeeping ------------------------------------------------------------------------
    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _warn(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + RETRY_S
        if not self._down:
            self._down = True
            # One outage, one warning per replica, whichever part of the shared state sees it first.
            report_down(str(self.store.url), "shared session store (sessions stay on their replica)", exc)

    def _up(self) -> None:
        self._retry_announcements()  # the store answers again: what failed to be announced is sent
        if self._down:
            self._down = False
            report_up(str(self.store.url), "shared session store (sessions stay on their replica)")

    async def aclose(self) -> None:
        """Stop the listener and background refreshes (the store is closed by its owner)."""
        self._closed = True
        for task in [self._listener, *self._tasks]:
            if task is not None:
                task.cancel()


def _content(record: SessionRecord) -> dict[str, Any]:
    """What a record says of its session: all but its `version` (which every write changes)."""
    data = asdict(record)
    del data["version"]
    return data


def _status_watch(send: Send, status: list[int]) -> Send:
    async def watched(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message.get("status", 500))
        await send(message)

    return watched
