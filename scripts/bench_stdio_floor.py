#!/usr/bin/env python3
"""The floor of a Python stdio hop: what relays that do less and less than mcpopt add per call.

Usage (from the repo root): .venv/bin/python scripts/bench_stdio_floor.py [--calls 2000]

Issue 15 asks for mcpopt's added p50 over stdio within 0.10 ms of a bare relay. This script puts
that target next to the cost of the steps every Python gateway has to take, each a relay of its
own in front of `mcp-server-time` (`get_current_time`), called from the lean line client and
alternated in rounds (`mcpopt.bench.lean_ab`, the harness of `scripts/ab_stdio.py`):

- `bytes`: the bare relay (`mcpopt.bench.relay`: two threads copying bytes, no event loop);
- `lines`: an asyncio event loop (uvloop, as `mcpopt serve`) copying whole lines, no parsing;
- `json`: the same, every line parsed and serialised again (orjson), no other logic;
- `route`: a multiplexing hop, the least a gateway that serves many clients over one upstream
  session does: each request parsed, given an upstream id, answered by a task per call that awaits
  the upstream's answer (a future resolved by the reader) and writes it back under the client's id;
- `mcpopt`: `mcpopt serve` with its defaults.

Reported per path: wall p50/p99 (ms), the CPU (user + system) its own process spent per timed call
(us), and p50 added over `bytes` (ms). Run by the script itself, `--hop MODE CMD...` is one relay.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

HOPS = ("lines", "json", "route")
SELF = str(Path(__file__).resolve())


async def _hop(mode: str, argv: list[str]) -> int:
    import orjson

    loop = asyncio.get_running_loop()
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    up_in, up_out = proc.stdin, proc.stdout
    client = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(client), sys.stdin)
    out_transport, out_protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout)
    out = asyncio.StreamWriter(out_transport, out_protocol, None, loop)
    pending: dict[int, asyncio.Future[Any]] = {}
    next_id = 0
    tasks: set[asyncio.Task[None]] = set()

    async def answer(client_id: Any, future: asyncio.Future[Any]) -> None:
        msg = await future
        msg["id"] = client_id
        out.write(orjson.dumps(msg) + b"\n")

    async def downstream() -> None:
        while line := await up_out.readline():
            if mode == "lines":
                out.write(line)
                continue
            msg = orjson.loads(line)
            if mode == "route" and isinstance(msg, dict) and "id" in msg and "method" not in msg:
                future = pending.pop(msg["id"], None)
                if future is not None:
                    future.set_result(msg)
                    continue
            out.write(orjson.dumps(msg) + b"\n")

    reader = asyncio.ensure_future(downstream())
    while line := await client.readline():
        if mode == "lines":
            up_in.write(line)
            continue
        msg = orjson.loads(line)
        if mode == "route" and isinstance(msg, dict) and "id" in msg and "method" in msg:
            next_id += 1
            future = loop.create_future()
            pending[next_id] = future
            task = asyncio.ensure_future(answer(msg["id"], future))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            msg["id"] = next_id
        up_in.write(orjson.dumps(msg) + b"\n")
    up_in.close()
    await proc.wait()
    reader.cancel()
    return 0


async def compare(calls: int) -> None:
    from mcp import StdioServerParameters

    from mcpopt.bench import lean_ab

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        relay, tool = lean_ab.relay()
        paths: dict[str, tuple[StdioServerParameters, str]] = {"bytes": (relay, tool)}
        for mode in HOPS:
            args = [SELF, "--hop", mode, lean_ab.TIME]
            paths[mode] = (StdioServerParameters(command=sys.executable, args=args), tool)
        paths["mcpopt"] = lean_ab.serve(sys.executable, tmp / "gateway.json", tmp / "data")
        print(f"{calls} calls per path")
        results = await lean_ab.compare(paths, calls)
        lean_ab.show(results, width=10)
        base = next(r for r in results if r.path == "bytes").p50_ms
        print("p50 added over the bare relay (bytes):")
        for r in results:
            if r.path != "bytes":
                print(f"  {r.path:10s} {r.p50_ms - base:+.3f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--hop", choices=HOPS, help=argparse.SUPPRESS)
    parser.add_argument("cmd", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hop:
        import uvloop

        return uvloop.run(_hop(args.hop, args.cmd))
    asyncio.run(compare(args.calls))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
