"""Shared helpers: paths to the real upstream servers, config writers, gateway launchers, psutil."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
import yaml
from mcp import Client, StdioServerParameters

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MCPOPT = str(BIN / "mcpopt")
PY_SERVERS = ROOT / ".servers" / "py" / "bin"
NODE_MODULES = ROOT / "node_modules" / "@modelcontextprotocol"
FAKE = str(Path(__file__).resolve().parent / "fixtures" / "fake_upstream.py")

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session", autouse=True)
def _private_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Gateways started by the tests keep telemetry and rules in a temporary XDG data dir (subprocesses
    inherit it), never in the user's own `~/.local/share/mcpopt`."""
    old = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg-data"))
    yield
    if old is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = old


# ---- upstream entries (absolute paths, so the gateway can run from any cwd) ----------------
def time_entry(**extra: Any) -> dict[str, Any]:
    return {"command": str(PY_SERVERS / "mcp-server-time"), "args": ["--local-timezone", "UTC"], **extra}


def git_entry(repo: Path = ROOT) -> dict[str, Any]:
    return {"command": str(PY_SERVERS / "mcp-server-git"), "args": ["--repository", str(repo)]}


def node_entry(package: str, *args: str, **extra: Any) -> dict[str, Any]:
    return {"command": "node", "args": [str(NODE_MODULES / package / "dist" / "index.js"), *args], **extra}


def everything_entry() -> dict[str, Any]:
    return node_entry("server-everything", "stdio")


def filesystem_entry(folder: Path) -> dict[str, Any]:
    return node_entry("server-filesystem", str(folder))


def memory_entry(memory_file: Path) -> dict[str, Any]:
    return node_entry("server-memory", env={"MEMORY_FILE_PATH": str(memory_file)})


def fake_entry(**extra: Any) -> dict[str, Any]:
    return {"command": sys.executable, "args": [FAKE], **extra}


def write_config(path: Path, servers: dict[str, Any], gateway: dict[str, Any] | None = None) -> Path:
    data: dict[str, Any] = {"mcpServers": servers}
    if gateway:
        data["gateway"] = gateway
    if path.suffix == ".json":
        path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def gateway_params(config: Path, *extra_args: str, env: dict[str, str] | None = None) -> StdioServerParameters:
    # The SDK passes a stdio server only a few variables of ours: carry the private data dir along.
    private = {"XDG_DATA_HOME": os.environ["XDG_DATA_HOME"]} if "XDG_DATA_HOME" in os.environ else {}
    return StdioServerParameters(
        command=MCPOPT, args=["serve", "-c", str(config), *extra_args], cwd=str(ROOT), env={**private, **(env or {})}
    )


def gateway_client(config: Path, mode: str = "auto", **kwargs: Any) -> Client:
    return Client(gateway_params(config), mode=mode, **kwargs)


# ---- processes -----------------------------------------------------------------------------
def find_gateway(config: Path, timeout: float = 30.0) -> psutil.Process:
    """The `mcpopt serve -c <config>` process among this test process's descendants."""
    deadline = time.monotonic() + timeout
    while True:
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmd = proc.cmdline()
                if "serve" in cmd and str(config) in cmd:
                    return proc
        if time.monotonic() > deadline:
            raise AssertionError(f"no gateway process for {config}")
        time.sleep(0.05)


def descendants(proc: psutil.Process) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return proc.children(recursive=True)
    return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def wait_dead(procs: list[psutil.Process], timeout: float = 30.0) -> list[psutil.Process]:
    """Poll until every process is gone (or a zombie); return the survivors."""
    deadline = time.monotonic() + timeout
    while (left := alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid}: {' '.join(p.cmdline())[:150]}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Wait until the gateway's HTTP front accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-2000:] if proc.stderr else "(its stderr went to a log file)"
            raise AssertionError(f"gateway exited early with {proc.returncode}: {err}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"gateway did not listen on {port} within {timeout} s")


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL `proc` and its descendants (a gateway and its upstreams) if it still runs; the
    caller waits for it."""
    if proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
        proc.kill()


@contextlib.contextmanager
def popen_gateway(config: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [MCPOPT, "serve", "-c", str(config), *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(ROOT),
    )
    try:
        yield proc
    finally:
        kill_tree(proc)
        proc.wait(5)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream:
                stream.close()


@contextlib.contextmanager
def http_gateway(
    config: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    files: int | None = None,
    log: Path | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`mcpopt serve -t http` on a free port; yields (process, port) once it listens.

    Args:
        extra: more `serve` arguments. env: added to the environment. files: a hard limit on its
            open descriptors (RLIMIT_NOFILE). log: where its stderr goes (kept for a failing test's
            report); None: a pipe, closed at the end.
    On exit its process tree is killed."""
    port = free_port()
    sink = log.open("wb") if log is not None else None
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))) if files else None
    proc = subprocess.Popen(
        [MCPOPT, "serve", "-c", str(config), "-t", "http", "--port", str(port), *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=sink if sink is not None else subprocess.PIPE,
        cwd=str(ROOT),
        env={**os.environ, **(env or {})},
        preexec_fn=limit,
    )
    try:
        wait_http(port, proc, timeout=60)
        yield proc, port
    finally:
        kill_tree(proc)
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
        if sink is not None:
            sink.close()


def raw_handshake(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Initialize a legacy session over a Popen'd stdio gateway; returns the tools/list result."""
    assert proc.stdin and proc.stdout

    def rpc(msg: dict[str, Any]) -> None:
        proc.stdin.write(json.dumps(msg).encode() + b"\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]

    def answer(req_id: int) -> dict[str, Any]:
        while True:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line, "gateway closed stdout"
            msg = json.loads(line)
            if msg.get("id") == req_id:
                return msg

    rpc(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "0"},
            },
        }
    )
    assert "result" in answer(1)
    rpc({"jsonrpc": "2.0", "method": "notifications/initialized"})
    rpc({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    return answer(2)["result"]


async def poll(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2) -> Any:
    """Await `check()` until it returns something truthy; the last value otherwise."""
    deadline = anyio.current_time() + timeout
    while True:
        value = await check()
        if value or anyio.current_time() > deadline:
            return value
        await anyio.sleep(interval)


def text_of(result: Any) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


# ---- the demo gateway: all five real servers, one stdio gateway for the session ------------
@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("demo")
    sample = base / "sample"
    sample.mkdir()
    (sample / "notes.txt").write_text("hello from the sample folder\n", encoding="utf-8")
    write_config(
        base / "demo.yaml",
        {
            "time": time_entry(),
            "git": git_entry(),
            "everything": everything_entry(),
            "filesystem": filesystem_entry(sample),
            "memory": memory_entry(base / "memory.jsonl"),
        },
        {"separator": "__", "call_timeout_ms": 30000},
    )
    return base


@pytest.fixture(scope="session")
async def demo_client(demo_dir: Path) -> Any:
    async with gateway_client(demo_dir / "demo.yaml", mode="auto") as client:
        yield client


os.environ.setdefault("NO_COLOR", "1")
