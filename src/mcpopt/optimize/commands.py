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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mcpopt.config import Config
from mcpopt.monitor.compare import schedule, spread
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


BENCH_PATHS = ("direct", "gateway")
"""The paths `quick` compares: `direct` (straight to the upstream session, no pipeline) and
`gateway` (the whole pipeline), over the same upstream sessions in the same process."""


async def bench_paths(runner: Any, scenarios: Sequence[Scenario], rounds: int, progress: Any) -> list[SuiteRun]:
    """The timed suites of `quick`'s benchmark: one warm-up round of each path (dropped), then
    `rounds` rounds alternating the paths (`mcpopt.monitor.compare.schedule`)."""
    timed: list[SuiteRun] = []
    # One call per step on both paths: batch hints in force would time a whole batch per step.
    hints, runner.honor_batch_hints = runner.honor_batch_hints, False
    try:
        for slot in schedule(BENCH_PATHS, rounds, warmup_rounds=1):
            label = f"{slot.path} warm-up" if slot.warmup else f"{slot.path} #{slot.round}"
            suite = await runner.run(scenarios, slot.path, label=label, progress=progress)
            if not slot.warmup:
                timed.append(suite)
    finally:
        runner.honor_batch_hints = hints
    return timed


def paired_differences(suites: Sequence[SuiteRun]) -> dict[str, list[float]]:
    """Per gateway tool name, `gateway ms - direct ms` of the same step of the same scenario in the
    same round (`suites`: one direct and one gateway suite per round, as `bench_paths` returns them);
    steps the gateway answered without a server (cache hit, coalesced) are left out."""
    diffs: dict[str, list[float]] = {}
    n = len(BENCH_PATHS)
    for i in range(0, len(suites) - n + 1, n):
        by_mode = {s.mode: s for s in suites[i : i + n]}
        d_suite, g_suite = by_mode.get("direct"), by_mode.get("gateway")
        if d_suite is None or g_suite is None:
            continue
        for d_run, g_run in zip(d_suite.runs, g_suite.runs, strict=False):
            if d_run.skipped or g_run.skipped or d_run.scenario.id != g_run.scenario.id:
                continue
            for d_step, g_step in zip(d_run.steps, g_run.steps, strict=False):
                if d_step.id == g_step.id and g_step.upstream:
                    diffs.setdefault(g_step.tool, []).append(g_step.ms - d_step.ms)
    return diffs


def bench_table(suites: Sequence[SuiteRun]) -> dict[str, dict[str, Any]]:
    """Per gateway tool name: `{direct: spread, gateway: spread, gateway_served: n, added_p50_ms,
    added_paired: spread}` (ms; `spread` of `mcpopt.monitor.compare`).

    `suites` are `bench_paths`' output, one direct and one gateway suite per round. `added_p50_ms` is
    gateway p50 - direct p50; `added_paired` is the spread of the paired differences (gateway - direct
    for the same step of the same scenario in the same round), which a machine's drift between
    rounds does not reach. `gateway_served` counts gateway calls no server executed (cache hits,
    coalesced calls): such a tool's gateway figure is not the same work as its direct one."""
    samples: dict[str, dict[str, list[float]]] = {}
    served: dict[str, int] = {}
    for s in suites:
        for run in s.ran:
            for step in run.steps:
                samples.setdefault(step.tool, {}).setdefault(s.mode, []).append(step.ms)
                if s.mode == "gateway" and not step.upstream:
                    served[step.tool] = served.get(step.tool, 0) + 1
    diffs = paired_differences(suites)
    out: dict[str, dict[str, Any]] = {}
    for tool, by in sorted(samples.items()):
        row: dict[str, Any] = {mode: _ms(spread(by.get(mode, []))) for mode in BENCH_PATHS}
        row["gateway_served"] = served.get(tool, 0)
        d, g = row["direct"]["p50"], row["gateway"]["p50"]
        row["added_p50_ms"] = round(g - d, 3) if d is not None and g is not None else None
        row["added_paired"] = _ms(spread(diffs.get(tool, [])))
        out[tool] = row
    return out


def _ms(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()}


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
        with progress_bar("benchmark", len(scs) * (rounds + 1) * len(BENCH_PATHS), as_json) as step:
            bench = await bench_paths(session.runner, scs, rounds, step)
        loop = session.loop(scs, since=time.time() - window_s)
        with progress_bar("optimize", len(scs) * 8, as_json) as step:
            loop.progress = step
            report = await loop.run_once(apply=True)
    result: dict[str, Any] = {
        "benchmark": bench_table(bench),
        "benchmark_verdict": bench_verdict(bench_table(bench), bench),
        "benchmark_method": (
            f"{rounds} rounds alternating direct and gateway (order rotated each round) after one warm-up round "
            "of each; ms per call, nearest-rank percentiles over every call of a tool in all rounds"
        ),
        "loop": report.to_dict(),
        "findings": [f.to_dict() for f in (report.analysis.findings if report.analysis else [])],
        "rules_file": str(session.store.path),
    }
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return result
    out.print(_bench_rich(result["benchmark"], rounds))
    out.print(result["benchmark_verdict"], highlight=False, markup=False)
    out.print(_kpi_table("scenario KPIs before / after this run's rules", _before_after(report)))
    _print_loop(report)
    _recommendations(report)
    out.print(f"rules: {session.store.path}")
    return result


def bench_verdict(rows: dict[str, dict[str, Any]], suites: Sequence[SuiteRun]) -> str:
    """One line reading `bench_table` over the tools the cache did not serve: on how many the gateway
    adds >= 0 (median of their paired differences), and the median and p25-p75 of all their paired
    differences together (the figure a noisy machine moves least)."""
    fair = {t for t, r in rows.items() if not r["gateway_served"] and r["added_paired"]["n"]}
    if not fair:
        return "no tool the cache did not serve was measured on both paths"
    slower = [t for t in fair if rows[t]["added_paired"]["p50"] >= 0]
    both = spread(x for t, xs in paired_differences(suites).items() if t in fair for x in xs)
    return (
        f"direct <= gateway (median of paired differences) on {len(slower)} of {len(fair)} tools the cache did "
        f"not serve; all {both['n']} paired differences: the gateway adds {both['p50']:+.3f} ms median "
        f"[p25 {both['q1']:+.3f}, p75 {both['q3']:+.3f}]"
    )


def _bench_rich(rows: dict[str, dict[str, Any]], rounds: int) -> Table:
    from rich import box

    table = Table(
        title=f"benchmark, ms per call: {rounds} rounds alternating direct / gateway after a warm-up round of each",
        caption="p50 \\[p25-p75]; p95, p99 in --json. direct: straight to the upstream session; gateway: the whole "
        "pipeline, same sessions. added p50: gateway p50 - direct p50; paired: median of gateway - direct for the "
        "same step in the same round. served: gateway calls no server executed (cache hit, coalesced)",
        box=box.SIMPLE_HEAD,
    )
    for col in ("tool", "n", "direct", "gateway", "added p50", "paired", "served"):
        if col == "tool":
            table.add_column(col, overflow="fold")
        else:
            table.add_column(col, justify="right", no_wrap=True)

    def cell(s: dict[str, Any]) -> str:
        return "-" if s["p50"] is None else f"{s['p50']:.2f} [{s['q1']:.2f}-{s['q3']:.2f}]"

    for tool, r in rows.items():
        d, g = r["direct"], r["gateway"]
        table.add_row(
            tool,
            str(min(d["n"], g["n"])),
            cell(d),
            cell(g),
            "-" if r["added_p50_ms"] is None else f"{r['added_p50_ms']:+.2f}",
            "-" if r["added_paired"]["p50"] is None else f"{r['added_paired']['p50']:+.2f}",
            f"{r['gateway_served']}/{g['n']}" if r["gateway_served"] else "",
        )
    return table


def _before_after(report: LoopReport) -> list[SuiteRun]:
    """The loop's before and after suites, labelled by what they ran: the rules in force, then
    those plus the rules this run applied (one row when it applied none)."""
    before, after = report.before, report.after
    if before is None:
        return [after] if after is not None else []
    before.label = "before: the rules in force"
    if after is None or after is before:
        before.label += " (this run applied none)"
        return [before]
    added = sum(e.kind in ("applied", "would_apply") for e in report.events)
    removed = sum(e.kind in ("rolled_back", "would_roll_back") for e in report.events)
    after.label = f"after: + {added} rule(s) validated" + (f", - {removed} rolled back" if removed else "")
    return [before, after]


async def alternate_suites(
    runner: Any,
    scenarios: Sequence[Scenario],
    paths: Mapping[str, tuple[str, list[Any] | None]],
    set_rules: Callable[[list[Any]], None],
    warmup: Sequence[Scenario] = (),
    progress: Any = None,
) -> list[SuiteRun]:
    """One `SuiteRun` per path (label -> (runner mode, the rules in force or None)), measured
    alternately: `warmup` scenarios once on each path first (dropped; read-only probes), then
    scenario `i` on every path in the order of `paths` rotated by `i` (`monitor.compare.schedule`),
    so a machine's drift and a scenario's first, cold run reach every path alike."""
    labels = list(paths)
    suites = {label: SuiteRun(paths[label][0], label) for label in labels}

    async def turn(label: str, group: Sequence[Scenario], purge: bool) -> SuiteRun:
        mode, rules = paths[label]
        if rules is not None:
            set_rules(rules)
        return await runner.run(group, mode, label=label, purge_cache=purge)  # type: ignore[no-any-return]

    if warmup:
        for label in labels:
            await turn(label, warmup, True)
    for slot in schedule(labels, len(scenarios), warmup_rounds=0):
        got = await turn(slot.path, [scenarios[slot.round]], slot.round == 0)
        suite = suites[slot.path]
        suite.runs += got.runs
        suite.traces += got.traces
        suite.rules = got.rules
        if progress is not None and slot.path == labels[-1]:
            progress(slot.round + 1, len(scenarios), scenarios[slot.round].id)
    return [suites[label] for label in labels]


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
        in_force = list(session.store.active())
        telemetry = await session.rows(time.time() - window_s)
        loop_report: LoopReport | None = None
        measured: dict[str, tuple[str, list[Any] | None]] = {
            "direct": ("direct", None),
            "before": ("gateway", in_force),
        }
        if optimize:
            loop = session.loop(scs, since=time.time() - window_s)
            with progress_bar("optimize (validate proposals)", len(scs) * 10, quiet) as step:
                loop.progress = step
                loop_report = await loop.run_once(apply=apply)
            validated = {e.rule for e in loop_report.events if e.kind == "would_apply"}
            rules = session.store.active()
            proposals = loop_report.analysis.proposals() if loop_report.analysis else []
            rules += [r for r in proposals if r.id in validated]
            measured["after"] = ("gateway", rules)
        probes = probe_scenarios(session.gateway, runner.server_vars)
        with progress_bar(" / ".join(measured) + ", alternating", len(scs), quiet) as step:
            suites = await alternate_suites(runner, scs, measured, session.rules_filter.set_rules, probes, step)
        session.rules_filter.set_rules(session.store.active())
        direct, before = suites[0], suites[1]
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
        out.print(
            _kpi_table(
                "scenario suite, the paths alternating per scenario after a warm-up: direct (no gateway), "
                "before (gateway, rules in force), after (gateway, + rules validated now)",
                suites,
            )
        )
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
            out.print(_kpi_table("scenario KPIs before / after this run's rules", _before_after(report)))
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
