"""The state of one workflow run and the calls every part of it makes: control (cancel, suspend),
templates, facts about a tool, one journaled call (`call_unit`). See `mcpopt.workflows.engine`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson
from mcp.shared.exceptions import MCPError

from mcpopt.api import ClientLink, GatewayAPI, ProgressFn
from mcpopt.errors import GATEWAY_REJECTED, UPSTREAM_UNAVAILABLE
from mcpopt.policy import UNKNOWN
from mcpopt.templating import Criterion, check, render
from mcpopt.workflow_model import Step, Workflow
from mcpopt.workflows.journal import Journal
from mcpopt.workflows.run_state import (
    IDEMPOTENCY_META_KEY,
    IN_DOUBT_CODES,
    CallTool,
    StepState,
    Unit,
    result_text,
    same_value,
    shorten,
    truthy,
)

logger = logging.getLogger("mcpopt.workflows.engine")  # the run logs as one part


class RunBase:
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
                equal = same_value(a, b)
                return (equal if op == " == " else not equal), f"{shorten(a)}{op}{shorten(b)}"
        value = render(text, self.context())
        return truthy(value), shorten(value)

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

    async def _fail_step(self, st: StepState, error: str, key: str = "") -> None:
        st.status = "failed"
        st.error = error
        self.failures.append({"step": st.step.id, "item": key, "error": error})
        await self.journal.record(self.run_id, "step_failed", st.step.id, key, data={"error": error})

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
                    error = "isError: " + result_text(result)[:500]
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
