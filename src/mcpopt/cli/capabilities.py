"""`mcpopt capabilities`: per upstream, its era, declared capabilities, tools and hints; this machine's sandboxes."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from mcpopt.cli.common import ConfigOpt, app, install_reaper, load, out, run, setup_logging
from mcpopt.config import Config


async def _report(cfg: Config) -> dict[str, Any]:
    import asyncio

    from mcpopt.codemode.capabilities import sandbox_report, upstream_rows
    from mcpopt.gateway.assembly import build_gateway

    gateway = build_gateway(cfg)
    async with gateway.running():
        rows = upstream_rows(gateway)
    sandboxes = await asyncio.to_thread(sandbox_report, cfg.gateway.code_mode)
    return {"upstreams": rows, "code_mode": sandboxes}


@app.command("capabilities")
def capabilities(config: str = ConfigOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Per upstream: protocol era, declared capabilities, tools and behaviour hints; then the
    code-mode sandboxes and isolation layers this machine offers."""
    cfg = load(config)
    setup_logging("error")
    install_reaper()
    report = run(_report(cfg))
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title="upstreams")
    for col in ("server", "state", "era", "protocol", "capabilities", "tools", "readOnly", "idempotent", "destructive"):
        table.add_column(col, justify="right" if col in ("tools", "readOnly", "idempotent", "destructive") else "left")
    for r in report["upstreams"]:
        caps = []
        for name, value in r["capabilities"].items():
            flags = [k for k, v in value.items() if v is True] if isinstance(value, dict) else []
            caps.append(f"{name}({','.join(flags)})" if flags else name)
        h = r["hints"]
        table.add_row(
            r["server"],
            r["state"],
            r["era"] or "-",
            r["protocol"] or "-",
            " ".join(caps) or "-",
            str(r["tools"]),
            str(h["readOnlyHint"]),
            str(h["idempotentHint"]),
            str(h["destructiveHint"]),
        )
    out.print(table)
    cm = report["code_mode"]
    sand = Table(title="code-mode sandboxes")
    sand.add_column("backend")
    sand.add_column("available")
    sand.add_column("details")
    for name, info in cm["backends"].items():
        if info["available"]:
            detail = (
                f"pydantic-monty {info['version']}"
                if name == "monty"
                else f"{info.get('deno_version') or 'deno'}; pyodide {info.get('pyodide_version')}"
            )
        else:
            detail = info["reason"]
        sand.add_row(
            name + (" (default)" if name == cm["default_backend"] else ""), "yes" if info["available"] else "no", detail
        )
    out.print(sand)
    l2 = cm["layer2"]
    if l2["active"]:
        parts = [f"bubblewrap {l2['bwrap_version']}", "seccomp" if l2["seccomp"] else "no seccomp"]
        parts.append("private uid" if l2["private_uid"] else "shared uid")
        parts.append(f"cgroup {l2['cgroup']}" if l2["cgroup"] else f"no cgroups ({l2['cgroup_reason']})")
        out.print(f"layer 2 (isolation.mode={l2['mode']}): active -- " + ", ".join(parts), highlight=False)
    else:
        why = "isolation.mode is off" if l2["mode"] == "off" else l2["reason"]
        out.print(f"layer 2 (isolation.mode={l2['mode']}): not active -- {why}", highlight=False)
