"""`mcpopt skills list|show|rm`: the skills code mode keeps per principal (SQLite in the data dir)."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from mcpopt.cli.common import app, err, load, out

if TYPE_CHECKING:
    from mcpopt.codemode.skills import SkillStore

skills_app = typer.Typer(no_args_is_help=True, help="Skills saved by code mode (save_skill), per principal.")
app.add_typer(skills_app, name="skills")

ConfigOpt = typer.Option(None, "--config", "-c", help="Config file (default: mcpopt.yaml when present).")
PrincipalOpt = typer.Option("local", "--principal", "-p", help="Whose skills ('local': the stdio front's user).")


def _store(config: str | None) -> SkillStore:
    from mcpopt.codemode.sandbox import CodeModeSettings
    from mcpopt.codemode.skills import SkillStore
    from mcpopt.config import config_data_dir

    if config is None and os.path.exists("mcpopt.yaml"):
        config = "mcpopt.yaml"
    settings, data_dir = CodeModeSettings(), config_data_dir(None)
    if config is not None:
        cfg = load(config)
        settings = cfg.gateway.code_mode
        data_dir = config_data_dir(cfg)
    path = Path(settings.skills.path).expanduser() if settings.skills.path else data_dir / "skills.db"
    return SkillStore(path, settings.skills.max_per_principal)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


@skills_app.command("list")
def skills_list(
    config: str | None = ConfigOpt,
    principal: str = PrincipalOpt,
    every: bool = typer.Option(False, "--all", help="Every principal's skills."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List a principal's skills: name, signature, what it does, last saved."""
    store = _store(config)
    found = store.list(None if every else principal)
    if as_json:
        print(json.dumps([s.as_dict() for s in found], indent=2))
        return
    table = Table(title=f"{len(found)} skills" + ("" if every else f" of {principal}"))
    if every:
        table.add_column("principal")
    for col in ("signature", "does", "saved"):
        table.add_column(col)
    for s in found:
        row = [s.signature, (s.doc.splitlines() or [""])[0][:80], _when(s.updated)]
        table.add_row(*([s.principal, *row] if every else row))
    out.print(table)


@skills_app.command("show")
def skills_show(
    name: str = typer.Argument(..., help="The skill's name."),
    config: str | None = ConfigOpt,
    principal: str = PrincipalOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Print one skill: its signature, docstring and source."""
    skill = _store(config).get(principal, name)
    if skill is None:
        err.print(f"[red]no skill named {name!r} for principal {principal!r}[/red]", highlight=False)
        raise typer.Exit(1)
    if as_json:
        print(json.dumps(skill.as_dict(), indent=2))
        return
    out.print(f"# skills.{skill.signature}  (saved {_when(skill.updated)}, principal {principal})", highlight=False)
    if skill.doc:
        out.print(f"# {skill.doc}", highlight=False)
    out.print(skill.code.rstrip(), markup=False, highlight=False)


@skills_app.command("rm")
def skills_rm(
    name: str = typer.Argument(..., help="The skill's name."),
    config: str | None = ConfigOpt,
    principal: str = PrincipalOpt,
) -> None:
    """Delete one skill."""
    if not _store(config).remove(principal, name):
        err.print(f"[red]no skill named {name!r} for principal {principal!r}[/red]", highlight=False)
        raise typer.Exit(1)
    out.print(f"removed skill {name!r} of {principal}", highlight=False)
