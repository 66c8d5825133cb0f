"""Prometheus metrics (prometheus-client), served at `/metrics` on the HTTP front.

Per call (updated off the request path, from records):

- `mcpopt_tool_call_duration_seconds{server,tool,outcome}`: histogram of the whole call.
- `mcpopt_upstream_duration_seconds{server,tool}`: histogram of the upstream part.
- `mcpopt_cache_hits_total{server,tool}`, `mcpopt_cache_misses_total{server,tool}`.
- `mcpopt_tool_call_bytes_total{server,tool,direction}` and
  `mcpopt_tool_call_tokens_total{server,tool,direction}` (estimated, bytes / 4).
- `mcpopt_tool_call_retries_total{server,tool}`.

Read at scrape time from live state (no cost per call):

- `mcpopt_inflight_calls`: calls inside the telemetry filter now.
- `mcpopt_upstream_up{server,replica}`: 1 when the replica's session is ready.
- `mcpopt_breaker_state{server,replica}`: 0 closed, 1 half-open, 2 open.
- `mcpopt_alerts_active{severity}`, `mcpopt_grade{server,tool}` (A=4 ... F=0; overall as
  server="", tool="").
- `mcpopt_telemetry_dropped_total{sink}`: records a full queue dropped (`sink="pipeline"` is the
  filter's own hand-off queue).

Each `Telemetry` has its own `CollectorRegistry`, so several gateways in one process (tests)
never collide.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mcpopt.telemetry.record import CallRecord

if TYPE_CHECKING:
    from mcpopt.telemetry.hub import Telemetry

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds; 0.15 and 0.2 are the default SLO thresholds (issue 5), so they are exact in queries."""
BREAKER = {"closed": 0, "half_open": 1, "open": 2}
GRADE_VALUE = {"A": 4, "B": 3, "C": 2, "D": 1, "F": 0}

CONTENT_TYPE = CONTENT_TYPE_LATEST


class PrometheusMetrics:
    """The per-call metrics, and the collector of live gateway state, in one registry."""

    def __init__(self, hub: Telemetry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.duration = Histogram(
            "mcpopt_tool_call_duration_seconds",
            "Tool call latency through the gateway, by outcome",
            ("server", "tool", "outcome"),
            buckets=BUCKETS,
            registry=r,
        )
        self.upstream = Histogram(
            "mcpopt_upstream_duration_seconds",
            "Time spent on the upstream (retries included)",
            ("server", "tool"),
            buckets=BUCKETS,
            registry=r,
        )
        self.hits = Counter("mcpopt_cache_hits", "Calls answered from the result cache", ("server", "tool"), registry=r)
        self.misses = Counter("mcpopt_cache_misses", "Cacheable calls not in the cache", ("server", "tool"), registry=r)
        self.bytes = Counter(
            "mcpopt_tool_call_bytes", "Request/response bytes", ("server", "tool", "direction"), registry=r
        )
        self.tokens = Counter(
            "mcpopt_tool_call_tokens", "Estimated tokens (bytes / 4)", ("server", "tool", "direction"), registry=r
        )
        self.retries = Counter("mcpopt_tool_call_retries", "Retries of tool calls", ("server", "tool"), registry=r)
        r.register(_LiveCollector(hub))
        self._children: dict[tuple[str, str, str], tuple[Any, ...]] = {}

    def observe(self, rec: CallRecord) -> None:
        key = (rec.server, rec.tool, rec.outcome)
        kids = self._children.get(key)
        if kids is None:
            s, t = rec.server, rec.tool
            kids = (
                self.duration.labels(s, t, rec.outcome),
                self.upstream.labels(s, t),
                self.hits.labels(s, t),
                self.misses.labels(s, t),
                self.bytes.labels(s, t, "request"),
                self.bytes.labels(s, t, "response"),
                self.tokens.labels(s, t, "input"),
                self.tokens.labels(s, t, "output"),
                self.retries.labels(s, t),
            )
            self._children[key] = kids
        duration, upstream, hits, misses, b_in, b_out, t_in, t_out, retries = kids
        duration.observe(rec.total_ms / 1000)
        if rec.upstream_ms:
            upstream.observe(rec.upstream_ms / 1000)
        if rec.cache == "hit":
            hits.inc()
        elif rec.cache == "miss":
            misses.inc()
        b_in.inc(rec.request_bytes)
        b_out.inc(rec.response_bytes)
        t_in.inc(rec.tokens_in)
        t_out.inc(rec.tokens_out)
        if rec.retries:
            retries.inc(rec.retries)

    def render(self) -> bytes:
        """The exposition text (version 0.0.4)."""
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    def __init__(self, hub: Telemetry) -> None:
        self.hub = hub

    def describe(self) -> list[Any]:
        return []  # live state: nothing to collect at registration time

    def collect(self) -> Iterator[Any]:
        hub = self.hub
        yield GaugeMetricFamily(
            "mcpopt_inflight_calls", "Tool calls in flight through the gateway", hub.filter.inflight
        )
        up = GaugeMetricFamily(
            "mcpopt_upstream_up", "1 when the upstream replica is ready", labels=("server", "replica")
        )
        breaker = GaugeMetricFamily(
            "mcpopt_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open", labels=("server", "replica")
        )
        for row in hub.upstream_health():
            for rep in row["replicas"]:
                up.add_metric((row["server"], str(rep["replica"])), 1.0 if rep["state"] == "ready" else 0.0)
                breaker.add_metric((row["server"], str(rep["replica"])), BREAKER.get(rep["breaker"], 0))
        yield up
        yield breaker
        dropped = CounterMetricFamily(
            "mcpopt_telemetry_dropped", "Telemetry records dropped by a full queue", labels=("sink",)
        )
        for name, n in hub.dropped().items():
            dropped.add_metric((name,), n)
        yield dropped
        alerts = GaugeMetricFamily("mcpopt_alerts_active", "Active alerts by severity", labels=("severity",))
        counts = {"warning": 0, "critical": 0}
        for a in hub.monitor.alerts.active():
            counts[a["severity"]] = counts.get(a["severity"], 0) + 1
        for sev, n in counts.items():
            alerts.add_metric((sev,), n)
        yield alerts
        grade = GaugeMetricFamily("mcpopt_grade", "Performance grade: A=4 B=3 C=2 D=1 F=0", labels=("server", "tool"))
        summary = hub.monitor.summary()
        if summary["overall"]["grade"]:
            grade.add_metric(("", ""), GRADE_VALUE[summary["overall"]["grade"]])
        for t in summary["tools"]:
            grade.add_metric((t["server"], t["tool"]), GRADE_VALUE[t["grade"]])
        yield grade
