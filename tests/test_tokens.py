"""Token ledger: offline counts, per-mode list costs, context items, and the in-process gateway report."""

from __future__ import annotations

from pathlib import Path

import mcp_types as types
import pytest

from conftest import fake_entry, write_config
from mcpopt.bench.tokens import gateway_report
from mcpopt.discovery.tokens import (
    SCENARIOS,
    ContextItem,
    catalog_tools,
    count_context,
    count_tokens,
    ledger,
    mode_lists,
    tools_json,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "livemcpbench"
needs_data = pytest.mark.skipif(not (DATA / "tools.json").is_file(), reason="LiveMCPBench data not beside the repo")


def test_count_tokens_offline() -> None:
    assert count_tokens("hello world") == 2  # cl100k_base: "hello", " world"
    assert count_tokens("") == 0
    assert count_tokens("<|endoftext|>") > 1  # special tokens are counted as text, never refused


def test_tools_json_uses_protocol_field_names() -> None:
    t = types.Tool(name="a", input_schema={"type": "object"})
    assert tools_json([t]) == '[{"name":"a","inputSchema":{"type":"object"}}]'


def test_count_context_items() -> None:
    items = [
        ContextItem.of_tools("list", [types.Tool(name="a", input_schema={"type": "object"})]),
        ContextItem.of_json("arguments", "call 1", {"path": "/tmp/x"}),
        ContextItem("result", "call 1", "some text"),
    ]
    counts = count_context(items)
    assert counts["total"] == sum(r["tokens"] for r in counts["items"]) > 0
    assert set(counts["by_kind"]) == {"tools", "arguments", "result"}
    assert all(r["tokens"] > 0 for r in counts["items"])


@needs_data
def test_search_mode_under_10_percent_of_full_on_527_tools() -> None:
    tools = catalog_tools(DATA / "tools.json")
    assert len(tools) == 527
    costs = ledger(mode_lists(tools, [], "mcpopt__"))
    assert all(c.tokens > 0 for c in costs.values())
    assert costs["search"].tokens < 0.10 * costs["full"].tokens
    assert costs["code"].tokens < 0.10 * costs["full"].tokens
    assert costs["search"].saving >= 0.9 and costs["full"].saving == 0.0


@pytest.mark.anyio
async def test_gateway_report_in_process(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "mcpopt.yaml", {"fake": fake_entry()})
    report = await gateway_report(cfg)
    modes = report["sources"]["gateway"]
    assert set(modes) == {"full", "search", "code"}
    assert modes["full"]["tools"] >= 6 and modes["search"]["tools"] == 3
    assert 0 < modes["search"]["tokens"] < modes["full"]["tokens"]
    assert report["scenarios"] == {name: report["scenarios"][name] for name in SCENARIOS}
