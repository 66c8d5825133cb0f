"""Parked HTTP sessions (issue 17 item 4): an idle session ends its SDK machinery, keeps a record,
and its next request resumes it -- same id, no second `initialize`, its log level and subscription.

A real `mcpopt serve -t http` over real upstreams (mcp-server-time; the interop fixture server, a
handshake-era and a 2026-07-28 copy, for on-demand log messages and resource updates), a raw
handshake-era client (httpx) so the test sees every request the client sends. Parking is observed
on `/healthz`'s details (`sessions`), waited on as a condition, never by sleeping a fixed time.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml

from conftest import time_entry, write_config
from test_edge_http import INIT, Session, http_gateway

pytestmark = pytest.mark.integration

FIXTURE = str(Path(__file__).resolve().parent / "fixtures" / "interop_server.py")
WAIT_S = 60.0
URI = "interop+interop://counter"


def _config(base: Path, **http: Any) -> Path:
    servers = {
        "time": time_entry(),
        "interop": {"command": sys.executable, "args": [FIXTURE], "protocol": "legacy"},
        "modern": {"command": sys.executable, "args": [FIXTURE]},
    }
    return write_config(base / "gateway.yaml", servers, {"http": {"session_park_ms": 200, **http}})


def _stats(port: int) -> dict[str, int]:
    body = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()
    return body["sessions"]


def _until(port: int, check: Any, what: str) -> dict[str, int]:
    """Poll `/healthz` until `check(stats)` holds (a condition, with a generous deadline)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        stats = _stats(port)
        if check(stats):
            return stats
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {stats}"
        time.sleep(0.05)


def _park(port: int, n: int = 1) -> dict[str, int]:
    """Wait until the `n` sessions of the test are all parked; the stats then."""
    return _until(port, lambda st: st["parked"] == n and st["open"] == 0, f"{n} session(s) to park")


def _messages(r: httpx.Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages of a POST's answer (SSE or JSON body)."""
    assert r.status_code == 200, (r.status_code, r.text)
    if r.headers["content-type"].startswith("text/event-stream"):
        return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    return [r.json()]


def _call(s: Session, rid: int, name: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    msgs = _messages(
        s.post({"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": name, "arguments": args}})
    )
    answer = [m for m in msgs if m.get("id") == rid]
    assert answer and "result" in answer[0] and not answer[0]["result"].get("isError"), msgs
    return msgs


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[int]:
    with http_gateway(_config(tmp_path)) as (_proc, port):
        yield port


def test_a_parked_session_resumes_with_its_id_log_level_and_subscription(gateway: int) -> None:
    port = gateway
    s = Session(port)
    sid = s.headers["mcp-session-id"]
    try:
        assert "result" in s.rpc(
            {"jsonrpc": "2.0", "id": 2, "method": "logging/setLevel", "params": {"level": "warning"}}
        )
        assert "result" in s.rpc({"jsonrpc": "2.0", "id": 3, "method": "resources/subscribe", "params": {"uri": URI}})
        _until(port, lambda st: st["parked"] == 1 and st["open"] == 0 and st["parks"] >= 1, "the session to park")

        # The next call resumes it: same session id, no initialize sent, an answer from the upstream.
        msgs = _call(s, 4, "time__get_current_time", {"timezone": "UTC"})
        assert "UTC" in json.dumps(msgs)
        stats = _stats(port)
        assert stats["resumes"] == 1 and stats["open"] + stats["parked"] == 1, stats

        # Its log level survived: an info message is held back, an error one reaches the call's stream.
        # The 2026-07-28 upstream has no logging/setLevel: it gets the level with each call, from the
        # gateway's per-session record of it -- restored on resume, or the info message would come.
        before = _park(port)
        quiet = _call(s, 5, "modern__log", {"level": "info", "text": "not for you"})
        assert not [m for m in quiet if m.get("method") == "notifications/message"], quiet
        loud = _call(s, 6, "modern__log", {"level": "error", "text": "for you"})
        logged = [m for m in loud if m.get("method") == "notifications/message"]
        assert logged and "for you" in json.dumps(logged), loud
        assert _stats(port)["resumes"] > before["resumes"]

        # Its subscription survived: after parking again, a GET stream hears the resource update.
        before = _park(port)
        with s.http.stream("GET", s.url, headers={k: v for k, v in s.headers.items() if k != "content-type"}) as get:
            assert get.status_code == 200
            # An open GET stream holds the session: it does not park while the stream is open.
            assert _stats(port)["open"] == 1
            _call(s, 7, "interop__touch", {})
            for line in get.iter_lines():
                if line.startswith("data: "):
                    note = json.loads(line[6:])
                    if note.get("method") == "notifications/resources/updated":
                        assert note["params"]["uri"] == URI
                        break
        assert s.headers["mcp-session-id"] == sid
        assert _stats(port)["resumes"] == before["resumes"] + 1  # the GET resumed it, the call found it open

        # DELETE of a parked session ends it: its id is unknown afterwards.
        _park(port)
        assert s.http.delete(s.url, headers=s.headers).status_code == 200
        gone = s.post({"jsonrpc": "2.0", "id": 8, "method": "tools/list"})
        assert gone.status_code == 404, gone.text
        stats = _stats(port)
        assert stats["parked"] == 0 and stats["open"] == 0, stats
    finally:
        s.close()


def test_parked_sessions_count_toward_max_sessions_and_are_evicted_as_records(tmp_path: Path) -> None:
    with http_gateway(_config(tmp_path, max_sessions=3)) as (_proc, port):
        sessions = [Session(port) for _ in range(3)]
        try:
            for i, s in enumerate(sessions):  # each used once, in order: the first is the least recently used
                _call(s, 10 + i, "time__get_current_time", {"timezone": "UTC"})
            _until(port, lambda st: st["parked"] == 3 and st["open"] == 0, "all three sessions to park")
            fourth = Session(port)  # at max_sessions: room is made by evicting the oldest parked session
            sessions.append(fourth)
            stats = _stats(port)
            assert stats["parked"] + stats["open"] == 3, stats
            assert sessions[0].post({"jsonrpc": "2.0", "id": 20, "method": "tools/list"}).status_code == 404
            for i, s in enumerate(sessions[1:]):
                _call(s, 21 + i, "time__get_current_time", {"timezone": "UTC"})
            stats = _stats(port)
            assert stats["parked"] + stats["open"] == 3, stats
            # A stranger's fresh initialize still gets in (the guard evicts), nobody is locked out.
            r = httpx.post(
                f"http://127.0.0.1:{port}/mcp",
                json=INIT,
                headers={"accept": "application/json, text/event-stream", "content-type": "application/json"},
                timeout=30,
            )
            assert r.status_code == 200, r.text
        finally:
            for s in sessions:
                s.close()


def test_a_parked_session_stays_bound_to_its_principal(tmp_path: Path) -> None:
    from mcpopt.auth.tokens import hash_key, new_key

    keys = {"alice": new_key(), "ops": new_key()}
    key_file = tmp_path / "keys.txt"
    key_file.write_text("".join(f"{n} {hash_key(k)}\n" for n, k in keys.items()), encoding="utf-8")
    config = _config(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["gateway"]["auth"] = {"api_keys": {"file": str(key_file), "env": None}}
    data["gateway"]["policy"] = {
        "rules": [{"name": "ops", "match": {"api_keys": ["ops"]}, "admin": True}, {"name": "all", "match": {}}]
    }
    config.write_text(yaml.safe_dump(data), encoding="utf-8")

    def bearer(name: str) -> dict[str, str]:
        return {"authorization": f"Bearer {keys[name]}"}

    with http_gateway(config) as (_proc, port):

        def stats() -> dict[str, int]:
            body = httpx.get(f"http://127.0.0.1:{port}/healthz", headers=bearer("ops"), timeout=30).json()
            return body["sessions"]

        s = Session(port, bearer("alice"))
        try:
            deadline = time.monotonic() + WAIT_S
            while not (stats()["parked"] == 1 and stats()["open"] == 0):
                assert time.monotonic() < deadline, stats()
                time.sleep(0.05)
            # Another credential presenting alice's session id is told what a stranger is: 404; the
            # session is not resumed for it and stays parked.
            stolen = {**s.headers, **bearer("ops")}
            r = s.http.post(s.url, headers=stolen, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
            assert r.status_code == 404, r.text
            after = stats()
            assert after["parked"] == 1 and after["resumes"] == 0, after
            # Alice's own next request resumes it.
            _call(s, 3, "time__get_current_time", {"timezone": "UTC"})
            assert stats()["resumes"] == 1
        finally:
            s.close()
