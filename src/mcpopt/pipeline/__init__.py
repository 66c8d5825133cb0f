"""The request path as a chain of filters.

Every tool call (from a client, and later from the batch tool and code mode) becomes a
`ToolCall` and runs through the same chain::

    filter_1 -> filter_2 -> ... -> terminal (the upstream)

A filter is any callable `async (call, next) -> dict` (the raw `CallToolResult` wire dict):
it may answer without calling `next` (a cache hit), call it several times (a retry on
another replica), or decorate the result (telemetry). The chain is composed once, when the
filter list is set, so a call that no filter touches costs one function call per filter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from mcpopt.policy import UNKNOWN, ToolInfo
from mcpopt.upstream.server import ProgressFn

ToolResult = dict[str, Any]
"""A `CallToolResult` (or `InputRequiredResult`) in wire form, as the upstream sent it."""


@dataclass(slots=True)
class ToolCall:
    """One `tools/call` on its way through the gateway.

    Attributes:
        server: upstream server name.
        tool: the tool's name on that server (not the gateway name).
        name: the gateway name the client used.
        params: the raw `CallToolRequestParams` to send upstream (name already rewritten);
            `params["arguments"]` holds the arguments.
        on_progress: relays upstream progress to the client, if it asked for progress.
        info: what is known of the tool (read-only, idempotent, TTL, invalidation rules).
        partition: the caller's auth partition ("" for a single-user front such as stdio);
            cached and coalesced results are never shared across partitions.
        session_id: an opaque id of the client connection (sticky routing, telemetry).
        principal: who is calling (`mcpopt.auth.Principal`; None or `LOCAL` for the trusted local
            user): policy, rate limits, session isolation and audit read it.
        attrs: scratch space for filters (e.g. timings, cache hit), never sent anywhere.
    """

    server: str
    tool: str
    name: str
    params: dict[str, Any]
    on_progress: ProgressFn | None = None
    info: ToolInfo = UNKNOWN
    partition: str = ""
    session_id: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)
    principal: Any = None

    @property
    def arguments(self) -> Mapping[str, Any]:
        return self.params.get("arguments") or {}


Next = Callable[[ToolCall], Awaitable[ToolResult]]


class Filter(Protocol):
    async def __call__(self, call: ToolCall, next: Next) -> ToolResult: ...


class Pipeline:
    """Composes filters around a terminal; `await pipeline(call)` runs the chain."""

    def __init__(self, terminal: Next, filters: Sequence[Filter] = ()) -> None:
        self._terminal = terminal
        self.filters: list[Filter] = []
        self._entry: Next = terminal
        self.set_filters(filters)

    def set_filters(self, filters: Sequence[Filter]) -> None:
        """Replace the filter list (outermost first); takes effect for the next call."""
        self.filters = list(filters)
        entry: Next = self._terminal
        for flt in reversed(self.filters):
            entry = partial(flt, next=entry)  # type: ignore[call-arg]
        self._entry = entry

    def __call__(self, call: ToolCall) -> Awaitable[ToolResult]:
        return self._entry(call)
