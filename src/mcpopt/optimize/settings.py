"""`optimization:` settings (the autonomous loop, rule levels, where rules live).

The model (`OptimizationSettings`, `gateway.optimization`) lives in `mcpopt.config`; this module
re-exports it with the helpers that read it.
"""

from __future__ import annotations

from mcpopt.config import LEVELS, Level, OptimizationSettings, parse_duration
from mcpopt.pipeline.rules import default_rules_path, optimization_settings

__all__ = [
    "LEVELS",
    "Level",
    "OptimizationSettings",
    "default_rules_path",
    "level_allows",
    "optimization_settings",
    "parse_duration",
]


def level_allows(configured: str, rule_level: str) -> bool:
    """True when a rule of `rule_level` may be applied at the `configured` level."""
    return LEVELS.index(rule_level) <= LEVELS.index(configured)  # type: ignore[arg-type]
