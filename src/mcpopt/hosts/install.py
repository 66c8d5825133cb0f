"""`mcpopt import`, `mcpopt install` and `mcpopt uninstall`: from the hosts' files to one mcpopt
config, and each host's file pointed at mcpopt (and back).

- `find_sources` reads every known host's user-level file that exists (and, given a project
  folder, its project files) as the host wrote it; `merge` turns them into one mcpopt config:
  entries kept as written (their `${...}` variables are resolved when mcpopt loads the file),
  relative `cwd` / `envFile` paths made absolute, a server defined the same way twice kept once,
  a name clash with a different definition renamed `<name>-<host>`, and entries that already
  launch mcpopt left out (no gateway behind itself).
- `install` backs up the host's file (`<file>.mcpopt-backup`, an exact copy, plus
  `<file>.mcpopt-install.json`, what was written), then rewrites its servers block: the servers
  the mcpopt config serves are replaced by one `mcpopt` entry (`mcpopt serve -c <config>`),
  every other key of the file is kept. A VS Code file keeps its `inputs`, and the entry passes
  each `${input:id}` the config uses to mcpopt as `MCPOPT_INPUT_<ID>`, so VS Code still asks.
- `uninstall` puts the backup back (or removes a file install created), refusing without
  `force` when the file changed since the install.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mcpopt.errors import ConfigError, McpoptError
from mcpopt.hosts.locations import HOSTS, Host
from mcpopt.layouts import input_env_name, parse_json

BACKUP_SUFFIX = ".mcpopt-backup"
RECORD_SUFFIX = ".mcpopt-install.json"
_INPUT_REF = re.compile(r"\$\{input:([^}]+)\}")


class InstallError(McpoptError):
    """`install` / `uninstall` cannot proceed; the message says why and what to do."""


@dataclass
class Source:
    """The servers one host file holds.

    Attributes:
        host: the host.
        path: the file.
        scope: `user` (the host's own file) or `project` (a project folder's file).
        servers: name -> entry, as written (paths made absolute).
        inputs: VS Code input declarations.
    """

    host: Host
    path: Path
    scope: str
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ImportPlan:
    """What `mcpopt import` writes: `data` (`mcpServers` + `inputs`) and what it noticed."""

    data: dict[str, Any]
    sources: list[Source]
    notes: list[str] = field(default_factory=list)


def read_json(path: Path) -> dict[str, Any]:
    """A host file as a mapping (JSON, or JSONC as VS Code allows).

    Raises:
        ConfigError: unreadable, not JSON/JSONC, or not a mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read the file ({exc.strerror})") from None
    try:
        data = parse_json(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), "", f"expected valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "(top level)", f"a JSON object (got {type(data).__name__})")
    return data


def _servers_of(data: Mapping[str, Any], host: Host, project: Path | None) -> dict[str, Any]:
    if host.name == "vscode":
        block = data.get("servers")
        if block is None and isinstance(data.get("mcp"), Mapping):
            block = data["mcp"].get("servers")
    else:
        block = data.get("mcpServers")
    servers = dict(block) if isinstance(block, Mapping) else {}
    if host.name == "claude-code" and project is not None:
        projects = data.get("projects")
        local = projects.get(str(project)) if isinstance(projects, Mapping) else None
        if isinstance(local, Mapping) and isinstance(local.get("mcpServers"), Mapping):
            servers.update(local["mcpServers"])  # local scope wins over user scope, as in Claude Code
    return servers


def find_sources(
    *,
    clients: list[str] | None = None,
    project: Path | None = None,
    environ: Mapping[str, str] | None = None,
    platform: str | None = None,
) -> list[Source]:
    """Every host file that exists, read as written.

    Args:
        clients: host names to look at (default all of `HOSTS`).
        project: a project folder whose project files (`.vscode/mcp.json`, `.cursor/mcp.json`,
            `.mcp.json`) are read too, and whose Claude Code local-scope servers are included.
        environ / platform: where home folders are (default: this process's).

    Raises:
        ConfigError: a file exists but cannot be parsed (naming the file).
    """
    found: list[Source] = []
    for name in clients or list(HOSTS):
        h = HOSTS[name]
        files = [(f, "user") for f in h.user_files(environ, platform) if f.is_file()][:1]
        if project is not None:
            files += [(project / rel, "project") for rel in h.project_files if (project / rel).is_file()]
        for path, scope in files:
            data = read_json(path)
            src = Source(h, path, scope)
            workspace = project if scope == "project" else None
            for server, entry in _servers_of(data, h, project if scope == "user" else None).items():
                if isinstance(entry, Mapping):
                    src.servers[server] = _absolute(dict(entry), path.parent, workspace)
            inputs = data.get("inputs")
            if inputs is None and isinstance(data.get("mcp"), Mapping):
                inputs = data["mcp"].get("inputs")
            if isinstance(inputs, list):
                src.inputs = [dict(i) for i in inputs if isinstance(i, Mapping) and isinstance(i.get("id"), str)]
            found.append(src)
    return found


def _absolute(entry: dict[str, Any], folder: Path, workspace: Path | None) -> dict[str, Any]:
    """Entry values that depend on where the host file was, made independent of it."""

    def fix(value: Any) -> Any:
        if isinstance(value, str):
            value = value.replace("${CONFIG_DIR}", str(folder))
            if workspace is not None:
                value = value.replace("${workspaceFolder}", str(workspace))
                value = value.replace("${workspaceFolderBasename}", workspace.name)
            return value
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    entry = fix(entry)
    base = workspace or folder
    for key in ("cwd", "envFile"):
        value = entry.get(key)
        if isinstance(value, str) and value and "${" not in value and not os.path.isabs(value):
            entry[key] = str(base / value)
    return entry


def is_mcpopt(entry: Mapping[str, Any]) -> bool:
    """True for an entry that launches mcpopt itself (`mcpopt serve ...`, `uvx mcpopt serve`)."""
    command = entry.get("command")
    args = entry.get("args")
    words = [str(command or ""), *(map(str, args) if isinstance(args, list) else ())]
    names = [Path(w).name for w in words]
    return any(n in ("mcpopt", "mcpopt.exe", "mcpopt.cli") for n in names) and "serve" in words


def merge(sources: list[Source]) -> ImportPlan:
    """One mcpopt config from several host files (see the module docstring for the rules)."""
    servers: dict[str, dict[str, Any]] = {}
    inputs: dict[str, dict[str, Any]] = {}
    plan = ImportPlan({}, sources)
    for src in sources:
        for name, entry in src.servers.items():
            if is_mcpopt(entry):
                plan.notes.append(f"{src.path}: left out '{name}' (it launches mcpopt itself)")
                continue
            if name in servers:
                if _same(servers[name], entry):
                    continue
                renamed = f"{name}-{src.host.name}"
                plan.notes.append(f"{src.path}: '{name}' is defined differently elsewhere; imported as '{renamed}'")
                name = renamed
            servers[name] = entry
        for decl in src.inputs:
            inputs.setdefault(decl["id"], dict(decl))
    plan.data["mcpServers"] = servers
    if inputs:
        plan.data["inputs"] = list(inputs.values())
    return plan


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    keys = ("command", "args", "env", "url", "serverUrl", "headers", "cwd")
    return all(a.get(k) == b.get(k) for k in keys)


def render(plan: ImportPlan) -> str:
    """The YAML text of an import, with a header naming its sources."""
    lines = ["# mcpopt config written by `mcpopt import` from:"]
    lines += [f"#   {s.host.title} ({s.scope}): {s.path}" for s in plan.sources] or ["#   (no host files found)"]
    lines += [
        "# Entries are as the hosts wrote them; ${input:id} values come from MCPOPT_INPUT_<ID> (or a prompt).",
        "# mcpopt's own keys (cache, replicas, exposure, ...): see `mcpopt init` for a commented example.",
        "",
    ]
    body = yaml.safe_dump(plan.data, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return "\n".join(lines) + body


# ---- install / uninstall ----------------------------------------------------------------------
@dataclass
class InstallReport:
    """What `install` did: the host file, its backup, the entry written, the servers kept as they were."""

    file: Path
    backup: Path | None
    entry: dict[str, Any]
    replaced: list[str]
    kept: list[str]
    created_config: bool = False


def mcpopt_command() -> str:
    """The absolute path of this installation's `mcpopt` executable (what hosts should launch)."""
    beside = Path(sys.executable).with_name("mcpopt.exe" if sys.platform == "win32" else "mcpopt")
    if beside.is_file():
        return str(beside)
    found = shutil.which("mcpopt")
    return str(Path(found).resolve()) if found else "mcpopt"


def install(
    h: Host,
    config: Path,
    *,
    name: str = "mcpopt",
    file: Path | None = None,
    command: str | None = None,
    served: set[str] | None = None,
    input_ids: set[str] | None = None,
) -> InstallReport:
    """Point host `h` at mcpopt: back its file up, then rewrite its servers block.

    Args:
        h: the host.
        config: the mcpopt config the host should serve (absolute path written).
        name: the entry's name in the host's file.
        file: the host file (default `h.user_file()`).
        command: the mcpopt executable (default `mcpopt_command()`).
        served: server names the config serves (replaced by the entry; others stay). None: all.
        input_ids: VS Code input ids the config uses (passed to mcpopt as `MCPOPT_INPUT_<ID>`).

    Raises:
        ConfigError: the host file exists but cannot be parsed.
        InstallError: the file cannot be written.
    """
    target = file or h.user_file()
    existed = target.is_file()
    original = target.read_text(encoding="utf-8") if existed else None
    data = read_json(target) if existed else {}
    record_path = target.with_name(target.name + RECORD_SUFFIX)
    backup = target.with_name(target.name + BACKUP_SUFFIX)
    first_install = not record_path.is_file()
    key = h.servers_key
    block = data.get(key)
    if h.name == "vscode" and block is None and isinstance(data.get("mcp"), Mapping):
        block = data["mcp"].get("servers")  # an old settings.json-style file: written as mcp.json's `servers`
    block = dict(block) if isinstance(block, Mapping) else {}
    replaced = [n for n in block if (served is None or n in served) and n != name]
    kept = [n for n in block if n not in replaced and n != name]
    entry: dict[str, Any] = {"command": command or mcpopt_command(), "args": ["serve", "-c", str(config.resolve())]}
    if h.name in ("vscode", "claude-code"):
        entry = {"type": "stdio", **entry}
    if h.name == "vscode" and input_ids:
        entry["env"] = {input_env_name(i): f"${{input:{i}}}" for i in sorted(input_ids)}
    new_block = {n: block[n] for n in kept}
    new_block[name] = entry
    data[key] = new_block
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if first_install:
            if existed:
                shutil.copy2(target, backup)
            record = {
                "version": 1,
                "existed": existed,
                "original": original,
                "installed": text,
                "config": str(config.resolve()),
                "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            }
        else:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            record["installed"] = text
        _atomic_write(target, text)
        _atomic_write(record_path, json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise InstallError(f"cannot write {target}: {exc.strerror or exc}") from None
    return InstallReport(target, backup if backup.is_file() else None, entry, replaced, kept)


def uninstall(h: Host, *, file: Path | None = None, force: bool = False) -> Path:
    """Restore a host file as it was before `install`.

    Returns:
        The restored (or removed) file.

    Raises:
        InstallError: no install record, or the file changed since the install and `force` is off.
    """
    target = file or h.user_file()
    record_path = target.with_name(target.name + RECORD_SUFFIX)
    backup = target.with_name(target.name + BACKUP_SUFFIX)
    if not record_path.is_file():
        raise InstallError(f"{target}: no mcpopt install to undo (no {record_path.name} beside it)")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    current = target.read_text(encoding="utf-8") if target.is_file() else None
    if current is not None and current != record.get("installed"):
        if not force:
            raise InstallError(
                f"{target} changed since `mcpopt install`; pass --force to restore the backup anyway "
                f"(the current file is then kept as {target.name}.mcpopt-replaced)"
            )
        shutil.copy2(target, target.with_name(target.name + ".mcpopt-replaced"))
    try:
        if record.get("existed"):
            original = record.get("original")
            if backup.is_file():
                _atomic_write(target, backup.read_text(encoding="utf-8"))
            elif isinstance(original, str):
                _atomic_write(target, original)
        elif target.is_file():
            target.unlink()
        backup.unlink(missing_ok=True)
        record_path.unlink()
    except OSError as exc:
        raise InstallError(f"cannot restore {target}: {exc.strerror or exc}") from None
    return target


def input_ids_of(data: Mapping[str, Any]) -> set[str]:
    """The `${input:id}` ids used anywhere in a config mapping."""
    return set(_INPUT_REF.findall(json.dumps(data)))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.mcpopt-tmp")
    tmp.write_text(text, encoding="utf-8")
    if path.exists():
        shutil.copymode(path, tmp)
    os.replace(tmp, path)
