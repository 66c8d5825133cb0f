"""Start small (issue 17, item 5): the demo gateway loads what search, code mode, rate limits,
authentication and the telemetry sinks need only when they are first used.

The gateway is the real `mcpopt serve -c examples/demo.yaml` over its five real servers, run with
`python -X importtime`, which writes every module the process imports to stderr as it is
imported: whatever it printed once the servers are up (and, over stdio, once a client has
initialized and listed tools) is what it loaded before the first call.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.yaml"

HEAVY = (
    "numpy",  # search's dense vectors and BM25 arrays
    "bm25s",
    "tokenizers",  # the WordLlama embedder
    "safetensors",
    "mcpopt.discovery.index",
    "mcpopt.discovery.embed",
    "jwt",  # inbound authentication (PyJWT, cryptography's x509)
    "cryptography.x509",
    "limits",  # rate limits
    "prometheus_client",  # the /metrics exposition, loaded at the first scrape
    "opentelemetry.sdk",  # the OTLP sink
    "opentelemetry.exporter",
    "redis",
)


def _imported(stderr: str) -> set[str]:
    """Module names from `-X importtime` lines (`import time: self | cumulative | name`)."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                names.add(name)
    return names


def _heavy(names: set[str]) -> list[str]:
    return sorted(n for n in names for h in HEAVY if n == h or n.startswith(h + "."))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(log: Path, *args: str, stdin: int | None = None) -> subprocess.Popen[bytes]:
    # stderr goes to a file: the importtime lines overflow a pipe nobody reads while serving.
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "mcpopt.cli", "serve", "-c", str(DEMO), *args],
            cwd=ROOT,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
        )


def _stop(proc: subprocess.Popen[bytes], log: Path) -> str:
    proc.terminate()
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    return log.read_text("utf-8", "replace")


@pytest.mark.skipif(not (ROOT / ".servers" / "py" / "bin" / "mcp-server-time").exists(), reason="servers not set up")
def test_demo_gateway_over_http_loads_no_heavy_module_before_the_first_call(tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "stderr.txt"
    proc = _serve(log, "-t", "http", "--port", str(port))
    try:
        deadline = time.monotonic() + 120
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    ready = json.loads(r.read())
                if ready.get("ok"):
                    break
            except OSError:
                pass
            time.sleep(0.2)  # polling an HTTP endpoint for readiness, not a synchronization guess
        assert ready is not None and ready["ok"], ready
    finally:
        err = _stop(proc, log)
    names = _imported(err)
    assert "mcpopt.gateway.http_front" in names, "importtime output not captured"
    assert _heavy(names) == []


@pytest.mark.skipif(not (ROOT / ".servers" / "py" / "bin" / "mcp-server-time").exists(), reason="servers not set up")
def test_demo_gateway_over_stdio_loads_no_heavy_module_before_the_first_call(tmp_path: Path) -> None:
    log = tmp_path / "stderr.txt"
    proc = _serve(log, stdin=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:

        def rpc(message: dict[str, object]) -> dict[str, object] | None:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            proc.stdin.flush()
            return json.loads(proc.stdout.readline()) if "id" in message else None

        init = rpc(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "1"},
                },
            }
        )
        assert init is not None and "result" in init, init
        rpc({"jsonrpc": "2.0", "method": "notifications/initialized"})
        listed = rpc({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        assert listed is not None
        tools = listed["result"]["tools"]  # type: ignore[index]
        assert any(t["name"] == "time__get_current_time" for t in tools)  # the servers are up
    finally:
        err = _stop(proc, log)
    names = _imported(err)
    assert "mcpopt.gateway.front" in names, "importtime output not captured"
    assert _heavy(names) == []


def test_prometheus_client_loads_at_the_first_scrape() -> None:
    code = (
        "import sys\n"
        "from types import SimpleNamespace as NS\n"
        "from mcpopt.monitor.prom import PrometheusMetrics\n"
        "from mcpopt.telemetry.record import CallRecord\n"
        "hub = NS(filter=NS(inflight=0), monitor=NS(alerts=NS(active=lambda: []), "
        "summary=lambda: {'overall': {'grade': None}, 'tools': []}), upstream_health=lambda: [], "
        "dropped=lambda: {}, access_stats=lambda: {}, process_pending=lambda *a: 0)\n"
        "m = PrometheusMetrics(hub)\n"
        "before = 'prometheus_client' in sys.modules\n"
        "text = m.render().decode()\n"
        "print(before, 'prometheus_client' in sys.modules, 'mcpopt_inflight_calls 0.0' in text)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "True", "True"], out.stderr
