"""Canary rollout from live traffic: a harmful rule at a 20% share is rolled back, a helpful one promoted.

The traffic is real (calls through a gateway to a fixture server, recorded by telemetry in SQLite);
the difference between the arms is injected by the server, so the verdict never depends on the
machine's speed: the harmful rule is a 20 ms timeout on calls the server answers after 150 ms
(every canary call fails, every control call succeeds), the helpful one a cache TTL on calls the
server answers after 80 ms (canary calls are served from the cache). The split is seeded.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError

from conftest import MCPOPT
from mcpopt.api import ClientLink, no_progress
from mcpopt.config import CanarySettings, OptimizationSettings, load_config
from mcpopt.gateway.assembly import build_gateway
from mcpopt.optimize.canary import mann_whitney_p, review, two_proportion_p
from mcpopt.optimize.loop import LoopReport, OptimizationLoop
from mcpopt.pipeline.rules import Action, Condition, Rollout, Rule, RulesFilter, RuleStore, rules_summary
from mcpopt.telemetry.store import Store

pytestmark = pytest.mark.anyio
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_the_statistics_point_the_right_way() -> None:
    assert two_proportion_p(20, 20, 0, 80) < 1e-6
    assert two_proportion_p(0, 20, 0, 80) == 1.0
    assert two_proportion_p(2, 20, 8, 80) > 0.3  # the same rate: no evidence
    fast, slow = [0.1 * i for i in range(1, 21)], [80 + i for i in range(40)]
    assert mann_whitney_p(fast, slow) < 1e-6 and mann_whitney_p(slow, fast) > 0.999
    assert mann_whitney_p([1.0] * 10, [1.0] * 10) == 1.0


def rules_list(config: Path, rules_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MCPOPT, "rules", "list", "-c", str(config), "--rules", str(rules_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "400"},
    )


def rule(rule_id: str, kind: str, action: Action) -> Rule:
    return Rule(
        id=rule_id,
        condition=Condition(server="ledger", tool="sleep_read", args={"kind": kind}),
        action=action,
        source="analyzer",
        rollout=Rollout(share=0.2, seed=7),
    )


async def test_a_harmful_canary_is_rolled_back_and_a_helpful_one_promoted(tmp_path: Path) -> None:
    rules_path, db = tmp_path / "rules.json", tmp_path / "telemetry.db"
    store = RuleStore(rules_path)
    store.add(rule("timeout:sleep_read", "slow", Action(type="timeout", timeout_ms=20)), reason="applied")
    store.add(rule("cache_ttl:sleep_read", "cached", Action(type="cache_ttl", ttl_ms=600_000)), reason="applied")
    data = {
        "mcpServers": {
            "ledger": {
                "command": sys.executable,
                "args": [str(FIXTURES / "ledger_server.py")],
                "env": {"LEDGER_FILE": str(tmp_path / "ledger")},
            }
        },
        "gateway": {
            "telemetry": {"sqlite_path": str(db), "data_dir": str(tmp_path)},
            "optimization": {"rules_path": str(rules_path)},
        },
    }
    link = ClientLink("2025-06-18", None, None, None, lambda _t: no_progress, session_id="live")
    outcomes: dict[str, list[bool]] = {"slow": [], "cached": []}
    gw = build_gateway(load_config(data=data))
    async with gw.running():

        async def one(kind: str, ms: int) -> None:
            params = {"name": "ledger__sleep_read", "arguments": {"kind": kind, "ms": ms}}
            try:
                result = await gw.call_tool(params, link)
                outcomes[kind].append(not result.get("isError"))
            except MCPError:
                outcomes[kind].append(False)

        for _ in range(10):  # 100 calls of each kind, 10 in flight at a time
            await asyncio.gather(*(one("slow", 150) for _ in range(10)))
            await asyncio.gather(*(one("cached", 80) for _ in range(10)))
        await gw.telemetry.flush()
    reader = Store(db, readonly=True)
    rows = list(reader.calls())
    reader.close()
    assert len(rows) == 200
    # The live gateway split each rule's calls by its seeded share: about 20% in the canary arm.
    slow_canary = sum("timeout:sleep_read=canary" in (r["variant"] or "") for r in rows)
    assert 10 <= slow_canary <= 35 and outcomes["slow"].count(False) == slow_canary
    settings = OptimizationSettings(canary=CanarySettings(min_calls=10))
    loop = OptimizationLoop(gw, RulesFilter(store, canary=False), store, [], settings, live_rows=lambda since: rows)
    report = LoopReport()
    await loop.review_canaries(report, apply=True)
    assert report.rolled_back == ["timeout:sleep_read"] and report.promoted == ["cache_ttl:sleep_read"]
    fresh = RuleStore(rules_path)
    assert {r.id for r in fresh.active()} == {"cache_ttl:sleep_read"}
    promoted = fresh.get("cache_ttl:sleep_read")
    assert promoted.rollout is not None and promoted.rollout.state == "promoted"
    summary = {r["id"]: r for r in rules_summary(fresh.rules)}
    assert summary["cache_ttl:sleep_read"]["rollout"].startswith("promoted: canary: p50")
    history = {h["rule"]: h for h in fresh.history if h["op"] in ("rollback", "promote")}
    harm: dict[str, Any] = history["timeout:sleep_read"]["evidence"]
    assert harm["canary"]["error_rate"] == 1.0 and harm["control"]["error_rate"] == 0.0 and harm["errors_p"] < 0.01
    help_: dict[str, Any] = history["cache_ttl:sleep_read"]["evidence"]
    assert help_["canary"]["p50_ms"] < help_["control"]["p50_ms"] and help_["faster_p"] < 0.01
    # `mcpopt rules list` shows both decisions with their reasons.
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("mcpServers: {}\n", encoding="utf-8")
    shown = rules_list(cfg_file, rules_path)
    assert shown.returncode == 0, shown.stderr
    assert "rolled back: canary: errors 100% on the canary vs 0%" in shown.stdout
    assert "promoted: canary: p50" in shown.stdout


def test_a_canary_waits_for_traffic_then_is_promoted_when_it_grows_old() -> None:
    r = rule("batch_hint:x", "any", Action(type="batch_hint"))
    assert r.rollout is not None
    settings = CanarySettings(min_calls=20, max_age="1h")
    few = [{"ts": r.rollout.started + 1, "variant": "batch_hint:x=canary", "outcome": "ok", "total_ms": 1.0}] * 3
    assert review(r, few, settings, rollback_threshold=0.1, min_improvement=0.05).decision == "wait"
    later = review(r, few, settings, rollback_threshold=0.1, min_improvement=0.05, now=r.rollout.started + 7200)
    assert later.decision == "promote" and "too little traffic" in later.reason
