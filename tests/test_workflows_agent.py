"""Agents build workflows: `mcpopt__workflow` through a real SDK client over `mcpopt serve` (stdio), the
seed scenario `workflow_creation_flow` replayed by the scenario runner, and the CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from conftest import MCPOPT, ROOT, gateway_params, time_entry, write_config
from mcpopt.config import load_config
from mcpopt.optimize.scenarios import load_scenarios
from mcpopt.optimize.session import OptimizeSession

pytestmark = pytest.mark.anyio


def body(result: Any) -> dict[str, Any]:
    data = result.structured_content or json.loads(result.content[0].text)
    assert isinstance(data, dict)
    return data


async def test_an_agent_builds_runs_and_cancels_a_workflow_through_a_real_client(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", {"time": time_entry()})
    async with Client(gateway_params(cfg), mode="legacy") as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"mcpopt__workflow", "mcpopt__fanout"} <= names
        draft = body(await client.call_tool("mcpopt__workflow", {"action": "create", "name": "plan"}))
        assert draft["valid"] is False and any("steps" in p for p in draft["problems"])
        step = {"id": "now", "tool": "time__get_current_time", "arguments": {"timezone": "{{params.tz}}"}}
        bad = body(await client.call_tool("mcpopt__workflow", {"action": "add_step", "name": "plan", "step": step}))
        assert bad["valid"] is False and "params.tz, which is not a declared parameter" in " ".join(bad["problems"])
        fixed = await client.call_tool(
            "mcpopt__workflow",
            {"action": "update_step", "name": "plan", "step_id": "now", "step": {"arguments": {"timezone": "UTC"}}},
        )
        assert body(fixed)["valid"] is True and body(fixed)["tool"] == "workflow__plan"
        await client.call_tool(
            "mcpopt__workflow",
            {
                "action": "add_step",
                "name": "plan",
                "step": {
                    "id": "later",
                    "tool": "time__convert_time",
                    "arguments": {
                        "source_timezone": "UTC",
                        "time": "{{steps.now.json.datetime | re: T(\\d\\d:\\d\\d)}}",
                        "target_timezone": "Asia/Tokyo",
                    },
                },
            },
        )
        assert "workflow__plan" in {t.name for t in (await client.list_tools()).tools}
        ran = body(await client.call_tool("workflow__plan", {}))
        assert ran["status"] == "completed" and ran["output"]["later"]["target"]["timezone"] == "Asia/Tokyo"
        status = body(await client.call_tool("mcpopt__workflow", {"action": "get_status", "run_id": ran["run_id"]}))
        assert status["status"] == "completed" and [s["id"] for s in status["steps"]] == ["now", "later"]
        listed = body(await client.call_tool("mcpopt__workflow", {"action": "list"}))
        assert [w["name"] for w in listed["workflows"]] == ["plan"]
        assert listed["runs"][0]["run_id"] == ran["run_id"]
        with pytest.raises(MCPError, match=r"already finished \(completed\)"):
            await client.call_tool("mcpopt__workflow", {"action": "cancel", "run_id": ran["run_id"]})
        with pytest.raises(MCPError, match="must be one of"):
            await client.call_tool("mcpopt__workflow", {"action": "frobnicate"})
    # The agent's workflow outlives the gateway: a new one serves it from the journal.
    async with Client(gateway_params(cfg), mode="legacy") as client:
        assert "workflow__plan" in {t.name for t in (await client.list_tools()).tools}
        again = body(await client.call_tool("workflow__plan", {}))
        assert again["status"] == "completed"
        deleted = body(await client.call_tool("mcpopt__workflow", {"action": "delete", "name": "plan"}))
        assert deleted == {"deleted": "plan"}
        assert "workflow__plan" not in {t.name for t in (await client.list_tools()).tools}


async def test_the_seed_scenario_workflow_creation_flow_passes(tmp_path: Path) -> None:
    cfg = load_config(data={"mcpServers": {"time": time_entry()}})
    scs = load_scenarios([ROOT / "examples" / "scenarios" / "workflows"])
    session = OptimizeSession(cfg, rules_path=tmp_path / "rules.json", sandbox=False)
    async with session.open():
        assert session.runner is not None and session.workflows is not None
        suite = await session.runner.run(scs, "gateway")
    run = suite.runs[0]
    failed = [f"{c.label}: {c.detail}" for c in run.criteria if not c.ok]
    assert not failed and run.ok, failed
    assert run.client_calls == 12


def test_the_cli_lists_shows_runs_and_reports_workflows(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", {"time": time_entry()})
    text = cfg.read_text() + (
        "workflows:\n"
        "  clock:\n"
        "    description: the time in a zone\n"
        "    parameters: {tz: {type: string, default: UTC}}\n"
        "    steps:\n"
        "      - {id: now, tool: time__get_current_time, arguments: {timezone: '{{params.tz}}'}}\n"
        "      - {id: bad, depends_on: [now], tool: time__get_current_time, arguments: {timezone: Not/Here}}\n"
        "    on_failure: continue\n"
    )
    cfg.write_text(text)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MCPOPT, "workflows", *args, "-c", str(cfg)], capture_output=True, text=True, timeout=120)

    listed = cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["workflows"][0]["name"] == "clock"
    shown = cli("show", "clock")
    assert shown.returncode == 0 and "workflow__clock" in shown.stdout and '"tz"' in shown.stdout
    ran = cli("run", "clock", "--args", '{"tz": "Asia/Tokyo"}', "--json")
    assert ran.returncode == 1, ran.stderr  # one step failed (on_failure: continue)
    data = json.loads(ran.stdout)
    assert data["status"] == "completed_with_errors" and data["output"]["now"]["timezone"] == "Asia/Tokyo"
    status = cli("status", data["run_id"], "--events")
    assert status.returncode == 0 and "step_succeeded" in status.stdout and "completed_with_errors" in status.stdout
    cancel = cli("cancel", data["run_id"])
    assert cancel.returncode == 1 and "already finished" in cancel.stderr
    missing = cli("show", "nope")
    assert missing.returncode == 1 and "no workflow 'nope'" in missing.stderr
    bad = cli("run", "clock", "--args", '{"tz": 5}')
    assert bad.returncode == 1 and "tz: 5 is not of type 'string'" in bad.stderr


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_progress_notifications_reach_a_real_client_per_step(tmp_path: Path, mode: str) -> None:
    cfg = write_config(tmp_path / "c.yaml", {"time": time_entry()})
    cfg.write_text(
        cfg.read_text()
        + "workflows:\n"
        + "  two:\n"
        + "    steps:\n"
        + "      - {id: a, tool: time__get_current_time, arguments: {timezone: UTC}}\n"
        + "      - {id: b, tool: time__get_current_time, arguments: {timezone: '{{steps.a.json.timezone}}'}}\n"
    )
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with Client(gateway_params(cfg), mode=mode) as client:
        result = await client.call_tool("workflow__two", {}, progress_callback=on_progress)
        assert not result.is_error
    assert [m for _, _, m in seen] == ["step a succeeded", "step b succeeded", "workflow two: completed"]
    assert [p for p, _, _ in seen] == [1.0, 2.0, 2.0] and {t for _, t, _ in seen} == {2.0}
