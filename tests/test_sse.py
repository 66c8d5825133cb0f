"""A legacy HTTP+SSE upstream (server-everything in `sse` mode) behind the gateway."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from mcp import Client

from conftest import NODE_MODULES, free_port, gateway_params, text_of, write_config

pytestmark = pytest.mark.anyio


@pytest.fixture
def sse_upstream() -> object:
    port = free_port()
    proc = subprocess.Popen(
        ["node", str(NODE_MODULES / "server-everything" / "dist" / "index.js"), "sse"],
        env={**os.environ, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import socket

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/sse"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_sse_upstream_through_the_gateway(tmp_path: Path, sse_upstream: str, mode: str) -> None:
    cfg = write_config(tmp_path / "c.yaml", {"old": {"url": sse_upstream}})  # `/sse` -> the SSE transport
    async with Client(gateway_params(cfg), mode=mode) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "old__echo" in names
        assert text_of(await client.call_tool("old__echo", {"message": "over sse"})) == "Echo: over sse"
