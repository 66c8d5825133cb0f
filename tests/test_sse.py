"""HTTP upstreams behind the gateway process (which runs on uvloop): server-everything in
`streamableHttp` mode (the HTTP side channel, `http_fast`) and in legacy HTTP+SSE `sse` mode."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from mcp import Client

from conftest import NODE_MODULES, free_port, gateway_params, text_of, write_config

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sse", "streamableHttp"])
def http_upstream(request: pytest.FixtureRequest) -> object:
    port = free_port()
    proc = subprocess.Popen(
        ["node", str(NODE_MODULES / "server-everything" / "dist" / "index.js"), request.param],
        env={**os.environ, "PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import socket

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}/{'sse' if request.param == 'sse' else 'mcp'}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_http_upstream_through_the_gateway(tmp_path: Path, http_upstream: str, mode: str) -> None:
    cfg = write_config(tmp_path / "c.yaml", {"up": {"url": http_upstream}})  # `/sse` -> the SSE transport
    async with Client(gateway_params(cfg), mode=mode) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "up__echo" in names
        for i in range(3):  # the first call binds the side channel, the next ones reuse its connection
            assert text_of(await client.call_tool("up__echo", {"message": f"over http {i}"})) == f"Echo: over http {i}"
