"""The hosts' own config files, read as they are; `mcpopt import`, `install`, `uninstall`.

Issue 11, failure 5: a Claude Desktop file with `globalShortcut` / `preferences` and VS Code's
`mcp.json` (`servers`, `inputs`) failed to load, and only one problem of two was shown.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from mcp import Client, StdioServerParameters

from conftest import MCPOPT, ROOT, fake_entry, text_of, time_entry
from mcpopt.config import ServerConfig, load_config
from mcpopt.errors import ConfigError
from mcpopt.hosts.install import BACKUP_SUFFIX, RECORD_SUFFIX, is_mcpopt
from mcpopt.layouts import input_env_name

CLAUDE_DESKTOP = {
    "globalShortcut": "Ctrl+Space",
    "preferences": {"menuBarEnabled": False, "quickEntryShortcut": "off"},
    "mcpServers": {"time": time_entry()},
}


@pytest.fixture(autouse=True)
def _no_mcpopt_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("MCPOPT_"):
            monkeypatch.delenv(key)


def _write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2), encoding="utf-8")
    return path


def _run(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MCPOPT, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(cwd),
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "400", **(env or {})},
    )


# ---- reading the layouts ------------------------------------------------------------------------
def test_every_mcpopt_key_passes_the_layout_reader(tmp_path: Path) -> None:
    """Server keys and top-level sections come from the models themselves: every `ServerConfig`
    field reaches `ServerConfig` (a new setting is never mistaken for a host's key)."""
    assert "header_files" in ServerConfig.model_fields  # a key added after the reader was written
    secret = tmp_path / "token.txt"
    secret.write_text("s3cret\n")
    data = {"mcpServers": {"web": {"url": "http://127.0.0.1:1/mcp", "header_files": {"X-Token": str(secret)}}}}
    cfg = load_config(_write(tmp_path / "c.json", data))
    assert cfg.mcpServers["web"].headers["X-Token"] == "s3cret"
    assert not cfg.notes
    assert not load_config(data={"mcpServers": {}, "workflows": {}}).notes  # a section of mcpopt's own


def test_claude_desktop_file_with_app_settings_loads(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path / "claude_desktop_config.json", CLAUDE_DESKTOP))
    assert list(cfg.mcpServers) == ["time"]
    assert len(cfg.notes) == 1
    assert "globalShortcut" in cfg.notes[0] and "preferences" in cfg.notes[0]


def test_claude_desktop_file_serves(tmp_path: Path) -> None:
    """The README's promise: `mcpopt serve -c claude_desktop_config.json` with the file as it is."""
    path = _write(tmp_path / "claude_desktop_config.json", CLAUDE_DESKTOP)
    proc = _run("tools", "list", "-c", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert "time__get_current_time" in proc.stdout
    assert "ignored keys mcpopt does not use: globalShortcut, preferences" in proc.stderr
    assert proc.stderr.count("ignored keys") == 1


VSCODE_MCP_JSON = """\
// VS Code's mcp.json is JSONC: comments and trailing commas are fine
{
  "inputs": [
    {"type": "promptString", "id": "api-key", "description": "API key", "password": true},
    {"type": "pickString", "id": "zone", "description": "Time zone", "options": ["UTC", "CET"], "default": "UTC"},
  ],
  "servers": {
    "time": {
      "type": "stdio",
      "command": "TIME_CMD",
      "args": ["--local-timezone", "${input:zone}"],
      "env": {"API_KEY": "${input:api-key}", "HOME_SEEN": "${userHome}", "WS": "${workspaceFolder}"},
      "envFile": "${workspaceFolder}/.env",
      "dev": {"watch": "src/**/*.py"},
    },
  },
}
"""


def _vscode_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / ".env").parent.mkdir(parents=True)
    (project / ".env").write_text("FROM_ENV_FILE=yes\nAPI_KEY=overridden-by-env\n")
    text = VSCODE_MCP_JSON.replace("TIME_CMD", time_entry()["command"])
    return _write(project / ".vscode" / "mcp.json", text)


def test_vscode_mcp_json_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _vscode_project(tmp_path)
    monkeypatch.setenv(input_env_name("api-key"), "secret-1")
    cfg = load_config(path)
    assert cfg.layout == "vscode"
    server = cfg.mcpServers["time"]
    assert server.kind == "stdio"
    assert server.args == ["--local-timezone", "UTC"]  # the pickString's default
    assert server.env["API_KEY"] == "secret-1"  # `env` wins over `envFile`
    assert server.env["FROM_ENV_FILE"] == "yes"
    assert server.env["HOME_SEEN"] == str(Path.home())
    assert server.env["WS"] == str(tmp_path / "project")
    assert "servers.time.dev" in cfg.notes[0]


def test_vscode_input_asked_when_not_in_env(tmp_path: Path) -> None:
    asked: list[str] = []

    def ask(decl: dict[str, Any]) -> str:
        asked.append(decl["id"])
        return "typed" if decl["id"] == "api-key" else "CET"

    cfg = load_config(_vscode_project(tmp_path), ask=ask)
    assert sorted(asked) == ["api-key", "zone"]  # each asked once
    assert cfg.mcpServers["time"].env["API_KEY"] == "typed"
    assert cfg.mcpServers["time"].args[-1] == "CET"


def test_vscode_missing_input_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_vscode_project(tmp_path))
    msg = str(info.value)
    assert "servers.time.env.API_KEY" in msg
    assert "MCPOPT_INPUT_API_KEY" in msg


def test_vscode_settings_json(tmp_path: Path) -> None:
    settings = {"editor.fontSize": 14, "mcp": {"servers": {"time": time_entry()}, "inputs": []}}
    cfg = load_config(_write(tmp_path / "settings.json", settings))
    assert cfg.layout == "vscode-settings"
    assert list(cfg.mcpServers) == ["time"]
    assert "editor.fontSize" in cfg.notes[0]


def test_vscode_errors_name_the_servers_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path / "mcp.json", {"servers": {"a": {"command": "x", "args": "y"}}}))
    assert "key 'servers.a.args'" in str(info.value)


def test_cursor_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_TOKEN", "t0k")
    entry = {**time_entry(), "env": {"TOKEN": "${env:MY_TOKEN}", "UNSET": "${env:NOT_SET_ANYWHERE}"}}
    cfg = load_config(_write(tmp_path / "ws" / ".cursor" / "mcp.json", {"mcpServers": {"time": entry}}))
    assert cfg.mcpServers["time"].env == {"TOKEN": "t0k", "UNSET": ""}


def test_windsurf_server_url(tmp_path: Path) -> None:
    data = {"mcpServers": {"remote": {"serverUrl": "http://127.0.0.1:1/mcp", "disabledTools": ["x"]}}}
    cfg = load_config(_write(tmp_path / "mcp_config.json", data))
    assert cfg.mcpServers["remote"].kind == "http"
    assert cfg.mcpServers["remote"].url == "http://127.0.0.1:1/mcp"


def test_claude_code_user_file(tmp_path: Path) -> None:
    data = {
        "numStartups": 12,
        "projects": {"/somewhere": {"mcpServers": {"other": {"command": "x"}}, "allowedTools": []}},
        "mcpServers": {"time": {"type": "stdio", **time_entry()}},
        "oauthAccount": {"emailAddress": "a@b"},
    }
    cfg = load_config(_write(tmp_path / ".claude.json", data))
    assert list(cfg.mcpServers) == ["time"]
    assert len(cfg.notes) == 1 and "projects" in cfg.notes[0]


def test_every_problem_is_listed(tmp_path: Path) -> None:
    """Not `[+1 more problem]`: each problem with its key path, in one message."""
    data = {
        "mcpServers": {
            "a": {"command": "x", "args": "not-a-list"},
            "b": {"command": "x", "timout_ms": 5},
            "c": {"args": ["no command"]},
        },
        "gateway": {"separator": "::", "nonsense": 1},
    }
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path / "bad.json", data))
    msg = str(info.value)
    assert "more problem" not in msg
    assert "5 problems" in msg, msg
    for key in ("mcpServers.a.args", "mcpServers.b.timout_ms", "mcpServers.c", "gateway.separator", "gateway.nonsense"):
        assert f"key '{key}'" in msg, (key, msg)
    assert "did you mean 'timeout_ms'" in msg
    assert len(info.value.problems) == 5


def test_misspelt_top_level_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path / "x.yaml", "mcpServer:\n  a: {command: x}\n"))
    assert "did you mean 'mcpServers'" in str(info.value)


# ---- import ---------------------------------------------------------------------------------------
def _home(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "APPDATA": str(home / "AppData")}


def test_import_reads_every_installed_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _home(tmp_path)
    home = Path(env["HOME"])
    _write(home / ".config" / "Claude" / "claude_desktop_config.json", CLAUDE_DESKTOP)
    _write(home / ".cursor" / "mcp.json", {"mcpServers": {"time": time_entry(), "fake": fake_entry()}})
    vscode = {
        "inputs": [{"type": "promptString", "id": "tok", "description": "token"}],
        "servers": {"fake": {"type": "stdio", **fake_entry(), "env": {"T": "${input:tok}"}}},
    }
    _write(home / ".config" / "Code" / "User" / "mcp.json", vscode)
    gateway_entry = {"command": MCPOPT, "args": ["serve", "-c", "/x/mcpopt.yaml"]}
    _write(home / ".codeium" / "windsurf" / "mcp_config.json", {"mcpServers": {"mcpopt": gateway_entry}})
    out = tmp_path / "imported.yaml"
    proc = _run("import", "-o", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(out.read_text())
    # time: the same in Claude Desktop and Cursor, kept once; fake: differs in VS Code, renamed.
    assert sorted(data["mcpServers"]) == ["fake", "fake-vscode", "time"]
    assert data["inputs"][0]["id"] == "tok"
    assert "mcpopt" not in data["mcpServers"]  # never a gateway behind itself
    assert "launches mcpopt itself" in proc.stderr
    monkeypatch.setenv(input_env_name("tok"), "v")
    cfg = load_config(out)
    assert cfg.mcpServers["fake-vscode"].env == {"T": "v"}


def test_import_refuses_to_overwrite(tmp_path: Path) -> None:
    env = _home(tmp_path)
    _write(Path(env["HOME"]) / ".cursor" / "mcp.json", {"mcpServers": {"time": time_entry()}})
    out = _write(tmp_path / "mine.yaml", "mcpServers: {}\n")
    proc = _run("import", "-o", str(out), env=env)
    assert proc.returncode == 1 and "--force" in proc.stderr
    assert out.read_text() == "mcpServers: {}\n"


def test_import_finds_nothing(tmp_path: Path) -> None:
    proc = _run("import", "-o", str(tmp_path / "x.yaml"), env=_home(tmp_path))
    assert proc.returncode == 1
    assert "no MCP host config file found" in proc.stderr


def test_is_mcpopt() -> None:
    assert is_mcpopt({"command": "/usr/bin/mcpopt", "args": ["serve", "-c", "x"]})
    assert is_mcpopt({"command": "uvx", "args": ["mcpopt", "serve"]})
    assert not is_mcpopt({"command": "uvx", "args": ["mcp-server-time"]})


# ---- install / uninstall ----------------------------------------------------------------------------
async def _tools_via_entry(entry: dict[str, Any], env: dict[str, str]) -> list[str]:
    """Launch what the host would launch, with the SDK's client, and list the tools."""
    params = StdioServerParameters(
        command=entry["command"], args=entry["args"], env={**env, **entry.get("env", {})}, cwd=str(ROOT)
    )
    async with Client(params, mode="legacy") as client:
        names = [t.name for t in (await client.list_tools()).tools]
        result = await client.call_tool("time__get_current_time", {"timezone": "UTC"})
        assert not result.is_error, text_of(result)
        return names


@pytest.mark.anyio
async def test_install_and_uninstall_claude_desktop(tmp_path: Path) -> None:
    env = _home(tmp_path)
    desktop = Path(env["HOME"]) / ".config" / "Claude" / "claude_desktop_config.json"
    _write(desktop, CLAUDE_DESKTOP)
    original = desktop.read_bytes()
    config = tmp_path / "gateway" / "mcpopt.yaml"
    config.parent.mkdir()
    proc = _run("install", "--client", "claude-desktop", "-c", str(config), env=env)
    assert proc.returncode == 0, proc.stderr
    assert config.is_file(), "install imports the host's servers into a missing config first"
    backup = desktop.with_name(desktop.name + BACKUP_SUFFIX)
    assert backup.read_bytes() == original
    installed = json.loads(desktop.read_text())
    assert installed["globalShortcut"] == "Ctrl+Space" and installed["preferences"] == CLAUDE_DESKTOP["preferences"]
    assert list(installed["mcpServers"]) == ["mcpopt"]
    entry = installed["mcpServers"]["mcpopt"]
    assert entry["args"] == ["serve", "-c", str(config.resolve())]
    private = {"XDG_DATA_HOME": os.environ.get("XDG_DATA_HOME", str(tmp_path))}
    assert "time__get_current_time" in await _tools_via_entry(entry, private)
    # installing again keeps the first backup (the original), and uninstall restores it
    assert _run("install", "--client", "claude-desktop", "-c", str(config), env=env).returncode == 0
    assert backup.read_bytes() == original
    proc = _run("uninstall", "--client", "claude-desktop", env=env)
    assert proc.returncode == 0, proc.stderr
    assert desktop.read_bytes() == original
    assert not backup.exists() and not desktop.with_name(desktop.name + RECORD_SUFFIX).exists()


def test_install_keeps_servers_the_config_does_not_serve(tmp_path: Path) -> None:
    env = _home(tmp_path)
    cursor = _write(
        Path(env["HOME"]) / ".cursor" / "mcp.json", {"mcpServers": {"time": time_entry(), "x": {"command": "x"}}}
    )
    config = _write(tmp_path / "mcpopt.yaml", yaml.safe_dump({"mcpServers": {"time": time_entry()}}))
    proc = _run("install", "--client", "cursor", "-c", str(config), env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(cursor.read_text())["mcpServers"]) == ["mcpopt", "x"]


def test_install_vscode_passes_inputs(tmp_path: Path) -> None:
    env = _home(tmp_path)
    vscode = {
        "inputs": [{"type": "promptString", "id": "api-key", "password": True}],
        "servers": {"fake": {"type": "stdio", **fake_entry(), "env": {"K": "${input:api-key}"}}},
    }
    target = _write(Path(env["HOME"]) / ".config" / "Code" / "User" / "mcp.json", vscode)
    config = tmp_path / "mcpopt.yaml"
    proc = _run("install", "--client", "vscode", "-c", str(config), env=env)
    assert proc.returncode == 0, proc.stderr
    written = json.loads(target.read_text())
    assert written["inputs"] == vscode["inputs"]  # VS Code still asks ...
    assert written["servers"]["mcpopt"]["type"] == "stdio"
    assert written["servers"]["mcpopt"]["env"] == {"MCPOPT_INPUT_API_KEY": "${input:api-key}"}  # ... and tells mcpopt
    assert yaml.safe_load(config.read_text())["inputs"] == vscode["inputs"]


def test_uninstall_refuses_a_changed_file(tmp_path: Path) -> None:
    env = _home(tmp_path)
    cursor = _write(Path(env["HOME"]) / ".cursor" / "mcp.json", {"mcpServers": {"time": time_entry()}})
    original = cursor.read_text()
    assert _run("install", "--client", "cursor", "-c", str(tmp_path / "m.yaml"), env=env).returncode == 0
    cursor.write_text(cursor.read_text().replace("mcpopt", "mcpopt-edited", 1))
    proc = _run("uninstall", "--client", "cursor", env=env)
    assert proc.returncode == 1 and "--force" in proc.stderr
    assert _run("uninstall", "--client", "cursor", "--force", env=env).returncode == 0
    assert cursor.read_text() == original
    assert cursor.with_name("mcp.json.mcpopt-replaced").is_file()


def test_install_creates_a_missing_host_file_and_uninstall_removes_it(tmp_path: Path) -> None:
    env = _home(tmp_path)
    config = _write(tmp_path / "mcpopt.yaml", yaml.safe_dump({"mcpServers": {"time": time_entry()}}))
    proc = _run("install", "--client", "claude-code", "-c", str(config), env=env)
    assert proc.returncode == 0, proc.stderr
    target = Path(env["HOME"]) / ".claude.json"
    assert json.loads(target.read_text())["mcpServers"]["mcpopt"]["type"] == "stdio"
    assert _run("uninstall", "--client", "claude-code", env=env).returncode == 0
    assert not target.exists()


def test_unknown_client_is_named(tmp_path: Path) -> None:
    proc = _run("install", "--client", "notepad", env=_home(tmp_path))
    assert proc.returncode == 2 and "claude-desktop" in proc.stderr
