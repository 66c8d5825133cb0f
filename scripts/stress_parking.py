#!/usr/bin/env python3
"""Parked sessions against requests that arrive while they park: how many calls are answered 404.

Usage (from the repo root):
    .venv/bin/python scripts/stress_parking.py [--python PY] [--seconds 30] [--sessions 20]

Starts `mcpopt serve -t http` (run by `--python`, default this interpreter: point it at another
checkout's venv, or a wrapper setting PYTHONPATH, to compare builds) over `mcp-server-time` with
`gateway.http.session_park_ms: 50`, opens `--sessions` raw handshake-era sessions (httpx, one
thread each) and has each call `get_current_time` every 40-90 ms (random) for `--seconds`, so
that many requests land while their session is being parked or has just parked. A session whose
call is answered 404 starts a new session, as a client would. Prints the HTTP statuses counted and
the gateway's parking counters (`/healthz` `sessions`); exits 1 when any call got a 404.

Before c00fca3 (issue 15's saturated-suite flake) 6-10% of these calls were answered 404: a
parked session's old server task, winding down, took away the session a request had just resumed
under the same id.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx

ROOT = Path(__file__).resolve().parent.parent
TIME = ROOT / ".servers" / "py" / "bin" / "mcp-server-time"
ACCEPT = "application/json, text/event-stream"
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "stress", "version": "0"}},
}


def _open(client: httpx.Client, url: str) -> dict[str, str]:
    headers = {"accept": ACCEPT, "content-type": "application/json"}
    r = client.post(url, headers=headers, json=INIT)
    r.raise_for_status()
    headers["mcp-session-id"] = r.headers["mcp-session-id"]
    headers["mcp-protocol-version"] = "2025-06-18"
    client.post(url, headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    return headers


def _worker(url: str, seconds: float, counts: dict[int, int], lock: threading.Lock) -> None:
    with httpx.Client(timeout=60) as client:
        headers = _open(client, url)
        end = time.monotonic() + seconds
        rid = 10
        while time.monotonic() < end:
            time.sleep(random.uniform(0.04, 0.09))
            rid += 1
            call = {"name": "time__get_current_time", "arguments": {"timezone": "UTC"}}
            r = client.post(
                url, headers=headers, json={"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": call}
            )
            with lock:
                counts[r.status_code] = counts.get(r.status_code, 0) + 1
            if r.status_code == 404:
                headers = _open(client, url)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--sessions", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        config = Path(d) / "gateway.json"
        servers = {"time": {"command": str(TIME), "args": ["--local-timezone", "UTC"]}}
        gateway = {"data_dir": str(Path(d) / "data"), "http": {"session_park_ms": 50}}
        config.write_text(json.dumps({"mcpServers": servers, "gateway": gateway}), encoding="utf-8")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with open(Path(d) / "gateway.log", "w", encoding="utf-8") as log:
            cmd = [args.python, "-m", "mcpopt.cli", "serve", "-c", str(config), "-t", "http", "--port", str(port)]
            proc = subprocess.Popen(cmd, stderr=log)
            try:
                health = f"http://127.0.0.1:{port}/healthz"
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if httpx.get(health, timeout=2).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline or proc.poll() is not None:
                        print(
                            "the gateway did not start; its log:",
                            (Path(d) / "gateway.log").read_text(),
                            file=sys.stderr,
                        )
                        return 2
                    time.sleep(0.1)
                counts: dict[int, int] = {}
                lock = threading.Lock()
                url = f"http://127.0.0.1:{port}/mcp"
                threads = [
                    threading.Thread(target=_worker, args=(url, args.seconds, counts, lock))
                    for _ in range(args.sessions)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                stats: Any = httpx.get(health, timeout=10).json().get("sessions")
            finally:
                proc.terminate()
                proc.wait(30)
    total = sum(counts.values())
    lost = counts.get(404, 0)
    print(f"{total} calls, statuses {dict(sorted(counts.items()))}: {lost / max(total, 1):.1%} answered 404")
    print(f"parking: {stats}")
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
