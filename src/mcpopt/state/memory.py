"""`MemoryStateStore`: the embedded `StateStore` (one process; nothing shared across replicas)."""

from __future__ import annotations

import time
from collections import OrderedDict


class MemoryStateStore:
    """Bytes with a TTL in this process, bounded in total size (least recently used dropped first).

    Args:
        max_bytes: total size of the values kept (bytes); past it the least recently used
            entries are dropped, as a Redis with `maxmemory-policy allkeys-lru` would.
        clock: seconds, monotonic (tests may pass their own).
    """

    def __init__(self, max_bytes: int = 256 * 1024 * 1024, clock: object = None) -> None:
        self.max_bytes = max_bytes
        self._clock = clock if callable(clock) else time.monotonic
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.bytes = 0
        """Bytes held now."""

    async def get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires <= self._clock():
            self._drop(key)
            return None
        self._data.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self._drop(key)
        self._data[key] = (bytes(value), self._clock() + ttl_s)
        self.bytes += len(value)
        while self.bytes > self.max_bytes and self._data:
            self._drop(next(iter(self._data)))

    async def delete(self, key: str) -> None:
        self._drop(key)

    async def aclose(self) -> None:
        self._data.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._data)

    def _drop(self, key: str) -> None:
        item = self._data.pop(key, None)
        if item is not None:
            self.bytes -= len(item[0])
