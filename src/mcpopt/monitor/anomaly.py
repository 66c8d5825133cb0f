"""Anomaly detection: a short-term EWMA against a long-term EWMA baseline, judged by z-score.

For latency the detector works on log(ms + 1) (latencies are skewed; a shift from 5 to 50 ms
matters as much as one from 50 to 500 ms); for errors on 0/1 per call. Each sample updates a
short-term EWMA (`alpha_short`, fast) and, while no anomaly is flagged, a long-term mean and
variance (`alpha_long`, slow; West's EWMA variance). The z-score is

    z = (short - mean) / max(std, floor)

and an anomaly is flagged when z >= `z` for `confirm` samples in a row (one outlier is not a
shift) after `min_samples` samples, and cleared when z falls below z / 2. While flagged the
baseline is frozen, so a sustained shift stays flagged; after `adapt_after` flagged samples it
is taken as the new normal (baseline reset to the current level). Only upward shifts are
flagged (faster or fewer errors is no alarm). The std has a floor (0.15 in log space for
latency; p(1-p) >= 0.05 for errors) so a perfectly steady baseline does not make noise an alarm.

Why this flags before a fixed threshold: a tool that normally answers in 5 ms and suddenly takes
40 ms moves the short-term EWMA by ~0.6 per sample in log space (z ~ 4 per sample against the
floor), so it is flagged within 3-4 calls, while its p95 is
still far below the 150 ms SLO warning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


class EwmaDetector:
    """One detector (latency or error indicator) for one scope.

    Args:
        kind: "latency" (samples in ms) or "errors" (samples 0/1).
        z: the z-score that flags an anomaly (default 4, `telemetry.anomaly_z`).
        min_samples: samples before the baseline is trusted (`telemetry.anomaly_min_calls`).
        alpha_long / alpha_short: EWMA weights of the baseline and of the recent level.
        adapt_after: flagged samples after which the new level becomes the baseline.
        confirm: consecutive samples over `z` needed to flag.
    """

    __slots__ = (
        "kind",
        "z",
        "min_samples",
        "alpha_long",
        "alpha_short",
        "adapt_after",
        "n",
        "mean",
        "var",
        "short",
        "flagged",
        "flagged_for",
        "score",
        "confirm",
        "over",
    )

    def __init__(
        self,
        kind: str,
        *,
        z: float = 4.0,
        min_samples: int = 30,
        alpha_long: float = 0.02,
        alpha_short: float = 0.3,
        adapt_after: int = 500,
        confirm: int = 3,
    ) -> None:
        self.kind = kind
        self.z = z
        self.min_samples = min_samples
        self.alpha_long = alpha_long
        self.alpha_short = alpha_short
        self.adapt_after = adapt_after
        self.n = 0
        self.mean = 0.0
        self.var = 0.0
        self.short = 0.0
        self.flagged = False
        self.flagged_for = 0
        self.score = 0.0
        """The latest z-score."""
        self.confirm = confirm
        self.over = 0

    def _value(self, sample: float) -> float:
        return math.log(sample + 1.0) if self.kind == "latency" else sample

    def _floor(self) -> float:
        if self.kind == "latency":
            return 0.15  # ~16% in log space: ordinary jitter never counts as a shift
        # Bernoulli: the sd of an EWMA of 0/1 samples, with p(1-p) floored at 0.05
        p = min(max(self.mean, 0.0), 1.0)
        return math.sqrt(max(p * (1 - p), 0.05) * self.alpha_short / (2 - self.alpha_short))

    def add(self, sample: float) -> bool:
        """Feed one sample; returns True when this sample changed the flagged state."""
        latency = self.kind == "latency"
        x = math.log(sample + 1.0) if latency else sample  # `_value`, inline (once per record)
        n = self.n = self.n + 1
        if n == 1:
            self.mean = self.short = x
            return False
        a = self.alpha_short
        self.short += a * (x - self.short)
        if not self.flagged:
            b = self.alpha_long if n > self.min_samples else max(self.alpha_long, 1.0 / n)
            diff = x - self.mean
            incr = b * diff
            self.mean += incr
            self.var = (1 - b) * (self.var + diff * incr)
        spread = math.sqrt(a / (2 - a))
        if latency:
            floor = 0.15  # `_floor`, inline
        else:
            p = min(max(self.mean, 0.0), 1.0)
            floor = math.sqrt(max(p * (1 - p), 0.05)) * spread
        std = max(math.sqrt(self.var) * spread, floor)
        self.score = (self.short - self.mean) / std
        if n <= self.min_samples:
            return False
        was = self.flagged
        self.over = self.over + 1 if self.score >= self.z else 0
        if not was and self.over >= self.confirm:
            self.flagged, self.flagged_for = True, 0
        elif was:
            self.flagged_for += 1
            if self.score < self.z / 2:
                self.flagged = False
            elif self.flagged_for >= self.adapt_after:
                self.flagged = False
                self.mean, self.var = self.short, 0.0
        return was != self.flagged

    def add_many(self, samples: Iterable[float]) -> None:
        """`add` each sample in turn: the same state after (and the same arithmetic, in the same
        order), in one loop with the state in locals rather than one method call per sample."""
        latency = self.kind == "latency"
        a = self.alpha_short
        spread = math.sqrt(a / (2 - a))
        alpha_long, min_samples, z, confirm, adapt_after = (
            self.alpha_long,
            self.min_samples,
            self.z,
            self.confirm,
            self.adapt_after,
        )
        n, mean, var, short = self.n, self.mean, self.var, self.short
        flagged, flagged_for, score, over = self.flagged, self.flagged_for, self.score, self.over
        log, sqrt = math.log, math.sqrt
        try:
            for sample in samples:
                x = log(sample + 1.0) if latency else sample
                n += 1
                if n == 1:
                    mean = short = x
                    continue
                short += a * (x - short)
                if not flagged:
                    b = alpha_long if n > min_samples else max(alpha_long, 1.0 / n)
                    diff = x - mean
                    incr = b * diff
                    mean += incr
                    var = (1 - b) * (var + diff * incr)
                if latency:
                    floor = 0.15
                else:
                    p = min(max(mean, 0.0), 1.0)
                    floor = sqrt(max(p * (1 - p), 0.05)) * spread
                std = max(sqrt(var) * spread, floor)
                score = (short - mean) / std
                if n <= min_samples:
                    continue
                was = flagged
                over = over + 1 if score >= z else 0
                if not was and over >= confirm:
                    flagged, flagged_for = True, 0
                elif was:
                    flagged_for += 1
                    if score < z / 2:
                        flagged = False
                    elif flagged_for >= adapt_after:
                        flagged = False
                        mean, var = short, 0.0
        finally:
            self.n, self.mean, self.var, self.short = n, mean, var, short
            self.flagged, self.flagged_for, self.score, self.over = flagged, flagged_for, score, over

    def describe(self) -> dict[str, float | bool | str]:
        """The detector's state: level and baseline in the sample's unit (ms or rate)."""
        if self.kind == "latency":
            level, base = math.exp(self.short) - 1, math.exp(self.mean) - 1
        else:
            level, base = self.short, self.mean
        return {
            "kind": self.kind,
            "flagged": self.flagged,
            "z": round(self.score, 2),
            "level": round(level, 3),
            "baseline": round(base, 3),
        }
