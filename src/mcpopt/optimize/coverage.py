"""The coverage matrix: every tool (and action) of the configured servers against the scenarios.

A tool whose input schema has an `action` property with an `enum` counts once per action; a
step covers `(tool, action)` when it names the action (`action:` or `arguments.action`). Gateway
tools (the batch tool, cache tools) are not listed: they are mcpopt's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mcpopt.optimize.scenarios import Scenario


@dataclass
class CoverageRow:
    tool: str
    """Gateway tool name."""
    server: str
    action: str | None = None
    scenarios: list[str] = field(default_factory=list)


@dataclass
class Coverage:
    rows: list[CoverageRow]
    unknown: dict[str, list[str]] = field(default_factory=dict)
    """Tools the scenarios name that no configured server serves -> the scenarios naming them."""

    @property
    def uncovered(self) -> list[CoverageRow]:
        return [r for r in self.rows if not r.scenarios]

    @property
    def ratio(self) -> float:
        return sum(bool(r.scenarios) for r in self.rows) / len(self.rows) if self.rows else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tools": len(self.rows),
            "covered": sum(bool(r.scenarios) for r in self.rows),
            "ratio": round(self.ratio, 4),
            "rows": [
                {"tool": r.tool, "server": r.server, "action": r.action, "scenarios": r.scenarios} for r in self.rows
            ],
            "uncovered": [r.tool + (f" ({r.action})" if r.action else "") for r in self.uncovered],
            "unknown": self.unknown,
        }


def _actions(schema: Mapping[str, Any] | None) -> list[str]:
    props = (schema or {}).get("properties") or {}
    action = props.get("action") if isinstance(props, dict) else None
    enum = action.get("enum") if isinstance(action, dict) else None
    return [str(a) for a in enum] if isinstance(enum, list) else []


def coverage_matrix(
    tools: Mapping[str, tuple[str, Mapping[str, Any] | None]], scenarios: Sequence[Scenario]
) -> Coverage:
    """Build the matrix.

    Args:
        tools: gateway tool name -> (server, input schema), e.g. from `gateway_tools(gateway)`.
        scenarios: the scenarios to match.
    """
    rows: dict[tuple[str, str | None], CoverageRow] = {}
    for name, (server, schema) in sorted(tools.items(), key=lambda kv: (kv[1][0], kv[0])):
        actions: list[str | None] = list(_actions(schema)) or [None]
        for action in actions:
            rows[(name, action)] = CoverageRow(name, server, action)
    unknown: dict[str, list[str]] = {}
    for sc in scenarios:
        for name, action in sc.tools():
            keys: list[tuple[str, str | None]] = (
                [(name, action)] if action is not None and (name, action) in rows else []
            )
            if not keys:
                keys = [k for k in rows if k[0] == name and (action is None or k[1] is None)]
            if not keys and action is None:
                keys = [k for k in rows if k[0] == name]
            if not keys:
                unknown.setdefault(name, [])
                if sc.id not in unknown[name]:
                    unknown[name].append(sc.id)
                continue
            row = rows[keys[0]]
            if sc.id not in row.scenarios:
                row.scenarios.append(sc.id)
    return Coverage(list(rows.values()), unknown)


def gateway_tools(gateway: Any) -> dict[str, tuple[str, Mapping[str, Any] | None]]:
    """Gateway tool name -> (server, input schema) for every upstream tool the gateway serves."""
    out: dict[str, tuple[str, Mapping[str, Any] | None]] = {}
    routes = gateway.catalog.tool_routes
    for tool in gateway.catalog.tools:
        route = routes.get(tool.name)
        if route is not None:
            out[tool.name] = (route.server, tool.input_schema)
    return out
