"""Response shaping: big results are cut with a marker and stay whole as a resource; JSON compacted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fake_upstream import big_text
from mcp import Client

from conftest import fake_entry, gateway_params, text_of, write_config
from mcpopt.pipeline import Pipeline, ToolCall
from mcpopt.pipeline.shaping import ResultStore, ShapingFilter

pytestmark = pytest.mark.anyio


def _call() -> ToolCall:
    return ToolCall("s", "t", "s__t", {"name": "t", "arguments": {}})


async def test_compact_json_and_untouched_small_results() -> None:
    async def upstream(call: ToolCall) -> dict[str, Any]:
        return {"content": [{"type": "text", "text": '{\n  "a": 1,\n  "b": [1, 2]\n}'}, {"type": "text", "text": "x"}]}

    pipe = Pipeline(upstream, [ShapingFilter(ResultStore(10), 0, compact_json=True)])
    out = await pipe(_call())
    assert out["content"][0]["text"] == '{"a":1,"b":[1,2]}'
    assert out["content"][1]["text"] == "x"


async def test_cut_result_keeps_the_whole_as_a_resource() -> None:
    store = ResultStore(10)
    text = "é" * 3000  # 6,000 UTF-8 bytes: the cut must not split a character

    async def upstream(call: ToolCall) -> dict[str, Any]:
        return {"content": [{"type": "text", "text": text}], "structuredContent": {"x": 1}}

    call = _call()
    out = await Pipeline(upstream, [ShapingFilter(store, 1001, compact_json=False)])(call)
    kept, marker = out["content"][0]["text"], out["content"][-1]["text"]
    assert len(kept.encode()) <= 1001 and text.startswith(kept)
    assert "6,000 bytes" in marker and "mcpopt://results/" in marker
    uri = call.attrs["shaped"]["uri"]
    assert store.read(uri)["contents"][0]["text"] == text  # nothing lost
    assert "structuredContent" not in out


async def test_store_forgets_the_oldest() -> None:
    store = ResultStore(2)
    ids = [store.put({"content": [{"type": "text", "text": str(i)}]}) for i in range(3)]
    assert store.get(ids[0]) is None and store.get(ids[2]) is not None


async def test_through_the_gateway(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", {"fake": fake_entry()}, {"shaping": {"max_result_bytes": 4096}})
    async with Client(gateway_params(cfg), mode="legacy") as client:
        result = await client.call_tool("fake__big", {"size": 100_000})
        text = text_of(result)
        assert "result cut at 4,096 of 100,000 bytes" in text
        uri = text.rsplit("resources/read ", 1)[1].rstrip("]")
        whole = await client.read_resource(uri)
        assert whole.contents[0].text == big_text(100_000)
        small = await client.call_tool("fake__big", {"size": 100})
        assert text_of(small) == big_text(100)
