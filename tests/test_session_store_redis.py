"""HTTP session records in a real Redis (`mcpopt.gateway.session_store`, `mcpopt.gateway.parking`).

A real `mcpopt serve -t http` with `gateway.shared.redis_url` pointing at a throwaway
`redis-server`, and a raw handshake-era client (httpx), as in `test_session_parking`:

* a session this replica parked resumes when Redis lost its record (flushed) or is down;
* a session resumed from a record counts toward `max_sessions` like a new one (503 when full);
* a stored record the SDK cannot use answers 404 (session unknown), not 500;
* a change the parking write stores (one Redis could not take when it was made) is announced, so
  another replica holding the session live applies it (two replicas, one Redis).

Conditions are waited on (`/healthz`'s `sessions`, Redis's own view), never a fixed sleep.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import redis

from mcpopt.gateway.session_store import CHANNEL, SessionRecord, session_key
from test_edge_http import ACCEPT, Session, http_gateway
from test_session_parking import WAIT_S, _call, _config, _messages, _park, _stats, _until
from test_shared_state import RedisServer

pytestmark = pytest.mark.integration

CLIENT = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "other", "version": "1"}}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _redis(server: RedisServer) -> Any:
    return redis.Redis.from_url(server.url)


def _shared(tmp_path: Path, server: RedisServer, **http: Any) -> Path:
    import yaml

    tmp_path.mkdir(parents=True, exist_ok=True)
    config = _config(tmp_path, **http)
    data = yaml.safe_load(config.read_text())
    data["gateway"]["shared"] = {"redis_url": server.url}
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    return config


def test_a_parked_session_resumes_when_redis_lost_its_record_or_is_down(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    with http_gateway(_shared(tmp_path, redis_server)) as (_proc, port):
        s = Session(port)
        sid = s.headers["mcp-session-id"]
        try:
            _park(port)
            # Redis emptied (FLUSHALL, or restarted without persistence): the replica's own copy resumes it.
            with _redis(redis_server) as r:
                assert r.get(b"mcpopt:" + session_key(sid).encode()) is not None
                r.flushall()
            _call(s, 2, "time__get_current_time", {"timezone": "UTC"})
            assert _stats(port)["resumes"] == 1
            assert s.headers["mcp-session-id"] == sid
            # ... and the record is written back for the other replicas.
            with _redis(redis_server) as r:
                key = b"mcpopt:" + session_key(sid).encode()
                _until(port, lambda _st: r.get(key) is not None, "the record to be written back")

            # Redis down: the parked session still resumes from this replica's copy.
            _park(port)
            redis_server.stop()
            _call(s, 3, "time__get_current_time", {"timezone": "UTC"})
            assert _stats(port)["resumes"] == 2
        finally:
            s.close()


def test_a_resumed_session_is_admitted_like_a_new_one_and_a_bad_record_is_unknown(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    with http_gateway(_shared(tmp_path, redis_server, max_sessions=1, session_park_ms=600_000)) as (_proc, port):
        holder = Session(port)
        try:
            # Records another replica wrote: a usable one, and one whose client params the SDK rejects.
            other, bad = uuid.uuid4().hex, uuid.uuid4().hex
            with _redis(redis_server) as r:
                for sid, client in ((other, CLIENT), (bad, {})):
                    raw = SessionRecord("2025-06-18", client).encode()
                    r.set(b"mcpopt:" + session_key(sid).encode(), raw, px=600_000)
            headers = {"accept": ACCEPT, "content-type": "application/json", "mcp-protocol-version": "2025-06-18"}
            listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
            url = f"http://127.0.0.1:{port}/mcp"

            r_bad = httpx.post(url, headers={**headers, "mcp-session-id": bad}, json=listing, timeout=30)
            assert r_bad.status_code == 404, r_bad.text

            # The one session allowed has a GET stream open (busy, not evictable): the resumed one is refused.
            get_headers = {k: v for k, v in holder.headers.items() if k != "content-type"}
            with holder.http.stream("GET", holder.url, headers=get_headers) as get:
                assert get.status_code == 200
                refused = httpx.post(url, headers={**headers, "mcp-session-id": other}, json=listing, timeout=30)
                assert refused.status_code == 503, refused.text
                assert "max_sessions" in refused.json()["error"]["message"]
                assert _stats(port)["open"] == 1

            # Once the holder is idle, it is evicted to make room (as for a new session).
            def resumed(_st: dict[str, int]) -> bool:
                r2 = httpx.post(url, headers={**headers, "mcp-session-id": other}, json=listing, timeout=30)
                assert r2.status_code in (200, 503), r2.text
                return r2.status_code == 200

            _until(port, resumed, "the resumed session to get in")
            assert _stats(port)["open"] == 1
            # The evicted holder's record stays in Redis (it may be live on another replica): its next
            # request resumes it in turn, evicting the other -- never more than max_sessions open.
            assert holder.post({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}).status_code == 200
            assert _stats(port)["open"] == 1
        finally:
            holder.close()


def _logged(port: int, s: Session, rid: int, level: str) -> bool:
    """Whether a `level` log message of a call on `port` (the session of `s`) reaches the client."""
    url = f"http://127.0.0.1:{port}/mcp"
    call = {"jsonrpc": "2.0", "id": rid, "method": "tools/call"}
    call["params"] = {"name": "modern__log", "arguments": {"level": level, "text": f"call {rid}"}}
    msgs = _messages(s.http.post(url, headers=s.headers, content=json.dumps(call).encode()))
    answer = [m for m in msgs if m.get("id") == rid]
    assert answer and "result" in answer[0] and not answer[0]["result"].get("isError"), msgs
    return any(m.get("method") == "notifications/message" for m in msgs)


def test_a_change_the_parking_write_stores_reaches_a_replica_holding_the_session(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Replica A serves a session, replica B holds it live too (round robin). A `logging/setLevel`
    on A while Redis is down is only in A's live state; Redis comes back (empty, no persistence)
    and A parks the session: the parking write stores the level, and announces it, so B applies
    it (B parks nothing: its `session_park_ms` is an hour).

    Before A parks, B is seen to read Redis again, so the announcement's GET is not the first
    command B sends after the restart: that one failed on a pooled connection from before it
    (until `mcpopt.state.redis` retried it; `test_session_records`), which would lose the
    announcement for a reason other than the one tested here."""
    hour = 3_600_000  # no TTL refresh (a quarter of it) during the test, on either replica
    config_a = _shared(tmp_path / "a", redis_server, session_idle_timeout_ms=hour)
    config_b = _shared(tmp_path / "b", redis_server, session_idle_timeout_ms=hour, session_park_ms=hour)
    channel = b"mcpopt:" + CHANNEL.encode()
    with (
        http_gateway(config_a, log=tmp_path / "a.log") as (_pa, port_a),
        http_gateway(config_b, log=tmp_path / "b.log") as (_pb, port_b),
    ):
        s = Session(port_a)
        rid = iter(range(2, 10_000))
        try:
            get_headers = {k: v for k, v in s.headers.items() if k != "content-type"}
            with s.http.stream("GET", s.url, headers=get_headers) as get:  # holds the session open on A
                assert get.status_code == 200
                assert _logged(port_b, s, next(rid), "info")  # live on B now, at the default level
                assert _stats(port_b)["open"] == 1
                redis_server.stop()
                level = {"jsonrpc": "2.0", "id": next(rid), "method": "logging/setLevel"}
                assert "result" in s.rpc({**level, "params": {"level": "error"}})  # not stored: Redis is down
                assert not _logged(port_a, s, next(rid), "info")
                redis_server.start()  # empty
                with _redis(redis_server) as r:
                    deadline = time.monotonic() + WAIT_S
                    while r.pubsub_numsub(channel)[0][1] < 2:  # both replicas listen again
                        assert time.monotonic() < deadline, "the replicas did not subscribe again"
                        time.sleep(0.05)
                    # B's session store reads Redis again (see the test's note): a session resumed
                    # there from a record shows it.
                    probe = uuid.uuid4().hex
                    r.set(b"mcpopt:" + session_key(probe).encode(), SessionRecord("2025-06-18", CLIENT).encode())
                    probe_headers = {**s.headers, "mcp-session-id": probe}
                    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
                    deadline = time.monotonic() + WAIT_S
                    while (
                        s.http.post(f"http://127.0.0.1:{port_b}/mcp", headers=probe_headers, json=listing).status_code
                        != 200
                    ):
                        assert time.monotonic() < deadline, "replica B never read Redis again"
                        time.sleep(0.05)
            _park(port_a)
            with _redis(redis_server) as r:
                stored = SessionRecord.decode(r.get(b"mcpopt:" + session_key(s.headers["mcp-session-id"]).encode()))
            assert stored is not None and stored.log_level == "error", stored  # the parking write stored it
            # B applies it once announced: an info message is held back there too, an error one is not.
            deadline = time.monotonic() + WAIT_S
            while _logged(port_b, s, next(rid), "info"):
                assert time.monotonic() < deadline, "replica B never applied the parked session's level"
                time.sleep(0.05)
            assert _logged(port_b, s, next(rid), "error")
            assert _stats(port_b)["open"] == 2 and _stats(port_a)["parked"] == 1  # the session and the probe
        finally:
            s.close()
