"""`mcpopt workflows list|show|run|status|cancel`, and `mcpopt bench workflow`.

`list`, `show` and `status` read the config and its journal (no gateway needed); `run` starts a
gateway over the config for the run (or, with `--url`, calls `workflow__<name>` on a running
one); `cancel` asks a running gateway (`--url`) or flags the run in the journal, where its owner
sees it within `lease_ms / 5`.
"""

from __future__ import annotations

import json
import time
from typing import Any

import typer
from rich.table import Table

from mcpopt.cli.common import ConfigOpt, app, bench_app, err, install_reaper, load, out, run, setup_logging
from mcpopt.config import Config
from mcpopt.errors import McpoptError

workflows_app = typer.Typer(no_args_is_help=True, help="Workflows: list, show, run, watch and cancel them.")
app.add_typer(workflows_app, name="workflows")

UrlOpt = typer.Option("", "--url", help="A running gateway's Streamable HTTP endpoint (default: none).")


def _journal(cfg: Config, *, write: bool = False) -> Any:
    from mcpopt.workflows.journal import SqliteJournal
    from mcpopt.workflows.settings import journal_path

    path = journal_path(cfg)
    if not path.exists():
        return None
    return SqliteJournal(path, readonly=not write)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


@workflows_app.command("list")
def workflows_list(
    config: str = ConfigOpt,
    runs: int = typer.Option(10, "--runs", help="How many recent runs to show."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The config's workflows (and those agents built), and the recent runs in the journal."""
    cfg = load(config)

    async def gather() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        rows = [
            {"name": n, "source": wf.source or "config", "steps": len(wf.steps), "description": wf.description}
            for n, wf in cfg.workflows.items()
        ]
        journal = _journal(cfg)
        recent: list[dict[str, Any]] = []
        if journal is not None:
            try:
                for d in await journal.definitions():
                    if d["name"] not in cfg.workflows:
                        steps = d["definition"].get("steps", [])
                        rows.append(
                            {
                                "name": d["name"],
                                "source": d["source"],
                                "steps": len(steps),
                                "description": d["definition"].get("description", ""),
                            }
                        )
                recent = [r.summary() for r in await journal.runs(limit=runs)]
            finally:
                await journal.close()
        return rows, recent

    rows, recent = run(gather())
    if as_json:
        print(json.dumps({"workflows": rows, "runs": recent}, indent=2))
        return
    table = Table(title=f"{len(rows)} workflows")
    for col in ("tool", "source", "steps", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(f"workflow__{r['name']}", r["source"], str(r["steps"]), (r["description"] or "")[:80])
    out.print(table)
    if recent:
        rt = Table(title="recent runs")
        for col in ("run id", "workflow", "status", "started", "error"):
            rt.add_column(col)
        for r in recent:
            rt.add_row(r["run_id"], r["workflow"], r["status"], _when(r["created"]), (r["error"] or "")[:60])
        out.print(rt)


@workflows_app.command("show")
def workflows_show(
    name: str = typer.Argument(..., help="The workflow's name (without workflow__)."),
    config: str = ConfigOpt,
) -> None:
    """A workflow's definition, input schema and step graph."""
    import yaml

    cfg = load(config)
    wf = cfg.workflows.get(name.removeprefix("workflow__"))
    if wf is None:
        known = ", ".join(sorted(cfg.workflows)) or "none"
        err.print(f"[red]no workflow {name!r} in {config} (workflows: {known})[/red]")
        raise typer.Exit(1)
    deps = wf.dependencies()
    out.print(
        f"[bold]workflow__{wf.name}[/bold]  ({wf.source or 'config'}; on_failure {wf.on_failure}, "
        f"on_restart {wf.on_restart}, max_parallel {wf.max_parallel})"
    )
    if wf.description:
        out.print(wf.description)
    out.print("input schema: " + json.dumps(wf.input_schema()), markup=False, highlight=False)
    table = Table(title="steps")
    for col in ("step", "calls", "after", "for_each", "when", "compensate"):
        table.add_column(col)
    for s in wf.steps:
        table.add_row(
            s.id,
            s.target,
            ", ".join(sorted(deps[s.id])) or "-",
            str(s.for_each) if s.for_each is not None else "",
            str(s.when) if s.when is not None else "",
            s.compensate.tool if s.compensate else "",
        )
    out.print(table)
    out.print(
        yaml.safe_dump(wf.model_dump(mode="json", by_alias=True, exclude_unset=True), sort_keys=False),
        markup=False,
        highlight=False,
    )


@workflows_app.command("run")
def workflows_run(
    name: str = typer.Argument(..., help="The workflow's name."),
    args: str = typer.Option("{}", "--args", "-a", help="Parameters as a JSON object."),
    config: str = ConfigOpt,
    url: str = UrlOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run a workflow (in a gateway started for it, or on a running gateway with --url)."""
    try:
        arguments = json.loads(args)
        if not isinstance(arguments, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        err.print(f"[red]--args: expected a JSON object ({exc})[/red]")
        raise typer.Exit(2) from None
    tool = f"workflow__{name.removeprefix('workflow__')}"
    if url:
        result = run(_remote(url, tool, arguments))
        data = result.structured_content or json.loads(result.content[0].text)
    else:
        cfg = load(config)
        setup_logging("error")
        install_reaper()
        data = run(_local(cfg, tool, arguments))
    _print_run(data, as_json)
    if data.get("status") != "completed":
        raise typer.Exit(1)


async def _local(cfg: Config, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    from mcp.shared.exceptions import MCPError
    from mcp_types.version import LATEST_HANDSHAKE_VERSION

    from mcpopt.api import ClientLink, no_progress
    from mcpopt.gateway.assembly import build_gateway

    gateway = build_gateway(cfg)
    failure = None
    async with gateway.running():
        for row in gateway.status():
            if row["state"] not in ("ready", "idle"):
                err.print(f"[yellow]MCP server '{row['server']}' is {row['state']}: {row['error']}[/yellow]")
        link = ClientLink(LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: no_progress, session_id="cli")
        try:
            result = await gateway.call_tool({"name": tool, "arguments": arguments}, link)
            data: dict[str, Any] = result.get("structuredContent") or json.loads(result["content"][0]["text"])
            return data
        except MCPError as exc:
            failure = f"error {exc.error.code}: {exc.error.message}"
    raise McpoptError(failure or "no result")


async def _remote(url: str, tool: str, arguments: dict[str, Any]) -> Any:
    from mcp import Client
    from mcp.shared.exceptions import MCPError

    try:
        async with Client(url, mode="legacy") as client:
            return await client.call_tool(tool, arguments)
    except MCPError as exc:
        raise McpoptError(f"{url}: error {exc.code}: {exc}") from None
    except OSError as exc:
        raise McpoptError(f"{url}: cannot connect ({exc})") from None


def _print_run(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    status = data.get("status", "?")
    color = "green" if status == "completed" else "red"
    out.print(f"run {data.get('run_id', '?')}: [{color}]{status}[/{color}]  ({data.get('ms', 0):.1f} ms)")
    if data.get("error"):
        out.print(f"error: {data['error']}", markup=False, highlight=False)
    table = Table()
    for col in ("step", "status", "ms", "calls", "error"):
        table.add_column(col)
    for s in data.get("steps", []):
        table.add_row(s["id"], s["status"], f"{s['ms']:.1f}", str(s.get("calls", 1)), (s.get("error") or "")[:70])
    out.print(table)
    for key in ("compensated", "compensation_failed", "in_doubt", "kept"):
        if data.get(key):
            out.print(f"{key}: " + json.dumps(data[key]), markup=False, highlight=False)
    if data.get("output") is not None:
        out.print("output: " + json.dumps(data["output"], default=str), markup=False, highlight=False)


@workflows_app.command("status")
def workflows_status(
    run_id: str = typer.Argument(..., help="The run's id."),
    config: str = ConfigOpt,
    events: bool = typer.Option(False, "--events", help="Also list the run's journal events."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A run's state from the journal (with --events: every step start, result and compensation)."""
    cfg = load(config)

    async def read() -> tuple[Any, list[Any]]:
        journal = _journal(cfg)
        if journal is None:
            raise McpoptError(f"no workflow journal for {config} yet (no run was started)")
        try:
            info = await journal.get(run_id)
            if info is None:
                raise McpoptError(f"no run {run_id!r} in {journal.path}")
            return info, await journal.events(run_id)
        finally:
            await journal.close()

    info, evs = run(read())
    if as_json:
        body = {**info.summary(), "params": info.params, "result": info.result}
        if events:
            body["events"] = [e.to_dict() for e in evs]
        print(json.dumps(body, indent=2, default=str))
        return
    if info.result is not None:
        _print_run({**info.result, "status": info.status}, False)
    else:
        out.print(
            f"run {info.run_id} ({info.workflow}): {info.status}, owner {info.owner or '-'}, {len(evs)} events so far"
        )
    if events:
        table = Table(title="journal")
        for col in ("seq", "time", "event", "step", "item", "attempt", "detail"):
            table.add_column(col)
        for e in evs:
            detail = e.data.get("error") or e.data.get("reason") or e.data.get("decision") or ""
            table.add_row(str(e.seq), _when(e.ts), e.kind, e.step, e.item, str(e.attempt), str(detail)[:70])
        out.print(table)


@workflows_app.command("cancel")
def workflows_cancel(
    run_id: str = typer.Argument(..., help="The run's id."),
    config: str = ConfigOpt,
    url: str = UrlOpt,
) -> None:
    """Cancel a run: no new step starts, calls in flight finish, then its on_failure applies."""
    if url:
        result = run(_remote(url, "mcpopt__workflow", {"action": "cancel", "run_id": run_id}))
        out.print(result.content[0].text, markup=False, highlight=False)
        raise typer.Exit(1 if result.is_error else 0)
    cfg = load(config)

    async def flag() -> bool:
        journal = _journal(cfg, write=True)
        if journal is None:
            raise McpoptError(f"no workflow journal for {config} yet (no run was started)")
        try:
            info = await journal.get(run_id)
            if info is None:
                raise McpoptError(f"no run {run_id!r} in {journal.path}")
            ok: bool = await journal.request_cancel(run_id)
            if not ok:
                raise McpoptError(f"run {run_id} already finished ({info.status})")
            return ok
        finally:
            await journal.close()

    run(flag())
    out.print(f"cancel requested for {run_id}: its gateway stops it at its next lease renewal")


@bench_app.command("workflow")
def bench_workflow_cmd(
    iterations: int = typer.Option(30, "--iterations", "-n", help="Measured iterations per path (after warm-up)."),
    warmup: int = typer.Option(3, "--warmup"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A 6-step workflow (4 independent reads, 2 dependent writes) vs the same calls one by one: time and tokens."""
    from mcpopt.bench.workflow import bench_workflow, print_report

    install_reaper()
    print_report(run(bench_workflow(iterations=iterations, warmup=warmup)), as_json)
