"""Speed benchmarks of issue #3: cache hits, throughput, startup. All against real servers.

- `cache`: latency of a cache hit through mcpopt vs the direct call (server-everything `get-sum`
  and mcp-server-time over stdio), from the SDK's `Client` and from a lean line client (whose
  own cost is microseconds, so the ratio is the server side's); and cache hits per second: end
  to end from one SDK client, and the gateway's own capacity (in-process `Gateway.call_tool`
  loop, no client in the way).
- `throughput`: calls/s at concurrency 1, 16, 64 over one client session per path (all open at
  once, a warm-up round each, then rounds alternating the paths), direct vs through
  mcpopt vs through a bare byte relay (`mcpopt.bench.relay`), for a fast tool (`get-sum`,
  arguments varied so calls are never coalesced) and a 50 ms tool
  (`trigger-long-running-operation`, duration 0.05 s).
- `startup`: N stdio servers (server-memory) started in parallel by the gateway vs one after
  another, against the slowest single start.

Paths compared are measured alternately, after warm-up, with every connection open
(`mcpopt.monitor.compare`). Percentiles are nearest-rank over the timed calls. The machine has 2 cores:
the client, the gateway and the server compete for them, which bounds every CPU-heavy figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from mcp import Client, StdioServerParameters

from mcpopt.bench.lineclient import LineClient
from mcpopt.bench.overhead import ROOT, SERVERS_PY, percentile
from mcpopt.monitor.compare import Slot, run_schedule, schedule

EVERYTHING = ROOT / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
MEMORY = ROOT / "node_modules" / "@modelcontextprotocol" / "server-memory" / "dist" / "index.js"
NODE = shutil.which("node") or "node"


def _mcpopt(config: Path) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "mcpopt.cli", "serve", "-c", str(config)])


def _everything() -> StdioServerParameters:
    return StdioServerParameters(command=NODE, args=[str(EVERYTHING), "stdio"])


def _config(tmp: Path, servers: dict[str, Any], name: str = "bench.json") -> Path:
    path = tmp / name
    # The data dir (telemetry, rules) in the temp folder: a benchmark leaves nothing in the user's.
    data = {"mcpServers": servers, "gateway": {"data_dir": str(tmp / "data")}}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _stats(samples_ms: list[float]) -> dict[str, float]:
    s = sorted(samples_ms)
    return {"p50_ms": percentile(s, 50), "p95_ms": percentile(s, 95), "p99_ms": percentile(s, 99)}


async def _latency(client: Client, tool: str, args: dict[str, Any], calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        await client.call_tool(tool, args)
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await client.call_tool(tool, args)
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def _rate(
    client: Client, tool: str, args: dict[str, Any], concurrency: int, seconds: float, vary: str | None = None
) -> float:
    """Calls completed per second by `concurrency` workers sharing one session.

    `vary` names an integer argument given a different value on every call, so concurrent
    calls are never identical (identical read-only calls would be coalesced by mcpopt, which
    would flatter it).
    """
    done = 0
    n = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, n
        while time.perf_counter() < stop:
            n += 1
            result = await client.call_tool(tool, {**args, vary: n} if vary else args)
            if not result.is_error:
                done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - t0)


async def _paired(
    clients: dict[str, tuple[Any, str]], args: dict[str, Any], calls: int, warmup: int, block: int = 10
) -> dict[str, list[float]]:
    """Latency samples (ms) of each path (label -> (open client, tool name)), alternating: `warmup`
    untimed calls on each, then rounds of `block` calls per path, the order rotated every round."""

    async def turn(slot: Slot) -> list[float]:
        client, tool = clients[slot.path]
        if isinstance(client, LineClient):
            return await client.latency(tool, args, 0 if slot.warmup else block, warmup if slot.warmup else 0)
        return await _latency(client, tool, args, 0 if slot.warmup else block, warmup if slot.warmup else 0)

    return await run_schedule(schedule(list(clients), max(1, -(-calls // block)), warmup_rounds=1), turn)


async def bench_cache(calls: int = 500, warmup: int = 50, seconds: float = 3.0) -> dict[str, Any]:
    """Cache hits vs direct calls: each pair of paths measured with both connections open,
    alternating after warm-up (`_paired`), so the comparison is not of a cold path with a warm one."""
    args = {"a": 2, "b": 3}
    with tempfile.TemporaryDirectory() as d:
        cfg = _config(
            Path(d),
            {"everything": {"command": NODE, "args": [str(EVERYTHING), "stdio"], "cache": {"ttl_ms": 600_000}}},
        )
        async with Client(_everything(), mode="legacy") as direct, Client(_mcpopt(cfg), mode="legacy") as gw:
            sdk = await _paired(
                {"direct": (direct, "get-sum"), "hit": (gw, "everything__get-sum")}, args, calls, warmup
            )
            e2e_rate = await _rate(gw, "everything__get-sum", args, 16, seconds)
        async with LineClient(_everything()) as direct_l, LineClient(_mcpopt(cfg)) as gw_l:
            lean = await _paired(
                {"direct": (direct_l, "get-sum"), "hit": (gw_l, "everything__get-sum")}, args, calls, warmup
            )
        capacity = await _gateway_capacity(cfg, seconds)
        # The same against a typical Python server (mcp-server-time, the overhead benchmark's).
        time_cmd = str(SERVERS_PY / "mcp-server-time")
        tcfg = _config(Path(d), {"time": {"command": time_cmd, "cache": {"ttl_ms": 600_000}}}, "time.json")
        targs = {"timezone": "UTC"}
        async with (
            Client(StdioServerParameters(command=time_cmd), mode="legacy") as direct,
            Client(_mcpopt(tcfg), mode="legacy") as gw,
        ):
            tpaths = {"direct": (direct, "get_current_time"), "hit": (gw, "time__get_current_time")}
            timed = await _paired(tpaths, targs, calls, warmup)

    def ratio(x: dict[str, list[float]]) -> float:
        return percentile(sorted(x["hit"]), 50) / percentile(sorted(x["direct"]), 50)

    return {
        "direct": _stats(sdk["direct"]),
        "cache_hit": _stats(sdk["hit"]),
        "hit_vs_direct_p50": ratio(sdk),
        "lean_direct": _stats(lean["direct"]),
        "lean_cache_hit": _stats(lean["hit"]),
        "lean_hit_vs_direct_p50": ratio(lean),
        "time_direct": _stats(timed["direct"]),
        "time_cache_hit": _stats(timed["hit"]),
        "time_hit_vs_direct_p50": ratio(timed),
        "hits_per_s_one_client_c16": e2e_rate,
        "hits_per_s_gateway_in_process": capacity,
    }


async def _gateway_capacity(cfg: Path, seconds: float) -> float:
    """Cache hits per second the gateway process itself serves (no client, no pipes)."""
    from mcpopt.api import ClientLink
    from mcpopt.config import load_config
    from mcpopt.gateway.assembly import build_gateway

    gateway = build_gateway(load_config(cfg))

    async def nothing(*_: Any) -> None:
        return None

    link = ClientLink("2025-11-25", None, None, None, lambda _t: nothing)
    params = {"name": "everything__get-sum", "arguments": {"a": 2, "b": 3}}
    async with gateway.running():
        await gateway.call_tool(params, link)
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(100):
                await gateway.call_tool(params, link)
            n += 100
        return n / (time.perf_counter() - t0)


def _relay() -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=["-m", "mcpopt.bench.relay", NODE, str(EVERYTHING), "stdio"]
    )


async def bench_throughput(seconds: float = 3.0, levels: tuple[int, ...] = (1, 16, 64)) -> list[dict[str, Any]]:
    """Calls/s direct, through mcpopt, and through a bare byte relay (`mcpopt.bench.relay`: the
    cost of any extra process hop), one SDK client session each, same run.

    Returns:
        One row per (tool, concurrency): `{tool, concurrency, direct_per_s, relay_per_s,
        mcpopt_per_s, ratio, relay_ratio}` (ratios are to direct).
    """
    rows: list[dict[str, Any]] = []
    tools: list[tuple[str, str, dict[str, Any], str | None]] = [
        ("fast (get-sum)", "get-sum", {"a": 1, "b": 2}, "a"),
        ("50 ms (long-running-operation)", "trigger-long-running-operation", {"duration": 0.05, "steps": 1}, None),
    ]
    with tempfile.TemporaryDirectory() as d:
        cfg = _config(Path(d), {"everything": {"command": NODE, "args": [str(EVERYTHING), "stdio"]}})
        for label, tool, args, vary in tools:
            for c in levels:
                paths = {
                    "direct": (_everything(), tool),
                    "relay": (_relay(), tool),
                    "mcpopt": (_mcpopt(cfg), f"everything__{tool}"),
                }
                done = dict.fromkeys(paths, 0.0)
                spent = dict.fromkeys(paths, 0.0)
                async with contextlib.AsyncExitStack() as stack:
                    clients = {
                        k: await stack.enter_async_context(Client(params, mode="legacy"))
                        for k, (params, _) in paths.items()
                    }
                    # A warm-up round of each, then THROUGHPUT_ROUNDS rounds, the order rotated.
                    for slot in schedule(list(paths), THROUGHPUT_ROUNDS, warmup_rounds=1):
                        length = 0.3 if slot.warmup else seconds / THROUGHPUT_ROUNDS
                        rate = await _rate(clients[slot.path], paths[slot.path][1], args, c, length, vary)
                        if not slot.warmup:
                            done[slot.path] += rate * length
                            spent[slot.path] += length
                rates = {k: done[k] / spent[k] for k in paths}
                direct_rate = rates["direct"]
                rows.append(
                    {
                        "tool": label,
                        "concurrency": c,
                        "direct_per_s": direct_rate,
                        "relay_per_s": rates["relay"],
                        "mcpopt_per_s": rates["mcpopt"],
                        "ratio": rates["mcpopt"] / direct_rate if direct_rate else float("nan"),
                        "relay_ratio": rates["relay"] / direct_rate if direct_rate else float("nan"),
                    }
                )
    return rows


THROUGHPUT_ROUNDS = 3
"""Rounds per path in `bench_throughput` (each `seconds / THROUGHPUT_ROUNDS` long)."""


async def bench_startup(n: int = 20) -> dict[str, Any]:
    from mcpopt.config import load_config
    from mcpopt.gateway.assembly import build_gateway

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)

        def entry(i: int) -> dict[str, Any]:
            return {"command": NODE, "args": [str(MEMORY)], "env": {"MEMORY_FILE_PATH": str(tmp / f"m{i}.jsonl")}}

        singles = []
        for i in range(3):
            g = build_gateway(load_config(_config(tmp, {f"s{i}": entry(i)}, f"one{i}.json")))
            t0 = time.perf_counter()
            async with g.running():
                singles.append((time.perf_counter() - t0) * 1000)
        parallel_cfg = _config(tmp, {f"s{i}": entry(i) for i in range(n)}, "par.json")
        g = build_gateway(load_config(parallel_cfg))
        t0 = time.perf_counter()
        async with g.running():
            parallel_ms = (time.perf_counter() - t0) * 1000
            ready = sum(1 for r in g.status() if r["state"] == "ready")
            # CPU the servers themselves burnt starting: with C cores, no scheduler can start them
            # all faster than cpu / C (the floor printed beside the measurement).
            cpu_s = 0.0
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    t = child.cpu_times()
                    cpu_s += t.user + t.system
            cores = os.cpu_count() or 1
        # Sequential: a chain of depends_on forces one stage per server.
        chain = {f"s{i}": {**entry(i), **({"depends_on": [f"s{i - 1}"]} if i else {})} for i in range(n)}
        g = build_gateway(load_config(_config(tmp, chain, "seq.json")))
        t0 = time.perf_counter()
        async with g.running():
            sequential_ms = (time.perf_counter() - t0) * 1000
    slowest_single = max(singles)
    return {
        "servers": n,
        "ready": ready,
        "single_ms": singles,
        "parallel_ms": parallel_ms,
        "sequential_ms": sequential_ms,
        "parallel_vs_slowest_single": parallel_ms / slowest_single,
        "servers_cpu_ms": cpu_s * 1000,
        "cores": cores,
        "cpu_floor_ms": cpu_s * 1000 / cores,
        "sequential_vs_parallel": sequential_ms / parallel_ms,
    }


def print_report(kind: str, data: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if kind == "cache":
        t = Table(title="cache hit vs direct call (stdio, ms)")
        for col in ("tool", "path", "p50", "p95", "p99"):
            t.add_column(col, justify="right" if col not in ("path", "tool") else "left")
        for tool, prefix in (
            ("everything get-sum (node)", ""),
            ("time get_current_time (python)", "time_"),
            ("get-sum, lean line client", "lean_"),
        ):
            for path in ("direct", "cache_hit"):
                s = data[prefix + path]
                t.add_row(tool, path, f"{s['p50_ms']:.3f}", f"{s['p95_ms']:.3f}", f"{s['p99_ms']:.3f}")
        console.print(t)
        console.print(
            f"cache hit p50 / direct p50: get-sum {data['hit_vs_direct_p50']:.2f}x, "
            f"get_current_time {data['time_hit_vs_direct_p50']:.2f}x; "
            f"get-sum with a lean client (no SDK client cost on either path) {data['lean_hit_vs_direct_p50']:.2f}x"
        )
        console.print(f"cache hits/s, one SDK client, 16 concurrent: {data['hits_per_s_one_client_c16']:.0f}")
        console.print(f"cache hits/s, gateway in-process (no client): {data['hits_per_s_gateway_in_process']:.0f}")
    elif kind == "throughput":
        t = Table(title="throughput, calls/s over one session (server-everything, stdio)")
        for col in ("tool", "concurrency", "direct/s", "bare relay/s", "mcpopt/s", "relay ratio", "mcpopt ratio"):
            t.add_column(col, justify="right" if col not in ("tool",) else "left")
        for r in data:
            t.add_row(
                r["tool"],
                str(r["concurrency"]),
                f"{r['direct_per_s']:.0f}",
                f"{r['relay_per_s']:.0f}",
                f"{r['mcpopt_per_s']:.0f}",
                f"{r['relay_ratio']:.2f}",
                f"{r['ratio']:.2f}",
            )
        console.print(t)
    elif kind == "startup":
        console.print(
            f"{data['servers']} stdio servers (server-memory): parallel {data['parallel_ms']:.0f} ms "
            f"({data['ready']} ready), sequential {data['sequential_ms']:.0f} ms, slowest single start "
            f"{max(data['single_ms']):.0f} ms -> parallel / slowest single = "
            f"{data['parallel_vs_slowest_single']:.2f}x, sequential / parallel = {data['sequential_vs_parallel']:.1f}x"
        )
        console.print(
            f"the servers burnt {data['servers_cpu_ms']:.0f} ms of CPU starting: on {data['cores']} cores no start "
            f"can beat {data['cpu_floor_ms']:.0f} ms "
            f"(parallel / floor = {data['parallel_ms'] / data['cpu_floor_ms']:.2f}x)"
        )
