#!/usr/bin/env python3
"""A/B over stdio: the bare relay and `mcpopt serve` from several checkouts, alternating, lean client.

Usage (from the repo root):
    .venv/bin/python scripts/ab_stdio.py CALLS PYTHON [PYTHON ...]

Each PYTHON is the interpreter of a venv with an mcpopt installed (e.g. another worktree's
`.venv/bin/python`); each serves `mcp-server-time` with telemetry at `standard`. All connections stay
open; after one warm-up round the paths alternate in rounds of 50 calls, order rotated
(`mcpopt.monitor.compare.schedule`). Prints per path wall p50/p99 (ms) and the CPU (user + system,
all threads) its own process spent per timed call (us).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

import psutil
from mcp import StdioServerParameters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from mcpopt.bench.lineclient import LineClient  # noqa: E402
from mcpopt.bench.overhead import SERVERS_PY, CpuMeter, child_matching  # noqa: E402
from mcpopt.monitor.compare import schedule, spread  # noqa: E402

TIME = str(SERVERS_PY / "mcp-server-time")
BLOCK = 50


async def main() -> None:
    calls, pythons = int(sys.argv[1]), sys.argv[2:]
    tmp = Path(tempfile.mkdtemp())
    paths = {"relay": (StdioServerParameters(command=sys.executable, args=["-m", "mcpopt.bench.relay", TIME]), "")}
    for i, py in enumerate(pythons):
        cfg = tmp / f"c{i}.json"
        data = {"mcpServers": {"time": {"command": TIME}}, "gateway": {"data_dir": str(tmp / f"d{i}")}}
        cfg.write_text(json.dumps(data), encoding="utf-8")
        params = StdioServerParameters(command=py, args=["-m", "mcpopt.cli", "serve", "-c", str(cfg)])
        paths[f"mcpopt {i}: {py}"] = (params, "time__")
    clients: dict[str, LineClient] = {}
    meters: dict[str, CpuMeter] = {}
    taken: set[int] = set()
    samples: dict[str, list[float]] = {k: [] for k in paths}
    try:
        for label, (params, _) in paths.items():
            clients[label] = await LineClient(params).__aenter__()
            meters[label] = CpuMeter(child_matching(params, taken))
        for slot in schedule(list(paths), max(1, calls // BLOCK), warmup_rounds=1):
            if not slot.warmup and all(m.start == 0.0 for m in meters.values()):
                for m in meters.values():
                    m.start = m.now()
            tool = paths[slot.path][1] + "get_current_time"
            n, warm = (0, 200) if slot.warmup else (BLOCK, 0)
            samples[slot.path] += await clients[slot.path].latency(tool, {"timezone": "UTC"}, n, warm)
        print(f"load average {psutil.getloadavg()[0]:.2f}")
        for label in paths:
            s = spread(samples[label])
            cpu = (meters[label].now() - meters[label].start) / max(1, s["n"]) * 1e6
            print(f"  {label:40s} p50 {s['p50']:.3f} ms  p99 {s['p99']:.3f} ms  CPU {cpu:.0f} us/call")
    finally:
        for c in clients.values():
            await c.__aexit__(None, None, None)


if __name__ == "__main__":
    asyncio.run(main())
