"""Prepared list responses (`mcpopt.gateway.lists`, issue 17 item 1): a list served from the
prepared bytes equals the freshly built one, a `list_changed`, an upstream restart or a policy
change drops it, and principals matching different rules never share one.

Real gateways (`mcpopt serve`, stdio and HTTP) in front of real `mcp-server-time`; the fixture
server (`fake_upstream.py`) only where a real server cannot change its tools on demand
(`add_tool` sends `tools/list_changed`).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import psutil
import pytest

from conftest import fake_entry, free_port, gateway_client, popen_gateway, time_entry, wait_http, write_config
from mcpopt.auth.policy import Policy
from mcpopt.auth.principal import Principal
from mcpopt.auth.tokens import hash_key, new_key
from mcpopt.bench.growth import LeanSession
from mcpopt.config import load_config
from mcpopt.gateway.assembly import build_gateway
from mcpopt.gateway.front import serve_http
from mcpopt.gateway.lists import PreparedLists, request_cursor, response

LEGACY = "2025-11-25"
TIMEOUT = 60.0


class Stdio:
    """A raw line client of a stdio gateway: requests by id, notifications kept as they come."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin and proc.stdout
        self.proc = proc
        self.next_id = 1
        self.notes: list[dict[str, Any]] = []
        self._buf = b""

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        self.proc.stdin.flush()

    def _line(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError("the gateway did not answer in time")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise AssertionError("the gateway closed stdout")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        rid = self.next_id
        self.next_id += 1
        self.send({"jsonrpc": "2.0", "id": rid, "method": method, **({"params": params} if params else {})})
        deadline = time.monotonic() + TIMEOUT
        while True:
            msg = self._line(deadline)
            if msg.get("id") == rid and "method" not in msg:
                assert "result" in msg, msg
                return msg["result"]
            if "method" in msg:
                self.notes.append(msg)

    def wait_note(self, method: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not any(n["method"] == method for n in self.notes):
            msg = self._line(deadline)
            if "method" in msg:
                self.notes.append(msg)
        self.notes = [n for n in self.notes if n["method"] != method]

    def handshake(self) -> None:
        self.request(
            "initialize",
            {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "lists-test", "version": "1"}},
        )
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})


def _names(result: dict[str, Any]) -> list[str]:
    return [t["name"] for t in result["tools"]]


@pytest.fixture
def stdio_gateway(tmp_path: Path) -> Iterator[Stdio]:
    cfg = write_config(
        tmp_path / "gw.yaml",
        {"time": time_entry(), "fake": fake_entry()},
        {"restart": {"initial_backoff_ms": 50, "max_backoff_ms": 200}},
    )
    with popen_gateway(cfg) as proc:
        client = Stdio(proc)
        client.handshake()
        yield client


def test_stdio_lists_repeat_exactly_and_follow_changes(stdio_gateway: Stdio) -> None:
    gw = stdio_gateway
    first = gw.request("tools/list")
    assert {"time__get_current_time", "fake__echo"} <= set(_names(first))
    assert "ttlMs" not in first and "cacheScope" not in first  # 2026-07-28 vocabulary only
    for _ in range(3):  # the first answer was built by the SDK's path; these come prepared
        assert gw.request("tools/list") == first
    for method in ("prompts/list", "resources/list", "resources/templates/list"):
        built = gw.request(method)
        assert gw.request(method) == built

    # list_changed from an upstream: the prepared list goes, the next one shows the new tool
    gw.request("tools/call", {"name": "fake__add_tool", "arguments": {"name": "added"}})
    gw.wait_note("notifications/tools/list_changed")
    changed = gw.request("tools/list")
    assert "fake__added" in _names(changed)
    assert set(_names(changed)) == {*_names(first), "fake__added"}
    assert gw.request("tools/list") == changed


def test_stdio_upstream_restart_drops_the_prepared_list(stdio_gateway: Stdio) -> None:
    gw = stdio_gateway
    full = gw.request("tools/list")
    assert gw.request("tools/list") == full
    gateway = next(p for p in psutil.Process().children() if p.pid == gw.proc.pid)
    time_server = next(
        p for p in gateway.children(recursive=True) if any("mcp-server-time" in part for part in p.cmdline())
    )
    time_server.send_signal(signal.SIGKILL)
    gw.wait_note("notifications/tools/list_changed")  # withdrawn
    down = gw.request("tools/list")
    deadline = time.monotonic() + TIMEOUT
    while "time__get_current_time" in _names(down) and time.monotonic() < deadline:
        gw.wait_note("notifications/tools/list_changed")
        down = gw.request("tools/list")
    assert "time__get_current_time" not in _names(down)
    while "time__get_current_time" not in _names(down) and time.monotonic() < deadline:
        gw.wait_note("notifications/tools/list_changed")  # back after the restart
        down = gw.request("tools/list")
    assert down == full


@pytest.mark.anyio
async def test_a_2026_client_gets_cache_hints_on_every_list(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "gw.yaml", {"time": time_entry()}, {"list_ttl_ms": 1234})
    async with gateway_client(cfg, mode="auto") as client:
        assert client.protocol_version == "2026-07-28"
        for result in (
            await client.list_tools(),
            await client.list_tools(cache_mode="bypass"),  # the second one prepared
            await client.list_prompts(),
            await client.list_resources(),
            await client.list_resource_templates(),
        ):
            assert (result.ttl_ms, result.cache_scope) == (1234, "public")
        assert {t.name for t in (await client.list_tools(cache_mode="bypass")).tools} >= {"time__get_current_time"}


# ---- HTTP: principals ----------------------------------------------------------------------
def _http_config(tmp_path: Path) -> tuple[Path, str, str]:
    alice, bob = new_key(), new_key()
    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice {hash_key(alice)}\nbob {hash_key(bob)}\n", encoding="utf-8")
    cfg = write_config(
        tmp_path / "http.yaml",
        # shared: the tool bob adds is added to the session every principal's list comes from
        {"time": time_entry(), "fake": fake_entry(isolation="shared")},
        {
            "auth": {"api_keys": {"file": str(keys), "env": None}, "resource": "http://127.0.0.1/mcp"},
            "policy": {
                "rules": [
                    {"name": "time-only", "match": {"api_keys": ["alice"]}, "servers": ["time"]},
                    {"name": "fake-only", "match": {"api_keys": ["bob"]}, "servers": ["fake"]},
                ],
                "default": {"name": "none", "servers": []},
            },
        },
    )
    return cfg, alice, bob


class HttpSession:
    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.http = httpx2.Client(headers={"X-API-Key": key}, timeout=TIMEOUT)
        self.sid = ""
        self.next_id = 1

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        rid = self.next_id
        self.next_id += 1
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        if self.sid:
            headers["Mcp-Session-Id"] = self.sid
        body = {"jsonrpc": "2.0", "id": rid, "method": method, **({"params": params} if params else {})}
        reply = self.http.post(self.url, json=body, headers=headers)
        assert reply.status_code == 200, reply.text
        self.sid = reply.headers.get("mcp-session-id", self.sid)
        if reply.headers["content-type"].startswith("text/event-stream"):
            data = [json.loads(line[5:]) for line in reply.text.splitlines() if line.startswith("data:")]
            msg = next(m for m in data if m.get("id") == rid)
        else:
            msg = reply.json()
        assert msg["id"] == rid and "result" in msg, msg
        return msg["result"]

    def open(self) -> HttpSession:
        self.request(
            "initialize",
            {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "lists-test", "version": "1"}},
        )
        headers = {"Mcp-Session-Id": self.sid, "Content-Type": "application/json", "Accept": "application/json"}
        self.http.post(self.url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
        return self


def test_http_principals_get_their_own_prepared_lists(tmp_path: Path) -> None:
    cfg, alice_key, bob_key = _http_config(tmp_path)
    port = free_port()
    with popen_gateway(cfg, "--transport", "http", "--port", str(port)) as proc:
        wait_http(port, proc)
        url = f"http://127.0.0.1:{port}/mcp"
        alice = HttpSession(url, alice_key).open()
        bob = HttpSession(url, bob_key).open()
        a1 = alice.request("tools/list")
        b1 = bob.request("tools/list")
        assert "time__get_current_time" in _names(a1) and not any(n.startswith("fake__") for n in _names(a1))
        assert "fake__echo" in _names(b1) and not any(n.startswith("time__") for n in _names(b1))
        for _ in range(2):  # prepared now: still each principal's own
            assert alice.request("tools/list") == a1
            assert bob.request("tools/list") == b1
        alice2 = HttpSession(url, alice_key).open()  # another session of the same principal
        assert alice2.request("tools/list") == a1
        # a list_changed reaches the prepared lists of every principal that sees the server
        bob.request("tools/call", {"name": "fake__add_tool", "arguments": {"name": "added"}})
        deadline = time.monotonic() + TIMEOUT
        b2 = bob.request("tools/list")
        while "fake__added" not in _names(b2) and time.monotonic() < deadline:
            time.sleep(0.05)  # the upstream's notification travels on its own pipe
            b2 = bob.request("tools/list")
        assert "fake__added" in _names(b2)
        assert alice.request("tools/list") == a1


# ---- in process: keys, generations, policy replacement ------------------------------------------
def test_prepared_lists_store_only_what_was_built_without_a_change() -> None:
    lists = PreparedLists()
    key = ("tools/list", LEGACY, "full", None, None)
    gen = lists.generation
    lists.drop()  # something changed while the list was being built
    assert lists.put(key, gen, {"tools": []}) is None and lists.get(key) is None
    entry = lists.put(key, lists.generation, {"tools": [{"name": "a"}]})
    assert entry is not None and lists.get(key) is entry
    assert json.loads(response(7, entry)) == {"jsonrpc": "2.0", "id": 7, "result": {"tools": [{"name": "a"}]}}
    assert json.loads(response("x", entry))["id"] == "x"
    lists.drop()
    assert lists.get(key) is None


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (None, (True, None)),
        ({}, (True, None)),
        ({"cursor": "10"}, (True, "10")),
        ({"cursor": 10}, (False, None)),
        ([], (False, None)),
        ({"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}, (False, None)),
        ({"_meta": {"progressToken": 1}}, (True, None)),
    ],
)
def test_request_cursor(params: Any, expected: tuple[bool, str | None]) -> None:
    assert request_cursor(params) == expected


def test_policy_and_own_tool_changes_drop_and_rekey(tmp_path: Path) -> None:
    cfg_path, _, _ = _http_config(tmp_path)
    gw = build_gateway(load_config(cfg_path))

    def who(key: str) -> Principal:
        return Principal(subject=f"apikey:{key}", kind="api_key", api_key=key)

    keys = {p: gw.list_key("tools/list", LEGACY, None, who(p), None) for p in ("alice", "bob", "carol")}
    assert keys["alice"] != keys["bob"]  # different rules matched, different lists
    assert keys["carol"] == gw.list_key("tools/list", LEGACY, None, who("dave"), None)  # both the default rule
    entry = gw.lists.put(keys["alice"], gw.lists.generation, {"tools": []})
    assert entry is not None
    assert gw.lists.get(keys["alice"]) is entry
    gw.policy = Policy(gw.config.gateway.policy, "mcpopt__")
    assert gw.lists.get(keys["alice"]) is None  # a new policy: nothing prepared survives
    gw.lists.put(keys["alice"], gw.lists.generation, {"tools": []})
    gw.remove_tool("mcpopt__nothing")
    assert len(gw.lists) == 0


@pytest.mark.anyio
async def test_http_fast_path_answers_from_the_prepared_bytes(tmp_path: Path) -> None:
    # In process, so the counters can be read: the first list is built by the SDK (its SSE answer),
    # the next ones come from the prepared bytes on the front's fast path (a JSON answer), and a
    # change of the gateway's own tools makes the next one a build again.
    cfg = write_config(tmp_path / "gw.yaml", {"time": time_entry()}, {"telemetry": {"data_dir": str(tmp_path)}})
    gw = build_gateway(load_config(cfg))
    port = free_port()
    async with gw.running(), anyio.create_task_group() as tg:
        ready = anyio.Event()
        tg.start_soon(serve_http, gw, "127.0.0.1", port, ready)
        with anyio.fail_after(TIMEOUT):
            await ready.wait()
        session = LeanSession(port)
        await session.open()
        answers = []
        for rid in (101, 102, 103):
            status, headers, body = await session._exchange(
                b"POST", b'{"jsonrpc":"2.0","id":%d,"method":"tools/list"}' % rid
            )
            assert status == 200
            answers.append((headers["content-type"].split(";")[0], body))
        assert [kind for kind, _ in answers] == ["text/event-stream", "application/json", "application/json"]
        built = json.loads(next(line[5:] for line in answers[0][1].split(b"\n") if line.startswith(b"data:")))
        assert json.loads(answers[1][1]) == {**built, "id": 102}
        assert json.loads(answers[2][1])["id"] == 103
        assert (gw.lists.builds, gw.lists.hits) == (1, 2)
        gw.remove_tool("no-such-tool")  # any change of the gateway's own tools
        assert (await session.request("tools/list"))["tools"] == built["result"]["tools"]
        assert gw.lists.builds == 2
        await session.delete()
        tg.cancel_scope.cancel()
