"""`mcpopt bench scale`: the same workload direct to one replica and through HAProxy to 1, 2, 3.

Real parts only: `redis-server`, three `mcpopt serve -t http` processes (the shared session store
on, `mcp-server-time` upstream), and three HAProxy processes from `examples/scale-out/haproxy.cfg`
(round robin over r1; r1+r2; r1+r2+r3 -- the unused slots point at a closed port, so their health
checks keep them out). Paths are run in alternating rounds after a warm-up, so machine noise falls
on all of them alike. Each path has its own handshake-era session (the gateway's `tools/call` fast
path), opened on one replica and resumed by the others from Redis on first use.

Per path: calls/s (with `concurrency` clients in flight), p50/p99 latency, CPU per call of the
replicas (psutil: the `mcpopt` processes and their upstream children) and of HAProxy, and the
balancer's own added latency (p50 through HAProxy to r1 only minus p50 to r1 directly).

Also the cost per request of the two ways to make a session replica-independent: a Redis round
trip (GET of a session record, what a replica pays the first time it sees a session; SET, what a
state change costs) on this Redis, and AES-GCM decrypt + encrypt of the same record (what an
encrypted session id would cost on *every* request).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import psutil

from mcpopt.bench.overhead import ROOT, SERVERS_PY, percentile

HAPROXY_CFG = ROOT / "examples" / "scale-out" / "haproxy.cfg"
MCPOPT = str(Path(sys.executable).with_name("mcpopt"))
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


@dataclass
class ScaleRow:
    path: str
    replicas: int
    calls: int
    errors: int
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    replica_cpu_ms_per_call: float
    lb_cpu_ms_per_call: float


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _cpu_s(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of `procs` and their live descendants."""
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for p in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
    return total


@contextlib.contextmanager
def _cluster(base: Path) -> Iterator[dict[str, Any]]:
    """Redis, replicas r1..r3, HAProxy lb1..lb3; yields their URLs and processes."""
    redis_exe, haproxy_exe = shutil.which("redis-server"), shutil.which("haproxy")
    if redis_exe is None or haproxy_exe is None:
        raise RuntimeError("bench scale needs redis-server and haproxy (scripts/setup installs both)")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis_port = _port()
        procs.append(
            subprocess.Popen(
                [redis_exe, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                cwd=base,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        _wait(redis_port)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        config = base / "replicas.json"
        config.write_text(
            json.dumps(
                {
                    "mcpServers": {"time": {"command": str(SERVERS_PY / "mcp-server-time"), "isolation": "shared"}},
                    "gateway": {
                        "shared": {"redis_url": redis_url},
                        "telemetry": {"data_dir": str(base / "telemetry")},
                        "http": {"allowed_hosts": ["*"]},
                    },
                }
            )
        )
        ports = {f"r{i}": _port() for i in (1, 2, 3)}
        replicas: dict[str, subprocess.Popen[bytes]] = {}
        for name, port in ports.items():
            env = {**os.environ, "MCPOPT_GATEWAY__SHARED__REPLICA": name}
            env["MCPOPT_GATEWAY__TELEMETRY__DATA_DIR"] = str(base / f"telemetry-{name}")
            replicas[name] = subprocess.Popen(
                [MCPOPT, "serve", "-c", str(config), "-t", "http", "--port", str(port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=(base / f"{name}.log").open("wb"),
            )
            procs.append(replicas[name])
        dead = f"127.0.0.1:{_port()}"  # nothing listens there: that slot's health check keeps it out
        lbs: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}
        for n in (1, 2, 3):
            lb_port = _port()
            env = {**os.environ, "MCPOPT_LB_BIND": f"127.0.0.1:{lb_port}", "MCPOPT_HEALTH_KEY": ""}
            for i in (1, 2, 3):
                env[f"MCPOPT_R{i}"] = f"127.0.0.1:{ports[f'r{i}']}" if i <= n else dead
            lb = subprocess.Popen(
                [haproxy_exe, "-f", str(HAPROXY_CFG), "-db"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(lb)
            lbs[n] = (f"http://127.0.0.1:{lb_port}/mcp", lb)
        for port in ports.values():
            _wait(port)
        yield {"redis_url": redis_url, "ports": ports, "replicas": replicas, "lbs": lbs}
    finally:
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        child.kill()
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


async def _session(http: Any, url: str) -> dict[str, str]:
    body = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "0"},
        },
    }
    r = await http.post(url, json=body, headers=HEADERS)
    r.raise_for_status()
    headers = {**HEADERS, "mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
    await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
    return headers


async def _ready(http: Any, url: str, replicas: int, timeout: float = 60.0) -> None:
    """Every replica behind `url` answers (HAProxy's health checks passed)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    health = url.removesuffix("/mcp") + "/healthz"
    while len(seen) < replicas:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}: only {sorted(seen)} answered")
        with contextlib.suppress(Exception):
            r = await http.get(health)
            if r.status_code == 200:
                seen.add(r.headers.get("x-mcpopt-replica", "?"))
        await anyio.sleep(0.05)


async def _round(
    http: Any, url: str, headers: dict[str, str], calls: int, concurrency: int
) -> tuple[list[float], int, float]:
    """`calls` tools/call with `concurrency` in flight: latencies (ms), errors, wall seconds."""
    samples: list[float] = []
    errors = 0
    left = [calls]
    params = {"name": "time__get_current_time", "arguments": {"timezone": "UTC"}}
    ids = itertools.count(1)  # ids must be unique among a session's requests in flight

    async def worker() -> None:
        nonlocal errors
        while left[0] > 0:
            left[0] -= 1
            t0 = time.perf_counter()
            try:
                body = {"jsonrpc": "2.0", "id": next(ids), "method": "tools/call", "params": params}
                r = await http.post(url, json=body, headers=headers)
                ok = r.status_code == 200 and '"result"' in r.text
            except Exception:  # noqa: BLE001 - counted
                ok = False
            samples.append((time.perf_counter() - t0) * 1000)
            errors += not ok

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return samples, errors, time.perf_counter() - start


async def _store_costs(redis_url: str, record: bytes, n: int = 2000) -> dict[str, float]:
    """µs per operation (p50): Redis GET / SET of a session record; AES-GCM decrypt+encrypt of it."""
    import redis.asyncio as aioredis
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    client = aioredis.from_url(redis_url)
    try:
        await client.set("mcpopt:bench:session", record, px=60_000)
        gets, sets = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            await client.get("mcpopt:bench:session")
            gets.append((time.perf_counter() - t0) * 1e6)
            t0 = time.perf_counter()
            await client.set("mcpopt:bench:session", record, px=60_000)
            sets.append((time.perf_counter() - t0) * 1e6)
    finally:
        await client.aclose()
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    nonce = os.urandom(12)
    token = aead.encrypt(nonce, record, None)
    crypt = []
    for _ in range(n):
        t0 = time.perf_counter()
        aead.decrypt(nonce, token, None)
        aead.encrypt(os.urandom(12), record, None)
        crypt.append((time.perf_counter() - t0) * 1e6)
    return {
        "redis_get_us_p50": percentile(sorted(gets), 50),
        "redis_set_us_p50": percentile(sorted(sets), 50),
        "aes_gcm_decrypt_encrypt_us_p50": percentile(sorted(crypt), 50),
        "record_bytes": float(len(record)),
    }


async def bench_scale(rounds: int = 5, calls: int = 200, concurrency: int = 8, warmup: int = 50) -> dict[str, Any]:
    """Run the comparison; see the module docstring. Returns `{"rows": [...], "added_latency_ms", ...}`."""
    import httpx2

    with tempfile.TemporaryDirectory() as d, _cluster(Path(d)) as c:
        limits = httpx2.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
        async with httpx2.AsyncClient(timeout=60, limits=limits) as http:
            r1 = f"http://127.0.0.1:{c['ports']['r1']}/mcp"
            await _ready(http, r1, 1)
            paths: dict[str, tuple[str, int, list[psutil.Process], psutil.Process | None]] = {
                "direct r1": (r1, 1, [psutil.Process(c["replicas"]["r1"].pid)], None)
            }
            for n, (url, lb) in c["lbs"].items():
                await _ready(http, url, n)
                members = [psutil.Process(c["replicas"][f"r{i}"].pid) for i in range(1, n + 1)]
                paths[f"haproxy -> {n}"] = (url, n, members, psutil.Process(lb.pid))
            sessions = {name: await _session(http, url) for name, (url, *_rest) in paths.items()}
            for name, (url, *_rest) in paths.items():  # warm-up: every replica resumes its session
                await _round(http, url, sessions[name], warmup, concurrency)
            acc: dict[str, dict[str, Any]] = {n: {"s": [], "e": 0, "t": 0.0, "cpu": 0.0, "lb": 0.0} for n in paths}
            order = list(paths)
            for r in range(rounds):
                for name in order[r % len(order) :] + order[: r % len(order)]:
                    url, _n, members, lb_proc = paths[name]
                    cpu0, lb0 = _cpu_s(members), _cpu_s([lb_proc]) if lb_proc else 0.0
                    samples, errors, wall = await _round(http, url, sessions[name], calls, concurrency)
                    a = acc[name]
                    a["s"] += samples
                    a["e"] += errors
                    a["t"] += wall
                    a["cpu"] += _cpu_s(members) - cpu0
                    a["lb"] += (_cpu_s([lb_proc]) - lb0) if lb_proc else 0.0
            record = json.dumps(
                {
                    "protocol_version": "2025-06-18",
                    "client": {
                        "protocolVersion": "2025-06-18",
                        "capabilities": {},
                        "clientInfo": {"name": "bench", "version": "0"},
                    },
                    "owner": {"client_id": "k-0123456789abcdef", "issuer": None, "subject": None},
                    "log_level": None,
                    "subscriptions": [],
                    "sub_owner": "",
                }
            ).encode()
            costs = await _store_costs(c["redis_url"], record)
    rows = []
    for name, (_url, n, _m, _lb) in paths.items():
        a = acc[name]
        s = sorted(a["s"])
        rows.append(
            ScaleRow(
                name,
                n,
                len(s),
                a["e"],
                len(s) / a["t"] if a["t"] else 0.0,
                percentile(s, 50),
                percentile(s, 99),
                a["cpu"] * 1000 / max(1, len(s)),
                a["lb"] * 1000 / max(1, len(s)),
            )
        )
    by = {r.path: r for r in rows}
    return {
        "rows": [asdict(r) for r in rows],
        "added_latency_ms_p50": by["haproxy -> 1"].p50_ms - by["direct r1"].p50_ms,
        "session_store": costs,
        "rounds": rounds,
        "calls_per_round": calls,
        "concurrency": concurrency,
        "cores": psutil.cpu_count(),
        "load_1m": os.getloadavg()[0],
    }


def print_scale(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
        return
    print(
        f"bench scale: {data['rounds']} alternating rounds x {data['calls_per_round']} calls per path, "
        f"{data['concurrency']} in flight, {data['cores']} cores, load {data['load_1m']:.1f}"
    )
    print(
        f"{'path':<14} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'replica CPU ms/call':>20} "
        f"{'LB CPU ms/call':>15} {'errors':>6}"
    )
    for r in data["rows"]:
        print(
            f"{r['path']:<14} {r['calls_per_s']:>8.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
            f"{r['replica_cpu_ms_per_call']:>20.3f} {r['lb_cpu_ms_per_call']:>15.3f} {r['errors']:>6}"
        )
    print(f"HAProxy's own added latency (p50, -> 1 replica vs direct): {data['added_latency_ms_p50']:.2f} ms")
    s = data["session_store"]
    print(
        f"session store, per operation (p50): Redis GET {s['redis_get_us_p50']:.0f} µs, "
        f"SET {s['redis_set_us_p50']:.0f} µs; AES-GCM decrypt+encrypt of the {s['record_bytes']:.0f}-byte "
        f"record {s['aes_gcm_decrypt_encrypt_us_p50']:.1f} µs"
    )
