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

Templates: `{{steps.<id>.<view>[.<key or index>...]}}`, `{{vars.<name>}}`,
`{{servers.<name>.arg.<flag>}}` (the value after `--flag` in that server's args) or
`{{servers.<name>.args.<i>}}`, and `{{run.id}}` (unique per scenario run: names that must not
collide across replays). A filter may follow: `{{steps.log.text | re: Commit: ([0-9a-f]+)}}`
gives the first group of the first match; `{{steps.read.json | jsonpath: $.entities[*].name}}` the
list of an RFC 9535 JSONPath query's matches (`jsonpath_first`: the first match); `{{raw: x}}`
is the literal text `{{x}}` (arguments that are templates themselves, e.g. a workflow's steps
sent to `mcpopt__workflow`). Views of a
step's result: `text` (the text blocks joined by newlines), `lines` (`text` split in lines),
`json` (the text parsed as JSON, else the structured content), `structured`, `content`,
`is_error`, `error`, `ms`, `arguments`. A string that is one
whole template keeps the value's type (a list stays a list); otherwise values are interpolated.

Criteria (all values templated): on `step` (default: the last step), the value at `path` (a
view path, default `text`) or the matches of `jsonpath` (RFC 9535, on the `json` view), checked
with one or more of `contains`, `not_contains`, `equals`, `not_equals`, `matches` (a regex),
`count` (an int or `{min, max}`; list length, JSONPath match count, or lines of text), `max_ms`,
`is_error`. Every step must also succeed unless it says `expect_error: true`.

Errors: `ScenarioError` names the file, the scenario and what is wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mcpopt.errors import McpoptError

_TEMPLATE = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


class ScenarioError(McpoptError):
    """A scenario file or template is invalid (the message names the file and the scenario)."""


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


class CountRange(_Model):
    min: int | None = None
    max: int | None = None


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
        for expr in _expressions([self.arguments, self.action]):
            parts = expr.split(".")
            if parts[0] == "steps" and len(parts) > 1:
                refs.add(parts[1])
        return refs


class Criterion(_Model):
    """One assertion on a step's result (see the module doc)."""

    name: str | None = None
    step: str | None = None
    path: str | None = None
    jsonpath: str | None = None
    contains: Any = None
    not_contains: Any = None
    equals: Any = None
    not_equals: Any = None
    matches: str | None = None
    count: int | CountRange | None = None
    max_ms: float | None = None
    is_error: bool | None = None

    @model_validator(mode="after")
    def _has_check(self) -> Criterion:
        checks = {"contains", "not_contains", "equals", "not_equals", "matches", "count", "max_ms", "is_error"}
        if not (self.model_fields_set & checks):
            raise ValueError(f"a criterion needs one of {', '.join(sorted(checks))}")
        return self

    def label(self) -> str:
        if self.name:
            return self.name
        target = self.jsonpath or self.path or "text"
        checks = [f"{k}={getattr(self, k)!r}" for k in sorted(self.model_fields_set) if k not in _TARGET_KEYS]
        return f"{self.step or '<last>'}:{target} {' '.join(checks)}"


_TARGET_KEYS = {"name", "step", "path", "jsonpath"}


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


# ---- result views and templating ---------------------------------------------------------------
def result_text(result: Mapping[str, Any] | None) -> str:
    """The text blocks of a `CallToolResult` wire dict, joined by newlines."""
    if not result:
        return ""
    parts = [b.get("text", "") for b in result.get("content") or () if isinstance(b, dict) and b.get("type") == "text"]
    return "\n".join(parts)


def result_json(result: Mapping[str, Any] | None) -> Any:
    """The result's text parsed as JSON; else its structured content; else None."""
    text = result_text(result)
    if text:
        try:
            return json.loads(text)
        except ValueError:
            pass
    return (result or {}).get("structuredContent")


class StepView(Mapping[str, Any]):
    """The lazily computed views of one finished step (see the module doc)."""

    def __init__(
        self, result: Mapping[str, Any] | None, error: str | None, ms: float, arguments: Mapping[str, Any]
    ) -> None:
        self._result = result
        self._cache: dict[str, Any] = {
            "error": error,
            "ms": ms,
            "arguments": arguments,
            "is_error": bool(error) or bool((result or {}).get("isError")),
        }

    def __getitem__(self, key: str) -> Any:
        if key not in self._cache:
            if key == "text":
                self._cache[key] = result_text(self._result)
            elif key == "lines":
                self._cache[key] = self["text"].splitlines()
            elif key == "json":
                self._cache[key] = result_json(self._result)
            elif key == "structured":
                self._cache[key] = (self._result or {}).get("structuredContent")
            elif key == "content":
                self._cache[key] = (self._result or {}).get("content") or []
            else:
                raise KeyError(key)
        return self._cache[key]

    def __iter__(self) -> Any:
        return iter(("text", "lines", "json", "structured", "content", "is_error", "error", "ms", "arguments"))

    def __len__(self) -> int:
        return 9


def lookup(root: Any, path: str) -> Any:
    """The value at a dotted path (keys of mappings, integer indexes of lists).

    Raises:
        KeyError: a segment does not exist (the message names it).
    """
    value = root
    for seg in [s for s in path.split(".") if s]:
        if isinstance(value, Mapping):
            if seg not in value:
                raise KeyError(f"{path}: no {seg!r}")
            value = value[seg]
        elif isinstance(value, list | tuple):
            try:
                value = value[int(seg)]
            except (ValueError, IndexError):
                raise KeyError(f"{path}: no index {seg!r} (of {len(value)})") from None
        elif isinstance(value, str) and seg.lstrip("-").isdigit():
            parts = value.splitlines()
            try:
                value = parts[int(seg)]
            except IndexError:
                raise KeyError(f"{path}: no line {seg}") from None
        else:
            raise KeyError(f"{path}: cannot take {seg!r} of a {type(value).__name__}")
    return value


def render(value: Any, ctx: Mapping[str, Any]) -> Any:
    """Resolve `{{...}}` templates in strings, lists and mappings (see the module doc).

    Raises:
        ScenarioError: a template names something that does not exist.
    """
    if isinstance(value, str):
        whole = _TEMPLATE.fullmatch(value.strip()) if "{{" in value else None
        if whole is not None:
            return _resolve(whole.group(1), ctx)
        if "{{" not in value:
            return value
        return _TEMPLATE.sub(lambda m: _stringify(_resolve(m.group(1), ctx)), value)
    if isinstance(value, list):
        return [render(v, ctx) for v in value]
    if isinstance(value, dict):
        return {k: render(v, ctx) for k, v in value.items()}
    return value


def _resolve(expr: str, ctx: Mapping[str, Any]) -> Any:
    if expr.startswith("raw:"):
        return "{{" + expr[4:].strip() + "}}"
    path, bar, filt = expr.partition("|")
    try:
        value = lookup(ctx, path.strip())
    except KeyError as exc:
        raise ScenarioError(f"template {{{{{expr}}}}}: {exc.args[0]}") from None
    if not bar:
        return value
    name, _, arg = filt.strip().partition(":")
    name = name.strip()
    if name in ("jsonpath", "jsonpath_first"):
        return _jsonpath(expr, arg.strip().strip("'\""), value, first=name == "jsonpath_first")
    if name != "re":
        raise ScenarioError(f"template {{{{{expr}}}}}: unknown filter {name!r} (known: re, jsonpath, jsonpath_first)")
    pattern = arg.strip().strip("'\"")
    m = re.search(pattern, value if isinstance(value, str) else _stringify(value))
    if m is None:
        raise ScenarioError(f"template {{{{{expr}}}}}: /{pattern}/ does not match {_short(value)}")
    return m.group(1) if m.groups() else m.group(0)


def _jsonpath(expr: str, query: str, value: Any, *, first: bool) -> Any:
    """Matches of an RFC 9535 JSONPath query on `value` (a list; `first`: the first match)."""
    import jsonpath  # python-jsonpath: RFC 9535

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ScenarioError(f"template {{{{{expr}}}}}: jsonpath needs JSON, got {_short(value)}") from None
    try:
        found = jsonpath.findall(query, value if value is not None else {})
    except Exception as exc:  # noqa: BLE001 - python-jsonpath raises several types for a bad query
        raise ScenarioError(f"template {{{{{expr}}}}}: jsonpath {query!r}: {exc}") from None
    if not first:
        return found
    if not found:
        raise ScenarioError(f"template {{{{{expr}}}}}: jsonpath {query!r} matches nothing in {_short(value)}")
    return found[0]


def template_expressions(values: Iterable[Any]) -> list[str]:
    """The expressions inside every `{{...}}` of strings nested in `values` (lists and mappings walked)."""
    return _expressions(values)


def _stringify(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _expressions(values: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for v in values:
        if isinstance(v, str):
            out.extend(m.group(1) for m in _TEMPLATE.finditer(v))
        elif isinstance(v, list):
            out.extend(_expressions(v))
        elif isinstance(v, dict):
            out.extend(_expressions(v.values()))
    return out


# ---- criteria -----------------------------------------------------------------------------------
def check(criterion: Criterion, views: Mapping[str, StepView], last: str, ctx: Mapping[str, Any]) -> tuple[bool, str]:
    """Evaluate one criterion against the finished steps; returns (passed, detail)."""
    step = criterion.step or last
    view = views.get(step)
    if view is None:
        return False, f"step {step!r} did not run"
    try:
        if criterion.jsonpath:
            import jsonpath  # python-jsonpath: RFC 9535

            doc = view["json"] if view["json"] is not None else view["structured"]
            value: Any = jsonpath.findall(criterion.jsonpath, doc if doc is not None else {})
            matched = True
        else:
            value = lookup(view, criterion.path or "text")
            matched = False
    except KeyError as exc:
        return False, str(exc.args[0])
    except Exception as exc:  # noqa: BLE001 - a bad JSONPath fails the criterion, with the reason
        return False, f"jsonpath {criterion.jsonpath!r}: {exc}"
    fields = criterion.model_fields_set
    single = value[0] if matched and isinstance(value, list) and len(value) == 1 else value
    for key in ("contains", "not_contains", "equals", "not_equals", "matches", "count", "max_ms", "is_error"):
        if key not in fields:
            continue
        expected = render(getattr(criterion, key), ctx)
        ok, why = _one(key, expected, value, single, view)
        if not ok:
            return False, why
    return True, "ok"


def _one(key: str, expected: Any, value: Any, single: Any, view: StepView) -> tuple[bool, str]:
    shown = _short(single)
    if key == "contains":
        return _contains(value, expected), f"{shown} does not contain {expected!r}"
    if key == "not_contains":
        return not _contains(value, expected), f"{shown} contains {expected!r}"
    if key == "equals":
        return _equal(single, expected), f"{shown} != {_short(expected)}"
    if key == "not_equals":
        return not _equal(single, expected), f"{shown} == {_short(expected)} (expected a different value)"
    if key == "matches":
        text = single if isinstance(single, str) else _stringify(single)
        return re.search(str(expected), text) is not None, f"{shown} does not match /{expected}/"
    if key == "count":
        n = len(value) if isinstance(value, list | tuple | dict) else len(str(value).splitlines())
        rng = expected if isinstance(expected, CountRange) else None
        if rng is None and isinstance(expected, dict):
            rng = CountRange(**expected)
        if rng is None:
            return n == int(expected), f"count {n} != {expected}"
        ok = (rng.min is None or n >= rng.min) and (rng.max is None or n <= rng.max)
        return ok, f"count {n} not in [{rng.min}, {rng.max}]"
    if key == "max_ms":
        return view["ms"] <= float(expected), f"took {view['ms']:.1f} ms > {expected} ms"
    if key == "is_error":
        return view["is_error"] == bool(expected), f"is_error is {view['is_error']}"
    return False, f"unknown check {key}"


def _contains(value: Any, needle: Any) -> bool:
    if isinstance(value, str):
        return str(needle) in value
    if isinstance(value, list | tuple):
        return any(_equal(v, needle) or (isinstance(v, str) and str(needle) in v) for v in value)
    if isinstance(value, dict):
        return needle in value or str(needle) in _stringify(value)
    return str(needle) in _stringify(value)


def _equal(a: Any, b: Any) -> bool:
    if a == b:
        return True
    # YAML gives 5 where the tool said "5" (or the reverse): compare as text then.
    if isinstance(a, str | int | float) and isinstance(b, str | int | float) and not isinstance(a, bool):
        return str(a).strip() == str(b).strip()
    return False


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
