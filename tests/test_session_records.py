"""Session records without a gateway around them: compare-and-set writes in a real Redis, the
listener's error handling, when a stateful answer's record is written, parking's sweep purge.

The layers (`SharedSessions`, `SessionParking`, `SessionGuard`) are the real classes over the
SDK's real `StreamableHTTPSessionManager` (not started: no session in it) and a real
`redis-server`; the only stand-in is the live session state a request would have changed,
which `_Live.record_of` returns (the record a replica builds from its `Connection`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import orjson
import pytest
import redis
from mcp.server.connection import Connection
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp_types import InitializeRequestParams

from mcpopt.gateway.clients import Clients
from mcpopt.gateway.parking import LocalRecords, SessionParking
from mcpopt.gateway.session_store import CHANNEL, SessionRecord, SharedSessions, session_key
from mcpopt.gateway.sessions import SessionGuard
from mcpopt.state import StateUnavailable
from mcpopt.state.redis import RedisStateStore
from test_shared_state import RedisServer

pytestmark = pytest.mark.anyio

CLIENT = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "c", "version": "1"}}
WAIT_S = 30.0


def _record(*subs: str, level: str | None = None) -> SessionRecord:
    return SessionRecord("2025-06-18", CLIENT, None, level, list(subs))


def _manager() -> Any:
    return StreamableHTTPSessionManager(app=cast(Any, None))


def _layer(store: Any, cls: type[SharedSessions] = SharedSessions) -> SharedSessions:
    gateway = SimpleNamespace(clients=Clients([]))
    return cls(None, gateway, _manager(), store, ttl_s=600.0)


async def _until(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@pytest.fixture
async def redis_store(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, RedisStateStore]]:
    server = RedisServer(tmp_path)
    server.start()
    store = RedisStateStore(server.url)
    try:
        yield server, store
    finally:
        await store.aclose()
        server.stop()


def test_merge_keeps_a_change_stored_meanwhile() -> None:
    base = _record("a://1")
    # Here: subscribed to 2; meanwhile stored by another replica: unsubscribed 1, subscribed 3, level set.
    current = SessionRecord("2025-06-18", CLIENT, None, "error", ["a://3"], "", 4)
    merged = _record("a://1", "a://2").merge(base, current)
    assert merged.subscriptions == ["a://3", "a://2"] and merged.log_level == "error" and merged.version == 5
    # Here unsubscribed 1 and set the level: both win over the stored record's.
    merged = _record(level="debug").merge(base, _record("a://1", "a://3", level="error"))
    assert merged.subscriptions == ["a://3"] and merged.log_level == "debug"
    assert _record("a://1").merge(None, None) == SessionRecord("2025-06-18", CLIENT, None, None, ["a://1"], "", 1)


@pytest.mark.parametrize("scripts", [True, False], ids=["script", "scripts refused"])
async def test_a_write_interleaved_by_another_is_retried_not_lost(
    redis_store: tuple[RedisServer, RedisStateStore], caplog: pytest.LogCaptureFixture, scripts: bool
) -> None:
    """Compare-and-set by the Lua script, and by WATCH/MULTI/EXEC when Redis refuses scripts (an
    ACL without @scripting, as on a locked-down managed Redis): the same outcome."""
    server, store = redis_store
    other = redis.Redis.from_url(server.url)
    if not scripts:
        other.execute_command("ACL", "SETUSER", "default", "-@scripting")
    calls: list[bytes | None] = []
    # Refused, the script's try ran change(None) for nothing; the transaction's first try is the next.
    first_write = 1 if scripts else 2

    def change(current: bytes | None) -> bytes:
        calls.append(current)
        if len(calls) == first_write:  # another writer gets in between this read and this write
            other.set(b"mcpopt:k", b"theirs")
        return (current or b"") + b"+mine"

    try:
        with caplog.at_level(logging.WARNING, logger="mcpopt.state.redis"):
            assert await store.update("k", change, 60.0) == b"theirs+mine"
            assert await store.update("k", lambda cur: (cur or b"") + b"+again", 60.0) == b"theirs+mine+again"
        assert calls == [None] * first_write + [b"theirs"]
        assert other.get(b"mcpopt:k") == b"theirs+mine+again" and 0 < other.pttl(b"mcpopt:k") <= 60_000
        warnings = [r.getMessage() for r in caplog.records]
        if scripts:
            assert warnings == []
        else:
            assert len(warnings) == 1 and "refuses scripts" in warnings[0], warnings  # once, not per write
    finally:
        other.close()


async def test_two_replicas_subscribing_at_once_keep_both_subscriptions(
    redis_store: tuple[RedisServer, RedisStateStore],
) -> None:
    _server, store = redis_store
    a, b = _layer(store), _layer(store)
    sid = "s1"
    # Both replicas serve the session (each wrote or read the same record) ...
    await a.write(sid, _record(), 60.0)
    await b.write(sid, _record(), 60.0)
    # ... and each subscribes before hearing of the other's change.
    await a.write(sid, _record("a://x"), 60.0)
    await b.write(sid, _record("a://y"), 60.0)
    stored = SessionRecord.decode(await store.get(session_key(sid)) or b"")
    assert stored is not None and sorted(stored.subscriptions) == ["a://x", "a://y"], stored


async def test_the_listener_logs_a_failing_change_and_goes_on(
    redis_store: tuple[RedisServer, RedisStateStore],
) -> None:
    server, store = redis_store
    layer = _layer(store)
    dropped: list[str] = []

    def on_drop(sid: str) -> None:
        dropped.append(sid)
        if sid == "bad":
            raise RuntimeError("a bug, not an outage")

    layer.on_drop = on_drop
    plain = redis.Redis.from_url(server.url)
    channel = store.prefix + CHANNEL
    listener = asyncio.ensure_future(layer._listen())
    try:
        await _until(lambda: plain.pubsub_numsub(channel)[0][1] == 1, "the listener to subscribe")
        for sid in ("bad", "good"):
            plain.publish(channel, orjson.dumps({"sid": sid, "from": "elsewhere", "deleted": True}))
        await _until(lambda: "good" in dropped, "the second change")
        assert dropped == ["bad", "good"]
        assert not layer._down  # not taken for a Redis outage
        assert plain.pubsub_numsub(channel)[0][1] == 1
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        plain.close()


class _Live(SharedSessions):
    """The session's live state is `self.state` (what a request's handler changes)."""

    state: SessionRecord | None = None

    def record_of(self, sid: str, conn: Any = None) -> SessionRecord | None:
        return self.state


async def test_a_stateful_answer_is_recorded_once_its_state_is_final() -> None:
    store = LocalRecords()
    layer = cast(_Live, _layer(store, _Live))
    layer.state = _record()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    recording = layer._recording(send, "s1")
    await recording({"type": "http.response.start", "status": 200, "headers": []})
    await recording({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})
    layer.state = _record("a://x")  # the slow subscribe ends: its answer is the last chunk
    await recording({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
    await recording({"type": "http.response.body", "body": b"", "more_body": False})
    stored = SessionRecord.decode(await store.get(session_key("s1")) or b"")
    assert stored is not None and stored.subscriptions == ["a://x"], stored
    assert len(sent) == 4


async def test_every_sweep_purges_expired_local_records() -> None:
    store = LocalRecords()
    manager = _manager()
    guard = SessionGuard(None, manager, max_sessions=10, max_sessions_per_client=10, path="/mcp")
    layer = SharedSessions(None, SimpleNamespace(clients=Clients([])), manager, store, ttl_s=600.0, guard=guard)
    parking = SessionParking(layer, guard, manager, park_s=1.0, idle_timeout_s=600.0)
    # The record of a session that ended without parking (its SDK idle timeout), now expired.
    await store.set(session_key("gone"), _record().encode(), 0.001)
    written = time.monotonic()
    await _until(lambda: time.monotonic() > written + 0.001, "the record's TTL to pass")
    assert len(store) == 1 and not parking.parked
    await parking.sweep()
    assert len(store) == 0


class _Racing(_Live):
    """A request handled on the session while it is being opened here: `_open` makes the session
    visible at once (the SDK lists it), so a `resources/subscribe` may be answered -- and its record
    written -- before `_rehydrate` carries on. Meanwhile another replica unsubscribed from a://x."""

    other: SharedSessions | None = None

    async def _open(self, sid: str, record: SessionRecord, params: Any, requestor: Any) -> None:
        self.manager._server_instances[sid] = object()  # listed, as the SDK's manager lists it
        self.state = _record(*record.subscriptions, "a://y")  # restored, then subscribed to a://y here
        assert self.other is not None
        await self.other.write(sid, _record(), 60.0)  # the other replica's unsubscribe lands first
        await self._save(sid)


async def test_a_subscription_removed_elsewhere_stays_removed(
    redis_store: tuple[RedisServer, RedisStateStore],
) -> None:
    _server, store = redis_store
    other, here = _layer(store), cast(_Racing, _layer(store, _Racing))
    here.other = other
    sid = "s1"
    await other.write(sid, _record("a://x"), 60.0)  # the session lives on the other replica ...
    scope = {"type": "http", "method": "POST", "path": "/mcp"}
    assert await here._rehydrate(sid, scope) is None  # ... and is resumed here
    stored = SessionRecord.decode(await store.get(session_key(sid)) or b"")
    assert stored is not None and stored.subscriptions == ["a://y"], stored
    # A record merged with no base known (never written or read here): nothing in this replica's
    # state is known to be a change since, so the stored one wins -- a removal is never undone.
    merged = _record("a://x", "a://y").merge(None, _record("a://z", level="error"))
    assert merged.subscriptions == ["a://z"] and merged.log_level == "error"


async def test_a_record_without_a_version_from_an_older_replica_is_applied(
    redis_store: tuple[RedisServer, RedisStateStore],
) -> None:
    server, store = redis_store
    here, newer = _layer(store), _layer(store)
    sid = "s1"
    conn = Connection(cast(Any, None), protocol_version="2025-06-18", session_id=sid)
    here.gateway.clients.seen(conn)
    here.manager._server_instances[sid] = object()  # live here
    for level in ("info", "notice", "warning"):  # set and written here a few times: version 3
        here.gateway.clients.set_log_level(conn, level)
        await here.write(sid, _record(level=level), 60.0)
    plain = redis.Redis.from_url(server.url)
    key = (store.prefix + session_key(sid)).encode()
    note = orjson.dumps({"sid": sid, "from": "older"})
    try:
        # A replica of the previous release (rolling deploy) SETs a record without a version field.
        older = orjson.loads(_record(level="error").encode())
        del older["version"]
        plain.set(key, orjson.dumps(older), px=60_000)
        await here._remote_change(note)
        assert here.gateway.clients.session_state(conn)[0] == "error"
        # Again, unheard here this time; then a current replica merges onto it (version 1) and announces.
        plain.set(key, orjson.dumps({**older, "log_level": "critical"}), px=60_000)
        await newer.write(sid, _record(), 60.0)  # nothing changed there: the stored record's level stays
        await here._remote_change(note)
        assert here.gateway.clients.session_state(conn)[0] == "critical"
    finally:
        plain.close()


async def test_an_announcement_read_before_a_write_here_is_not_applied(
    redis_store: tuple[RedisServer, RedisStateStore],
) -> None:
    """The GET of an announced record returns, and this replica writes the session's record before
    the GET's answer is applied: that answer is older than what this replica merged and stored, so
    it is not applied; read again, it is the record written here (its level, set later, won)."""
    server, plain = redis_store
    layer: SharedSessions | None = None
    writing = False
    conn = Connection(cast(Any, None), protocol_version="2025-06-18", session_id="s1")

    class WriteDuringGet(RedisStateStore):
        async def get(self, key: str) -> bytes | None:
            nonlocal writing
            raw = await super().get(key)
            if writing:
                writing = False
                assert layer is not None
                layer.gateway.clients.set_log_level(conn, "debug")
                await layer.write("s1", _record(level="debug"), 60.0)  # a setLevel answered here meanwhile
            return raw

    store = WriteDuringGet(server.url)
    try:
        layer = _layer(store)
        layer.gateway.clients.seen(conn)
        layer.manager._server_instances["s1"] = object()  # live here
        await layer.write("s1", _record(), 60.0)
        other = _layer(plain)
        await other.write("s1", _record(), 60.0)  # served there too ...
        await other.write("s1", _record(level="error"), 60.0)  # ... and changed there
        writing = True
        await layer._remote_change(orjson.dumps({"sid": "s1", "from": "elsewhere"}))
        assert layer.gateway.clients.session_state(conn)[0] == "debug"
        stored = SessionRecord.decode(await plain.get(session_key("s1")) or b"")
        assert stored is not None and stored.log_level == "debug", stored
    finally:
        await store.aclose()


class _Conn:
    """What parking reads of a session's `Connection`: its id and an idle dispatcher."""

    def __init__(self, sid: str) -> None:
        self.session_id = sid
        self.outbound = SimpleNamespace()


class _Resuming(_Live):
    """`_open` as the real one runs: the session is listed at once (the SDK's manager lists it) and
    its `Connection` seen by the gateway (`_restore`) before the server task has started; a parking
    sweep lands in that window here, as the timer can whenever starting the task takes a while."""

    parking: SessionParking | None = None
    parked_meanwhile = -1
    conn: _Conn | None = None

    async def _open(self, sid: str, record: SessionRecord, params: Any, requestor: Any) -> None:
        self.manager._server_instances[sid] = StreamableHTTPServerTransport(mcp_session_id=sid)
        self.conn = _Conn(sid)  # held here: the gateway's view of connections is weak
        self.gateway.clients.seen(cast(Connection, self.conn))
        assert self.parking is not None
        self.parked_meanwhile = await self.parking.sweep()


async def test_a_session_being_resumed_is_not_parked_again_before_its_request_reaches_it() -> None:
    store = LocalRecords()
    manager = _manager()
    guard = SessionGuard(None, manager, max_sessions=10, max_sessions_per_client=10, path="/mcp")
    layer = _Resuming(None, SimpleNamespace(clients=Clients([])), manager, store, ttl_s=600.0, guard=guard)
    layer.state = _record()
    parking = layer.parking = SessionParking(layer, guard, manager, park_s=0.001, idle_timeout_s=600.0)
    sid = "s1"
    # Parked a while ago: its record is stored, the guard still holds it with its last request's time.
    guard.adopt(sid, "client")
    guard.held[sid].last -= 60.0
    parking.parked[sid] = time.monotonic() + 600.0
    await layer.write(sid, _record(), 600.0)
    scope = {"type": "http", "method": "POST", "path": "/mcp"}
    assert await layer._rehydrate(sid, scope) is None
    # The request that resumes it has not reached the session guard yet (nothing in flight), and its
    # last request is long past: only knowing it is being resumed keeps the sweep from parking it --
    # which would discard the session under the request, answered 404.
    assert layer.parked_meanwhile == 0
    assert sid in manager._server_instances and sid not in parking.parked


async def test_a_write_is_announced_only_when_it_changed_the_stored_record(
    redis_store: tuple[RedisServer, RedisStateStore],
) -> None:
    """`store_record` (a stateful answer's write, a parking one's): a write that leaves the stored
    record as it was (but for its version) sends no message; one that changes it, one. The test's
    own markers, published in between, show the order Redis delivered them in."""
    server, store = redis_store
    here, other = _layer(store), _layer(store)
    sid = "s1"
    plain = redis.Redis.from_url(server.url)
    channel = store.prefix + CHANNEL
    spy = plain.pubsub()
    spy.subscribe(channel)
    deadline = time.monotonic() + WAIT_S
    while (confirmed := spy.get_message(timeout=1.0)) is None or confirmed["type"] != "subscribe":
        assert time.monotonic() < deadline, "the spy never subscribed"
    heard: list[dict[str, Any]] = []

    def until_marker(n: int) -> None:
        plain.publish(channel, orjson.dumps({"marker": n}))
        deadline = time.monotonic() + WAIT_S
        while not heard or heard[-1].get("marker") != n:
            assert time.monotonic() < deadline, f"marker {n} never came: {heard}"
            message = spy.get_message(timeout=1.0)
            if message is not None and message["type"] == "message":
                heard.append(orjson.loads(message["data"]))

    try:
        await here.store_record(sid, _record(), 60.0)  # a new session's first write: nobody else has it
        until_marker(1)
        await other.write(sid, _record(), 60.0)  # read there (resumed), so the version moved on
        await here.store_record(sid, _record(), 60.0)  # a park with nothing new: no message
        until_marker(2)
        await here.store_record(sid, _record(level="error"), 60.0)  # a change: announced once
        until_marker(3)
        note = {"sid": sid, "from": here.token}
        assert heard == [{"marker": 1}, {"marker": 2}, note, {"marker": 3}], heard
        stored = SessionRecord.decode(await store.get(session_key(sid)) or b"")
        assert stored is not None and stored.log_level == "error" and stored.version == 4, stored
    finally:
        spy.close()
        plain.close()


def _served_here(layer: SharedSessions, sid: str) -> Connection:
    """A live, initialized session `sid` on `layer` (what a request's handler changes: its `Connection`)."""
    conn = Connection(cast(Any, None), protocol_version="2025-06-18", session_id=sid)
    conn.client_params = InitializeRequestParams.model_validate(CLIENT, by_name=False)
    layer.gateway.clients.seen(conn)
    layer.gateway.namer = SimpleNamespace(resolve_uri=lambda uri: None)  # no upstream to subscribe again
    layer.manager._server_instances[sid] = object()  # live here
    return conn


async def test_a_change_made_here_but_not_yet_stored_survives_an_announcement(
    redis_store: tuple[RedisServer, RedisStateStore],
) -> None:
    """A `resources/subscribe` handled here changes the live session before its record is written
    (`_save`, as the answer's chunk goes out, several task switches later). Another replica's change
    announced in between is applied onto that, not replaced by the stored record wholesale -- which
    dropped the change made here, and `_save` then found nothing to write: lost on every replica."""
    _server, store = redis_store
    here, other = _layer(store), _layer(store)
    sid = "s1"
    conn = _served_here(here, sid)
    await here._save(sid, conn=conn)  # the initialize answer's write
    await other.write(sid, _record(), 60.0)  # resumed there too
    here.gateway.clients.subscribe("a://x", conn)  # the handler here ...
    await other.store_record(sid, _record("a://y"), 60.0)  # ... while there a://y is subscribed and announced
    await here._remote_change(orjson.dumps({"sid": sid, "from": other.token}))
    assert here.gateway.clients.session_state(conn)[1] == ["a://x", "a://y"]
    await here._save(sid, conn=conn)  # the answer goes out
    stored = SessionRecord.decode(await store.get(session_key(sid)) or b"")
    assert stored is not None and sorted(stored.subscriptions) == ["a://x", "a://y"], stored


async def test_a_change_announced_while_a_write_here_is_answered_is_applied(
    redis_store: tuple[RedisServer, RedisStateStore],
) -> None:
    """This replica's write is stored, then another replica's change merged onto it and announced;
    the announcement is heard here, and its GET sent, before this write's answer is (two
    connections: either may be read first). The GET's answer comes after this replica's record
    changed, so it is not taken as is -- but read again, not dropped: it holds the other change."""
    server, plain = redis_store
    sid = "s1"
    other = _layer(plain)
    note = orjson.dumps({"sid": sid, "from": other.token})
    sent = asyncio.Event()
    heard: list[asyncio.Future[None]] = []

    class LateAnswer(RedisStateStore):
        late = False

        async def update(self, key: str, change: Any, ttl_s: float, *, expect: bytes | None = None) -> bytes:
            raw = await super().update(key, change, ttl_s, expect=expect)
            if self.late:
                self.late = False
                await other.store_record(sid, _record(level="error"), 60.0)  # set there, after this write
                heard.append(asyncio.ensure_future(here._remote_change(note)))
                await sent.wait()  # the announcement's GET is on its way before this answer is read
            return raw

        async def get(self, key: str) -> bytes | None:
            sent.set()
            return await super().get(key)

    store = LateAnswer(server.url)
    try:
        here = _layer(store)
        conn = _served_here(here, sid)
        await here._save(sid, conn=conn)
        await other.write(sid, _record(), 60.0)  # resumed there too
        here.gateway.clients.set_log_level(conn, "debug")  # a setLevel here ...
        store.late = True
        await here._save(sid, conn=conn)  # ... written; then the other replica's level, announced
        await asyncio.gather(*heard)
        stored = SessionRecord.decode(await plain.get(session_key(sid)) or b"")
        assert stored is not None and stored.log_level == "error", stored  # the later of the two
        assert here.gateway.clients.session_state(conn)[0] == "error"
    finally:
        await store.aclose()


class _HearingWhileOpening(SharedSessions):
    """`_open` as the real one runs after the record was read, but another replica changes the
    session meanwhile and its announcement is heard here before the session is listed (as the
    listener may, while `_open` waits on the SDK's task group)."""

    other: SharedSessions | None = None
    conn: Connection | None = None

    async def _open(self, sid: str, record: SessionRecord, params: Any, requestor: Any) -> None:
        assert self.other is not None
        await self.other.store_record(sid, _record(level="error"), 60.0)
        await self._remote_change(orjson.dumps({"sid": sid, "from": self.other.token}))
        self.manager._server_instances[sid] = object()  # listed, as the SDK's manager lists it
        self.conn = Connection(cast(Any, None), protocol_version=record.protocol_version, session_id=sid)
        self.conn.client_params = params
        self._restore(self.conn, record)


async def test_a_change_announced_while_the_session_opens_here_is_applied(
    redis_store: tuple[RedisServer, RedisStateStore],
) -> None:
    _server, store = redis_store
    other, here = _layer(store), cast(_HearingWhileOpening, _layer(store, _HearingWhileOpening))
    here.other = other
    sid = "s1"
    await other.write(sid, _record(level="info"), 60.0)  # the session lives on the other replica ...
    scope = {"type": "http", "method": "POST", "path": "/mcp"}
    assert await here._rehydrate(sid, scope) is None  # ... and is resumed here, from the record before
    await _until(lambda: not here._tasks, "the announcement handled again")
    assert here.conn is not None and here.gateway.clients.session_state(here.conn)[0] == "error"


async def test_the_first_command_after_redis_restarted_succeeds(
    redis_store: tuple[RedisServer, RedisStateStore],
) -> None:
    """A pooled connection opened before Redis restarted is replaced on its first use, not failed
    (which lost the announcement a replica heard first after a restart, or answered a resumed
    session's first request 404)."""
    server, store = redis_store
    await store.set("k", b"v", 60.0)  # a connection in the pool
    server.stop()
    server.start()  # empty, nothing used the pool meanwhile
    assert await store.get("k") is None
    await store.set("k", b"w", 60.0)
    assert await store.get("k") == b"w"


async def test_a_change_made_here_while_a_write_is_in_flight_is_kept(
    redis_store: tuple[RedisServer, RedisStateStore],
) -> None:
    """Two stateful requests on one session here: the first's write is in flight (it merges in
    another replica's a://y) when the second's handler subscribes a://z. The write's merged result
    is applied onto the live state as it is now, not in place of it -- which unsubscribed a://z."""
    server, plain = redis_store
    sid = "s1"
    other = _layer(plain)

    class InFlight(RedisStateStore):
        during: Any = None

        async def update(self, key: str, change: Any, ttl_s: float, *, expect: bytes | None = None) -> bytes:
            raw = await super().update(key, change, ttl_s, expect=expect)
            if self.during is not None:
                self.during, during = None, self.during
                during()  # the second request's handler, before this write's answer is read
            return raw

    store = InFlight(server.url)
    try:
        here = _layer(store)
        conn = _served_here(here, sid)
        await here._save(sid, conn=conn)
        await other.write(sid, _record(), 60.0)  # resumed there too
        await other.write(sid, _record("a://y"), 60.0)  # a://y subscribed there
        here.gateway.clients.subscribe("a://x", conn)  # the first request here
        store.during = lambda: here.gateway.clients.subscribe("a://z", conn)
        await here._save(sid, conn=conn)
        assert sorted(here.gateway.clients.session_state(conn)[1]) == ["a://x", "a://y", "a://z"]
        await here._save(sid, conn=conn)  # the second request's answer goes out
        stored = SessionRecord.decode(await plain.get(session_key(sid)) or b"")
        assert stored is not None and sorted(stored.subscriptions) == ["a://x", "a://y", "a://z"], stored
    finally:
        await store.aclose()


async def test_a_change_whose_announcement_failed_is_announced_later(
    redis_store: tuple[RedisServer, RedisStateStore],
) -> None:
    """A setLevel here is stored, but its announcement fails (the PUBLISH, not the write): it is
    sent again once the store answers here (a TTL refresh), so a replica holding it live hears it."""
    server, plain = redis_store
    sid = "s1"
    other = _layer(plain)
    sent: list[bytes] = []

    class FailingPublish(RedisStateStore):
        fail = False

        async def publish(self, channel: str, message: bytes) -> None:
            if self.fail:
                self.fail = False
                raise StateUnavailable("publish failed")
            await super().publish(channel, message)
            sent.append(message)

    store = FailingPublish(server.url)
    try:
        here = _layer(store)
        conn = _served_here(here, sid)
        await here._save(sid, conn=conn)
        await other.write(sid, _record(), 60.0)  # resumed there too
        here.gateway.clients.set_log_level(conn, "error")
        store.fail = True
        await here._save(sid, conn=conn)  # stored, not announced
        stored = SessionRecord.decode(await plain.get(session_key(sid)) or b"")
        assert stored is not None and stored.log_level == "error"
        assert sent == []
        await here._refresh(sid, here._saved[sid][0])  # the store's next success here
        await _until(lambda: sent, "the announcement sent again")
        assert orjson.loads(sent[0]) == {"sid": sid, "from": here.token}
    finally:
        await here.aclose()
        await store.aclose()


async def test_a_closed_layer_starts_no_announcement_retries() -> None:
    """A write that returns after `aclose` (shutdown with a request in flight) leaves no task behind
    that would retry its announcement every second against a closed store."""

    class Down:
        async def publish(self, channel: str, message: bytes) -> None:
            raise StateUnavailable("closed")

    layer = _layer(Down())
    layer._unannounced.add("s1")
    layer._retry_announcements()
    started = layer._announcing
    assert started is not None  # open: a retry is scheduled
    await layer.aclose()
    with contextlib.suppress(asyncio.CancelledError):
        await started
    layer._retry_announcements()
    assert layer._announcing is started and not any(not t.done() for t in layer._tasks)


class _Transport:
    """What `_remote_change` ends of a listed session: terminated, and its idle scope (none here)."""

    is_terminated = False
    idle_scope = None

    async def terminate(self) -> None:
        self.is_terminated = True


class _DeletedWhileOpening(SharedSessions):
    """`_open` runs after the record was read; meanwhile the client DELETEs the session on another
    replica, whose announcement is heard here before the session is listed."""

    other: SharedSessions | None = None
    transport = _Transport()

    async def _open(self, sid: str, record: SessionRecord, params: Any, requestor: Any) -> None:
        assert self.other is not None
        await self.other._drop_everywhere(sid)  # deleted there: the record is gone, the deletion announced
        await self._remote_change(orjson.dumps({"sid": sid, "from": self.other.token, "deleted": True}))
        self.manager._server_instances[sid] = self.transport  # listed, as the SDK's manager lists it
        conn = Connection(cast(Any, None), protocol_version=record.protocol_version, session_id=sid)
        conn.client_params = params
        self._restore(conn, record)


async def test_a_session_deleted_while_it_opens_here_is_ended_once_open(
    redis_store: tuple[RedisServer, RedisStateStore],
) -> None:
    """Resumed here from a record read before the DELETE elsewhere: the session must not outlive
    its deletion on this replica (its id answers 404 here too, and nothing writes its record back)."""
    _server, store = redis_store
    other, here = _layer(store), cast(_DeletedWhileOpening, _layer(store, _DeletedWhileOpening))
    here.other = other
    here.transport = _Transport()
    sid = "s1"
    await other.write(sid, _record(level="info"), 60.0)  # the session lives on the other replica ...
    scope = {"type": "http", "method": "POST", "path": "/mcp"}
    assert await here._rehydrate(sid, scope) is None  # ... and is resumed here, from the record before
    await _until(lambda: not here._tasks, "the deletion handled again")
    assert sid not in here.manager._server_instances and here.transport.is_terminated
    assert sid not in here._saved and await store.get(session_key(sid)) is None


class _Reopening(_Live):
    """`_open` lists a new transport under the id, as the real one does (the SDK's manager lists it at
    once); the session's server task is not run here, its late ending is played by the test."""

    opened: StreamableHTTPServerTransport | None = None

    async def _open(self, sid: str, record: SessionRecord, params: Any, requestor: Any) -> None:
        self.opened = StreamableHTTPServerTransport(mcp_session_id=sid)
        self.manager._server_instances[sid] = self.opened


async def test_a_parked_session_resumed_at_once_survives_its_old_server_task_ending() -> None:
    """Parking discards the session and cancels its server task; that task's `finally` discards it
    once more some loop turns later. A request that resumed the session in between had its new
    transport taken away by that late call, and was answered 404 (the saturated-suite flake of
    issue 15). With `discard_only_own`, a discard forgets the id only for the transport listed."""
    store = LocalRecords()
    manager = _manager()
    guard = SessionGuard(None, manager, max_sessions=10, max_sessions_per_client=10, path="/mcp")
    layer = _Reopening(None, SimpleNamespace(clients=Clients([])), manager, store, ttl_s=600.0, guard=guard)
    layer.state = _record(level="info")
    parking = SessionParking(layer, guard, manager, park_s=0.001, idle_timeout_s=600.0)
    sid = "s1"
    old = manager._server_instances[sid] = StreamableHTTPServerTransport(mcp_session_id=sid)
    guard.adopt(sid, "client")
    guard.held[sid].last -= 60.0
    assert await parking.park(sid, cast(Connection, _Conn(sid)))
    assert sid not in manager._server_instances and sid in parking.parked and old.is_terminated
    scope = {"type": "http", "method": "POST", "path": "/mcp"}
    assert await layer._rehydrate(sid, scope) is None  # the next request resumes it: a new transport
    new = layer.opened
    assert new is not None and manager._server_instances.get(sid) is new
    await manager._discard_session(sid, old)  # the parked session's server task winds down now
    assert manager._server_instances.get(sid) is new and not new.is_terminated
    await manager._discard_session(sid, new)  # the listed transport is still discarded as before
    assert sid not in manager._server_instances and new.is_terminated
