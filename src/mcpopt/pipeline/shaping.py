"""Response shaping: compact JSON text, and cut oversized results without losing anything.

A tool result's text that parses as JSON is re-serialized without indentation (`compact_json`).
A result whose text is larger than `max_result_bytes` is cut, with a marker saying how much was
left out and where the whole result is: a resource the gateway serves
(`mcpopt://results/<id>`, readable with `resources/read`) for as long as it stays among the last
`keep_results` shaped results. Nothing is silently lost: the marker says so, and the full text
is one read away.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from typing import Any

import orjson

from mcpopt.pipeline import Next, ToolCall, ToolResult

RESULT_URI_PREFIX = "mcpopt://results/"


class ResultStore:
    """The last `capacity` full results that shaping cut, by id (LRU)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def put(self, result: dict[str, Any]) -> str:
        rid = uuid.uuid4().hex
        self._items[rid] = result
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return rid

    def get(self, rid: str) -> dict[str, Any] | None:
        item = self._items.get(rid)
        if item is not None:
            self._items.move_to_end(rid)
        return item

    def read(self, uri: str) -> dict[str, Any] | None:
        """A `ReadResourceResult` dict for `mcpopt://results/<id>`, or None if unknown/expired."""
        if not uri.startswith(RESULT_URI_PREFIX):
            return None
        full = self.get(uri[len(RESULT_URI_PREFIX) :])
        if full is None:
            return None
        text = "\n".join(b.get("text", "") for b in full.get("content", []) if b.get("type") == "text")
        return {"contents": [{"uri": uri, "mimeType": "text/plain", "text": text}]}


def _compact(text: str) -> str:
    stripped = text.lstrip()
    if not stripped or stripped[0] not in "{[":
        return text
    try:
        return orjson.dumps(orjson.loads(text)).decode()
    except orjson.JSONDecodeError:
        return text


class ShapingFilter:
    """Compact JSON text and cut results over `max_result_bytes` (0 = never cut).

    Args:
        store: where cut results are kept, served as `mcpopt://results/<id>`.
        max_result_bytes: UTF-8 bytes of text content above which a result is cut.
        compact_json: re-serialize JSON text without whitespace.
    """

    def __init__(self, store: ResultStore, max_result_bytes: int, compact_json: bool) -> None:
        self.store = store
        self.max_bytes = max_result_bytes
        self.compact = compact_json

    async def __call__(self, call: ToolCall, next: Next) -> ToolResult:
        result = await next(call)
        content = result.get("content")
        if not isinstance(content, list) or not content:
            return result
        blocks = content
        if self.compact:
            blocks = [
                {**b, "text": _compact(b["text"])} if b.get("type") == "text" and isinstance(b.get("text"), str) else b
                for b in content
            ]
        if self.max_bytes:
            total = sum(len(b["text"].encode()) for b in blocks if b.get("type") == "text" and "text" in b)
            if total > self.max_bytes:
                rid = self.store.put({**result, "content": blocks})
                blocks = self._cut(blocks, total, rid)
                call.attrs["shaped"] = {"bytes": total, "kept": self.max_bytes, "uri": RESULT_URI_PREFIX + rid}
        if blocks is content:
            return result
        out = dict(result)
        out["content"] = blocks
        if "structuredContent" in out and call.attrs.get("shaped"):
            del out["structuredContent"]  # the structured copy is in the stored full result
        return out

    def _cut(self, blocks: list[dict[str, Any]], total: int, rid: str) -> list[dict[str, Any]]:
        budget = self.max_bytes
        kept: list[dict[str, Any]] = []
        for block in blocks:
            if block.get("type") != "text" or "text" not in block:
                kept.append(block)
                continue
            data = block["text"].encode()
            if budget <= 0:
                continue
            piece = data[:budget].decode(errors="ignore")
            budget -= len(piece.encode())
            kept.append({**block, "text": piece})
        marker = (
            f"\n[mcpopt: result cut at {self.max_bytes:,} of {total:,} bytes; {total - self.max_bytes:,} bytes left "
            f"out. The whole result: resources/read {RESULT_URI_PREFIX}{rid}]"
        )
        kept.append({"type": "text", "text": marker})
        return kept
