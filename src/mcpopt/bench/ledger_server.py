"""A minimal MCP server (SDK low-level `Server`, stdio) that records writes, for `bench failover`.

`record(id)` is destructive and not idempotent: it appends `<id>\\n` to `$LEDGER_FILE` (one
`write` of an O_APPEND file, so replicas sharing the file never interleave a line) and answers.
With `hold_ms` it answers that long after recording (a call in flight that has already run), or
earlier once the file `release` names exists (a test decides when the call ends);
with `$LEDGER_TAG` set (e.g. the gateway replica's name) it also appends `<id> <tag>\\n` to
`$LEDGER_FILE.where`, so a test knows which process ran which id.
The ledger is the server-side truth: an id that appears twice was executed twice (duplicated);
an id the client saw succeed that is absent was lost.
"""

from __future__ import annotations

import os

import anyio
import mcp_types as types
from mcp.server.lowlevel.server import Server

RECORD = types.Tool(
    name="record",
    description="Append an id to the ledger (not idempotent)",
    input_schema={
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "hold_ms": {"type": "integer", "minimum": 0},
            "release": {"type": "string"},
        },
        "required": ["id"],
    },
    annotations=types.ToolAnnotations(read_only_hint=False, idempotent_hint=False, destructive_hint=True),
)


async def _list_tools(ctx: object, params: object) -> types.ListToolsResult:
    return types.ListToolsResult(tools=[RECORD])


async def _call_tool(ctx: object, params: types.CallToolRequestParams) -> types.CallToolResult:
    args = params.arguments or {}
    rid = str(args.get("id", ""))
    _append(os.environ["LEDGER_FILE"], f"{rid}\n")
    tag = os.environ.get("LEDGER_TAG")
    if tag:
        _append(os.environ["LEDGER_FILE"] + ".where", f"{rid} {tag}\n")
    hold = args.get("hold_ms")
    release = args.get("release")
    if isinstance(hold, int) and hold > 0:
        with anyio.move_on_after(hold / 1000):
            while not (isinstance(release, str) and await anyio.Path(release).exists()):
                await anyio.sleep(0.02)
    return types.CallToolResult(content=[types.TextContent(type="text", text=f"recorded {rid}")])


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def main() -> None:
    from mcp.server.stdio import stdio_server

    server: Server[object] = Server("ledger", on_list_tools=_list_tools, on_call_tool=_call_tool)

    async def run() -> None:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    anyio.run(run)


if __name__ == "__main__":
    main()
