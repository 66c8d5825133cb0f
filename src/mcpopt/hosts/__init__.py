"""MCP hosts (MCP's word for the applications that run clients: Claude Desktop, Cursor, VS Code,
Windsurf, Claude Code): their config layouts, where they keep them, and pointing them at mcpopt.

Reading a host's file as it is (`mcpServers`, VS Code's `servers` + `inputs`, the keys and `${...}`
variables each host adds) is `mcpopt.layouts`, below `mcpopt.config`, which uses it for every file.

- `locations`: the known hosts and where each keeps its file on Linux, macOS and Windows.
- `install`: `mcpopt import` (every installed host's servers into one mcpopt config) and
  `mcpopt install` / `uninstall` (a host's file pointed at mcpopt, with a backup, and restored).
"""
