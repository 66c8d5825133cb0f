"""Issue 6, item 8: on recorded sessions with injected waste against the real servers (the demo's and
the SQLite MCP server), the loop cuts tool calls >= 25% and time >= 40% with every criterion
passing, and rolls back a deliberately harmful rule (a TTL on the clock) by itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcpopt.optimize.proof import HARMFUL_RULE, run_proof
from mcpopt.pipeline.rules import RuleStore

ROOT = Path(__file__).resolve().parents[1]
SQLITE = ROOT / ".servers" / "sqlite" / "bin" / "mcp-server-sqlite"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not SQLITE.exists(), reason="scripts/setup installs the SQLite MCP server"),
]


@pytest.mark.anyio
async def test_loop_cuts_calls_and_time_and_rolls_back_harm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    result = await run_proof(tmp_path)
    fig = result.figures()
    print(json.dumps(fig, indent=2))
    assert result.rows >= 25  # the recorded sessions are in the telemetry store the analyzer read
    assert result.recorded["success_rate"] == 1.0
    assert fig["calls_cut"] >= 0.25, fig
    assert fig["time_cut"] >= 0.40, fig
    assert fig["criteria_failing_after"] == 0 and fig["after"]["success_rate"] == 1.0
    assert "sql_limit:sqlite/read_query" in fig["applied"], fig
    assert any(r.startswith("cache_ttl:") for r in fig["applied"])
    # The analyzer proposed a TTL on the clock too; validation refused it (freshness criterion).
    assert HARMFUL_RULE.id not in fig["applied"]
    # The harmful rule, added by hand, was rolled back by the loop's watch, with its evidence.
    assert fig["rolled_back"] == [HARMFUL_RULE.id] and "freshness" in fig["rollback_reason"]
    store = RuleStore(tmp_path / "rules.json")
    assert store.get(HARMFUL_RULE.id).enabled is False
    last = next(h for h in reversed(store.history) if h["op"] == "rollback")
    assert last["rule"] == HARMFUL_RULE.id and last["evidence"]["without_rule"]["success_rate"] == 1.0
    assert (tmp_path / "telemetry.db").stat().st_size > 0  # noqa: ASYNC240
