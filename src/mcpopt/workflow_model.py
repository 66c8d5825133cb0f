"""Workflow definitions: typed parameters, steps forming a DAG, compensations, fan-out; validation.

A workflow (YAML, in the config's top-level `workflows:` mapping or in files named by
`gateway.workflows.files`) is served as the tool `workflow__<name>`::

    workflows:
      onboard:
        description: "Record a new team member and give them a notes file."
        parameters:
          user: {type: string, description: "their name"}
          tags: {type: array, items: {type: string}, default: []}
        on_failure: compensate            # compensate (default) | abort | continue
        on_restart: resume                # after a gateway crash: resume (default) | compensate
        steps:
          - id: now                       # steps without a dependency between them run in parallel
            tool: time__get_current_time
            arguments: {timezone: UTC}
          - id: person
            tool: memory__create_entities
            arguments:
              entities: [{name: "{{params.user}}", entityType: person,
                          observations: ["joined {{steps.now.json.datetime}}"]}]
            compensate:                   # how to undo this step (templated from its own call)
              tool: memory__delete_entities
              arguments: {entityNames: ["{{self.arguments.entities.0.name}}"]}
          - id: notes
            depends_on: [person]          # explicit order (data flow through templates adds its own)
            tool: filesystem__write_file
            arguments: {path: "/notes/{{params.user}}.md", content: "# {{params.user}}"}
          - id: tag
            for_each: "{{params.tags}}"   # one call per item, at most `concurrency` at once
            as: tag
            concurrency: 5
            when: "{{params.tags}}"       # skipped when the rendered value is false-like
            tool: memory__add_observations
            arguments: {observations: [{entityName: "{{params.user}}", contents: ["{{tag}}"]}]}
          - id: clocks
            fanout: {servers: [time, time_eu], tool: get_current_time, gather: first}
            arguments: {timezone: UTC}
        output: {created: "{{steps.person.json}}", at: "{{steps.now.json.datetime}}"}

Templates are the scenarios' (`mcpopt.templating.render`): `{{params.<name>}}`,
`{{steps.<id>.<view>...}}` (views `text`, `lines`, `json`, `structured`, `content`, `is_error`,
`error`, `ms`, `arguments`; a `for_each` step adds `items` and has `json` = the items' JSON in
order; a fan-out step adds `results`, each labelled with its `source`), `{{item}}` / `{{index}}`
(the name set by `as`) inside `for_each`, `{{self.<view>}}` in a compensation (the step's own
arguments and result), `{{run.id}}`; filters `| re: ...`, `| jsonpath: ...`. A step whose
templates name another step depends on it: `depends_on` is only needed for an order without
data flow (e.g. write, then read what was written).

`when` is a template (false-like values: `false`, `0`, `""`, `no`, `null`, `none`, an empty list;
`a == b` / `a != b` compare the two rendered sides) or a scenario criterion on an earlier step
(`{step: s, jsonpath: "$.items[*]", count: {min: 1}}`).

Validation (`parse_workflow`, and the config loader) lists every problem of a workflow at
once: unknown or duplicate step ids, references to undeclared parameters or to steps that are
not earlier in the graph, cycles, a step with both or neither of `tool`/`fanout`, bad fan-out
targets. Tool names are checked against the live catalog when the workflow runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from mcpopt.errors import McpoptError
from mcpopt.templating import Criterion, template_expressions

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}$")
"""Workflow and step names: 1-64 of A-Z a-z 0-9 _ - (MCP tool-name characters)."""
TOOL_PREFIX = "workflow__"
"""Workflows are served as the tools `workflow__<name>` (issue 13)."""
RESERVED_VARS = frozenset({"params", "steps", "run", "self", "workflow"})
JSON_TYPES = ("string", "integer", "number", "boolean", "array", "object")
OnFailure = Literal["compensate", "abort", "continue"]
OnRestart = Literal["resume", "compensate"]
Gather = Literal["all", "first", "quorum"]


class WorkflowError(McpoptError):
    """A workflow definition is invalid, or a run cannot start (the message names the workflow)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Parameter(_Model):
    """One typed parameter: becomes a property of the workflow tool's `inputSchema`."""

    type: Literal["string", "integer", "number", "boolean", "array", "object"] = "string"
    description: str = ""
    default: Any = None
    required: bool | None = None
    """Default: required unless a `default` is given."""
    enum: list[Any] | None = None
    items: dict[str, Any] | None = None
    """JSON Schema of the items of an `array` parameter."""
    properties: dict[str, Any] | None = None
    """JSON Schema properties of an `object` parameter."""
    minimum: float | None = None
    maximum: float | None = None
    min_length: int | None = Field(None, alias="minLength", ge=0)
    max_length: int | None = Field(None, alias="maxLength", ge=0)
    pattern: str | None = None
    min_items: int | None = Field(None, alias="minItems", ge=0)
    max_items: int | None = Field(None, alias="maxItems", ge=0)

    @property
    def is_required(self) -> bool:
        if self.required is not None:
            return self.required
        return "default" not in self.model_fields_set

    def json_schema(self) -> dict[str, Any]:
        """This parameter as a JSON Schema (draft 2020-12) property."""
        out: dict[str, Any] = {"type": self.type}
        if self.description:
            out["description"] = self.description
        if "default" in self.model_fields_set:
            out["default"] = self.default
        for key in ("enum", "items", "properties", "minimum", "maximum", "pattern"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        for attr, key in (
            ("min_length", "minLength"),
            ("max_length", "maxLength"),
            ("min_items", "minItems"),
            ("max_items", "maxItems"),
        ):
            value = getattr(self, attr)
            if value is not None:
                out[key] = value
        return out


class Compensation(_Model):
    """The call that undoes a step (a saga's compensating action).

    Templated like a step, plus `{{self...}}`: the step's own arguments and result (for a
    `for_each` step: the item's, with `{{item}}` / `{{index}}`).
    """

    tool: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    in_doubt: bool = False
    """Also run it when the step's outcome is unknown (the gateway died, or the call timed out,
    while the step was in flight). Only for an undo that is harmless when the step never took
    effect (deleting by a name that may not exist); otherwise an in-doubt step is reported and
    left alone."""
    retries: int = Field(2, ge=0, le=10)
    """Extra attempts when the compensating tool is safe to repeat (read-only or idempotent)."""


class FanOut(_Model):
    """Send one call to several servers, or to every replica of one server."""

    servers: list[str] = Field(default_factory=list)
    """Target servers (names in `mcpServers`); each must serve `tool`."""
    replicas: str | None = None
    """Instead of `servers`: every replica of this server (`replicas: N` or `urls: [...]`)."""
    tool: str
    """The tool's own name on the targets (not the gateway name)."""
    gather: Gather = "all"
    """all: every answer, the step fails if any fails; first: the first success (the others are
    cancelled when the tool is safe to repeat, else awaited); quorum: `quorum` successes."""
    quorum: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _targets(self) -> FanOut:
        if bool(self.servers) == bool(self.replicas):
            raise ValueError("fanout: give either 'servers' (a list) or 'replicas' (a server name)")
        if self.gather == "quorum" and self.quorum is None:
            raise ValueError("fanout: gather 'quorum' needs 'quorum: N'")
        if self.quorum is not None and self.gather != "quorum":
            raise ValueError("fanout: 'quorum' goes with gather: quorum")
        if self.servers and self.quorum is not None and self.quorum > len(self.servers):
            raise ValueError(f"fanout: quorum {self.quorum} is more than the {len(self.servers)} servers")
        if len(set(self.servers)) != len(self.servers):
            raise ValueError("fanout: a server is listed twice")
        return self


class Step(_Model):
    """One step: a tool call (or a fan-out), with its dependencies, condition, limits and undo."""

    id: str = ""
    """Referenced by templates and `depends_on` (default `step<n>`, 1-based)."""
    tool: str | None = None
    """The gateway tool name (`server__tool`), or a gateway tool (not a workflow)."""
    fanout: FanOut | None = None
    arguments: dict[str, Any] = Field(default_factory=dict)
    depends_on: list[str] = Field(default_factory=list)
    when: str | Criterion | None = None
    for_each: str | list[Any] | None = None
    """A template giving a list (or a literal list): one call per item."""
    as_: str = Field("item", alias="as")
    """The item's name in templates (`{{item}}`; `{{index}}` is its 0-based position)."""
    concurrency: int = Field(10, ge=1, le=50)
    """Items of a `for_each` in flight at once (ToolHive's cap is 50 as well)."""
    timeout_ms: int | None = Field(None, gt=0)
    """Per call (each item, each attempt). A write that times out is in doubt (it may have run)."""
    retries: int = Field(0, ge=0, le=10)
    """Extra attempts after a failure -- only when the tool is read-only or idempotent (the
    gateway's tool facts: `readOnlyHint`, `idempotentHint` + `destructiveHint: false`, or
    `read_only_tools` / `idempotent_tools`); for any other tool they are not made."""
    retry_backoff_ms: int = Field(100, ge=0)
    wait_ms: int = Field(0, ge=0)
    """Wait this long after the dependencies finished before starting (e.g. an index refresh)."""
    compensate: Compensation | None = None

    @property
    def target(self) -> str:
        """The tool name the step calls (for a fan-out: `<targets>/<tool>`)."""
        if self.tool is not None:
            return self.tool
        assert self.fanout is not None
        where = self.fanout.replicas or ",".join(self.fanout.servers)
        return f"{where}/{self.fanout.tool}"

    def references(self) -> set[str]:
        """Step ids whose results the step's templates (arguments, when, for_each) use."""
        if isinstance(self.when, Criterion):
            refs = _step_refs([self.arguments, self.for_each, self.when.model_dump()])
            return refs | ({self.when.step} if self.when.step else set())
        return _step_refs([self.arguments, self.for_each, self.when])


class Workflow(_Model):
    """A named workflow (see the module doc)."""

    name: str = ""
    description: str = ""
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1)
    output: Any = None
    """A template of the result (default: every step's `json`, else its `text`, by step id)."""
    on_failure: OnFailure = "compensate"
    on_restart: OnRestart = "resume"
    max_parallel: int = Field(8, ge=1, le=256)
    """Steps (and items) in flight at once in one run."""
    timeout_ms: int | None = Field(None, gt=0)
    """The whole run; when it expires the run fails (and compensates, per `on_failure`)."""
    source: str = Field("", exclude=True)
    """Where it was defined: "config", a file path, "agent" (`mcpopt__workflow`) or "optimizer"."""
    _deps: dict[str, set[str]] | None = PrivateAttr(None)
    _snapshot: dict[str, Any] | None = PrivateAttr(None)
    _validator: Any = PrivateAttr(None)

    @model_validator(mode="after")
    def _graph(self) -> Workflow:
        problems = validate(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ---- derived facts ----------------------------------------------------------------
    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)

    def dependencies(self) -> dict[str, set[str]]:
        """Step id -> the ids it waits for (`depends_on` plus the steps its templates read).

        Computed once per definition (templates are parsed here, not per run)."""
        if self._deps is None:
            self._deps = {s.id: set(s.depends_on) | s.references() for s in self.steps}
        return self._deps

    def snapshot(self) -> dict[str, Any]:
        """The definition as JSON (what a run's journal keeps), computed once."""
        if self._snapshot is None:
            self._snapshot = self.model_dump(mode="json", by_alias=True, exclude_unset=True)
        return self._snapshot

    def order(self) -> list[str]:
        """Step ids in a topological order (config order among independent steps)."""
        deps = self.dependencies()
        done: list[str] = []
        left = [s.id for s in self.steps]
        while left:
            ready = [sid for sid in left if deps[sid] <= set(done)]
            if not ready:  # validate() rejects cycles; never reached for a valid workflow
                raise WorkflowError(f"workflow {self.name!r}: dependency cycle among {left}")
            done.extend(ready)
            left = [sid for sid in left if sid not in ready]
        return done

    def input_schema(self) -> dict[str, Any]:
        """The workflow tool's `inputSchema` (JSON Schema object of the parameters)."""
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {name: p.json_schema() for name, p in self.parameters.items()},
            "additionalProperties": False,
        }
        required = [name for name, p in self.parameters.items() if p.is_required]
        if required:
            schema["required"] = required
        return schema

    def validator(self) -> Any:
        """A JSON Schema (2020-12) validator of the parameters (`jsonschema`), built once."""
        if self._validator is None:
            import jsonschema

            self._validator = jsonschema.Draft202012Validator(self.input_schema())
        return self._validator

    def tool_name(self, prefix: str = TOOL_PREFIX) -> str:
        return f"{prefix}{self.name}"


def _step_refs(values: Iterable[Any]) -> set[str]:
    refs: set[str] = set()
    for expr in template_expressions(values):
        parts = expr.split("|", 1)[0].strip().split(".")
        if parts[0] == "steps" and len(parts) > 1:
            refs.add(parts[1])
    return refs


def _roots(values: Iterable[Any]) -> list[tuple[str, str | None]]:
    """(root name, first key) of every template expression: `params.user` -> ("params", "user")."""
    out = []
    for expr in template_expressions(values):
        parts = expr.split("|", 1)[0].strip().split(".")
        out.append((parts[0], parts[1] if len(parts) > 1 else None))
    return out


def validate(wf: Workflow) -> list[str]:
    """Every problem of a workflow (empty when valid); fills default step ids."""
    problems: list[str] = []
    if wf.name and not NAME.match(wf.name):
        problems.append(f"name {wf.name!r}: expected 1-64 characters from A-Z a-z 0-9 _ -")
    for pname in wf.parameters:
        if not NAME.match(pname) or pname in RESERVED_VARS:
            problems.append(f"parameter {pname!r}: expected a name of A-Z a-z 0-9 _ - (not params/steps/run/self)")
    ids: list[str] = []
    for i, step in enumerate(wf.steps, 1):
        if not step.id:
            step.id = f"step{i}"
        if not NAME.match(step.id):
            problems.append(f"step {step.id!r}: expected an id of A-Z a-z 0-9 _ -")
        if step.id in ids:
            problems.append(f"step id {step.id!r} is used twice")
        ids.append(step.id)
    known = set(ids)
    for step in wf.steps:
        where = f"step {step.id!r}"
        if (step.tool is None) == (step.fanout is None):
            problems.append(f"{where}: give either 'tool' or 'fanout'")
        if step.tool is not None and step.tool.startswith("workflow__"):
            problems.append(f"{where}: a workflow step cannot call a workflow ({step.tool})")
        if step.as_ in RESERVED_VARS or step.as_ in wf.parameters or not NAME.match(step.as_):
            problems.append(f"{where}: 'as: {step.as_}' clashes with a template name")
        if step.for_each is None and step.as_ != "item":
            problems.append(f"{where}: 'as' goes with 'for_each'")
        if step.fanout is not None and step.for_each is not None:
            problems.append(f"{where}: a fan-out step cannot also have 'for_each'")
        if step.fanout is not None and step.compensate is not None:
            problems.append(f"{where}: a fan-out step cannot be compensated (write with one step per server)")
        for dep in step.depends_on:
            if dep not in known:
                problems.append(f"{where}: depends_on {dep!r}, which is not a step")
            elif dep == step.id:
                problems.append(f"{where}: depends on itself")
        for ref in sorted(step.references()):
            if ref not in known:
                problems.append(f"{where}: uses steps.{ref}, which is not a step")
            elif ref == step.id:
                problems.append(f"{where}: uses its own result (steps.{ref}); use 'self' in 'compensate'")
        item_vars = {step.as_, "index"} if step.for_each is not None else set()
        comp = step.compensate
        sections: list[tuple[str, Any, set[str]]] = [
            ("arguments", step.arguments, item_vars),
            ("for_each", step.for_each, set()),
            ("when", step.when.model_dump() if isinstance(step.when, Criterion) else step.when, set()),
        ]
        if comp is not None:
            sections.append(("compensate", comp.arguments, item_vars | {"self"}))
            for ref in sorted(_step_refs([comp.arguments])):
                if ref not in known:
                    problems.append(f"{where}: compensate uses steps.{ref}, which is not a step")
        for section, value, extra in sections:
            for root, key in _roots([value]):
                if root == "params":
                    if key is None or key not in wf.parameters:
                        problems.append(f"{where}: {section} uses params.{key}, which is not a declared parameter")
                elif root not in ("steps", "run") and root not in extra:
                    problems.append(f"{where}: {section} uses {{{{{root}...}}}}, which is not known here")
        if isinstance(step.when, Criterion) and step.when.step is None:
            problems.append(f"{where}: a 'when' criterion needs 'step' (the step whose result it checks)")
    for root, key in _roots([wf.output]):
        if root == "params" and (key is None or key not in wf.parameters):
            problems.append(f"output uses params.{key}, which is not a declared parameter")
        elif root == "steps" and key not in known:
            problems.append(f"output uses steps.{key}, which is not a step")
        elif root not in ("params", "steps", "run"):
            problems.append(f"output uses {{{{{root}...}}}}, which is not known there")
    return problems + _cycles(wf, known)


def _cycles(wf: Workflow, known: set[str]) -> list[str]:
    deps = {s.id: (set(s.depends_on) | s.references()) & known for s in wf.steps}
    state: dict[str, int] = {}
    found: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 1:
            cycle = path[path.index(node) :] + [node]
            found.append("dependency cycle: " + " -> ".join(cycle))
            return
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in sorted(deps.get(node, ())):
            visit(dep, [*path, node])
        state[node] = 2

    for s in wf.steps:
        visit(s.id, [])
    return found[:1]


def parse_workflow(data: Any, name: str = "", source: str = "") -> Workflow:
    """One workflow from a parsed mapping.

    Raises:
        WorkflowError: naming the source, the workflow and every problem found.
    """
    label = f"{source}: " if source else ""
    if not isinstance(data, Mapping):
        raise WorkflowError(f"{label}workflow {name!r}: expected a mapping with 'steps'")
    body = dict(data)
    if name:
        if body.get("name") not in (None, name):
            raise WorkflowError(f"{label}workflow {name!r}: 'name: {body['name']}' differs from its key")
        body["name"] = name
    try:
        wf = Workflow.model_validate(body)
    except ValidationError as exc:
        raise WorkflowError(f"{label}workflow {body.get('name') or '?'!r}: {describe_errors(exc)}") from None
    wf.source = source
    if not wf.name:
        raise WorkflowError(f"{label}a workflow needs a 'name'")
    return wf


def describe_errors(exc: ValidationError) -> str:
    """Every pydantic error as `key.path: message`, joined by "; "."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def load_workflow_file(path: str) -> list[Workflow]:
    """The workflows of one YAML/JSON file: one workflow (with `name`), a list, or `{workflows: {name: ...}}`.

    Raises:
        WorkflowError: unreadable file, bad YAML, or invalid workflows (every problem named).
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise WorkflowError(f"{path}: cannot read the workflow file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise WorkflowError(f"{path}: not valid YAML ({exc})") from None
    if isinstance(data, Mapping) and "workflows" in data:
        data = data["workflows"]
    if isinstance(data, Mapping) and "steps" in data:
        return [parse_workflow(data, source=path)]
    if isinstance(data, Mapping):
        return [parse_workflow(body, str(name), path) for name, body in data.items()]
    if isinstance(data, list):
        return [parse_workflow(body, source=path) for body in data]
    raise WorkflowError(f"{path}: expected a workflow, a list of them, or {{workflows: {{name: ...}}}}")


def parse_definition(name: str, body: Mapping[str, Any], source: str) -> Workflow:
    """A workflow from an agent's or the optimizer's definition.

    Raises:
        WorkflowError: every problem named.
    """
    data = {**body, "name": name}
    try:
        wf = Workflow.model_validate(data)
    except ValidationError as exc:
        raise WorkflowError(f"workflow {name!r}: {describe_errors(exc)}") from None
    wf.source = source
    return wf
