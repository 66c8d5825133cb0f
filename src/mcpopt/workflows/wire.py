"""The `CallToolResult` wire shape of the workflow tools' answers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def tool_result(payload: Mapping[str, Any], *, is_error: bool = False) -> dict[str, Any]:
    """A `CallToolResult` wire dict: the payload as JSON text (MCP: structured content SHOULD also
    be serialized in a text block, for clients that read only text) and as `structuredContent`."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str)
    out: dict[str, Any] = {"content": [{"type": "text", "text": text}], "structuredContent": dict(payload)}
    if is_error:
        out["isError"] = True
    return out
