"""Shared state: one small interface for what replicas must share, with interchangeable backends.

`StateStore` is the whole contract: bytes values under string keys, each with a TTL, and three
async operations. The embedded default is `MemoryStateStore` (this process only); a Redis
backend (issue 12) implements the same four methods (`GET`, `SET key value PX ttl`, `DEL`,
connection close), so every user of shared state -- code-mode sessions today -- survives a
replica change as soon as the assembly hands out a Redis store instead.

Conventions for users (so one Redis can hold everyone's state):
- keys are namespaced `<owner>:<kind>:<id>`, e.g. `codemode:session:<digest>`;
- values are opaque bytes the owner encodes and authenticates itself (a store may be shared
  with other processes; never trust what comes back without checking it);
- a TTL is always given: nothing stays forever.

A backend that cannot reach its server raises `StateUnavailable`; users degrade to working
without the shared copy (one warning), never fail the call because of it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from mcpopt.state.memory import MemoryStateStore


class StateUnavailable(RuntimeError):
    """The store's backend cannot be reached (the message names it)."""


@runtime_checkable
class StateStore(Protocol):
    """Bytes under string keys with a TTL, shared by the gateway's replicas (or one process).

    Every method may raise `StateUnavailable`. Implementations must be safe to call from
    concurrent tasks of one event loop.
    """

    async def get(self, key: str) -> bytes | None:
        """The value of `key`, or None when absent or expired."""
        ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store `value` under `key` for `ttl_s` seconds (> 0), replacing what was there."""
        ...

    async def delete(self, key: str) -> None:
        """Drop `key` (no error when absent)."""
        ...

    async def aclose(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


__all__ = ["MemoryStateStore", "StateStore", "StateUnavailable"]
