"""Scenarios: scripted tool-call sessions with success criteria, loaded from YAML.

A scenario file holds one scenario (a mapping), a list of them, or `{scenarios: [...]}`::

    id: git-overview
    user_prompt: "What changed recently in this repository?"
    task_type: code_review                    # groups scores (default: the id)
    servers: [git]                            # skipped when one of these is not configured
    vars: {repo: "{{servers.git.arg.repository}}"}
    steps:
      - id: log
        tool: git__git_log                    # the gateway name (or `server:` + `tool:`)
        arguments: {repo_path: "{{vars.repo}}", max_count: 3}
      - id: show
        tool: git__git_show
        arguments: {repo_path: "{{vars.repo}}", revision: "{{steps.log.lines.1}}"}
        # `action: <name>` sets arguments.action, for tools that take one
        # `wait_ms: 1100` sleeps first (think time, never counted in the scenario's time)
        # `expect_error: true` passes when the call fails
    success_criteria:
      - {step: log, contains: "Commit history"}
      - {step: show, jsonpath: "$.files[*]", count: {min: 1}}
      - {step: t2, path: json.datetime, not_equals: "{{steps.t1.json.datetime}}"}
    expected_total_time: 2.5                  # seconds (or "250ms", "2s")
    expected_call_count: 2

Templates (`mcpopt.templating`, shared with workflows): `{{steps.<id>.<view>[.<key or
index>...]}}`, `{{vars.<name>}}`, `{{servers.<name>.arg.<flag>}}` (the value after `--flag` in
that server's args) or `{{servers.<name>.args.<i>}}`, and `{{run.id}}` (unique per scenario run:
names that must not collide across replays), with the filters `re`, `jsonpath`,
`jsonpath_first` and the literal `{{raw: ...}}`. Views of a step's result: `text`, `lines`,
`json`, `structured`, `content`, `is_error`, `error`, `ms`, `arguments`.

Criteria (`mcpopt.templating.Criterion`, all values templated): on `step` (default: the last
step), the value at `path` (a view path, default `text`) or the matches of `jsonpath` (RFC 9535,
on the `json` view), checked with one or more of `contains`, `not_contains`, `equals`,
`not_equals`, `matches` (a regex), `count` (an int or `{min, max}`), `max_ms`, `is_error`. Every
step must also succeed unless it says `expect_error: true`.

Errors: `ScenarioError` names the file, the scenario and what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mcpopt.templating import (  # noqa: F401 - re-exported: the scenarios' templating lives there
    CountRange,
    Criterion,
    StepView,
    TemplateError,
    check,
    lookup,
    render,
    result_json,
    result_text,
    template_expressions,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


ScenarioError = TemplateError
"""A scenario file or template is invalid (the message names the file and the scenario). The same
class as `mcpopt.templating.TemplateError`, so a failing template is a scenario error too."""


def parse_seconds(value: Any) -> float | None:
    """Seconds from a number (seconds) or a string such as "250ms", "2s", "1.5m"; None stays None.

    Raises:
        ValueError: anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"expected seconds (got {value!r})")
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"expected seconds, e.g. 2.5, '250ms', '2s' (got {value!r})")
    unit = m.group(2) or "s"
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[unit]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Step(_Model):
    """One tool call of a scenario."""

    id: str = ""
    """Referenced by templates and criteria (default `step<n>`, 1-based)."""
    tool: str
    """The gateway tool name, e.g. `time__get_current_time` (or the server's own name with `server`)."""
    server: str | None = None
    arguments: dict[str, Any] = Field(default_factory=dict)
    action: str | None = None
    """For tools that take an `action` argument: sets `arguments.action`."""
    wait_ms: float = Field(0.0, ge=0)
    """Sleep this long before the call (think time; not counted in the scenario's time)."""
    expect_error: bool = False

    def rendered_arguments(self, ctx: Mapping[str, Any]) -> dict[str, Any]:
        args = render(self.arguments, ctx)
        if self.action is not None:
            args = {**args, "action": render(self.action, ctx)}
        return args

    def references(self) -> set[str]:
        """Ids of earlier steps whose results this step's arguments use."""
        refs: set[str] = set()
        for expr in template_expressions([self.arguments, self.action]):
            parts = expr.split(".")
            if parts[0] == "steps" and len(parts) > 1:
                refs.add(parts[1])
        return refs


class Scenario(_Model):
    """A scripted session (see the module doc); `source` is the file it came from."""

    id: str
    user_prompt: str = ""
    description: str = ""
    task_type: str = ""
    servers: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    vars: dict[str, Any] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1)
    success_criteria: list[Criterion] = Field(default_factory=list)
    expected_total_time: float | None = None
    """Seconds the whole scenario should take (a number, or "250ms", "2s")."""
    expected_call_count: int | None = Field(None, ge=0)
    """Tool calls the task needs (the call-efficiency reference)."""
    source: str = ""

    @field_validator("expected_total_time", mode="before")
    @classmethod
    def _seconds(cls, value: Any) -> float | None:
        return parse_seconds(value)

    @model_validator(mode="after")
    def _step_ids(self) -> Scenario:
        seen: set[str] = set()
        for i, step in enumerate(self.steps, 1):
            if not step.id:
                step.id = f"step{i}"
            if step.id in seen:
                raise ValueError(f"step id {step.id!r} is used twice")
            for ref in step.references():
                if ref not in seen:
                    raise ValueError(f"step {step.id!r} uses steps.{ref}, which is not an earlier step")
            seen.add(step.id)
        for c in self.success_criteria:
            if c.step is not None and c.step not in seen:
                raise ValueError(f"criterion {c.label()!r}: no step {c.step!r}")
        if not self.task_type:
            self.task_type = self.id
        return self

    def tools(self, resolve: Any = None) -> list[tuple[str, str | None]]:
        """(gateway tool name, action) of every step; `resolve(server, tool)` maps `server:` steps."""
        out = []
        for s in self.steps:
            name = resolve(s.server, s.tool) if (s.server and resolve is not None) else s.tool
            out.append((name, s.action or (s.arguments.get("action") if isinstance(s.arguments, dict) else None)))
        return out


# ---- loading -----------------------------------------------------------------------------------
def _scenario_files(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files.extend(sorted(f for f in path.rglob("*") if f.suffix in (".yaml", ".yml")))
        elif path.exists():
            files.append(path)
        else:
            raise ScenarioError(f"{path}: no such scenario file or folder")
    return files


def load_scenarios(paths: Iterable[str | Path]) -> list[Scenario]:
    """Every scenario in the given files and folders (folders: `*.yaml`/`*.yml`, recursively).

    Raises:
        ScenarioError: a missing path, bad YAML, an invalid scenario, or a duplicate id.
    """
    out: list[Scenario] = []
    seen: dict[str, str] = {}
    for file in _scenario_files(paths):
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ScenarioError(f"{file}: not valid YAML ({exc})") from None
        items = data.get("scenarios", data) if isinstance(data, dict) and "scenarios" in data else data
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list):
            raise ScenarioError(f"{file}: expected a scenario, a list of them, or {{scenarios: [...]}}")
        for i, item in enumerate(items):
            out.append(parse_scenario(item, f"{file}#{i}" if len(items) > 1 else str(file)))
    for sc in out:
        if sc.id in seen:
            raise ScenarioError(f"{sc.source}: scenario id {sc.id!r} is also used in {seen[sc.id]}")
        seen[sc.id] = sc.source
    return out


def parse_scenario(data: Any, source: str = "") -> Scenario:
    """One scenario from a parsed mapping.

    Raises:
        ScenarioError: naming `source`, the scenario id and the first problem.
    """
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a scenario must be a mapping")
    try:
        return Scenario.model_validate({**data, "source": source})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise ScenarioError(
            f"{source}: scenario {data.get('id', '?')!r}: {where + ': ' if where else ''}{msg}"
        ) from None
