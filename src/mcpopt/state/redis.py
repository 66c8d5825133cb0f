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

import orjson

from mcpopt.state import StateUnavailable

logger = logging.getLogger(__name__)

CHANNEL = "mcpopt:events"
"""The pub/sub channel of `SharedBus` messages."""

Handler = Callable[[dict[str, Any]], Awaitable[None]]


def _client(url: str, *, timeouts: bool = True) -> Any:
    import redis.asyncio as aioredis

    if timeouts:
        # 1 s bounds what an unreachable Redis can add to a call before it degrades to local state.
        return aioredis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    # The subscriber blocks on reads for as long as no message comes: no read timeout there; a dead
    # server is seen as a closed connection (and by the periodic PING of health_check_interval).
    return aioredis.from_url(url, socket_connect_timeout=1.0, health_check_interval=5)


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
    if "@" in url and ":" in url.split("@", 1)[0].split("//", 1)[-1]:
        scheme, rest = url.split("//", 1)
        return f"{scheme}//***@{rest.split('@', 1)[1]}"
    return url


class RedisStateStore:
    """`StateStore` in Redis (`GET`, `SET key value PX ttl`, `DEL`): shared by every replica.

    Args:
        url: `redis://host:port/db`.

    Every method raises `StateUnavailable` (naming the URL) when Redis cannot be reached.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._redis = _client(url)
        self.health = _Health("shared state store", url)

    async def _do(self, op: Callable[[], Awaitable[Any]]) -> Any:
        try:
            value = await op()
        except Exception as exc:  # noqa: BLE001 - any Redis/transport failure is "unavailable"
            self.health.down(exc)
            raise StateUnavailable(f"Redis at {_shown(self.url)}: {type(exc).__name__}: {exc}") from None
        self.health.up()
        return value

    async def get(self, key: str) -> bytes | None:
        value = await self._do(lambda: self._redis.get(key))
        return bytes(value) if value is not None else None

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        await self._do(lambda: self._redis.set(key, value, px=max(1, int(ttl_s * 1000))))

    async def delete(self, key: str) -> None:
        await self._do(lambda: self._redis.delete(key))

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self._redis.aclose()


class SharedBus:
    """Messages between replicas over Redis pub/sub (see the module docstring).

    Args:
        url: `redis://host:port/db`.
        replica: this replica's id (its messages carry it as `origin`; messages with it are skipped).
        channel: the pub/sub channel.

    Attributes:
        published / received / dropped: message counts (dropped: not sent, Redis down).
        connected: the subscription is live now.
    """

    def __init__(self, url: str, replica: str, channel: str = CHANNEL) -> None:
        self.url = url
        self.replica = replica
        self.channel = channel
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
