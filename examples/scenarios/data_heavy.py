"""The data-heavy scenario of the token ledger: direct tool calls vs code mode, on real servers.

Starts a gateway in-process over server-filesystem and server-memory (from node_modules), writes
a ~2 MB log with a few ERROR lines into a temporary folder, does the task both ways and prints
the tokens that would enter the model's context (definitions + arguments + results).

    python examples/scenarios/data_heavy.py [--size BYTES] [--backend monty|wasm] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

from mcpopt.bench.data_heavy import ScenarioReport, data_heavy
from mcpopt.codemode.sandbox import CodeModeSettings
from mcpopt.codemode.tool import CodeModeTool
from mcpopt.config import load_config
from mcpopt.gateway.assembly import build_gateway

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ROOT / "node_modules" / "@modelcontextprotocol"


async def run(folder: Path, size: int, backend: str) -> ScenarioReport:
    """Start the gateway over the real servers (files in `folder`) and run the scenario."""
    servers = {
        "filesystem": {"command": "node", "args": [str(SERVERS / "server-filesystem/dist/index.js"), str(folder)]},
        "memory": {
            "command": "node",
            "args": [str(SERVERS / "server-memory/dist/index.js")],
            "env": {"MEMORY_FILE_PATH": str(folder / "memory.jsonl")},
        },
        "everything": {"command": "node", "args": [str(SERVERS / "server-everything/dist/index.js"), "stdio"]},
    }
    gateway = build_gateway(load_config(data={"mcpServers": servers}))
    async with gateway.running():
        tool = CodeModeTool(gateway, CodeModeSettings(backend=backend, timeout_ms=30_000))
        try:
            return await data_heavy(gateway, tool, folder, size_bytes=size)
        finally:
            await tool.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", type=int, default=2_000_000, help="log file size in bytes")
    ap.add_argument("--backend", choices=["monty", "wasm"], default="monty")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mcpopt-scenario-") as tmp:
        report = asyncio.run(run(Path(tmp).resolve(), opts.size, opts.backend))
    if opts.json:
        print(json.dumps(report.as_dict(), indent=2))
        return
    print(f"log: {report.file_bytes:,} bytes, {report.matching_lines} matching lines")
    for label, ledger in (("direct tool calls", report.direct), ("code mode", report.code)):
        print(
            f"{label:>18}: {ledger.total:>9,} tokens  (definitions {ledger.definitions:,}, "
            f"arguments {ledger.arguments:,}, results {ledger.results:,}; {ledger.calls} calls)"
        )
    print(f"{'saving':>18}: {report.saving_pct:.1f}% fewer context tokens in code mode")
    print(f"code mode output:\n{report.code_output}")


if __name__ == "__main__":
    main()
