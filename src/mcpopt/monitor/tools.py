"""The gateway's performance tools: `{name}{sep}get_performance_status` and
`{name}{sep}run_performance_benchmark` (`mcpopt__...` by default), registered on the gateway (`GatewayAPI.add_tool`).

- `get_performance_status`: grades, percentiles, error and cache hit rates per tool and
  server, active alerts and anomalies, upstream health (states, breakers), telemetry drops.
- `run_performance_benchmark`: calls the given tools with the given arguments through the
  whole pipeline, `iterations` times each (after `warmup` unmeasured calls), `concurrency` at a
  time, and returns min/avg/p50/p95/p99/max in ms, errors and a grade per tool. Only read-only
  tools unless `allow_writes: true`; at most `MAX_CALLS` tools x `MAX_ITERATIONS` calls, and
  `DEADLINE_S` seconds in all (partial figures are returned past it). With `compare_direct: true`
  each tool is also called straight on its upstream session (no pipeline), the two paths
  alternating in rounds after warm-up (`mcpopt.monitor.compare`): both spreads and what the
  gateway adds (p50, p99).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import mcp_types as types
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from mcpopt.monitor.stats import grade, percentile

if TYPE_CHECKING:
    from mcpopt.api import GatewayAPI
    from mcpopt.monitor.hub import Telemetry

MAX_CALLS = 10
MAX_ITERATIONS = 200
MAX_CONCURRENCY = 16
DEADLINE_S = 60.0


def _result(payload: dict[str, Any], *, is_error: bool = False) -> dict[str, Any]:
    import json

    out: dict[str, Any] = {
        "content": [{"type": "text", "text": json.dumps(payload, ensure_ascii=False, separators=(",", ":"))}],
        "structuredContent": payload,
    }
    if is_error:
        out["isError"] = True
    return out


def register_tools(gateway: GatewayAPI, hub: Telemetry) -> None:
    """Add both tools to the gateway (`GatewayAPI.add_tool`), reading `hub`'s status."""
    cfg = gateway.config.gateway
    prefix = f"{cfg.name}{cfg.separator}"
    status_name = f"{prefix}get_performance_status"
    bench_name = f"{prefix}run_performance_benchmark"

    async def get_status(arguments: dict[str, Any], link: Any) -> dict[str, Any]:
        hub.process_pending()
        status = hub.status()
        if not arguments.get("include_timeline"):
            status.pop("timeline", None)
        wanted = arguments.get("tool")
        if isinstance(wanted, str) and wanted:
            status["tools"] = [t for t in status["tools"] if wanted in f"{t['server']}{cfg.separator}{t['tool']}"]
        return _result(status)

    async def run_benchmark(arguments: dict[str, Any], link: Any) -> dict[str, Any]:
        calls = arguments.get("calls")
        if not isinstance(calls, list) or not calls or len(calls) > MAX_CALLS:
            raise MCPError(code=INVALID_PARAMS, message=f"{bench_name}: 'calls' must list 1 to {MAX_CALLS} tool calls")
        iterations = _int(arguments.get("iterations", 10), 1, MAX_ITERATIONS, "iterations", bench_name)
        concurrency = _int(arguments.get("concurrency", 1), 1, MAX_CONCURRENCY, "concurrency", bench_name)
        warmup = _int(arguments.get("warmup", 1), 0, 20, "warmup", bench_name)
        allow_writes = bool(arguments.get("allow_writes", False))
        compare_direct = bool(arguments.get("compare_direct", False))
        deadline = time.monotonic() + DEADLINE_S
        results = []
        for item in calls:
            name = item.get("name") if isinstance(item, dict) else None
            args = item.get("arguments") if isinstance(item, dict) else None
            if not isinstance(name, str):
                results.append({"name": name, "error": "each call needs 'name'"})
                continue
            if name not in gateway.catalog.tool_routes:
                results.append({"name": name, "error": "unknown tool (only upstream tools can be benchmarked)"})
                continue
            info = gateway.catalog.tool_infos.get(name)
            if not (info is not None and info.read_only) and not allow_writes:
                results.append(
                    {"name": name, "error": "not a read-only tool; pass allow_writes: true to benchmark it anyway"}
                )
                continue
            params = {"name": name, "arguments": args if isinstance(args, dict) else {}}
            if compare_direct and not _direct_allowed(gateway, link, name):
                results.append(
                    {
                        "name": name,
                        "error": "compare_direct needs a tool the caller may call on a shared upstream session "
                        "(the direct path bypasses the policy and isolation)",
                    }
                )
                continue
            if compare_direct:
                results.append(await _compare_one(gateway, link, params, iterations, concurrency, warmup, deadline))
                continue
            results.append(
                await _bench_one(gateway, link, params, iterations, concurrency, warmup, deadline, hub.settings.grades)
            )
        return _result({"iterations": iterations, "concurrency": concurrency, "results": results})

    gateway.add_tool(
        types.Tool(
            name=status_name,
            description=(
                "Performance of the tools behind this gateway: grade (A-F) per tool and overall, latency "
                "percentiles (ms), error and cache hit rates, active alerts and anomalies, upstream health."
            ),
            input_schema={
                "type": "object",
                "properties": {
                    "tool": {"type": "string", "description": "only tools whose gateway name contains this"},
                    "include_timeline": {"type": "boolean", "description": "add per-second points", "default": False},
                },
            },
            annotations=types.ToolAnnotations(read_only_hint=True),
        ),
        get_status,
    )
    gateway.add_tool(
        types.Tool(
            name=bench_name,
            description=(
                "Benchmark tools: call each given tool with the given arguments several times through the gateway "
                "and return latency percentiles (ms), errors and a grade. Read-only tools only unless allow_writes. "
                "With compare_direct, the direct path (the upstream session, no pipeline) alternates with it."
            ),
            input_schema={
                "type": "object",
                "properties": {
                    "calls": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": MAX_CALLS,
                        "items": {
                            "type": "object",
                            "properties": {"name": {"type": "string"}, "arguments": {"type": "object"}},
                            "required": ["name"],
                        },
                    },
                    "iterations": {"type": "integer", "minimum": 1, "maximum": MAX_ITERATIONS, "default": 10},
                    "concurrency": {"type": "integer", "minimum": 1, "maximum": MAX_CONCURRENCY, "default": 1},
                    "warmup": {"type": "integer", "minimum": 0, "maximum": 20, "default": 1},
                    "allow_writes": {"type": "boolean", "default": False},
                    "compare_direct": {
                        "type": "boolean",
                        "default": False,
                        "description": "also call each tool straight on its upstream session (no pipeline), "
                        "alternating with the gateway path after warm-up; reports both and what the gateway adds",
                    },
                },
                "required": ["calls"],
            },
            annotations=types.ToolAnnotations(read_only_hint=False, open_world_hint=True),
        ),
        run_benchmark,
    )


def _int(value: Any, lo: int, hi: int, key: str, tool: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise MCPError(code=INVALID_PARAMS, message=f"{tool}: '{key}' must be an integer from {lo} to {hi}")
    return value


async def _bench_one(
    gateway: Any,
    link: Any,
    params: dict[str, Any],
    iterations: int,
    concurrency: int,
    warmup: int,
    deadline: float,
    grades: Any,
) -> dict[str, Any]:
    errors: list[str] = []
    tool_errors = 0
    lat: list[float] = []

    async def once(measure: bool) -> None:
        nonlocal tool_errors
        if time.monotonic() > deadline:
            return
        t0 = time.perf_counter()
        try:
            result = await gateway.call_tool(dict(params), link)
        except MCPError as exc:
            errors.append(exc.error.message)
            return
        ms = (time.perf_counter() - t0) * 1000
        if measure:
            lat.append(ms)
            tool_errors += bool(result.get("isError"))

    for _ in range(warmup):
        await once(False)
    limit = asyncio.Semaphore(concurrency)

    async def guarded() -> None:
        async with limit:
            await once(True)

    t0 = time.perf_counter()
    await asyncio.gather(*(guarded() for _ in range(iterations)))
    wall = time.perf_counter() - t0
    lat.sort()
    n = len(lat)
    failed = len(errors) + tool_errors
    total = n + len(errors)
    avg = sum(lat) / n if n else 0.0
    rate = failed / total if total else 0.0
    out: dict[str, Any] = {
        "name": params["name"],
        "calls": total,
        "ok": n - tool_errors,
        "tool_errors": tool_errors,
        "errors": len(errors),
        "min_ms": round(lat[0], 3) if n else None,
        "avg_ms": round(avg, 3) if n else None,
        "p50_ms": round(percentile(lat, 0.5), 3) if n else None,
        "p95_ms": round(percentile(lat, 0.95), 3) if n else None,
        "p99_ms": round(percentile(lat, 0.99), 3) if n else None,
        "max_ms": round(lat[-1], 3) if n else None,
        "calls_per_s": round(total / wall, 1) if wall > 0 else None,
        "grade": grade(avg, rate, grades) if n else "F",
    }
    if errors:
        out["first_error"] = errors[0]
    if total < iterations:
        out["note"] = f"stopped after {DEADLINE_S:g} s"
    return out


COMPARE_ROUNDS = 10
"""Rounds of `compare_direct`: each round runs `iterations / COMPARE_ROUNDS` calls on each path."""


async def _compare_one(
    gateway: Any, link: Any, params: dict[str, Any], iterations: int, concurrency: int, warmup: int, deadline: float
) -> dict[str, Any]:
    """`compare_direct`: the tool through the gateway (`call_tool`, the whole pipeline) and straight
    on its upstream pool (`ServerPool.call`, what the pipeline's terminal does), `warmup` calls on
    each, then rounds alternating the two paths with the order rotated (`monitor.compare`).

    Returns `{name, calls, errors, direct: spread, gateway: spread, added_ms: {p50, p99}}` (ms);
    a cached tool's gateway figures are cache hits, not the same work as its direct calls."""
    from mcpopt.monitor.compare import added, schedule, spread
    from mcpopt.pipeline import ToolCall
    from mcpopt.policy import UNKNOWN

    name = params["name"]
    route = gateway.catalog.tool_routes[name]
    info = gateway.catalog.tool_infos.get(name, UNKNOWN)
    errors: list[str] = []

    async def via_gateway() -> dict[str, Any]:
        return await gateway.call_tool(dict(params), link)  # type: ignore[no-any-return]

    async def direct() -> dict[str, Any]:
        upstream = {"name": route.name, "arguments": params["arguments"]}
        call = ToolCall(route.server, route.name, name, upstream, info=info)
        return await gateway.upstreams[route.server].call(call)  # type: ignore[no-any-return]

    paths = {"direct": direct, "gateway": via_gateway}
    samples: dict[str, list[float]] = {"direct": [], "gateway": []}
    limit = asyncio.Semaphore(concurrency)

    async def one(fn: Any, sink: list[float] | None) -> None:
        async with limit:
            if time.monotonic() > deadline:
                return
            t0 = time.perf_counter()
            try:
                result = await fn()
            except Exception as exc:  # noqa: BLE001 - counted and reported, never raised
                errors.append(exc.error.message if isinstance(exc, MCPError) else f"{type(exc).__name__}: {exc}")
                return
            if result.get("isError"):
                errors.append("isError: the tool reported an error")
                return
            if sink is not None:
                sink.append((time.perf_counter() - t0) * 1000)

    per_round = max(1, -(-iterations // COMPARE_ROUNDS))
    for slot in schedule(list(paths), -(-iterations // per_round), warmup_rounds=1 if warmup else 0):
        sink = None if slot.warmup else samples[slot.path]
        n = warmup if slot.warmup else min(per_round, iterations - len(samples[slot.path]))
        await asyncio.gather(*(one(paths[slot.path], sink) for _ in range(n)))
    d, g = spread(samples["direct"]), spread(samples["gateway"])
    out: dict[str, Any] = {
        "name": name,
        "calls": len(samples["direct"]) + len(samples["gateway"]),
        "errors": len(errors),
        "direct": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()},
        "gateway": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in g.items()},
        "added_ms": {k: (round(v, 3) if v is not None else None) for k, v in added(g, d).items()},
        "method": "direct and gateway alternating in rounds (order rotated) after warm-up on each; ms",
    }
    if errors:
        out["first_error"] = errors[0]
    if d["n"] < iterations or g["n"] < iterations:
        out["note"] = f"stopped after {DEADLINE_S:g} s" if time.monotonic() > deadline else "some calls failed"
    return out


def _direct_allowed(gateway: Any, link: Any, name: str) -> bool:
    """Whether the direct path (the upstream session itself, no pipeline) may run `name` for `link`:
    only a tool the caller's policy grants, on a server whose sessions everyone shares."""
    may_call = getattr(gateway, "may_call", None)
    principal = getattr(link, "principal", None)
    if may_call is not None and not may_call(principal, name):
        return False
    route = gateway.catalog.tool_routes[name]
    isolation = getattr(gateway, "isolation", None)
    mode = isolation.get(route.server, "shared") if isinstance(isolation, dict) else "shared"
    return mode == "shared"
