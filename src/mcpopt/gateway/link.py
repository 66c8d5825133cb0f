"""How the gateway reaches the client behind one request (`ClientLink`), and calls in flight (`Caller`).

These are plain data: the fronts build a `ClientLink` per request, the dispatcher and every plugin
(gateway tools, discovery, code mode, workflows) pass it along, and nothing here knows the
`Gateway` class.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mcp.server.connection import Connection

ProgressFn = Callable[[float, float | None, str | None], Awaitable[None]]
"""`async (progress, total, message)`: relays one progress notification to the client."""


async def no_progress(progress: float, total: float | None, message: str | None) -> None:
    """A progress relay that drops everything (a caller that asked for no progress)."""
    return None


@dataclass(slots=True)
class ClientLink:
    """How the gateway reaches the client behind one request.

    Attributes:
        version: the protocol version the client speaks on this request.
        connection: the SDK `Connection` (None when not known).
        requests: has `send_raw_request(method, params, opts)` for server-to-client requests,
            or None when the client cannot take requests (2026-07-28, or no back-channel).
        notify: `async (method, params)` sending a notification tied to this request.
        relay: builds the progress relay for the client's progress token.
        partition: the caller's auth partition: results are never shared across partitions.
        session_id: an id of the client's connection (sticky routing, telemetry).
        principal: who is calling (None on a front without authentication, e.g. stdio).
    """

    version: str
    connection: Connection | None
    requests: Any
    notify: Callable[..., Awaitable[None]] | None
    relay: Callable[[Any], ProgressFn]
    partition: str = ""
    session_id: str = ""
    principal: Any = None


@dataclass(slots=True)
class Caller:
    """A client call in flight to an upstream: where that upstream's requests and logs go."""

    modern: bool
    requests: Any
    notify: Callable[..., Awaitable[None]] | None
    log_level: str | None
    """The lowest level of log messages this client wants (None: none)."""


def session_id_of(conn: Connection | None) -> str:
    """The client connection's id: the Streamable HTTP session id, else one per connection object."""
    if conn is None:
        return ""
    return conn.session_id or f"conn-{id(conn):x}"


def partition_of(authorization: str | None) -> str:
    """A caller's auth partition: BLAKE2b-64 of its Authorization header ("" without one).

    Cached and coalesced results are never shared across partitions.
    """
    return hashlib.blake2b(authorization.encode(), digest_size=8).hexdigest() if authorization else ""
