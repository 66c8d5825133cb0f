"""The stdio front under hostile or broken clients (issue 10, item 5), against the real gateway process.

An oversized line used to kill the gateway (its reader buffered up to 1 GiB, then raised), a client
that writes without reading grew the gateway's memory without bound, and invalid ids, malformed
params and parse errors were served, dropped or answered with Python internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import filesystem_entry, memory_entry, popen_gateway, raw_handshake, time_entry, write_config

pytestmark = pytest.mark.integration

MiB = 1 << 20


def _send(proc: subprocess.Popen[bytes], message: Any) -> None:
    assert proc.stdin is not None
    data = message if isinstance(message, bytes) else json.dumps(message).encode()
    proc.stdin.write(data + b"\n")
    proc.stdin.flush()


def _answers(proc: subprocess.Popen[bytes], until_id: Any) -> list[dict[str, Any]]:
    """Every message the gateway writes until (and including) the answer with id `until_id`."""
    assert proc.stdout is not None
    out = []
    while True:
        line = proc.stdout.readline()
        assert line, "the gateway closed stdout (it died)"
        msg = json.loads(line)
        out.append(msg)
        if msg.get("id") == until_id and ("result" in msg or "error" in msg):
            return out


class PeakRss(threading.Thread):
    """Samples a process's resident set size until stopped; `peak` in bytes."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def stop(self) -> int:
        self.halt.set()
        self.join(5)
        return self.peak


def test_oversized_line_is_refused_and_the_gateway_keeps_serving(tmp_path: Path) -> None:
    """A 1 GiB line: answered -32600 with its id (it starts with it), never buffered, then business as usual."""
    config = write_config(tmp_path / "g.yaml", {"time": time_entry()})
    with popen_gateway(config) as proc:
        raw_handshake(proc)
        rss = PeakRss(proc.pid)
        rss.start()
        baseline = psutil.Process(proc.pid).memory_info().rss
        failure: list[BaseException] = []

        def write() -> None:
            try:
                assert proc.stdin is not None
                proc.stdin.write(
                    b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"time__get_current_time",'
                    b'"arguments":{"timezone":"'
                )
                chunk = b"a" * MiB
                for _ in range(1024):
                    proc.stdin.write(chunk)
                proc.stdin.write(b'"}}}\n')
                proc.stdin.flush()
                _send(
                    proc,
                    {
                        "jsonrpc": "2.0",
                        "id": 8,
                        "method": "tools/call",
                        "params": {"name": "time__get_current_time", "arguments": {"timezone": "UTC"}},
                    },
                )
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                failure.append(exc)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        got = _answers(proc, 8)
        writer.join(60)
        peak = rss.stop()
        assert not failure, failure
        by_id = {m.get("id"): m for m in got}
        error = by_id[7]["error"]
        assert error["code"] == -32600
        assert "gateway.stdio.max_message_bytes" in error["message"]
        assert "UTC" in by_id[8]["result"]["content"][0]["text"]
        assert peak - baseline < 200 * MiB, (baseline, peak)  # the line was discarded, not kept


def test_client_that_does_not_read_gets_backpressure(tmp_path: Path) -> None:
    """2,000 calls each answering 128 KiB, written by a client that reads nothing: the gateway stops
    reading instead of holding 256 MiB of answers, and delivers every answer once the client reads."""
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "big.txt").write_text("x" * (128 * 1024), encoding="utf-8")
    config = write_config(tmp_path / "g.yaml", {"fs": filesystem_entry(folder)})
    total = 2000
    with popen_gateway(config) as proc:
        raw_handshake(proc)
        gw = psutil.Process(proc.pid)
        baseline = gw.memory_info().rss
        written = 0
        done = threading.Event()

        def write() -> None:
            nonlocal written
            with contextlib.suppress(OSError, ValueError):
                for i in range(total):
                    call = {
                        "jsonrpc": "2.0",
                        "id": 1000 + i,
                        "method": "tools/call",
                        "params": {"name": "fs__read_text_file", "arguments": {"path": str(folder / "big.txt")}},
                    }
                    _send(proc, call)
                    written += 1
            done.set()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        # Wait until the gateway stops reading (its read counter holds still) or the writer is done.
        last, still_since = -1, time.monotonic()
        deadline = time.monotonic() + 180
        while not done.is_set() and time.monotonic() < deadline:
            grown = gw.memory_info().rss - baseline
            assert grown < 150 * MiB, f"the gateway holds {grown >> 20} MiB of answers nobody reads"
            read = gw.io_counters().read_chars
            if read != last:
                last, still_since = read, time.monotonic()
            elif time.monotonic() - still_since > 3:
                break
            time.sleep(0.1)
        assert not done.is_set(), "the gateway read every request although nothing of its output was read"
        assert written < total
        # Now the client reads: every answer arrives, exactly once, and the writer can finish.
        assert proc.stdout is not None
        seen: set[int] = set()
        while len(seen) < total:
            line = proc.stdout.readline()
            assert line, "the gateway closed stdout"
            msg = json.loads(line)
            if "id" in msg:
                assert msg["id"] not in seen
                assert "result" in msg, msg
                seen.add(msg["id"])
        writer.join(30)
        assert seen == set(range(1000, 1000 + total))


def test_invalid_ids_parse_errors_and_malformed_params_over_stdio(tmp_path: Path) -> None:
    config = write_config(tmp_path / "g.yaml", {"memory": memory_entry(tmp_path / "memory.jsonl")})
    with popen_gateway(config) as proc:
        raw_handshake(proc)
        for n, rid in enumerate([1.5, None, True, {"a": 1}, [1]]):
            create = {
                "name": "memory__create_entities",
                "arguments": {"entities": [{"name": f"bad-id-{n}", "entityType": "t", "observations": []}]},
            }
            _send(proc, {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": create})
            _send(proc, {"jsonrpc": "2.0", "id": 500 + n, "method": "ping"})
            got = _answers(proc, 500 + n)
            errors = [m for m in got if "error" in m]
            assert len(errors) == 1, (rid, got)
            assert errors[0]["id"] is None and errors[0]["error"]["code"] == -32600, errors
            assert not [m for m in got if "result" in m and m.get("id") != 500 + n], got
        _send(proc, b'{"jsonrpc":"2.0","id":43,')
        _send(proc, {"jsonrpc": "2.0", "id": 44, "method": "ping"})
        got = _answers(proc, 44)
        assert [m["error"]["code"] for m in got if "error" in m] == [-32700], got
        # None of the calls with a bad id ran.
        _send(
            proc,
            {
                "jsonrpc": "2.0",
                "id": 45,
                "method": "tools/call",
                "params": {"name": "memory__read_graph", "arguments": {}},
            },
        )
        graph = json.loads(_answers(proc, 45)[-1]["result"]["content"][0]["text"])
        assert not [e for e in graph["entities"] if e["name"].startswith("bad-id-")]
        # Malformed params: -32602 naming the field, no Python internals.
        for n, (params, field) in enumerate(
            [
                ({"name": "memory__read_graph", "arguments": {}, "_meta": [1]}, "_meta"),
                ({"name": "memory__read_graph", "arguments": [1]}, "arguments"),
                ({"name": "memory__read_graph", "arguments": {"deep": _deep(300)}}, "nest"),
            ]
        ):
            _send(proc, {"jsonrpc": "2.0", "id": 600 + n, "method": "tools/call", "params": params})
            error = _answers(proc, 600 + n)[-1]["error"]
            assert error["code"] == -32602 and field in error["message"], error
            assert "object has no attribute" not in error["message"]


def _deep(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = [value]
    return value


async def _fast_front_on_a_pipe(gateway: Any) -> tuple[int, asyncio.WriteTransport, Any]:
    """The stdio fast path (`FastFront`) of a running `gateway`, writing its answers into a pipe:
    (the pipe's read end, the write transport to close, the `FastFront`)."""
    from mcpopt.gateway.front import FastFront
    from mcpopt.upstream.pipes import CorkedWriter

    read_fd, write_fd = os.pipe()
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(write_fd, "wb", buffering=0)
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return read_fd, transport, FastFront(gateway, CorkedWriter(writer))


def test_fast_path_failure_is_internal_error_without_internals(tmp_path: Path) -> None:
    """The stdio fast path, on a failure nobody foresaw: -32603 naming the call, no Python text."""
    from mcpopt.config import load_config
    from mcpopt.gateway.assembly import build_gateway

    config = write_config(tmp_path / "g.yaml", {"time": time_entry()})

    async def scenario() -> dict[str, Any]:
        gateway = build_gateway(load_config(config))
        async with gateway.running():

            async def broken(call: Any) -> Any:
                raise AttributeError("'list' object has no attribute 'get'")

            gateway.upstreams["time"].call = broken  # type: ignore[method-assign]  # an unforeseen fault
            read_fd, transport, fast = await _fast_front_on_a_pipe(gateway)
            await fast._call(3, {"name": "time__get_current_time", "arguments": {"timezone": "UTC"}}, "2025-06-18")
            await asyncio.sleep(0.05)
            transport.close()
            with os.fdopen(read_fd, "rb") as f:
                return json.loads(f.readline())

    answer = asyncio.run(scenario())
    assert answer["id"] == 3
    assert answer["error"]["code"] == -32603
    assert "attribute" not in answer["error"]["message"] and "'list'" not in answer["error"]["message"]
    assert "time" in answer["error"]["message"]


def test_fast_path_forgets_finished_and_cancelled_calls(tmp_path: Path) -> None:
    """The stdio fast path's in-flight ids: a call that ends forgets its id itself, and so does one
    the client cancels before it ever ran (no answer for it); the id is then free for a new call."""
    from mcp_types import PROTOCOL_VERSION_META_KEY

    from mcpopt.config import load_config
    from mcpopt.gateway.assembly import build_gateway

    config = write_config(tmp_path / "g.yaml", {"time": time_entry()})
    meta = {PROTOCOL_VERSION_META_KEY: "2026-07-28"}

    def request(rid: int) -> dict[str, Any]:
        params = {"name": "time__get_current_time", "arguments": {"timezone": "UTC"}, "_meta": meta}
        return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}

    async def scenario() -> tuple[list[Any], list[Any], list[dict[str, Any]]]:
        gateway = build_gateway(load_config(config))
        async with gateway.running():
            read_fd, transport, fast = await _fast_front_on_a_pipe(gateway)
            assert fast.offer(request(1))
            cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}
            assert fast.offer(cancel)  # before the call's task ever ran
            task = fast.inflight[1]
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.sleep(0)  # the done callbacks run
            after_cancel = list(fast.inflight)
            assert fast.offer(request(1))  # the id is free again
            await fast.inflight[1]
            after_call = list(fast.inflight)
            await fast.writer.drain()  # everything written is in the pipe now
            os.set_blocking(read_fd, False)
            with os.fdopen(read_fd, "rb") as f:
                answers = [json.loads(line) for line in (f.read() or b"").splitlines()]
            transport.close()
            return after_cancel, after_call, answers

    after_cancel, after_call, answers = asyncio.run(scenario())
    assert after_cancel == [] and after_call == []
    assert [a["id"] for a in answers] == [1] and "result" in answers[0]
