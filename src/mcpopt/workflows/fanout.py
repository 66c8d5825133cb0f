"""Fan-out: the same call to several servers, or to every replica of one, gathered by `all`, `first`
or `quorum: N`, each answer labelled with where it came from.

Targets:
- `servers: [a, b]` calls the tool each of those servers serves under `tool` (its own name), as the
  gateway names it (`a__tool`, `b__tool`);
- `replicas: a` calls `a`'s tool once per replica, each call pinned to its replica with
  `_meta["mcpopt/replica"] = k` (the pool's hook, `mcpopt.upstream.pool`). Each replica's call gets
  its own cache partition (the caller's, suffixed), so neither the cache nor coalescing answers one
  replica's call with another's result.

Every call goes through `GatewayAPI.call_tool` with the caller's link. Gathering:
- `all`: every answer; fails if any target fails;
- `first`: the first success wins; the calls still in flight are cancelled when the tool is safe to
  repeat (read-only or idempotent), and otherwise awaited (a write is never abandoned mid-flight);
- `quorum`: `quorum` successes; fails as soon as that many can no longer succeed.

In a workflow (a `fanout:` step) every target call is journaled like any step call (item = the
target's label). The `mcpopt__fanout` tool makes the same calls without a journal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from mcpopt.api import ClientLink, GatewayAPI
from mcpopt.policy import UNKNOWN
from mcpopt.templating import StepView
from mcpopt.upstream.pool import PIN_META_KEY
from mcpopt.workflow_model import FanOut
from mcpopt.workflows.views import FanoutView


@dataclass(frozen=True)
class Target:
    """One destination of a fan-out: `label` (`server`, or `server#k` for replica k), the gateway
    tool name to call, and the replica to pin (1-based; None: let the pool route)."""

    label: str
    tool: str
    server: str
    replica: int | None = None

    def to_list(self) -> list[Any]:
        return [self.label, self.tool, self.server, self.replica]

    @staticmethod
    def from_list(row: list[Any]) -> Target:
        return Target(str(row[0]), str(row[1]), str(row[2]), row[3])


def resolve_targets(api: GatewayAPI, fan: FanOut) -> list[Target]:
    """The calls a fan-out makes, from the live catalog.

    Raises:
        MCPError: INVALID_PARAMS naming an unknown server, a server that does not serve the
            tool, or a quorum larger than the replicas.
    """
    names: dict[str, str] = {}
    for gname, route in api.catalog.tool_routes.items():
        if route.name == fan.tool:
            names.setdefault(route.server, gname)
    servers = fan.servers or [fan.replicas or ""]
    problems = []
    for server in servers:
        if server not in api.upstreams:
            known = ", ".join(sorted(api.upstreams)) or "none"
            problems.append(f"unknown MCP server {server!r} (servers: {known})")
        elif server not in names:
            pool = api.upstreams[server]
            state = "" if pool.state == "ready" else f" (it is {pool.state})"
            problems.append(f"MCP server {server!r} does not serve a tool {fan.tool!r}{state}")
    if problems:
        raise MCPError(code=INVALID_PARAMS, message="fanout: " + "; ".join(problems))
    if fan.replicas:
        server = fan.replicas
        n = len(api.upstreams[server].replicas)
        if fan.quorum is not None and fan.quorum > n:
            raise MCPError(
                code=INVALID_PARAMS, message=f"fanout: quorum {fan.quorum} is more than the {n} replicas of {server!r}"
            )
        return [Target(f"{server}#{k}", names[server], server, k) for k in range(1, n + 1)]
    return [Target(server, names[server], server) for server in fan.servers]


def target_call(link: ClientLink, target: Target) -> tuple[ClientLink, dict[str, Any]]:
    """The link and `_meta` of one target's call (a replica: pinned, with its own cache partition)."""
    if target.replica is None:
        return link, {}
    tlink = dataclasses.replace(link, partition=f"{link.partition}|replica:{target.replica}")
    return tlink, {PIN_META_KEY: target.replica}


def needed(fan: FanOut, n: int) -> int:
    """Successes the gather rule needs out of `n` targets."""
    if fan.gather == "all":
        return n
    if fan.gather == "first":
        return 1
    assert fan.quorum is not None
    return fan.quorum


async def gather(
    targets: list[Target],
    need: int,
    call: Callable[[Target], Coroutine[Any, Any, bool]],
    *,
    done_ok: Mapping[str, bool] | None = None,
    cancel_losers: bool,
) -> tuple[bool, str | None]:
    """Run `call(target)` (True = success) for every target not already decided in `done_ok`, until
    `need` successes or until they are out of reach. Returns (enough successes, first success label)."""
    done_ok = dict(done_ok or {})
    ok = sum(done_ok.values())
    failed = sum(not v for v in done_ok.values())
    first: str | None = next((label for label, v in done_ok.items() if v), None)
    pending: dict[asyncio.Task[bool], Target] = {}
    for t in targets:
        if t.label not in done_ok:
            pending[asyncio.create_task(call(t))] = t
    total = len(targets)
    try:
        while pending and ok < need and failed <= total - need:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                t = pending.pop(task)
                if task.result():
                    ok += 1
                    first = first or t.label
                else:
                    failed += 1
        if pending:
            if cancel_losers:
                for task in pending:
                    task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    except BaseException:
        for task in pending:
            task.cancel()
        raise
    return ok >= need, first


def gathered_view(targets: list[Target], units: Mapping[str, Any], winner: str | None, ms: float) -> FanoutView:
    """The template view of a fan-out step from its units (objects with `status` and `view()`)."""
    rows: list[tuple[str, StepView | None]] = []
    for t in targets:
        u = units.get(t.label)
        rows.append((t.label, u.view() if u is not None and u.status in ("succeeded", "failed", "in_doubt") else None))
    return FanoutView(rows, winner, ms)


# ---- the mcpopt__fanout tool -------------------------------------------------------------------------
async def fanout_tool(api: GatewayAPI, arguments: Mapping[str, Any], link: ClientLink) -> dict[str, Any]:
    """`mcpopt__fanout`: `{tool, servers | replicas, arguments?, gather?, quorum?}` -> a structured
    result `{ok, gather, needed, winner, results: [{source, ok, json, text, error, ms}]}`.

    Raises:
        MCPError: INVALID_PARAMS for bad arguments or targets.
    """
    from pydantic import ValidationError

    from mcpopt.workflow_model import describe_errors

    body = {k: v for k, v in arguments.items() if k in ("tool", "servers", "replicas", "gather", "quorum")}
    try:
        fan = FanOut.model_validate(body)
    except ValidationError as exc:
        raise MCPError(code=INVALID_PARAMS, message=f"fanout: {describe_errors(exc)}") from None
    args = arguments.get("arguments") or {}
    if not isinstance(args, dict):
        raise MCPError(code=INVALID_PARAMS, message="fanout: 'arguments' must be an object")
    targets = resolve_targets(api, fan)
    info = api.catalog.tool_infos.get(targets[0].tool, UNKNOWN)
    repeatable = info.read_only or info.idempotent
    views: dict[str, StepView] = {}
    t0 = time.perf_counter()

    async def one(target: Target) -> bool:
        tlink, meta = target_call(link, target)
        params: dict[str, Any] = {"name": target.tool, "arguments": args}
        if meta:
            params["_meta"] = meta
        t1 = time.perf_counter()
        try:
            result = await api.call_tool(params, tlink)
        except MCPError as exc:
            views[target.label] = StepView(None, f"error {exc.error.code}: {exc.error.message}", _ms(t1), args)
            return False
        result = {k: v for k, v in result.items() if k not in ("resultType", "_meta")}
        err = None
        if result.get("isError"):
            err = "isError: " + " ".join(b.get("text", "") for b in result.get("content") or () if isinstance(b, dict))
        views[target.label] = StepView(result, err, _ms(t1), args)
        return err is None

    need = needed(fan, len(targets))
    enough, first = await gather(targets, need, one, cancel_losers=repeatable and fan.gather != "all")
    winner = first if fan.gather == "first" else None
    view = FanoutView([(t.label, views.get(t.label)) for t in targets], winner, _ms(t0))
    return {
        "ok": enough,
        "gather": fan.gather,
        "needed": need,
        "winner": winner,
        "ms": round(view["ms"], 3),
        "results": view["results"],
    }


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000
