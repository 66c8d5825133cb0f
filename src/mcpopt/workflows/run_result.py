"""The structured result of a workflow run (`run_result`): what ran, failed, was skipped, undone or
is in doubt, and the templated `output`.
"""

from __future__ import annotations

import time
from typing import Any

from mcpopt.templating import TemplateError, render
from mcpopt.workflows.run_base import RunBase
from mcpopt.workflows.run_state import (
    StepState,
    Unit,
)


class RunResult(RunBase):
    """A run's result (see `run_result`)."""

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
