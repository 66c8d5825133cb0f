"""No upstream process outlives the gateway: stdin EOF, SIGTERM (stdio, http), SIGKILL (stdio, http)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from conftest import (
    descendants,
    describe,
    fake_entry,
    find_gateway,
    free_port,
    gateway_client,
    memory_entry,
    popen_gateway,
    raw_handshake,
    text_of,
    time_entry,
    wait_dead,
    wait_http,
    write_config,
)

UPSTREAMS = 3


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "shutdown.yaml",
        {"time": time_entry(), "memory": memory_entry(tmp_path / "memory.jsonl"), "fake": fake_entry()},
    )


def _children(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    kids = descendants(psutil.Process(proc.pid))
    assert len(kids) >= UPSTREAMS, describe(kids)
    return kids


def _assert_all_gone(gateway_pid: int, kids: list[psutil.Process]) -> None:
    left = wait_dead(kids)
    assert not left, f"children of gateway {gateway_pid} still alive: {describe(left)}"


def _start_stdio(proc: subprocess.Popen[bytes]) -> None:
    tools = raw_handshake(proc)["tools"]
    assert {"time__get_current_time", "memory__read_graph", "fake__echo"} <= {t["name"] for t in tools}


def test_stdin_eof_stops_gateway_and_children(config: Path) -> None:
    with popen_gateway(config) as proc:
        _start_stdio(proc)
        kids = _children(proc)
        assert proc.stdin
        proc.stdin.close()
        # It exits by itself (a hang fails here); how fast depends on the machine's load (each
        # upstream may use its 2 s grace twice), so the bound is generous.
        proc.wait(timeout=60)
        assert proc.returncode == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        _assert_all_gone(proc.pid, kids)


@pytest.mark.anyio
async def test_client_close_stops_gateway_and_children(config: Path) -> None:
    async with gateway_client(config, mode="legacy") as client:
        assert "UTC" in text_of(await client.call_tool("time__get_current_time", {"timezone": "UTC"}))
        gateway = find_gateway(config)
        kids = descendants(gateway)
        assert len(kids) >= UPSTREAMS, describe(kids)
    _assert_all_gone(gateway.pid, [gateway, *kids])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_signal_stdio_gateway(config: Path, sig: signal.Signals) -> None:
    with popen_gateway(config) as proc:
        _start_stdio(proc)
        kids = _children(proc)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        _assert_all_gone(proc.pid, kids)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_signal_http_gateway(config: Path, sig: signal.Signals) -> None:
    port = free_port()
    with popen_gateway(config, "-t", "http", "--port", str(port)) as proc:
        wait_http(port, proc)
        kids = _children(proc)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        _assert_all_gone(proc.pid, kids)
