"""Read an MCP host's config file as it is, into mcpopt's shape (`mcpServers` + `gateway`).

The layouts (each host's documentation, December 2026):

| host | file | servers under | what else the file holds |
| --- | --- | --- | --- |
| Claude Desktop | `claude_desktop_config.json` | `mcpServers` | app settings (`globalShortcut`, `preferences`, ...) |
| Cursor | `~/.cursor/mcp.json`, `.cursor/mcp.json` | `mcpServers` | `envFile`; `${env:X}`, `${workspaceFolder}` |
| VS Code | `mcp.json` (user folder, `.vscode/`) | `servers` | `inputs` (`${input:id}`), `envFile`, `dev`, `sandbox*` |
| VS Code (older) | `settings.json` | `mcp.servers` | every other setting; `mcp.inputs` |
| Windsurf | `~/.codeium/windsurf/mcp_config.json` | `mcpServers` | `serverUrl` for HTTP servers, `disabledTools` |
| Claude Code | `~/.claude.json`, `.mcp.json` | `mcpServers` | per-project state (`projects`), `oauth` |

Rules: keys mcpopt uses are validated as always (`gateway:` strictly); keys it does not use are
ignored and reported in one info line (`Normalized.ignored`), unless one looks like a misspelt
mcpopt key (`commnd`, `timout_ms`), which is an error naming the key it resembles. Variables
`${VAR}`, `${VAR:-default}`, `${CONFIG_DIR}`, `${env:VAR}`, `${userHome}`, `${workspaceFolder}`,
`${workspaceFolderBasename}`, `${pathSeparator}` / `${/}` and `${input:id}` expand in server
entries. An `${input:id}` value comes from the environment variable `MCPOPT_INPUT_<ID>` (the id
upper-cased, other characters as `_`), else from `ask` (a prompt on the terminal, when there is
one), else from the input's `default`. Every problem is collected; none stops the others from
being found.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Problem = tuple[str, str]
"""`(key path, what was expected)`."""

AskFn = Callable[[dict[str, Any]], "str | None"]
"""`ask(input_declaration) -> value or None`: asks the user for a VS Code-style input."""

HOST_SERVER_KEYS = frozenset(
    {
        "dev", "sandbox", "sandboxEnabled", "gallery", "version", "disabledTools", "alwaysAllow", "autoApprove",
        "timeout", "oauth", "trust", "includeTools", "excludeTools", "icon", "icons", "name", "enabled", "tools",
        "networkTimeout", "roots", "autoStart", "metadata", "protocolEra",
    }
)  # fmt: skip
"""Keys hosts put in server entries that mcpopt does not use (ignored with the info line)."""

STANDARD_SERVER_KEYS = frozenset({"command", "args", "env", "cwd", "url", "headers", "type", "transport"})
"""The standard keys of a server entry (every host's; mcpopt's own come from `ServerConfig`)."""
_SILENT_TOP = frozenset({"$schema"})
_INPUT_ENV_PREFIX = "MCPOPT_INPUT_"
_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_LISTED = 12


@dataclass
class Normalized:
    """A host file in mcpopt's shape.

    Attributes:
        data: `{"mcpServers": {...}, "gateway": {...}?}` ready for `mcpopt.config.Config`.
        layout: `mcpopt` (a `mcpServers` file: mcpopt, Claude Desktop, Cursor, Windsurf, Claude
            Code), `vscode` (`servers`) or `vscode-settings` (`mcp.servers`).
        servers_key: where the servers sit in the file (`mcpServers`, `servers`, `mcp.servers`),
            so errors name the key the user wrote.
        ignored: key paths present in the file that mcpopt does not use.
        problems: every problem found, `(key path, expected)`.
    """

    data: dict[str, Any]
    layout: str
    servers_key: str
    ignored: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def info_line(self, file: str) -> str | None:
        """The one info line about ignored keys (None when nothing was ignored)."""
        if not self.ignored:
            return None
        shown = self.ignored[:_MAX_LISTED]
        more = len(self.ignored) - len(shown)
        tail = f" and {more} more" if more else ""
        where = f"{file}: " if file else ""
        return f"{where}ignored keys mcpopt does not use: {', '.join(shown)}{tail}"


def input_env_name(input_id: str) -> str:
    """`MCPOPT_INPUT_<ID>`: the environment variable that answers VS Code input `input_id`."""
    return _INPUT_ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", input_id).upper()


def normalize(
    raw: Mapping[str, Any],
    *,
    file: str = "",
    config_dir: str | None = None,
    environ: Mapping[str, str] | None = None,
    ask: AskFn | None = None,
    server_keys: frozenset[str] = STANDARD_SERVER_KEYS,
    sections: frozenset[str] = frozenset({"gateway"}),
) -> Normalized:
    """Bring a host's config mapping into mcpopt's shape, collecting every problem.

    Args:
        raw: the parsed file (a mapping).
        server_keys: the keys of a server entry mcpopt uses (`mcpopt.config` passes
            `ServerConfig`'s fields), passed on as they are; others are a host's.
        sections: mcpopt's own top-level sections besides `mcpServers` (`gateway`, `workflows`: the
            other fields of `mcpopt.config.Config`), passed on as they are.
        file: the file's path, for `${workspaceFolder}` and messages ("" when built in code).
        config_dir: the folder `${CONFIG_DIR}` and relative `envFile` paths resolve against
            (default: the file's folder, else the working directory).
        environ: the environment variables (default `os.environ`).
        ask: asks the user for an `${input:id}` with no environment value (None: never ask).

    Returns:
        The `Normalized` data; `problems` empty when the layout was understood.
    """
    env = os.environ if environ is None else environ
    base = config_dir or (str(Path(file).resolve().parent) if file else os.getcwd())
    out = Normalized(data={}, layout="mcpopt", servers_key="mcpServers")
    blocks: list[tuple[str, Any]] = []
    inputs: Any = raw.get("inputs")
    for key, value in raw.items():
        if key in ("mcpServers", "servers"):
            blocks.append((key, value))
        elif key in sections:
            out.data[key] = value
        elif key == "inputs" or key in _SILENT_TOP:
            continue
        elif key == "mcp" and isinstance(value, Mapping) and "servers" in value:
            blocks.append(("mcp.servers", value["servers"]))
            inputs = value.get("inputs", inputs)
            out.ignored.extend(f"mcp.{k}" for k in value if k not in ("servers", "inputs"))
        elif (near := _near(key, frozenset({"mcpServers", "servers", "inputs", *sections}))) is not None:
            out.problems.append((key, f"unknown key (did you mean '{near}'?)"))
        else:
            out.ignored.append(key)
    if blocks:
        out.servers_key = blocks[0][0]
        out.layout = {"mcpServers": "mcpopt", "servers": "vscode", "mcp.servers": "vscode-settings"}[out.servers_key]
    declared = _inputs(inputs, out)
    variables = _Variables(env, base, _workspace(file, base), declared, ask, out)
    servers: dict[str, Any] = {}
    for block_key, block in blocks:
        if not isinstance(block, Mapping):
            out.problems.append((block_key, f"a mapping of server name to server entry (got {type(block).__name__})"))
            continue
        for name, entry in block.items():
            where = f"{block_key}.{name}"
            if name in servers:
                out.problems.append((where, "a server of this name is defined twice ('mcpServers' and 'servers')"))
                continue
            servers[name] = _server(entry, where, base, variables, out, server_keys | STANDARD_SERVER_KEYS)
    out.data["mcpServers"] = servers
    return out


def parse_json(text: str) -> Any:
    """JSON, or JSONC (comments, trailing commas: VS Code's `mcp.json` and `settings.json`), via json5.

    Raises:
        json.JSONDecodeError: neither parses (the error is plain JSON's, with its position).
    """
    import json

    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        import json5

        try:
            return json5.loads(text)
        except ValueError:
            pass
        raise


def _near(key: str, known: frozenset[str]) -> str | None:
    """The known key `key` looks like a misspelling of (difflib ratio >= 0.8), else None."""
    found = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
    return found[0] if found and found[0] != key else None


def _inputs(inputs: Any, out: Normalized) -> dict[str, dict[str, Any]]:
    """VS Code `inputs` by id (`[{type, id, description, password?, default?, options?}]`)."""
    if inputs is None:
        return {}
    if not isinstance(inputs, list):
        out.problems.append(("inputs", f"a list of input declarations (got {type(inputs).__name__})"))
        return {}
    declared: dict[str, dict[str, Any]] = {}
    for i, item in enumerate(inputs):
        if not isinstance(item, Mapping) or not isinstance(item.get("id"), str):
            out.problems.append((f"inputs[{i}]", "an input declaration with an 'id' string"))
            continue
        declared[item["id"]] = dict(item)
    return declared


def _workspace(file: str, base: str) -> str:
    """`${workspaceFolder}`: the folder holding `.vscode/` or `.cursor/` for a file in one, else
    the config file's folder."""
    if file:
        parent = Path(file).resolve().parent
        if parent.name in (".vscode", ".cursor"):
            return str(parent.parent)
    return base


class _Variables:
    """Expands `${...}` in server entries; unresolvable ones become problems."""

    def __init__(
        self,
        env: Mapping[str, str],
        config_dir: str,
        workspace: str,
        declared: dict[str, dict[str, Any]],
        ask: AskFn | None,
        out: Normalized,
    ) -> None:
        self.env = env
        self.config_dir = config_dir
        self.workspace = workspace
        self.declared = declared
        self.ask = ask
        self.out = out
        self.answers: dict[str, str | None] = {}

    def expand(self, value: Any, key: str) -> Any:
        if isinstance(value, str):
            if "${" not in value:
                return value
            return _VARIABLE.sub(lambda m: self._one(m.group(1), key), value)
        if isinstance(value, Mapping):
            return {k: self.expand(v, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.expand(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    def _one(self, expr: str, key: str) -> str:
        name, sep, default = expr.partition(":-")
        if _NAME.fullmatch(name):
            if name == "CONFIG_DIR":
                return self.config_dir
            if name in ("userHome", "workspaceFolder", "workspaceFolderBasename", "pathSeparator"):
                return self._builtin(name)
            got = self.env.get(name)
            if got is None and sep:
                return default
            if got is None:
                self.out.problems.append((key, f"environment variable {name} is not set (use ${{{name}:-default}})"))
                return ""
            return got
        if expr == "/":
            return os.sep
        kind, _, arg = expr.partition(":")
        if kind == "env" and _NAME.fullmatch(arg):
            return self.env.get(arg, "")  # VS Code and Cursor: an unset variable is empty
        if kind == "input" and arg:
            return self._input(arg, key)
        self.out.problems.append(
            (key, f"${{{expr}}} cannot be resolved outside the host that defines it (use ${{VAR}} or ${{env:VAR}})")
        )
        return ""

    def _builtin(self, name: str) -> str:
        if name == "userHome":
            return str(Path.home())
        if name == "workspaceFolder":
            return self.workspace
        if name == "workspaceFolderBasename":
            return Path(self.workspace).name
        return os.sep

    def _input(self, input_id: str, key: str) -> str:
        if input_id in self.answers:
            known = self.answers[input_id]
            return known if known is not None else ""
        env_name = input_env_name(input_id)
        decl = self.declared.get(input_id)
        answer: str | None = self.env.get(env_name)
        if answer is None and decl is not None and self.ask is not None:
            answer = self.ask(decl)
        if answer is None and decl is not None and isinstance(decl.get("default"), str):
            answer = decl["default"]
        self.answers[input_id] = answer
        if answer is None:
            declared = "" if decl is not None else " (it is not declared in 'inputs')"
            self.out.problems.append(
                (key, f"input '{input_id}'{declared} has no value: set {env_name}, or run in a terminal to be asked")
            )
            return ""
        return answer


def _server(
    entry: Any, where: str, base: str, variables: _Variables, out: Normalized, server_keys: frozenset[str]
) -> Any:
    """One server entry: host keys mapped or dropped, `envFile` read, variables expanded."""
    if not isinstance(entry, Mapping):
        return entry  # `ServerConfig` validation names what was expected
    kept: dict[str, Any] = {}
    env_file: Any = None
    for key, value in entry.items():
        if key in server_keys:
            kept[key] = value
        elif key == "serverUrl":  # Windsurf's name for `url`
            if "url" in entry:
                out.problems.append((f"{where}.serverUrl", "give either 'url' or 'serverUrl', not both"))
            else:
                kept["url"] = value
        elif key == "envFile":
            env_file = value
        elif key in HOST_SERVER_KEYS:
            out.ignored.append(f"{where}.{key}")
        elif (near := _near(key, server_keys)) is not None:
            out.problems.append((f"{where}.{key}", f"unknown key (did you mean '{near}'?)"))
        else:
            out.ignored.append(f"{where}.{key}")
    kept = variables.expand(kept, where)
    if env_file is not None:
        loaded = _env_file(variables.expand(env_file, f"{where}.envFile"), f"{where}.envFile", base, out)
        if loaded:
            explicit = kept.get("env")
            kept["env"] = {**loaded, **(explicit if isinstance(explicit, Mapping) else {})}
    return kept


def _env_file(path: Any, key: str, base: str, out: Normalized) -> dict[str, str]:
    """`envFile`: KEY=VALUE lines (dotenv syntax, python-dotenv), relative to the config's folder."""
    if not isinstance(path, str) or not path:
        out.problems.append((key, "a path to a file of KEY=VALUE lines"))
        return {}
    full = Path(path) if os.path.isabs(path) else Path(base) / path
    if not full.is_file():
        out.problems.append((key, f"file not found: {full}"))
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(full).items() if v is not None}


def terminal_ask(decl: dict[str, Any]) -> str | None:
    """Ask for a VS Code input on the terminal (stderr for the question, never stdout, which may be
    the MCP wire); None when stdin or stderr is not a terminal."""
    import sys

    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return None
    label = decl.get("description") or decl["id"]
    default = decl.get("default")
    options = decl.get("options")
    hint = f" [{default}]" if isinstance(default, str) and default and not decl.get("password") else ""
    choices = f" ({', '.join(map(str, options))})" if isinstance(options, list) and options else ""
    prompt = f"{label}{choices}{hint}: "
    try:
        if decl.get("password"):
            import getpass

            value = getpass.getpass(prompt, stream=sys.stderr)
        else:
            sys.stderr.write(prompt)
            sys.stderr.flush()
            value = sys.stdin.readline().rstrip("\n")
    except (EOFError, KeyboardInterrupt):
        return None
    if not value and isinstance(default, str):
        return default
    return value
