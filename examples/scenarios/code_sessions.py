"""A multi-step data task in three execute_code calls: tokens and wall time with code sessions vs without.

Starts a gateway in-process over server-filesystem and server-memory (from node_modules), writes
a ~1 MB order log into a temporary folder, and does the task (look -> filter -> store) three ways,
alternating, after a warm-up round (see `mcpopt.bench.code_sessions`).

    python examples/scenarios/code_sessions.py [--rounds N] [--backend monty|wasm] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from mcpopt.bench.code_sessions import compare
from mcpopt.config import load_config
from mcpopt.gateway.assembly import build_gateway

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ROOT / "node_modules" / "@modelcontextprotocol"


async def run(folder: Path, rounds: int, backend: str) -> dict[str, Any]:
    servers = {
        "filesystem": {"command": "node", "args": [str(SERVERS / "server-filesystem/dist/index.js"), str(folder)]},
        "memory": {
            "command": "node",
            "args": [str(SERVERS / "server-memory/dist/index.js")],
            "env": {"MEMORY_FILE_PATH": str(folder / "memory.jsonl")},
            "max_concurrency": 1,  # server-memory loses concurrent writes by itself
        },
    }
    config = {"mcpServers": servers, "gateway": {"telemetry": {"data_dir": str(folder / "data")}}}
    gateway = build_gateway(load_config(data=config))
    async with gateway.running():
        return await compare(gateway, folder, rounds=rounds, backend=backend)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds per way (after one warm-up)")
    ap.add_argument("--backend", choices=["monty", "wasm"], default="monty")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mcpopt-sessions-") as tmp:
        report = asyncio.run(run(Path(tmp).resolve(), opts.rounds, opts.backend))
    if opts.json:
        print(json.dumps(report, indent=2))
        return
    log = report["log"]
    print(
        f"order log: {log['bytes']:,} bytes, {log['lines']:,} lines; backend {report['backend']}; "
        f"{report['rounds']} rounds per way, alternating, after a warm-up"
    )
    print(f"tool definitions (both ways): {report['definitions_tokens']:,} tokens")
    print(
        f"{'':>18} {'tokens':>8} {'(code':>7} {'results)':>9} {'tool calls':>11} {'bytes read':>11} "
        f"{'p50 ms':>8} {'p95 ms':>8}"
    )
    for way in ("with_sessions", "without_sessions", "through_the_model"):
        s = report[way]
        print(
            f"{way.replace('_', ' '):>18} {s['total']:>8,} {s['arguments']:>7,} {s['results']:>9,} "
            f"{s['tool_calls']:>11} {s['upstream_bytes_read']:>11,} {s['ms_p50']:>8.1f} {s['ms_p95']:>8.1f}"
        )
    opened = report["with_sessions"]["open_ms_p50"], report["without_sessions"]["open_ms_p50"]
    print(
        f"opening a new conversation (untimed above): {opened[0]:.1f} ms with sessions, {opened[1]:.1f} without (p50)"
    )
    for way, ratio in report["ratio"].items():
        name = way.replace("_", " ")
        print(f"{name} / with sessions: {ratio['tokens']}x the tokens, {ratio['wall_p50']}x the wall time")
    print("last call's output:", report["with_sessions"]["output"][-1].strip())


if __name__ == "__main__":
    main()
