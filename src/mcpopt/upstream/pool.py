"""N replicas of one upstream MCP server behind one name: routing, breakers, retries, limits.

`ServerPool` stands where the gateway used to hold one `Upstream`: it has the same attributes
and methods (`state`, `catalog`, `capabilities`, `modern`, `protocol_version`, `last_error`,
`restarts`, `subscriptions`, `run`, `stop`, `wait_ready`, `request`, `call`, `subscribe`,
`unsubscribe`, `refresh`), with one supervised `Upstream` per replica inside:

* `replicas: 3` starts three copies of a stdio command; `urls: [...]` connects to each HTTP
  replica. A pool of one replica behaves like a plain `Upstream` (plus the limits below).
* Every call goes: concurrency limit (`max_concurrency`, bounded queue `max_queue`) -> route
  (`routing.strategy`, sticky tools) -> circuit breaker (per replica) -> adaptive timeout ->
  retry with failover, but only when repeating is safe (see `routing.may_retry`).
* The gateway's catalog follows the *primary* replica (the first ready one): a non-primary
  replica restarting does not make the gateway's lists flap.
* `lazy: true` starts the replicas on the first call (or `ensure_started()`); with
  `idle_timeout_ms` they stop after that long without calls (state "idle", the last catalog
  kept) and start again on the next call.
* Active health checks (`health_check.interval_ms`): `ping` on handshake-era sessions,
  `server/discover` on 2026-07-28 ones, each bounded by `health_check.timeout_ms`; failures
  feed the replica's breaker like failed calls.
* Pinning (the hook fan-out to every replica uses): a call whose `_meta` holds
  `"mcpopt/replica": k` goes to replica k (1-based) and nowhere else -- no routing, no failover
  (a retry, when safe, goes to the same replica) -- and the key is taken out before the call is
  sent. A replica that is not ready, or whose breaker is open, fails the call with
  `UpstreamUnavailable` naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Mapping
from typing import Any

import anyio
import httpx2 as httpx
import mcp_types as types
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, INVALID_PARAMS

from mcpopt.config import ServerConfig
from mcpopt.errors import GATEWAY_REJECTED, GatewayError, UpstreamClosed, UpstreamTimeout, UpstreamUnavailable
from mcpopt.upstream.routing import (
    SAFE_METHODS,
    AdaptiveTimeouts,
    CircuitBreaker,
    NoReplicaAvailable,
    Replica,
    Router,
    backoff_s,
    may_retry,
)
from mcpopt.upstream.server import Catalog, CatalogKind, ProgressFn, State, Upstream, UpstreamListener

logger = logging.getLogger(__name__)

_ALL_KINDS: frozenset[CatalogKind] = frozenset({"tools", "resources", "prompts"})
PIN_META_KEY = "mcpopt/replica"
"""`_meta` key pinning a tools/call to one replica (1-based); see the module doc."""
_BROADCAST = frozenset({"logging/setLevel"})
"""Methods sent to every ready replica (session settings every replica must share)."""


class ServerPool:
    """The replicas of one server, used by the gateway as if they were one `Upstream`.

    Args:
        name: the server's name in `mcpServers`.
        cfg: its config entry (`replicas` / `urls`, `routing`, `breaker`, `retry`,
            `adaptive_timeout`, `max_concurrency`, `max_queue`, `health_check`, `lazy`,
            `idle_timeout_ms`).
        listener: the gateway (catalog changes, notifications, server-to-client requests).
        call_timeout_s, restart_initial_s, restart_max_s, restart_enabled: passed to each
            replica's `Upstream` (seconds).
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
        self._upstream_kwargs: dict[str, Any] = {
            "call_timeout_s": call_timeout_s,
            "restart_initial_s": restart_initial_s,
            "restart_max_s": restart_max_s,
            "restart_enabled": restart_enabled,
        }
        self._cfgs = cfg.replica_configs()
        self.replicas: list[Replica] = [Replica(i, None, CircuitBreaker(cfg.breaker)) for i in range(len(self._cfgs))]
        self.router = Router(
            cfg.routing.strategy, weights=cfg.routing.weights or None, sticky_tools=cfg.routing.sticky_tools
        )
        self.timeouts = AdaptiveTimeouts(cfg.adaptive_timeout) if cfg.adaptive_timeout.enabled else None
        self.subscriptions: set[str] = set()
        """Upstream resource URIs some client subscribed to; held on one replica (`_sub_up`)."""
        self._sub_up: Upstream | None = None
        self._live = not cfg.lazy
        """Replicas are (to be) running: False while lazy-unstarted or idle."""
        self._gen_started = False
        self._new_generation()
        self._start = anyio.Event()
        if self._live:
            self._start.set()
        self._stopping = anyio.Event()
        self._stopped = False
        self._any_ready = False
        self._primary_was: Upstream | None = None
        self._snapshot: tuple[list[Any], ...] | None = None
        self._kept = Catalog()
        self._meta: tuple[types.ServerCapabilities | None, bool, str | None] = (None, False, None)
        self._active = 0
        self._last_activity = time.monotonic()
        self._sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        self._waiting = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- replicas -----------------------------------------------------------------------
    def _new_generation(self) -> None:
        """Fresh `Upstream` objects for every replica (an `Upstream` cannot run again once stopped)."""
        n = len(self._cfgs)
        for i, rcfg in enumerate(self._cfgs):
            relay = _ReplicaListener(self, i)
            up = Upstream(self.name, rcfg, relay, **self._upstream_kwargs)
            up.replica, up.replicas = i + 1, n
            old = self.replicas[i].target
            if old is not None:
                up.restarts = old.restarts
                up.rss_restarts = old.rss_restarts
            relay.up = up
            self.replicas[i].target = up
        self._gen_started = False

    @property
    def upstreams(self) -> list[Upstream]:
        """The current `Upstream` of each replica, in replica order."""
        return [r.target for r in self.replicas]

    def _primary(self) -> Upstream | None:
        for r in self.replicas:
            if r.target.state == "ready":
                return r.target
        return None

    # ---- what the gateway reads ---------------------------------------------------------
    @property
    def lazy(self) -> bool:
        """True when the replicas start on first use (`lazy: true`) rather than at gateway start."""
        return self.cfg.lazy

    @property
    def state(self) -> State:
        """ready (any replica ready), starting, down, idle (lazy-unstarted or stopped when idle), stopped."""
        if self._stopped:
            return "stopped"
        if not self._live:
            return "idle"
        states = [r.target.state for r in self.replicas]
        if "ready" in states:
            return "ready"
        if "starting" in states or "idle" in states:
            return "starting"
        return "down"

    @property
    def catalog(self) -> Catalog:
        """The primary replica's lists; when idle, the last ones seen; else empty."""
        primary = self._primary()
        if primary is not None:
            return primary.catalog
        return self._kept if not self._live and not self._stopped else Catalog()

    @property
    def capabilities(self) -> types.ServerCapabilities | None:
        """The primary replica's capabilities (the last ones seen when none is ready)."""
        primary = self._primary()
        return primary.capabilities if primary is not None else self._meta[0]

    @property
    def modern(self) -> bool:
        """True when the (primary) session speaks the stateless 2026-07-28 era."""
        primary = self._primary()
        return primary.modern if primary is not None else self._meta[1]

    @property
    def protocol_version(self) -> str | None:
        """The primary replica's negotiated protocol version (the last one seen when none is ready)."""
        primary = self._primary()
        return primary.protocol_version if primary is not None else self._meta[2]

    @property
    def last_error(self) -> str | None:
        """The last failure: the replica's own with one replica, else "replica k of n: ..." of those not ready."""
        if len(self.replicas) == 1:
            return self.replicas[0].target.last_error
        n = len(self.replicas)
        parts = [
            f"replica {r.index + 1} of {n}: {r.target.last_error}"
            for r in self.replicas
            if r.target.state != "ready" and r.target.last_error
        ]
        return "; ".join(parts) or None

    @property
    def busy(self) -> int:
        """Requests in flight or waiting for a slot now."""
        return self._active + self._waiting

    @property
    def last_activity(self) -> float:
        """`time.monotonic()` of the last request's start or end."""
        return self._last_activity

    @property
    def restarts(self) -> int:
        """Restarts of all replicas together."""
        return sum(r.target.restarts for r in self.replicas)

    async def relist(self, kinds: set[CatalogKind]) -> None:
        """Re-list `kinds` from the primary replica (another gateway replica heard its `list_changed`);
        the listener hears of it as of a list_changed of its own. No-op when no replica is ready."""
        primary = self._primary()
        if primary is not None:
            await primary.refresh(kinds)

    def replica_urls(self) -> list[str | None]:
        """Per replica, its URL when it is an HTTP / SSE server (the same server for every gateway
        replica configured with it), else None (a stdio child is each gateway's own process)."""
        return [c.url if c.url and c.kind in ("http", "sse") else None for c in self._cfgs]

    def stats(self) -> list[dict[str, Any]]:
        """One row per replica for status pages.

        Returns:
            `[{replica (1-based), state, inflight, calls, failures, ewma_ms (float | None),
            breaker ("closed" | "open" | "half_open"), last_error (str | None)}, ...]`.
        """
        return [
            {
                "replica": r.index + 1,
                "state": r.target.state,
                "inflight": r.inflight,
                "calls": r.calls,
                "failures": r.failures,
                "ewma_ms": round(r.ewma_ms, 3) if r.ewma_ms is not None else None,
                "breaker": r.breaker.state,
                "last_error": r.last_error or r.target.last_error,
            }
            for r in self.replicas
        ]

    # ---- lifecycle ----------------------------------------------------------------------
    async def run(self) -> None:
        """Supervise every replica in parallel (each restarts on its own), until `stop()`.

        A lazy pool waits here for `ensure_started()`; with `idle_timeout_ms` the replicas stop
        after that long without calls and a new set starts on the next call.
        """
        try:
            async with anyio.create_task_group() as tg:
                if self.cfg.health_check.interval_ms > 0:
                    tg.start_soon(self._health_loop)
                while not self._stopping.is_set():
                    await self._start.wait()
                    if self._stopping.is_set():
                        break
                    self._start = anyio.Event()
                    ups = self.upstreams
                    self._gen_started = True
                    async with anyio.create_task_group() as gen:
                        for up in ups:
                            gen.start_soon(up.run)
                        if self.cfg.idle_timeout_ms > 0:
                            gen.start_soon(self._idle_watch, ups)
                tg.cancel_scope.cancel()
        finally:
            self._stopped = True

    async def stop(self) -> None:
        """Stop every replica; `run()` returns once they have shut down."""
        self._stopped = True
        self._stopping.set()
        self._start.set()
        for r in self.replicas:
            await r.target.stop()

    async def recycle(self, index: int, reason: str, drain_s: float) -> bool:
        """Restart replica `index` (0-based) gracefully: it takes no new calls (other replicas do,
        or callers wait for its next session), its calls in flight get up to `drain_s` seconds to
        finish, then its session closes and a new one starts at once. Calls still in flight then fail
        with `UpstreamClosed` naming the server and `reason`, and are not retried (never doubled).

        Returns:
            False when the replica had no ready session to restart.
        """
        r = self.replicas[index]
        up = r.target
        if not up.begin_recycle(reason):
            return False
        try:
            with anyio.move_on_after(drain_s):
                while r.inflight > 0 and r.target is up:
                    await anyio.sleep(0.05)  # (inflight is a plain counter: polled, bounded by drain_s)
        finally:
            up.finish_recycle()  # also when cancelled: a replica must never stay out of rotation
        return True

    async def use_handshake(self) -> bool:
        """Reconnect every replica with the initialize handshake (see `Upstream.use_handshake`) and
        wait (up to `startup_timeout_ms`) for one to be ready again.

        Returns:
            True when a replica is ready and speaks the handshake era.
        """
        ups = [r.target for r in self.replicas if r.target.use_handshake()]
        with anyio.move_on_after(self.cfg.startup_timeout_ms / 1000):
            async with anyio.create_task_group() as tg:
                for up in ups:
                    if up.switched is not None:
                        tg.start_soon(up.switched.wait)
        return self.state == "ready" and not self.modern

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait until every replica's first connection attempt settled (up to `timeout_s`
        seconds, in parallel); True if some replica is ready. A lazy, unstarted pool returns
        False at once."""
        if not self._live:
            return False
        async with anyio.create_task_group() as tg:
            for up in self.upstreams:
                tg.start_soon(up.wait_ready, timeout_s)
        return self.state == "ready"

    async def ensure_started(self, wait: bool = True) -> bool:
        """Start the replicas of a lazy or idle pool (no-op when running).

        Args:
            wait: also wait (up to `startup_timeout_ms`) until a replica is ready.

        Returns:
            True if a replica is ready.
        """
        if self._stopping.is_set():
            return False
        if not self._live:
            self._live = True
            self._last_activity = time.monotonic()
            if self._gen_started:
                self._new_generation()
            self._start.set()
            logger.info("MCP server %r: starting %d replica(s) on demand", self.name, len(self.replicas))
        if wait:
            return await self._await_any_ready(self.cfg.startup_timeout_ms / 1000)
        return self.state == "ready"

    async def _await_any_ready(self, timeout_s: float) -> bool:
        ups = self.upstreams
        if any(up.state == "ready" for up in ups):
            return True
        found = False
        with anyio.move_on_after(timeout_s):
            async with anyio.create_task_group() as tg:

                async def one(up: Upstream) -> None:
                    nonlocal found
                    if await up.wait_ready(timeout_s):
                        found = True
                        tg.cancel_scope.cancel()

                for up in ups:
                    tg.start_soon(one, up)
        return found or any(up.state == "ready" for up in self.upstreams)

    async def _idle_watch(self, ups: list[Upstream]) -> None:
        """Stop this generation of replicas after `idle_timeout_ms` without calls."""
        idle_s = self.cfg.idle_timeout_ms / 1000
        while True:
            wait = idle_s
            if self._active == 0:
                wait = self._last_activity + idle_s - time.monotonic()
                if wait <= 0:
                    break
            with anyio.move_on_after(wait):
                await self._stopping.wait()
            if self._stopping.is_set():
                return
        primary = self._primary()
        if primary is not None:
            self._kept = primary.catalog
        self._live = False
        logger.info("MCP server %r: idle for %g s, stopping its replicas", self.name, idle_s)
        for up in ups:
            await up.stop()

    async def _health_loop(self) -> None:
        interval = self.cfg.health_check.interval_ms / 1000
        while True:
            await anyio.sleep(interval)
            async with anyio.create_task_group() as tg:
                for r in self.replicas:
                    if r.target.state == "ready":
                        tg.start_soon(self.check_health, r)

    async def check_health(self, r: Replica) -> bool:
        """One active health check of replica `r`, fed to its breaker.

        A handshake-era session gets `ping`; a 2026-07-28 one (which has no ping) gets
        `server/discover`, as the SDK's `ClientSession.send_ping` / `send_discover` send them,
        within `health_check.timeout_ms`. Any answer, even a JSON-RPC error, is healthy.

        Returns:
            True if the replica answered in time.
        """
        up = r.target
        session = up.session
        if session is None:
            return False
        timeout_s = self.cfg.health_check.timeout_ms / 1000
        try:
            with anyio.fail_after(timeout_s):
                if up.modern and up.protocol_version:
                    await session.send_discover(up.protocol_version)
                else:
                    await session.send_ping()
        except TimeoutError:
            error = f"{up.label} did not answer its health check within {timeout_s:g} s"
        except MCPError as exc:
            if exc.code != CONNECTION_CLOSED:
                r.breaker.record_success()
                return True
            error = f"{up.label} closed the connection during its health check"
        except Exception as exc:  # noqa: BLE001 - a failed check is a verdict, not a crash
            error = f"{up.label} failed its health check: {type(exc).__name__}: {exc}"
        else:
            r.breaker.record_success()
            return True
        if r.target is up:
            r.breaker.record_failure()
            r.last_error = error
            logger.info("%s", error)
        return False

    # ---- catalog events from the replicas -----------------------------------------------
    async def _on_catalog(self, index: int, up: Upstream, kinds: set[CatalogKind]) -> None:
        """A replica (re)connected, went down, or re-listed: tell the gateway only what it sees."""
        if self.replicas[index].target is not up:
            return  # an old generation's replica
        if up.state == "ready" and kinds == _ALL_KINDS:
            self.replicas[index].breaker.reset()  # a fresh session: judge it afresh
        primary = self._primary()
        any_ready = primary is not None
        forward: set[CatalogKind] = set()
        if any_ready != self._any_ready:
            forward = set(_ALL_KINDS)
        elif primary is not None:
            forward = _changed_kinds(self._snapshot, primary.catalog)
            if primary is up and self._primary_was is up:
                forward |= kinds  # the primary itself re-listed (list_changed): pass it on
        self._any_ready = any_ready
        self._primary_was = primary
        if primary is not None:
            self._snapshot = _snap(primary.catalog)
            self._kept = primary.catalog
            self._meta = (primary.capabilities, primary.modern, primary.protocol_version)
            if self.subscriptions and self._live_sub() is None:
                self._retarget_subscriptions(primary)
                self._spawn(self._subscribe_all(primary))
        if forward:
            await self.listener.catalog_changed(self.name, forward)

    def _live_sub(self) -> Upstream | None:
        sub = self._sub_up
        if sub is None or sub.state != "ready" or all(r.target is not sub for r in self.replicas):
            return None
        return sub

    def _retarget_subscriptions(self, to: Upstream) -> None:
        """Hold the subscriptions on `to` from now on (the old holder must not re-subscribe)."""
        old, self._sub_up = self._sub_up, to
        if old is not None and old is not to:
            old.subscriptions.clear()

    async def _subscribe_all(self, to: Upstream, skip: str | None = None) -> None:
        for uri in sorted(self.subscriptions - {skip}):
            with contextlib.suppress(Exception):
                await to.subscribe(uri)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def refresh(self, kinds: set[CatalogKind]) -> None:
        """Re-list `kinds` from the primary replica."""
        primary = self._primary()
        if primary is not None:
            await primary.refresh(kinds)

    # ---- subscriptions ------------------------------------------------------------------
    async def subscribe(self, uri: str) -> None:
        """Subscribe to an upstream resource on one replica (moved if that replica goes away).

        Raises:
            UpstreamUnavailable: no replica is ready.
        """
        self.subscriptions.add(uri)
        if not self._live:
            await self.ensure_started()
        up = self._live_sub() or self._primary()
        if up is None:
            raise self._no_replica("resources/subscribe")
        if up is not self._sub_up:
            self._retarget_subscriptions(up)
            await self._subscribe_all(up, skip=uri)
        await up.subscribe(uri)

    async def unsubscribe(self, uri: str) -> None:
        """Drop a subscription (on the replica holding the subscriptions, if it is up)."""
        self.subscriptions.discard(uri)
        up = self._live_sub()
        if up is not None:
            await up.unsubscribe(uri)

    # ---- calls --------------------------------------------------------------------------
    def call(self, call: Any) -> Awaitable[dict[str, Any]]:
        """Forward a pipeline `ToolCall` to a replica (the pipeline's terminal); returns the awaitable
        of the call itself (no coroutine of its own wrapping it: one frame less per call).

        Retried (on another replica when there is one) only when safe: `call.info.read_only`
        or `call.info.idempotent`, or a failure that proves the call never reached a server.
        Sticky tools route by `call.session_id`, else `call.partition`.

        Raises:
            GatewayError: code GATEWAY_REJECTED when `max_concurrency` calls are in flight and
                `max_queue` more are waiting.
            UpstreamUnavailable: no replica could take the call (naming each replica's state).
            UpstreamClosed / UpstreamTimeout: the replica failed the call (naming it) and the
                call was not safe to repeat, or every attempt failed.
            MCPError: the server's own JSON-RPC error, passed on as it is.
        """
        params = call.params
        meta = params.get("_meta")
        pin = None
        if meta and PIN_META_KEY in meta:
            params, pin = self._unpin(params, meta)
        info = call.info
        return self._invoke(
            "tools/call",
            params,
            call.on_progress,
            call.tool,
            bool(info.read_only or info.idempotent),
            call.session_id or call.partition,
            None,
            call.attrs,
            pin,
        )

    def _unpin(self, params: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        """Params without the pin key, and the 0-based replica index it names.

        Raises:
            GatewayError: INVALID_PARAMS when the value is not a replica of this server.
        """
        value = meta[PIN_META_KEY]
        n = len(self.replicas)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= n:
            raise GatewayError(
                f"_meta[{PIN_META_KEY!r}]: MCP server '{self.name}' has replicas 1..{n} (got {value!r})",
                server=self.name,
                code=INVALID_PARAMS,
            )
        rest = {k: v for k, v in meta.items() if k != PIN_META_KEY}
        out = dict(params)
        if rest:
            out["_meta"] = rest
        else:
            out.pop("_meta", None)
        return out, value - 1

    async def request(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        *,
        timeout_s: float | None = None,
        on_progress: ProgressFn | None = None,
    ) -> dict[str, Any]:
        """Send one request (raw params in, raw result dict out) to a replica.

        Methods in `routing.SAFE_METHODS` are retried like read-only tools; `logging/setLevel`
        goes to every ready replica. `timeout_s` (seconds) overrides the adaptive timeout.

        Raises:
            The same as `call`.
        """
        if method in _BROADCAST:
            return await self._broadcast(method, params)
        tool = params.get("name") if method == "tools/call" and params else None
        tool = tool if isinstance(tool, str) else None
        return await self._invoke(method, params, on_progress, tool, method in SAFE_METHODS, "", timeout_s)

    async def _broadcast(self, method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
        result: dict[str, Any] | None = None
        error: Exception | None = None
        for r in self.replicas:
            if r.target.state != "ready":
                continue
            try:
                got = await r.target.request(method, params)
            except (GatewayError, MCPError) as exc:
                error = error or exc
                continue
            if result is None:
                result = got
        if result is not None:
            return result
        raise error or self._no_replica(method)

    def _invoke(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        on_progress: ProgressFn | None,
        tool: str | None,
        safe: bool,
        session: str,
        timeout_s: float | None,
        attrs: dict[str, Any] | None = None,
        pin: int | None = None,
    ) -> Awaitable[dict[str, Any]]:
        """The call's awaitable: `_attempts` itself, behind a concurrency slot when `max_concurrency`
        is set (`_limited`). `attrs` (a ToolCall's) receives `queue_ms` (waiting for a slot),
        `upstream_ms` (time in sends, all attempts; when none was sent, the time spent trying),
        `retries` and `replica` (1-based), for telemetry: the gateway's pipeline needs no timer
        around its terminal. `pin`: the only replica (0-based) the call may go to."""
        if self._sem is None:
            return self._attempts(method, params, on_progress, tool, safe, session, timeout_s, attrs, pin)
        return self._limited(method, params, on_progress, tool, safe, session, timeout_s, attrs, pin)

    async def _limited(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        on_progress: ProgressFn | None,
        tool: str | None,
        safe: bool,
        session: str,
        timeout_s: float | None,
        attrs: dict[str, Any] | None,
        pin: int | None,
    ) -> dict[str, Any]:
        """`_attempts` within one of `max_concurrency` slots; at most `max_queue` calls wait for one."""
        sem = self._sem
        assert sem is not None
        if sem.locked():
            if self._waiting >= self.cfg.max_queue:
                raise self._rejected(method, tool)
            self._waiting += 1
            self._last_activity = time.monotonic()
            queued = time.perf_counter()
            try:
                await sem.acquire()
            finally:
                self._waiting -= 1
                if attrs is not None:
                    attrs["queue_ms"] = (time.perf_counter() - queued) * 1000
        else:
            await sem.acquire()
        try:
            return await self._attempts(method, params, on_progress, tool, safe, session, timeout_s, attrs, pin)
        finally:
            sem.release()

    async def _attempts(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        on_progress: ProgressFn | None,
        tool: str | None,
        safe: bool,
        session: str,
        timeout_s: float | None,
        attrs: dict[str, Any] | None = None,
        pin: int | None = None,
    ) -> dict[str, Any]:
        """Route, send, and retry per `routing.may_retry` with full-jitter backoff.

        A plain loop rather than tenacity/stamina (neither is a dependency): each attempt must
        re-route (failover to an untried replica), and whether to retry depends on the error
        *and* the tool, which this states more plainly than a retry decorator's predicates.

        A retry fails over to a replica this call has not tried yet, at once; when only tried
        replicas (or none) are available it first sleeps `backoff_s`. A timed-out call is
        retried only by failing over (the same replica would likely time out again).
        """
        self._active += 1
        self._last_activity = entered = time.monotonic()
        try:
            if not self._live:
                await self.ensure_started()
            elif self._primary() is None:  # starting (returns at once when every replica's first attempt settled)
                await self._await_any_ready(self.cfg.startup_timeout_ms / 1000)
            retry = self.cfg.retry
            key = tool if tool is not None else method
            tried: list[int] = []
            sent_error: GatewayError | None = None
            last: GatewayError | None = None
            for attempt in range(retry.attempts):
                if pin is not None:
                    r = self._pinned(pin)
                    if attempt and r is not None:
                        await anyio.sleep(backoff_s(attempt, retry.initial_backoff_ms, retry.max_backoff_ms))
                    if r is None:
                        last = self._pin_unavailable(pin)
                        continue
                    try:
                        if attrs is not None:
                            attrs["retries"] = attempt
                            attrs["replica"] = r.index + 1
                        return await self._send(r, method, params, timeout_s, on_progress, key, attrs)
                    except GatewayError as exc:
                        last = exc
                        if not may_retry(exc, safe):
                            raise
                        continue
                r = self.router.pick(self.replicas, key, session, tried)
                if attempt and (r is None or r.index in tried):
                    if isinstance(last, UpstreamTimeout):
                        break
                    await anyio.sleep(backoff_s(attempt, retry.initial_backoff_ms, retry.max_backoff_ms))
                    r = self.router.pick(self.replicas, key, session, tried)
                if r is None:
                    last = self._no_replica(method)
                    continue
                timeout = timeout_s
                if timeout is None and self.timeouts is not None:
                    timeout = self.timeouts.timeout_s(key)
                if attrs is not None:
                    attrs["retries"] = attempt
                    attrs["replica"] = r.index + 1
                try:
                    return await self._send(r, method, params, timeout, on_progress, key, attrs)
                except GatewayError as exc:
                    last = sent_error = exc
                    if not may_retry(exc, safe):
                        raise
                    tried.append(r.index)
                    if attempt + 1 < retry.attempts:
                        logger.info("%s; retrying (attempt %d of %d)", exc, attempt + 2, retry.attempts)
            assert last is not None
            if isinstance(last, NoReplicaAvailable) and sent_error is not None:
                raise sent_error  # what actually happened beats "no replica left to retry on"
            raise last
        finally:
            self._active -= 1
            self._last_activity = now = time.monotonic()
            if attrs is not None and "upstream_ms" not in attrs:
                # No attempt was sent (no replica, a start that failed): the time spent waiting for
                # one is the upstream's, as an `UpstreamTimer` around the pool would have counted it.
                attrs["upstream_ms"] = (now - entered) * 1000

    async def _send(
        self,
        r: Replica,
        method: str,
        params: Mapping[str, Any] | None,
        timeout_s: float | None,
        on_progress: ProgressFn | None,
        key: str,
        attrs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One attempt on replica `r`, recording its latency, failures and breaker verdict."""
        up = r.target
        breaker = r.breaker
        breaker.acquire()
        r.inflight += 1
        verdict: bool | None = None
        started = time.perf_counter()
        try:
            result = await up.request(method, params, timeout_s=timeout_s, on_progress=on_progress)
            verdict = True
            return result
        except MCPError:
            verdict = True  # the server answered (with a JSON-RPC error)
            raise
        except UpstreamClosed as exc:
            if exc.restarted:
                raise  # cut off by the gateway's own restart (`recycle`): not the server's failure
            verdict = False
            r.last_error = str(exc)
            raise
        except (UpstreamTimeout, UpstreamUnavailable) as exc:
            verdict = False
            r.last_error = str(exc)
            if isinstance(exc, UpstreamTimeout):
                self._observe(r, key, (time.perf_counter() - started) * 1000)
            raise
        except GatewayError:
            raise  # the gateway's own verdict (bad params, rejected): the server is not blamed
        except Exception as exc:
            if not transport_failure(exc):
                # A failure inside the gateway (an encoder's limit, a bug): that call fails alone and
                # the server's breaker does not hear of it (issue 10: 5 such calls opened it for all).
                logger.exception("mcpopt failed to forward %s to %s", method, up.label)
                raise GatewayError(
                    f"mcpopt could not forward {method} to {up.label}: an internal error of the gateway "
                    "(logged on its side); the server was not at fault",
                    server=self.name,
                ) from None
            # Transport failures (HTTP errors, broken pipes): it may have been sent.
            verdict = False
            r.last_error = f"{up.label} failed during {method}: {type(exc).__name__}: {exc}"
            raise UpstreamClosed(r.last_error, server=self.name) from exc
        finally:
            if attrs is not None:
                attrs["upstream_ms"] = attrs.get("upstream_ms", 0.0) + (time.perf_counter() - started) * 1000
            r.inflight -= 1
            r.calls += 1
            if verdict is True:
                breaker.record_success()
                self._observe(r, key, (time.perf_counter() - started) * 1000)
            elif verdict is False:
                r.failures += 1
                breaker.record_failure()
            else:
                breaker.release()

    def _observe(self, r: Replica, key: str, ms: float) -> None:
        r.observe(key, ms)
        if self.timeouts is not None:
            self.timeouts.observe(key, ms)

    def _pinned(self, index: int) -> Replica | None:
        r = self.replicas[index]
        return r if r.target.state == "ready" and r.breaker.allows() else None

    def _pin_unavailable(self, index: int) -> NoReplicaAvailable:
        r = self.replicas[index]
        up = r.target
        n = len(self.replicas)
        if up.state == "ready":
            why = f"its circuit breaker is {r.breaker.state.replace('_', '-')}"
        else:
            why = up.state + (f": {up.last_error}" if up.last_error else "")
        return NoReplicaAvailable(
            f"MCP server '{self.name}' replica {index + 1} of {n} is unavailable ({why})", server=self.name
        )

    # ---- errors -------------------------------------------------------------------------
    def _no_replica(self, method: str) -> NoReplicaAvailable:
        n = len(self.replicas)
        if n == 1:
            r = self.replicas[0]
            up = r.target
            if up.state == "ready" and r.breaker.state != "closed":
                why = f"its circuit breaker is open for {r.breaker.retry_in_s():.1f} s more"
                if r.last_error:
                    why += f" after: {r.last_error}"
                return NoReplicaAvailable(f"{up.label} is unavailable ({why})", server=self.name)
            detail = f": {up.last_error}" if up.last_error else ""
            return NoReplicaAvailable(f"{up.label} is unavailable ({self.state}){detail}", server=self.name)
        parts = []
        for r in self.replicas:
            up = r.target
            if up.state == "ready":
                what = f"circuit breaker {r.breaker.state.replace('_', '-')}"
                if r.breaker.state == "open":
                    what += f" for {r.breaker.retry_in_s():.1f} s more"
            else:
                what = up.state + (f" ({up.last_error})" if up.last_error else "")
            parts.append(f"replica {r.index + 1}: {what}")
        return NoReplicaAvailable(
            f"MCP server '{self.name}' has no replica available for {method} ({'; '.join(parts)})", server=self.name
        )

    def _rejected(self, method: str, tool: str | None) -> GatewayError:
        limit, queue = self.cfg.max_concurrency, self.cfg.max_queue
        what = f"tools/call {tool}" if method == "tools/call" and tool else method
        return GatewayError(
            f"MCP server '{self.name}' is busy: {limit} call(s) in flight (max_concurrency {limit}) and "
            f"{self._waiting} waiting (max_queue {queue}); {what} was rejected. Retry later, or raise "
            f"max_concurrency / max_queue for '{self.name}'",
            server=self.name,
            code=GATEWAY_REJECTED,
        )


_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # broken pipes, resets, refused connections, TLS errors, timeouts
    EOFError,  # incomplete reads
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    httpx.HTTPError,  # the SDK's HTTP transports
)


def transport_failure(exc: BaseException) -> bool:
    """Whether an exception from sending a request means the connection to the server failed (which
    counts against its circuit breaker) rather than a failure inside the gateway (which does not)."""
    if isinstance(exc, BaseExceptionGroup):
        return any(transport_failure(e) for e in exc.exceptions)
    return isinstance(exc, _TRANSPORT_ERRORS)


class _ReplicaListener:
    """What one replica's `Upstream` reports, filtered before it reaches the gateway."""

    def __init__(self, pool: ServerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.up: Upstream | None = None

    def _current(self) -> bool:
        return self.up is not None and self.pool.replicas[self.index].target is self.up

    async def catalog_changed(self, server: str, kinds: set[CatalogKind]) -> None:
        assert self.up is not None
        await self.pool._on_catalog(self.index, self.up, kinds)  # noqa: SLF001

    async def resource_updated(self, server: str, uri: str) -> None:
        sub = self.pool._sub_up  # noqa: SLF001
        if self._current() and (sub is None or sub is self.up):
            await self.pool.listener.resource_updated(server, uri)

    async def log_message(self, server: str, params: types.LoggingMessageNotificationParams) -> None:
        await self.pool.listener.log_message(server, params)

    async def client_request(self, server: str, request: types.InputRequest) -> types.InputResponse | types.ErrorData:
        return await self.pool.listener.client_request(server, request)

    async def elicitation_complete(self, server: str, elicitation_id: str) -> None:
        await self.pool.listener.elicitation_complete(server, elicitation_id)


def _snap(catalog: Catalog) -> tuple[list[Any], ...]:
    return (list(catalog.tools), list(catalog.resources), list(catalog.templates), list(catalog.prompts))


def _changed_kinds(old: tuple[list[Any], ...] | None, catalog: Catalog) -> set[CatalogKind]:
    if old is None:
        return set(_ALL_KINDS)
    out: set[CatalogKind] = set()
    if old[0] != catalog.tools:
        out.add("tools")
    if old[1] != catalog.resources or old[2] != catalog.templates:
        out.add("resources")
    if old[3] != catalog.prompts:
        out.add("prompts")
    return out
