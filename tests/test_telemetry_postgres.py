"""PostgreSQL as the telemetry store shared by gateway replicas (issue 12, item 3).

A throwaway PostgreSQL 15 cluster (initdb + pg_ctl, as the `postgres` user when run as root, on an
ephemeral port under a tmp dir). Checked: `PgStore` keeps every `CallRecord` field as SQLite does
(round trip, sessions, alerts, retention); two real gateway replicas (`mcpopt serve -t http` over
the real mcp-server-time) write into one database, each record naming its replica, and
`mcpopt stats --db postgresql://...` and the optimizer's reader see both replicas' calls; a
database that is down costs no call.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from conftest import MCPOPT, ROOT, free_port, popen_gateway, text_of, time_entry, wait_http, write_config
from mcpopt.telemetry.record import CallRecord

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed (pip install -e '.[dev]')")
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _pg_tool(name: str) -> str:
    found = PG_BIN / name
    if found.exists():
        return str(found)
    exe = shutil.which(name)
    if exe is None:
        pytest.skip("PostgreSQL is not installed (scripts/setup installs postgresql)")
    return exe


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    # Its own folder in /tmp: pytest's tmp folders are private to root, where `postgres` cannot enter.
    base = Path(tempfile.mkdtemp(prefix="mcpopt-pg-"))
    data, port = base / "data", free_port()
    user: dict[str, Any] = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: the Debian package's `postgres` user
        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        user = {"user": pw.pw_uid, "group": pw.pw_gid}
    run = {"check": True, "capture_output": True, "cwd": str(base), **user}
    subprocess.run([initdb, "-D", str(data), "-A", "trust", "-U", "mcpopt", "--no-sync"], **run)
    subprocess.run(
        [
            pg_ctl,
            "-D",
            str(data),
            "-w",
            "-l",
            str(base / "log"),
            "-o",
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        ],
        **run,
    )
    try:
        url = f"postgresql://mcpopt@127.0.0.1:{port}/postgres"
        with psycopg.connect(url, autocommit=True) as db:
            db.execute("CREATE DATABASE telemetry")
        yield f"postgresql://mcpopt@127.0.0.1:{port}/telemetry"
    finally:
        subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, cwd=str(base), **user)
        shutil.rmtree(base, ignore_errors=True)


def _record(gw: str, ts: float, tool: str = "get_current_time", **kw: Any) -> CallRecord:
    return CallRecord(ts, "time", tool, f"time__{tool}", "ok", 12.5, gateway_replica=gw, **kw)


def test_pg_store_round_trip_sessions_alerts_retention(pg_url: str) -> None:
    from mcpopt.telemetry.postgres import PgStore

    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("DROP TABLE IF EXISTS calls, alerts")
    store = PgStore(pg_url)
    now = time.time()
    full = _record("A", now, coalesced=True, replica=2, error_code=None, session="s1", seq=1, cache="hit")
    records = [full, _record("B", now + 1, session="s1", seq=2, tool="convert_time"), _record("A", now - 90_000)]

    class Alert:
        ts, status, severity, scope, metric = now, "firing", "warning", "time", "p95_ms"
        value, threshold, message = 250.0, 150.0, "p95 over the SLO"

    store.insert(records, [Alert()])
    rows = list(store.calls(now - 10))
    assert [r["gateway_replica"] for r in rows] == ["A", "B"]
    assert rows[0] == full._asdict()  # every field, typed as in the record (bool stays bool)
    assert store.sessions(now - 10) == [
        {"session": "s1", "calls": 2, "first": now, "last": now + 1, "sequence": "get_current_time > convert_time"}
    ]
    assert store.alerts()[0]["message"] == "p95 over the SLO"
    assert store.delete_before(now - 3600) == 1  # retention drops the day-old one only
    assert len(list(store.calls())) == 2
    store.close()
    PgStore(pg_url).close()  # opening again (tables exist, columns checked) changes nothing


async def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(lambda: subprocess.run(cmd, **kw))


async def _calls(url: str, n: int) -> None:
    async with (
        httpx2.AsyncClient(timeout=30.0) as http,
        Client(streamable_http_client(url, http_client=http), mode="legacy") as c,
    ):
        for _ in range(n):
            result = await c.call_tool("time__get_current_time", {"timezone": "UTC"})
            assert "UTC" in text_of(result)


@pytest.mark.anyio
async def test_two_replicas_write_one_store_and_stats_read_both(pg_url: str, tmp_path: Path) -> None:
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("DROP TABLE IF EXISTS calls, alerts")
    with contextlib.ExitStack() as stack:
        ports = {}
        for name in ("A", "B"):
            (tmp_path / name).mkdir()
            gateway = {
                "shared": {"replica": f"replica-{name}"},
                "telemetry": {"data_dir": str(tmp_path / name), "postgres_url": pg_url},
            }
            config = write_config(tmp_path / name / "gateway.yaml", {"time": time_entry()}, gateway)
            port = free_port()
            proc = stack.enter_context(popen_gateway(config, "-t", "http", "--port", str(port)))
            wait_http(port, proc)
            ports[name] = (port, proc)
        await _calls(f"http://127.0.0.1:{ports['A'][0]}/mcp", 3)
        await _calls(f"http://127.0.0.1:{ports['B'][0]}/mcp", 5)
        for _port, proc in ports.values():
            proc.terminate()  # a clean stop flushes the sinks
            proc.wait(20)
    out = await _run(
        [MCPOPT, "stats", "--db", pg_url, "--since", "", "--json"],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert {r["replica"]: r["calls"] for r in report["replicas"]} == {"replica-A": 3, "replica-B": 5}
    assert report["overall"]["calls"] == 8

    from mcpopt.telemetry.postgres import open_reader  # what the optimizer reads with

    reader = open_reader(pg_url)
    try:
        assert {r["gateway_replica"] for r in reader.calls()} == {"replica-A", "replica-B"}
    finally:
        reader.close()


@pytest.mark.anyio
async def test_store_down_costs_no_call(tmp_path: Path) -> None:
    dead = f"postgresql://mcpopt@127.0.0.1:{free_port()}/telemetry"
    gateway = {"telemetry": {"data_dir": str(tmp_path), "postgres_url": dead}}
    config = write_config(tmp_path / "gateway.yaml", {"time": time_entry()}, gateway)
    port = free_port()
    with popen_gateway(config, "-t", "http", "--port", str(port)) as proc:
        wait_http(port, proc)
        await _calls(f"http://127.0.0.1:{port}/mcp", 3)
    out = await _run(
        [MCPOPT, "stats", "--db", dead, "--since", ""], capture_output=True, text=True, cwd=str(ROOT), timeout=60
    )
    assert out.returncode == 1 and "telemetry database postgresql://mcpopt@127.0.0.1" in out.stderr
    assert "Traceback" not in out.stderr
