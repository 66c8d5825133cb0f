"""Authentication, policy and rate limits for a gateway a team shares (issue 10).

- `Authenticator` (`tokens`): a credential -> a `Principal` (JWT against the issuer's JWKS,
  RFC 7662 introspection for opaque tokens, hashed static API keys).
- `AuthMiddleware` (`asgi`): the ASGI layer of the HTTP front: RFC 9728 metadata, 401/403 with
  `WWW-Authenticate` challenges, the principal attached to the request.
- `Principal`, `LOCAL` (`principal`): who is calling; `LOCAL` is the trusted local user (stdio).
- `Policy`, `Grant`, `Decision` (`policy`): which servers, tools, prompts and resources a
  principal may see and call; its exposure mode, code mode and limits.
- `RateLimiter`, `RateLimited` (`ratelimit`): rate limits and quotas on the `limits` library.
"""

from mcpopt.auth.errors import AuthError, InsufficientScope
from mcpopt.auth.policy import Decision, Grant, Policy
from mcpopt.auth.principal import LOCAL, Principal
from mcpopt.auth.ratelimit import RATE_LIMITED, RateLimited, RateLimiter

__all__ = [
    "LOCAL",
    "RATE_LIMITED",
    "AuthError",
    "Decision",
    "Grant",
    "InsufficientScope",
    "Policy",
    "Principal",
    "RateLimited",
    "RateLimiter",
]
