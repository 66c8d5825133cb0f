"""OpenTelemetry: one span per call and MCP metrics, exported over OTLP/HTTP (protobuf).

Spans follow the OpenTelemetry semantic conventions for MCP (gen-ai/mcp.md, Development):
name `tools/call {gen_ai.tool.name}`, kind SERVER (the gateway serves the client's request),
attributes `mcp.method.name`, `gen_ai.tool.name`, `gen_ai.operation.name` (`execute_tool`),
`mcp.session.id` (salted), `error.type` (`tool_error` for an `isError` result, else the outcome)
and `rpc.response.status_code` (the JSON-RPC error code), plus `mcpopt.*` attributes (server,
replica, cache, retries, latency split in ms, bytes, estimated tokens, task info).

Trace context: the telemetry filter makes the span's ids on the request path and puts the W3C
`traceparent` (`00-<trace>-<span>-01`) in the upstream request's `params._meta`, as the MCP
conventions say; a `traceparent` the client sent in `_meta` becomes the span's parent. The
span itself is built later, off the request path, as a finished `ReadableSpan` and exported by
this sink's thread (no SDK tracer runs per call).

Metrics: `mcp.server.operation.duration` (histogram, s) and `mcpopt.tool.calls` (counter),
both with `mcp.method.name`, `gen_ai.tool.name`, `mcpopt.server` and `error.type` on failures.
"""

from __future__ import annotations

import time
from typing import Any

from mcpopt.telemetry.record import CallRecord
from mcpopt.telemetry.sinks import ThreadedSink

_VERSION = "0.1.0"


def traceparent(trace_id: int, span_id: int) -> str:
    """The W3C trace-context header value for a sampled span."""
    return f"00-{trace_id:032x}-{span_id:016x}-01"


def parse_traceparent(value: Any) -> tuple[int, int] | None:
    """(trace id, parent span id) from a W3C `traceparent`, or None when it is not one."""
    if not isinstance(value, str) or len(value) < 55:
        return None
    parts = value.split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id = int(parts[1], 16), int(parts[2], 16)
    except ValueError:
        return None
    return (trace_id, span_id) if trace_id and span_id else None


class OtelSink(ThreadedSink):
    """Exports each record as a span, and records the MCP metrics, to an OTLP/HTTP collector.

    Args:
        endpoint: the collector's base URL (`http://host:4318`); spans go to `/v1/traces`,
            metrics to `/v1/metrics`.
        headers: sent with every export (e.g. an API key).
        interval_s: spans wait up to this long to be exported together; metrics are exported
            this often.
        service_name: the `service.name` resource attribute.
        spans: False at `minimal` (metrics only).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        headers: dict[str, str] | None = None,
        interval_s: float = 5.0,
        service_name: str = "mcpopt",
        spans: bool = True,
        queue_size: int = 4096,
    ) -> None:
        super().__init__("otlp", queue_size, batch=512, linger_s=min(interval_s, 2.0))
        self.endpoint = endpoint.rstrip("/")
        self.headers = dict(headers or {})
        self.interval_s = interval_s
        self.service_name = service_name
        self.spans = spans
        self._exporter: Any = None
        self._meter_provider: Any = None
        self._duration: Any = None
        self._calls: Any = None
        self._resource: Any = None
        self._scope: Any = None

    def open(self) -> None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self._resource = Resource.create({"service.name": self.service_name, "service.version": _VERSION})
        self._scope = InstrumentationScope("mcpopt.telemetry", _VERSION)
        if self.spans:
            self._exporter = OTLPSpanExporter(endpoint=f"{self.endpoint}/v1/traces", headers=self.headers, timeout=5)
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=f"{self.endpoint}/v1/metrics", headers=self.headers, timeout=5),
            export_interval_millis=self.interval_s * 1000,
        )
        self._meter_provider = MeterProvider(resource=self._resource, metric_readers=[reader])
        meter = self._meter_provider.get_meter("mcpopt.telemetry", _VERSION)
        self._duration = meter.create_histogram(
            "mcp.server.operation.duration",
            unit="s",
            description="MCP request duration as observed by the gateway, from receipt until the result is sent",
        )
        self._calls = meter.create_counter("mcpopt.tool.calls", unit="{call}", description="Tool calls by outcome")

    def write(self, items: list[Any]) -> None:
        records = [r for r in items if isinstance(r, CallRecord)]
        for r in records:
            attrs: dict[str, Any] = {
                "mcp.method.name": "tools/call",
                "gen_ai.tool.name": r.tool,
                "mcpopt.server": r.server,
            }
            if r.is_error:
                attrs["error.type"] = r.outcome
            self._duration.record(r.total_ms / 1000, attrs)
            self._calls.add(1, {**attrs, "mcpopt.outcome": r.outcome})
        if self._exporter is None or not records:
            return
        from opentelemetry.sdk.trace.export import SpanExportResult

        result = self._exporter.export([self._span(r) for r in records])
        if result != SpanExportResult.SUCCESS:
            raise RuntimeError(f"OTLP span export to {self.endpoint}/v1/traces failed")

    def _span(self, r: CallRecord) -> Any:
        import random

        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
        from opentelemetry.trace.status import Status, StatusCode

        trace_id = int(r.trace_id, 16) if r.trace_id else random.getrandbits(128) or 1
        span_id = int(r.span_id, 16) if r.span_id else random.getrandbits(64) or 1
        context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        parent = (
            SpanContext(trace_id, int(r.parent_span_id, 16), is_remote=True, trace_flags=TraceFlags(1))
            if r.parent_span_id
            else None
        )
        attrs: dict[str, Any] = {
            "mcp.method.name": "tools/call",
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": r.tool,
            "mcpopt.server": r.server,
            "mcpopt.tool.gateway_name": r.name,
            "mcpopt.outcome": r.outcome,
            "mcpopt.latency.total_ms": r.total_ms,
            "mcpopt.latency.queue_ms": r.queue_ms,
            "mcpopt.latency.upstream_ms": r.upstream_ms,
            "mcpopt.latency.gateway_ms": r.gateway_ms,
            "mcpopt.request.bytes": r.request_bytes,
            "mcpopt.response.bytes": r.response_bytes,
            "mcpopt.tokens.estimated_input": r.tokens_in,
            "mcpopt.tokens.estimated_output": r.tokens_out,
            "mcpopt.retries": r.retries,
            "mcpopt.telemetry.level": r.level,
        }
        optional = {
            "mcp.session.id": r.session,
            "mcpopt.cache": r.cache,
            "mcpopt.replica": r.replica,
            "mcpopt.arguments.hash": r.args_hash,
            "gen_ai.tool.call.arguments": r.arguments,
            "mcpopt.task.type": r.task_type,
            "mcpopt.task.user_intent": r.user_intent,
            "mcpopt.task.performance_target": r.performance_target,
            "rpc.response.status_code": str(r.error_code) if r.error_code is not None else "",
        }
        attrs.update({k: v for k, v in optional.items() if v not in ("", None)})
        if r.coalesced:
            attrs["mcpopt.coalesced"] = True
        status = Status(StatusCode.ERROR, r.outcome) if r.is_error else Status(StatusCode.UNSET)
        if r.is_error:
            attrs["error.type"] = r.outcome
        start = int(r.ts * 1e9)
        return ReadableSpan(
            name=f"tools/call {r.tool}",
            context=context,
            parent=parent,
            resource=self._resource,
            attributes=attrs,
            kind=SpanKind.SERVER,
            status=status,
            start_time=start,
            end_time=start + int(r.total_ms * 1e6),
            instrumentation_scope=self._scope,
        )

    def tick(self) -> None:
        pass

    def close(self) -> None:
        deadline = time.monotonic() + 5
        if self._meter_provider is not None:
            try:
                self._meter_provider.force_flush(timeout_millis=3000)
            finally:
                self._meter_provider.shutdown(timeout_millis=max(100, int((deadline - time.monotonic()) * 1000)))
            self._meter_provider = None
        if self._exporter is not None:
            self._exporter.shutdown()
            self._exporter = None
