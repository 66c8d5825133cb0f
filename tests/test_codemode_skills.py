"""Skills: saved by code in one session, imported in another of the same principal, invisible to
other principals, listed by search_tools beside tools, managed by `mcpopt skills`.

The gateway's own code mode is used (`Gateway.code_mode`), so skills go to the SQLite file in
the tests' private XDG data dir, as they would for a user.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from mcp_types.version import LATEST_HANDSHAKE_VERSION

from conftest import MCPOPT, ROOT, everything_entry, write_config
from mcpopt.api import ClientLink, no_progress
from mcpopt.codemode.skills import SkillError, SkillStore, check_source, rewrite_imports, used_skills
from mcpopt.codemode.tool import CodeModeTool
from mcpopt.config import load_config
from mcpopt.gateway.assembly import build_gateway
from mcpopt.gateway.server import Gateway

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

HAVE_WASM = (ROOT / "node_modules" / "pyodide" / "pyodide.mjs").is_file()
BACKENDS = ["monty", pytest.param("wasm", marks=pytest.mark.skipif(not HAVE_WASM, reason="npm pyodide missing"))]

TOP_ERRORS = '''
def top_errors(lines, n=2):
    """The n most frequent ERROR lines of a log, most frequent first."""
    counts = {}
    for line in lines:
        if "ERROR" in line:
            counts[line] = counts.get(line, 0) + 1
    return sorted(counts, key=lambda k: (-counts[k], k))[:n]
'''


def link(session_id: str, principal: Any = None) -> ClientLink:
    return ClientLink(
        LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: no_progress, session_id=session_id, principal=principal
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("skills-data")


@pytest.fixture(scope="module")
async def gateway(data_dir: Path) -> Any:
    config = load_config(
        data={
            "mcpServers": {"everything": everything_entry()},
            "gateway": {"exposure": "code", "telemetry": {"data_dir": str(data_dir)}},
        }
    )
    gw = build_gateway(config)
    async with gw.running():
        yield gw


def text(result: dict[str, Any]) -> str:
    return "".join(b.get("text", "") for b in result["content"])


async def run(gateway: Gateway, source: str, who: ClientLink, backend: str) -> dict[str, Any]:
    code: CodeModeTool = gateway.code_mode
    return await code.handler({"code": source, "backend": backend}, who)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_skill_saved_in_one_session_is_imported_in_another_of_the_same_principal(
    gateway: Gateway, backend: str
) -> None:
    name = f"top_errors_{backend}"
    source = TOP_ERRORS.replace("top_errors", name)
    saved = await run(gateway, source + f"\nsave_skill({name})", link(f"writer-{backend}"), backend)
    assert not saved.get("isError"), text(saved)
    assert name in text(saved)
    lines = ["ERROR a", "ok", "ERROR b", "ERROR a"]
    use = f"from skills import {name} as top\nimport skills\nprint(top({lines!r}), skills.{name}({lines!r}, 1))"
    # Another client session of the same principal (local) imports it.
    other = await run(gateway, use, link(f"reader-{backend}"), backend)
    assert text(other) == "['ERROR a', 'ERROR b'] ['ERROR a']", text(other)
    # A different principal does not see it, and is told so.
    stranger = await run(gateway, use, link(f"stranger-{backend}", principal="mallory"), backend)
    assert stranger.get("isError"), text(stranger)
    assert f"no skill named {name} for this principal" in text(stranger)
    # The explicit form: a name, the source and a docstring.
    explicit = await run(
        gateway,
        f"save_skill('shout_{backend}', 'def shout_{backend}(s):\\n    return s.upper() + \"!\"', 'Shout a string.')",
        link(f"writer-{backend}"),
        backend,
    )
    assert not explicit.get("isError"), text(explicit)
    shouted = await run(gateway, f"skills.shout_{backend}('hi')", link(f"reader-{backend}"), backend)
    assert text(shouted) in ("'HI!'", "HI!"), text(shouted)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_bad_skills_are_refused_with_a_reason(gateway: Gateway, backend: str) -> None:
    missing = await run(gateway, "save_skill('never_defined')", link(f"bad-{backend}"), backend)
    assert "no top-level function 'never_defined'" in text(missing), text(missing)
    broken = await run(gateway, "save_skill('broken', 'def broken(:\\n  pass')", link(f"bad-{backend}"), backend)
    assert "broken" in text(broken) and ("does not parse" in text(broken) or "SyntaxError" in text(broken))
    found = await run(gateway, "import skills\nskills.broken", link(f"bad-{backend}"), backend)
    assert found.get("isError")


async def test_search_tools_lists_skills_beside_tools(gateway: Gateway) -> None:
    saved = await run(
        gateway,
        TOP_ERRORS.replace("top_errors", "rank_log_errors") + "\nsave_skill(rank_log_errors)",
        link("s1"),
        "monty",
    )
    assert not saved.get("isError"), text(saved)
    found = await gateway.call_tool(
        {"name": "mcpopt__search_tools", "arguments": {"query": "most frequent errors in a log", "k": 5}}, link("s2")
    )
    lines = text(found).splitlines()
    assert any(
        line.startswith("skills.rank_log_errors(lines, n=2) - The n most frequent ERROR lines") for line in lines
    )
    assert any(line.startswith("everything__") for line in lines)  # tools are still listed
    other = await gateway.call_tool(
        {"name": "mcpopt__search_tools", "arguments": {"query": "most frequent errors in a log"}}, link("s3", "mallory")
    )
    assert "rank_log_errors" not in text(other)


def test_the_skills_cli_lists_shows_and_removes(tmp_path: Path) -> None:
    config = write_config(tmp_path / "gw.yaml", {}, {"telemetry": {"data_dir": str(tmp_path / "data")}})
    store = SkillStore(tmp_path / "data" / "skills.db")
    store.save("local", "top_errors", TOP_ERRORS.strip())
    store.save("alice", "hers", "def hers():\n    return 1\n", "Alice's own.")
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MCPOPT, "skills", *args, "-c", str(config)], capture_output=True, text=True, env=env)

    listed = cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [s["name"] for s in json.loads(listed.stdout)] == ["top_errors"]
    every = json.loads(cli("list", "--all", "--json").stdout)
    assert {(s["principal"], s["name"]) for s in every} == {("local", "top_errors"), ("alice", "hers")}
    shown = cli("show", "top_errors")
    assert shown.returncode == 0 and "def top_errors(lines, n=2):" in shown.stdout
    assert cli("show", "hers").returncode == 1  # alice's, not local's
    removed = cli("rm", "top_errors")
    assert removed.returncode == 0 and "removed" in removed.stdout
    assert store.get("local", "top_errors") is None
    gone = cli("rm", "top_errors")
    assert gone.returncode == 1 and "no skill named 'top_errors'" in gone.stderr


def test_skill_sources_are_checked_and_imports_rewritten_in_place() -> None:
    assert check_source("f", "def f(a, *, b=2):\n    'Doc.'\n    return a") == ("f(a, *, b=2)", "Doc.")
    for name, code, why in (
        ("f", "def g():\n    pass", "must define a top-level function 'f'"),
        ("f", "@staticmethod\ndef f():\n    pass", "cannot have decorators"),
        ("1f", "def f(): pass", "must be a Python identifier"),
        ("f", "def f(:", "does not parse"),
    ):
        with pytest.raises(SkillError, match=why):
            check_source(name, code)
    code = "import json, skills\nfrom skills import (a,\n    b as c)\nx = skills.d(1)\n"
    rewritten = rewrite_imports(code)
    assert rewritten.splitlines() == [
        "pass; import json",
        "a = skills.a; c = skills.b",
        "",
        "x = skills.d(1)",
    ]
    assert used_skills(code) == ({"a", "b", "d"}, False)
    assert used_skills("import skills\nhelpers = skills\n")[1] is True
