"""The fronts' edge settings: the HTTP edge and the stdio limits, inbound authentication
(introspection, API keys) and the access policy (`gateway.http`, `gateway.stdio`, `gateway.auth`,
`gateway.policy`).
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mcpopt.config.servers import StrictModel


class HttpEdgeSettings(StrictModel):
    """The HTTP front's edge (`gateway.http`): which Host/Origin it answers, connection and session limits.

    Sources for the defaults: the MCP transport spec (Streamable HTTP, "Security Warning": validate
    Origin, 403 when invalid; bind to localhost), nginx's `client_header_timeout` /
    `client_body_timeout` (60 s) and Apache's `mod_reqtimeout` (header 20 s) for the read deadlines,
    and the SDK's own `max_request_body_size` (4 MiB).
    """

    allowed_hosts: list[str] = Field(default_factory=list)
    """Host header values accepted besides localhost forms, the bound address, the machine's name and
    the address a request arrived on; `name:*` accepts any port; `"*"` turns the Host check off."""
    allowed_origins: list[str] = Field(default_factory=list)
    """Origin values accepted besides those whose host passes the Host check (`http://name:*` for any
    port); `"*"` accepts any Origin. A request without Origin (not a browser) is always accepted."""
    allow_unauthenticated: bool = False
    """Serve a non-loopback `--host` without `gateway.auth` (same as `--allow-unauthenticated`)."""
    max_connections: int = Field(1000, ge=1)
    """Open connections at once; at the cap a new one closes the oldest that is still sending its
    request head (then the oldest idle keep-alive one). Lowered to fit the process's file limit."""
    header_timeout_ms: int = Field(20_000, gt=0)
    """A request head (request line and headers) must arrive within this, from the connection's
    first byte or the previous response (else 408 and close)."""
    body_timeout_ms: int = Field(60_000, gt=0)
    """A request body must arrive within this after its head (else the connection is closed)."""
    keep_alive_timeout_ms: int = Field(5_000, gt=0)
    """Idle keep-alive connections close after this (uvicorn's `timeout_keep_alive`)."""
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    """Largest request head (else 431 and close)."""
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Largest request body (else 413)."""
    max_sessions: int = Field(1000, ge=1)
    """Open MCP sessions (handshake era) at once; at the cap a new session ends the least recently
    used idle session of the client holding the most."""
    max_sessions_per_client: int = Field(100, ge=1)
    """Sessions one client (its principal when authenticated, else its address) may hold; over it, its
    own least recently used idle session ends."""
    session_idle_timeout_ms: int = Field(600_000, gt=0)
    """A session without a request in flight (or an open GET stream) for this long ends (404 after).
    With `gateway.shared.redis_url` it is also the sliding TTL of the session's record in Redis."""
    session_park_ms: int = Field(45_000, ge=0)
    """A session idle this long (no request in flight, no GET stream, nothing pending) parks: its SDK
    transport, dispatcher and tasks end, a record of a few hundred bytes stays (in Redis with
    `gateway.shared.redis_url`) and its next request resumes it under the same id, initialized,
    with its log level and subscriptions (`mcpopt.gateway.parking`). 0: sessions never park."""
    drain_timeout_ms: int = Field(30_000, ge=0)
    """On SIGTERM, `/healthz` answers 503 and new MCP requests 503 (`Retry-After`); requests in
    flight get this long to finish before the process exits (Kubernetes' default grace is 30 s)."""


class StdioEdgeSettings(StrictModel):
    """The stdio front's limits (`gateway.stdio`)."""

    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """Longest JSON-RPC line read from the client; a longer one is discarded unread and answered
    with -32600 (with its id when the line starts with it)."""
    max_inflight: int = Field(256, ge=1)
    """Requests being served at once; reading pauses beyond it."""
    output_high_water_bytes: int = Field(1024 * 1024, ge=64 * 1024)
    """Bytes waiting to be written to a client that does not read; reading pauses above it."""


RateLimitList = list[str]
"""Rate limits in the `limits` library's notation, e.g. `["10/second", "1000/hour", "20000/day"]`
(a long window is a quota); every one of them must allow a call."""


def check_limits(value: list[str]) -> list[str]:
    """`value` (rate limits in the `limits` library's notation), unchanged when every one parses;
    raises `ValueError` naming the first that does not (a validator of the settings models)."""
    from limits import parse_many

    for item in value:
        try:
            parse_many(item)
        except ValueError:
            raise ValueError(f"{item!r} is not a rate limit: expected e.g. '10/second' or '1000 per hour'") from None
    return value


class IntrospectionSettings(StrictModel):
    """RFC 7662 token introspection for opaque (non-JWT) access tokens (`gateway.auth.introspection`)."""

    endpoint: str | None = None
    """The introspection endpoint (default: `introspection_endpoint` of the issuer's metadata)."""
    client_id: str
    """The gateway's own client id at the authorization server (client_secret_basic authentication)."""
    client_secret_env: str | None = None
    """The environment variable holding the client secret (never put the secret in the file)."""
    client_secret_file: str | None = None
    """Or a file holding it (e.g. a mounted secret)."""
    cache_s: float = Field(300.0, ge=0)
    """Longest an `active: true` answer is reused (never past the token's `exp`); keyed by SHA-256 of the token."""
    negative_cache_s: float = Field(10.0, ge=0)
    """How long an `active: false` answer is reused (a flood of bad tokens costs one request each this often)."""
    timeout_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _one_secret(self) -> IntrospectionSettings:
        if bool(self.client_secret_env) == bool(self.client_secret_file):
            raise ValueError("give exactly one of client_secret_env or client_secret_file")
        return self


class ApiKeySettings(StrictModel):
    """Static API keys (`gateway.auth.api_keys`): stored as SHA-256 hashes, never in clear.

    Lines of the form `<name> sha256:<64 hex digits> [scope ...]` (`mcpopt auth new-key NAME` prints
    one), from `file` (one per line, `#` comments) and/or the environment variable `env` (lines or
    comma-separated). A client sends the key as `Authorization: Bearer <key>` or `X-API-Key: <key>`.
    """

    file: str | None = None
    env: str | None = "MCPOPT_API_KEYS"
    """Environment variable with more key lines (unset or empty: none)."""


class AuthSettings(StrictModel):
    """Inbound authentication on the HTTP front (`gateway.auth`), per the MCP authorization spec:
    the gateway is an OAuth 2.1 resource server (RFC 9728 metadata, RFC 6750 bearer tokens,
    RFC 8707 audience). Off unless `issuer`, `jwks_uri`, `introspection` or API keys are set.
    stdio is always the trusted local user.
    """

    resource: str | None = None
    """The gateway's resource URL as clients reach it (e.g. `https://mcp.example.com/mcp`): the audience
    tokens must carry, and the `resource` of the protected-resource metadata (default:
    `http://<host>:<port>/mcp` of `serve`)."""
    issuer: str | None = None
    """The authorization server's issuer URL (its metadata gives `jwks_uri` and the introspection endpoint)."""
    jwks_uri: str | None = None
    """Where the signing keys are (default: from the issuer's metadata)."""
    audience: list[str] = Field(default_factory=list)
    """Accepted `aud` values (default: `[resource]`)."""
    algorithms: list[str] = Field(
        default_factory=lambda: ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]
    )
    """Accepted JWS algorithms (never `none`, never HMAC with a public key)."""
    leeway_s: float = Field(30.0, ge=0, le=600)
    """Clock skew tolerated on `exp` / `nbf` / `iat` (seconds)."""
    required_scopes: list[str] = Field(default_factory=list)
    """Scopes every request needs (403 `insufficient_scope` without them)."""
    scopes_supported: list[str] = Field(default_factory=list)
    """Scopes advertised in the protected-resource metadata (default: `required_scopes`)."""
    groups_claims: list[str] = Field(default_factory=lambda: ["groups", "roles"])
    """JWT / introspection claims read as the principal's groups or roles (strings or lists)."""
    jwks_refresh_min_s: float = Field(30.0, ge=0)
    """On an unknown `kid`, the key set is fetched again at most this often (a flood of forged kids
    costs the IdP one request per interval)."""
    jwks_max_age_s: float = Field(3600.0, gt=0)
    """Keys are re-fetched in the background after this long."""
    introspection: IntrospectionSettings | None = None
    api_keys: ApiKeySettings = Field(default_factory=lambda: ApiKeySettings())
    resource_name: str | None = None
    """Human-readable name in the protected-resource metadata."""
    timeout_s: float = Field(5.0, gt=0)
    """Timeout of requests to the authorization server (metadata, keys)."""

    @property
    def enabled(self) -> bool:
        """True when HTTP clients must authenticate: an issuer, a key set, introspection or API keys is set."""
        if self.issuer or self.jwks_uri or self.introspection is not None:
            return True
        return bool(self.api_keys.file) or bool(self.api_keys.env and os.environ.get(self.api_keys.env))

    @field_validator("algorithms")
    @classmethod
    def _safe_algorithms(cls, value: list[str]) -> list[str]:
        bad = [a for a in value if a.lower() == "none" or a.upper().startswith("HS")]
        if bad:
            raise ValueError(f"asymmetric JWS algorithms only (got {', '.join(bad)})")
        return value


class PrincipalMatch(StrictModel):
    """Who a policy rule is for: each key given must match (any of its values); no key: everyone."""

    subjects: list[str] = Field(default_factory=list)
    """`sub` globs (for API keys: `apikey:<name>`)."""
    groups: list[str] = Field(default_factory=list)
    """Group / role names (from `auth.groups_claims`)."""
    scopes: list[str] = Field(default_factory=list)
    """Token scopes."""
    api_keys: list[str] = Field(default_factory=list)
    """API key names (globs)."""
    client_ids: list[str] = Field(default_factory=list)
    """OAuth client ids (`client_id` / `azp` claims; globs)."""
    issuers: list[str] = Field(default_factory=list)


class PolicyRule(StrictModel):
    """What the principals matching `match` may use (`gateway.policy.rules[]`).

    Every matching rule grants its servers and tools (a union); `exposure`, `code_mode` and
    `rate_limits` come from the first matching rule that sets them.
    """

    name: str = ""
    match: PrincipalMatch = Field(default_factory=lambda: PrincipalMatch())
    servers: list[str] = Field(default_factory=lambda: ["*"])
    """Server-name globs whose tools, prompts and resources are granted."""
    tools: list[str] = Field(default_factory=lambda: ["*"])
    """Gateway tool-name globs (e.g. `time__*`) granted among those servers' tools."""
    deny_tools: list[str] = Field(default_factory=list)
    """Tool-name globs this rule does not grant, though `tools` matches them."""
    admin: bool = False
    """May call the gateway's administrative tools (`policy.admin_tools`)."""
    exposure: Literal["full", "search", "code"] | None = None
    code_mode: bool | None = None
    """May call `execute_code` (default: only where its exposure is `code`)."""
    rate_limits: RateLimitList = Field(default_factory=list)
    """Per principal, all its calls together (overrides `limits.per_principal`)."""

    @field_validator("rate_limits")
    @classmethod
    def _valid_limits(cls, value: list[str]) -> list[str]:
        return check_limits(value)


class PolicySettings(StrictModel):
    """Per-principal policy (`gateway.policy`); read only when `gateway.auth` is on.

    A principal matching no rule gets `default` (out of the box: every upstream tool, not the
    administrative ones); set `default: {servers: []}` to deny by default.
    """

    rules: list[PolicyRule] = Field(default_factory=list)
    default: PolicyRule = Field(default_factory=lambda: PolicyRule(name="default"))
    admin_tools: list[str] = Field(default_factory=lambda: ["cache_purge", "run_performance_benchmark", "*rule*"])
    """The gateway's own tools (name after `{gateway.name}{separator}`, globs) only admins may call."""
    tool_scopes: dict[str, list[str]] = Field(default_factory=dict)
    """Tool-name glob -> scopes a token needs to call it (HTTP 403 `insufficient_scope` naming them)."""
