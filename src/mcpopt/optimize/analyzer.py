"""The analyzer: optimization opportunities in recorded tool calls.

Input rows have the shape of `mcpopt.telemetry.record.CallRecord` (as `Store.calls()` yields
them, or the runner's traces): `ts` (Unix s), `server`, `tool`, `name`, `outcome`, `total_ms`,
`response_bytes`, `session`, `seq`, `args_hash`, `arguments` (JSON, at the `detailed` level),
`cache`. A row may also carry `depends_on` (the `seq`s in its session whose results its
arguments use), which the runner knows from templates; without it, data flow between calls is
unknown and sequential-call findings say so (confidence "low").

Detectors (each yields `Finding`s with evidence, an estimated gain and proposed rules):

- `redundant_calls`: the same read-only call (server, tool, argument hash) repeated within
  `redundant_window_s` in one session -> a cache TTL covering the observed gaps.
- `repeated_status`: status/auth-like tools called `status_min_calls`+ times in a session -> a short TTL.
- `large_results`: results over `large_bytes` -> a page size (when the tool has a page parameter).
- `sql_without_limit`: a SELECT without LIMIT in a `query`/`sql` argument (parsed with sqlglot)
  -> a LIMIT rewrite.
- `sequential_independent`: consecutive calls, the second started after the first ended, no data
  flowing between them -> a batch hint for the tools involved.
- `deep_browsing`: chains of list/tree calls descending `depth_limit`+ levels -> a depth cap
  (tools with a depth parameter) or one tree call.
- `slow_tool`: p95 over `slow_ms` -> a timeout at p99 x 3, and replicas (see the advisor).
- `error_prone`: error rate over `error_rate` -> what the errors are.
- `chatty_session`: sessions with `chatty_calls`+ calls -> batching or code mode.
- `repeated_sequence`: the same sequence of calls, again and again -> a workflow that makes it
  one call, independent steps in parallel (`mcpopt.optimize.sequences`).

Read-only-ness comes from the gateway's `ToolInfo` when given (MCP `readOnlyHint` or config),
else from the tool's name (get/list/read/search/...); a TTL on a tool that is read-only by its
name only is an `aggressive` rule with `assume_read_only`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mcpopt.monitor.stats import grade, percentile
from mcpopt.pipeline.rules import Action, Condition, Rule, add_sql_limit, sql_argument
from mcpopt.telemetry.record import ERROR_OUTCOMES

_READ_NAME = re.compile(
    r"(^|[_\-.])(get|list|read|search|show|status|describe|find|fetch|query|view|log|diff|open|lookup|tree)([_\-.]|$)",
    re.IGNORECASE,
)
_WRITE_NAME = re.compile(
    r"write|create|delete|update|insert|add|set|remove|append|commit|reset|move|edit|toggle|trigger|checkout|put|post",
    re.IGNORECASE,
)
_STATUS_NAME = re.compile(r"status|auth|whoami|ping|health|token|login|session|current_user|allowed", re.IGNORECASE)
_LIST_NAME = re.compile(r"list|tree|ls$|browse|directory|children|folder", re.IGNORECASE)
_PATH_ARGS = ("path", "dir", "directory", "folder", "parent", "uri", "prefix", "root")
_PAGE_PARAMS = ("limit", "max_count", "maxResults", "max_results", "page_size", "pageSize", "per_page", "top", "head")
_DEPTH_PARAMS = ("depth", "max_depth", "maxDepth", "levels", "level")


@dataclass(frozen=True)
class ToolFacts:
    """What the analyzer knows of a tool besides its calls."""

    read_only: bool | None = None
    """True/False from annotations or config; None: unknown (the name decides)."""
    schema: Mapping[str, Any] | None = None


@dataclass
class AnalyzerSettings:
    redundant_window_s: float = 300.0
    min_repeats: int = 2
    """Repeated calls (beyond the first) needed for a redundancy finding."""
    status_min_calls: int = 3
    large_bytes: int = 50_000
    page_size: int = 50
    sql_limit: int = 100
    depth_limit: int = 3
    slow_ms: float = 1_000.0
    error_rate: float = 0.10
    min_calls: int = 3
    chatty_calls: int = 30
    max_examples: int = 3
    workflows: bool = True
    """Propose workflows for repeated call sequences."""
    sequence_repeats: int = 3
    """Occurrences a sequence needs before a workflow is proposed for it."""


@dataclass
class Finding:
    kind: str
    title: str
    server: str = ""
    tool: str = ""
    severity: str = "warning"
    """info | warning | critical."""
    evidence: dict[str, Any] = field(default_factory=dict)
    gain: dict[str, float] = field(default_factory=dict)
    """Estimated: `calls_saved` (upstream calls), `round_trips_saved`, `ms_saved`, `bytes_saved`."""
    proposals: list[Rule] = field(default_factory=list)
    recommendation: str = ""
    confidence: str = "high"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "title": self.title,
            "server": self.server,
            "tool": self.tool,
            "severity": self.severity,
            "confidence": self.confidence,
            "evidence": self.evidence,
            "gain": {k: round(v, 1) for k, v in self.gain.items()},
            "proposals": [r.model_dump(mode="json") for r in self.proposals],
            "recommendation": self.recommendation,
        }


@dataclass
class Analysis:
    findings: list[Finding]
    rows: int
    sessions: int
    tools: list[dict[str, Any]]
    """Per tool: server, tool, calls, errors, error_rate, avg_ms, p50_ms, p95_ms, p99_ms, bytes_avg, grade."""
    session_savings: dict[str, int]
    """Session -> upstream calls the findings' fixes would save in it."""
    session_calls: dict[str, int]
    since: float | None = None
    until: float | None = None

    def proposals(self) -> list[Rule]:
        """Every proposed rule once (by id), biggest estimated gain first."""
        best: dict[str, tuple[float, Rule]] = {}
        for f in self.findings:
            gain = f.gain.get("ms_saved", 0.0) + 100 * f.gain.get("calls_saved", 0.0)
            for r in f.proposals:
                if r.id not in best or best[r.id][0] < gain:
                    best[r.id] = (gain, r)
        return [r for _, r in sorted(best.values(), key=lambda gr: -gr[0])]

    def calls_needed(self) -> int:
        return sum(self.session_calls.values()) - sum(self.session_savings.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "sessions": self.sessions,
            "since": self.since,
            "until": self.until,
            "findings": [f.to_dict() for f in self.findings],
            "tools": self.tools,
            "calls_made": sum(self.session_calls.values()),
            "calls_needed": self.calls_needed(),
        }


# ---- helpers -----------------------------------------------------------------------------------
def _args(row: Mapping[str, Any]) -> dict[str, Any] | None:
    raw = row.get("arguments")
    if isinstance(raw, dict):
        return raw
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _props(facts: ToolFacts | None) -> dict[str, Any]:
    props = (facts.schema or {}).get("properties") if facts is not None else None
    return props if isinstance(props, dict) else {}


def _slug(server: str, tool: str) -> str:
    return f"{server}/{tool}"


def _example(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {"session": row.get("session", ""), "seq": row.get("seq", 0), "ms": row.get("total_ms", 0.0)}
    args = row.get("arguments")
    if args:
        text = args if isinstance(args, str) else json.dumps(args)
        out["arguments"] = text[:200]
    return out


class Analyzer:
    """Runs the detectors over rows (see the module doc).

    Args:
        tools: (server, tool) -> `ToolFacts` (e.g. `facts_from_gateway(gateway)`).
        settings: thresholds.
    """

    def __init__(
        self, tools: Mapping[tuple[str, str], ToolFacts] | None = None, settings: AnalyzerSettings | None = None
    ) -> None:
        self.tools = dict(tools or {})
        self.s = settings or AnalyzerSettings()

    def read_only(self, server: str, tool: str) -> tuple[bool, bool]:
        """(read-only, known from annotations/config rather than the name)."""
        facts = self.tools.get((server, tool))
        if facts is not None and facts.read_only is not None:
            return facts.read_only, True
        return bool(_READ_NAME.search(tool)) and not _WRITE_NAME.search(tool), False

    def analyze(self, rows: Iterable[Mapping[str, Any]]) -> Analysis:
        data = sorted((dict(r) for r in rows), key=lambda r: (r.get("ts", 0.0), r.get("seq", 0)))
        sessions: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in data:
            if r.get("session"):
                sessions[r["session"]].append(r)
        for calls in sessions.values():
            calls.sort(key=lambda r: (r.get("seq") or 0, r.get("ts", 0.0)))
        savings: Counter[str] = Counter()
        findings: list[Finding] = []
        findings += self._redundant(sessions, savings)
        findings += self._status(sessions, savings)
        findings += self._large(data)
        findings += self._sql(data)
        findings += self._sequential(sessions)
        findings += self._deep(sessions, savings)
        tools = self._tool_table(data)
        findings += self._slow(tools)
        findings += self._errors(data, tools)
        findings += self._chatty(sessions)
        if self.s.workflows:
            findings += self._sequences(sessions)
        order = {"critical": 0, "warning": 1, "info": 2}
        findings.sort(key=lambda f: (order.get(f.severity, 3), -f.gain.get("ms_saved", 0.0)))
        return Analysis(
            findings,
            len(data),
            len(sessions),
            tools,
            dict(savings),
            {s: sum(1 for r in calls if r.get("cache") != "hit") for s, calls in sessions.items()},
            since=data[0]["ts"] if data else None,
            until=data[-1]["ts"] if data else None,
        )

    # ---- detectors ----------------------------------------------------------------------
    def _ttl_rule(self, server: str, tool: str, ttl_ms: int, kind: str, evidence: dict[str, Any]) -> Rule:
        ro, known = self.read_only(server, tool)
        level = "conservative" if known else "aggressive"
        return Rule(
            id=f"cache_ttl:{_slug(server, tool)}",
            name=f"cache {tool}",
            description=f"{kind}: the same {tool} call repeats; serve repeats from the cache for {ttl_ms / 1000:g} s",
            condition=Condition(server=server, tool=tool),
            action=Action(type="cache_ttl", ttl_ms=ttl_ms, assume_read_only=not known),
            level=level,
            source="analyzer",
            evidence=evidence,
        )

    def _redundant(self, sessions: Mapping[str, list[dict[str, Any]]], savings: Counter[str]) -> list[Finding]:
        per_tool: dict[tuple[str, str], dict[str, Any]] = {}
        for session, calls in sessions.items():
            last_seen: dict[tuple[str, str, str], float] = {}
            for r in calls:
                server, tool = r["server"], r["tool"]
                if r.get("outcome") != "ok" or r.get("cache") == "hit" or _STATUS_NAME.search(tool):
                    continue
                if not self.read_only(server, tool)[0]:
                    # A write may change what the reads return: repeats across it are not waste.
                    last_seen = {k: v for k, v in last_seen.items() if k[0] != server}
                    continue
                key = (server, tool, r.get("args_hash") or "")
                prev = last_seen.get(key)
                ts = float(r.get("ts", 0.0))
                if prev is not None and ts - prev <= self.s.redundant_window_s:
                    st = per_tool.setdefault(
                        (server, tool), {"repeats": 0, "ms": 0.0, "gaps": [], "sessions": set(), "ex": []}
                    )
                    st["repeats"] += 1
                    st["ms"] += float(r.get("total_ms", 0.0))
                    st["gaps"].append(ts - prev)
                    st["sessions"].add(session)
                    if len(st["ex"]) < self.s.max_examples:
                        st["ex"].append(_example(r))
                    savings[session] += 1
                last_seen[key] = ts
        out = []
        for (server, tool), st in per_tool.items():
            if st["repeats"] < self.s.min_repeats:
                continue
            gaps = sorted(st["gaps"])
            ttl = int(min(300_000, max(1_000, math.ceil(percentile(gaps, 0.9) * 2 * 1000))))
            evidence = {
                "repeats": st["repeats"],
                "sessions": len(st["sessions"]),
                "p90_gap_s": round(percentile(gaps, 0.9), 3),
                "examples": st["ex"],
            }
            out.append(
                Finding(
                    "redundant_calls",
                    f"{tool} is called again with the same arguments ({st['repeats']} repeats)",
                    server,
                    tool,
                    "warning",
                    evidence,
                    {"calls_saved": st["repeats"], "ms_saved": st["ms"]},
                    [self._ttl_rule(server, tool, ttl, "redundant calls", evidence)],
                    f"cache {tool} for {ttl / 1000:g} s (repeats came within {evidence['p90_gap_s']} s)",
                    "high" if self.read_only(server, tool)[1] else "medium",
                )
            )
        return out

    def _status(self, sessions: Mapping[str, list[dict[str, Any]]], savings: Counter[str]) -> list[Finding]:
        per_tool: dict[tuple[str, str], dict[str, Any]] = {}
        for session, calls in sessions.items():
            counts = Counter(
                (r["server"], r["tool"]) for r in calls if _STATUS_NAME.search(r["tool"]) and r.get("cache") != "hit"
            )
            for key, n in counts.items():
                if n < self.s.status_min_calls or not self.read_only(*key)[0]:
                    continue
                st = per_tool.setdefault(key, {"calls": 0, "extra": 0, "ms": 0.0, "sessions": 0})
                ms = [float(r.get("total_ms", 0.0)) for r in calls if (r["server"], r["tool"]) == key]
                st["calls"] += n
                st["extra"] += n - 1
                st["ms"] += sum(ms) - (ms[0] if ms else 0.0)
                st["sessions"] += 1
                savings[session] += n - 1
        out = []
        for (server, tool), st in per_tool.items():
            evidence = {
                "calls": st["calls"],
                "sessions": st["sessions"],
                "per_session": round(st["calls"] / st["sessions"], 1),
            }
            out.append(
                Finding(
                    "repeated_status",
                    f"status/auth call {tool} repeated {evidence['per_session']} times per session",
                    server,
                    tool,
                    "warning",
                    evidence,
                    {"calls_saved": st["extra"], "ms_saved": st["ms"]},
                    [self._ttl_rule(server, tool, 30_000, "repeated status calls", evidence)],
                    f"cache {tool} for 30 s (status rarely changes within a task)",
                )
            )
        return out

    def _large(self, data: list[dict[str, Any]]) -> list[Finding]:
        big: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in data:
            if int(r.get("response_bytes") or 0) > self.s.large_bytes:
                args = _args(r) or {}
                if sql_argument(args) is None:  # SQL results: see sql_without_limit
                    big[(r["server"], r["tool"])].append(r)
        out = []
        for (server, tool), rows in big.items():
            props = _props(self.tools.get((server, tool)))
            param = next((p for p in _PAGE_PARAMS if p in props), None)
            size = sorted(int(r["response_bytes"]) for r in rows)
            evidence = {
                "calls": len(rows),
                "p50_bytes": int(percentile(size, 0.5)),
                "max_bytes": size[-1],
                "examples": [_example(r) for r in rows[: self.s.max_examples]],
            }
            proposals = []
            if param is not None:
                proposals.append(
                    Rule(
                        id=f"page_size:{_slug(server, tool)}",
                        name=f"page {tool}",
                        description=f"large results: ask {tool} for {self.s.page_size} items at a time ({param})",
                        condition=Condition(server=server, tool=tool),
                        action=Action(type="page_size", param=param, value=self.s.page_size),
                        level="moderate",
                        source="analyzer",
                        evidence=evidence,
                    )
                )
            out.append(
                Finding(
                    "large_results",
                    f"{tool} returns large results (p50 {evidence['p50_bytes']:,} bytes)",
                    server,
                    tool,
                    "warning",
                    evidence,
                    {"bytes_saved": float(sum(max(0, b - self.s.large_bytes) for b in size))},
                    proposals,
                    f"set {param}={self.s.page_size}"
                    if param
                    else "filter the results (the tool has no page parameter), or cut them with "
                    "gateway.shaping.max_result_bytes",
                )
            )
        return out

    def _sql(self, data: list[dict[str, Any]]) -> list[Finding]:
        hits: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        params: dict[tuple[str, str], str] = {}
        for r in data:
            args = _args(r)
            found = sql_argument(args) if args else None
            if found and add_sql_limit(found[1], self.s.sql_limit) is not None:
                hits[(r["server"], r["tool"])].append(r)
                params[(r["server"], r["tool"])] = found[0]
        out = []
        for (server, tool), rows in hits.items():
            ms = sum(float(r.get("total_ms", 0.0)) for r in rows)
            big = [r for r in rows if int(r.get("response_bytes") or 0) > 10_000]
            evidence = {
                "calls": len(rows),
                "large_results": len(big),
                "avg_bytes": int(sum(int(r.get("response_bytes") or 0) for r in rows) / len(rows)),
                "examples": [
                    {**_example(r), "query": (sql_argument(_args(r) or {}) or ("", ""))[1][:200]}
                    for r in rows[: self.s.max_examples]
                ],
            }
            rule = Rule(
                id=f"sql_limit:{_slug(server, tool)}",
                name=f"LIMIT for {tool}",
                description=f"SELECTs without LIMIT: add LIMIT {self.s.sql_limit}",
                condition=Condition(server=server, tool=tool),
                action=Action(type="sql_limit", limit=self.s.sql_limit, param=params[(server, tool)]),
                level="moderate",
                source="analyzer",
                evidence=evidence,
            )
            out.append(
                Finding(
                    "sql_without_limit",
                    f"{len(rows)} SELECT(s) without LIMIT sent to {tool}",
                    server,
                    tool,
                    "critical" if big else "warning",
                    evidence,
                    # Estimate: half of the time of the large ones (rows serialized and sent).
                    {"ms_saved": 0.5 * sum(float(r.get("total_ms", 0.0)) for r in big), "total_ms": ms},
                    [rule],
                    f"add LIMIT {self.s.sql_limit} (or page with OFFSET) to queries whose callers read only "
                    "the first rows",
                )
            )
        return out

    def _sequential(self, sessions: Mapping[str, list[dict[str, Any]]]) -> list[Finding]:
        patterns: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
        for session, calls in sessions.items():
            known_flow = any("depends_on" in r for r in calls)
            run: list[dict[str, Any]] = []

            def flush(run: list[dict[str, Any]], session: str = session, known: bool = known_flow) -> None:
                if len(run) < 2:
                    return
                key = tuple(sorted({(r["server"], r["tool"]) for r in run}))
                st = patterns.setdefault(
                    key, {"runs": 0, "calls": 0, "ms_saved": 0.0, "sessions": set(), "ex": [], "known": True}
                )
                ms = [float(r.get("total_ms", 0.0)) for r in run]
                st["runs"] += 1
                st["calls"] += len(run)
                st["ms_saved"] += sum(ms) - max(ms)
                st["sessions"].add(session)
                st["known"] = st["known"] and known
                if len(st["ex"]) < self.s.max_examples:
                    st["ex"].append({"session": session, "calls": [f"{r['seq']}:{r['tool']}" for r in run]})

            for r in calls:
                if r.get("outcome") != "ok":
                    flush(run)
                    run = []
                    continue
                if run and self._independent(run, r, known_flow):
                    run.append(r)
                else:
                    flush(run)
                    run = [r]
            flush(run)
        out = []
        for key, st in patterns.items():
            evidence = {
                "runs": st["runs"],
                "calls": st["calls"],
                "sessions": len(st["sessions"]),
                "data_flow": "known" if st["known"] else "unknown (no depends_on in the records)",
                "examples": st["ex"],
            }
            servers = sorted({s for s, _ in key})
            names = [t for _, t in key]
            proposals = [
                Rule(
                    id="batch_hint:"
                    + (
                        "+".join(f"{s}/{t}" for s, t in key) if len(servers) > 1 else f"{servers[0]}/" + "+".join(names)
                    ),
                    name=f"batch {', '.join(names)}",
                    description="independent calls made one after another: send them together (gateway batch tool)",
                    condition=Condition(calls=[f"{s}/{t}" for s, t in key]),
                    action=Action(
                        type="batch_hint", message="independent of the calls around it: send them in one batch"
                    ),
                    level="conservative",
                    source="analyzer",
                    evidence=evidence,
                )
            ]
            out.append(
                Finding(
                    "sequential_independent",
                    f"{st['runs']} run(s) of independent calls made one after another ({', '.join(t for _, t in key)})",
                    key[0][0] if len({s for s, _ in key}) == 1 else "",
                    ", ".join(t for _, t in key),
                    "warning",
                    evidence,
                    {"round_trips_saved": float(st["calls"] - st["runs"]), "ms_saved": st["ms_saved"]},
                    proposals,
                    "send these calls together with the gateway's batch tool (they use no result of each other)",
                    "high" if st["known"] else "low",
                )
            )
        return out

    def _independent(self, run: list[dict[str, Any]], r: Mapping[str, Any], known_flow: bool) -> bool:
        prev = run[-1]
        started_after = (
            float(r.get("ts", 0.0)) + 1e-4 >= float(prev.get("ts", 0.0)) + float(prev.get("total_ms", 0.0)) / 1000
        )
        if not started_after:
            return False  # already concurrent
        if not self.read_only(r["server"], r["tool"])[0] or not self.read_only(prev["server"], prev["tool"])[0]:
            return False  # order may matter around writes
        if known_flow:
            seqs = {x.get("seq") for x in run}
            return not (set(r.get("depends_on") or ()) & seqs)
        return True

    def _deep(self, sessions: Mapping[str, list[dict[str, Any]]], savings: Counter[str]) -> list[Finding]:
        per_tool: dict[tuple[str, str], dict[str, Any]] = {}
        for session, calls in sessions.items():
            chain: list[tuple[str, dict[str, Any]]] = []
            for r in calls:
                if not _LIST_NAME.search(r["tool"]):
                    continue
                args = _args(r) or {}
                path = next((str(args[k]) for k in _PATH_ARGS if isinstance(args.get(k), str)), None)
                if path is None:
                    continue
                path = path.rstrip("/")
                if chain and path.startswith(chain[-1][0] + "/") and r["tool"] == chain[-1][1]["tool"]:
                    chain.append((path, r))
                else:
                    self._deep_flush(chain, session, per_tool, savings)
                    chain = [(path, r)]
            self._deep_flush(chain, session, per_tool, savings)
        out = []
        for (server, tool), st in per_tool.items():
            props = _props(self.tools.get((server, tool)))
            param = next((p for p in _DEPTH_PARAMS if p in props), None)
            evidence = {
                "chains": st["chains"],
                "max_depth": st["max_depth"],
                "calls": st["calls"],
                "examples": st["ex"],
            }
            proposals = []
            if param is not None:
                proposals.append(
                    Rule(
                        id=f"depth_cap:{_slug(server, tool)}",
                        name=f"depth cap for {tool}",
                        description=f"deep recursive browsing: cap {param} at {self.s.depth_limit}",
                        condition=Condition(server=server, tool=tool),
                        action=Action(type="depth_cap", param=param, value=self.s.depth_limit),
                        level="moderate",
                        source="analyzer",
                        evidence=evidence,
                    )
                )
            trees = [t for (s, t) in self.tools if s == server and "tree" in t.lower() and t != tool]
            out.append(
                Finding(
                    "deep_browsing",
                    f"{tool} walks {st['max_depth']} levels down, one call per level",
                    server,
                    tool,
                    "warning",
                    evidence,
                    {"calls_saved": float(st["calls"] - st["chains"]), "ms_saved": st["ms"]},
                    proposals,
                    f"cap the depth ({param}={self.s.depth_limit})"
                    if param
                    else (
                        f"read the tree once with {trees[0]}"
                        if trees
                        else "read the tree once instead of level by level"
                    ),
                )
            )
        return out

    def _deep_flush(
        self,
        chain: list[tuple[str, dict[str, Any]]],
        session: str,
        per_tool: dict[tuple[str, str], dict[str, Any]],
        savings: Counter[str],
    ) -> None:
        if len(chain) < self.s.depth_limit:
            return
        r0 = chain[0][1]
        st = per_tool.setdefault(
            (r0["server"], r0["tool"]), {"chains": 0, "calls": 0, "max_depth": 0, "ms": 0.0, "ex": []}
        )
        st["chains"] += 1
        st["calls"] += len(chain)
        st["max_depth"] = max(st["max_depth"], len(chain))
        st["ms"] += sum(float(r.get("total_ms", 0.0)) for _, r in chain[1:])
        if len(st["ex"]) < self.s.max_examples:
            st["ex"].append({"session": session, "paths": [p for p, _ in chain]})
        savings[session] += len(chain) - 1

    def _tool_table(self, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
        groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in data:
            groups[(r["server"], r["tool"])].append(r)
        out = []
        for (server, tool), rows in sorted(groups.items()):
            lat = sorted(float(r.get("total_ms", 0.0)) for r in rows)
            errors = sum(r.get("outcome") in ERROR_OUTCOMES for r in rows)
            avg = sum(lat) / len(lat)
            rate = errors / len(rows)
            out.append(
                {
                    "server": server,
                    "tool": tool,
                    "calls": len(rows),
                    "errors": errors,
                    "error_rate": round(rate, 4),
                    "avg_ms": round(avg, 3),
                    "p50_ms": round(percentile(lat, 0.5), 3),
                    "p95_ms": round(percentile(lat, 0.95), 3),
                    "p99_ms": round(percentile(lat, 0.99), 3),
                    "bytes_avg": int(sum(int(r.get("response_bytes") or 0) for r in rows) / len(rows)),
                    "cache_hits": sum(r.get("cache") == "hit" for r in rows),
                    "grade": grade(avg, rate),
                    "outcomes": dict(Counter(r.get("outcome", "") for r in rows)),
                }
            )
        return out

    def _slow(self, tools: list[dict[str, Any]]) -> list[Finding]:
        out = []
        for t in tools:
            if t["calls"] < self.s.min_calls or t["p95_ms"] < self.s.slow_ms:
                continue
            timeout = int(min(120_000, max(1_000, t["p99_ms"] * 3)))
            evidence = {k: t[k] for k in ("calls", "p50_ms", "p95_ms", "p99_ms", "grade")}
            out.append(
                Finding(
                    "slow_tool",
                    f"{t['tool']} is slow (p95 {t['p95_ms']:.0f} ms)",
                    t["server"],
                    t["tool"],
                    "warning",
                    evidence,
                    {},
                    [
                        Rule(
                            id=f"timeout:{_slug(t['server'], t['tool'])}",
                            name=f"timeout for {t['tool']}",
                            description=f"slow tool: fail calls after {timeout} ms (p99 x 3)",
                            condition=Condition(server=t["server"], tool=t["tool"]),
                            action=Action(type="timeout", timeout_ms=timeout),
                            level="conservative",
                            source="analyzer",
                            evidence=evidence,
                        )
                    ],
                    "cache it if it is a read, add replicas if calls queue (see the scaling advice), "
                    f"and bound it with a {timeout} ms timeout",
                )
            )
        return out

    def _errors(self, data: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[Finding]:
        out = []
        for t in tools:
            if t["calls"] < self.s.min_calls or t["error_rate"] < self.s.error_rate:
                continue
            outcomes = {k: v for k, v in t["outcomes"].items() if k in ERROR_OUTCOMES}
            main = max(outcomes, key=lambda k: outcomes[k])
            advice = {
                "timeout": "raise its timeout or add replicas: it does not answer in time",
                "unavailable": "the server is down or restarting: check its health and add replicas",
                "tool_error": "the tool rejects its calls: check the arguments clients send (see examples)",
                "protocol_error": "calls are malformed or the tool is unknown: check the client's tool names",
                "rejected": "the gateway's concurrency limit rejects calls: raise max_concurrency/max_queue",
            }.get(main, "look at the server's logs")
            examples = [
                _example(r)
                for r in data
                if (r["server"], r["tool"]) == (t["server"], t["tool"]) and r.get("outcome") == main
            ][: self.s.max_examples]
            out.append(
                Finding(
                    "error_prone",
                    f"{t['tool']} fails {t['error_rate']:.0%} of its calls (mostly {main})",
                    t["server"],
                    t["tool"],
                    "critical" if t["error_rate"] >= 0.25 else "warning",
                    {"calls": t["calls"], "errors": t["errors"], "outcomes": outcomes, "examples": examples},
                    {},
                    [],
                    advice,
                )
            )
        return out

    def _sequences(self, sessions: Mapping[str, list[dict[str, Any]]]) -> list[Finding]:
        from mcpopt.optimize.sequences import SequenceSettings, propose_workflows

        settings = SequenceSettings(min_repeats=self.s.sequence_repeats, max_proposals=3)
        out = []
        for p in propose_workflows(sessions, lambda s, t: self.read_only(s, t)[0], settings):
            names = [n for _, _, n in p.key]
            evidence = {"sequence": names, "occurrences": p.occurrences, "sessions": p.sessions}
            if p.rule is None:
                evidence["not_proposed"] = p.reason
            out.append(
                Finding(
                    "repeated_sequence",
                    f"{len(names)} calls made together {p.occurrences} times ({', '.join(names)})",
                    p.key[0][0] if len({s for s, _, _ in p.key}) == 1 else "",
                    ", ".join(t for _, t, _ in p.key),
                    "info" if p.rule is None else "warning",
                    evidence,
                    {"round_trips_saved": p.round_trips_saved, "ms_saved": p.ms_saved},
                    [p.rule] if p.rule is not None else [],
                    f"serve the sequence as one workflow ({p.rule.id.split(':', 1)[1]})"
                    if p.rule is not None
                    else f"record arguments (telemetry level detailed) to get a workflow proposed: {p.reason}",
                )
            )
        return out

    def _chatty(self, sessions: Mapping[str, list[dict[str, Any]]]) -> list[Finding]:
        sizes = {s: len(c) for s, c in sessions.items()}
        chatty = {s: n for s, n in sizes.items() if n >= self.s.chatty_calls}
        if not chatty:
            return []
        top = sorted(chatty.items(), key=lambda kv: -kv[1])[: self.s.max_examples]
        return [
            Finding(
                "chatty_session",
                f"{len(chatty)} session(s) with {self.s.chatty_calls}+ tool calls",
                evidence={
                    "sessions": len(chatty),
                    "max_calls": max(chatty.values()),
                    "median_calls_all": int(percentile(sorted(sizes.values()), 0.5)),
                    "examples": [
                        {
                            "session": s,
                            "calls": n,
                            "tools": dict(Counter(r["tool"] for r in sessions[s]).most_common(5)),
                        }
                        for s, n in top
                    ],
                },
                severity="info",
                recommendation="batch independent calls, or let the model write one script in code mode "
                "instead of many round trips",
            )
        ]


def facts_from_gateway(gateway: Any) -> dict[tuple[str, str], ToolFacts]:
    """(server, tool) -> `ToolFacts` from a running gateway's catalog (annotations + config)."""
    out: dict[tuple[str, str], ToolFacts] = {}
    routes = gateway.catalog.tool_routes
    infos = gateway.catalog.tool_infos
    for tool in gateway.catalog.tools:
        route = routes.get(tool.name)
        if route is None:
            continue
        info = infos.get(tool.name)
        ann = tool.annotations
        known = info is not None and (info.read_only or (ann is not None and ann.read_only_hint is not None))
        out[(route.server, route.name)] = ToolFacts(info.read_only if known and info else None, tool.input_schema)
    return out
