"""Tool search's documents (`ToolDoc`: one searchable tool, what it is indexed by) and their compact
renderings (`signature`, `purpose`, `compact_line`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# ---- documents ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolDoc:
    """One searchable tool.

    Attributes:
        name: the name clients call it by (the gateway name, e.g. `filesystem__read_file`).
        server: the upstream server that owns it.
        tool: its name on that server.
        description: the upstream's description ("" if none).
        input_schema: the upstream's JSON Schema for the arguments.
        server_description: what the server says about itself (its `instructions`, or a catalog's
            server description); searched, never shown in results.
    """

    name: str
    server: str
    tool: str
    description: str = ""
    input_schema: Mapping[str, Any] = field(default_factory=dict)
    server_description: str = ""

    @classmethod
    def of(
        cls,
        server: str,
        tool: Any,
        name: str | None = None,
        upstream_name: str | None = None,
        server_description: str = "",
    ) -> ToolDoc:
        """Build from an `mcp_types.Tool` or a tools/list dict (`name`, `description`, `inputSchema`).

        Args:
            server: the owning upstream.
            tool: the definition.
            name: the name clients use (default: the definition's name).
            upstream_name: the name on the upstream (default: the definition's name).
            server_description: see the attribute.
        """
        if isinstance(tool, Mapping):
            tname = str(tool.get("name", ""))
            desc = tool.get("description") or ""
            schema = tool.get("inputSchema") or tool.get("input_schema") or {}
        else:
            tname = tool.name
            desc = getattr(tool, "description", None) or ""
            schema = getattr(tool, "input_schema", None) or {}
        return cls(
            name=name or tname,
            server=server,
            tool=upstream_name or tname,
            description=str(desc),
            input_schema=schema if isinstance(schema, Mapping) else {},
            server_description=server_description,
        )

    def params(self) -> list[tuple[str, Mapping[str, Any], bool]]:
        """(name, property schema, required) per argument, in schema order."""
        props = self.input_schema.get("properties")
        if not isinstance(props, Mapping):
            return []
        required = self.input_schema.get("required")
        req = set(required) if isinstance(required, list) else set()
        return [(str(k), v if isinstance(v, Mapping) else {}, k in req) for k, v in props.items()]

    def schema_json(self) -> str:
        """The full definition as compact JSON (what `get_tool_schema` returns)."""
        body = {"name": self.name, "description": self.description, "inputSchema": dict(self.input_schema)}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def _type_name(schema: Mapping[str, Any]) -> str:
    t = schema.get("type")
    if isinstance(t, list):
        return "|".join(str(x) for x in t if x != "null") or "any"
    if t == "array":
        items = schema.get("items")
        inner = _type_name(items) if isinstance(items, Mapping) else "any"
        return f"{inner}[]"
    if isinstance(t, str):
        return t
    if "enum" in schema:
        return "enum"
    for key in ("anyOf", "oneOf"):
        alts = schema.get(key)
        if isinstance(alts, list):
            names = [_type_name(a) for a in alts if isinstance(a, Mapping) and a.get("type") != "null"]
            return "|".join(dict.fromkeys(names)) or "any"
    return "any"


def signature(doc: ToolDoc, max_params: int = 8) -> str:
    """Argument signature, e.g. `(path: string, depth?: integer)`; `?` marks optional arguments.

    More than `max_params` arguments are elided as `, ...`.
    """
    parts = [f"{n}{'' if req else '?'}: {_type_name(s)}" for n, s, req in doc.params()]
    if len(parts) > max_params:
        parts = parts[:max_params] + ["..."]
    return "(" + ", ".join(parts) + ")"


_SENTENCE_END = re.compile(r"(?<=[.!?])\s|[。！？\n]")


def purpose(description: str, max_chars: int = 140) -> str:
    """The first sentence of a description, whitespace collapsed, cut to `max_chars` with an ellipsis."""
    text = description.strip()
    m = _SENTENCE_END.search(text)
    first = text[: m.start() + (1 if text[m.start()] in "。！？" else 0)] if m else text
    first = " ".join(first.split())
    if len(first) > max_chars:
        first = first[: max_chars - 1].rstrip() + "…"
    return first


def compact_line(doc: ToolDoc) -> str:
    """One line per tool: `name(arg: type, opt?: type) - purpose`."""
    p = purpose(doc.description)
    return f"{doc.name}{signature(doc)}" + (f" - {p}" if p else "")
