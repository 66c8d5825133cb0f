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


def _loop_factory() -> Any:
    """uvloop's event loop (libuv, in C) unless `MCPOPT_LOOP=asyncio`: measured here it takes
    20-25% less gateway CPU per forwarded call than asyncio's pure-Python loop."""
    import os

    if os.environ.get("MCPOPT_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - a dependency; absent only in odd installs
            return None
        return uvloop.new_event_loop
    return None


def _run(coro: Any) -> Any:
    """Run a coroutine; any failure becomes one line on stderr and exit code 1, never a traceback
    (set MCPOPT_DEBUG=1 to see it)."""
    import os

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(coro)
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


# ---- telemetry: stats, export, overhead benchmark (issue 5) ----------------------------------
telemetry_app = typer.Typer(no_args_is_help=True, help="Telemetry records: export them.")
app.add_typer(telemetry_app, name="telemetry")


def _telemetry_store(config: str, db: str | None) -> Path:
    """The SQLite store: --db, else the config's `gateway.telemetry` (defaults without a config file)."""
    from mcpopt.config import TelemetrySettings
    from mcpopt.telemetry.hub import store_path

    if db:
        return Path(db).expanduser()
    settings = _load(config).gateway.telemetry if Path(config).exists() else TelemetrySettings()
    path = store_path(settings)
    if path is None:
        err.print('[red]the SQLite store is off (gateway.telemetry.sqlite_path: ""); pass --db FILE[/red]')
        raise typer.Exit(2)
    return path


def _times(since: str | None, until: str | None) -> tuple[float | None, float | None]:
    from mcpopt.monitor.report import parse_time

    try:
        return parse_time(since), parse_time(until)
    except ValueError as exc:
        err.print(f"[red]--since/--until: {exc}[/red]")
        raise typer.Exit(2) from None


@app.command()
def stats(
    config: str = ConfigOpt,
    db: str | None = typer.Option(None, "--db", help="The telemetry SQLite file (default: from the config)."),
    since: str = typer.Option("24h", "--since", help="90s, 15m, 24h, 7d, an ISO date/time, or '' for all."),
    until: str | None = typer.Option(None, "--until"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Performance from the telemetry store: grades, percentiles, errors, cache hits, sessions, alerts."""
    from mcpopt.monitor.report import print_stats, stats_report

    path = _telemetry_store(config, db)
    start, end = _times(since, until)
    try:
        report = stats_report(path, start, end)
    except FileNotFoundError:
        err.print(f"[red]no telemetry database at {path} (serve the gateway with telemetry enabled first)[/red]")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print_stats(report, out)


@telemetry_app.command("export")
def telemetry_export(
    out_file: Path = typer.Option(..., "--out", "-o", help="The JSONL file to write."),
    since: str | None = typer.Option(None, "--since", help="90s, 15m, 24h, 7d, an ISO date/time, Unix seconds."),
    until: str | None = typer.Option(None, "--until"),
    config: str = ConfigOpt,
    db: str | None = typer.Option(None, "--db", help="The telemetry SQLite file (default: from the config)."),
) -> None:
    """Write the call records of a time range as JSON lines."""
    from mcpopt.monitor.report import export_jsonl

    path = _telemetry_store(config, db)
    start, end = _times(since, until)
    try:
        n = export_jsonl(path, out_file, start, end)
    except FileNotFoundError:
        err.print(f"[red]no telemetry database at {path}[/red]")
        raise typer.Exit(1) from None
    err.print(f"wrote {n} records to {out_file}")


@bench_app.command("telemetry")
def bench_telemetry_cmd(
    calls: int = typer.Option(20_000, "--calls", "-n"),
    levels: str = typer.Option("standard", "--levels", help="minimal, standard, detailed (comma-separated)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Telemetry's cost per call: request-path p50 with and without it (goal <= 50 us), background
    work per record, and all CPU per call (every thread)."""
    from mcpopt.monitor.bench import run_telemetry_bench

    rows = [_run(run_telemetry_bench(calls, level.strip())) for level in levels.split(",") if level.strip()]
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        table = Table(title=f"telemetry overhead per call ({calls} calls each)")
        for col in (
            "level",
            "p50 without",
            "p50 with",
            "overhead p50",
            "overhead p95",
            "background/record",
            "all CPU/call",
            "goal",
        ):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(
                r["level"],
                f"{r['p50_base_us']:.2f} us",
                f"{r['p50_with_us']:.2f} us",
                f"[bold]{r['overhead_p50_us']:.2f} us[/]",
                f"{r['overhead_p95_us']:.2f} us",
                f"{r['background_us_per_record']} us",
                f"{r['total_cpu_us_per_call']} us",
                ("[green]ok[/]" if r["ok"] else "[red]over[/]") + f" (<= {r['goal_us']:g} us)",
            )
        out.print(table)
    raise typer.Exit(0 if all(r["ok"] for r in rows) else 1)


def main() -> None:
    app()


# ---- eval: tool search quality and token costs (discovery/) -----------------------------------
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate tool search and the token cost of exposure modes.")
app.add_typer(eval_app, name="eval")

_LIVEMCPBENCH = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "livemcpbench"


@eval_app.command("search")
def eval_search_cmd(
    catalog: Path = typer.Option(_LIVEMCPBENCH / "tools.json", "--catalog", help="Tool catalog (LiveMCPBench layout)."),
    tasks: Path = typer.Option(_LIVEMCPBENCH / "dev_tasks.json", "--tasks", help="Tasks: question + tool names."),
    k: int = typer.Option(10, "--k", min=1, help="Results per query."),
    holdout: float = typer.Option(0.3, "--holdout", min=0.0, max=1.0, help="Share of tasks held out from tuning."),
    scale: int = typer.Option(3000, "--scale", min=0, help="Also time queries over the catalog replicated to N tools."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Recall@k, MRR and p50/p99 query latency of lexical, dense and hybrid tool search."""
    from mcpopt.discovery.eval import run_search_eval

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    try:
        report = run_search_eval(catalog, tasks, k=k, holdout=holdout, scale_to=scale)
    except (OSError, ValueError) as exc:
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        out.print_json(json.dumps(report))
        return
    table = Table(title=f"tool search: {report['catalog']['tools']} tools, k={k}")
    for col in ("mode", "tasks", f"recall@{k}", "MRR", "p50 ms", "p99 ms"):
        table.add_column(col)
    for mode, parts in report["modes"].items():
        for part, m in parts.items():
            table.add_row(
                f"{mode} ({part})",
                str(m["tasks"]),
                f"{m['recall']:.3f}",
                f"{m['mrr']:.3f}",
                f"{m['p50_ms']:.2f}",
                f"{m['p99_ms']:.2f}",
            )
    out.print(table)
    if "scaled" in report:
        s = report["scaled"]
        lat = ", ".join(f"{m} p50 {v['p50_ms']:.2f} / p99 {v['p99_ms']:.2f} ms" for m, v in s["modes"].items())
        out.print(f"{s['tools']} tools (built in {s['build_ms']:.0f} ms): {lat}")


@eval_app.command("tokens")
def eval_tokens_cmd(
    config: str = ConfigOpt,
    catalog: Path | None = typer.Option(None, "--catalog", help="Also count a catalog file (LiveMCPBench layout)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Tokens of tools/list in each exposure mode (full, search, code), counted offline (cl100k_base)."""
    from mcpopt.discovery.tokens import gateway_report

    _load(config)  # a bad config is reported here, before anything starts
    _setup_logging("error")
    _install_reaper()
    try:
        report = _run(gateway_report(config, catalog))
    except RuntimeError as exc:
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(1) from None
    if as_json:
        out.print_json(json.dumps(report))
        return
    table = Table(title=f"tools/list tokens ({report['encoding']})")
    for col in ("source", "mode", "tools", "tokens", "saving vs full"):
        table.add_column(col)
    for source, modes in report["sources"].items():
        for mode, c in modes.items():
            table.add_row(source, mode, str(c["tools"]), str(c["tokens"]), f"{c['saving']:.1%}")
    out.print(table)
    for name, ways in report["scenarios"].items():
        out.print(f"scenario {name}: " + ", ".join(f"{w} {c['total']} tokens" for w, c in ways.items()))


# ---- optimize: scenarios, quick, analyze, optimize, rules (issue 6) --------------------------
scenarios_app = typer.Typer(no_args_is_help=True, help="Scripted sessions with success criteria (YAML).")
rules_app = typer.Typer(no_args_is_help=True, help="Optimization rules: list, enable, disable, roll back.")
app.add_typer(scenarios_app, name="scenarios")
app.add_typer(rules_app, name="rules")
ScenariosOpt = typer.Option(
    [], "--scenarios", "-s", help="Scenario files or folders (default: optimization.scenarios)."
)
RulesPathOpt = typer.Option(None, "--rules", help="The rule file (default: optimization.rules_path or the data dir).")
SandboxOpt = typer.Option(True, "--sandbox/--no-sandbox", help="Replay against scratch copies of the servers' files.")


def _opt_run(coro: Any) -> Any:
    from mcpopt.optimize.rules import RuleError
    from mcpopt.optimize.sandbox import SandboxError
    from mcpopt.optimize.scenarios import ScenarioError

    try:
        return _run(coro)
    except (ScenarioError, RuleError, SandboxError, ValueError) as exc:  # raised before any task group
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from None


@scenarios_app.command("run")
def scenarios_run(
    paths: list[str] = typer.Argument(..., help="Scenario files or folders."),
    config: str = ConfigOpt,
    mode: str = typer.Option("gateway", "--mode", help="gateway (the pipeline, rules in force) or direct (baseline)"),
    sandbox: bool = SandboxOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Replay scenarios: per step latency, pass/fail of every criterion."""
    from mcpopt.optimize import commands

    cfg = _load(config)
    _setup_logging("error")
    _install_reaper()
    ok = _opt_run(commands.run_scenarios(cfg, paths, mode, sandbox, as_json))
    raise typer.Exit(0 if ok else 1)


@scenarios_app.command("coverage")
def scenarios_coverage(
    paths: list[str] = typer.Argument(..., help="Scenario files or folders."),
    config: str = ConfigOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Every tool (and action) of the configured servers against the scenarios that exercise it."""
    from mcpopt.optimize import commands

    cfg = _load(config)
    _setup_logging("error")
    _install_reaper()
    ok = _opt_run(commands.coverage(cfg, paths, as_json))
    raise typer.Exit(0 if ok else 1)


@app.command()
def quick(
    config: str = ConfigOpt,
    rounds: int = typer.Option(3, "--rounds", help="Benchmark rounds per path (direct, gateway)."),
    scenarios: list[str] = ScenariosOpt,
    rules: str | None = RulesPathOpt,
    sandbox: bool = SandboxOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Benchmark the servers, analyze recent telemetry, apply safe (conservative) rules, re-measure."""
    from mcpopt.optimize import commands

    cfg = _load(config)
    _setup_logging("error")
    _install_reaper()
    _opt_run(
        commands.quick(cfg, rounds=rounds, scenarios=scenarios, rules_path=rules, sandbox=sandbox, as_json=as_json)
    )


@app.command()
def analyze(
    config: str = ConfigOpt,
    scenarios: list[str] = ScenariosOpt,
    out_dir: str = typer.Option(".artifacts/analyze", "--out", "-o", help="Folder for report.json and report.html."),
    optimize: bool = typer.Option(True, "--optimize/--no-optimize", help="Validate the analyzer's proposals."),
    apply: bool | None = typer.Option(
        None, "--apply/--dry-run", help="Write validated rules (default: auto_improvement)."
    ),
    level: str | None = typer.Option(None, "--level", help="conservative, moderate or aggressive"),
    rules: str | None = RulesPathOpt,
    sandbox: bool = SandboxOpt,
) -> None:
    """Run the whole scenario suite, analyze, validate proposals; write JSON and HTML reports."""
    from mcpopt.optimize import commands

    cfg = _load(config)
    _setup_logging("error")
    _install_reaper()
    _opt_run(
        commands.analyze(
            cfg,
            scenarios=scenarios,
            out_dir=out_dir,
            optimize=optimize,
            apply=apply,
            level=level,
            rules_path=rules,
            sandbox=sandbox,
        )
    )


@app.command()
def optimize(
    config: str = ConfigOpt,
    scenarios: list[str] = ScenariosOpt,
    continuous: bool = typer.Option(False, "--continuous", help="Run on a schedule until stopped."),
    interval: str | None = typer.Option(
        None, "--interval", help="Time between runs (90s, 15m, 1h; default optimization.interval)."
    ),
    apply: bool | None = typer.Option(
        None, "--apply/--dry-run", help="Apply validated rules (default: auto_improvement)."
    ),
    level: str | None = typer.Option(None, "--level", help="conservative, moderate or aggressive"),
    rules: str | None = RulesPathOpt,
    sandbox: bool = SandboxOpt,
) -> None:
    """The autonomous loop: validate proposals by replaying scenarios, apply, watch, roll back."""
    from mcpopt.optimize import commands

    cfg = _load(config)
    _setup_logging("warning")
    _install_reaper()
    _opt_run(
        commands.optimize(
            cfg,
            scenarios=scenarios,
            continuous=continuous,
            interval=interval,
            apply=apply,
            level=level,
            rules_path=rules,
            sandbox=sandbox,
        )
    )


def _rule_store(config: str, rules: str | None) -> Any:
    from mcpopt.optimize.rules import RuleError, RuleStore
    from mcpopt.optimize.settings import default_rules_path

    path = rules or str(default_rules_path(_load(config) if Path(config).exists() else None))
    try:
        return RuleStore(path)
    except RuleError as exc:
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from None


@rules_app.command("list")
def rules_list(
    config: str = ConfigOpt, rules: str | None = RulesPathOpt, as_json: bool = typer.Option(False, "--json")
) -> None:
    """The rules, enabled or not, with their conditions and actions."""
    from mcpopt.optimize.commands import print_rules

    print_rules(_rule_store(config, rules), as_json)


def _change(action: Any) -> None:
    from mcpopt.optimize.rules import RuleError

    try:
        message = action()
    except RuleError as exc:
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from None
    out.print(message, highlight=False)


@rules_app.command("enable")
def rules_enable(rule_id: str = typer.Argument(...), config: str = ConfigOpt, rules: str | None = RulesPathOpt) -> None:
    """Enable a rule (a running gateway picks it up within a second)."""
    store = _rule_store(config, rules)
    _change(lambda: f"enabled {store.set_enabled(rule_id, True, 'enabled by hand').id} (version {store.version})")


@rules_app.command("disable")
def rules_disable(
    rule_id: str = typer.Argument(...), config: str = ConfigOpt, rules: str | None = RulesPathOpt
) -> None:
    """Disable a rule."""
    store = _rule_store(config, rules)
    _change(lambda: f"disabled {store.set_enabled(rule_id, False, 'disabled by hand').id} (version {store.version})")


@rules_app.command("rollback")
def rules_rollback(
    rule_id: str | None = typer.Argument(None, help="Roll back this rule (default: undo the last change)."),
    to_version: int | None = typer.Option(None, "--to", help="Restore the rule set of this version."),
    config: str = ConfigOpt,
    rules: str | None = RulesPathOpt,
) -> None:
    """Undo: one rule, the last change, or back to a version."""
    store = _rule_store(config, rules)

    def act() -> str:
        changed = store.rollback(rule_id, to_version=to_version, reason="rolled back by hand")
        return f"rolled back ({', '.join(changed) or 'no rule changed'}); now version {store.version}"

    _change(act)


if __name__ == "__main__":
    main()
