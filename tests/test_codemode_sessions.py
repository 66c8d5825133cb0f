"""Code sessions: state kept across calls of one client, isolated between clients, bounded, and a
clear message when a session is gone -- on both backends, against real servers and real clients.

One in-process gateway per module over the real server-everything and server-filesystem; each
test builds its own `CodeModeTool` (own sessions and bounds). Verdicts are about what the code
sees (values, errors, notes), never about how long anything took.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp_types.version import LATEST_HANDSHAKE_VERSION, LATEST_MODERN_VERSION

from conftest import MCPOPT, ROOT, everything_entry, filesystem_entry, free_port, memory_entry, wait_http, write_config
from mcpopt.api import ClientLink, no_progress
from mcpopt.codemode.sandbox import CodeModeSettings
from mcpopt.codemode.tool import META_KEY, CodeModeTool
from mcpopt.config import load_config
from mcpopt.gateway.assembly import build_gateway
from mcpopt.gateway.server import Gateway
from mcpopt.pipeline import ToolCall
from mcpopt.state import MemoryStateStore

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

HAVE_WASM = (ROOT / "node_modules" / "pyodide" / "pyodide.mjs").is_file()
BACKENDS = ["monty", pytest.param("wasm", marks=pytest.mark.skipif(not HAVE_WASM, reason="npm pyodide missing"))]


def link(session_id: str = "", *, principal: Any = None, modern: bool = False) -> ClientLink:
    version = LATEST_MODERN_VERSION if modern else LATEST_HANDSHAKE_VERSION
    return ClientLink(version, None, None, None, lambda _t: no_progress, session_id=session_id, principal=principal)


class Recorder:
    """A pipeline filter that records the names of the calls passing through."""

    def __init__(self) -> None:
        self.names: list[str] = []

    async def __call__(self, call: ToolCall, next: Any) -> Any:
        self.names.append(call.name)
        return await next(call)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("codemode-sessions").resolve()
    (base / "files").mkdir()
    (base / "files" / "log.txt").write_text("ok 1\nERROR disk full\nok 2\nERROR timeout\n", encoding="utf-8")
    return base


@pytest.fixture(scope="module")
async def gateway(folder: Path) -> Any:
    servers = {"everything": everything_entry(), "filesystem": filesystem_entry(folder / "files")}
    gw = build_gateway(load_config(data={"mcpServers": servers, "gateway": {"call_timeout_ms": 30000}}))
    async with gw.running():
        recorder = Recorder()
        gw.pipeline.set_filters([recorder, *gw.pipeline.filters])
        gw.recorder = recorder  # type: ignore[attr-defined]
        yield gw


def settings(**sessions: Any) -> CodeModeSettings:
    return CodeModeSettings(timeout_ms=30_000, sessions=sessions)


def text(result: dict[str, Any]) -> str:
    return "".join(b.get("text", "") for b in result["content"])


async def run(tool: CodeModeTool, source: str, who: ClientLink, backend: str, **extra: Any) -> dict[str, Any]:
    return await tool.handler({"code": source, "backend": backend, **extra}, who)


def session_meta(result: dict[str, Any]) -> dict[str, Any]:
    return result["_meta"][META_KEY]["session"]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_state_is_kept_across_three_calls_and_isolated_between_two_clients(
    gateway: Gateway, folder: Path, backend: str
) -> None:
    tool = CodeModeTool(gateway, settings())
    alice, bob = link("client-a"), link("client-b")
    try:
        log = str(folder / "files" / "log.txt")
        # 1: fetch once, keep the data, a helper, an import and a scratch file.
        first = await run(
            tool,
            "import json\n"
            f"text = (await tools.filesystem.read_text_file(path={log!r}))['content']\n"
            "def errors(t):\n    return [l for l in t.splitlines() if l.startswith('ERROR')]\n"
            "open('/tmp/notes.txt', 'w').write('first call')\n"
            "len(text)",
            alice,
            backend,
        )
        assert not first.get("isError"), text(first)
        assert session_meta(first)["new"] is True and session_meta(first)["keyed_by"] == "client session"
        # Another client runs in between and sees none of it.
        intruder = await run(tool, "text", bob, backend)
        assert intruder.get("isError") and "NameError" in text(intruder), text(intruder)
        assert session_meta(intruder)["id"] != session_meta(first)["id"]
        assert not (await run(tool, "text = 'bob'\nkept = 1", bob, backend)).get("isError")
        # 2: filter what call 1 fetched, without fetching again.
        gateway.recorder.names.clear()  # type: ignore[attr-defined]
        second = await run(tool, "found = errors(text)\njson.dumps(found)", alice, backend)
        assert text(second) == '["ERROR disk full", "ERROR timeout"]', text(second)
        assert gateway.recorder.names == []  # type: ignore[attr-defined]
        assert session_meta(second)["new"] is False and session_meta(second)["calls"] == 2
        # 3: use all of it -- variables, the helper, the import, the file -- with one tool call.
        third = await run(
            tool,
            "note = open('/tmp/notes.txt').read()\n"
            "r = await tools.everything.echo(message=f'{len(found)} errors; {note}')\n"
            "print(r)\njson.dumps(errors('ERROR x'))",
            alice,
            backend,
        )
        assert text(third) == 'Echo: 2 errors; first call\n["ERROR x"]', text(third)
        assert session_meta(third)["calls"] == 3
        # Bob's session kept his own values, never Alice's.
        assert text(await run(tool, "print(text, kept)", bob, backend)) == "bob 1"
        leak = await run(tool, "open('/tmp/notes.txt').read()", bob, backend)
        assert leak.get("isError") and "first call" not in text(leak), text(leak)
    finally:
        await tool.aclose()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_eviction_gives_a_clear_message(gateway: Gateway, backend: str) -> None:
    bound = {"max_sessions": 2} if backend == "monty" else {"max_interpreters": 2}
    cause = "max_sessions" if backend == "monty" else "max_interpreters"
    tool = CodeModeTool(gateway, settings(**bound))
    try:
        for who, source in (("a", "x = 41"), ("b", "y = 1"), ("c", "z = 2")):  # c evicts a, the least recently used
            assert not (await run(tool, source, link(who), backend)).get("isError")
        assert text(await run(tool, "y", link("b"), backend)) == "1"  # b stayed, untouched
        again = await run(tool, "x + 1", link("a"), backend)
        body = text(again)
        assert again.get("isError") and "NameError" in body
        assert (
            "this call ran in a new code session: the previous one is gone (evicted as the least recently used "
            f"session (gateway.code_mode.sessions.{cause}: 2))" in body
        ), body
        assert session_meta(again)["new"] is True and "evicted" in session_meta(again)["lost"]
        assert tool.sessions.evictions == {cause: 2}  # a, then c to make room for a's new session
        assert text(await run(tool, "x = 1\nx", link("a"), backend)) == "1"
        assert len(tool.sessions) == 2
    finally:
        await tool.aclose()


async def test_a_session_expires_after_its_ttl(gateway: Gateway) -> None:
    tool = CodeModeTool(gateway, settings(ttl_s=60))
    now = [1000.0]
    tool.sessions._clock = lambda: now[0]  # noqa: SLF001 - a controlled clock instead of waiting
    try:
        assert not (await run(tool, "x = 1", link("a"), "monty")).get("isError")
        now[0] += 59
        assert text(await run(tool, "x", link("a"), "monty")) == "1"  # used: its TTL starts again
        now[0] += 61
        gone = await run(tool, "x", link("a"), "monty")
        assert gone.get("isError") and "expired after 60 s unused (gateway.code_mode.sessions.ttl_s)" in text(gone)
    finally:
        await tool.aclose()


async def test_a_bare_name_error_in_a_new_session_says_why(gateway: Gateway) -> None:
    """No tombstone (e.g. the gateway restarted): the NameError still comes with an explanation."""
    tool = CodeModeTool(gateway, settings())
    try:
        result = await run(tool, "data_from_before", link("never-seen"), "monty")
        assert result.get("isError") and "NameError" in text(result)
        assert "this call ran in a new code session (no earlier state was found for this client" in text(result)
    finally:
        await tool.aclose()


async def test_a_monty_session_moves_to_another_replica_through_the_shared_store(gateway: Gateway) -> None:
    shared = MemoryStateStore()
    one = CodeModeTool(gateway, settings(secret="shared-key"), state=shared)
    two = CodeModeTool(gateway, settings(secret="shared-key"), state=shared)
    try:
        gateway.recorder.names.clear()  # type: ignore[attr-defined]
        first = await run(
            one,
            "r = await tools.everything.echo(message='once')\nopen('/tmp/f', 'w').write('file')",
            link("c"),
            "monty",
        )
        assert not first.get("isError"), text(first)
        moved = await run(two, "print(r, open('/tmp/f').read())", link("c"), "monty")
        assert text(moved) == "Echo: once file", text(moved)
        assert session_meta(moved)["new"] is False and session_meta(moved)["calls"] == 2
        # The state moved; the tool call of the first call was not made again (a snapshot, no replay).
        assert gateway.recorder.names == ["everything__echo"]  # type: ignore[attr-defined]
        # Another replica with a different key refuses the blob.
        other = CodeModeTool(gateway, settings(secret="another-key"), state=shared)
        refused = await run(other, "r", link("c"), "monty")
        assert refused.get("isError") and "failed its integrity check" in text(refused), text(refused)
        await other.aclose()
    finally:
        await one.aclose()
        await two.aclose()


@pytest.mark.skipif(not HAVE_WASM, reason="npm pyodide missing")
async def test_a_wasm_session_on_another_replica_is_reported_lost(gateway: Gateway) -> None:
    shared = MemoryStateStore()
    one = CodeModeTool(gateway, settings(secret="k"), state=shared)
    two = CodeModeTool(gateway, settings(secret="k"), state=shared)
    try:
        assert not (await run(one, "x = 1", link("w"), "wasm")).get("isError")
        there = await run(two, "x", link("w"), "wasm")
        assert there.get("isError") and "wasm sessions live in one interpreter process" in text(there), text(there)
    finally:
        await one.aclose()
        await two.aclose()


async def test_tampered_state_is_refused(gateway: Gateway) -> None:
    store = MemoryStateStore()
    tool = CodeModeTool(gateway, settings(), state=store)
    try:
        assert not (await run(tool, "x = 1", link("t"), "monty")).get("isError")
        key = next(k for k in store._data if k.startswith("codemode:session:"))  # noqa: SLF001
        blob = bytearray(await store.get(key) or b"")
        blob[-1] ^= 0xFF
        await store.set(key, bytes(blob), 60)
        result = await run(tool, "x", link("t"), "monty")
        assert result.get("isError") and "its stored state failed its integrity check" in text(result)
    finally:
        await tool.aclose()


async def test_principals_names_and_stateless_clients(gateway: Gateway) -> None:
    tool = CodeModeTool(gateway, settings())
    try:
        # 2026-07-28 clients have no session: their calls share the principal's code session.
        assert not (await run(tool, "x = 'alice'", link(principal="alice", modern=True), "monty")).get("isError")
        same = await run(tool, "x", link(principal="alice", modern=True), "monty")
        assert text(same) == "'alice'" or text(same) == "alice", text(same)
        assert session_meta(same)["keyed_by"] == "principal"
        other = await run(tool, "x", link(principal="bob", modern=True), "monty")
        assert other.get("isError") and "NameError" in text(other)
        # A named session is separate from the default one, and scoped to its principal.
        assert not (await run(tool, "x = 'named'", link(principal="alice", modern=True), "monty", session="s1")).get(
            "isError"
        )
        assert text(await run(tool, "x", link(principal="alice", modern=True), "monty")) in ("'alice'", "alice")
        named = await run(tool, "x", link(principal="alice", modern=True), "monty", session="s1")
        assert text(named) in ("'named'", "named") and session_meta(named)["keyed_by"] == "name"
        stolen = await run(tool, "x", link(principal="bob", modern=True), "monty", session="s1")
        assert stolen.get("isError") and "NameError" in text(stolen)
    finally:
        await tool.aclose()


async def test_a_limit_drops_that_calls_changes_only(gateway: Gateway) -> None:
    # The short wall-time limit applies to the looping execution only: under load an ordinary
    # execution must not hit it (a 1.5 s limit for all of them did).
    generous = CodeModeSettings(timeout_ms=60_000)
    tool = CodeModeTool(gateway, generous)
    try:
        assert not (await run(tool, "x = 1", link("l"), "monty")).get("isError")
        tool.settings = generous.model_copy(update={"timeout_ms": 1500})
        try:
            stopped = await run(tool, "x = 2\nwhile True:\n    pass", link("l"), "monty")
        finally:
            tool.settings = generous
        assert stopped.get("isError") and "TimeoutError" in text(stopped)
        assert "this call's changes to the code session were discarded" in text(stopped)
        assert text(await run(tool, "x", link("l"), "monty")) == "1"
        # An ordinary exception keeps what ran before it (REPL semantics).
        failed = await run(tool, "x = 3\nraise ValueError('no')", link("l"), "monty")
        assert failed.get("isError") and "ValueError" in text(failed)
        assert text(await run(tool, "x", link("l"), "monty")) == "3"
    finally:
        await tool.aclose()


@pytest.mark.skipif(not HAVE_WASM, reason="npm pyodide missing")
async def test_a_wasm_session_killed_by_a_limit_is_reported(gateway: Gateway) -> None:
    tool = CodeModeTool(gateway, CodeModeSettings(timeout_ms=30_000, memory_mb=128))
    try:
        assert not (await run(tool, "x = 1", link("k"), "wasm")).get("isError")
        bomb = await run(tool, "chunks = []\nwhile True:\n    chunks.append('m' * 1_000_000)", link("k"), "wasm")
        assert bomb.get("isError") and "MemoryError" in text(bomb), text(bomb)
        after = await run(tool, "x", link("k"), "wasm")
        assert after.get("isError") and "its interpreter was stopped by a limit (MemoryError)" in text(after)
    finally:
        await tool.aclose()


async def test_too_large_a_session_is_not_kept(gateway: Gateway) -> None:
    tool = CodeModeTool(gateway, settings(max_session_bytes=50_000))
    try:
        big = await run(tool, "blob = 'z' * 200_000\n'made'", link("big"), "monty")
        assert "the code session was not kept: its state grew to" in text(big), text(big)
        assert "max_session_bytes" in text(big)
        after = await run(tool, "blob", link("big"), "monty")
        assert after.get("isError") and "over the 50,000-byte limit" in text(after)
    finally:
        await tool.aclose()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_two_real_clients_over_http_have_their_own_sessions(tmp_path: Path, backend: str) -> None:
    """Two SDK clients on the gateway's Streamable HTTP front: one code session each."""
    config = write_config(tmp_path / "gw.yaml", {"everything": everything_entry()}, {"exposure": "code"})
    port = free_port()
    proc = subprocess.Popen(
        [MCPOPT, "serve", "-c", str(config), "-t", "http", "--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=str(ROOT),
    )
    try:
        wait_http(port, proc, timeout=60)
        url = f"http://127.0.0.1:{port}/mcp"
        async with Client(url, mode="legacy") as one, Client(url, mode="legacy") as two:
            names = {t.name for t in (await one.list_tools()).tools}
            assert "mcpopt__execute_code" in names

            async def call(client: Client, source: str) -> Any:
                return await client.call_tool("mcpopt__execute_code", {"code": source, "backend": backend})

            def body(result: Any) -> str:
                return "".join(getattr(b, "text", "") for b in result.content)

            await call(one, "who = 'one'\ncount = 1")
            await call(two, "who = 'two'")
            await call(one, "count += 1")
            r1, r2 = await call(one, "print(who, count)"), await call(two, "who, count")
            assert body(r1) == "one 2"
            assert r2.is_error and "NameError" in body(r2) and "count" in body(r2)
            meta = (r1.meta or {})[META_KEY]
            assert meta["session"]["keyed_by"] == "client session" and meta["session"]["calls"] == 3
            assert json.dumps(meta["layers"])  # the layers are reported to the client
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()


async def test_the_three_call_scenario_reads_once_and_costs_fewer_tokens_with_sessions(tmp_path: Path) -> None:
    """examples/scenarios/code_sessions.py's task, one round each way: behaviour only (no timings)."""
    from mcpopt.bench.code_sessions import compare

    folder = tmp_path  # already absolute
    servers = {
        "filesystem": filesystem_entry(folder),
        "memory": {**memory_entry(folder / "memory.jsonl"), "max_concurrency": 1},
    }
    gw = build_gateway(load_config(data={"mcpServers": servers, "gateway": {"call_timeout_ms": 30000}}))
    async with gw.running():
        report = await compare(gw, folder, rounds=1)
    with_s, without = report["with_sessions"], report["without_sessions"]
    assert (with_s["log_reads"], with_s["tool_calls"]) == (1, 2)
    assert (without["log_reads"], without["tool_calls"]) == (3, 4)
    assert with_s["total"] < without["total"] and with_s["output"][-1] == without["output"][-1]
    through = report["through_the_model"]
    assert (through["log_reads"], through["tool_calls"]) == (1, 2)
    assert through["total"] > 10 * with_s["total"] and through["output"][-1] == with_s["output"][-1]


def test_bad_code_mode_settings_name_their_key() -> None:
    from mcpopt.errors import ConfigError

    for key, value, where in (
        ("sessions", {"ttl_s": -1}, "gateway.code_mode.sessions.ttl_s"),
        ("isolation", {"mode": "docker"}, "gateway.code_mode.isolation.mode"),
        ("private_data", {"kinds": ["dna"]}, "gateway.code_mode.private_data.kinds"),
        ("skills", {"max_per_principal": 0}, "gateway.code_mode.skills.max_per_principal"),
    ):
        with pytest.raises(ConfigError, match=f"key '{where}"):
            load_config(data={"mcpServers": {}, "gateway": {"code_mode": {key: value}}})
