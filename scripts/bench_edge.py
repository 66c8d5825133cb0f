#!/usr/bin/env python3
"""CPU per request of the HTTP edge's ASGI layers (Host/Origin, JSON-RPC ids, sessions), in-process.

Usage (from the repo root): .venv/bin/python scripts/bench_edge.py [--requests 20000] [--rounds 5]

Drives `mcpopt.gateway.edge.wrap_http` around an app that only answers 200, with the ASGI messages
uvicorn would deliver for a handshake-era `tools/call` POST on an open session (the fast path's
request), and, alternating, the same app bare. Reports process CPU per request (us) for both and
the difference: what the edge adds to every `POST /mcp`. The JSON-RPC layer parses the body once
and hands it on (`scope["mcpopt.message"]`), so the front's own parse is saved from the total.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from mcpopt.config import Config  # noqa: E402
from mcpopt.gateway.edge import wrap_http  # noqa: E402
from mcpopt.gateway.sessions import SessionGuard, _Held  # noqa: E402

BODY = (
    b'{"jsonrpc":"2.0","id":17,"method":"tools/call","params":{"name":"everything__echo",'
    b'"arguments":{"message":"hello"},"_meta":{"progressToken":17}}}'
)
HEADERS = [
    (b"host", b"127.0.0.1:8080"),
    (b"accept", b"application/json, text/event-stream"),
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
    (b"mcp-session-id", b"0123456789abcdef0123456789abcdef"),
    (b"mcp-protocol-version", b"2025-06-18"),
]


class _Manager:
    _server_instances: dict[str, Any] = {"0123456789abcdef0123456789abcdef": object()}


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    message = await receive()
    assert message["body"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}", "more_body": False})


async def _drive(app: Any, n: int) -> float:
    async def send(_m: Any) -> None:
        return None

    t0 = time.process_time()
    for _ in range(n):
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/mcp",
            "headers": HEADERS,
            "server": ("127.0.0.1", 8080),
            "client": ("127.0.0.1", 50000),
        }
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}

        await app(scope, receive, send)
    return (time.process_time() - t0) / n * 1e6


async def main(requests: int, rounds: int) -> None:
    edge = wrap_http(_ok, Config(), "127.0.0.1", _Manager())
    sessions = edge.app.app  # HostOriginGuard -> JsonRpcGuard -> SessionGuard: the session is a known one
    assert isinstance(sessions, SessionGuard)
    sessions.held["0123456789abcdef0123456789abcdef"] = _Held("addr:127.0.0.1")
    edge_us: list[float] = []
    bare_us: list[float] = []
    await _drive(edge, 2000)  # warm-up
    await _drive(_ok, 2000)
    for _ in range(rounds):
        edge_us.append(await _drive(edge, requests))
        bare_us.append(await _drive(_ok, requests))
    e, b = min(edge_us), min(bare_us)
    print(f"bare app  {b:.2f} us/request (min of {rounds})")
    print(f"with edge {e:.2f} us/request (min of {rounds})")
    print(f"edge adds {e - b:.2f} us/request")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    asyncio.run(main(args.requests, args.rounds))
