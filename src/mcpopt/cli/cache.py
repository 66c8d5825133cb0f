"""`mcpopt cache purge|stats` against a running gateway."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from mcpopt.cli.common import app, out, run
from mcpopt.errors import McpoptError

cache_app = typer.Typer(no_args_is_help=True, help="The result cache of a running gateway.")
app.add_typer(cache_app, name="cache")


TokenOpt = typer.Option(
    None, "--token", envvar="MCPOPT_TOKEN", help="Bearer token or API key (a gateway with gateway.auth on)."
)


async def _gateway_tool(url: str, name: str, arguments: dict[str, Any], token: str | None = None) -> Any:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared.exceptions import MCPError

    target: Any = url
    if token:
        import httpx2

        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60.0)
        target = streamable_http_client(url, http_client=http)
    try:
        async with Client(target, mode="legacy") as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            target = next((t for t in tools if t.endswith(name)), None)
            if target is None:
                raise McpoptError(
                    f"{url} serves no tool named *{name}: is it an mcpopt gateway (and may this credential use it)?"
                )
            return await client.call_tool(target, arguments)
    except MCPError as exc:
        raise McpoptError(f"{url}: error {exc.code}: {exc}") from None
    except OSError as exc:
        raise McpoptError(f"{url}: cannot connect ({exc})") from None


@cache_app.command("purge")
def cache_purge(
    url: str = typer.Option("http://127.0.0.1:8080/mcp", "--url", help="The gateway's Streamable HTTP endpoint."),
    server: str = typer.Option("", "--server", help="Only this server's cached results."),
    token: str | None = TokenOpt,
) -> None:
    """Drop cached results in a running gateway (through its cache_purge tool; an admin principal
    when the gateway authenticates)."""
    result = run(_gateway_tool(url, "__cache_purge", {"server": server} if server else {}, token))
    out.print(result.content[0].text, markup=False, highlight=False)


@cache_app.command("stats")
def cache_stats(
    url: str = typer.Option("http://127.0.0.1:8080/mcp", "--url", help="The gateway's Streamable HTTP endpoint."),
    as_json: bool = typer.Option(False, "--json"),
    token: str | None = TokenOpt,
) -> None:
    """Per-tool cache hits, misses and hit rate of a running gateway."""
    result = run(_gateway_tool(url, "__cache_stats", {}, token))
    data = result.structured_content or json.loads(result.content[0].text)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table(title=f"cache: {data['entries']} entries, {data['bytes']:,} bytes, {data['coalesced']} coalesced")
    for col in ("server", "tool", "hits", "misses", "hit rate", "stores", "invalidations"):
        table.add_column(col, justify="left" if col in ("server", "tool") else "right")
    for r in data["tools"]:
        table.add_row(
            r["server"],
            r["tool"],
            str(r["hits"]),
            str(r["misses"]),
            f"{r['hit_rate']:.0%}",
            str(r["stores"]),
            str(r["invalidations"]),
        )
    out.print(table)
