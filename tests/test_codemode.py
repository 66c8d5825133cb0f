"""Code mode: stubs from real tool schemas, code that calls tools, both backends, the data-heavy scenario.

One in-process gateway per module over the real server-memory, server-filesystem and
server-everything; the wasm backend's Deno process is started once for the module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError
from mcp_types.version import LATEST_HANDSHAKE_VERSION

from conftest import everything_entry, filesystem_entry, memory_entry
from mcpopt.api import ClientLink, no_progress
from mcpopt.bench.data_heavy import count_tokens, data_heavy
from mcpopt.codemode.sandbox import CodeModeSettings
from mcpopt.codemode.stubs import ToolNamespaces, annotation, identifier, shape
from mcpopt.codemode.tool import META_KEY, CodeModeTool, sandbox_value
from mcpopt.config import load_config
from mcpopt.gateway.assembly import build_gateway
from mcpopt.gateway.server import Gateway
from mcpopt.pipeline import ToolCall

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

LINK = ClientLink(LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: no_progress)
HAVE_WASM = (Path(__file__).resolve().parents[1] / "node_modules" / "pyodide" / "pyodide.mjs").is_file()


class Recorder:
    """A pipeline filter that records the names of the calls passing through."""

    def __init__(self) -> None:
        self.names: list[str] = []

    async def __call__(self, call: ToolCall, next: Any) -> Any:
        self.names.append(call.name)
        return await next(call)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("codemode").resolve()
    (base / "files").mkdir()
    (base / "files" / "notes.txt").write_text("alpha\nbeta ERROR one\ngamma\n", encoding="utf-8")
    return base


@pytest.fixture(scope="module")
async def gateway(folder: Path) -> Any:
    servers = {
        "memory": memory_entry(folder / "memory.jsonl"),
        "filesystem": filesystem_entry(folder / "files"),
        "everything": everything_entry(),
    }
    gw = build_gateway(load_config(data={"mcpServers": servers, "gateway": {"call_timeout_ms": 30000}}))
    async with gw.running():
        recorder = Recorder()
        gw.pipeline.set_filters([recorder, *gw.pipeline.filters])
        gw.recorder = recorder  # type: ignore[attr-defined]
        yield gw


@pytest.fixture(scope="module")
async def code(gateway: Gateway) -> Any:
    tool = CodeModeTool(gateway, CodeModeSettings(timeout_ms=20_000, max_output_bytes=4000))
    yield tool
    await tool.aclose()


@pytest.fixture(scope="module")
async def stateless(gateway: Gateway) -> Any:
    """Code mode without sessions: every execution starts from a fresh namespace."""
    settings = CodeModeSettings(timeout_ms=20_000, max_output_bytes=4000, sessions={"enabled": False})
    tool = CodeModeTool(gateway, settings)
    yield tool
    await tool.aclose()


def text(result: dict[str, Any]) -> str:
    return "".join(b.get("text", "") for b in result["content"])


async def run(code: CodeModeTool, source: str, backend: str | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {"code": source}
    if backend:
        args["backend"] = backend
    return await code.handler(args, LINK)


# ---- stubs ---------------------------------------------------------------------------------
def test_annotations_from_json_schema() -> None:
    assert annotation({"type": "string"}) == "str"
    assert annotation({"type": "integer"}) == "int"
    assert annotation({"type": "array", "items": {"type": "number"}}) == "list[float]"
    assert annotation({"type": "array"}) == "list[Any]"
    assert annotation({"type": "object", "additionalProperties": {"type": "boolean"}}) == "dict[str, bool]"
    assert annotation({"type": "object", "properties": {"a": {}}}) == "dict[str, Any]"
    assert annotation({"enum": ["a", "b"]}) == "Literal['a', 'b']"
    assert annotation({"const": 3}) == "Literal[3]"
    assert annotation({"type": ["string", "null"]}) == "str | None"
    assert annotation({"anyOf": [{"type": "null"}, {"type": "integer"}, {"type": "string"}]}) == "int | str | None"
    assert annotation({"$ref": "#/defs/x"}) == "Any"
    assert annotation(None) == "Any"
    obj = {"type": "object", "properties": {"n": {"type": "string"}, "t": {"type": "array"}}, "required": ["n"]}
    assert shape({"type": "array", "items": obj}) == "list[{n: str, t?: list[Any]}]"


def test_identifiers_are_sanitized_and_unique() -> None:
    assert identifier("get-sum") == "get_sum"
    assert identifier("a.b c") == "a_b_c"
    assert identifier("2fa") == "_2fa"
    assert identifier("from") == "from_"
    assert identifier("x", {"x"}) == "x_2"
    assert identifier("x", {"x", "x_2"}) == "x_3"


def test_stub_of_a_synthetic_tool_maps_names_and_compiles() -> None:
    tool = types.Tool(
        name="srv__do-it",
        description="Does it.",
        input_schema={
            "type": "object",
            "properties": {
                "from": {"type": "string", "description": "start"},
                "limit": {"type": "integer", "default": 10},
                "mode": {"enum": ["fast", "slow"]},
                "items": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"}}}},
            },
            "required": ["items", "from"],
        },
    )
    ns = ToolNamespaces([("srv__do-it", "my-srv", "do-it", tool), ("srv__do_it", "my-srv", "do_it", tool)])
    assert ns.path_of("srv__do-it") == "tools.my_srv.do_it"
    assert ns.path_of("srv__do_it") == "tools.my_srv.do_it_2"
    stub = ns.stub_for("srv__do-it")
    assert stub is not None
    assert (
        "async def do_it(from_: str, items: list[dict[str, Any]], *, limit: int | None = None, "
        "mode: Literal['fast', 'slow'] | None = None) -> Any:" in stub
    )
    assert "Default: 10." in stub and "(argument 'from')" in stub and "Shape: list[{id?: int}]" in stub
    compile(ns.prelude(), "<prelude>", "exec")  # valid CPython (the wasm backend runs it as is)
    assert "'from': from_" in ns.prelude()
    # Only the namespaces the code uses are defined, unless it uses `tools` otherwise.
    assert "_McpoptNs_my_srv" not in ns.prelude("print(1)")
    assert "_McpoptNs_my_srv" in ns.prelude("await tools.my_srv.do_it(from_='a', items=[])")
    assert "_McpoptNs_my_srv" in ns.prelude("t = tools\nawait getattr(t, 'my_srv').do_it('a', [])")


async def test_stubs_from_real_tool_schemas(code: CodeModeTool) -> None:
    create = code.stub_for("memory__create_entities")
    assert create is not None
    assert "await tools.memory.create_entities(...)" in create
    assert "async def create_entities(entities: list[dict[str, Any]])" in create
    assert "list[{name: str, entityType: str, observations: list[str]}]" in create
    read = code.stub_for("filesystem__read_text_file")
    assert read is not None and "async def read_text_file(path: str, *, " in read and "| None = None" in read
    get_sum = code.stub_for("everything__get-sum")
    assert get_sum is not None and "async def get_sum(a: float, b: float) -> Any:" in get_sum
    assert code.namespaces.path_of("everything__get-sum") == "tools.everything.get_sum"
    assert code.signature_of("everything__get-sum") == "tools.everything.get_sum(a: float, b: float) -> Any"
    assert code.stub_for("mcpopt__batch") is None  # the gateway's own tools are not in `tools`
    assert set(code.namespaces.summary()) == {"memory", "filesystem", "everything"}


def test_sandbox_value_of_results() -> None:
    assert sandbox_value({"content": [{"type": "text", "text": "x"}], "structuredContent": {"a": 1}}) == {"a": 1}
    assert sandbox_value({"content": [{"type": "text", "text": '{"b": [1, 2]}'}]}) == {"b": [1, 2]}
    assert sandbox_value({"content": [{"type": "text", "text": "plain words"}]}) == "plain words"
    assert sandbox_value({"content": [{"type": "text", "text": "1"}, {"type": "text", "text": "two"}]}) == [1, "two"]
    assert sandbox_value({"content": []}) is None


def test_tool_definition_is_small() -> None:
    gw = build_gateway(load_config(data={"mcpServers": {}}))
    tool = CodeModeTool(gw)
    assert tool.name == "mcpopt__execute_code"
    assert tool.tool.input_schema["required"] == ["code"]
    assert count_tokens(json.dumps(tool.tool.model_dump(by_alias=True, exclude_none=True))) < 320


# ---- execution (monty) ---------------------------------------------------------------------
async def test_code_calls_tools_and_returns_a_value(gateway: Gateway, code: CodeModeTool) -> None:
    gateway.recorder.names.clear()  # type: ignore[attr-defined]
    result = await run(
        code,
        "s = await tools.everything.get_sum(a=2, b=3)\n"
        "print('sum says:', s)\n"
        "notes = await tools.filesystem.read_text_file(path=" + repr(str(gateway_folder(gateway) / "notes.txt")) + ")\n"
        "[line for line in notes['content'].splitlines() if 'ERROR' in line]",
    )
    assert not result.get("isError"), text(result)
    assert text(result) == 'sum says: The sum of 2 and 3 is 5.\n["beta ERROR one"]'
    meta = result["_meta"][META_KEY]
    assert meta["tool_calls"] == 2 and meta["backend"] == "monty" and meta["ok"]
    # Both calls went through the gateway's pipeline under their gateway names.
    assert gateway.recorder.names == ["everything__get-sum", "filesystem__read_text_file"]  # type: ignore[attr-defined]


def gateway_folder(gateway: Gateway) -> Path:
    return Path(gateway.config.mcpServers["filesystem"].args[-1])


async def test_memory_round_trip_with_gather(code: CodeModeTool) -> None:
    result = await run(
        code,
        "import asyncio\n"
        "await tools.memory.create_entities(entities=[{'name': 'cm-a', 'entityType': 't', 'observations': ('x',)}])\n"
        "g, s = await asyncio.gather(tools.memory.read_graph(), tools.memory.search_nodes(query='cm-a'))\n"
        "return {'names': sorted(e['name'] for e in g['entities']), 'found': len(s['entities'])}",
    )
    assert not result.get("isError"), text(result)
    data = json.loads(text(result))
    assert "cm-a" in data["names"] and data["found"] == 1


async def test_tool_errors_are_runtime_errors_in_the_sandbox(code: CodeModeTool) -> None:
    result = await run(
        code,
        "try:\n"
        "    await tools.filesystem.read_text_file(path='/definitely/not/allowed.txt')\n"
        "except RuntimeError as e:\n"
        "    print('caught:', str(e)[:60])\n",
    )
    assert not result.get("isError"), text(result)
    assert text(result).startswith("caught: tools.filesystem.read_text_file failed:")
    uncaught = await run(code, "await tools.filesystem.read_text_file(path='/nope')")
    assert uncaught.get("isError") and "RuntimeError: tools.filesystem.read_text_file failed" in text(uncaught)
    bad_args = await run(code, "await tools.everything.get_sum(a=1)")
    assert bad_args.get("isError") and "TypeError" in text(bad_args) and "'b'" in text(bad_args)


async def test_without_sessions_each_execution_has_a_fresh_namespace(stateless: CodeModeTool) -> None:
    assert not (await run(stateless, "leftover = 41\nleftover + 1")).get("isError")
    again = await run(stateless, "leftover")
    assert again.get("isError") and "NameError" in text(again)
    assert "session" not in again["_meta"][META_KEY]


async def test_output_is_capped_with_a_marker(code: CodeModeTool) -> None:
    result = await run(code, "for i in range(2000):\n    print('line', i)\n'done'")
    body = text(result)
    assert not result.get("isError")
    assert len(body.encode()) < 4000 + 300
    assert "[mcpopt: output cut at 4,000 bytes;" in body and "bytes left out" in body


async def test_handler_rejects_bad_arguments(code: CodeModeTool) -> None:
    with pytest.raises(MCPError, match="'code' must be a non-empty string"):
        await code.handler({}, LINK)
    with pytest.raises(MCPError, match="backend must be"):
        await code.handler({"code": "1", "backend": "cpython"}, LINK)


async def test_syntax_error_is_reported(code: CodeModeTool) -> None:
    result = await run(code, "def broken(:\n    pass")
    assert result.get("isError") and "SyntaxError" in text(result)


async def test_monty_has_a_subset_of_the_stdlib(code: CodeModeTool) -> None:
    ok = await run(code, "import json, re, collections\njson.dumps(collections.Counter(re.findall('a', 'banana')))")
    assert text(ok) == '{"a": 3}'
    missing = await run(code, "import statistics")
    assert missing.get("isError") and "ModuleNotFoundError" in text(missing)


# ---- the data-heavy scenario (token ledger) -------------------------------------------------
async def test_data_heavy_scenario_saves_95_percent(gateway: Gateway, code: CodeModeTool) -> None:
    report = await data_heavy(gateway, code, gateway_folder(gateway), size_bytes=2_000_000)
    assert report.matching_lines == 5 and report.file_bytes >= 2_000_000
    assert report.direct.total > 100_000
    assert report.code.total < 2_000
    assert report.saving_pct >= 95.0, report.as_dict()
    assert "5 ERROR lines" in report.code_output


# ---- the wasm backend ----------------------------------------------------------------------
wasm = pytest.mark.skipif(not HAVE_WASM or shutil.which("node") is None, reason="npm pyodide not installed")


@wasm
async def test_wasm_calls_tools_with_the_full_stdlib(gateway: Gateway, code: CodeModeTool) -> None:
    result = await run(
        code,
        "import statistics, textwrap\n"
        "s = await tools.everything.get_sum(a=4, b=5)\n"
        "print(textwrap.shorten(s, 20))\n"
        "return statistics.mean([1, 2, 3, 6])",
        backend="wasm",
    )
    assert not result.get("isError"), text(result)
    assert text(result) == "The sum of 4 [...]\n3"
    assert result["_meta"][META_KEY]["backend"] == "wasm"


@wasm
async def test_wasm_fresh_namespace_errors_and_scratch(stateless: CodeModeTool) -> None:
    source = "leftover = 1\nopen('/tmp/s.txt', 'w').write('x')"
    assert not (await run(stateless, source, backend="wasm")).get("isError")
    again = await run(stateless, "import os\nprint(os.listdir('/tmp'))\nleftover", backend="wasm")
    assert again.get("isError") and "[]" in text(again) and "NameError" in text(again)
    caught = await run(
        stateless,
        "try:\n    await tools.filesystem.read_text_file(path='/nope')\nexcept RuntimeError as e:\n    print('caught')",
        backend="wasm",
    )
    assert text(caught) == "caught"
