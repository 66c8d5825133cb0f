"""The pool reports where a call's time went (queue / upstream), which replica served it and its retries."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from conftest import PY_SERVERS
from mcpopt.api import ClientLink
from mcpopt.config import load_config
from mcpopt.gateway.assembly import build_gateway

pytestmark = pytest.mark.anyio


async def _nothing(*_: Any) -> None:
    return None


async def test_records_carry_replica_queue_and_upstream_time(tmp_path: Path) -> None:
    cfg = load_config(
        data={
            "mcpServers": {
                "time": {"command": str(PY_SERVERS / "mcp-server-time"), "replicas": 2, "max_concurrency": 1}
            },
            "gateway": {"telemetry": {"data_dir": str(tmp_path)}},
        }
    )
    gateway = build_gateway(cfg)
    link = ClientLink("2025-11-25", None, None, None, lambda _t: _nothing)
    zones = ["UTC", "Europe/Paris", "Asia/Tokyo", "America/Lima", "Africa/Cairo", "Australia/Perth"]
    calls = [{"name": "time__get_current_time", "arguments": {"timezone": z}} for z in zones]  # distinct: no coalescing
    async with gateway.running():
        await asyncio.gather(*(gateway.call_tool(params, link) for params in calls))
        await gateway.telemetry.flush()
        db = gateway.telemetry.sqlite_path
        assert db is not None
        rows = sqlite3.connect(str(db)).execute("select replica, retries, queue_ms, upstream_ms from calls").fetchall()
    assert len(rows) == 6
    assert {r[0] for r in rows} <= {1, 2} and all(r[1] == 0 for r in rows)
    assert all(r[3] > 0 for r in rows)  # time on the wire is measured by the pool itself
    assert sum(1 for r in rows if r[2] > 0) >= 1  # with one slot, concurrent calls waited in the queue
