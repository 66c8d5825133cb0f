"""`mcpopt bench growth`: how the gateway's costs grow with servers and clients (issue 17, item 6).

One run, one workload, side by side: for each number of upstream servers (default 1, 5, 10, 20
stdio servers: server-everything, mcp-server-time, mcp-server-git, server-filesystem and
server-memory in turn, so the catalog grows as a real deployment's does) a fresh
`mcpopt serve -t http` is started, and then:

- **lists**: one handshake-era session asks `tools/list` `list_requests` times: the first answer
  (built) and the p50/p99 of the rest, wall time from a lean client, plus the gateway's CPU per
  list (psutil, user+sys of the gateway process over the timed requests only);
- for each number of clients (default 1, 10, 100, 1,000), **memory per idle session** (KiB of
  gateway RSS per session), with the gateway parking idle sessions after `park_ms`
  (`gateway.http.session_park_ms`; 10 s here by default, 45 s in a deployment's default config):

  - *open*: that many sessions are opened (initialize + initialized, each on its own connection,
    which is then closed: an idle session holds no socket); the RSS growth over them, before they
    park (SDK transport, dispatcher, streams). `/healthz` says how many were still open just
    after the RSS read: if some had parked already (`park_ms` shorter than the opening took), the
    table says so;
  - *parked, RSS kept*: once `/healthz` (`sessions: {open, parked, ...}`) says all of them parked,
    and 1 s to settle, the same RSS growth over them: what the OS still sees after the burst,
    the freed SDK machinery the allocator keeps included;
  - *parked, arriving in waves*: on a second, fresh gateway (same servers, `WAVE_PARK_MS`), as
    many sessions arrive `WAVE` at a time, each wave opened once `/healthz` says the previous
    ones parked; the RSS growth over them once all parked and settled. At most a wave holds the
    SDK machinery at once, and a first wave opened, parked and deleted before leaves it to reuse,
    so this is what a parked session itself costs (its record and the fragmentation around it),
    as `scripts/bench_parking.py` measures it; on the first gateway the burst's freed memory
    would absorb it instead (which is why it is not measured there).

  A parked figure is only given when the gateway said they all parked; otherwise it is `None`
  ("not parked (parked/clients)"). Then every client reconnects (resuming its parked session,
  untimed) and calls server-everything's `echo` through the gateway at a fixed
  total offered rate (`rate` calls/s, spread evenly over the clients, each client at most one call
  in flight), so the figures show the cost of *more clients*, not of more load: **call p50/p99**
  (wall, from the client's send to the whole answer), **gateway CPU per call** and the client's
  own CPU per call (the benchmark process, counted separately; its garbage collector is off
  during the timed calls, so its pauses are not counted as the gateway's latency). `park_ms`
  must exceed the period of one client's calls (`clients / rate`), or the calls resume parked
  sessions: `calls_resumed` counts them.

The client is a minimal HTTP/1.1 keep-alive client on asyncio streams (microseconds per call),
so the gateway's figures are not hidden behind an SDK client's own ~0.3 ms. Percentiles are
nearest-rank. The machine's load is printed with the figures: on a shared 2-core machine the
client, the gateway and the servers compete for the cores.

Memory per session is a difference of resident set sizes, so it counts what Python keeps for a
session (SDK transport, streams, tasks, the gateway's own records) and not what the allocator
returns; sessions of one clients step are deleted (HTTP DELETE) before the next step, whose
figure can therefore reuse freed memory: the largest step is the one to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil

from mcpopt.bench.overhead import ROOT, SERVERS_PY, background, free_port, mcpopt_cmd, percentile, wait_port

PARK_MS = 10_000
"""The benchmark gateway's `gateway.http.session_park_ms` by default (ms): above the ~5 s 1,000
clients take to open on a loaded 2-core machine and the 5 s between one client's calls at 1,000
clients and 200 calls/s, so neither the open figure nor the calls see parked sessions."""
WAVE = 50
"""Sessions per wave of the arriving-in-waves figure."""
WAVE_PARK_MS = 500
"""The waves gateway's `session_park_ms` (ms): each wave parks within about 1 s."""
SETTLE_S = 1.0
"""Seconds between the gateway saying the sessions parked and the RSS read (as bench_parking)."""
NODE_MODULES = ROOT / "node_modules" / "@modelcontextprotocol"
LEGACY = "2025-11-25"
WORK_TOOL = ("s0__echo", {"message": "growth"})
"""The workload: server-everything's `echo` on the first server (present at every size)."""


def server_entry(i: int, tmp: Path) -> dict[str, Any]:
    """The i-th upstream of the growing deployment (five kinds in turn; 0 is server-everything)."""
    kind = i % 5
    if kind == 0:
        return {"command": "node", "args": [str(NODE_MODULES / "server-everything" / "dist" / "index.js"), "stdio"]}
    if kind == 1:
        return {"command": str(SERVERS_PY / "mcp-server-time"), "args": ["--local-timezone", "UTC"]}
    if kind == 2:
        return {"command": str(SERVERS_PY / "mcp-server-git"), "args": ["--repository", str(ROOT)]}
    if kind == 3:
        folder = tmp / f"files{i}"
        folder.mkdir(exist_ok=True)
        return {"command": "node", "args": [str(NODE_MODULES / "server-filesystem" / "dist" / "index.js"), str(folder)]}
    memory = tmp / f"memory{i}.jsonl"
    return {
        "command": "node",
        "args": [str(NODE_MODULES / "server-memory" / "dist" / "index.js")],
        "env": {"MEMORY_FILE_PATH": str(memory)},
    }


def gateway_config(n: int, tmp: Path, max_clients: int, park_ms: int = 0) -> Path:
    """The gateway's config file for `n` servers with room for `max_clients` sessions, sessions
    parked after `park_ms` idle (0: never)."""
    room = max_clients + 64
    data = {
        "mcpServers": {f"s{i}": server_entry(i, tmp) for i in range(n)},
        "gateway": {
            "http": {
                "max_sessions": room,
                "max_sessions_per_client": room,  # every benchmark client comes from 127.0.0.1
                "max_connections": room,
                "keep_alive_timeout_ms": 120_000,
                "session_park_ms": park_ms,
            },
            "telemetry": {"data_dir": str(tmp / "telemetry")},
        },
    }
    path = tmp / f"growth-{n}-{park_ms}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def catalog_config(n: int, tmp: Path, catalog: Path) -> Path:
    server = {"command": sys.executable, "args": ["-m", "mcpopt.bench.catalog_server", str(catalog)]}
    data = {
        "mcpServers": {f"c{i}": server for i in range(n)},
        "gateway": {"telemetry": {"data_dir": str(tmp / "telemetry")}},
    }
    path = tmp / f"catalog-{n}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ---- a lean HTTP/1.1 JSON-RPC client ---------------------------------------------------------
class HttpError(RuntimeError):
    pass


class LeanSession:
    """One MCP session over Streamable HTTP (handshake era) on a keep-alive connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sid = ""
        self.next_id = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def close_connection(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        self._reader = self._writer = None

    async def _exchange(self, method: bytes, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self._writer is None:
            await self.connect()
        assert self._reader is not None and self._writer is not None
        head = [
            method + b" /mcp HTTP/1.1",
            f"Host: 127.0.0.1:{self.port}".encode(),
            b"Content-Type: application/json",
            b"Accept: application/json, text/event-stream",
            b"Content-Length: " + str(len(body)).encode(),
        ]
        if self.sid:
            head.append(b"Mcp-Session-Id: " + self.sid.encode())
        self._writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        raw = await self._reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            data = await self._reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            parts = []
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).strip(), 16)
                if size == 0:
                    await self._reader.readuntil(b"\r\n")
                    break
                parts.append((await self._reader.readexactly(size + 2))[:-2])
            data = b"".join(parts)
        else:
            data = b""
        if headers.get("connection", "").lower() == "close":
            await self.close_connection()
        return status, headers, data

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self.next_id += 1
        rid = self.next_id
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        status, headers, data = await self._exchange(b"POST", orjson.dumps(msg))
        if status != 200:
            raise HttpError(f"{method}: HTTP {status}: {data[:200]!r}")
        self.sid = headers.get("mcp-session-id", self.sid)
        if headers.get("content-type", "").startswith("text/event-stream"):
            for line in data.split(b"\n"):
                if line.startswith(b"data:"):
                    answer = orjson.loads(line[5:])
                    if answer.get("id") == rid:
                        break
            else:
                raise HttpError(f"{method}: no answer in the event stream")
        else:
            answer = orjson.loads(data)
        if "result" not in answer:
            raise HttpError(f"{method}: {answer.get('error')}")
        result: dict[str, Any] = answer["result"]
        return result

    async def open(self) -> None:
        await self.request(
            "initialize",
            {"protocolVersion": LEGACY, "capabilities": {}, "clientInfo": {"name": "mcpopt-growth", "version": "1"}},
        )
        await self._exchange(b"POST", b'{"jsonrpc":"2.0","method":"notifications/initialized"}')

    async def delete(self) -> None:
        with contextlib.suppress(Exception):
            await self._exchange(b"DELETE", b"")
        await self.close_connection()


# ---- measurements ------------------------------------------------------------------------------
@dataclass
class ListFigures:
    servers: int
    tools: int
    list_bytes: int
    first_ms: float
    p50_ms: float
    p99_ms: float
    gateway_cpu_us: float
    requests: int
    kind: str = "mixed"
    """`mixed` (the five real servers in turn) or `catalog` (copies of `catalog_server`)."""


@dataclass
class CallFigures:
    """One (servers, clients) step: call latency (ms), CPU (us per call), RSS (MiB) and memory per
    idle session (KiB of gateway RSS per session; `None`: the sessions did not all park)."""

    servers: int
    clients: int
    calls: int
    errors: int
    p50_ms: float
    p99_ms: float
    gateway_cpu_us: float
    client_cpu_us: float
    rss_mib: float
    idle_session_kib: float
    """Per open idle session: RSS growth from the `clients` sessions opened, before they park."""
    idle_open: int = 0
    """Of those sessions, how many `/healthz` said were open (not parked) just after that RSS read."""
    parked: int = 0
    """How many of them `/healthz` said were parked when the parked figures were read."""
    parked_session_kib: float | None = None
    """Per parked idle session, RSS kept: the same RSS growth once they all parked and settled."""
    parked_waves_kib: float | None = None
    """Per parked idle session, arriving in waves (`WAVE` at a time, on a fresh gateway)."""
    parked_waves: int = 0
    """How many of those `/healthz` said were parked then."""
    calls_resumed: int = 0
    """Parked sessions the timed calls resumed (`/healthz` `resumes`): 0 unless `park_ms` is too short."""


@dataclass
class Growth:
    lists: list[ListFigures] = field(default_factory=list)
    calls: list[CallFigures] = field(default_factory=list)
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rate: float = 0.0
    start_rss_mib: dict[int, float] = field(default_factory=dict)
    servers_alternated: list[dict[str, Any]] = field(default_factory=list)
    """`mcpopt.bench.growth_servers.alternate_servers`' rows (`PathResult` as a dict), when run."""
    park_ms: int = PARK_MS
    """The gateway's `session_park_ms` (ms; 0: sessions never park, the parked figures are `None`)."""


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _gather_limited(coros: list[Any], limit: int = 32) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(c: Any) -> Any:
        async with gate:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


async def measure_lists(port: int, proc: psutil.Process, servers: int, requests: int) -> ListFigures:
    s = LeanSession(port)
    await s.open()
    t0 = time.perf_counter()
    first = await s.request("tools/list")
    first_ms = (time.perf_counter() - t0) * 1000
    body = len(orjson.dumps(first))
    samples: list[float] = []
    # Timed: request sent to the answer's last byte; the client does not parse the answer (a
    # 200 KiB orjson parse would be most of the figure), it checks its size and id instead.
    c0 = _cpu(proc)
    for i in range(requests):
        rid = 1000 + i
        t0 = time.perf_counter()
        status, _, data = await s._exchange(b"POST", b'{"jsonrpc":"2.0","id":%d,"method":"tools/list"}' % rid)
        samples.append((time.perf_counter() - t0) * 1000)
        if status != 200 or b'"id":%d' % rid not in data[:64] or abs(len(data) - body) > 64:
            raise HttpError(f"tools/list changed during the benchmark (HTTP {status}, {len(data)} bytes)")
    cpu_us = (_cpu(proc) - c0) / requests * 1e6
    await s.delete()
    samples.sort()
    return ListFigures(
        servers,
        len(first["tools"]),
        body,
        first_ms,
        percentile(samples, 50),
        percentile(samples, 99),
        cpu_us,
        requests,
    )


async def session_counts(port: int) -> dict[str, int]:
    """`/healthz`'s `sessions` details (`{"open", "parked", "parks", "resumes"}`, counts since the
    gateway started for the last two); `{}` when the gateway gives none (not an HTTP front with
    parking, or details not shown to this client)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
    finally:
        writer.close()
    body = data.split(b"\r\n\r\n", 1)[-1]
    try:
        sessions = orjson.loads(body).get("sessions") or {}
    except orjson.JSONDecodeError:
        return {}
    return {k: int(v) for k, v in sessions.items()}


async def wait_parked(port: int, base: dict[str, int], n: int, park_ms: int) -> int:
    """Wait until `/healthz` says `n` more sessions are parked than in `base` and no more are open.

    Returns how many more are parked then (`n`), or at the deadline (`3 * park_ms` + 60 s) how
    many were: fewer than `n` means they did not all park. 0 at once when `park_ms` is 0."""
    if park_ms <= 0:
        return 0
    deadline = time.monotonic() + 3 * park_ms / 1000 + 60
    while True:
        now = await session_counts(port)
        parked = now.get("parked", 0) - base.get("parked", 0)
        if parked >= n and now.get("open", 0) <= base.get("open", 0):
            return parked
        if time.monotonic() > deadline or not now:
            return max(0, parked)
        await asyncio.sleep(0.2)


async def open_idle(port: int, clients: int) -> list[LeanSession]:
    """Open `clients` sessions (initialize + initialized) and close their connections."""
    sessions = [LeanSession(port) for _ in range(clients)]
    await _gather_limited([s.open() for s in sessions])
    await _gather_limited([s.close_connection() for s in sessions])
    return sessions


async def measure_clients(
    port: int, proc: psutil.Process, servers: int, clients: int, rate: float, seconds: float, park_ms: int = 0
) -> CallFigures:
    gc.collect()
    base = await session_counts(port)
    rss0 = proc.memory_info().rss
    sessions = await open_idle(port, clients)
    await asyncio.sleep(0.5)  # let the gateway notice the closed connections
    rss1 = proc.memory_info().rss
    idle_kib = (rss1 - rss0) / clients / 1024
    idle_open = (await session_counts(port)).get("open", 0) - base.get("open", 0)

    # Parked: the same sessions once the gateway says they all parked, then a second batch.
    parked = await wait_parked(port, base, clients, park_ms)
    parked_kib = None
    if parked >= clients:
        await asyncio.sleep(SETTLE_S)
        parked_kib = (proc.memory_info().rss - rss0) / clients / 1024

    name, args = WORK_TOOL
    params = {"name": name, "arguments": args}
    await _gather_limited([s.request("tools/call", params) for s in sessions])  # warm-up, reconnects
    period = clients / rate  # seconds between one client's calls
    duration = max(seconds, 2 * period)
    samples: list[float] = []
    errors = 0

    async def client(i: int, s: LeanSession, start: float) -> None:
        nonlocal errors
        due = start + period * i / clients
        while due < start + duration:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t0 = time.perf_counter()
            try:
                result = await s.request("tools/call", params)
                if result.get("isError"):
                    errors += 1
            except (HttpError, OSError, asyncio.IncompleteReadError):
                errors += 1
                continue
            samples.append((time.perf_counter() - t0) * 1000)
            due += period

    # The client's own collector stays out of the timed calls: a full collection of 1,000 sessions'
    # objects here took 100-230 ms, which the gateway's p99 would otherwise carry.
    gc.collect()
    resumes0 = (await session_counts(port)).get("resumes", 0)
    gc.disable()
    try:
        c0, own0 = _cpu(proc), _own_cpu()
        start = time.perf_counter() + 0.05
        await asyncio.gather(*(client(i, s, start) for i, s in enumerate(sessions)))
    finally:
        gc.enable()
    calls = len(samples) + errors
    gw_cpu = (_cpu(proc) - c0) / max(1, calls) * 1e6
    own_cpu = (_own_cpu() - own0) / max(1, calls) * 1e6
    rss = proc.memory_info().rss / 2**20
    resumed = (await session_counts(port)).get("resumes", 0) - resumes0
    await _gather_limited([s.delete() for s in sessions])
    samples.sort()
    return CallFigures(
        servers,
        clients,
        calls,
        errors,
        percentile(samples, 50) if samples else float("nan"),
        percentile(samples, 99) if samples else float("nan"),
        gw_cpu,
        own_cpu,
        rss,
        idle_kib,
        idle_open,
        max(0, parked),
        parked_kib,
        calls_resumed=resumed,
    )


async def measure_parked_waves(port: int, proc: psutil.Process, clients: int) -> tuple[float | None, int]:
    """RSS growth per parked session (KiB) when `clients` sessions arrive `WAVE` at a time, each
    wave opened once `/healthz` says every earlier one parked (the gateway parks after
    `WAVE_PARK_MS`); the sessions are deleted after.

    Returns `(KiB per session, parked)`; `(None, parked)` when not all of them parked."""
    gc.collect()
    base = await session_counts(port)
    rss0 = proc.memory_info().rss
    sessions: list[LeanSession] = []
    parked = 0
    while len(sessions) < clients:
        sessions += await open_idle(port, min(WAVE, clients - len(sessions)))
        parked = await wait_parked(port, base, len(sessions), WAVE_PARK_MS)
        if parked < len(sessions):
            break
    kib = None
    if parked >= clients:
        await asyncio.sleep(SETTLE_S)
        kib = (proc.memory_info().rss - rss0) / clients / 1024
    await _gather_limited([s.delete() for s in sessions])
    return kib, parked


@contextlib.asynccontextmanager
async def serving(config: Path) -> AsyncIterator[tuple[int, psutil.Process]]:
    port = free_port()
    async with background([*mcpopt_cmd(), "serve", "-c", str(config), "-t", "http", "--port", str(port)]) as gw:
        await wait_port(port, timeout_s=120)
        yield port, psutil.Process(gw.pid)


async def wait_ready(port: int, timeout_s: float = 120) -> None:
    """Wait until `/healthz` says every upstream is ready (without listing anything: the first
    measured `tools/list` is then the one that builds the list)."""
    deadline = time.monotonic() + timeout_s
    while True:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        head = await reader.read(64)
        writer.close()
        if head.startswith(b"HTTP/1.1 200"):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway's servers were not all ready within {timeout_s} s")
        await asyncio.sleep(0.25)


async def run_growth(
    servers: list[int],
    clients: list[int],
    *,
    rate: float = 200.0,
    seconds: float = 3.0,
    list_requests: int = 200,
    catalog: Path | None = None,
    catalog_servers: list[int] | None = None,
    park_ms: int = PARK_MS,
) -> Growth:
    """Run the benchmark (see the module docstring); figures in ms, us of CPU, MiB and KiB.

    `park_ms` is the gateway's `session_park_ms` (ms, >= 0; 0: sessions never park and the parked
    figures are `None`).

    With `catalog` (a LiveMCPBench `tools.json`), lists are also measured in front of
    `catalog_servers` copies of `mcpopt.bench.catalog_server` (527 real tool definitions each;
    default 1 and 6 copies: 527 and 3,162 tools)."""
    out = Growth(rate=rate, park_ms=park_ms)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for n in servers:
            async with serving(gateway_config(n, tmp, max(clients), park_ms)) as (port, proc):
                await wait_ready(port)
                out.start_rss_mib[n] = proc.memory_info().rss / 2**20
                out.lists.append(await measure_lists(port, proc, n, list_requests))
                rows = [await measure_clients(port, proc, n, c, rate, seconds, park_ms) for c in clients]
            if park_ms:
                async with serving(gateway_config(n, tmp, max(clients), WAVE_PARK_MS)) as (port, proc):
                    await wait_ready(port)
                    # One wave opened, parked and deleted first: the one-time costs and one wave's SDK
                    # machinery (which a wave reuses) are not counted per parked session.
                    base = await session_counts(port)
                    warm = await open_idle(port, min(WAVE, max(clients)))
                    await wait_parked(port, base, len(warm), WAVE_PARK_MS)
                    await _gather_limited([s.delete() for s in warm])
                    for step in rows:
                        step.parked_waves_kib, step.parked_waves = await measure_parked_waves(port, proc, step.clients)
            out.calls += rows
        for n in catalog_servers or ([1, 6] if catalog is not None else []):
            assert catalog is not None
            async with serving(catalog_config(n, tmp, catalog)) as (port, proc):
                await wait_ready(port)
                row = await measure_lists(port, proc, n, list_requests)
                row.kind = "catalog"
                out.lists.append(row)
    out.load = os.getloadavg()
    return out


# ---- report ------------------------------------------------------------------------------------
def report(g: Growth, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(asdict(g), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(160, Console().width))
    t = Table(title="tools/list through mcpopt (HTTP, lean client)")
    for col in ("servers", "tools", "KiB", "first ms", "p50 ms", "p99 ms", "gateway CPU us/list"):
        t.add_column(col, justify="right")
    for row in g.lists:
        t.add_row(
            f"{row.servers}" + (" (catalog)" if row.kind == "catalog" else ""),
            str(row.tools),
            f"{row.list_bytes / 1024:.0f}",
            f"{row.first_ms:.2f}",
            f"{row.p50_ms:.3f}",
            f"{row.p99_ms:.3f}",
            f"{row.gateway_cpu_us:.0f}",
        )
    console.print(t)
    t = Table(title=f"tools/call s0__echo, {g.rate:.0f} calls/s offered in total")
    for col in (
        "servers",
        "clients",
        "calls",
        "errors",
        "p50 ms",
        "p99 ms",
        "p99 / 1 client",
        "gateway CPU us/call",
        "client CPU us/call",
        "gateway RSS MiB",
    ):
        t.add_column(col, justify="right")
    base = {r.servers: r.p99_ms for r in g.calls if r.clients == min(c.clients for c in g.calls)}
    for call in g.calls:
        t.add_row(
            str(call.servers),
            str(call.clients),
            str(call.calls),
            str(call.errors),
            f"{call.p50_ms:.2f}",
            f"{call.p99_ms:.2f}",
            f"{call.p99_ms / base[call.servers]:.2f}x",
            f"{call.gateway_cpu_us:.0f}",
            f"{call.client_cpu_us:.0f}",
            f"{call.rss_mib:.0f}",
        )
    console.print(t)
    if g.servers_alternated:
        rows = g.servers_alternated
        t = Table(title="tools/call s0__echo, one client per gateway, every server count at once, alternated")
        for col in ("gateway", "calls", "errors", "p50 ms", "p95 ms", "p99 ms", "p50 vs first", "gateway CPU us/call"):
            t.add_column(col, justify="right")
        first = rows[0]["p50_ms"]
        for r in rows:
            cpu = r.get("cpu_us_per_call")
            t.add_row(
                r["path"],
                str(r["calls"]),
                str(r["errors"]),
                f"{r['p50_ms']:.3f}",
                f"{r['p95_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
                f"{(r['p50_ms'] / first - 1) * 100:+.1f}%",
                "-" if cpu is None else f"{cpu:.0f}",
            )
        console.print(t)
    park = f"parked after {g.park_ms} ms idle (gateway.http.session_park_ms)" if g.park_ms else "parking off"
    t = Table(title=f"memory per idle session, KiB of gateway RSS ({park})")
    waves = f"parked: arriving {WAVE} at a time"
    for col in ("servers", "clients", "open", "parked: RSS kept", waves, "calls resumed"):
        t.add_column(col, justify="right")
    for call in g.calls:
        t.add_row(
            str(call.servers),
            str(call.clients),
            f"{call.idle_session_kib:.1f}"
            # (With parking off nothing parks, and /healthz may give no session counts at all.)
            + (
                ""
                if not g.park_ms or call.idle_open >= call.clients
                else f" ({call.clients - call.idle_open} parked already)"
            ),
            _parked_cell(call.parked_session_kib, call.parked, call.clients, g.park_ms),
            _parked_cell(call.parked_waves_kib, call.parked_waves, call.clients, g.park_ms),
            str(call.calls_resumed),
        )
    console.print(t)
    console.print(
        "open: RSS growth per session opened at once, before they park; parked, RSS kept: the same once /healthz "
        "says all parked (what the allocator kept of the burst included); parked, arriving in waves: RSS growth "
        f"per session on a fresh gateway (parking after {WAVE_PARK_MS} ms) when each wave opens once the earlier "
        "ones parked"
    )
    starts = ", ".join(f"{n} servers {mib:.0f} MiB" for n, mib in g.start_rss_mib.items())
    console.print(f"gateway RSS once ready: {starts}")
    console.print(f"load average at the end: {g.load[0]:.2f} {g.load[1]:.2f} {g.load[2]:.2f} ({os.cpu_count()} cores)")


def _parked_cell(kib: float | None, parked: int, clients: int, park_ms: int) -> str:
    if not park_ms:
        return "parking off"
    if kib is not None:
        return f"{kib:.1f}"
    return f"not parked ({parked}/{clients})"


def _servers_label(n: int) -> str:
    return f"{n} server" + ("" if n == 1 else "s")


def figure(g: Growth) -> Any:
    """The curves as a matplotlib `Figure` (Agg backend), 2 x 3 panels: tools/list against tools
    listed; call latency, gateway CPU per call, gateway RSS and RSS per idle session against
    clients, one colour per server count. Line styles are named in each panel's legend (p50 / p99;
    open / parked: RSS kept / parked: arriving `WAVE` at a time); the memory panel's legend sits
    in the sixth cell, which has no axes of its own.

    Raises:
        RuntimeError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    except ImportError:
        raise RuntimeError("--png needs matplotlib: pip install 'mcpopt[bench]'") from None
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    ax = axes[0][0]
    lists = sorted(g.lists, key=lambda r: r.tools)
    xs = [r.tools for r in lists]
    ax.plot(xs, [r.first_ms for r in lists], "o--", label="first (built)")
    ax.plot(xs, [r.p50_ms for r in lists], "o-", label="p50 (prepared)")
    ax.plot(xs, [r.p99_ms for r in lists], "o-", label="p99 (prepared)")
    ax.plot(xs, [r.gateway_cpu_us / 1000 for r in lists], "s-", label="gateway CPU / list")
    for r in lists:
        label = f"{r.servers} srv" + (" cat." if r.kind == "catalog" else "")
        ax.annotate(label, (r.tools, r.p50_ms), textcoords="offset points", xytext=(0, 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(title="tools/list (wall from a lean client; CPU in the gateway)", xlabel="tools listed", ylabel="ms")
    ax.legend(fontsize=8)
    by_servers: dict[int, list[CallFigures]] = {}
    for c in g.calls:
        by_servers.setdefault(c.servers, []).append(c)
    park = f"parked after {g.park_ms} ms idle" if g.park_ms else "parking off"
    latency, cpu, rss, memory = axes[0][1], axes[0][2], axes[1][0], axes[1][1]
    key = axes[1][2]
    key.axis("off")

    def kib(value: float | None) -> float:
        return float("nan") if value is None else value

    colours: list[Line2D] = []
    for n, rows in by_servers.items():
        cs = [r.clients for r in rows]
        (line,) = latency.plot(cs, [r.p50_ms for r in rows], "o-", label=_servers_label(n))
        colour = line.get_color()
        colours.append(Line2D([], [], color=colour, marker="o", label=_servers_label(n)))
        latency.plot(cs, [r.p99_ms for r in rows], "o--", color=colour)
        cpu.plot(cs, [r.gateway_cpu_us for r in rows], "o-", color=colour, label=_servers_label(n))
        rss.plot(cs, [r.rss_mib for r in rows], "o-", color=colour, label=_servers_label(n))
        memory.plot(cs, [r.idle_session_kib for r in rows], "o-", color=colour)
        memory.plot(cs, [kib(r.parked_session_kib) for r in rows], "s--", color=colour)
        memory.plot(cs, [kib(r.parked_waves_kib) for r in rows], "^:", color=colour)
    grey = "0.35"
    styles = [
        Line2D([], [], color=grey, marker="o", linestyle="-", label="p50"),
        Line2D([], [], color=grey, marker="o", linestyle="--", label="p99"),
    ]
    latency.legend(handles=colours + styles, fontsize=8, ncol=2, handlelength=3)
    latency.set_yscale("log")
    # Plain numbers (1, 2, 5, 10, 20, 50 ms), not 2 x 10^0 on every minor tick.
    latency.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    latency.yaxis.set_major_formatter(ScalarFormatter())
    latency.yaxis.set_minor_formatter(NullFormatter())
    latency.set(title="tools/call latency", ylabel="ms")
    cpu.set(title="gateway CPU per call", ylabel="us of CPU per call")
    cpu.legend(fontsize=8)
    rss.set(title="gateway RSS (idle sessions open before calls)", ylabel="MiB")
    rss.legend(fontsize=8)
    memory.set(title=f"RSS per idle session ({park})", ylabel="KiB per session")
    marks = [
        Line2D([], [], color=grey, marker="o", linestyle="-", label="open (opened at once)"),
        Line2D([], [], color=grey, marker="s", linestyle="--", label="parked: RSS kept (same sessions)"),
        Line2D([], [], color=grey, marker="^", linestyle=":", label=f"parked: arriving {WAVE} at a time"),
    ]
    # With parking off there are no parked figures (their lines are empty), so no key for them.
    shown = marks if g.park_ms else marks[:1]
    key.legend(
        handles=colours + shown, title="RSS per idle session (left)", loc="center left", fontsize=9, handlelength=3
    )
    for ax in (latency, cpu, rss, memory):
        ax.set_xscale("log")
        ax.set_xlabel("clients")
    fig.suptitle(
        f"mcpopt bench growth ({g.rate:.0f} calls/s offered; load {g.load[0]:.1f} on {os.cpu_count()} cores)",
        fontsize=11,
    )
    fig.tight_layout()
    return fig


def plot(g: Growth, path: Path) -> None:
    """Write `figure(g)` to `path` as a PNG (matplotlib, Agg backend: `pip install mcpopt[bench]`).

    Raises:
        RuntimeError: matplotlib is not installed.
    """
    fig = figure(g)  # first: it raises the clear error when matplotlib is missing
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
