"""SLO alerts: thresholds on p95 latency and error rate, anomalies, and upstreams that are down.

Rules (defaults from issue 5, configurable in `telemetry`):

- `latency_p95` per tool: warning when the p95 of the calls that ended in the last
  `alert_window_s` exceeds `slo_p95_warning_ms` (150), critical above `slo_p95_critical_ms` (200);
  only with at least `alert_min_calls` calls in the window.
- `error_rate` per tool: warning above `slo_error_warning` (5%), critical above
  `slo_error_critical` (10%), with the same window and minimum.
- `latency_anomaly` / `error_anomaly` per tool: warning while its EWMA detector is flagged
  (`mcpopt.monitor.anomaly`): it fires on a sudden shift long before a threshold would.
- `upstream_down` per server: critical while the server's state is "down".
- `rss_growth` per stdio replica: warning while the resource watch (`mcpopt.upstream.watch`) sees its
  RSS grown by more than `gateway.watch.growth_warning_mb` MiB and `growth_warning_pct` percent over
  `growth_window_s` (defaults 64 MiB, 50%, 300 s; see `WatchSettings` for where they come from).
  Scope: the server, "server#k" for replica k of several, or "server (isolated)" for its per-owner
  sessions (value: how many of them grow).

De-duplication: an alert is one (scope, metric) pair. An event is emitted only when its
severity changes: it fires (or escalates/de-escalates) once, and when the condition clears a
single `resolved` event follows (the recovery notice). Events go to the log (warning for
warnings and recoveries, error for critical), to the store, and to the webhook if set.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from mcpopt.monitor.stats import percentile
from mcpopt.telemetry.sinks import ThreadedSink

if TYPE_CHECKING:
    from mcpopt.monitor.stats import Series

logger = logging.getLogger("mcpopt.alerts")

_RANK = {"ok": 0, "warning": 1, "critical": 2}


@dataclass(slots=True)
class AlertEvent:
    """One alert notification (a row of the store's `alerts` table, the webhook's JSON body).

    Attributes:
        ts: Unix seconds. status: "firing" or "resolved". severity: "warning" or "critical"
            (for `resolved`, the severity it had). scope: "server/tool" or "server".
        metric: latency_p95, error_rate, latency_anomaly, error_anomaly, upstream_down, rss_growth.
        value / threshold: ms for latency, 0..1 for rates, z-score for anomalies, MiB of growth.
    """

    ts: float
    status: str
    severity: str
    scope: str
    metric: str
    value: float
    threshold: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _State:
    severity: str
    since: float
    value: float
    threshold: float
    message: str


class AlertManager:
    """Evaluates the rules against a `Monitor`'s per-tool series and keeps the active alerts and recent events.

    Args:
        settings: a `TelemetrySettings` (thresholds, window, minimum calls).
    """

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self._active: dict[tuple[str, str], _State] = {}
        self.history: deque[AlertEvent] = deque(maxlen=200)

    def active(self) -> list[dict[str, Any]]:
        """Active alerts, most severe first: scope, metric, severity, since, value, threshold, message."""
        rows: list[dict[str, Any]] = [
            {
                "scope": scope,
                "metric": metric,
                "severity": st.severity,
                "since": st.since,
                "value": st.value,
                "threshold": st.threshold,
                "message": st.message,
            }
            for (scope, metric), st in self._active.items()
        ]
        rows.sort(key=lambda r: (-_RANK[r["severity"]], r["since"]))
        return rows

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        return [e.to_dict() for e in list(self.history)[-limit:]][::-1]

    def evaluate(
        self,
        tools: Mapping[tuple[str, str], Series],
        now: float | None = None,
        health: list[dict[str, Any]] | None = None,
    ) -> list[AlertEvent]:
        """Check every rule once over the per-tool series (`Monitor.tools`: (server, tool) -> `Series`)
        and the upstream health rows; returns the events (state changes) and logs them."""
        now = time.time() if now is None else now
        s = self.settings
        seen: dict[tuple[str, str], tuple[str, float, float, str]] = {}
        since = now - s.alert_window_s
        for (server, tool), series in tools.items():
            scope = f"{server}/{tool}"
            lat, errors = series.window(since)
            n = len(lat)
            if n >= s.alert_min_calls:
                p95 = percentile(lat, 0.95)
                sev, thr = _level(p95, s.slo_p95_warning_ms, s.slo_p95_critical_ms)
                if sev != "ok":
                    seen[(scope, "latency_p95")] = (
                        sev,
                        round(p95, 1),
                        thr,
                        f"{scope}: p95 latency {p95:.0f} ms > {thr:g} ms over the last {s.alert_window_s:g} s "
                        f"({n} calls)",
                    )
                rate = errors / n
                sev, thr = _level(rate, s.slo_error_warning, s.slo_error_critical)
                if sev != "ok":
                    seen[(scope, "error_rate")] = (
                        sev,
                        round(rate, 4),
                        thr,
                        f"{scope}: error rate {rate:.1%} > {thr:.0%} over the last {s.alert_window_s:g} s "
                        f"({errors} of {n} calls)",
                    )
            for det, metric in ((series.latency, "latency_anomaly"), (series.errors_ewma, "error_anomaly")):
                if det.flagged:
                    d = det.describe()
                    what = (
                        f"latency {d['level']:.1f} ms vs baseline {d['baseline']:.1f} ms"
                        if det.kind == "latency"
                        else f"error rate {d['level']:.0%} vs baseline {d['baseline']:.0%}"
                    )
                    seen[(scope, metric)] = (
                        "warning",
                        float(d["z"]),
                        det.z,
                        f"{scope}: anomaly: {what} (z = {d['z']})",
                    )
        for row in health or ():
            if row.get("state") == "down":
                why = f": {row['error']}" if row.get("error") else ""
                seen[(row["server"], "upstream_down")] = (
                    "critical",
                    0.0,
                    1.0,
                    f"MCP server '{row['server']}' is down{why}",
                )
            iso = row.get("isolated_processes")
            if iso and iso.get("growth_alerts"):
                scope = f"{row['server']} (isolated)"
                seen[(scope, "rss_growth")] = (
                    "warning",
                    float(iso["growth_alerts"]),
                    1.0,
                    f"MCP server '{row['server']}': {iso['growth_alerts']} of its {iso['sessions']} isolated "
                    f"session(s) grew past the memory-growth thresholds (largest RSS "
                    f"{iso['largest_rss_bytes'] / (1024 * 1024):.0f} MiB)",
                )
            reps = row.get("replicas") or ()
            for rep in reps:
                use = rep.get("resources")
                if use and use.get("rss_growth_alert"):
                    scope = row["server"] if len(reps) == 1 else f"{row['server']}#{rep['replica']}"
                    grown = use["rss_growth_bytes"] / (1024 * 1024)
                    seen[(scope, "rss_growth")] = (
                        "warning",
                        round(grown, 1),
                        float(use.get("growth_warning_mb", 0.0)),
                        f"MCP server '{scope}': memory grew by {grown:.0f} MiB (+{use['rss_growth_pct']:.0f}%) to "
                        f"{use['rss_bytes'] / (1024 * 1024):.0f} MiB over {use['rss_growth_window_s']:.0f} s "
                        f"(pid {use['pid']})",
                    )
        return self._transition(seen, now)

    def _transition(self, seen: dict[tuple[str, str], tuple[str, float, float, str]], now: float) -> list[AlertEvent]:
        events: list[AlertEvent] = []
        for key, (sev, value, thr, msg) in seen.items():
            st = self._active.get(key)
            if st is None or st.severity != sev:
                self._active[key] = _State(sev, now if st is None else st.since, value, thr, msg)
                events.append(AlertEvent(now, "firing", sev, key[0], key[1], value, thr, msg))
            else:
                st.value, st.message = value, msg
        for key in [k for k in self._active if k not in seen]:
            st = self._active.pop(key)
            msg = f"{key[0]}: {key[1]} back within limits after {now - st.since:.0f} s"
            events.append(AlertEvent(now, "resolved", st.severity, key[0], key[1], 0.0, st.threshold, msg))
        for ev in events:
            self.history.append(ev)
            if ev.status == "resolved":
                logger.warning("RESOLVED %s", ev.message)
            elif ev.severity == "critical":
                logger.error("ALERT critical: %s", ev.message)
            else:
                logger.warning("ALERT warning: %s", ev.message)
        return events


def _level(value: float, warn: float, crit: float) -> tuple[str, float]:
    if value > crit:
        return "critical", crit
    if value > warn:
        return "warning", warn
    return "ok", warn


class WebhookSink(ThreadedSink):
    """POSTs each `AlertEvent` as JSON to `url` (5 s timeout; failures counted, never raised)."""

    def __init__(self, url: str, queue_size: int = 256) -> None:
        super().__init__("webhook", queue_size, batch=1)
        self.url = url

    def write(self, items: list[Any]) -> None:
        for ev in items:
            body = json.dumps({"source": "mcpopt", **ev.to_dict()}).encode()
            req = urllib.request.Request(
                self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - the operator's own URL
                resp.read()
