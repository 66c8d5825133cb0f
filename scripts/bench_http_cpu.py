#!/usr/bin/env python3
"""Gateway CPU per tools/call over Streamable HTTP, and wall p50 direct vs through mcpopt.

Usage (from the repo root): .venv/bin/python scripts/bench_http_cpu.py [--calls 500] [--warmup 100]

Starts server-everything (Streamable HTTP) and `mcpopt serve -t http` in front of it, then calls
`echo` sequentially with `mcp.Client(url, mode="legacy")`: direct, then through mcpopt. The
gateway's CPU time (user+sys, psutil) is measured over the timed calls only, so other load on the
machine does not count; wall-time percentiles are noisier when the machine is busy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import anyio
import psutil
from mcp import Client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from mcpopt.bench.overhead import EVERYTHING, background, free_port, wait_port  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))]


async def run(calls: int, warmup: int, rounds: int) -> None:
    up_port, gw_port = free_port(), free_port()
    exe = str(Path(sys.executable).parent / "mcpopt")
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "http.json"
        url = f"http://127.0.0.1:{up_port}/mcp"
        cfg.write_text(json.dumps({"mcpServers": {"everything": {"url": url}}}))
        async with background(["node", str(EVERYTHING), "streamableHttp"], env={"PORT": str(up_port)}):
            await wait_port(up_port)
            async with background([exe, "serve", "-c", str(cfg), "-t", "http", "--port", str(gw_port)]) as gw:
                await wait_port(gw_port)
                proc = psutil.Process(gw.pid)
                results: dict[str, list[float]] = {"direct": [], "mcpopt": []}
                cpu: list[float] = []
                gw_url = f"http://127.0.0.1:{gw_port}/mcp"
                async with Client(url, mode="legacy") as direct, Client(gw_url, mode="legacy") as via:
                    clients = {"direct": (direct, "echo"), "mcpopt": (via, "everything__echo")}
                    for c, tool in clients.values():
                        for _ in range(warmup):
                            r = await c.call_tool(tool, {"message": "bench"})
                            assert not r.is_error and "bench" in r.content[0].text, r
                    for _ in range(rounds):
                        for label, (c, tool) in clients.items():
                            t = proc.cpu_times()
                            c0 = t.user + t.system
                            for _ in range(calls):
                                t0 = time.perf_counter()
                                r = await c.call_tool(tool, {"message": "bench"})
                                results[label].append((time.perf_counter() - t0) * 1000)
                                assert not r.is_error and "bench" in r.content[0].text, r
                            t = proc.cpu_times()
                            if label == "mcpopt":
                                cpu.append((t.user + t.system - c0) / calls * 1e6)
                            elif t.user + t.system - c0 > 0.05:
                                print(f"(gateway used {t.user + t.system - c0:.3f} s CPU during direct calls)")
    d50, m50 = pct(results["direct"], 50), pct(results["mcpopt"], 50)
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print(f"direct  p50 {d50:.3f} ms  p95 {pct(results['direct'], 95):.3f} ms")
    print(f"mcpopt  p50 {m50:.3f} ms  p95 {pct(results['mcpopt'], 95):.3f} ms  (+{m50 - d50:.3f} ms p50)")
    print(f"gateway CPU per call: {' '.join(f'{c:.0f}' for c in cpu)} us (min {min(cpu):.0f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    anyio.run(run, a.calls, a.warmup, a.rounds)


if __name__ == "__main__":
    main()
