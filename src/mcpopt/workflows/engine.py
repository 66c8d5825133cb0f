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
from typing import Any

from mcpopt.templating import TemplateError
from mcpopt.workflows.journal import Event
from mcpopt.workflows.replay import RunReplay
from mcpopt.workflows.run_state import (
    RunSuspended,
    StepState,
)
from mcpopt.workflows.views import SkippedView

logger = logging.getLogger(__name__)


class WorkflowRun(RunReplay):
    """One run of a workflow (see the module doc); its arguments are `RunBase`'s."""

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
