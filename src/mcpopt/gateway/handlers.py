"""The SDK server clients see: every MCP method the gateway answers, on the SDK's low-level `Server`.

The SDK owns the protocol with clients (both eras: the initialize handshake 2024-11-05..2025-11-25
and the stateless 2026-07-28 envelope), the connection and its state. `ProtocolHandlers` answers:
- lists (`tools/list` per exposure mode, prompts, resources, templates) from the gateway's catalog;
- `tools/call` in a server middleware, straight into `Gateway.call_tool` (no SDK models);
- `prompts/get`, `resources/read`, `completion/complete`: forwarded to the upstream owning the
  name or URI (`Gateway.forward`), raw dicts that the SDK sieves for the client's era;
- subscriptions (handshake `resources/subscribe` and 2026-07-28 `subscriptions/listen`) and
  `logging/setLevel`;
- the tasks extension's `tasks/get`, `tasks/update`, `tasks/cancel`, routed to the upstream that
  owns the task (`mcpopt.gateway.tasks`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import mcp_types as types
from mcp.server import Server
from mcp.server.caching import CacheHint
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.subscriptions import ListenHandler
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp_types import INVALID_PARAMS

from mcpopt.api import ClientLink, partition_of, session_id_of
from mcpopt.auth.asgi import principal_of
from mcpopt.auth.policy import Decision, PolicyDenied
from mcpopt.auth.principal import Principal
from mcpopt.catalog import Route
from mcpopt.errors import GatewayError, UnknownTarget
from mcpopt.gateway import faults
from mcpopt.gateway.eras import MODERN, client_capabilities, forward_params, resource_error, resource_not_found
from mcpopt.gateway.lists import LIST_METHODS, request_cursor
from mcpopt.gateway.server import VERSION, Gateway, unknown
from mcpopt.gateway.tasks import TASK_METHODS, TaskIdParams, TaskUpdateParams, check_request
from mcpopt.pipeline.shaping import RESULT_URI_PREFIX

INSTRUCTIONS = "mcpopt gateway: the tools, prompts and resources of several MCP servers, by server."
LIST_CHANGED = NotificationOptions(prompts_changed=True, resources_changed=True, tools_changed=True)
"""The gateway sends tools, prompts and resources `list_changed`: advertised on every front."""


class GatewayServer(Server[Any]):
    """The SDK's low-level `Server`, whose default initialization options advertise `listChanged`.

    The Streamable HTTP session manager builds each session's `InitializeResult` from
    `create_initialization_options()` with no arguments, which says `listChanged: false`: clients
    that refresh their lists only when the server advertises it (the TypeScript SDK's
    `listChanged` option) never did over HTTP (issue 11, failure 1).
    """

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> Any:
        return super().create_initialization_options(
            notification_options or LIST_CHANGED, experimental_capabilities, extensions
        )


def build_server(gateway: Gateway) -> tuple[Server[Any], Any]:
    """The SDK `Server` for `gateway` and its initialization options (`listChanged: true` for tools,
    prompts and resources: the gateway sends those notifications)."""
    handlers = ProtocolHandlers(gateway)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCPDeprecationWarning)
        server: Server[Any] = GatewayServer(
            gateway.config.gateway.name,
            version=VERSION,
            instructions=INSTRUCTIONS,
            on_list_tools=handlers.list_tools,
            on_call_tool=handlers.call_tool_typed,
            on_list_resources=handlers.list_resources,
            on_list_resource_templates=handlers.list_templates,
            on_read_resource=handlers.read_resource,  # type: ignore[arg-type]  # raw dicts: the SDK sieves them per era
            on_subscribe_resource=handlers.subscribe,
            on_unsubscribe_resource=handlers.unsubscribe,
            on_list_prompts=handlers.list_prompts,
            on_get_prompt=handlers.get_prompt,  # type: ignore[arg-type]  # raw dicts: the SDK sieves them per era
            on_completion=handlers.complete,  # type: ignore[arg-type]  # raw dicts: the SDK sieves them per era
            on_set_logging_level=handlers.set_level,
            on_subscriptions_listen=handlers.listen,
            on_roots_list_changed=handlers.roots_changed,
        )
    # The SDK's per-message OpenTelemetry middleware is replaced by mcpopt's own (cheaper) fast
    # path; telemetry comes back as a pipeline filter. `faults.guard` comes first: a failure inside
    # the gateway is -32602/-32603 for that request, never the SDK's code 0 with Python text.
    server.middleware = [faults.guard, handlers.middleware]
    server.cache_hints = list_cache_hints(gateway)
    server.get_tool_input_schema = handlers.tool_input_schema
    for method in TASK_METHODS:
        params_type = TaskUpdateParams if method == "tasks/update" else TaskIdParams
        server.add_request_handler(method, params_type, handlers.task_request)
    return server, server.create_initialization_options()


def list_cache_hints(gateway: Gateway) -> dict[str, CacheHint]:
    """SEP-2549 hints for the list methods (`gateway.list_ttl_ms`; see its docstring for the scope).
    The SDK's runner puts them on 2026-07-28 results only (the per-era sieve drops them otherwise)."""
    g = gateway.config.gateway
    scope: Literal["public", "private"] = "private" if g.auth.enabled or g.exposure_clients else "public"
    hint = CacheHint(ttl_ms=g.list_ttl_ms, scope=scope)
    return dict.fromkeys(LIST_METHODS, hint)


def principal_of_ctx(ctx: Any) -> Principal | None:
    """The principal the HTTP front's authentication attached to the request (None: stdio, or HTTP
    without `gateway.auth`: the trusted local user)."""
    request = getattr(ctx, "request", None)
    scope = getattr(request, "scope", None)
    return principal_of(scope) if isinstance(scope, dict) else None


def link_of(ctx: ServerRequestContext[Any, Any]) -> ClientLink:
    """The `ClientLink` of a request the SDK's server dispatched."""
    session = ctx.session
    outbound = session._request_outbound  # noqa: SLF001 - on HTTP: the request's own stream
    principal = principal_of_ctx(ctx)
    if principal is not None:
        partition = principal.key  # one partition per principal, whatever token it presents
    else:
        request = getattr(ctx, "request", None)
        headers = getattr(request, "headers", None)
        partition = partition_of(headers.get("authorization") if headers is not None else None)
    return ClientLink(
        version=ctx.protocol_version,
        connection=session._connection,  # noqa: SLF001
        requests=outbound if session.can_send_request else None,
        notify=outbound.notify,
        relay=lambda token: _progress_relay(ctx, token),
        partition=partition,
        session_id=session_id_of(session._connection),  # noqa: SLF001
        principal=principal,
    )


def exposure_for(gateway: Gateway, conn: Connection | None, principal: Any = None) -> str:
    """The exposure mode of a caller (`Gateway.exposure_for`): its policy's, else by client name."""
    return gateway.exposure_for(conn, principal)


class ProtocolHandlers:
    """The SDK server's handlers for one gateway (see the module docstring)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._listen_handler = ListenHandler(gateway.bus)
        self._listen_refs: dict[tuple[str, str], int] = {}

    async def middleware(self, ctx: ServerRequestContext[Any, Any], call_next: Callable[..., Awaitable[Any]]) -> Any:
        self.gateway.clients.seen(ctx.session._connection)  # noqa: SLF001 - the SDK's per-connection object
        method = ctx.method
        if method == "tools/call":
            return await self.gateway.call_tool(ctx.params, link_of(ctx))
        if method in LIST_METHODS:
            return await self._prepared(ctx, method, call_next)
        return await call_next(ctx)

    async def _prepared(self, ctx: ServerRequestContext[Any, Any], method: str, call_next: Callable[..., Any]) -> Any:
        """A list from the prepared lists, else built by the SDK's path (handler, cache hints, era
        sieve, `serverInfo` stamp) and kept: the wire dict `call_next` returns is what the client
        gets, and what the fronts' fast paths splice request ids into (`mcpopt.gateway.lists`)."""
        gw = self.gateway
        ok, cursor = request_cursor(ctx.params)
        if not ok and ctx.protocol_version in MODERN and isinstance(ctx.params, dict):
            cursor = ctx.params.get("cursor")  # the envelope is in `_meta`; the SDK checked it
            ok = cursor is None or isinstance(cursor, str)
        if not ok or (method in ("tools/list", "prompts/list") and gw.lazy_pending()):
            return await call_next(ctx)
        conn = ctx.session._connection  # noqa: SLF001
        key = gw.list_key(method, ctx.protocol_version, conn, principal_of_ctx(ctx), cursor)
        entry = gw.lists.get(key)
        if entry is not None:
            return entry.wire
        generation = gw.lists.generation
        wire = await call_next(ctx)
        if isinstance(wire, dict):
            gw.lists.put(key, generation, wire)
        return wire

    def tool_input_schema(self, name: str) -> Mapping[str, Any] | None:
        """The input schema of an upstream tool by gateway name (None for the gateway's own tools,
        which declare no `x-mcp-header`).

        The SDK's 2026-07-28 HTTP entry checks a `tools/call`'s `Mcp-Param-*` headers against the
        tool's schema (SEP-2243). Without this lookup it runs the whole `tools/list` handler for
        every call that has arguments, and finds only the tools the connection's exposure mode
        lists (in `search` and `code` mode, not the hidden ones it may still call by name).
        """
        tool = self.gateway.catalog.tool_defs.get(name)
        return tool.input_schema if tool is not None else None

    async def call_tool_typed(self, ctx: Any, params: types.CallToolRequestParams) -> Any:
        # Never reached (the middleware answers tools/call); registered so `tools` is declared.
        raise MCPError(code=INVALID_PARAMS, message="tools/call is served by the gateway middleware")

    # ---- lists --------------------------------------------------------------------------
    def _page(self, items: list[Any], params: types.PaginatedRequestParams | None) -> tuple[list[Any], str | None]:
        size = self.gateway.config.gateway.page_size
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

    async def list_tools(self, ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        gw = self.gateway
        await gw.start_lazy()
        principal = principal_of_ctx(ctx)
        exposure = exposure_for(gw, ctx.session._connection, principal)  # noqa: SLF001
        tools = gw.list_tools(exposure)
        if gw.policy is not None:  # a principal sees only what it may call
            tools = [t for t in tools if gw.may_call(principal, t.name, exposure)]
        items, cursor = self._page(tools, params)
        return types.ListToolsResult(tools=items, next_cursor=cursor)

    async def list_prompts(self, ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListPromptsResult:
        gw = self.gateway
        await gw.start_lazy()
        prompts = gw.catalog.prompts
        if gw.policy is not None:
            principal = principal_of_ctx(ctx)
            routes = gw.catalog.prompt_routes
            prompts = [p for p in prompts if p.name in routes and gw.may_use_server(principal, routes[p.name].server)]
        items, cursor = self._page(prompts, params)
        return types.ListPromptsResult(prompts=items, next_cursor=cursor)

    def _visible_uris(self, ctx: Any, items: list[Any], uri_of: Callable[[Any], str]) -> list[Any]:
        gw = self.gateway
        if gw.policy is None:
            return items
        principal = principal_of_ctx(ctx)
        out = []
        for item in items:
            try:
                server = self.resolve_uri(uri_of(item)).server
            except GatewayError:
                continue
            if gw.may_use_server(principal, server):
                out.append(item)
        return out

    async def list_resources(self, ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListResourcesResult:
        resources = self._visible_uris(ctx, self.gateway.catalog.resources, lambda r: str(r.uri))
        items, cursor = self._page(resources, params)
        return types.ListResourcesResult(resources=items, next_cursor=cursor)

    async def list_templates(
        self, ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        templates = self._visible_uris(ctx, self.gateway.catalog.templates, lambda t: t.uri_template)
        items, cursor = self._page(templates, params)
        return types.ListResourceTemplatesResult(resource_templates=items, next_cursor=cursor)

    # ---- prompts, resources -------------------------------------------------------------
    async def get_prompt(self, ctx: Any, params: types.GetPromptRequestParams) -> dict[str, Any]:
        gw = self.gateway
        route = gw.catalog.prompt_routes.get(params.name)
        if route is None:
            raise unknown("prompt", params.name, gw.upstreams, gw.known_names, gw.namer)
        out = forward_params(ctx.params, name=route.name)
        return await gw.forward(link_of(ctx), route.server, "prompts/get", out)

    def resolve_uri(self, uri: str) -> Route:
        """The upstream and upstream URI of a gateway resource URI.

        Raises:
            UnknownTarget: no upstream serves it.
        """
        gw = self.gateway
        route = gw.namer.resolve_uri(uri)
        if route is not None and route.server in gw.upstreams:
            return route
        # Servers with `prefix: ""` keep their URIs: find the one that lists it (or whose
        # template could produce it); with a single such server, it is that one.
        unprefixed = [s for s in gw.namer.unprefixed_servers() if s in gw.upstreams]
        for server in unprefixed:
            if any(str(r.uri) == uri for r in gw.upstreams[server].catalog.resources):
                return Route(server, uri)
        for server in unprefixed:
            if any(_template_matches(t.uri_template, uri) for t in gw.upstreams[server].catalog.templates):
                return Route(server, uri)
        if len(unprefixed) == 1:
            return Route(unprefixed[0], uri)
        raise UnknownTarget(f"Unknown resource: {uri} (no MCP server behind this gateway serves it)")

    async def read_resource(self, ctx: Any, params: types.ReadResourceRequestParams) -> dict[str, Any]:
        gw = self.gateway
        uri = str(params.uri)
        if uri.startswith(RESULT_URI_PREFIX):
            kept = gw.results.read(uri)
            if kept is None:
                raise resource_not_found(
                    ctx.protocol_version,
                    uri,
                    f"Resource not found: {uri} (shaped results are kept "
                    f"for the last {gw.config.gateway.shaping.keep_results} cuts)",
                )
            if ctx.protocol_version in MODERN:
                kept = {**kept, "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}
            return kept
        try:
            route = self.resolve_uri(uri)
        except UnknownTarget as exc:
            raise resource_not_found(ctx.protocol_version, uri, str(exc)) from None
        except GatewayError as exc:
            raise MCPError.from_error_data(exc.to_error_data()) from None
        out = forward_params(ctx.params, uri=route.name)
        try:
            result = await gw.forward(link_of(ctx), route.server, "resources/read", out)
        except MCPError as exc:
            raise resource_error(ctx.protocol_version, exc, uri, route.name) from None
        contents = result.get("contents")
        if isinstance(contents, list):
            result = dict(result)
            result["contents"] = [
                {**c, "uri": gw.namer.uri(route.server, c["uri"])} if isinstance(c, dict) and "uri" in c else c
                for c in contents
            ]
        return result

    # ---- subscriptions ------------------------------------------------------------------
    def _owner(self, ctx: Any, server: str) -> str:
        gw = self.gateway
        if not gw.isolated:
            return ""
        conn = ctx.session._connection  # noqa: SLF001
        return gw.owner_of(server, principal_of_ctx(ctx), session_id_of(conn), ctx.protocol_version)

    def _check_server(self, ctx: Any, server: str, what: str) -> None:
        if not self.gateway.may_use_server(principal_of_ctx(ctx), server):
            decision = Decision(False, f"the policy does not grant MCP server '{server}' ({what})", rule="servers")
            raise MCPError.from_error_data(PolicyDenied(decision, server=server).to_error_data())

    async def subscribe(self, ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
        uri = str(params.uri)
        gw = self.gateway
        try:
            route = self.resolve_uri(uri)
            self._check_server(ctx, route.server, "resources/subscribe")
            owner = self._owner(ctx, route.server)
            await (await gw.pool_for(route.server, owner)).subscribe(route.name)
        except GatewayError as exc:
            raise MCPError.from_error_data(exc.to_error_data()) from None
        gw.clients.subscribe(uri, ctx.session._connection, owner)  # noqa: SLF001
        return types.EmptyResult()

    async def unsubscribe(self, ctx: Any, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        uri = str(params.uri)
        gw = self.gateway
        try:
            route = self.resolve_uri(uri)
        except GatewayError as exc:
            raise MCPError.from_error_data(exc.to_error_data()) from None
        owner = self._owner(ctx, route.server)
        if gw.clients.unsubscribe(uri, ctx.session._connection) or owner:  # noqa: SLF001
            pool = gw.isolated[route.server].peek(owner) if owner else gw.upstreams[route.server]
            if pool is not None:
                with contextlib.suppress(Exception):
                    await pool.unsubscribe(route.name)
        return types.EmptyResult()

    async def listen(self, ctx: Any, params: types.SubscriptionsListenRequestParams) -> Any:
        """Serve a 2026-07-28 `subscriptions/listen` stream; its resource URIs are subscribed upstream
        for as long as the stream lives (reference-counted across streams)."""
        wanted = params.notifications.resource_subscriptions or []
        held: list[tuple[str, str]] = []
        upstreams = self.gateway.upstreams
        try:
            principal = principal_of_ctx(ctx)
            for uri in wanted:
                try:
                    route = self.resolve_uri(uri)
                except GatewayError:
                    continue
                if not self.gateway.may_use_server(principal, route.server):
                    continue  # never subscribed for a principal that may not read it
                key = (route.server, route.name)
                self._listen_refs[key] = self._listen_refs.get(key, 0) + 1
                held.append(key)
                if self._listen_refs[key] == 1:
                    with contextlib.suppress(Exception):
                        await upstreams[route.server].subscribe(route.name)
            return await self._listen_handler(ctx, params)
        finally:
            for key in held:
                self._listen_refs[key] -= 1
                if not self._listen_refs[key]:
                    del self._listen_refs[key]
                    with contextlib.suppress(Exception):
                        await upstreams[key[0]].unsubscribe(key[1])

    # ---- the tasks extension (SEP-2663) -------------------------------------------------
    async def task_request(self, ctx: Any, params: TaskIdParams) -> dict[str, Any]:
        """`tasks/get`, `tasks/update` or `tasks/cancel`: checked here, then forwarded to the
        upstream that owns the task, with its own task id."""
        gw = self.gateway
        raw = dict(ctx.params or {})
        link = link_of(ctx)
        meta = raw.get("_meta")
        caps = client_capabilities(link, meta if isinstance(meta, dict) else None)
        headers = getattr(getattr(ctx, "request", None), "headers", None)
        check_request(ctx.method, params.task_id, caps, headers)
        server, upstream_id = gw.task_ids.inward(params.task_id)
        result = await gw.forward(link, server, ctx.method, forward_params(raw, taskId=upstream_id))
        return gw.task_ids.detailed(server, result)

    # ---- completion, logging ------------------------------------------------------------
    async def complete(self, ctx: Any, params: types.CompleteRequestParams) -> dict[str, Any]:
        gw = self.gateway
        ref = params.ref
        raw = dict(ctx.params)
        if isinstance(ref, types.PromptReference):
            route = gw.catalog.prompt_routes.get(ref.name)
            if route is None:
                raise unknown("prompt", ref.name, gw.upstreams, gw.known_names, gw.namer)
            raw["ref"] = {**raw["ref"], "name": route.name}
        else:
            found = gw.namer.resolve_uri(ref.uri)
            if found is None:
                unprefixed = gw.namer.unprefixed_servers()
                if not unprefixed:
                    raise MCPError(code=INVALID_PARAMS, message=f"Unknown resource template: {ref.uri}")
                found = Route(unprefixed[0], ref.uri)
            route = found
            raw["ref"] = {**raw["ref"], "uri": route.name}
        up = gw.upstreams.get(route.server)
        if up is None or not (up.capabilities and up.capabilities.completions):
            return {"completion": {"values": [], "hasMore": False}}
        return await gw.forward(link_of(ctx), route.server, "completion/complete", forward_params(raw))

    async def roots_changed(self, ctx: Any, params: types.NotificationParams | None) -> None:
        """A client's `notifications/roots/list_changed`: passed on to the upstream sessions that
        hold its roots -- its own isolated sessions, and the shared ones (whose callers it may be)."""
        gw = self.gateway
        for name, shared in gw.upstreams.items():
            pool: Any = shared
            if name in gw.isolated:
                owner = self._owner(ctx, name)
                if owner:
                    pool = gw.isolated[name].peek(owner)
            if pool is not None:
                await _roots_changed_upstream(pool)

    async def set_level(self, ctx: Any, params: types.SetLevelRequestParams) -> types.EmptyResult:
        gw = self.gateway
        gw.clients.set_log_level(ctx.session._connection, params.level)  # noqa: SLF001
        for name, shared in gw.upstreams.items():
            # An isolated server's level is its owner's session's alone; a shared one's is everyone's
            # (the gateway still filters each client's messages by that client's own level).
            up: Any = shared
            if name in gw.isolated:
                owner = self._owner(ctx, name)
                up = gw.isolated[name].peek(owner) if owner else shared
            if up is None or not (up.state == "ready" and up.capabilities and up.capabilities.logging):
                continue
            if not up.modern:
                with contextlib.suppress(Exception):
                    await up.request("logging/setLevel", {"level": params.level})
        return types.EmptyResult()


async def _roots_changed_upstream(pool: Any) -> None:
    for up in pool.upstreams:
        session = up.session
        if session is not None and up.state == "ready" and not up.modern:
            with contextlib.suppress(Exception):
                await session.send_roots_list_changed()


def _progress_relay(ctx: Any, token: Any) -> Callable[[float, float | None, str | None], Awaitable[None]]:
    session = ctx.session
    request_id = ctx.request_id

    async def relay(progress: float, total: float | None, message: str | None) -> None:
        with contextlib.suppress(Exception):
            await session.send_progress_notification(token, progress, total, message, related_request_id=request_id)

    return relay


def _template_matches(template: str, uri: str) -> bool:
    literal = template.split("{", 1)[0]
    return bool(literal) and uri.startswith(literal)
