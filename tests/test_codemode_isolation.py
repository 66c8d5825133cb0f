"""The second sandbox layer on its own: with layer 1 switched off, escapes still fail at layer 2.

Layer 2 is bubblewrap (user, network, PID, mount, IPC, UTS namespaces; a read-only root with
only /usr and the runtime's files; a tmpfs /scratch), a seccomp filter (no new processes),
rlimits (CPU, files, address space) and cgroups. Layer 1 alone is proven by
tests/test_codemode_security.py (run there with `isolation.mode: off`).

- monty: its interpreter cannot be made to run host code, so hostile *native* code (CPython)
  runs in exactly the wrapper the pool's workers get (`MontyBackend.layer2_command`); and the
  real worker runs with monty's own time and memory limits off, so only layer 2 stops bombs.
- wasm: Deno with `--allow-all` and the in-sandbox guards and memory watcher off
  (`WasmBackend(layer1=False)`): Python reaches Deno's file, network and process APIs through
  `js`, and only layer 2 is in the way.

Verdicts are outcomes (an error, a file that does not exist, a connection never accepted, a
process killed), never timings; the CPU bombs stop on CPU seconds used, however loaded the
machine is (generous wall-clock guards only).
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from mcp_types.version import LATEST_HANDSHAKE_VERSION

from conftest import ROOT, everything_entry
from mcpopt.api import ClientLink, no_progress
from mcpopt.codemode.capabilities import sandbox_report
from mcpopt.codemode.isolation import IsolationSettings, probe, seccomp_program
from mcpopt.codemode.monty_backend import MontyBackend
from mcpopt.codemode.sandbox import CodeModeSettings
from mcpopt.codemode.tool import META_KEY, CodeModeTool
from mcpopt.codemode.wasm_backend import WasmBackend
from mcpopt.config import load_config
from mcpopt.gateway.assembly import build_gateway
from mcpopt.gateway.server import Gateway

FOUND = probe()
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.integration,
    pytest.mark.skipif(not FOUND.works, reason=f"layer 2 unavailable here: {FOUND.reason}"),
]
HAVE_WASM = (ROOT / "node_modules" / "pyodide" / "pyodide.mjs").is_file()
LINK = ClientLink(LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: no_progress)
PY = "/usr/bin/python3"


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("layer2").resolve()
    (base / "secret.txt").write_text("the host's secret", encoding="utf-8")
    base.chmod(0o755)
    (base / "secret.txt").chmod(0o644)  # readable by anyone on the host: only the mount namespace hides it
    return base


@pytest.fixture()
def listener() -> Any:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        sock.setblocking(False)
        yield sock


def nothing_connected(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return True
    return False


# ---- monty: native code in the workers' wrapper ---------------------------------------------
@pytest.fixture(scope="module")
async def monty() -> Any:
    be = MontyBackend(CodeModeSettings(memory_mb=128, isolation=IsolationSettings(mode="bwrap", cpu_s=3)))
    await be.start()
    yield be
    await be.aclose()


def native(be: MontyBackend, code: str) -> subprocess.CompletedProcess[str]:
    argv, env = be.layer2_command([PY, "-c", code])
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


async def test_monty_layer2_hides_host_files_and_keeps_the_root_read_only(monty: MontyBackend, host: Path) -> None:
    res = native(
        monty,
        "import os\n"
        f"for p in ({str(host / 'secret.txt')!r}, '/etc/passwd', '/root', '/work'):\n"
        "    print(p, os.path.exists(p))\n"
        "for p in ('/usr/evil', '/evil', " + repr(str(host / "escaped.txt")) + "):\n"
        "    try:\n        open(p, 'w').write('x'); print('WROTE', p)\n"
        "    except OSError as e:\n        print('refused', p, e.errno)\n"
        "open('/scratch/ok', 'w').write('fine'); print('scratch', open('/scratch/ok').read())",
    )
    assert res.returncode == 0, res.stderr
    assert "True" not in res.stdout and "WROTE" not in res.stdout and "scratch fine" in res.stdout, res.stdout
    assert not (host / "escaped.txt").exists()


async def test_monty_layer2_has_no_network(monty: MontyBackend, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    res = native(
        monty,
        "import socket\ntry:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=5); print('CONNECTED')\n"
        "except OSError as e:\n    print('refused', type(e).__name__)",
    )
    assert "refused ConnectionRefusedError" in res.stdout, res.stdout + res.stderr
    assert nothing_connected(listener)


async def test_monty_layer2_spawns_no_process(monty: MontyBackend, host: Path) -> None:
    marker = host / "spawned-monty"
    res = native(
        monty,
        "import os, subprocess\n"
        "for f in (lambda: os.fork(), lambda: subprocess.run(['/usr/bin/touch', " + repr(str(marker)) + "])):\n"
        "    try:\n        f(); print('SPAWNED')\n"
        "    except OSError as e:\n        print('refused', e.errno)",
    )
    assert res.stdout.count("refused 1") == 2, res.stdout + res.stderr  # EPERM from seccomp
    assert not marker.exists()


async def test_monty_layer2_stops_memory_and_cpu_bombs(monty: MontyBackend) -> None:
    mem = native(monty, "x = []\nwhile True:\n    x.append(bytearray(16 * 1024 * 1024))")
    assert mem.returncode != 0 and ("MemoryError" in mem.stderr or mem.returncode == 137), (mem.returncode, mem.stderr)
    cpu = native(monty, "while True:\n    pass")
    assert cpu.returncode == 137  # RLIMIT_CPU (3 CPU seconds): SIGKILL


async def test_the_real_monty_worker_without_its_own_limits_is_stopped_by_layer2() -> None:
    settings = CodeModeSettings(timeout_ms=600_000, memory_mb=128, isolation=IsolationSettings(mode="bwrap", cpu_s=3))
    be = MontyBackend(settings, layer1=False)

    async def bridge(name: str, arguments: dict[str, Any]) -> Any:
        raise AssertionError("no tool calls here")

    try:
        mem = await be.execute("x = []\nwhile True:\n    x.append('m' * 10_000_000)", "", bridge, settings)
        assert not mem.ok and mem.error_type == "SandboxCrashed" and "layer-2 limit" in (mem.error or ""), mem
        cpu = await be.execute("i = 0\nwhile True:\n    i += 1", "", bridge, settings)
        assert not cpu.ok and cpu.error_type == "SandboxCrashed" and "layer-2 limit" in (cpu.error or ""), cpu
        fine = await be.execute("1 + 1", "", bridge, settings)  # the pool replaced the worker
        assert fine.ok and fine.value == 2
    finally:
        await be.aclose()


# ---- wasm: Deno with every permission, guards off ----------------------------------------------
wasm = pytest.mark.skipif(not HAVE_WASM, reason="npm pyodide missing")


@pytest.fixture(scope="module")
async def gateway() -> Any:
    gw = build_gateway(load_config(data={"mcpServers": {"everything": everything_entry()}}))
    async with gw.running():
        yield gw


def unguarded(gateway: Gateway, **isolation: Any) -> CodeModeTool:
    settings = CodeModeSettings(
        timeout_ms=600_000,
        memory_mb=128,
        sessions={"enabled": False},
        isolation=IsolationSettings(mode="bwrap", **isolation),
    )
    tool = CodeModeTool(gateway, settings)
    tool._backends["wasm"] = WasmBackend(settings, layer1=False)  # noqa: SLF001 - the test-only backend
    return tool


def text(result: dict[str, Any]) -> str:
    return "".join(b.get("text", "") for b in result["content"])


async def js(tool: CodeModeTool, code: str) -> dict[str, Any]:
    return await tool.handler({"code": "import js\nfrom pyodide.ffi import to_js\n" + code, "backend": "wasm"}, LINK)


@wasm
async def test_wasm_layer2_holds_files_network_and_processes(
    gateway: Gateway, host: Path, listener: socket.socket
) -> None:
    tool = unguarded(gateway)
    try:
        layers = (await js(tool, "1"))["_meta"][META_KEY]["layers"]
        assert layers["layer1"].startswith("DISABLED") and layers["layer2"]["active"] is True
        # Layer 1 is really off: Deno reads and runs what layer 2 lets it.
        assert text(await js(tool, "js.Deno.readTextFileSync('/usr/lib/os-release')[:5]")) != ""
        secret = await js(tool, f"js.Deno.readTextFileSync({str(host / 'secret.txt')!r})")
        assert secret.get("isError") and "NotFound" in text(secret) and "the host's secret" not in text(secret)
        for target in (str(host / "escaped-wasm.txt"), "/usr/evil.txt"):
            wrote = await js(tool, f"js.Deno.writeTextFileSync({target!r}, 'x')")
            assert wrote.get("isError"), text(wrote)
        assert not (host / "escaped-wasm.txt").exists()
        port = listener.getsockname()[1]
        where = f"to_js({{'hostname': '127.0.0.1', 'port': {port}}}, dict_converter=js.Object.fromEntries)"
        net = await js(tool, f"await js.Deno.connect({where})")
        assert net.get("isError") and "ConnectionRefused" in text(net), text(net)
        fetched = await js(tool, f"await js.fetch('http://127.0.0.1:{port}/')")
        assert fetched.get("isError") and "fetch failed" in text(fetched), text(fetched)
        assert nothing_connected(listener)
        marker = host / "spawned-wasm"
        spawn = await js(
            tool,
            "opts = to_js({'args': [" + repr(str(marker)) + "]}, dict_converter=js.Object.fromEntries)\n"
            "js.Deno.Command.new('/usr/bin/touch', opts).outputSync()",
        )
        assert spawn.get("isError") and "not permitted" in text(spawn).lower(), text(spawn)
        assert not marker.exists()
    finally:
        await tool.aclose()


@wasm
async def test_wasm_layer2_stops_a_memory_bomb(gateway: Gateway) -> None:
    tool = unguarded(gateway)
    try:
        bomb = await js(tool, "chunks = []\nwhile True:\n    chunks.append(bytearray(8_000_000))")
        assert bomb.get("isError") and "SandboxCrashed" in text(bomb) and "memory cgroup" in text(bomb), text(bomb)
        assert text(await js(tool, "6 * 7")) == "42"  # a fresh interpreter serves the next call
    finally:
        await tool.aclose()


@wasm
@pytest.mark.timeout(600)
async def test_wasm_layer2_stops_a_cpu_bomb(gateway: Gateway) -> None:
    tool = unguarded(gateway, cpu_s=12)  # Deno needs ~4-5 CPU seconds to load Pyodide
    try:
        bomb = await js(tool, "i = 0\nwhile True:\n    i += 1")
        assert bomb.get("isError") and "SandboxCrashed" in text(bomb) and "layer-2 limit" in text(bomb), text(bomb)
    finally:
        await tool.aclose()


# ---- what is reported ------------------------------------------------------------------------
def test_the_machine_report_names_every_part() -> None:
    report = sandbox_report(CodeModeSettings())
    layer2 = report["layer2"]
    assert layer2["works"] and layer2["active"] and layer2["bwrap_version"]
    assert layer2["seccomp"] is (seccomp_program() is not None)
    assert report["backends"]["monty"]["available"]
    if HAVE_WASM:
        assert report["backends"]["wasm"]["available"] and report["backends"]["wasm"]["pyodide_version"]


def test_mode_bwrap_fails_clearly_where_bubblewrap_is_missing() -> None:
    from mcpopt.codemode.isolation import Isolation, Probe
    from mcpopt.codemode.sandbox import SandboxUnavailable

    missing = Probe(reason="bubblewrap is not installed (Debian: apt-get install bubblewrap)")
    with pytest.raises(SandboxUnavailable, match="isolation.mode is 'bwrap' but bubblewrap is not installed"):
        Isolation(IsolationSettings(mode="bwrap"), missing)
    auto = Isolation(IsolationSettings(mode="auto"), missing)
    assert not auto.active and auto.report().reason == missing.reason
