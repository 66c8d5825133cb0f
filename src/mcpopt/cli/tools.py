"""`mcpopt tools list|call`: try the gateway's tools without an agent."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from mcpopt.cli.common import ConfigOpt, err, install_reaper, load, out, run, setup_logging, tools_app
from mcpopt.config import Config
from mcpopt.errors import McpoptError


@tools_app.command("list")
def tools_list(config: str = ConfigOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """List every tool the gateway serves."""
    cfg = load(config)
    setup_logging("error")
    install_reaper()
    result = run(_with_client(cfg, lambda c: c.list_tools()))
    tools = result.tools
    if as_json:
        print(json.dumps([t.model_dump(by_alias=True, mode="json", exclude_none=True) for t in tools], indent=2))
        return
    table = Table(title=f"{len(tools)} tools")
    table.add_column("name", style="bold")
    table.add_column("description")
    for t in tools:
        table.add_row(t.name, (t.description or "").strip().split("\n")[0][:100])
    out.print(table)


@tools_app.command("call")
def tools_call(
    name: str = typer.Argument(..., help="Gateway tool name, e.g. time__get_current_time"),
    args: str = typer.Option("{}", "--args", "-a", help="Arguments as a JSON object."),
    config: str = ConfigOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Call one tool through the gateway and print the result."""
    try:
        arguments = json.loads(args)
        if not isinstance(arguments, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        err.print(f"[red]--args: expected a JSON object ({exc})[/red]")
        raise typer.Exit(2) from None
    cfg = load(config)
    setup_logging("error")
    install_reaper()
    result = run(_with_client(cfg, lambda c: c.call_tool(name, arguments)))
    if as_json:
        print(json.dumps(result.model_dump(by_alias=True, mode="json", exclude_none=True), indent=2))
        raise typer.Exit(1 if result.is_error else 0)
    for block in result.content:
        if getattr(block, "type", None) == "text":
            out.print(block.text, highlight=False, markup=False)
        else:
            out.print(f"[{block.type} content]")
    if result.is_error:
        raise typer.Exit(1)


async def _with_client(cfg: Config, action: Any) -> Any:
    from mcp import Client
    from mcp.shared.exceptions import MCPError

    from mcpopt.gateway.assembly import build_gateway

    gateway = build_gateway(cfg)
    failure: str | None = None
    async with gateway.running():
        for row in gateway.status():
            if row["state"] != "ready":
                err.print(f"[yellow]MCP server '{row['server']}' is {row['state']}: {row['error']}[/yellow]")
        async with Client(gateway.server, mode="legacy") as client:
            try:
                return await action(client)
            except MCPError as exc:
                failure = f"error {exc.code}: {exc}"
    # Raised outside the task groups, so the user sees one line, not an exception group.
    raise McpoptError(failure or "no result")
