"""`mcpopt capabilities`: per upstream, era, declared capabilities, tool count and behaviour hints,
checked against what the real servers list; and the machine's sandboxes and layers."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import MCPOPT, ROOT, everything_entry, gateway_client, memory_entry, time_entry, write_config

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_the_report_matches_what_the_servers_declare(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "gw.yaml",
        {"time": time_entry(), "everything": everything_entry(), "memory": memory_entry(tmp_path / "m.jsonl")},
        {"telemetry": {"data_dir": str(tmp_path / "data")}},
    )
    res = subprocess.run(  # noqa: ASYNC221 - the CLI's own process, run to completion
        [MCPOPT, "capabilities", "-c", str(config), "--json"],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        env={**os.environ, "NO_COLOR": "1"},
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout)
    rows = {r["server"]: r for r in report["upstreams"]}
    assert set(rows) == {"time", "everything", "memory"}
    # What the gateway serves of each server (server-everything lists tools by the client's
    # capabilities, so a direct client with other capabilities would see another set).
    async with gateway_client(config, mode="legacy") as client:
        listed = (await client.list_tools()).tools
    for name in ("time", "everything", "memory"):
        tools = [t for t in listed if t.name.startswith(f"{name}__")]
        row = rows[name]
        assert row["state"] == "ready" and row["tools"] == len(tools) > 0, name
        for hint, field in (
            ("readOnlyHint", "read_only_hint"),
            ("idempotentHint", "idempotent_hint"),
            ("destructiveHint", "destructive_hint"),
        ):
            expected = sum(1 for t in tools if t.annotations is not None and getattr(t.annotations, field) is True)
            assert row["hints"][hint] == expected, (name, hint)
        assert "tools" in row["capabilities"] and row["protocol"]
    assert rows["everything"]["era"] == "handshake" and rows["memory"]["era"] == "handshake"
    assert rows["everything"]["capabilities"]["resources"]["subscribe"] is True
    assert rows["time"]["era"] in ("handshake", "2026-07-28 (stateless)")
    cm = report["code_mode"]
    assert cm["backends"]["monty"]["available"] is True
    assert set(cm["layer2"]) >= {"works", "reason", "bwrap", "user_namespaces", "seccomp", "cgroup", "active"}
    assert cm["layer2"]["active"] == cm["layer2"]["works"]  # mode auto
    assert cm["layer2"]["works"] or cm["layer2"]["reason"]


def test_the_table_names_layer_2(tmp_path: Path) -> None:
    config = write_config(tmp_path / "gw.yaml", {"time": time_entry()}, {"code_mode": {"isolation": {"mode": "off"}}})
    res = subprocess.run(
        [MCPOPT, "capabilities", "-c", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "time" in res.stdout and "monty (default)" in res.stdout
    assert "layer 2 (isolation.mode=off): not active -- isolation.mode is off" in res.stdout
