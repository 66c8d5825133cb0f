"""Rolling statistics per tool, per server and overall; grades; a per-second timeline.

Percentiles and error rates cover the calls that ended within the last `window_s` seconds,
at most the last `MAX_SAMPLES` of them per scope (so a busy tool costs bounded memory and a
bounded sort). Percentiles use the nearest-rank method. An error is any outcome in
`ERROR_OUTCOMES` (a cancelled call is not one).

Grades (issue 5, configurable as `telemetry.grades`): A when the average is < 50 ms and the
error rate < 1%; B < 100 ms and < 2%; C < 200 ms and < 5%; D < 500 ms and < 10%; F otherwise.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Sequence
from itertools import compress, repeat
from operator import add, mod, sub, truediv
from typing import Any

from mcpopt.monitor.anomaly import EwmaDetector
from mcpopt.telemetry.record import ERROR_OUTCOMES, CallRecord, column

MAX_SAMPLES = 2048
DEFAULT_GRADES = ((50.0, 0.01), (100.0, 0.02), (200.0, 0.05), (500.0, 0.10))


_TS = column("ts")
_OUTCOME = column("outcome")
_TOTAL = column("total_ms")
_CACHE = column("cache")
_TOKENS_IN = column("tokens_in")
_TOKENS_OUT = column("tokens_out")
_TOKENS_SAVED = column("tokens_saved")
_BYTES_IN = column("request_bytes")
_BYTES_OUT = column("response_bytes")
_is_error = ERROR_OUTCOMES.__contains__


def end_times(recs: Sequence[CallRecord]) -> list[float]:
    """Each record's end, Unix seconds: `ts + total_ms / 1000` (C-level passes)."""
    return list(map(add, map(_TS, recs), map(truediv, map(_TOTAL, recs), repeat(1000))))


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (`q` in 0..1); 0.0 when empty."""
    n = len(ordered)
    if not n:
        return 0.0
    return float(ordered[min(n - 1, max(0, math.ceil(q * n) - 1))])


def grade(avg_ms: float, error_rate: float, table: Sequence[Sequence[float]] = DEFAULT_GRADES) -> str:
    """The letter for an average latency (ms) and an error rate (0..1); `table` gives A-D's bounds."""
    for letter, (max_ms, max_err) in zip("ABCD", table, strict=False):
        if avg_ms < max_ms and error_rate < max_err:
            return letter
    return "F"


class Series:
    """The samples and running totals of one scope (a tool, a server, or everything)."""

    __slots__ = (
        "samples",
        "calls",
        "errors",
        "hits",
        "misses",
        "tokens_in",
        "tokens_out",
        "tokens_saved",
        "bytes_in",
        "bytes_out",
        "outcomes",
        "latency",
        "errors_ewma",
        "detect",
    )

    def __init__(self, z: float = 4.0, min_samples: int = 30, *, detect: bool = True) -> None:
        self.samples: deque[tuple[float, float, bool]] = deque(maxlen=MAX_SAMPLES)
        """(end time in Unix seconds, total ms, is error)"""
        self.calls = self.errors = self.hits = self.misses = 0
        self.tokens_in = self.tokens_out = self.tokens_saved = 0
        self.bytes_in = self.bytes_out = 0
        self.outcomes: dict[str, int] = {}
        self.latency = EwmaDetector("latency", z=z, min_samples=min_samples)
        self.errors_ewma = EwmaDetector("errors", z=z, min_samples=min_samples)
        self.detect = detect
        """Feed the anomaly detectors (per tool only: servers and overall would add cost, not signal)."""

    def add(self, rec: CallRecord, end: float) -> None:
        outcome = rec.outcome
        err = outcome in ERROR_OUTCOMES
        total_ms = rec.total_ms
        self.samples.append((end, total_ms, err))
        self.calls += 1
        self.errors += err
        cache = rec.cache
        if cache:
            if cache == "hit":
                self.hits += 1
            elif cache == "miss":
                self.misses += 1
        self.tokens_in += rec.tokens_in
        self.tokens_out += rec.tokens_out
        self.tokens_saved += rec.tokens_saved
        self.bytes_in += rec.request_bytes
        self.bytes_out += rec.response_bytes
        outcomes = self.outcomes
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if self.detect and outcome != "cancelled":
            if not err:
                self.latency.add(total_ms)
            self.errors_ewma.add(1.0 if err else 0.0)

    def add_many(self, recs: Sequence[CallRecord], ends: Sequence[float]) -> None:
        """`add` each record in turn (`ends[i]` the end of `recs[i]`): the same samples, totals and
        detector states, from C-level passes over the batch."""
        if not recs:
            return
        outs = list(map(_OUTCOME, recs))
        totals = list(map(_TOTAL, recs))
        errs = list(map(_is_error, outs))
        self.samples.extend(zip(ends, totals, errs, strict=True))
        self.calls += len(recs)
        self.errors += sum(errs)
        caches = list(map(_CACHE, recs))
        self.hits += caches.count("hit")
        self.misses += caches.count("miss")
        self.tokens_in += sum(map(_TOKENS_IN, recs))
        self.tokens_out += sum(map(_TOKENS_OUT, recs))
        self.tokens_saved += sum(map(_TOKENS_SAVED, recs))
        self.bytes_in += sum(map(_BYTES_IN, recs))
        self.bytes_out += sum(map(_BYTES_OUT, recs))
        outcomes = self.outcomes
        first = outs[0]
        if outs.count(first) == len(outs):  # the usual batch: one outcome
            outcomes[first] = outcomes.get(first, 0) + len(outs)
        else:
            for outcome, n in Counter(outs).items():  # first-seen order, as one by one
                outcomes[outcome] = outcomes.get(outcome, 0) + n
        if self.detect:
            if "cancelled" in outs:  # cancelled calls feed neither detector
                kept = [o != "cancelled" for o in outs]
                totals = list(compress(totals, kept))
                errs = list(compress(errs, kept))
            self.latency.add_many(compress(totals, [not e for e in errs]) if any(errs) else totals)
            self.errors_ewma.add_many(map(float, errs))

    def window(self, since: float) -> tuple[list[float], int]:
        """Latencies (ascending) and the error count of samples that ended at or after `since`."""
        lat: list[float] = []
        errors = 0
        for end, ms, err in reversed(self.samples):
            if end < since:
                break
            lat.append(ms)
            errors += err
        lat.sort()
        return lat, errors

    def summary(self, since: float, table: Sequence[Sequence[float]]) -> dict[str, Any]:
        """Window figures (ms, rates 0..1) and running totals; `grade` is None without calls."""
        lat, errors = self.window(since)
        return _summary(lat, errors, table, self, self.latency.flagged or self.errors_ewma.flagged)


class Rollup:
    """Several `Series` (a server's tools, or every tool) read as one, at read time.

    The monitor feeds only the per-tool series on the record path; a server's and the overall
    figures are computed from them when read: the same figures as a series of their own fed every
    record (its window holds the last `MAX_SAMPLES` calls of all its tools that ended in the
    window, each of which is among the last `MAX_SAMPLES` of its own tool; the totals are sums),
    without two more series updated per call. No anomaly detection (as before for these scopes).
    """

    def __init__(self, parts: Sequence[Series]) -> None:
        self.parts = list(parts)
        self.calls = sum(p.calls for p in self.parts)
        self.errors = sum(p.errors for p in self.parts)
        self.hits = sum(p.hits for p in self.parts)
        self.misses = sum(p.misses for p in self.parts)
        self.tokens_in = sum(p.tokens_in for p in self.parts)
        self.tokens_out = sum(p.tokens_out for p in self.parts)
        self.tokens_saved = sum(p.tokens_saved for p in self.parts)
        self.bytes_in = sum(p.bytes_in for p in self.parts)
        self.bytes_out = sum(p.bytes_out for p in self.parts)
        self.outcomes: dict[str, int] = {}
        for p in self.parts:
            for k, v in p.outcomes.items():
                self.outcomes[k] = self.outcomes.get(k, 0) + v

    def window(self, since: float) -> tuple[list[float], int]:
        """Latencies (ascending) and the error count of the last `MAX_SAMPLES` samples of all parts
        that ended at or after `since`."""
        picked: list[tuple[float, float, bool]] = []
        for part in self.parts:
            for sample in reversed(part.samples):
                if sample[0] < since:
                    break
                picked.append(sample)
        if len(picked) > MAX_SAMPLES:
            picked.sort()
            del picked[:-MAX_SAMPLES]
        lat = sorted(ms for _, ms, _ in picked)
        return lat, sum(err for _, _, err in picked)

    def summary(self, since: float, table: Sequence[Sequence[float]]) -> dict[str, Any]:
        """As `Series.summary`; `anomaly` is always False."""
        lat, errors = self.window(since)
        return _summary(lat, errors, table, self, False)


def _summary(
    lat: list[float], errors: int, table: Sequence[Sequence[float]], totals: Series | Rollup, anomaly: bool
) -> dict[str, Any]:
    n = len(lat)
    avg = sum(lat) / n if n else 0.0
    rate = errors / n if n else 0.0
    cacheable = totals.hits + totals.misses
    return {
        "calls": n,
        "errors": errors,
        "error_rate": round(rate, 4),
        "avg_ms": round(avg, 3),
        "p50_ms": round(percentile(lat, 0.50), 3),
        "p95_ms": round(percentile(lat, 0.95), 3),
        "p99_ms": round(percentile(lat, 0.99), 3),
        "max_ms": round(lat[-1], 3) if n else 0.0,
        "grade": grade(avg, rate, table) if n else None,
        "total_calls": totals.calls,
        "total_errors": totals.errors,
        "cache_hits": totals.hits,
        "cache_misses": totals.misses,
        "hit_rate": round(totals.hits / cacheable, 4) if cacheable else None,
        "tokens_in": totals.tokens_in,
        "tokens_out": totals.tokens_out,
        "tokens_saved": totals.tokens_saved,
        "outcomes": dict(totals.outcomes),
        "anomaly": anomaly,
    }


class Timeline:
    """Per-bucket overall figures for charts: one point per `bucket_s` with calls, keeping `keep` points."""

    def __init__(self, bucket_s: float = 1.0, keep: int = 600) -> None:
        self.bucket_s = bucket_s
        self.points: deque[dict[str, Any]] = deque(maxlen=keep)
        self._start: float | None = None
        self._lat: list[float] = []
        self._errors = self._hits = self._misses = self._saved = 0

    def add(self, end: float, rec: CallRecord) -> None:
        start = end - end % self.bucket_s
        if self._start is None:
            self._start = start
        elif start > self._start:
            self._close()
            self._start = start
        if len(self._lat) < 4096:
            self._lat.append(rec.total_ms)
        self._errors += rec.outcome in ERROR_OUTCOMES
        cache = rec.cache
        if cache:
            self._hits += cache == "hit"
            self._misses += cache == "miss"
        self._saved += rec.tokens_saved

    def add_many(self, recs: Sequence[CallRecord], ends: Sequence[float]) -> None:
        """`add` each record in turn (`ends[i]` the end of `recs[i]`); a batch within the current
        bucket (the usual case) is added with C-level passes."""
        if not recs:
            return
        bucket_s = self.bucket_s
        starts = list(map(sub, ends, map(mod, ends, repeat(bucket_s))))
        current = self._start if self._start is not None else starts[0]
        if max(starts) > current:  # a new bucket begins in this batch: one by one
            for end, rec in zip(ends, recs, strict=True):
                self.add(end, rec)
            return
        self._start = current
        room = 4096 - len(self._lat)
        if room > 0:
            self._lat.extend(map(_TOTAL, recs[:room]))
        self._errors += sum(map(_is_error, map(_OUTCOME, recs)))
        caches = list(map(_CACHE, recs))
        self._hits += caches.count("hit")
        self._misses += caches.count("miss")
        self._saved += sum(map(_TOKENS_SAVED, recs))

    def _point(self) -> dict[str, Any]:
        lat = sorted(self._lat)
        return {
            "t": self._start,
            "calls": len(lat),
            "errors": self._errors,
            "p50_ms": round(percentile(lat, 0.5), 3),
            "p95_ms": round(percentile(lat, 0.95), 3),
            "p99_ms": round(percentile(lat, 0.99), 3),
            "cache_hits": self._hits,
            "cache_misses": self._misses,
            "tokens_saved": self._saved,
        }

    def _close(self) -> None:
        if self._lat:
            self.points.append(self._point())
        self._lat = []
        self._errors = self._hits = self._misses = self._saved = 0

    def snapshot(self, limit: int = 300) -> list[dict[str, Any]]:
        """The last `limit` points, oldest first, the current (partial) bucket included."""
        out = list(self.points)[-limit:]
        if self._lat:
            out.append(self._point())
        return out
