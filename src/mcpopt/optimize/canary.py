"""Canary rollout: decide, from live telemetry, whether a rule in canary is promoted or rolled back.

A rule in canary (`mcpopt.pipeline.rules.Rollout`) applies to a seeded share of the calls it
matches; telemetry records each such call's arm in its `variant` field (`"<rule>=canary"` or
`"<rule>=control"`). `review(rule, rows, ...)` splits the rows since the canary started into the
two arms and compares them:

- **errors**: the canary's error rate (outcomes in `ERROR_OUTCOMES`) minus the control's. Harmful
  when that is more than `rollback_threshold` (absolute, as the loop's success-rate KPI) and a
  one-sided two-proportion z-test (pooled variance; e.g. Agresti, *Categorical Data Analysis*,
  3rd ed., 2013, sec. 2.1) gives p < `alpha`.
- **latency** (`total_ms` of successful calls): harmful when the canary's median is more than
  `rollback_threshold` above the control's and a one-sided Mann-Whitney U test (normal
  approximation with tie correction; Mann & Whitney, Ann. Math. Statist. 18(1), 1947) gives
  p < `alpha`; helpful when its median is at least `min_improvement` below and the test in that
  direction gives p < `alpha`.

Verdicts: `rollback` (harmful), `promote` (helpful; or no measurable effect either way after
`max_calls` canary calls; or too little traffic after `max_age` -- the rule passed its replays),
`wait` (fewer than `min_calls` calls in an arm). Decisions come from counted outcomes and latency
samples, never from a wall-clock threshold of their own.

A `workflow` rule has no per-call arms (clients choose to call the workflow): its canary arm is
the calls its runs made (telemetry `task_type` `workflow:<name>`), its control arm the other calls
of the same tools, and only errors are compared (the calls are the same; what the workflow saves
is round trips, which the replays measured).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mcpopt.config import CanarySettings, parse_duration
from mcpopt.monitor.stats import percentile
from mcpopt.pipeline.rules import Rule
from mcpopt.telemetry.record import ERROR_OUTCOMES


@dataclass
class Verdict:
    decision: str
    """promote | rollback | wait."""
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


def _norm_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def two_proportion_p(x1: int, n1: int, x2: int, n2: int) -> float:
    """One-sided p-value that proportion 1 (x1 of n1) is larger than proportion 2 (x2 of n2).

    Pooled two-proportion z-test; 1.0 when either sample is empty or no variance exists.
    """
    if not n1 or not n2:
        return 1.0
    pooled = (x1 + x2) / (n1 + n2)
    var = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if var <= 0:
        return 1.0 if x1 / n1 <= x2 / n2 else 0.0
    return _norm_sf((x1 / n1 - x2 / n2) / math.sqrt(var))


def mann_whitney_p(a: Sequence[float], b: Sequence[float]) -> float:
    """One-sided p-value that samples `a` tend to be smaller than samples `b` (Mann-Whitney U).

    Normal approximation with continuity and tie correction (adequate from ~10 samples per side);
    1.0 when a side is empty or every value is tied.
    """
    n1, n2 = len(a), len(b)
    if not n1 or not n2:
        return 1.0
    pooled = sorted([(v, 0) for v in a] + [(v, 1) for v in b])
    ranks = [0.0] * len(pooled)
    ties = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        rank = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[k] = rank
        t = j - i + 1
        ties += t**3 - t
        i = j + 1
    r1 = sum(r for r, (_, side) in zip(ranks, pooled, strict=True) if side == 0)
    u1 = r1 - n1 * (n1 + 1) / 2
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        return 1.0
    mean = n1 * n2 / 2
    z = (mean - u1 - 0.5) / math.sqrt(var)  # a smaller -> u1 small -> z large
    return _norm_sf(z)


def arms(rule: Rule, rows: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(canary rows, control rows) of a rule in canary (see the module doc)."""
    canary: list[Mapping[str, Any]] = []
    control: list[Mapping[str, Any]] = []
    started = rule.rollout.started if rule.rollout is not None else 0.0
    if rule.action.type == "workflow":
        task = f"workflow:{(rule.action.workflow or {}).get('name', '')}"
        tools = set(rule.condition.calls)
        for r in rows:
            if float(r.get("ts") or 0.0) < started or f"{r.get('server')}/{r.get('tool')}" not in tools:
                continue
            (canary if r.get("task_type") == task else control).append(r)
        return canary, control
    mark_c, mark_k = f"{rule.id}=canary", f"{rule.id}=control"
    for r in rows:
        variant = r.get("variant") or ""
        if not variant or float(r.get("ts") or 0.0) < started:
            continue
        marks = variant.split(",")
        if mark_c in marks:
            canary.append(r)
        elif mark_k in marks:
            control.append(r)
    return canary, control


def _summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    errors = sum(r.get("outcome") in ERROR_OUTCOMES for r in rows)
    ok_ms = sorted(float(r.get("total_ms") or 0.0) for r in rows if r.get("outcome") not in ERROR_OUTCOMES)
    return {
        "calls": len(rows),
        "errors": errors,
        "error_rate": round(errors / len(rows), 4) if rows else 0.0,
        "p50_ms": round(percentile(ok_ms, 0.5), 3) if ok_ms else None,
        "p95_ms": round(percentile(ok_ms, 0.95), 3) if ok_ms else None,
    }


def review(
    rule: Rule,
    rows: Iterable[Mapping[str, Any]],
    settings: CanarySettings,
    *,
    rollback_threshold: float,
    min_improvement: float,
    now: float | None = None,
) -> Verdict:
    """The verdict on a rule in canary from telemetry rows (see the module doc)."""
    canary, control = arms(rule, rows)
    c, k = _summary(canary), _summary(control)
    evidence: dict[str, Any] = {"canary": c, "control": k, "share": rule.rollout.share if rule.rollout else 1.0}
    started = rule.rollout.started if rule.rollout is not None else 0.0
    age = (now if now is not None else time.time()) - started
    if c["calls"] < settings.min_calls or k["calls"] < settings.min_calls:
        if age > parse_duration(settings.max_age):
            return Verdict("promote", f"too little traffic after {age / 3600:.1f} h (it passed its replays)", evidence)
        return Verdict(
            "wait", f"{c['calls']} canary / {k['calls']} control calls so far (need {settings.min_calls})", evidence
        )
    p_err = two_proportion_p(c["errors"], c["calls"], k["errors"], k["calls"])
    evidence["errors_p"] = round(p_err, 6)
    if c["error_rate"] - k["error_rate"] > rollback_threshold and p_err < settings.alpha:
        return Verdict(
            "rollback",
            f"errors {c['error_rate']:.0%} on the canary vs {k['error_rate']:.0%} on the rest (p={p_err:.2g})",
            evidence,
        )
    if rule.action.type != "workflow":
        c_ms = [float(r.get("total_ms") or 0.0) for r in canary if r.get("outcome") not in ERROR_OUTCOMES]
        k_ms = [float(r.get("total_ms") or 0.0) for r in control if r.get("outcome") not in ERROR_OUTCOMES]
        if len(c_ms) >= settings.min_calls and len(k_ms) >= settings.min_calls:
            slower = mann_whitney_p(k_ms, c_ms)  # control smaller = canary slower
            faster = mann_whitney_p(c_ms, k_ms)
            evidence["slower_p"], evidence["faster_p"] = round(slower, 6), round(faster, 6)
            mc, mk = c["p50_ms"] or 0.0, k["p50_ms"] or 0.0
            if mk > 0 and mc > mk * (1 + rollback_threshold) and slower < settings.alpha:
                return Verdict("rollback", f"p50 {mc:.1f} ms on the canary vs {mk:.1f} ms (p={slower:.2g})", evidence)
            if mk > 0 and mc < mk * (1 - min_improvement) and faster < settings.alpha:
                return Verdict("promote", f"p50 {mc:.1f} ms on the canary vs {mk:.1f} ms (p={faster:.2g})", evidence)
    if c["calls"] >= settings.max_calls:
        return Verdict("promote", f"no measurable harm in {c['calls']} canary calls", evidence)
    return Verdict("wait", f"no decision yet ({c['calls']} canary calls of up to {settings.max_calls})", evidence)
