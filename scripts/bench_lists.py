#!/usr/bin/env python3
"""Gateway CPU per `tools/list` over HTTP, for any mcpopt executable (e.g. another tree's, to compare).

Usage (from the repo root):
    .venv/bin/python scripts/bench_lists.py [--servers 1] [--requests 200] [--mcpopt PATH]
        [--catalog ../shared/datasets/livemcpbench/tools.json]

Starts `PATH serve -t http` in front of `--servers` copies of `mcpopt.bench.catalog_server` (527 real
tool definitions each), asks `tools/list` once (the build), then `--requests` times with the lean
client of `mcpopt bench growth` (wall to the answer's last byte, unparsed), and prints the wall per
list and the gateway process's CPU (user+sys, psutil) per list.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from mcpopt.bench.growth import LeanSession, _ready  # noqa: E402
from mcpopt.bench.overhead import background, free_port, wait_port  # noqa: E402


async def run(servers: int, requests: int, mcpopt: str, catalog: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        server = {"command": sys.executable, "args": [str(ROOT / "src/mcpopt/bench/catalog_server.py"), catalog]}
        cfg = tmp / "lists.json"
        data = {"mcpServers": {f"c{i}": server for i in range(servers)}, "gateway": {"telemetry": {"data_dir": d}}}
        cfg.write_text(json.dumps(data), encoding="utf-8")
        port = free_port()
        async with background([mcpopt, "serve", "-c", str(cfg), "-t", "http", "--port", str(port)]) as gw:
            await wait_port(port, timeout_s=120)
            await _ready(port)
            proc = psutil.Process(gw.pid)
            s = LeanSession(port)
            await s.open()
            tools = len((await s.request("tools/list"))["tools"])
            t = proc.cpu_times()
            c0, t0 = t.user + t.system, time.perf_counter()
            size = 0
            for i in range(requests):
                body = b'{"jsonrpc":"2.0","id":%d,"method":"tools/list"}' % (1000 + i)
                status, _, answer = await s._exchange(b"POST", body)
                assert status == 200, status
                size = len(answer)
            wall = (time.perf_counter() - t0) / requests * 1000
            t = proc.cpu_times()
            cpu = (t.user + t.system - c0) / requests * 1e6
    print(f"{mcpopt}: {tools} tools, {size // 1024} KiB: {wall:.2f} ms wall, gateway CPU {cpu:.0f} us per list")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--mcpopt", default=str(Path(sys.executable).parent / "mcpopt"))
    ap.add_argument("--catalog", default=str(ROOT.parent / "shared" / "datasets" / "livemcpbench" / "tools.json"))
    args = ap.parse_args()
    asyncio.run(run(args.servers, args.requests, args.mcpopt, args.catalog))


if __name__ == "__main__":
    main()
