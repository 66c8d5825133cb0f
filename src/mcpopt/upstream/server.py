"""One upstream MCP server behind the gateway: a persistent session, supervised.

`Upstream` keeps exactly one session open to its server (never a handshake per call), learns
its tools, resources, resource templates and prompts, and restarts it with exponential
backoff when it fails to start, crashes or closes. Calls made while it is down fail at once
with an error naming the server; calls in flight when it dies fail within the time it takes
the transport to see the close (stdio: immediately on EOF).

The gateway hears about changes through `UpstreamListener`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import anyio
import mcp_types as types
from mcp.client._probe import negotiate_auto
from mcp.client.session import ClientRequestContext, ClientSession
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import MCP_NAME_HEADER, encode_header_value
from mcp_types import CLIENT_CAPABILITIES_META_KEY, CONNECTION_CLOSED, METHOD_NOT_FOUND, REQUEST_TIMEOUT
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from mcpopt.config import ServerConfig
from mcpopt.errors import GatewayError, UpstreamClosed, UpstreamTimeout, UpstreamUnavailable
from mcpopt.upstream import process
from mcpopt.upstream.fastpath import ChannelClosed, FastChannel, StampedMeta
from mcpopt.upstream.transports import StderrTail, open_transport

logger = logging.getLogger(__name__)

State = Literal["idle", "starting", "ready", "down", "stopped"]
CatalogKind = Literal["tools", "resources", "prompts"]
ProgressFn = Callable[[float, float | None, str | None], Awaitable[None]]

LISTEN_ACK_S = 5.0
"""How long a subscription waits for a 2026-07-28 server to acknowledge the re-opened listen stream."""
_LIST_PAGE_CAP = 1000
"""Pages followed per list before giving up: a server whose cursor never ends cannot hang startup."""


class UpstreamListener(Protocol):
    """What an `Upstream` tells the gateway."""

    async def catalog_changed(self, server: str, kinds: set[CatalogKind]) -> None: ...

    async def resource_updated(self, server: str, uri: str) -> None: ...

    async def log_message(self, server: str, params: types.LoggingMessageNotificationParams) -> None: ...

    async def client_request(self, server: str, request: types.InputRequest) -> types.InputResponse | types.ErrorData:
        """Forward a server-to-client request (sampling, elicitation, roots) to a connected client."""
        ...

    async def elicitation_complete(self, server: str, elicitation_id: str) -> None:
        """A URL-mode elicitation finished out of band (2025-11-25 `notifications/elicitation/complete`)."""
        ...


@dataclass
class Catalog:
    """What one upstream serves, as last listed."""

    tools: list[types.Tool] = field(default_factory=list)
    resources: list[types.Resource] = field(default_factory=list)
    templates: list[types.ResourceTemplate] = field(default_factory=list)
    prompts: list[types.Prompt] = field(default_factory=list)


class Upstream:
    """A supervised, persistent session to one MCP server.

    Args:
        name: the server's name in `mcpServers`.
        cfg: its config entry.
        listener: receives catalog changes, notifications and server-to-client requests.
        call_timeout_s: default per-request timeout (seconds) when `cfg.timeout_ms` is unset.
        restart_initial_s / restart_max_s / restart_enabled: the backoff policy.
    """

    def __init__(
        self,
        name: str,
        cfg: ServerConfig,
        listener: UpstreamListener,
        *,
        call_timeout_s: float = 60.0,
        restart_initial_s: float = 0.5,
        restart_max_s: float = 30.0,
        restart_enabled: bool = True,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.listener = listener
        self.timeout_s = (cfg.timeout_ms / 1000) if cfg.timeout_ms else call_timeout_s
        self.restart_initial_s = restart_initial_s
        self.restart_max_s = restart_max_s
        self.restart_enabled = restart_enabled
        self.state: State = "idle"
        self.catalog = Catalog()
        self.last_error: str | None = None
        self.restarts = 0
        self.started_at: float | None = None
        self.stderr = StderrTail(name)
        self._session: ClientSession | None = None
        self._modern = False
        self._ready = anyio.Event()
        self._stop = anyio.Event()
        self._closed: anyio.Event | None = None
        self._send_raw: Callable[..., Awaitable[dict[str, Any]]] | None = None
        self._stamp: Callable[[dict[str, Any], Any], None] | None = None
        self._fast: FastChannel | None = None
        self._stamped: StampedMeta | None = None
        self.subscriptions: set[str] = set()
        """Upstream resource URIs some client subscribed to (kept across restarts)."""
        self.replica = 0
        """1-based replica number when this session is one of a `ServerPool`'s replicas (0: none)."""
        self.replicas = 1
        """How many replicas the pool has (errors name "replica 2 of 3" when more than one)."""
        self.protocol = cfg.protocol
        """`auto` or `legacy`: how the next connection negotiates (`use_handshake` switches to legacy)."""
        self.switched: anyio.Event | None = None
        """Set once the first connection attempt after `use_handshake` settled (ready or failed)."""
        self._reconnect = False
        self._relisten = anyio.Event()
        self._listening: frozenset[str] | None = None
        """The resource URIs of the open `subscriptions/listen` stream (None: none is open)."""
        self._listen_opened = anyio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.pid: int | None = None
        """The stdio server's process id while its session is open (None for HTTP/SSE or when down)."""
        self.pid_started: str | None = None
        """That process's starttime at spawn (/proc/<pid>/stat field 22; None: unknown): a process
        with the same pid and another starttime is not ours (the pid was reused)."""
        self.rss_restarts = 0
        """Restarts made by the resource watch at `max_rss_mb` (also counted in `restarts`)."""
        self._recycle: tuple[anyio.Event, str] | None = None
        """While a restart on purpose drains: the session's close event and the reason."""
        self._recycling = False
        self._recycle_note: str | None = None
        """Why the last session was restarted on purpose, quoted to calls it cut off (until the next is ready)."""

    # ---- status -------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """How errors name this server: "MCP server 'time'", or "... (replica 2 of 3)"."""
        if self.replicas > 1:
            return f"MCP server '{self.name}' (replica {self.replica} of {self.replicas})"
        return f"MCP server '{self.name}'"

    @property
    def session(self) -> ClientSession | None:
        return self._session

    @property
    def protocol_version(self) -> str | None:
        return self._session.protocol_version if self._session is not None else None

    @property
    def modern(self) -> bool:
        """True when the session speaks the stateless 2026-07-28 era."""
        return self._modern

    @property
    def capabilities(self) -> types.ServerCapabilities | None:
        return self._session.server_capabilities if self._session is not None else None

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait until the first connection attempt settles; True if the server is ready."""
        with anyio.move_on_after(timeout_s):
            await self._ready.wait()
        return self.state == "ready"

    # ---- supervision --------------------------------------------------------------------
    async def run(self) -> None:
        """Connect, serve until the connection ends, restart with backoff; until `stop()`."""
        backoff = self.restart_initial_s
        while not self._stop.is_set():
            self.state = "starting"
            connected_at = None
            try:
                async with AsyncExitStack() as stack:
                    await self._connect(stack)
                    connected_at = time.monotonic()
                    self.state = "ready"
                    self.last_error = None
                    self._recycle_note = None
                    self._ready.set()
                    self._settle_switch()
                    await self.listener.catalog_changed(self.name, {"tools", "resources", "prompts"})
                    assert self._closed is not None
                    async with anyio.create_task_group() as tg:

                        async def _watch_stop() -> None:
                            await self._stop.wait()
                            tg.cancel_scope.cancel()

                        tg.start_soon(_watch_stop)
                        if self._modern and self._session is not None:
                            tg.start_soon(self._listen_loop, self._session)
                        await self._closed.wait()
                        tg.cancel_scope.cancel()
                    if not self._stop.is_set() and not self._reconnect:
                        self.last_error = "connection closed (the server exited or closed its output)"
            except Exception as exc:  # noqa: BLE001 - any failure of one upstream stays contained here
                self.last_error = _describe(exc) + self._stderr_hint()
                if self._stop.is_set():
                    logger.debug("upstream %r while stopping: %s", self.name, self.last_error)
                else:
                    logger.warning("upstream %r: %s", self.name, self.last_error)
                if not self._reconnect:
                    self._settle_switch()
            finally:
                # A session draining for a restart on purpose (`begin_recycle`, state "starting") was
                # ready: if it ends before `finish_recycle` asked (it crashed), it is a crash like any.
                was_ready = self.state == "ready" or self._recycling
                self._session = None
                self._send_raw = None
                self._fast = None
                self.pid = None
                self.pid_started = None
                self.state = "stopped" if self._stop.is_set() else "down"
                if not (self._recycling and self._reconnect):
                    self._ready.set()  # (a restart on purpose keeps callers waiting for the next session)
            recycled, self._recycling, self._recycle = self._recycling, False, None
            if self._stop.is_set():
                break
            if self._reconnect:
                # A reconnect on purpose (`use_handshake`, or a restart at `max_rss_mb`): no backoff,
                # and the tools stay listed (the new session re-lists them).
                self._reconnect = False
                if recycled:
                    self.restarts += 1
                    self.rss_restarts += 1
                continue
            if was_ready:
                self.catalog = Catalog()
                with contextlib.suppress(Exception):
                    await self.listener.catalog_changed(self.name, {"tools", "resources", "prompts"})
            if not self.restart_enabled:
                break
            if connected_at is not None and time.monotonic() - connected_at > 30:
                backoff = self.restart_initial_s  # it ran a good while: start the backoff over
            self.restarts += 1
            logger.warning("upstream %r down; restarting in %.1f s", self.name, backoff)
            with anyio.move_on_after(backoff):
                await self._stop.wait()
            backoff = min(max(backoff * 2, 0.05), self.restart_max_s)

    async def stop(self) -> None:
        self._stop.set()
        self._settle_switch()
        self._ready.set()  # nobody waits for a session that will not come

    def begin_recycle(self, reason: str) -> bool:
        """Start a restart on purpose (the resource watch's, at `max_rss_mb`): from now on the
        session takes no new requests (`state` "starting"; a pool routes elsewhere or lets callers
        wait for the next session), while requests in flight go on. `finish_recycle` closes it.

        Returns:
            False when there is no ready session to restart.
        """
        if self.state != "ready" or self._closed is None or self._closed.is_set() or self._stop.is_set():
            return False
        self._recycle = (self._closed, reason)
        self._recycling = True
        self._recycle_note = reason
        self._ready = anyio.Event()
        self.state = "starting"
        return True

    def finish_recycle(self) -> None:
        """Close the session `begin_recycle` marked and open a new one at once (no backoff).

        Requests still in flight fail with `UpstreamClosed` naming the server and the reason; they
        are not retried (whether a write ran is unknown). No-op when that session already ended.
        """
        if self._recycle is None:
            return
        closed = self._recycle[0]
        if closed is self._closed and not closed.is_set():
            self._reconnect = True
            closed.set()

    def _settle_switch(self) -> None:
        """A connection attempt after `use_handshake` concluded (or the upstream stops)."""
        if self.switched is not None:
            self.switched.set()

    def use_handshake(self) -> bool:
        """Reconnect with the initialize handshake from now on (for this process's lifetime).

        For a server that answers 2026-07-28 but asks its client with server-initiated requests,
        which that era cannot carry (issue 11, failure 3). The session in use closes at once
        (calls in flight on it fail as on a restart) and a handshake-era one opens without
        backoff. Returns False when this session already uses the handshake.
        """
        if self.protocol == "legacy" and not self._modern:
            return False
        self.protocol = "legacy"
        self.switched = anyio.Event()
        if self._closed is not None and self.state == "ready":
            self._reconnect = True
            self._closed.set()
        return True

    async def _connect(self, stack: AsyncExitStack) -> None:
        self.stderr.lines.clear()
        closed = anyio.Event()
        self._closed = closed
        read_stream, write_stream = await stack.enter_async_context(open_transport(self.name, self.cfg, self.stderr))
        self.pid = getattr(write_stream, "pid", None)
        self.pid_started = process.children.started(self.pid) if self.pid else None
        session = ClientSession(
            _ClosingReadStream(read_stream, closed),
            write_stream,
            sampling_callback=self._on_sampling,  # type: ignore[arg-type]
            elicitation_callback=self._on_elicitation,  # type: ignore[arg-type]
            list_roots_callback=self._on_list_roots,  # type: ignore[arg-type]
            logging_callback=self._on_log,
            message_handler=self._on_message,
            client_info=types.Implementation(name="mcpopt", version="0.1.0"),
        )
        await stack.enter_async_context(session)
        with anyio.fail_after(self.cfg.startup_timeout_ms / 1000):
            if self.protocol == "legacy":
                await session.initialize()
            else:
                await negotiate_auto(session)
            self._session = session
            self._modern = session.protocol_version in MODERN_PROTOCOL_VERSIONS
            # The hot path sends raw JSON-RPC through the session's own dispatcher and stamp,
            # skipping the typed request/result models (see `request`).
            self._send_raw = session._dispatcher.send_raw_request  # noqa: SLF001
            if self._modern:
                # Wrapped on the session itself, so the HTTP side channel's own re-stamp keeps it too.
                session._stamp = keep_client_capabilities(session._stamp)  # noqa: SLF001
            self._stamp = session._stamp  # noqa: SLF001
            fast = getattr(write_stream, "fast", None)
            if fast is not None and hasattr(fast, "bind"):
                fast = fast.bind(session)  # an HTTP side channel learns the negotiated session (or declines)
            if fast is not None and hasattr(fast, "on_log"):
                fast.on_log = self._on_log_raw
            self._fast = fast
            self.started_at = time.time()
            await self._refresh({"tools", "resources", "prompts"})
            if not self._modern:
                for uri in sorted(self.subscriptions):  # a restarted server forgot them
                    with contextlib.suppress(Exception):
                        await self.request("resources/subscribe", {"uri": uri})

    def _stderr_hint(self) -> str:
        tail = self.stderr.text().strip()
        if not tail:
            return ""
        last = tail.splitlines()[-3:]
        return " | stderr: " + " / ".join(line.strip()[:200] for line in last)

    # ---- catalog ------------------------------------------------------------------------
    async def _refresh(self, kinds: set[CatalogKind]) -> None:
        session = self._session
        if session is None:
            return
        caps = session.server_capabilities or types.ServerCapabilities()
        if "tools" in kinds:
            self.catalog.tools = (
                await _all_pages(lambda c: session.list_tools(params=_page(c)), "tools") if caps.tools else []
            )
        if "resources" in kinds:
            if caps.resources:
                self.catalog.resources = await _all_pages(
                    lambda c: session.list_resources(params=_page(c)), "resources"
                )
                self.catalog.templates = await _all_pages(
                    lambda c: session.list_resource_templates(params=_page(c)), "resource_templates"
                )
            else:
                self.catalog.resources, self.catalog.templates = [], []
        if "prompts" in kinds:
            self.catalog.prompts = (
                await _all_pages(lambda c: session.list_prompts(params=_page(c)), "prompts") if caps.prompts else []
            )

    async def refresh(self, kinds: set[CatalogKind]) -> None:
        """Re-list `kinds` from the server and tell the listener (after a list_changed)."""
        try:
            await self._refresh(kinds)
        except Exception as exc:  # noqa: BLE001
            logger.warning("upstream %r: re-listing %s failed: %s", self.name, sorted(kinds), _describe(exc))
            return
        await self.listener.catalog_changed(self.name, kinds)

    # ---- requests -----------------------------------------------------------------------
    def _require(self) -> ClientSession:
        session = self._session
        if session is None or self.state != "ready":
            why = f": {self.last_error}" if self.last_error else ""
            raise UpstreamUnavailable(f"{self.label} is unavailable ({self.state}){why}", server=self.name)
        return session

    def request(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        *,
        timeout_s: float | None = None,
        on_progress: ProgressFn | None = None,
    ) -> Awaitable[dict[str, Any]]:
        """Send one request as raw JSON-RPC params; the awaitable of the raw result dict.

        This is the forwarding hot path: nothing is re-validated that is only passed on. On a stdio
        side channel it returns the channel's own coroutine (no frame of this method in the call's
        stack), the channel translating its failures with `_fail`. Callers await it at once (an
        unavailable server raises on the call itself).

        A `_meta` `io.modelcontextprotocol/clientCapabilities` in `params` is the calling client's
        own: a 2026-07-28 server gets it in place of the session's (so it asks only for what that
        client can answer, and refuses with -32021 what it needs and the client lacks); a
        handshake-era server, whose capabilities were fixed at `initialize`, does not see it.

        Raises:
            UpstreamUnavailable: the server is not connected.
            UpstreamTimeout: no answer within `timeout_s` (default: the server's timeout).
            UpstreamClosed: the connection closed while waiting (crash, kill).
            MCPError: the server answered with a JSON-RPC error (passed on as it is).
        """
        self._require()
        send, stamp = self._send_raw, self._stamp
        assert send is not None and stamp is not None
        timeout = timeout_s or self.timeout_s
        fast = self._fast
        out: Mapping[str, Any]
        if fast is not None and not self._modern:
            # A handshake-era session's stamp only sets HTTP headers the side channel sets itself:
            # the params go as they are (no copy), unless they carry a 2026-07-28 client's
            # capabilities, which are not this era's to send.
            out = params or {}
            meta = out.get("_meta")
            if isinstance(meta, dict) and CLIENT_CAPABILITIES_META_KEY in meta:
                out = {**out, "_meta": {k: v for k, v in meta.items() if k != CLIENT_CAPABILITIES_META_KEY}}
        elif type(fast) is FastChannel and method not in TASK_ROUTED_METHODS:
            # 2026-07-28 on a stdio side channel: the stamp's `_meta` keys, without its HTTP headers (a
            # pipe sends none; the HTTP side channel stamps its own below).
            stamped = self._stamped
            if stamped is None or stamped.stamp is not stamp:
                stamped = self._stamped = StampedMeta(stamp)
            out = stamped.merge(params)
        else:
            data: dict[str, Any] = {"method": method, "params": dict(params) if params else {}}
            meta = data["params"].get("_meta")
            if isinstance(meta, dict):
                meta = data["params"]["_meta"] = dict(meta)  # the stamp writes into it: never the caller's
                if not self._modern:
                    meta.pop(CLIENT_CAPABILITIES_META_KEY, None)
            opts: dict[str, Any] = {"timeout": timeout}
            stamp(data, opts)  # the era's envelope: 2026-07-28 `_meta` keys, or nothing
            if fast is None:
                if on_progress is not None:
                    opts["on_progress"] = on_progress
                return self._via_session(send, method, data["params"] or None, opts, timeout)
            out = data["params"]
        if type(fast) is FastChannel:
            return fast.request(method, out, timeout, on_progress, self._fail)
        return self._via_channel(fast, method, out, timeout, on_progress)

    async def _via_channel(
        self, fast: Any, method: str, params: Mapping[str, Any], timeout: float, on_progress: ProgressFn | None
    ) -> dict[str, Any]:
        """A side channel without a failure hook (HTTP): its failures translated here."""
        try:
            return await fast.request(method, params, timeout, on_progress)
        except (MCPError, TimeoutError, ChannelClosed) as exc:
            raise self._fail(exc, method, timeout) from None

    async def _via_session(
        self, send: Callable[..., Awaitable[dict[str, Any]]], method: str, params: Any, opts: Any, timeout: float
    ) -> dict[str, Any]:
        try:
            return await send(method, params, opts)
        except MCPError as exc:
            raise self._translate(exc, method, timeout) from None

    def _fail(self, exc: Exception, method: str, timeout_s: float) -> Exception:
        """What a side channel's failure means for the gateway: a JSON-RPC error the server sent
        (`_cut_off`), an `UpstreamTimeout` for `TimeoutError`, an `UpstreamClosed` for `ChannelClosed`."""
        if isinstance(exc, MCPError):
            return self._cut_off(exc, method, timeout_s)
        if isinstance(exc, TimeoutError):
            return self._translate(MCPError(code=REQUEST_TIMEOUT, message="timeout"), method, timeout_s)
        return self._translate(MCPError(code=CONNECTION_CLOSED, message="closed"), method, timeout_s)

    async def call(self, call: Any) -> dict[str, Any]:
        """Send a pipeline `ToolCall` (the single-replica terminal; `ServerPool` routes replicas)."""
        return await self.request("tools/call", call.params, on_progress=call.on_progress)

    def _cut_off(self, exc: MCPError, method: str, timeout_s: float) -> Exception:
        """A JSON-RPC error the server itself sent: passed on as it is, except the "Connection closed"
        an SDK server answers its requests in flight with when its stdin closes during a restart on
        purpose (`begin_recycle`), which is the gateway's doing and says so."""
        if exc.code == CONNECTION_CLOSED and self._recycle_note:
            return self._translate(exc, method, timeout_s)
        return exc

    def _translate(self, exc: MCPError, method: str, timeout_s: float) -> Exception:
        if exc.code == REQUEST_TIMEOUT:
            return UpstreamTimeout(f"{self.label} did not answer {method} within {timeout_s:g} s", server=self.name)
        if exc.code == CONNECTION_CLOSED and self._recycle_note:
            cut = UpstreamClosed(
                f"{self.label} was restarted by mcpopt during {method} ({self._recycle_note}); the call was cut "
                "off and not retried (whether it took effect is unknown)",
                server=self.name,
            )
            cut.restarted = True  # the gateway's doing: the replica's circuit breaker does not count it
            return cut
        if exc.code == CONNECTION_CLOSED:
            return UpstreamClosed(
                f"{self.label} closed the connection during {method} (it crashed or was stopped)",
                server=self.name,
            )
        return exc

    # ---- subscriptions ------------------------------------------------------------------
    async def subscribe(self, uri: str) -> None:
        """Subscribe to updates of an upstream resource (`resources/subscribe`, or listen).

        On a 2026-07-28 session the listen stream is re-opened with the new URI set, and this
        returns once the server acknowledged it (at most `LISTEN_ACK_S` later): an update right
        after the subscription must not be lost in between.
        """
        self.subscriptions.add(uri)
        if not self._modern:
            await self.request("resources/subscribe", {"uri": uri})
            return
        self._relisten.set()
        with anyio.move_on_after(LISTEN_ACK_S):
            while self._listening is not None and uri not in self._listening:
                await self._listen_opened.wait()

    async def unsubscribe(self, uri: str) -> None:
        self.subscriptions.discard(uri)
        if self._modern:
            self._relisten.set()
        else:
            await self.request("resources/unsubscribe", {"uri": uri})

    async def _listen_loop(self, session: ClientSession) -> None:
        """2026-07-28 servers announce changes only on `subscriptions/listen` (SEP-2575).

        One stream per upstream carries list_changed for tools, prompts and resources, plus
        the subscribed resource URIs; it is re-opened when that set changes.
        """

        caps = session.server_capabilities or types.ServerCapabilities()
        wants_lists = bool(
            (caps.tools and caps.tools.list_changed)
            or (caps.prompts and caps.prompts.list_changed)
            or (caps.resources and (caps.resources.list_changed or caps.resources.subscribe))
        )
        if not wants_lists:
            return
        self._listening = frozenset()
        try:
            await self._listen_forever(session, caps)
        finally:
            self._listening = None
            self._listen_opened.set()
            self._listen_opened = anyio.Event()

    async def _listen_forever(self, session: ClientSession, caps: types.ServerCapabilities) -> None:
        from mcp.client.subscriptions import ResourceUpdated, listen
        from mcp.shared.subscriptions import PromptsListChanged, ResourcesListChanged, ToolsListChanged

        while True:
            self._relisten = anyio.Event()
            relisten = self._relisten
            try:
                async with listen(
                    session,
                    tools_list_changed=bool(caps.tools and caps.tools.list_changed),
                    prompts_list_changed=bool(caps.prompts and caps.prompts.list_changed),
                    resources_list_changed=bool(caps.resources and caps.resources.list_changed),
                    resource_subscriptions=sorted(self.subscriptions),
                ) as subscription:
                    self._listening = frozenset(self.subscriptions)
                    self._listen_opened.set()
                    self._listen_opened = anyio.Event()
                    async with anyio.create_task_group() as tg:

                        async def _restart(event: anyio.Event) -> None:
                            await event.wait()
                            tg.cancel_scope.cancel()

                        tg.start_soon(_restart, relisten)
                        async for event in subscription:
                            if isinstance(event, ToolsListChanged):
                                await self._spawn_refresh({"tools"})
                            elif isinstance(event, PromptsListChanged):
                                await self._spawn_refresh({"prompts"})
                            elif isinstance(event, ResourcesListChanged):
                                await self._spawn_refresh({"resources"})
                            elif isinstance(event, ResourceUpdated):
                                await self.listener.resource_updated(self.name, event.uri)
                        tg.cancel_scope.cancel()
                if not relisten.is_set():
                    return  # the server closed the stream gracefully
            except Exception as exc:  # noqa: BLE001 - a failed listen must not take the session down
                logger.info("upstream %r: subscriptions/listen ended: %s", self.name, _describe(exc))
                return

    # ---- callbacks from the server ------------------------------------------------------
    async def _on_sampling(
        self, ctx: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult | types.CreateMessageResultWithTools | types.ErrorData:
        result = await self.listener.client_request(self.name, types.CreateMessageRequest(params=params))
        return result  # type: ignore[return-value]

    async def _on_elicitation(
        self, ctx: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult | types.ErrorData:
        result = await self.listener.client_request(self.name, types.ElicitRequest(params=params))
        return result  # type: ignore[return-value]

    async def _on_list_roots(self, ctx: ClientRequestContext) -> types.ListRootsResult | types.ErrorData:
        result = await self.listener.client_request(self.name, types.ListRootsRequest())
        return result  # type: ignore[return-value]

    async def _on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        await self.listener.log_message(self.name, params)

    async def _on_log_raw(self, params: Any) -> None:
        """A log message the fast channel took off the wire (raw params)."""
        try:
            parsed = types.LoggingMessageNotificationParams.model_validate(params or {}, by_name=False)
        except ValueError:
            logger.debug("upstream %r: invalid log message %.200r", self.name, params)
            return
        await self.listener.log_message(self.name, parsed)

    async def _on_message(self, message: Any) -> None:
        if isinstance(message, Exception):
            logger.debug("upstream %r transport error: %s", self.name, message)
            return
        root = getattr(message, "root", message)
        if isinstance(root, types.ToolListChangedNotification):
            await self._spawn_refresh({"tools"})
        elif isinstance(root, types.ResourceListChangedNotification):
            await self._spawn_refresh({"resources"})
        elif isinstance(root, types.PromptListChangedNotification):
            await self._spawn_refresh({"prompts"})
        elif isinstance(root, types.ResourceUpdatedNotification):
            await self.listener.resource_updated(self.name, str(root.params.uri))
        elif isinstance(root, types.ElicitCompleteNotification):
            await self.listener.elicitation_complete(self.name, root.params.elicitation_id)

    async def _spawn_refresh(self, kinds: set[CatalogKind]) -> None:
        # Re-listing is a request to the same server: it must not run inside the dispatcher's
        # notification callback, or it would wait on the loop that delivers its own answer.
        task = asyncio.get_running_loop().create_task(self.refresh(kinds))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _ClosingReadStream:
    """Wraps a transport's read stream and sets `closed` when it ends (EOF, crash, close)."""

    def __init__(self, inner: Any, closed: anyio.Event) -> None:
        self._inner = inner
        self._closed = closed

    async def receive(self) -> Any:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._closed.set()
            raise

    def __aiter__(self) -> _ClosingReadStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self._closed.set()
        await self._inner.aclose()

    def close(self) -> None:
        self._closed.set()
        self._inner.close()

    async def __aenter__(self) -> _ClosingReadStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


TASK_ROUTED_METHODS = frozenset({"tasks/get", "tasks/update", "tasks/cancel"})
"""Tasks-extension methods whose `Mcp-Name` header carries `params.taskId` (SEP-2663)."""


def keep_client_capabilities(stamp: Callable[[dict[str, Any], Any], None]) -> Callable[[dict[str, Any], Any], None]:
    """Wrap a 2026-07-28 session stamp so that a request already carrying the calling client's
    `clientCapabilities` keeps them (the stamp writes the gateway's own); otherwise unchanged.
    It also sets the `Mcp-Name` routing header of the tasks extension's methods (`params.taskId`,
    SEP-2663), which the SDK's stamp knows only for the core methods (on stdio, headers are unused).

    The gateway forwards a client's request on its own session, but the capabilities that
    matter upstream are the client's: SEP-2575 makes them per request, and a server MUST NOT
    rely on capabilities the client has not declared (2026-07-28, basic/lifecycle).
    """

    def stamped(data: dict[str, Any], opts: Any) -> None:
        params = data.get("params")
        meta = params.get("_meta") if isinstance(params, dict) else None
        caps = meta.get(CLIENT_CAPABILITIES_META_KEY) if isinstance(meta, dict) else None
        stamp(data, opts)
        if isinstance(caps, dict):
            data["params"]["_meta"][CLIENT_CAPABILITIES_META_KEY] = caps
        if data.get("method") in TASK_ROUTED_METHODS and isinstance(params, dict):
            task_id = params.get("taskId")
            if isinstance(task_id, str):
                opts.setdefault("headers", {})[MCP_NAME_HEADER] = encode_header_value(task_id)

    return stamped


def _page(cursor: str | None) -> types.PaginatedRequestParams | None:
    return types.PaginatedRequestParams(cursor=cursor) if cursor else None


async def _all_pages(fetch: Callable[[str | None], Awaitable[Any]], attr: str) -> list[Any]:
    """Every item of a paginated list. A server that declares the capability but answers the
    method with METHOD_NOT_FOUND (e.g. mcp-server-sqlite on resources/templates/list) has none."""
    items: list[Any] = []
    cursor: str | None = None
    for _ in range(_LIST_PAGE_CAP):
        try:
            result = await fetch(cursor)
        except MCPError as exc:
            if exc.error.code == METHOD_NOT_FOUND and cursor is None:
                return []
            raise
        items.extend(getattr(result, attr))
        cursor = result.next_cursor
        if not cursor:
            break
    return items


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exc.exceptions if not isinstance(e, anyio.get_cancelled_exc_class())]
        if leaves:
            return _describe(leaves[0])
    if isinstance(exc, GatewayError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the server's handshake (startup_timeout_ms)"
    if isinstance(exc, FileNotFoundError):
        return f"command not found: {exc.filename or exc}"
    if isinstance(exc, PermissionError):
        return f"command not executable: {exc.filename or exc}"
    if isinstance(exc, MCPError):
        if exc.code == CONNECTION_CLOSED:
            return "connection closed during the handshake (the server exited)"
        return f"error {exc.code}: {exc}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"
