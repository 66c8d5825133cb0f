"""A lean JSON-RPC client over a child's stdio, for benchmarks: orjson lines, no validation.

It costs a few microseconds per call where the SDK's `Client` costs ~0.3 ms here, so what it
measures is the server side (the server, or a proxy and what is behind it).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from mcp import StdioServerParameters

__all__ = ["LineClient"]


class LineClient:
    """A lean JSON-RPC client over a child's stdio (see the module doc); `async with` starts the
    child and makes the MCP handshake (2025-06-18)."""

    def __init__(self, params: StdioServerParameters) -> None:
        self.params = params
        self._next = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}

    async def __aenter__(self) -> LineClient:
        self.proc = await asyncio.create_subprocess_exec(
            self.params.command,
            *self.params.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            limit=1 << 30,
        )
        self._reader = asyncio.create_task(self._read())
        init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}
        await self.request("initialize", init)
        assert self.proc.stdin is not None
        self.proc.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
        self._reader.cancel()

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            msg = orjson.loads(line)
            rid = msg.get("id") if isinstance(msg, dict) else None
            fut = self._pending.pop(rid, None) if isinstance(rid, int) else None
            if fut is not None and not fut.done():
                fut.set_result(msg)

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self._next += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._next] = fut
        self.proc.stdin.write(orjson.dumps({"jsonrpc": "2.0", "id": self._next, "method": method, "params": params}))
        self.proc.stdin.write(b"\n")
        msg = await fut
        if "result" not in msg:
            raise RuntimeError(f"{method} failed: {msg.get('error')}")
        return msg["result"]  # type: ignore[no-any-return]

    async def latency(self, tool: str, args: dict[str, Any], calls: int, warmup: int) -> list[float]:
        """Milliseconds of each of `calls` sequential `tools/call`s, after `warmup` untimed ones.

        Raises:
            RuntimeError: a call was answered with a JSON-RPC error.
        """
        params = {"name": tool, "arguments": args}
        for _ in range(warmup):
            await self.request("tools/call", params)
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await self.request("tools/call", params)
            out.append((time.perf_counter() - t0) * 1000)
        return out
