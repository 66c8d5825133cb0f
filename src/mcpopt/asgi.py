"""The request headers of an ASGI scope, by name, parsed once per request for every HTTP layer.

Each layer of the HTTP front (header normalisation, Host/Origin, authentication, the JSON-RPC
guard, sessions, the `tools/call` fast path) needs a few request headers; each used to walk the
whole header list itself. `header_map` builds the map once and keeps it in the scope, so the
others look their headers up.

Semantics: names as ASGI gives them (lowercase bytes); the *first* value of a repeated header,
as Starlette's `Request.headers[...]` (and so the SDK) reads it. A layer that replaces the
scope's header list (`{**scope, "headers": ...}`) gets a new map: the cached one is tied to the
list it was built from.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

HEADERS_SCOPE_KEY = "mcpopt.headers"
"""Where `header_map` keeps `(the header list, its map)` in the scope."""


def header_map(scope: MutableMapping[str, Any]) -> dict[bytes, bytes]:
    """`{name: first value}` of the scope's request headers (built once per header list).

    Args:
        scope: an ASGI `http` or `websocket` scope (`scope["headers"]`: `[(name, value), ...]`,
            lowercase byte names); a scope without headers gives `{}`.
    """
    headers = scope.get("headers")
    cached = scope.get(HEADERS_SCOPE_KEY)
    if cached is not None and cached[0] is headers:
        return cached[1]  # type: ignore[no-any-return]
    found = dict(reversed(headers if isinstance(headers, list) else list(headers or ())))  # first one wins
    scope[HEADERS_SCOPE_KEY] = (headers, found)
    return found
