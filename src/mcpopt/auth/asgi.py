"""`AuthMiddleware`: the ASGI layer that authenticates every HTTP request once, at the edge.

It wraps the gateway's HTTP app (the `tools/call` fast path and the SDK's Streamable HTTP app):

- `GET /.well-known/oauth-protected-resource[/<resource path>]` is answered here with the RFC 9728
  document (no credential needed; CORS-open so browser clients can read it).
- Every other request must carry a credential (`Authorization: Bearer <JWT | opaque token |
  API key>` or `X-API-Key`): without one, or with one that does not verify, the answer is 401
  with `WWW-Authenticate: Bearer resource_metadata="...", scope="..."` (plus
  `error="invalid_token"` and a description when a credential was sent, RFC 6750 §3.1); a valid
  one lacking `auth.required_scopes` gets 403 `error="insufficient_scope"`. When the authorization
  server cannot be reached to check a credential, the answer is 503 with `Retry-After` (not 401:
  the token may be valid, and a client must not be sent to fetch another).
- `public_paths` (exact paths) are served without a credential; one that is sent is still
  checked and, if valid, attached (so such a route can show more to an authenticated caller).
- An authenticated request goes on with `scope["mcpopt.principal"]` (the `Principal`) and
  `scope["user"]` / `scope["auth"]` set the Starlette way, with a user the SDK's session manager
  understands (`AuthenticatedUser`), so a Streamable HTTP session stays bound to the principal
  that opened it (another principal's request with that session id gets 404).

The client's credential is consumed here and never forwarded: upstream requests are built from
the per-server config (`headers`, `header_files`), not from the client's headers.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, authorization_context
from mcp.server.auth.provider import AccessToken
from starlette.authentication import AuthCredentials

from mcpopt.asgi import header_map
from mcpopt.auth.errors import AuthError, AuthUnavailable, InsufficientScope
from mcpopt.auth.metadata import challenge, metadata_paths, metadata_url, protected_resource_metadata
from mcpopt.auth.principal import Principal
from mcpopt.config import AuthSettings

if TYPE_CHECKING:
    from mcpopt.auth.tokens import Authenticator

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

PRINCIPAL_KEY = "mcpopt.principal"
"""Where the authenticated `Principal` sits in the ASGI scope."""
METADATA_URL_KEY = "mcpopt.resource_metadata"
"""Where the protected-resource metadata URL sits in the ASGI scope (for later challenges)."""


class PrincipalUser(AuthenticatedUser):
    """A Starlette user for the SDK: its `AccessToken` names the principal (client id, issuer,
    subject), which is what the SDK's session manager binds a session to."""

    def __init__(self, principal: Principal) -> None:
        token = AccessToken(
            token="",  # never kept: the SDK compares principals, not tokens
            client_id=principal.client_id or principal.key,
            scopes=sorted(principal.scopes),
            expires_at=int(principal.expires_at) if principal.expires_at else None,
            subject=principal.subject,
            claims={"iss": principal.issuer} if principal.issuer else None,
        )
        super().__init__(token)
        self.principal = principal
        self.session_owner = authorization_context(self)
        """What the SDK binds a session to (computed once: the HTTP front compares it per call)."""


def principal_of(scope: Scope) -> Principal | None:
    """The principal the middleware attached to an ASGI scope (None when unauthenticated)."""
    return scope.get(PRINCIPAL_KEY)


class AuthMiddleware:
    """See the module docstring.

    Args:
        app: the ASGI app to protect.
        settings: `gateway.auth` (must be `enabled`).
        resource: the gateway's resource URL (`auth.resource`, else `http://host:port/mcp`).
        authenticator: a prepared `Authenticator` (default: one built from `settings`).
        public_paths: paths served without a credential (e.g. a liveness probe).
        grant_admin: `(principal) -> bool`: whether its policy grants admin; such a principal is
            attached with `admin=True` (computed once per verified token).
    """

    def __init__(
        self,
        app: Any,
        settings: AuthSettings,
        resource: str,
        *,
        authenticator: Authenticator | None = None,
        public_paths: tuple[str, ...] = (),
        grant_admin: Any = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.resource = resource
        if authenticator is None:
            # PyJWT and cryptography's x509 (~3 MiB, ~90 ms to import) load only where auth is on.
            from mcpopt.auth.tokens import Authenticator

            authenticator = Authenticator(settings, resource)
        self.authenticator = authenticator
        self.public_paths = frozenset(public_paths)
        self.grant_admin = grant_admin
        self.metadata_url = metadata_url(resource)
        self.metadata_paths = frozenset(metadata_paths(resource))
        self.scopes = list(settings.required_scopes)
        servers = [settings.issuer] if settings.issuer else []
        doc = protected_resource_metadata(
            resource, servers, settings.scopes_supported or self.scopes, settings.resource_name
        )
        self._metadata_body = orjson.dumps(doc)
        self._users: dict[int, tuple[Principal, PrincipalUser, AuthCredentials, Principal]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if kind == "websocket":  # MCP has no WebSocket transport here; never an unchecked way in
            await send({"type": "websocket.close", "code": 1008})
            return
        if kind != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in self.metadata_paths:
            await self._metadata(scope, send)
            return
        headers = header_map(scope)
        raw_authorization = headers.get(b"authorization")
        raw_api_key = headers.get(b"x-api-key")
        authorization = raw_authorization.decode("latin-1") if raw_authorization is not None else None
        api_key = raw_api_key.decode("latin-1") if raw_api_key is not None else None
        public = path in self.public_paths
        if public and authorization is None and api_key is None:
            await self.app(scope, receive, send)
            return
        try:
            principal = await self.authenticator.authenticate(authorization, api_key)
            if self.scopes:
                missing = [s for s in self.scopes if s not in principal.scopes]
                if missing:
                    raise InsufficientScope(self.scopes)
        except (AuthError, InsufficientScope) as exc:
            if public:
                await self.app(scope, receive, send)
                return
            await self._refuse(send, exc)
            return
        self._attach(scope, principal)
        await self.app(scope, receive, send)

    def _attach(self, scope: Scope, principal: Principal) -> None:
        entry = self._users.get(id(principal))
        if entry is None or entry[0] is not principal:
            if len(self._users) > 10_000:
                self._users.clear()
            marked = principal
            if self.grant_admin is not None and self.grant_admin(principal):
                marked = dataclasses.replace(principal, admin=True)
            entry = (principal, PrincipalUser(marked), AuthCredentials(sorted(principal.scopes)), marked)
            self._users[id(principal)] = entry
        scope[PRINCIPAL_KEY] = entry[3]
        scope[METADATA_URL_KEY] = self.metadata_url
        scope["user"] = entry[1]
        scope["auth"] = entry[2]

    async def _refuse(self, send: Send, exc: AuthError | InsufficientScope) -> None:
        if isinstance(exc, AuthUnavailable):
            body = orjson.dumps({"error": exc.error, "error_description": exc.description})
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(exc.retry_after_s).encode()),
                (b"cache-control", b"no-store"),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        error: str | None
        if isinstance(exc, InsufficientScope):
            status, error, scopes = 403, exc.error, exc.scopes
        else:
            status, error, scopes = 401, exc.error, self.scopes or list(self.settings.scopes_supported)
        self.authenticator.refused[str(status)] += 1
        header = challenge(self.metadata_url, scopes, error, exc.description)
        body = orjson.dumps({"error": error or "unauthorized", "error_description": exc.description})
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", header.encode("latin-1")),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _metadata(self, scope: Scope, send: Send) -> None:
        cors = [
            (b"access-control-allow-origin", b"*"),
            (b"access-control-allow-methods", b"GET, OPTIONS"),
            (b"access-control-allow-headers", b"mcp-protocol-version, content-type"),
        ]
        if scope["method"] == "OPTIONS":
            await send({"type": "http.response.start", "status": 204, "headers": cors})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        if scope["method"] not in ("GET", "HEAD"):
            headers = [(b"allow", b"GET, HEAD, OPTIONS"), (b"content-length", b"0")]
            await send({"type": "http.response.start", "status": 405, "headers": headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        body = self._metadata_body
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"public, max-age=3600"),
            *cors,
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": body if scope["method"] == "GET" else b"", "more_body": False}
        )

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the lifespan through; close the authenticator's HTTP client when it ends."""
        try:
            await self.app(scope, receive, send)
        finally:
            await self.authenticator.aclose()
