"""Session admission on the Streamable HTTP front: bounded per client, and nobody is locked out.

The SDK's session manager keeps up to `max_sessions` handshake-era sessions and answers 503
"Too many open sessions" to every new client once they are all taken, until sessions expire
(issue 10: 10,000 `initialize` requests in 21 s locked every later client out for up to an hour).
`SessionGuard` sits in front of it (the SDK's own cap is turned off) and admits every new
session, making room first:

* a client over `max_sessions_per_client` ends its own least-recently-used idle session;
* at `max_sessions`, the least-recently-used idle session of the client holding the most ends.

Idle means no request in flight on the session (an open GET stream counts as one), so a
connected client that listens for notifications is never evicted; sessions that never made a
request after `initialize` (abandoned handshakes) go first. Only when every candidate is busy is
the new session refused (503), and only to the client over its cap or, at the global cap, to
the one asking. A client is its principal when the auth layer has set one in
`scope["mcpopt.principal"]`, else its address (uvicorn honours `X-Forwarded-For` from a proxy
on 127.0.0.1). An evicted session answers 404 and its client starts a new one (MCP transports:
"Session Management").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
from mcp_types import INTERNAL_ERROR

from mcpopt.asgi import header_map

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

PRINCIPAL_SCOPE_KEY = "mcpopt.principal"
"""Where an authentication layer puts the caller's principal (anything with a stable `str()`, or an
`id`/`name` attribute) in the ASGI scope; the session guard then counts sessions per principal."""


@dataclass(slots=True)
class _Held:
    client: str
    inflight: int = 0
    uses: int = 0
    last: float = 0.0


def client_key(scope: Scope) -> str:
    """Who holds a session: `principal:<id>` when authenticated, else `addr:<client address>`."""
    principal = scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is not None:
        ident = getattr(principal, "id", None) or getattr(principal, "name", None) or principal
        return f"principal:{ident}"
    client = scope.get("client")
    return f"addr:{client[0]}" if client else "addr:?"


class SessionGuard:
    """ASGI layer: admits new handshake-era sessions by evicting idle ones (see the module doc).

    Args:
        app: the next ASGI app (the MCP endpoint).
        manager: the SDK's `StreamableHTTPSessionManager` (its `_server_instances` is the truth
            about which sessions exist), built with `max_sessions=None`.
        max_sessions: sessions at once, all clients.
        max_sessions_per_client: sessions one client may hold.
        path: the MCP endpoint's path.
    """

    def __init__(self, app: Any, manager: Any, *, max_sessions: int, max_sessions_per_client: int, path: str) -> None:
        self.app = app
        self.manager = manager
        self.max_sessions = max_sessions
        self.per_client = max_sessions_per_client
        self.path = path
        self.held: dict[str, _Held] = {}
        self.opening: dict[str, int] = {}
        """`initialize` requests being served per client (sessions about to exist)."""
        self.evicted = 0
        """Sessions ended to make room (for status pages and tests)."""
        self.refused = 0
        self.parked: dict[str, float] = {}
        """Parked sessions (`mcpopt.gateway.parking`): id -> when its record expires. They count
        toward `max_sessions` and are evicted like idle live ones (their record is dropped)."""
        self.on_evict: Callable[[str], Awaitable[None]] | None = None
        """Called with an evicted session's id (drops its record, so it cannot be resumed)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        sid = session_id_of(scope)
        if sid is not None:
            held = self.held.get(sid)
            if held is None:
                return await self.app(scope, receive, send)
            held.inflight += 1
            held.uses += 1
            try:
                return await self.app(scope, receive, send)
            finally:
                held.inflight -= 1
                held.last = time.monotonic()
                if scope["method"] == "DELETE":
                    self._forget_if_gone(sid)
        if scope["method"] != "POST" or not _is_initialize(scope.get("mcpopt.message")):
            return await self.app(scope, receive, send)
        who = client_key(scope)
        refusal = await self._make_room(who)
        if refusal is not None:
            self.refused += 1
            return await refuse(send, refusal)
        self.opening[who] = self.opening.get(who, 0) + 1
        pending = [True]
        try:
            await self.app(scope, receive, self._watch(send, who, pending))
        finally:
            if pending[0]:
                self._opened(who)

    def _opened(self, who: str) -> None:
        left = self.opening.get(who, 1) - 1
        if left:
            self.opening[who] = left
        else:
            self.opening.pop(who, None)

    def _watch(self, send: Send, who: str, pending: list[bool]) -> Send:
        """Record the session an `initialize` answer opens (its `mcp-session-id` on a 2xx)."""

        async def watched(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                if pending[0]:
                    pending[0] = False
                    self._opened(who)
                if message.get("status", 500) < 400:
                    for key, value in message.get("headers", ()):
                        if key.lower() == b"mcp-session-id":
                            self.held[value.decode("latin-1")] = _Held(who, last=time.monotonic())
                            break
            await send(message)

        return watched

    def adopt(self, sid: str, who: str) -> None:
        """Admit a session opened outside `initialize` (resumed from the shared store) as `who`'s."""
        self.held.setdefault(sid, _Held(who, last=time.monotonic()))

    def _live(self) -> dict[str, Any]:
        return self.manager._server_instances  # noqa: SLF001 - the SDK keeps no public view

    def _forget_if_gone(self, sid: str) -> None:
        if sid not in self._live() and sid not in self.parked:
            self.held.pop(sid, None)

    def _prune(self) -> None:
        live, parked = self._live(), self.parked
        for sid in [s for s in self.held if s not in live and s not in parked]:
            del self.held[sid]

    async def _make_room(self, who: str) -> str | None:
        """Evict what must go for `who` to open one more session; the refusal text if nothing can."""
        live = self._live()
        if len(self.held) > len(live) + len(self.parked):
            self._prune()
        own = [sid for sid, h in self.held.items() if h.client == who]
        if len(own) + self.opening.get(who, 0) >= self.per_client:
            victim = self._pick(own)
            if victim is None:
                return (
                    f"Too many open sessions for this client: {len(own)} (gateway.http.max_sessions_per_client), "
                    "all with a request in flight; end one (HTTP DELETE) or retry later"
                )
            await self._evict(victim, "its client opened more than gateway.http.max_sessions_per_client")
        if len(live) + len(self.parked) + sum(self.opening.values()) >= self.max_sessions:
            counts: dict[str, int] = {}
            for h in self.held.values():
                counts[h.client] = counts.get(h.client, 0) + 1
            by_weight = sorted(counts, key=lambda c: -counts[c])
            for client in by_weight:
                victim = self._pick([sid for sid, h in self.held.items() if h.client == client])
                if victim is not None:
                    await self._evict(victim, "the gateway is at gateway.http.max_sessions")
                    break
            else:
                if len(live) + len(self.parked) + sum(self.opening.values()) >= self.max_sessions:
                    return (
                        f"Too many open sessions: {len(live) + len(self.parked)} (gateway.http.max_sessions), "
                        "all with a request "
                        "in flight; retry later"
                    )
        return None

    def _pick(self, sids: list[str]) -> str | None:
        """The idle session to end first: one never used after `initialize`, else the least recently used."""
        best: tuple[bool, float] | None = None
        victim = None
        for sid in sids:
            h = self.held[sid]
            if h.inflight:
                continue
            rank = (h.uses > 0, h.last)
            if best is None or rank < best:
                best, victim = rank, sid
        return victim

    async def _evict(self, sid: str, why: str) -> None:
        self.held.pop(sid, None)
        transport = self._live().get(sid)
        if transport is None:
            if self.parked.pop(sid, None) is not None:  # a parked session is only its record
                self.evicted += 1
                logger.info("ending parked MCP session %s: %s", sid[:12], why)
                if self.on_evict is not None:
                    await self.on_evict(sid)
            return
        self.evicted += 1
        logger.info("ending idle MCP session %s: %s", sid[:12], why)
        await self.manager._discard_session(sid, transport)  # noqa: SLF001 - forgets it, terminates it
        idle = transport.idle_scope
        if idle is not None:
            idle.cancel()  # ends its server task now rather than at the idle timeout
        if self.on_evict is not None:
            await self.on_evict(sid)  # its record too: an evicted session is not resumed anywhere


def discard_only_own(manager: Any) -> None:
    """Make the SDK manager's `_discard_session(sid, transport)` forget `sid` only while `transport`
    is the one listed under it; another transport is only terminated. Idempotent.

    The SDK forgets by id alone, and each session's server task calls it once more when it winds
    down (`finally`), some loop turns after the session was discarded and its idle scope
    cancelled. A session that is parked (`mcpopt.gateway.parking`), or evicted while its record
    stays in Redis (`SessionGuard`; it may be live on another replica), and then resumed under the
    same id at once is listed under that id with a new transport by then: the old task's late
    call took the new one away, and the request that had
    just resumed it was answered 404 "Session not found" (issue 15, the saturated-suite flake in
    `test_parked_sessions_count_toward_max_sessions_and_are_evicted_as_records`). Re-hydration
    (`SharedSessions`) is what reuses ids, so it installs this.
    """
    if getattr(manager, "_mcpopt_discard_only_own", False):
        return
    forget = manager._discard_session  # noqa: SLF001

    async def discard(session_id: str, transport: Any) -> None:
        if manager._server_instances.get(session_id) is transport:  # noqa: SLF001
            await forget(session_id, transport)
        elif not transport.is_terminated:
            with anyio.CancelScope(shield=True):  # as the SDK's: completes even while the caller is cancelled
                await transport.terminate()

    manager._discard_session = discard  # noqa: SLF001
    manager._mcpopt_discard_only_own = True  # noqa: SLF001


def session_id_of(scope: Scope) -> str | None:
    """The request's `Mcp-Session-Id` (None: none), scanned once per request and kept in the scope
    for the other edge layers (the session guard and the shared-session layer both need it)."""
    if SID_SCOPE_KEY in scope:
        return scope[SID_SCOPE_KEY]  # type: ignore[no-any-return]
    raw = header_map(scope).get(b"mcp-session-id")
    sid = raw.decode("latin-1") if raw is not None else None
    scope[SID_SCOPE_KEY] = sid
    return sid


SID_SCOPE_KEY = "mcpopt.session_id"


def _is_initialize(msg: Any) -> bool:
    return isinstance(msg, dict) and msg.get("method") == "initialize"


async def refuse(send: Send, message: str) -> None:
    """Answer HTTP 503 with a JSON-RPC error (code -32603) carrying `message` (the session guard's refusal)."""
    body = orjson.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": INTERNAL_ERROR, "message": message}})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 503, "headers": [*headers, (b"retry-after", b"5")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
