"""A stdio MCP server that lists a real tool catalog, for `mcpopt bench growth --catalog`.

`python -m mcpopt.bench.catalog_server tools.json` serves every tool definition of a LiveMCPBench
layout file (name, description, inputSchema, annotations as published: 527 tools of 70 real
servers) under `{server}__{tool}` names, so a gateway in front of several of these lists
thousands of real definitions. `tools/call` answers any listed tool with its own name (the
benchmark measures lists; the real servers are not installed here). Handshake era, newline-
delimited JSON-RPC on stdin/stdout, standard library only (it starts in milliseconds).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def catalog_tools(path: str | Path) -> list[dict[str, Any]]:
    """The tool definitions of a LiveMCPBench `tools.json`, named `{server}__{tool}`.

    Raises:
        OSError, ValueError: the file cannot be read or is not that layout.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    tools: list[dict[str, Any]] = []
    for entry in data:
        for key, group in (entry.get("tools") or {}).items():
            server = str(group.get("server_name") or key)
            for tool in group.get("tools") or []:
                item = {k: tool[k] for k in ("description", "inputSchema", "annotations") if tool.get(k) is not None}
                item.setdefault("inputSchema", {"type": "object"})
                tools.append({"name": f"{server}__{tool['name']}", **item})
    if not tools:
        raise ValueError(f"{path}: no tools (expected the LiveMCPBench layout)")
    return tools


def serve(tools: list[dict[str, Any]]) -> None:
    out = sys.stdout.buffer
    names = {t["name"] for t in tools}
    listing = {"tools": tools}
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        rid = msg.get("id")
        if rid is None:
            continue
        method = msg.get("method")
        params = msg.get("params") or {}
        answer: dict[str, Any]
        if method == "initialize":
            answer = {
                "result": {
                    "protocolVersion": params.get("protocolVersion", "2025-11-25"),
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "mcpopt-catalog", "version": "1"},
                }
            }
        elif method == "tools/list":
            answer = {"result": listing}
        elif method == "tools/call" and params.get("name") in names:
            answer = {"result": {"content": [{"type": "text", "text": params["name"]}], "isError": False}}
        elif method == "ping":
            answer = {"result": {}}
        else:
            answer = {"error": {"code": -32601, "message": f"Method not found: {method}"}}
        out.write(json.dumps({"jsonrpc": "2.0", "id": rid, **answer}).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    serve(catalog_tools(sys.argv[1]))
