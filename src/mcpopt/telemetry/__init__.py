"""Telemetry: one record per tool call, privacy levels, sinks (SQLite, JSONL, OTLP).

This package records; it never imports what reads its records. The hub that feeds records to
the monitor and Prometheus, `mcpopt.monitor.hub.Telemetry`, sits above it, and the assembly
(`mcpopt.gateway.assembly`) wires it: `telemetry.filter` first and `telemetry.timer` last in the
pipeline, `start()`/`stop()` with the gateway, the monitor's tools and HTTP routes beside.

Modules: `collector` (the filters, the record builder), `record` (`CallRecord`, outcomes),
`privacy` (salt, hashes, redaction), `sinks` and `store` (SQLite), `otel` (OTLP spans and
metrics, trace context).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mcpopt.telemetry.collector import TelemetryFilter, UpstreamTimer
    from mcpopt.telemetry.record import ERROR_OUTCOMES, OUTCOMES, CallRecord

__all__ = ["ERROR_OUTCOMES", "OUTCOMES", "CallRecord", "TelemetryFilter", "UpstreamTimer"]

_WHERE = {
    "TelemetryFilter": "collector",
    "UpstreamTimer": "collector",
    "CallRecord": "record",
    "OUTCOMES": "record",
    "ERROR_OUTCOMES": "record",
}


def __getattr__(name: str) -> Any:
    # Lazy: importing `mcpopt.telemetry.record` should not pull in the pipeline (collector).
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"mcpopt.telemetry.{_WHERE[name]}"), name)
    raise AttributeError(name)
