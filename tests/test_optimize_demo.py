"""The shipped scenarios against the demo's five real servers (sandboxed): all pass, all tools covered."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mcpopt.config import load_config
from mcpopt.optimize.coverage import coverage_matrix, gateway_tools
from mcpopt.optimize.scenarios import load_scenarios
from mcpopt.optimize.session import OptimizeSession

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def _head() -> tuple[str, str]:
    """The repository's checked-out branch and commit (works in a clone and in a worktree)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False).stdout

    return git("symbolic-ref", "-q", "HEAD").strip(), git("rev-parse", "HEAD").strip()


@pytest.mark.anyio
async def test_demo_scenarios_pass_and_cover_every_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # examples/demo.yaml names its servers relative to the repository root
    cfg = load_config(ROOT / "examples" / "demo.yaml")
    scs = load_scenarios([ROOT / "examples" / "scenarios" / "demo"])
    head = _head()
    session = OptimizeSession(cfg, rules_path=tmp_path / "rules.json", sandbox=True)
    async with session.open():
        assert session.runner is not None and session.sandbox is not None
        assert str(ROOT) in session.sandbox.mapping  # git works on a clone, never on this repository
        direct = await session.runner.run(scs, "direct")
        gateway = await session.runner.run(scs, "gateway")
        cov = coverage_matrix(gateway_tools(session.gateway), scs)
    for suite in (direct, gateway):
        failed = {
            r.scenario.id: [f"{c.label}: {c.detail}" for c in r.criteria if not c.ok] for r in suite.runs if not r.ok
        }
        assert not failed, failed
        assert len(suite.ran) == len(scs)
    assert cov.uncovered == [] and len(cov.rows) >= 50, cov.to_dict()["uncovered"]
    assert _head() == head  # the branch scenario did not touch the real repository
    step = gateway.runs[0].steps[0]
    assert step.ms > 0 and gateway.traces[0]["session"]
