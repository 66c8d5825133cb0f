"""The `gateway:` block (`GatewaySettings`) and its remaining sections: cache, batch, shaping,
telemetry, limits, the resource watch, shared state.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mcpopt.config.edge import (
    AuthSettings,
    HttpEdgeSettings,
    PolicySettings,
    RateLimitList,
    StdioEdgeSettings,
    check_limits,
)
from mcpopt.config.plugins import CodeModeSettings, OptimizationSettings, WorkflowSettings
from mcpopt.config.servers import RestartPolicy, StrictModel


class CacheSettings(StrictModel):
    """The result cache (L1 in process; optional L2 in Redis shared by gateway processes)."""

    enabled: bool = True
    max_bytes: int = Field(64 * 1024 * 1024, ge=0)
    """L1 size bound (bytes of cached results); least recently used entries go first."""
    max_entry_bytes: int = Field(4 * 1024 * 1024, ge=0)
    """Results larger than this are not cached."""
    redis_url: str | None = None
    """L2: `redis://host:port/db`. Invalidations are broadcast to every gateway process."""
    warm: list[dict[str, Any]] = Field(default_factory=list)
    """Calls made at startup to fill the cache: `{tool: <gateway name>, arguments: {...}}`."""


class BatchSettings(StrictModel):
    """The `mcpopt__batch` gateway tool."""

    enabled: bool = True
    max_calls: int = Field(50, ge=1)
    concurrency: int = Field(8, ge=1)


class ShapingSettings(StrictModel):
    """Response shaping of tool results (off by default: results pass unchanged)."""

    max_result_bytes: int = Field(0, ge=0)
    """Cut results whose text is larger (0 = never); the whole result stays readable as a resource."""
    compact_json: bool = False
    """Re-serialize JSON text content without whitespace."""
    keep_results: int = Field(100, ge=1)
    """How many cut results stay readable (`mcpopt://results/<id>`), most recent first."""


class TelemetrySettings(StrictModel):
    """Telemetry, metrics and the monitor (`gateway.telemetry`; see `mcpopt.telemetry`).

    `level` is also read from `MCPOPT_TELEMETRY_LEVEL` (and `enabled` from
    `MCPOPT_TELEMETRY_ENABLED`), which win over the file and `MCPOPT_GATEWAY__TELEMETRY__*`.
    Thresholds default to the issue's figures: grades A-D as (average ms, error rate) pairs,
    F beyond D; SLO alerts at p95 150/200 ms and error rate 5%/10% (warning/critical).
    """

    enabled: bool = True
    """false: nothing is recorded, no sink runs, `/metrics` shows only gateway state."""
    level: Literal["minimal", "standard", "detailed"] = "standard"
    """minimal: metrics only; standard: + tool sequences per session and salted argument hashes;
    detailed: + arguments with secrets redacted."""
    data_dir: str | None = None
    """This config's data dir, as `gateway.data_dir` (the older spelling of the same key; see
    `config_data_dir`): the salt and the SQLite file live there, and so do rules, journal and skills."""
    sqlite_path: str | None = None
    """The SQLite store (default `<data_dir>/telemetry.db`; "" disables it)."""
    retention_days: float = Field(30.0, gt=0)
    postgres_url: str | None = None
    """Also write every record to this PostgreSQL database (`postgresql://user@host:port/db`), shared by
    the gateway's replicas: `mcpopt stats` and the optimizer then read all replicas' calls from it
    (needs `pip install 'mcpopt[postgres]'`, psycopg 3). SQLite stays each replica's local copy."""
    jsonl_path: str | None = None
    """Also append every record to this JSONL file (off by default)."""
    queue_size: int = Field(4096, ge=16)
    """Bound of each sink's queue (records); beyond it records are dropped and counted."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP base URL, e.g. http://127.0.0.1:4318 (traces to /v1/traces, metrics to /v1/metrics)."""
    otlp_headers: dict[str, str] = Field(default_factory=dict)
    otlp_interval_ms: int = Field(5_000, ge=100)
    """How often spans and metrics are exported."""
    service_name: str = "mcpopt"
    propagate_trace: bool = True
    """Put the call's W3C `traceparent` in the upstream request's `_meta` (when OTLP is on)."""
    prometheus: bool = True
    """Serve `/metrics` on the HTTP front."""
    dashboard: bool = True
    """Serve `/dashboard` on the HTTP front."""
    window_s: float = Field(300.0, gt=0)
    """Rolling window of the monitor's percentiles, error rates and grades."""
    grades: list[list[float]] = Field(
        default_factory=lambda: [[50.0, 0.01], [100.0, 0.02], [200.0, 0.05], [500.0, 0.10]]
    )
    """[average ms, error rate] upper bounds of grades A, B, C, D (F: worse than D)."""
    slo_p95_warning_ms: float = Field(150.0, gt=0)
    slo_p95_critical_ms: float = Field(200.0, gt=0)
    slo_error_warning: float = Field(0.05, ge=0, le=1)
    slo_error_critical: float = Field(0.10, ge=0, le=1)
    alert_window_s: float = Field(60.0, gt=0)
    """Calls younger than this are judged against the SLO thresholds."""
    alert_min_calls: int = Field(5, ge=1)
    """Fewer calls than this in the alert window raise no threshold alert."""
    alert_interval_ms: int = Field(1_000, ge=50)
    webhook_url: str | None = None
    """POST every alert and recovery as JSON to this URL (optional)."""
    anomaly_z: float = Field(4.0, gt=0)
    """z-score of the short-term EWMA against the long-term baseline that flags an anomaly."""
    anomaly_min_calls: int = Field(30, ge=2)
    """Calls a tool needs before its baseline is trusted."""

    @model_validator(mode="after")
    def _short_env(self) -> TelemetrySettings:
        level = os.environ.get("MCPOPT_TELEMETRY_LEVEL")
        if level:
            if level.strip().lower() not in ("minimal", "standard", "detailed"):
                raise ValueError(f"MCPOPT_TELEMETRY_LEVEL: expected minimal, standard or detailed (got {level!r})")
            self.level = level.strip().lower()  # type: ignore[assignment]
        enabled = os.environ.get("MCPOPT_TELEMETRY_ENABLED")
        if enabled:
            self.enabled = enabled.strip().lower() not in ("0", "false", "no", "off")
        if len(self.grades) != 4 or any(len(g) != 2 for g in self.grades):
            raise ValueError("grades: expected four [average_ms, error_rate] pairs, for A, B, C and D")
        return self


class LimitsSettings(StrictModel):
    """Rate limits and quotas (`gateway.limits`), counted with the `limits` library.

    Each list holds limits like `"10/second"` or `"50000/day"`; a call must pass all that apply:
    `global` (every call), `per_tool` (every caller of a tool together), `per_principal` (each
    principal; a policy rule's `rate_limits` overrides it) and `per_principal_tool` (each principal
    on each tool). A refused call gets a JSON-RPC error saying when to retry (and HTTP 429 with
    `Retry-After` on the HTTP front's fast path).
    """

    enabled: bool = True
    storage: str = "memory://"
    """`memory://` (this process) or `redis://host:port/db` (counters shared by gateway replicas)."""
    strategy: Literal["moving-window", "sliding-window-counter", "fixed-window"] = "moving-window"
    """`moving-window`: exact (one timestamp per call in the window); `sliding-window-counter`: two
    counters per key, approximate, cheapest on Redis; `fixed-window`: resets at window edges."""
    global_: RateLimitList = Field(default_factory=list, alias="global")
    per_tool: dict[str, RateLimitList] = Field(default_factory=dict)
    per_principal: RateLimitList = Field(default_factory=list)
    per_principal_tool: dict[str, RateLimitList] = Field(default_factory=dict)

    @field_validator("global_", "per_principal")
    @classmethod
    def _valid(cls, value: list[str]) -> list[str]:
        return check_limits(value)

    @field_validator("per_tool", "per_principal_tool")
    @classmethod
    def _valid_map(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for limits in value.values():
            check_limits(limits)
        return value

    @property
    def any(self) -> bool:
        """True when some limit is configured (else the filter is left out of the pipeline)."""
        return self.enabled and bool(self.global_ or self.per_tool or self.per_principal or self.per_principal_tool)


class WatchSettings(StrictModel):
    """`gateway.watch`: CPU, memory, open descriptors and children of every stdio upstream process.

    The growth alert fires (warning `rss_growth`) when a replica's RSS grew by more than
    `growth_warning_mb` MiB *and* more than `growth_warning_pct` percent over the last
    `growth_window_s` seconds. Both, so that a small server doubling from 20 to 40 MiB and a large
    one moving by a few percent stay quiet. The defaults are this project's judgment (a healthy
    server's RSS settles within minutes of its warm-up; a steady +64 MiB and +50% in 5 minutes is a
    leak's signature), not a published standard: tune them to your servers.
    """

    enabled: bool = True
    interval_s: float = Field(5.0, ge=0.05)
    """Seconds between two samples (each sample reads /proc for every upstream process tree, off the
    event loop)."""
    growth_window_s: float = Field(300.0, gt=0)
    growth_warning_mb: float = Field(64.0, ge=0)
    growth_warning_pct: float = Field(50.0, ge=0)
    limit_samples: int = Field(2, ge=1)
    """Consecutive samples above a server's `max_rss_mb` before it is restarted (one spike is not a leak)."""
    drain_s: float = Field(10.0, ge=0)
    """How long a restart at `max_rss_mb` waits for the replica's calls in flight to finish; calls still
    running then fail with an error naming the server and the reason (they are not retried)."""


class SharedSettings(StrictModel):
    """State shared by gateway replicas (`gateway.shared`, issue 12): ONE Redis for all of it.

    With `redis_url` set, handshake-era client sessions are kept there so any replica can serve a
    session's next request (`mcpopt.gateway.session_store`), and it is the default of
    `cache.redis_url` (the L2 result cache) and of `limits.storage` (rate-limit counters) unless those
    are set themselves; circuit-breaker states, applied-rule changes and upstream notifications travel
    over its pub/sub (`mcpopt.gateway.shared`). Redis down: each replica works on its local state (one
    warning) and picks the shared state up again when Redis is back.
    """

    redis_url: str | None = None
    """`redis://host:port/db` (env `MCPOPT_GATEWAY__SHARED__REDIS_URL`); unset: embedded, nothing shared."""
    replica: str | None = None
    """This replica's id in telemetry records, metrics, shared messages and the `X-Mcpopt-Replica`
    response header (default `<hostname>:<port>` of `serve -t http`, else `<hostname>:<pid>`)."""
    key_prefix: str = "mcpopt:"
    """Namespace of the keys and channels of sessions, breakers, rules and the bus in that Redis (the
    cache's L2 keys keep their own `mcpopt:` names)."""
    breakers: bool = True
    """Share circuit-breaker opens/closes of HTTP upstreams (the same URL on every replica; a stdio
    upstream is each replica's own process and is never shared)."""
    rules: bool = True
    """Share the optimizer's applied rules: a change on one replica is taken by all."""
    notifications: bool = True
    """Re-emit an upstream's list_changed / resources/updated seen by one replica on every replica."""


class GatewaySettings(StrictModel):
    """Global mcpopt keys (`gateway:` in the file, `MCPOPT_GATEWAY__*` in the environment)."""

    name: str = "mcpopt"
    """Prefix of the gateway's own tools; also the data-dir id of a config built without a file."""
    data_dir: str | None = None
    """This config's data dir: telemetry.db, salt, rules.json, workflow journal, skills.db, code mode's
    key (default `<XDG data dir>/mcpopt/<config id>`, see `config_data_dir`). Point two configs at one
    folder to share telemetry, rules and skills."""
    separator: str = "__"
    prefix_tools: bool = True
    """Namespace tools and prompts as `{prefix}{separator}{name}`; per-server `prefix` overrides."""
    call_timeout_ms: int = Field(60_000, gt=0)
    """Default per-call upstream timeout (tools/call, resources/read, prompts/get, ...)."""
    restart: RestartPolicy = Field(default_factory=lambda: RestartPolicy())
    page_size: int = Field(0, ge=0)
    """Page size for the gateway's own list results; 0 sends each list whole."""
    list_ttl_ms: int = Field(60_000, ge=0)
    """SEP-2549 `ttlMs` on the gateway's list results to 2026-07-28 clients: how long a client may
    reuse a list without asking again (ms; 0: always ask). The gateway also tells them of every
    change on their `subscriptions/listen` stream, which evicts the client's copy at once. The
    `cacheScope` is `private` when `gateway.auth` is on or `exposure_clients` is set (lists then
    differ by caller), else `public`."""
    log_level: Literal["debug", "info", "warning", "error"] = "warning"
    cache: CacheSettings = Field(default_factory=lambda: CacheSettings())
    shaping: ShapingSettings = Field(default_factory=lambda: ShapingSettings())
    exposure: Literal["full", "search", "code"] = "full"
    """What tools/list shows: every tool (`full`); `search_tools`, `get_tool_schema`, `call_tool` and the
    pins (`search`); or `search_tools`, `get_tool_schema`, `execute_code` and the pins (`code`). Hidden
    tools stay callable by exact name."""
    exposure_clients: dict[str, Literal["full", "search", "code"]] = Field(default_factory=dict)
    """Per-connection override: client name glob (the client's `clientInfo.name`) -> exposure."""
    always_visible: list[str] = Field(default_factory=list)
    """Tool names or globs listed in every exposure mode."""
    search_k: int = Field(10, ge=1, le=100)
    """Results `search_tools` returns by default."""
    code_mode: CodeModeSettings = Field(default_factory=lambda: CodeModeSettings())
    optimization: OptimizationSettings = Field(default_factory=lambda: OptimizationSettings())
    """The optimizer: rules file, autonomous improvement (`auto_improvement`, `level`, `rollback_threshold`)."""
    """`execute_code`: sandbox backend (monty / wasm) and its limits."""
    batch: BatchSettings = Field(default_factory=lambda: BatchSettings())
    telemetry: TelemetrySettings = Field(default_factory=lambda: TelemetrySettings())
    workflows: WorkflowSettings = Field(default_factory=lambda: WorkflowSettings())
    """Workflow files, the journal (SQLite), leases, limits; definitions sit under the top-level `workflows:`."""
    http: HttpEdgeSettings = Field(default_factory=lambda: HttpEdgeSettings())
    """The HTTP front's edge: allowed Host/Origin, read deadlines, connection and session limits."""
    stdio: StdioEdgeSettings = Field(default_factory=lambda: StdioEdgeSettings())
    """The stdio front's limits: longest message, requests in flight, output high-water mark."""
    auth: AuthSettings = Field(default_factory=lambda: AuthSettings())
    """Inbound authentication on the HTTP front (off by default; stdio is the trusted local user)."""
    policy: PolicySettings = Field(default_factory=lambda: PolicySettings())
    """Who may see and call what (applies when `auth` is on)."""
    limits: LimitsSettings = Field(default_factory=lambda: LimitsSettings())
    """Rate limits and quotas: global, per tool, per principal."""
    watch: WatchSettings = Field(default_factory=lambda: WatchSettings())
    """The upstream resource watch: sampling interval, memory-growth alert, restart at `max_rss_mb`."""

    @model_validator(mode="after")
    def _one_data_dir(self) -> GatewaySettings:
        tel = self.telemetry.data_dir
        if self.data_dir and tel and Path(self.data_dir).expanduser() != Path(tel).expanduser():
            raise ValueError(
                f"gateway.data_dir ({self.data_dir}) and gateway.telemetry.data_dir ({tel}) differ: "
                "expected one data dir (set gateway.data_dir only)"
            )
        return self

    shared: SharedSettings = Field(default_factory=lambda: SharedSettings())
    """State shared by replicas (one Redis): the cache's L2, rate-limit counters, breakers, rules, notifications."""

    @model_validator(mode="after")
    def _shared_defaults(self) -> GatewaySettings:
        # One key names the shared Redis; the cache's and the limits' own keys still win when set.
        url = self.shared.redis_url
        if url:
            if self.cache.redis_url is None:
                self.cache.redis_url = url
            if "storage" not in self.limits.model_fields_set:
                self.limits.storage = url
        return self

    @field_validator("separator")
    @classmethod
    def _valid_separator(cls, value: str) -> str:
        if not value or not re.fullmatch(r"[A-Za-z0-9_.\-/]{1,8}", value):
            raise ValueError("expected 1-8 characters from A-Z a-z 0-9 _ - . / (MCP tool-name characters)")
        return value
