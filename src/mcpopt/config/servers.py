"""One upstream server's entry in `mcpServers`: transport, restart, cache, routing, breaker, retries,
adaptive timeout, health check (`ServerConfig`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TransportName = Literal["stdio", "http", "sse"]

_TRANSPORT_ALIASES = {
    "stdio": "stdio",
    "http": "http",
    "streamable-http": "http",
    "streamable_http": "http",
    "streamablehttp": "http",
    "sse": "sse",
}


class StrictModel(BaseModel):
    """Base of the settings models: unknown keys are errors; fields by name or alias."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RestartPolicy(StrictModel):
    """Restart of a crashed upstream: exponential backoff from `initial_backoff_ms` to `max_backoff_ms`."""

    initial_backoff_ms: int = Field(500, ge=0)
    max_backoff_ms: int = Field(30_000, ge=0)
    enabled: bool = True


class ToolCacheConfig(StrictModel):
    """Per-tool cache policy: a TTL, and optionally a read-only declaration the server omits."""

    ttl_ms: int | None = Field(None, ge=0)
    read_only: bool | None = None
    """Treat the tool as read-only (`readOnlyHint`) even if its annotations don't say so."""


class ServerCacheConfig(StrictModel):
    """Result cache policy of one server.

    A tools/call result is cached only if the tool is read-only (`readOnlyHint: true` or
    declared here) AND a TTL applies (`tools.<name>.ttl_ms`, else `ttl_ms`). Default TTL 0: off.
    `invalidates` maps a tool name (or glob) to the tool-name globs whose cached results a call
    to it drops; without a rule, any non-read-only call drops all of the server's cached reads.
    """

    ttl_ms: int = Field(0, ge=0)
    tools: dict[str, ToolCacheConfig] = Field(default_factory=dict)
    invalidates: dict[str, list[str]] = Field(default_factory=dict)


class RoutingConfig(StrictModel):
    """How calls are spread over a server's replicas."""

    strategy: Literal["round_robin", "least_inflight", "ewma_latency", "weighted", "predictive"] = "least_inflight"
    weights: list[float] = Field(default_factory=list)
    """For `weighted`: one positive weight per replica (default all 1)."""
    sticky_tools: list[str] = Field(default_factory=list)
    """Tool-name globs whose calls from one client session always go to the same replica."""


class BreakerConfig(StrictModel):
    """Circuit breaker per replica: opens after `failure_threshold` consecutive failures,
    stays open `open_ms`, then lets `half_open_max` trial calls through (Nygard, Release It!)."""

    enabled: bool = True
    failure_threshold: int = Field(5, ge=1)
    open_ms: int = Field(5_000, ge=1)
    half_open_max: int = Field(1, ge=1)


class RetryConfig(StrictModel):
    """Retries with exponential backoff and full jitter, only when repeating is safe
    (read-only or idempotent tools, or a request that never reached the server)."""

    attempts: int = Field(3, ge=1, le=10)
    """Total attempts including the first."""
    initial_backoff_ms: int = Field(25, ge=0)
    max_backoff_ms: int = Field(1_000, ge=0)


class AdaptiveTimeoutConfig(StrictModel):
    """Per-tool timeout = clamp(p99 of observed latency x `factor`, floor, ceiling) once
    `min_samples` calls were seen; before that, the server's timeout."""

    enabled: bool = False
    factor: float = Field(3.0, gt=1)
    floor_ms: int = Field(1_000, gt=0)
    ceiling_ms: int = Field(60_000, gt=0)
    min_samples: int = Field(20, ge=1)


class HealthCheckConfig(StrictModel):
    """Active health checks: a ping (handshake era) or server/discover (2026-07-28) per replica."""

    interval_ms: int = Field(0, ge=0)
    """0 disables active checks (passive error tracking still applies)."""
    timeout_ms: int = Field(2_000, gt=0)


class ServerConfig(StrictModel):
    """One upstream MCP server (an entry of `mcpServers`).

    Standard keys: `command`, `args`, `env`, `cwd` (stdio); `url`, `headers` (HTTP/SSE);
    `type` or `transport` (`stdio`, `http`/`streamable-http`, `sse`; inferred when absent).
    mcpopt keys: `prefix` (namespace for tools/prompts, default the server name, `""` for
    none), `timeout_ms` (per-call upstream timeout), `startup_timeout_ms`, `protocol`
    (`auto`: discover then handshake; `legacy`: handshake only), `disabled`.
    """

    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    type: str | None = None
    transport: str | None = None
    # mcpopt's own keys
    prefix: str | None = None
    timeout_ms: int | None = Field(None, gt=0)
    startup_timeout_ms: int = Field(30_000, gt=0)
    protocol: Literal["auto", "legacy"] = "auto"
    disabled: bool = False
    description: str | None = None
    # ---- speed and resilience (see README, "Faster and sturdier") ----
    replicas: int = Field(1, ge=1, le=64)
    """Copies of a stdio command to start (calls are routed among them)."""
    urls: list[str] = Field(default_factory=list)
    """HTTP replicas of one server (instead of `url`)."""
    routing: RoutingConfig = Field(default_factory=lambda: RoutingConfig())
    cache: ServerCacheConfig = Field(default_factory=lambda: ServerCacheConfig())
    read_only_tools: list[str] = Field(default_factory=list)
    """Tool-name globs treated as read-only even without `readOnlyHint` (cacheable, retryable)."""
    idempotent_tools: list[str] = Field(default_factory=list)
    """Tool-name globs safe to repeat (retryable) though not read-only."""
    breaker: BreakerConfig = Field(default_factory=lambda: BreakerConfig())
    retry: RetryConfig = Field(default_factory=lambda: RetryConfig())
    adaptive_timeout: AdaptiveTimeoutConfig = Field(default_factory=lambda: AdaptiveTimeoutConfig())
    max_concurrency: int = Field(0, ge=0)
    """Calls in flight to this server at once (0 = unlimited); more wait in a bounded queue."""
    max_queue: int = Field(100, ge=0)
    """Calls that may wait for a slot; beyond that a call is rejected with a clear error."""
    health_check: HealthCheckConfig = Field(default_factory=lambda: HealthCheckConfig())
    depends_on: list[str] = Field(default_factory=list)
    """Servers that must be ready before this one starts."""
    priority: int = 0
    """Start order among servers of the same stage: lower first (stages run in parallel)."""
    lazy: bool = False
    """Start on the first call instead of at gateway start (its tools are listed once started)."""
    idle_timeout_ms: int = Field(0, ge=0)
    """Stop the server after this long without calls (0 = never); it restarts on the next call."""
    idempotency_keys: bool = False
    """The server deduplicates calls by `_meta["mcpopt/idempotency_key"]` (a repeated key returns the
    first call's result without acting again): a workflow step in flight when the gateway died is
    then re-sent after a restart instead of being reported in doubt, and may be retried."""
    # ---- credentials and isolation (see README, "A shared gateway") ----
    header_files: dict[str, str] = Field(default_factory=dict)
    """Upstream request headers read from files at load time (header -> path, e.g. a token mounted as
    a secret); the value is stripped of surrounding whitespace and never logged or shown."""
    isolation: Literal["auto", "shared", "principal", "session"] = "auto"
    """Whose calls share an upstream session: `shared` (everyone: one session per replica), `principal`
    (one session per authenticated principal), `session` (one per client session; a 2026-07-28 client has
    no session and is isolated per principal). `auto`: `principal` when `gateway.auth` is on, else `shared`."""
    isolation_max_sessions: int = Field(32, ge=1)
    """Isolated upstream sessions of this server kept at once; the least recently used idle one is closed
    to make room, and a call finding every one busy is rejected with a clear error."""
    isolation_idle_ms: int = Field(300_000, ge=1_000)
    """An isolated upstream session unused for this long is closed (its process too, for stdio)."""
    # ---- resource watch (see README, "Upstream resource watch") ----
    max_rss_mb: float | None = Field(None, gt=0)
    """Restart a stdio replica whose process tree's RSS stays above this many MiB for
    `gateway.watch.limit_samples` samples in a row (None: never). Calls in flight get
    `gateway.watch.drain_s` to finish first; new calls wait for the restarted session."""

    @field_validator("type", "transport")
    @classmethod
    def _known_transport(cls, value: str | None) -> str | None:
        if value is None:
            return None
        norm = _TRANSPORT_ALIASES.get(value.lower())
        if norm is None:
            raise ValueError(f"expected one of stdio, http, streamable-http, sse (got {value!r})")
        return norm

    @model_validator(mode="after")
    def _command_or_url(self) -> ServerConfig:
        if self.urls and self.url:
            raise ValueError("give either 'url' or 'urls' (HTTP replicas), not both")
        if self.urls and not self.url:
            self.url = self.urls[0]
        kind = self.kind
        if kind == "stdio" and not self.command:
            raise ValueError("a stdio server needs 'command' (or give 'url' for an HTTP/SSE server)")
        if kind in ("http", "sse") and not self.url:
            raise ValueError(f"a {kind} server needs 'url'")
        if self.command and self.url:
            raise ValueError("give either 'command' (stdio) or 'url' (HTTP/SSE), not both")
        if self.urls and self.replicas != 1:
            raise ValueError("'replicas' copies a stdio command; HTTP replicas are listed in 'urls'")
        weights = self.routing.weights
        if weights and (len(weights) != self.replica_count or any(w <= 0 for w in weights)):
            raise ValueError(f"routing.weights: expected {self.replica_count} positive numbers, one per replica")
        return self

    @property
    def replica_count(self) -> int:
        return len(self.urls) if self.urls else self.replicas

    def replica_configs(self) -> list[ServerConfig]:
        """One config per replica (`urls` expanded; `replicas` copies of a stdio command)."""
        if self.urls:
            return [self.model_copy(update={"url": u, "urls": []}) for u in self.urls]
        return [self] * self.replicas

    @property
    def kind(self) -> TransportName:
        """The transport: explicit `type`/`transport`, else stdio for `command`, else http for `url`."""
        explicit = self.type or self.transport
        if explicit:
            return explicit  # type: ignore[return-value]
        if self.url and not self.command:
            return "sse" if self.url.rstrip("/").endswith("/sse") else "http"
        return "stdio"
