"""Templates and result views: what scenarios and workflows use to build a call from earlier results.

Shared by the scenario runner (`mcpopt.optimize.scenarios`) and the workflow engine
(`mcpopt.workflows`); it imports nothing of mcpopt but `errors`.

Templates: `{{<path>}}` looks a dotted path up in a context mapping -- e.g. `{{steps.<id>.<view>
[.<key or index>...]}}`, `{{vars.<name>}}`, `{{params.<name>}}` -- keys of mappings, indexes of
lists, lines of text. A filter may follow: `{{steps.log.text | re: Commit: ([0-9a-f]+)}}` gives
the first group of the first match; `{{steps.read.json | jsonpath: $.entities[*].name}}` the list
of an RFC 9535 JSONPath query's matches (`jsonpath_first`: the first match); `{{raw: x}}` is the
literal text `{{x}}` (arguments that are templates themselves, e.g. a workflow's steps sent to
`mcpopt__workflow`). A string that is one whole template keeps the value's type (a list stays a
list); otherwise values are interpolated.

Views of a call's result (`StepView`): `text` (the text blocks joined by newlines), `lines`
(`text` split in lines), `json` (the text parsed as JSON, else the structured content),
`structured`, `content`, `is_error`, `error`, `ms`, `arguments`.

Criteria (`Criterion`, `check`): on a step (default: the last), the value at `path` (a view
path, default `text`) or the matches of `jsonpath` (RFC 9535, on the `json` view), checked with
one or more of `contains`, `not_contains`, `equals`, `not_equals`, `matches` (a regex), `count`
(an int or `{min, max}`; list length, JSONPath match count, or lines of text), `max_ms`,
`is_error`; every value is templated.

Errors: `TemplateError` names the template and what is missing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from mcpopt.errors import McpoptError

_TEMPLATE = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")


class TemplateError(McpoptError):
    """A template names something that does not exist, or a filter fails (the message says which)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class CountRange(_Model):
    min: int | None = None
    max: int | None = None


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
        TemplateError: a template names something that does not exist.
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
        raise TemplateError(f"template {{{{{expr}}}}}: {exc.args[0]}") from None
    if not bar:
        return value
    name, _, arg = filt.strip().partition(":")
    name = name.strip()
    if name in ("jsonpath", "jsonpath_first"):
        return _jsonpath(expr, arg.strip().strip("'\""), value, first=name == "jsonpath_first")
    if name != "re":
        raise TemplateError(f"template {{{{{expr}}}}}: unknown filter {name!r} (known: re, jsonpath, jsonpath_first)")
    pattern = arg.strip().strip("'\"")
    m = re.search(pattern, value if isinstance(value, str) else _stringify(value))
    if m is None:
        raise TemplateError(f"template {{{{{expr}}}}}: /{pattern}/ does not match {_short(value)}")
    return m.group(1) if m.groups() else m.group(0)


def _jsonpath(expr: str, query: str, value: Any, *, first: bool) -> Any:
    """Matches of an RFC 9535 JSONPath query on `value` (a list; `first`: the first match)."""
    import jsonpath  # python-jsonpath: RFC 9535

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise TemplateError(f"template {{{{{expr}}}}}: jsonpath needs JSON, got {_short(value)}") from None
    try:
        found = jsonpath.findall(query, value if value is not None else {})
    except Exception as exc:  # noqa: BLE001 - python-jsonpath raises several types for a bad query
        raise TemplateError(f"template {{{{{expr}}}}}: jsonpath {query!r}: {exc}") from None
    if not first:
        return found
    if not found:
        raise TemplateError(f"template {{{{{expr}}}}}: jsonpath {query!r} matches nothing in {_short(value)}")
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
