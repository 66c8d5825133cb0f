"""The autonomous loop: measure, watch, analyze, validate, apply, roll back.

One `OptimizationLoop.run_once()`:

1. **Measure** the KPIs under the rules in force by replaying the scenarios through the gateway
   (`Runner`, cache emptied first): success rate, tool calls (upstream), time.
2. **Watch**: compare with the KPIs accepted at the end of the previous run (kept in the rule
   file's `state`). If a criterion that passed then fails now, or a KPI degraded by more than
   `rollback_threshold` (success rate: absolute drop; calls and time: relative rise, time
   confirmed by a second measurement), find the culprit: the rules in force are taken out one at
   a time, newest first, and the first whose removal clears the degradation is rolled back (when
   a criterion, the success rate or calls degraded, clearing those is what counts: time alone
   varies with the machine's load between runs).
3. **Analyze** telemetry rows (`rows()`, e.g. the SQLite store over `optimization.window`), or the
   replay's own traces when there are none, and collect the proposed rules allowed at
   `optimization.level` that are not already in the rule file.
4. **Validate** each proposal in the same run: replay with the rules in force plus the proposal.
   It is applied only if no criterion newly fails, no KPI degrades by more than
   `rollback_threshold`, and calls or time improve by at least `min_improvement` on the
   scenarios the rule touches (time gains are re-measured once to rule out noise; a time loss
   vetoes a cut in calls or round trips only if each of up to `VETO_PAIRS` alternating replay
   pairs shows it).
5. **Accept**: the final KPIs and criterion outcomes become the reference for the next watch.

**Canary rollout** (`optimization.canary`, on by default): a rule applied in step 4 first serves
`share` of the calls it matches (`mcpopt.pipeline.rules.Rollout`). Each run then reviews every rule
still in canary against live telemetry (`live_rows`: the serving gateway's store, the rows since
the canary started): the canary arm against the rest, errors and latency
(`mcpopt.optimize.canary.review`); it promotes the rule to all calls or rolls it back, with the
evidence in the rule file's history, `mcpopt rules` and the report.

With `auto_improvement: false` (and `apply=False`), steps 4-5 still run and report what would be
applied, but nothing is written. Every change and rollback is logged (Python logging, the rule
file's history and `LoopReport.events`) with its evidence: KPIs before and after, criteria newly
failing, the finding that proposed it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mcpopt.optimize.analyzer import Analysis, Analyzer
from mcpopt.optimize.canary import review
from mcpopt.optimize.runner import Progress, Runner, SuiteRun, newly_failing
from mcpopt.optimize.scenarios import Scenario
from mcpopt.optimize.settings import OptimizationSettings, level_allows
from mcpopt.pipeline.rules import Rollout, Rule, RulesFilter, RuleStore

logger = logging.getLogger(__name__)

TIME_FLOOR_MS = 20.0
"""Time differences below this (per affected scenario set) are noise, never a gain or a loss."""
VETO_PAIRS = 3
"""Alternating (without, with) replay pairs that must all show a time loss before it vetoes a
rule that cuts calls or round trips (see `_validate`)."""


@dataclass
class LoopEvent:
    kind: str
    """measured | applied | rejected | would_apply | rolled_back | would_roll_back | degraded |
    unexplained | promoted | would_promote | canary (a rule in canary awaits more traffic)."""
    rule: str | None
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"ts": self.ts, "kind": self.kind, "rule": self.rule, "reason": self.reason, "evidence": self.evidence}


@dataclass
class LoopReport:
    before: SuiteRun | None = None
    after: SuiteRun | None = None
    analysis: Analysis | None = None
    events: list[LoopEvent] = field(default_factory=list)
    suites: list[SuiteRun] = field(default_factory=list)

    @property
    def applied(self) -> list[str]:
        return [e.rule for e in self.events if e.kind == "applied" and e.rule]

    @property
    def rolled_back(self) -> list[str]:
        return [e.rule for e in self.events if e.kind == "rolled_back" and e.rule]

    @property
    def promoted(self) -> list[str]:
        return [e.rule for e in self.events if e.kind == "promoted" and e.rule]

    def change(self) -> dict[str, float]:
        """Relative change before -> after: `calls`, `time` (negative = fewer/faster), `success` (absolute)."""
        if self.before is None or self.after is None:
            return {}
        b, a = self.before.kpis(), self.after.kpis()
        return {
            "calls": _rel(a["calls"], b["calls"]),
            "time": _rel(a["time_ms"], b["time_ms"]),
            "success": a["success_rate"] - b["success_rate"],
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before.kpis() if self.before else None,
            "after": self.after.kpis() if self.after else None,
            "change": {k: round(v, 4) for k, v in self.change().items()},
            "applied": self.applied,
            "rolled_back": self.rolled_back,
            "promoted": self.promoted,
            "events": [e.to_dict() for e in self.events],
        }


def _rel(new: float, old: float) -> float:
    return (new - old) / old if old else 0.0


def _affected(rule: Rule, scenarios: Sequence[Scenario], gateway: Any) -> set[str]:
    routes = gateway.catalog.tool_routes
    out = set()
    for sc in scenarios:
        for step in sc.steps:
            route = routes.get(step.tool)
            if route is not None and rule.condition.matches_tool(route.server, route.name):
                out.add(sc.id)
    return out


def _gain(before_ms: float, after_ms: float) -> float:
    """Relative time saved (negative: lost); differences under `TIME_FLOOR_MS` count as none."""
    if before_ms <= 0 or abs(before_ms - after_ms) < TIME_FLOOR_MS:
        return 0.0
    return (before_ms - after_ms) / before_ms


def _merge(current: SuiteRun, partial: SuiteRun) -> SuiteRun:
    """`current` with the scenarios `partial` re-ran replaced by their new runs."""
    new = {r.scenario.id: r for r in partial.runs}
    merged = SuiteRun(current.mode, partial.label, [new.get(r.scenario.id, r) for r in current.runs])
    merged.rules = partial.rules
    return merged


def _subset(run: SuiteRun, ids: set[str]) -> tuple[int, float]:
    rs = [r for r in run.ran if r.scenario.id in ids]
    return sum(r.upstream_calls for r in rs), sum(r.total_ms for r in rs)


def _trips(run: SuiteRun, ids: set[str]) -> int:
    """Client round trips (tool calls the client made) on the scenarios `ids`."""
    return sum(r.client_calls for r in run.ran if r.scenario.id in ids)


class OptimizationLoop:
    """The loop over one in-process gateway (see the module doc).

    Args:
        gateway: a running `Gateway` whose pipeline holds `rules_filter`.
        rules_filter: the `RulesFilter` in that pipeline.
        store: the rule file.
        scenarios: replayed to measure and validate.
        settings: `optimization` settings (level, thresholds).
        runner: the scenario runner (default: `Runner(gateway, rules=...)`).
        rows: returns (or returns an awaitable of) telemetry rows to analyze (None, or no rows:
            analyze the replay's own traces).
        analyzer: the `Analyzer` (default: one without tool facts).
        progress: called after each scenario of each replay.
        live_rows: `async (since) -> rows` of live telemetry from Unix time `since` (the canary
            evidence); None: canaries wait (or are promoted after `canary.max_age`).
    """

    def __init__(
        self,
        gateway: Any,
        rules_filter: RulesFilter,
        store: RuleStore,
        scenarios: Sequence[Scenario],
        settings: OptimizationSettings | None = None,
        *,
        runner: Runner | None = None,
        rows: Callable[[], Any] | None = None,
        analyzer: Analyzer | None = None,
        progress: Progress | None = None,
        live_rows: Callable[[float], Any] | None = None,
    ) -> None:
        self.gateway = gateway
        self.filter = rules_filter
        self.store = store
        self.scenarios = list(scenarios)
        self.settings = settings or OptimizationSettings()
        self.runner = runner or Runner(gateway, rules=lambda: self.filter.ruleset)
        self.rows = rows
        self.analyzer = analyzer or Analyzer()
        self.progress = progress
        self.live_rows = live_rows

    # ---- measuring ----------------------------------------------------------------------
    async def measure(self, rules: Sequence[Rule], label: str, scenarios: Sequence[Scenario] | None = None) -> SuiteRun:
        """Replay the scenarios (default: all) with exactly `rules` in force, then restore the file's rules."""
        self.filter.set_rules(rules)
        try:
            return await self.runner.run(
                self.scenarios if scenarios is None else scenarios, "gateway", label=label, progress=self.progress
            )
        finally:
            self.filter.set_rules(self.store.active())

    def _degradation(
        self, before: Mapping[str, float], after: SuiteRun, outcomes: Mapping[str, Mapping[str, bool]] | None = None
    ) -> tuple[list[str], dict[str, float]]:
        """(reasons, {kpi: degradation}) of `after` against reference KPIs (and criterion outcomes)."""
        a = after.kpis()
        deltas = {
            "success_rate": before["success_rate"] - a["success_rate"],
            "calls": _rel(a["calls"], before["calls"]),
            "time": _rel(a["time_ms"], before["time_ms"]) if a["time_ms"] - before["time_ms"] > TIME_FLOOR_MS else 0.0,
        }
        t = self.settings.rollback_threshold
        reasons = [f"{k} degraded by {v:.1%} (> {t:.0%})" for k, v in deltas.items() if v > t]
        if outcomes is not None:
            reasons += [f"criterion newly fails: {x}" for x in newly_failing(outcomes, after)]
        return reasons, deltas

    # ---- the run ------------------------------------------------------------------------
    async def run_once(self, *, apply: bool | None = None) -> LoopReport:
        """One pass (see the module doc). `apply` defaults to `optimization.auto_improvement`."""
        apply = self.settings.auto_improvement if apply is None else apply
        report = LoopReport()
        current = await self.measure(self.store.active(), "current")
        report.before = current
        report.suites.append(current)
        report.events.append(LoopEvent("measured", None, "KPIs under the rules in force", {"kpis": current.kpis()}))
        accepted = self.store.state.get("accepted")
        if accepted:
            current = await self._watch(current, accepted, report, apply)
        await self.review_canaries(report, apply)
        proposals = await self._proposals(current, report)
        changes = 0
        for rule in proposals:
            if changes >= self.settings.max_changes_per_run:
                break
            cand = await self._validate(rule, current, report, apply)
            if cand is not None:
                current = cand
                changes += 1
        report.after = current
        if apply:
            self.store.state["accepted"] = {
                "kpis": current.kpis(),
                "outcomes": current.outcomes(),
                "rules": [r.id for r in self.store.active()],
                "ts": time.time(),
            }
            self.store.save()
        return report

    async def review_canaries(self, report: LoopReport, apply: bool) -> None:
        """Promote or roll back the rules in canary from live telemetry (see the module doc)."""
        canaries = [r for r in self.store.active() if r.in_canary]
        if not canaries:
            return
        rows: list[Mapping[str, Any]] = []
        if self.live_rows is not None:
            since = min(r.rollout.started for r in canaries if r.rollout is not None)
            got = self.live_rows(since)
            rows = list(await got) if inspect.isawaitable(got) else list(got)
        for rule in canaries:
            verdict = review(
                rule,
                rows,
                self.settings.canary,
                rollback_threshold=self.settings.rollback_threshold,
                min_improvement=self.settings.min_improvement,
            )
            evidence = {"verdict": verdict.decision, **verdict.evidence}
            why = f"canary: {verdict.reason}"
            if verdict.decision == "rollback":
                if apply:
                    self.store.rollback(rule.id, reason=why, evidence=evidence)
                    self.filter.set_rules(self.store.active())
                    logger.warning("optimize: rolled back %s: %s", rule.id, why)
                report.events.append(LoopEvent("rolled_back" if apply else "would_roll_back", rule.id, why, evidence))
            elif verdict.decision == "promote":
                if apply:
                    self.store.promote(rule.id, why, evidence)
                    self.filter.set_rules(self.store.active())
                    logger.info("optimize: promoted %s: %s", rule.id, why)
                report.events.append(LoopEvent("promoted" if apply else "would_promote", rule.id, why, evidence))
            else:
                report.events.append(LoopEvent("canary", rule.id, why, evidence))

    async def _watch(self, current: SuiteRun, accepted: Mapping[str, Any], report: LoopReport, apply: bool) -> SuiteRun:
        reasons, deltas = self._degradation(accepted["kpis"], current, accepted.get("outcomes"))
        if reasons and all(r.startswith("time") for r in reasons):
            # Time alone: measure again and keep the better run (noise only ever slows a run down).
            again = await self.measure(self.store.active(), "current (confirm)")
            report.suites.append(again)
            if again.total_ms < current.total_ms:
                current = again
            reasons, deltas = self._degradation(accepted["kpis"], current, accepted.get("outcomes"))
        if not reasons:
            return current
        report.events.append(
            LoopEvent("degraded", None, "; ".join(reasons), {"accepted": accepted["kpis"], "now": current.kpis()})
        )
        logger.warning("optimize: KPIs degraded since the last accepted state: %s", "; ".join(reasons))
        # A criterion that newly fails, a lower success rate or more upstream calls are facts of the
        # replay; time is not (the accepted KPIs may come from a quieter machine than this trial).
        # When facts degraded, the culprit is the rule whose removal clears the facts: judging the
        # trial on time too would let load alone veto the rollback of a rule that breaks a criterion.
        facts = any(not r.startswith("time") for r in reasons)
        newest_first = self._newest_first(self.store.active())
        for rule in newest_first:
            rest = [r for r in self.store.active() if r.id != rule.id]
            trial = await self.measure(rest, f"without {rule.id}")
            report.suites.append(trial)
            still, _ = self._degradation(accepted["kpis"], trial, accepted.get("outcomes"))
            if facts:
                still = [r for r in still if not r.startswith("time")]
            if still:
                continue
            evidence = {
                "reasons": reasons,
                "deltas": {k: round(v, 4) for k, v in deltas.items()},
                "accepted": accepted["kpis"],
                "with_rule": current.kpis(),
                "without_rule": trial.kpis(),
            }
            if apply:
                self.store.rollback(rule.id, reason="KPIs degraded: " + "; ".join(reasons), evidence=evidence)
                self.filter.set_rules(self.store.active())
            report.events.append(
                LoopEvent("rolled_back" if apply else "would_roll_back", rule.id, "; ".join(reasons), evidence)
            )
            logger.warning("optimize: rolled back %s: %s", rule.id, "; ".join(reasons))
            return trial
        report.events.append(
            LoopEvent(
                "unexplained", None, "no single rule explains the degradation (environment?)", {"reasons": reasons}
            )
        )
        return current

    def _newest_first(self, rules: Sequence[Rule]) -> list[Rule]:
        order: dict[str, int] = {}
        for i, h in enumerate(self.store.history):
            if h.get("op") in ("add", "enable") and h.get("rule"):
                order[h["rule"]] = i
        return sorted(rules, key=lambda r: -order.get(r.id, -1))

    async def _proposals(self, current: SuiteRun, report: LoopReport) -> list[Rule]:
        rows: Sequence[Mapping[str, Any]] = []
        if self.rows is not None:
            got = self.rows()
            rows = list(await got) if inspect.isawaitable(got) else list(got)
        if not rows:
            rows = current.traces
        analysis = self.analyzer.analyze(rows)
        report.analysis = analysis
        known = {r.id for r in self.store.rules}
        routes = self.gateway.catalog.tool_routes.values()
        out = []
        for rule in analysis.proposals():
            if rule.id in known or not any(rule.condition.matches_tool(r.server, r.name) for r in routes):
                continue  # already decided, or about a server this gateway does not serve
            if not level_allows(self.settings.level, rule.level):
                report.events.append(
                    LoopEvent(
                        "skipped", rule.id, f"level {rule.level} is above optimization.level {self.settings.level}"
                    )
                )
                continue
            out.append(rule)
        return out

    async def _validate(self, rule: Rule, current: SuiteRun, report: LoopReport, apply: bool) -> SuiteRun | None:
        """Replay the scenarios `rule` touches with and without it; apply it if it pays (module doc)."""
        affected = _affected(rule, self.scenarios, self.gateway)
        evidence: dict[str, Any] = {"finding": rule.evidence, "affected_scenarios": sorted(affected)}
        if not affected:
            report.events.append(LoopEvent("rejected", rule.id, "no scenario exercises it: cannot validate", evidence))
            return None
        scs = [sc for sc in self.scenarios if sc.id in affected]
        rules = [*self.store.active(), rule]
        cand = await self.measure(rules, f"with {rule.id}", scs)
        report.suites.append(cand)
        broken = newly_failing(current, cand)
        c0, t0 = _subset(current, affected)
        c1, t1 = _subset(cand, affected)
        calls_gain = (c0 - c1) / c0 if c0 else 0.0
        time_gain = _gain(t0, t1)
        # Fewer round trips (a workflow, a batch) is a gain of its own: each is a model turn.
        r0, r1 = _trips(current, affected), _trips(cand, affected)
        trips_gain = (r0 - r1) / r0 if r0 else 0.0
        if not broken and (
            time_gain < -self.settings.rollback_threshold or max(calls_gain, trips_gain) < self.settings.min_improvement
        ):
            # Time decides (or vetoes) here: measure both sides again, under the same load, and
            # keep each side's best (the least disturbed) time.
            base = await self.measure(self.store.active(), f"without {rule.id} (confirm)", scs)
            again = await self.measure(rules, f"with {rule.id} (confirm)", scs)
            report.suites += [base, again]
            broken = newly_failing(current, again)
            pair = _gain(_subset(base, affected)[1], _subset(again, affected)[1])
            t0 = min(t0, _subset(base, affected)[1])
            t1 = min(t1, _subset(again, affected)[1])
            time_gain = _gain(t0, t1)
            # Fewer calls or round trips is a fact of the replay; a time loss is a measurement,
            # and a burst of load on a shared machine slows whichever side it hits. Such a loss
            # vetoes the factual gain only if every adjacent, alternating pair of replays shows
            # it; the least disturbed pair is the time gain reported.
            extra = 0
            while (
                not broken
                and max(calls_gain, trips_gain) >= self.settings.min_improvement
                and pair < -self.settings.rollback_threshold
                and extra < VETO_PAIRS - 1
            ):
                extra += 1
                base = await self.measure(self.store.active(), f"without {rule.id} (confirm {extra + 1})", scs)
                again = await self.measure(rules, f"with {rule.id} (confirm {extra + 1})", scs)
                report.suites += [base, again]
                broken = newly_failing(current, again)
                pair = _gain(_subset(base, affected)[1], _subset(again, affected)[1])
            # The pair only lifts a veto on a factual gain (fewer calls or round trips); with no
            # such gain, time alone decides, by each side's best replay (one pair is no gain).
            factual = max(calls_gain, trips_gain) >= self.settings.min_improvement
            if factual and pair >= -self.settings.rollback_threshold:
                time_gain = max(time_gain, pair)
        evidence.update(
            {
                "before": {"calls": c0, "time_ms": round(t0, 3)},
                "after": {"calls": c1, "time_ms": round(t1, 3)},
                "calls_gain": round(calls_gain, 4),
                "time_gain": round(time_gain, 4),
                "round_trips": {"before": r0, "after": r1},
                "round_trips_gain": round(trips_gain, 4),
                "newly_failing": broken,
            }
        )
        t = self.settings.rollback_threshold
        why = ""
        if broken:
            why = f"criteria newly fail: {'; '.join(broken)}"
        elif calls_gain < -t or time_gain < -t:
            why = f"KPIs degrade (calls {calls_gain:+.1%}, time {time_gain:+.1%})"
        elif max(calls_gain, time_gain, trips_gain) < self.settings.min_improvement:
            why = (
                f"gain below {self.settings.min_improvement:.0%} (calls {calls_gain:+.1%}, time {time_gain:+.1%}, "
                f"round trips {trips_gain:+.1%})"
            )
        if why:
            report.events.append(LoopEvent("rejected", rule.id, why, evidence))
            logger.info("optimize: rejected %s: %s", rule.id, why)
            return None
        why = f"{calls_gain:.1%} fewer calls, {time_gain:.1%} less time on {len(affected)} scenario(s)"
        if trips_gain:
            why += f", {trips_gain:.1%} fewer round trips"
        canary = self.settings.canary
        if canary.enabled:
            rule = rule.model_copy(update={"rollout": Rollout(share=canary.share, seed=canary.seed)})
            why += f"; in canary on {canary.share:.0%} of its calls"
        if apply:
            self.store.add(rule, reason=why, evidence=evidence)
            self.filter.set_rules(self.store.active())
            logger.info("optimize: applied %s: %s", rule.id, why)
        report.events.append(LoopEvent("applied" if apply else "would_apply", rule.id, why, evidence))
        return _merge(current, cand) if apply else current

    async def run_forever(self, interval_s: float, on_report: Callable[[LoopReport], None] | None = None) -> None:
        """`run_once` every `interval_s` seconds until cancelled (a failing run is logged, not fatal)."""
        while True:
            try:
                report = await self.run_once()
                if on_report is not None:
                    on_report(report)
            except Exception:  # noqa: BLE001 - the schedule goes on; the next run may succeed
                logger.exception("optimize: a run failed")
            await asyncio.sleep(interval_s)
