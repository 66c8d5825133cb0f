"""Faults: an upstream killed mid-call, a hanging upstream, one that exits on a call, one that
never starts; unknown tools; a 10 MB result; tools/list_changed relayed to a legacy client."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from fake_upstream import big_text
from mcp import MCPError
from mcp_types import INVALID_PARAMS

from conftest import (
    MCPOPT,
    ROOT,
    everything_entry,
    fake_entry,
    find_gateway,
    gateway_client,
    poll,
    text_of,
    time_entry,
    write_config,
)
from mcpopt.errors import UPSTREAM_CLOSED, UPSTREAM_TIMEOUT

pytestmark = pytest.mark.anyio

MISSING_COMMAND = "/nonexistent/bin/mcp-server-nope"


@pytest.fixture(scope="module")
def faults_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(
        tmp_path_factory.mktemp("faults") / "faults.yaml",
        {
            "everything": everything_entry(),
            "time": time_entry(),
            "fake": fake_entry(),
            "hang": fake_entry(timeout_ms=1000),
            "crashy": fake_entry(),
            "broken": {"command": MISSING_COMMAND},
        },
        {"restart": {"initial_backoff_ms": 200, "max_backoff_ms": 1000}},
    )


class Inbox:
    def __init__(self) -> None:
        self.methods: list[str] = []

    async def __call__(self, message: Any) -> None:
        if isinstance(message, Exception):
            return
        note = getattr(message, "root", message)
        method = getattr(note, "method", None)
        if method:
            self.methods.append(method)


@pytest.fixture(scope="module")
def inbox() -> Inbox:
    return Inbox()


@pytest.fixture(scope="module")
async def client(faults_config: Path, inbox: Inbox) -> Any:
    async with gateway_client(faults_config, mode="legacy", message_handler=inbox) as c:
        yield c


async def _tool_names(client: Any) -> set[str]:
    return {t.name for t in (await client.list_tools()).tools}


async def test_failed_upstream_does_not_stop_the_others(client: Any) -> None:
    names = await _tool_names(client)
    assert not any(n.startswith("broken__") for n in names)
    for server in ("everything", "time", "fake", "hang", "crashy"):
        assert any(n.startswith(f"{server}__") for n in names), server
    assert not (await client.call_tool("time__get_current_time", {"timezone": "UTC"})).is_error


async def test_call_on_failed_upstream_names_it(client: Any) -> None:
    with pytest.raises(MCPError) as info:
        await client.call_tool("broken__anything", {})
    msg = str(info.value)
    assert "broken" in msg
    assert "not found" in msg or "unavailable" in msg or "down" in msg, msg


def test_cli_tools_call_on_failed_upstream(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "broken.yaml", {"fake": fake_entry(), "broken": {"command": MISSING_COMMAND}})
    proc = subprocess.run(
        [MCPOPT, "tools", "call", "broken__x", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
        stdin=subprocess.DEVNULL,
    )
    flat = re.sub(r"\s+", " ", proc.stderr)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "broken" in flat
    assert "command not found" in flat, flat
    ok = subprocess.run(
        [MCPOPT, "tools", "call", "fake__echo", "-a", '{"text": "alive"}', "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
        stdin=subprocess.DEVNULL,
    )
    assert ok.returncode == 0, ok.stderr
    assert "alive" in ok.stdout


async def test_hanging_upstream_times_out(client: Any) -> None:
    start = time.monotonic()
    with pytest.raises(MCPError) as info:
        await client.call_tool("hang__hang", {})
    elapsed = time.monotonic() - start
    # The gateway's 1 s timeout answered, not the client's wait or the default 60 s one (the
    # upper bound is generous: a loaded machine may be slow to deliver the error).
    assert 0.9 <= elapsed < 30, elapsed
    assert info.value.error.code == UPSTREAM_TIMEOUT
    msg = str(info.value)
    assert "'hang'" in msg
    assert "within 1 s" in msg, msg
    # The hanging call does not poison the server's session.
    assert text_of(await client.call_tool("hang__echo", {"text": "after"})) == "after"


async def test_upstream_exiting_on_a_call(client: Any) -> None:
    start = time.monotonic()
    with pytest.raises(MCPError) as info:
        await client.call_tool("crashy__exit_now", {})
    # Noticed as a closed upstream (the code below), well before the default 60 s call timeout.
    assert time.monotonic() - start < 30
    assert info.value.error.code == UPSTREAM_CLOSED, info.value
    assert "crashy" in str(info.value)

    async def back() -> bool:
        try:
            return text_of(await client.call_tool("crashy__echo", {"text": "again"})) == "again"
        except MCPError:
            return False

    assert await poll(back), "crashy was not restarted"


async def test_upstream_killed_mid_call(client: Any, faults_config: Path) -> None:
    gateway = find_gateway(faults_config)
    node = [p for p in gateway.children(recursive=True) if any("server-everything" in part for part in p.cmdline())]
    assert len(node) == 1, node
    outcome: dict[str, Any] = {}
    # The kill must hit the call while the server runs it: its first progress notification says
    # so (a fixed sleep raced the call's start on a loaded machine).
    running = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        running.set()

    async def slow_call() -> None:
        try:
            await client.call_tool(
                "everything__trigger-long-running-operation",
                {"duration": 60, "steps": 60},
                progress_callback=on_progress,
            )
            outcome["result"] = "returned"
        except MCPError as exc:
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow_call)
        with anyio.fail_after(30):
            await running.wait()
        killed_at = time.monotonic()
        os.kill(node[0].pid, signal.SIGKILL)
        with anyio.fail_after(30):
            while "at" not in outcome:
                await anyio.sleep(0.02)
    assert "error" in outcome, outcome
    # Answered when the server died, not when the 60 s operation (or the 60 s call timeout) would end.
    assert outcome["at"] - killed_at < 30, outcome["at"] - killed_at
    assert "everything" in str(outcome["error"])
    assert outcome["error"].error.code == UPSTREAM_CLOSED

    # The others keep serving meanwhile.
    assert not (await client.call_tool("time__get_current_time", {"timezone": "UTC"})).is_error

    async def restarted() -> bool:
        return "everything__echo" in await _tool_names(client)

    assert await poll(restarted), "everything's tools did not come back"
    echo = await client.call_tool("everything__echo", {"message": "back"})
    assert "back" in text_of(echo)
    assert not psutil.pid_exists(node[0].pid) or node[0].status() == psutil.STATUS_ZOMBIE


async def test_unknown_tool(client: Any) -> None:
    with pytest.raises(MCPError) as info:
        await client.call_tool("fake__no_such_tool", {})
    assert "fake__no_such_tool" in str(info.value)


async def test_10mb_result_intact(client: Any) -> None:
    size = 10 * 1024 * 1024
    expected = big_text(size)
    result = await client.call_tool("fake__big", {"size": size})
    got = text_of(result)
    assert len(got) == size
    assert hashlib.sha256(got.encode()).hexdigest() == hashlib.sha256(expected.encode()).hexdigest()


async def test_tools_list_changed_reaches_legacy_client(client: Any, inbox: Inbox) -> None:
    before = len(inbox.methods)
    result = await client.call_tool("fake__add_tool", {"name": "added_late"})
    assert "added added_late" in text_of(result)

    async def notified() -> bool:
        return "notifications/tools/list_changed" in inbox.methods[before:]

    assert await poll(notified, interval=0.05), inbox.methods[before:]
    assert "fake__added_late" in await _tool_names(client)
    assert text_of(await client.call_tool("fake__added_late", {"text": "new tool"})) == "new tool"


@pytest.mark.filterwarnings("ignore::mcp.MCPDeprecationWarning")
async def test_subscribe_to_a_served_resource(client: Any) -> None:
    resources = [r for r in (await client.list_resources()).resources if str(r.uri).startswith("everything+")]
    assert resources
    await client.subscribe_resource(str(resources[0].uri))
    await client.unsubscribe_resource(str(resources[0].uri))


@pytest.mark.filterwarnings("ignore::mcp.MCPDeprecationWarning")
async def test_subscribe_to_an_unknown_resource_is_invalid_params(client: Any) -> None:
    with pytest.raises(MCPError) as info:
        await client.subscribe_resource("nosuch://resource")
    assert info.value.error.code == INVALID_PARAMS


def test_cli_tools_call_prints_text_verbatim(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "fake.yaml", {"fake": fake_entry()})
    text = " ".join(f"word{i}" for i in range(60))
    proc = subprocess.run(
        [MCPOPT, "tools", "call", "fake__echo", "-a", f'{{"text": "{text}"}}', "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == text + "\n"
