"""`mcpopt init`, `mcpopt serve`, `mcpopt demo`."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import typer

from mcpopt.cli.common import ConfigOpt, app, err, install_reaper, load, print_notes, run, setup_logging
from mcpopt.config import STARTER_CONFIG, Config, load_config
from mcpopt.errors import CONFIG_INVALID, ConfigError
from mcpopt.layouts import terminal_ask
from mcpopt.upstream.process import children


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
    allow_unauthenticated: bool = typer.Option(
        False,
        "--allow-unauthenticated",
        help="Serve a non-loopback --host without gateway.auth (anyone who can connect may call every tool).",
    ),
) -> None:
    """Serve the gateway over stdio or Streamable HTTP (at /mcp).

    A bad config file is reported on stderr and exits with code 2. Over stdio, when a client
    launched the gateway (stdin is not a terminal), the gateway first answers that client's every
    request (`initialize` included) with error -32016 carrying the same message, until the client
    disconnects: clients that show only "Connection closed" for a server that exits show this.
    """
    if transport not in ("stdio", "http"):
        err.print(f"[red]--transport: expected stdio or http (got {transport!r})[/red]")
        raise typer.Exit(2)
    try:
        cfg = load_config(config, ask=terminal_ask)
    except ConfigError as exc:
        err.print(f"[red]{exc}[/red]", highlight=False)
        if transport == "stdio" and not sys.stdin.isatty():
            _answer_config_error(exc)
        raise typer.Exit(2) from None
    print_notes(cfg)
    setup_logging(cfg.gateway.log_level)
    if transport == "http":
        from mcpopt.gateway.edge import auth_enabled, bind_refusal, is_loopback

        refusal = bind_refusal(cfg, host, allow_unauthenticated)
        if refusal is not None:
            err.print(f"[red]{refusal}[/red]", soft_wrap=True)
            raise typer.Exit(2)
        if not is_loopback(host) and not auth_enabled(cfg):
            logging.getLogger("mcpopt").warning(
                "serving HTTP on %s without authentication (--allow-unauthenticated): anyone who can connect "
                "may call every tool",
                host or "all interfaces",
            )
    install_reaper()
    run(_serve(cfg, transport, host, port))


def _answer_config_error(exc: ConfigError) -> None:
    """Answer every JSON-RPC request on stdin with `CONFIG_INVALID` and the config error, until EOF.

    The error's `data` is `{"file": str, "problems": [{"key": str, "expected": str}, ...]}`.
    """
    import orjson

    error = {
        "code": CONFIG_INVALID,
        "message": str(exc),
        "data": {"file": exc.file, "problems": [{"key": k, "expected": m} for k, m in exc.problems]},
    }
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        try:
            msg = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        for item in msg if isinstance(msg, list) else [msg]:
            if isinstance(item, dict) and "method" in item and "id" in item:
                out.write(orjson.dumps({"jsonrpc": "2.0", "id": item["id"], "error": error}) + b"\n")
                out.flush()


async def _serve(cfg: Config, transport: str, host: str, port: int) -> None:
    from mcpopt.gateway.assembly import build_gateway
    from mcpopt.gateway.front import serve_http, serve_stdio

    if transport == "http" and not cfg.gateway.shared.replica:
        from mcpopt.gateway.shared import replica_id

        cfg.gateway.shared.replica = replica_id(cfg.gateway.shared, port)  # names its records and messages
    gateway = build_gateway(cfg)
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


@app.command()
def demo(
    config: str = typer.Option("examples/demo.yaml", "--config", "-c"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Start the gateway over the demo's real servers and run a client session through it."""
    from mcpopt.demo import run_demo

    load(config)
    install_reaper()
    ok = run(run_demo(config, as_json=as_json))
    raise typer.Exit(0 if ok else 1)
