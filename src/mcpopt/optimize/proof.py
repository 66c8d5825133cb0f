"""The proof (issue 6, item 8): the loop on recorded sessions with injected waste.

1. **Record**: the sessions of `examples/scenarios/proof` (redundant reads, sequential independent
   calls, a SELECT without LIMIT to the real SQLite MCP server, a freshness check) are played
   through the gateway over the real servers of `examples/proof.yaml` (sandboxed), with telemetry
   at the `detailed` level in a SQLite store.
2. **Optimize**: one loop run analyzes those telemetry rows, validates each proposal allowed at
   `level` by replaying the sessions with and without it, and applies what improves the KPIs
   without failing a criterion.
3. **Harm**: a deliberately harmful rule (a 60 s TTL on time's `get_current_time`, which the
   freshness criterion catches) is added by hand, as an operator might.
4. **Watch**: the next loop run sees the criterion fail and rolls that rule back by itself.

`run_proof()` returns the figures; `scripts/proof_optimize.py` prints them (and writes the JSON
and HTML reports); `tests/test_optimize_proof.py` checks them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcpopt.config import load_config
from mcpopt.optimize.loop import LoopReport
from mcpopt.optimize.scenarios import load_scenarios
from mcpopt.optimize.session import OptimizeSession
from mcpopt.optimize.settings import OptimizationSettings
from mcpopt.pipeline.rules import Action, Condition, Rule

ROOT = Path(__file__).resolve().parents[3]
HARMFUL_RULE = Rule(
    id="cache_ttl:time/get_current_time",
    name="cache the clock (harmful)",
    description="deliberately harmful: a 60 s TTL on a time-varying tool",
    condition=Condition(server="time", tool="get_current_time"),
    action=Action(type="cache_ttl", ttl_ms=60_000),
    level="conservative",
    source="manual",
)


@dataclass
class ProofResult:
    recorded: dict[str, Any]
    """KPIs of the recorded sessions."""
    optimize: LoopReport
    harm: LoopReport
    rows: int
    """Telemetry rows analyzed."""
    applied: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def figures(self) -> dict[str, Any]:
        before = self.optimize.before.kpis() if self.optimize.before else {}
        after = self.optimize.after.kpis() if self.optimize.after else {}
        change = self.optimize.change()
        return {
            "before": before,
            "after": after,
            "calls_cut": round(-change.get("calls", 0.0), 4),
            "time_cut": round(-change.get("time", 0.0), 4),
            "criteria_failing_after": sum(not r.ok for r in self.optimize.after.ran) if self.optimize.after else None,
            "applied": self.applied,
            "rejected": [e.rule for e in self.optimize.events if e.kind == "rejected"],
            "harmful_rule": HARMFUL_RULE.id,
            "rolled_back": self.rolled_back,
            "rollback_reason": next((e.reason for e in self.harm.events if e.kind == "rolled_back"), None),
            "telemetry_rows": self.rows,
            "seconds": round(self.seconds, 1),
        }


async def run_proof(
    workdir: str | Path,
    *,
    config: str | Path | None = None,
    scenarios: str | Path | None = None,
    level: str = "moderate",
) -> ProofResult:
    """Run the proof (see the module doc) with its files (rules, telemetry) in `workdir`.

    Raises:
        ConfigError / ScenarioError: the config or scenarios are invalid.
    """
    t0 = time.perf_counter()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    cfg = load_config(config or ROOT / "examples" / "proof.yaml")
    scs = load_scenarios([scenarios or ROOT / "examples" / "scenarios" / "proof"])
    settings = OptimizationSettings(auto_improvement=True, level=level)  # type: ignore[arg-type]
    session = OptimizeSession(
        cfg, settings=settings, rules_path=work / "rules.json", sandbox=True, telemetry_path=work / "telemetry.db"
    )
    async with session.open():
        assert session.runner is not None
        started = time.time()
        recorded = await session.runner.run(scs, "gateway", label="recorded")
        rows = len(await session.rows(started))
        loop = session.loop(scs, since=started)
        optimize = await loop.run_once()
        session.store.add(HARMFUL_RULE, reason="deliberately harmful rule (proof): a TTL on a time-varying tool")
        session.rules_filter.set_rules(session.store.active())
        harm = await loop.run_once()
    return ProofResult(
        recorded.kpis(),
        optimize,
        harm,
        rows,
        optimize.applied,
        harm.rolled_back,
        time.perf_counter() - t0,
    )
