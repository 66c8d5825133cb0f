"""The optimization loop on a noisy machine: load slows whole replays, and the loop's verdicts hold.

No servers: a scripted runner replays one scenario with the rules in force deciding the facts
(upstream calls, whether the freshness criterion passes) and a script deciding the time of each
replay (the "load" of a shared machine, by replay label). That makes the noise exact, so these
tests pin how the loop tells load from a rule's effect -- the cause of
`test_optimize_proof` failing on a busy machine (a harmful rule not rolled back, cache rules
vetoed by one slow replay).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mcpopt.optimize.loop import VETO_PAIRS, OptimizationLoop
from mcpopt.optimize.runner import CriterionRun, ScenarioRun, SuiteRun
from mcpopt.optimize.scenarios import Scenario, parse_scenario
from mcpopt.optimize.settings import OptimizationSettings
from mcpopt.pipeline.rules import Action, Condition, Rule, RulesFilter, RuleStore

pytestmark = pytest.mark.anyio

CACHE = Rule(
    id="cache_ttl:srv/read",
    condition=Condition(server="srv", tool="read"),
    action=Action(type="cache_ttl", ttl_ms=60_000),
    source="analyzer",
)
STALE = Rule(
    id="cache_ttl:srv/clock",
    condition=Condition(server="srv", tool="clock"),
    action=Action(type="cache_ttl", ttl_ms=60_000),
    source="manual",
)
SCENARIO = parse_scenario({"id": "s1", "steps": [{"id": "a", "tool": "srv__read"}, {"id": "b", "tool": "srv__clock"}]})
GATEWAY = SimpleNamespace(
    catalog=SimpleNamespace(
        tool_routes={
            "srv__read": SimpleNamespace(server="srv", name="read"),
            "srv__clock": SimpleNamespace(server="srv", name="clock"),
        }
    )
)


class ScriptedRunner:
    """Facts from the rules in force; time = `ms(label, rule ids)` (the script of the load)."""

    def __init__(self, ms: Callable[[str, set[str]], float]) -> None:
        self.ms = ms
        self.filter: RulesFilter | None = None
        self.labels: list[str] = []

    async def run(self, scenarios: Sequence[Scenario], mode: str, *, label: str = "", progress: Any = None) -> SuiteRun:
        assert self.filter is not None
        ids = {r.id for r in self.filter.ruleset.rules}
        self.labels.append(label)
        calls = 2 if CACHE.id in ids else 4  # the cache serves the repeated reads
        fresh = CriterionRun("the clock moves", STALE.id not in ids)
        runs = [ScenarioRun(sc, mode, label, [], [fresh], self.ms(label, ids), calls, calls) for sc in scenarios]
        return SuiteRun(mode, label, runs)


def make_loop(tmp_path: Path, ms: Callable[[str, set[str]], float], proposals: list[Rule]) -> Any:
    store = RuleStore(tmp_path / "rules.json")
    flt = RulesFilter(store, canary=False)
    runner = ScriptedRunner(ms)
    runner.filter = flt
    analyzer = SimpleNamespace(analyze=lambda rows: SimpleNamespace(proposals=lambda: list(proposals)))
    settings = OptimizationSettings(auto_improvement=True, canary={"enabled": False})
    loop = OptimizationLoop(GATEWAY, flt, store, [SCENARIO], settings, runner=runner, analyzer=analyzer)  # type: ignore[arg-type]
    return loop, store, runner


async def test_one_slow_replay_does_not_veto_a_rule_that_cuts_calls(tmp_path: Path) -> None:
    """The first two replays with the rule ran during a burst of load (3x slower); the next pair,
    under the same load on both sides, shows no loss: the rule's cut in calls is applied."""

    def ms(label: str, ids: set[str]) -> float:
        burst = label in (f"with {CACHE.id}", f"with {CACHE.id} (confirm)")
        return 300.0 * (3 if burst else 1)

    loop, store, runner = make_loop(tmp_path, ms, [CACHE])
    report = await loop.run_once()
    assert report.applied == [CACHE.id], [e.to_dict() for e in report.events]
    assert f"with {CACHE.id} (confirm 2)" in runner.labels  # it measured again before deciding
    assert store.get(CACHE.id).enabled


async def test_a_rule_slower_in_every_pair_is_still_vetoed(tmp_path: Path) -> None:
    """A real slowdown (every replay with the rule 50% slower) is not noise: rejected, after
    `VETO_PAIRS` alternating pairs all showed it."""

    def ms(label: str, ids: set[str]) -> float:
        return 300.0 * (1.5 if CACHE.id in ids else 1)

    loop, store, runner = make_loop(tmp_path, ms, [CACHE])
    report = await loop.run_once()
    assert report.applied == []
    rejected = next(e for e in report.events if e.kind == "rejected")
    assert rejected.rule == CACHE.id and "KPIs degrade" in rejected.reason
    assert sum(label.startswith(f"with {CACHE.id}") for label in runner.labels) == VETO_PAIRS + 1
    assert store.rules == []


async def test_a_rule_breaking_a_criterion_is_rolled_back_though_load_slowed_everything(tmp_path: Path) -> None:
    """Accepted on a quiet machine (300 ms); the harmful rule is added and the machine gets busy
    (every replay 2x slower): removing the rule clears the failing criterion but not the time, and
    the rule is rolled back all the same (the time is the machine's, not the rule's)."""
    load = {"factor": 1.0}

    def ms(label: str, ids: set[str]) -> float:
        return 300.0 * load["factor"]

    loop, store, _runner = make_loop(tmp_path, ms, [])
    first = await loop.run_once()
    assert first.rolled_back == [] and store.state["accepted"]["kpis"]["time_ms"] == 300.0
    store.add(STALE, reason="by hand")
    loop.filter.set_rules(store.active())
    load["factor"] = 2.0
    report = await loop.run_once()
    assert report.rolled_back == [STALE.id], [e.to_dict() for e in report.events]
    assert store.get(STALE.id).enabled is False
    rolled = next(e for e in report.events if e.kind == "rolled_back")
    assert "criterion newly fails" in rolled.reason and rolled.evidence["without_rule"]["success_rate"] == 1.0


NOOP = Rule(
    id="cache_ttl:srv/read#noop",
    condition=Condition(server="srv", tool="read"),
    action=Action(type="cache_ttl", ttl_ms=60_000),
    source="analyzer",
)
"""Matches a step but changes no fact: calls and round trips stay as they are (the runner's
facts follow `CACHE.id` only)."""


async def test_one_fast_confirm_pair_does_not_apply_a_rule_with_no_factual_gain(tmp_path: Path) -> None:
    """A rule that cuts neither calls nor round trips is judged on time alone, by each side's
    best replay: here both sides' best is 300 ms (no gain). The one confirm pair whose "without"
    replay hit a burst of load (600 ms) must not be taken as a 50% time gain -- the pair only
    lifts a time veto on a factual gain, it is no gain of its own."""

    def ms(label: str, ids: set[str]) -> float:
        return 600.0 if label == f"without {NOOP.id} (confirm)" else 300.0

    loop, store, runner = make_loop(tmp_path, ms, [NOOP])
    report = await loop.run_once()
    assert f"without {NOOP.id} (confirm)" in runner.labels  # the noisy pair was measured
    assert report.applied == [], [e.to_dict() for e in report.events]
    rejected = next(e for e in report.events if e.kind == "rejected")
    assert rejected.rule == NOOP.id and "gain below" in rejected.reason
    assert rejected.evidence["time_gain"] == 0.0
    assert store.rules == []
