"""Request-header normalisation on the HTTP front, before anything reads a header.

RFC 9110 section 5.5: a field value does not include leading or trailing whitespace ("OWS"), and
"a field parsing implementation MUST exclude such whitespace prior to evaluating the field value".
uvicorn's default parser (httptools / llhttp) strips the leading whitespace but keeps the trailing
one, so a client that sends `Mcp-Name: tool ` (legal on the wire) reached the SDK's 2026-07-28
header checks as `b"tool "` and was refused with HTTP 400 and -32020 HeaderMismatch (SEP-2243;
the conformance suite's `ServerAcceptsWhitespaceHeaderValue`). h11 strips both ends; this layer
makes every parser behave like h11, for every route (`/mcp`, `/healthz`, `/metrics`, ...).

Cost: one pass over the header list per request; the scope is copied only when a value actually
has surrounding whitespace.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_OWS = b" \t"
_OWS_BYTES = frozenset(_OWS)


class HeaderNormalizer:
    """ASGI middleware: strips optional whitespace (SP, HTAB) around every request header value.

    Args:
        app: the ASGI app to call with the normalised scope (HTTP and WebSocket; others untouched).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = scope.get("headers")
            if headers and _needs_trim(headers):
                scope = {**scope, "headers": [(name, value.strip(_OWS)) for name, value in headers]}
        await self.app(scope, receive, send)


def _needs_trim(headers: list[tuple[bytes, bytes]]) -> bool:
    for _, value in headers:
        if value and (value[0] in _OWS_BYTES or value[-1] in _OWS_BYTES):
            return True
    return False
