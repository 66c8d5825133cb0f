#!/usr/bin/env python3
"""Where mcpopt's time goes over stdio: CPU per call of the proxy process, and a CPU profile.

Usage (from the repo root):
    .venv/bin/python scripts/profile_stdio_cpu.py [--calls 2000] [--profile]

Paths, all in front of `mcp-server-time` (`get_current_time`), each called from the lean line client
of `mcpopt bench cache` (orjson lines, microseconds of client cost): the bare relay
(`python -m mcpopt.bench.relay`), `mcpopt serve` with telemetry at `standard` (the default) and with
telemetry off. All connections stay open; after warm-up the paths alternate in rounds of 50 calls,
order rotated (`mcpopt.monitor.compare.schedule`). Reported per path: wall p50/p99 (ms) and the CPU
(user + system, every thread) its own process spent per timed call (us), which a loaded machine
moves far less than wall time.

`--profile` then runs `mcpopt serve` under cProfile with a thread-CPU clock (`time.thread_time`:
waiting is not counted) for `--calls` calls and prints the share of the event-loop thread's own
CPU per area of mcpopt (front, gateway dispatch, pipeline, telemetry + monitor, upstream).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import pstats
import sys
import tempfile
from pathlib import Path

import psutil
from mcp import StdioServerParameters

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from mcpopt.bench.lineclient import LineClient  # noqa: E402
from mcpopt.bench.overhead import SERVERS_PY, CpuMeter, child_matching  # noqa: E402
from mcpopt.monitor.compare import schedule, spread  # noqa: E402

TIME = str(SERVERS_PY / "mcp-server-time")
ARGS = {"timezone": "UTC"}
PROFILED = """
import cProfile, runpy, sys, time
out = sys.argv[1]
sys.argv = ["mcpopt", *sys.argv[2:]]
prof = cProfile.Profile(time.thread_time)
prof.enable()
try:
    runpy.run_module("mcpopt.cli", run_name="__main__")
except SystemExit:
    pass
finally:
    prof.disable()
    prof.dump_stats(out)
"""
AREAS = (
    ("front (stdio read, parse, write)", ("gateway/front", "gateway/stdio_reader")),
    ("gateway dispatch (call_tool, names, envelope)", ("mcpopt/gateway", "mcpopt/wire", "mcpopt/catalog")),
    ("telemetry + monitor", ("mcpopt/telemetry", "mcpopt/monitor")),
    ("pipeline filters", ("mcpopt/pipeline", "mcpopt/cache")),
    ("upstream (pool, fast path, pipes, lines)", ("mcpopt/upstream",)),
)


def config(tmp: Path, name: str, gateway: dict[str, object]) -> str:
    path = tmp / name
    data = {"mcpServers": {"time": {"command": TIME}}, "gateway": {"data_dir": str(tmp / "data"), **gateway}}
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


async def compare(calls: int, tmp: Path) -> None:
    mcpopt = [sys.executable, "-m", "mcpopt.cli", "serve", "-c"]
    paths = {
        "relay": (StdioServerParameters(command=sys.executable, args=["-m", "mcpopt.bench.relay", TIME]), ""),
        "mcpopt": (StdioServerParameters(command=mcpopt[0], args=[*mcpopt[1:], config(tmp, "a.json", {})]), "time__"),
        "mcpopt telemetry off": (
            StdioServerParameters(
                command=mcpopt[0], args=[*mcpopt[1:], config(tmp, "b.json", {"telemetry": {"enabled": False}})]
            ),
            "time__",
        ),
    }
    clients: dict[str, LineClient] = {}
    meters: dict[str, CpuMeter] = {}
    taken: set[int] = set()
    samples: dict[str, list[float]] = {k: [] for k in paths}
    try:
        for label, (params, _) in paths.items():
            clients[label] = await LineClient(params).__aenter__()
            meters[label] = CpuMeter(child_matching(params, taken))
        block = 50
        for slot in schedule(list(paths), max(1, calls // block), warmup_rounds=1):
            if not slot.warmup and all(m.start == 0.0 for m in meters.values()):
                for m in meters.values():
                    m.start = m.now()
            tool = paths[slot.path][1] + "get_current_time"
            got = await clients[slot.path].latency(tool, ARGS, 0 if slot.warmup else block, 200 if slot.warmup else 0)
            samples[slot.path] += got
        load = psutil.getloadavg()
        print(f"{calls} calls per path, alternating in rounds of {block}; load average {load[0]:.2f}")
        for label in paths:
            s = spread(samples[label])
            cpu = (meters[label].now() - meters[label].start) / max(1, s["n"]) * 1e6
            print(f"  {label:22s} p50 {s['p50']:.3f} ms  p99 {s['p99']:.3f} ms  CPU {cpu:.0f} us/call")
    finally:
        for c in clients.values():
            await c.__aexit__(None, None, None)


async def profile(calls: int, tmp: Path) -> None:
    script, out = tmp / "profiled.py", tmp / "serve.prof"
    script.write_text(PROFILED, encoding="utf-8")
    params = StdioServerParameters(
        command=sys.executable, args=[str(script), str(out), "serve", "-c", config(tmp, "p.json", {})]
    )
    async with LineClient(params) as client:
        await client.latency("time__get_current_time", ARGS, calls, 200)
    for _ in range(100):  # the profiled gateway writes its file on exit
        if out.exists():
            break
        await asyncio.sleep(0.1)
    stats = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    areas: collections.Counter[str] = collections.Counter()
    for (file, _line, _fn), (_cc, ncalls, own, _cum, _callers) in stats.items():
        if ncalls < calls * 0.9:  # per-call work only, not start-up
            continue
        for area, parts in AREAS:
            if any(p in file for p in parts):
                areas[area] += own
                break
    total = sum(areas.values())
    print(f"event-loop thread CPU in mcpopt's modules per call, {calls} calls (cProfile, thread_time):")
    for area, own in areas.most_common():
        print(f"  {100 * own / total:5.1f}%  {own / calls * 1e6:6.1f} us (profiled)  {area}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        await compare(args.calls, Path(d))
        if args.profile:
            await profile(args.calls, Path(d))


if __name__ == "__main__":
    asyncio.run(main())
