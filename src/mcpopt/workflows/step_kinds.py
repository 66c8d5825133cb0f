"""The kinds of workflow step, each run to completion: one call, a `for_each` expansion, a fan-out."""

from __future__ import annotations

import asyncio
import time

from mcp.shared.exceptions import MCPError

from mcpopt.templating import TemplateError, render
from mcpopt.workflows.fanout import Target, gather, gathered_view, needed, resolve_targets, target_call
from mcpopt.workflows.run_state import (
    StepState,
    Unit,
    shorten,
)
from mcpopt.workflows.saga import RunSaga
from mcpopt.workflows.views import ItemsView


class RunSteps(RunSaga):
    """One step's calls, by kind (`_single`, `_for_each`, `_fanout`)."""

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
                await self._fail_step(st, f"for_each: expected a list, got {type(items).__name__} ({shorten(items)})")
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
