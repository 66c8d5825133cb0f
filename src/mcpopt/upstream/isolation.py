"""Upstream sessions of one server kept per owner: a principal, or a client session.

An MCP session carries state about its client: the roots it offered, answers to sampling and
elicitation, its log level, its resource subscriptions. Through one shared upstream session
every client of the gateway would be that one client to the server (server-everything caches
the first caller's roots for the session and shows them to everyone). `IsolatedSessions` gives
each owner its own `ServerPool` of one replica, started on the owner's first call and closed
when it has been idle for `isolation_idle_ms` (its process too, for a stdio server).

Bounds: at most `isolation_max_sessions` owners at once per server; a new owner beyond that
closes the least recently used idle one, and when every one is busy the call is rejected with
a clear error (`GATEWAY_REJECTED`), so one principal cannot exhaust the machine.

The shared pool (`Gateway.upstreams[server]`) still runs: it owns the catalog the gateway lists
and serves the trusted local user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from mcpopt.config import ServerConfig
from mcpopt.errors import GATEWAY_REJECTED, GatewayError
from mcpopt.upstream.pool import ServerPool

logger = logging.getLogger(__name__)

REAP_INTERVAL_S = 5.0
"""How often idle sessions are looked for (at most; shorter when `isolation_idle_ms` is)."""
STOP_TIMEOUT_S = 10.0


def single_replica(cfg: ServerConfig) -> ServerConfig:
    """The config of one isolated session: one replica, started at once, no idle stop of its own,
    no active health checks (the owner's calls are its health checks)."""
    health = cfg.health_check.model_copy(update={"interval_ms": 0})
    return cfg.model_copy(
        update={"replicas": 1, "urls": [], "lazy": False, "idle_timeout_ms": 0, "health_check": health}
    )


class IsolatedSessions:
    """The per-owner sessions of one server (see the module docstring).

    Args:
        name: the server's name.
        cfg: its config (`isolation_max_sessions`, `isolation_idle_ms`).
        make: builds the pool of an owner (the gateway gives it a listener that routes the
            session's requests, logs and updates to that owner's clients only).
        clock: `time.monotonic` (tests may pass another).

    Attributes:
        opened / reaped / evicted / rejected: sessions started, closed when idle, closed to make
            room, and calls refused because every session was busy.
    """

    def __init__(
        self,
        name: str,
        cfg: ServerConfig,
        make: Callable[[str], ServerPool],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.make = make
        self.clock = clock
        self.max_sessions = cfg.isolation_max_sessions
        self.idle_s = cfg.isolation_idle_ms / 1000
        self.pools: OrderedDict[str, ServerPool] = OrderedDict()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._reaping = asyncio.Lock()
        self._closed = False
        self.opened = self.reaped = self.evicted = self.rejected = 0

    def peek(self, owner: str) -> ServerPool | None:
        """The owner's pool if it is open (no start, no LRU touch)."""
        return self.pools.get(owner)

    async def get(self, owner: str) -> ServerPool:
        """The owner's pool, started when it has none (the caller's request waits for it to be ready).

        Raises:
            GatewayError: code GATEWAY_REJECTED when `isolation_max_sessions` sessions are open
                and every one has a call in flight; or the gateway is stopping.
        """
        pool = self.pools.get(owner)
        if pool is not None:
            self.pools.move_to_end(owner)
            return pool
        async with self._lock:
            pool = self.pools.get(owner)
            if pool is not None:
                return pool
            if self._closed:
                raise GatewayError(f"MCP server '{self.name}': the gateway is stopping", server=self.name)
            if len(self.pools) >= self.max_sessions:
                victim = next((o for o, p in self.pools.items() if p.busy == 0), None)
                if victim is None:
                    self.rejected += 1
                    raise GatewayError(
                        f"MCP server '{self.name}' has {len(self.pools)} isolated sessions open, each with a call in "
                        f"flight (isolation_max_sessions {self.max_sessions}); retry later, or raise "
                        f"isolation_max_sessions for '{self.name}'",
                        server=self.name,
                        code=GATEWAY_REJECTED,
                    )
                self.evicted += 1
                await self._close(victim)
            pool = self.make(owner)
            self.pools[owner] = pool
            self._tasks[owner] = asyncio.get_running_loop().create_task(self._run(owner, pool))
            self.opened += 1
            if self._reaper is None:
                self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())
            logger.info("MCP server %r: isolated session opened (%d open)", self.name, len(self.pools))
            return pool

    async def _run(self, owner: str, pool: ServerPool) -> None:
        try:
            await pool.run()
        except Exception:  # noqa: BLE001 - one owner's session failing stays with that owner
            logger.exception("MCP server %r: an isolated session failed", self.name)
        finally:
            if self.pools.get(owner) is pool:
                del self.pools[owner]
                self._tasks.pop(owner, None)

    async def _close(self, owner: str) -> bool:
        """Stop `owner`'s session; False when another caller (eviction, the reaper) already took it."""
        pool = self.pools.pop(owner, None)
        task = self._tasks.pop(owner, None)
        if pool is None:
            return False
        await pool.stop()
        if task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, STOP_TIMEOUT_S)
        return True

    async def _reap_loop(self) -> None:
        interval = min(REAP_INTERVAL_S, max(0.05, self.idle_s / 4))
        while not self._closed:
            await asyncio.sleep(interval)
            await self.reap()

    async def reap(self) -> int:
        """Close the sessions idle for `isolation_idle_ms` or longer; returns how many this call closed.

        One reap at a time (the background loop and a caller's): a second one waits for the first,
        so when it returns every session idle at its start is stopped, and none is counted twice.
        """
        async with self._reaping:
            now = self.clock()
            idle = [o for o, p in list(self.pools.items()) if p.busy == 0 and now - p.last_activity >= self.idle_s]
            closed = 0
            for owner in idle:
                if await self._close(owner):
                    closed += 1
            self.reaped += closed
        if closed:
            logger.info("MCP server %r: closed %d idle isolated session(s)", self.name, closed)
        return closed

    async def aclose(self) -> None:
        """Close every session (gateway shutdown)."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reaper
        for owner in list(self.pools):
            await self._close(owner)

    def stats(self) -> dict[str, Any]:
        """`{open, max, opened, reaped, evicted, rejected}`."""
        return {
            "open": len(self.pools),
            "max": self.max_sessions,
            "opened": self.opened,
            "reaped": self.reaped,
            "evicted": self.evicted,
            "rejected": self.rejected,
        }
