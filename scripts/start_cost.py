#!/usr/bin/env python3
"""What a gateway costs before its first call, and what each lazily loaded part adds.

Usage (from the repo root): .venv/bin/python scripts/start_cost.py [--config examples/demo.yaml]

1. Starts `mcpopt serve -c CONFIG` (stdio), waits until every upstream server process is up and
   the gateway's CPU is idle, and prints its resident memory (RSS and USS, psutil) before any
   request; then after `initialize` + `tools/list`, and after one `tools/call` of the first tool
   listed that takes no required argument.
2. For each part the gateway loads only on first use, a fresh interpreter that has imported the
   gateway as `mcpopt serve` does loads that part, and the RSS it adds and the wall time it took
   are printed (the SDK alone, `import mcp.server.lowlevel`, is printed as the floor).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
CATALOG = ROOT.parent / "shared" / "datasets" / "livemcpbench" / "tools.json"

PARTS = {
    "tool search, lexical (numpy, the BM25 index code)": "import mcpopt.discovery.index",
    "tool search, hybrid: WordLlama loaded and a 527-tool index built": (
        f"from mcpopt.discovery.eval import load_catalog, build_index; build_index(load_catalog({str(CATALOG)!r}))"
    ),
    "telemetry OTLP sink (opentelemetry-sdk, OTLP/HTTP exporters)": (
        "import opentelemetry.sdk.trace, opentelemetry.sdk.metrics, "
        "opentelemetry.exporter.otlp.proto.http.trace_exporter, opentelemetry.exporter.otlp.proto.http.metric_exporter"
    ),
    "Prometheus exposition, first /metrics scrape (prometheus-client)": "import mcpopt.monitor.exposition",
    "inbound authentication (PyJWT, cryptography x509)": "import mcpopt.auth.tokens",
    "rate limits (limits)": "import limits, limits.aio.strategies, limits.storage",
}


def rss(proc: psutil.Process) -> str:
    m = proc.memory_full_info()
    return f"RSS {m.rss / 2**20:.1f} MiB (USS {m.uss / 2**20:.1f} MiB)"


def serve(config: str) -> None:
    exe = str(Path(sys.executable).parent / "mcpopt")
    p = subprocess.Popen(
        [exe, "serve", "-c", config], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert p.stdin is not None and p.stdout is not None
    proc = psutil.Process(p.pid)
    servers = len(_load_servers(config))
    last = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        c = proc.cpu_times()
        cpu = c.user + c.system
        if len(proc.children(recursive=True)) >= servers and last is not None and cpu - last < 0.01:
            break
        last = cpu
        time.sleep(1.0)
    print(f"mcpopt serve -c {config}: {servers} servers up, before any request: {rss(proc)}")

    def rpc(message: dict[str, object]) -> dict[str, object] | None:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(json.dumps(message).encode() + b"\n")
        p.stdin.flush()
        return json.loads(p.stdout.readline()) if "id" in message else None

    info = {"name": "start_cost", "version": "1"}
    rpc(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": info},
        }
    )
    rpc({"jsonrpc": "2.0", "method": "notifications/initialized"})
    listed = rpc({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    tools = listed["result"]["tools"] if listed else []  # type: ignore[index]
    print(f"after initialize + tools/list ({len(tools)} tools): {rss(proc)}")
    free = [t for t in tools if not t.get("inputSchema", {}).get("required")]
    if free:
        rpc({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": free[0]["name"], "arguments": {}}})
        print(f"after one tools/call ({free[0]['name']}): {rss(proc)}")
    p.stdin.close()
    p.terminate()
    p.wait(30)


def _load_servers(config: str) -> dict[str, object]:
    sys.path.insert(0, str(ROOT / "src"))
    from mcpopt.config import load_config

    return dict(load_config(str(ROOT / config)).mcpServers)


def parts() -> None:
    floor = "import psutil; p = psutil.Process(); import mcp.server.lowlevel; print(p.memory_info().rss)"
    out = subprocess.run([sys.executable, "-c", floor], capture_output=True, text=True, check=True, cwd=ROOT)
    print(f"the SDK alone (import mcp.server.lowlevel): RSS {int(out.stdout) / 2**20:.1f} MiB")
    base = (
        "import gc, time, psutil; p = psutil.Process()\n"
        "import mcpopt.cli, mcpopt.gateway.assembly, mcpopt.gateway.front\n"
        "gc.collect(); a = p.memory_info().rss; t = time.perf_counter()\n"
    )
    for label, code in PARTS.items():
        prog = base + code + "\nprint((p.memory_info().rss - a) / 2**20, (time.perf_counter() - t) * 1000)"
        r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            print(f"{label}: not measured ({r.stderr.strip().splitlines()[-1]})")
            continue
        mib, ms = (float(x) for x in r.stdout.split())
        print(f"{label}: +{mib:.1f} MiB, {ms:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="examples/demo.yaml")
    a = ap.parse_args()
    serve(a.config)
    parts()


if __name__ == "__main__":
    main()
