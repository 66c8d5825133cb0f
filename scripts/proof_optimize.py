#!/usr/bin/env python
"""The optimization proof (issue 6, item 8), with its figures and reports.

Plays the recorded sessions of examples/scenarios/proof (redundant reads, sequential independent
calls, a SELECT without LIMIT to the real SQLite MCP server, a freshness check) through the
gateway over the real servers of examples/proof.yaml, lets the loop optimize at the `moderate`
level, then adds a harmful rule (a TTL on the clock) and lets the loop roll it back.

    .venv/bin/python scripts/proof_optimize.py [--out .artifacts/proof] [--json]

Writes <out>/report.json and <out>/report.html (plots) and prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / ".artifacts" / "proof"))
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    os.chdir(ROOT)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mcpopt").setLevel(logging.WARNING)
    from mcpopt.optimize.proof import run_proof
    from mcpopt.optimize.report import build_report, write_reports
    from mcpopt.optimize.score import suite_scores
    from mcpopt.pipeline.rules import RuleStore, rules_summary

    with tempfile.TemporaryDirectory(prefix="mcpopt-proof-") as work:
        result = await run_proof(work)
        store = RuleStore(Path(work) / "rules.json")
        opt = result.optimize
        suites = [s for s in (opt.before, opt.after) if s is not None]
        suites[0].label, suites[-1].label = "before", "after"
        report = build_report(
            title="mcpopt proof: the loop on recorded sessions with injected waste",
            config="examples/proof.yaml",
            suites=suites,
            scores=suite_scores(suites, baseline=suites[0]),
            analysis=opt.analysis,
            loop=opt,
            rules=rules_summary(store.rules),
            history=store.history,
        )
        report["proof"] = result.figures()
        report["harm"] = result.harm.to_dict()
        js, page = write_reports(report, opts.out)
    fig = result.figures()
    if opts.json:
        print(json.dumps(fig, indent=2))
    else:
        b, a = fig["before"], fig["after"]
        print(f"tool calls : {b['calls']} -> {a['calls']}  ({fig['calls_cut']:.0%} fewer)")
        print(f"total time : {b['time_ms']:.0f} ms -> {a['time_ms']:.0f} ms  ({fig['time_cut']:.0%} less)")
        print(f"scenarios  : {b['success_rate']:.0%} -> {a['success_rate']:.0%} passing")
        print(f"applied    : {', '.join(fig['applied'])}")
        print(f"rolled back: {', '.join(fig['rolled_back']) or 'none'} ({fig['rollback_reason']})")
        print(f"reports    : {js} {page}")
    ok = fig["calls_cut"] >= 0.25 and fig["time_cut"] >= 0.40 and fig["criteria_failing_after"] == 0
    return 0 if ok and fig["rolled_back"] == [fig["harmful_rule"]] else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
