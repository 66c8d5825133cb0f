"""Call latency against the number of servers, alternated (`mcpopt bench growth --alternate N`).

Issue 17's done-when asks for call p50 "within 5% from 1 to 20 servers". `run_growth` measures
each server count with its own gateway, one after the other, so a drift of the machine between
steps (another job starting, frequency scaling) lands on one server count only; on a shared
machine it moved p50 by more than the server count did. Here every gateway of the sizes asked for
runs at once (each with its own servers and data directory), one lean session per gateway, and
`mcpopt.bench.overhead.alternate` rotates blocks of sequential `tools/call`s (server-everything's
`echo` on the first server, present at every size) between them after warm-up, so each size sees
the same machine. Reported per size: p50/p95/p99 (ms), the ratio of its p50 to the smallest
size's, and the gateway's CPU per call (us, psutil over its timed rounds only).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

from mcpopt.bench.growth import WORK_TOOL, LeanSession, gateway_config, serving, wait_ready
from mcpopt.bench.overhead import CpuMeter, PathResult, alternate


def label_of(servers: int) -> str:
    return f"{servers} server" + ("" if servers == 1 else "s")


def _answered(result: Any) -> bool:
    return isinstance(result, dict) and not result.get("isError")


async def alternate_servers(
    servers: list[int], tmp: Path, *, calls: int = 2000, block: int = 50, warmup: int = 100
) -> list[PathResult]:
    """Time `calls` tools/call per server count in `servers`, alternated (see the module docstring).

    One `PathResult` per count, in `servers`' order, labelled `"<n> server(s)"` (transport
    `"http"`); `cpu_us_per_call` is that gateway's CPU per timed call. Raises what starting a
    gateway raises (`TimeoutError` when its servers are not ready within 120 s)."""
    name, args = WORK_TOOL
    params = {"name": name, "arguments": args}
    async with contextlib.AsyncExitStack() as stack:
        turns: dict[str, Any] = {}
        meters: dict[str, CpuMeter] = {}
        for n in servers:
            home = tmp / f"alternate-{n}"  # its own servers' folders and telemetry: no shared SQLite
            home.mkdir(parents=True, exist_ok=True)
            port, proc = await stack.enter_async_context(serving(gateway_config(n, home, 8)))
            await wait_ready(port)
            session = LeanSession(port)
            await session.open()
            stack.push_async_callback(session.delete)
            label = label_of(n)
            turns[label] = functools.partial(session.request, "tools/call", params)
            meters[label] = CpuMeter(proc)
        return await alternate("http", turns, calls, warmup, block, _answered, meters)
