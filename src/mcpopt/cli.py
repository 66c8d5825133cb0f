"""The `mcpopt` command line (typer): init, serve, tools, demo, bench."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from mcpopt.config import STARTER_CONFIG, Config, load_config
from mcpopt.errors import ConfigError, McpoptError
from mcpopt.upstream.process import children

app = typer.Typer(no_args_is_help=True, add_completion=False, help="mcpopt: an optimizing MCP gateway.")
tools_app = typer.Typer(no_args_is_help=True, help="Try the gateway's tools without an agent.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (p50/p95/p99 against the direct path and peers).")
app.add_typer(tools_app, name="tools")
app.add_typer(bench_app, name="bench")
cache_app = typer.Typer(no_args_is_help=True, help="The result cache of a running gateway.")
app.add_typer(cache_app, name="cache")

err = Console(stderr=True, soft_wrap=True)
"""stderr; soft_wrap keeps each error on one line whatever the terminal width (or none)."""
out = Console(soft_wrap=True)

ConfigOpt = typer.Option("mcpopt.yaml", "--config", "-c", help="Config file (YAML or JSON).")


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.WARNING),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _install_reaper() -> None:
    """Whatever way the gateway exits, its upstream processes go with it."""
    atexit.register(children.kill_all)


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _run(coro: Any) -> Any:
    """Run a coroutine; any failure becomes one line on stderr and exit code 1, never a traceback
    (set MCPOPT_DEBUG=1 to see it)."""
    import os

    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as group:  # noqa: BLE001 - the user gets a message, not a traceback
        exc = _leaf(group)
        if os.environ.get("MCPOPT_DEBUG"):
            raise
        if isinstance(exc, McpoptError):
            message = str(exc)
        elif isinstance(exc, OSError) or type(exc).__name__ in ("ConnectError", "ConnectTimeout", "ReadTimeout"):
            message = f"cannot connect: {exc or type(exc).__name__}"
        else:
            message = f"{type(exc).__name__}: {exc} (set MCPOPT_DEBUG=1 for the traceback)"
        err.print(f"[red]{message}[/red]", highlight=False)
        raise typer.Exit(1) from None


@app.command()
def init(
    path: Path = typer.Argument(Path("mcpopt.yaml"), help="Where to write the starter config."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented starter config file."""
    if path.exists() and not force:
        err.print(f"[red]{path} exists; pass --force to overwrite it[/red]")
        raise typer.Exit(1)
    path.write_text(STARTER_CONFIG, encoding="utf-8")
    err.print(f"wrote {path}")


@app.command()
def serve(
    config: str = ConfigOpt,
    transport: str = typer.Option("stdio", "--transport", "-t", help="stdio or http"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8080, "--port"),
) -> None:
    """Serve the gateway over stdio or Streamable HTTP (at /mcp)."""
    cfg = _load(config)
    _setup_logging(cfg.gateway.log_level)
    if transport not in ("stdio", "http"):
        err.print(f"[red]--transport: expected stdio or http (got {transport!r})[/red]")
        raise typer.Exit(2)
    _install_reaper()
    _run(_serve(cfg, transport, host, port))


async def _serve(cfg: Config, transport: str, host: str, port: int) -> None:
    from mcpopt.gateway.front import serve_http, serve_stdio
    from mcpopt.gateway.server import Gateway

    gateway = Gateway(cfg)
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def _on_signal() -> None:
        assert main is not None
        main.cancel()

    if transport == "stdio":
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, _on_signal)
    try:
        async with gateway.running():
            for row in gateway.status():
                if row["state"] not in ("ready", "idle"):  # idle: lazy, starts on first use
                    logging.getLogger("mcpopt").warning(
                        "MCP server %r is %s: %s (retrying in the background)",
                        row["server"],
                        row["state"],
                        row["error"],
                    )
            if transport == "stdio":
                await serve_stdio(gateway)
            else:
                await serve_http(gateway, host, port)
    except asyncio.CancelledError:
        pass
    finally:
        children.kill_all(signal.SIGTERM)


@tools_app.command("list")
def tools_list(config: str = ConfigOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """List every tool the gateway serves."""
    cfg = _load(config)
    _setup_logging("error")
    _install_reaper()
    result = _run(_with_client(cfg, lambda c: c.list_tools()))
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
    cfg = _load(config)
    _setup_logging("error")
    _install_reaper()
    result = _run(_with_client(cfg, lambda c: c.call_tool(name, arguments)))
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

    from mcpopt.gateway.server import Gateway

    gateway = Gateway(cfg)
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


@app.command()
def demo(
    config: str = typer.Option("examples/demo.yaml", "--config", "-c"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Start the gateway over the demo's real servers and run a client session through it."""
    from mcpopt.demo import run_demo

    _load(config)
    _install_reaper()
    ok = _run(run_demo(config, as_json=as_json))
    raise typer.Exit(0 if ok else 1)


@bench_app.command("overhead")
def bench_overhead(
    calls: int = typer.Option(500, "--calls", "-n", help="Measured calls per path (after warm-up)."),
    warmup: int = typer.Option(50, "--warmup"),
    transports: str = typer.Option("stdio,http", "--transports", help="stdio, http or both"),
    peers: bool = typer.Option(True, "--peers/--no-peers", help="Also measure FastMCP's proxy."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """tools/call latency: direct vs through mcpopt vs through FastMCP's proxy, in one run."""
    from mcpopt.bench.overhead import run_overhead

    _install_reaper()
    _run(run_overhead(calls=calls, warmup=warmup, transports=transports.split(","), peers=peers, as_json=as_json))


@bench_app.command("cache")
def bench_cache_cmd(
    calls: int = typer.Option(500, "--calls", "-n"),
    seconds: float = typer.Option(3.0, "--seconds"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Cache-hit latency vs the direct call, and cache hits per second."""
    from mcpopt.bench.speed import bench_cache, print_report

    _install_reaper()
    print_report("cache", _run(bench_cache(calls=calls, seconds=seconds)), as_json)


@bench_app.command("throughput")
def bench_throughput_cmd(
    seconds: float = typer.Option(3.0, "--seconds"),
    levels: str = typer.Option("1,16,64", "--concurrency"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Calls/s at several concurrency levels, direct vs through mcpopt (fast tool and 50 ms tool)."""
    from mcpopt.bench.speed import bench_throughput, print_report

    _install_reaper()
    lv = tuple(int(x) for x in levels.split(","))
    print_report("throughput", _run(bench_throughput(seconds=seconds, levels=lv)), as_json)


@bench_app.command("startup")
def bench_startup_cmd(
    servers: int = typer.Option(20, "--servers"), as_json: bool = typer.Option(False, "--json")
) -> None:
    """Start N stdio servers in parallel vs one after another."""
    from mcpopt.bench.speed import bench_startup, print_report

    _install_reaper()
    print_report("startup", _run(bench_startup(servers)), as_json)


@bench_app.command("routing")
def bench_routing_cmd(
    picks: int = typer.Option(20_000, "--picks", "-n", help="Timed picks per strategy and pool size."),
    replicas: str = typer.Option("3,16", "--replicas", help="Pool sizes, comma-separated."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Cost of choosing a replica (Router.pick) per strategy: p50/p99 in us, budget p99 < 50 us."""
    from mcpopt.bench.routing import run_routing

    sizes = tuple(int(x) for x in replicas.split(",") if x.strip())
    results = run_routing(picks=picks, sizes=sizes, as_json=as_json)
    raise typer.Exit(0 if all(r.within_budget for r in results) else 1)


@bench_app.command("failover")
def bench_failover_cmd(
    duration: float = typer.Option(60.0, "--duration", help="Seconds of load."),
    kill_every: float = typer.Option(5.0, "--kill-every", help="Seconds between replica kills."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """3 replicas, one killed every few seconds under load: read success rate, duplicated/lost writes."""
    from mcpopt.bench.failover import bench_failover, print_failover

    _install_reaper()
    print_failover(_run(bench_failover(duration_s=duration, kill_every_s=kill_every)), as_json)


async def _gateway_tool(url: str, name: str, arguments: dict[str, Any]) -> Any:
    from mcp import Client
    from mcp.shared.exceptions import MCPError

    try:
        async with Client(url, mode="legacy") as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            target = next((t for t in tools if t.endswith(name)), None)
            if target is None:
                raise McpoptError(f"{url} serves no tool named *{name}: is it an mcpopt gateway?")
            return await client.call_tool(target, arguments)
    except MCPError as exc:
        raise McpoptError(f"{url}: error {exc.code}: {exc}") from None
    except OSError as exc:
        raise McpoptError(f"{url}: cannot connect ({exc})") from None


@cache_app.command("purge")
def cache_purge(
    url: str = typer.Option("http://127.0.0.1:8080/mcp", "--url", help="The gateway's Streamable HTTP endpoint."),
    server: str = typer.Option("", "--server", help="Only this server's cached results."),
) -> None:
    """Drop cached results in a running gateway (through its cache_purge tool)."""
    result = _run(_gateway_tool(url, "__cache_purge", {"server": server} if server else {}))
    out.print(result.content[0].text, markup=False, highlight=False)


@cache_app.command("stats")
def cache_stats(
    url: str = typer.Option("http://127.0.0.1:8080/mcp", "--url", help="The gateway's Streamable HTTP endpoint."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per-tool cache hits, misses and hit rate of a running gateway."""
    result = _run(_gateway_tool(url, "__cache_stats", {}))
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
