"""mcpopt.upstream.fastpath.FastChannel: the lean request channel beside the SDK session on a
stdio upstream (ids `~n`, responses and progress handed straight to the waiting call)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from mcpopt.upstream.fastpath import FastChannel

pytestmark = pytest.mark.anyio


class LineSink:
    """Stands in for the `CorkedWriter` of the upstream's stdin: records the lines written."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, data: bytes) -> None:
        self.lines.extend(orjson.loads(line) for line in data.splitlines())

    write_now = write

    def is_closing(self) -> bool:
        return False

    def over(self, limit: int) -> bool:
        return False


async def test_progress_reaches_the_caller_before_the_result() -> None:
    # An upstream writes its last progress notification and the response back to back (one read
    # of the pipe hands both to `offer`). The call must not return before every progress relay
    # ran: the gateway writes the result right after, and on the client's stream the answer ends
    # the exchange (seen as `tools-call-with-progress` losing the last of 3 notifications).
    sink = LineSink()
    channel = FastChannel(sink)  # type: ignore[arg-type]
    relayed: list[float] = []

    async def relay(progress: float, total: float | None, message: str | None) -> None:
        await asyncio.sleep(0)  # a client write yields to the loop, as the real relays do
        await asyncio.sleep(0)
        relayed.append(progress)

    call = asyncio.create_task(channel.request("tools/call", {"name": "t"}, 5.0, relay))
    await asyncio.sleep(0)
    rid = sink.lines[0]["id"]
    token = sink.lines[0]["params"]["_meta"]["progressToken"]
    for step in (0, 50, 100):
        assert channel.offer(
            {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": token, "progress": step}}
        )
    assert channel.offer({"jsonrpc": "2.0", "id": rid, "result": {"content": []}})
    assert await call == {"content": []}
    assert relayed == [0, 50, 100]


@pytest.mark.parametrize(
    "params",
    [
        None,
        {"name": "t", "arguments": {"a": 1}},
        {"name": "t", "_meta": {"progressToken": "~1", "traceparent": "00-x"}},
        {"name": "t", "_meta": {"io.modelcontextprotocol/logLevel": "debug"}},
        {"name": "t", "_meta": {"io.modelcontextprotocol/clientCapabilities": {"sampling": {}}}},
    ],
)
@pytest.mark.parametrize("level", [None, "warning"])
def test_stamped_meta_leaves_what_the_session_stamp_leaves(params: Any, level: Any) -> None:
    """The side channel's learnt `_meta` keys equal the SDK's 2026-07-28 stamp (wrapped to keep a
    client's capabilities), headers aside, and the caller's params are not modified."""
    from mcp.client.session import _make_modern_stamp  # type: ignore[attr-defined]

    from mcpopt.upstream.fastpath import StampedMeta
    from mcpopt.upstream.server import keep_client_capabilities

    stamp = keep_client_capabilities(
        _make_modern_stamp("2026-07-28", {"name": "mcpopt"}, {"roots": {}}, lambda _n, _a: {}, log_level=level)
    )
    before = orjson.dumps(params)
    data: dict[str, Any] = {"method": "tools/call", "params": orjson.loads(orjson.dumps(params or {}))}
    stamp(data, {})
    assert StampedMeta(stamp).merge(params) == data["params"]
    assert orjson.dumps(params) == before
