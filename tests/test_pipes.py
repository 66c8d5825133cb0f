"""mcpopt.upstream.pipes.CorkedWriter: lines written in one event-loop iteration leave in one
pipe write, in order; backpressure counts what is queued."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from mcpopt.upstream.pipes import CorkedWriter

pytestmark = pytest.mark.anyio


class CountingTransport:
    """Wraps the real pipe transport and records each `write` call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_one_write_per_iteration_in_order() -> None:
    loop = asyncio.get_running_loop()
    r, w = os.pipe()
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, os.fdopen(w, "wb", 0))
    try:
        corked = CorkedWriter(asyncio.StreamWriter(transport, protocol, None, loop))
        counting = CountingTransport(transport)
        corked._transport = counting  # noqa: SLF001 - observe the syscalls it asks for
        for i in range(3):
            corked.write(b'{"n":%d}\n' % i)
        assert counting.writes == [] and corked.over(20)  # queued, not written; 24 bytes > 20
        await asyncio.sleep(0)  # end of the iteration
        assert counting.writes == [b'{"n":0}\n{"n":1}\n{"n":2}\n'] and not corked.over(20)
        corked.write(b'{"n":3}\n')
        await asyncio.sleep(0)
        assert len(counting.writes) == 2
        assert os.read(r, 1024) == b'{"n":0}\n{"n":1}\n{"n":2}\n{"n":3}\n'
    finally:
        transport.close()
        os.close(r)


async def test_nothing_is_written_once_the_pipe_is_closing() -> None:
    loop = asyncio.get_running_loop()
    r, w = os.pipe()
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, os.fdopen(w, "wb", 0))
    corked = CorkedWriter(asyncio.StreamWriter(transport, protocol, None, loop))
    corked.write(b"late\n")
    transport.close()
    await asyncio.sleep(0)
    assert corked.is_closing() and not corked.over(0)
    os.close(r)
