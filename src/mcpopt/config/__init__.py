"""Configuration: the standard `mcpServers` block plus mcpopt's own keys.

A config file is YAML or JSON. Its `mcpServers` block is the one Claude Desktop, Cursor and
VS Code use (`command`, `args`, `env`, `cwd`, `url`, `headers`, `type`/`transport`), so an
existing `claude_desktop_config.json` loads unchanged. mcpopt's own keys sit beside it: per
server (inside each server entry) and global (under `gateway:`).

Environment variables override file values (pydantic-settings, nested with `__`):
`MCPOPT_GATEWAY__SEPARATOR=.`, `MCPOPT_GATEWAY__CALL_TIMEOUT_MS=5000`, ...

Every error is raised as `ConfigError` naming the file, the key path and what was expected.

The setting models live by concern in `plugins` (code mode, optimizer, workflows), `servers` (one
`mcpServers` entry), `edge` (HTTP/stdio edge, auth, policy) and `gateway` (the `gateway:` block);
every name is re-exported here, so `from mcpopt.config import X` is the way to import them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from mcpopt.config.edge import ApiKeySettings as ApiKeySettings
from mcpopt.config.edge import AuthSettings as AuthSettings
from mcpopt.config.edge import HttpEdgeSettings as HttpEdgeSettings
from mcpopt.config.edge import IntrospectionSettings as IntrospectionSettings
from mcpopt.config.edge import PolicyRule as PolicyRule
from mcpopt.config.edge import PolicySettings as PolicySettings
from mcpopt.config.edge import PrincipalMatch as PrincipalMatch
from mcpopt.config.edge import RateLimitList as RateLimitList
from mcpopt.config.edge import StdioEdgeSettings as StdioEdgeSettings
from mcpopt.config.gateway import BatchSettings as BatchSettings
from mcpopt.config.gateway import CacheSettings as CacheSettings
from mcpopt.config.gateway import GatewaySettings as GatewaySettings
from mcpopt.config.gateway import LimitsSettings as LimitsSettings
from mcpopt.config.gateway import ShapingSettings as ShapingSettings
from mcpopt.config.gateway import SharedSettings as SharedSettings
from mcpopt.config.gateway import TelemetrySettings as TelemetrySettings
from mcpopt.config.gateway import WatchSettings as WatchSettings
from mcpopt.config.plugins import LEVELS as LEVELS
from mcpopt.config.plugins import CanarySettings as CanarySettings
from mcpopt.config.plugins import CodeModeSettings as CodeModeSettings
from mcpopt.config.plugins import IsolationSettings as IsolationSettings
from mcpopt.config.plugins import JournalSettings as JournalSettings
from mcpopt.config.plugins import Level as Level
from mcpopt.config.plugins import OptimizationSettings as OptimizationSettings
from mcpopt.config.plugins import PrivateDataSettings as PrivateDataSettings
from mcpopt.config.plugins import PrivateKind as PrivateKind
from mcpopt.config.plugins import SessionSettings as SessionSettings
from mcpopt.config.plugins import SkillSettings as SkillSettings
from mcpopt.config.plugins import WorkflowSettings as WorkflowSettings
from mcpopt.config.plugins import parse_duration as parse_duration
from mcpopt.config.servers import AdaptiveTimeoutConfig as AdaptiveTimeoutConfig
from mcpopt.config.servers import BreakerConfig as BreakerConfig
from mcpopt.config.servers import HealthCheckConfig as HealthCheckConfig
from mcpopt.config.servers import RestartPolicy as RestartPolicy
from mcpopt.config.servers import RetryConfig as RetryConfig
from mcpopt.config.servers import RoutingConfig as RoutingConfig
from mcpopt.config.servers import ServerCacheConfig as ServerCacheConfig
from mcpopt.config.servers import ServerConfig as ServerConfig
from mcpopt.config.servers import ToolCacheConfig as ToolCacheConfig
from mcpopt.config.servers import TransportName as TransportName
from mcpopt.errors import ConfigError
from mcpopt.layouts import AskFn, Normalized, normalize, parse_json
from mcpopt.workflow_model import NAME as WORKFLOW_NAME
from mcpopt.workflow_model import Workflow, WorkflowError, load_workflow_file


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


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a config file (JSON by its `.json` suffix, else YAML; an empty file: {}), not
    yet validated; raises `ConfigError` naming the file when it cannot be read or parsed."""
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
    raw = data if data is not None else (read_config_file(Path(path)) if path is not None else {})
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
