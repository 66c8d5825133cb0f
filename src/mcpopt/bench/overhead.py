"""`mcpopt bench overhead`: tools/call latency direct vs through bare relays vs mcpopt vs FastMCP's proxy.

All paths are measured in one run, on the same machine, against the same real upstreams:
- stdio: `mcp-server-time` (`get_current_time`): direct; through the project's bare relay
  (`python -m mcpopt.bench.relay CMD`) and `socat - EXEC:CMD` when installed; through
  `mcpopt serve`; through FastMCP's proxy;
- HTTP: `@modelcontextprotocol/server-everything` over Streamable HTTP (`echo`): direct, through a
  `socat` TCP relay (when installed), through `mcpopt serve --transport http` (and with `--auth`
  a second gateway with authentication on), and through FastMCP's HTTP proxy.

Every path's connection is open for the whole run; after `warmup` untimed calls on each, the
paths alternate in rounds of `block` sequential calls (order rotated every round, see
`mcpopt.monitor.compare`) until each has `calls` timed calls (latency, not throughput).
Figures: p50/p95/p99 in ms (nearest-rank percentiles) and what each path adds (p50, p99) over
direct and over the bare relay; the load average before and after the run.
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
import psutil
from mcp import Client, StdioServerParameters

from mcpopt.bench.lineclient import LineClient
from mcpopt.monitor.compare import added, schedule

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
    cpu_us_per_call: float | None = None
    """CPU time (user + system) the path's own process spent per timed call, in us (None: no
    process of its own, e.g. direct). Unlike latency it hardly depends on the machine's load."""


class CpuMeter:
    """CPU seconds of one path's process (and, with `children`, of its forked children: socat's
    per-connection processes), sampled at the start and end of the timed rounds."""

    def __init__(self, proc: psutil.Process | None, children: bool = False) -> None:
        self.proc, self.children, self.start = proc, children, 0.0

    def now(self) -> float:
        if self.proc is None:
            return 0.0
        procs = [self.proc, *(self.proc.children(recursive=True) if self.children else [])]
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total


def child_matching(params: StdioServerParameters, taken: set[int]) -> psutil.Process | None:
    """Our direct child process started for `params` (its command line holds the command's name
    and every argument), not one already `taken`."""
    name = Path(params.command).name
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            cmd = child.cmdline()
            if child.pid not in taken and any(Path(c).name == name for c in cmd) and set(params.args) <= set(cmd):
                taken.add(child.pid)
                return child
    return None


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


def mcpopt_cmd() -> list[str]:
    """The command that runs this interpreter's mcpopt (its `mcpopt` script, else `python -m mcpopt.cli`)."""
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


def _relays_stdio(cmd: list[str]) -> list[tuple[str, StdioServerParameters]]:
    """The bare relays in front of a stdio server: the project's (`mcpopt.bench.relay`: two threads
    copying bytes) and `socat` when installed (`socat - EXEC:...`: one process, no parsing)."""
    out = [("relay", StdioServerParameters(command=sys.executable, args=["-m", "mcpopt.bench.relay", *cmd]))]
    socat = shutil.which("socat")
    if socat:
        out.append(("socat", StdioServerParameters(command=socat, args=["-", "EXEC:" + " ".join(cmd)])))
    return out


async def _stdio_paths(
    calls: int, warmup: int, peers: bool, tmp: Path, block: int, client: str = "sdk"
) -> list[PathResult]:
    time_cmd = str(SERVERS_PY / "mcp-server-time")
    arguments: dict[str, Any] = {"timezone": "UTC"}
    cfg = _write(
        tmp,
        "stdio.json",
        {"mcpServers": {"time": {"command": time_cmd, "args": []}}, "gateway": {"data_dir": str(tmp)}},
    )
    paths: list[tuple[str, StdioServerParameters, str]] = [
        ("direct", StdioServerParameters(command=time_cmd, args=[]), "get_current_time"),
        *((label, params, "get_current_time") for label, params in _relays_stdio([time_cmd])),
        (
            "mcpopt",
            StdioServerParameters(command=mcpopt_cmd()[0], args=[*mcpopt_cmd()[1:], "serve", "-c", cfg]),
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
    async with contextlib.AsyncExitStack() as stack:
        turns: dict[str, Callable[[], Awaitable[Any]]] = {}
        meters: dict[str, CpuMeter] = {}
        taken: set[int] = set()
        for label, params, tool in paths:
            if client == "lean":
                lean = await stack.enter_async_context(LineClient(params))

                def one(c: LineClient = lean, t: str = tool) -> Awaitable[Any]:
                    return c.request("tools/call", {"name": t, "arguments": arguments})

            else:
                # Legacy mode: FastMCP's proxy fails the SDK's default auto mode on some servers (see README).
                sdk = await stack.enter_async_context(Client(params, mode="legacy"))

                def one(c: Client = sdk, t: str = tool) -> Awaitable[Any]:  # type: ignore[misc]
                    return c.call_tool(t, arguments)

            meters[label] = CpuMeter(child_matching(params, taken) if label != "direct" else None)
            turns[label] = one
        return await alternate("stdio", turns, calls, warmup, block, _ok_time, meters)


async def alternate(
    transport: str,
    turns: dict[str, Callable[[], Awaitable[Any]]],
    calls: int,
    warmup: int,
    block: int,
    check: Callable[[Any], bool],
    meters: dict[str, CpuMeter] | None = None,
) -> list[PathResult]:
    """Measure every path of `turns` (label -> one call) with every connection open at once:
    `warmup` untimed calls on each path, then rounds of `block` sequential timed calls per path,
    the order of the paths rotated every round (`mcpopt.monitor.compare.schedule`), until each
    has `calls` samples. A machine's drift (other users, frequency scaling) reaches all paths alike."""
    rounds = max(1, -(-calls // block))
    samples: dict[str, list[float]] = {label: [] for label in turns}
    errors = dict.fromkeys(turns, 0)
    meters = meters or {}
    started = False
    for slot in schedule(list(turns), rounds, warmup_rounds=1):
        if not slot.warmup and not started:
            started = True
            for m in meters.values():
                m.start = m.now()
        n = warmup if slot.warmup else min(block, calls - len(samples[slot.path]))
        got, bad = await measure(turns[slot.path], n, 0, check)
        if not slot.warmup:
            samples[slot.path] += got
            errors[slot.path] += bad
    out = []
    for label in turns:
        r = summarize(transport, label, samples[label], errors[label])
        meter = meters.get(label)
        if meter is not None and meter.proc is not None and r.calls:
            r.cpu_us_per_call = (meter.now() - meter.start) / r.calls * 1e6
        out.append(r)
    return out


async def _http_paths(
    calls: int, warmup: int, peers: bool, tmp: Path, block: int, auth: bool = False
) -> list[PathResult]:
    node = shutil.which("node") or "node"
    up_port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(
            background([node, str(EVERYTHING), "streamableHttp"], env={"PORT": str(up_port)})
        )
        await wait_port(up_port)
        up_url = f"http://127.0.0.1:{up_port}/mcp"
        targets: list[tuple[str, Any, str]] = [("direct", up_url, "echo")]
        meters: dict[str, CpuMeter] = {}
        socat = shutil.which("socat")
        if socat:  # a bare TCP relay: the floor of any extra HTTP hop
            relay_port = free_port()
            relay = [socat, f"TCP-LISTEN:{relay_port},bind=127.0.0.1,reuseaddr,fork", f"TCP:127.0.0.1:{up_port}"]
            sp = await stack.enter_async_context(background(relay))
            meters["socat"] = CpuMeter(psutil.Process(sp.pid), children=True)  # a process per connection
            await wait_port(relay_port)
            targets.append(("socat", f"http://127.0.0.1:{relay_port}/mcp", "echo"))
        gw_port = free_port()
        cfg = _write(
            tmp, "http.json", {"mcpServers": {"everything": {"url": up_url}}, "gateway": {"data_dir": str(tmp)}}
        )
        gp = await stack.enter_async_context(
            background([*mcpopt_cmd(), "serve", "-c", cfg, "-t", "http", "--port", str(gw_port)])
        )
        meters["mcpopt"] = CpuMeter(psutil.Process(gp.pid))
        await wait_port(gw_port)
        targets.append(("mcpopt", f"http://127.0.0.1:{gw_port}/mcp", "everything__echo"))
        if auth:
            targets.append(("mcpopt+auth", await _auth_client(stack, tmp, up_url), "everything__echo"))
        if peers and FASTMCP_PY.exists():
            fm_port = free_port()
            script = tmp / "fastmcp_proxy.py"
            script.write_text(FASTMCP_PROXY)
            fp = await stack.enter_async_context(background([str(FASTMCP_PY), str(script), up_url, str(fm_port)]))
            meters["fastmcp-proxy"] = CpuMeter(psutil.Process(fp.pid))
            await wait_port(fm_port)
            targets.append(("fastmcp-proxy", f"http://127.0.0.1:{fm_port}/mcp", "echo"))
        turns: dict[str, Callable[[], Awaitable[Any]]] = {}
        failed: list[PathResult] = []
        for label, target, tool in targets:
            try:
                client = await stack.enter_async_context(Client(target, mode="legacy"))
            except Exception as exc:  # noqa: BLE001 - a path that cannot connect is reported, not fatal
                failed.append(summarize("http", label, [], calls, note=f"failed: {type(exc).__name__}"))
                continue

            def one(c: Client = client, t: str = tool) -> Awaitable[Any]:
                return c.call_tool(t, {"message": "bench"})

            turns[label] = one
        return await alternate("http", turns, calls, warmup, block, _ok_echo, meters) + failed


async def _auth_client(stack: contextlib.AsyncExitStack, tmp: Path, up_url: str) -> Any:
    """A gateway with authentication on (bearer JWT, policy rule, rate limit) and the client
    transport that calls it with a valid token (measured beside plain `mcpopt`)."""
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    from mcpopt.bench.auth import Signer, auth_config, serve_jwks

    signer = Signer()
    issuer = stack.enter_context(serve_jwks(signer))
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    gateway = {**auth_config(issuer), "data_dir": str(tmp / "auth")}
    cfg = _write(tmp, "http-auth.json", {"mcpServers": {"everything": {"url": up_url}}, "gateway": gateway})
    await stack.enter_async_context(background([*mcpopt_cmd(), "serve", "-c", cfg, "-t", "http", "--port", str(port)]))
    await wait_port(port)
    token = signer.token(issuer, url, scope="mcp:tools")
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30.0)
    return streamable_http_client(url, http_client=http)


def _ok_time(result: Any) -> bool:
    if isinstance(result, dict):  # the lean client's raw result
        return not result.get("isError") and "datetime" in result["content"][0]["text"]
    return not result.is_error and "datetime" in result.content[0].text


def _ok_echo(result: Any) -> bool:
    return not result.is_error and "bench" in result.content[0].text


BLOCK = 10
"""Timed calls per path per round: small, so the paths interleave finely."""

RELAY = {"stdio": "relay", "http": "socat"}
"""The bare relay each transport's paths are compared with (the project's for stdio, socat for HTTP)."""

TARGET_P50_OVER_RELAY_MS = 0.10
TARGET_P99_OVER_DIRECT_MS = 1.5
"""Issue 15's targets for mcpopt: p50 within 0.10 ms of the bare relay, p99 at most +1.5 ms over direct."""


async def run_overhead(
    calls: int,
    warmup: int,
    transports: list[str],
    peers: bool,
    as_json: bool,
    auth: bool = False,
    block: int = BLOCK,
    client: str = "sdk",
) -> None:
    """Run the paths and print the table; `auth` adds the `mcpopt+auth` HTTP path (alternated with
    the others) and the in-process cost of authentication, policy and rate limits (`mcpopt.bench.auth`)."""
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results: list[PathResult] = []
        if "stdio" in transports:
            results += await _stdio_paths(calls, warmup, peers, tmp, block, client)
        if "http" in transports:
            results += await _http_paths(calls, warmup, peers, tmp, block, auth=auth)
    costs: list[dict[str, Any]] = []
    if auth:
        from mcpopt.bench.auth import in_process_costs

        costs = await in_process_costs()
    load_after = os.getloadavg()
    report(results, as_json, costs, {"before": load, "after": load_after}, block, client)


def rows_of(results: list[PathResult]) -> list[dict[str, Any]]:
    """Each result as a dict plus what it adds (ms, p50 and p99) over direct and over every bare
    relay measured on the same transport (`added_vs_<path>`), and `p50_added_ms` (over direct)."""
    by = {(r.transport, r.path): {"p50": r.p50_ms, "p99": r.p99_ms} for r in results if r.calls}
    rows = []
    for r in results:
        d = asdict(r)
        mine = {"p50": r.p50_ms, "p99": r.p99_ms}
        for base in ("direct", "relay", "socat"):
            ref = by.get((r.transport, base))
            if ref is not None and base != r.path:
                d[f"added_vs_{base}"] = added(mine, ref)
        d["p50_added_ms"] = d.get("added_vs_direct", {}).get("p50", float("nan"))
        rows.append(d)
    return rows


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 15's targets for each transport's `mcpopt` row: p50 over the relay, p99 over direct."""
    out = []
    for d in rows:
        relay = RELAY.get(d["transport"])
        if d["path"] != "mcpopt" or f"added_vs_{relay}" not in d or "added_vs_direct" not in d:
            continue
        p50 = d[f"added_vs_{relay}"]["p50"]
        p99 = d["added_vs_direct"]["p99"]
        out.append(
            {
                "transport": d["transport"],
                "relay": relay,
                "p50_over_relay_ms": p50,
                "p50_target_ms": TARGET_P50_OVER_RELAY_MS,
                "p50_met": p50 <= TARGET_P50_OVER_RELAY_MS,
                "p99_over_direct_ms": p99,
                "p99_target_ms": TARGET_P99_OVER_DIRECT_MS,
                "p99_met": p99 <= TARGET_P99_OVER_DIRECT_MS,
            }
        )
    return out


def report(
    results: list[PathResult],
    as_json: bool,
    costs: list[dict[str, Any]] | None = None,
    load: dict[str, Any] | None = None,
    block: int = BLOCK,
    client: str = "sdk",
) -> None:
    rows = rows_of(results)
    goals = targets(rows)
    who = "the SDK Client (legacy mode)" if client == "sdk" else "the lean line client over stdio (HTTP: the SDK's)"
    method = (
        f"client: {who}; all paths' connections open at once; {block} sequential calls per path per round, "
        "the order rotated every round, after warm-up calls on each; nearest-rank percentiles; CPU: the path's own "
        "process (user + system) over the timed rounds / its calls"
    )
    if as_json:
        print(
            json.dumps(
                {"method": method, "load_avg": load, "paths": rows, "targets": goals, "auth_costs": costs or []},
                indent=2,
            )
        )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tools/call latency (ms), sequential calls, paths alternating", caption=method)
    cols = ["transport", "path", "calls", "err", "p50", "p95", "p99"]
    cols += ["+p50 direct", "+p99 direct", "+p50 relay", "+p99 relay", "CPU us/call"]
    for col in cols:
        table.add_column(col, justify="right" if col not in ("transport", "path") else "left")

    def plus(d: dict[str, Any], base: str | None, key: str) -> str:
        got = d.get(f"added_vs_{base}") if base else None
        return "" if not got or got[key] is None else f"{got[key]:+.3f}"

    for d in rows:
        relay = RELAY.get(d["transport"])
        table.add_row(
            d["transport"],
            d["path"] + (f" {d['note']}" if d["note"] else ""),
            str(d["calls"]),
            str(d["errors"]),
            f"{d['p50_ms']:.3f}",
            f"{d['p95_ms']:.3f}",
            f"{d['p99_ms']:.3f}",
            plus(d, "direct", "p50"),
            plus(d, "direct", "p99"),
            plus(d, relay, "p50"),
            plus(d, relay, "p99"),
            "" if d["cpu_us_per_call"] is None else f"{d['cpu_us_per_call']:.0f}",
        )
    console = Console()
    console.print(table)
    for g in goals:
        console.print(
            f"{g['transport']}: mcpopt p50 {g['p50_over_relay_ms']:+.3f} ms over the bare relay ({g['relay']}; "
            f"target <= +{g['p50_target_ms']:.2f}: {'met' if g['p50_met'] else 'missed'}), p99 "
            f"{g['p99_over_direct_ms']:+.3f} ms over direct (target <= +{g['p99_target_ms']:.1f}: "
            f"{'met' if g['p99_met'] else 'missed'})",
            highlight=False,
        )
    if load:
        b, a = load["before"], load["after"]
        console.print(
            "load average (1/5/15 min): "
            f"before {b[0]:.2f}/{b[1]:.2f}/{b[2]:.2f}, after {a[0]:.2f}/{a[1]:.2f}/{a[2]:.2f}"
        )
    if costs:
        extra = Table(title="authentication, policy and rate limits in process (us per request or call)")
        for col in ("what", "p50 us", "p95 us", "p99 us", "runs"):
            extra.add_column(col, justify="left" if col == "what" else "right")
        for c in costs:
            extra.add_row(c["what"], f"{c['p50_us']:.1f}", f"{c['p95_us']:.1f}", f"{c['p99_us']:.1f}", str(c["runs"]))
        console.print(extra)
