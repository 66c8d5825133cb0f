"""`RedisStateStore`: the `StateStore` shared by gateway replicas (redis-py's asyncio client).

Keys are stored under `prefix` (so several gateways, or other users, can share one Redis); values
are the caller's bytes with a millisecond TTL (`SET key value PX ttl`). Connection and timeout
failures raise `StateUnavailable` naming the server; the client reconnects on its own on the
next call, so a Redis that comes back is used again without a restart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mcpopt.state import StateUnavailable

CONNECT_TIMEOUT_S = 1.0
"""A Redis that does not accept a connection within this long is taken as down (per call)."""
SOCKET_TIMEOUT_S = 1.0
"""A command unanswered for this long fails with `StateUnavailable` (a stuck Redis must not hang calls)."""


class RedisStateStore:
    """Bytes with a TTL in Redis.

    Args:
        url: `redis://[user:password@]host:port/db` (or `rediss://`, `unix://`).
        prefix: prepended to every key (`gateway.shared.key_prefix`).
        client: an existing `redis.asyncio.Redis` to use instead of one from `url` (not closed here).
    """

    def __init__(self, url: str, *, prefix: str = "mcpopt:", client: Any = None) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.prefix = prefix
        self._own = client is None
        self.redis: Any = client or aioredis.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=SOCKET_TIMEOUT_S
        )

    def _where(self) -> str:
        """The URL fit for a message: a password is shown as `***`."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))

    async def _run(self, op: Callable[[], Awaitable[Any]]) -> Any:
        import redis.exceptions

        try:
            return await op()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise StateUnavailable(f"Redis at {self._where()} is unavailable: {exc}") from None

    async def get(self, key: str) -> bytes | None:
        value = await self._run(lambda: self.redis.get(self.prefix + key))
        return bytes(value) if value is not None else None

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        await self._run(lambda: self.redis.set(self.prefix + key, value, px=max(1, int(ttl_s * 1000))))

    async def delete(self, key: str) -> None:
        await self._run(lambda: self.redis.delete(self.prefix + key))

    async def publish(self, channel: str, message: bytes) -> None:
        """Publish on `prefix + channel` (Redis pub/sub: every subscribed replica hears it)."""
        await self._run(lambda: self.redis.publish(self.prefix + channel, message))

    async def aclose(self) -> None:
        if self._own:
            await self.redis.aclose()
