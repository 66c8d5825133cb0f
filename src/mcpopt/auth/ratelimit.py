"""Rate limits and quotas per principal, per tool and global, counted with the `limits` library.

`gateway.limits` (see `mcpopt.config.LimitsSettings`) names the limits; a call must pass every
one that applies, checked from the most specific to the least -- per principal and tool, per
principal (a policy rule's `rate_limits` replace `limits.per_principal`), per tool, global -- so
a principal over its own limit is refused before it consumes the shared budgets. A quota is a
limit with a long window (`50000/day`).

Counters live in the `limits` storage named by `limits.storage`: `memory://` (this process) or
`redis://host:port/db` (shared by every gateway replica; redis-py client). A storage failure
(Redis down) logs one warning and falls back to in-process counters, so no call fails for it;
the shared storage is probed every `PROBE_S` seconds and used again once it answers.

A refused call raises `RateLimited` (JSON-RPC code `RATE_LIMITED`, -32015) whose message says
which limit and in how many seconds to retry; `data.retryAfterSeconds` carries the number, and
the HTTP front answers such a call with 429 and `Retry-After` where the response has not started.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from mcp_types import ErrorData

from mcpopt.auth.principal import Principal
from mcpopt.config import LimitsSettings
from mcpopt.errors import RATE_LIMITED, GatewayError
from mcpopt.state.redis import report_down, report_up

if TYPE_CHECKING:
    from limits import RateLimitItem

# `limits` (~1.6 MiB resident, ~18 ms to import) is loaded by the first `RateLimiter`, so a
# gateway without `gateway.limits` never loads it.

logger = logging.getLogger(__name__)

PROBE_S = 2.0
"""While on local counters after a storage failure, the shared storage is tried again this often (s)."""

_STRATEGIES = {
    "moving-window": "MovingWindowRateLimiter",
    "sliding-window-counter": "SlidingWindowCounterRateLimiter",
    "fixed-window": "FixedWindowRateLimiter",
}
"""`limits.strategy` -> the class name in `limits.aio.strategies`."""


class RateLimited(GatewayError):
    """A call refused by a rate limit (see the module docstring).

    Attributes:
        retry_after_s: seconds until the limit lets a call through again (>= 1, rounded up, as
            HTTP `Retry-After` wants whole seconds).
        scope: which limit: `global`, `tool`, `principal` or `principal_tool`.
        limit: the limit as configured, e.g. `10 per 1 second`.
    """

    code = RATE_LIMITED

    def __init__(self, message: str, *, retry_after_s: int, scope: str, limit: str, server: str | None = None) -> None:
        super().__init__(message, server=server)
        self.retry_after_s = retry_after_s
        self.scope = scope
        self.limit = limit

    def to_error_data(self) -> ErrorData:
        data: dict[str, Any] = {"retryAfterSeconds": self.retry_after_s, "limit": self.limit, "scope": self.scope}
        if self.server:
            data["server"] = self.server
        return ErrorData(code=self.code, message=str(self), data=data)


def shown_uri(uri: str) -> str:
    """A storage URL fit to show: any password replaced by `***` (`redis://:***@host:6379/0`)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _parse(values: Sequence[str]) -> list[RateLimitItem]:
    from limits import parse_many

    out: list[RateLimitItem] = []
    for value in values:
        out += parse_many(value)
    return out


def _storage_uri(uri: str) -> tuple[str, dict[str, Any]]:
    if uri.startswith("async+"):
        return uri, {}
    if uri.startswith(("redis://", "rediss://", "redis+unix://")):
        return "async+" + uri, {"implementation": "redispy"}
    return "async+" + uri, {}


class RateLimiter:
    """Counts calls against `gateway.limits` (see the module docstring).

    Args:
        settings: `gateway.limits`.

    Attributes:
        refused: refusals so far by scope (`global`, `tool`, `principal`, `principal_tool`).
        allowed: calls counted and let through.
    """

    def __init__(self, settings: LimitsSettings) -> None:
        self.settings = settings
        uri, options = _storage_uri(settings.storage)
        self.storage_uri = settings.storage
        from limits.aio import strategies
        from limits.storage import storage_from_string

        self._strategy = getattr(strategies, _STRATEGIES[settings.strategy])
        self.storage = storage_from_string(uri, **options)
        self.limiter = self._strategy(self.storage)
        self._fell_back = False
        self._shared: Any = self.storage
        self._probe_at = 0.0
        self._probing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.global_ = _parse(settings.global_)
        self.per_principal = _parse(settings.per_principal)
        self.per_tool = [(p, _parse(v)) for p, v in settings.per_tool.items()]
        self.per_principal_tool = [(p, _parse(v)) for p, v in settings.per_principal_tool.items()]
        self._tool_items: dict[str, tuple[list[RateLimitItem], list[RateLimitItem]]] = {}
        self._own_items: dict[tuple[str, ...], list[RateLimitItem]] = {}
        self.refused: dict[str, int] = {"global": 0, "tool": 0, "principal": 0, "principal_tool": 0}
        self.allowed = 0

    def _for_tool(self, name: str) -> tuple[list[RateLimitItem], list[RateLimitItem]]:
        """(per-tool items, per-principal-tool items) for a tool name, cached."""
        got = self._tool_items.get(name)
        if got is None:
            tool = [i for p, items in self.per_tool if p == name or fnmatchcase(name, p) for i in items]
            ptool = [i for p, items in self.per_principal_tool if p == name or fnmatchcase(name, p) for i in items]
            got = self._tool_items[name] = (tool, ptool)
        return got

    def _principal_items(self, own: list[str] | None) -> list[RateLimitItem]:
        if own is None:
            return self.per_principal
        key = tuple(own)
        got = self._own_items.get(key)
        if got is None:
            got = self._own_items[key] = _parse(own)
        return got

    def applies(self, name: str, own: list[str] | None = None) -> bool:
        """True when some limit counts calls to `name` (else the caller can skip `hit`)."""
        tool, ptool = self._for_tool(name)
        return bool(self.global_ or tool or ptool or self._principal_items(own))

    async def hit(self, principal: Principal | None, name: str, own: list[str] | None = None) -> None:
        """Count one call of `principal` to the tool `name` against every limit that applies.

        Args:
            principal: the caller (`None` / `LOCAL`: the identity `local`).
            name: the gateway tool name.
            own: the principal's own limits (its grant's `rate_limits`), replacing `per_principal`.

        Raises:
            RateLimited: a limit is exhausted (the first one checked, most specific first).
        """
        if self._fell_back:
            await self._maybe_resume()
        who = principal.key if principal is not None and principal.key else "local"
        tool, ptool = self._for_tool(name)
        for item in ptool:
            await self._one(item, "principal_tool", name, ("pt", who, name))
        for item in self._principal_items(own):
            await self._one(item, "principal", name, ("p", who))
        for item in tool:
            await self._one(item, "tool", name, ("t", name))
        for item in self.global_:
            await self._one(item, "global", name, ("g",))
        self.allowed += 1

    async def _one(self, item: RateLimitItem, scope: str, name: str, ids: tuple[str, ...]) -> None:
        try:
            ok = await self.limiter.hit(item, "mcpopt", *ids)
        except Exception as exc:  # noqa: BLE001 - a storage outage must not fail calls
            self._fall_back(exc)
            ok = await self.limiter.hit(item, "mcpopt", *ids)
        if ok:
            return
        self.refused[scope] += 1
        try:
            stats = await self.limiter.get_window_stats(item, "mcpopt", *ids)
            wait = max(1, math.ceil(stats.reset_time - time.time()))
        except Exception:  # noqa: BLE001 - the refusal stands; the hint falls back to the window
            wait = max(1, int(item.get_expiry()))
        what = {
            "global": "the gateway's global limit",
            "tool": f"the limit of the tool {name!r}",
            "principal": "your limit",
            "principal_tool": f"your limit on the tool {name!r}",
        }[scope]
        raise RateLimited(
            f"rate limited: {what} ({item}) is used up; retry in {wait} s",
            retry_after_s=wait,
            scope=scope,
            limit=str(item),
        )

    def _fall_back(self, exc: Exception) -> None:
        if self._fell_back:
            raise exc
        self._fell_back = True
        what = "rate-limit storage (counting in this process)"
        if self.storage_uri.startswith(("redis://", "rediss://", "redis+unix://")):
            report_down(self.storage_uri, what, exc)
        else:
            logger.warning(
                "rate-limit storage %s failed (%s: %s); counting in this process from now on",
                shown_uri(self.storage_uri),
                type(exc).__name__,
                exc,
            )
        self._shared = self.storage
        from limits.storage import storage_from_string

        self.storage = storage_from_string("async+memory://")
        self.limiter = self._strategy(self.storage)
        self._probe_at = time.monotonic() + PROBE_S

    async def _maybe_resume(self) -> None:
        """While on local counters, try the shared storage again every `PROBE_S` (in the background:
        a call never waits for a Redis that is still down); back on it once it answers."""
        if self._probing or time.monotonic() < self._probe_at:
            return
        self._probing = True
        self._probe_at = time.monotonic() + PROBE_S

        async def probe() -> None:
            try:
                ok = await self._shared.check()
            except Exception:  # noqa: BLE001 - still down
                ok = False
            finally:
                self._probing = False
            if ok and self._fell_back:
                self.storage = self._shared
                self.limiter = self._strategy(self.storage)
                self._fell_back = False
                report_up(
                    self.storage_uri,
                    "rate-limit storage (counting in this process)",
                )

        task = asyncio.get_running_loop().create_task(probe())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stats(self) -> dict[str, Any]:
        """`{storage, strategy, allowed, refused: {scope: n}, fell_back}` for status pages and metrics."""
        return {
            "storage": shown_uri(self.storage_uri),
            "strategy": self.settings.strategy,
            "allowed": self.allowed,
            "refused": dict(self.refused),
            "fell_back": self._fell_back,
        }
