"""Era bridging: client mode {auto, legacy} x upstream era {legacy: server-memory, modern:
mcp-server-time}, over the stdio front and over the Streamable HTTP front."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from conftest import (
    free_port,
    gateway_client,
    memory_entry,
    popen_gateway,
    text_of,
    time_entry,
    wait_http,
    write_config,
)
from mcpopt.config import load_config
from mcpopt.gateway.assembly import build_gateway

pytestmark = pytest.mark.anyio

MODERN = "2026-07-28"

# upstream era -> (tool, arguments, text expected in the result)
CALLS = {
    "legacy-upstream": ("memory__read_graph", {}, "entities"),
    "modern-upstream": ("time__get_current_time", {"timezone": "UTC"}, "UTC"),
}


@pytest.fixture(scope="module")
def era_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("eras")
    return write_config(base / "eras.yaml", {"memory": memory_entry(base / "memory.jsonl"), "time": time_entry()})


def _check_version(mode: str, version: str) -> None:
    if mode == "auto":
        assert version == MODERN
    else:
        assert version.startswith("2025-"), version


async def test_upstream_eras_are_what_the_matrix_claims(era_config: Path) -> None:
    gateway = build_gateway(load_config(era_config))
    async with gateway.running():
        assert gateway.upstreams["time"].protocol_version == MODERN
        assert gateway.upstreams["time"].modern
        assert gateway.upstreams["memory"].protocol_version not in (None, MODERN)
        assert not gateway.upstreams["memory"].modern


@pytest.fixture(scope="module", params=["auto", "legacy"])
async def stdio_client(request: pytest.FixtureRequest, era_config: Path) -> Any:
    async with gateway_client(era_config, mode=request.param) as client:
        yield request.param, client


@pytest.mark.parametrize("upstream", list(CALLS))
async def test_stdio_matrix(stdio_client: Any, upstream: str) -> None:
    mode, client = stdio_client
    _check_version(mode, client.protocol_version)
    tool, args, expected = CALLS[upstream]
    names = {t.name for t in (await client.list_tools()).tools}
    assert tool in names
    result = await client.call_tool(tool, args)
    assert not result.is_error, text_of(result)
    assert expected in text_of(result)


@pytest.fixture(scope="module")
def http_url(era_config: Path) -> Iterator[str]:
    port = free_port()
    with popen_gateway(era_config, "-t", "http", "--port", str(port)) as proc:
        wait_http(port, proc)
        yield f"http://127.0.0.1:{port}/mcp"


@pytest.mark.parametrize("mode", ["auto", "legacy"])
@pytest.mark.parametrize("upstream", list(CALLS))
async def test_http_matrix(http_url: str, mode: str, upstream: str) -> None:
    tool, args, expected = CALLS[upstream]
    async with Client(http_url, mode=mode) as client:
        _check_version(mode, client.protocol_version)
        names = {t.name for t in (await client.list_tools()).tools}
        assert tool in names
        result = await client.call_tool(tool, args)
        assert not result.is_error, text_of(result)
        assert expected in text_of(result)
