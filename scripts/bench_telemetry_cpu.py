#!/usr/bin/env python3
"""CPU that telemetry + monitor spend per recorded call, in-process (no upstream, no front).

Usage (from the repo root):
    .venv/bin/python scripts/bench_telemetry_cpu.py [--calls 20000] [--rounds 5] [--level standard] [--profile]

A `Telemetry` hub (SQLite sink in a temporary data dir, Prometheus counting on) records `--calls`
calls shaped like `mcp-server-time`'s `get_current_time` through its filter and timer around a
terminal that answers at once; its pending records are processed 20 at a time (`process_pending`,
as its background loop would) and the sinks drained at the end of each round. Printed per round,
in microseconds per call: the event-loop thread's CPU (`time.thread_time`) for the calls through
the filters (the ToolCall and the coroutines included) and for record processing (building,
monitor, Prometheus, queueing), and the whole process's CPU (`time.process_time`, the SQLite
writer thread included). The median and the minimum round are printed; on a loaded machine read
the minimum (CPU time moves less than wall time with load, but still moves: caches and cores are
shared).
`--profile` prints the top functions by own time (cProfile, thread CPU) in telemetry/monitor.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from mcpopt.config import TelemetrySettings  # noqa: E402
from mcpopt.monitor.hub import Telemetry  # noqa: E402
from mcpopt.pipeline import ToolCall  # noqa: E402

RESULT = {
    "content": [
        {
            "type": "text",
            "text": '{\n  "timezone": "UTC",\n  "datetime": "2026-12-03T12:00:00+00:00",\n  "is_dst": false\n}',
        }
    ],
    "isError": False,
}


BATCH = 20
"""Records per processing batch (the hub's 50 ms tick at a few hundred calls per second)."""


async def terminal(call: ToolCall) -> dict:
    return RESULT


async def one_round(hub: Telemetry, calls: int) -> tuple[float, float, float]:
    flt, timer = hub.filter, hub.timer

    async def inner(call: ToolCall) -> dict:
        return await timer(call, terminal)

    processing = 0.0
    p0, t0 = time.process_time(), time.thread_time()
    for _ in range(calls):
        call = ToolCall(
            "time",
            "get_current_time",
            "time__get_current_time",
            {"name": "get_current_time", "arguments": {"timezone": "UTC"}},
            session_id="s1",
        )
        await flt(call, inner)
        if len(hub.pending) >= BATCH:  # as the hub's loop would, a batch at a time
            s0 = time.thread_time()
            hub.process_pending(BATCH)
            processing += time.thread_time() - s0
    s0 = time.thread_time()
    hub.process_pending()
    t1 = time.thread_time()
    processing += t1 - s0
    for sink in hub.sinks:
        await asyncio.to_thread(sink.drain, 60)
    p1 = time.process_time()
    return (t1 - t0 - processing) / calls * 1e6, processing / calls * 1e6, (p1 - p0) / calls * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--level", default="standard", choices=("minimal", "standard", "detailed"))
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        hub = Telemetry(TelemetrySettings(level=args.level), data_dir=Path(d))
        await hub.start()
        await one_round(hub, 500)  # warm-up
        rows = [await one_round(hub, args.calls) for _ in range(args.rounds)]
        for r in rows:
            print(f"  filters {r[0]:6.2f} us  processing {r[1]:6.2f} us  process CPU {r[2]:6.2f} us per call")
        for label, stat in (("median", statistics.median), ("min", min)):
            v = [stat(col) for col in zip(*rows, strict=True)]
            print(f"{label}: filters {v[0]:.2f} us, processing {v[1]:.2f} us, process CPU {v[2]:.2f} us per call")
        if args.profile:
            prof = cProfile.Profile(time.thread_time)
            prof.enable()
            await one_round(hub, args.calls)
            prof.disable()
            st = pstats.Stats(prof)
            st.sort_stats("tottime").print_stats(r"telemetry|monitor", 25)
        await hub.stop()


if __name__ == "__main__":
    asyncio.run(main())
