"""The request path as a chain of filters.

Every tool call (from a client, and later from the batch tool and code mode) becomes a
`ToolCall` and runs through the same chain::

    filter_1 -> filter_2 -> ... -> terminal (the upstream)

A filter is any callable `async (call, next) -> dict` (the raw `CallToolResult` wire dict):
it may answer without calling `next` (a cache hit), call it several times (a retry on
another replica), or decorate the result (telemetry).

The chain is compiled per tool: for each (server, tool) the pipeline keeps the chain of the
filters with work to do for it, composed once. A filter says so with an optional
`wanted(server, tool, info) -> bool` (no such method: always wanted); one whose answers can
change at run time also has `plan_state()`, called once per call, whose result (compared by
identity) rebuilds every tool's chain when it changes (the rules filter: its rule set, re-read
from the file). A filter with `rewrites = True` may change the call itself (its `info`, tool,
arguments: the rules filter), so every filter after it is kept for a tool it is wanted for.
A tool's chain is also rebuilt when the call's `info` is another object (a new catalog), and
all of them when the filter list is set.
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
    """Composes filters around a terminal; `await pipeline(call)` runs the call's chain.

    Args:
        terminal: the innermost step (the upstream).
        filters: outermost first.
        timed_terminal: the terminal records its own time in `call.attrs` (`terminal_ms`,
            `upstream_ms`): filters marked `times_terminal` (the telemetry's `UpstreamTimer`) are
            then left out of every chain.
    """

    def __init__(self, terminal: Next, filters: Sequence[Filter] = (), *, timed_terminal: bool = False) -> None:
        self._terminal = terminal
        self.timed_terminal = timed_terminal
        self.filters: list[Filter] = []
        self._plans: dict[tuple[str, str], tuple[ToolInfo, Next]] = {}
        self._state: Callable[[], object] | None = None
        self._seen: object = None
        self.set_filters(filters)

    def set_filters(self, filters: Sequence[Filter]) -> None:
        """Replace the filter list (outermost first); takes effect for the next call."""
        self.filters = list(filters)
        states = [f.plan_state for f in self.filters if callable(getattr(f, "plan_state", None))]  # type: ignore[attr-defined]
        # One callable per call: the only filter's own (the usual case), or one tupling them all.
        self._state = states[0] if len(states) == 1 else (lambda: tuple(s() for s in states)) if states else None
        self._seen = self._state() if self._state is not None else None
        self._plans = {}

    def chain(self, server: str, tool: str, info: ToolInfo = UNKNOWN) -> list[Filter]:
        """The filters a call to `server`'s `tool` with `info` runs through, outermost first."""
        kept: list[Filter] = []
        rewritten = False
        for flt in self.filters:
            if self.timed_terminal and getattr(flt, "times_terminal", False):
                continue
            wanted = getattr(flt, "wanted", None)
            if not rewritten and wanted is not None and not wanted(server, tool, info):
                continue
            kept.append(flt)
            rewritten = rewritten or bool(getattr(flt, "rewrites", False))
        return kept

    def _compile(self, call: ToolCall) -> Next:
        entry: Next = self._terminal
        for flt in reversed(self.chain(call.server, call.tool, call.info)):
            entry = partial(flt, next=entry)  # type: ignore[call-arg]
        self._plans[(call.server, call.tool)] = (call.info, entry)
        return entry

    def __call__(self, call: ToolCall) -> Awaitable[ToolResult]:
        state = self._state
        if state is not None:
            now = state()
            if now is not self._seen and now != self._seen:  # a tuple of states compares item by item
                self._seen = now
                self._plans = {}
        plan = self._plans.get((call.server, call.tool))
        if plan is None or plan[0] is not call.info:
            return self._compile(call)(call)
        return plan[1](call)
