"""Settings of the plugins: code mode (isolation, sessions, skills, private data), the optimizer
(canary, levels) and workflows (`gateway.workflows`, its journal); `parse_duration`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
