#!/usr/bin/env python3
"""The CPU floor of one sequential HTTP request/response in a Python server on this machine.

Usage (from the repo root): .venv/bin/python scripts/bench_http_floor.py [--requests 1000] [--rounds 3]

What `scripts/bench_http_cpu.py` measures for mcpopt (gateway CPU per forwarded `tools/call`,
sequential calls) has a floor that no gateway code can go under: the cost of waking a Python
process for a request, answering it, and (for a relay) waiting for one upstream round trip. This
script measures that floor with servers that do nothing else, each in its own process (server CPU,
user+sys via psutil, over the timed requests only; the client is `http.client`, keep-alive):

- `uvicorn`: uvicorn (httptools, uvloop) with a trivial ASGI app answering a fixed JSON body;
- `raw`: an asyncio protocol on uvloop parsing with httptools, answering in one `transport.write`;
- `uvicorn+relay`, `raw+relay`: the same, forwarding each body to an upstream (a `raw` server in
  its own process, over one persistent connection) and answering with its reply.

psutil's CPU times tick at 10 ms: 1,000 requests resolve 10 us.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import socket
import subprocess
import sys
import time
from typing import Any

BODY = b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"Echo: bench"}]}}'
REQUEST = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"message":"bench"}}}'


def _response(data: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data)


class _Upstream:
    """One persistent HTTP/1.1 connection to the upstream (content-length answers only)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def call(self, body: bytes) -> bytes:
        assert self.reader is not None and self.writer is not None
        self.writer.write(
            b"POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        return await self.reader.readexactly(length)


def serve(variant: str, port: int, upstream_port: int | None) -> None:
    """Run one server until killed."""
    import httptools
    import uvloop

    upstream = _Upstream(upstream_port) if upstream_port else None

    class Raw(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)
            self.body: list[bytes] = []

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            body, self.body = b"".join(self.body), []
            if upstream is None:
                self.transport.write(_response(BODY))
            else:
                asyncio.ensure_future(self._relay(body))

        async def _relay(self, body: bytes) -> None:
            assert upstream is not None
            self.transport.write(_response(await upstream.call(body)))

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            if upstream is not None:
                await upstream.open()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        data = BODY if upstream is None else await upstream.call(body)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    if variant == "raw":

        async def main() -> None:
            if upstream is not None:
                await upstream.open()
            server = await asyncio.get_running_loop().create_server(Raw, "127.0.0.1", port)
            await server.serve_forever()

        uvloop.run(main())
    else:
        import uvicorn

        uvicorn.run(
            app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning", access_log=False
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(a.serve[0], int(a.serve[1]), int(a.serve[2]) if len(a.serve) > 2 else None)
        return
    import psutil

    me = [sys.executable, os.path.abspath(__file__), "--serve"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up = _free_port()
        procs.append(subprocess.Popen([*me, "raw", str(up)]))
        _wait(up)
        servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        for label, variant, relay in [
            ("uvicorn", "uvicorn", False),
            ("raw", "raw", False),
            ("uvicorn+relay", "uvicorn", True),
            ("raw+relay", "raw", True),
        ]:
            port = _free_port()
            proc = subprocess.Popen([*me, variant, str(port), *([str(up)] if relay else [])])
            procs.append(proc)
            servers[label] = (proc, port)
        for _, port in servers.values():
            _wait(port)
        results: dict[str, list[float]] = {label: [] for label in servers}
        for _ in range(a.rounds):
            for label, (proc, port) in servers.items():
                conn = http.client.HTTPConnection("127.0.0.1", port)
                headers = {"content-type": "application/json"}
                for _ in range(100):  # warm-up
                    conn.request("POST", "/mcp", REQUEST, headers)
                    conn.getresponse().read()
                ps = psutil.Process(proc.pid)
                t = ps.cpu_times()
                c0 = t.user + t.system
                for _ in range(a.requests):
                    conn.request("POST", "/mcp", REQUEST, headers)
                    conn.getresponse().read()
                t = ps.cpu_times()
                results[label].append((t.user + t.system - c0) / a.requests * 1e6)
                conn.close()
        print(f"load average: {os.getloadavg()[0]:.2f}")
        for label, cpu in results.items():
            print(f"{label:14s} server CPU per request: {' '.join(f'{c:.0f}' for c in cpu)} us (min {min(cpu):.0f})")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
