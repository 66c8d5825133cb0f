"""The gateway, assembled from its parts in one place.

`build_gateway(config)` is the only place that knows every subsystem. Reading it top to bottom
gives the request path of ARCHITECTURE.md:

    front (stdio | HTTP)  ->  SDK server + handlers  ->  Gateway.call_tool (names, eras, own tools)
      ->  pipeline: telemetry -> policy -> rate limit -> shaping -> rules -> cache -> coalesce
          (compiled per tool: a filter with nothing to do for a tool is left out of its chain)
      ->  upstream pool (route, breaker, retry, timeout)  ->  upstream session  ->  MCP server

Every part receives only what it needs: plugins (gateway tools, monitor tools, code mode,
discovery) get the gateway as `mcpopt.api.GatewayAPI`; the cache filter gets the cache and a
function listing a server's tools; telemetry gets the gateway for upstream health. Lifecycle work
is registered as hooks (`on_start`, `on_ready`, `on_stop`) and catalog listeners, which
`Gateway.running()` and `Gateway.catalog_changed()` run in order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mcp_types.version import LATEST_HANDSHAKE_VERSION

from mcpopt.api import ClientLink, no_progress
from mcpopt.auth.policy import Policy
from mcpopt.auth.ratelimit import RateLimiter
from mcpopt.cache import ResultCache
from mcpopt.catalog import GatewayCatalog
from mcpopt.codemode.tool import CodeModeTool
from mcpopt.config import Config, config_data_dir
from mcpopt.discovery.modes import SearchTools
from mcpopt.gateway.handlers import build_server
from mcpopt.gateway.server import Gateway
from mcpopt.gateway.shared import SharedState, replica_id
from mcpopt.gateway.tasks import advertise as advertise_tasks
from mcpopt.gateway.tools import GatewayTools
from mcpopt.monitor.hub import Telemetry
from mcpopt.monitor.tools import register_tools as register_monitor_tools
from mcpopt.pipeline import Filter
from mcpopt.pipeline.access import PolicyFilter, RateLimitFilter
from mcpopt.pipeline.cache import CacheFilter, CoalesceFilter
from mcpopt.pipeline.rules import RulesFilter, RuleStore, default_rules_path
from mcpopt.pipeline.shaping import ResultStore, ShapingFilter
from mcpopt.upstream.server import CatalogKind
from mcpopt.upstream.watch import ResourceWatch
from mcpopt.workflows.service import WorkflowService

logger = logging.getLogger(__name__)


def build_gateway(config: Config, filters: Sequence[Filter] | None = None) -> Gateway:
    """A gateway for `config` with every part attached, ready for `async with gateway.running()`.

    Args:
        config: the loaded configuration.
        filters: replace the default pipeline filters (outermost first); tests and benchmarks use
            this to measure a bare path. The parts are attached either way.

    Returns:
        the `Gateway`; its `server` and `init_options` are what the fronts serve.
    """
    g = config.gateway
    gw = Gateway(config)

    # ---- the parts the pipeline uses ------------------------------------------------------
    gw.cache = ResultCache(g.cache)
    gw.telemetry = Telemetry(g.telemetry, gw, config_data_dir(config))
    gw.coalescer = CoalesceFilter()
    gw.results = ResultStore(g.shaping.keep_results)
    gw.rules = RulesFilter(RuleStore(default_rules_path(config)))
    # CPU, RSS, fds and children of every stdio replica; restarts at `max_rss_mb` (off the request path).
    gw.watch = ResourceWatch(g.watch, lambda: gw.upstreams, isolated=lambda: gw.isolated)

    def server_tools(server: str) -> list[str]:
        up = gw.upstreams.get(server)
        return [t.name for t in up.catalog.tools] if up is not None else []

    # ---- who may call what, how often (issue 10) -------------------------------------------
    access: list[Filter] = []
    if not g.auth.enabled and g.policy.rules:
        logger.warning("gateway.policy has rules but gateway.auth is off: every caller is the trusted local user")
    if g.auth.enabled:
        gw.policy = Policy(g.policy, f"{g.name}{g.separator}", code_tool=f"{g.name}{g.separator}execute_code")
        access.append(PolicyFilter(gw.policy))
    rule_limits = g.auth.enabled and any(r.rate_limits for r in [*g.policy.rules, g.policy.default])
    if g.limits.enabled and (g.limits.any or rule_limits):
        gw.limiter = RateLimiter(g.limits)
        access.append(RateLimitFilter(gw.limiter, gw.policy))

    # ---- the request path (ARCHITECTURE.md) -------------------------------------------------
    # telemetry -> policy -> rate limit -> shaping -> rules (rewrite; before the cache, which reads
    # a rule's TTL) -> cache -> coalesce -> [timer] -> the replica pool (route, breaker, retry, timeout).
    chain: list[Filter] = [gw.rules, CacheFilter(gw.cache, server_tools), gw.coalescer]
    if g.shaping.max_result_bytes or g.shaping.compact_json:
        chain.insert(0, ShapingFilter(gw.results, g.shaping.max_result_bytes, g.shaping.compact_json))
    chain = [*access, *chain]
    if gw.telemetry.enabled:
        # The timer is left out of the gateway's chains (its pools time themselves: `timed_terminal`).
        chain = [gw.telemetry.filter, *chain, gw.telemetry.timer]
    gw.pipeline.set_filters(chain if filters is None else filters)

    # ---- the gateway's own tools (listed in full mode, callable by name in every mode) -------
    GatewayTools(gw, gw.coalescer)
    register_monitor_tools(gw, gw.telemetry)
    gw.code_mode = CodeModeTool(gw)
    gw.add_tool(gw.code_mode.tool, gw.code_mode.handler, listed=False)  # exposure modes list it

    # ---- workflows: workflow__<name>, mcpopt__workflow, mcpopt__fanout; the journal ----------
    # Started once the upstreams are ready (it resumes runs a dead gateway left), stopped before
    # they stop (runs in flight stay in the journal for the next start).
    gw.workflows = None
    if g.workflows.enabled:
        gw.workflows = WorkflowService(gw)
        gw.on_ready.append(gw.workflows.start)
        gw.on_stopping.append(gw.workflows.aclose)

    # ---- discovery: what tools/list shows per exposure mode, and the search tools ------------
    gw.discovery = SearchTools(gw, pins=g.always_visible, default_k=g.search_k, schema_extra=gw.code_mode.stub_for)
    for tool in gw.discovery.tools:
        gw.add_tool(tool, gw.discovery.handlers[tool.name], listed=False)
    gw.discovery.add_source(gw.code_mode.search_lines)  # the caller's skills, beside the tools
    if gw.discovery.eager and filters is None:
        # Search results break ties toward the servers a session already used: every call tells.
        gw.pipeline.set_filters([gw.discovery.record_use, *gw.pipeline.filters])
    code_tool = [gw.code_mode.tool]
    gw.list_tools = lambda exposure: gw.discovery.listed(exposure, code_tool if exposure == "code" else [])  # type: ignore[arg-type]

    # ---- reactions to upstream changes ----------------------------------------------------
    async def on_catalog(catalog: GatewayCatalog, server: str, kinds: set[CatalogKind]) -> None:
        if "tools" in kinds or "resources" in kinds:
            # Tools changed (or the server restarted): what was cached may no longer hold.
            await gw.cache.invalidate(server)
        if "tools" in kinds:
            await gw.discovery.on_catalog(catalog)

    async def extensions(*_: object) -> None:
        # What `server/discover` advertises follows the ready upstreams (the tasks extension).
        advertise_tasks(gw.server.extensions, gw.upstreams)

    async def on_resource(server: str, uri: str) -> None:
        # A resource changed: tool results may derive from it, so the server's reads go too.
        await gw.cache.invalidate(server)

    gw.catalog_listeners += [on_catalog, extensions]
    gw.own_tools_listeners.append(gw.discovery.own_tools_changed)  # e.g. a workflow created at run time
    gw.resource_listeners.append(on_resource)

    # ---- lifecycle ----------------------------------------------------------------------
    async def warm() -> None:
        """Fill the cache from `gateway.cache.warm` (each call through the whole pipeline)."""
        link = ClientLink(LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: no_progress)
        for item in g.cache.warm:
            name = item.get("tool") or item.get("name")
            try:
                await gw.call_tool({"name": name, "arguments": item.get("arguments") or {}}, link)
            except Exception as exc:  # noqa: BLE001 - a failed warm-up is reported, not fatal
                logger.warning("cache warm-up call %r failed: %s", name, exc)

    async def index() -> None:
        await gw.discovery.on_catalog(gw.catalog)

    # ---- state shared with the other replicas (gateway.shared, issue 12) ---------------------
    # The cache's L2 and the limiter's counters use the same Redis by their own settings; the
    # breakers, rules and notifications go over its pub/sub here. Started first: before any call.
    if g.shared.redis_url:
        gw.shared = SharedState(gw, g.shared, replica_id(g.shared))
        gw.on_start.append(gw.shared.start)
        gw.on_stop.append(gw.shared.stop)

    gw.on_start += [gw.cache.start, gw.telemetry.start, gw.watch.start]
    # A first sample of the upstream processes once they run (the loop's own first came before them).
    gw.on_ready += [warm, index, extensions, gw.watch.sample]
    # The resource watch stops before the upstreams do (no restart at max_rss_mb while stopping).
    gw.on_stopping.append(gw.watch.stop)
    # Stop hooks run in reverse: code mode first (pydantic-monty's pool must close before the
    # process exits), then telemetry (flushes its sinks), then the cache; the watch, if the start failed.
    gw.on_stop += [gw.cache.close, gw.telemetry.stop, gw.code_mode.aclose, gw.watch.stop]

    # ---- what clients talk to -------------------------------------------------------------
    gw.server, gw.init_options = build_server(gw)
    return gw
