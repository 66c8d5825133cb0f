"""What gateway replicas agree on through one Redis (`gateway.shared`, issue 12), wired in one place.

Beside the result cache's L2 and the rate limiter's Redis storage (which take the same URL, see
`mcpopt.config.SharedSettings`), `SharedState` carries three kinds of state over a `SharedBus`
(`mcpopt.state.redis`), each message naming its `origin` replica (a replica never handles its own,
so nothing echoes):

- **breakers** (`breaker`): when this replica's calls or health checks open or close the circuit
  breaker of an HTTP upstream, the others adopt that state for the same URL (open for the time it
  has left). An open breaker is also kept under `<key_prefix>breaker:<server>:<url hash>` until it would
  turn half-open, so a replica that starts or reconnects meanwhile adopts it too. A stdio upstream
  is each gateway's own child process: its breaker is never shared.
- **rules** (`rules`): the optimizer's rule set lives in the Redis hash `<key_prefix>rules` (`version`,
  `doc`), written only by a newer version (a Lua compare-and-set). A change to this replica's rule
  file (the loop, `mcpopt rules ...`, checked every 0.5 s) is pushed and announced; the others
  fetch it, write their own file and apply it before their next call. On (re)connect each replica
  takes the newer of Redis's and its own.
- **notifications** (`list_changed`, `resource_updated`): an upstream's list change seen here makes
  the others re-list that server from their own session (their clients hear of it when their list
  changed); a `resources/updated` is re-emitted to the other replicas' subscribed clients. A replica
  that hears the same update from its own upstream within `DEDUPE_S` emits it once.

Redis down: every publish is dropped (counted), the replica works on its local state, the bus logs
one warning and resubscribes (then resynchronises the rules) when Redis is back.

Messages carry the sender's wall time `ts`; the receiver keeps the lag (`stats()["lag_ms"]`) so
"one replica's view reaches the others within a second" is measured, not assumed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import orjson

from mcpopt.config import SharedSettings
from mcpopt.state.redis import SharedBus

if TYPE_CHECKING:
    from mcpopt.gateway.server import Gateway
    from mcpopt.upstream.routing import BreakerState

logger = logging.getLogger(__name__)

RULES_KEY = "rules"
"""The rule set's hash (after `gateway.shared.key_prefix`)."""
RULES_HISTORY_SHARED = 20
"""History entries kept in Redis with the rule set (the full history stays in each replica's file)."""
DEDUPE_S = 1.0
"""A resources/updated for the same (server, uri) heard twice within this is emitted once."""

# KEYS[1] = hash; ARGV = version, doc. Writes only a newer version: two replicas pushing the same
# change (one shared file) or an older one (a replica that was partitioned) change nothing.
_SET_IF_NEWER = """
local cur = redis.call('HGET', KEYS[1], 'version')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'doc', ARGV[2])
return 1
"""


def _breaker_key(prefix: str, server: str, url: str) -> str:
    return f"{prefix}breaker:{server}:{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def replica_id(settings: SharedSettings, port: int | None = None) -> str:
    """`gateway.shared.replica`, else `<hostname>:<port>` (HTTP front), else `<hostname>:<pid>`."""
    if settings.replica:
        return settings.replica
    return f"{socket.gethostname()}:{port if port else os.getpid()}"


class SharedState:
    """The shared breakers, rules and notifications of one gateway replica (see the module doc).

    Args:
        gw: the gateway (its pools, rules filter, clients).
        settings: `gateway.shared` (its `redis_url` must be set).
        replica: this replica's id.
    """

    def __init__(self, gw: Gateway, settings: SharedSettings, replica: str) -> None:
        assert settings.redis_url
        self.gw = gw
        self.settings = settings
        self.replica = replica
        self.bus = SharedBus(settings.redis_url, replica, prefix=settings.key_prefix)
        self._rules_key = settings.key_prefix + RULES_KEY
        self._tasks: set[asyncio.Task[Any]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._relisting: set[str] = set()
        self._recent: dict[tuple[str, str], float] = {}
        self.rules_version = 0
        """The rule-set version last pushed to or taken from Redis."""
        self.adopted = {"breaker": 0, "rules": 0, "list_changed": 0, "resource_updated": 0}
        self.lag_ms: dict[str, float] = {}
        """Last observed delay (sender's wall clock to here) per message kind, milliseconds."""

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        if s.breakers:
            self._wire_breakers()
            self.bus.on("breaker", self._on_breaker)
            self.bus.on_connect(self._sync_breakers)
        if s.rules and self.gw.rules.store is not None:
            self.rules_version = self.gw.rules.store.version
            self.gw.rules.on_reload = lambda: self._spawn(self._push_rules())
            self.bus.on("rules", self._on_rules)
            self.bus.on_connect(self._sync_rules)
            self._poller = asyncio.get_running_loop().create_task(self._poll_rules())
        if s.notifications:
            self.bus.on("list_changed", self._on_list_changed)
            self.bus.on("resource_updated", self._on_resource_updated)
        await self.bus.start()

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *([self._poller] if self._poller else []), return_exceptions=True)
        await self.bus.aclose()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lag(self, kind: str, msg: dict[str, Any]) -> None:
        ts = msg.get("ts")
        if isinstance(ts, int | float):
            self.lag_ms[kind] = round((time.time() - ts) * 1000, 3)

    # ---- breakers -----------------------------------------------------------------------
    def _wire_breakers(self) -> None:
        for name, pool in self.gw.upstreams.items():
            for r, url in zip(pool.replicas, pool.replica_urls(), strict=True):
                if url is None:
                    continue

                def changed(state: BreakerState, name: str = name, url: str = url, b: Any = r.breaker) -> None:
                    self._spawn(self._publish_breaker(name, url, state, b.retry_in_s() if state == "open" else 0.0))

                r.breaker.on_change = changed

    async def _publish_breaker(self, server: str, url: str, state: str, remaining_s: float) -> None:
        # The key lets a replica that starts (or reconnects) while the breaker is open adopt it too;
        # it expires with the open period, so nothing stale is left behind.
        key = _breaker_key(self.bus.prefix, server, url)
        try:
            if state == "open" and remaining_s > 0:
                value = orjson.dumps({"state": "open", "until": time.time() + remaining_s, "origin": self.replica})
                await self.bus.redis.set(key, value, px=max(1, int(remaining_s * 1000)))
            else:
                await self.bus.redis.delete(key)
        except Exception as exc:  # noqa: BLE001 - Redis down: the others judge for themselves
            self.bus.health.down(exc)
            return
        await self.bus.publish("breaker", server=server, url=url, state=state, remaining_s=remaining_s, ts=time.time())

    async def _sync_breakers(self) -> None:
        """Adopt the breakers other replicas hold open now (at start, and after a reconnect)."""
        for name, pool in self.gw.upstreams.items():
            for r, url in zip(pool.replicas, pool.replica_urls(), strict=True):
                if url is None:
                    continue
                try:
                    raw = await self.bus.redis.get(_breaker_key(self.bus.prefix, name, url))
                except Exception as exc:  # noqa: BLE001
                    self.bus.health.down(exc)
                    return
                if not raw:
                    continue
                held = orjson.loads(raw)
                remaining = float(held.get("until", 0)) - time.time()
                if held.get("origin") != self.replica and remaining > 0 and r.breaker.adopt("open", remaining):
                    self.adopted["breaker"] += 1
                    logger.info(
                        "circuit breaker of %s (%s) open for %.1f s more, as replica %s saw it",
                        name,
                        url,
                        remaining,
                        held.get("origin"),
                    )

    async def _on_breaker(self, msg: dict[str, Any]) -> None:
        pool = self.gw.upstreams.get(str(msg.get("server")))
        if pool is None:
            return
        state = msg.get("state")
        if state not in ("open", "closed"):
            return
        for r, url in zip(pool.replicas, pool.replica_urls(), strict=True):
            if url is not None and url == msg.get("url") and r.breaker.adopt(state, float(msg.get("remaining_s") or 0)):
                self.adopted["breaker"] += 1
                self._lag("breaker", msg)
                logger.info(
                    "circuit breaker of %s (%s) %s, as replica %s saw it", pool.name, url, state, msg.get("origin")
                )

    # ---- rules --------------------------------------------------------------------------
    async def _poll_rules(self) -> None:
        # The rules filter re-reads its file only when calls pass; a replica nobody calls must still
        # pass on a change made to its file (the optimizer loop, `mcpopt rules rollback`).
        while True:
            await asyncio.sleep(0.5)
            self.gw.rules.check_file()

    def _doc(self) -> bytes:
        store = self.gw.rules.store
        assert store is not None
        return orjson.dumps(
            {
                "version": store.version,
                "rules": [r.model_dump(mode="json") for r in store.rules],
                "history": store.history[-RULES_HISTORY_SHARED:],
                "state": store.state,
            },
            default=str,
        )

    async def _push_rules(self) -> None:
        store = self.gw.rules.store
        if store is None or store.version <= self.rules_version:
            return
        version = store.version
        try:
            stored = await self.bus.redis.eval(_SET_IF_NEWER, 1, self._rules_key, version, self._doc())
        except Exception as exc:  # noqa: BLE001 - Redis down: the change holds here; pushed on reconnect
            self.bus.health.down(exc)
            return
        self.rules_version = version
        if stored:
            await self.bus.publish("rules", version=version, ts=time.time())
            logger.info("rules version %d shared with the other replicas", version)

    async def _on_rules(self, msg: dict[str, Any]) -> None:
        if int(msg.get("version") or 0) > self._local_rules_version():
            if await self._pull_rules():
                self._lag("rules", msg)

    def _local_rules_version(self) -> int:
        store = self.gw.rules.store
        return store.version if store is not None else 0

    async def _pull_rules(self) -> bool:
        """Take Redis's rule set when it is newer than this replica's (True when taken)."""
        from mcpopt.pipeline.rules import Rule

        store = self.gw.rules.store
        if store is None:
            return False
        try:
            version, raw = await self.bus.redis.hmget(self._rules_key, ["version", "doc"])
        except Exception as exc:  # noqa: BLE001
            self.bus.health.down(exc)
            return False
        if version is None or raw is None or int(version) <= store.version:
            return False
        doc = orjson.loads(raw)
        rules = [Rule.model_validate(r) for r in doc.get("rules", [])]
        store.rules = rules
        store.version = int(doc["version"])
        known = {h.get("version") for h in store.history}
        store.history += [h for h in doc.get("history", []) if h.get("version") not in known]
        store.state = dict(doc.get("state", {}))
        store.save()  # this replica's file follows (its CLI and its loop read it)
        self.gw.rules.set_rules(store.active())  # and its calls, from the next one on
        self.rules_version = store.version
        self.adopted["rules"] += 1
        logger.info("rules version %d taken from the shared store", store.version)
        return True

    async def _sync_rules(self) -> None:
        self.gw.rules.check_file()
        if not await self._pull_rules():
            self.rules_version = min(self.rules_version, self._local_rules_version() - 1)
            await self._push_rules()

    # ---- notifications ------------------------------------------------------------------
    async def list_changed(self, server: str, kinds: set[str]) -> None:
        """This replica's upstream `server` changed its lists: tell the other replicas."""
        if self.settings.notifications and server not in self._relisting:
            await self.bus.publish("list_changed", server=server, kinds=sorted(kinds), ts=time.time())

    async def _on_list_changed(self, msg: dict[str, Any]) -> None:
        server = str(msg.get("server"))
        pool = self.gw.upstreams.get(server)
        kinds = {k for k in msg.get("kinds") or () if k in ("tools", "resources", "prompts")}
        if pool is None or not kinds:
            return
        self._relisting.add(server)  # what this re-listing finds is not news for the others
        try:
            await pool.relist(kinds)  # type: ignore[arg-type]
        finally:
            self._relisting.discard(server)
        self.adopted["list_changed"] += 1
        self._lag("list_changed", msg)

    def first_update(self, server: str, uri: str) -> bool:
        """False when the same update was emitted here within `DEDUPE_S` (heard twice: once is enough)."""
        now = time.monotonic()
        if len(self._recent) > 1024:
            self._recent = {k: t for k, t in self._recent.items() if now - t < DEDUPE_S}
        last = self._recent.get((server, uri))
        self._recent[(server, uri)] = now
        return last is None or now - last >= DEDUPE_S

    async def resource_updated(self, server: str, uri: str) -> None:
        """This replica's upstream said `uri` changed: tell the other replicas."""
        if self.settings.notifications:
            await self.bus.publish("resource_updated", server=server, uri=uri, ts=time.time())

    async def _on_resource_updated(self, msg: dict[str, Any]) -> None:
        server, uri = str(msg.get("server")), str(msg.get("uri"))
        if server not in self.gw.upstreams or not self.first_update(server, uri):
            return
        await self.gw.emit_resource_updated(server, uri)
        self.adopted["resource_updated"] += 1
        self._lag("resource_updated", msg)

    # ---- status -------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """`{replica, bus: {...}, adopted: {kind: n}, lag_ms: {kind: ms}, rules_version}` for /healthz."""
        return {
            "replica": self.replica,
            "bus": self.bus.stats(),
            "adopted": dict(self.adopted),
            "lag_ms": dict(self.lag_ms),
            "rules_version": self.rules_version,
        }
