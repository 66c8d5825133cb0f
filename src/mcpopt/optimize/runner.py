"""Replay scenarios through the gateway (or directly to the upstreams, for a baseline).

`Runner(gateway).run(scenarios, mode)` plays each scenario's steps in order, renders templates
from earlier results, checks the success criteria and returns a `SuiteRun`: per scenario and
step the latency (ms), pass/fail and why, and the calls made.

Modes:
- `gateway`: every step is a `tools/call` through `Gateway.call_tool`, so the whole pipeline
  applies (rules, cache, coalescing, routing). The cache is emptied before the suite, so one run
  measures what its own rules save. With `honor_batch_hints`, consecutive steps that an enabled
  `batch_hint` rule covers and that use no result of each other are sent as one call to the
  gateway's batch tool (as a client following the hint would).
- `direct`: each step goes straight to the upstream pool (the pipeline's terminal): no cache, no
  rules. The baseline.

Counts: `client_calls` are tool calls the client made (a batch is one); `upstream_calls` are the
calls servers executed (cache hits and coalesced calls never reach one). The KPI "tool calls"
is `upstream_calls`.

Every call is also kept as a trace row in the telemetry `CallRecord` shape (`ts`, `server`,
`tool`, `name`, `outcome`, `total_ms`, `request_bytes`, `response_bytes`, `session`, `seq`,
`args_hash`, `arguments`, `task_type`, `user_intent`, `cache`), plus `depends_on` (the `seq`s of
the calls whose results its arguments use) and `result` (the call's result: workflow proposals
look in it for the values later calls pass on), for the analyzer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mcp.shared.exceptions import MCPError
from mcp_types.version import LATEST_HANDSHAKE_VERSION

from mcpopt.errors import GatewayError
from mcpopt.gateway.tools import batch_tool_name
from mcpopt.optimize.scenarios import Scenario, Step
from mcpopt.pipeline import Next, ToolCall, ToolResult
from mcpopt.pipeline.rules import Rule, RuleSet
from mcpopt.policy import UNKNOWN
from mcpopt.templating import StepView, TemplateError, check, render, template_expressions

Progress = Callable[[int, int, str], None]
"""`(done, total, label)` after each scenario."""


@dataclass
class StepRun:
    id: str
    tool: str
    arguments: dict[str, Any]
    ok: bool
    ms: float
    error: str | None = None
    result: dict[str, Any] | None = None
    batched: bool = False
    upstream: bool = True
    """The call reached a server (False: answered from the cache or by a coalesced call)."""

    def to_dict(self, keep_result: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "tool": self.tool,
            "ok": self.ok,
            "ms": round(self.ms, 3),
            "batched": self.batched,
            "upstream": self.upstream,
        }
        if self.error:
            out["error"] = self.error
        if keep_result:
            out["arguments"] = self.arguments
            out["result"] = self.result
        return out


@dataclass
class CriterionRun:
    label: str
    ok: bool
    detail: str = ""


@dataclass
class ScenarioRun:
    scenario: Scenario
    mode: str
    session: str
    steps: list[StepRun] = field(default_factory=list)
    criteria: list[CriterionRun] = field(default_factory=list)
    total_ms: float = 0.0
    """Wall time of the calls (waits excluded), ms."""
    client_calls: int = 0
    upstream_calls: int = 0
    skipped: str | None = None
    error: str | None = None
    """A template or runner failure that stopped the scenario."""

    @property
    def ok(self) -> bool:
        return self.skipped is None and self.error is None and all(c.ok for c in self.criteria)

    def outcomes(self) -> dict[str, bool]:
        """Criterion label -> passed (step success criteria included)."""
        return {c.label: c.ok for c in self.criteria}

    def to_dict(self, keep_results: bool = False) -> dict[str, Any]:
        return {
            "id": self.scenario.id,
            "task_type": self.scenario.task_type,
            "mode": self.mode,
            "ok": self.ok,
            "skipped": self.skipped,
            "error": self.error,
            "total_ms": round(self.total_ms, 3),
            "client_calls": self.client_calls,
            "upstream_calls": self.upstream_calls,
            "expected_total_ms": (
                self.scenario.expected_total_time * 1000 if self.scenario.expected_total_time is not None else None
            ),
            "expected_call_count": self.scenario.expected_call_count,
            "steps": [s.to_dict(keep_results) for s in self.steps],
            "criteria": [{"label": c.label, "ok": c.ok, "detail": c.detail} for c in self.criteria],
        }


@dataclass
class SuiteRun:
    """One replay of a set of scenarios."""

    mode: str
    label: str
    runs: list[ScenarioRun] = field(default_factory=list)
    traces: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    rules: list[str] = field(default_factory=list)
    """Ids of the rules in force."""

    @property
    def ran(self) -> list[ScenarioRun]:
        return [r for r in self.runs if r.skipped is None]

    @property
    def success_rate(self) -> float:
        ran = self.ran
        return sum(r.ok for r in ran) / len(ran) if ran else 1.0

    @property
    def upstream_calls(self) -> int:
        return sum(r.upstream_calls for r in self.ran)

    @property
    def client_calls(self) -> int:
        return sum(r.client_calls for r in self.ran)

    @property
    def total_ms(self) -> float:
        return sum(r.total_ms for r in self.ran)

    def outcomes(self) -> dict[str, dict[str, bool]]:
        return {r.scenario.id: r.outcomes() for r in self.ran}

    def kpis(self) -> dict[str, float]:
        """`{success_rate (0..1), calls (upstream), client_calls, time_ms, scenarios}`."""
        return {
            "success_rate": round(self.success_rate, 4),
            "calls": self.upstream_calls,
            "client_calls": self.client_calls,
            "time_ms": round(self.total_ms, 3),
            "scenarios": len(self.ran),
        }

    def step_latencies(self) -> dict[str, list[float]]:
        """Gateway tool name -> every step latency (ms) of this run."""
        out: dict[str, list[float]] = {}
        for r in self.ran:
            for s in r.steps:
                out.setdefault(s.tool, []).append(s.ms)
        return out

    def to_dict(self, keep_results: bool = False) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "label": self.label,
            "started": self.started,
            "rules": self.rules,
            "kpis": self.kpis(),
            "scenarios": [r.to_dict(keep_results) for r in self.runs],
        }


def newly_failing(before: SuiteRun | Mapping[str, Mapping[str, bool]], after: SuiteRun) -> list[str]:
    """`scenario: criterion` labels that passed in `before` and fail in `after`."""
    prev = before.outcomes() if isinstance(before, SuiteRun) else before
    out = []
    for sid, crits in after.outcomes().items():
        old = prev.get(sid, {})
        for label, ok in crits.items():
            if not ok and old.get(label, False):
                out.append(f"{sid}: {label}")
    return out


class _UpstreamCounter:
    """Innermost filter for a run: counts the calls that reach an upstream, per session."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    async def __call__(self, call: ToolCall, next: Next) -> ToolResult:
        self.calls[call.session_id] = self.calls.get(call.session_id, 0) + 1
        call.attrs["reached_upstream"] = True
        return await next(call)


def _args_hash(arguments: Mapping[str, Any]) -> str:
    if not arguments:
        return ""
    data = json.dumps(arguments, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _refs(value: Any) -> set[str]:
    """Step ids a scenario argument value's templates read."""
    refs = set()
    for expr in template_expressions([value]):
        parts = expr.split("|", 1)[0].strip().split(".")
        if parts[0] == "steps" and len(parts) > 1:
            refs.add(parts[1])
    return refs


def _size(obj: Any) -> int:
    try:
        return len(json.dumps(obj, separators=(",", ":"), default=str))
    except (TypeError, ValueError):
        return 0


class Runner:
    """Replays scenarios against a running `Gateway` (inside `async with gateway.running()`).

    Args:
        gateway: the gateway.
        server_vars: `{{servers.<name>...}}` values (see `optimize.sandbox.server_vars`).
        rules: returns the `RuleSet` in force (for batch hints); None: no hints.
        honor_batch_hints: send hinted independent steps together (gateway mode).
        timeout_s: per step.
    """

    def __init__(
        self,
        gateway: Any,
        *,
        server_vars: Mapping[str, Any] | None = None,
        rules: Callable[[], RuleSet] | None = None,
        honor_batch_hints: bool = True,
        timeout_s: float = 60.0,
    ) -> None:
        self.gateway = gateway
        self.server_vars = dict(server_vars or {})
        self.rules = rules
        self.honor_batch_hints = honor_batch_hints
        self.timeout_s = timeout_s
        self._counter = _UpstreamCounter()
        self._wf_groups: dict[int, Rule] = {}
        """id(group) -> the workflow rule that serves it (set by `_plan`, read by `_scenario`)."""
        self._runs = 0
        self._nonce = 0

    # ---- suite ----------------------------------------------------------------------------
    async def run(
        self,
        scenarios: Sequence[Scenario],
        mode: str = "gateway",
        *,
        label: str = "",
        progress: Progress | None = None,
        purge_cache: bool = True,
    ) -> SuiteRun:
        """Run each scenario once, in order.

        Raises:
            ValueError: an unknown mode.
        """
        if mode not in ("gateway", "direct"):
            raise ValueError(f"mode: expected gateway or direct (got {mode!r})")
        self._runs += 1
        suite = SuiteRun(mode, label or mode)
        if self.rules is not None:
            suite.rules = [r.id for r in self.rules().rules]
        pipeline = self.gateway.pipeline
        saved = list(pipeline.filters)
        if mode == "gateway":
            if purge_cache:
                await self.gateway.cache.purge()
            pipeline.set_filters([*saved, self._counter])
        try:
            for i, sc in enumerate(scenarios, 1):
                session = f"{suite.label}:{sc.id}:{self._runs}"
                suite.runs.append(await self._scenario(sc, mode, session, suite.traces))
                if progress is not None:
                    progress(i, len(scenarios), sc.id)
        finally:
            if mode == "gateway":
                pipeline.set_filters(saved)
        return suite

    # ---- one scenario ---------------------------------------------------------------------
    def _missing(self, sc: Scenario) -> str | None:
        missing = [s for s in sc.servers if s not in self.gateway.upstreams]
        if missing:
            return f"needs MCP server(s) not configured: {', '.join(missing)}"
        down = [s for s in sc.servers if self.gateway.upstreams[s].state not in ("ready", "idle")]
        if down:
            return f"MCP server(s) not ready: {', '.join(down)}"
        return None

    async def _scenario(self, sc: Scenario, mode: str, session: str, traces: list[dict[str, Any]]) -> ScenarioRun:
        run = ScenarioRun(sc, mode, session)
        run.skipped = self._missing(sc)
        if run.skipped:
            return run
        views: dict[str, StepView] = {}
        self._nonce += 1
        ctx: dict[str, Any] = {
            "steps": views,
            "servers": self.server_vars,
            "vars": {},
            "run": {"id": f"{int(time.time())}-{self._nonce}", "n": self._nonce},
        }
        seq_of: dict[str, int] = {}
        try:
            ctx["vars"] = render(sc.vars, ctx)
            for group in self._plan(sc, mode):
                if group[0].wait_ms:
                    await asyncio.sleep(group[0].wait_ms / 1000)
                before = self._counter.calls.get(session, 0)
                t0 = time.time()
                wf_rule = self._wf_groups.pop(id(group), None)
                wf_runs = await self._workflow(group, wf_rule, ctx, session) if wf_rule is not None else None
                if wf_runs is not None:
                    step_runs = wf_runs
                elif wf_rule is not None:  # the workflow does not fit these calls: make them one by one
                    step_runs = []
                    for step in group:
                        sr = await self._one(step, step.rendered_arguments(ctx), mode, session, sc)
                        views[step.id] = StepView(sr.result, sr.error, sr.ms, sr.arguments)
                        step_runs.append(sr)
                    run.client_calls += len(group) - 1
                elif len(group) == 1:
                    step_runs = [await self._one(group[0], group[0].rendered_arguments(ctx), mode, session, sc)]
                else:
                    step_runs = await self._batch(group, [s.rendered_arguments(ctx) for s in group], session)
                after = self._counter.calls.get(session, 0)
                run.client_calls += 1
                run.upstream_calls += len(group) if mode == "direct" else after - before
                if mode == "gateway" and len(group) == 1:
                    step_runs[0].upstream = after > before
                sequential = len(group) == 1 or (wf_rule is not None and wf_runs is None)
                for step, sr in zip(group, step_runs, strict=True):
                    run.steps.append(sr)
                    run.total_ms += sr.ms if sequential else 0.0
                    views[step.id] = StepView(sr.result, sr.error, sr.ms, sr.arguments)
                    seq_of[step.id] = len(run.steps)
                    traces.append(self._trace(sc, step, sr, session, t0, len(run.steps), seq_of))
                if not sequential:
                    run.total_ms += step_runs[0].ms
        except TemplateError as exc:
            run.error = str(exc)
        self._judge(run, sc, views, ctx)
        return run

    def _plan(self, sc: Scenario, mode: str) -> list[list[Step]]:
        """Steps in call groups: one step each, hinted independent runs of steps (batch), or the
        sequences a `workflow` rule serves (one call of `workflow__<name>`, as a client following
        the rule's hint would make; recorded in `self._wf_groups`)."""
        rules = self.rules() if (self.rules is not None and mode == "gateway" and self.honor_batch_hints) else None
        batch_ok = rules is not None and batch_tool_name(self.gateway.config) in self.gateway.own.handlers
        flows = [r for r in rules.rules if r.action.type == "workflow"] if rules is not None else []
        groups: list[list[Step]] = []
        steps = list(sc.steps)
        i = 0
        while i < len(steps):
            step = steps[i]
            matched = next((r for r in flows if self._sequence_at(steps, i, r)), None)
            if matched is not None:
                group = steps[i : i + len(matched.condition.calls)]
                groups.append(group)
                self._wf_groups[id(group)] = matched
                i += len(group)
                continue
            i += 1
            cur = groups[-1] if groups and id(groups[-1]) not in self._wf_groups else None
            if (
                batch_ok
                and cur is not None
                and not step.wait_ms
                and not step.expect_error
                and not (step.references() & {s.id for s in cur})
                and self._batchable(rules, step)
                and all(self._batchable(rules, s) for s in cur)
                and len(cur) < self.gateway.config.gateway.batch.max_calls
            ):
                cur.append(step)
            else:
                groups.append([step])
        return groups

    def _sequence_at(self, steps: Sequence[Step], i: int, rule: Rule) -> bool:
        """True when `steps[i:]` starts with the calls of a workflow rule (no think time inside)."""
        calls = rule.condition.calls
        if len(calls) < 2 or i + len(calls) > len(steps):
            return False
        routes = self.gateway.catalog.tool_routes
        for k, (step, want) in enumerate(zip(steps[i : i + len(calls)], calls, strict=False)):
            route = routes.get(step.tool)
            if route is None or f"{route.server}/{route.name}" != want or step.expect_error or (k and step.wait_ms):
                return False
        return True

    async def _workflow(
        self, group: list[Step], rule: Rule, ctx: Mapping[str, Any], session: str
    ) -> list[StepRun] | None:
        """Run a sequence as one call of the rule's workflow; None when the workflow does not fit
        (a parameter cannot be taken from the scenario's calls, or a constant differs)."""
        definition = rule.action.workflow or {}
        name = str(definition.get("name", ""))
        service = getattr(self.gateway, "workflows", None)
        if service is None or not name:
            return None
        if name not in service.definitions:
            from mcpopt.workflow_model import WorkflowError, parse_definition

            try:
                service.register(parse_definition(name, definition, "optimizer"))
            except WorkflowError:
                return None
        inside = {s.id for s in group}
        params: dict[str, Any] = {}
        for pname, (pos, key) in rule.action.bindings.items():
            value = group[pos].arguments.get(key) if pos < len(group) else None
            if value is None or _refs(value) & inside:
                return None
            try:
                params[pname] = render(value, ctx)
            except TemplateError:
                return None
        wf_steps = definition.get("steps", [])
        seen_args: list[dict[str, Any]] = []
        for step, wf_step in zip(group, wf_steps, strict=False):
            rendered: dict[str, Any] = {}
            for key, value in step.arguments.items():
                if _refs(value) & inside:
                    continue  # computed inside the workflow from an earlier step
                try:
                    rendered[key] = render(value, ctx)
                except TemplateError:
                    return None
            for key, want in (wf_step.get("arguments") or {}).items():
                if not (isinstance(want, str) and "{{" in want) and key in rendered and rendered[key] != want:
                    return None  # the workflow would send something else
            seen_args.append(rendered)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await self.gateway.call_tool(
                    {"name": f"workflow__{name}", "arguments": params}, self._link(session)
                )
            body = result.get("structuredContent") or json.loads(result["content"][0]["text"])
        except (MCPError, GatewayError, TimeoutError, KeyError, ValueError) as exc:
            ms = (time.perf_counter() - t0) * 1000
            return [
                StepRun(s.id, s.tool, a, False, ms, f"workflow failed: {exc}", None, True)
                for s, a in zip(group, seen_args, strict=True)
            ]
        ms = (time.perf_counter() - t0) * 1000
        output = body.get("output") or {}
        failed = {f.get("step"): f.get("error") for f in body.get("failed") or ()}
        out = []
        for step, wf_step, args in zip(group, wf_steps, seen_args, strict=True):
            sid = wf_step.get("id")
            value = output.get(sid) if isinstance(output, dict) else None
            err = failed.get(sid) or (None if body.get("status") == "completed" else f"workflow {body.get('status')}")
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            res = {"content": [{"type": "text", "text": text}]} if err is None else None
            out.append(StepRun(step.id, step.tool, args, (err is not None) == step.expect_error, ms, err, res, True))
        return out

    def _batchable(self, rules: RuleSet | None, step: Step) -> bool:
        if rules is None:
            return False
        route = self.gateway.catalog.tool_routes.get(step.tool)
        return route is not None and rules.batchable(route.server, route.name, step.arguments)

    def _link(self, session: str) -> Any:
        from mcpopt.api import ClientLink

        async def no_progress(progress: float, total: float | None, message: str | None) -> None:
            return None

        return ClientLink(LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: no_progress, session_id=session)

    async def _one(self, step: Step, args: dict[str, Any], mode: str, session: str, sc: Scenario) -> StepRun:
        gw = self.gateway
        name = gw.namer.name(step.server, step.tool) if step.server else step.tool
        params: dict[str, Any] = {"name": name, "arguments": args}
        if sc.task_type or sc.user_prompt:
            params["_meta"] = {"mcpopt/task": {"task_type": sc.task_type, "user_intent": sc.user_prompt}}
        t0 = time.perf_counter()
        result: dict[str, Any] | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                if mode == "gateway":
                    result = await gw.call_tool(params, self._link(session))
                else:
                    result = await self._direct(name, params, session)
        except MCPError as exc:
            error = f"error {exc.error.code}: {exc.error.message}"
        except GatewayError as exc:
            error = f"error {exc.code}: {exc}"
        except TimeoutError:
            error = f"no answer within {self.timeout_s:g} s"
        ms = (time.perf_counter() - t0) * 1000
        failed = error is not None or bool((result or {}).get("isError"))
        if failed and error is None:
            error = "isError: " + " ".join(b.get("text", "") for b in (result or {}).get("content") or [])[:300]
        return StepRun(step.id, name, args, failed == step.expect_error, ms, error, result)

    async def _direct(self, name: str, params: dict[str, Any], session: str) -> dict[str, Any]:
        gw = self.gateway
        route = gw.catalog.tool_routes.get(name)
        if route is None:
            raise MCPError(code=-32602, message=f"Unknown tool: {name}")
        call = ToolCall(
            route.server,
            route.name,
            name,
            {"name": route.name, "arguments": params.get("arguments") or {}},
            info=gw.catalog.tool_infos.get(name, UNKNOWN),
            session_id=session,
        )
        result: dict[str, Any] = await gw.upstreams[route.server].call(call)
        return result

    async def _batch(self, group: list[Step], args: list[dict[str, Any]], session: str) -> list[StepRun]:
        gw = self.gateway
        calls = [{"name": s.tool, "arguments": a} for s, a in zip(group, args, strict=True)]
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await gw.call_tool(
                    {"name": batch_tool_name(gw.config), "arguments": {"calls": calls}}, self._link(session)
                )
            items = (result.get("structuredContent") or json.loads(result["content"][0]["text"]))["results"]
        except (MCPError, GatewayError, TimeoutError, KeyError, ValueError) as exc:
            ms = (time.perf_counter() - t0) * 1000
            return [
                StepRun(s.id, s.tool, a, False, ms, f"batch failed: {exc}", None, True)
                for s, a in zip(group, args, strict=True)
            ]
        ms = (time.perf_counter() - t0) * 1000
        out = []
        for s, a, item in zip(group, args, items, strict=True):
            res = item.get("result")
            err = None if item.get("ok") else (item.get("error", {}).get("message") or "isError")
            failed = err is not None
            out.append(StepRun(s.id, s.tool, a, failed == s.expect_error, ms, err, res, batched=True))
        return out

    def _trace(
        self, sc: Scenario, step: Step, sr: StepRun, session: str, t0: float, seq: int, seq_of: Mapping[str, int]
    ) -> dict[str, Any]:
        route = self.gateway.catalog.tool_routes.get(sr.tool)
        error = sr.error is not None and not step.expect_error
        return {
            "ts": t0,
            "server": route.server if route else "",
            "tool": route.name if route else sr.tool,
            "name": sr.tool,
            "outcome": ("tool_error" if sr.result is not None else "protocol_error") if error else "ok",
            "total_ms": round(sr.ms, 3),
            "request_bytes": _size(sr.arguments),
            "response_bytes": _size(sr.result),
            "session": session,
            "seq": seq,
            "args_hash": _args_hash(sr.arguments),
            "arguments": json.dumps(sr.arguments, separators=(",", ":"), default=str),
            "task_type": sc.task_type,
            "user_intent": sc.user_prompt,
            "cache": "" if sr.upstream else "hit",
            "depends_on": sorted(seq_of[r] for r in step.references() if r in seq_of),
            "result": sr.result,
        }

    def _judge(self, run: ScenarioRun, sc: Scenario, views: Mapping[str, StepView], ctx: Mapping[str, Any]) -> None:
        for sr in run.steps:
            run.criteria.append(CriterionRun(f"step {sr.id} succeeds", sr.ok, sr.error or "ok"))
        ran = {s.id for s in run.steps}
        for step in sc.steps:
            if step.id not in ran:
                run.criteria.append(CriterionRun(f"step {step.id} succeeds", False, run.error or "did not run"))
        last = run.steps[-1].id if run.steps else sc.steps[-1].id
        for crit in sc.success_criteria:
            try:
                ok, detail = check(crit, views, last, ctx)
            except TemplateError as exc:
                ok, detail = False, str(exc)
            run.criteria.append(CriterionRun(crit.label(), ok, detail))
