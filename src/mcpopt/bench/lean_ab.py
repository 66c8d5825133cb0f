"""Alternating A/B of stdio paths in front of `mcp-server-time`, called from the lean line client.

What `scripts/ab_stdio.py` (the relay and `mcpopt serve` of several checkouts) and
`scripts/profile_stdio_cpu.py` (the relay and `mcpopt serve` with and without telemetry) compare:
every path's connection stays open; after one warm-up round the paths alternate in rounds of
`BLOCK` calls, order rotated (`mcpopt.bench.overhead.alternate`). Reported per path: wall p50/p99
(ms) and the CPU (user + system, every thread) its own process spent per timed call (us), which a
loaded machine moves far less than wall time.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
from mcp import StdioServerParameters

from mcpopt.bench.lineclient import LineClient
from mcpopt.bench.overhead import SERVERS_PY, CpuMeter, PathResult, alternate, child_matching

TIME = str(SERVERS_PY / "mcp-server-time")
"""The upstream every path serves (`get_current_time`)."""
ARGS = {"timezone": "UTC"}
BLOCK = 50
"""Timed calls per path per round."""
WARMUP = 200
"""Untimed calls per path before the first timed round."""


def relay() -> tuple[StdioServerParameters, str]:
    """The bare relay in front of the server (`mcpopt.bench.relay`) and the tool name there."""
    return StdioServerParameters(command=sys.executable, args=["-m", "mcpopt.bench.relay", TIME]), "get_current_time"


def serve(
    python: str, config: Path, data_dir: Path, gateway: dict[str, Any] | None = None
) -> tuple[StdioServerParameters, str]:
    """`mcpopt serve` run by the interpreter `python` in front of the server (a config written to
    `config`, the gateway's data in `data_dir`, more `gateway` settings merged in), and the tool name."""
    data = {"mcpServers": {"time": {"command": TIME}}, "gateway": {"data_dir": str(data_dir), **(gateway or {})}}
    config.write_text(json.dumps(data), encoding="utf-8")
    params = StdioServerParameters(command=python, args=["-m", "mcpopt.cli", "serve", "-c", str(config)])
    return params, "time__get_current_time"


async def compare(paths: dict[str, tuple[StdioServerParameters, str]], calls: int) -> list[PathResult]:
    """Time `calls` calls on every path (label -> (its stdio command, the tool name there)),
    alternating (see the module doc). Raises `RuntimeError` when the handshake fails."""
    async with contextlib.AsyncExitStack() as stack:
        turns: dict[str, Callable[[], Awaitable[Any]]] = {}
        meters: dict[str, CpuMeter] = {}
        taken: set[int] = set()
        for label, (params, tool) in paths.items():
            client = await stack.enter_async_context(LineClient(params))

            def one(c: LineClient = client, t: str = tool) -> Awaitable[Any]:
                return c.request("tools/call", {"name": t, "arguments": ARGS})

            turns[label] = one
            meters[label] = CpuMeter(child_matching(params, taken))
        return await alternate("stdio", turns, calls, WARMUP, BLOCK, lambda r: not r.get("isError"), meters)


def show(results: list[PathResult], width: int = 40) -> None:
    """Print the load average, then one line per path: p50, p99 (ms), CPU per call (us), errors."""
    print(f"load average {psutil.getloadavg()[0]:.2f}; {BLOCK} calls per path per round")
    for r in results:
        cpu = f"{r.cpu_us_per_call:.0f}" if r.cpu_us_per_call is not None else "?"
        errors = f"  {r.errors} errors" if r.errors else ""
        print(f"  {r.path:{width}s} p50 {r.p50_ms:.3f} ms  p99 {r.p99_ms:.3f} ms  CPU {cpu} us/call{errors}")
