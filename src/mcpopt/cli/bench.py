"""`mcpopt bench ...`: benchmarks against the direct path, a bare relay and peers."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from mcpopt.cli.common import bench_app, install_reaper, out, run


@bench_app.command("overhead")
def bench_overhead(
    calls: int = typer.Option(500, "--calls", "-n", help="Measured calls per path (after warm-up)."),
    warmup: int = typer.Option(50, "--warmup", help="Untimed calls on each path before the timed rounds."),
    block: int = typer.Option(10, "--block", help="Timed calls per path per round (paths alternate by rounds)."),
    client: str = typer.Option(
        "sdk", "--client", help="stdio client: sdk (the SDK's Client) or lean (orjson lines, microseconds per call)."
    ),
    transports: str = typer.Option("stdio,http", "--transports", help="stdio, http or both"),
    peers: bool = typer.Option(True, "--peers/--no-peers", help="Also measure FastMCP's proxy."),
    auth: bool = typer.Option(
        False, "--auth", help="Also HTTP with authentication on (JWT, policy, rate limit) and its cost in process."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """tools/call latency: direct, bare relays (the project's, socat), mcpopt and FastMCP's proxy,
    alternating in one run; p50/p95/p99 and what each adds over direct and over the relay."""
    from mcpopt.bench.overhead import run_overhead

    if client not in ("sdk", "lean"):
        out.print(f"[red]--client: expected sdk or lean (got {client!r})[/red]")
        raise typer.Exit(2)
    install_reaper()
    run(
        run_overhead(
            calls=calls,
            warmup=warmup,
            transports=transports.split(","),
            peers=peers,
            as_json=as_json,
            auth=auth,
            block=max(1, block),
            client=client,
        )
    )


@bench_app.command("cache")
def bench_cache_cmd(
    calls: int = typer.Option(500, "--calls", "-n"),
    seconds: float = typer.Option(3.0, "--seconds"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Cache-hit latency vs the direct call, and cache hits per second."""
    from mcpopt.bench.speed import bench_cache, print_report

    install_reaper()
    print_report("cache", run(bench_cache(calls=calls, seconds=seconds)), as_json)


@bench_app.command("throughput")
def bench_throughput_cmd(
    seconds: float = typer.Option(3.0, "--seconds"),
    levels: str = typer.Option("1,16,64", "--concurrency"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Calls/s at several concurrency levels, direct vs through mcpopt (fast tool and 50 ms tool)."""
    from mcpopt.bench.speed import bench_throughput, print_report

    install_reaper()
    lv = tuple(int(x) for x in levels.split(","))
    print_report("throughput", run(bench_throughput(seconds=seconds, levels=lv)), as_json)


@bench_app.command("startup")
def bench_startup_cmd(
    servers: int = typer.Option(20, "--servers"), as_json: bool = typer.Option(False, "--json")
) -> None:
    """Start N stdio servers in parallel vs one after another."""
    from mcpopt.bench.speed import bench_startup, print_report

    install_reaper()
    print_report("startup", run(bench_startup(servers)), as_json)


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

    install_reaper()
    print_failover(run(bench_failover(duration_s=duration, kill_every_s=kill_every)), as_json)


@bench_app.command("scale")
def bench_scale_cmd(
    rounds: int = typer.Option(5, "--rounds", help="Alternating rounds over all paths."),
    calls: int = typer.Option(200, "--calls", help="Calls per path per round."),
    concurrency: int = typer.Option(8, "--concurrency", help="Calls in flight."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Direct vs HAProxy -> 1, 2, 3 replicas (Redis-shared sessions): calls/s, p50/p99, CPU per call."""
    from mcpopt.bench.scale import bench_scale, print_scale

    install_reaper()
    print_scale(run(bench_scale(rounds=rounds, calls=calls, concurrency=concurrency)), as_json)


@bench_app.command("telemetry")
def bench_telemetry_cmd(
    calls: int = typer.Option(20_000, "--calls", "-n"),
    levels: str = typer.Option("standard", "--levels", help="minimal, standard, detailed (comma-separated)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Telemetry's cost per call: request-path p50 with and without it (goal <= 50 us), background
    work per record, and all CPU per call (every thread)."""
    from mcpopt.monitor.bench import run_telemetry_bench

    rows = [run(run_telemetry_bench(calls, level.strip())) for level in levels.split(",") if level.strip()]
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


def _counts(text: str, option: str) -> list[int]:
    """`"1,5,10"` -> `[1, 5, 10]`; raises `typer.BadParameter` (exit 2, naming `option`) unless every
    item is a positive integer."""
    items = [x.strip() for x in text.split(",")]
    if not all(x.isdigit() and int(x) > 0 for x in items):
        raise typer.BadParameter(f"expected positive integers separated by commas, got {text!r}", param_hint=option)
    return [int(x) for x in items]


@bench_app.command("growth")
def bench_growth_cmd(
    servers: str = typer.Option("1,5,10,20", "--servers", help="Upstream server counts, comma-separated."),
    clients: str = typer.Option("1,10,100,1000", "--clients", help="Client (session) counts, comma-separated."),
    rate: float = typer.Option(
        200.0, "--rate", help="Total tools/call rate offered (calls/s), spread over the clients."
    ),
    seconds: float = typer.Option(3.0, "--seconds", help="Seconds of calls per step (at least two calls per client)."),
    list_requests: int = typer.Option(200, "--lists", help="Timed tools/list requests per server count."),
    png: str = typer.Option("", "--png", help="Write the curves to this PNG (needs matplotlib: mcpopt[bench])."),
    catalog: str = typer.Option(
        "", "--catalog", help="A LiveMCPBench tools.json: also time lists of 527 and 3,162 real tool definitions."
    ),
    alternate: int = typer.Option(
        0,
        "--alternate",
        min=0,
        help="Also time this many tools/call per server count with every count's gateway running at once, "
        "alternated (call p50 against servers on the same machine state). 0: off.",
    ),
    park_ms: int = typer.Option(
        10_000,
        "--park-ms",
        min=0,
        help="The gateway's session_park_ms: idle sessions park after this (ms; 0: never, no parked figures).",
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """How list time, call p50/p99, CPU per call and memory grow with servers and clients, in one run
    (memory per idle session open, and once parked)."""
    import os
    import tempfile
    from dataclasses import asdict
    from pathlib import Path

    from mcpopt.bench.growth import plot, report, run_growth
    from mcpopt.bench.growth_servers import alternate_servers

    sizes = _counts(servers, "--servers")
    client_counts = _counts(clients, "--clients")
    install_reaper()
    result = run(
        run_growth(
            sizes,
            client_counts,
            rate=rate,
            seconds=seconds,
            list_requests=list_requests,
            catalog=Path(catalog) if catalog else None,
            park_ms=park_ms,
        )
    )
    if alternate > 0:
        with tempfile.TemporaryDirectory() as tmp:
            rows = run(alternate_servers(sizes, Path(tmp), calls=alternate))
        result.servers_alternated = [asdict(r) for r in rows]
        result.load = os.getloadavg()  # the report prints it as the load "at the end"
    report(result, as_json)
    if png:
        plot(result, Path(png))
        if not as_json:
            out.print(f"curves written to {png}")


@bench_app.command("shared")
def bench_shared_cmd(
    calls: int = typer.Option(2000, "--calls", "-n", help="Timed operations of each kind (after warm-up)."),
    warmup: int = typer.Option(200, "--warmup"),
    redis_url: str | None = typer.Option(None, "--redis-url", help="Use this Redis (default: a throwaway one)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """What each piece of state shared over Redis costs per call: p50/p99, CPU and Redis commands per
    operation, local state beside it; and the bus's one-way delay between two replicas."""
    from mcpopt.bench.shared import bench_shared

    try:
        report = bench_shared(calls, warmup, redis_url)
    except RuntimeError as exc:
        out.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"shared state per operation ({calls} each, after {warmup} warm-up)")
    for col in ("operation", "p50", "p99", "CPU/op", "round trips/op", "Redis cmds/op"):
        table.add_column(col, justify="right" if col != "operation" else "left")
    for r in report["rows"]:
        cpu = "-" if r["cpu_us"] is None else f"{r['cpu_us']:.1f} us"
        table.add_row(
            r["operation"],
            f"{r['p50_us']:.1f} us",
            f"{r['p99_us']:.1f} us",
            cpu,
            f"{r['round_trips']:g}",
            f"{r['redis_commands']:g}",
        )
    out.print(table)
