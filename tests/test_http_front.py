"""The HTTP front's `tools/call` fast path (`mcpopt.gateway.http_front`) on its rarer turns: a
client's `notifications/cancelled` for a call it serves, and a long call kept alive over SSE.

Real parts: the gateway in this process behind `serve_http` (so `PING_S` can be shortened), the
interop fixture server (stdio, handshake era) as the upstream, and raw httpx requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from conftest import free_port, write_config

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

FIXTURE = str(Path(__file__).resolve().parent / "fixtures" / "interop_server.py")
ACCEPT = "application/json, text/event-stream"
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "front-test", "version": "0"},
    },
}


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, events: Path) -> AsyncIterator[str]:
    """The gateway over HTTP in this process; yields its `/mcp` URL."""
    from mcpopt.config import load_config
    from mcpopt.gateway.assembly import build_gateway
    from mcpopt.gateway.front import serve_http

    entry = {"command": sys.executable, "args": [FIXTURE], "protocol": "legacy", "env": {"INTEROP_EVENTS": str(events)}}
    config = write_config(tmp_path / "g.yaml", {"interop": entry})
    gateway = build_gateway(load_config(config))
    async with gateway.running():
        port = free_port()
        server = asyncio.ensure_future(serve_http(gateway, "127.0.0.1", port))
        try:
            for _ in range(400):
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                await asyncio.sleep(0.05)
            yield f"http://127.0.0.1:{port}/mcp"
        finally:
            server.cancel()
            with contextlib.suppress(BaseException):
                await server


async def open_session(http: httpx.AsyncClient, url: str) -> dict[str, str]:
    """A handshake-era session; the headers its requests carry."""
    headers = {"accept": ACCEPT, "content-type": "application/json"}
    r = await http.post(url, headers=headers, json=INIT)
    assert r.status_code == 200, r.text
    headers["mcp-session-id"] = r.headers["mcp-session-id"]
    headers["mcp-protocol-version"] = "2025-06-18"
    r = await http.post(url, headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    assert r.status_code == 202, r.text
    return headers


def answer_of(r: httpx.Response, rid: Any) -> dict[str, Any]:
    if r.headers["content-type"].startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data: "):
                msg = json.loads(line[6:])
                if msg.get("id") == rid:
                    return msg  # type: ignore[no-any-return]
        raise AssertionError(f"no answer in {r.text!r}")
    return r.json()  # type: ignore[no-any-return]


def slow(rid: int, seconds: float) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "method": "tools/call",
        "params": {"name": "interop__slow", "arguments": {"seconds": seconds}},
    }


def _count(path: Path, text: str) -> int:
    return path.read_text(encoding="utf-8").splitlines().count(text) if path.exists() else 0


async def wait_for_line(path: Path, text: str, count: int = 1) -> None:
    for _ in range(1200):
        if _count(path, text) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} x{count} never appeared in {path}")


async def test_client_cancel_answers_the_call_and_reaches_the_upstream(tmp_path: Path) -> None:
    """`notifications/cancelled` for a call in flight: 202, the call's answer is -32800 `Request
    cancelled` (never code 0), the upstream's tool is cancelled, and the session serves the next call."""
    events = tmp_path / "events.txt"
    async with serving(tmp_path, events) as url, httpx.AsyncClient(timeout=60) as http:
        headers = await open_session(http, url)
        call = asyncio.ensure_future(http.post(url, headers=headers, content=json.dumps(slow(5, 60)).encode()))
        await wait_for_line(events, "slow started")
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 5, "reason": "user"}}
        r = await http.post(url, headers=headers, json=cancel)
        assert r.status_code == 202, r.text
        answer = answer_of(await asyncio.wait_for(call, 30), 5)
        assert answer["error"] == {"code": -32800, "message": "Request cancelled"}
        await wait_for_line(events, "cancelled")
        # the serving task carries no leftover cancellation: the next call on the session is served
        answer = answer_of(await http.post(url, headers=headers, content=json.dumps(slow(6, 0)).encode()), 6)
        assert answer["result"]["content"][0]["text"] == "slept", answer


async def test_long_silent_call_is_switched_to_sse_and_pinged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call silent for `PING_S` gets an SSE answer with pings before its result, as sse_starlette
    keeps the SDK's streams alive; calls that end sooner stay plain JSON. `PING_S` is short for the
    long call and long for the short one, so neither verdict depends on how fast a loaded machine
    answers (a call meant to be "quick" against a 0.2 s `PING_S` is pinged when the machine stalls)."""
    from mcpopt.gateway import http_front

    monkeypatch.setattr(http_front, "PING_S", 0.2)
    events = tmp_path / "events.txt"
    async with serving(tmp_path, events) as url, httpx.AsyncClient(timeout=60) as http:
        headers = await open_session(http, url)
        r = await http.post(url, headers=headers, content=json.dumps(slow(8, 3)).encode())
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream"), r.headers
        assert ": ping - " in r.text, r.text
        assert r.text.index(": ping - ") < r.text.index('"id":8')
        assert answer_of(r, 8)["result"]["content"][0]["text"] == "slept"
        # The front's one ping timer went idle with that call (it was the last in flight): a call
        # started from here on is due a ping only after the new `PING_S`.
        monkeypatch.setattr(http_front, "PING_S", 60.0)
        quick = await http.post(url, headers=headers, content=json.dumps(slow(7, 0.5)).encode())
        assert quick.headers["content-type"] == "application/json", quick.headers
        assert answer_of(quick, 7)["result"]["content"][0]["text"] == "slept"


def test_header_map_is_built_once_per_header_list_and_keeps_the_first_value() -> None:
    """The header map every HTTP layer reads: the first of repeated values (as Starlette, so the SDK,
    reads it), the same map on a second look, a new one when a layer replaced the header list."""
    from mcpopt.asgi import header_map

    scope: dict[str, Any] = {"type": "http", "headers": [(b"host", b"a"), (b"accept", b"x"), (b"host", b"b")]}
    first = header_map(scope)
    assert first == {b"host": b"a", b"accept": b"x"}
    assert header_map(scope) is first
    trimmed = {**scope, "headers": [(b"host", b"c")]}
    assert header_map(trimmed) == {b"host": b"c"}
    assert header_map({"type": "http"}) == {}


async def test_a_cancel_absorbed_by_a_call_that_then_fails_is_withdrawn_from_the_serving_task() -> None:
    """A client's cancel that the call absorbs (an upstream adapter turning it into its own failure)
    and a call that then fails: the answer is that failure's error (never code 0), and the serving
    task is left with no cancel request, as after a call that succeeds. The failure is a stand-in
    gateway: no real upstream absorbs a cancel and then fails on demand."""
    from types import SimpleNamespace

    import orjson

    from mcpopt.errors import UpstreamClosed
    from mcpopt.gateway.http_front import _Exchange

    sent: list[dict[str, Any]] = []
    started = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    class AbsorbsThenFails:
        async def call_tool(self, params: Any, link: Any) -> Any:
            started.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)
            raise UpstreamClosed("the upstream closed its pipe", server="demo")

    conn = SimpleNamespace(protocol_version="2025-06-18", session_id="s1", outbound=None)
    exchange = _Exchange(send, b"s1", 7, conn, transport=None)  # type: ignore[arg-type]

    async def serve() -> int:
        await exchange.run(AbsorbsThenFails(), {"name": "demo__t", "arguments": {}}, "")  # type: ignore[arg-type]
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    serving_task = asyncio.ensure_future(serve())
    await started.wait()
    exchange.cancel()
    assert await serving_task == 0
    answer = orjson.loads(sent[-1]["body"])
    assert answer["id"] == 7
    assert answer["error"]["code"] == UpstreamClosed.code != 0
    assert answer["error"]["data"] == {"server": "demo"}


async def test_a_pinger_started_while_the_answer_waits_on_a_request_is_stopped_with_the_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call whose upstream's request on the stream (e.g. roots/list) is still out when it returns
    waits for that answer; the ping timer may start the call's pinger meanwhile. Once the response
    ends the stream, that pinger is cancelled at once, not left to sleep `PING_S` (1 h here) and
    exit. The gateway is a stand-in: the ordering (a ping due exactly during that wait) cannot be
    produced on demand with a real upstream."""
    from types import SimpleNamespace

    import orjson

    from mcpopt.gateway import http_front
    from mcpopt.gateway.http_front import _Exchange

    monkeypatch.setattr(http_front, "PING_S", 3600.0)
    sent: list[dict[str, Any]] = []
    returned = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    conn = SimpleNamespace(protocol_version="2025-06-18", session_id="s1", outbound=None)
    exchange = _Exchange(send, b"s1", 9, conn, transport=None)  # type: ignore[arg-type]

    class ReturnsWithARequestOut:
        async def call_tool(self, params: Any, link: Any) -> Any:
            exchange.asking = 1  # as `send_raw_request` leaves it while the client has not answered
            exchange.answered = asyncio.Event()
            returned.set()
            return {"content": [], "isError": False}

    serving = asyncio.ensure_future(exchange.run(ReturnsWithARequestOut(), {"name": "demo__t"}, ""))  # type: ignore[arg-type]
    await returned.wait()  # the serving task now waits in the drain: nothing resumes it but `answered`
    assert not serving.done()
    exchange.start_pinger()  # what `HttpFront._ping_due` does for a call silent for `PING_S`
    pinger = exchange.pinger
    assert pinger is not None
    for _ in range(100):
        if any(b": ping" in m.get("body", b"") for m in sent):
            break
        await asyncio.sleep(0)
    assert any(b": ping" in m.get("body", b"") for m in sent), sent
    exchange.asking = 0
    exchange.answered.set()
    try:
        await serving
        last = sent[-1]
        assert last["more_body"] is False
        assert orjson.loads(last["body"].split(b"data: ", 1)[1])["id"] == 9
        assert pinger.cancelling() or pinger.done(), "the pinger outlives the answer"
    finally:
        pinger.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pinger
