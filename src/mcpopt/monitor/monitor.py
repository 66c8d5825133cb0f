"""The monitor: rolling figures per tool, per server and overall, a timeline, alerts.

Fed one `CallRecord` at a time by the telemetry hub (off the request path); read by the
gateway tools, the dashboard, `/metrics` and the alert loop. Single-threaded: everything runs
on the gateway's event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from mcpopt.monitor.alerts import AlertManager
from mcpopt.monitor.stats import Rollup, Series, Timeline, end_times
from mcpopt.telemetry.record import CallRecord, columns, group

_TOOL = columns("server", "tool")
BATCH_MIN = 8
"""Smaller batches are fed record by record (the batch path's fixed cost would exceed its gain)."""


class Monitor:
    """Rolling statistics and alerts.

    Args:
        settings: a `TelemetrySettings` (`window_s`, `grades`, SLO thresholds, anomaly knobs).
        clock: Unix seconds (tests pass a fake one).
    """

    def __init__(self, settings: Any, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.tools: dict[tuple[str, str], Series] = {}
        """Per (server, tool): the only series fed per record; `servers` and `overall` roll them up."""
        self.timeline = Timeline()
        self.alerts = AlertManager(settings)
        self.started = clock()

    def _series(self, *, detect: bool = True) -> Series:
        return Series(z=self.settings.anomaly_z, min_samples=self.settings.anomaly_min_calls, detect=detect)

    @property
    def servers(self) -> dict[str, Rollup]:
        """Per server: its tools' series read as one (computed now; see `Rollup`)."""
        parts: dict[str, list[Series]] = {}
        for (server, _), series in self.tools.items():
            parts.setdefault(server, []).append(series)
        return {server: Rollup(group) for server, group in parts.items()}

    @property
    def overall(self) -> Rollup:
        """Every tool's series read as one (computed now)."""
        return Rollup(list(self.tools.values()))

    def observe(self, rec: CallRecord) -> None:
        """Add one finished call (its end time is `ts + total_ms`)."""
        end = rec.ts + rec.total_ms / 1000
        key = (rec.server, rec.tool)
        tool = self.tools.get(key)
        if tool is None:
            tool = self.tools[key] = self._series()
        tool.add(rec, end)
        self.timeline.add(end, rec)

    def observe_many(self, recs: Sequence[CallRecord]) -> None:
        """`observe` each record in turn (the same figures), a whole batch per tool at once
        (batches under `BATCH_MIN` records one by one)."""
        if not recs:
            return
        if len(recs) < BATCH_MIN:
            for rec in recs:
                self.observe(rec)
            return
        tools = self.tools
        ends = end_times(recs)
        groups = group(recs, _TOOL)
        for key, run in groups.items():
            tool = tools.get(key)
            if tool is None:
                tool = tools[key] = self._series()
            tool.add_many(run, ends if len(groups) == 1 else end_times(run))
        self.timeline.add_many(recs, ends)

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """Figures over the rolling window (see `Series.summary` for each row's keys).

        Returns:
            `{window_s, overall: {...}, tools: [{server, tool, ...}], servers: [{server, ...}]}`,
            tools sorted by server then tool.
        """
        now = self.clock() if now is None else now
        since = now - self.settings.window_s
        table = self.settings.grades
        tools = []
        for (server, tool), series in sorted(self.tools.items()):
            row = {"server": server, "tool": tool, **series.summary(since, table)}
            row["anomalies"] = [
                d.describe() for d in (series.latency, series.errors_ewma) if d.flagged or d.n > d.min_samples
            ]
            tools.append(row)
        servers = [{"server": s, **series.summary(since, table)} for s, series in sorted(self.servers.items())]
        return {
            "window_s": self.settings.window_s,
            "overall": self.overall.summary(since, table),
            "tools": tools,
            "servers": servers,
        }

    def evaluate(self, health: list[dict[str, Any]] | None = None, now: float | None = None) -> list[Any]:
        """Run the alert rules once (see `AlertManager.evaluate`)."""
        return self.alerts.evaluate(self.tools, self.clock() if now is None else now, health)
