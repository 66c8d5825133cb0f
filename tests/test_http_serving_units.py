"""The HTTP serving path's own parts (no timing involved): one write for a response's head and body
(`_HeadWithBody`), the frozen startup heap."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from mcpopt.gateway.http_limits import _HeadWithBody


class _Recording(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


async def _yield() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def test_head_and_body_sent_together_make_one_write() -> None:
    async def main() -> list[bytes]:
        raw = _Recording()
        cycle = SimpleNamespace(response_started=False)
        t = _HeadWithBody(raw, cycle, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the response starts: written at once
        cycle.response_started = True
        t.write(b"HEAD\r\n\r\n")
        t.write(b"body")
        t.write(b"more")
        await _yield()
        return raw.writes

    assert asyncio.run(main()) == [b"HTTP/1.1 100 Continue\r\n\r\n", b"HEAD\r\n\r\nbody", b"more"]


def test_a_head_alone_is_written_on_the_next_iteration_and_before_close() -> None:
    async def main() -> tuple[list[bytes], list[bytes]]:
        loop = asyncio.get_running_loop()
        raw, raw2 = _Recording(), _Recording()
        t = _HeadWithBody(raw, SimpleNamespace(response_started=True), loop)
        t.write(b"HEAD")
        await _yield()  # e.g. an SSE stream whose first event comes later
        t.write(b"event")
        t2 = _HeadWithBody(raw2, SimpleNamespace(response_started=True), loop)
        t2.write(b"HEAD")
        t2.close()
        await _yield()
        assert raw2.closed and t2.is_closing()
        return raw.writes, raw2.writes

    assert asyncio.run(main()) == ([b"HEAD", b"event"], [b"HEAD"])


def test_freeze_startup_heap_moves_live_objects_out_of_collections() -> None:
    import gc

    from mcpopt.gateway.front import freeze_startup_heap

    threshold = gc.get_threshold()
    try:
        frozen = freeze_startup_heap()
        assert frozen > 0 and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
