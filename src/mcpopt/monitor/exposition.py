"""The Prometheus exposition of `mcpopt.monitor.prom.PrometheusMetrics`: the collectors that turn
its counters and the gateway's live state into metric families at scrape time.

Imported at the first scrape of `/metrics`, so prometheus-client is not loaded by a gateway
nobody scrapes (see `mcpopt.monitor.prom` for the metric names).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = CONTENT_TYPE_LATEST
BREAKER = {"closed": 0, "half_open": 1, "open": 2}
GRADE_VALUE = {"A": 4, "B": 3, "C": 2, "D": 1, "F": 0}


def registry(metrics: Any, hub: Any, buckets: Sequence[float]) -> Any:
    """A `CollectorRegistry` of the per-call families of `metrics` (`prom.PrometheusMetrics`, whose
    histograms count into `buckets`, seconds) and the live state of `hub` (`prom.LiveSource`).
    Typed loosely: this module does not import `prom`, which imports it at the first scrape."""
    reg = CollectorRegistry(auto_describe=True)
    reg.register(_CallCollector(metrics, (*map(floatToGoString, buckets), "+Inf")))
    reg.register(_LiveCollector(hub))
    return reg


def render(reg: Any) -> bytes:
    """The exposition text (version 0.0.4) of a registry made by `registry`."""
    return bytes(generate_latest(reg))


class _CallCollector(Collector):
    """The per-call families, built from `PrometheusMetrics.series` at scrape time."""

    def __init__(self, metrics: Any, le: Sequence[str]) -> None:
        self.metrics = metrics
        self.le = le

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        duration = HistogramMetricFamily(
            "mcpopt_tool_call_duration_seconds",
            "Tool call latency through the gateway, by outcome",
            labels=("server", "tool", "outcome"),
        )
        upstream = HistogramMetricFamily(
            "mcpopt_upstream_duration_seconds",
            "Time spent on the upstream (retries included)",
            labels=("server", "tool"),
        )
        hits = CounterMetricFamily(
            "mcpopt_cache_hits", "Calls answered from the result cache", labels=("server", "tool")
        )
        misses = CounterMetricFamily(
            "mcpopt_cache_misses", "Cacheable calls not in the cache", labels=("server", "tool")
        )
        nbytes = CounterMetricFamily(
            "mcpopt_tool_call_bytes", "Request/response bytes", labels=("server", "tool", "direction")
        )
        tokens = CounterMetricFamily(
            "mcpopt_tool_call_tokens", "Estimated tokens (bytes / 4)", labels=("server", "tool", "direction")
        )
        retries = CounterMetricFamily("mcpopt_tool_call_retries", "Retries of tool calls", labels=("server", "tool"))
        for (server, tool), s in list(self.metrics.series.items()):
            for outcome, hist in list(s.durations.items()):
                duration.add_metric((server, tool, outcome), hist.buckets(self.le), hist.sum)
            if s.upstream.count:
                upstream.add_metric((server, tool), s.upstream.buckets(self.le), s.upstream.sum)
            hits.add_metric((server, tool), s.hits)
            misses.add_metric((server, tool), s.misses)
            nbytes.add_metric((server, tool, "request"), s.bytes_in)
            nbytes.add_metric((server, tool, "response"), s.bytes_out)
            tokens.add_metric((server, tool, "input"), s.tokens_in)
            tokens.add_metric((server, tool, "output"), s.tokens_out)
            retries.add_metric((server, tool), s.retries)
        yield from (duration, upstream, hits, misses, nbytes, tokens, retries)


class _LiveCollector(Collector):
    def __init__(self, hub: Any) -> None:
        self.hub = hub

    def describe(self) -> list[Any]:
        return []  # live state: nothing to collect at registration time

    def collect(self) -> Iterator[Any]:
        hub = self.hub
        info = GaugeMetricFamily(
            "mcpopt_gateway_info", "1, labelled with this gateway replica's id", labels=("replica",)
        )
        info.add_metric((str(getattr(hub, "replica_id", "") or ""),), 1.0)
        yield info
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
        yield from _resource_metrics(hub.upstream_health())
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
        yield from _access_metrics(hub.access_stats())


_RESOURCE_GAUGES = (
    ("cpu_percent", "mcpopt_upstream_cpu_percent", "CPU use of the upstream's process tree, percent of one core"),
    ("rss_bytes", "mcpopt_upstream_rss_bytes", "Resident memory of the upstream's process tree (sum), bytes"),
    ("open_fds", "mcpopt_upstream_open_fds", "File descriptors open in the upstream's process tree"),
    ("children", "mcpopt_upstream_child_processes", "Descendant processes of the upstream"),
    ("rss_growth_bytes", "mcpopt_upstream_rss_growth_bytes", "RSS growth over gateway.watch.growth_window_s, bytes"),
)


def _resource_metrics(rows: list[dict[str, Any]]) -> Iterator[Any]:
    """The resource watch's figures per stdio replica (see the module docstring)."""
    labels = ("server", "replica")
    cpu = CounterMetricFamily(
        "mcpopt_upstream_cpu_seconds", "CPU seconds of the upstream's process tree", labels=labels
    )
    gauges = [(key, GaugeMetricFamily(name, doc, labels=labels)) for key, name, doc in _RESOURCE_GAUGES]
    restarts = CounterMetricFamily(
        "mcpopt_upstream_rss_restarts", "Upstream restarts at max_rss_mb", labels=("server",)
    )
    iso_rss = GaugeMetricFamily(
        "mcpopt_isolated_sessions_rss_bytes", "RSS of a server's isolated sessions, summed", labels=("server",)
    )
    iso_cpu = CounterMetricFamily(
        "mcpopt_isolated_sessions_cpu_seconds", "CPU seconds of a server's open isolated sessions", labels=("server",)
    )
    for row in rows:
        restarts.add_metric((row["server"],), row.get("rss_restarts", 0))
        iso = row.get("isolated_processes")
        if iso:
            iso_rss.add_metric((row["server"],), iso["rss_bytes"])
            iso_cpu.add_metric((row["server"],), iso["cpu_seconds"])
        for rep in row["replicas"]:
            use = rep.get("resources")
            if not use:
                continue
            key = (row["server"], str(rep["replica"]))
            cpu.add_metric(key, use["cpu_seconds"])
            for field, family in gauges:
                if use.get(field) is not None:
                    family.add_metric(key, use[field])
    yield cpu
    for _, family in gauges:
        yield family
    yield restarts
    yield iso_rss
    yield iso_cpu


def _access_metrics(stats: dict[str, Any]) -> Iterator[Any]:
    """Authentication, rate limits and isolation (see the module docstring)."""
    auth = stats.get("auth") or {}
    refused = CounterMetricFamily("mcpopt_auth_refused", "HTTP requests refused by authentication", labels=("status",))
    for status, n in (auth.get("refused") or {}).items():
        refused.add_metric((status,), n)
    yield refused
    yield CounterMetricFamily(
        "mcpopt_auth_jwks_fetches", "Key-set fetches from the authorization server", auth.get("jwks_fetches", 0)
    )
    yield CounterMetricFamily(
        "mcpopt_auth_introspections", "Token introspection requests (RFC 7662)", auth.get("introspections", 0)
    )
    limited = CounterMetricFamily("mcpopt_rate_limited", "Calls refused by a rate limit", labels=("scope",))
    for scope, n in ((stats.get("limits") or {}).get("refused") or {}).items():
        limited.add_metric((scope,), n)
    yield limited
    open_now = GaugeMetricFamily("mcpopt_isolated_sessions", "Per-owner upstream sessions open", labels=("server",))
    rejected = CounterMetricFamily(
        "mcpopt_isolated_sessions_rejected", "Calls refused: every isolated session busy", labels=("server",)
    )
    for server, row in (stats.get("isolation") or {}).items():
        open_now.add_metric((server,), row["open"])
        rejected.add_metric((server,), row["rejected"])
    yield open_now
    yield rejected
