#!/usr/bin/env python3
"""Memory and idle CPU per idle HTTP session, parked vs not (issue 17 item 4).

Starts a real `mcpopt serve -t http` (one upstream, mcp-server-time) twice: with
`gateway.http.session_park_ms` (sessions park) and with it 0 (they stay open, as on main). Each
run opens N handshake-era sessions (initialize + notifications/initialized, one `logging/setLevel`
each so the record is not the smallest possible), waits until they are parked (the parking run;
`/healthz` details `sessions.parked == N`) or simply done, then reports:

* RSS delta of the gateway process / N (KiB): what the OS sees, allocator slack included;
* tracemalloc delta / N (KiB): the gateway runs with `PYTHONTRACEMALLOC=1` and `/healthz`
  reports `traced_bytes` after a `gc.collect()` (Python objects only; allocator overhead not counted);
* gateway CPU over `--idle-s` seconds with the N sessions idle (ms): the cost of keeping them.

Usage: python scripts/bench_parking.py [-n 5000] [--park-ms 500] [--idle-s 10] [--json]
Tracing costs CPU and memory of its own (it is the delta that counts); RSS figures of the same run
without tracing: `--no-trace`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
MCPOPT = str(Path(sys.executable).parent / "mcpopt")
TIME_SERVER = str(ROOT / ".servers" / "py" / "bin" / "mcp-server-time")
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "bench-parking", "version": "1"},
    },
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(path: Path, park_ms: int, n: int) -> Path:
    config = {
        "servers": {"time": {"command": TIME_SERVER, "args": []}},
        "gateway": {"http": {"session_park_ms": park_ms, "max_sessions": n + 100, "max_sessions_per_client": n + 100}},
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def _health(client: httpx.AsyncClient, port: int) -> dict[str, Any]:
    r = await client.get(f"http://127.0.0.1:{port}/healthz")
    return dict(r.json())


async def _open(client: httpx.AsyncClient, url: str) -> None:
    r = await client.post(url, json=INIT, headers=HEADERS)
    r.raise_for_status()
    headers = {**HEADERS, "mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
    r = await client.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
    r.raise_for_status()
    level = {"jsonrpc": "2.0", "id": 2, "method": "logging/setLevel", "params": {"level": "warning"}}
    (await client.post(url, json=level, headers=headers)).raise_for_status()


async def _run(park_ms: int, n: int, idle_s: float, trace: bool) -> dict[str, Any]:
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = _config(Path(tmp) / "gateway.yaml", park_ms, n)
        env = {**os.environ, **({"PYTHONTRACEMALLOC": "1"} if trace else {})}
        proc = subprocess.Popen(
            [MCPOPT, "serve", "-c", str(config), "-t", "http", "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=str(ROOT),
        )
        gw = psutil.Process(proc.pid)
        try:
            limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                deadline = time.monotonic() + 60
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await _health(client, port)).get("ok"):
                            break
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("gateway did not start")
                    await asyncio.sleep(0.2)
                url = f"http://127.0.0.1:{port}/mcp"
                await _open(client, url)  # warm-up: the first session's one-time costs are not per session
                await asyncio.sleep(max(0.5, 3 * park_ms / 1000))
                h0 = await _health(client, port)
                rss0 = gw.memory_info().rss
                t0 = time.monotonic()
                sem = asyncio.Semaphore(16)

                async def one() -> None:
                    async with sem:
                        await _open(client, url)

                await asyncio.gather(*(one() for _ in range(n)))
                opened_s = time.monotonic() - t0
                # Wait for what this run is about: all parked (parking), or nothing in flight (not).
                deadline = time.monotonic() + 120 + n / 50
                while park_ms:
                    stats = (await _health(client, port))["sessions"]
                    if stats["parked"] >= n + 1 and stats["open"] == 0:
                        break
                    if time.monotonic() > deadline:
                        raise SystemExit(f"sessions did not park: {stats}")
                    await asyncio.sleep(0.2)
                await asyncio.sleep(1.0)
                h1 = await _health(client, port)
                rss1 = gw.memory_info().rss
                c0 = sum(gw.cpu_times()[:2])
                await asyncio.sleep(idle_s)
                idle_cpu_ms = (sum(gw.cpu_times()[:2]) - c0) * 1000
                result: dict[str, Any] = {
                    "park_ms": park_ms,
                    "sessions": n,
                    "open_s": round(opened_s, 1),
                    "rss_kib_per_session": round((rss1 - rss0) / n / 1024, 2),
                    "rss_mib": round(rss1 / 2**20, 1),
                    "idle_cpu_ms": round(idle_cpu_ms, 1),
                    "idle_s": idle_s,
                    "stats": h1.get("sessions"),
                }
                if trace:
                    result["traced_kib_per_session"] = round((h1["traced_bytes"] - h0["traced_bytes"]) / n / 1024, 2)
                return result
        finally:
            for child in gw.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
            proc.kill()
            proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5000, help="idle sessions to open")
    ap.add_argument("--park-ms", type=int, default=500)
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--no-trace", action="store_true", help="no tracemalloc (RSS only)")
    ap.add_argument("--only-parked", action="store_true", help="skip the run without parking")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs = [asyncio.run(_run(args.park_ms, args.n, args.idle_s, not args.no_trace))]
    if not args.only_parked:
        runs.append(asyncio.run(_run(0, args.n, args.idle_s, not args.no_trace)))
    load = os.getloadavg()
    if args.json:
        print(json.dumps({"runs": runs, "load": load}, indent=2))
        return
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {args.n} idle sessions each run")
    for r in runs:
        mode = f"parked after {r['park_ms']} ms" if r["park_ms"] else "not parked"
        traced = f", tracemalloc {r['traced_kib_per_session']} KiB" if "traced_kib_per_session" in r else ""
        print(
            f"{mode:>22}: RSS {r['rss_kib_per_session']} KiB/session{traced}; gateway RSS {r['rss_mib']} MiB; "
            f"idle CPU {r['idle_cpu_ms']} ms in {r['idle_s']} s; opened in {r['open_s']} s; {r['stats']}"
        )


if __name__ == "__main__":
    main()
