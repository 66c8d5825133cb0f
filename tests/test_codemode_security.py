"""Code mode security, layer 1 alone: hostile code is contained with a clear error, on both
backends, and the gateway (and the sandbox) work normally right after.

The second layer (bubblewrap, seccomp, rlimits, cgroups) is switched off here
(`isolation.mode: off`), so every verdict is layer 1's own: monty's interpreter, and Pyodide
in Deno with deny-all permissions. tests/test_codemode_isolation.py proves layer 2 with layer 1
switched off. Each test runs on `monty` and `wasm`; the wasm tests share one warm Deno process
for the module (the time and memory tests kill it; it restarts in the background).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from mcp_types.version import LATEST_HANDSHAKE_VERSION

from conftest import everything_entry, filesystem_entry
from mcpopt.api import ClientLink, no_progress
from mcpopt.codemode.sandbox import CodeModeSettings
from mcpopt.codemode.tool import META_KEY, CodeModeTool
from mcpopt.codemode.wasm_backend import WasmBackend
from mcpopt.config import load_config
from mcpopt.gateway.assembly import build_gateway
from mcpopt.gateway.server import Gateway

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

LINK = ClientLink(LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: no_progress)
HAVE_WASM = (Path(__file__).resolve().parents[1] / "node_modules" / "pyodide" / "pyodide.mjs").is_file()
BACKENDS = [
    "monty",
    pytest.param("wasm", marks=pytest.mark.skipif(not HAVE_WASM, reason="npm pyodide not installed")),
]
# A generous wall-time limit: on a loaded machine a legitimate run (200,000 prints, a healthy
# check) must not turn into a TimeoutError. The wall-time test sets its own short limit.
SETTINGS = CodeModeSettings(
    timeout_ms=60_000, memory_mb=128, max_tool_calls=3, max_output_bytes=2000, isolation={"mode": "off"}
)
WALL_MS = 2000


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("codemode-sec").resolve()
    (base / "files").mkdir()
    return base


@pytest.fixture(scope="module")
async def gateway(folder: Path) -> Any:
    servers = {"everything": everything_entry(), "filesystem": filesystem_entry(folder / "files")}
    gw = build_gateway(load_config(data={"mcpServers": servers}))
    async with gw.running():
        yield gw


@pytest.fixture(scope="module")
async def code(gateway: Gateway) -> Any:
    tool = CodeModeTool(gateway, SETTINGS)
    yield tool
    await tool.aclose()


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def text(result: dict[str, Any]) -> str:
    return "".join(b.get("text", "") for b in result["content"])


async def run(code: CodeModeTool, source: str, backend: str) -> tuple[dict[str, Any], str]:
    result = await code.handler({"code": source, "backend": backend}, LINK)
    return result, text(result)


async def contained(code: CodeModeTool, gateway: Gateway, source: str, backend: str, *errors: str) -> str:
    """Run hostile `source`: it must fail with one of `errors` named; then all must still work."""
    result, body = await run(code, source, backend)
    assert result.get("isError"), body
    assert any(e in body for e in errors), body
    await healthy(code, gateway, backend)
    return body


async def healthy(code: CodeModeTool, gateway: Gateway, backend: str) -> None:
    direct = await gateway.call_tool({"name": "everything__echo", "arguments": {"message": "still here"}}, LINK)
    assert "still here" in text(direct)
    result, body = await run(code, "r = await tools.everything.echo(message='ok')\nr", backend)
    assert not result.get("isError"), body
    assert "ok" in body


@pytest.mark.parametrize("backend", BACKENDS)
async def test_read_etc_passwd(code: CodeModeTool, gateway: Gateway, backend: str) -> None:
    for source in ("open('/etc/passwd').read()", "from pathlib import Path\nPath('/etc/passwd').read_text()"):
        body = await contained(code, gateway, source, backend, "PermissionError", "FileNotFoundError")
        assert "root:" not in body


@pytest.mark.parametrize("backend", BACKENDS)
async def test_write_outside_the_scratch_area(code: CodeModeTool, gateway: Gateway, folder: Path, backend: str) -> None:
    target = folder / f"escaped-{backend}.txt"
    await contained(
        code, gateway, f"open({str(target)!r}, 'w').write('pwned')", backend, "PermissionError", "FileNotFoundError"
    )
    await contained(code, gateway, "open('/evil.txt', 'w').write('pwned')", backend, "PermissionError")
    assert _read(str(target)) is None
    # The scratch area works, and is the sandbox's own.
    source = "open('/tmp/scratch.txt', 'w').write('hi')\nopen('/tmp/scratch.txt').read()"
    result, body = await run(code, source, backend)
    assert not result.get("isError") and body == "hi", body
    assert _read("/tmp/scratch.txt") != "hi"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_open_a_socket(code: CodeModeTool, gateway: Gateway, backend: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        source = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}))\ns.sendall(b'x')"
        await contained(code, gateway, source, backend, "ModuleNotFoundError", "ImportError")
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing connected


@pytest.mark.parametrize("backend", BACKENDS)
async def test_spawn_a_process(code: CodeModeTool, gateway: Gateway, folder: Path, backend: str) -> None:
    marker = folder / f"spawned-{backend}"
    await contained(
        code,
        gateway,
        f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}])",
        backend,
        "ModuleNotFoundError",
        "ImportError",
    )
    await contained(code, gateway, f"import os\nos.system('touch {marker}')", backend, "AttributeError", "OSError")
    assert _read(str(marker)) is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("module", ["subprocess", "ctypes", "socket"])
async def test_dangerous_imports(code: CodeModeTool, gateway: Gateway, backend: str, module: str) -> None:
    body = await contained(code, gateway, f"import {module}", backend, "ModuleNotFoundError", "ImportError")
    assert module in body


@pytest.mark.parametrize("backend", BACKENDS)
async def test_import_os_reaches_no_host_state(
    code: CodeModeTool, gateway: Gateway, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`os` imports (a sandboxed one), but host environment, processes and files stay out of reach."""
    monkeypatch.setenv("MCPOPT_TEST_SECRET", "s3cret-value")
    result, body = await run(code, "import os\nprint(os.environ.get('MCPOPT_TEST_SECRET'))", backend)
    assert "s3cret-value" not in body
    assert result.get("isError") or body == "None", body
    await contained(code, gateway, "import os\nos.listdir('/etc')", backend, "PermissionError", "FileNotFoundError")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_recursion_bomb(code: CodeModeTool, gateway: Gateway, backend: str) -> None:
    await contained(code, gateway, "def f(n):\n    return f(n + 1)\nf(0)", backend, "RecursionError")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_huge_output_is_capped(code: CodeModeTool, gateway: Gateway, backend: str) -> None:
    result, body = await run(code, "for i in range(200000):\n    print('x' * 50)", backend)
    assert not result.get("isError"), body[-300:]
    assert len(body.encode()) < SETTINGS.max_output_bytes + 300
    assert "[mcpopt: output cut at 2,000 bytes; 10,198,000 bytes left out" in body
    big, body = await run(code, "'y' * 5_000_000", backend)
    assert len(body.encode()) < SETTINGS.max_output_bytes + 300 and "output cut" in body
    await healthy(code, gateway, backend)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_more_tool_calls_than_allowed(code: CodeModeTool, gateway: Gateway, backend: str) -> None:
    source = "for i in range(10):\n    await tools.everything.echo(message=str(i))"
    result, body = await run(code, source, backend)
    assert result.get("isError") and "tool call limit reached: at most 3 tool calls" in body, body
    assert result["_meta"][META_KEY]["tool_calls"] == 3
    # Catching the error does not get around the limit.
    sneaky = (
        "for i in range(10):\n"
        "    try:\n"
        "        await tools.everything.echo(message='x')\n"
        "    except RuntimeError:\n"
        "        pass\n"
        "'fine'"
    )
    result, body = await run(code, sneaky, backend)
    assert result.get("isError") and "ToolCallLimit" in body, body
    await healthy(code, gateway, backend)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_infinite_loop_hits_the_wall_time_limit(code: CodeModeTool, gateway: Gateway, backend: str) -> None:
    code.settings = SETTINGS.model_copy(update={"timeout_ms": WALL_MS})  # for this execution only
    try:
        result, body = await run(code, "while True:\n    pass", backend)
    finally:
        code.settings = SETTINGS
    assert result.get("isError") and "TimeoutError" in body and f"{WALL_MS} ms" in body, body
    # Stopped by the limit, not by anything slower (the bound leaves room for a loaded machine).
    assert result["_meta"][META_KEY]["duration_ms"] < WALL_MS + 30_000
    await healthy(code, gateway, backend)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_memory_bomb(code: CodeModeTool, gateway: Gateway, backend: str) -> None:
    source = "chunks = []\nwhile True:\n    chunks.append('m' * 1_000_000 + str(len(chunks)))"
    await contained(code, gateway, source, backend, "MemoryError")


@pytest.mark.skipif(not HAVE_WASM, reason="npm pyodide not installed")
async def test_wasm_past_the_import_guard_deno_permissions_hold(code: CodeModeTool, gateway: Gateway) -> None:
    """Even with the import guard switched off, Deno denies files, environment, processes and network."""
    prefix = "globals().pop('__mcpopt_sandbox__', None)\nimport js\n"
    for call in (
        "js.Deno.readTextFileSync('/etc/passwd')",
        "js.Deno.env.get('HOME')",
        "js.Deno.Command.new('/bin/sh').outputSync()",
        "js.Deno.writeTextFileSync('/tmp/mcpopt-deno-escape.txt', 'x')",
        "await js.fetch('http://127.0.0.1:8080/')",
    ):
        body = await contained(code, gateway, prefix + call, "wasm", "NotCapable", "PermissionDenied", "Requires")
        assert "root:" not in body
    assert _read("/tmp/mcpopt-deno-escape.txt") is None


async def test_layer_2_is_off_in_this_module(code: CodeModeTool) -> None:
    result, _ = await run(code, "1", "monty")
    assert result["_meta"][META_KEY]["layers"]["layer2"]["active"] is False


@pytest.mark.skipif(not HAVE_WASM, reason="npm pyodide not installed")
def test_wasm_deno_command_line_grants_only_pyodide_reads() -> None:
    cmd = WasmBackend(SETTINGS).command()
    allow = [c for c in cmd if c.startswith("--allow")]
    assert len(allow) == 1 and allow[0].startswith("--allow-read=") and allow[0].endswith("node_modules/pyodide")
    for flag in ("--no-prompt", "--deny-net", "--deny-env", "--deny-run", "--deny-ffi", "--deny-sys", "--deny-write"):
        assert flag in cmd
