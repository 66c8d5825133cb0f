"""The request-path half of telemetry: two pipeline filters and the record builder.

`TelemetryFilter` goes first in the pipeline. Per call it does only this on the request path:
two `perf_counter()` reads, an in-flight count, (when OTLP is on) new span ids and the
`traceparent` put in the upstream request's `_meta`, and one `deque.append` of
`(call, t0, t1, result, exception)`. Everything else -- classifying the outcome, sizes,
hashes, redaction, statistics, Prometheus, spans, the store -- happens later in
`build_records` (a whole batch of pending calls at a time) and the hub's background loop.
The call is recorded whatever happens inside (a result, an `isError` result, any exception,
a cancellation), and the exception goes on unchanged. When the hand-off queue is full (the
loop is starved) the record is dropped and counted in `dropped`.

`UpstreamTimer` goes last (just before the upstream): it adds the time spent below it to
`call.attrs["terminal_ms"]`, from which the record's `upstream_ms` is derived unless the
terminal set `call.attrs["upstream_ms"]` itself (and `call.attrs["queue_ms"]`, time waiting
for a concurrency slot, which is then taken out of the upstream time).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from random import getrandbits
from time import perf_counter
from typing import Any, Protocol

import orjson
from mcp.shared.exceptions import MCPError

from mcpopt.errors import (
    GATEWAY_REJECTED,
    POLICY_DENIED,
    RATE_LIMITED,
    UPSTREAM_CLOSED,
    UPSTREAM_TIMEOUT,
    UPSTREAM_UNAVAILABLE,
    GatewayError,
)
from mcpopt.pipeline import Next, ToolCall, ToolResult
from mcpopt.telemetry.otel import parse_traceparent
from mcpopt.telemetry.privacy import redact_text, redacted_json
from mcpopt.telemetry.record import CallRecord

REQUEST_TIMEOUT = -32001
"""The SDK's own request-timeout code (mcp.shared.exceptions)."""

TASK_KEYS = ("user_intent", "task_type", "performance_target")
"""`_meta` keys (also under `_meta["mcpopt/task"]`) with which a client describes its task."""


class RecordContext(Protocol):
    """What `build_records` needs of the hub: the privacy level, salted hashes (`hash_arguments` is
    `privacy.hash_arguments` under the hub's salt), per-session ids and the clock."""

    @property
    def level(self) -> str: ...

    @property
    def salt(self) -> bytes: ...

    def session_hash(self, session: str) -> str: ...

    def principal_hash(self, key: str) -> str: ...

    def hash_arguments(self, arguments: Any) -> str: ...

    def next_seq(self, session: str) -> int: ...

    def wall(self, t_perf: float) -> float: ...


Pending = tuple[ToolCall, float, float, "ToolResult | None", "BaseException | None"]


class TelemetryFilter:
    """The outermost pipeline filter: hands each finished call to the hub (see the module doc)."""

    __slots__ = ("enabled", "propagate", "inflight", "dropped", "_pending", "_cap")

    def __init__(self, pending: deque[Pending], cap: int, *, enabled: bool = True, propagate: bool = False) -> None:
        self.enabled = enabled
        self.propagate = propagate
        self.inflight = 0
        """Calls inside the filter now (`mcpopt_inflight_calls`)."""
        self.dropped = 0
        self._pending = pending
        self._cap = cap

    def wanted(self, server: str, tool: str, info: Any) -> bool:
        return self.enabled

    async def __call__(self, call: ToolCall, next: Next) -> ToolResult:
        if not self.enabled:
            return await next(call)
        if self.propagate:
            _inject_traceparent(call)
        self.inflight += 1
        t0 = perf_counter()
        try:
            result = await next(call)
        except BaseException as exc:
            self._done(call, t0, None, exc)
            raise
        t1 = perf_counter()  # `_done`, inline on the usual path
        self.inflight -= 1
        pending = self._pending
        if len(pending) < self._cap:
            pending.append((call, t0, t1, result, None))
        else:
            self.dropped += 1
        return result

    def _done(self, call: ToolCall, t0: float, result: ToolResult | None, exc: BaseException | None) -> None:
        t1 = perf_counter()
        self.inflight -= 1
        pending = self._pending
        if len(pending) < self._cap:
            pending.append((call, t0, t1, result, exc))
        else:
            self.dropped += 1


class UpstreamTimer:
    """The innermost filter: accumulates time spent in the terminal in `call.attrs["terminal_ms"]`."""

    __slots__ = ("enabled",)

    times_terminal = True
    """Left out of a pipeline whose terminal times itself (`Pipeline(timed_terminal=True)`)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def wanted(self, server: str, tool: str, info: Any) -> bool:
        return self.enabled

    async def __call__(self, call: ToolCall, next: Next) -> ToolResult:
        if not self.enabled:
            return await next(call)
        t0 = perf_counter()
        try:
            return await next(call)
        finally:
            attrs = call.attrs
            attrs["terminal_ms"] = attrs.get("terminal_ms", 0.0) + (perf_counter() - t0) * 1000


def _inject_traceparent(call: ToolCall) -> None:
    """New span ids for the call; its `traceparent` replaces (and parents to) the client's."""
    params = call.params
    meta = params.get("_meta")
    parent = parse_traceparent(meta.get("traceparent")) if isinstance(meta, dict) and meta else None
    trace_id = parent[0] if parent is not None else getrandbits(128) or 1
    span_id = getrandbits(64) or 1
    call.attrs["_trace"] = (trace_id, span_id, parent[1] if parent is not None else 0)
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta["traceparent"] = f"00-{trace_id:032x}-{span_id:016x}-01"
    params["_meta"] = meta


def classify(result: ToolResult | None, exc: BaseException | None) -> tuple[str, int | None]:
    """(outcome, JSON-RPC error code) of a finished call; see `mcpopt.telemetry.record`."""
    if exc is None:
        return ("tool_error" if isinstance(result, dict) and result.get("isError") else "ok"), None
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled", None
    if isinstance(exc, MCPError):
        code = exc.error.code
    elif isinstance(exc, GatewayError):
        code = exc.code
    elif isinstance(exc, TimeoutError):
        return "timeout", None
    else:
        return "internal_error", None
    if code in (UPSTREAM_TIMEOUT, REQUEST_TIMEOUT):
        return "timeout", code
    if code == GATEWAY_REJECTED:
        return "rejected", code
    if code == POLICY_DENIED:
        return "denied", code
    if code == RATE_LIMITED:
        return "limited", code
    if code in (UPSTREAM_UNAVAILABLE, UPSTREAM_CLOSED):
        return "unavailable", code
    return "protocol_error", code


_NO_TASK: dict[str, Any] = {}


def task_info(call: ToolCall) -> dict[str, Any]:
    """The client's task description: `call.attrs["task"]`, else `_meta` (or `_meta["mcpopt/task"]`).
    The dict returned is not to be modified (it may be shared)."""
    task = call.attrs.get("task")
    if isinstance(task, dict):
        return task
    meta = call.params.get("_meta")
    if not meta or not isinstance(meta, dict):
        return _NO_TASK
    nested = meta.get("mcpopt/task")
    if isinstance(nested, dict):
        return nested
    if "user_intent" not in meta and "task_type" not in meta and "performance_target" not in meta:
        return _NO_TASK  # the usual case: no frame for the comprehension below
    return {k: meta[k] for k in TASK_KEYS if k in meta}


def build_record(hub: RecordContext, item: Pending) -> CallRecord:
    """Turn a pending call into a `CallRecord`, applying the privacy level (off the request path).

    Raises whatever building it raised (see `build_records`)."""
    return build_records(hub, (item,))[0]


_new_record = tuple.__new__
_ATTRS = (
    "queue_ms",
    "upstream_ms",
    "terminal_ms",
    "cache",
    "_trace",
    "tokens_saved",
    "coalesced",
    "retries",
    "replica",
    "decision",
    "policy_rule",
)
"""The `call.attrs` keys a record reads, in the order `build_records` unpacks them."""
_NO_ARGS: dict[str, Any] = {}
_SIZE_OPT = orjson.OPT_NON_STR_KEYS


def build_records(
    hub: RecordContext, items: Iterable[Pending], on_error: Callable[[Exception], None] | None = None
) -> list[CallRecord]:
    """`CallRecord`s of pending calls, in order, applying the privacy level (off the request path).

    One loop for a whole batch: the hub's level, salt hasher and clock are looked up once, and
    each record is made as a tuple of its fields in column order (`CallRecord`'s own `__new__`
    is a Python function of 35 arguments). A call whose record cannot be built is left out and its
    exception passed to `on_error`; with `on_error` None it is raised.
    """
    level = hub.level
    named = level != "minimal"
    detailed = level == "detailed"
    hash_args = hub.hash_arguments if named else None
    session_hash = hub.session_hash
    next_seq = hub.next_seq
    principal_hash = hub.principal_hash
    wall = hub.wall
    replica_id = getattr(hub, "replica_id", "")
    dumps = orjson.dumps
    out: list[CallRecord] = []
    append = out.append
    for item in items:
        try:
            call, t0, t1, result, exc = item
            if exc is None and type(result) is dict:
                outcome, code = ("tool_error" if result.get("isError") else "ok"), None
            else:
                outcome, code = classify(result, exc)
            attrs = call.attrs
            # One C-level pass for the attrs a record reads (a missing one is None).
            queue_ms, upstream, terminal, cache, trace, saved, coalesced, retries, replica, decision, rule = map(
                attrs.get, _ATTRS
            )
            total = (t1 - t0) * 1000
            queue_ms = float(queue_ms or 0.0)
            if upstream is None:
                upstream = max(0.0, terminal - queue_ms) if terminal is not None else 0.0
            upstream = float(upstream)
            params = call.params
            if params:
                try:
                    req = len(dumps(params, option=_SIZE_OPT))
                except TypeError:
                    req = len(repr(params))
            else:
                req = 0
            if result:
                try:
                    resp = len(dumps(result, option=_SIZE_OPT))
                except TypeError:
                    resp = len(repr(result))
            else:
                resp = 0
            trace_id = span_id = parent_span_id = session = args_hash = arguments = ""
            task_type = user_intent = performance_target = ""
            seq = 0
            principal = ""
            if named:
                who = call.principal
                if who is not None:
                    principal = who.audit_id(level, principal_hash)
                if trace is not None:
                    trace_id, span_id = f"{trace[0]:032x}", f"{trace[1]:016x}"
                    parent_span_id = f"{trace[2]:016x}" if trace[2] else ""
                sid = call.session_id or call.partition
                if sid:
                    session = session_hash(sid)
                    seq = next_seq(session)
                arguments_in = params.get("arguments") or _NO_ARGS  # `call.arguments`, inline
                args_hash = hash_args(arguments_in)  # type: ignore[misc]
                task = task_info(call)
                if task:
                    task_type = str(task.get("task_type") or "")[:200]
                    performance_target = str(task.get("performance_target") or "")[:200]
                    user_intent = redact_text(str(task.get("user_intent") or ""))[:1000]
                if detailed:
                    arguments = redacted_json(arguments_in)
            append(
                _new_record(
                    CallRecord,
                    (
                        wall(t0),
                        call.server,
                        call.tool,
                        call.name,
                        outcome,
                        round(total, 3),
                        round(queue_ms, 3) if queue_ms else 0.0,
                        round(upstream, 3),
                        round(max(0.0, total - queue_ms - upstream), 3),
                        req,
                        resp,
                        (req + 3) // 4,  # estimate_tokens, inline
                        (resp + 3) // 4,
                        int(saved or 0),
                        cache if isinstance(cache, str) else "",
                        bool(coalesced),
                        int(retries or 0),
                        replica,
                        code,
                        session,
                        seq,
                        args_hash,
                        arguments,
                        task_type,
                        user_intent,
                        performance_target,
                        trace_id,
                        span_id,
                        parent_span_id,
                        level,
                        ",".join(attrs["variants"]) if "variants" in attrs else "",
                        principal,
                        str(decision or ""),
                        str(rule or "")[:200],
                        replica_id,
                    ),
                )
            )
        except Exception as exc:  # noqa: BLE001 - one bad call must not cost the batch its records
            if on_error is None:
                raise
            on_error(exc)
    return out
