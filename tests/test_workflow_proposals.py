"""The optimizer proposes workflows from repeated call sequences, validates them by replaying the
scenarios (fewer round trips, every criterion still passing), applies them -- and the live gateway
then serves them as `workflow__<name>` until the rule is rolled back."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import filesystem_entry, time_entry
from mcpopt.api import ClientLink, no_progress
from mcpopt.config import OptimizationSettings, load_config
from mcpopt.gateway.assembly import build_gateway
from mcpopt.optimize.analyzer import Analyzer
from mcpopt.optimize.scenarios import parse_scenario
from mcpopt.optimize.sequences import SequenceSettings, propose_workflows
from mcpopt.optimize.session import OptimizeSession
from mcpopt.pipeline.rules import RuleStore
from mcpopt.workflow_model import parse_definition

pytestmark = pytest.mark.anyio


def row(session: str, seq: int, tool: str, args: dict[str, Any], result: Any = None, **extra: Any) -> dict[str, Any]:
    server, _, name = tool.partition("__")
    out = {
        "ts": 1000.0 + seq,
        "session": session,
        "seq": seq,
        "server": server,
        "tool": name,
        "name": tool,
        "outcome": "ok",
        "total_ms": 10.0,
        "arguments": json.dumps(args),
        **extra,
    }
    if result is not None:
        out["result"] = {"content": [{"type": "text", "text": json.dumps(result)}]}
    return out


def test_a_repeated_sequence_becomes_a_workflow_with_parameters_data_flow_and_order() -> None:
    sessions = {}
    for n, city in enumerate(["Paris", "Tokyo", "Lima", "Oslo"]):
        s = f"s{n}"
        sessions[s] = [
            row(s, 1, "time__get_current_time", {"timezone": "UTC"}, {"datetime": f"2026-01-0{n + 1}T10:00"}),
            row(s, 2, "geo__lookup", {"city": city}, {"zone": f"Zone/{city}"}),
            row(s, 3, "time__convert_time", {"time": "12:00", "target": f"Zone/{city}"}, depends_on=[2]),
            row(s, 4, "notes__append", {"text": f"{city} done"}),
        ]
        for r in sessions[s][:3]:
            r.setdefault("depends_on", [])
        sessions[s][3]["depends_on"] = []
    writes = {("notes", "append")}
    found = propose_workflows(sessions, lambda s, t: (s, t) not in writes, SequenceSettings(min_repeats=3))
    assert len(found) == 1 and found[0].occurrences == 4 and found[0].rule is not None
    rule = found[0].rule
    wf = parse_definition(rule.action.workflow["name"], rule.action.workflow, "optimizer")  # type: ignore[index]
    steps = {s.id: s for s in wf.steps}
    assert steps["get_current_time"].arguments == {"timezone": "UTC"}  # constant: literal
    assert steps["lookup"].arguments == {"city": "{{params.lookup_city}}"}  # varies: a parameter
    assert steps["convert_time"].arguments["target"] == "{{steps.lookup.json.zone}}"  # data flow
    assert wf.parameters["lookup_city"].type == "string" and "append_text" in wf.parameters
    deps = wf.dependencies()
    assert deps["get_current_time"] == set() and deps["lookup"] == set()  # independent reads: parallel
    assert deps["convert_time"] == {"lookup"}
    assert deps["append"] == {"get_current_time", "lookup", "convert_time"}  # a write waits for all
    assert rule.action.bindings == {"lookup_city": [1, "city"], "append_text": [3, "text"]}
    assert rule.level == "moderate" and rule.condition.calls[0] == "time/get_current_time"
    # Without the arguments (telemetry below detailed) the sequence is reported, not proposed.
    for calls in sessions.values():
        for r in calls:
            r["arguments"], r["args_hash"] = "", "h"
    found = Analyzer().analyze([r for calls in sessions.values() for r in calls]).findings
    seq = next(f for f in found if f.kind == "repeated_sequence")
    assert not seq.proposals and "detailed" in seq.recommendation


def clock(city: str) -> dict[str, Any]:
    return {
        "id": f"clock-{city.split('/')[-1].lower()}",
        "servers": ["time", "files"],
        "steps": [
            {"id": "now", "tool": "time__get_current_time", "arguments": {"timezone": "UTC"}},
            {"id": "ls", "tool": "files__list_directory", "arguments": {"path": "{{vars.folder}}"}},
            {
                "id": "there",
                "tool": "time__convert_time",
                # Depends on `now`: a batch can carry `now` and `ls` together, but `there` is a second
                # round trip -- what only a workflow saves.
                "arguments": {
                    "source_timezone": "{{steps.now.json.timezone}}",
                    "time": "12:00",
                    "target_timezone": city,
                },
            },
        ],
        "vars": {"folder": "FOLDER"},
        "success_criteria": [
            {"step": "now", "path": "json.timezone", "equals": "UTC"},
            {"step": "ls", "contains": "notes.txt"},
            {"step": "there", "path": "json.target.timezone", "equals": city},
        ],
    }


async def test_the_loop_proposes_validates_and_applies_a_workflow_that_the_live_gateway_serves(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("n\n", encoding="utf-8")
    rules_path = tmp_path / "rules.json"
    data = {
        "mcpServers": {"time": time_entry(), "files": filesystem_entry(folder)},
        "gateway": {
            "telemetry": {"enabled": False},
            "optimization": {"rules_path": str(rules_path), "min_improvement": 0.05},
            "workflows": {"lease_ms": 1000, "journal": {"path": str(tmp_path / "journal.db")}},
        },
    }
    cfg = load_config(data=data)
    scenarios = []
    for city in ("Europe/Paris", "Asia/Tokyo", "America/Lima"):
        body = clock(city)
        body["vars"] = {"folder": str(folder)}
        scenarios.append(parse_scenario(body, "test"))
    settings = OptimizationSettings(rules_path=str(rules_path), auto_improvement=True, level="moderate")
    session = OptimizeSession(cfg, settings=settings, rules_path=rules_path, sandbox=False)
    async with session.open():
        report = await session.loop(scenarios).run_once(apply=True)
    applied = [r for r in report.applied if r.startswith("workflow:")]
    assert len(applied) == 1, [e.to_dict() for e in report.events]
    event = next(e for e in report.events if e.rule == applied[0] and e.kind == "applied")
    # Each scenario becomes one call (3 round trips in all), from 9 one by one -- or from 6 when the
    # batch hint for `now` + `ls` (which a workflow makes redundant) was validated first.
    trips = event.evidence["round_trips"]
    assert trips["after"] == 3 and trips["before"] in (6, 9) and event.evidence["newly_failing"] == []
    store = RuleStore(rules_path)
    rule = store.get(applied[0])
    assert rule.rollout is not None and rule.rollout.state == "canary"  # it starts on a share of the calls
    name = rule.action.workflow["name"]  # type: ignore[index]
    assert rule.action.bindings == {"convert_time_target_timezone": [2, "target_timezone"]}
    # The live gateway over the same config serves it, and withdraws it when the rule is rolled back.
    gw = build_gateway(cfg)
    link = ClientLink("2025-06-18", None, None, None, lambda _t: no_progress)
    async with gw.running():
        assert f"workflow__{name}" in {t.name for t in gw.own_tools()}
        result = await gw.call_tool(
            {"name": f"workflow__{name}", "arguments": {"convert_time_target_timezone": "Asia/Tokyo"}}, link
        )
        out = result["structuredContent"]
        assert out["status"] == "completed" and out["output"]["convert_time"]["target"]["timezone"] == "Asia/Tokyo"
        store.rollback(rule.id, reason="test")
        async with asyncio.timeout(30):
            while f"workflow__{name}" in {t.name for t in gw.own_tools()}:
                await asyncio.sleep(0.05)
