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
waiting is not counted) twice, for `--calls` calls and for none (the same warm-up both times), and
prints the difference per call: the share of the event-loop thread's own CPU per area of mcpopt
(front, gateway dispatch, pipeline, telemetry + monitor, upstream), work done per batch or by
timers and the event loop's own C work listed apart (`profile`).
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


LONG_LIVED = "a long-lived frame (the event loop's C work cProfile charges to it)"


async def _profiled(calls: int, tmp: Path, tag: str) -> dict[tuple[str, int, str], tuple[int, float]]:
    """(file, line, function) -> (calls, own seconds on the event-loop thread) of one profiled `serve`
    that answered `WARMUP + calls` calls and then exited."""
    script, out = tmp / "profiled.py", tmp / f"serve-{tag}.prof"
    script.write_text(PROFILED, encoding="utf-8")
    served, tool = lean_ab.serve(sys.executable, tmp / f"p-{tag}.json", tmp / f"data-{tag}")
    # The same `serve -c <config>`, run under the profiler.
    params = StdioServerParameters(command=sys.executable, args=[str(script), str(out), *served.args[2:]])
    async with LineClient(params) as client:
        await client.latency(tool, lean_ab.ARGS, calls, lean_ab.WARMUP)
    for _ in range(100):  # the profiled gateway writes its file on exit
        if out.exists():
            break
        await asyncio.sleep(0.1)
    stats = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    return {key: (ncalls, own) for key, (_cc, ncalls, own, _cum, _callers) in stats.items()}


async def profile(calls: int, tmp: Path) -> None:
    """Per-call CPU by area: a profiled run with `calls` calls less one with none (the same warm-up),
    so start-up cancels out. A function called at least once per two calls counts in its area; one
    called less often (telemetry records and the monitor fed per batch, timers) in its area's
    "batched or periodic" line; one not called more often at all but with more own time is a frame
    that lives through the run (the loop's own work in C is charged to it)."""
    base = await _profiled(0, tmp, "base")
    full = await _profiled(calls, tmp, "full")
    areas: collections.Counter[str] = collections.Counter()
    for key, (ncalls, own) in full.items():
        ncalls0, own0 = base.get(key, (0, 0.0))
        area = next((a for a, parts in AREAS if any(p in key[0] for p in parts)), None)
        if area is None:
            continue
        more = ncalls - ncalls0
        if more >= calls / 2:
            areas[area] += own - own0
        elif more > 0:
            areas[f"{area}, batched or periodic"] += own - own0
        else:
            areas[LONG_LIVED] += own - own0
    total = sum(v for v in areas.values() if v > 0)
    print(
        f"event-loop thread CPU in mcpopt's modules per call, {calls} calls"
        " (cProfile, thread_time, less a run of none):"
    )
    for area, own in areas.most_common():
        if own > 0:
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
