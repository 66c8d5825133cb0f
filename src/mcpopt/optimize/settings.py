"""`optimization:` settings (the autonomous loop, rule levels, where rules live).

The lead wires this model into the config as `gateway.optimization` (beside `gateway.telemetry`);
until then `optimization_settings(config)` returns the defaults, or what a config holds at
`gateway.optimization` or a top-level `optimization` attribute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Level = Literal["conservative", "moderate", "aggressive"]
LEVELS: tuple[Level, ...] = ("conservative", "moderate", "aggressive")


def level_allows(configured: str, rule_level: str) -> bool:
    """True when a rule of `rule_level` may be applied at the `configured` level."""
    return LEVELS.index(rule_level) <= LEVELS.index(configured)  # type: ignore[arg-type]


class OptimizationSettings(BaseModel):
    """The autonomous loop and the rules (`gateway.optimization`).

    Defaults follow the issue: rollback when a KPI degrades by more than 10%; nothing changes by
    itself unless `auto_improvement: true`.
    """

    model_config = ConfigDict(extra="forbid")

    auto_improvement: bool = False
    """Apply validated proposals by itself (else: proposals are only reported)."""
    level: Level = "conservative"
    """The most invasive rule level applied: conservative (cache TTLs on read-only tools, hints,
    timeouts), moderate (+ argument rewrites: SQL LIMIT, page size, depth cap), aggressive (+ TTLs
    on tools only named like reads, routing changes)."""
    rollback_threshold: float = Field(0.1, gt=0, le=1)
    """A KPI degrading by more than this (success rate: absolute; calls, time: relative) rolls the
    rule back."""
    min_improvement: float = Field(0.05, ge=0, le=1)
    """A proposal is applied only if calls or time improve by at least this fraction."""
    interval: str = "1h"
    """`mcpopt optimize --continuous`: time between runs (90s, 15m, 1h, 1d)."""
    window: str = "24h"
    """Telemetry analyzed per run (a duration back from now)."""
    scenarios: list[str] = Field(default_factory=list)
    """Scenario files or folders replayed to validate proposals (relative to the config's folder)."""
    rules_path: str | None = None
    """The rules file (default `<telemetry data_dir>/rules.json`)."""
    sandbox: bool = True
    """Replay scenarios against scratch copies of the servers' local state (see `optimize.sandbox`)."""
    max_changes_per_run: int = Field(10, ge=1)
    honor_batch_hints: bool = True
    """Replays send hinted independent calls together through the gateway's batch tool."""

    @field_validator("interval", "window")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value


def parse_duration(text: str) -> float:
    """Seconds in "90s", "15m", "1h", "1d" (or a bare number of seconds).

    Raises:
        ValueError: any other form.
    """
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*", str(text))
    if not m:
        raise ValueError(f"expected a duration such as 90s, 15m, 1h, 1d (got {text!r})")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2) or "s"]


def optimization_settings(config: Any) -> OptimizationSettings:
    """The config's optimization settings (`gateway.optimization`, else defaults)."""
    for holder in (getattr(config, "gateway", None), config):
        found = getattr(holder, "optimization", None)
        if isinstance(found, OptimizationSettings):
            return found
        if isinstance(found, dict):
            return OptimizationSettings.model_validate(found)
        if isinstance(found, BaseModel):
            return OptimizationSettings.model_validate(found.model_dump())
    return OptimizationSettings()


def default_rules_path(config: Any) -> Path:
    """`optimization.rules_path`, else `<telemetry data_dir>/rules.json` (`~/.local/share/mcpopt`)."""
    settings = optimization_settings(config)
    if settings.rules_path:
        return Path(settings.rules_path).expanduser()
    tel = getattr(getattr(config, "gateway", None), "telemetry", None)
    data_dir = getattr(tel, "data_dir", None)
    if data_dir:
        return Path(data_dir).expanduser() / "rules.json"
    from mcpopt.telemetry.privacy import default_data_dir

    return default_data_dir() / "rules.json"
