"""`mcpopt status`: a running gateway's upstreams -- states, restarts, and each process's CPU, memory, fds, children."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import typer
from rich.table import Table

from mcpopt.cli.common import app, err, out

MIB = 1024 * 1024


def fetch_health(url: str, token: str | None, timeout_s: float = 10.0) -> tuple[int, dict[str, Any]]:
    """GET `<url>/healthz`; returns (HTTP status, body). 503 (some server not ready) is an answer too.

    Raises:
        typer.Exit(1): the gateway cannot be reached or does not answer JSON (message on stderr).
    """
    req = urllib.request.Request(url.rstrip("/") + "/healthz", headers={"Accept": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - the operator's own URL
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (OSError, ValueError) as exc:
        err.print(f"[red]{url}: cannot connect ({exc}); is `mcpopt serve -t http` running there?[/red]")
        raise typer.Exit(1) from None
    try:
        return status, json.loads(raw)
    except ValueError:
        err.print(f"[red]{url}/healthz answered HTTP {status} without JSON: is it an mcpopt gateway?[/red]")
        raise typer.Exit(1) from None


def _mib(value: Any) -> str:
    return "–" if value is None else f"{value / MIB:.1f}"


@app.command()
def status(
    url: str = typer.Option("http://127.0.0.1:8080", "--url", help="The gateway's HTTP base URL (serves /healthz)."),
    token: str | None = typer.Option(
        None, "--token", envvar="MCPOPT_TOKEN", help="Bearer token or API key of an admin (gateway.auth on)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print /healthz's JSON as it is."),
) -> None:
    """Upstream servers of a running HTTP gateway: state, restarts, and per stdio replica its process's CPU
    (% of one core, seconds), RSS, growth, open fds and children (from `/healthz`; details are shown to
    this machine, or to an admin when the gateway authenticates). Exit code 0 when all are ready, else 3."""
    code, body = fetch_health(url, token)
    if as_json:
        out.print_json(data=body)
        raise typer.Exit(0 if code == 200 else 3)
    servers = body.get("servers")
    if not isinstance(servers, list):
        counts = servers or {}
        out.print(
            f"{counts.get('ready', '?')} of {counts.get('total', '?')} servers ready (details are shown only to "
            "this machine, or to an admin: pass --token)"
        )
        raise typer.Exit(0 if code == 200 else 3)
    table = Table(title=f"mcpopt at {url}: {'ok' if body.get('ok') else 'NOT all ready'}")
    for col in ("server", "state", "restarts", "rss restarts", "error"):
        table.add_column(col)
    procs = Table(title="upstream processes (process tree: server + descendants)")
    for col in ("server", "replica", "pid", "CPU %", "CPU s", "RSS MiB", "growth MiB", "limit MiB", "fds", "children"):
        procs.add_column(col, justify="left" if col in ("server", "replica") else "right")
    for row in servers:
        table.add_row(
            row["server"],
            row["state"],
            str(row.get("restarts", 0)),
            str(row.get("rss_restarts", 0)),
            (row.get("error") or "")[:80],
        )
        for use in row.get("processes") or ():
            cpu = use.get("cpu_percent")
            procs.add_row(
                row["server"],
                str(use["replica"]),
                str(use["pid"]),
                "–" if cpu is None else f"{cpu:.1f}",
                f"{use['cpu_seconds']:.2f}",
                _mib(use["rss_bytes"]),
                f"{use['rss_growth_bytes'] / MIB:+.1f} ({use['rss_growth_pct']:+.0f}%)",
                _mib(use.get("max_rss_bytes")),
                str(use["open_fds"]),
                str(use["children"]),
            )
        iso = row.get("isolated_processes")
        if iso:
            procs.add_row(
                row["server"],
                f"isolated x{iso['sessions']}",
                "",
                "",
                f"{iso['cpu_seconds']:.2f}",
                _mib(iso["rss_bytes"]),
                f"{iso['growth_alerts']} growing",
                "",
                str(iso["open_fds"]),
                str(iso["children"]),
            )
    out.print(table)
    if procs.row_count:
        out.print(procs)
    raise typer.Exit(0 if code == 200 else 3)
