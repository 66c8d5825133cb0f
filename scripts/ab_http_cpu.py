#!/usr/bin/env python3
"""Gateway CPU per forwarded tools/call over Streamable HTTP, two checkouts side by side.

Usage: .venv/bin/python scripts/ab_http_cpu.py DIR_A DIR_B [--blocks 20] [--block 200]

DIR_A and DIR_B are checkouts with their own `.venv/bin/mcpopt` (e.g. /work/main and a worktree).
One server-everything (Streamable HTTP) serves both gateways; each gets its own legacy
`mcp.Client`; after warm-up, blocks of `--block` sequential `echo` calls alternate between them
(order flipped every block), and each gateway's CPU (user and system, psutil) is taken over its
own blocks only. Both see the same machine load at the same time, which
`scripts/bench_http_cpu.py` (one gateway per run) cannot give on a busy machine. On Linux the
CPU time is the scheduler's own count (`/proc/<pid>/task/*/schedstat`, nanoseconds, all threads);
elsewhere psutil's user+system, whose clock ticks at 10 ms (a block of 200 calls then resolves
50 us per call: compare means over many blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import anyio
import psutil
from mcp import Client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from mcpopt.bench.overhead import EVERYTHING, background, free_port, wait_port  # noqa: E402


def cpu_s(proc: psutil.Process) -> float:
    """CPU seconds the process has used: the scheduler's nanosecond count where there is one."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        t = proc.cpu_times()
        return float(t.user + t.system)


async def run(dirs: dict[str, Path], blocks: int, block: int) -> None:
    up = free_port()
    ports = {k: free_port() for k in dirs}
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "http.json"
        cfg.write_text(json.dumps({"mcpServers": {"everything": {"url": f"http://127.0.0.1:{up}/mcp"}}}))

        def serve(k: str) -> list[str]:
            return [str(dirs[k] / ".venv/bin/mcpopt"), "serve", "-c", str(cfg), "-t", "http", "--port", str(ports[k])]

        async with background(["node", str(EVERYTHING), "streamableHttp"], env={"PORT": str(up)}):
            await wait_port(up)
            async with background(serve("A")) as ga, background(serve("B")) as gb:
                for port in ports.values():
                    await wait_port(port)
                procs = {"A": psutil.Process(ga.pid), "B": psutil.Process(gb.pid)}
                per_call: dict[str, list[float]] = {k: [] for k in dirs}
                split = {k: [0.0, 0.0] for k in dirs}
                url = "http://127.0.0.1:{}/mcp"
                async with (
                    Client(url.format(ports["A"]), mode="legacy") as ca,
                    Client(url.format(ports["B"]), mode="legacy") as cb,
                ):
                    clients = {"A": ca, "B": cb}
                    for c in clients.values():
                        for _ in range(150):
                            await c.call_tool("everything__echo", {"message": "bench"})
                    for i in range(blocks):
                        for k in ("A", "B") if i % 2 == 0 else ("B", "A"):
                            t0 = procs[k].cpu_times()
                            c0 = cpu_s(procs[k])
                            for _ in range(block):
                                r = await clients[k].call_tool("everything__echo", {"message": "bench"})
                                assert not r.is_error, r
                            c1 = cpu_s(procs[k])
                            t1 = procs[k].cpu_times()
                            per_call[k].append((c1 - c0) / block * 1e6)
                            split[k][0] += t1.user - t0.user
                            split[k][1] += t1.system - t0.system
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for k, path in dirs.items():
        xs, n = per_call[k], blocks * block
        print(
            f"{k} {path}: CPU per call mean {statistics.mean(xs):.0f} median {statistics.median(xs):.0f} "
            f"min {min(xs):.0f} us over {blocks}x{block} calls "
            f"(user {split[k][0] / n * 1e6:.0f}, system {split[k][1] / n * 1e6:.0f})"
        )
    diffs = sorted(b - a for a, b in zip(per_call["A"], per_call["B"], strict=True))
    print(
        f"B - A per block pair: median {statistics.median(diffs):+.1f} us "
        f"({statistics.median(diffs) / statistics.median(per_call['A']) * 100:+.1f}%), "
        f"quartiles {diffs[len(diffs) // 4]:+.1f} .. {diffs[(3 * len(diffs)) // 4]:+.1f} us"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--block", type=int, default=200)
    args = ap.parse_args()
    anyio.run(run, {"A": args.a.resolve(), "B": args.b.resolve()}, args.blocks, args.block)


if __name__ == "__main__":
    main()
