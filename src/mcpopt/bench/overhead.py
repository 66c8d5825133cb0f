"""`mcpopt bench overhead`: tools/call latency direct vs through mcpopt vs through FastMCP's proxy.

All paths are measured in one run, on the same machine, against the same real upstreams:
- stdio: `mcp-server-time` (`get_current_time`), each path a fresh stdio connection;
- HTTP: `@modelcontextprotocol/server-everything` over Streamable HTTP (`echo`): direct, through
  `mcpopt serve --transport http`, and through FastMCP's HTTP proxy.

Each path: `warmup` calls, then `calls` timed calls, one at a time (latency, not throughput).
Figures: p50/p95/p99 in ms (nearest-rank percentiles) and the p50 difference to direct.
FastMCP runs in its own virtual environment (`.servers/fastmcp`, pinned fastmcp==4.1.0), as a
separate process, exactly as a user would run its proxy.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters

ROOT = Path(__file__).resolve().parents[3]
SERVERS_PY = ROOT / ".servers" / "py" / "bin"
FASTMCP_PY = ROOT / ".servers" / "fastmcp" / "bin" / "python"
EVERYTHING = ROOT / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"


def percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_ms:
        return float("nan")
    k = max(0, min(len(sorted_ms) - 1, int(round(q / 100 * len(sorted_ms) + 0.5)) - 1))
    return sorted_ms[k]


@dataclass
class PathResult:
    transport: str
    path: str
    calls: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    note: str = ""


def summarize(transport: str, path: str, samples: list[float], errors: int, note: str = "") -> PathResult:
    s = sorted(samples)
    mean = sum(s) / len(s) if s else float("nan")
    return PathResult(
        transport, path, len(s), errors, percentile(s, 50), percentile(s, 95), percentile(s, 99), mean, note
    )


async def measure(
    call: Callable[[], Awaitable[Any]], calls: int, warmup: int, check: Callable[[Any], bool]
) -> tuple[list[float], int]:
    """Time `calls` sequential calls after `warmup`; returns samples (ms) and the error count."""
    for _ in range(warmup):
        await call()
    samples: list[float] = []
    errors = 0
    for _ in range(calls):
        t0 = time.perf_counter()
        try:
            result = await call()
            ok = check(result)
        except Exception:  # noqa: BLE001 - an error is counted, not fatal to the benchmark
            ok = False
        samples.append((time.perf_counter() - t0) * 1000)
        errors += 0 if ok else 1
    return samples, errors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        await anyio.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s} s")


@contextlib.asynccontextmanager
async def background(cmd: list[str], env: dict[str, str] | None = None) -> AsyncIterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def _mcpopt_cmd() -> list[str]:
    exe = shutil.which("mcpopt", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "mcpopt.cli"]


def _write(tmp: Path, name: str, data: dict[str, Any]) -> str:
    path = tmp / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


FASTMCP_PROXY = """
import sys
from fastmcp.server import create_proxy
target = sys.argv[1]
if target.startswith("http"):
    proxy = create_proxy(target)
    proxy.run(transport="http", host="127.0.0.1", port=int(sys.argv[2]), show_banner=False)
else:
    import json
    proxy = create_proxy(json.loads(target))
    proxy.run(show_banner=False)
"""


async def _stdio_paths(calls: int, warmup: int, peers: bool, tmp: Path) -> list[PathResult]:
    time_cmd = str(SERVERS_PY / "mcp-server-time")
    arguments: dict[str, Any] = {"timezone": "UTC"}
    ok = _ok_time
    cfg = _write(tmp, "stdio.json", {"mcpServers": {"time": {"command": time_cmd, "args": []}}})
    paths: list[tuple[str, StdioServerParameters, str]] = [
        ("direct", StdioServerParameters(command=time_cmd, args=[]), "get_current_time"),
        (
            "mcpopt",
            StdioServerParameters(command=_mcpopt_cmd()[0], args=[*_mcpopt_cmd()[1:], "serve", "-c", cfg]),
            "time__get_current_time",
        ),
    ]
    if peers and FASTMCP_PY.exists():
        script = tmp / "fastmcp_proxy.py"
        script.write_text(FASTMCP_PROXY)
        target = json.dumps({"mcpServers": {"time": {"command": time_cmd, "args": []}}})
        paths.append(
            (
                "fastmcp-proxy",
                StdioServerParameters(command=str(FASTMCP_PY), args=[str(script), target]),
                "get_current_time",
            )
        )
    results = []
    for label, params, tool in paths:
        # Legacy mode: FastMCP's proxy fails the SDK's default auto mode on some servers (see README).
        async with Client(params, mode="legacy") as client:

            def one(c: Client = client, t: str = tool) -> Awaitable[Any]:
                return c.call_tool(t, arguments)

            samples, errors = await measure(one, calls, warmup, ok)
        results.append(summarize("stdio", label, samples, errors))
    return results


async def _http_paths(calls: int, warmup: int, peers: bool, tmp: Path, auth: bool = False) -> list[PathResult]:
    results: list[PathResult] = []
    node = shutil.which("node") or "node"
    up_port = free_port()
    async with background([node, str(EVERYTHING), "streamableHttp"], env={"PORT": str(up_port)}):
        await wait_port(up_port)
        up_url = f"http://127.0.0.1:{up_port}/mcp"
        gw_port = free_port()
        cfg = _write(tmp, "http.json", {"mcpServers": {"everything": {"url": up_url}}})
        targets = [("direct", up_url, "echo"), ("mcpopt", f"http://127.0.0.1:{gw_port}/mcp", "everything__echo")]
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(
                background([*_mcpopt_cmd(), "serve", "-c", cfg, "-t", "http", "--port", str(gw_port)])
            )
            await wait_port(gw_port)
            if auth:
                results += await _auth_paths(stack, tmp, up_url, f"http://127.0.0.1:{gw_port}/mcp", calls, warmup)
                targets = [t for t in targets if t[0] != "mcpopt"]
            if peers and FASTMCP_PY.exists():
                fm_port = free_port()
                script = tmp / "fastmcp_proxy.py"
                script.write_text(FASTMCP_PROXY)
                await stack.enter_async_context(background([str(FASTMCP_PY), str(script), up_url, str(fm_port)]))
                await wait_port(fm_port)
                targets.append(("fastmcp-proxy", f"http://127.0.0.1:{fm_port}/mcp", "echo"))
            for label, url, tool in targets:
                try:
                    async with Client(url, mode="legacy") as client:

                        def one(c: Client = client, t: str = tool) -> Awaitable[Any]:
                            return c.call_tool(t, {"message": "bench"})

                        samples, errors = await measure(one, calls, warmup, _ok_echo)
                    results.append(summarize("http", label, samples, errors))
                except Exception as exc:  # noqa: BLE001
                    results.append(summarize("http", label, [], calls, note=f"failed: {type(exc).__name__}"))
    order = ["direct", "mcpopt", "mcpopt+auth", "fastmcp-proxy"]
    return sorted(results, key=lambda r: order.index(r.path) if r.path in order else len(order))


async def _auth_paths(
    stack: contextlib.AsyncExitStack, tmp: Path, up_url: str, plain_url: str, calls: int, warmup: int
) -> list[PathResult]:
    """`mcpopt` and `mcpopt+auth` (bearer JWT, policy rule, rate limit) measured alternately:
    `ROUNDS` rounds of `calls / ROUNDS` calls on each, so drifts of a shared machine hit both."""
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    from mcpopt.bench.auth import Signer, auth_config, serve_jwks

    signer = Signer()
    issuer = stack.enter_context(serve_jwks(signer))
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    cfg = _write(tmp, "http-auth.json", {"mcpServers": {"everything": {"url": up_url}}, "gateway": auth_config(issuer)})
    await stack.enter_async_context(background([*_mcpopt_cmd(), "serve", "-c", cfg, "-t", "http", "--port", str(port)]))
    await wait_port(port)
    token = signer.token(issuer, url, scope="mcp:tools")
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30.0)
    plain = await stack.enter_async_context(Client(plain_url, mode="legacy"))
    authed = await stack.enter_async_context(Client(streamable_http_client(url, http_client=http), mode="legacy"))
    clients = {"mcpopt": plain, "mcpopt+auth": authed}
    samples: dict[str, list[float]] = {k: [] for k in clients}
    errors = dict.fromkeys(clients, 0)
    per_round = max(1, calls // ROUNDS)
    for i in range(ROUNDS):
        for label, client in clients.items():

            def one(c: Client = client) -> Awaitable[Any]:
                return c.call_tool("everything__echo", {"message": "bench"})

            got, bad = await measure(one, per_round, warmup if i == 0 else 5, _ok_echo)
            samples[label] += got
            errors[label] += bad
    return [summarize("http", label, samples[label], errors[label]) for label in clients]


ROUNDS = 10
"""Rounds of alternation between the paths compared with `--auth`."""


def _ok_time(result: Any) -> bool:
    return not result.is_error and "datetime" in result.content[0].text


def _ok_echo(result: Any) -> bool:
    return not result.is_error and "bench" in result.content[0].text


async def run_overhead(
    calls: int, warmup: int, transports: list[str], peers: bool, as_json: bool, auth: bool = False
) -> None:
    """Run the paths and print the table; `auth` adds the `mcpopt+auth` HTTP path (alternated with
    `mcpopt`) and the in-process cost of authentication, policy and rate limits (`mcpopt.bench.auth`)."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results: list[PathResult] = []
        if "stdio" in transports:
            results += await _stdio_paths(calls, warmup, peers, tmp)
        if "http" in transports:
            results += await _http_paths(calls, warmup, peers, tmp, auth=auth)
    costs: list[dict[str, Any]] = []
    if auth:
        from mcpopt.bench.auth import in_process_costs

        costs = await in_process_costs()
    report(results, as_json, costs)


def report(results: list[PathResult], as_json: bool, costs: list[dict[str, Any]] | None = None) -> None:
    direct = {r.transport: r.p50_ms for r in results if r.path == "direct"}
    rows = []
    for r in results:
        d = asdict(r)
        d["p50_added_ms"] = r.p50_ms - direct.get(r.transport, float("nan"))
        rows.append(d)
    if as_json:
        print(json.dumps({"paths": rows, "auth_costs": costs} if costs else rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tools/call latency (ms), sequential calls")
    for col in ("transport", "path", "calls", "errors", "p50", "p95", "p99", "p50 vs direct"):
        table.add_column(col, justify="right" if col not in ("transport", "path") else "left")
    for d in rows:
        table.add_row(
            d["transport"],
            d["path"],
            str(d["calls"]),
            str(d["errors"]),
            f"{d['p50_ms']:.2f}",
            f"{d['p95_ms']:.2f}",
            f"{d['p99_ms']:.2f}",
            f"{d['p50_added_ms']:+.2f}" + (f" {d['note']}" if d["note"] else ""),
        )
    Console().print(table)
    if costs:
        extra = Table(title="authentication, policy and rate limits in process (us per request or call)")
        for col in ("what", "p50 us", "p95 us", "p99 us", "runs"):
            extra.add_column(col, justify="left" if col == "what" else "right")
        for c in costs:
            extra.add_row(c["what"], f"{c['p50_us']:.1f}", f"{c['p95_us']:.1f}", f"{c['p99_us']:.1f}", str(c["runs"]))
        Console().print(extra)
