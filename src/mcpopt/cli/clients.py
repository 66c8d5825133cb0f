"""`mcpopt import`, `mcpopt install --client NAME`, `mcpopt uninstall --client NAME`: meet users
where their MCP config already is (see `mcpopt.hosts`)."""

from __future__ import annotations

from pathlib import Path

import typer

from mcpopt.cli.common import app, err, out
from mcpopt.config import load_config, read_config_file, read_layout
from mcpopt.errors import ConfigError
from mcpopt.hosts.install import (
    InstallError,
    find_sources,
    input_ids_of,
    install,
    merge,
    render,
    uninstall,
)
from mcpopt.hosts.locations import HOSTS, host

ClientsOpt = typer.Option(None, "--client", help=f"Only this host (repeatable): {', '.join(HOSTS)}.")


def _host(name: str) -> None:
    try:
        host(name)
    except KeyError as exc:
        err.print(f"[red]{exc.args[0]}[/red]", highlight=False)
        raise typer.Exit(2) from None


def _import(output: Path, clients: list[str] | None, project: Path | None, force: bool, dry_run: bool) -> int:
    """Write `output` from the hosts' files; returns the number of servers imported."""
    try:
        sources = find_sources(clients=clients, project=project)
    except ConfigError as exc:
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from None
    if not sources:
        looked = [str(f) for n in clients or list(HOSTS) for f in HOSTS[n].user_files()]
        err.print(f"[red]no MCP host config file found (looked at: {', '.join(looked)})[/red]", highlight=False)
        raise typer.Exit(1)
    plan = merge(sources)
    for src in sources:
        err.print(f"read {src.host.title} ({src.scope}): {src.path} ({len(src.servers)} servers)", highlight=False)
    for note in plan.notes:
        err.print(f"note: {note}", highlight=False)
    text = render(plan)
    if dry_run:
        out.print(text, end="", highlight=False, markup=False)
        return len(plan.data["mcpServers"])
    if output.exists() and not force:
        err.print(f"[red]{output} exists; pass --force to overwrite it (or -o another file)[/red]", highlight=False)
        raise typer.Exit(1)
    output.write_text(text, encoding="utf-8")
    err.print(f"wrote {output}: {len(plan.data['mcpServers'])} servers", highlight=False)
    try:
        load_config(output)
    except ConfigError as exc:
        err.print(f"[yellow]warning: fix this before `mcpopt serve`: {exc}[/yellow]", highlight=False)
    return len(plan.data["mcpServers"])


@app.command("import")
def import_(
    output: Path = typer.Option(Path("mcpopt.yaml"), "--output", "-o", help="The mcpopt config to write."),
    client: list[str] | None = ClientsOpt,
    project: Path | None = typer.Option(None, "--project", help="Also read this folder's project files."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the config instead of writing it."),
) -> None:
    """Find the installed MCP hosts' config files and write one mcpopt config from all their servers."""
    for name in client or []:
        _host(name)
    _import(output, client, project.resolve() if project else None, force, dry_run)


@app.command("install")
def install_cmd(
    client: str = typer.Option(..., "--client", help=f"The host to point at mcpopt: {', '.join(HOSTS)}."),
    config: Path = typer.Option(
        Path("mcpopt.yaml"), "--config", "-c", help="The mcpopt config it should serve (imported first if missing)."
    ),
    name: str = typer.Option("mcpopt", "--name", help="The entry's name in the host's file."),
    file: Path | None = typer.Option(None, "--file", help="The host's file (default: its usual place)."),
) -> None:
    """Point an MCP host at mcpopt: back up its file, then replace the servers mcpopt serves by one entry."""
    _host(client)
    h = host(client)
    target = file or h.user_file()
    created = False
    if not config.exists():
        if not target.is_file():
            err.print(f"[red]{config} does not exist and {target} has no servers to import[/red]", highlight=False)
            raise typer.Exit(1)
        err.print(f"{config} does not exist: importing {h.title}'s servers into it first", highlight=False)
        _import(config, [client], None, False, False)
        created = True
    try:
        raw = read_config_file(config)
    except ConfigError as exc:
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from None
    served = set(read_layout(raw, file=str(config)).data.get("mcpServers", {}))
    try:
        report = install(h, config, name=name, file=target, served=served, input_ids=input_ids_of(raw))
    except (ConfigError, InstallError) as exc:
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(1) from None
    if report.backup is not None:
        err.print(f"backed up {report.file} to {report.backup}", highlight=False)
    err.print(
        f"wrote {report.file}: '{name}' serves {config.resolve()}"
        + (f" (replacing {', '.join(report.replaced)})" if report.replaced else ""),
        highlight=False,
    )
    if report.kept:
        err.print(f"kept as they were (not in {config}): {', '.join(report.kept)}", highlight=False)
    if created:
        err.print(f"edit {config} for mcpopt's own keys (`mcpopt init` shows them all)", highlight=False)
    err.print(f"restart {h.title} to use it; `mcpopt uninstall --client {client}` restores the file", highlight=False)


@app.command("uninstall")
def uninstall_cmd(
    client: str = typer.Option(..., "--client", help=f"The host to restore: {', '.join(HOSTS)}."),
    file: Path | None = typer.Option(None, "--file", help="The host's file (default: its usual place)."),
    force: bool = typer.Option(False, "--force", help="Restore even if the file changed since the install."),
) -> None:
    """Restore an MCP host's file as it was before `mcpopt install`."""
    _host(client)
    try:
        restored = uninstall(host(client), file=file, force=force)
    except InstallError as exc:
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(1) from None
    err.print(f"restored {restored}", highlight=False)
