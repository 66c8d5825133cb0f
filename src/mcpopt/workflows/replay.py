"""Resuming a workflow run after a crash: the journal's events rebuild its steps (see the engine's
module doc, "After a crash").
"""

from __future__ import annotations

from mcpopt.workflows.journal import Event
from mcpopt.workflows.run_state import (
    StepState,
    Unit,
)
from mcpopt.workflows.step_kinds import RunSteps
from mcpopt.workflows.views import ItemsView, SkippedView


class RunReplay(RunSteps):
    """Rebuilding a run from its journal (`_replay`)."""

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
