"""Config loading: valid YAML/JSON, one clear error per bad file (API and CLI), env override, init."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import MCPOPT, ROOT
from mcpopt.config import load_config
from mcpopt.errors import ConfigError

VALID_YAML = """\
mcpServers:
  time:
    command: mcp-server-time
    args: ["--local-timezone", "UTC"]
    timeout_ms: 5000
  web:
    url: http://127.0.0.1:9999/mcp
    headers: {Authorization: "Bearer x"}
gateway:
  separator: "__"
  call_timeout_ms: 1234
"""

CLAUDE_DESKTOP_JSON = {
    "mcpServers": {
        "filesystem": {
            "command": "npx",
            "args": ["-y", "@modelcontextprotocol/server-filesystem", "/tmp"],
            "env": {"DEBUG": "1"},
        },
        "remote": {"type": "streamable-http", "url": "https://example.com/mcp"},
    }
}

# (file name, content, key path in the message, words of the expectation)
BAD_FILES = [
    ("syntax.yaml", "mcpServers:\n  a:\n   command: x\n  - b\n", "line 4", "valid YAML"),
    ("unknown.yaml", "mcpServers:\n  a:\n    command: x\n    commnd: y\n", "mcpServers.a.commnd", "unknown key"),
    ("wrongtype.yaml", "mcpServers:\n  a:\n    command: x\n    args: x\n", "mcpServers.a.args", "valid list"),
    ("nocommand.yaml", "mcpServers:\n  a:\n    args: [x]\n", "mcpServers.a", "needs 'command'"),
    (
        "separator.yaml",
        "mcpServers:\n  a: {command: x}\ngateway:\n  separator: '::'\n",
        "gateway.separator",
        "expected 1-8 characters",
    ),
    ("bad.json", '{"mcpServers": {"a": {"command": "x"}}', "line 1", "valid JSON"),
]


@pytest.fixture(autouse=True)
def _no_mcpopt_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("MCPOPT_"):
            monkeypatch.delenv(key)


def test_valid_yaml_loads(tmp_path: Path) -> None:
    path = tmp_path / "mcpopt.yaml"
    path.write_text(VALID_YAML)
    cfg = load_config(path)
    assert set(cfg.mcpServers) == {"time", "web"}
    assert cfg.mcpServers["time"].kind == "stdio"
    assert cfg.mcpServers["time"].args == ["--local-timezone", "UTC"]
    assert cfg.mcpServers["time"].timeout_ms == 5000
    assert cfg.mcpServers["web"].kind == "http"
    assert cfg.gateway.call_timeout_ms == 1234
    assert cfg.source == str(path)


def test_claude_desktop_json_loads(tmp_path: Path) -> None:
    path = tmp_path / "claude_desktop_config.json"
    path.write_text(json.dumps(CLAUDE_DESKTOP_JSON))
    cfg = load_config(path)
    assert cfg.mcpServers["filesystem"].command == "npx"
    assert cfg.mcpServers["filesystem"].env == {"DEBUG": "1"}
    assert cfg.mcpServers["remote"].kind == "http"
    assert cfg.gateway.separator == "__"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


@pytest.mark.parametrize(("name", "content", "key", "expected"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_file_one_message(tmp_path: Path, name: str, content: str, key: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert key in msg
    assert expected in msg


def _serve(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MCPOPT, "serve", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(ROOT),
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(("name", "content", "key", "expected"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_cli_serve_bad_file(tmp_path: Path, name: str, content: str, key: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    proc = _serve(path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    # The console may wrap long lines; compare with whitespace collapsed.
    flat = re.sub(r"\s+", " ", proc.stderr)
    assert str(path) in re.sub(r"\s+", "", proc.stderr)
    assert key in flat
    assert expected in flat


def test_cli_serve_missing_file(tmp_path: Path) -> None:
    proc = _serve(tmp_path / "missing.yaml")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "not found" in re.sub(r"\s+", " ", proc.stderr)


def test_cli_error_message_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "wrongtype.yaml"
    path.write_text(BAD_FILES[2][1])
    expected = str(pytest.raises(ConfigError, load_config, path).value)
    proc = _serve(path, env={"COLUMNS": "80"})
    assert expected in proc.stderr.splitlines()


def test_env_overrides_separator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mcpopt.yaml"
    path.write_text(VALID_YAML)
    monkeypatch.setenv("MCPOPT_GATEWAY__SEPARATOR", ".")
    cfg = load_config(path)
    assert cfg.gateway.separator == "."
    assert cfg.gateway.call_timeout_ms == 1234  # the rest of the file's `gateway:` block stays


def test_env_override_is_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mcpopt.yaml"
    path.write_text(VALID_YAML)
    monkeypatch.setenv("MCPOPT_GATEWAY__SEPARATOR", "::")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "separator" in str(info.value)


def test_init_writes_a_loadable_file(tmp_path: Path) -> None:
    path = tmp_path / "sub.yaml"
    proc = subprocess.run([MCPOPT, "init", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(path)
    assert "time" in cfg.mcpServers
    again = subprocess.run([MCPOPT, "init", str(path)], capture_output=True, text=True, timeout=30)
    assert again.returncode == 1
    assert "exists" in again.stderr


def test_demo_yaml_loads() -> None:
    cfg = load_config(ROOT / "examples" / "demo.yaml")
    assert list(cfg.mcpServers) == ["time", "git", "everything", "filesystem", "memory"]
    memory_file = cfg.mcpServers["memory"].env["MEMORY_FILE_PATH"]
    assert memory_file.startswith(str(ROOT / "examples"))  # ${CONFIG_DIR} expanded


def test_env_separator_reaches_the_gateway(tmp_path: Path) -> None:
    from conftest import fake_entry, write_config

    cfg = write_config(tmp_path / "sep.yaml", {"fake": fake_entry()})
    proc = subprocess.run(
        [MCPOPT, "tools", "list", "--json", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
        stdin=subprocess.DEVNULL,
        env={**os.environ, "MCPOPT_GATEWAY__SEPARATOR": "."},
    )
    assert proc.returncode == 0, proc.stderr
    names = {t["name"] for t in json.loads(proc.stdout)}
    assert "fake.echo" in names, names
