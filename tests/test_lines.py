"""`LineSink`: an upstream's stdout split into JSON-RPC lines in the pipe's data callback."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from mcpopt.upstream.lines import HIGH_WATER, LineSink


class FakePipe:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.resumed += 1


def line(obj: Any) -> bytes:
    return orjson.dumps(obj) + b"\n"


async def drain(sink: LineSink) -> list[Any]:
    out = []
    while (item := await sink.next()) is not None:
        out.append(item)
    return out


@pytest.mark.anyio
async def test_lines_split_across_and_within_chunks_keep_their_order() -> None:
    taken: list[Any] = []
    sink = LineSink(lambda m: m.get("id") == "~1" and not taken.append(m))
    data = line({"id": 1}) + b"\n  \n" + line({"id": "~1", "result": {}}) + line({"id": 2, "result": {"x": "y" * 100}})
    for i in range(0, len(data), 7):  # awkward chunk boundaries, blank lines between
        sink.feed_data(data[i : i + 7])
    sink.feed_data(line({"id": 3}))  # one whole line in one chunk
    sink.feed_eof()
    got = await drain(sink)
    assert [m["id"] for m in got] == [1, 2, 3]
    assert taken == [{"id": "~1", "result": {}}]  # the side channel's message never reached the queue
    assert sink.at_eof()


@pytest.mark.anyio
async def test_a_bad_line_is_reported_and_reading_goes_on() -> None:
    sink = LineSink(lambda m: False)
    sink.feed_data(b"not json\n" + line({"id": 1}))
    sink.feed_eof()
    first, second = await drain(sink)
    assert isinstance(first, orjson.JSONDecodeError) and second == {"id": 1}


@pytest.mark.anyio
async def test_an_overlong_line_is_reported_and_ends_the_stream() -> None:
    sink = LineSink(lambda m: False, max_line=100)
    sink.feed_data(b"x" * 60)
    sink.feed_data(b"x" * 60)
    got = await drain(sink)
    assert len(got) == 1 and isinstance(got[0], ValueError) and "100" in str(got[0])


@pytest.mark.anyio
async def test_a_full_queue_pauses_the_pipe_until_the_consumer_catches_up() -> None:
    pipe = FakePipe()
    sink = LineSink(lambda m: False)
    sink.set_transport(pipe)
    for i in range(HIGH_WATER + 10):
        sink.feed_data(line({"id": i}))
    assert pipe.paused == 1 and pipe.resumed == 0
    for _ in range(HIGH_WATER):
        await sink.next()
    assert pipe.resumed == 1


@pytest.mark.anyio
async def test_the_consumer_waits_for_data() -> None:
    sink = LineSink(lambda m: False)
    waiter = asyncio.ensure_future(sink.next())
    await asyncio.sleep(0)
    assert not waiter.done()
    sink.feed_data(line({"id": 7}))
    assert await asyncio.wait_for(waiter, 5) == {"id": 7}
