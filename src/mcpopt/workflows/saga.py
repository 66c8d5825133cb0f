"""Saga compensation of a workflow run: the completed steps' `compensate` calls, newest first."""

from __future__ import annotations

import asyncio
from typing import Any

from mcp.shared.exceptions import MCPError

from mcpopt.templating import TemplateError, render
from mcpopt.workflows.run_result import RunResult
from mcpopt.workflows.run_state import (
    IDEMPOTENCY_META_KEY,
    StepState,
    Unit,
    result_text,
)


class RunSaga(RunResult):
    """Compensation (see `_compensate` and the engine's module doc, step 4)."""

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
                    error = "isError: " + result_text(result)[:500]
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
