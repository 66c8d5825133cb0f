"""Fair path comparisons (issue 15): the alternating schedule, warm-up, spread, and how `quick` and
`analyze` use them. Verdicts are about order and counting, never about timings."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from conftest import time_entry
from mcpopt.config import load_config
from mcpopt.monitor.compare import Slot, added, run_schedule, schedule, spread
from mcpopt.optimize.commands import _before_after, alternate_suites, bench_paths, bench_table, bench_verdict
from mcpopt.optimize.loop import LoopEvent, LoopReport
from mcpopt.optimize.runner import SuiteRun
from mcpopt.optimize.scenarios import Scenario, Step
from mcpopt.optimize.session import OptimizeSession

pytestmark = pytest.mark.anyio


# ---- the schedule --------------------------------------------------------------------------------
def test_schedule_warms_up_then_rotates_the_order_every_round() -> None:
    got = [(s.round, s.path, s.warmup) for s in schedule(["direct", "gateway"], rounds=3, warmup_rounds=1)]
    assert got == [
        (0, "direct", True),
        (0, "gateway", True),
        (1, "gateway", False),
        (1, "direct", False),
        (2, "direct", False),
        (2, "gateway", False),
        (3, "gateway", False),
        (3, "direct", False),
    ]
    three = schedule(["a", "b", "c"], rounds=3, warmup_rounds=0)
    assert [s.path for s in three] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_schedule_is_balanced_over_whole_cycles() -> None:
    paths = ["direct", "relay", "mcpopt", "fastmcp"]
    slots = schedule(paths, rounds=8, warmup_rounds=2)
    timed = [s for s in slots if not s.warmup]
    assert Counter(s.path for s in timed) == dict.fromkeys(paths, 8)
    assert {s.path for s in slots if s.warmup} == set(paths) and sum(s.warmup for s in slots) == 8
    firsts = Counter(timed[i].path for i in range(0, len(timed), len(paths)))
    assert firsts == dict.fromkeys(paths, 2)  # every path leads a round equally often
    # Within each round, each path once.
    for r in range(10):
        assert sorted(s.path for s in slots if s.round == r) == sorted(paths)


def test_schedule_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="distinct"):
        schedule(["a", "a"], 1)
    with pytest.raises(ValueError, match="distinct"):
        schedule([], 1)
    with pytest.raises(ValueError, match=">= 0"):
        schedule(["a"], -1)


async def test_run_schedule_drops_the_warm_up_samples() -> None:
    seen: list[Slot] = []

    async def turn(slot: Slot) -> list[float]:
        seen.append(slot)
        return [1000.0] if slot.warmup else [float(slot.round)]

    got = await run_schedule(schedule(["x", "y"], rounds=2, warmup_rounds=1), turn)
    assert got == {"x": [1.0, 2.0], "y": [1.0, 2.0]} and len(seen) == 6


def test_spread_and_added() -> None:
    s = spread([5.0, 1.0, 4.0, 2.0, 3.0, 100.0, 6.0, 7.0])
    assert (s["n"], s["p50"], s["q1"], s["q3"], s["iqr"], s["p99"], s["min"], s["max"]) == (
        8,
        4.0,
        2.0,
        6.0,
        4.0,
        100.0,
        1.0,
        100.0,
    )
    assert spread([])["p50"] is None and spread([])["n"] == 0
    assert added({"p50": 3.0, "p99": 9.0}, {"p50": 1.0, "p99": 4.0}) == {"p50": 2.0, "p99": 5.0}
    assert added({"p50": None, "p99": 9.0}, {"p50": 1.0, "p99": 4.0}) == {"p50": None, "p99": 5.0}


# ---- quick and analyze on a real gateway -------------------------------------------------------
def _session(tmp: Path) -> OptimizeSession:
    cfg = load_config(
        data={"mcpServers": {"time": time_entry(cache={"ttl_ms": 60_000})}, "gateway": {"data_dir": str(tmp)}}
    )
    return OptimizeSession(cfg, sandbox=False, rules_path=tmp / "rules.json")


def _twice(sid: str) -> Scenario:
    step = {"tool": "time__get_current_time", "arguments": {"timezone": "UTC"}}
    return Scenario(id=sid, servers=["time"], steps=[Step(id="a", **step), Step(id="b", **step)])


async def test_quick_bench_alternates_after_warm_up_and_marks_cache_served_calls(tmp_path: Path) -> None:
    session = _session(tmp_path)
    async with session.open():
        runner = session.runner
        assert runner is not None
        seen: list[str] = []
        run = runner.run

        async def recording(scenarios, mode, **kw):  # type: ignore[no-untyped-def]
            seen.append(kw["label"])
            return await run(scenarios, mode, **kw)

        runner.run = recording  # type: ignore[method-assign]
        suites = await bench_paths(runner, [_twice("s")], rounds=3, progress=None)
        assert runner.honor_batch_hints is True  # restored
    assert seen == [
        "direct warm-up",
        "gateway warm-up",
        "gateway #1",
        "direct #1",
        "direct #2",
        "gateway #2",
        "gateway #3",
        "direct #3",
    ]
    assert [s.label for s in suites] == seen[2:]
    table = bench_table(suites)
    row = table["time__get_current_time"]
    assert row["direct"]["n"] == row["gateway"]["n"] == 6
    # The second identical call of each gateway run is a cache hit: counted, so the reader knows
    # this tool's gateway figure is not the same work as its direct one.
    assert row["gateway_served"] == 3
    # Paired: step a of each round (a miss on the gateway) against step a of the same round's direct
    # run; step b (a cache hit) is left out.
    assert row["added_paired"]["n"] == 3
    assert bench_verdict(table, suites) == "no tool the cache did not serve was measured on both paths"
    row["gateway_served"] = 0  # read as if no call had been served: the verdict counts the pairs
    assert "all 3 paired differences" in bench_verdict(table, suites)


async def test_analyze_alternates_direct_before_after_per_scenario(tmp_path: Path) -> None:
    session = _session(tmp_path)
    order: list[tuple[str, str]] = []
    set_to: list[int] = []
    async with session.open():
        runner = session.runner
        assert runner is not None
        run = runner.run

        async def recording(scenarios, mode, **kw):  # type: ignore[no-untyped-def]
            order.append((kw["label"], ",".join(s.id for s in scenarios)))
            return await run(scenarios, mode, **kw)

        runner.run = recording  # type: ignore[method-assign]
        paths = {"direct": ("direct", None), "before": ("gateway", []), "after": ("gateway", [])}
        probes = [_twice("probe")]
        suites = await alternate_suites(runner, [_twice("s1"), _twice("s2")], paths, lambda r: set_to.append(1), probes)
    assert order == [
        ("direct", "probe"),
        ("before", "probe"),
        ("after", "probe"),
        ("direct", "s1"),
        ("before", "s1"),
        ("after", "s1"),
        ("before", "s2"),
        ("after", "s2"),
        ("direct", "s2"),
    ]
    assert len(set_to) == 6  # the rules of each gateway path are put in force before its turn
    assert [(s.label, s.mode, [r.scenario.id for r in s.runs]) for s in suites] == [
        ("direct", "direct", ["s1", "s2"]),
        ("before", "gateway", ["s1", "s2"]),
        ("after", "gateway", ["s1", "s2"]),
    ]
    assert all(r.ok for s in suites for r in s.runs)


def test_before_after_labels_say_what_they_measured() -> None:
    same = SuiteRun("gateway", "current")
    report = LoopReport(before=same, after=same)
    assert [s.label for s in _before_after(report)] == ["before: the rules in force (this run applied none)"]
    before, after = SuiteRun("gateway", "current"), SuiteRun("gateway", "with x")
    events = [LoopEvent("applied", "x", ""), LoopEvent("applied", "y", ""), LoopEvent("rolled_back", "z", "")]
    labels = [s.label for s in _before_after(LoopReport(before=before, after=after, events=events))]
    assert labels == ["before: the rules in force", "after: + 2 rule(s) validated, - 1 rolled back"]


async def test_performance_benchmark_tool_compares_with_the_direct_path(tmp_path: Path) -> None:
    from mcp import Client

    from mcpopt.gateway.assembly import build_gateway

    cfg = load_config(data={"mcpServers": {"time": time_entry()}, "gateway": {"data_dir": str(tmp_path)}})
    gw = build_gateway(cfg)
    async with gw.running(), Client(gw.server, mode="legacy") as client:
        args = {
            "calls": [{"name": "time__get_current_time", "arguments": {"timezone": "UTC"}}],
            "iterations": 25,
            "warmup": 2,
            "compare_direct": True,
        }
        got = (await client.call_tool("mcpopt__run_performance_benchmark", args)).structured_content
    assert got is not None
    row = got["results"][0]
    assert row["errors"] == 0 and row["calls"] == 50
    assert row["direct"]["n"] == row["gateway"]["n"] == 25
    assert set(row["added_ms"]) == {"p50", "p99"} and "alternating" in row["method"]
    # added_ms is computed from the unrounded p50s, the row shows them rounded to 3 places.
    assert abs(row["added_ms"]["p50"] - (row["gateway"]["p50"] - row["direct"]["p50"])) <= 0.0015


def test_overhead_rows_compare_every_path_with_direct_and_the_relay() -> None:
    from mcpopt.bench.overhead import rows_of, summarize, targets

    results = [
        summarize("stdio", "direct", [1.0] * 99 + [3.0], 0),
        summarize("stdio", "relay", [1.05] * 99 + [3.5], 0),
        summarize("stdio", "mcpopt", [1.2] * 99 + [4.0], 0),
        summarize("http", "direct", [2.0] * 100, 0),
        summarize("http", "mcpopt", [2.5] * 100, 0),
    ]
    rows = {(r["transport"], r["path"]): r for r in rows_of(results)}
    mc = rows[("stdio", "mcpopt")]
    assert mc["added_vs_direct"] == pytest.approx({"p50": 0.2, "p99": 1.0})
    assert mc["added_vs_relay"] == pytest.approx({"p50": 0.15, "p99": 0.5})
    assert "added_vs_relay" not in rows[("stdio", "relay")] and "added_vs_direct" not in rows[("stdio", "direct")]
    assert "added_vs_relay" not in rows[("http", "mcpopt")]  # no relay measured on that transport
    (goal,) = targets(list(rows.values()))  # only where a relay was measured
    assert goal["transport"] == "stdio" and goal["p50_met"] is False and goal["p99_met"] is True
    assert goal["p50_over_relay_ms"] == pytest.approx(0.15) and goal["p99_over_direct_ms"] == pytest.approx(1.0)
