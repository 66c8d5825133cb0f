"""`mcpopt__workflow`: agents build workflows step by step, run them, watch and cancel them.

Actions (the lifecycle of the seed scenario `workflow_creation_flow`):

- `create {name, definition?: {description, parameters, steps, output, on_failure, on_restart,
  max_parallel, timeout_ms}, from?: <workflow to copy>}` -- a new workflow (a draft until it
  validates). `from` copies an existing workflow as a template (`template_apply`).
- `add_step {name, step: {...}, position?}` / `update_step {name, step_id, step: {...changes}}` /
  `remove_step {name, step_id}` -- edit its steps.
- `run {name, arguments?, wait?: true}` -- run it (`wait: false` returns the run id at once).
- `get_status {run_id}` -- a run's state (live, or from the journal); `{name}` -- the workflow.
- `list` -- the workflows (config, files, agents, optimizer) and this caller's recent runs.
- `cancel {run_id}` -- no new step starts, calls in flight finish, then `on_failure` applies.
- `delete {name}` -- remove a workflow an agent built.

Every change is validated (all problems listed in the answer, not as an error: a draft may be
incomplete), kept in the journal's database (it survives restarts), and a valid workflow is
served at once as `workflow__<name>`. Workflows from the config or the optimizer cannot be
edited here; an agent's workflow can be edited only by callers of the same auth partition.
"""

from __future__ import annotations

import asyncio
import copy
from typing import TYPE_CHECKING, Any

import mcp_types as types
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from mcpopt.api import ClientLink
from mcpopt.workflow_model import NAME, TOOL_PREFIX, Workflow, WorkflowError, parse_definition
from mcpopt.workflows.wire import tool_result

if TYPE_CHECKING:
    from mcpopt.workflows.host import WorkflowHost

ACTIONS = ("create", "add_step", "update_step", "remove_step", "run", "get_status", "list", "cancel", "delete")
_DEFINITION_KEYS = (
    "description",
    "parameters",
    "steps",
    "output",
    "on_failure",
    "on_restart",
    "max_parallel",
    "timeout_ms",
)


class AgentWorkflows:
    """Drafts and handlers of `mcpopt__workflow` (see the module doc)."""

    def __init__(self, service: WorkflowHost) -> None:
        self.service = service
        self.drafts: dict[str, dict[str, Any]] = {}
        """name -> `{definition, partition, problems}` of the workflows agents built."""

    @property
    def name(self) -> str:
        return f"{self.service.own_prefix}workflow"

    def tool(self) -> types.Tool:
        return types.Tool(
            name=self.name,
            description=(
                "Build, run and watch multi-step workflows: one call instead of many. action=create a workflow "
                "(name, definition {description, parameters: {p: {type, description, default}}, steps: [{id, tool, "
                "arguments, depends_on, for_each, when, compensate: {tool, arguments}}], output}); add_step / "
                "update_step / remove_step; run (name, arguments) -- independent steps run in parallel, "
                "'{{params.p}}' and '{{steps.<id>.json.<key>}}' template arguments, completed writes are undone "
                "when a later step fails; get_status (run_id); list; cancel (run_id); delete (name). A valid "
                "workflow is also served as the tool workflow__<name>."
            ),
            input_schema={
                "type": "object",
                "properties": {
                    "action": {"enum": list(ACTIONS)},
                    "name": {"type": "string", "description": "the workflow"},
                    "definition": {"type": "object", "description": "create: the workflow's fields"},
                    "from": {"type": "string", "description": "create: copy this workflow (a template)"},
                    "step": {"type": "object", "description": "add_step: the step; update_step: the changes"},
                    "step_id": {"type": "string"},
                    "position": {"type": "integer", "minimum": 0, "description": "add_step: index (default: last)"},
                    "arguments": {"type": "object", "description": "run: the workflow's parameters"},
                    "wait": {"type": "boolean", "default": True, "description": "run: wait for the result"},
                    "run_id": {"type": "string"},
                },
                "required": ["action"],
            },
            annotations=types.ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=True),
        )

    async def load(self) -> None:
        """Load the workflows agents built (kept in the journal's database) and serve the valid ones."""
        journal = self.service.journal
        if journal is None:
            return
        for row in await journal.definitions():
            name = row["name"]
            if name in self.service.definitions:
                continue  # the config now defines it: the config wins
            self.drafts[name] = {"definition": row["definition"], "partition": row["partition"], "problems": []}
            self._validate(name, register=True)

    # ---- dispatch -------------------------------------------------------------------------------
    async def handle(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        action = arguments.get("action")
        if action not in ACTIONS:
            raise MCPError(code=INVALID_PARAMS, message=f"workflow: 'action' must be one of {', '.join(ACTIONS)}")
        handler = getattr(self, f"_{action}")
        result: dict[str, Any] = await handler(arguments, link)
        return tool_result(result, is_error=bool(result.get("isError")))

    def _name(self, arguments: dict[str, Any]) -> str:
        name = arguments.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise MCPError(code=INVALID_PARAMS, message="workflow: 'name' must be 1-64 characters of A-Z a-z 0-9 _ -")
        return name

    def _own_draft(self, name: str, link: ClientLink) -> dict[str, Any]:
        draft = self.drafts.get(name)
        if draft is None:
            if name in self.service.definitions:
                src = self.service.definitions[name].source or "config"
                raise MCPError(code=INVALID_PARAMS, message=f"workflow {name!r} comes from {src}: edit it there")
            raise MCPError(code=INVALID_PARAMS, message=f"no workflow {name!r} (create it first)")
        if draft["partition"] != link.partition:
            raise MCPError(code=INVALID_PARAMS, message=f"workflow {name!r} belongs to another client")
        return draft

    async def _save(self, name: str) -> dict[str, Any]:
        draft = self.drafts[name]
        journal = self.service.require_journal()
        await journal.save_definition(name, draft["definition"], "agent", draft["partition"])
        self._validate(name, register=True)
        return self._describe(name)

    def _validate(self, name: str, *, register: bool) -> Workflow | None:
        draft = self.drafts[name]
        try:
            wf = parse_definition(name, draft["definition"], "agent")
        except WorkflowError as exc:
            draft["problems"] = str(exc).split(": ", 1)[-1].split("; ")
            if register:
                self.service.unregister(name)
            return None
        draft["problems"] = []
        if register:
            self.service.register(wf)
        return wf

    def _describe(self, name: str) -> dict[str, Any]:
        draft = self.drafts.get(name)
        if draft is not None:
            definition = draft["definition"]
            valid = not draft["problems"]
            return {
                "name": name,
                "source": "agent",
                "valid": valid,
                "problems": draft["problems"],
                "tool": f"{TOOL_PREFIX}{name}" if valid else None,
                "steps": [s.get("id") for s in definition.get("steps", []) if isinstance(s, dict)],
                "definition": definition,
            }
        wf = self.service.definitions[name]
        return {
            "name": name,
            "source": wf.source or "config",
            "valid": True,
            "problems": [],
            "tool": wf.tool_name(TOOL_PREFIX),
            "steps": [s.id for s in wf.steps],
            "definition": wf.model_dump(mode="json", by_alias=True, exclude_unset=True),
        }

    # ---- actions --------------------------------------------------------------------------------
    async def _create(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        name = self._name(arguments)
        if name in self.drafts or name in self.service.definitions:
            raise MCPError(code=INVALID_PARAMS, message=f"workflow {name!r} exists (update it, or delete it first)")
        definition: dict[str, Any] = {}
        template = arguments.get("from")
        if template is not None:
            if template in self.drafts:
                definition = copy.deepcopy(self.drafts[template]["definition"])
            elif template in self.service.definitions:
                definition = self.service.definitions[template].model_dump(
                    mode="json", by_alias=True, exclude_unset=True
                )
            else:
                raise MCPError(code=INVALID_PARAMS, message=f"create: no workflow {template!r} to copy")
            definition.pop("name", None)
        given = arguments.get("definition") or {}
        if not isinstance(given, dict):
            raise MCPError(code=INVALID_PARAMS, message="create: 'definition' must be an object")
        unknown = sorted(set(given) - set(_DEFINITION_KEYS))
        if unknown:
            raise MCPError(
                code=INVALID_PARAMS,
                message=f"create: unknown definition key(s) {', '.join(unknown)} "
                f"(known: {', '.join(_DEFINITION_KEYS)})",
            )
        definition.update(given)
        definition.setdefault("steps", [])
        self.drafts[name] = {"definition": definition, "partition": link.partition, "problems": []}
        return {"created": name, **(await self._save(name))}

    async def _add_step(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        name = self._name(arguments)
        draft = self._own_draft(name, link)
        step = arguments.get("step")
        if not isinstance(step, dict):
            raise MCPError(code=INVALID_PARAMS, message="add_step: 'step' must be an object")
        steps = draft["definition"].setdefault("steps", [])
        if step.get("id") and any(isinstance(s, dict) and s.get("id") == step["id"] for s in steps):
            raise MCPError(code=INVALID_PARAMS, message=f"add_step: step {step['id']!r} exists (use update_step)")
        position = arguments.get("position")
        if isinstance(position, int) and 0 <= position <= len(steps):
            steps.insert(position, dict(step))
        else:
            steps.append(dict(step))
        return {"added": step.get("id") or f"step{len(steps)}", **(await self._save(name))}

    def _step_index(self, draft: dict[str, Any], step_id: Any, action: str) -> int:
        steps = draft["definition"].get("steps", [])
        for i, s in enumerate(steps):
            if isinstance(s, dict) and (s.get("id") or f"step{i + 1}") == step_id:
                return i
        known = ", ".join(str(s.get("id") or f"step{i + 1}") for i, s in enumerate(steps) if isinstance(s, dict))
        raise MCPError(code=INVALID_PARAMS, message=f"{action}: no step {step_id!r} (steps: {known or 'none'})")

    async def _update_step(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        name = self._name(arguments)
        draft = self._own_draft(name, link)
        i = self._step_index(draft, arguments.get("step_id"), "update_step")
        changes = arguments.get("step")
        if not isinstance(changes, dict):
            raise MCPError(code=INVALID_PARAMS, message="update_step: 'step' must be an object of changes")
        steps = draft["definition"]["steps"]
        merged = {**steps[i], **changes}
        merged = {k: v for k, v in merged.items() if v is not None}  # null removes a key
        steps[i] = merged
        return {"updated": merged.get("id") or arguments.get("step_id"), **(await self._save(name))}

    async def _remove_step(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        name = self._name(arguments)
        draft = self._own_draft(name, link)
        i = self._step_index(draft, arguments.get("step_id"), "remove_step")
        removed = draft["definition"]["steps"].pop(i)
        return {"removed": removed.get("id") or arguments.get("step_id"), **(await self._save(name))}

    async def _delete(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        name = self._name(arguments)
        self._own_draft(name, link)
        del self.drafts[name]
        await self.service.require_journal().delete_definition(name)
        self.service.unregister(name)
        return {"deleted": name}

    async def _run(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        name = self._name(arguments)
        wf = self.service.definitions.get(name)
        if wf is None:
            draft = self.drafts.get(name)
            if draft is None:
                raise MCPError(code=INVALID_PARAMS, message=f"run: no workflow {name!r}")
            raise MCPError(
                code=INVALID_PARAMS, message=f"run: workflow {name!r} is not valid yet: {'; '.join(draft['problems'])}"
            )
        params = arguments.get("arguments") or {}
        if not isinstance(params, dict):
            raise MCPError(code=INVALID_PARAMS, message="run: 'arguments' must be an object")
        if arguments.get("wait", True) is False:
            run, _task = await self.service.start_run(wf, params, link)
            return {"run_id": run.run_id, "workflow": name, "status": "running"}
        result = await self.service.run(wf, params, link)
        return {**result, "isError": result["status"] != "completed"}

    async def _get_status(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        run_id = arguments.get("run_id")
        if isinstance(run_id, str) and run_id:
            return await self.service.status(run_id, link.partition)
        name = self._name(arguments)
        if name not in self.drafts and name not in self.service.definitions:
            raise MCPError(code=INVALID_PARAMS, message=f"get_status: no workflow {name!r} (or give run_id)")
        return self._describe(name)

    async def _list(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        names = sorted(set(self.service.definitions) | set(self.drafts))
        workflows = []
        for name in names:
            d = self._describe(name)
            workflows.append({k: d[k] for k in ("name", "source", "valid", "tool", "steps", "problems")})
        runs = await self.service.require_journal().runs(limit=50)
        mine = [r.summary() for r in runs if r.partition == link.partition][:20]
        return {"workflows": workflows, "runs": mine}

    async def _cancel(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        run_id = arguments.get("run_id")
        if not isinstance(run_id, str) or not run_id:
            raise MCPError(code=INVALID_PARAMS, message="cancel: 'run_id' is required")
        out = await self.service.cancel(run_id, link.partition)
        await asyncio.sleep(0)
        return out
