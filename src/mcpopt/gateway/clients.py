"""The clients connected to the gateway: their connections, log levels, subscriptions, calls in flight.

Upstream events fan out from here: a `list_changed` goes to every handshake-era connection (a
2026-07-28 client hears of it on its `subscriptions/listen` stream instead), `resources/updated`
to the connections subscribed to that URI, a log message to the client whose call is in flight
(or, between calls, to every handshake-era connection at or above its level), and an upstream's
server-to-client request (sampling, elicitation, roots) to the client whose call is in flight.
Connections are held weakly: a client that goes away is forgotten with its `Connection`.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import anyio
from mcp.server.connection import Connection

from mcpopt.api import Caller
from mcpopt.gateway.eras import MODERN

logger = logging.getLogger(__name__)

LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
"""MCP's logging levels in RFC 5424 severity order (spec: server/utilities/logging)."""
NOTIFY_TIMEOUT_S = 2.0
"""A notification to a client that does not read within this long is given up (that client only)."""


def level_at_least(level: str, minimum: str | None) -> bool:
    """True when `level` is at or above `minimum` (None: the client wants no messages)."""
    if minimum is None:
        return False
    try:
        return LEVELS.index(level) >= LEVELS.index(minimum)
    except ValueError:
        return True


async def notify(conn: Connection, method: str, params: dict[str, Any] | None) -> None:
    """Send a notification on a connection's standalone channel; a gone or stuck client is skipped."""
    if not conn.has_standalone_channel:
        return
    try:
        with anyio.move_on_after(NOTIFY_TIMEOUT_S):
            await conn.outbound.notify(method, params)
    except Exception as exc:  # noqa: BLE001 - a gone client must not break the gateway
        logger.debug("notification %s to a client failed: %s", method, exc)


class Clients:
    """Registry of client connections and of the calls in flight to each upstream.

    Args:
        servers: the upstream names (one list of callers each).
    """

    def __init__(self, servers: list[str]) -> None:
        self.connections: weakref.WeakKeyDictionary[Connection, None] = weakref.WeakKeyDictionary()
        self.latest: Connection | None = None
        """The last client connection seen (on the stdio front, the only one)."""
        self._levels: weakref.WeakKeyDictionary[Connection, str] = weakref.WeakKeyDictionary()
        self._subscriptions: dict[str, weakref.WeakSet[Connection]] = {}
        self._owners: weakref.WeakKeyDictionary[Connection, str] = weakref.WeakKeyDictionary()
        """The owner key of a connection's isolated sessions, noted when it subscribes."""
        self._owner_conns: dict[str, weakref.ref[Connection]] = {}
        """Owner key -> its latest connection: where an isolated session's requests go between calls."""
        self._callers: dict[str, list[Caller]] = {name: [] for name in servers}

    # ---- connections ----------------------------------------------------------------------
    def seen(self, conn: Connection) -> None:
        """Note a connection on each request (cheap: a dict lookup once known)."""
        if conn not in self.connections:
            self.connections[conn] = None
        self.latest = conn

    def forget(self, conn: Connection) -> None:
        """Drop `conn` (its session ended here: parked, `mcpopt.gateway.parking`), so nothing
        reaches it or mistakes it for the session's current connection."""
        self.connections.pop(conn, None)
        self._levels.pop(conn, None)
        self._owners.pop(conn, None)
        for subs in self._subscriptions.values():
            subs.discard(conn)
        if self.latest is conn:
            self.latest = None

    def by_session_id(self, session_id: str) -> Connection | None:
        """The connection of a Streamable HTTP session (None when the gateway has not seen it)."""
        for conn in list(self.connections):
            if conn.session_id == session_id:
                return conn
        return None

    def note_owner(self, owner: str, conn: Connection | None) -> None:
        """Remember `conn` as `owner`'s latest connection (cheap when unchanged)."""
        if conn is None:
            return
        ref = self._owner_conns.get(owner)
        if ref is not None and ref() is conn:
            return
        if len(self._owner_conns) > 4 * len(self.connections) + 64:  # forget owners whose connections are gone
            self._owner_conns = {k: r for k, r in self._owner_conns.items() if r() is not None}
        self._owner_conns[owner] = weakref.ref(conn)

    def owner_connection(self, owner: str) -> Connection | None:
        """The latest live connection of `owner`, if any."""
        ref = self._owner_conns.get(owner)
        return ref() if ref is not None else None

    def log_level(self, conn: Connection | None) -> str:
        """A handshake-era connection's `logging/setLevel` (default: debug, everything)."""
        return self._levels.get(conn, "debug") if conn is not None else "debug"

    def set_log_level(self, conn: Connection, level: str) -> None:
        self._levels[conn] = level

    async def broadcast(self, method: str, params: dict[str, Any] | None) -> None:
        """A notification to every handshake-era connection (2026-07-28 clients listen instead)."""
        for conn in list(self.connections):
            if conn.protocol_version not in MODERN:
                await notify(conn, method, params)

    # ---- subscriptions --------------------------------------------------------------------
    def subscribe(self, uri: str, conn: Connection, owner: str = "") -> None:
        """Note `conn`'s subscription to `uri`; `owner`: the key of the isolated session holding it."""
        self._subscriptions.setdefault(uri, weakref.WeakSet()).add(conn)
        if owner:
            self._owners[conn] = owner

    def unsubscribe(self, uri: str, conn: Connection) -> bool:
        """Drop a subscription; True when nobody is subscribed to `uri` any more."""
        subs = self._subscriptions.get(uri)
        if subs is None:
            return False
        subs.discard(conn)
        if subs:
            return False
        del self._subscriptions[uri]
        return True

    def session_state(self, conn: Connection) -> tuple[str | None, list[str], str]:
        """What a replica must know of `conn` to serve it: its explicit `logging/setLevel` (None when
        never set), the URIs it is subscribed to (sorted) and the owner key of those subscriptions."""
        uris = sorted(uri for uri, subs in self._subscriptions.items() if conn in subs)
        return self._levels.get(conn), uris, self._owners.get(conn, "")

    async def resource_updated(self, uri: str, owner: str | None = None) -> None:
        """Tell the connections subscribed to `uri`; with `owner`, only that owner's (an isolated
        session's update is its owner's alone)."""
        for conn in list(self._subscriptions.get(uri, ())):
            if owner is not None and self._owners.get(conn, "") != owner:
                continue
            await notify(conn, "notifications/resources/updated", {"uri": uri})

    # ---- calls in flight ------------------------------------------------------------------
    @contextlib.contextmanager
    def calling(self, server: str, caller: Caller) -> Iterator[None]:
        """Mark `caller` as in flight to `server` for the block (where its requests and logs go).

        `server` is a server name, or `mcpopt.gateway.owners.caller_key(server, owner)` for an
        owner's isolated session (those lists come and go with their calls)."""
        callers = self._callers.get(server)
        if callers is None:
            callers = self._callers[server] = []
        callers.append(caller)
        try:
            yield
        finally:
            callers.remove(caller)
            if not callers and "\0" in server:
                self._callers.pop(server, None)

    def callers_of(self, server: str) -> list[Caller]:
        """The live list of calls in flight to `server` (the hot path appends and removes itself);
        for an owner's key (`caller_key`) made on first use, and dropped with `drop_callers`."""
        callers = self._callers.get(server)
        if callers is None:
            callers = self._callers[server] = []
        return callers

    def drop_callers(self, key: str) -> None:
        """Forget an owner's empty list of calls in flight (owner keys come and go)."""
        if not self._callers.get(key, True):
            del self._callers[key]

    def callers(self, server: str) -> list[Caller]:
        """Calls in flight to `server`, oldest first."""
        return self._callers.get(server) or []

    async def log(self, server: str, level: str, data: dict[str, Any], *, broadcast: bool = True) -> None:
        """Route an upstream's log message: to the call in flight, else (`broadcast`) to every
        handshake-era connection; an isolated session's messages between calls are dropped."""
        callers = self._callers.get(server)
        if callers:
            # A message during a call belongs to that call: it rides the call's own stream.
            caller = callers[-1]
            if caller.notify is not None and level_at_least(level, caller.log_level):
                with contextlib.suppress(Exception):
                    await caller.notify("notifications/message", data)
            return
        if not broadcast:
            return
        for conn in list(self.connections):
            if conn.protocol_version not in MODERN and level_at_least(level, self.log_level(conn)):
                await notify(conn, "notifications/message", data)

    async def notify_callers_or_all(self, server: str, method: str, params: dict[str, Any] | None) -> None:
        """A notification from `server` to the handshake-era client whose call to it is in flight,
        else to every handshake-era connection (2026-07-28 callers are skipped)."""
        for caller in reversed(self._callers.get(server) or []):
            if not caller.modern and caller.notify is not None:
                with contextlib.suppress(Exception):
                    await caller.notify(method, params)
                return
        await self.broadcast(method, params)
