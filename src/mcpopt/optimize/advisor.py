"""The scaling advisor: replicas per upstream from a queueing estimate, and a capacity forecast.

Each upstream is modelled as an M/M/c queue (Poisson arrivals at rate lambda, exponential
service times of mean S, c parallel servers = replicas): offered load a = lambda * S (Erlangs),
utilization rho = a / c. The probability that a call waits is Erlang's C formula, and the mean
wait in queue is

    Wq = C(c, a) * S / (c - a)                       (for a < c; unbounded otherwise)

Sources: A. K. Erlang, "Solution of some problems in the theory of probabilities of significance
in automatic telephone exchanges" (1917); L. Kleinrock, *Queueing Systems, Vol. 1: Theory*
(1975), sec. 3.5 (M/M/m). C(c, a) is computed from Erlang B with the stable recurrence
B(0) = 1, B(k) = a B(k-1) / (k + a B(k-1)), then C = c B / (c - a (1 - B)).

The recommended replica count is the smallest c with rho <= `max_utilization` (default 0.7) and
Wq <= `max_wait_ratio` x S (default 0.1: waiting adds at most 10% to a call). Arrivals are
sized on the busiest minute of the window (not the average), since queues form at peaks.

The forecast fits a least-squares line to the calls per bucket (`buckets` equal slices of the
window) and extrapolates the peak rate `horizon_s` ahead; it reports the replicas needed then
and, when the trend grows, when today's replicas pass `max_utilization`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


def erlang_c(c: int, a: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with offered load `a` Erlangs (1.0 if a >= c)."""
    if c <= 0:
        raise ValueError("c must be at least 1")
    if a <= 0:
        return 0.0
    if a >= c:
        return 1.0
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return c * b / (c - a * (1 - b))


def mmc_wait_s(rate: float, service_s: float, c: int) -> float:
    """Mean time in queue (s) of an M/M/c queue; `math.inf` when it is unstable (rate x S >= c)."""
    a = rate * service_s
    if a >= c:
        return math.inf
    return erlang_c(c, a) * service_s / (c - a)


def replicas_needed(
    rate: float, service_s: float, *, max_utilization: float = 0.7, max_wait_ratio: float = 0.1, limit: int = 64
) -> int:
    """The fewest servers with utilization <= `max_utilization` and Wq <= `max_wait_ratio` x S."""
    if rate <= 0 or service_s <= 0:
        return 1
    a = rate * service_s
    c = max(1, math.ceil(a / max_utilization))
    while c < limit and mmc_wait_s(rate, service_s, c) > max_wait_ratio * service_s:
        c += 1
    return c


def linear_fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of y on x; slope 0 for fewer than two distinct x."""
    n = len(points)
    if n < 2:
        return 0.0, points[0][1] if points else 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0, my
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx


@dataclass
class Advice:
    server: str
    calls: int
    window_s: float
    rate_avg: float
    """calls/s over the window."""
    rate_peak: float
    """calls/s in the busiest minute."""
    service_ms: float
    queue_ms: float
    """Mean measured wait for a concurrency slot (telemetry `queue_ms`)."""
    inflight: int
    replicas: int
    utilization: float
    wait_ms: float
    """M/M/c mean queue wait at the peak rate with today's replicas (inf: overloaded)."""
    recommended: int
    forecast_rate: float
    forecast_replicas: int
    saturates_in_s: float | None
    """Seconds until today's replicas pass the utilization bound at the trend (None: not growing)."""

    def to_dict(self) -> dict[str, Any]:
        def r(x: float) -> float | None:
            return None if x is None or math.isinf(x) else round(x, 4)

        return {
            "server": self.server,
            "calls": self.calls,
            "window_s": round(self.window_s, 1),
            "rate_avg": r(self.rate_avg),
            "rate_peak": r(self.rate_peak),
            "service_ms": r(self.service_ms),
            "queue_ms": r(self.queue_ms),
            "inflight": self.inflight,
            "replicas": self.replicas,
            "utilization": r(self.utilization),
            "wait_ms": r(self.wait_ms),
            "recommended": self.recommended,
            "forecast_rate": r(self.forecast_rate),
            "forecast_replicas": self.forecast_replicas,
            "saturates_in_s": r(self.saturates_in_s) if self.saturates_in_s is not None else None,
            "action": self.action(),
        }

    def action(self) -> str:
        if self.recommended > self.replicas:
            return f"add replicas: {self.replicas} -> {self.recommended}"
        if self.forecast_replicas > self.replicas:
            when = f" within {self.saturates_in_s / 86400:.1f} days" if self.saturates_in_s else ""
            return f"plan {self.forecast_replicas} replicas{when} (trend)"
        if self.replicas > 1 and self.recommended < self.replicas:
            return f"{self.recommended} replica(s) would do"
        return "ok"


def advise(
    rows: Iterable[Mapping[str, Any]],
    pools: Mapping[str, Any] | None = None,
    *,
    horizon_s: float = 7 * 86400,
    buckets: int = 12,
    max_utilization: float = 0.7,
    max_wait_ratio: float = 0.1,
) -> list[Advice]:
    """Advice per upstream from telemetry rows (CallRecord shape) and the live pools.

    Args:
        rows: calls (`ts`, `server`, `upstream_ms` or `total_ms`, `queue_ms`, `cache`).
        pools: server -> `ServerPool` (its `replicas` and `stats()` for in-flight); None: 1 replica each.
        horizon_s: how far ahead to forecast.
    """
    by_server: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("cache") == "hit" or r.get("coalesced"):
            continue  # answered by the gateway: no load on the server
        by_server[str(r.get("server", ""))].append(r)
    out = []
    for server in sorted(set(by_server) | set(pools or {})):
        calls = sorted(by_server.get(server, []), key=lambda r: float(r.get("ts", 0.0)))
        pool = (pools or {}).get(server)
        replicas = len(getattr(pool, "replicas", [])) or 1
        inflight = 0
        if pool is not None and callable(getattr(pool, "stats", None)):
            inflight = sum(int(s.get("inflight") or 0) for s in pool.stats())
        out.append(_one(server, calls, replicas, inflight, horizon_s, buckets, max_utilization, max_wait_ratio))
    return out


def _one(
    server: str,
    calls: list[Mapping[str, Any]],
    replicas: int,
    inflight: int,
    horizon_s: float,
    buckets: int,
    max_util: float,
    max_wait: float,
) -> Advice:
    n = len(calls)
    if n == 0:
        return Advice(server, 0, 0.0, 0.0, 0.0, 0.0, 0.0, inflight, replicas, 0.0, 0.0, 1, 0.0, 1, None)
    t0, t1 = float(calls[0]["ts"]), float(calls[-1]["ts"])
    window = max(1.0, t1 - t0)
    service_ms = sum(float(r.get("upstream_ms") or r.get("total_ms") or 0.0) for r in calls) / n
    queue_ms = sum(float(r.get("queue_ms") or 0.0) for r in calls) / n
    per_minute: dict[int, int] = defaultdict(int)
    for r in calls:
        per_minute[int(float(r["ts"]) // 60)] += 1
    peak = max(per_minute.values()) / min(60.0, window)
    s = service_ms / 1000
    util = peak * s / replicas
    wait = mmc_wait_s(peak, s, replicas) * 1000
    recommended = replicas_needed(peak, s, max_utilization=max_util, max_wait_ratio=max_wait)
    # Trend: calls per bucket over the window, scaled to the peak-to-average ratio seen today.
    width = window / buckets
    counts = [0] * buckets
    for r in calls:
        counts[min(buckets - 1, int((float(r["ts"]) - t0) / width))] += 1
    slope, intercept = linear_fit([(i * width, c / width) for i, c in enumerate(counts)])
    avg = n / window
    peak_ratio = peak / avg if avg else 1.0
    future = max(0.0, intercept + slope * (window + horizon_s)) * peak_ratio
    forecast_replicas = replicas_needed(future, s, max_utilization=max_util, max_wait_ratio=max_wait)
    saturates: float | None = None
    if slope > 0 and s > 0:
        limit_rate = max_util * replicas / s / peak_ratio
        at = (limit_rate - intercept) / slope - window
        saturates = max(0.0, at)
    return Advice(
        server,
        n,
        window,
        avg,
        peak,
        service_ms,
        queue_ms,
        inflight,
        replicas,
        util,
        wait,
        recommended,
        future,
        forecast_replicas,
        saturates,
    )
