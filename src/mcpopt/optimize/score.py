"""The efficiency score, per session (scenario run) and per task type.

    score = 100 x (0.5 x success + 0.3 x call efficiency + 0.2 x time efficiency)

The weights are the issue's (from the documents mcpopt comes from): success rate 50%, call
efficiency 30%, time efficiency 20%. Each part is in 0..1:

- success: the share of the scenario's criteria that pass (each step's success included); for a
  session without criteria, the share of its calls that did not fail.
- call efficiency: calls needed / calls made, capped at 1. Calls needed is the scenario's
  `expected_call_count` when it has one, else the calls left after the analyzer's fixes (the
  fewest upstream calls any run of that scenario needed).
- time efficiency: reference time / time taken, capped at 1. The reference is the scenario's
  `expected_total_time` when it has one, else the baseline run's time (so a run slower than the
  baseline scores below 1, one at least as fast scores 1).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mcpopt.optimize.runner import ScenarioRun, SuiteRun

WEIGHTS = {"success": 0.5, "calls": 0.3, "time": 0.2}


@dataclass
class Score:
    success: float
    call_efficiency: float
    time_efficiency: float

    @property
    def total(self) -> float:
        """0..100."""
        return 100 * (
            WEIGHTS["success"] * self.success
            + WEIGHTS["calls"] * self.call_efficiency
            + WEIGHTS["time"] * self.time_efficiency
        )

    def to_dict(self) -> dict[str, float]:
        return {
            "score": round(self.total, 1),
            "success": round(self.success, 4),
            "call_efficiency": round(self.call_efficiency, 4),
            "time_efficiency": round(self.time_efficiency, 4),
        }


def efficiency(success: float, calls_needed: float, calls_made: float, reference_ms: float, taken_ms: float) -> Score:
    """A `Score` from its raw parts (calls as counts, times in ms)."""
    calls = 1.0 if calls_made <= 0 else min(1.0, max(0.0, calls_needed) / calls_made)
    time = 1.0 if taken_ms <= 0 else min(1.0, max(0.0, reference_ms) / taken_ms)
    return Score(max(0.0, min(1.0, success)), calls, time)


def scenario_score(run: ScenarioRun, *, calls_needed: float | None = None, reference_ms: float | None = None) -> Score:
    """Score one scenario run (see the module doc for the references)."""
    sc = run.scenario
    crits = run.criteria
    success = sum(c.ok for c in crits) / len(crits) if crits else 1.0
    needed = float(sc.expected_call_count) if sc.expected_call_count is not None else calls_needed
    ref = sc.expected_total_time * 1000 if sc.expected_total_time is not None else reference_ms
    return efficiency(
        success,
        needed if needed is not None else run.upstream_calls,
        run.upstream_calls,
        ref if ref is not None else run.total_ms,
        run.total_ms,
    )


def suite_scores(runs: Sequence[SuiteRun], baseline: SuiteRun | None = None) -> dict[str, Any]:
    """Scores of every run of several suites of the same scenarios.

    Returns:
        `{suites: {label: {score, success, call_efficiency, time_efficiency}}, scenarios:
        {label: {scenario id: {...}}}, task_types: {label: {task type: {...}}}}`; calls needed
        per scenario = the fewest upstream calls any of `runs` made for it; the reference time is
        `baseline`'s (else the first suite's).
    """
    base = baseline or (runs[0] if runs else None)
    fewest: dict[str, int] = {}
    for suite in runs:
        for r in suite.ran:
            if r.ok:
                fewest[r.scenario.id] = min(fewest.get(r.scenario.id, r.upstream_calls), r.upstream_calls)
    ref_ms = {r.scenario.id: r.total_ms for r in base.ran} if base is not None else {}
    out: dict[str, Any] = {"weights": WEIGHTS, "suites": {}, "scenarios": {}, "task_types": {}}
    for suite in runs:
        per: dict[str, Score] = {}
        for r in suite.ran:
            per[r.scenario.id] = scenario_score(
                r, calls_needed=fewest.get(r.scenario.id), reference_ms=ref_ms.get(r.scenario.id)
            )
        out["scenarios"][suite.label] = {k: v.to_dict() for k, v in per.items()}
        out["suites"][suite.label] = _mean(per.values()).to_dict()
        by_task: dict[str, list[Score]] = defaultdict(list)
        for r in suite.ran:
            by_task[r.scenario.task_type].append(per[r.scenario.id])
        out["task_types"][suite.label] = {t: _mean(v).to_dict() for t, v in sorted(by_task.items())}
    return out


def session_scores(rows: Sequence[Mapping[str, Any]], savings: Mapping[str, int]) -> dict[str, Any]:
    """Scores of recorded sessions (telemetry rows): success = calls that did not fail; calls
    needed = calls made - the analyzer's savings for the session; time efficiency 1 (no baseline).

    Returns `{sessions: {session: {...}}, task_types: {task type: {...}}}`.
    """
    from mcpopt.telemetry.record import ERROR_OUTCOMES

    by_session: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("session"):
            by_session[r["session"]].append(r)
    per: dict[str, Score] = {}
    tasks: dict[str, list[Score]] = defaultdict(list)
    for s, calls in by_session.items():
        made = sum(1 for r in calls if r.get("cache") != "hit")
        ok = sum(r.get("outcome") not in ERROR_OUTCOMES for r in calls) / len(calls)
        score = efficiency(ok, made - savings.get(s, 0), made, 1.0, 1.0)
        per[s] = score
        tasks[next((str(r.get("task_type")) for r in calls if r.get("task_type")), "unknown")].append(score)
    return {
        "sessions": {s: v.to_dict() for s, v in per.items()},
        "task_types": {t: _mean(v).to_dict() for t, v in sorted(tasks.items())},
    }


def _mean(scores: Any) -> Score:
    items = list(scores)
    if not items:
        return Score(1.0, 1.0, 1.0)
    n = len(items)
    return Score(
        sum(s.success for s in items) / n,
        sum(s.call_efficiency for s in items) / n,
        sum(s.time_efficiency for s in items) / n,
    )
