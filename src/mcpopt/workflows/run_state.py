"""What one workflow run is made of: its units (one call each), step states, the constants and
small value helpers every part of the run uses (see `mcpopt.workflows.engine`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mcpopt.api import ClientLink
from mcpopt.errors import UPSTREAM_CLOSED, UPSTREAM_TIMEOUT
from mcpopt.templating import StepView
from mcpopt.workflow_model import Step

IDEMPOTENCY_META_KEY = "mcpopt/idempotency_key"
"""`_meta` key of the idempotency key sent with every call that is not read-only."""
IN_DOUBT_CODES = frozenset({UPSTREAM_CLOSED, UPSTREAM_TIMEOUT})
"""Gateway errors after which a call may have run upstream (closed or timed out mid-call)."""
_FALSE = frozenset({"", "0", "false", "no", "off", "null", "none", "[]", "{}"})


@dataclass
class Unit:
    """One call of a step: the step itself, one `for_each` item, or one fan-out target."""

    step: str
    key: str = ""
    status: str = "pending"
    """pending | started | succeeded | failed | in_doubt | cancelled."""
    arguments: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    ms: float = 0.0
    attempts: int = 0
    done_seq: int = 0
    """The journal seq of its success (or of its start, when in doubt): compensation goes in reverse."""
    item: Any = None
    index: int | None = None
    tool: str = ""
    comp: str = ""
    """"" | started | succeeded | failed | in_doubt."""
    comp_error: str | None = None
    comp_attempts: int = 0

    def view(self) -> StepView:
        return StepView(self.result, self.error, self.ms, self.arguments)


@dataclass
class StepState:
    step: Step
    status: str = "pending"
    """pending | running | succeeded | failed | skipped | blocked | not_run."""
    error: str | None = None
    units: dict[str, Unit] = field(default_factory=dict)
    planned: list[Any] | None = None
    """A `for_each` step's items, or a fan-out's `[(label, gateway tool, replica)]` targets."""
    view: Mapping[str, Any] | None = None
    ms: float = 0.0
    winner: str | None = None


class RunSuspended(Exception):
    """The gateway is stopping: the run stopped starting steps and stays `running` in the journal
    (the next gateway over this config resumes it)."""


CallTool = Callable[[Mapping[str, Any], ClientLink], Awaitable[dict[str, Any]]]


def result_text(result: Mapping[str, Any]) -> str:
    """The text blocks of a `tools/call` result, joined by spaces."""
    return " ".join(b.get("text", "") for b in result.get("content") or () if isinstance(b, dict))


def truthy(value: Any) -> bool:
    """A step condition's value as a bool: a string is false when it is one of `_FALSE` (e.g. "", "0",
    "false", "no", "null", "[]"; case and outer blanks ignored)."""
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE
    return bool(value)


def same_value(a: Any, b: Any) -> bool:
    """Equal, or the same scalar once both are text (case, blanks and quotes ignored)."""
    if a == b:
        return True
    if isinstance(a, str | int | float | bool) and isinstance(b, str | int | float | bool):
        return str(a).strip().strip("'\"").lower() == str(b).strip().strip("'\"").lower()
    return False


def shorten(value: Any, limit: int = 80) -> str:
    """`value` as text (repr unless a str) cut to `limit` characters, "..." marking a cut."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
