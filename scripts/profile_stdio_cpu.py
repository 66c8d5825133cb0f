#!/usr/bin/env python3
"""Where mcpopt's time goes over stdio: CPU per call of the proxy process, and a CPU profile.

Usage (from the repo root):
    .venv/bin/python scripts/profile_stdio_cpu.py [--calls 2000] [--profile]

Paths, all in front of `mcp-server-time` (`get_current_time`), each called from the lean line client
of `mcpopt bench cache` (orjson lines, microseconds of client cost): the bare relay
(`python -m mcpopt.bench.relay`), `mcpopt serve` with telemetry at `standard` (the default) and with
telemetry off. All connections stay open; after warm-up the paths alternate in rounds of 50 calls,
order rotated (`mcpopt.bench.lean_ab`). Reported per path: wall p50/p99 (ms) and the CPU
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
import pstats
import sys
import tempfile
from pathlib import Path

from mcp import StdioServerParameters

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from mcpopt.bench import lean_ab  # noqa: E402
from mcpopt.bench.lineclient import LineClient  # noqa: E402

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


async def compare(calls: int, tmp: Path) -> None:
    paths = {
        "relay": lean_ab.relay(),
        "mcpopt": lean_ab.serve(sys.executable, tmp / "a.json", tmp / "data"),
        "mcpopt telemetry off": lean_ab.serve(
            sys.executable, tmp / "b.json", tmp / "data", {"telemetry": {"enabled": False}}
        ),
    }
    print(f"{calls} calls per path")
    lean_ab.show(await lean_ab.compare(paths, calls), width=22)


async def profile(calls: int, tmp: Path) -> None:
    script, out = tmp / "profiled.py", tmp / "serve.prof"
    script.write_text(PROFILED, encoding="utf-8")
    served, tool = lean_ab.serve(sys.executable, tmp / "p.json", tmp / "data")
    # The same `serve -c <config>`, run under the profiler.
    params = StdioServerParameters(command=sys.executable, args=[str(script), str(out), *served.args[2:]])
    async with LineClient(params) as client:
        await client.latency(tool, lean_ab.ARGS, calls, lean_ab.WARMUP)
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
