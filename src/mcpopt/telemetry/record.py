"""One telemetry record per tool call, and the outcome vocabulary.

Outcomes (the `outcome` field, the Prometheus `outcome` label, the OTel `error.type`):

- `ok`: the upstream answered with a result.
- `tool_error`: the upstream answered with a result marked `isError: true`.
- `protocol_error`: a JSON-RPC error (the server's own, or the gateway's for a bad call).
- `timeout`: no answer in time (error code `UPSTREAM_TIMEOUT`, or the SDK's request timeout).
- `rejected`: the gateway refused the call (code `GATEWAY_REJECTED`: limits, queue full).
- `unavailable`: no upstream could take the call (`UPSTREAM_UNAVAILABLE`, `UPSTREAM_CLOSED`).
- `cancelled`: the client cancelled the call (not counted as an error).
- `internal_error`: an unexpected exception inside the gateway.
- `denied`: the principal's policy does not grant the call (code `POLICY_DENIED`); never sent
  upstream, not counted as an error (the gateway did what it was configured to do).
- `limited`: a rate limit or quota refused the call (code `RATE_LIMITED`); not counted as an error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any, NamedTuple

OUTCOMES = (
    "ok",
    "tool_error",
    "protocol_error",
    "timeout",
    "rejected",
    "unavailable",
    "cancelled",
    "internal_error",
    "denied",
    "limited",
)
ERROR_OUTCOMES = frozenset(OUTCOMES) - {"ok", "cancelled", "denied", "limited"}
"""Outcomes counted in error rates, grades and alerts."""

LEVELS = ("minimal", "standard", "detailed")


class CallRecord(NamedTuple):
    """What telemetry keeps of one tool call (one row of the SQLite `calls` table).

    A named tuple, built once and never changed: the SQLite sink hands records to
    `executemany` as they are (no per-field conversion on the writer thread), and field access
    is a C-level index.

    Times are milliseconds, sizes bytes, `ts` Unix seconds at the call's start. Fields that the
    privacy level does not allow stay empty ("" or 0): `session`, `seq` and `args_hash` need
    `standard`; `arguments` (redacted JSON) needs `detailed`; task info needs `standard`.

    Attributes:
        server, tool: upstream server and its tool name; `name` is the gateway name.
        outcome: one of `OUTCOMES`; `error_code` the JSON-RPC code of a failed call.
        total_ms: the whole call as the outermost filter saw it; split into `queue_ms` (waiting
            for a slot), `upstream_ms` (on the wire to the upstream, retries included) and
            `gateway_ms` (the rest: filters, cache).
        tokens_in / tokens_out: estimated as bytes / 4 of the request params / the result.
        tokens_saved: tokens a filter says it saved (`call.attrs["tokens_saved"]`).
        cache: "hit", "miss", or "" when the call was not cacheable.
        seq: the call's 1-based position in its session (tool sequences).
        trace_id / span_id: the call's OTel span (hex), when OTLP export is on;
            `parent_span_id` the client's span when its `_meta.traceparent` named one.
        variant: the canary arms the call fell in, `"<rule id>=canary|control"` comma-separated
            (`mcpopt.pipeline.rules`: a rule in canary rollout applies to a share of its calls;
            the optimizer compares the arms).
        principal: who called (audit): "" at `minimal`, a salted hash of the principal's key at
            `standard`, its `sub` / `apikey:<name>` at `detailed`; `local` for the trusted local user.
        decision: the policy's verdict: `allow`, `deny`, `limit`, or "" when no policy applies
            (authentication off); `policy_rule` the rule that decided, or the limit's scope.
        gateway_replica: the gateway replica that served the call (`gateway.shared.replica`, by
            default `<hostname>:<port>` under `serve -t http`; "" for an unnamed one), so records
            of several replicas in one store stay apart (`replica` is the upstream's replica).
    """

    ts: float
    server: str
    tool: str
    name: str
    outcome: str
    total_ms: float
    queue_ms: float = 0.0
    upstream_ms: float = 0.0
    gateway_ms: float = 0.0
    request_bytes: int = 0
    response_bytes: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_saved: int = 0
    cache: str = ""
    coalesced: bool = False
    retries: int = 0
    replica: int | None = None
    error_code: int | None = None
    session: str = ""
    seq: int = 0
    args_hash: str = ""
    arguments: str = ""
    task_type: str = ""
    user_intent: str = ""
    performance_target: str = ""
    trace_id: str = ""
    span_id: str = ""
    parent_span_id: str = ""
    level: str = "standard"
    variant: str = ""
    principal: str = ""
    decision: str = ""
    policy_rule: str = ""
    gateway_replica: str = ""

    @property
    def is_error(self) -> bool:
        return self.outcome in ERROR_OUTCOMES

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


FIELDS: tuple[str, ...] = CallRecord._fields
"""Column order of the `calls` table and of JSONL exports."""


def estimate_tokens(n_bytes: int) -> int:
    """A rough token count: 4 bytes of JSON per token (the usual rule of thumb for English/JSON)."""
    return (n_bytes + 3) // 4


def column(name: str) -> itemgetter[Any]:
    """A C-level getter of the field `name` of `CallRecord`s (for readers of whole batches:
    `map(column("total_ms"), records)`).

    Raises:
        ValueError: `name` is not a field.
    """
    return itemgetter(FIELDS.index(name))


def columns(*names: str) -> itemgetter[Any]:
    """A C-level getter of the tuple of the fields `names` (e.g. `columns("server", "tool")`).

    Raises:
        ValueError: a name is not a field.
    """
    return itemgetter(*(FIELDS.index(name) for name in names))


def group(records: Sequence[CallRecord], key: Callable[[CallRecord], Any]) -> dict[Any, list[CallRecord]]:
    """`records` by `key(record)`: each group in the records' order, the groups in the order of
    their first record (a batch of one key, the usual case, costs two C-level passes)."""
    if not records:
        return {}
    keys = list(map(key, records))
    first = keys[0]
    if keys.count(first) == len(keys):
        return {first: list(records)}
    out: dict[Any, list[CallRecord]] = {}
    for k, rec in zip(keys, records, strict=True):
        part = out.get(k)
        if part is None:
            out[k] = [rec]
        else:
            part.append(rec)
    return out
