"""Optimizer units: scenarios, criteria, rules and their filter, analyzer, score, advisor, report."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest
from typer.testing import CliRunner

from mcpopt.optimize.advisor import advise, erlang_c, mmc_wait_s, replicas_needed
from mcpopt.optimize.analyzer import Analyzer, ToolFacts
from mcpopt.optimize.report import build_report, render_html, write_reports
from mcpopt.optimize.scenarios import ScenarioError, StepView, check, load_scenarios, parse_scenario, render
from mcpopt.optimize.score import efficiency
from mcpopt.optimize.settings import OptimizationSettings, level_allows, optimization_settings
from mcpopt.pipeline import ToolCall
from mcpopt.pipeline.rules import Action, Condition, Rule, RuleError, RulesFilter, RuleStore, add_sql_limit
from mcpopt.policy import ToolInfo

ROOT = Path(__file__).resolve().parents[1]


# ---- scenarios ---------------------------------------------------------------------------------
def test_shipped_scenarios_load() -> None:
    scs = load_scenarios([ROOT / "examples" / "scenarios"])
    ids = {s.id for s in scs}
    assert {"time-convert", "git-read", "git-change", "everything-tour", "filesystem-notes", "memory-graph"} <= ids
    assert {"proof-repo-audit", "proof-sales-report", "proof-long-ops", "proof-freshness", "sqlite-sales"} <= ids


def test_scenario_errors_name_the_problem() -> None:
    with pytest.raises(ScenarioError, match="steps.nope"):
        parse_scenario({"id": "x", "steps": [{"tool": "a", "arguments": {"p": "{{steps.nope.text}}"}}]}, "f.yaml")
    with pytest.raises(ScenarioError, match="needs one of"):
        parse_scenario({"id": "x", "steps": [{"tool": "a"}], "success_criteria": [{"step": "step1"}]}, "f.yaml")
    with pytest.raises(ScenarioError, match="seconds"):
        parse_scenario({"id": "x", "steps": [{"tool": "a"}], "expected_total_time": "soon"}, "f.yaml")
    assert (
        parse_scenario({"id": "x", "steps": [{"tool": "a"}], "expected_total_time": "250ms"}).expected_total_time
        == 0.25
    )


def _view(text: str, structured: Any = None) -> StepView:
    result: dict[str, Any] = {"content": [{"type": "text", "text": text}]}
    if structured is not None:
        result["structuredContent"] = structured
    return StepView(result, None, 12.0, {})


def test_templates_keep_types_and_interpolate() -> None:
    views = {"a": _view(json.dumps({"items": [{"name": "x"}, {"name": "y"}], "sha": "abc"})), "b": _view("one\ntwo")}
    ctx = {"steps": views, "vars": {"n": 3}, "servers": {}}
    assert render("{{steps.a.json.items}}", ctx) == [{"name": "x"}, {"name": "y"}]
    assert render("id-{{steps.a.json.sha}}-{{vars.n}}", ctx) == "id-abc-3"
    assert render({"k": ["{{steps.b.lines.1}}"]}, ctx) == {"k": ["two"]}
    assert render("{{steps.b.text | re: t(w)o}}", ctx) == "w"
    with pytest.raises(ScenarioError, match="no 'zz'"):
        render("{{steps.a.json.zz}}", ctx)


def test_criteria_contains_equals_jsonpath_count() -> None:
    sc = parse_scenario(
        {
            "id": "c",
            "steps": [{"id": "a", "tool": "t"}, {"id": "b", "tool": "t"}],
            "success_criteria": [
                {"step": "a", "contains": "Ada"},
                {"step": "a", "jsonpath": "$.entities[*].name", "equals": "Ada"},
                {"step": "a", "jsonpath": "$.entities[*]", "count": {"min": 1, "max": 1}},
                {"step": "b", "path": "json.t", "not_equals": "{{steps.a.json.t}}"},
                {"step": "b", "matches": "^\\{"},
            ],
        }
    )
    views = {"a": _view(json.dumps({"entities": [{"name": "Ada"}], "t": 1})), "b": _view(json.dumps({"t": 2}))}
    ctx = {"steps": views, "vars": {}, "servers": {}}
    assert [check(c, views, "b", ctx)[0] for c in sc.success_criteria] == [True] * 5
    views["b"] = _view(json.dumps({"t": 1}))  # a stale answer: the freshness criterion fails
    ok, why = check(sc.success_criteria[3], views, "b", {"steps": views, "vars": {}, "servers": {}})
    assert not ok and "expected a different value" in why


# ---- rules -------------------------------------------------------------------------------------
def test_sql_limit_rewrite() -> None:
    assert add_sql_limit("SELECT * FROM orders ORDER BY id", 100) == "SELECT * FROM orders ORDER BY id LIMIT 100"
    assert add_sql_limit("SELECT a FROM t UNION SELECT b FROM u", 5).endswith("LIMIT 5")
    assert add_sql_limit("SELECT * FROM t LIMIT 3", 100) is None
    assert add_sql_limit("DELETE FROM t", 100) is None
    assert add_sql_limit("SELECT 1; SELECT 2", 100) is None
    assert add_sql_limit("SELEC nonsense ((", 100) is None


def _call(tool: str, args: dict[str, Any], info: ToolInfo | None = None) -> ToolCall:
    return ToolCall("db", tool, f"db__{tool}", {"name": tool, "arguments": args}, info=info or ToolInfo(read_only=True))


def _rule(rid: str, action: Action, **cond: Any) -> Rule:
    return Rule(id=rid, condition=Condition(server="db", **cond), action=action)


@pytest.mark.anyio
async def test_rules_filter_actions() -> None:
    seen: list[ToolCall] = []

    async def upstream(call: ToolCall) -> dict[str, Any]:
        seen.append(call)
        return {"content": [{"type": "text", "text": "ok"}]}

    flt = RulesFilter(
        rules=[
            _rule("sql", Action(type="sql_limit", limit=10), tool="read_query"),
            _rule("ttl", Action(type="cache_ttl", ttl_ms=5000), tool="read_query"),
            _rule("page", Action(type="page_size", param="max_count", value=20), tool="log"),
            _rule("hint", Action(type="batch_hint"), tool="log"),
        ]
    )
    await flt(_call("read_query", {"query": "SELECT * FROM t"}), upstream)
    assert seen[-1].arguments["query"] == "SELECT * FROM t LIMIT 10"
    assert seen[-1].info.ttl_ms == 5000 and seen[-1].attrs["rules"] == ["sql", "ttl"]
    result = await flt(_call("log", {"max_count": 500}), upstream)
    assert seen[-1].arguments["max_count"] == 20
    assert result["_meta"]["mcpopt/hints"]
    await flt(_call("log", {"max_count": 5}), upstream)
    assert seen[-1].arguments["max_count"] == 5  # already smaller: left alone
    # A TTL never makes a write cacheable unless the rule says the tool is a read.
    await flt(_call("read_query", {"query": "x"}, ToolInfo(read_only=False)), upstream)
    assert seen[-1].info.ttl_ms == 0


@pytest.mark.anyio
async def test_rules_timeout_action() -> None:
    import anyio

    from mcpopt.errors import UpstreamTimeout

    async def slow(call: ToolCall) -> dict[str, Any]:
        await anyio.sleep(5)
        return {}

    flt = RulesFilter(rules=[_rule("t", Action(type="timeout", timeout_ms=50))])
    with pytest.raises(UpstreamTimeout, match="50 ms"):
        await flt(_call("slow", {}), slow)


@pytest.mark.anyio
async def test_rule_store_versions_rollback_and_live_reload(tmp_path: Path) -> None:
    store = RuleStore(tmp_path / "rules.json")
    flt = RulesFilter(store, reload_interval_s=0)
    store.add(_rule("a", Action(type="cache_ttl", ttl_ms=1000), tool="x"), reason="test")
    store.add(_rule("b", Action(type="batch_hint"), tool="y"))
    assert store.version == 2
    # Another process (the CLI) disables a rule: the filter sees it on its next call.
    other = RuleStore(tmp_path / "rules.json")
    other.set_enabled("a", False, "by hand")
    await anyio.sleep(0.01)

    async def up(call: ToolCall) -> dict[str, Any]:
        return {}

    await flt(_call("x", {}), up)
    assert [r.id for r in flt.ruleset.rules] == ["b"]
    changed = other.rollback(to_version=1)
    assert changed == ["a", "b"] and {r.id: r.enabled for r in other.rules} == {"a": True}
    assert other.history[-1]["op"] == "rollback"
    with pytest.raises(RuleError, match="no rule 'zz'"):
        other.get("zz")
    (tmp_path / "bad.json").write_text("{nope", encoding="utf-8")
    with pytest.raises(RuleError, match="not a valid rule file"):
        RuleStore(tmp_path / "bad.json")


def test_rules_cli(tmp_path: Path) -> None:
    from mcpopt.cli import app

    path = tmp_path / "rules.json"
    store = RuleStore(path)
    store.add(_rule("cache_ttl:db/x", Action(type="cache_ttl", ttl_ms=1000), tool="x"))
    cli = CliRunner()
    res = cli.invoke(app, ["rules", "list", "--rules", str(path), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["rules"][0]["enabled"] is True
    assert cli.invoke(app, ["rules", "disable", "cache_ttl:db/x", "--rules", str(path)]).exit_code == 0
    assert RuleStore(path).get("cache_ttl:db/x").enabled is False
    assert cli.invoke(app, ["rules", "enable", "cache_ttl:db/x", "--rules", str(path)]).exit_code == 0
    assert cli.invoke(app, ["rules", "rollback", "cache_ttl:db/x", "--rules", str(path)]).exit_code == 0
    assert RuleStore(path).get("cache_ttl:db/x").enabled is False
    res = cli.invoke(app, ["rules", "disable", "nope", "--rules", str(path)])
    assert res.exit_code == 2


def test_settings_levels() -> None:
    assert level_allows("moderate", "conservative") and not level_allows("conservative", "moderate")
    assert optimization_settings(object()).rollback_threshold == 0.1
    with pytest.raises(ValueError):
        OptimizationSettings(interval="soon")


# ---- analyzer ----------------------------------------------------------------------------------
def _row(session: str, seq: int, tool: str, ts: float, ms: float = 10.0, **extra: Any) -> dict[str, Any]:
    server = extra.pop("server", "srv")
    return {
        "ts": ts,
        "server": server,
        "tool": tool,
        "name": f"{server}__{tool}",
        "outcome": "ok",
        "total_ms": ms,
        "response_bytes": 100,
        "session": session,
        "seq": seq,
        "args_hash": extra.pop("args_hash", "h"),
        "arguments": json.dumps(extra.pop("args", {})),
        "cache": "",
        **extra,
    }


def test_analyzer_detectors() -> None:
    t = 1000.0
    rows = [
        _row("s1", 1, "read_file", t, args={"path": "/a"}),
        _row("s1", 2, "read_file", t + 1, args={"path": "/a"}),
        _row("s1", 3, "read_file", t + 2, args={"path": "/a"}),
        _row("s1", 4, "git_status", t + 3, args_hash="s"),
        _row("s1", 5, "git_status", t + 4, args_hash="s"),
        _row("s1", 6, "git_status", t + 5, args_hash="s"),
        _row("s2", 1, "read_query", t, 400.0, args={"query": "SELECT * FROM big"}, response_bytes=900_000),
        _row("s3", 1, "list_directory", t, args={"path": "/r"}, args_hash="1"),
        _row("s3", 2, "list_directory", t + 1, args={"path": "/r/a"}, args_hash="2"),
        _row("s3", 3, "list_directory", t + 2, args={"path": "/r/a/b"}, args_hash="3"),
        _row("s4", 1, "slow_op", t, 2000.0, args_hash="1"),
        _row("s4", 2, "slow_op", t + 3, 2500.0, args_hash="2"),
        _row("s4", 3, "slow_op", t + 6, 2400.0, args_hash="3", outcome="timeout"),
    ]
    facts = {
        ("srv", "read_file"): ToolFacts(True),
        ("srv", "git_status"): ToolFacts(True),
        ("srv", "list_directory"): ToolFacts(True, {"properties": {"path": {}, "depth": {}}}),
        ("srv", "read_query"): ToolFacts(None),
        ("srv", "slow_op"): ToolFacts(True),
    }
    a = Analyzer(facts).analyze(rows)
    kinds = {f.kind for f in a.findings}
    assert {
        "redundant_calls",
        "repeated_status",
        "sql_without_limit",
        "deep_browsing",
        "slow_tool",
        "error_prone",
    } <= kinds
    assert "sequential_independent" in kinds
    red = next(f for f in a.findings if f.kind == "redundant_calls")
    assert red.tool == "read_file" and red.gain["calls_saved"] == 2 and red.evidence["examples"]
    ids = {r.id for r in a.proposals()}
    assert {"cache_ttl:srv/read_file", "cache_ttl:srv/git_status", "sql_limit:srv/read_query"} <= ids
    assert "depth_cap:srv/list_directory" in ids and "timeout:srv/slow_op" in ids
    sql = next(r for r in a.proposals() if r.id == "sql_limit:srv/read_query")
    assert sql.level == "moderate" and sql.action.limit == 100
    assert a.calls_needed() < sum(a.session_calls.values())


def test_analyzer_respects_data_flow_and_writes() -> None:
    t = 0.0
    # b uses a's result (depends_on): not independent; a write in between resets redundancy.
    rows = [
        _row("s", 1, "get_a", t, depends_on=[]),
        _row("s", 2, "get_b", t + 1, depends_on=[1]),
        _row("s", 3, "get_c", t + 2, args_hash="x", depends_on=[]),
        _row("s", 4, "write_c", t + 3, args_hash="y", depends_on=[]),
        _row("s", 5, "get_c", t + 4, args_hash="x", depends_on=[]),
    ]
    a = Analyzer().analyze(rows)
    assert not [f for f in a.findings if f.kind == "redundant_calls"]
    seq = [f for f in a.findings if f.kind == "sequential_independent"]
    assert all("get_a" not in f.tool or "get_b" not in f.tool for f in seq)


# ---- score, advisor ----------------------------------------------------------------------------
def test_efficiency_score_weights() -> None:
    assert efficiency(1.0, 6, 6, 100, 100).total == 100
    s = efficiency(0.5, 3, 6, 100, 200)
    assert s.call_efficiency == 0.5 and s.time_efficiency == 0.5
    assert s.total == pytest.approx(100 * (0.5 * 0.5 + 0.3 * 0.5 + 0.2 * 0.5))


def test_erlang_c_and_replicas() -> None:
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)  # M/M/2 at 50% utilization
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    assert mmc_wait_s(1.0, 0.5, 1) == pytest.approx(0.5)  # M/M/1: Wq = rho S / (1 - rho)
    assert mmc_wait_s(3.0, 0.5, 1) == float("inf")
    assert replicas_needed(10.0, 0.2) >= 3  # a = 2 Erlangs at most 70% busy
    rows = [{"ts": 1000.0 + i * 0.5, "server": "s", "total_ms": 400.0} for i in range(240)]
    (adv,) = advise(rows)
    assert adv.rate_peak == pytest.approx(2.0, rel=0.05) and adv.recommended > adv.replicas
    assert "add replicas" in adv.to_dict()["action"]


# ---- report ------------------------------------------------------------------------------------
def test_html_report_renders_in_chromium(tmp_path: Path) -> None:
    from mcpopt.optimize.runner import ScenarioRun, StepRun, SuiteRun

    sc = parse_scenario({"id": "s1", "steps": [{"id": "a", "tool": "srv__read_file"}]})
    suites = []
    for label, ms in (("before", 120.0), ("after", 40.0)):
        run = ScenarioRun(sc, "gateway", label, [StepRun("a", "srv__read_file", {}, True, ms)], [], ms, 1, 1)
        suites.append(SuiteRun("gateway", label, [run]))
    analysis = Analyzer().analyze([_row("s", i, "read_file", float(i)) for i in range(1, 4)])
    report = build_report(config="demo.yaml", suites=suites, analysis=analysis, advice=advise([]))
    js, page = write_reports(report, tmp_path)
    assert json.loads(js.read_text())["kpis"]["after"]["time_ms"] == 40.0
    text = page.read_text()
    assert "<script src" not in text and "http" not in text.split("<main>")[1]  # self-contained
    assert text.count("<svg") >= 2 and "redundant_calls" in text
    assert render_html(report) == text
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no Chromium on this machine")
    proc = subprocess.run(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    dom = proc.stdout
    assert 'data-ready="1"' in dom, proc.stderr[-2000:]  # the page's script ran to its end
    assert "<rect" in dom and 'class="grade"' in dom


def test_replays_send_hinted_independent_steps_as_one_batch() -> None:
    """A `batch_hint` rule makes the runner's plan group independent steps into one call of the
    gateway's batch tool (regression: the plan looked the tool up under a name it no longer had)."""
    from mcpopt.catalog import GatewayCatalog, Route
    from mcpopt.config import load_config
    from mcpopt.gateway.assembly import build_gateway
    from mcpopt.optimize.runner import Runner
    from mcpopt.optimize.scenarios import Scenario, Step
    from mcpopt.pipeline.rules import RuleSet

    gw = build_gateway(load_config(data={"mcpServers": {}}))
    gw.catalog = GatewayCatalog(tool_routes={"db__log": Route("db", "log"), "db__read": Route("db", "read")})
    hint = _rule("hint", Action(type="batch_hint"), tool="log")
    runner = Runner(gw, rules=lambda: RuleSet([hint]))
    steps = [Step(id="a", tool="db__log"), Step(id="b", tool="db__log"), Step(id="c", tool="db__read")]
    plan = runner._plan(Scenario(id="s", steps=steps), "gateway")  # noqa: SLF001
    assert [[s.id for s in group] for group in plan] == [["a", "b"], ["c"]]
    assert [[s.id for s in group] for group in runner._plan(Scenario(id="s", steps=steps), "direct")] == [  # noqa: SLF001
        ["a"],
        ["b"],
        ["c"],
    ]
