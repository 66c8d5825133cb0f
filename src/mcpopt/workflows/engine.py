"""The workflow engine: runs one workflow as a DAG of tool calls, journaled, with saga compensation.

`WorkflowRun.execute()` does one run:

1. **Plan.** A step is ready when every step it depends on (`depends_on` plus the steps its
   templates read) succeeded or was skipped; ready steps start at once, so independent steps run
   in parallel, bounded by the workflow's `max_parallel` calls in flight (and a `for_each`
   step's own `concurrency`).
2. **Call.** Every call is `GatewayAPI.call_tool(params, link)` with the caller's `ClientLink`:
   the whole request path (policy, limits, telemetry, rules, cache, coalescing, routing,
   breakers, retries) applies to each step as to any client call. A call that is not read-only
   carries `_meta["mcpopt/idempotency_key"] = "<run>/<step>/<item>"` (the same key on every
   attempt and after a restart) for upstreams that deduplicate by it.
3. **Journal.** Before a call is sent its `step_started` event is committed; its outcome is
   committed before anything that depends on it starts (`mcpopt.workflows.journal`).
4. **Fail.** A step fails when its call raises an MCP error, returns `isError`, times out
   (`timeout_ms`), or a template cannot be rendered. `retries` are made only when repeating the
   call is safe: the tool is read-only or idempotent (the gateway's `ToolInfo`), or its server
   deduplicates by idempotency key (`idempotency_keys: true`). Then, per `on_failure`:
   `compensate` (default) starts no new step, lets the calls in flight finish, and runs the
   `compensate` call of every completed step in reverse order of completion; `abort` does the
   same without compensating; `continue` runs every step that does not depend on a failed one.
5. **In doubt.** A write whose call timed out or whose upstream connection closed mid-call may
   or may not have run. It is never re-sent (unless repeating it is safe, as above); it is
   reported as `in_doubt`, and compensated only if its `compensate.in_doubt` says the undo is
   harmless when the write did not happen.
6. **Result.** The structured result says what ran, what failed, what was skipped, what was
   undone and what is in doubt, plus the templated `output` (`run_result`).

**After a crash** (`WorkflowRun.execute(resume=events)`), the journal's events rebuild the run:
completed calls are not made again (their recorded results feed the templates), a call that was
in flight is re-sent if repeating it is safe (same idempotency key) and is otherwise in doubt,
then the run goes on (`on_restart: resume`) or compensates what completed (`on_restart:
compensate`). A run that was compensating goes on compensating. So a write step is executed at
most once per run, ever -- exactly once when it completed or its server deduplicates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from mcp.shared.exceptions import MCPError

from mcpopt.api import ClientLink, GatewayAPI, ProgressFn
from mcpopt.errors import GATEWAY_REJECTED, UPSTREAM_CLOSED, UPSTREAM_TIMEOUT, UPSTREAM_UNAVAILABLE
from mcpopt.policy import UNKNOWN
from mcpopt.templating import Criterion, StepView, TemplateError, check, render
from mcpopt.workflow_model import Step, Workflow
from mcpopt.workflows.fanout import Target, gather, gathered_view, needed, resolve_targets, target_call
from mcpopt.workflows.journal import Event, Journal
from mcpopt.workflows.views import ItemsView, SkippedView

logger = logging.getLogger(__name__)

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


class WorkflowRun:
    """One run of a workflow (see the module doc).

    Args:
        api: the gateway, as plugins see it.
        journal: where every event goes before the run moves on.
        workflow: the definition (for a resumed run: the snapshot the journal kept).
        run_id: the run's id.
        params: the validated parameters.
        link: the caller's link (a resumed run gets a link of its own, partition kept).
        progress: `async (done_steps, total_steps, message)`, or None.
        max_items: the largest `for_each` expansion allowed.
        max_result_bytes: larger read results are not journaled (re-read on resume).
    """

    def __init__(
        self,
        api: GatewayAPI,
        journal: Journal,
        workflow: Workflow,
        run_id: str,
        params: Mapping[str, Any],
        link: ClientLink,
        *,
        progress: ProgressFn | None = None,
        max_items: int = 1000,
        max_result_bytes: int = 1 << 20,
    ) -> None:
        self.api = api
        self.journal = journal
        self.wf = workflow
        self.run_id = run_id
        self.params = dict(params)
        self.link = link
        self.progress = progress
        self.max_items = max_items
        self.max_result_bytes = max_result_bytes
        self.states: dict[str, StepState] = {s.id: StepState(s) for s in workflow.steps}
        self.failures: list[dict[str, Any]] = []
        self.undone: list[tuple[str, str]] = []
        """(step, item) of each compensation that finished (succeeded or failed), in the order they ran."""
        self.stopping = False
        self.stop_reason: str | None = None
        self.cancelled = False
        self.suspended = False
        self.status = "running"
        self.started = time.time()
        self._stop = asyncio.Event()
        self._slots = asyncio.Semaphore(workflow.max_parallel)
        self._finished_steps = 0
        self._resumed = False
        self._restart_compensate = False

    # ---- control ----------------------------------------------------------------------------
    def cancel(self, reason: str = "cancelled") -> None:
        """Start no new step; calls in flight finish; then `on_failure` applies (idempotent)."""
        if not self.stopping:
            self.cancelled = True
            self._fail_run(reason)

    def suspend(self) -> None:
        """The gateway is stopping: start no new step (calls in flight finish) and leave the run
        unfinished in the journal, for the next start to resume. `execute` raises `RunSuspended`."""
        self.suspended = True
        self._stop.set()

    @property
    def halted(self) -> bool:
        """No new step (or item) may start."""
        return self.stopping or self.suspended

    def _fail_run(self, reason: str) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_reason = reason
            self._stop.set()

    # ---- templates --------------------------------------------------------------------------
    def context(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The template context: `params`, `steps` (views of the finished steps), `run`, plus `extra`."""
        views = {sid: st.view for sid, st in self.states.items() if st.view is not None}
        return {"params": self.params, "steps": views, "run": {"id": self.run_id}, **(extra or {})}

    def _when(self, step: Step) -> tuple[bool, str]:
        cond = step.when
        if cond is None:
            return True, ""
        if isinstance(cond, Criterion):
            views = {sid: st.view for sid, st in self.states.items() if st.view is not None}
            ok, detail = check(cond, views, cond.step or "", self.context())  # type: ignore[arg-type]
            return ok, detail
        text = cond.strip()
        for op in (" == ", " != "):
            if op in text and "{{" in text:
                left, right = text.split(op, 1)
                a, b = render(left.strip(), self.context()), render(right.strip(), self.context())
                equal = _same(a, b)
                return (equal if op == " == " else not equal), f"{_short(a)}{op}{_short(b)}"
        value = render(text, self.context())
        return _truthy(value), _short(value)

    # ---- facts about a call -----------------------------------------------------------------
    def _facts(self, tool: str) -> tuple[bool, bool]:
        """(read-only, safe to repeat) of a gateway tool name."""
        catalog = self.api.catalog
        info = catalog.tool_infos.get(tool, UNKNOWN)
        keyed = False
        route = catalog.tool_routes.get(tool)
        if route is not None:
            pool = self.api.upstreams.get(route.server)
            keyed = bool(pool is not None and getattr(pool.cfg, "idempotency_keys", False))
        return info.read_only, bool(info.read_only or info.idempotent or keyed)

    # ---- the run ----------------------------------------------------------------------------
    async def execute(self, resume: list[Event] | None = None, *, compensate_now: bool = False) -> dict[str, Any]:
        """Run (or, with `resume`, continue) the workflow; returns `run_result()`.

        Args:
            resume: the journal's events of this run (a restart).
            compensate_now: after a restart, compensate instead of going on (`on_restart: compensate`).
        """
        timer = None
        if self.wf.timeout_ms:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(
                self.wf.timeout_ms / 1000, self._fail_run, f"run timed out after {self.wf.timeout_ms} ms"
            )
        try:
            compensating = False
            if resume is not None:
                self._resumed = True
                compensating = await self._replay(resume)
                if compensate_now and not compensating:
                    self._fail_run("the gateway restarted during the run (on_restart: compensate)")
            if not compensating:
                if not self.stopping:
                    await self._main()
                else:
                    self._mark_not_run()
            if self.suspended:
                raise RunSuspended(self.run_id)
            failed = bool(self.failures) or self.stopping
            if compensating or (failed and self.wf.on_failure == "compensate"):
                await self._compensate()
            self.status = self._final_status()
            result = self.run_result()
            await self.journal.set_status(self.run_id, self.status, result=result, error=self._error_summary())
            await self._notify(len(self.wf.steps), f"workflow {self.wf.name}: {self.status}")
            return result
        finally:
            if timer is not None:
                timer.cancel()

    async def _main(self) -> None:
        deps = self.wf.dependencies()
        order = self.wf.order()
        running: dict[asyncio.Task[None], str] = {}
        stop_waiter: asyncio.Task[Any] | None = None
        try:
            while True:
                progressed = True
                while progressed and not self.halted:
                    progressed = False
                    for sid in order:
                        st = self.states[sid]
                        if st.status != "pending":
                            continue
                        before = [self.states[d].status for d in deps[sid]]
                        if any(s in ("failed", "blocked", "not_run") for s in before):
                            st.status = "blocked"
                            st.error = "a step it depends on failed"
                            await self.journal.record(self.run_id, "step_skipped", sid, data={"reason": st.error})
                            self._finished_steps += 1
                            progressed = True
                        elif all(s in ("succeeded", "skipped") for s in before):
                            st.status = "running"
                            running[asyncio.create_task(self._step(st))] = sid
                if not running:
                    break
                if stop_waiter is None or stop_waiter.done():
                    stop_waiter = asyncio.create_task(self._stop.wait())
                done, _ = await asyncio.wait({*running, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is stop_waiter:
                        continue
                    sid = running.pop(task)
                    exc = task.exception()
                    if exc is not None:
                        st = self.states[sid]
                        st.status = "failed"
                        st.error = f"internal error: {type(exc).__name__}: {exc}"
                        logger.error("workflow %s run %s step %s: %s", self.wf.name, self.run_id, sid, st.error)
                        self.failures.append({"step": sid, "item": "", "error": st.error})
                        await self.journal.record(self.run_id, "step_failed", sid, data={"error": st.error})
                    if self.states[sid].status == "failed" and self.wf.on_failure != "continue":
                        self._fail_run(f"step {sid} failed")
        finally:
            if stop_waiter is not None and not stop_waiter.done():
                stop_waiter.cancel()
            for task in running:  # only on cancellation of the run's own task
                task.cancel()
        if not self.suspended:
            self._mark_not_run()

    def _mark_not_run(self) -> None:
        for st in self.states.values():
            if st.status == "pending":
                st.status = "not_run"

    async def _notify(self, done: int, message: str) -> None:
        if self.progress is not None:
            try:
                await self.progress(float(done), float(len(self.wf.steps)), message)
            except Exception:  # noqa: BLE001 - a gone client must not break the run
                logger.debug("workflow progress notification failed", exc_info=True)

    async def _step_done(self, st: StepState) -> None:
        self._finished_steps += 1
        what = st.status if st.error is None else f"{st.status}: {st.error}"
        await self._notify(self._finished_steps, f"step {st.step.id} {what}")

    # ---- one step ---------------------------------------------------------------------------
    async def _step(self, st: StepState) -> None:
        step = st.step
        t0 = time.perf_counter()
        try:
            if step.wait_ms and not self._resumed_done(st):
                try:
                    await asyncio.wait_for(self._stop.wait(), step.wait_ms / 1000)
                except TimeoutError:
                    pass
                if self.halted:
                    st.status = "pending" if self.suspended else "not_run"
                    return
            try:
                go, why = self._when(step)
            except TemplateError as exc:
                await self._fail_step(st, f"when: {exc}")
                return
            if not go:
                st.status = "skipped"
                st.view = SkippedView(f"when is false ({why})")
                await self.journal.record(self.run_id, "step_skipped", step.id, data={"reason": f"when: {why}"})
                return
            if step.fanout is not None:
                await self._fanout(st)
            elif step.for_each is not None:
                await self._for_each(st)
            else:
                await self._single(st)
        finally:
            st.ms = (time.perf_counter() - t0) * 1000
            if st.status not in ("not_run", "pending"):
                await self._step_done(st)

    def _resumed_done(self, st: StepState) -> bool:
        return bool(st.units) and any(u.status != "pending" for u in st.units.values())

    async def _fail_step(self, st: StepState, error: str, key: str = "") -> None:
        st.status = "failed"
        st.error = error
        self.failures.append({"step": st.step.id, "item": key, "error": error})
        await self.journal.record(self.run_id, "step_failed", st.step.id, key, data={"error": error})

    async def _single(self, st: StepState) -> None:
        step = st.step
        assert step.tool is not None
        unit = st.units.setdefault("", Unit(step.id, "", tool=step.tool))
        if unit.status != "succeeded":
            try:
                args = render(step.arguments, self.context())
            except TemplateError as exc:
                await self._fail_step(st, f"arguments: {exc}")
                return
            await self.call_unit(st, unit, step.tool, args)
        st.view = unit.view()
        self._settle(st, [unit])

    def _settle(self, st: StepState, units: list[Unit]) -> None:
        bad = [u for u in units if u.status != "succeeded"]
        if not bad:
            st.status = "succeeded"
            return
        st.status = "failed"
        first = bad[0]
        where = f" (item {first.key})" if first.key else ""
        st.error = (first.error or first.status) + where
        for u in bad:
            self.failures.append(
                {"step": st.step.id, "item": u.key, "error": u.error or u.status, "in_doubt": u.status == "in_doubt"}
            )

    async def _for_each(self, st: StepState) -> None:
        step = st.step
        assert step.tool is not None
        if st.planned is None:
            try:
                items = render(step.for_each, self.context())
            except TemplateError as exc:
                await self._fail_step(st, f"for_each: {exc}")
                return
            if not isinstance(items, list):
                await self._fail_step(st, f"for_each: expected a list, got {type(items).__name__} ({_short(items)})")
                return
            if len(items) > self.max_items:
                await self._fail_step(
                    st,
                    f"for_each: {len(items)} items is more than the limit ({self.max_items}; "
                    "gateway.workflows.max_items)",
                )
                return
            st.planned = items
            await self.journal.record(self.run_id, "step_planned", step.id, data={"items": items})
        items = st.planned
        gate = asyncio.Semaphore(step.concurrency)
        keep_going = self.wf.on_failure == "continue"
        units: list[Unit] = []
        for i, item in enumerate(items):
            unit = st.units.setdefault(str(i), Unit(step.id, str(i), tool=step.tool))
            unit.item, unit.index = item, i
            units.append(unit)
        halt = False

        async def one(unit: Unit) -> None:
            nonlocal halt
            if unit.status == "succeeded":
                return
            async with gate:
                if (halt and not keep_going) or self.halted:
                    unit.status = "pending"
                    return
                try:
                    args = render(step.arguments, self.context({step.as_: unit.item, "index": unit.index}))
                except TemplateError as exc:
                    unit.status, unit.error = "failed", f"arguments: {exc}"
                    await self.journal.record(self.run_id, "step_failed", step.id, unit.key, data={"error": unit.error})
                    halt = True
                    return
                assert step.tool is not None
                await self.call_unit(st, unit, step.tool, args)
                if unit.status != "succeeded":
                    halt = True

        await asyncio.gather(*(one(u) for u in units))
        if self.suspended and any(u.status == "pending" for u in units):
            st.status = "pending"  # the rest of the items run after the restart
            return
        st.view = ItemsView([u.view() for u in units], 0.0)
        not_started = [u for u in units if u.status == "pending"]
        for u in not_started:
            u.status, u.error = "cancelled", "not started: an earlier item failed or the run stopped"
        self._settle(st, units)

    # ---- fan-out ----------------------------------------------------------------------------
    async def _fanout(self, st: StepState) -> None:
        """A `fanout:` step: one journaled unit per target, gathered per `gather` (`mcpopt.workflows.fanout`)."""
        step = st.step
        fan = step.fanout
        assert fan is not None
        t0 = time.perf_counter()
        if st.planned is None:
            try:
                targets = resolve_targets(self.api, fan)
            except MCPError as exc:
                await self._fail_step(st, exc.error.message)
                return
            st.planned = [t.to_list() for t in targets]
            await self.journal.record(self.run_id, "step_planned", step.id, data={"targets": st.planned})
        targets = [Target.from_list(row) for row in st.planned]
        try:
            args = render(step.arguments, self.context())
        except TemplateError as exc:
            await self._fail_step(st, f"arguments: {exc}")
            return
        _, repeatable = self._facts(targets[0].tool)
        units = {t.label: st.units.setdefault(t.label, Unit(step.id, t.label, tool=t.tool)) for t in targets}
        done_ok = {label: u.status == "succeeded" for label, u in units.items() if u.status in ("succeeded", "failed")}

        async def one(target: Target) -> bool:
            unit = units[target.label]
            link, meta = target_call(self.link, target)
            await self.call_unit(st, unit, target.tool, args, link=link, meta=meta, cancel_safe=repeatable)
            return unit.status == "succeeded"

        need = needed(fan, len(targets))
        enough, first = await gather(
            targets, need, one, done_ok=done_ok, cancel_losers=repeatable and fan.gather != "all"
        )
        st.winner = first if fan.gather == "first" else None
        st.view = gathered_view(targets, units, st.winner, (time.perf_counter() - t0) * 1000)
        if enough:
            st.status = "succeeded"
        else:
            bad = [u for u in units.values() if u.status not in ("succeeded", "cancelled", "pending")]
            detail = "; ".join(f"{u.key}: {u.error}" for u in bad[:3]) or "no target answered"
            got = sum(u.status == "succeeded" for u in units.values())
            st.status = "failed"
            st.error = f"fan-out gathered {got} of the {need} successes needed ({detail})"
            self.failures.append(
                {"step": step.id, "item": "", "error": st.error, "in_doubt": any(u.status == "in_doubt" for u in bad)}
            )
        await self.journal.record(
            self.run_id, "step_gathered", step.id, data={"ok": enough, "winner": st.winner, "error": st.error}
        )

    def _restore_fanout(self, st: StepState) -> bool:
        """After a replay: rebuild a gathered fan-out step's view. True when the step is decided."""
        if st.planned is None or st.status not in ("succeeded", "failed"):
            st.status = "pending"
            return False
        targets = [Target.from_list(row) for row in st.planned]
        st.view = gathered_view(targets, st.units, st.winner, 0.0)
        if st.status == "failed":
            self.failures.append({"step": st.step.id, "item": "", "error": st.error or "fan-out failed"})
        return True

    # ---- one call, journaled ----------------------------------------------------------------
    async def call_unit(
        self,
        st: StepState,
        unit: Unit,
        tool: str,
        args: dict[str, Any],
        *,
        link: ClientLink | None = None,
        meta: Mapping[str, Any] | None = None,
        call: CallTool | None = None,
        cancel_safe: bool = False,
    ) -> None:
        """Make one unit's call through the gateway, with retries when safe; journal every attempt.

        Sets `unit.status` to succeeded, failed or in_doubt (never raises for the call's failure).
        """
        step = st.step
        read_only, repeatable = self._facts(tool)
        attempts = 1 + (step.retries if repeatable else 0)
        unit.arguments = args
        unit.tool = tool
        params: dict[str, Any] = {"name": tool, "arguments": args}
        call_meta: dict[str, Any] = {"mcpopt/task": {"task_type": f"workflow:{self.wf.name}"}, **(meta or {})}
        if not read_only:
            call_meta[IDEMPOTENCY_META_KEY] = f"{self.run_id}/{step.id}/{unit.key}"
        params["_meta"] = call_meta
        target = link or self.link
        send = call or self.api.call_tool
        while unit.attempts < attempts:
            result: dict[str, Any] | None = None
            error: str | None = None
            in_doubt = False
            # The slot first, then the journal: `step_started` means "about to be sent", so a step
            # waiting for a slot when the gateway dies has not started (nothing to doubt).
            async with self._slots:
                attempt = unit.attempts
                unit.attempts += 1
                seq = await self.journal.record(
                    self.run_id,
                    "step_started",
                    step.id,
                    unit.key,
                    attempt,
                    {"tool": tool, "arguments": args, "idempotency_key": call_meta.get(IDEMPOTENCY_META_KEY)},
                )
                unit.status = "started"
                t0 = time.perf_counter()
                try:
                    if step.timeout_ms:
                        async with asyncio.timeout(step.timeout_ms / 1000):
                            result = await send(params, target)
                    else:
                        result = await send(params, target)
                except MCPError as exc:
                    error = f"error {exc.error.code}: {exc.error.message}"
                    in_doubt = exc.error.code in IN_DOUBT_CODES and not read_only
                    if exc.error.code in (UPSTREAM_UNAVAILABLE, GATEWAY_REJECTED):
                        in_doubt = False  # never sent
                except TimeoutError:
                    error = f"no answer within {step.timeout_ms} ms (step timeout_ms)"
                    in_doubt = not read_only
                except asyncio.CancelledError:
                    if cancel_safe:
                        unit.status, unit.error = "cancelled", "cancelled: another target answered first"
                        await self.journal.record(
                            self.run_id,
                            "step_failed",
                            step.id,
                            unit.key,
                            attempt,
                            {"error": unit.error, "cancelled": True},
                        )
                        unit.ms = (time.perf_counter() - t0) * 1000
                        return
                    raise
                except Exception as exc:  # noqa: BLE001 - a broken call fails its step, never the run
                    logger.exception("workflow %s: step %s call failed inside the gateway", self.wf.name, step.id)
                    error = f"internal error: {type(exc).__name__}: {exc}"
                    in_doubt = not read_only
            unit.ms = (time.perf_counter() - t0) * 1000
            if result is not None:
                result = {k: v for k, v in result.items() if k not in ("resultType", "_meta")}
                if result.get("isError"):
                    error = "isError: " + _result_text(result)[:500]
            if error is None:
                assert result is not None
                unit.result, unit.error, unit.status = result, None, "succeeded"
                data: dict[str, Any] = {"result": result, "ms": round(unit.ms, 3)}
                if read_only and len(orjson.dumps(result)) > self.max_result_bytes:
                    data = {"result": None, "omitted": True, "ms": round(unit.ms, 3)}
                unit.done_seq = await self.journal.record(
                    self.run_id, "step_succeeded", step.id, unit.key, attempt, data
                )
                return
            unit.result, unit.error = result, error
            if in_doubt and not repeatable:
                unit.status = "in_doubt"
                unit.done_seq = seq
                await self.journal.record(
                    self.run_id, "step_failed", step.id, unit.key, attempt, {"error": error, "in_doubt": True}
                )
                return
            unit.status = "failed"
            await self.journal.record(
                self.run_id, "step_failed", step.id, unit.key, attempt, {"error": error, "result": result}
            )
            if unit.attempts < attempts and not self.stopping:
                from mcpopt.upstream.routing import backoff_s

                await asyncio.sleep(backoff_s(unit.attempts, step.retry_backoff_ms, step.retry_backoff_ms * 16))
            else:
                return

    # ---- saga -------------------------------------------------------------------------------
    async def _compensate(self) -> None:
        """Undo the completed steps that declare `compensate`, newest first (see the module doc)."""
        self.status = "compensating"
        if not self._resumed or not any(u.comp for st in self.states.values() for u in st.units.values()):
            await self.journal.record(
                self.run_id, "note", data={"phase": "compensating", "reason": self._error_summary() or self.stop_reason}
            )
        await self.journal.set_status(self.run_id, "compensating")
        todo: list[tuple[StepState, Unit]] = []
        for st in self.states.values():
            comp = st.step.compensate
            if comp is None:
                continue
            for unit in st.units.values():
                if unit.status == "succeeded" or (unit.status == "in_doubt" and comp.in_doubt):
                    todo.append((st, unit))
        todo.sort(key=lambda su: su[1].done_seq, reverse=True)
        for st, unit in todo:
            if unit.comp == "succeeded":
                continue
            await self._undo(st, unit)

    async def _undo(self, st: StepState, unit: Unit) -> None:
        step = st.step
        comp = step.compensate
        assert comp is not None
        _, repeatable = self._facts(comp.tool)
        if unit.comp == "started" and not repeatable:
            unit.comp = "in_doubt"
            unit.comp_error = "the gateway stopped while this compensation was in flight; not re-sent (not idempotent)"
            await self.journal.record(
                self.run_id, "comp_failed", step.id, unit.key, data={"error": unit.comp_error, "in_doubt": True}
            )
            self._undone(step.id, unit.key)
            return
        extra: dict[str, Any] = {"self": unit.view()}
        if step.for_each is not None:
            extra[step.as_] = unit.item
            extra["index"] = unit.index
        try:
            args = render(comp.arguments, self.context(extra))
        except TemplateError as exc:
            unit.comp, unit.comp_error = "failed", f"compensate arguments: {exc}"
            await self.journal.record(self.run_id, "comp_failed", step.id, unit.key, data={"error": unit.comp_error})
            self._undone(step.id, unit.key)
            return
        attempts = 1 + (comp.retries if repeatable else 0)
        params = {
            "name": comp.tool,
            "arguments": args,
            "_meta": {
                "mcpopt/task": {"task_type": f"workflow:{self.wf.name}"},
                IDEMPOTENCY_META_KEY: f"{self.run_id}/{step.id}/{unit.key}/undo",
            },
        }
        while unit.comp_attempts < attempts:
            attempt = unit.comp_attempts
            unit.comp_attempts += 1
            unit.comp = "started"
            await self.journal.record(
                self.run_id, "comp_started", step.id, unit.key, attempt, {"tool": comp.tool, "arguments": args}
            )
            error: str | None = None
            try:
                result = await self.api.call_tool(params, self.link)
                if result.get("isError"):
                    error = "isError: " + _result_text(result)[:500]
            except MCPError as exc:
                error = f"error {exc.error.code}: {exc.error.message}"
            if error is None:
                unit.comp, unit.comp_error = "succeeded", None
                await self.journal.record(self.run_id, "comp_succeeded", step.id, unit.key, attempt)
                self._undone(step.id, unit.key)
                return
            unit.comp, unit.comp_error = "failed", error
            await self.journal.record(self.run_id, "comp_failed", step.id, unit.key, attempt, {"error": error})
            self._undone(step.id, unit.key)
            if unit.comp_attempts < attempts:
                await asyncio.sleep(0.05 * unit.comp_attempts)

    def _undone(self, step: str, key: str) -> None:
        if (step, key) not in self.undone:
            self.undone.append((step, key))

    # ---- restart ----------------------------------------------------------------------------
    async def _replay(self, events: list[Event]) -> bool:
        """Rebuild the run's state from its journal; returns True if it was compensating.

        A call in flight at the crash is re-sent when repeating it is safe, else it is in doubt.
        """
        compensating = False
        for ev in events:
            st = self.states.get(ev.step)
            if ev.kind == "note" and ev.data.get("phase") == "compensating":
                compensating = True
                self.stop_reason = self.stop_reason or ev.data.get("reason")
            if st is None:
                continue
            data = ev.data
            if ev.kind == "step_planned":
                st.planned = data.get("items") if "items" in data else data.get("targets")
                continue
            if ev.kind == "step_gathered":
                st.winner = data.get("winner")
                st.status = "succeeded" if data.get("ok") else "failed"
                st.error = data.get("error")
                continue
            if ev.kind == "step_skipped":
                reason = str(data.get("reason", ""))
                st.status = "skipped" if reason.startswith("when") else "blocked"
                st.error = None if st.status == "skipped" else reason
                st.view = SkippedView(reason) if st.status == "skipped" else None
                continue
            unit = st.units.setdefault(ev.item, Unit(st.step.id, ev.item))
            if ev.item.isdigit():
                unit.index = int(ev.item)
            if ev.kind == "step_started":
                unit.status = "started"
                unit.arguments = data.get("arguments") or {}
                unit.tool = data.get("tool") or unit.tool
                unit.attempts = ev.attempt + 1
                unit.done_seq = ev.seq
            elif ev.kind == "step_succeeded":
                if data.get("omitted"):
                    unit.status = "pending"  # a big read result was not kept: read it again
                    continue
                unit.status, unit.result, unit.error = "succeeded", data.get("result"), None
                unit.ms = float(data.get("ms") or 0.0)
                unit.done_seq = ev.seq
            elif ev.kind == "step_failed":
                if data.get("in_doubt"):
                    unit.status = "in_doubt"
                elif data.get("cancelled"):
                    unit.status = "cancelled"
                else:
                    unit.status = "failed"
                unit.error = data.get("error")
            elif ev.kind == "comp_started":
                unit.comp = "started"
                unit.comp_attempts = ev.attempt + 1
            elif ev.kind == "comp_succeeded":
                unit.comp = "succeeded"
                self._undone(st.step.id, ev.item)
            elif ev.kind == "comp_failed":
                unit.comp = "in_doubt" if data.get("in_doubt") else "failed"
                unit.comp_error = data.get("error")
                self._undone(st.step.id, ev.item)
        for st in self.states.values():
            if st.step.for_each is not None and st.planned is not None:
                for i, item in enumerate(st.planned):
                    u = st.units.setdefault(str(i), Unit(st.step.id, str(i)))
                    u.item, u.index = item, i
            for unit in st.units.values():
                if unit.status == "started":
                    await self._in_flight_at_crash(st, unit)
            self._restore_step(st)
        await self.journal.record(self.run_id, "note", data={"resumed": True, "compensating": compensating})
        if self.failures and self.wf.on_failure != "continue" and not compensating:
            f = self.failures[0]
            self._fail_run(f"step {f['step']} failed")
        return compensating

    async def _in_flight_at_crash(self, st: StepState, unit: Unit) -> None:
        _, repeatable = self._facts(unit.tool or st.step.tool or "")
        if repeatable:
            unit.status = "pending"  # re-sent, with the same idempotency key
            unit.attempts = max(0, unit.attempts - 1)
            await self.journal.record(
                self.run_id, "note", st.step.id, unit.key, data={"decision": "re-send: repeating it is safe"}
            )
            return
        unit.status = "in_doubt"
        unit.error = (
            "the gateway stopped while this call was in flight; it is not re-sent (the tool is neither read-only "
            "nor idempotent, and its server does not deduplicate by idempotency key): it may or may not have run"
        )
        await self.journal.record(
            self.run_id, "step_failed", st.step.id, unit.key, unit.attempts - 1, {"error": unit.error, "in_doubt": True}
        )

    def _restore_step(self, st: StepState) -> None:
        """Set a step's status and view from its units after a replay."""
        if st.status in ("skipped", "blocked"):
            self._finished_steps += 1
            return
        units = list(st.units.values())
        if not units:
            return
        step = st.step
        if step.for_each is not None:
            if st.planned is None:
                return
            ordered = [st.units[str(i)] for i in range(len(st.planned))]
            if all(u.status == "succeeded" for u in ordered):
                st.status = "succeeded"
                st.view = ItemsView([u.view() for u in ordered], 0.0)
                self._finished_steps += 1
            elif any(u.status in ("failed", "in_doubt") for u in ordered):
                self._settle(st, ordered)
                st.view = ItemsView([u.view() for u in ordered], 0.0)
                self._finished_steps += 1
            return
        if step.fanout is not None:
            if self._restore_fanout(st):
                self._finished_steps += 1
            return
        unit = st.units.get("")
        if unit is None:
            return
        if unit.status == "succeeded":
            st.status = "succeeded"
            st.view = unit.view()
            self._finished_steps += 1
        elif unit.status in ("failed", "in_doubt"):
            st.view = unit.view()
            self._settle(st, [unit])
            self._finished_steps += 1

    # ---- the result -------------------------------------------------------------------------
    def _final_status(self) -> str:
        if not self.failures and not self.stopping:
            return "completed"
        mode = self.wf.on_failure
        if self.status == "compensating" or mode == "compensate":
            left = [u for _, u in self._effects() if u.comp not in ("succeeded",)]
            return "compensated" if not left else "compensation_failed"
        if mode == "continue" and not self.stopping:
            return "completed_with_errors"
        return "failed"

    def _effects(self) -> list[tuple[StepState, Unit]]:
        """Units whose effect a compensation should undo: completed (or in doubt) calls of steps with `compensate`."""
        out = []
        for st in self.states.values():
            if st.step.compensate is None:
                continue
            for u in st.units.values():
                if u.status == "succeeded" or u.status == "in_doubt":
                    out.append((st, u))
        return out

    def _error_summary(self) -> str | None:
        if self.stop_reason and not self.failures:
            return self.stop_reason
        if self.failures:
            f = self.failures[0]
            where = f"{f['step']}" + (f"[{f['item']}]" if f.get("item") else "")
            return f"step {where}: {f['error']}"
        return None

    def run_result(self) -> dict[str, Any]:
        """The structured result of the run.

        Shape: `{workflow, run_id, status, ms, steps: [{id, status, ms, calls?, error?, items?,
        items_succeeded?, sources?}], output?, error?, failed?: [{step, item, error, in_doubt}],
        skipped?: [ids], not_run?: [ids], compensated?: [{step, item?, tool}],
        compensation_failed?: [{step, item?, error}], in_doubt?: [{step, item?, compensated}],
        kept?: [{step, item?}] (completed writes without a compensation, left as they are),
        cancelled?, resumed?}`. A model reads this result, so what has nothing to say is left out
        (empty lists, false flags, `calls` when 1, `output` of a run that did not complete).
        """
        steps = []
        compensated, comp_failed, in_doubt, kept = [], [], [], []
        for st in self.states.values():
            step = st.step
            units = list(st.units.values())
            row: dict[str, Any] = {"id": step.id, "status": st.status, "ms": round(st.ms, 3)}
            calls = sum(u.attempts for u in units)
            if calls != 1:
                row["calls"] = calls
            if st.error:
                row["error"] = st.error
            if step.for_each is not None and st.planned is not None:
                row["items"] = len(st.planned)
                row["items_succeeded"] = sum(u.status == "succeeded" for u in units)
            if step.fanout is not None and st.view is not None:
                row["sources"] = st.view.get("sources")
            steps.append(row)
            for u in units:
                label = {"step": step.id, "item": u.key} if u.key else {"step": step.id}
                if u.status == "in_doubt":
                    in_doubt.append({**label, "compensated": u.comp == "succeeded"})
                elif (
                    u.status == "succeeded"
                    and step.compensate is None
                    and not self._facts(u.tool or step.tool or "")[0]
                    and self.status in ("compensated", "compensation_failed", "compensating")
                ):
                    kept.append(label)
        for sid, key in self.undone:
            st = self.states[sid]
            u = st.units[key]
            label = {"step": sid, "item": key} if key else {"step": sid}
            if u.comp == "succeeded":
                compensated.append({**label, "tool": st.step.compensate.tool if st.step.compensate else ""})
            else:
                comp_failed.append({**label, "error": u.comp_error})
        output: Any = None
        if self.status in ("completed", "completed_with_errors"):
            output = self._output()
        out: dict[str, Any] = {
            "workflow": self.wf.name,
            "run_id": self.run_id,
            "status": self.status,
            "ms": round((time.time() - self.started) * 1000, 3),
            "steps": steps,
            "output": output,
            "error": self._error_summary(),
            "failed": self.failures,
            "skipped": [s["id"] for s in steps if s["status"] in ("skipped", "blocked")],
            "not_run": [s["id"] for s in steps if s["status"] == "not_run"],
            "compensated": compensated,
            "compensation_failed": comp_failed,
            "in_doubt": in_doubt,
            "kept": kept,
            "cancelled": self.cancelled,
            "resumed": self._resumed,
        }
        always = ("workflow", "run_id", "status", "ms", "steps")
        return {k: v for k, v in out.items() if k in always or (v is not None and v is not False and v != [])}

    def _output(self) -> Any:
        if self.wf.output is None:
            out = {}
            for sid, st in self.states.items():
                if st.view is None or st.status != "succeeded":
                    continue
                value = st.view["json"]
                out[sid] = value if value is not None else st.view["text"]
            return out
        try:
            return render(self.wf.output, self.context())
        except TemplateError as exc:
            return {"error": f"output: {exc}"}


def _result_text(result: Mapping[str, Any]) -> str:
    return " ".join(b.get("text", "") for b in result.get("content") or () if isinstance(b, dict))


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE
    return bool(value)


def _same(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if isinstance(a, str | int | float | bool) and isinstance(b, str | int | float | bool):
        return str(a).strip().strip("'\"").lower() == str(b).strip().strip("'\"").lower()
    return False


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
