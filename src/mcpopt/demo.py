"""`mcpopt demo`: the main job on real servers.

Starts `mcpopt serve` over the demo config (mcp-server-time, mcp-server-git, server-everything,
server-filesystem, server-memory) as a real stdio subprocess, connects the SDK's own `Client`
to it (default auto mode, so the client speaks 2026-07-28 to the gateway while most upstreams
speak the handshake era), and runs a short session: list tools, resources and prompts, call a
tool of each server, read a resource, get a prompt. Prints each step with its latency.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters
from rich.console import Console
from rich.table import Table


def _text(result: Any) -> str:
    parts = []
    for block in getattr(result, "content", None) or []:
        parts.append(getattr(block, "text", f"[{getattr(block, 'type', '?')}]"))
    return " ".join(parts).replace("\n", " ")


async def run_demo(config: str, as_json: bool = False) -> bool:
    """Run the demo session; returns True when every step succeeded."""
    console = Console(stderr=as_json)
    root = Path.cwd()
    sample = root / "examples" / "sample-folder"
    (root / ".artifacts").mkdir(exist_ok=True)
    steps: list[dict[str, Any]] = []
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "mcpopt.cli", "serve", "-c", config], cwd=str(root)
    )
    t_start = time.perf_counter()
    async with Client(params) as client:
        started_ms = (time.perf_counter() - t_start) * 1000
        console.print(
            f"gateway up in {started_ms:.0f} ms; client speaks protocol {client.protocol_version} "
            f"to '{client.server_info.name if client.server_info else '?'}'"
        )

        async def step(label: str, fn: Any, check: Any = None) -> Any:
            t0 = time.perf_counter()
            try:
                result = await fn()
                ok = True if check is None else bool(check(result))
                detail = ""
            except Exception as exc:  # noqa: BLE001 - reported as a failed step
                result, ok, detail = None, False, f"{type(exc).__name__}: {exc}"
            ms = (time.perf_counter() - t0) * 1000
            if result is not None and not detail:
                detail = _summary(result)
            steps.append({"step": label, "ok": ok, "ms": round(ms, 2), "detail": detail[:160]})
            return result

        tools = await step("tools/list", client.list_tools, lambda r: len(r.tools) > 0)
        await step("resources/list", client.list_resources)
        await step("prompts/list", client.list_prompts)
        calls: list[tuple[str, dict[str, Any], str]] = [
            ("time__get_current_time", {"timezone": "Europe/Paris"}, "datetime"),
            (
                "time__convert_time",
                {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"},
                "21:00",
            ),
            ("git__git_log", {"repo_path": str(root), "max_count": 3}, "Commit"),
            ("everything__echo", {"message": "hello through mcpopt"}, "hello through mcpopt"),
            ("everything__get-sum", {"a": 2, "b": 3}, "5"),
            ("filesystem__list_directory", {"path": str(sample)}, "notes.txt"),
            ("filesystem__read_text_file", {"path": str(sample / "notes.txt")}, "sample"),
            (
                "memory__create_entities",
                {"entities": [{"name": "mcpopt-demo", "entityType": "project", "observations": ["ran the demo"]}]},
                "mcpopt-demo",
            ),
            ("memory__search_nodes", {"query": "mcpopt-demo"}, "ran the demo"),
        ]
        names = {t.name for t in tools.tools} if tools else set()
        for name, args, expect in calls:
            if name not in names:
                steps.append({"step": f"tools/call {name}", "ok": False, "ms": 0, "detail": "tool not listed"})
                continue
            await step(
                f"tools/call {name}",
                lambda n=name, a=args: client.call_tool(n, a),
                lambda r, e=expect: not r.is_error and e in _text(r),
            )
        # A second round of the same calls: the steady-state cost of a call through the gateway.
        t0 = time.perf_counter()
        n = 0
        for _ in range(20):
            await client.call_tool("time__get_current_time", {"timezone": "UTC"})
            n += 1
        steady_ms = (time.perf_counter() - t0) * 1000 / n
        resources = await client.list_resources()
        uri = next((str(r.uri) for r in resources.resources if str(r.uri).startswith("everything+")), None)
        if uri:
            await step(f"resources/read {uri}", lambda: client.read_resource(uri), lambda r: len(r.contents) > 0)
        else:
            steps.append({"step": "resources/read", "ok": False, "ms": 0, "detail": "no everything+ resource"})
        prompts = await client.list_prompts()
        simple = next((p.name for p in prompts.prompts if p.name.endswith("simple-prompt")), None)
        if simple:
            await step(f"prompts/get {simple}", lambda: client.get_prompt(simple), lambda r: len(r.messages) > 0)
        else:
            steps.append({"step": "prompts/get", "ok": False, "ms": 0, "detail": "no simple-prompt listed"})
        await step(
            "tools/call memory__delete_entities",
            lambda: client.call_tool("memory__delete_entities", {"entityNames": ["mcpopt-demo"]}),
            lambda r: not r.is_error,
        )
    ok = all(s["ok"] for s in steps)
    if as_json:
        print(
            json.dumps(
                {"ok": ok, "startup_ms": round(started_ms, 1), "steady_call_ms": round(steady_ms, 3), "steps": steps},
                indent=2,
            )
        )
        return ok
    table = Table(title="mcpopt demo: one client session through the gateway")
    table.add_column("step")
    table.add_column("ok")
    table.add_column("ms", justify="right")
    table.add_column("result")
    for s in steps:
        table.add_row(s["step"], "[green]yes[/green]" if s["ok"] else "[red]NO[/red]", f"{s['ms']:.1f}", s["detail"])
    console.print(table)
    console.print(f"steady state: time__get_current_time through the gateway averaged {steady_ms:.2f} ms over 20 calls")
    console.print("[green]demo passed[/green]" if ok else "[red]demo FAILED[/red]")
    return ok


def _summary(result: Any) -> str:
    for attr in ("tools", "resources", "prompts"):
        if hasattr(result, attr) and not hasattr(result, "content"):
            items = getattr(result, attr)
            return f"{len(items)} {attr}: " + ", ".join(getattr(i, "name", "?") for i in items[:4]) + " ..."
    if hasattr(result, "contents"):
        c = result.contents[0]
        return f"{len(result.contents)} content(s), {str(getattr(c, 'uri', ''))}: " + str(getattr(c, "text", ""))[:80]
    if hasattr(result, "messages"):
        return f"{len(result.messages)} message(s)"
    return _text(result)
