"""Rules: the gateway's optimizations as data, persisted and versioned, applied per call.

A rule is `{id, name, description, condition, action, priority, enabled, level, source,
evidence}`. `condition` picks calls by server and tool (globs) and, optionally, arguments
(`args: {name: value}`, `"*"` = present). `action.type` is one of:

- `cache_ttl` (`ttl_ms`): cache the tool's results this long. Only for read-only tools, unless
  `assume_read_only: true` (aggressive level: the tool is only *named* like a read).
- `sql_limit` (`limit`, `dialect`, `param`): a SELECT in the `query`/`sql` argument without a
  LIMIT gets `LIMIT <limit>` (parsed and rewritten with sqlglot; other statements pass).
- `page_size` (`param`, `value`): set a page-size argument (e.g. `max_count`, `limit`, `head`)
  to `value` when absent or larger.
- `depth_cap` (`param`, `value`): cap a depth argument (e.g. `depth`, `max_depth`).
- `timeout` (`timeout_ms`): fail the call with `UPSTREAM_TIMEOUT` after this long.
- `routing` (`strategy`): advisory (the pool's strategy is set in the server's config).
- `batch_hint` (`message`): the result's `_meta["mcpopt/hints"]` says the call is usually one of
  several independent ones, to send together with the gateway's batch tool.
- `workflow` (`workflow`: a workflow definition, `message`): the calls of `condition.calls` are
  usually made together, in this order: the workflows plugin serves the definition as
  `workflow__<name>`, and the first call of the sequence gets a hint naming it.

**Canary rollout.** A rule with `rollout: {state: canary, share, seed}` applies to a share of the
calls it matches: each such call is drawn into the canary arm (the rule applies) or the control
arm (it does not) by a per-rule random generator seeded with `seed` (the same split on every
run), and `call.attrs["variants"]` records `"<rule id>=canary|control"` for telemetry. The
optimizer compares the arms on live telemetry and promotes the rule (`state: promoted`, all
calls) or rolls it back (`mcpopt.optimize.canary`). Replays measure a rule's whole effect: their
filter is made with `canary=False`.

`RuleStore` keeps the rules in a JSON file (default `<config data dir>/rules.json`, see
`mcpopt.config.config_data_dir`); each change bumps `version` and is logged in `history` with its
reason, evidence and the rule set after it, so any version can be restored (`rollback`).
`RulesFilter` re-reads the file when it changes (checked at most once a second), so
`mcpopt rules enable|disable|rollback` and the loop act on a running gateway without a restart.
Its place in the pipeline is before the cache (the TTL it sets is read by `CacheFilter`):
telemetry -> shaping -> rules -> cache -> coalesce -> ...
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field

from mcpopt.config import Config, Level, OptimizationSettings, config_data_dir
from mcpopt.datafiles import private_dir
from mcpopt.errors import McpoptError, UpstreamTimeout
from mcpopt.pipeline import Next, ToolCall, ToolResult

logger = logging.getLogger(__name__)

ActionType = Literal["cache_ttl", "sql_limit", "page_size", "depth_cap", "timeout", "routing", "batch_hint", "workflow"]
SQL_PARAMS = ("query", "sql", "statement")
HISTORY_KEEP = 500


class RuleError(McpoptError):
    """A rule file or a rule change is invalid (names the file or the rule)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Condition(_Model):
    """Which calls a rule applies to."""

    server: str = "*"
    tool: str = "*"
    calls: list[str] = Field(default_factory=list)
    """Instead of `server`/`tool`: the exact `server/tool` pairs the rule covers (a batch hint
    names every tool of a pattern of independent calls)."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Argument name -> value the call must have ("*": any value, but present)."""

    def matches_tool(self, server: str, tool: str) -> bool:
        if self.calls:
            return f"{server}/{tool}" in self.calls
        return fnmatchcase(server, self.server) and fnmatchcase(tool, self.tool)

    def describe(self) -> str:
        where = ", ".join(self.calls) if self.calls else f"{self.server}/{self.tool}"
        return where + (f" {json.dumps(self.args)}" if self.args else "")

    def matches_args(self, arguments: Mapping[str, Any]) -> bool:
        for key, want in self.args.items():
            if key not in arguments or (want != "*" and arguments[key] != want):
                return False
        return True


class Action(_Model):
    type: ActionType
    ttl_ms: int | None = Field(None, ge=0)
    assume_read_only: bool = False
    limit: int | None = Field(None, ge=1)
    dialect: str = "sqlite"
    param: str | None = None
    value: int | None = Field(None, ge=0)
    timeout_ms: int | None = Field(None, gt=0)
    strategy: str | None = None
    message: str | None = None
    workflow: dict[str, Any] | None = None
    """For `workflow`: the definition (`mcpopt.workflow_model.Workflow` fields, `name` included)."""
    bindings: dict[str, list[Any]] = Field(default_factory=dict)
    """For `workflow`: parameter -> `[position in the sequence, argument name]` of the call it is
    taken from (replays call the workflow in place of the sequence with these)."""

    def describe(self) -> str:
        t = self.type
        if t == "cache_ttl":
            return f"cache results for {self.ttl_ms} ms" + (" (assumed read-only)" if self.assume_read_only else "")
        if t == "sql_limit":
            return f"add LIMIT {self.limit} to SELECTs without one"
        if t in ("page_size", "depth_cap"):
            return f"{'cap' if t == 'depth_cap' else 'page'} {self.param} at {self.value}"
        if t == "timeout":
            return f"time out after {self.timeout_ms} ms"
        if t == "routing":
            return f"route with {self.strategy}"
        if t == "workflow":
            name = (self.workflow or {}).get("name", "?")
            return self.message or f"serve the sequence as workflow__{name}"
        return self.message or "send with other independent calls (batch)"


class Rollout(_Model):
    """How much of its traffic a rule serves (see the module doc, "Canary rollout")."""

    state: Literal["canary", "promoted"] = "canary"
    share: float = Field(0.2, gt=0, le=1)
    """Share of the matching calls in the canary arm while `state` is canary."""
    seed: int = 0
    started: float = Field(default_factory=time.time)
    """Unix seconds: live telemetry from then on is the canary's evidence."""
    decided: float | None = None
    verdict: str = ""
    """Why it was promoted (or, in the rule's history, rolled back)."""


class Rule(_Model):
    """One optimization (see the module doc)."""

    id: str
    name: str = ""
    description: str = ""
    condition: Condition = Field(default_factory=Condition)
    action: Action
    priority: int = 0
    """Higher first when several rules match one call."""
    enabled: bool = True
    level: Level = "conservative"
    source: str = "manual"
    """"analyzer" (proposed by a finding) or "manual"."""
    evidence: dict[str, Any] = Field(default_factory=dict)
    created: float = Field(default_factory=time.time)
    rollout: Rollout | None = None
    """None: the rule serves every matching call (as a rule added by hand)."""

    @property
    def in_canary(self) -> bool:
        return self.rollout is not None and self.rollout.state == "canary"


# ---- the rule file -----------------------------------------------------------------------------
class RuleStore:
    """The persisted, versioned rule set (a JSON file; see the module doc).

    Args:
        path: the file (created on the first change, with its folder).

    Raises:
        RuleError: the file exists but is not a rule file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.version = 0
        self.rules: list[Rule] = []
        self.history: list[dict[str, Any]] = []
        self.state: dict[str, Any] = {}
        """Free-form state kept with the rules (the loop's accepted KPIs)."""
        self.reload()

    def reload(self) -> None:
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.rules = [Rule.model_validate(r) for r in data.get("rules", [])]
        except (ValueError, TypeError) as exc:
            raise RuleError(f"{self.path}: not a valid rule file ({str(exc)[:300]})") from None
        self.version = int(data.get("version", 0))
        self.history = list(data.get("history", []))
        self.state = dict(data.get("state", {}))

    def get(self, rule_id: str) -> Rule:
        for r in self.rules:
            if r.id == rule_id:
                return r
        known = ", ".join(r.id for r in self.rules) or "none"
        raise RuleError(f"no rule {rule_id!r} in {self.path} (rules: {known})")

    def active(self) -> list[Rule]:
        return [r for r in self.rules if r.enabled]

    def save(self) -> None:
        """Write the file atomically (a reader never sees half a file)."""
        private_dir(self.path.parent)  # mkstemp makes the file itself 0600
        data = {
            "version": self.version,
            "rules": [r.model_dump(mode="json") for r in self.rules],
            "history": self.history[-HISTORY_KEEP:],
            "state": self.state,
        }
        fd, tmp = tempfile.mkstemp(prefix=".rules-", dir=self.path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=str)
        os.replace(tmp, self.path)

    def _log(self, op: str, rule_id: str | None, reason: str, evidence: Mapping[str, Any] | None) -> None:
        self.version += 1
        self.history.append(
            {
                "version": self.version,
                "ts": time.time(),
                "op": op,
                "rule": rule_id,
                "reason": reason,
                "evidence": dict(evidence or {}),
                "rules": [r.model_dump(mode="json") for r in self.rules],
            }
        )
        self.save()

    def add(self, rule: Rule, reason: str = "", evidence: Mapping[str, Any] | None = None) -> Rule:
        """Add a rule, or replace the one with the same id."""
        self.rules = [r for r in self.rules if r.id != rule.id] + [rule]
        self._log("add", rule.id, reason or f"added ({rule.action.describe()})", evidence or rule.evidence)
        return rule

    def set_enabled(
        self, rule_id: str, enabled: bool, reason: str = "", evidence: Mapping[str, Any] | None = None
    ) -> Rule:
        rule = self.get(rule_id)
        rule.enabled = enabled
        self._log(
            "enable" if enabled else "disable", rule_id, reason or ("enabled" if enabled else "disabled"), evidence
        )
        return rule

    def promote(self, rule_id: str, reason: str, evidence: Mapping[str, Any] | None = None) -> Rule:
        """End a rule's canary: it serves every matching call from now on."""
        rule = self.get(rule_id)
        if rule.rollout is not None:
            rule.rollout.state = "promoted"
            rule.rollout.decided = time.time()
            rule.rollout.verdict = reason
        self._log("promote", rule_id, reason, evidence)
        return rule

    def remove(self, rule_id: str, reason: str = "") -> None:
        self.get(rule_id)
        self.rules = [r for r in self.rules if r.id != rule_id]
        self._log("remove", rule_id, reason or "removed", None)

    def rollback(
        self,
        rule_id: str | None = None,
        *,
        to_version: int | None = None,
        reason: str = "",
        evidence: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Undo: disable one rule (`rule_id`), restore the rule set of `to_version`, or (neither)
        undo the last change. Returns the ids of rules whose state changed.

        Raises:
            RuleError: unknown rule or version, or nothing to undo.
        """
        before = {r.id: r.enabled for r in self.rules}
        if rule_id is not None:
            self.get(rule_id).enabled = False
            changed = [rule_id]
        else:
            if to_version is None:
                if len(self.history) < 2:
                    raise RuleError(f"{self.path}: no earlier version to roll back to")
                to_version = self.history[-2]["version"]
            entry = next((h for h in self.history if h["version"] == to_version), None)
            if entry is None and to_version == 0:
                entry = {"rules": []}
            if entry is None:
                kept = ", ".join(str(h["version"]) for h in self.history[-10:])
                raise RuleError(f"{self.path}: no version {to_version} (recent: {kept})")
            self.rules = [Rule.model_validate(r) for r in entry["rules"]]
            after = {r.id: r.enabled for r in self.rules}
            changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        self._log(
            "rollback",
            rule_id,
            reason or (f"rolled back to version {to_version}" if rule_id is None else "rolled back"),
            evidence,
        )
        return changed


# ---- matching ----------------------------------------------------------------------------------
class RuleSet:
    """Enabled rules compiled for the request path: per (server, tool), the matching rules by priority."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules = sorted((r for r in rules if r.enabled), key=lambda r: -r.priority)
        self._by_tool: dict[tuple[str, str], tuple[Rule, ...]] = {}

    def for_tool(self, server: str, tool: str) -> tuple[Rule, ...]:
        key = (server, tool)
        found = self._by_tool.get(key)
        if found is None:
            found = tuple(r for r in self.rules if r.condition.matches_tool(server, tool))
            self._by_tool[key] = found
        return found

    def batchable(self, server: str, tool: str, arguments: Mapping[str, Any]) -> bool:
        return any(
            r.action.type == "batch_hint" and r.condition.matches_args(arguments) for r in self.for_tool(server, tool)
        )


def add_sql_limit(sql: str, limit: int, dialect: str = "sqlite") -> str | None:
    """`sql` with `LIMIT limit` when it is one SELECT (or set operation) without a LIMIT; else None.

    Statements that are not queries, several statements, SQL that sqlglot cannot parse, and
    queries that already have a LIMIT (or FETCH) are left alone (None).
    """
    import sqlglot
    from sqlglot import exp

    try:
        parsed = sqlglot.parse(sql, read=dialect)
    except (sqlglot.errors.ParseError, sqlglot.errors.TokenError, ValueError):
        return None
    if len(parsed) != 1 or parsed[0] is None:
        return None
    tree = parsed[0]
    if not isinstance(tree, exp.Query) or tree.args.get("limit") or tree.args.get("fetch"):
        return None
    return tree.limit(limit).sql(dialect=dialect)  # type: ignore[no-any-return]


def sql_argument(arguments: Mapping[str, Any], param: str | None = None) -> tuple[str, str] | None:
    """(argument name, SQL text) of the call's SQL argument, if it has one."""
    for key in (param,) if param else SQL_PARAMS:
        value = arguments.get(key) if key else None
        if isinstance(value, str) and value.strip():
            return key, value  # type: ignore[return-value]
    return None


# ---- the pipeline filter -----------------------------------------------------------------------
class RulesFilter:
    """Apply the enabled rules' actions to each call (see the module doc).

    Args:
        store: a `RuleStore` (re-read when its file changes), or None for rules set in code.
        rules: initial rules when there is no store.
        reload_interval_s: how often (at most) the store file's mtime is checked.

    `call.attrs["rules"]` lists the ids of the rules that changed a call.
    """

    def __init__(
        self,
        store: RuleStore | None = None,
        rules: Iterable[Rule] | None = None,
        *,
        reload_interval_s: float = 1.0,
        canary: bool = True,
    ) -> None:
        self.store = store
        self.reload_interval_s = reload_interval_s
        self.canary = canary
        """Split canary rules' calls into arms (False: every rule applies to all its calls)."""
        self._draws: dict[tuple[str, int], random.Random] = {}
        self._checked = 0.0
        self._mtime = self._stat()
        self.ruleset = RuleSet(store.active() if store is not None else (rules or ()))
        self.applied: dict[str, int] = {}
        """Calls changed per rule id since start."""
        self.on_reload: Callable[[], None] | None = None
        """Called after the rules were re-read from a changed file (`check_file`)."""

    def _draw(self, rule_id: str, seed: int) -> float:
        """The next draw in [0, 1) of the rule's own generator (seeded: the same split every run)."""
        rng = self._draws.get((rule_id, seed))
        if rng is None:
            rng = self._draws[(rule_id, seed)] = random.Random(f"{seed}:{rule_id}")
        return rng.random()

    def _stat(self) -> float:
        if self.store is None:
            return 0.0
        try:
            return self.store.path.stat().st_mtime_ns
        except OSError:
            return 0.0

    def set_rules(self, rules: Iterable[Rule]) -> None:
        """Replace the rules in force (takes effect for the next call) until the file changes again."""
        self.ruleset = RuleSet(rules)
        self._mtime = self._stat()

    def check_file(self) -> bool:
        """Re-read the store's file if it changed since last read; True when new rules took effect
        (then `on_reload` is called: e.g. `mcpopt.gateway.shared` passes the change to other replicas)."""
        if self.store is None:
            return False
        self._checked = time.monotonic()
        mtime = self._stat()
        if mtime == self._mtime:
            return False
        self._mtime = mtime
        try:
            self.store.reload()
            self.ruleset = RuleSet(self.store.active())
        except RuleError as exc:
            logger.warning("rules: keeping the rules in force: %s", exc)
            return False
        if self.on_reload is not None:
            self.on_reload()
        return True

    def _current(self) -> RuleSet:
        if self.store is not None and time.monotonic() - self._checked >= self.reload_interval_s:
            self.check_file()
        return self.ruleset

    rewrites = True
    """It may change a call (its info, tool, arguments): the pipeline keeps every filter after it."""

    def plan_state(self) -> RuleSet:
        """The rule set in force, the file re-read when due (the pipeline calls this once per call and
        recompiles its chains when another set took effect)."""
        return self._current()

    def wanted(self, server: str, tool: str, info: Any) -> bool:
        """Whether any rule in force concerns `server`'s `tool` (else the pipeline leaves this out)."""
        return bool(self.ruleset.for_tool(server, tool))

    async def __call__(self, call: ToolCall, next: Next) -> ToolResult:
        matched = self._current().for_tool(call.server, call.tool)
        if not matched:
            return await next(call)
        args = dict(call.arguments)
        changed = False
        timeout_ms: int | None = None
        hints: list[str] = []
        used: list[str] = []
        variants: list[str] | None = None
        for rule in matched:
            if not rule.condition.matches_args(args):
                continue
            ro = rule.rollout
            if ro is not None and ro.state == "canary" and self.canary:
                arm = "canary" if self._draw(rule.id, ro.seed) < ro.share else "control"
                if variants is None:
                    variants = call.attrs.setdefault("variants", [])
                variants.append(f"{rule.id}={arm}")
                if arm == "control":
                    continue
            act = rule.action
            hit = True
            if act.type == "cache_ttl":
                info = call.info
                if (info.read_only or act.assume_read_only) and act.ttl_ms is not None:
                    call.info = dataclasses.replace(info, read_only=True, idempotent=True, ttl_ms=act.ttl_ms)
                else:
                    hit = False
            elif act.type == "sql_limit":
                found = sql_argument(args, act.param)
                new_sql = add_sql_limit(found[1], act.limit or 100, act.dialect) if found else None
                if found and new_sql:
                    args[found[0]] = new_sql
                    changed = True
                else:
                    hit = False
            elif act.type in ("page_size", "depth_cap") and act.param and act.value is not None:
                current = args.get(act.param)
                if not isinstance(current, int | float) or current > act.value:
                    args[act.param] = act.value
                    changed = True
                else:
                    hit = False
            elif act.type == "timeout" and act.timeout_ms:
                timeout_ms = act.timeout_ms if timeout_ms is None else min(timeout_ms, act.timeout_ms)
            elif act.type == "batch_hint":
                hints.append(act.describe())
            elif act.type == "workflow":
                first = rule.condition.calls[0] if rule.condition.calls else ""
                if first != f"{call.server}/{call.tool}":
                    hit = False  # the hint goes with the sequence's first call only
                else:
                    hints.append(act.describe())
            else:
                hit = False
            if hit:
                used.append(rule.id)
                self.applied[rule.id] = self.applied.get(rule.id, 0) + 1
        if used:
            call.attrs["rules"] = used
        if changed:
            call.params = {**call.params, "arguments": args}
        if timeout_ms is not None:
            result = await _with_timeout(call, next, timeout_ms)
        else:
            result = await next(call)
        if hints:
            meta = result.get("_meta")
            result = {**result, "_meta": {**(meta if isinstance(meta, dict) else {}), "mcpopt/hints": hints}}
        return result


async def _with_timeout(call: ToolCall, next: Next, timeout_ms: int) -> ToolResult:
    result: ToolResult | None = None
    with anyio.move_on_after(timeout_ms / 1000) as scope:
        result = await next(call)
    if scope.cancelled_caught or result is None:
        raise UpstreamTimeout(
            f"MCP server '{call.server}' did not answer {call.tool} within {timeout_ms} ms (rule timeout)",
            server=call.server,
        )
    return result


def rules_summary(rules: Iterable[Rule]) -> list[dict[str, Any]]:
    """Rows for `mcpopt rules list` and the reports."""
    return [
        {
            "id": r.id,
            "enabled": r.enabled,
            "level": r.level,
            "priority": r.priority,
            "source": r.source,
            "when": r.condition.describe(),
            "action": r.action.describe(),
            "description": r.description,
            "rollout": (
                "all calls"
                if r.rollout is None
                else f"canary {r.rollout.share:.0%} of calls (seed {r.rollout.seed})"
                if r.rollout.state == "canary"
                else f"promoted: {r.rollout.verdict}"
            ),
        }
        for r in rules
    ]


def optimization_settings(config: Any) -> OptimizationSettings:
    """The config's optimization settings (`gateway.optimization`, else defaults)."""
    for holder in (getattr(config, "gateway", None), config):
        found = getattr(holder, "optimization", None)
        if isinstance(found, OptimizationSettings):
            return found
        if isinstance(found, dict):
            return OptimizationSettings.model_validate(found)
        if isinstance(found, BaseModel):
            return OptimizationSettings.model_validate(found.model_dump())
    return OptimizationSettings()


def default_rules_path(config: Any) -> Path:
    """`optimization.rules_path`, else `<config data dir>/rules.json` (`mcpopt.config.config_data_dir`)."""
    settings = optimization_settings(config)
    if settings.rules_path:
        return Path(settings.rules_path).expanduser()
    return config_data_dir(config if isinstance(config, Config) else None) / "rules.json"
