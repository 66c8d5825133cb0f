"""Configuration: the standard `mcpServers` block plus mcpopt's own keys.

A config file is YAML or JSON. Its `mcpServers` block is the one Claude Desktop, Cursor and
VS Code use (`command`, `args`, `env`, `cwd`, `url`, `headers`, `type`/`transport`), so an
existing `claude_desktop_config.json` loads unchanged. mcpopt's own keys sit beside it: per
server (inside each server entry) and global (under `gateway:`).

Environment variables override file values (pydantic-settings, nested with `__`):
`MCPOPT_GATEWAY__SEPARATOR=.`, `MCPOPT_GATEWAY__CALL_TIMEOUT_MS=5000`, ...

Every error is raised as `ConfigError` naming the file, the key path and what was expected.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from mcpopt.errors import ConfigError
from mcpopt.layouts import AskFn, Normalized, normalize, parse_json
from mcpopt.workflow_model import NAME as WORKFLOW_NAME
from mcpopt.workflow_model import Workflow, WorkflowError, load_workflow_file


# ---- settings of the plugins (code mode, the optimizer) ------------------------------------
class IsolationSettings(BaseModel):
    """`gateway.code_mode.isolation`: the second sandbox layer (see `mcpopt.codemode.isolation`)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "bwrap", "off"] = "auto"
    """auto: bubblewrap when it works on this machine (else layer 1 alone, with a warning);
    bwrap: required (a sandbox that cannot get it fails with SandboxUnavailable); off: layer 1 only."""
    bwrap: str | None = None
    """The bubblewrap binary (default: `bwrap` on PATH)."""
    cpu_s: int = Field(3600, gt=0)
    """CPU seconds one sandbox process may use in its lifetime (RLIMIT_CPU); then it is killed
    (a monty worker is replaced; a wasm session loses its interpreter). Wall time per call is
    `timeout_ms`."""
    open_files: int = Field(256, ge=16)
    """Open file descriptors per sandbox process (RLIMIT_NOFILE)."""
    processes: int = Field(64, ge=8)
    """Tasks (threads included) per sandbox process: RLIMIT_NPROC of its private uid (root
    only) and the pids cgroup. Deno runs ~7 threads, a monty worker 2."""
    scratch_mb: int = Field(64, gt=0)
    """Size of the sandbox process's writable `/scratch` (a tmpfs, MB); also its largest file (RLIMIT_FSIZE)."""
    cgroups: bool = True
    """Bound memory and tasks with cgroups when the gateway may create them."""


class SessionSettings(BaseModel):
    """`gateway.code_mode.sessions`: variables, helpers and scratch files kept across calls.

    A code session belongs to one client session (the MCP session of a handshake-era client),
    else to the caller's principal (2026-07-28 clients have no session), and to one backend.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    """false: every execution starts from a fresh namespace (the stateless code mode)."""
    ttl_s: float = Field(1800.0, gt=0)
    """A session unused this long (seconds) is dropped."""
    max_sessions: int = Field(64, ge=1)
    """Sessions kept at once (both backends); past it the least recently used is evicted."""
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    """Serialized state kept in all (monty snapshots + scratch files, bytes); LRU eviction past it."""
    max_session_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    """One session's serialized state (bytes); a bigger one is not kept (the next call says so)."""
    max_interpreters: int = Field(4, ge=1)
    """Live wasm interpreters (one Deno process each, ~150 MB resident + growth); LRU eviction past it."""
    secret: str | None = None
    """Key that signs stored state (HMAC-SHA256), the same on every replica sharing a store
    (default: a random key kept in `<data dir>/codemode.key`)."""


class SkillSettings(BaseModel):
    """`gateway.code_mode.skills`: functions code saves with `save_skill` and imports later."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    path: str | None = None
    """The SQLite file (default `<data dir>/skills.db`, the telemetry data dir)."""
    max_per_principal: int = Field(200, ge=1)
    max_code_bytes: int = Field(20_000, ge=100)


PrivateKind = Literal["email", "phone", "card", "iban", "ssn", "ipv4", "secret"]
_DEFAULT_KINDS: tuple[PrivateKind, ...] = ("email", "phone", "card", "iban", "ssn", "secret")


class PrivateDataSettings(BaseModel):
    """`gateway.code_mode.private_data`: values kept out of the model (opt-in per tool or field).

    Results of the tools matched here reach the sandbox with private values replaced by tokens
    (`[EMAIL_1]`); what the code prints is therefore tokenized too. When code passes a token to
    a tool (anywhere in its arguments), the gateway puts the real value back. The mapping lives
    in the gateway's memory only and dies with the code session.
    """

    model_config = ConfigDict(extra="forbid")

    tools: list[str] = Field(default_factory=list)
    """Tool names or globs (gateway names, e.g. `memory__*`) whose results are scanned for `kinds`."""
    fields: dict[str, list[str]] = Field(default_factory=dict)
    """Tool glob -> keys whose string values are private as a whole (e.g. `{"crm__*": ["email", "phone"]}`)."""
    kinds: list[PrivateKind] = Field(default_factory=lambda: list(_DEFAULT_KINDS))
    """Patterns looked for in the results of `tools`."""
    restore_to: list[str] = Field(default_factory=lambda: ["*"])
    """Tools (globs) that may receive restored values; a token sent elsewhere fails the call."""

    @property
    def enabled(self) -> bool:
        return bool(self.tools or self.fields)


class CodeModeSettings(BaseModel):
    """`gateway.code_mode`: the `execute_code` tool's sandbox and its limits."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["monty", "wasm"] = "monty"
    """`monty`: pydantic-monty (a fast subset of Python, starts in ms). `wasm`: CPython on
    Pyodide in Deno (the whole standard library; the first run waits ~2 s for it to load)."""
    timeout_ms: int = Field(10_000, gt=0)
    """Wall time of one execution, tool calls included (ms)."""
    memory_mb: int = Field(256, gt=0)
    """Memory one execution may use (MB): the heap for monty, growth of the Deno process for wasm."""
    max_tool_calls: int = Field(50, ge=0)
    """Tool calls one execution may make; the next one fails and so does the execution."""
    max_output_bytes: int = Field(20_000, gt=0)
    """UTF-8 bytes of printed output plus the returned value that go back; the rest is cut, with a marker."""
    allow_backend_choice: bool = True
    """Let the caller pick `backend` per call (`execute_code`'s optional `backend` argument)."""
    pyodide_dir: str | None = None
    """Folder of the npm package `pyodide` (default: `node_modules/pyodide` of the project or the cwd)."""
    deno: str | None = None
    """The Deno binary (default: the one of the PyPI package `deno`, else `deno` on PATH)."""
    sessions: SessionSettings = Field(default_factory=SessionSettings)
    """Code sessions: what one call defines is there in the next (see `mcpopt.codemode.sessions`)."""
    skills: SkillSettings = Field(default_factory=SkillSettings)
    """Skills: functions saved with `save_skill`, per principal (see `mcpopt.codemode.skills`)."""
    private_data: PrivateDataSettings = Field(default_factory=PrivateDataSettings)
    """Private data kept out of the model (see `mcpopt.codemode.private`)."""
    isolation: IsolationSettings = Field(default_factory=IsolationSettings)
    """The second sandbox layer (see `mcpopt.codemode.isolation`)."""


Level = Literal["conservative", "moderate", "aggressive"]
LEVELS: tuple[Level, ...] = ("conservative", "moderate", "aggressive")


class CanarySettings(BaseModel):
    """Canary rollout of applied rules (`gateway.optimization.canary`; see `mcpopt.optimize.canary`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    """A newly applied rule first serves `share` of its calls (else: all of them at once)."""
    share: float = Field(0.2, gt=0, le=1)
    seed: int = 0
    """Seeds each rule's split of calls into arms: the same split on every run."""
    min_calls: int = Field(20, ge=2)
    """Calls each arm needs before the comparison decides anything."""
    max_calls: int = Field(200, ge=2)
    """Canary-arm calls after which a rule without a measurable effect either way is promoted."""
    max_age: str = "24h"
    """A canary older than this without `min_calls` per arm is promoted (it passed the replays)."""
    alpha: float = Field(0.01, gt=0, lt=0.5)
    """One-sided significance level of the arm comparisons (two-proportion z-test for errors,
    Mann-Whitney U for latency)."""

    @field_validator("max_age")
    @classmethod
    def _age(cls, value: str) -> str:
        parse_duration(value)
        return value


class OptimizationSettings(BaseModel):
    """The autonomous loop and the rules (`gateway.optimization`).

    Defaults follow the issue: rollback when a KPI degrades by more than 10%; nothing changes by
    itself unless `auto_improvement: true`.
    """

    model_config = ConfigDict(extra="forbid")

    auto_improvement: bool = False
    """Apply validated proposals by itself (else: proposals are only reported)."""
    level: Level = "conservative"
    """The most invasive rule level applied: conservative (cache TTLs on read-only tools, hints,
    timeouts), moderate (+ argument rewrites: SQL LIMIT, page size, depth cap), aggressive (+ TTLs
    on tools only named like reads, routing changes)."""
    rollback_threshold: float = Field(0.1, gt=0, le=1)
    """A KPI degrading by more than this (success rate: absolute; calls, time: relative) rolls the
    rule back."""
    min_improvement: float = Field(0.05, ge=0, le=1)
    """A proposal is applied only if calls or time improve by at least this fraction."""
    interval: str = "1h"
    """`mcpopt optimize --continuous`: time between runs (90s, 15m, 1h, 1d)."""
    window: str = "24h"
    """Telemetry analyzed per run (a duration back from now)."""
    scenarios: list[str] = Field(default_factory=list)
    """Scenario files or folders replayed to validate proposals (relative to the config's folder)."""
    rules_path: str | None = None
    """The rules file (default `<telemetry data_dir>/rules.json`)."""
    sandbox: bool = True
    """Replay scenarios against scratch copies of the servers' local state (see `optimize.sandbox`)."""
    max_changes_per_run: int = Field(10, ge=1)
    honor_batch_hints: bool = True
    """Replays send hinted independent calls together through the gateway's batch tool."""
    canary: CanarySettings = Field(default_factory=lambda: CanarySettings())
    workflows: bool = True
    """Propose workflows for call sequences that repeat (validated by replay like any rule)."""

    @field_validator("interval", "window")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value


def parse_duration(text: str) -> float:
    """Seconds in "90s", "15m", "1h", "1d" (or a bare number of seconds).

    Raises:
        ValueError: any other form.
    """
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*", str(text))
    if not m:
        raise ValueError(f"expected a duration such as 90s, 15m, 1h, 1d (got {text!r})")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2) or "s"]


# ---- workflows (`gateway.workflows`; the engine is mcpopt.workflows) --------------------------
class JournalSettings(BaseModel):
    """The durable journal of workflow runs (`gateway.workflows.journal`)."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["sqlite"] = "sqlite"
    """`sqlite` (embedded, the default). The `Journal` protocol is small so that a Redis backend
    (issue 12, scale-out) can implement it."""
    path: str | None = None
    """The SQLite file (default `<data dir>/workflows/<config stem>-<hash of its path>.db`)."""
    synchronous: Literal["normal", "full"] = "normal"
    """SQLite `synchronous` in WAL mode: `normal` survives any crash of the gateway process
    (SIGKILL included: the OS keeps what was written); `full` also a power loss (one fsync per
    journal write). sqlite.org/pragma.html#pragma_synchronous."""
    keep_days: float = Field(30.0, gt=0)
    """Finished runs older than this are deleted at start."""
    max_result_bytes: int = Field(1 << 20, ge=1024)
    """Larger results of read-only steps are not kept (a resumed run calls the read again);
    results of writes are always kept."""


class WorkflowSettings(BaseModel):
    """Workflows (`gateway.workflows`; definitions under the top-level `workflows:` key; the
    engine is `mcpopt.workflows`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    files: list[str] = Field(default_factory=list)
    """More workflow files or globs (relative to the config's folder): each a workflow, a list, or
    `{workflows: {name: ...}}`."""
    journal: JournalSettings = Field(default_factory=lambda: JournalSettings())
    resume: bool = True
    """At start, take over the runs a dead gateway left unfinished (resume or compensate each,
    per its workflow's `on_restart`)."""
    lease_ms: int = Field(15_000, ge=1_000)
    """A running run's owner renews its lease every `lease_ms / 5`; another gateway takes over a
    run whose lease expired (or at once, when the owner was a dead process on this host)."""
    max_items: int = Field(1_000, ge=1)
    """Items one `for_each` may expand to (ToolHive's limit is 1,000 as well)."""
    agent_workflows: bool = True
    """Serve `mcpopt__workflow` (agents create, edit, run and cancel workflows)."""
    fanout_tool: bool = True
    """Serve `mcpopt__fanout` (one call to several servers or every replica of one)."""
    optimizer_workflows: bool = True
    """Serve the workflows the optimizer applied (enabled `workflow` rules of the rule file)."""


TransportName = Literal["stdio", "http", "sse"]

_TRANSPORT_ALIASES = {
    "stdio": "stdio",
    "http": "http",
    "streamable-http": "http",
    "streamable_http": "http",
    "streamablehttp": "http",
    "sse": "sse",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RestartPolicy(_Strict):
    """Restart of a crashed upstream: exponential backoff from `initial_backoff_ms` to `max_backoff_ms`."""

    initial_backoff_ms: int = Field(500, ge=0)
    max_backoff_ms: int = Field(30_000, ge=0)
    enabled: bool = True


class ToolCacheConfig(_Strict):
    """Per-tool cache policy: a TTL, and optionally a read-only declaration the server omits."""

    ttl_ms: int | None = Field(None, ge=0)
    read_only: bool | None = None
    """Treat the tool as read-only (`readOnlyHint`) even if its annotations don't say so."""


class ServerCacheConfig(_Strict):
    """Result cache policy of one server.

    A tools/call result is cached only if the tool is read-only (`readOnlyHint: true` or
    declared here) AND a TTL applies (`tools.<name>.ttl_ms`, else `ttl_ms`). Default TTL 0: off.
    `invalidates` maps a tool name (or glob) to the tool-name globs whose cached results a call
    to it drops; without a rule, any non-read-only call drops all of the server's cached reads.
    """

    ttl_ms: int = Field(0, ge=0)
    tools: dict[str, ToolCacheConfig] = Field(default_factory=dict)
    invalidates: dict[str, list[str]] = Field(default_factory=dict)


class RoutingConfig(_Strict):
    """How calls are spread over a server's replicas."""

    strategy: Literal["round_robin", "least_inflight", "ewma_latency", "weighted", "predictive"] = "least_inflight"
    weights: list[float] = Field(default_factory=list)
    """For `weighted`: one positive weight per replica (default all 1)."""
    sticky_tools: list[str] = Field(default_factory=list)
    """Tool-name globs whose calls from one client session always go to the same replica."""


class BreakerConfig(_Strict):
    """Circuit breaker per replica: opens after `failure_threshold` consecutive failures,
    stays open `open_ms`, then lets `half_open_max` trial calls through (Nygard, Release It!)."""

    enabled: bool = True
    failure_threshold: int = Field(5, ge=1)
    open_ms: int = Field(5_000, ge=1)
    half_open_max: int = Field(1, ge=1)


class RetryConfig(_Strict):
    """Retries with exponential backoff and full jitter, only when repeating is safe
    (read-only or idempotent tools, or a request that never reached the server)."""

    attempts: int = Field(3, ge=1, le=10)
    """Total attempts including the first."""
    initial_backoff_ms: int = Field(25, ge=0)
    max_backoff_ms: int = Field(1_000, ge=0)


class AdaptiveTimeoutConfig(_Strict):
    """Per-tool timeout = clamp(p99 of observed latency x `factor`, floor, ceiling) once
    `min_samples` calls were seen; before that, the server's timeout."""

    enabled: bool = False
    factor: float = Field(3.0, gt=1)
    floor_ms: int = Field(1_000, gt=0)
    ceiling_ms: int = Field(60_000, gt=0)
    min_samples: int = Field(20, ge=1)


class HealthCheckConfig(_Strict):
    """Active health checks: a ping (handshake era) or server/discover (2026-07-28) per replica."""

    interval_ms: int = Field(0, ge=0)
    """0 disables active checks (passive error tracking still applies)."""
    timeout_ms: int = Field(2_000, gt=0)


class ServerConfig(_Strict):
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


class CacheSettings(_Strict):
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


class BatchSettings(_Strict):
    """The `mcpopt__batch` gateway tool."""

    enabled: bool = True
    max_calls: int = Field(50, ge=1)
    concurrency: int = Field(8, ge=1)


class ShapingSettings(_Strict):
    """Response shaping of tool results (off by default: results pass unchanged)."""

    max_result_bytes: int = Field(0, ge=0)
    """Cut results whose text is larger (0 = never); the whole result stays readable as a resource."""
    compact_json: bool = False
    """Re-serialize JSON text content without whitespace."""
    keep_results: int = Field(100, ge=1)
    """How many cut results stay readable (`mcpopt://results/<id>`), most recent first."""


class TelemetrySettings(_Strict):
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


class HttpEdgeSettings(_Strict):
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


class StdioEdgeSettings(_Strict):
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


def _check_limits(value: list[str]) -> list[str]:
    from limits import parse_many

    for item in value:
        try:
            parse_many(item)
        except ValueError:
            raise ValueError(f"{item!r} is not a rate limit: expected e.g. '10/second' or '1000 per hour'") from None
    return value


class IntrospectionSettings(_Strict):
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


class ApiKeySettings(_Strict):
    """Static API keys (`gateway.auth.api_keys`): stored as SHA-256 hashes, never in clear.

    Lines of the form `<name> sha256:<64 hex digits> [scope ...]` (`mcpopt auth new-key NAME` prints
    one), from `file` (one per line, `#` comments) and/or the environment variable `env` (lines or
    comma-separated). A client sends the key as `Authorization: Bearer <key>` or `X-API-Key: <key>`.
    """

    file: str | None = None
    env: str | None = "MCPOPT_API_KEYS"
    """Environment variable with more key lines (unset or empty: none)."""


class AuthSettings(_Strict):
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


class PrincipalMatch(_Strict):
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


class PolicyRule(_Strict):
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
        return _check_limits(value)


class PolicySettings(_Strict):
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


class LimitsSettings(_Strict):
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
        return _check_limits(value)

    @field_validator("per_tool", "per_principal_tool")
    @classmethod
    def _valid_map(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for limits in value.values():
            _check_limits(limits)
        return value

    @property
    def any(self) -> bool:
        """True when some limit is configured (else the filter is left out of the pipeline)."""
        return self.enabled and bool(self.global_ or self.per_tool or self.per_principal or self.per_principal_tool)


class WatchSettings(_Strict):
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


class SharedSettings(_Strict):
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


class GatewaySettings(_Strict):
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


class Config(BaseSettings):
    """The whole configuration: `mcpServers` plus `gateway`.

    Build it with `load_config(path)`; environment variables `MCPOPT_*` override file values.
    """

    model_config = SettingsConfigDict(
        env_prefix="MCPOPT_",
        env_nested_delimiter="__",
        extra="forbid",
        populate_by_name=True,
    )

    mcpServers: dict[str, ServerConfig] = Field(default_factory=dict)  # noqa: N815 - the standard key
    gateway: GatewaySettings = Field(default_factory=lambda: GatewaySettings())
    workflows: dict[str, Workflow] = Field(default_factory=dict)
    """Workflows served as tools `workflow__<name>` (see `mcpopt.workflow_model`); more may come
    from `gateway.workflows.files`."""
    source: str = Field("", exclude=True)
    """The file this config came from ("" when built in code)."""
    source_path: str = Field("", exclude=True)
    """`source` resolved (symlinks, `..`) when it was loaded: the base of `config_id`."""
    layout: str = Field("mcpopt", exclude=True)
    """The file's layout: `mcpopt` (`mcpServers`), `vscode` (`servers`), `vscode-settings` (`mcp.servers`)."""
    notes: list[str] = Field(default_factory=list, exclude=True)
    """Info lines from loading (the keys mcpopt ignored); the CLI prints them on stderr."""

    @field_validator("mcpServers")
    @classmethod
    def _valid_names(cls, servers: dict[str, ServerConfig]) -> dict[str, ServerConfig]:
        for name in servers:
            if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
                raise ValueError(f"server name {name!r}: expected 1-64 characters from A-Z a-z 0-9 _ - .")
        return servers

    @field_validator("workflows")
    @classmethod
    def _workflow_names(cls, workflows: dict[str, Workflow]) -> dict[str, Workflow]:
        for name, wf in workflows.items():
            if not WORKFLOW_NAME.match(name):
                raise ValueError(f"workflow name {name!r}: expected 1-64 characters from A-Z a-z 0-9 _ -")
            if wf.name and wf.name != name:
                raise ValueError(f"workflow {name!r}: 'name: {wf.name}' differs from its key")
            wf.name = name
            wf.source = "config"
        return workflows

    @model_validator(mode="after")
    def _dependencies(self) -> Config:
        names = set(self.mcpServers)
        for name, server in self.mcpServers.items():
            for dep in server.depends_on:
                if dep not in names:
                    raise ValueError(f"mcpServers.{name}.depends_on: unknown server {dep!r}")
        # A cycle would deadlock startup: fail at load time instead.
        state: dict[str, int] = {}

        def visit(node: str, path: list[str]) -> None:
            if state.get(node) == 1:
                raise ValueError("depends_on cycle: " + " -> ".join([*path, node]))
            if state.get(node) == 2:
                return
            state[node] = 1
            for dep in self.mcpServers[node].depends_on:
                visit(dep, [*path, node])
            state[node] = 2

        for name in self.mcpServers:
            visit(name, [])
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first: MCPOPT_* overrides what the file says.
        return (env_settings, init_settings)

    def active_servers(self) -> dict[str, ServerConfig]:
        return {name: s for name, s in self.mcpServers.items() if not s.disabled}

    def tool_prefix(self, server: str) -> str:
        """The namespace prefix of a server's tools and prompts ("" when unprefixed)."""
        cfg = self.mcpServers[server]
        if cfg.prefix is not None:
            return cfg.prefix
        return server if self.gateway.prefix_tools else ""


def _read_file(path: Path) -> dict[str, Any]:
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(shown, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(shown, "", f"cannot read the file ({exc.strerror})") from None
    try:
        if path.suffix.lower() == ".json":
            data = parse_json(text)
        else:
            data = yaml.safe_load(text) or {}
    except json.JSONDecodeError as exc:
        raise ConfigError(
            shown, "", f"expected valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(shown, "", f"expected valid YAML: {problem}{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(shown, "(top level)", f"a mapping with 'mcpServers' (got {type(data).__name__})")
    return data


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("function-after[_command_or_url()]",) or str(item).startswith("function-"):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _problems(exc: ValidationError, servers_key: str = "mcpServers") -> list[tuple[str, str]]:
    """Every validation error as `(key path, expected)`, key paths as the file spells them."""
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        key = _key_path(tuple(err["loc"]))
        if servers_key != "mcpServers" and (key == "mcpServers" or key.startswith("mcpServers.")):
            key = servers_key + key[len("mcpServers") :]
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; see `mcpopt init` for every key)"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
            msg = f"{msg} (got {err['input']!r})"
        out.append((key, msg))
    return out


def default_data_dir() -> Path:
    """`$XDG_DATA_HOME/mcpopt`, else `~/.local/share/mcpopt` (the XDG base-directory default): the
    parent of every config's own data dir (`config_data_dir`)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "mcpopt"


def config_id(config: Config | None) -> str:
    """A stable, file-name-safe id of a config: `<file stem>-<8 hex of blake2b(absolute path)>` for a
    config loaded from a file (`demo-1a2b3c4d`), else `gateway.name` (`mcpopt`) for one built in code
    or without a config. The same file always gets the same id; two files never share one."""
    if config is None:
        return GatewaySettings().name
    source = config.source_path or (os.path.abspath(config.source) if config.source else "")
    if source:
        import hashlib

        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(source).stem).strip("-.") or "config"
        return f"{stem}-{hashlib.blake2b(source.encode(), digest_size=4).hexdigest()}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", config.gateway.name).strip("-.") or "mcpopt"


def config_data_dir(config: Config | None) -> Path:
    """The folder of everything a config keeps between runs (telemetry.db, salt, rules.json,
    workflows/ journal, skills.db, codemode.key): `gateway.data_dir`, else `gateway.telemetry.data_dir`
    (the older key), else `<default_data_dir()>/<config_id(config)>`. Every part asks this function,
    so one config's telemetry, rules and skills are never another's unless both name one folder."""
    if config is not None:
        explicit = config.gateway.data_dir or config.gateway.telemetry.data_dir
        if explicit:
            return Path(explicit).expanduser()
    return default_data_dir() / config_id(config)


def read_layout(
    raw: Mapping[str, Any], *, file: str = "", config_dir: str | None = None, ask: AskFn | None = None
) -> Normalized:
    """A host's (or mcpopt's) config mapping in mcpopt's shape (`mcpopt.layouts.normalize`), with the
    keys mcpopt uses taken from the models themselves: `ServerConfig`'s fields in server entries,
    `Config`'s sections at the top (a new setting needs no second list)."""
    return normalize(
        raw,
        file=file,
        config_dir=config_dir,
        ask=ask,
        server_keys=frozenset(ServerConfig.model_fields),
        sections=frozenset(Config.model_fields) - {"mcpServers", "source", "layout", "notes"},
    )


def load_config(
    path: str | os.PathLike[str] | None = None,
    data: dict[str, Any] | None = None,
    *,
    ask: AskFn | None = None,
) -> Config:
    """Load and validate a config file (YAML or JSON) with `MCPOPT_*` overrides.

    The file may be mcpopt's own or any MCP host's as it is (Claude Desktop, Cursor, VS Code's
    `mcp.json` or `settings.json`, Windsurf, Claude Code): see `mcpopt.layouts`. Keys mcpopt
    does not use are ignored and reported in `Config.notes` (one line).

    Args:
        path: the file; `.json` is parsed as JSON, anything else as YAML (a superset).
        data: an already-parsed mapping, used instead of reading `path` (tests, embedding).
        ask: asks the user for a VS Code `${input:id}` that `MCPOPT_INPUT_<ID>` does not give
            (`mcpopt.layouts.terminal_ask` on a terminal); None never asks.

    Returns:
        The validated `Config`; relative `cwd` values resolve against the file's folder.

    Raises:
        ConfigError: the file is missing or unreadable, not YAML/JSON, or keys are invalid; one
            error lists every problem found (`ConfigError.problems`).
    """
    shown = str(path) if path is not None else ""
    raw = data if data is not None else (_read_file(Path(path)) if path is not None else {})
    config_dir = str(Path(path).resolve().parent) if path is not None else os.getcwd()
    layout = read_layout(raw, file=shown, config_dir=config_dir, ask=ask)
    problems = list(layout.problems)
    config: Config | None = None
    try:
        config = Config(**layout.data)
    except ValidationError as exc:
        problems.extend(_problems(exc, layout.servers_key))
    except (TypeError, ValueError) as exc:  # pydantic-settings: malformed MCPOPT_* JSON values
        raise ConfigError(shown or "(environment)", "MCPOPT_*", f"valid values ({exc})") from None
    if problems or config is None:
        raise ConfigError.many(shown or "(environment)", problems or [("", "invalid configuration")])
    config.source = shown
    # abspath, not realpath: a symlinked config (a Kubernetes ConfigMap swaps its target on
    # every update) must keep its data dir id.
    config.source_path = os.path.abspath(path) if path is not None else ""
    config.layout = layout.layout
    note = layout.info_line(shown)
    config.notes = [note] if note else []
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    for name, server in config.mcpServers.items():
        if path is not None and server.cwd and not os.path.isabs(server.cwd):
            server.cwd = str(base / server.cwd)
        for header, file in server.header_files.items() if not server.disabled else ():
            server.headers[header] = _read_secret(
                base / os.path.expanduser(file), shown, f"mcpServers.{name}.header_files.{header}"
            )
    _load_workflow_files(config, shown, Path(config_dir))
    return config


def _read_secret(path: Path, shown: str, key: str) -> str:
    """The stripped text of a secret file (a mounted token); never echoed in errors."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(shown or "(environment)", key, f"a readable file ({path}: {exc.strerror})") from None
    if not value or "\n" in value:
        raise ConfigError(shown or "(environment)", key, f"one non-empty line in {path}")
    return value


def _load_workflow_files(config: Config, shown: str, base: Path) -> None:
    """Add the workflows of `gateway.workflows.files` (globs, relative to the config's folder).

    Raises:
        ConfigError: a missing file, an invalid workflow (every problem named), a name defined twice.
    """
    import glob

    for i, pattern in enumerate(config.gateway.workflows.files):
        key = f"gateway.workflows.files[{i}]"
        full = pattern if os.path.isabs(pattern) else str(base / pattern)
        files = sorted(glob.glob(full)) if glob.has_magic(full) else [full]
        if not files:
            raise ConfigError(shown, key, f"no workflow file matches {pattern!r}")
        for file in files:
            if not os.path.exists(file):
                raise ConfigError(shown, key, f"workflow file not found: {file}")
            try:
                found = load_workflow_file(file)
            except WorkflowError as exc:
                raise ConfigError(shown, key, str(exc)) from None
            for wf in found:
                if wf.name in config.workflows:
                    where = config.workflows[wf.name].source
                    raise ConfigError(shown, key, f"{file}: workflow {wf.name!r} is also defined in {where}")
                config.workflows[wf.name] = wf


STARTER_CONFIG = """\
# mcpopt configuration. The `mcpServers` block is the one Claude Desktop, Cursor and
# VS Code use: paste yours here unchanged (or let `mcpopt import` write this file from the
# hosts' own files). mcpopt's own keys sit beside the standard ones.
# Any key can be overridden from the environment: MCPOPT_GATEWAY__SEPARATOR=. and so on.

mcpServers:
  time:                                   # a stdio server: command + args (+ env, cwd)
    command: uvx
    args: ["mcp-server-time"]
    # env: {TZ: UTC}                      # ${VAR}, ${VAR:-default} and ${CONFIG_DIR} expand in values
    # cwd: .
    # --- mcpopt keys (all optional) ---
    # prefix: time                        # tools are served as time__get_current_time; "" = no prefix
    # timeout_ms: 30000                   # per-call upstream timeout (default: gateway.call_timeout_ms)
    # startup_timeout_ms: 30000           # how long the server may take to answer its handshake
    # protocol: auto                      # auto = discover (2026-07-28), else handshake; legacy = handshake
    # disabled: false
    # cache: {tools: {get_current_time: {ttl_ms: 1000}}}   # only read-only tools are ever cached
    # replicas: 3                         # copies of this command; routing.strategy: least_inflight (default)
    # retry: {attempts: 3}                # only read-only / idempotent calls, or calls that never got through
    # lazy: true                          # start on first use; idle_timeout_ms: 600000 stops it when idle
    # max_rss_mb: 1024                    # restart it (gracefully) when its process tree stays above this RSS

  # everything:                           # a Streamable HTTP server
  #   url: http://127.0.0.1:3001/mcp
  #   headers: {Authorization: "Bearer ..."}
  #   type: http                          # http | streamable-http | sse (inferred from the URL if absent)

gateway:
  name: mcpopt
  separator: "__"                         # tool and prompt names: {server}{separator}{name}
  prefix_tools: true                      # false: serve names unprefixed (collisions: first server wins)
  call_timeout_ms: 60000                  # default upstream timeout per call
  page_size: 0                            # 0 = lists are sent whole; N = paginate the gateway's lists
  list_ttl_ms: 60000                      # ttlMs on lists to 2026-07-28 clients (they also hear list_changed)
  log_level: warning
  # data_dir: ~/mcpopt-shared             # telemetry, rules, journal, skills (default: one folder per config file)
  restart:                                # crashed upstreams restart with exponential backoff
    enabled: true
    initial_backoff_ms: 500
    max_backoff_ms: 30000
  # exposure: full                        # full | search (search_tools + call_tool) | code (execute_code)
  # code_mode: {sessions: {ttl_s: 1800}, private_data: {tools: ["crm__*"]}, isolation: {mode: auto}}
  # cache: {redis_url: redis://127.0.0.1:6379/0}    # L2 shared by gateway processes
  # shared: {redis_url: redis://127.0.0.1:6379/0, replica: r1}  # replicas share cache, limits, breakers, rules
  # telemetry: {level: standard}          # minimal | standard | detailed; enabled: false records nothing
  # watch: {interval_s: 5, growth_warning_mb: 64}   # CPU/RSS/fds/children per upstream process; rss_growth alert
  # shaping: {max_result_bytes: 65536}    # cut huge results; the whole stays readable as a resource
  # workflows: {files: [workflows/*.yaml]}  # more workflow files; the journal: workflows.journal.path
  # auth: {issuer: https://idp.example.com, resource: https://mcp.example.com/mcp}   # a shared gateway:
  # policy: {rules: [...]}                # who may use what; limits: {per_principal: ["120/minute"]}
  #                                       # (see examples/shared-gateway.yaml)

# workflows:                              # each is served as the tool workflow__<name>
#   now_and_log:
#     parameters: {zone: {type: string, default: UTC}}
#     steps:                              # steps without a dependency run in parallel
#       - {id: now, tool: time__get_current_time, arguments: {timezone: "{{params.zone}}"}}
#     on_failure: compensate              # undo completed writes (their `compensate:`) when a step fails
"""
