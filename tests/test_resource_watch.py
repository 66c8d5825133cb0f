"""The upstream resource watch, through a real gateway (`mcpopt serve -t http`) and a real MCP server
that leaks memory on demand (tests/fixtures/leak_server.py):

- its process's RSS, CPU, fds and children show in `/healthz`, `/metrics`, `/dashboard/data`,
  `get_performance_status` and `mcpopt status`; its growth raises the `rss_growth` alert;
- past `max_rss_mb` the gateway restarts it gracefully: a write in flight is cut off with an error
  naming the server and the reason and is not retried (it ran once), and the gateway keeps serving;
- an upstream's grandchildren (in its process group, and one that left it with setsid) die with a
  SIGKILLed gateway -- and, as the control shows, they would not without the watchdog.

Verdicts wait on conditions with generous timeouts; nothing depends on timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import psutil
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from conftest import MCPOPT, ROOT, alive, describe, poll, text_of, wait_dead, write_config
from conftest import http_gateway as conftest_http_gateway

LEAK = str(Path(__file__).resolve().parent / "fixtures" / "leak_server.py")
MIB = 1024 * 1024
LIMIT_MB = 400
"""The leak server starts near 50 MiB (Python + the mcp SDK); 400 leaves room for the growth step."""

pytestmark = pytest.mark.anyio


def leak_entry(**extra: Any) -> dict[str, Any]:
    return {"command": sys.executable, "args": [LEAK], **extra}


@contextlib.contextmanager
def http_gateway(config: Path, env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The gateway over HTTP, its log kept beside the config (for a failing test's report)."""
    with conftest_http_gateway(config, env=env, log=config.parent / "gateway.log") as running:
        yield running


async def healthz(port: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        resp = await http.get(f"http://127.0.0.1:{port}/healthz")
        return resp.json()


async def leak_row(port: int) -> dict[str, Any]:
    body = await healthz(port)
    return next(r for r in body["servers"] if r["server"] == "leak")


async def call(client: Client, name: str, args: dict[str, Any]) -> str:
    result = await client.call_tool(name, args)
    assert not result.is_error, text_of(result)
    return text_of(result)


async def test_leak_is_reported_alerted_and_restarted_at_the_limit(tmp_path: Path) -> None:
    log = tmp_path / "leak.log"
    config = write_config(
        tmp_path / "leak.yaml",
        {"leak": leak_entry(max_rss_mb=LIMIT_MB, env={"LEAK_LOG": str(log)})},
        {
            "watch": {
                "interval_s": 0.2,
                "growth_window_s": 600,
                "growth_warning_mb": 40,
                "growth_warning_pct": 30,
                "limit_samples": 2,
                "drain_s": 1,
            },
            "telemetry": {"alert_interval_ms": 200},
        },
    )
    with http_gateway(config) as (_proc, port):
        first = await poll(lambda: _sampled(port), timeout=30)
        assert first, "the watch never sampled the leak server"
        pid0, base = first["pid"], first["rss_bytes"]
        assert base < (LIMIT_MB - 200) * MIB, f"the leak server starts too big for this test: {base / MIB:.0f} MiB"
        assert first["max_rss_bytes"] == LIMIT_MB * MIB
        assert psutil.Process(pid0).cmdline()[-1] == LEAK

        async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy") as client:
            # ---- growth: reported everywhere, and alerted ------------------------------------------
            assert (await call(client, "leak__leak", {"mb": 120})).split() == [str(pid0), "120"]

            async def grown() -> dict[str, Any] | None:
                use = await _sampled(port)
                return use if use and use["rss_bytes"] >= base + 100 * MIB and use["rss_growth_alert"] else None

            use = await poll(grown, timeout=30)
            assert use, f"growth not reported: {await _sampled(port)}"
            assert use["rss_growth_bytes"] >= 100 * MIB and use["pid"] == pid0
            assert use["open_fds"] >= 3 and use["children"] == 0 and use["cpu_seconds"] > 0

            async def alert() -> dict[str, Any] | None:
                status = json.loads(await call(client, "mcpopt__get_performance_status", {}))
                return next((a for a in status["alerts"] if a["metric"] == "rss_growth"), None)

            fired = await poll(alert, timeout=30)
            assert fired and fired["scope"] == "leak" and fired["severity"] == "warning", fired
            assert "memory grew by" in fired["message"] and str(pid0) in fired["message"]

            status = json.loads(await call(client, "mcpopt__get_performance_status", {}))
            server = next(s for s in status["servers"] if s["server"] == "leak")
            assert server["health"]["replicas"][0]["resources"]["pid"] == pid0
            assert status["watch"]["samples"] > 0

            async with httpx.AsyncClient(timeout=10) as http:
                metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                data = (await http.get(f"http://127.0.0.1:{port}/dashboard/data")).json()
            rss = _metric(metrics, 'mcpopt_upstream_rss_bytes{replica="1",server="leak"}')
            assert rss >= base + 100 * MIB
            assert _metric(metrics, 'mcpopt_upstream_cpu_seconds_total{replica="1",server="leak"}') > 0
            assert _metric(metrics, 'mcpopt_upstream_child_processes{replica="1",server="leak"}') == 0
            assert _metric(metrics, 'mcpopt_upstream_rss_restarts_total{server="leak"}') == 0
            dash = next(s for s in data["servers"] if s["server"] == "leak")
            assert dash["health"]["replicas"][0]["resources"]["rss_bytes"] >= base + 100 * MIB

            cli = await anyio.to_thread.run_sync(_status_cli, port)
            assert cli.returncode == 0, cli.stderr
            assert re.search(rf"leak\s.*\s{pid0}\s", cli.stdout), cli.stdout

            # ---- the limit: a graceful restart; the write in flight is cut off, not repeated ------
            held: dict[str, Any] = {}

            async def hold() -> None:
                try:
                    held["result"] = await client.call_tool("leak__hold", {"seconds": 120})
                except MCPError as exc:
                    held["error"] = str(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(hold)
                assert await poll(lambda: _alines(log), timeout=30), "hold never reached the server"
                await call(client, "leak__leak", {"mb": LIMIT_MB})

            message = held.get("error") or text_of(held["result"])
            assert "error" in held or held["result"].is_error, message
            assert "MCP server 'leak'" in message and "restarted by mcpopt" in message, message
            assert "max_rss_mb" in message, message
            assert _lines(log) == [f"hold {pid0}"], "the cut-off write must not be retried"

            async def restarted() -> dict[str, Any] | None:
                row = await leak_row(port)
                procs = row["processes"]
                if row["rss_restarts"] == 1 and row["state"] == "ready" and procs and procs[0]["pid"] != pid0:
                    return row
                return None

            row = await poll(restarted, timeout=60)
            assert row, f"no restart at the limit: {await leak_row(port)}"
            assert row["restarts"] >= 1
            assert not psutil.pid_exists(pid0) or psutil.Process(pid0).status() == psutil.STATUS_ZOMBIE

            # ---- and it keeps serving, from a fresh process ----------------------------------------
            pid1, kept = (await call(client, "leak__pid", {})).split()
            assert int(pid1) == row["processes"][0]["pid"] and kept == "0"
            async with httpx.AsyncClient(timeout=10) as http:
                metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            assert _metric(metrics, 'mcpopt_upstream_rss_restarts_total{server="leak"}') == 1
            status = json.loads(await call(client, "mcpopt__get_performance_status", {}))
            (event,) = status["watch"]["recent_restarts"]
            assert event["server"] == "leak" and event["pid"] == pid0 and event["rss_bytes"] > LIMIT_MB * MIB


async def _sampled(port: int) -> dict[str, Any] | None:
    row = await leak_row(port)
    return row["processes"][0] if row["processes"] else None


async def _alines(path: Path) -> list[str]:
    return _lines(path)


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def _status_cli(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MCPOPT, "status", "--url", f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


# ---- grandchildren and a SIGKILLed gateway ----------------------------------------------------
def _grandchildren(gateway: psutil.Process) -> list[psutil.Process]:
    out = []
    for p in gateway.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.cmdline()[-1:] == ["leak-grandchild"]:
                out.append(p)
    return out


async def _kill_gateway_with_grandchildren(tmp_path: Path, env: dict[str, str]) -> list[psutil.Process]:
    """SIGKILL a gateway whose upstream has two grandchildren (one setsid'd), once the watch has seen
    both; returns every process of its tree, the server itself already dead."""
    config = write_config(
        tmp_path / "grand.yaml",
        {"leak": leak_entry(env={"SPAWN_GRANDCHILDREN": "1", "LEAK_LOG": str(tmp_path / "log")})},
        {"watch": {"interval_s": 0.2}},
    )
    with http_gateway(config, env) as (proc, port):
        gateway = psutil.Process(proc.pid)

        async def both_seen() -> bool:
            use = await _sampled(port)
            return bool(use and use["children"] == 2)

        assert await poll(both_seen, timeout=30), await leak_row(port)
        grand = _grandchildren(gateway)
        assert len(grand) == 2, describe(gateway.children(recursive=True))
        tree = gateway.children(recursive=True)
        server_pid = (await _sampled(port) or {}).get("pid")
        server = next(p for p in tree if p.pid == server_pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert not wait_dead([server], timeout=10), "PR_SET_PDEATHSIG did not kill the server itself"
        return tree


async def test_grandchildren_die_with_a_sigkilled_gateway(tmp_path: Path) -> None:
    tree = await _kill_gateway_with_grandchildren(tmp_path, {})
    left = wait_dead(tree, timeout=15)
    assert not left, f"survived the gateway: {describe(left)}"


async def test_control_without_watchdog_grandchildren_survive(tmp_path: Path) -> None:
    """The same SIGKILL with the watchdog off (`MCPOPT_WATCHDOG=0`): both grandchildren live on,
    which is what the previous test proves the watchdog prevents."""
    tree = await _kill_gateway_with_grandchildren(tmp_path, {"MCPOPT_WATCHDOG": "0"})
    try:
        # Nothing else would kill them: with the server already dead, they are orphans for good.
        marked = [p for p in alive(tree) if p.cmdline()[-1:] == ["leak-grandchild"]]
        assert len(marked) == 2, describe(tree)
    finally:
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()


# ---- replicas: only the one over the limit restarts; the others serve meanwhile ----------------
async def test_only_the_replica_over_the_limit_restarts(tmp_path: Path) -> None:
    from mcp_types.version import LATEST_HANDSHAKE_VERSION

    from mcpopt.api import ClientLink, no_progress
    from mcpopt.config import load_config
    from mcpopt.gateway.assembly import build_gateway

    cfg = load_config(
        data={
            "mcpServers": {"leak": leak_entry(replicas=2, max_rss_mb=LIMIT_MB, env={"LEAK_LOG": str(tmp_path / "l")})},
            "gateway": {"watch": {"interval_s": 0.2, "drain_s": 5}, "telemetry": {"data_dir": str(tmp_path)}},
        }
    )
    gw = build_gateway(cfg)
    link = ClientLink(LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: no_progress)

    async def call_tool(name: str, args: dict[str, Any], replica: int | None = None) -> str:
        params: dict[str, Any] = {"name": name, "arguments": args}
        if replica is not None:
            params["_meta"] = {"mcpopt/replica": replica}
        result = await gw.call_tool(params, link)
        assert not result.get("isError"), result
        return str(result["content"][0]["text"])

    async with gw.running():
        rows = gw.watch.replicas("leak")  # sampled once the upstreams were ready
        assert [r["replica"] for r in rows] == [1, 2], rows
        pids = {r["replica"]: r["pid"] for r in rows}
        assert (await call_tool("leak__leak", {"mb": LIMIT_MB}, replica=1)).split() == [str(pids[1]), str(LIMIT_MB)]

        served: list[str] = []

        async def restarted() -> bool:
            # Calls keep being answered while replica 1 drains and restarts (by replica 2, or the new 1).
            served.append(await call_tool("leak__pid", {}))
            now = {r["replica"]: r["pid"] for r in gw.watch.replicas("leak")}
            ready = gw.upstreams["leak"].state == "ready"
            return gw.watch.rss_restarts.get("leak") == 1 and now.get(1) not in (None, pids[1]) and ready

        assert await poll(restarted, timeout=60, interval=0.1), gw.watch.stats()
        now = {r["replica"]: r["pid"] for r in gw.watch.replicas("leak")}
        assert now[2] == pids[2], "replica 2 was under the limit and must not restart"
        assert gw.upstreams["leak"].upstreams[1].rss_restarts == 0
        assert gw.upstreams["leak"].upstreams[0].rss_restarts == 1
        # Every call made meanwhile was answered (`call_tool` asserts it), by one of the live processes.
        assert served and all(s.split()[0] in {str(p) for p in (*pids.values(), now[1])} for s in served), served
        row = next(r for r in gw.status() if r["server"] == "leak")
        assert row["rss_restarts"] == 1 and {p["replica"] for p in row["processes"]} == {1, 2}


# ---- the parts, on real processes and real rows --------------------------------------------------
TREE = """
import os, subprocess, sys, time
files = [open(os.devnull) for _ in range(20)]
sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
kids = [subprocess.Popen(sleeper, start_new_session=s) for s in (False, True)]
sum(i * i for i in range(3_000_000))  # some CPU time of its own
print("ready", flush=True)
time.sleep(60)
"""


def test_sample_trees_reads_a_real_process_tree() -> None:
    from mcpopt.upstream.watch import sample_trees

    proc = subprocess.Popen(
        [sys.executable, "-c", TREE], stdout=subprocess.PIPE, start_new_session=True, stdin=subprocess.DEVNULL
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        leader = psutil.Process(proc.pid)
        kids = leader.children()
        assert len(kids) == 2
        tree = sample_trees([proc.pid, 2**22 + 12345])[proc.pid]  # an absent pid is skipped
        assert tree.children == 2
        assert tree.open_fds >= 20 + 3  # its 20 files and stdio, plus the children's own
        assert tree.rss_bytes > leader.memory_info().rss  # the children's RSS is included
        assert tree.cpu_seconds > 0
        (escaped,) = tree.escaped  # the setsid child, which killpg would miss
        assert escaped[0] in {k.pid for k in kids} and os.getpgid(escaped[0]) == escaped[0]
    finally:
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.Error):
                p.kill()
        proc.wait(10)


def test_rss_growth_alert_fires_once_and_resolves() -> None:
    from mcpopt.config import TelemetrySettings
    from mcpopt.monitor.alerts import AlertManager

    def rows(alert: bool, replicas: int = 1) -> list[dict[str, Any]]:
        use = {
            "pid": 42,
            "rss_bytes": 300 * MIB,
            "rss_growth_bytes": 200 * MIB,
            "rss_growth_pct": 200.0,
            "rss_growth_window_s": 60.0,
            "rss_growth_alert": alert,
            "growth_warning_mb": 64.0,
        }
        reps = [{"replica": i + 1, "state": "ready", "resources": use if i == 0 else None} for i in range(replicas)]
        return [{"server": "leak", "state": "ready", "replicas": reps}]

    alerts = AlertManager(TelemetrySettings())
    (fired,) = alerts.evaluate({}, 1000.0, rows(True))
    assert (fired.status, fired.severity, fired.scope, fired.metric) == ("firing", "warning", "leak", "rss_growth")
    assert fired.value == 200.0 and fired.threshold == 64.0
    assert "memory grew by 200 MiB (+200%) to 300 MiB over 60 s (pid 42)" in fired.message
    assert alerts.evaluate({}, 1001.0, rows(True)) == []  # de-duplicated while it lasts
    (resolved,) = alerts.evaluate({}, 1002.0, rows(False))
    assert resolved.status == "resolved" and resolved.metric == "rss_growth"
    (multi,) = AlertManager(TelemetrySettings()).evaluate({}, 1000.0, rows(True, replicas=3))
    assert multi.scope == "leak#1"  # replica k of several


# ---- the graceful path: the call in flight finishes, a new call waits for the fresh process ---------
async def test_restart_drains_the_call_in_flight_and_new_calls_wait(tmp_path: Path) -> None:
    from mcp_types.version import LATEST_HANDSHAKE_VERSION

    from mcpopt.api import ClientLink, no_progress
    from mcpopt.config import load_config
    from mcpopt.gateway.assembly import build_gateway

    log, release = tmp_path / "log", tmp_path / "release"
    cfg = load_config(
        data={
            "mcpServers": {"leak": leak_entry(max_rss_mb=LIMIT_MB, env={"LEAK_LOG": str(log)})},
            # drain_s far longer than the test needs: the drain ends when the call in flight does.
            "gateway": {"watch": {"interval_s": 0.2, "drain_s": 300}, "telemetry": {"data_dir": str(tmp_path)}},
        }
    )
    gw = build_gateway(cfg)
    link = ClientLink(LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: no_progress)

    async def call_tool(name: str, args: dict[str, Any]) -> str:
        result = await gw.call_tool({"name": name, "arguments": args}, link)
        assert not result.get("isError"), result
        return str(result["content"][0]["text"])

    async with gw.running():
        (row,) = gw.watch.replicas("leak")
        pid0 = row["pid"]
        up = gw.upstreams["leak"].upstreams[0]
        got: dict[str, str] = {}

        async def into(key: str, name: str, args: dict[str, Any]) -> None:
            got[key] = await call_tool(name, args)

        async with anyio.create_task_group() as tg:
            tg.start_soon(into, "hold", "leak__hold", {"seconds": 300, "release": str(release)})
            assert await poll(lambda: _alines(log), timeout=30)
            await call_tool("leak__leak", {"mb": LIMIT_MB})

            async def draining() -> bool:
                return up.state == "starting" and up.pid == pid0  # no new calls; the old process runs

            assert await poll(draining, timeout=60, interval=0.05), (up.state, gw.watch.stats())
            tg.start_soon(into, "pid", "leak__pid", {})

            async def waiting() -> bool:
                return gw.upstreams["leak"].busy == 2  # the hold, and the new call waiting inside the pool

            assert await poll(waiting, timeout=30, interval=0.05)
            assert "pid" not in got and up.pid == pid0  # not answered: the only replica takes no new calls
            release.write_text("go", encoding="utf-8")
        assert got["hold"] == "held"  # the call in flight finished normally (not cut off)
        pid1, kept = got["pid"].split()
        assert int(pid1) != pid0 and kept == "0"  # the waiting call went to the fresh process
        assert gw.watch.rss_restarts == {"leak": 1} and _lines(log) == [f"hold {pid0}"]


# ---- isolated sessions: watched and limited like replicas, reported summed -------------------------
async def test_isolated_sessions_are_watched_and_restarted_at_the_limit(tmp_path: Path) -> None:
    from mcp_types.version import LATEST_HANDSHAKE_VERSION

    from mcpopt.api import ClientLink, no_progress
    from mcpopt.config import load_config
    from mcpopt.gateway.assembly import build_gateway

    entry = leak_entry(max_rss_mb=LIMIT_MB, isolation="session", env={"LEAK_LOG": str(tmp_path / "l")})
    cfg = load_config(
        data={
            "mcpServers": {"leak": entry},
            "gateway": {"watch": {"interval_s": 0.2}, "telemetry": {"data_dir": str(tmp_path)}},
        }
    )
    gw = build_gateway(cfg)

    def link(session: str) -> ClientLink:
        return ClientLink(LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: no_progress, session_id=session)

    async def call_tool(session: str, name: str, args: dict[str, Any]) -> str:
        result = await gw.call_tool({"name": name, "arguments": args}, link(session))
        assert not result.get("isError"), result
        return str(result["content"][0]["text"])

    async with gw.running():
        (shared,) = gw.watch.replicas("leak")
        pid_a = int((await call_tool("a", "leak__pid", {})).split()[0])
        pid_b = int((await call_tool("b", "leak__pid", {})).split()[0])
        assert len({shared["pid"], pid_a, pid_b}) == 3  # one process per client session, plus the shared one

        async def both() -> dict[str, Any] | None:
            iso = gw.watch.isolated_usage("leak")
            return iso if iso and iso["sessions"] == 2 else None

        iso = await poll(both, timeout=30)
        assert iso and iso["rss_bytes"] > 0 and iso["cpu_seconds"] > 0, gw.watch.isolated_usage("leak")
        await call_tool("a", "leak__leak", {"mb": LIMIT_MB})

        async def restarted() -> bool:
            return gw.watch.rss_restarts.get("leak") == 1

        assert await poll(restarted, timeout=60), gw.watch.stats()
        (event,) = gw.watch.stats()["recent_restarts"]
        assert event["pid"] == pid_a and event["replica"] == "isolated"
        new_a = int((await call_tool("a", "leak__pid", {})).split()[0])  # session a is served by a fresh process
        assert new_a not in (pid_a, pid_b) and int((await call_tool("b", "leak__pid", {})).split()[0]) == pid_b
        assert gw.watch.replicas("leak")[0]["pid"] == shared["pid"]  # the shared replica was not touched
        row = next(r for r in gw.status() if r["server"] == "leak")
        assert row["isolated_processes"]["sessions"] >= 1 and row["rss_restarts"] == 1


# ---- a server that dies while it drains is down like any crashed one ---------------------------------
async def test_a_server_dying_during_a_drain_is_unlisted_and_waiters_released(tmp_path: Path) -> None:
    """`begin_recycle` marks the session "starting" (no new calls) while its calls drain; if the
    process dies before `finish_recycle`, that is a crash of a ready session: its tools are
    unlisted and callers waiting for the next session are released (not kept waiting through the
    backoff, here 10 minutes)."""
    from mcpopt.config import load_config
    from mcpopt.gateway.assembly import build_gateway

    cfg = load_config(
        data={
            "mcpServers": {"leak": leak_entry()},
            "gateway": {
                "restart": {"initial_backoff_ms": 600_000, "max_backoff_ms": 600_000},
                "telemetry": {"data_dir": str(tmp_path)},
            },
        }
    )
    gw = build_gateway(cfg)
    async with gw.running():
        up = gw.upstreams["leak"].upstreams[0]
        assert "leak__pid" in gw.catalog.tool_routes and up.pid is not None
        assert up.begin_recycle("test drain")
        assert up.state == "starting"
        os.kill(up.pid, signal.SIGKILL)

        async def down() -> bool:
            return up.state == "down"

        assert await poll(down, timeout=30, interval=0.05), (up.state, up.last_error)
        with anyio.fail_after(10):  # released at once (the backoff is 10 minutes)
            assert await up.wait_ready(600) is False

        async def unlisted() -> bool:
            return "leak__pid" not in gw.catalog.tool_routes

        assert await poll(unlisted, timeout=30, interval=0.05), sorted(gw.catalog.tool_routes)
        assert up.catalog.tools == [] and up.rss_restarts == 0


# ---- pid reuse: a pid is ours only while its process has the starttime recorded at spawn ------------
def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True, stdin=subprocess.DEVNULL
    )


def test_a_reused_pid_is_never_sampled() -> None:
    """The watch samples a pid only while its process is the one spawned (same starttime): a pid
    the kernel gave to another process since is skipped like a pid that is gone."""
    from mcpopt.upstream._watchdog import starttime
    from mcpopt.upstream.watch import sample_trees

    proc = _sleeper()
    try:
        started = starttime(proc.pid)
        assert started is not None
        assert proc.pid in sample_trees([proc.pid], started={proc.pid: started})
        assert sample_trees([proc.pid], started={proc.pid: str(int(started) + 1)}) == {}  # "reused"
    finally:
        proc.kill()
        proc.wait(10)


def test_the_watchdog_never_kills_a_group_whose_leader_pid_was_reused() -> None:
    """`g <pgid> <starttime>`: on EOF the watchdog kills the group only if its leader's pid is gone
    (the group may live on) or still the same process; a pid now held by another process means the
    group it led is gone, and the newcomer is not ours."""
    from mcpopt.upstream._watchdog import starttime

    ours, reused = _sleeper(), _sleeper()
    try:
        lines = f"g {ours.pid} {starttime(ours.pid)}\ng {reused.pid} {int(starttime(reused.pid) or 0) + 1}\n"
        dog = subprocess.run(
            [sys.executable, str(ROOT / "src" / "mcpopt" / "upstream" / "_watchdog.py")],
            input=lines.encode(),
            timeout=30,
            check=True,
        )
        assert dog.returncode == 0
        assert ours.wait(30) == -signal.SIGKILL
        assert reused.poll() is None  # the pid whose starttime differs was left alone
    finally:
        for p in (ours, reused):
            p.kill()
            p.wait(10)


def _orphaned_group() -> tuple[int, psutil.Process]:
    """A process group whose leader has exited and been reaped (as an upstream that forked a
    worker and exited before its starttime was read): (the group's id, its surviving member)."""
    code = "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']).pid)"
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE)
    assert leader.stdout is not None
    member = psutil.Process(int(leader.stdout.readline()))
    leader.stdout.close()
    leader.wait(30)
    return leader.pid, member


def test_a_pid_whose_starttime_was_never_read_is_not_taken_for_ours() -> None:
    """Starttime unknown (the leader was reaped before it was read): a process holding that pid now
    came later, so it is never killed or sampled; a group whose leader's pid is free is still ours."""
    from mcpopt.upstream._watchdog import group_is_ours
    from mcpopt.upstream.process import ChildRegistry
    from mcpopt.upstream.watch import sample_trees

    stranger = _sleeper()
    pgid, member = _orphaned_group()
    try:
        registry = ChildRegistry(watchdog=False)
        registry.add(stranger.pid)  # no starttime
        assert not registry.is_ours(stranger.pid)
        registry.kill_all()
        assert stranger.poll() is None
        assert sample_trees([stranger.pid], started={stranger.pid: None}) == {}
        assert stranger.pid in sample_trees([stranger.pid])  # not listed: not checked
        assert group_is_ours(pgid, None)

        dog = subprocess.run(
            [sys.executable, str(ROOT / "src" / "mcpopt" / "upstream" / "_watchdog.py")],
            input=f"g {stranger.pid}\ng {pgid}\n".encode(),
            timeout=30,
            check=True,
        )
        assert dog.returncode == 0
        assert wait_dead([member]) == []  # the group outlived its leader: killed
        assert stranger.poll() is None  # the pid held by another process: left alone
    finally:
        with contextlib.suppress(psutil.Error):
            member.kill()
        stranger.kill()
        stranger.wait(10)
