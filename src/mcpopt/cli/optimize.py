"""`mcpopt scenarios|quick|analyze|optimize|rules`: the optimizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mcpopt.cli.common import ConfigOpt, app, err, install_reaper, load, out, run, setup_logging

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
    from mcpopt.optimize.sandbox import SandboxError
    from mcpopt.optimize.scenarios import ScenarioError
    from mcpopt.pipeline.rules import RuleError

    try:
        return run(coro)
    except (ScenarioError, RuleError, SandboxError, ValueError) as exc:  # raised before any task group
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from None


@scenarios_app.command("run")
def scenariosrun(
    paths: list[str] = typer.Argument(..., help="Scenario files or folders."),
    config: str = ConfigOpt,
    mode: str = typer.Option("gateway", "--mode", help="gateway (the pipeline, rules in force) or direct (baseline)"),
    sandbox: bool = SandboxOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Replay scenarios: per step latency, pass/fail of every criterion."""
    from mcpopt.optimize import commands

    cfg = load(config)
    setup_logging("error")
    install_reaper()
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

    cfg = load(config)
    setup_logging("error")
    install_reaper()
    ok = _opt_run(commands.coverage(cfg, paths, as_json))
    raise typer.Exit(0 if ok else 1)


@app.command()
def quick(
    config: str = ConfigOpt,
    rounds: int = typer.Option(
        100, "--rounds", help="Benchmark rounds, alternating direct and gateway (after a warm-up round of each)."
    ),
    scenarios: list[str] = ScenariosOpt,
    rules: str | None = RulesPathOpt,
    sandbox: bool = SandboxOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Benchmark the servers, analyze recent telemetry, apply safe (conservative) rules, re-measure."""
    from mcpopt.optimize import commands

    cfg = load(config)
    setup_logging("error")
    install_reaper()
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

    cfg = load(config)
    setup_logging("error")
    install_reaper()
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

    cfg = load(config)
    setup_logging("warning")
    install_reaper()
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
    from mcpopt.optimize.settings import default_rules_path
    from mcpopt.pipeline.rules import RuleError, RuleStore

    path = rules or str(default_rules_path(load(config) if Path(config).exists() else None))
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
    from mcpopt.pipeline.rules import RuleError

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
