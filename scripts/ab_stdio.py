#!/usr/bin/env python3
"""A/B over stdio: the bare relay and `mcpopt serve` from several checkouts, alternating, lean client.

Usage (from the repo root):
    .venv/bin/python scripts/ab_stdio.py CALLS PYTHON [PYTHON ...]

Each PYTHON is the interpreter of a venv with an mcpopt installed (e.g. another worktree's
`.venv/bin/python`); each serves `mcp-server-time` with telemetry at `standard`. All connections stay
open; after one warm-up round the paths alternate in rounds of 50 calls, order rotated
(`mcpopt.bench.lean_ab`). Prints per path wall p50/p99 (ms) and the CPU (user + system, all
threads) its own process spent per timed call (us).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from mcpopt.bench import lean_ab  # noqa: E402


async def main() -> None:
    calls, pythons = int(sys.argv[1]), sys.argv[2:]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = {"relay": lean_ab.relay()}
        for i, py in enumerate(pythons):
            paths[f"mcpopt {i}: {py}"] = lean_ab.serve(py, tmp / f"c{i}.json", tmp / f"d{i}")
        lean_ab.show(await lean_ab.compare(paths, calls))


if __name__ == "__main__":
    asyncio.run(main())
