"""Telemetry: one record per tool call, privacy levels, sinks (SQLite, JSONL, OTLP), Prometheus.

Wiring (in the gateway)::

    telemetry = Telemetry(config.gateway.telemetry, gateway)
    pipeline filters: [telemetry.filter, ...other filters..., telemetry.timer]
    telemetry.register_tools(gateway.own)          # mcpopt__get_performance_status, ..._benchmark
    await telemetry.start() / await telemetry.stop()
    HTTP front: custom_starlette_routes=[..., *telemetry.routes()]   # /metrics, /dashboard

Modules: `collector` (the filters, the record builder), `hub` (`Telemetry`), `record`
(`CallRecord`, outcomes), `privacy` (salt, hashes, redaction), `sinks` and `store` (SQLite),
`otel` (OTLP spans and metrics, trace context), `prom` (Prometheus).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mcpopt.telemetry.collector import TelemetryFilter, UpstreamTimer
    from mcpopt.telemetry.hub import Telemetry
    from mcpopt.telemetry.record import ERROR_OUTCOMES, OUTCOMES, CallRecord

__all__ = ["ERROR_OUTCOMES", "OUTCOMES", "CallRecord", "Telemetry", "TelemetryFilter", "UpstreamTimer"]

_WHERE = {
    "Telemetry": "hub",
    "TelemetryFilter": "collector",
    "UpstreamTimer": "collector",
    "CallRecord": "record",
    "OUTCOMES": "record",
    "ERROR_OUTCOMES": "record",
}


def __getattr__(name: str) -> Any:
    # Lazy, so that `mcpopt.monitor` can use `mcpopt.telemetry.record` without a cycle.
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"mcpopt.telemetry.{_WHERE[name]}"), name)
    raise AttributeError(name)
