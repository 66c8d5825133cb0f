"""The gateway core: one MCP server in front of many upstream MCP servers.

`Gateway` owns the upstream pools, the aggregated catalog, the clients, the gateway's own tool
registry and the dispatch of `tools/call`: a call is routed to its upstream through the pipeline
(the filter chain), or to a gateway tool; every caller -- a client, the batch tool, code mode's
sandbox, a workflow step -- goes through `call_tool`, so every optimization and permission
applies everywhere. Other MCP methods are answered by `mcpopt.gateway.handlers` (lists from the
catalog, the rest forwarded with `forward`).

The gateway is not built here but assembled from its parts in one place,
`mcpopt.gateway.assembly.build_gateway`: the pipeline's filters, the cache, telemetry, discovery,
code mode, the gateway tools and the SDK server are attached there, and plugins see it as
`mcpopt.api.GatewayAPI`.

The hot path (`tools/call`) forwards raw JSON-RPC params and the raw result dict, without
building or validating SDK models on the way: it only rewrites the tool name, relays progress,
and adapts the result's envelope when the client and the upstream speak different eras.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import anyio
import mcp_types as types
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ToolsListChanged,
)
from mcp.shared.exceptions import MCPError
from mcp_types import CLIENT_CAPABILITIES_META_KEY, INVALID_PARAMS, LOG_LEVEL_META_KEY

from mcpopt.api import Caller, ClientLink, ProgressFn, ToolHandler
from mcpopt.auth.policy import Decision, Policy, PolicyDenied
from mcpopt.auth.principal import Principal
from mcpopt.catalog import GatewayCatalog, Namer, build_catalog
from mcpopt.config import Config
from mcpopt.errors import UPSTREAM_UNAVAILABLE, GatewayError
from mcpopt.gateway.bridge import InputBridge, ParkedCall, bridged_state
from mcpopt.gateway.clients import Clients
from mcpopt.gateway.eras import (
    ENVELOPE_KEYS,
    MODERN,
    ask_client,
    asks_the_handshake_way,
    client_capabilities,
    drive_input_required,
    envelope,
    modern_forwarded,
)
from mcpopt.gateway.lists import LIST_METHODS, ListKey, PreparedLists, request_cursor, response
from mcpopt.gateway.owners import OwnerListener, caller_key, isolation_modes
from mcpopt.gateway.tasks import TaskIds
from mcpopt.pipeline import Pipeline, ToolCall, ToolResult
from mcpopt.policy import UNKNOWN
from mcpopt.upstream.isolation import IsolatedSessions, single_replica
from mcpopt.upstream.pool import ServerPool
from mcpopt.upstream.server import CatalogKind
from mcpopt.wire import check_call_params

if TYPE_CHECKING:
    from mcp.server import Server

    from mcpopt.cache import ResultCache
    from mcpopt.codemode.tool import CodeModeTool
    from mcpopt.discovery.modes import SearchTools
    from mcpopt.monitor.hub import Telemetry
    from mcpopt.pipeline.cache import CoalesceFilter
    from mcpopt.pipeline.rules import RulesFilter
    from mcpopt.pipeline.shaping import ResultStore
    from mcpopt.workflows.service import WorkflowService

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
CatalogListener = Callable[[GatewayCatalog, str, set[CatalogKind]], Awaitable[None]]
"""`async (new catalog, server, kinds)`: told after an upstream's lists changed."""
Hook = Callable[[], Awaitable[None]]

_EVENTS: dict[str, Any] = {
    "notifications/tools/list_changed": ToolsListChanged(),
    "notifications/prompts/list_changed": PromptsListChanged(),
    "notifications/resources/list_changed": ResourcesListChanged(),
}


class OwnTools:
    """The gateway's own tools: definitions listed in full mode, and handlers callable by name in
    every mode (also those not listed, e.g. `execute_code` and the discovery tools)."""

    def __init__(self) -> None:
        self.tools: list[types.Tool] = []
        self.handlers: dict[str, ToolHandler] = {}

    def add(self, tool: types.Tool, handler: ToolHandler, *, listed: bool = True) -> None:
        """Register a tool; one of the same name is replaced (in place, when it was listed)."""
        old = next((i for i, t in enumerate(self.tools) if t.name == tool.name), None)
        if old is not None:
            del self.tools[old]
        if listed:
            self.tools.insert(old if old is not None else len(self.tools), tool)
        self.handlers[tool.name] = handler

    def remove(self, name: str) -> None:
        self.tools[:] = [t for t in self.tools if t.name != name]
        self.handlers.pop(name, None)


class Gateway:
    """Aggregates upstream MCP servers behind one SDK `Server` (see the module docstring).

    Build it with `mcpopt.gateway.assembly.build_gateway(config)`. Lifecycle: `async with
    gateway.running():` runs the start hooks, starts the upstreams in stages and waits for each to
    be ready (or to fail, which it reports and retries in the background), then runs the ready
    hooks; leaving the block stops the upstreams, reaps their processes and runs the stop hooks in
    reverse order. Serve `gateway.server` on any transport (`mcpopt.gateway.front`).

    Args:
        config: the loaded configuration.
    """

    # Attached by the assembly (mcpopt.gateway.assembly); declared here for readers and type checks.
    server: Server[Any]
    init_options: Any
    cache: ResultCache
    telemetry: Telemetry
    coalescer: CoalesceFilter
    results: ResultStore
    rules: RulesFilter
    code_mode: CodeModeTool
    discovery: SearchTools
    workflows: WorkflowService | None

    def __init__(self, config: Config) -> None:
        self.config = config
        g = config.gateway
        self.namer = Namer(config)
        self.lists = PreparedLists()
        """Prepared list responses (`mcpopt.gateway.lists`), dropped whenever what they show may change."""
        self._catalog = GatewayCatalog()
        self._policy: Policy | None = None
        self.upstreams: dict[str, ServerPool] = {
            name: ServerPool(
                name,
                cfg,
                self,
                call_timeout_s=g.call_timeout_ms / 1000,
                restart_initial_s=g.restart.initial_backoff_ms / 1000,
                restart_max_s=g.restart.max_backoff_ms / 1000,
                restart_enabled=g.restart.enabled,
            )
            for name, cfg in config.active_servers().items()
        }
        # The terminal's pools record `upstream_ms` / `queue_ms` themselves: no `UpstreamTimer` layer.
        self.pipeline = Pipeline(self._forward_tool_call, timed_terminal=True)
        self.clients = Clients(list(self.upstreams))
        self.task_ids = TaskIds(list(self.upstreams))
        """Gateway ids of upstream tasks (SEP-2663): `"<server>:<upstream taskId>"`."""
        self.own = OwnTools()
        self.bus = InMemorySubscriptionBus()
        """2026-07-28 clients hear of changes on subscriptions/listen streams (SEP-2575)."""
        self.startup_ms: dict[str, float] = {}
        """Milliseconds from gateway start until each upstream was ready (or gave up)."""
        self.stamp = {"name": g.name, "version": VERSION}
        """The gateway's `serverInfo`, stamped into 2026-07-28 results."""
        self.catalog_listeners: list[CatalogListener] = []
        self.own_tools_listeners: list[Hook] = []
        """Told when the gateway's own tools changed (`tools_changed`)."""
        self.resource_listeners: list[Callable[[str, str], Awaitable[None]]] = []
        """`async (server, upstream uri)`: told when an upstream says a resource changed."""
        self.on_start: list[Hook] = []
        """Run before the upstreams start, in order (e.g. the cache's Redis link, telemetry)."""
        self.on_ready: list[Hook] = []
        """Run once the first start stage is done, in order (e.g. cache warm-up, the search index)."""
        self.on_stopping: list[Hook] = []
        """Run before the upstreams stop, in reverse order of registration (e.g. workflows: their
        runs must stop while the upstreams can still answer)."""
        self.on_stop: list[Hook] = []
        """Run after the upstreams stopped, in reverse order of registration."""
        self.list_tools: Callable[[str], list[types.Tool]] = lambda exposure: self.catalog.tools + self.own.tools
        """`tools/list` of a connection in an exposure mode (discovery replaces this)."""
        self.known_names: dict[str, str] = {}
        """Tool and prompt names -> the server that listed them last, also while it is down."""
        self.handshake_only: set[str] = set()
        """`protocol: auto` servers switched to the handshake era at run time (`_fall_back_to_handshake`)."""
        self.bridge = InputBridge(g.call_timeout_ms / 1000)
        """2026-07-28 clients' calls to handshake-era upstreams that ask them something (SEP-2322)."""
        self.authenticator: Any = None
        """The HTTP front's `mcpopt.auth.tokens.Authenticator` once it serves with auth (status, metrics)."""
        self.limiter: Any = None
        """The `mcpopt.auth.ratelimit.RateLimiter` when `gateway.limits` names limits (status, metrics)."""
        self.shared: Any = None
        """The `mcpopt.gateway.shared.SharedState` when `gateway.shared.redis_url` is set (else None)."""
        self.watch: Any = None
        """The `mcpopt.upstream.watch.ResourceWatch` (CPU, RSS, fds, children per stdio replica)."""
        self.isolation = isolation_modes(config)
        """Server -> `shared` | `principal` | `session`: whose calls share an upstream session."""
        self.isolated: dict[str, IsolatedSessions] = {
            name: IsolatedSessions(name, self.upstreams[name].cfg, self._owner_pool_factory(name))
            for name, mode in self.isolation.items()
            if mode != "shared"
        }
        """Per-owner upstream sessions of the servers not in `shared` mode."""
        self.on_stop.append(self._close_isolated)

    # ---- what lists show (each change drops the prepared lists) --------------------------
    @property
    def catalog(self) -> GatewayCatalog:
        """The aggregated catalog (a snapshot, swapped whole on change)."""
        return self._catalog

    @catalog.setter
    def catalog(self, catalog: GatewayCatalog) -> None:
        self._catalog = catalog
        self.lists.drop()

    @property
    def policy(self) -> Policy | None:
        """Who may call and see what; attached by the assembly when `gateway.auth` is on (None: the
        trusted local user only, everything allowed). Replacing it drops the prepared lists."""
        return self._policy

    @policy.setter
    def policy(self, policy: Policy | None) -> None:
        self._policy = policy
        self.lists.drop()

    def list_key(self, method: str, version: str, conn: Any, principal: Any, cursor: str | None) -> ListKey:
        """What a list result depends on besides the catalog (`mcpopt.gateway.lists.ListKey`): the
        exposure mode (tools/list only) and the policy grant, as the identity of the rules the
        principal matched (and its scopes when `policy.tool_scopes` decides visibility too)."""
        exposure = self.exposure_for(conn, principal) if method == "tools/list" else ""
        grant_key: Any = None
        policy = self._policy
        if policy is not None:
            grant = policy.grant(principal)
            if grant.everything:
                grant_key = "*"
            else:
                scopes = principal.scopes if policy.tool_scopes and principal is not None else None
                grant_key = (tuple(id(rule) for _, rule in grant.rules), scopes)
        return (method, version, exposure, grant_key, cursor)

    def lazy_pending(self) -> bool:
        """A `lazy` server was never started: the next tools/prompts listing starts it (`start_lazy`)."""
        return any(
            up.lazy and up.state == "idle" and not up.catalog.tools and not up.catalog.prompts
            for up in self.upstreams.values()
        )

    def prepared_list(self, msg: Mapping[str, Any], conn: Any, principal: Any = None) -> bytes | None:
        """The whole JSON-RPC response to a handshake-era list request on an initialized connection,
        from the prepared lists; None when there is none (the SDK's path then builds and keeps it)
        or the request is anything the SDK must judge (an invalid id or params)."""
        method = msg.get("method")
        if method not in LIST_METHODS or msg.get("jsonrpc") != "2.0":
            return None
        rid = msg.get("id")
        if isinstance(rid, bool) or not isinstance(rid, (int, str)):
            return None
        ok, cursor = request_cursor(msg.get("params"))
        if not ok or (method in ("tools/list", "prompts/list") and self.lazy_pending()):
            return None
        assert isinstance(method, str)
        entry = self.lists.get(self.list_key(method, conn.protocol_version, conn, principal, cursor))
        return response(rid, entry) if entry is not None else None

    # ---- whose upstream session --------------------------------------------------------
    def _owner_pool_factory(self, server: str) -> Callable[[str], ServerPool]:
        g = self.config.gateway

        def make(owner: str) -> ServerPool:
            cfg = single_replica(self.upstreams[server].cfg)
            if server in self.handshake_only:
                cfg = cfg.model_copy(update={"protocol": "legacy"})
            listener = OwnerListener(server, owner, self.clients, self.namer)
            return ServerPool(
                server,
                cfg,
                listener,
                call_timeout_s=g.call_timeout_ms / 1000,
                restart_initial_s=g.restart.initial_backoff_ms / 1000,
                restart_max_s=g.restart.max_backoff_ms / 1000,
                restart_enabled=g.restart.enabled,
            )

        return make

    async def _close_isolated(self) -> None:
        for sessions in self.isolated.values():
            await sessions.aclose()

    def owner_of(self, server: str, principal: Any, session_id: str, version: str = "") -> str:
        """The owner key of a call to `server`: "" (the shared pool), a principal's key, or a
        client session id, per the server's `isolation` (see `mcpopt.gateway.owners`).

        A 2026-07-28 request belongs to no session (each is its own exchange), so in `session` mode
        it is isolated per principal instead (shared for the local user)."""
        mode = self.isolation.get(server, "shared")
        if mode == "shared":
            return ""
        if mode == "principal" or version in MODERN:
            return principal.key if principal is not None else ""
        return session_id

    async def pool_for(self, server: str, owner: str) -> ServerPool:
        """The pool serving `owner` on `server`: the shared one for "", else the owner's isolated
        session (started on first use).

        Raises:
            GatewayError: every isolated session slot of the server is busy.
        """
        if owner:
            sessions = self.isolated.get(server)
            if sessions is not None:
                return await sessions.get(owner)
        return self.upstreams[server]

    # ---- policy -------------------------------------------------------------------------
    def exposure_for(self, conn: Any, principal: Any = None) -> str:
        """The exposure mode of a caller: its policy grant's, else `exposure_clients` by the
        connection's client name, else `gateway.exposure`."""
        if self.policy is not None:
            mode = self.policy.grant(principal).exposure
            if mode is not None:
                return mode
        g = self.config.gateway
        if g.exposure_clients and conn is not None and conn.client_params is not None:
            name = conn.client_params.client_info.name
            for pattern, mode in g.exposure_clients.items():
                if fnmatchcase(name, pattern):
                    return mode
        return g.exposure

    def may_call(self, principal: Any, name: str, exposure: str | None = None) -> bool:
        """True when `principal` may call the tool `name` (what lists and search results show)."""
        policy = self.policy
        if policy is None:
            return True
        route = self.catalog.tool_routes.get(name)
        return policy.visible(principal, name, route.server if route is not None else None, exposure)

    def restore_principal(self, data: Mapping[str, Any]) -> Principal:
        """A principal from its JSON form (`dataclasses.asdict`, sets as lists), e.g. a workflow
        run's starter read back from the journal: policy and limits then apply to it as before.

        Raises:
            ValueError: `data` is not a principal's fields.
        """
        fields = dict(data)
        for key in ("groups", "scopes"):
            fields[key] = frozenset(fields.get(key) or ())
        fields["claims"] = dict(fields.get("claims") or {})
        try:
            return Principal(**fields)
        except TypeError as exc:
            raise ValueError(f"not a principal: {exc}") from None

    def may_use_server(self, principal: Any, server: str) -> bool:
        """True when `principal` may see and use `server`'s prompts and resources."""
        return self.policy is None or self.policy.allows_server(principal, server)

    async def _refuse_own(self, name: str, params: Mapping[str, Any], link: ClientLink, decision: Decision) -> Any:
        """Refuse a call to a gateway tool, recorded by telemetry like any refused call."""
        call = ToolCall(
            self.config.gateway.name,
            name,
            name,
            dict(params),
            partition=link.partition,
            session_id=link.session_id,
            principal=link.principal,
        )
        call.attrs["decision"], call.attrs["policy_rule"] = "deny", decision.rule
        error = PolicyDenied(decision)

        async def refused(_call: ToolCall) -> ToolResult:
            raise error

        telemetry = getattr(self, "telemetry", None)
        try:
            if telemetry is not None and telemetry.enabled:
                await telemetry.filter(call, refused)
            else:
                await refused(call)
        except GatewayError as exc:
            raise MCPError.from_error_data(exc.to_error_data()) from None

    # ---- GatewayAPI ---------------------------------------------------------------------
    def own_tools(self) -> list[types.Tool]:
        return self.own.tools

    def add_tool(self, tool: types.Tool, handler: ToolHandler, *, listed: bool = True) -> None:
        self.own.add(tool, handler, listed=listed)
        self.lists.drop()

    def remove_tool(self, name: str) -> None:
        self.own.remove(name)
        self.lists.drop()

    async def tools_changed(self) -> None:
        """The gateway's own tools changed: tell the listeners (search re-indexes) and every client."""
        self.lists.drop()
        for listener in self.own_tools_listeners:
            await listener()
        await self.clients.broadcast("notifications/tools/list_changed", None)
        await self.bus.publish(_EVENTS["notifications/tools/list_changed"])

    def status(self) -> list[dict[str, Any]]:
        """One row per upstream: server, state, transport, protocol, counts, restarts, last error, and
        `processes` (per sampled stdio replica: `ResourceWatch.usage()` plus `replica`; [] without a
        watch) with `rss_restarts` (restarts at `max_rss_mb`) and `isolated_processes` (per-owner sessions,
        summed: `ResourceWatch.isolated_usage()`, or None)."""
        watch = self.watch
        return [
            {
                "server": name,
                "state": up.state,
                "transport": up.cfg.kind,
                "protocol": up.protocol_version,
                "tools": len(up.catalog.tools),
                "resources": len(up.catalog.resources),
                "templates": len(up.catalog.templates),
                "prompts": len(up.catalog.prompts),
                "restarts": up.restarts,
                "error": up.last_error,
                "processes": watch.replicas(name) if watch is not None else [],
                "rss_restarts": watch.rss_restarts.get(name, 0) if watch is not None else 0,
                "isolated_processes": watch.isolated_usage(name) if watch is not None else None,
                "breakers": [r.breaker.state for r in up.replicas],
            }
            for name, up in self.upstreams.items()
        ]

    # ---- lifecycle ----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def running(self, wait_s: float | None = None) -> Any:
        """Start the upstreams in stages and wait for each to be ready (or to fail).

        Stages come from `depends_on` (a server starts after everything it depends on) and then
        `priority` (lower first); the servers of one stage start in parallel, and each is given
        its `startup_timeout_ms` (or `wait_s`). A server that fails to start is reported and
        retried in the background; its dependents start anyway, with a warning. `lazy` servers
        are not waited for. Times per server are kept in `self.startup_ms`.
        """
        for hook in self.on_start:
            await hook()
        t0 = time.perf_counter()
        try:
            async with anyio.create_task_group() as tg:
                for stage in startup_stages(self.config, list(self.upstreams)):
                    for name in stage:
                        tg.start_soon(self.upstreams[name].run)
                    await asyncio.gather(*(self._wait_started(name, t0, wait_s) for name in stage))
                for hook in self.on_ready:
                    await hook()
                try:
                    yield self
                finally:
                    for hook in reversed(self.on_stopping):
                        try:
                            await hook()
                        except Exception:  # noqa: BLE001 - the upstreams must stop whatever a plugin does
                            logger.exception("gateway: a stopping hook failed")
                    for up in self.upstreams.values():
                        await up.stop()
        finally:
            self.bridge.close()
            for hook in reversed(self.on_stop):
                try:
                    await hook()
                except Exception:  # noqa: BLE001 - one part failing to stop must not keep the others running
                    logger.exception("gateway: a stop hook failed")

    async def _wait_started(self, name: str, t0: float, wait_s: float | None) -> None:
        up = self.upstreams[name]
        if up.lazy:
            return
        ok = await up.wait_ready(wait_s if wait_s is not None else up.cfg.startup_timeout_ms / 1000)
        self.startup_ms[name] = (time.perf_counter() - t0) * 1000
        if not ok:
            dependents = [n for n, c in self.config.mcpServers.items() if name in c.depends_on]
            if dependents:
                logger.warning("MCP server %r is not ready; starting %s anyway", name, dependents)

    async def start_lazy(self, name: str | None = None) -> bool:
        """Start lazy servers that were never started: all of them (a listing), or the one whose
        prefix `name` carries (a call). Returns True if any was started."""
        todo = []
        for server, up in self.upstreams.items():
            if not (up.lazy and up.state == "idle" and not up.catalog.tools and not up.catalog.prompts):
                continue
            if name is None or name.startswith(self.namer.name(server, "")):
                todo.append(up)
        if not todo:
            return False
        await asyncio.gather(*(up.ensure_started() for up in todo))
        self.catalog = build_catalog(self.namer, self.upstreams)
        return True

    # ---- UpstreamListener ---------------------------------------------------------------
    async def catalog_changed(self, server: str, kinds: set[CatalogKind]) -> None:
        old = self.catalog
        self.catalog = build_catalog(self.namer, self.upstreams)
        up = self.upstreams.get(server)
        if up is not None and up.state == "ready":
            # What a ready server lists is what it serves; a server that went down keeps its names
            # here, so calls to them say "unavailable", not "unknown" (`unknown`).
            self.known_names = {n: s for n, s in self.known_names.items() if s != server}
        for routes in (self.catalog.tool_routes, self.catalog.prompt_routes):
            for name, route in routes.items():
                self.known_names[name] = route.server
        for listener in self.catalog_listeners:
            await listener(self.catalog, server, kinds)
        changed: list[str] = []
        if "tools" in kinds and old.tools != self.catalog.tools:
            changed.append("notifications/tools/list_changed")
        if "prompts" in kinds and old.prompts != self.catalog.prompts:
            changed.append("notifications/prompts/list_changed")
        if "resources" in kinds and (
            old.resources != self.catalog.resources or old.templates != self.catalog.templates
        ):
            changed.append("notifications/resources/list_changed")
        for method in changed:
            await self.clients.broadcast(method, None)
            await self.bus.publish(_EVENTS[method])
        if changed and self.shared is not None:
            await self.shared.list_changed(server, kinds)  # the other replicas re-list it too

    async def resource_updated(self, server: str, uri: str) -> None:
        for listener in self.resource_listeners:
            await listener(server, uri)
        if self.shared is not None:
            await self.shared.resource_updated(server, uri)
            if not self.shared.first_update(server, uri):
                return  # another replica's copy of this update reached our clients already
        await self.emit_resource_updated(server, uri)

    async def emit_resource_updated(self, server: str, uri: str) -> None:
        """Tell this replica's clients subscribed to the upstream `uri` of `server` that it changed."""
        guri = self.namer.uri(server, uri)
        await self.clients.resource_updated(guri)
        await self.bus.publish(ResourceUpdated(uri=guri))

    async def log_message(self, server: str, params: types.LoggingMessageNotificationParams) -> None:
        data = params.model_dump(by_alias=True, mode="json", exclude_none=True)
        data["logger"] = f"{server}/{data['logger']}" if data.get("logger") else server
        await self.clients.log(server, params.level, data)

    async def elicitation_complete(self, server: str, elicitation_id: str) -> None:
        """Pass a handshake-era upstream's `notifications/elicitation/complete` on: to the client whose
        call is in flight, else to every handshake-era connection (an id a client does not know is
        ignored, as the spec says). 2026-07-28 clients have no such notification: none is sent."""
        await self.clients.notify_callers_or_all(
            server, "notifications/elicitation/complete", {"elicitationId": elicitation_id}
        )

    async def client_request(self, server: str, request: types.InputRequest) -> types.InputResponse | types.ErrorData:
        """Relay an upstream's sampling / elicitation / roots request to the client calling it: on a
        handshake-era client's connection, or, for a 2026-07-28 client, into the call's next
        `InputRequiredResult` (`mcpopt.gateway.bridge`). The latest call in flight is asked."""
        for caller in reversed(self.clients.callers(server)):
            if caller.ask is not None:
                return await caller.ask(request)
            if caller.modern or caller.requests is None:
                continue
            try:
                return await ask_client(caller.requests, request)
            except MCPError as exc:
                return exc.error
        return types.ErrorData(
            code=INVALID_PARAMS,
            message=f"no connected client can answer {request.method} for MCP server '{server}'",
        )

    # ---- tools/call ---------------------------------------------------------------------
    async def call_tool(self, params: Mapping[str, Any] | None, link: ClientLink) -> dict[str, Any]:
        """Forward one `tools/call` (raw params in, raw result out) through the pipeline.

        Args:
            params: the client's raw `CallToolRequestParams`.
            link: how to reach the calling client (its era, request and notification channels).

        Raises:
            MCPError: unknown tool, bad params (-32602 naming the member: `name` not a string,
                `arguments` / `_meta` not objects, a progress token that is not a string or an
                integer, arguments nested too deep to forward), upstream JSON-RPC errors, and the
                gateway's own errors (unavailable, timeout, closed) with the server named in
                message and data.
        """
        try:
            check_call_params(params)
        except GatewayError as exc:
            raise MCPError.from_error_data(exc.to_error_data()) from None
        assert type(params) is dict or isinstance(params, Mapping)  # `type` first: ABC checks cost a frame
        name = params["name"]
        catalog = self.catalog
        route = catalog.tool_routes.get(name)
        if route is None and await self.start_lazy(name):
            catalog = self.catalog
            route = catalog.tool_routes.get(name)
        if route is None:
            own = self.own.handlers.get(name)
            if own is None:
                raise unknown("tool", name, self.upstreams, self.known_names, self.namer)
            if self.policy is not None:
                principal = link.principal
                decision = self.policy.check_tool(principal, name, None, self.exposure_for(link.connection, principal))
                if not decision.allowed:
                    await self._refuse_own(name, params, link, decision)
            args = params.get("arguments")
            meta = params.get("_meta")
            if isinstance(meta, Mapping) and meta.get("progressToken") is not None:
                link = dataclasses.replace(link, progress_token=meta["progressToken"])
            return envelope(link.version, await own(args if isinstance(args, dict) else {}, link), self.stamp)
        up = self.upstreams[route.server]
        out, token, caller = self._prepare(params, link, up, name=route.name)
        principal = link.principal
        call = ToolCall(
            route.server,
            route.name,
            name,
            out,
            link.relay(token) if token is not None else None,
            info=catalog.tool_infos.get(name, UNKNOWN),
            partition=link.partition,
            session_id=link.session_id,
            principal=principal,
        )
        owner = self.owner_of(route.server, principal, link.session_id, link.version) if self.isolated else ""
        if owner:
            call.attrs["owner"] = owner  # the terminal sends it to that owner's session
            self.clients.note_owner(owner, link.connection)
        key = caller_key(route.server, owner)
        if caller.modern and (not up.modern or bridged_state(params) is not None):
            return await self._bridged_call(params, link, call, key, token, caller)
        callers = self.clients.callers_of(key)
        callers.append(caller)  # where this upstream's requests and logs go meanwhile
        try:
            result = await self.pipeline(call)
            kind = result.get("resultType")
            if kind == "input_required" and not caller.modern:
                pool = await self.pool_for(route.server, owner)
                result = await drive_input_required(caller, up.name, pool.request, "tools/call", out, result)
            elif kind == "task":
                result = self.task_ids.created(route.server, result)
        except GatewayError as exc:
            raise MCPError.from_error_data(exc.to_error_data()) from None
        except MCPError as exc:
            if not (up.modern and up.cfg.protocol == "auto" and asks_the_handshake_way(error=exc)):
                raise
            result = None
        finally:
            callers.remove(caller)
            if owner and not callers:
                self.clients.drop_callers(key)
        if result is None or (result.get("isError") and up.modern and up.cfg.protocol == "auto"):
            if result is None or asks_the_handshake_way(result):
                return await self._fall_back_to_handshake(params, link, route.server, name, call.info.idempotent)
        return envelope(link.version, result, self.stamp)

    async def _bridged_call(
        self, params: Mapping[str, Any], link: ClientLink, call: ToolCall, key: str, token: Any, caller: Caller
    ) -> dict[str, Any]:
        """A 2026-07-28 client's `tools/call` to a handshake-era upstream, or the repeat of one that
        asked it something (`mcpopt.gateway.bridge`).

        Args:
            call: the pipeline call as `call_tool` prepared it (its progress relay is replaced).
            key: where the upstream's requests are looked up (`caller_key(server, owner)`).
        """
        relay = link.relay(token) if token is not None else None
        target = f"tools/call {call.name}"
        state = bridged_state(params)
        if state is not None:
            result = await self.bridge.resume(
                state,
                params.get("inputResponses"),
                partition=link.partition,
                target=target,
                relay=relay,
                notify=link.notify,
            )
        else:

            async def run(parked: ParkedCall) -> dict[str, Any]:
                call.on_progress = parked.progress if relay is not None else None
                bridged = dataclasses.replace(caller, ask=parked.ask, notify=parked.send)
                callers = self.clients.callers_of(key)
                callers.append(bridged)  # the upstream's requests go to `parked.ask` meanwhile
                try:
                    return await self.pipeline(call)
                except GatewayError as exc:
                    raise MCPError.from_error_data(exc.to_error_data()) from None
                finally:
                    callers.remove(bridged)
                    if call.attrs.get("owner") and not callers:
                        self.clients.drop_callers(key)

            result = await self.bridge.start(
                run,
                partition=link.partition,
                target=target,
                capabilities=client_capabilities(link, params.get("_meta")),
                relay=relay,
                notify=link.notify,
            )
        if result.get("resultType") == "task":
            result = self.task_ids.created(call.server, result)
        return envelope(link.version, result, self.stamp)

    async def _fall_back_to_handshake(
        self, params: Mapping[str, Any], link: ClientLink, server: str, name: str, repeatable: bool
    ) -> dict[str, Any]:
        """A `protocol: auto` upstream answered 2026-07-28 but its tool asked the handshake way.

        The rule (issue 11, failure 3): the server is reconnected with the handshake for the rest
        of the gateway's life (once; a warning says so and how to start it that way), and the call
        is repeated there if repeating is safe (read-only or idempotent); otherwise the client is
        told to call again, as the first attempt may have done part of its work. A server that
        does not accept the handshake either gets an error saying what it must do instead.
        """
        up = self.upstreams[server]
        fix = f"set `protocol: legacy` on mcpServers.{server}"
        self.handshake_only.add(server)  # isolated sessions opened from now on negotiate the handshake
        sessions = self.isolated.get(server)
        for pool in list(sessions.pools.values()) if sessions is not None else []:
            await pool.use_handshake()
        if await up.use_handshake():
            logger.warning(
                "MCP server %r asks its clients with server-initiated requests, which 2026-07-28 connections "
                "cannot carry: it now uses the handshake era (%s to start it that way)",
                server,
                fix,
            )
            if repeatable:
                return await self.call_tool(params, link)
            text = (
                f"MCP server '{server}' asked its client with a server-initiated request (sampling, elicitation "
                f"or roots), which its 2026-07-28 connection cannot carry. mcpopt has reconnected it with the "
                f"handshake era: call '{name}' again. It was not repeated automatically because it is not "
                f"marked read-only or idempotent and may have done part of its work. To avoid this, {fix}."
            )
        else:
            text = (
                f"MCP server '{server}' asked its client with a server-initiated request (sampling, elicitation "
                f"or roots), which 2026-07-28 connections cannot carry, and it did not come back with the "
                f"handshake era ({up.state}: {up.last_error or 'no error reported'}). The server must ask with "
                f"an InputRequiredResult (SEP-2322) on 2026-07-28, or accept the initialize handshake."
            )
        result = {"content": [{"type": "text", "text": text}], "isError": True}
        return envelope(link.version, result, self.stamp)

    def _forward_tool_call(self, call: ToolCall) -> Awaitable[ToolResult]:
        """The pipeline's terminal: send the call to its upstream (the caller's own session when
        the server is isolated). The shared session's own coroutine, not one wrapping it: one
        frame less per call."""
        owner = call.attrs.get("owner")
        if owner:
            return self._forward_owned(call, owner)
        return self.upstreams[call.server].call(call)

    async def _forward_owned(self, call: ToolCall, owner: str) -> ToolResult:
        return await (await self.isolated[call.server].get(owner)).call(call)

    def _prepare(
        self, params: Mapping[str, Any], link: ClientLink, up: ServerPool, **updates: Any
    ) -> tuple[dict[str, Any], Any, Caller]:
        """Params to send upstream, the client's progress token, and the in-flight `Caller`.

        Drops the client's own 2026-07-28 envelope keys and progress token from `_meta` (the
        upstream session stamps its own), and carries the client's log level: to a 2026-07-28
        upstream as the per-request opt-in, which has no `logging/setLevel`. A 2026-07-28
        upstream also gets the client's capabilities (`eras.client_capabilities`), which the
        upstream session keeps in place of the gateway's own.
        """
        out = dict(params)
        out.update(updates)
        meta = original = out.get("_meta")
        token = None
        client_level = None
        if meta:
            client_level = meta.get(LOG_LEVEL_META_KEY)
            meta = {k: v for k, v in meta.items() if k not in ENVELOPE_KEYS}
            token = meta.pop("progressToken", None)
        modern = link.version in MODERN
        if modern:
            level = client_level if isinstance(client_level, str) else None
        else:
            level = self.clients.log_level(link.connection)
        if up.modern:
            caps = client_capabilities(
                link, original if original is not None and isinstance(original, Mapping) else None
            )
            if level is not None or caps is not None:
                meta = dict(meta or {})
                if level is not None:
                    meta[LOG_LEVEL_META_KEY] = level
                if caps is not None:
                    meta[CLIENT_CAPABILITIES_META_KEY] = caps
        if meta:
            out["_meta"] = meta
        else:
            out.pop("_meta", None)
        return out, token, Caller(modern, link.requests, link.notify, level)

    # ---- every other forwarded method ---------------------------------------------------
    async def forward(self, link: ClientLink, server: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Send one non-tool request (prompts/get, resources/read, completion/complete, ...) to
        `server` as the client behind `link`; the raw result, adapted to the client's era.

        Raises:
            MCPError: unknown server, upstream errors, the gateway's own errors naming the server.
        """
        up = self.upstreams.get(server)
        if up is None:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown MCP server: {server}")
        if not self.may_use_server(link.principal, server):
            refusal = PolicyDenied(
                Decision(False, f"the policy does not grant MCP server '{server}' ({method})", rule="servers"),
                server=server,
            )
            raise MCPError.from_error_data(refusal.to_error_data())
        original = params
        params, token, caller = self._prepare(params, link, up)
        owner = self.owner_of(server, link.principal, link.session_id, link.version) if self.isolated else ""
        if owner:
            self.clients.note_owner(owner, link.connection)
        relay = link.relay(token) if token is not None else None

        async def run(progress: ProgressFn | None, caller: Caller) -> dict[str, Any]:
            with self.clients.calling(caller_key(server, owner), caller):
                try:
                    pool = await self.pool_for(server, owner)
                    result = await pool.request(method, params, on_progress=progress)
                    if result.get("resultType") == "input_required" and not caller.modern:
                        result = await drive_input_required(caller, up.name, pool.request, method, params, result)
                    return result
                except GatewayError as exc:
                    raise MCPError.from_error_data(exc.to_error_data()) from None

        target = f"{method} {server}"
        if caller.modern and (state := bridged_state(original)) is not None:
            result = await self.bridge.resume(
                state, original.get("inputResponses"), partition=link.partition, target=target, relay=relay,
                notify=link.notify,
            )  # fmt: skip
        elif caller.modern and not up.modern:
            result = await self.bridge.start(
                lambda parked: run(
                    parked.progress if relay is not None else None,
                    dataclasses.replace(caller, ask=parked.ask, notify=parked.send),
                ),
                partition=link.partition,
                target=target,
                capabilities=client_capabilities(link, original.get("_meta")),
                relay=relay,
                notify=link.notify,
            )
        else:
            result = await run(relay, caller)
        if link.version not in MODERN:
            # The SDK's sieve drops later-revision fields, but a modern upstream's serverInfo
            # stamp in `_meta` is ours to drop.
            return envelope(link.version, result, self.stamp)
        return modern_forwarded(method, result)


def startup_stages(config: Config, names: list[str]) -> list[list[str]]:
    """Group servers into start stages: by dependency depth, then by `priority` (ascending).

    Returns: stages in start order, each a list of server names started together. Names not in
    `names` (disabled servers) are left out; their dependents do not wait for them.
    """
    servers = config.mcpServers
    depth: dict[str, int] = {}

    def level(name: str) -> int:
        if name not in depth:
            deps = [d for d in servers[name].depends_on if d in names]
            depth[name] = 1 + max((level(d) for d in deps), default=-1)
        return depth[name]

    keys = sorted({(level(n), servers[n].priority) for n in names})
    return [[n for n in names if (level(n), servers[n].priority) == key] for key in keys]


def unknown(
    kind: str,
    name: str,
    upstreams: Mapping[str, ServerPool],
    known: Mapping[str, str] | None = None,
    namer: Namer | None = None,
) -> MCPError:
    """The error for a name no ready upstream serves.

    A name that belongs to a server which is not ready -- one it listed before it went down
    (`known`: name -> server), or one carrying the prefix of a server that never started -- is
    that server being unavailable, not a misspelt name: UPSTREAM_UNAVAILABLE (-32010) naming the
    server and its state (`data: {"server", "state"}`), to be retried (issue 11, failure 6). Any
    other name is INVALID_PARAMS (-32602) `Unknown tool: <name>`.
    """
    server = (known or {}).get(name)
    if server is None or server not in upstreams:
        server = next(
            (
                s
                for s, up in upstreams.items()
                if up.state != "ready"
                and not up.catalog.tools
                and (prefix := namer.name(s, "") if namer is not None else f"{s}__")
                and name.startswith(prefix)
            ),
            None,
        )
    up = upstreams.get(server) if server is not None else None
    if up is not None and up.state != "ready":
        why = f"; last error: {up.last_error}" if up.last_error else ""
        when = "when it is ready again" if up.state in ("down", "starting") else "once it is started"
        return MCPError(
            code=UPSTREAM_UNAVAILABLE,
            message=f"MCP server '{server}' is {up.state} (restarts so far: {up.restarts}): {kind} '{name}' "
            f"can be called {when}{why}",
            data={"server": server, "state": up.state},
        )
    return MCPError(code=INVALID_PARAMS, message=f"Unknown {kind}: {name}")
