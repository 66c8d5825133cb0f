"""The Redis backends of shared state: `RedisStateStore` (a `StateStore`) and `SharedBus` (pub/sub).

Both take `gateway.shared.redis_url` (redis-py's asyncio client). Every failure is local: a
store call raises `StateUnavailable` (its user falls back to local state), a bus `publish`
returns False; each object logs ONE warning when Redis becomes unreachable and one line when it is
back, so an outage is a log line, not a log flood. The bus reconnects by itself (every 0.5 s).

`SharedBus` carries small JSON messages between replicas on one channel (`mcpopt:events`):
`{"kind": <str>, "origin": <replica id>, ...}`. A replica never handles its own messages (the
`origin` check), so a handler that reacts by changing local state cannot echo it back: loops are
ruled out by construction. Kinds in use (see `mcpopt.gateway.shared`): `breaker`, `rules`,
`list_changed`, `resource_updated`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from mcpopt.state import StateUnavailable

logger = logging.getLogger(__name__)

CHANNEL = "events"
"""The pub/sub channel of `SharedBus` messages (after `gateway.shared.key_prefix`: `mcpopt:events`)."""

Handler = Callable[[dict[str, Any]], Awaitable[None]]


CONNECT_TIMEOUT_S = 1.0
"""A Redis that does not accept a connection within this long is taken as down (per call)."""
CAS_ATTEMPTS = 16
"""`RedisStateStore.update` gives up after this many attempts lost to concurrent writers."""
_CAS_LUA = """
local cur = redis.call('GET', KEYS[1])
if (ARGV[1] == '0' and not cur) or (ARGV[1] == '1' and cur == ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  return {1}
end
if not cur then return {0} end
return {0, cur}
"""
"""Set KEYS[1] to ARGV[3] (PX ARGV[4]) if it holds ARGV[2] (ARGV[1] = '1') or nothing ('0');
else return what it holds."""
SOCKET_TIMEOUT_S = 1.0
"""A command unanswered for this long fails with `StateUnavailable` (a stuck Redis must not hang calls)."""


def _client(url: str, *, timeouts: bool = True) -> Any:
    import redis.asyncio as aioredis
    import redis.exceptions
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    if timeouts:
        # Bounds what an unreachable Redis can add to a call before it degrades to local state. One
        # retry, at once, on a broken connection only: a pooled connection from before a Redis
        # restart fails its first command ("Connection closed by server"), which without it would
        # fail too (a session not found, an announcement lost). A timeout is not retried (the bound).
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
        return aioredis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=SOCKET_TIMEOUT_S, retry=retry
        )
    # The subscriber blocks on reads for as long as no message comes: no read timeout there; a dead
    # server is seen as a closed connection (and by the periodic PING of health_check_interval).
    return aioredis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, health_check_interval=5)


_down: dict[str, set[str]] = {}
"""Redis URL -> the users that see it down now (one outage is one warning, however many users)."""


def report_down(url: str, what: str, exc: BaseException) -> None:
    """`what` (the cache's L2, the rate limiter, the bus...) cannot reach the Redis at `url`.

    The first user to see an outage logs the one warning; the others log at INFO."""
    users = _down.setdefault(url, set())
    first = not users
    users.add(what)
    if first:
        logger.warning(
            "shared state: Redis at %s unavailable (%s: %s); this replica goes on with its local state "
            "and reconnects by itself",
            _shown(url),
            what,
            exc,
        )
    else:
        logger.info("shared state: %s also on local state (Redis at %s down)", what, _shown(url))


def report_up(url: str, what: str) -> None:
    """`what` reaches the Redis at `url` again (one line when the last user is back)."""
    users = _down.get(url)
    if not users or what not in users:
        return
    users.discard(what)
    if not users:
        logger.warning("shared state: Redis at %s reachable again; shared state resumed", _shown(url))


class _Health:
    """A backend user's view of its Redis: logs through `report_down` / `report_up`."""

    def __init__(self, what: str, url: str) -> None:
        self.what = what
        self.url = url
        self.healthy = True
        self.failures = 0

    def down(self, exc: BaseException) -> None:
        self.failures += 1
        if self.healthy:
            self.healthy = False
            report_down(self.url, self.what, exc)

    def up(self) -> None:
        if not self.healthy:
            self.healthy = True
            report_up(self.url, self.what)


def _shown(url: str) -> str:
    """The URL fit for a message: a password is shown as `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


class RedisStateStore:
    """Bytes with a TTL in Redis (the `StateStore` shared by gateway replicas).

    The same class as on the `replicas` branch (session store): keys are stored under `prefix`;
    connection and timeout failures raise `StateUnavailable` naming the server; the client
    reconnects on its own on the next call.

    Args:
        url: `redis://[user:password@]host:port/db` (or `rediss://`, `unix://`).
        prefix: prepended to every key (`gateway.shared.key_prefix`).
        client: an existing `redis.asyncio.Redis` to use instead of one from `url` (not closed here).
    """

    def __init__(self, url: str, *, prefix: str = "mcpopt:", client: Any = None) -> None:
        self.url = url
        self.prefix = prefix
        self._own = client is None
        self.redis: Any = client or _client(url)
        self._cas: Any = None
        self.scripts = True
        """False once Redis refused the compare-and-set script (ACL, renamed EVAL): `update` then
        goes by WATCH/MULTI/EXEC."""

    def _where(self) -> str:
        return _shown(self.url)

    async def _run(self, op: Callable[[], Awaitable[Any]]) -> Any:
        import redis.exceptions

        try:
            return await op()
        except (redis.exceptions.RedisError, OSError) as exc:  # error replies too (READONLY, OOM, NOPERM)
            raise StateUnavailable(f"Redis at {self._where()} is unavailable: {exc}") from None

    async def get(self, key: str) -> bytes | None:
        value = await self._run(lambda: self.redis.get(self.prefix + key))
        return bytes(value) if value is not None else None

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        await self._run(lambda: self.redis.set(self.prefix + key, value, px=max(1, int(ttl_s * 1000))))

    async def expire(self, key: str, ttl_s: float) -> bool:
        """Give `key` a new TTL (`PEXPIRE`); False when it does not exist."""
        return bool(await self._run(lambda: self.redis.pexpire(self.prefix + key, max(1, int(ttl_s * 1000)))))

    async def delete(self, key: str) -> None:
        await self._run(lambda: self.redis.delete(self.prefix + key))

    async def update(
        self, key: str, change: Callable[[bytes | None], bytes], ttl_s: float, *, expect: bytes | None = None
    ) -> bytes:
        """Compare-and-set: replace `key`'s value by `change(current)` (current: None when absent),
        with the TTL `ttl_s` (seconds), as one atomic step. Optimistic, one round trip when the
        guess is right: `change` runs on `expect` (the value the caller believes is stored; None:
        absent) and a Lua script writes the result only if the key still holds that; otherwise it
        returns what is there and `change` runs again on it (up to `CAS_ATTEMPTS` times). A Redis
        that refuses scripts (an ACL without @scripting, EVAL renamed away) gets the same
        compare-and-set as a WATCH/MULTI/EXEC transaction from then on (one warning). The value
        written; raises `StateUnavailable` (Redis down, or the key always contended)."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        full, px = self.prefix + key, max(1, int(ttl_s * 1000))
        if self.scripts:
            try:
                return await self._update_by_script(full, change, px, expect)
            except _ScriptsRefused as exc:
                self.scripts = False
                logger.warning(
                    "shared state: Redis at %s refuses scripts (%s); compare-and-set writes use "
                    "WATCH/MULTI/EXEC instead (three round trips instead of one)",
                    self._where(),
                    exc,
                )
        return await self._run(lambda: self._update_by_watch(full, change, px))

    async def _update_by_script(
        self, full: str, change: Callable[[bytes | None], bytes], px: int, expect: bytes | None
    ) -> bytes:
        import redis.exceptions

        if self._cas is None:
            self._cas = self.redis.register_script(_CAS_LUA)
        current = expect
        for _ in range(CAS_ATTEMPTS):
            value = change(current)
            args = [b"1" if current is not None else b"0", current or b"", value, px]
            try:
                answer = await self._cas(keys=[full], args=args)
            except redis.exceptions.ResponseError as exc:
                if _refuses_scripts(exc):
                    raise _ScriptsRefused(str(exc)) from None
                raise StateUnavailable(f"Redis at {self._where()} is unavailable: {exc}") from None
            except (redis.exceptions.RedisError, OSError) as exc:
                raise StateUnavailable(f"Redis at {self._where()} is unavailable: {exc}") from None
            if answer[0] == 1:
                return value
            current = bytes(answer[1]) if len(answer) > 1 else None
        raise self._contended(full)

    async def _update_by_watch(self, full: str, change: Callable[[bytes | None], bytes], px: int) -> bytes:
        """`update` without scripts: WATCH the key, GET it, then SET it in MULTI/EXEC, which Redis
        aborts when the key changed after the WATCH (retried on what is stored then)."""
        import redis.exceptions

        async with self.redis.pipeline(transaction=True) as pipe:
            for _ in range(CAS_ATTEMPTS):
                try:
                    await pipe.watch(full)
                    stored = await pipe.get(full)
                    value = change(bytes(stored) if stored is not None else None)
                    pipe.multi()
                    pipe.set(full, value, px=px)
                    await pipe.execute()
                    return value
                except redis.exceptions.WatchError:
                    continue
        raise self._contended(full)

    def _contended(self, full: str) -> StateUnavailable:
        key = full.removeprefix(self.prefix)
        return StateUnavailable(f"Redis at {self._where()}: {key} changed by others {CAS_ATTEMPTS} times in a row")

    async def publish(self, channel: str, message: bytes) -> None:
        """Publish on `prefix + channel` (Redis pub/sub: every subscribed replica hears it)."""
        await self._run(lambda: self.redis.publish(self.prefix + channel, message))

    async def aclose(self) -> None:
        if self._own:
            await self.redis.aclose()


class _ScriptsRefused(Exception):
    """Redis will not run scripts for this client (`update` falls back to a transaction)."""


def _refuses_scripts(exc: BaseException) -> bool:
    """Whether a Redis error reply says scripts are not allowed here (an ACL without @scripting:
    NOPERM; EVAL/EVALSHA renamed away: unknown command), not that the key or Redis failed."""
    import redis.exceptions

    text = str(exc).lower()
    named = "eval" in text or "script" in text
    return named and (isinstance(exc, redis.exceptions.NoPermissionError) or "unknown command" in text)


class SharedBus:
    """Messages between replicas over Redis pub/sub (see the module docstring).

    Args:
        url: `redis://host:port/db`.
        replica: this replica's id (its messages carry it as `origin`; messages with it are skipped).
        prefix: `gateway.shared.key_prefix`, before the channel's name and the users' keys.
        channel: the pub/sub channel's name.

    Attributes:
        published / received / dropped: message counts (dropped: not sent, Redis down).
        connected: the subscription is live now.
    """

    def __init__(self, url: str, replica: str, *, prefix: str = "mcpopt:", channel: str = CHANNEL) -> None:
        self.url = url
        self.replica = replica
        self.prefix = prefix
        self.channel = prefix + channel
        self.redis = _client(url)
        """The command connection (publish, and the shared keys of the bus's users)."""
        self._sub = _client(url, timeouts=False)
        self._handlers: dict[str, list[Handler]] = {}
        self._on_connect: list[Callable[[], Awaitable[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self.health = _Health("shared state bus", url)
        self.connected = False
        self.published = 0
        self.received = 0
        self.dropped = 0

    def on(self, kind: str, handler: Handler) -> None:
        """Call `handler(message)` for each message of `kind` from another replica."""
        self._handlers.setdefault(kind, []).append(handler)

    def on_connect(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run `hook()` each time the subscription is (re)established (resynchronise what was missed)."""
        self._on_connect.append(hook)

    async def start(self, wait_s: float = 2.0) -> None:
        """Subscribe in the background; waits up to `wait_s` for the first subscription (never raises)."""
        self._task = asyncio.get_running_loop().create_task(self._listen())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), wait_s)

    async def publish(self, kind: str, **data: Any) -> bool:
        """Send one message to the other replicas. False (counted in `dropped`) when Redis is down."""
        if not self.health.healthy and not self.connected:
            self.dropped += 1
            return False
        body = orjson.dumps({**data, "kind": kind, "origin": self.replica})
        try:
            await self.redis.publish(self.channel, body)
        except Exception as exc:  # noqa: BLE001 - Redis down: the replica goes on with local state
            self.health.down(exc)
            self.dropped += 1
            return False
        self.published += 1
        return True

    async def _listen(self) -> None:
        while True:
            pubsub = self._sub.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self.connected = True
                self.health.up()
                for hook in self._on_connect:
                    await self._safe(hook)
                self._subscribed.set()  # `start` returns once the hooks resynchronised
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    await self._dispatch(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect below
                self.connected = False
                self.health.down(exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(0.5)

    async def _dispatch(self, raw: bytes) -> None:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if not isinstance(msg, dict) or msg.get("origin") == self.replica:
            return
        self.received += 1
        for handler in self._handlers.get(str(msg.get("kind")), ()):
            await self._safe(lambda h=handler: h(msg))  # type: ignore[misc]

    @staticmethod
    async def _safe(fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except Exception:  # noqa: BLE001 - one bad handler must not stop the bus
            logger.exception("shared state bus: a handler failed")

    def stats(self) -> dict[str, Any]:
        return {
            "url": _shown(self.url),
            "replica": self.replica,
            "connected": self.connected,
            "published": self.published,
            "received": self.received,
            "dropped": self.dropped,
        }

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        for client in (self.redis, self._sub):
            with contextlib.suppress(Exception):
                await client.aclose()
