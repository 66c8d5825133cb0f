"""`mcpopt eval tokens`: the token cost of each exposure mode's `tools/list`, on a running gateway.

Counting and the per-mode lists are `mcpopt.discovery.tokens`; this module starts a real gateway
in-process (so the lists are the ones clients get) and runs the registered scenarios on it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from mcpopt.config import load_config
from mcpopt.discovery.modes import pinned
from mcpopt.discovery.tokens import ENCODING, SCENARIOS, catalog_tools, count_context, ledger, mode_lists
from mcpopt.gateway.assembly import build_gateway


async def gateway_report(config_file: str | Path, catalog: str | Path | None = None) -> dict[str, Any]:
    """The report behind `mcpopt eval tokens`: starts the gateway in-process for its real lists.

    Returns:
        `{encoding, sources: {"gateway": {mode: ModeCost}, "catalog": {...}}, scenarios: {name: {way: counts}}}`;
        `catalog` only when a catalog file is given (named like the gateway names tools, prefix `mcpopt__`).

    Raises:
        ConfigError: the config is invalid; RuntimeError: the offline tokenizer is missing.
    """

    cfg = load_config(str(config_file))
    g = cfg.gateway
    prefix = f"{g.name}{g.separator}"
    pin_names = list(getattr(g, "always_visible", None) or [])
    report: dict[str, Any] = {"encoding": ENCODING, "sources": {}, "scenarios": {}}
    gateway = build_gateway(cfg)
    async with gateway.running():
        tools = list(gateway.catalog.tools)
        own = list(gateway.own_tools())
        lists = mode_lists(tools, own, prefix, pinned([*tools, *own], pin_names))
        report["sources"]["gateway"] = {m: asdict(c) for m, c in ledger(lists).items()}
        for name, scenario in SCENARIOS.items():
            ways = await scenario(gateway)
            report["scenarios"][name] = {way: count_context(items) for way, items in ways.items()}
    if catalog is not None:
        lists = mode_lists(catalog_tools(catalog), [], prefix)
        report["sources"]["catalog"] = {m: asdict(c) for m, c in ledger(lists).items()}
    return report
