"""What `mcpopt quick`, `analyze`, `optimize`, `rules ...` and `scenarios ...` do (the CLI wraps these).

Every command that replays scenarios runs its own in-process gateway over the configured servers,
in the sandbox by default (see `optimize.sandbox`), so replays never touch the user's files; the
rules it applies go to the rule file, which a running `mcpopt serve` picks up without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mcpopt.config import Config
from mcpopt.optimize.advisor import advise
from mcpopt.optimize.analyzer import Analyzer, facts_from_gateway
from mcpopt.optimize.coverage import coverage_matrix, gateway_tools
from mcpopt.optimize.loop import LoopReport
from mcpopt.optimize.report import build_report, write_reports
from mcpopt.optimize.runner import SuiteRun
from mcpopt.optimize.scenarios import Scenario, Step, load_scenarios
from mcpopt.optimize.score import suite_scores
from mcpopt.optimize.session import OptimizeSession
from mcpopt.optimize.settings import OptimizationSettings, optimization_settings, parse_duration
from mcpopt.pipeline.rules import RuleStore, rules_summary

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(label: str, total: int, quiet: bool = False) -> Iterator[Callable[[int, int, str], None]]:
    """A rich progress bar on stderr; yields the runner's `(done, total, label)` callback."""
    if quiet:
        yield lambda _d, _t, _l: None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    task = bar.add_task(label, total=total)

    def step(_done: int, _total: int, name: str) -> None:
        bar.update(task, advance=1, description=f"{label}: {name}")

    with bar:
        yield step


def scenario_paths(config: Config, settings: OptimizationSettings, given: Sequence[str]) -> list[str]:
    """`given`, else `optimization.scenarios` (relative to the config file's folder)."""
    if given:
        return list(given)
    base = Path(config.source).resolve().parent if config.source else Path.cwd()
    return [str(p if Path(p).is_absolute() else base / p) for p in settings.scenarios]


def probe_scenarios(gateway: Any, server_vars: dict[str, Any]) -> list[Scenario]:
    """One scenario per server calling each of its read-only tools once, with arguments from
    the schema (enum or default values; path-like strings from the server's own folder)."""
    by_server: dict[str, list[Step]] = {}
    infos = gateway.catalog.tool_infos
    for tool in gateway.catalog.tools:
        route = gateway.catalog.tool_routes.get(tool.name)
        info = infos.get(tool.name)
        if route is None or info is None or not info.read_only:
            continue
        args = _probe_args(tool.input_schema or {}, server_vars.get(route.server, {}))
        if args is None or "long" in tool.name:
            continue
        by_server.setdefault(route.server, []).append(
            Step(id=f"s{len(by_server.get(route.server, [])) + 1}", tool=tool.name, arguments=args)
        )
    return [
        Scenario(id=f"probe-{server}", user_prompt="benchmark probe", task_type="probe", servers=[server], steps=steps)
        for server, steps in sorted(by_server.items())
    ]


def _probe_args(schema: dict[str, Any], sv: dict[str, Any]) -> dict[str, Any] | None:
    props = schema.get("properties") or {}
    folder = next((v for v in sv.get("arg", {}).values() if isinstance(v, str) and v.startswith("/")), None)
    folder = folder or next((a for a in sv.get("args", [])[1:] if isinstance(a, str) and a.startswith("/")), None)
    args: dict[str, Any] = {}
    for name in schema.get("required") or []:
        p = props.get(name) or {}
        if "enum" in p:
            args[name] = p["enum"][0]
        elif "default" in p:
            args[name] = p["default"]
        elif p.get("type") == "string" and folder and any(k in name.lower() for k in ("path", "repo", "dir")):
            args[name] = folder
        else:
            return None
    return args


# ---- scenarios -------------------------------------------------------------------------------
async def run_scenarios(config: Config, paths: Sequence[str], mode: str, sandbox: bool, as_json: bool) -> bool:
    scs = load_scenarios(paths)
    session = OptimizeSession(config, sandbox=sandbox)
    async with session.open():
        assert session.runner is not None
        with progress_bar(f"{mode} run", len(scs), as_json) as step:
            suite = await session.runner.run(scs, mode, progress=step)
    if as_json:
        print(json.dumps(suite.to_dict(), indent=2, default=str))
    else:
        print_suite(suite)
    return all(r.ok for r in suite.ran)


def print_suite(suite: SuiteRun) -> None:
    table = Table(title=f"{suite.label}: {suite.kpis()['success_rate']:.0%} of scenarios pass")
    for col in ("scenario", "result", "ms", "calls", "steps (ms)", "failed"):
        table.add_column(col)
    for r in suite.runs:
        result = "skipped" if r.skipped else ("pass" if r.ok else "FAIL")
        steps = " ".join(f"{s.id}:{s.ms:.0f}" for s in r.steps)
        failed = r.skipped or r.error or "; ".join(f"{c.label}: {c.detail}" for c in r.criteria if not c.ok)
        table.add_row(r.scenario.id, result, f"{r.total_ms:.0f}", str(r.upstream_calls), steps[:80], failed[:160])
    out.print(table)


async def coverage(config: Config, paths: Sequence[str], as_json: bool) -> bool:
    scs = load_scenarios(paths) if paths else []
    session = OptimizeSession(config, sandbox=False)
    async with session.open():
        cov = coverage_matrix(gateway_tools(session.gateway), scs)
    if as_json:
        print(json.dumps(cov.to_dict(), indent=2))
    else:
        table = Table(
            title=f"coverage: {sum(bool(r.scenarios) for r in cov.rows)} of {len(cov.rows)} tools ({cov.ratio:.0%})"
        )
        for col in ("server", "tool", "scenarios"):
            table.add_column(col)
        for r in cov.rows:
            name = r.tool + (f" ({r.action})" if r.action else "")
            table.add_row(r.server, name, ", ".join(r.scenarios) or "[red]none[/red]")
        out.print(table)
        for name, ids in cov.unknown.items():
            err.print(f"[yellow]{name}: no configured server serves it (used by {', '.join(ids)})[/yellow]")
    return not cov.uncovered


# ---- quick / analyze / optimize ----------------------------------------------------------------
def _kpi_table(title: str, suites: Sequence[SuiteRun]) -> Table:
    table = Table(title=title)
    table.add_column("run")
    for col in ("tool calls", "time ms", "scenarios passing"):
        table.add_column(col, justify="right")
    for s in suites:
        k = s.kpis()
        table.add_row(s.label, str(k["calls"]), f"{k['time_ms']:.0f}", f"{k['success_rate']:.0%}")
    return table


def _print_loop(report: LoopReport, max_rejected: int = 8) -> None:
    rejected = 0
    for e in report.events:
        if e.kind == "rejected":
            rejected += 1
            if rejected > max_rejected:
                continue
        if e.kind in ("applied", "would_apply", "rolled_back", "would_roll_back", "rejected", "degraded"):
            color = {"applied": "green", "rolled_back": "red", "rejected": "yellow"}.get(e.kind, "cyan")
            out.print(f"[{color}]{e.kind}[/{color}] {e.rule or ''}: {e.reason}", highlight=False, markup=True)
    if rejected > max_rejected:
        out.print(f"... and {rejected - max_rejected} more proposals rejected (see the JSON/HTML report)")


def _recommendations(report: LoopReport, limit: int = 8) -> None:
    if report.analysis is None or not report.analysis.findings:
        out.print("no findings")
        return
    out.print("[bold]Recommendations[/bold]")
    for f in report.analysis.findings[:limit]:
        out.print(f"- [{f.severity}] {f.title}: {f.recommendation}", highlight=False, markup=False)


async def quick(
    config: Config, *, rounds: int, scenarios: Sequence[str], rules_path: str | None, sandbox: bool, as_json: bool
) -> dict[str, Any]:
    settings = optimization_settings(config).model_copy(update={"level": "conservative", "auto_improvement": True})
    session = OptimizeSession(config, settings=settings, rules_path=rules_path, sandbox=sandbox)
    window_s = parse_duration(settings.window)
    async with session.open():
        assert session.runner is not None
        scs = probe_scenarios(session.gateway, session.runner.server_vars)
        scs += load_scenarios(scenario_paths(config, settings, scenarios)) if (scenarios or settings.scenarios) else []
        bench: list[SuiteRun] = []
        with progress_bar("benchmark", len(scs) * rounds * 2, as_json) as step:
            for mode in ("direct", "gateway"):
                for i in range(rounds):
                    bench.append(await session.runner.run(scs, mode, label=f"{mode} #{i + 1}", progress=step))
        loop = session.loop(scs, since=time.time() - window_s)
        with progress_bar("optimize", len(scs) * 8, as_json) as step:
            loop.progress = step
            report = await loop.run_once(apply=True)
    latencies: dict[str, dict[str, list[float]]] = {}
    for s in bench:
        for tool, ms in s.step_latencies().items():
            latencies.setdefault(tool, {}).setdefault(s.mode, []).extend(ms)
    result: dict[str, Any] = {
        "benchmark": {tool: {mode: _pcts(v) for mode, v in by.items()} for tool, by in sorted(latencies.items())},
        "loop": report.to_dict(),
        "findings": [f.to_dict() for f in (report.analysis.findings if report.analysis else [])],
        "rules_file": str(session.store.path),
    }
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return result
    table = Table(title="benchmark (ms per call)")
    for col in ("tool", "direct p50", "direct p95", "gateway p50", "gateway p95"):
        table.add_column(col, justify="left" if col == "tool" else "right")
    for tool, by in result["benchmark"].items():
        d, g = by.get("direct", {}), by.get("gateway", {})
        table.add_row(
            tool, f"{d.get('p50', 0):.1f}", f"{d.get('p95', 0):.1f}", f"{g.get('p50', 0):.1f}", f"{g.get('p95', 0):.1f}"
        )
    out.print(table)
    out.print(_kpi_table("before / after (conservative rules)", [s for s in (report.before, report.after) if s]))
    _print_loop(report)
    _recommendations(report)
    out.print(f"rules: {session.store.path}")
    return result


def _pcts(values: list[float]) -> dict[str, float]:
    from mcpopt.monitor.stats import percentile

    v = sorted(values)
    return {"n": len(v), "p50": round(percentile(v, 0.5), 3), "p95": round(percentile(v, 0.95), 3)}


async def analyze(
    config: Config,
    *,
    scenarios: Sequence[str],
    out_dir: str,
    optimize: bool,
    apply: bool | None,
    level: str | None,
    rules_path: str | None,
    sandbox: bool,
    quiet: bool = False,
) -> dict[str, Any]:
    settings = optimization_settings(config)
    if level:
        settings = settings.model_copy(update={"level": level})
    paths = scenario_paths(config, settings, scenarios)
    if not paths:
        raise ValueError("no scenarios: pass --scenarios (a file or folder) or set optimization.scenarios")
    scs = load_scenarios(paths)
    session = OptimizeSession(config, settings=settings, rules_path=rules_path, sandbox=sandbox)
    window_s = parse_duration(settings.window)
    async with session.open():
        assert session.runner is not None
        runner = session.runner
        with progress_bar("baseline (direct)", len(scs), quiet) as step:
            direct = await runner.run(scs, "direct", label="direct", progress=step)
        with progress_bar("gateway (rules in force)", len(scs), quiet) as step:
            before = await runner.run(scs, "gateway", label="before", progress=step)
        telemetry = await session.rows(time.time() - window_s)
        suites = [direct, before]
        loop_report: LoopReport | None = None
        if optimize:
            loop = session.loop(scs, since=time.time() - window_s)
            with progress_bar("optimize (validate proposals)", len(scs) * 10, quiet) as step:
                loop.progress = step
                loop_report = await loop.run_once(apply=apply)
            rules = session.store.active()
            rules += [
                r
                for r in (loop_report.analysis.proposals() if loop_report.analysis else [])
                if r.id in {e.rule for e in loop_report.events if e.kind == "would_apply"}
            ]
            session.rules_filter.set_rules(rules)
            with progress_bar("gateway (optimized)", len(scs), quiet) as step:
                after = await runner.run(scs, "gateway", label="after", progress=step)
            session.rules_filter.set_rules(session.store.active())
            suites.append(after)
        analysis = Analyzer(facts_from_gateway(session.gateway)).analyze([*telemetry, *before.traces])
        cov = coverage_matrix(gateway_tools(session.gateway), scs)
        advice = advise(telemetry or before.traces, session.gateway.upstreams)
    report = build_report(
        config=config.source,
        suites=suites,
        scores=suite_scores(suites, baseline=direct),
        analysis=analysis,
        loop=loop_report,
        rules=rules_summary(session.store.rules),
        history=session.store.history,
        advice=advice,
        coverage=cov,
    )
    js, page = write_reports(report, out_dir)
    if not quiet:
        out.print(_kpi_table("scenario suite", suites))
        if loop_report is not None:
            _print_loop(loop_report)
        for f in analysis.findings[:8]:
            out.print(f"- [{f.severity}] {f.title}: {f.recommendation}", highlight=False, markup=False)
        out.print(f"reports: {js} {page}")
    return report


async def optimize(
    config: Config,
    *,
    scenarios: Sequence[str],
    continuous: bool,
    interval: str | None,
    apply: bool | None,
    level: str | None,
    rules_path: str | None,
    sandbox: bool,
) -> LoopReport | None:
    settings = optimization_settings(config)
    updates: dict[str, Any] = {}
    if level:
        updates["level"] = level
    if interval:
        updates["interval"] = interval
    settings = settings.model_copy(update=updates)
    paths = scenario_paths(config, settings, scenarios)
    if not paths:
        raise ValueError("no scenarios: pass --scenarios (a file or folder) or set optimization.scenarios")
    scs = load_scenarios(paths)
    session = OptimizeSession(config, settings=settings, rules_path=rules_path, sandbox=sandbox)
    window_s = parse_duration(settings.window)
    async with session.open():
        loop = session.loop(scs, since=time.time() - window_s)
        if apply is not None:
            loop.settings = loop.settings.model_copy(update={"auto_improvement": apply})
        if not continuous:
            report = await loop.run_once()
            _print_loop(report)
            out.print(_kpi_table("before / after", [s for s in (report.before, report.after) if s]))
            return report

        def show(report: LoopReport) -> None:
            out.print(f"[bold]{time.strftime('%H:%M:%S')}[/bold] run done: {report.to_dict()['change']}")
            _print_loop(report)

        await loop.run_forever(parse_duration(settings.interval), show)
    return None


# ---- rules -----------------------------------------------------------------------------------
def print_rules(store: RuleStore, as_json: bool) -> None:
    rows = rules_summary(store.rules)
    if as_json:
        print(json.dumps({"version": store.version, "path": str(store.path), "rules": rows}, indent=2))
        return
    last: dict[str, str] = {}
    for h in store.history:  # the latest canary decision of each rule, with its reason
        if h.get("rule") and h.get("op") in ("promote", "rollback"):
            last[h["rule"]] = f"{'promoted' if h['op'] == 'promote' else 'rolled back'}: {h.get('reason', '')}"
    table = Table(title=f"{len(rows)} rules (version {store.version}, {store.path})")
    for col in ("id", "enabled", "level", "when", "action", "rollout"):
        table.add_column(col)
    for r in rows:
        rollout = r["rollout"] if r["enabled"] or r["id"] not in last else last[r["id"]]
        table.add_row(r["id"], "yes" if r["enabled"] else "no", r["level"], r["when"], r["action"], rollout)
    out.print(table)


def run(coro: Any) -> Any:
    return asyncio.run(coro)
