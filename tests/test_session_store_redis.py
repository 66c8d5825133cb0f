"""HTTP session records in a real Redis (`mcpopt.gateway.session_store`, `mcpopt.gateway.parking`).

A real `mcpopt serve -t http` with `gateway.shared.redis_url` pointing at a throwaway
`redis-server`, and a raw handshake-era client (httpx), as in `test_session_parking`:

* a session this replica parked resumes when Redis lost its record (flushed) or is down;
* a session resumed from a record counts toward `max_sessions` like a new one (503 when full);
* a stored record the SDK cannot use answers 404 (session unknown), not 500.

Conditions are waited on (`/healthz`'s `sessions`), never a fixed sleep.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import redis

from mcpopt.gateway.session_store import SessionRecord, session_key
from test_edge_http import ACCEPT, Session, http_gateway
from test_session_parking import _call, _config, _park, _stats, _until
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
