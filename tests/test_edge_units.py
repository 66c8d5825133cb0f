"""Units of the edge: Host/Origin policy, JSON-RPC checks, the bounded stdio line reader, id recovery."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mcpopt.config import Config
from mcpopt.gateway.edge import HostPolicy, bind_refusal, is_loopback, split_host
from mcpopt.gateway.stdio_reader import LineReader, Oversized, recover_id
from mcpopt.wire import InvalidParams, check_call_params, dumps_request, nesting_depth, request_id_problem


def test_split_host() -> None:
    assert split_host("Example.COM:8080") == ("example.com", "8080")
    assert split_host("[::1]:9") == ("[::1]", "9")
    assert split_host("[fd00::2]") == ("[fd00::2]", None)
    assert split_host("name") == ("name", None)


def test_host_policy_loopback_bind() -> None:
    p = HostPolicy("127.0.0.1", ["mcp.example.com", "exact.example:8443", "any.example:*"])
    assert p.host_ok("127.0.0.1:8080") and p.host_ok("localhost") and p.host_ok("[::1]:1")
    assert p.host_ok("mcp.example.com") and p.host_ok("mcp.example.com:443")
    assert p.host_ok("exact.example:8443") and not p.host_ok("exact.example:8444")
    assert p.host_ok("any.example:1234")
    assert not p.host_ok("evil.example") and not p.host_ok(None) and not p.host_ok("")
    assert not p.host_ok("localhost.evil.example:8080")
    # An IP literal equal to the address the request arrived on cannot be a rebound name.
    assert p.host_ok("192.0.2.2:8080", arrived_on="192.0.2.2")
    assert not p.host_ok("192.0.2.3:8080", arrived_on="192.0.2.2")


def test_origin_policy() -> None:
    p = HostPolicy("127.0.0.1", [], ["https://app.example.com", "http://dev.example:*"])
    assert p.origin_ok(None)
    assert p.origin_ok("http://localhost:3000") and p.origin_ok("http://127.0.0.1:8080")
    assert p.origin_ok("https://app.example.com") and p.origin_ok("https://APP.example.com/")
    assert p.origin_ok("http://dev.example:5173")
    for bad in ("null", "http://evil.example", "file://", "http://localhost.evil.example", "ftp://localhost"):
        assert not p.origin_ok(bad), bad
    assert HostPolicy("127.0.0.1", ["*"], ["*"]).host_ok("anything") and HostPolicy("::1", [], ["*"]).origin_ok("null")


def test_bind_refusal() -> None:
    cfg = Config()
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::")
    assert bind_refusal(cfg, "127.0.0.1") is None
    message = bind_refusal(cfg, "0.0.0.0")
    assert message is not None and "--allow-unauthenticated" in message and "gateway.auth" in message
    assert bind_refusal(cfg, "0.0.0.0", allow_unauthenticated=True) is None
    assert bind_refusal(Config.model_validate({"gateway": {"http": {"allow_unauthenticated": True}}}), "::") is None


@pytest.mark.parametrize("rid", [1.5, None, True, {"a": 1}, [1]])
def test_request_id_problem(rid: Any) -> None:
    assert request_id_problem({"jsonrpc": "2.0", "id": rid, "method": "ping"}) is not None


def test_request_id_ok() -> None:
    for msg in (
        {"jsonrpc": "2.0", "id": 1, "method": "ping"},
        {"jsonrpc": "2.0", "id": "x", "method": "ping"},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": None, "error": {"code": -1, "message": "a response"}},
    ):
        assert request_id_problem(msg) is None


def test_check_call_params_names_the_member() -> None:
    for params, member in (
        ([1], "params"),
        ({"name": 5}, "params.name"),
        ({"name": "t", "arguments": [1]}, "params.arguments"),
        ({"name": "t", "_meta": "x"}, "params._meta"),
        ({"name": "t", "_meta": {"progressToken": True}}, "progressToken"),
    ):
        with pytest.raises(InvalidParams) as info:
            check_call_params(params)
        assert member in str(info.value) and info.value.code == -32602
    check_call_params({"name": "t", "arguments": {}, "_meta": {"progressToken": "p"}})


def test_dumps_request_says_how_deep() -> None:
    deep: Any = "x"
    for _ in range(300):
        deep = [deep]
    params = {"name": "m__t", "arguments": {"a": deep}}
    assert nesting_depth(params["arguments"]) == 301
    with pytest.raises(InvalidParams) as info:
        dumps_request({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}, "tools/call", params)
    assert "m__t" in str(info.value) and "301 levels" in str(info.value)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b'{"jsonrpc":"2.0","id":7,"method":"x","params":{"a":"', (True, 7)),
        (b'{"id" : "abc", "method"', (True, "abc")),
        (b'{"jsonrpc":"2.0","method":"tools/call","params":{"id":3,"x":"', (False, None)),  # nested id: not it
        (b'{"method":"m","params":{"a":[1,{"b":"}"}]},"id":9,"x"', (True, 9)),
        (b'{"jsonrpc":"2.0","id":12', (False, None)),  # cut off: the id could be 123
        (b"[1,2", (False, None)),
        (b"garbage", (False, None)),
    ],
)
def test_recover_id(head: bytes, expected: tuple[bool, Any]) -> None:
    assert recover_id(head) == expected


def test_line_reader_discards_oversized_lines_without_keeping_them() -> None:
    async def scenario() -> list[Any]:
        reader = LineReader(max_bytes=100)
        reader.data_received(b'{"id":1}\n{"id":2,"x":"')
        for _ in range(50):
            reader.data_received(b"a" * 64)
            assert len(reader._buf) <= 200  # noqa: SLF001 - nothing of the long line piles up
        reader.data_received(b'"}\n  \n{"id":3}')
        reader.data_received(b"\n")
        reader.eof_received()
        out = []
        while (line := await reader.readline()) is not None:
            out.append(line)
        return out

    got = asyncio.run(scenario())
    assert got[0] == b'{"id":1}'
    assert isinstance(got[1], Oversized) and recover_id(got[1].head) == (True, 2)
    assert got[2] == b'{"id":3}'
    assert len(got) == 3


def test_line_reader_pauses_and_resumes_the_pipe() -> None:
    class Pipe:
        paused = 0
        resumed = 0

        def pause_reading(self) -> None:
            self.paused += 1

        def resume_reading(self) -> None:
            self.resumed += 1

    async def scenario() -> Pipe:
        reader = LineReader(max_bytes=1000, buffer_bytes=100)
        pipe = Pipe()
        reader.connection_made(pipe)  # type: ignore[arg-type]
        for i in range(20):
            reader.data_received(b'{"id":%d}\n' % i)
        assert pipe.paused == 1 and pipe.resumed == 0
        for _ in range(20):
            await reader.readline()
        return pipe

    pipe = asyncio.run(scenario())
    assert pipe.resumed == 1
