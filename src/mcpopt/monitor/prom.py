"""Prometheus metrics (prometheus-client), served at `/metrics` on the HTTP front.

Per call (updated off the request path, from records):

- `mcpopt_tool_call_duration_seconds{server,tool,outcome}`: histogram of the whole call.
- `mcpopt_upstream_duration_seconds{server,tool}`: histogram of the upstream part.
- `mcpopt_cache_hits_total{server,tool}`, `mcpopt_cache_misses_total{server,tool}`.
- `mcpopt_tool_call_bytes_total{server,tool,direction}` and
  `mcpopt_tool_call_tokens_total{server,tool,direction}` (estimated, bytes / 4).
- `mcpopt_tool_call_retries_total{server,tool}`.

Read at scrape time from live state (no cost per call):

- `mcpopt_gateway_info{replica}`: 1, naming the gateway replica (`gateway.shared.replica`): with
  several replicas scraped as several targets, it maps Prometheus's `instance` to the replica id
  the telemetry records carry.
- `mcpopt_inflight_calls`: calls inside the telemetry filter now.
- `mcpopt_upstream_up{server,replica}`: 1 when the replica's session is ready.
- `mcpopt_breaker_state{server,replica}`: 0 closed, 1 half-open, 2 open.
- Per stdio replica's process tree, from the resource watch (`gateway.watch`):
  `mcpopt_upstream_cpu_seconds_total{server,replica}`, `mcpopt_upstream_cpu_percent{server,replica}`
  (100 = one core), `mcpopt_upstream_rss_bytes{server,replica}`, `mcpopt_upstream_open_fds{server,replica}`,
  `mcpopt_upstream_child_processes{server,replica}`, `mcpopt_upstream_rss_growth_bytes{server,replica}`
  (over `growth_window_s`); `mcpopt_upstream_rss_restarts_total{server}`: restarts at `max_rss_mb`;
  `mcpopt_isolated_sessions_rss_bytes{server}`, `mcpopt_isolated_sessions_cpu_seconds_total{server}`: the
  per-owner isolated sessions' processes, summed per server (owners are not labels).
- `mcpopt_alerts_active{severity}`, `mcpopt_grade{server,tool}` (A=4 ... F=0; overall as
  server="", tool="").
- `mcpopt_telemetry_dropped_total{sink}`: records a full queue dropped (`sink="pipeline"` is the
  filter's own hand-off queue).
- `mcpopt_auth_refused_total{status}`: HTTP requests refused by authentication (401) or for
  missing scopes (403); `mcpopt_auth_jwks_fetches_total`, `mcpopt_auth_introspections_total`:
  requests to the authorization server.
- `mcpopt_rate_limited_total{scope}`: calls refused by a rate limit (`global`, `tool`,
  `principal`, `principal_tool`); refused calls also count under `outcome="limited"` above, and
  policy refusals under `outcome="denied"`.
- `mcpopt_isolated_sessions{server}`: per-owner upstream sessions open now;
  `mcpopt_isolated_sessions_rejected_total{server}`: calls refused because all were busy.

Each `Telemetry` has its own `CollectorRegistry`, so several gateways in one process (tests)
never collide. prometheus-client itself (~1 MiB resident, 8 ms to import) is loaded at the first
scrape (`mcpopt.monitor.exposition`), not at start: counting needs none of it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from functools import partial, reduce
from itertools import repeat
from operator import add, truediv
from typing import TYPE_CHECKING, Any, Protocol

from mcpopt.telemetry.record import CallRecord, column, columns, group

if TYPE_CHECKING:
    from mcpopt.monitor.monitor import Monitor
    from mcpopt.telemetry.collector import TelemetryFilter


class LiveSource(Protocol):
    """What the metrics read live at scrape time (the telemetry hub, `mcpopt.monitor.hub.Telemetry`)."""

    @property
    def filter(self) -> TelemetryFilter: ...

    @property
    def monitor(self) -> Monitor: ...

    def upstream_health(self) -> list[dict[str, Any]]: ...

    def dropped(self) -> dict[str, int]: ...

    def access_stats(self) -> dict[str, Any]: ...

    def process_pending(self, limit: int | None = None) -> int: ...


BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds; 0.15 and 0.2 are the default SLO thresholds (issue 5), so they are exact in queries."""


class _Histogram:
    """One label set's histogram: per-bucket counts (not cumulative), sum and count."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.sum += value
        self.count += 1

    def observe_many(self, values: Sequence[float]) -> None:
        """`observe` each value in turn (the same counts, and the same sum: added in order)."""
        counts = self.counts
        for i in map(_bucket, values):
            counts[i] += 1
        self.sum = reduce(add, values, self.sum)
        self.count += len(values)

    def buckets(self, labels: Sequence[str]) -> list[tuple[str, float]]:
        """Cumulative `(le, count)` pairs; `labels` are the `le` values of `BUCKETS` and "+Inf"."""
        out: list[tuple[str, float]] = []
        running = 0
        for le, n in zip(labels, self.counts, strict=True):
            running += n
            out.append((le, running))
        return out


BATCH_MIN = 8
"""Smaller batches are counted record by record (the batch path's fixed cost would exceed its gain)."""
_bucket = partial(bisect_left, BUCKETS)
_TOOL = columns("server", "tool")
_OUTCOME = column("outcome")
_TOTAL = column("total_ms")
_UPSTREAM = column("upstream_ms")
_CACHE = column("cache")
_BYTES_IN = column("request_bytes")
_BYTES_OUT = column("response_bytes")
_TOKENS_IN = column("tokens_in")
_TOKENS_OUT = column("tokens_out")
_RETRIES = column("retries")


def _seconds(ms: Sequence[float]) -> list[float]:
    return list(map(truediv, ms, repeat(1000)))


class _ToolSeries:
    """Everything `observe` updates for one (server, tool)."""

    __slots__ = (
        "durations",
        "upstream",
        "hits",
        "misses",
        "bytes_in",
        "bytes_out",
        "tokens_in",
        "tokens_out",
        "retries",
    )

    def __init__(self) -> None:
        self.durations: dict[str, _Histogram] = {}
        self.upstream = _Histogram()
        self.hits = self.misses = self.bytes_in = self.bytes_out = 0
        self.tokens_in = self.tokens_out = self.retries = 0


class PrometheusMetrics:
    """The per-call metrics, and the collector of live gateway state, in one registry.

    Per-call figures are plain counters kept on the event loop (where records are processed
    and where `/metrics` is rendered), and turned into metric families at scrape time: a
    record costs a few additions and one bisect, not a lock per metric as prometheus-client's
    `Histogram`/`Counter` objects would (measured: ~5 us -> ~1 us per record).
    """

    def __init__(self, hub: LiveSource) -> None:
        self.hub = hub
        self.registry: Any = None
        """The `CollectorRegistry`, made at the first `render` (prometheus-client loads then)."""
        self.series: dict[tuple[str, str], _ToolSeries] = {}

    def observe(self, rec: CallRecord) -> None:
        key = (rec.server, rec.tool)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _ToolSeries()
        hist = series.durations.get(rec.outcome)
        if hist is None:
            hist = series.durations[rec.outcome] = _Histogram()
        hist.observe(rec.total_ms / 1000)
        if rec.upstream_ms:
            series.upstream.observe(rec.upstream_ms / 1000)
        cache = rec.cache
        if cache == "hit":
            series.hits += 1
        elif cache == "miss":
            series.misses += 1
        series.bytes_in += rec.request_bytes
        series.bytes_out += rec.response_bytes
        series.tokens_in += rec.tokens_in
        series.tokens_out += rec.tokens_out
        series.retries += rec.retries

    def observe_many(self, recs: Sequence[CallRecord]) -> None:
        """`observe` each record in turn, the same figures: per (server, tool) of the batch, its
        counters are added up with C-level passes over the records instead of one call each
        (batches under `BATCH_MIN` records one by one)."""
        if len(recs) < BATCH_MIN:
            for rec in recs:
                self.observe(rec)
            return
        for key, run in group(recs, _TOOL).items():
            series = self.series.get(key)
            if series is None:
                series = self.series[key] = _ToolSeries()
            durations = series.durations
            for outcome, part in group(run, _OUTCOME).items():
                hist = durations.get(outcome)
                if hist is None:
                    hist = durations[outcome] = _Histogram()
                hist.observe_many(_seconds(list(map(_TOTAL, part))))
            upstream = list(filter(None, map(_UPSTREAM, run)))
            if upstream:
                series.upstream.observe_many(_seconds(upstream))
            caches = list(map(_CACHE, run))
            series.hits += caches.count("hit")
            series.misses += caches.count("miss")
            series.bytes_in += sum(map(_BYTES_IN, run))
            series.bytes_out += sum(map(_BYTES_OUT, run))
            series.tokens_in += sum(map(_TOKENS_IN, run))
            series.tokens_out += sum(map(_TOKENS_OUT, run))
            series.retries += sum(map(_RETRIES, run))

    def render(self) -> bytes:
        """The exposition text (version 0.0.4), every finished call counted (pending ones are
        processed first)."""
        from mcpopt.monitor import exposition

        self.hub.process_pending()
        if self.registry is None:
            self.registry = exposition.registry(self, self.hub, BUCKETS)
        return exposition.render(self.registry)
