"""Why a request was not authenticated or authorized, in RFC 6750 terms.

`AuthError` becomes HTTP 401 and `InsufficientScope` HTTP 403, each with a
`WWW-Authenticate: Bearer ...` challenge (`mcpopt.auth.metadata.challenge`). Messages say what
was wrong with the credential and never echo it.
"""

from __future__ import annotations

from mcpopt.errors import McpoptError


class AuthError(McpoptError):
    """The request carries no usable credential (HTTP 401).

    Attributes:
        error: the RFC 6750 §3.1 error code: `invalid_token` (expired, revoked, malformed, wrong
            audience or issuer, bad signature, unknown key), `invalid_request` (malformed
            Authorization header), or None when no credential was sent at all (§3: then the
            challenge carries no error code).
        description: one sentence for people (the `error_description`).
    """

    status = 401

    def __init__(self, description: str, error: str | None = "invalid_token") -> None:
        super().__init__(description)
        self.error = error
        self.description = description


class AuthUnavailable(AuthError):
    """The credential cannot be checked now: the authorization server (metadata, keys,
    introspection) is unreachable (HTTP 503 with `Retry-After`, no challenge: the client's token
    may well be valid, so it must not be sent to get another)."""

    status = 503
    retry_after_s = 5

    def __init__(self, description: str) -> None:
        super().__init__(description, error="temporarily_unavailable")


class InsufficientScope(McpoptError):
    """The credential is valid but lacks scopes (HTTP 403, `error="insufficient_scope"`).

    Attributes:
        scopes: the scopes the request needs (the challenge's `scope` parameter; the MCP
            authorization spec's step-up flow has the client ask for them).
    """

    status = 403
    error = "insufficient_scope"

    def __init__(self, scopes: list[str], description: str | None = None) -> None:
        self.scopes = list(scopes)
        self.description = description or f"this request needs the scope(s): {' '.join(self.scopes)}"
        super().__init__(self.description)
