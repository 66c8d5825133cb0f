"""The gateway's own tools (batch, cache stats) and startup ordering, against real servers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mcp import Client

from conftest import gateway_params, memory_entry, time_entry, write_config
from mcpopt.config import load_config
from mcpopt.gateway.server import startup_stages

pytestmark = pytest.mark.anyio


async def test_batch_runs_calls_in_order_with_their_own_errors(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", {"time": time_entry(), "memory": memory_entry(tmp_path / "m.jsonl")})
    calls = [
        {
            "name": "time__convert_time",
            "arguments": {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"},
        },
        {"name": "nosuch__tool", "arguments": {}},
        {
            "name": "memory__create_entities",
            "arguments": {"entities": [{"name": "b1", "entityType": "t", "observations": []}]},
        },
        {"name": "time__get_current_time", "arguments": {"timezone": "Not/AZone"}},
    ]
    async with Client(gateway_params(cfg)) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "mcpopt__batch" in names
        result = await client.call_tool("mcpopt__batch", {"calls": calls})
        body = result.structured_content
        assert body is not None and [r["index"] for r in body["results"]] == [0, 1, 2, 3]
        first, unknown, created, bad_tz = body["results"]
        assert first["ok"] and "21:00" in json.dumps(first["result"])
        assert not unknown["ok"] and "Unknown tool" in unknown["error"]["message"]
        assert created["ok"] and "b1" in (tmp_path / "m.jsonl").read_text()
        assert not bad_tz["ok"]  # the tool's own error (isError), reported in place
        assert body["succeeded"] == 2 and body["failed"] == 2
        nested = await client.call_tool("mcpopt__batch", {"calls": [{"name": "mcpopt__batch", "arguments": {}}]})
        assert "cannot contain a batch" in json.dumps(nested.structured_content)


def test_startup_stages_follow_dependencies_then_priority() -> None:
    cfg = load_config(
        data={
            "mcpServers": {
                "db": {"command": "x"},
                "api": {"command": "x", "depends_on": ["db"]},
                "late": {"command": "x", "priority": 5},
                "ui": {"command": "x", "depends_on": ["api", "late"]},
                "cache": {"command": "x"},
            }
        }
    )
    stages = startup_stages(cfg, list(cfg.mcpServers))
    assert stages == [["db", "cache"], ["late"], ["api"], ["ui"]]


async def test_lazy_server_starts_when_listed(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", {"time": time_entry(lazy=True), "memory": memory_entry(tmp_path / "m")})
    async with Client(gateway_params(cfg), mode="legacy") as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "time__get_current_time" in names
        result = await client.call_tool("time__get_current_time", {"timezone": "UTC"})
        assert not result.is_error
