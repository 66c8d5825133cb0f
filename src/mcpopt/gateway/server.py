"""The gateway: one MCP server in front of many upstream MCP servers.

Built on the SDK's low-level `mcp.server.Server`, which owns the protocol with clients (both
eras: the initialize handshake 2024-11-05..2025-11-25 and the stateless 2026-07-28 envelope).
Lists are answered from the aggregated catalog; everything else is forwarded to the upstream
that owns the name or URI.

The hot path (`tools/call`) is a server middleware that forwards raw JSON-RPC params and the
raw result dict, without building or validating SDK models on the way: it only rewrites the
tool name, relays progress, and adapts the result's envelope when the client and the upstream
speak different eras (`resultType`, cache hints, the `serverInfo` stamp, `InputRequiredResult`).
Other forwarded methods return the upstream's raw result and let the SDK sieve it for the
client's protocol version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Mapping
from fnmatch import fnmatchcase
from typing import Any

import anyio
import mcp_types as types
from mcp.client._input_required import run_input_required_driver
from mcp.server import Server
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    ListenHandler,
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ToolsListChanged,
)
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    INVALID_PARAMS,
    LOG_LEVEL_META_KEY,
    PROTOCOL_VERSION_META_KEY,
    SERVER_INFO_META_KEY,
)
from mcp_types.version import LATEST_HANDSHAKE_VERSION, MODERN_PROTOCOL_VERSIONS

from mcpopt.cache import ResultCache
from mcpopt.codemode.tool import CodeModeTool
from mcpopt.config import Config
from mcpopt.discovery.modes import SearchTools
from mcpopt.errors import GatewayError, UnknownTarget
from mcpopt.gateway.catalog import GatewayCatalog, Namer, Route, build_catalog
from mcpopt.gateway.link import Caller, ClientLink, no_progress, partition_of, session_id_of
from mcpopt.gateway.tools import GatewayTools
from mcpopt.optimize.rules import RulesFilter, RuleStore
from mcpopt.optimize.settings import default_rules_path
from mcpopt.pipeline import Filter, Pipeline, ToolCall, ToolResult
from mcpopt.pipeline.cache import CacheFilter, CoalesceFilter
from mcpopt.pipeline.shaping import RESULT_URI_PREFIX, ResultStore, ShapingFilter
from mcpopt.policy import UNKNOWN
from mcpopt.telemetry import Telemetry
from mcpopt.upstream.pool import ServerPool
from mcpopt.upstream.server import CatalogKind

logger = logging.getLogger(__name__)

_ENVELOPE_KEYS = (PROTOCOL_VERSION_META_KEY, CLIENT_INFO_META_KEY, CLIENT_CAPABILITIES_META_KEY, LOG_LEVEL_META_KEY)
"""2026-07-28 request `_meta` keys that describe the client's own connection: never forwarded."""
_MODERN_RESULT_KEYS = ("resultType", "ttlMs", "cacheScope")
"""Result fields that exist only from 2026-07-28 on; dropped for handshake-era clients."""
_MODERN = frozenset(MODERN_PROTOCOL_VERSIONS)
_VERSION = "0.1.0"


class Gateway:
    """Aggregates upstream MCP servers behind one SDK `Server`.

    Lifecycle: `async with gateway.running():` starts every upstream in parallel and waits for
    each to be ready (or to fail, which it reports and retries in the background); leaving the
    block stops them all and reaps their processes. Serve `gateway.server` on any transport.

    Args:
        config: the loaded configuration.
        filters: pipeline filters for tool calls (outermost first).
    """

    def __init__(self, config: Config, filters: list[Filter] | None = None) -> None:
        self.config = config
        self.namer = Namer(config)
        self.catalog = GatewayCatalog()
        g = config.gateway
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
        self.cache = ResultCache(g.cache)
        self.telemetry = Telemetry(g.telemetry, self)
        self.coalescer = CoalesceFilter()
        self.results = ResultStore(g.shaping.keep_results)
        # The request path (ARCHITECTURE.md): telemetry -> shaping -> rules (rewrite; before the cache,
        # which reads a rule's TTL) -> cache -> coalesce -> [timer]
        # -> the replica pool (route, breaker, retry, timeout).
        self.rules = RulesFilter(RuleStore(default_rules_path(config)))
        default_filters: list[Filter] = [self.rules, CacheFilter(self.cache, self._server_tool_names), self.coalescer]
        if g.shaping.max_result_bytes or g.shaping.compact_json:
            shaping = ShapingFilter(self.results, g.shaping.max_result_bytes, g.shaping.compact_json)
            default_filters.insert(0, shaping)
        if self.telemetry.enabled:
            default_filters = [self.telemetry.filter, *default_filters, self.telemetry.timer]
        self.pipeline = Pipeline(self._forward_tool_call, default_filters if filters is None else filters)
        self._connections: weakref.WeakKeyDictionary[Connection, None] = weakref.WeakKeyDictionary()
        self._subscriptions: dict[str, weakref.WeakSet[Connection]] = {}
        self._callers: dict[str, list[Caller]] = {name: [] for name in self.upstreams}
        self._log_levels: weakref.WeakKeyDictionary[Connection, str] = weakref.WeakKeyDictionary()
        self.latest_connection: Connection | None = None
        """The last client connection seen (on the stdio front, the only one)."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server_info_stamp = {"name": g.name, "version": _VERSION}
        self.own = GatewayTools(self)
        self.telemetry.register_tools(self.own)
        self.code_mode = CodeModeTool(self)
        self.own.handlers[self.code_mode.tool.name] = self.code_mode.handler  # callable in every mode
        self.discovery = SearchTools(
            self, pins=g.always_visible, default_k=g.search_k, schema_extra=self.code_mode.stub_for
        )
        self.own.handlers.update(self.discovery.handlers)
        self.startup_ms: dict[str, float] = {}
        """Milliseconds from gateway start until each upstream was ready (or gave up)."""
        # 2026-07-28 clients hear of changes on subscriptions/listen streams (SEP-2575).
        self.bus = InMemorySubscriptionBus()
        self._listen_handler = ListenHandler(self.bus)
        self._listen_refs: dict[tuple[str, str], int] = {}
        self.server = self._build_server()

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
        await self.cache.start()
        await self.telemetry.start()
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for stage in startup_stages(self.config, list(self.upstreams)):
                for name in stage:
                    tg.start_soon(self.upstreams[name].run)

                async def wait(name: str) -> None:
                    up = self.upstreams[name]
                    if getattr(up, "lazy", False):
                        return
                    ok = await up.wait_ready(wait_s if wait_s is not None else up.cfg.startup_timeout_ms / 1000)
                    self.startup_ms[name] = (time.perf_counter() - t0) * 1000
                    if not ok:
                        dependents = [n for n, c in self.config.mcpServers.items() if name in c.depends_on]
                        if dependents:
                            logger.warning("MCP server %r is not ready; starting %s anyway", name, dependents)

                await asyncio.gather(*(wait(name) for name in stage))
            await self._warm()
            await self.discovery.on_catalog(self.catalog)
            try:
                yield self
            finally:
                for up in self.upstreams.values():
                    await up.stop()
                await self.cache.close()
                await self.telemetry.stop()
                await self.code_mode.aclose()  # pydantic-monty's pool must close before the process exits

    async def _warm(self) -> None:
        """Fill the cache from `gateway.cache.warm` (each call through the whole pipeline)."""
        link = ClientLink(LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: no_progress)
        for item in self.config.gateway.cache.warm:
            name = item.get("tool") or item.get("name")
            try:
                await self.call_tool({"name": name, "arguments": item.get("arguments") or {}}, link)
            except Exception as exc:  # noqa: BLE001 - a failed warm-up is reported, not fatal
                logger.warning("cache warm-up call %r failed: %s", name, exc)

    def status(self) -> list[dict[str, Any]]:
        """One row per upstream: name, state, protocol version, counts, restarts, last error."""
        rows = []
        for name, up in self.upstreams.items():
            rows.append(
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
                }
            )
        return rows

    # ---- UpstreamListener ---------------------------------------------------------------
    def _server_tool_names(self, server: str) -> list[str]:
        up = self.upstreams.get(server)
        return [t.name for t in up.catalog.tools] if up is not None else []

    async def catalog_changed(self, server: str, kinds: set[CatalogKind]) -> None:
        old = self.catalog
        self.catalog = build_catalog(self.namer, self.upstreams)
        if "tools" in kinds or "resources" in kinds:
            # Tools changed (or the server restarted): what was cached may no longer hold.
            await self.cache.invalidate(server)
        if "tools" in kinds:
            await self.discovery.on_catalog(self.catalog)
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
            await self._broadcast(method, None)
            await self.bus.publish(_EVENTS[method])

    async def resource_updated(self, server: str, uri: str) -> None:
        # A resource changed: tool results may derive from it, so the server's reads go too.
        await self.cache.invalidate(server)
        guri = self.namer.uri(server, uri)
        for conn in list(self._subscriptions.get(guri, ())):
            await _notify(conn, "notifications/resources/updated", {"uri": guri})
        await self.bus.publish(ResourceUpdated(uri=guri))

    async def log_message(self, server: str, params: types.LoggingMessageNotificationParams) -> None:
        data = params.model_dump(by_alias=True, mode="json", exclude_none=True)
        data["logger"] = f"{server}/{data['logger']}" if data.get("logger") else server
        callers = self._callers.get(server)
        if callers:
            # A message during a call belongs to that call: it rides the call's own stream.
            caller = callers[-1]
            if caller.notify is not None and _level_at_least(params.level, caller.log_level):
                with contextlib.suppress(Exception):
                    await caller.notify("notifications/message", data)
            return
        for conn in list(self._connections):
            if conn.protocol_version not in _MODERN and _level_at_least(
                params.level, self._log_levels.get(conn, "debug")
            ):
                await _notify(conn, "notifications/message", data)

    async def client_request(self, server: str, request: types.InputRequest) -> types.InputResponse | types.ErrorData:
        """Relay an upstream's sampling / elicitation / roots request to the client calling it."""
        callers = self._callers.get(server) or []
        for caller in reversed(callers):
            if caller.modern or caller.requests is None:
                continue
            try:
                return await _ask_client(caller.requests, request)
            except MCPError as exc:
                return exc.error
        return types.ErrorData(
            code=INVALID_PARAMS,
            message=f"no connected client can answer {request.method} for MCP server '{server}'",
        )

    # ---- the SDK server -----------------------------------------------------------------
    def _build_server(self) -> Server[Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MCPDeprecationWarning)
            server: Server[Any] = Server(
                self.config.gateway.name,
                version=_VERSION,
                instructions="mcpopt gateway: the tools, prompts and resources of several MCP servers, by server.",
                on_list_tools=self._list_tools,
                on_call_tool=self._call_tool_typed,
                on_list_resources=self._list_resources,
                on_list_resource_templates=self._list_templates,
                on_read_resource=self._read_resource,  # type: ignore[arg-type]  # raw dicts: the SDK sieves them per era
                on_subscribe_resource=self._subscribe,
                on_unsubscribe_resource=self._unsubscribe,
                on_list_prompts=self._list_prompts,
                on_get_prompt=self._get_prompt,  # type: ignore[arg-type]  # raw dicts: the SDK sieves them per era
                on_completion=self._complete,  # type: ignore[arg-type]  # raw dicts: the SDK sieves them per era
                on_set_logging_level=self._set_level,
                on_subscriptions_listen=self._listen,
            )
        # The SDK's per-message OpenTelemetry middleware is replaced by mcpopt's own (cheaper)
        # fast path; telemetry comes back as a pipeline filter.
        server.middleware = [self._middleware]
        self._init_options = server.create_initialization_options(
            NotificationOptions(prompts_changed=True, resources_changed=True, tools_changed=True)
        )
        return server

    @property
    def init_options(self) -> Any:
        return self._init_options

    async def _middleware(self, ctx: ServerRequestContext[Any, Any], call_next: Callable[..., Awaitable[Any]]) -> Any:
        conn = ctx.session._connection  # noqa: SLF001 - the SDK's per-connection object
        if conn not in self._connections:
            self._connections[conn] = None
        self.latest_connection = conn
        if ctx.method == "tools/call":
            return await self.call_tool(ctx.params, self.link(ctx))
        return await call_next(ctx)

    def link(self, ctx: ServerRequestContext[Any, Any]) -> ClientLink:
        """The `ClientLink` of a request the SDK's server dispatched."""
        session = ctx.session
        outbound = session._request_outbound  # noqa: SLF001 - on HTTP: the request's own stream
        return ClientLink(
            version=ctx.protocol_version,
            connection=session._connection,  # noqa: SLF001
            requests=outbound if session.can_send_request else None,
            notify=outbound.notify,
            relay=lambda token: _progress_relay(ctx, token),
            partition=_partition(ctx),
            session_id=session_id_of(session._connection),  # noqa: SLF001
        )

    # ---- tools --------------------------------------------------------------------------
    async def _start_lazy(self, name: str | None = None) -> bool:
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

    async def _list_tools(self, ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        await self._start_lazy()
        exposure = self.exposure_for(ctx.session._connection)  # noqa: SLF001
        items, cursor = self._page(self.discovery.listed(exposure, self.exposure_extra(exposure)), params)
        return types.ListToolsResult(tools=items, next_cursor=cursor)

    def exposure_for(self, conn: Connection | None) -> Any:
        """The exposure mode of a client connection: `exposure_clients` by client name, else the default."""
        g = self.config.gateway
        if g.exposure_clients and conn is not None and conn.client_params is not None:
            name = conn.client_params.client_info.name
            for pattern, mode in g.exposure_clients.items():
                if fnmatchcase(name, pattern):
                    return mode
        return g.exposure

    def exposure_extra(self, exposure: str) -> list[types.Tool]:
        """Tools a mode adds beside discovery (code mode: `execute_code`)."""
        return [self.code_mode.tool] if exposure == "code" else []

    async def call_tool(self, params: Mapping[str, Any] | None, link: ClientLink) -> dict[str, Any]:
        """Forward one `tools/call` (raw params in, raw result out) through the pipeline.

        Args:
            params: the client's raw `CallToolRequestParams`.
            link: how to reach the calling client (its era, request and notification channels).

        Raises:
            MCPError: unknown tool, bad params, upstream JSON-RPC errors, and the gateway's own
                errors (unavailable, timeout, closed) with the server named in message and data.
        """
        if not isinstance(params, Mapping) or not isinstance(name := params.get("name"), str):
            raise MCPError(code=INVALID_PARAMS, message="tools/call needs params.name (a string)")
        route = self.catalog.tool_routes.get(name)
        if route is None and await self._start_lazy(name):
            route = self.catalog.tool_routes.get(name)
        if route is None:
            own = self.own.handlers.get(name)
            if own is None:
                raise _unknown("tool", name, self.upstreams)
            args = params.get("arguments")
            return self._envelope(link.version, await own(args if isinstance(args, dict) else {}, link))
        up = self.upstreams[route.server]
        out, token, caller = self._prepare(params, link, up, name=route.name)
        call = ToolCall(
            route.server,
            route.name,
            name,
            out,
            link.relay(token) if token is not None else None,
            info=self.catalog.tool_infos.get(name, UNKNOWN),
            partition=link.partition,
            session_id=link.session_id,
        )
        callers = self._callers[route.server]
        callers.append(caller)
        try:
            result = await self.pipeline(call)
            if result.get("resultType") == "input_required" and not caller.modern:
                result = await self._drive_input_required(caller, up, "tools/call", out, result)
        except GatewayError as exc:
            raise MCPError.from_error_data(exc.to_error_data()) from None
        finally:
            callers.remove(caller)
        return self._envelope(link.version, result)

    def _prepare(
        self, params: Mapping[str, Any], link: ClientLink, up: ServerPool, **updates: Any
    ) -> tuple[dict[str, Any], Any, Caller]:
        """Params to send upstream, the client's progress token, and the in-flight `Caller`.

        Drops the client's own 2026-07-28 envelope keys and progress token from `_meta` (the
        upstream session stamps its own), and carries the client's log level: to a 2026-07-28
        upstream as the per-request opt-in, which has no `logging/setLevel`.
        """
        out = dict(params)
        out.update(updates)
        meta = out.get("_meta")
        token = None
        client_level = None
        if meta:
            client_level = meta.get(LOG_LEVEL_META_KEY)
            meta = {k: v for k, v in meta.items() if k not in _ENVELOPE_KEYS}
            token = meta.pop("progressToken", None)
        modern = link.version in _MODERN
        if modern:
            level = client_level if isinstance(client_level, str) else None
        else:
            level = self._log_levels.get(link.connection, "debug") if link.connection is not None else "debug"
        if up.modern and level is not None:
            meta = dict(meta or {})
            meta[LOG_LEVEL_META_KEY] = level
        if meta:
            out["_meta"] = meta
        else:
            out.pop("_meta", None)
        return out, token, Caller(modern, link.requests, link.notify, level)

    async def _forward_tool_call(self, call: ToolCall) -> ToolResult:
        """The pipeline's terminal: send the call to its upstream."""
        return await self.upstreams[call.server].call(call)

    async def _call_tool_typed(self, ctx: Any, params: types.CallToolRequestParams) -> Any:
        # Never reached (the middleware answers tools/call); registered so `tools` is declared.
        raise MCPError(code=INVALID_PARAMS, message="tools/call is served by the gateway middleware")

    def _envelope(self, version: str, result: dict[str, Any]) -> dict[str, Any]:
        """Adapt a forwarded result's envelope to the client's era (cheap: top-level keys only)."""
        if version in _MODERN:
            meta = result.get("_meta")
            result = dict(result)
            result.setdefault("resultType", "complete")
            result["_meta"] = (
                {**meta, SERVER_INFO_META_KEY: self._server_info_stamp}
                if isinstance(meta, dict)
                else {SERVER_INFO_META_KEY: self._server_info_stamp}
            )
            return result
        if any(k in result for k in _MODERN_RESULT_KEYS) or (
            isinstance(result.get("_meta"), dict) and SERVER_INFO_META_KEY in result["_meta"]
        ):
            result = {k: v for k, v in result.items() if k not in _MODERN_RESULT_KEYS}
            meta = result.get("_meta")
            if isinstance(meta, dict) and SERVER_INFO_META_KEY in meta:
                meta = {k: v for k, v in meta.items() if k != SERVER_INFO_META_KEY}
                if meta:
                    result["_meta"] = meta
                else:
                    del result["_meta"]
        return result

    async def _drive_input_required(
        self, caller: Caller, up: ServerPool, method: str, params: dict[str, Any], first: dict[str, Any]
    ) -> dict[str, Any]:
        """Resolve a 2026-07-28 `InputRequiredResult` for a handshake-era client.

        The embedded input requests become server-to-client requests on the client's
        connection (sampling/createMessage, elicitation/create, roots/list); the original
        request is retried upstream with `inputResponses` and `requestState` (SEP-2322).
        """
        channel = caller.requests
        if channel is None:
            raise MCPError(
                code=INVALID_PARAMS,
                message=f"MCP server '{up.name}' needs input from the client (sampling, elicitation or roots), "
                "and this client connection cannot carry requests",
            )
        parsed = types.InputRequiredResult.model_validate(first, by_name=False)

        async def dispatch(_key: str, request: types.InputRequest) -> types.InputResponse | types.ErrorData:
            try:
                return await _ask_client(channel, request)
            except MCPError as exc:
                return exc.error

        async def retry(responses: types.InputResponses | None, state: str | None) -> Any:
            again = dict(params)
            if responses is not None:
                again["inputResponses"] = {
                    k: v.model_dump(by_alias=True, mode="json", exclude_none=True) for k, v in responses.items()
                }
            if state is not None:
                again["requestState"] = state
            raw = await up.request(method, again)
            if raw.get("resultType") == "input_required":
                return types.InputRequiredResult.model_validate(raw, by_name=False)
            return raw

        return await run_input_required_driver(parsed, dispatch=dispatch, retry=retry)

    # ---- prompts ------------------------------------------------------------------------
    async def _list_prompts(self, ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListPromptsResult:
        await self._start_lazy()
        items, cursor = self._page(self.catalog.prompts, params)
        return types.ListPromptsResult(prompts=items, next_cursor=cursor)

    async def _get_prompt(self, ctx: Any, params: types.GetPromptRequestParams) -> dict[str, Any]:
        route = self.catalog.prompt_routes.get(params.name)
        if route is None:
            raise _unknown("prompt", params.name, self.upstreams)
        out = _forward_params(ctx.params, name=route.name)
        return await self._forward(ctx, route.server, "prompts/get", out)

    # ---- resources ----------------------------------------------------------------------
    async def _list_resources(self, ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListResourcesResult:
        items, cursor = self._page(self.catalog.resources, params)
        return types.ListResourcesResult(resources=items, next_cursor=cursor)

    async def _list_templates(
        self, ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        items, cursor = self._page(self.catalog.templates, params)
        return types.ListResourceTemplatesResult(resource_templates=items, next_cursor=cursor)

    def _resolve_uri(self, uri: str) -> Route:
        route = self.namer.resolve_uri(uri)
        if route is not None and route.server in self.upstreams:
            return route
        # Servers with `prefix: ""` keep their URIs: find the one that lists it (or whose
        # template could produce it); with a single such server, it is that one.
        unprefixed = [s for s in self.namer.unprefixed_servers() if s in self.upstreams]
        for server in unprefixed:
            up = self.upstreams[server]
            if any(str(r.uri) == uri for r in up.catalog.resources):
                return Route(server, uri)
        for server in unprefixed:
            up = self.upstreams[server]
            if any(_template_matches(t.uri_template, uri) for t in up.catalog.templates):
                return Route(server, uri)
        if len(unprefixed) == 1:
            return Route(unprefixed[0], uri)
        raise UnknownTarget(f"Unknown resource: {uri} (no MCP server behind this gateway serves it)")

    async def _read_resource(self, ctx: Any, params: types.ReadResourceRequestParams) -> dict[str, Any]:
        if str(params.uri).startswith(RESULT_URI_PREFIX):
            kept = self.results.read(str(params.uri))
            if kept is None:
                raise MCPError(
                    code=-32002,
                    message=f"Resource not found: {params.uri} (shaped results are kept "
                    f"for the last {self.config.gateway.shaping.keep_results} cuts)",
                )
            if ctx.protocol_version in _MODERN:
                kept = {**kept, "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}
            return kept
        try:
            route = self._resolve_uri(str(params.uri))
        except GatewayError as exc:
            raise MCPError.from_error_data(exc.to_error_data()) from None
        out = _forward_params(ctx.params, uri=route.name)
        result = await self._forward(ctx, route.server, "resources/read", out)
        contents = result.get("contents")
        if isinstance(contents, list):
            result = dict(result)
            result["contents"] = [
                {**c, "uri": self.namer.uri(route.server, c["uri"])} if isinstance(c, dict) and "uri" in c else c
                for c in contents
            ]
        return result

    async def _subscribe(self, ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
        uri = str(params.uri)
        try:
            route = self._resolve_uri(uri)
            await self.upstreams[route.server].subscribe(route.name)
        except GatewayError as exc:
            raise MCPError.from_error_data(exc.to_error_data()) from None
        conn = ctx.session._connection  # noqa: SLF001
        self._subscriptions.setdefault(uri, weakref.WeakSet()).add(conn)
        return types.EmptyResult()

    async def _listen(self, ctx: Any, params: types.SubscriptionsListenRequestParams) -> Any:
        """Serve a 2026-07-28 `subscriptions/listen` stream; its resource URIs are subscribed upstream
        for as long as the stream lives (reference-counted across streams)."""
        wanted = params.notifications.resource_subscriptions or []
        held: list[tuple[str, str]] = []
        try:
            for uri in wanted:
                try:
                    route = self._resolve_uri(uri)
                except GatewayError:
                    continue
                key = (route.server, route.name)
                self._listen_refs[key] = self._listen_refs.get(key, 0) + 1
                held.append(key)
                if self._listen_refs[key] == 1:
                    with contextlib.suppress(Exception):
                        await self.upstreams[route.server].subscribe(route.name)
            return await self._listen_handler(ctx, params)
        finally:
            for key in held:
                self._listen_refs[key] -= 1
                if not self._listen_refs[key]:
                    del self._listen_refs[key]
                    with contextlib.suppress(Exception):
                        await self.upstreams[key[0]].unsubscribe(key[1])

    async def _unsubscribe(self, ctx: Any, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        uri = str(params.uri)
        try:
            route = self._resolve_uri(uri)
        except GatewayError as exc:
            raise MCPError.from_error_data(exc.to_error_data()) from None
        subs = self._subscriptions.get(uri)
        if subs is not None:
            subs.discard(ctx.session._connection)  # noqa: SLF001
            if not subs:
                del self._subscriptions[uri]
                with contextlib.suppress(Exception):
                    await self.upstreams[route.server].unsubscribe(route.name)
        return types.EmptyResult()

    # ---- completion, logging ------------------------------------------------------------
    async def _complete(self, ctx: Any, params: types.CompleteRequestParams) -> dict[str, Any]:
        ref = params.ref
        raw = dict(ctx.params)
        if isinstance(ref, types.PromptReference):
            route = self.catalog.prompt_routes.get(ref.name)
            if route is None:
                raise _unknown("prompt", ref.name, self.upstreams)
            raw["ref"] = {**raw["ref"], "name": route.name}
        else:
            route = self.namer.resolve_uri(ref.uri)
            if route is None:
                unprefixed = self.namer.unprefixed_servers()
                if not unprefixed:
                    raise MCPError(code=INVALID_PARAMS, message=f"Unknown resource template: {ref.uri}")
                route = Route(unprefixed[0], ref.uri)
            raw["ref"] = {**raw["ref"], "uri": route.name}
        up = self.upstreams.get(route.server)
        if up is None or not (up.capabilities and up.capabilities.completions):
            return {"completion": {"values": [], "hasMore": False}}
        return await self._forward(ctx, route.server, "completion/complete", _forward_params(raw))

    async def _set_level(self, ctx: Any, params: types.SetLevelRequestParams) -> types.EmptyResult:
        self._log_levels[ctx.session._connection] = params.level  # noqa: SLF001
        for up in self.upstreams.values():
            if up.state == "ready" and up.capabilities and up.capabilities.logging and not up.modern:
                with contextlib.suppress(Exception):
                    await up.request("logging/setLevel", {"level": params.level})
        return types.EmptyResult()

    # ---- helpers ------------------------------------------------------------------------
    async def _forward(self, ctx: Any, server: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        up = self.upstreams.get(server)
        if up is None:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown MCP server: {server}")
        link = self.link(ctx)
        params, token, caller = self._prepare(params, link, up)
        callers = self._callers[server]
        callers.append(caller)
        try:
            result = await up.request(method, params, on_progress=link.relay(token) if token is not None else None)
            if result.get("resultType") == "input_required" and not caller.modern:
                result = await self._drive_input_required(caller, up, method, params, result)
        except GatewayError as exc:
            raise MCPError.from_error_data(exc.to_error_data()) from None
        finally:
            callers.remove(caller)
        if ctx.protocol_version not in _MODERN:
            # The SDK's sieve drops later-revision fields, but a modern upstream's serverInfo
            # stamp in `_meta` is ours to drop.
            return self._envelope(ctx.protocol_version, result)
        # 2026-07-28 results carry `resultType`; cacheable ones also `ttlMs`/`cacheScope`
        # (SEP-2549). A handshake-era upstream gives none: forward as "complete", not cacheable.
        result = dict(result)
        result.setdefault("resultType", "complete")
        if method == "resources/read":
            result.setdefault("ttlMs", 0)
            result.setdefault("cacheScope", "private")
        return result

    def _page(self, items: list[Any], params: types.PaginatedRequestParams | None) -> tuple[list[Any], str | None]:
        size = self.config.gateway.page_size
        if not size:
            return items, None
        start = 0
        if params is not None and params.cursor:
            try:
                start = int(params.cursor)
            except ValueError:
                raise MCPError(code=INVALID_PARAMS, message=f"Invalid cursor: {params.cursor!r}") from None
        end = start + size
        return items[start:end], (str(end) if end < len(items) else None)

    async def _broadcast(self, method: str, params: dict[str, Any] | None) -> None:
        for conn in list(self._connections):
            if conn.protocol_version in _MODERN:
                continue  # 2026-07-28 clients learn of changes on subscriptions/listen streams
            await _notify(conn, method, params)


async def _notify(conn: Connection, method: str, params: dict[str, Any] | None) -> None:
    if not conn.has_standalone_channel:
        return
    try:
        with anyio.move_on_after(2):
            await conn.outbound.notify(method, params)
    except Exception as exc:  # noqa: BLE001 - a gone client must not break the gateway
        logger.debug("notification %s to a client failed: %s", method, exc)


_INPUT_RESULT_TYPES: dict[str, Any] = {
    "sampling/createMessage": types.CreateMessageResult,
    "elicitation/create": types.ElicitResult,
    "roots/list": types.ListRootsResult,
}


async def _ask_client(channel: Any, request: types.InputRequest) -> types.InputResponse:
    """Send a server-to-client request on the client's channel (on HTTP, the call's own stream)."""
    data = request.model_dump(by_alias=True, mode="json", exclude_none=True)
    raw = await channel.send_raw_request(data["method"], data.get("params"), None)
    result_type = _INPUT_RESULT_TYPES[data["method"]]
    if data["method"] == "sampling/createMessage" and isinstance(raw.get("content"), list):
        result_type = types.CreateMessageResultWithTools
    return result_type.model_validate(raw, by_name=False)


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


def _partition(ctx: Any) -> str:
    """The auth partition of a request the SDK dispatched (HTTP: from its headers)."""
    request = getattr(ctx, "request", None)
    headers = getattr(request, "headers", None)
    return partition_of(headers.get("authorization") if headers is not None else None)


def _progress_relay(ctx: Any, token: Any) -> Callable[[float, float | None, str | None], Awaitable[None]]:
    session = ctx.session
    request_id = ctx.request_id

    async def relay(progress: float, total: float | None, message: str | None) -> None:
        with contextlib.suppress(Exception):
            await session.send_progress_notification(token, progress, total, message, related_request_id=request_id)

    return relay


def _forward_params(params: Mapping[str, Any] | None, **updates: Any) -> dict[str, Any]:
    out = dict(params or {})
    out.update(updates)
    meta = out.get("_meta")
    if isinstance(meta, Mapping):
        meta = {k: v for k, v in meta.items() if k not in _ENVELOPE_KEYS}
        if meta:
            out["_meta"] = meta
        else:
            del out["_meta"]
    return out


def _unknown(kind: str, name: str, upstreams: dict[str, ServerPool]) -> MCPError:
    down = [n for n, up in upstreams.items() if up.state != "ready"]
    hint = ""
    for server in down:
        if name.startswith(server):
            up = upstreams[server]
            why = f": {up.last_error}" if up.last_error else ""
            hint = f" (MCP server '{server}' is {up.state}{why})"
            break
    return MCPError(code=INVALID_PARAMS, message=f"Unknown {kind}: {name}{hint}")


_EVENTS: dict[str, Any] = {
    "notifications/tools/list_changed": ToolsListChanged(),
    "notifications/prompts/list_changed": PromptsListChanged(),
    "notifications/resources/list_changed": ResourcesListChanged(),
}

_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


def _level_at_least(level: str, minimum: str | None) -> bool:
    """RFC 5424 severity order, as MCP's logging levels (spec: server/utilities/logging)."""
    if minimum is None:
        return False
    try:
        return _LEVELS.index(level) >= _LEVELS.index(minimum)
    except ValueError:
        return True


def _template_matches(template: str, uri: str) -> bool:
    literal = template.split("{", 1)[0]
    return bool(literal) and uri.startswith(literal)
