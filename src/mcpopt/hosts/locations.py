"""The MCP hosts mcpopt knows and where each keeps its MCP servers (user level and per project).

Paths follow each host's documentation (December 2026); `$HOME`, `$APPDATA` and `$XDG_CONFIG_HOME`
are read from the environment given, so tests (and `mcpopt import --home`) can point elsewhere.

| host (`--client`) | user-level file | project files |
| --- | --- | --- |
| `claude-desktop` | macOS `~/Library/Application Support/Claude/claude_desktop_config.json`, Windows `%APPDATA%/Claude/...`, Linux `~/.config/Claude/...` | |
| `claude-code` | `~/.claude.json` (`mcpServers`; `projects.<dir>.mcpServers`) | `.mcp.json` |
| `cursor` | `~/.cursor/mcp.json` | `.cursor/mcp.json` |
| `vscode` | `<user folder>/mcp.json` (`Code/User`; also `Code - Insiders`) | `.vscode/mcp.json` |
| `windsurf` | `~/.codeium/windsurf/mcp_config.json` | |
"""  # noqa: E501 - a table

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Host:
    """One MCP host application.

    Attributes:
        name: the `--client` name (`claude-desktop`, `claude-code`, `cursor`, `vscode`, `windsurf`).
        title: how the host calls itself.
        servers_key: the key its file keeps servers under (`mcpServers`, VS Code `servers`).
        project_files: project-relative files that also hold servers.
    """

    name: str
    title: str
    servers_key: str
    project_files: tuple[str, ...] = ()

    def user_files(self, environ: Mapping[str, str] | None = None, platform: str | None = None) -> list[Path]:
        """Candidate user-level files, the one to write first (existing or not)."""
        env = os.environ if environ is None else environ
        plat = platform or sys.platform
        home = Path(env.get("HOME") or env.get("USERPROFILE") or str(Path.home()))
        if plat == "darwin":
            app_support = home / "Library" / "Application Support"
        elif plat == "win32":
            app_support = Path(env.get("APPDATA") or home / "AppData" / "Roaming")
        else:
            app_support = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
        if self.name == "claude-desktop":
            return [app_support / "Claude" / "claude_desktop_config.json"]
        if self.name == "claude-code":
            return [home / ".claude.json"]
        if self.name == "cursor":
            return [home / ".cursor" / "mcp.json"]
        if self.name == "vscode":
            return [app_support / "Code" / "User" / "mcp.json", app_support / "Code - Insiders" / "User" / "mcp.json"]
        if self.name == "windsurf":
            return [home / ".codeium" / "windsurf" / "mcp_config.json"]
        raise ValueError(f"unknown host {self.name!r}")

    def user_file(self, environ: Mapping[str, str] | None = None, platform: str | None = None) -> Path:
        """The user-level file: the first candidate that exists, else the first candidate."""
        files = self.user_files(environ, platform)
        return next((f for f in files if f.is_file()), files[0])


HOSTS: dict[str, Host] = {
    h.name: h
    for h in (
        Host("claude-desktop", "Claude Desktop", "mcpServers"),
        Host("claude-code", "Claude Code", "mcpServers", (".mcp.json",)),
        Host("cursor", "Cursor", "mcpServers", (".cursor/mcp.json",)),
        Host("vscode", "VS Code", "servers", (".vscode/mcp.json",)),
        Host("windsurf", "Windsurf", "mcpServers"),
    )
}
"""The known hosts by `--client` name."""


def host(name: str) -> Host:
    """The host called `name`.

    Raises:
        KeyError: with the known names in its message.
    """
    try:
        return HOSTS[name]
    except KeyError:
        raise KeyError(f"unknown client {name!r}: expected one of {', '.join(HOSTS)}") from None
