"""The monitor: rolling percentiles, grades A-F, SLO alerts, anomaly detection, the dashboard,
the performance gateway tools and the `mcpopt stats` report.

Modules: `stats` (windows, percentiles, grades, timeline), `anomaly` (EWMA z-score),
`alerts` (rules, de-duplication, webhook), `monitor` (`Monitor`), `dashboard` (routes and the
static page), `tools` (gateway tools), `report` (CLI tables and export), `bench` (the
telemetry overhead benchmark).
"""

from mcpopt.monitor.monitor import Monitor
from mcpopt.monitor.stats import grade, percentile

__all__ = ["Monitor", "grade", "percentile"]
