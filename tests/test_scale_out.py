"""Scale-out (issue 12): real Redis, three real `mcpopt serve -t http` replicas, real HAProxy in front
(round robin, no affinity: examples/scale-out/haproxy.cfg and replicas.yaml, as shipped).

- A handshake-era SDK client and a 2026-07-28 client each make 300 calls through the balancer; the
  calls land on every replica, the handshake-era client initializes once and keeps its session id.
- One replica is SIGKILLed while a call is known to be running on it: both clients go on; the calls
  that were in flight there fail with a clear error; the ledger upstream (one process per replica,
  one shared file) shows no call ran twice and every acknowledged call ran once.
- A write through replica 1 invalidates a cached read on replica 2 (L2 cache in Redis).
- A per-principal rate limit holds across the three replicas within +1 (counters in Redis).
- server-memory writes through the balancer while a replica is killed: every acknowledged write is
  in the server's file exactly once.
- SIGTERM drains: `/healthz` 503, a call in flight finishes, then the process exits 0.
- A session opened on r1 is served by r2 and r3 with its state; one DELETE ends it everywhere.
- An optimizer rule (cache TTL for a read-only tool) applied on r2's rule file serves that tool from
  cache on all three; `mcpopt rules rollback` on r1 only turns it off on all three (every call
  through the balancer reaches the upstream again, counted by the upstream itself).
- Redis down: sessions stay on their replica (one warning), no call fails.

Verdicts never depend on timing: waits are on conditions (files, health, process exit), generous.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from conftest import MCPOPT, NODE_MODULES, PY_SERVERS, ROOT, free_port, text_of
from mcpopt.auth.tokens import hash_key, new_key
from mcpopt.errors import RATE_LIMITED

pytestmark = pytest.mark.anyio

EXAMPLE = ROOT / "examples" / "scale-out"
REPLICAS = ("r1", "r2", "r3")
CALLS = 300
WORKERS = 3
LIMIT = 12
MODERN = "2026-07-28"


def _need(exe: str) -> str:
    path = shutil.which(exe)
    if path is None:
        pytest.skip(f"{exe} is not installed (scripts/setup installs it)")
    return path


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited early with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not listen on {port} within {timeout} s")


@dataclass
class Cluster:
    base: Path
    config: Path
    env: dict[str, str]
    client_key: str
    limited_key: str
    health_key: str
    lb_port: int
    ports: dict[str, int]
    env_redis: str
    redis: subprocess.Popen[bytes]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}/mcp"

    def direct(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}/mcp"

    @property
    def ledger(self) -> Path:
        return self.base / "ledger.txt"

    @property
    def memory_file(self) -> Path:
        return self.base / "memory.jsonl"

    def env_of(self, name: str) -> dict[str, str]:
        """Replica `name`'s environment: its id and its own data dir (telemetry, rules.json)."""
        env = {**self.env, "MCPOPT_GATEWAY__SHARED__REPLICA": name}
        env["MCPOPT_GATEWAY__TELEMETRY__DATA_DIR"] = str(self.base / f"telemetry-{name}")
        return env

    def rules_path(self, name: str) -> Path:
        """Replica `name`'s own rule file (the default `<data dir>/rules.json`)."""
        return self.base / f"telemetry-{name}" / "rules.json"

    def start(self, name: str) -> None:
        log = (self.base / f"{name}.log").open("ab")
        self.logs.append(log)
        env = self.env_of(name)
        self.procs[name] = subprocess.Popen(
            [MCPOPT, "serve", "-c", str(self.config), "-t", "http", "--port", str(self.ports[name])],
            env=env,
            cwd=str(ROOT),
            stdout=log,
            stderr=log,
            start_new_session=True,
        )

    def wait_ready(self, name: str) -> None:
        """The replica answers /healthz 200 (its upstreams are up)."""
        _wait_port(self.ports[name], self.procs[name], name)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx2.HTTPError):
                r = httpx2.get(f"http://127.0.0.1:{self.ports[name]}/healthz", headers=self.auth(self.health_key))
                if r.status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"{name} never became healthy: {self.log_tail(name)}")

    def wait_balanced(self, names: tuple[str, ...]) -> None:
        """HAProxy sends requests to each of `names` (its health checks passed)."""
        deadline = time.monotonic() + 60
        seen: set[str] = set()
        while time.monotonic() < deadline and not set(names) <= seen:
            with contextlib.suppress(httpx2.HTTPError):
                r = httpx2.get(f"http://127.0.0.1:{self.lb_port}/healthz", headers=self.auth(self.health_key))
                if r.status_code == 200:
                    seen.add(r.headers["x-mcpopt-replica"])
            time.sleep(0.05)
        assert set(names) <= seen, f"the balancer reached only {seen}"

    def kill(self, name: str) -> None:
        """SIGKILL the replica (its upstream children see their pipes close and exit)."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def restart(self, name: str) -> None:
        self.start(name)
        self.wait_ready(name)
        self.wait_balanced(REPLICAS)

    def log_tail(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text(errors="replace")[-3000:]

    @staticmethod
    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}


def _config(base: Path, redis_url: str, lb_port: int, keys: Path) -> Path:
    """examples/scale-out/replicas.yaml with this machine's servers, Redis and the test's keys."""
    data = yaml.safe_load((EXAMPLE / "replicas.yaml").read_text())
    servers = data["mcpServers"]
    servers["time"]["command"] = str(PY_SERVERS / "mcp-server-time")
    servers["memory"]["args"] = [str(NODE_MODULES / "server-memory" / "dist" / "index.js")]
    servers["memory"]["env"] = {"MEMORY_FILE_PATH": str(base / "memory.jsonl")}
    servers["ledger"] = {
        "command": str(ROOT / ".venv" / "bin" / "python"),
        "args": ["-m", "mcpopt.bench.ledger_server"],
        "env": {"LEDGER_FILE": str(base / "ledger.txt"), "LEDGER_TAG": "${MCPOPT_GATEWAY__SHARED__REPLICA}"},
        "isolation": "shared",
    }
    # A read-only tool with no cache TTL in config (so not cached) that counts its upstream calls in
    # one file shared by the three replicas' processes: `flaky(key, fails=0)` answers {"calls": n}.
    servers["reads"] = {
        "command": str(ROOT / ".venv" / "bin" / "python"),
        "args": [str(ROOT / "tests" / "fixtures" / "ledger_server.py")],
        "env": {"LEDGER_FILE": str(base / "reads")},
        "isolation": "shared",
    }
    gw = data["gateway"]
    gw["shared"]["redis_url"] = gw["cache"]["redis_url"] = gw["limits"]["storage"] = redis_url
    gw["auth"]["resource"] = f"http://127.0.0.1:{lb_port}/mcp"
    gw["auth"]["api_keys"] = {"file": str(keys), "env": None}
    gw["policy"] = {
        "rules": [{"name": "metered", "match": {"api_keys": ["limited"]}, "rate_limits": [f"{LIMIT}/minute"]}]
    }
    gw["http"]["drain_timeout_ms"] = 60_000
    path = base / "replicas.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    redis_exe, haproxy_exe = _need("redis-server"), _need("haproxy")
    base = tmp_path_factory.mktemp("scale-out")
    redis_port, lb_port = free_port(), free_port()
    redis = subprocess.Popen(
        [redis_exe, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=str(base),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    keys = {name: new_key() for name in ("client", "limited", "health")}
    key_file = base / "api-keys.txt"
    key_file.write_text("".join(f"{n} {hash_key(k)}\n" for n, k in keys.items()), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCPOPT_GATEWAY__")}
    cluster = Cluster(
        base=base,
        config=_config(base, f"redis://127.0.0.1:{redis_port}/0", lb_port, key_file),
        env=env,
        client_key=keys["client"],
        limited_key=keys["limited"],
        health_key=keys["health"],
        lb_port=lb_port,
        ports={name: free_port() for name in REPLICAS},
        env_redis=f"redis://127.0.0.1:{redis_port}/0",
        redis=redis,
    )
    lb_env = {**env, "MCPOPT_LB_BIND": f"127.0.0.1:{lb_port}", "MCPOPT_HEALTH_KEY": keys["health"]}
    lb_env.update({f"MCPOPT_R{i}": f"127.0.0.1:{cluster.ports[n]}" for i, n in enumerate(REPLICAS, 1)})
    lb_log = (base / "haproxy.log").open("ab")
    lb = subprocess.Popen(
        [haproxy_exe, "-f", str(EXAMPLE / "haproxy.cfg"), "-db"], env=lb_env, stdout=lb_log, stderr=lb_log
    )
    try:
        _wait_port(redis_port, redis, "redis")
        for name in REPLICAS:
            cluster.start(name)
        for name in REPLICAS:
            cluster.wait_ready(name)
        _wait_port(lb_port, lb, "haproxy")
        cluster.wait_balanced(REPLICAS)
        yield cluster
    finally:
        for proc in cluster.procs.values():  # each replica leads its own process group (its upstreams)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in [*cluster.procs.values(), lb, redis]:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for log in [*cluster.logs, lb_log]:
            log.close()


class Watch:
    """httpx event hooks: which replica answered, which session id and methods were sent."""

    def __init__(self) -> None:
        self.replicas: Counter[str] = Counter()
        self.session_ids: set[str] = set()
        self.methods: Counter[str] = Counter()

    async def request(self, request: httpx2.Request) -> None:
        sid = request.headers.get("mcp-session-id")
        if sid:
            self.session_ids.add(sid)
        if request.method == "POST":
            with contextlib.suppress(Exception):
                body = json.loads(request.content)
                if isinstance(body, dict) and "method" in body:
                    self.methods[body["method"]] += 1

    async def response(self, response: httpx2.Response) -> None:
        replica = response.headers.get("x-mcpopt-replica")
        if replica:
            self.replicas[replica] += 1


def _client(url: str, key: str, mode: str, watch: Watch) -> Client:
    http = httpx2.AsyncClient(
        headers=Cluster.auth(key),
        timeout=httpx2.Timeout(60.0),
        event_hooks={"request": [watch.request], "response": [watch.response]},
    )
    return Client(streamable_http_client(url, http_client=http), mode=mode)  # type: ignore[arg-type]


def _where(cluster: Cluster) -> dict[str, list[str]]:
    """Ledger id -> the replicas whose ledger process ran it."""
    out: dict[str, list[str]] = {}
    path = Path(str(cluster.ledger) + ".where")
    if path.exists():
        for line in path.read_text().splitlines():
            rid, tag = line.split()
            out.setdefault(rid, []).append(tag)
    return out


# ---- sessions, spread, a replica killed mid-run ------------------------------------------------
async def test_both_eras_spread_over_replicas_and_survive_a_killed_one(cluster: Cluster) -> None:
    victim = "r3"
    outcomes: dict[str, dict[str, str | None]] = {"legacy": {}, "modern": {}}
    watches = {"legacy": Watch(), "modern": Watch()}
    progress = {"legacy": 0, "modern": 0}
    killed = anyio.Event()
    slow_ids: list[str] = []
    slow_errors: dict[str, str] = {}
    release = cluster.base / "release-slow"

    async def worker(era: str, client: Client, ids: list[str]) -> None:
        for rid in ids:
            try:
                result = await client.call_tool("ledger__record", {"id": rid})
                outcomes[era][rid] = None if not result.is_error else f"tool error: {text_of(result)}"
            except MCPError as exc:
                outcomes[era][rid] = str(exc)
            progress[era] += 1

    async def slow_call(client: Client, rid: str) -> None:
        try:
            await client.call_tool("ledger__record", {"id": rid, "hold_ms": 120_000, "release": str(release)})
        except MCPError as exc:
            slow_errors[rid] = str(exc)

    async def killer(client: Client, tg: Any) -> None:
        # Once both clients are well under way, start slow calls until one is known to be running
        # on the victim (its ledger process recorded it), then SIGKILL the victim.
        while min(progress.values()) < CALLS // 3:
            await anyio.sleep(0.05)
        for n in itertools.count():
            rid = f"slow-{n}"
            slow_ids.append(rid)
            tg.start_soon(slow_call, client, rid)
            with anyio.fail_after(30):
                while rid not in _where(cluster):
                    await anyio.sleep(0.02)
            if _where(cluster)[rid] == [victim]:
                break
        cluster.kill(victim)  # the slow call recorded there is still held: in flight for sure
        killed.set()
        release.touch()  # the slow calls on the other replicas answer now

    async with (
        _client(cluster.url, cluster.client_key, "legacy", watches["legacy"]) as legacy,
        _client(cluster.url, cluster.client_key, MODERN, watches["modern"]) as modern,
    ):
        with anyio.fail_after(240):
            async with anyio.create_task_group() as tg:
                for era, client in (("legacy", legacy), ("modern", modern)):
                    ids = [f"{era}-{i}" for i in range(CALLS)]
                    for w in range(WORKERS):
                        tg.start_soon(worker, era, client, ids[w::WORKERS])
                tg.start_soon(killer, legacy, tg)
        assert killed.is_set()
        # Both sessions go on after the kill: one more call each, through the two replicas left.
        after = {}
        for client, rid in ((legacy, "after-legacy"), (modern, "after-modern")):
            after[rid] = await client.call_tool("ledger__record", {"id": rid})
    assert not any(r.is_error for r in after.values()), after

    ledger = Counter(cluster.ledger.read_text().split())
    where = _where(cluster)
    assert not [rid for rid, n in ledger.items() if n > 1], "a call was executed twice"
    for era in ("legacy", "modern"):
        results = outcomes[era]
        assert len(results) == CALLS
        failed = {rid: err for rid, err in results.items() if err is not None}
        for rid, err in results.items():
            if err is None:
                assert ledger[rid] == 1, f"{rid} was acknowledged but not executed once"
        for rid, err in failed.items():
            # Only calls in flight on the killed replica fail: run there, or never run at all.
            assert where.get(rid, [victim]) == [victim], (rid, err, where.get(rid))
            assert "Traceback" not in err and err.strip()
        assert len(failed) <= WORKERS + len(slow_ids), failed
        watch = watches[era]
        assert set(watch.replicas) == set(REPLICAS), watch.replicas  # spread over all three
        assert watch.methods.get("initialize", 0) == (1 if era == "legacy" else 0), watch.methods
    assert len(watches["legacy"].session_ids) == 1  # one session from start to end, no re-initialize
    assert not watches["modern"].session_ids  # 2026-07-28: no session at all
    # The slow call that was running on the victim when it died failed with a clear error, ran once.
    on_victim = slow_ids[-1]
    assert on_victim in slow_errors, "a call in flight on the killed replica did not fail"
    assert ledger[on_victim] == 1
    assert "502" in slow_errors[on_victim] or "Bad Gateway" in slow_errors[on_victim] or slow_errors[on_victim]
    for rid in slow_ids[:-1]:  # the slow calls that ran on the other replicas succeeded, once each
        assert rid not in slow_errors and ledger[rid] == 1
    cluster.restart(victim)


# ---- cache across replicas -------------------------------------------------------------------
async def test_a_write_through_one_replica_invalidates_a_cached_read_on_another(cluster: Cluster) -> None:
    watch = Watch()
    async with (
        _client(cluster.direct("r1"), cluster.client_key, MODERN, watch) as r1,
        _client(cluster.direct("r2"), cluster.client_key, MODERN, watch) as r2,
    ):
        await r1.call_tool("memory__create_entities", {"entities": [_entity("cache-seed")]})
        first = text_of(await r2.call_tool("memory__read_graph", {}))
        assert "cache-seed" in first
        # Behind the gateway's back (not a call through it): a cached read does not see this ...
        lines = cluster.memory_file.read_text().splitlines()
        sneaked = json.dumps({"type": "entity", "name": "sneaked-in", "entityType": "t", "observations": []})
        cluster.memory_file.write_text("\n".join([*lines, sneaked]), encoding="utf-8")
        assert "sneaked-in" not in text_of(await r2.call_tool("memory__read_graph", {}))  # served from cache
        # ... but a write through replica 1 drops r2's cached read at once.
        await r1.call_tool("memory__create_entities", {"entities": [_entity("cache-write")]})
        after = text_of(await r2.call_tool("memory__read_graph", {}))
        assert "cache-write" in after and "sneaked-in" in after
    assert set(watch.replicas) == {"r1", "r2"}


def _entity(name: str) -> dict[str, Any]:
    return {"name": name, "entityType": "test", "observations": [f"made by {name}"]}


# ---- rate limits across replicas -------------------------------------------------------------
async def test_a_per_principal_rate_limit_holds_across_the_replicas(cluster: Cluster) -> None:
    watch = Watch()
    allowed = refused = 0
    async with _client(cluster.url, cluster.limited_key, MODERN, watch) as client:
        for _ in range(3 * LIMIT):
            try:
                result = await client.call_tool("time__get_current_time", {"timezone": "UTC"})
                assert not result.is_error
                allowed += 1
            except MCPError as exc:
                assert exc.error.code == RATE_LIMITED, exc
                refused += 1
    assert LIMIT <= allowed <= LIMIT + 1, (allowed, refused)  # one limit for all three replicas
    assert allowed + refused == 3 * LIMIT
    assert set(watch.replicas) == set(REPLICAS)


# ---- server-memory writes while a replica is killed --------------------------------------------
async def test_memory_writes_through_the_balancer_while_a_replica_is_killed(cluster: Cluster) -> None:
    victim = "r2"
    acked: list[str] = []
    failed: dict[str, str] = {}
    watch = Watch()
    async with _client(cluster.url, cluster.client_key, "legacy", watch) as client:
        # Sequential writes: server-memory rewrites its whole file per call, so concurrent writers
        # (three replicas' server-memory processes) would lose each other's writes by themselves.
        for i in range(60):
            if i == 20:
                cluster.kill(victim)
            name = f"w-{i}"
            try:
                result = await client.call_tool("memory__create_entities", {"entities": [_entity(name)]})
                assert not result.is_error, text_of(result)
                acked.append(name)
            except MCPError as exc:
                failed[name] = str(exc)
    names = Counter(
        json.loads(line).get("name") for line in cluster.memory_file.read_text().splitlines() if line.strip()
    )
    for name in acked:
        assert names[name] == 1, (name, names[name])
    for name in failed:
        assert names[name] <= 1
    assert len(acked) >= 55, failed  # the kill costs at most the write in flight (and HAProxy retries the rest)
    assert watch.methods["initialize"] == 1
    cluster.restart(victim)


# ---- graceful drain --------------------------------------------------------------------------
async def test_sigterm_drains_a_replica(cluster: Cluster) -> None:
    name = "r1"
    proc = cluster.procs[name]
    url = f"http://127.0.0.1:{cluster.ports[name]}"
    done: dict[str, Any] = {}
    watch = Watch()
    release = cluster.base / "release-drain"  # the call in flight ends when the test creates it

    async def long_call(client: Client) -> None:
        args = {"id": "drain-inflight", "hold_ms": 120_000, "release": str(release)}
        done["result"] = await client.call_tool("ledger__record", args)

    async with _client(cluster.direct(name), cluster.client_key, MODERN, watch) as client:
        await client.list_tools()  # the SDK validates results against it: no new request after the call
        async with anyio.create_task_group() as tg:
            tg.start_soon(long_call, client)
            with anyio.fail_after(30):
                while "drain-inflight" not in _where(cluster):
                    await anyio.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            async with httpx2.AsyncClient() as http:
                with anyio.fail_after(30):
                    while True:
                        with contextlib.suppress(httpx2.HTTPError):
                            r = await http.get(f"{url}/healthz")
                            if r.status_code == 503:
                                assert r.json() == {"ok": False, "draining": True}
                                break
                        await anyio.sleep(0.02)
                refused = await http.post(f"{url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                assert "shutting down" in refused.json()["error"]["message"]
                assert proc.poll() is None  # still draining: the call is in flight
            release.touch()
    assert not done["result"].is_error  # the call in flight finished
    with anyio.fail_after(60):
        while proc.poll() is None:
            await anyio.sleep(0.05)
    assert proc.returncode == 0, cluster.log_tail(name)
    cluster.restart(name)


# ---- what a resumed session keeps --------------------------------------------------------------
def _rpc(response: httpx2.Response) -> dict[str, Any]:
    """The JSON-RPC message of an answer (JSON body, or the SSE stream's message event)."""
    if response.headers.get("content-type", "").startswith("application/json"):
        return dict(response.json())
    for line in response.text.splitlines():
        if line.startswith("data:") and line[5:].strip():
            return dict(json.loads(line[5:]))
    raise AssertionError(f"no JSON-RPC message in {response.status_code} {response.text[:200]!r}")


async def test_a_session_resumes_on_another_replica_with_its_state(cluster: Cluster) -> None:
    import redis.asyncio as aioredis

    accept = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {"roots": {"listChanged": True}},
            "clientInfo": {"name": "resume-test", "version": "1.2"},
        },
    }
    async with httpx2.AsyncClient(timeout=30) as http:
        own = {**accept, **cluster.auth(cluster.client_key)}
        opened = await http.post(cluster.direct("r1"), json=init, headers=own)
        assert opened.status_code == 200 and opened.headers["x-mcpopt-replica"] == "r1"
        sid = opened.headers["mcp-session-id"]
        own = {**own, "mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"}
        # The handshake's last step and the log level land on the two other replicas.
        note = await http.post(
            cluster.direct("r2"), json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=own
        )
        assert note.status_code == 202, note.text
        level = await http.post(
            cluster.direct("r3"),
            json={"jsonrpc": "2.0", "id": 2, "method": "logging/setLevel", "params": {"level": "error"}},
            headers=own,
        )
        assert "result" in _rpc(level)
        redis = aioredis.from_url(cluster.env_redis)
        try:
            record = json.loads(await redis.get(f"mcpopt:session:{sid}"))
            ttl_ms = await redis.pttl(f"mcpopt:session:{sid}")
        finally:
            await redis.aclose()
        assert record["protocol_version"] == "2025-06-18"
        assert record["client"]["clientInfo"] == {"name": "resume-test", "version": "1.2"}
        assert record["client"]["capabilities"]["roots"] == {"listChanged": True}
        assert record["owner"]["client_id"] and record["log_level"] == "error"  # bound to its principal
        assert 0 < ttl_ms <= 600_000  # gateway.http.session_idle_timeout_ms: the sliding TTL
        # Any replica serves the session: a list, a call -- no 404, no new initialize.
        for name in REPLICAS:
            listed = _rpc(
                await http.post(
                    cluster.direct(name), json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"}, headers=own
                )
            )
            assert "ledger__record" in [t["name"] for t in listed["result"]["tools"]], (name, listed)
        # Another principal presenting the session id gets what a stranger gets: 404.
        stolen = {**own, **cluster.auth(cluster.limited_key)}
        refused = await http.post(
            cluster.direct("r2"), json={"jsonrpc": "2.0", "id": 4, "method": "tools/list"}, headers=stolen
        )
        assert refused.status_code == 404
        # DELETE on one replica ends the session on all of them.
        assert (await http.delete(cluster.direct("r2"), headers=own)).status_code == 200
        for name in REPLICAS:
            with anyio.fail_after(30):
                while True:
                    gone = await http.post(
                        cluster.direct(name), json={"jsonrpc": "2.0", "id": 5, "method": "tools/list"}, headers=own
                    )
                    if gone.status_code == 404:
                        break
                    await anyio.sleep(0.05)  # the deletion is announced over pub/sub


# ---- an optimizer rule rolled back on one replica ----------------------------------------------
class CallLog:
    """httpx response hook: the replica that answered each tools/call, in order."""

    def __init__(self) -> None:
        self.replicas: list[str] = []

    async def response(self, response: httpx2.Response) -> None:
        with contextlib.suppress(Exception):
            body = json.loads(response.request.content)
            if isinstance(body, dict) and body.get("method") == "tools/call":
                self.replicas.append(response.headers["x-mcpopt-replica"])


def _counting_client(url: str, key: str, log: CallLog) -> Client:
    http = httpx2.AsyncClient(
        headers=Cluster.auth(key), timeout=httpx2.Timeout(60.0), event_hooks={"response": [log.response]}
    )
    return Client(streamable_http_client(url, http_client=http), mode=MODERN)  # type: ignore[arg-type]


async def test_a_rule_rolled_back_on_one_replica_is_off_on_all(cluster: Cluster) -> None:
    from mcpopt.pipeline.rules import Action, Condition, Rule, RuleStore

    key = "rule-ttl"
    counter = cluster.base / "reads.flaky"  # one line per call that reached a `reads` upstream

    def upstream_calls() -> int:
        return counter.read_text().split().count(key) if counter.exists() else 0

    async def read(client: Client) -> int:
        result = await client.call_tool("reads__flaky", {"key": key, "fails": 0})
        assert not result.is_error, text_of(result)
        return int(json.loads(text_of(result))["calls"])  # the upstream's count when it answered

    async def until_each_replica(cached: bool, what: str) -> None:
        # Direct to each replica: with the rule in force there, a read of `key` is answered from
        # the cache (the same count twice); without it, each read reaches the upstream (count + 1).
        for name in REPLICAS:
            async with _counting_client(cluster.direct(name), cluster.client_key, CallLog()) as direct:
                with anyio.move_on_after(60):
                    while True:
                        first, second = await read(direct), await read(direct)
                        if (first == second) == cached:
                            break
                        await anyio.sleep(0.1)  # the change travels over Redis pub/sub
            assert (first == second) == cached, f"{what} on {name} within 60 s (reads: {first}, {second})"

    async def spread(client: Client, log: CallLog) -> list[int]:
        # Reads through the balancer until each replica has answered at least 3 of them.
        counts: list[int] = []
        with anyio.fail_after(120):
            while min(Counter(log.replicas).get(n, 0) for n in REPLICAS) < 3:
                counts.append(await read(client))
        assert set(log.replicas) == set(REPLICAS) and len(log.replicas) == len(counts)
        return counts

    # Without a rule the read-only tool has no TTL: every call reaches the upstream.
    async with _counting_client(cluster.url, cluster.client_key, CallLog()) as lb:
        assert [await read(lb) for _ in range(3)] == [1, 2, 3]

    # Applied on r2's own rule file (what the optimizer loop does there): on on all three.
    applied = RuleStore(cluster.rules_path("r2")).add(
        Rule(
            id="ttl:reads/flaky",
            condition=Condition(server="reads", tool="flaky"),
            action=Action(type="cache_ttl", ttl_ms=600_000),
        ),
        reason="applied on r2",
    )
    await until_each_replica(cached=True, what="the rule applied on r2 is not in force")
    before = upstream_calls()
    log = CallLog()
    async with _counting_client(cluster.url, cluster.client_key, log) as lb:
        counts = await spread(lb, log)
    assert len(set(counts)) == 1, counts  # every replica served the one cached answer
    assert upstream_calls() == before, "a read reached the upstream while the rule was in force"

    # Rolled back on r1 only, the way an operator does it there: `mcpopt rules rollback` against r1's
    # config and data dir (its own rules.json).
    with anyio.fail_after(120):
        done = await anyio.run_process(
            [MCPOPT, "rules", "rollback", applied.id, "-c", str(cluster.config)],
            env=cluster.env_of("r1"),
            cwd=str(ROOT),
            check=False,
        )
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0 and f"rolled back ({applied.id})" in out, out
    r1_file = RuleStore(cluster.rules_path("r1"))
    assert not r1_file.get(applied.id).enabled and r1_file.history[-1]["op"] == "rollback"

    await until_each_replica(cached=False, what="the rollback on r1 did not take effect")
    before = upstream_calls()
    log = CallLog()
    async with _counting_client(cluster.url, cluster.client_key, log) as lb:
        counts = await spread(lb, log)
    # Every read, whichever replica took it, ran on an upstream: counts go up by one per call.
    assert counts == list(range(before + 1, before + 1 + len(counts))), counts
    assert upstream_calls() == before + len(counts)
    for name in ("r2", "r3"):  # their own rule files follow (`mcpopt rules list` there tells the truth)
        other = RuleStore(cluster.rules_path(name))
        assert other.version == r1_file.version and not other.get(applied.id).enabled, name


# ---- Redis down (last: the cluster's Redis does not come back) ---------------------------------
@pytest.mark.filterwarnings("ignore:The logging capability is deprecated")
async def test_with_redis_down_sessions_stay_local_and_no_call_fails(cluster: Cluster) -> None:
    cluster.redis.kill()
    cluster.redis.wait(10)
    watch = Watch()
    async with _client(cluster.direct("r1"), cluster.client_key, "legacy", watch) as client:
        for i in range(10):
            result = await client.call_tool("time__get_current_time", {"timezone": "UTC"})
            assert not result.is_error, (i, text_of(result))
        await client.set_logging_level("warning")
    assert watch.methods["initialize"] == 1 and set(watch.replicas) == {"r1"}
    log = (cluster.base / "r1.log").read_text(errors="replace")
    # ONE warning for the outage (whichever shared part saw it first: bus, cache, limiter, sessions).
    assert log.count("shared state: Redis at") == 1, log[-2000:]
    assert "Traceback" not in log.split("shared state: Redis at")[-1]
