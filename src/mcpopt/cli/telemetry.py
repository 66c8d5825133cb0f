"""`mcpopt stats`, `mcpopt telemetry export`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mcpopt.cli.common import ConfigOpt, app, err, load, out
from mcpopt.config import TelemetrySettings, default_data_dir

telemetry_app = typer.Typer(no_args_is_help=True, help="Telemetry records: export them.")
app.add_typer(telemetry_app, name="telemetry")


def _telemetry_store(config: str, db: str | None) -> Path | str:
    """The store: --db (a file or a `postgresql://` URL), else the config's `gateway.telemetry`: its
    `postgres_url` (all replicas' records) when set, else its SQLite file (defaults without a config file)."""
    from mcpopt.config import config_data_dir
    from mcpopt.telemetry.postgres import is_postgres_url
    from mcpopt.telemetry.store import store_path

    if db:
        return db if is_postgres_url(db) else Path(db).expanduser()
    cfg = load(config) if Path(config).exists() else None
    settings = cfg.gateway.telemetry if cfg is not None else TelemetrySettings()
    if settings.postgres_url:
        return settings.postgres_url
    path = store_path(settings, config_data_dir(cfg))
    if path is None:
        err.print('[red]the SQLite store is off (gateway.telemetry.sqlite_path: ""); pass --db FILE[/red]')
        raise typer.Exit(2)
    return path


def _hint_shared_store() -> None:
    """Point at the store every config shared before data dirs were per config (README: data dir)."""
    old = default_data_dir() / "telemetry.db"
    if old.exists():
        err.print(
            f"telemetry recorded before data dirs were per config is in {old} (all configs mixed): "
            f"`mcpopt stats --db {old}`, or set gateway.data_dir to {default_data_dir()} to keep using it"
        )


def _store_failed(path: Path | str, exc: Exception) -> None:
    from mcpopt.monitor.report import redacted_url
    from mcpopt.telemetry.postgres import is_postgres_url

    if not is_postgres_url(path):
        raise exc
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    err.print(f"[red]telemetry database {redacted_url(str(path))}: {first}[/red]", highlight=False)
    raise typer.Exit(1) from None


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
    db: str | None = typer.Option(
        None, "--db", help="The telemetry SQLite file or a postgresql:// URL (default: from the config)."
    ),
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
        _hint_shared_store()
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - a PostgreSQL store that is down or psycopg missing: say so
        _store_failed(path, exc)
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
    db: str | None = typer.Option(
        None, "--db", help="The telemetry SQLite file or a postgresql:// URL (default: from the config)."
    ),
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
    except Exception as exc:  # noqa: BLE001
        _store_failed(path, exc)
    err.print(f"wrote {n} records to {out_file}")
