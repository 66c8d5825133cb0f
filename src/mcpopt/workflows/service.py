"""The workflows plugin: serves each workflow as a tool, runs it, journals it, resumes what a dead
gateway left unfinished.

`WorkflowService(api)` depends only on `GatewayAPI` (it calls tools, reads the catalog, registers
its own tools). Its lifecycle is `await service.start()` once the gateway's upstreams are up,
`await service.aclose()` before they stop. It serves:

- `workflow__<name>` for every valid workflow (from the config, the files it names, agents, and
  the optimizer), with an `inputSchema` from the workflow's parameters;
- `mcpopt__workflow` (agents build, run, watch and cancel workflows: `mcpopt.workflows.agent`);
- `mcpopt__fanout` (one call to several servers or every replica of one: `mcpopt.workflows.fanout`).

Workflows the optimizer proposed and applied are `workflow` rules in the rule file
(`mcpopt.pipeline.rules`): the service serves every enabled one (source "optimizer") and withdraws
it when the rule is rolled back, re-reading the file when it changes (at each lease renewal).

A run belongs to the gateway process that holds its lease in the journal; the service renews the
leases of its runs every `lease_ms / 5`, picks up cancel requests made through the journal
(`mcpopt workflows cancel`), and every ten renewals looks for runs whose owner died (another
gateway process over the same config) and takes them over. A clean stop releases its leases:
the next start resumes those runs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

import mcp_types as types
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS
from mcp_types.version import LATEST_HANDSHAKE_VERSION

from mcpopt.api import ClientLink, GatewayAPI, ProgressFn, no_progress
from mcpopt.workflow_model import TOOL_PREFIX, Workflow, WorkflowError, parse_definition
from mcpopt.workflows.engine import RunSuspended, WorkflowRun
from mcpopt.workflows.journal import ACTIVE, Journal, RunInfo, SqliteJournal, owner_id, owner_is_dead
from mcpopt.workflows.settings import WorkflowSettings, journal_path, workflow_settings
from mcpopt.workflows.wire import tool_result

logger = logging.getLogger(__name__)


class WorkflowService:
    """See the module doc.

    Args:
        api: the gateway.
        journal: the journal (default: SQLite at `journal_path(config)`).
        definitions: the workflows to serve (default: the config's, files included).
    """

    def __init__(
        self,
        api: GatewayAPI,
        *,
        journal: Journal | None = None,
        definitions: Mapping[str, Workflow] | None = None,
    ) -> None:
        self.api = api
        self.settings: WorkflowSettings = workflow_settings(api.config)
        base = definitions if definitions is not None else getattr(api.config, "workflows", {}) or {}
        self.definitions: dict[str, Workflow] = dict(base)
        self.journal: Journal | None = journal
        self.owner = owner_id()
        self.active: dict[str, tuple[WorkflowRun, asyncio.Task[dict[str, Any]]]] = {}
        cfg = api.config.gateway
        self.own_prefix = f"{cfg.name}{cfg.separator}"
        self._heartbeat: asyncio.Task[None] | None = None
        self._registered: set[str] = set()
        self._started = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rules_mtime: int | None = None
        from mcpopt.workflows.agent import AgentWorkflows

        self.agent = AgentWorkflows(self)

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the journal, register the tools, resume orphaned runs, start renewing leases."""
        if self.journal is None:
            js = self.settings.journal
            self.journal = SqliteJournal(journal_path(self.api.config), synchronous=js.synchronous)
        with contextlib.suppress(Exception):
            await self.journal.prune(time.time() - self.settings.journal.keep_days * 86400)
        await self.agent.load()
        for wf in list(self.definitions.values()):
            self.register(wf)
        self.sync_rules()
        self._register_own_tools()
        if self.settings.resume:
            await self.resume_orphans()
        self._heartbeat = asyncio.get_running_loop().create_task(self._renew_loop())
        self._started = True

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Stop: runs start no new step, the calls in flight get `grace_s` seconds to finish (a
        write cut off mid-call would be in doubt), then the runs stay `running` in the journal with
        their leases released, so the next start of a gateway over this config resumes them."""
        for run, _ in self.active.values():
            run.suspend()  # before anything else: from now on no step starts
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        tasks = [task for _, task in self.active.values()]
        ids = list(self.active)
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.journal is not None:
            with contextlib.suppress(Exception):
                await self.journal.release(self.owner, ids)
            await self.journal.close()

    @property
    def lease_s(self) -> float:
        return self.settings.lease_ms / 1000

    def require_journal(self) -> Journal:
        """The journal (MCP error INVALID_PARAMS when the service is not started)."""
        if self.journal is None:
            raise MCPError(code=INVALID_PARAMS, message="workflows: the service is not started")
        return self.journal

    # ---- workflows the optimizer applied ----------------------------------------------------
    def sync_rules(self) -> None:
        """Serve the enabled `workflow` rules of the rule file; withdraw those no longer enabled."""
        from mcpopt.pipeline.rules import RuleError, RuleStore, default_rules_path

        if not self.settings.optimizer_workflows:
            return
        path = default_rules_path(self.api.config)
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            mtime = 0
        if mtime == self._rules_mtime:
            return
        self._rules_mtime = mtime
        try:
            rules = RuleStore(path).active() if mtime else []
        except RuleError as exc:
            logger.warning("workflows: keeping the optimizer's workflows as they are: %s", exc)
            return
        wanted: dict[str, Workflow] = {}
        for rule in rules:
            definition = rule.action.workflow if rule.action.type == "workflow" else None
            if not definition or not isinstance(definition.get("name"), str):
                continue
            name = definition["name"]
            if name in self.definitions and self.definitions[name].source != "optimizer":
                continue  # a workflow of that name from the config or an agent wins
            try:
                wanted[name] = parse_definition(name, definition, "optimizer")
            except WorkflowError as exc:
                logger.warning("workflows: rule %s: %s", rule.id, exc)
        for name in [n for n, wf in self.definitions.items() if wf.source == "optimizer" and n not in wanted]:
            self.unregister(name)
        for name, wf in wanted.items():
            old = self.definitions.get(name)
            if old is None or old.snapshot() != wf.snapshot():
                self.register(wf)

    # ---- tools ----------------------------------------------------------------------------------
    def register(self, wf: Workflow) -> None:
        """Serve `wf` as `workflow__<name>` (replacing an earlier definition of that name)."""
        self.definitions[wf.name] = wf
        self.api.add_tool(self.tool_of(wf), self._handler(wf.name))
        self._registered.add(wf.tool_name(TOOL_PREFIX))
        self._changed()

    def unregister(self, name: str) -> None:
        """Stop serving `workflow__<name>` (runs in flight go on)."""
        self.definitions.pop(name, None)
        tool = f"{TOOL_PREFIX}{name}"
        if tool in self._registered:
            self.api.remove_tool(tool)
            self._registered.discard(tool)
            self._changed()

    def _changed(self) -> None:
        """Clients hear of tools added or removed while the gateway runs (not during start)."""
        if self._started:
            task = asyncio.get_running_loop().create_task(self.api.tools_changed())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def tool_of(self, wf: Workflow) -> types.Tool:
        """The MCP tool of a workflow: its description, the parameters' schema, annotations from its steps."""
        infos = self.api.catalog.tool_infos
        tools = [s.tool for s in wf.steps if s.tool] + [s.fanout.tool for s in wf.steps if s.fanout]
        read_only = all(
            s.tool is not None and infos.get(s.tool) is not None and infos[s.tool].read_only for s in wf.steps
        )
        steps = ", ".join(f"{s.id} ({s.target})" for s in wf.steps[:8]) + (" ..." if len(wf.steps) > 8 else "")
        desc = wf.description or f"Workflow {wf.name}"
        desc += f" -- one call runs {len(wf.steps)} steps (independent ones in parallel): {steps}."
        if any(s.compensate for s in wf.steps):
            desc += f" On failure its completed writes are undone ({wf.on_failure})."
        return types.Tool(
            name=wf.tool_name(TOOL_PREFIX),
            description=desc,
            input_schema=wf.input_schema(),
            annotations=types.ToolAnnotations(
                read_only_hint=read_only,
                destructive_hint=not read_only,
                idempotent_hint=read_only,
                open_world_hint=True,
            ),
            meta={"mcpopt/workflow": {"name": wf.name, "source": wf.source or "config", "tools": tools}},
        )

    def _handler(self, name: str) -> Any:
        async def handler(arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
            wf = self.definitions.get(name)
            if wf is None:
                raise MCPError(code=INVALID_PARAMS, message=f"workflow {name!r} no longer exists")
            result = await self.run(wf, arguments, link)
            return tool_result(result, is_error=result["status"] != "completed")

        return handler

    def _register_own_tools(self) -> None:
        if self.settings.agent_workflows:
            self.api.add_tool(self.agent.tool(), self.agent.handle)
        if self.settings.fanout_tool:
            self.api.add_tool(self._fanout_tool(), self._fanout)

    def _fanout_tool(self) -> types.Tool:
        return types.Tool(
            name=f"{self.own_prefix}fanout",
            description=(
                "Send the same tool call to several MCP servers, or to every replica of one, at once; gather "
                "'all' answers, the 'first' success, or a 'quorum' of N. Each answer is labelled with its source."
            ),
            input_schema={
                "type": "object",
                "properties": {
                    "tool": {"type": "string", "description": "the tool's own name on the servers (not prefixed)"},
                    "servers": {"type": "array", "items": {"type": "string"}, "description": "MCP server names"},
                    "replicas": {"type": "string", "description": "instead of servers: every replica of this server"},
                    "arguments": {"type": "object"},
                    "gather": {"enum": ["all", "first", "quorum"], "default": "all"},
                    "quorum": {"type": "integer", "minimum": 1},
                },
                "required": ["tool"],
            },
            annotations=types.ToolAnnotations(read_only_hint=False, open_world_hint=True),
        )

    async def _fanout(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        from mcpopt.workflows.fanout import fanout_tool

        result = await fanout_tool(self.api, arguments, link)
        return tool_result(result, is_error=not result["ok"])

    # ---- runs -----------------------------------------------------------------------------------
    def check_params(self, wf: Workflow, arguments: Mapping[str, Any] | None) -> dict[str, Any]:
        """The arguments validated against the workflow's `inputSchema`, defaults filled in.

        Raises:
            MCPError: INVALID_PARAMS listing every problem.
        """
        args = dict(arguments or {})
        validator = wf.validator()
        problems = [
            f"{'.'.join(str(p) for p in err.absolute_path) or '(arguments)'}: {err.message}"
            for err in sorted(validator.iter_errors(args), key=lambda e: list(e.absolute_path))
        ]
        if problems:
            raise MCPError(code=INVALID_PARAMS, message=f"workflow {wf.name}: " + "; ".join(problems))
        for pname, param in wf.parameters.items():
            if pname not in args and "default" in param.model_fields_set:
                args[pname] = param.default
        return args

    def missing_tools(self, wf: Workflow) -> list[str]:
        """Tools (and fan-out servers) the workflow calls that the gateway does not serve now."""
        served = set(self.api.catalog.tool_routes) | {t.name for t in self.api.own_tools()}
        missing = []
        for step in wf.steps:
            names = [step.tool] if step.tool else []
            if step.compensate is not None:
                names.append(step.compensate.tool)
            for name in names:
                if name and name not in served and not self._may_start(name):
                    missing.append(f"{step.id}: {name}")
            if step.fanout is not None:
                for server in step.fanout.servers or [step.fanout.replicas or ""]:
                    if server not in self.api.upstreams:
                        missing.append(f"{step.id}: MCP server {server}")
        return missing

    def _may_start(self, name: str) -> bool:
        """A tool of a server that is lazy/idle or starting may appear once it runs."""
        sep = self.api.config.gateway.separator
        for server, pool in self.api.upstreams.items():
            prefix = self.api.config.tool_prefix(server)
            if pool.state in ("idle", "starting") and (not prefix or name.startswith(prefix + sep)):
                return True
        return False

    async def start_run(
        self, wf: Workflow, arguments: Mapping[str, Any] | None, link: ClientLink, progress: ProgressFn | None = None
    ) -> tuple[WorkflowRun, asyncio.Task[dict[str, Any]]]:
        """Validate, journal and start a run in the background; returns it and its task.

        Raises:
            MCPError: INVALID_PARAMS for bad arguments, or tools the gateway does not serve (the
                run is refused before any step).
        """
        journal = self.require_journal()
        params = self.check_params(wf, arguments)
        missing = self.missing_tools(wf)
        if missing:
            raise MCPError(
                code=INVALID_PARAMS,
                message=f"workflow {wf.name}: not run, the gateway does not serve: {', '.join(missing)}",
            )
        now = time.time()
        run_id = f"{int(now * 1000):x}-{uuid.uuid4().hex[:12]}"
        info = RunInfo(
            run_id=run_id,
            workflow=wf.name,
            status="running",
            params=params,
            definition=wf.snapshot(),
            created=now,
            updated=now,
            owner=self.owner,
            lease_until=now + self.lease_s,
            partition=link.partition,
            principal=principal_json(link.principal),
        )
        await journal.create(info)
        run = WorkflowRun(
            self.api,
            journal,
            wf,
            run_id,
            params,
            link,
            progress=progress if progress is not None else self._progress(link),
            max_items=self.settings.max_items,
            max_result_bytes=self.settings.journal.max_result_bytes,
        )
        task = asyncio.get_running_loop().create_task(self._drive(run))
        self.active[run_id] = (run, task)
        return run, task

    async def run(
        self, wf: Workflow, arguments: Mapping[str, Any] | None, link: ClientLink, progress: ProgressFn | None = None
    ) -> dict[str, Any]:
        """Run a workflow to its end (see `start_run`); the client cancelling its call cancels the
        run (no new step starts, calls in flight finish, then `on_failure` applies)."""
        run, task = await self.start_run(wf, arguments, link, progress)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            run.cancel("the client cancelled the call")
            raise

    def _progress(self, link: ClientLink) -> ProgressFn | None:
        """The client's progress relay for the call in hand (None: it asked for no progress)."""
        return link.relay(link.progress_token) if link.progress_token is not None else None

    async def _drive(
        self, run: WorkflowRun, resume: list[Any] | None = None, *, compensate_now: bool = False
    ) -> dict[str, Any]:
        try:
            return await run.execute(resume, compensate_now=compensate_now)
        except RunSuspended:
            return {
                **run.run_result(),
                "status": "running",
                "error": "the gateway stopped; the run resumes when a gateway over this config starts again",
            }
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("workflow %s run %s failed inside the gateway", run.wf.name, run.run_id)
            error = f"internal error: {type(exc).__name__}: {exc}"
            result = {**run.run_result(), "status": "failed", "error": error}
            with contextlib.suppress(Exception):
                await self.require_journal().set_status(run.run_id, "failed", result=result, error=error)
            return result
        finally:
            self.active.pop(run.run_id, None)

    # ---- takeover after a crash ----------------------------------------------------------------
    async def resume_orphans(self) -> list[str]:
        """Take over the unfinished runs whose owner died or whose lease expired; returns their ids."""
        journal = self.require_journal()
        taken = []
        now = time.time()
        for info in await journal.runs(statuses=ACTIVE, limit=10_000):
            if info.run_id in self.active or info.owner == self.owner:
                continue
            dead = bool(info.owner) and owner_is_dead(info.owner)
            if not (dead or not info.owner or info.lease_until < now):
                continue
            if not await journal.claim(info.run_id, self.owner, self.lease_s, force=dead):
                continue
            taken.append(info.run_id)
            await self._resume(info)
        return taken

    async def _resume(self, info: RunInfo) -> None:
        journal = self.require_journal()
        try:
            wf = Workflow.model_validate(info.definition)
        except Exception as exc:  # noqa: BLE001 - a definition we cannot read cannot be resumed
            error = f"cannot resume: its definition no longer loads ({exc})"
            await journal.set_status(info.run_id, "failed", error=error)
            logger.error("workflow run %s: %s", info.run_id, error)
            return
        principal = None
        if info.principal is not None:
            restore = getattr(self.api, "restore_principal", None)
            if restore is None:
                error = "cannot resume: the gateway cannot act for the principal that started the run"
                await journal.set_status(info.run_id, "failed", error=error)
                logger.error("workflow run %s: %s (%s)", info.run_id, error, info.principal)
                return
            principal = restore(info.principal)
        await journal.record(info.run_id, "note", data={"taken_over_from": info.owner, "by": self.owner})
        events = await journal.events(info.run_id)
        link = ClientLink(
            LATEST_HANDSHAKE_VERSION,
            None,
            None,
            None,
            lambda _t: no_progress,
            partition=info.partition,
            session_id=f"workflow:{info.run_id}",
            principal=principal,
        )
        run = WorkflowRun(
            self.api,
            journal,
            wf,
            info.run_id,
            info.params,
            link,
            max_items=self.settings.max_items,
            max_result_bytes=self.settings.journal.max_result_bytes,
        )
        if info.cancel_requested:
            run.cancel("cancelled (mcpopt workflows cancel)")
        logger.warning(
            "workflow %s run %s: taken over from %s (%s)",
            wf.name,
            info.run_id,
            info.owner or "no owner",
            "compensating" if wf.on_restart == "compensate" else "resuming",
        )
        task = asyncio.get_running_loop().create_task(
            self._drive(run, events, compensate_now=wf.on_restart == "compensate")
        )
        self.active[info.run_id] = (run, task)

    async def _renew_loop(self) -> None:
        interval = self.lease_s / 5
        ticks = 0
        while True:
            await asyncio.sleep(interval)
            ticks += 1
            try:
                self.sync_rules()
                journal = self.require_journal()
                for run_id in await journal.renew(self.owner, list(self.active), self.lease_s):
                    entry = self.active.get(run_id)
                    if entry is not None:
                        entry[0].cancel("cancelled (mcpopt workflows cancel)")
                if ticks % 10 == 0 and self.settings.resume:
                    await self.resume_orphans()
            except Exception:  # noqa: BLE001 - a failed renewal is retried on the next tick
                logger.warning("workflows: lease renewal failed", exc_info=True)

    # ---- status and cancel ----------------------------------------------------------------------
    async def status(self, run_id: str, partition: str | None = None) -> dict[str, Any]:
        """A run's state: live (while this gateway runs it) or from the journal.

        Raises:
            MCPError: INVALID_PARAMS for an unknown run (or one started by another partition).
        """
        entry = self.active.get(run_id)
        if entry is not None and (partition is None or entry[0].link.partition == partition):
            return {**entry[0].run_result(), "live": True}
        info = await self.require_journal().get(run_id)
        if info is None or (partition is not None and info.partition != partition):
            raise MCPError(code=INVALID_PARAMS, message=f"no workflow run {run_id!r}")
        if info.result is not None:
            return {**info.result, "status": info.status, "live": False}
        events = await self.require_journal().events(run_id)
        return {
            **info.summary(),
            "live": False,
            "events": len(events),
            "last_event": events[-1].to_dict() if events else None,
        }

    async def cancel(self, run_id: str, partition: str | None = None) -> dict[str, Any]:
        """Cancel a run: at once when this gateway runs it, else through the journal (its owner sees
        the request when it renews its lease, within `lease_ms / 5`).

        Raises:
            MCPError: INVALID_PARAMS for an unknown or finished run.
        """
        entry = self.active.get(run_id)
        if entry is not None and (partition is None or entry[0].link.partition == partition):
            entry[0].cancel("cancelled (mcpopt__workflow cancel)")
            return {"run_id": run_id, "cancelled": True, "where": "this gateway"}
        info = await self.require_journal().get(run_id)
        if info is None or (partition is not None and info.partition != partition):
            raise MCPError(code=INVALID_PARAMS, message=f"no workflow run {run_id!r}")
        if info.status not in ACTIVE:
            raise MCPError(code=INVALID_PARAMS, message=f"workflow run {run_id} already finished ({info.status})")
        await self.require_journal().request_cancel(run_id)
        return {"run_id": run_id, "cancelled": True, "where": f"requested in the journal (owner {info.owner})"}


def principal_json(principal: Any) -> dict[str, Any] | None:
    """A principal as JSON for the journal (None for none, or the local user).

    A resumed run gets its principal back through `GatewayAPI.restore_principal(data)` when the
    gateway offers it (authentication); a run started by a principal the gateway cannot restore is
    not resumed (it would act with the local user's rights): it is marked failed.
    """
    if principal is None or getattr(principal, "is_local", False):
        return None
    if dataclasses.is_dataclass(principal) and not isinstance(principal, type):
        data = dataclasses.asdict(principal)
    elif hasattr(principal, "model_dump"):
        data = principal.model_dump(mode="json")
    else:
        return {"repr": repr(principal)}
    return {k: sorted(v) if isinstance(v, frozenset | set) else v for k, v in data.items()}
