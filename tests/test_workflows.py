"""Workflows on real servers (mcp-server-time, mcp-server-git, server-filesystem, server-memory):
parallel reads and dependent writes, sagas that leave memory's file and the folder as they were,
`for_each` caps, refusals, retries only where repeating is safe, fan-out to servers and replicas,
`when`, `on_failure`, progress, and the journal's record of every step.

Parallelism and caps are proven by behaviour, never by timing: a probe filter in the gateway's
pipeline holds calls until N of them are in flight at once (`Gate`); a sequential engine would
never fill it (the probe times out), one that ignores a cap overfills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError

from conftest import git_entry, memory_entry, node_entry, time_entry
from mcpopt.api import ClientLink, no_progress
from mcpopt.config import load_config
from mcpopt.errors import ConfigError
from mcpopt.gateway.assembly import build_gateway
from mcpopt.gateway.server import Gateway
from mcpopt.pipeline import Next, ToolCall, ToolResult
from mcpopt.workflows.service import WorkflowService

pytestmark = pytest.mark.anyio
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def ledger_entry(ledger: Path, **extra: Any) -> dict[str, Any]:
    env = {"LEDGER_FILE": str(ledger), **extra.pop("env", {})}
    return {"command": sys.executable, "args": [str(FIXTURES / "ledger_server.py")], "env": env, **extra}


def link(session: str = "t", partition: str = "") -> ClientLink:
    return ClientLink("2025-06-18", None, None, None, lambda _t: no_progress, partition=partition, session_id=session)


@contextlib.asynccontextmanager
async def serving(data: dict[str, Any]) -> AsyncIterator[tuple[Gateway, WorkflowService]]:
    """A gateway with workflows; each test has a journal of its own (no run resumed across tests)."""
    data = copy.deepcopy(data)
    journal = data.setdefault("gateway", {}).setdefault("workflows", {}).setdefault("journal", {})
    journal.setdefault("path", str(Path(tempfile.mkdtemp(prefix="wf-journal-")) / "journal.db"))
    gw = build_gateway(load_config(data=data))
    async with gw.running():
        svc = gw.workflows
        assert svc is not None
        yield gw, svc


async def run_tool(gw: Gateway, name: str, args: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    result = await gw.call_tool({"name": name, "arguments": args or {}}, link(**kw))
    body = result.get("structuredContent") or json.loads(result["content"][0]["text"])
    assert isinstance(body, dict)
    return body


class Gate:
    """A pipeline filter holding calls to `tools` until `n` are in flight together (then all go on).

    `max` is the most calls to those tools ever in flight at once. A caller that never has `n`
    calls in flight makes the probe time out (the test fails); one that has more overfills it.
    """

    def __init__(self, tools: set[str], n: int, timeout_s: float = 30.0) -> None:
        self.tools = tools
        self.barrier = asyncio.Barrier(n)
        self.timeout_s = timeout_s
        self.inflight = 0
        self.max = 0
        self.seen = 0

    async def __call__(self, call: ToolCall, next: Next) -> ToolResult:
        if call.name not in self.tools:
            return await next(call)
        self.inflight += 1
        self.seen += 1
        self.max = max(self.max, self.inflight)
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.barrier.wait()
            return await next(call)
        finally:
            self.inflight -= 1


def probe(gw: Gateway, gate: Gate) -> None:
    gw.pipeline.set_filters([*gw.pipeline.filters, gate])


def git_head(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A scratch git repository with one commit."""
    path = tmp_path / "repo"
    path.mkdir()
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
        "PATH": "/usr/bin:/bin",
    }
    (path / "README.md").write_text("scratch\n", encoding="utf-8")
    for cmd in (["init", "-q"], ["add", "README.md"], ["commit", "-q", "-m", "first commit"]):
        subprocess.run(["git", "-C", str(path), *cmd], check=True, env=env)
    return path


def servers(tmp_path: Path, repo: Path, folder: Path, trash: Path | None = None) -> dict[str, Any]:
    fs = node_entry("server-filesystem", str(folder), *([str(trash)] if trash else []))
    return {
        "time": time_entry(),
        "git": git_entry(repo),
        "filesystem": fs,
        # server-memory loses writes under concurrent calls by itself: serialize them.
        "memory": {**memory_entry(tmp_path / "memory.jsonl"), "max_concurrency": 1},
    }


# ---- parallel reads, dependent writes ---------------------------------------------------------------
async def test_parallel_reads_then_dependent_writes_give_the_right_output(tmp_path: Path, repo: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("old notes\n", encoding="utf-8")
    onboard = {
        "description": "Record a new member and write their page",
        "parameters": {"user": {"type": "string"}, "folder": {"type": "string"}},
        "steps": [
            {"id": "now", "tool": "time__get_current_time", "arguments": {"timezone": "UTC"}},
            {
                "id": "tokyo",
                "tool": "time__convert_time",
                "arguments": {"source_timezone": "UTC", "time": "09:00", "target_timezone": "Asia/Tokyo"},
            },
            {"id": "log", "tool": "git__git_log", "arguments": {"repo_path": str(repo), "max_count": 1}},
            {"id": "files", "tool": "filesystem__list_directory", "arguments": {"path": "{{params.folder}}"}},
            {
                "id": "person",
                "tool": "memory__create_entities",
                "arguments": {
                    "entities": [
                        {
                            "name": "{{params.user}}",
                            "entityType": "person",
                            "observations": [
                                "joined {{steps.now.json.datetime}}",
                                "commit {{steps.log.text | re: Commit: ([0-9a-f]+)}}",
                            ],
                        }
                    ]
                },
            },
            {
                "id": "page",
                "tool": "filesystem__write_file",
                "depends_on": ["person"],
                "arguments": {
                    "path": "{{params.folder}}/{{params.user}}.md",
                    "content": "# {{params.user}}\ntokyo {{steps.tokyo.json.target.datetime}}\n{{steps.files.text}}\n",
                },
            },
        ],
        "output": {
            "joined": "{{steps.now.json.datetime}}",
            "commit": "{{steps.log.text | re: Commit: ([0-9a-f]+)}}",
            "person": "{{steps.person.json.0.name}}",
            "page": "{{steps.page.text}}",
        },
    }
    data = {"mcpServers": servers(tmp_path, repo, folder), "workflows": {"onboard": onboard}}
    async with serving(data) as (gw, svc):
        tool = next(t for t in gw.own.tools if t.name == "workflow__onboard")
        assert tool.input_schema["required"] == ["user", "folder"]
        assert tool.annotations is not None and tool.annotations.read_only_hint is False
        reads = {"time__get_current_time", "time__convert_time", "git__git_log", "filesystem__list_directory"}
        gate = Gate(reads, 4)
        probe(gw, gate)
        body = await run_tool(gw, "workflow__onboard", {"user": "ada", "folder": str(folder)})
        assert body["status"] == "completed", body
        assert gate.max == 4 and gate.seen == 4  # the four independent reads were in flight together
        out = body["output"]
        head = git_head(repo)
        assert out["commit"] == head.strip()
        assert out["person"] == "ada" and "Successfully wrote" in out["page"]
        memory = (tmp_path / "memory.jsonl").read_text(encoding="utf-8")
        assert f"joined {out['joined']}" in memory and head.strip() in memory
        page = (folder / "ada.md").read_text(encoding="utf-8")
        assert page.startswith("# ada\ntokyo ") and "18:00:00+09:00" in page and "notes.txt" in page
        # The journal has every step, and each write started only after what it depends on finished:
        # `person` reads `now` and `log` (its templates), `page` depends on `person` and reads `tokyo`
        # and `files`. (`files` may still be in flight when `person` starts: nothing orders those two.)
        events = await svc.require_journal().events(body["run_id"])  # noqa: SLF001
        seq = {(e.kind, e.step): e.seq for e in events}
        waits = {"person": {"now", "log"}, "page": {"person", "tokyo", "files"}}
        plan = gw.config.workflows["onboard"].dependencies()
        assert {sid: plan[sid] for sid in waits} == waits
        for write, before in waits.items():
            for dep in before:
                assert seq[("step_succeeded", dep)] < seq[("step_started", write)], (dep, write, events)
        assert {e.step for e in events if e.kind == "step_succeeded"} == {s["id"] for s in onboard["steps"]}
        starts = [e for e in events if e.kind == "step_started"]
        assert all(e.data["idempotency_key"] for e in starts if e.step in ("person", "page"))
        assert not any(e.data["idempotency_key"] for e in starts if e.step in ("now", "log"))


# ---- sagas -------------------------------------------------------------------------------------------
def publish(folder: Path, trash: Path, last: dict[str, Any]) -> dict[str, Any]:
    return {
        "parameters": {"user": {"type": "string"}},
        "on_failure": "compensate",
        "steps": [
            {"id": "before", "tool": "filesystem__read_text_file", "arguments": {"path": str(folder / "notes.txt")}},
            {"id": "now", "tool": "time__get_current_time", "arguments": {"timezone": "UTC"}},
            {
                "id": "person",
                "tool": "memory__create_entities",
                "arguments": {"entities": [{"name": "{{params.user}}", "entityType": "person", "observations": []}]},
                "compensate": {
                    "tool": "memory__delete_entities",
                    "arguments": {"entityNames": ["{{self.arguments.entities.0.name}}"]},
                },
            },
            {
                "id": "touch",
                "tool": "memory__add_observations",
                "depends_on": ["person"],
                "arguments": {"observations": [{"entityName": "existing", "contents": ["seen {{run.id}}"]}]},
                "compensate": {
                    "tool": "memory__delete_observations",
                    "arguments": {"deletions": [{"entityName": "existing", "observations": ["seen {{run.id}}"]}]},
                },
            },
            {
                "id": "edit",
                "tool": "filesystem__write_file",
                "arguments": {"path": str(folder / "notes.txt"), "content": "edited at {{steps.now.json.datetime}}\n"},
                "compensate": {
                    "tool": "filesystem__write_file",
                    "arguments": {"path": "{{self.arguments.path}}", "content": "{{steps.before.text}}"},
                },
            },
            {
                "id": "page",
                "tool": "filesystem__write_file",
                "arguments": {"path": str(folder / "{{params.user}}.md"), "content": "# {{params.user}}\n"},
                "compensate": {
                    # server-filesystem has no delete: the new file goes to a trash folder outside the folder.
                    "tool": "filesystem__move_file",
                    "arguments": {"source": "{{self.arguments.path}}", "destination": f"{trash}/{{{{run.id}}}}.md"},
                },
            },
            {"id": "last", "depends_on": ["touch", "edit", "page"], **last},
        ],
    }


async def seed_memory(gw: Gateway) -> None:
    await gw.call_tool(
        {
            "name": "memory__create_entities",
            "arguments": {"entities": [{"name": "existing", "entityType": "thing", "observations": ["kept"]}]},
        },
        link(),
    )


async def test_a_failing_last_step_undoes_everything_in_reverse_order(tmp_path: Path, repo: Path) -> None:
    folder, trash = tmp_path / "folder", tmp_path / "trash"
    folder.mkdir()
    trash.mkdir()
    (folder / "notes.txt").write_text("the notes as they were\n", encoding="utf-8")
    failing = {"tool": "time__get_current_time", "arguments": {"timezone": "Not/AZone"}}
    data = {
        "mcpServers": servers(tmp_path, repo, folder, trash),
        "workflows": {"publish": publish(folder, trash, failing)},
    }
    async with serving(data) as (gw, svc):
        await seed_memory(gw)
        memory_before = (tmp_path / "memory.jsonl").read_bytes()
        folder_before = snapshot(folder)
        body = await run_tool(gw, "workflow__publish", {"user": "grace"})
        assert body["status"] == "compensated", body
        assert body["failed"][0]["step"] == "last" and "Invalid timezone" in body["failed"][0]["error"]
        undone = [c["step"] for c in body["compensated"]]
        assert sorted(undone) == ["edit", "page", "person", "touch"]
        assert undone.index("touch") < undone.index("person")  # reverse order of completion
        assert "compensation_failed" not in body and "in_doubt" not in body
        assert (tmp_path / "memory.jsonl").read_bytes() == memory_before
        assert snapshot(folder) == folder_before
        assert len(list(trash.iterdir())) == 1  # the new page, moved out of the folder
        # The journal holds each compensation's start and result, newest first, after the failure.
        events = await svc.require_journal().events(body["run_id"])  # noqa: SLF001
        kinds = [(e.kind, e.step) for e in events if e.kind.startswith("comp_")]
        assert [k for k, _ in kinds] == ["comp_started", "comp_succeeded"] * 4
        info = await svc.require_journal().get(body["run_id"])  # noqa: SLF001
        assert info is not None and info.status == "compensated"


async def test_abort_keeps_completed_writes_and_continue_runs_what_does_not_depend_on_the_failure(
    tmp_path: Path, repo: Path
) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    steps = [
        {"id": "w1", "tool": "filesystem__write_file", "arguments": {"path": str(folder / "a.txt"), "content": "a"}},
        {"id": "bad", "depends_on": ["w1"], "tool": "time__get_current_time", "arguments": {"timezone": "Nope/No"}},
        {"id": "after_bad", "tool": "time__get_current_time", "arguments": {"timezone": "{{steps.bad.json.timezone}}"}},
        {
            "id": "other",
            "depends_on": ["w1"],
            "tool": "filesystem__write_file",
            "arguments": {"path": str(folder / "b.txt"), "content": "b"},
        },
    ]
    data = {
        "mcpServers": servers(tmp_path, repo, folder),
        "workflows": {
            "cont": {"on_failure": "continue", "steps": steps},
            "stop": {"on_failure": "abort", "steps": [steps[0], steps[1], {**steps[3], "depends_on": ["bad"]}]},
        },
    }
    async with serving(data) as (gw, _svc):
        body = await run_tool(gw, "workflow__cont")
        assert body["status"] == "completed_with_errors"
        status = {s["id"]: s["status"] for s in body["steps"]}
        assert status == {"w1": "succeeded", "bad": "failed", "after_bad": "blocked", "other": "succeeded"}
        assert (folder / "b.txt").read_text() == "b"
        (folder / "b.txt").unlink()
        body = await run_tool(gw, "workflow__stop")
        assert body["status"] == "failed" and "compensated" not in body
        assert {s["id"]: s["status"] for s in body["steps"]}["other"] == "not_run"
        assert (folder / "a.txt").exists() and not (folder / "b.txt").exists()


# ---- for_each --------------------------------------------------------------------------------------
async def test_for_each_over_50_items_respects_its_cap(tmp_path: Path, repo: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    wf = {
        "parameters": {"hours": {"type": "array", "items": {"type": "integer"}}},
        "max_parallel": 32,
        "steps": [
            {
                "id": "convert",
                "for_each": "{{params.hours}}",
                "as": "hour",
                "concurrency": 5,
                "tool": "time__convert_time",
                "arguments": {"source_timezone": "UTC", "time": "{{hour}}:30", "target_timezone": "Asia/Kolkata"},
            }
        ],
        "output": "{{steps.convert.json | jsonpath: $[*].target.datetime}}",
    }
    data = {"mcpServers": servers(tmp_path, repo, folder), "workflows": {"convert": wf}}
    hours = [f"{h % 24:02d}" for h in range(50)]
    async with serving(data) as (gw, _svc):
        gate = Gate({"time__convert_time"}, 5)
        probe(gw, gate)
        body = await run_tool(gw, "workflow__convert", {"hours": [int(h) for h in hours]})
        assert body["status"] == "completed", body
        assert gate.seen == 50 and gate.max == 5
        assert body["steps"][0]["items"] == 50 and body["steps"][0]["items_succeeded"] == 50
        # 30 minutes past each UTC hour is hh+5:30+0:30 in Kolkata: one answer per item, in item order.
        expected = [f"{(int(h) + 6) % 24:02d}:00:00+05:30" for h in hours]
        assert [d[11:] for d in body["output"]] == expected


async def test_for_each_over_the_limit_fails_cleanly(tmp_path: Path, repo: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    wf = {
        "parameters": {"n": {"type": "array"}},
        "steps": [
            {
                "id": "each",
                "for_each": "{{params.n}}",
                "tool": "time__get_current_time",
                "arguments": {"timezone": "UTC"},
            }
        ],
    }
    data = {
        "mcpServers": servers(tmp_path, repo, folder),
        "workflows": {"many": wf},
        "gateway": {"workflows": {"max_items": 10}},
    }
    async with serving(data) as (gw, _svc):
        body = await run_tool(gw, "workflow__many", {"n": list(range(11))})
        assert body["status"] == "compensated" and "more than the limit (10" in body["error"]


# ---- refusals ----------------------------------------------------------------------------------------
async def test_a_refused_step_fails_the_workflow_cleanly(tmp_path: Path, repo: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    person = {
        "id": "person",
        "tool": "memory__create_entities",
        "arguments": {"entities": [{"name": "eve", "entityType": "person", "observations": []}]},
        "compensate": {"tool": "memory__delete_entities", "arguments": {"entityNames": ["eve"]}},
    }
    data = {
        "mcpServers": servers(tmp_path, repo, folder),
        "workflows": {
            # a tool the gateway does not serve: refused before any step runs
            "unknown": {"steps": [person, {"id": "x", "depends_on": ["person"], "tool": "nosuch__tool"}]},
            # refused by the gateway when called (bad arguments): the write before it is undone
            "refused": {
                "steps": [
                    person,
                    {"id": "x", "depends_on": ["person"], "tool": "mcpopt__batch", "arguments": {"calls": []}},
                ]
            },
        },
    }
    async with serving(data) as (gw, _svc):
        await seed_memory(gw)
        before = (tmp_path / "memory.jsonl").read_bytes()
        with pytest.raises(MCPError) as refused:
            await gw.call_tool({"name": "workflow__unknown", "arguments": {}}, link())
        assert refused.value.error.code == -32602 and "does not serve: x: nosuch__tool" in refused.value.error.message
        assert (tmp_path / "memory.jsonl").read_bytes() == before
        body = await run_tool(gw, "workflow__refused")
        assert body["status"] == "compensated"
        assert body["failed"] == [
            {
                "step": "x",
                "item": "",
                "error": "error -32602: batch: 'calls' must be a non-empty list",
                "in_doubt": False,
            }
        ]
        assert [c["step"] for c in body["compensated"]] == ["person"]
        assert (tmp_path / "memory.jsonl").read_bytes() == before
        assert "Traceback" not in json.dumps(body)


async def test_bad_arguments_are_rejected_with_every_problem(tmp_path: Path, repo: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    wf = {
        "parameters": {"user": {"type": "string", "minLength": 2}, "n": {"type": "integer", "default": 3}},
        "steps": [{"id": "t", "tool": "time__get_current_time", "arguments": {"timezone": "UTC"}}],
    }
    async with serving({"mcpServers": servers(tmp_path, repo, folder), "workflows": {"w": wf}}) as (gw, _svc):
        with pytest.raises(MCPError) as bad:
            await gw.call_tool({"name": "workflow__w", "arguments": {"user": "x", "n": "many", "extra": 1}}, link())
        msg = bad.value.error.message
        assert bad.value.error.code == -32602
        assert "user: 'x' is too short" in msg and "n: 'many' is not of type 'integer'" in msg and "extra" in msg


# ---- retries, when, fan-out ----------------------------------------------------------------------------
async def test_retries_are_made_only_when_repeating_is_safe(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    wf = {
        "on_failure": "continue",
        "steps": [
            {
                "id": "read",
                "tool": "ledger__flaky",
                "arguments": {"key": "r", "fails": 2},
                "retries": 3,
                "retry_backoff_ms": 1,
            },
            {"id": "write", "tool": "ledger__flaky_write", "arguments": {"key": "w", "fails": 1}, "retries": 3},
        ],
    }
    async with serving({"mcpServers": {"ledger": ledger_entry(ledger)}, "workflows": {"flaky": wf}}) as (gw, _svc):
        body = await run_tool(gw, "workflow__flaky")
        steps = {s["id"]: s for s in body["steps"]}
        assert steps["read"]["status"] == "succeeded" and steps["read"]["calls"] == 3
        assert steps["write"]["status"] == "failed" and steps["write"].get("calls", 1) == 1
        calls = (tmp_path / "ledger.flaky").read_text().split()
        assert calls.count("r") == 3 and calls.count("w") == 1


async def test_when_skips_steps_by_template_or_criterion(tmp_path: Path, repo: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    wf = {
        "parameters": {"tz": {"type": "string"}, "shout": {"type": "boolean", "default": False}},
        "steps": [
            {"id": "now", "tool": "time__get_current_time", "arguments": {"timezone": "{{params.tz}}"}},
            {
                "id": "loud",
                "when": "{{params.shout}}",
                "tool": "time__get_current_time",
                "arguments": {"timezone": "UTC"},
            },
            {
                "id": "tokyo_only",
                "when": "{{steps.now.json.timezone}} == Asia/Tokyo",
                "tool": "time__get_current_time",
                "arguments": {"timezone": "UTC"},
            },
            {
                "id": "dst",
                "when": {"step": "now", "path": "json.is_dst", "equals": False},
                "tool": "time__get_current_time",
                "arguments": {"timezone": "UTC"},
            },
        ],
    }
    async with serving({"mcpServers": servers(tmp_path, repo, folder), "workflows": {"w": wf}}) as (gw, _svc):
        body = await run_tool(gw, "workflow__w", {"tz": "Asia/Tokyo"})
        status = {s["id"]: s["status"] for s in body["steps"]}
        assert status == {"now": "succeeded", "loud": "skipped", "tokyo_only": "succeeded", "dst": "succeeded"}
        body = await run_tool(gw, "workflow__w", {"tz": "UTC", "shout": True})
        status = {s["id"]: s["status"] for s in body["steps"]}
        assert status == {"now": "succeeded", "loud": "succeeded", "tokyo_only": "skipped", "dst": "succeeded"}


async def test_fanout_to_servers_and_to_every_replica(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    data = {
        "mcpServers": {
            "time": time_entry(),
            "time_eu": {**time_entry(), "args": ["--local-timezone", "Europe/Paris"]},
            "ledger": ledger_entry(ledger, replicas=3),
        },
        "workflows": {
            "clocks": {
                "steps": [
                    {
                        "id": "all",
                        "fanout": {"servers": ["time", "time_eu"], "tool": "get_current_time"},
                        "arguments": {"timezone": "UTC"},
                    },
                    {"id": "pids", "fanout": {"replicas": "ledger", "tool": "pid", "gather": "quorum", "quorum": 3}},
                ],
                "output": {"sources": "{{steps.all.sources}}", "pids": "{{steps.pids.results}}"},
            }
        },
    }
    async with serving(data) as (gw, _svc):
        body = await run_tool(gw, "workflow__clocks")
        assert body["status"] == "completed", body
        assert body["output"]["sources"] == ["time", "time_eu"]
        pids = body["output"]["pids"]
        assert [p["source"] for p in pids] == ["ledger#1", "ledger#2", "ledger#3"]
        got = [p["json"]["pid"] for p in pids]
        assert len(set(got)) == 3  # each replica answered its own call
        # The same through mcpopt__fanout: first answer wins, labelled with its replica.
        first = await run_tool(gw, "mcpopt__fanout", {"replicas": "ledger", "tool": "pid", "gather": "first"})
        assert first["ok"] and first["winner"] in ("ledger#1", "ledger#2", "ledger#3")
        assert first["results"][int(first["winner"][-1]) - 1]["json"]["pid"] in got
        again = await run_tool(gw, "mcpopt__fanout", {"replicas": "ledger", "tool": "pid"})
        assert [r["json"]["pid"] for r in again["results"]] == got  # pinned: replica k is always replica k
        with pytest.raises(MCPError) as bad:
            await gw.call_tool(
                {"name": "mcpopt__fanout", "arguments": {"servers": ["time", "nope"], "tool": "x"}}, link()
            )
        assert bad.value.error.message.startswith("fanout: MCP server 'time' does not serve a tool 'x'; unknown MCP")


async def test_progress_is_reported_per_step(tmp_path: Path, repo: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    wf = {
        "steps": [
            {"id": "a", "tool": "time__get_current_time", "arguments": {"timezone": "UTC"}},
            {"id": "b", "tool": "time__get_current_time", "arguments": {"timezone": "{{steps.a.json.timezone}}"}},
        ]
    }
    async with serving({"mcpServers": servers(tmp_path, repo, folder), "workflows": {"w": wf}}) as (_gw, svc):
        seen: list[tuple[float, float | None, str | None]] = []

        async def progress(done: float, total: float | None, message: str | None) -> None:
            seen.append((done, total, message))

        result = await svc.run(svc.definitions["w"], {}, link(), progress)
        assert result["status"] == "completed"
        assert seen == [
            (1.0, 2.0, "step a succeeded"),
            (2.0, 2.0, "step b succeeded"),
            (2.0, 2.0, "workflow w: completed"),
        ]


# ---- config ---------------------------------------------------------------------------------------------
def test_bad_workflows_in_the_config_name_every_problem(tmp_path: Path) -> None:
    bad = {
        "parameters": {"user": {"type": "string"}},
        "steps": [
            {"id": "a", "tool": "x__y", "arguments": {"v": "{{params.nope}}"}},
            {"id": "a", "tool": "x__z"},
            {"id": "b", "arguments": {"v": "{{steps.c.text}}"}},
            {"id": "c", "tool": "x__w", "depends_on": ["b", "ghost"]},
        ],
    }
    with pytest.raises(ConfigError) as exc:
        load_config(data={"mcpServers": {}, "workflows": {"bad": bad}})
    msg = str(exc.value)
    assert "key 'workflows.bad'" in msg
    for part in (
        "params.nope",
        "step id 'a' is used twice",
        "give either 'tool' or 'fanout'",
        "depends_on 'ghost'",
        "dependency cycle: b -> c -> b",
    ):
        assert part in msg, part
    with pytest.raises(ConfigError) as exc:
        load_config(
            data={
                "mcpServers": {},
                "workflows": {
                    "loop": {
                        "steps": [
                            {"id": "a", "tool": "t", "arguments": {"x": "{{steps.b.text}}"}},
                            {"id": "b", "tool": "t", "arguments": {"x": "{{steps.a.text}}"}},
                        ]
                    }
                },
            }
        )
    assert "dependency cycle: a -> b -> a" in str(exc.value)


def test_workflow_files_are_loaded_and_their_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "wf").mkdir()
    (tmp_path / "wf" / "ok.yaml").write_text(
        "name: hello\nsteps:\n  - {id: t, tool: time__get_current_time, arguments: {timezone: UTC}}\n", encoding="utf-8"
    )
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("mcpServers: {}\ngateway: {workflows: {files: [wf/*.yaml]}}\n", encoding="utf-8")
    cfg = load_config(cfg_file)
    assert list(cfg.workflows) == ["hello"] and cfg.workflows["hello"].source.endswith("ok.yaml")
    (tmp_path / "wf" / "bad.yaml").write_text("workflows: {oops: {steps: [{id: s}]}}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg_file)
    assert "bad.yaml" in str(exc.value) and "oops" in str(exc.value) and "gateway.workflows.files[0]" in str(exc.value)


# ---- cancellation -------------------------------------------------------------------------------------
async def until(check: Any, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():
            await asyncio.sleep(0.02)


async def test_cancelling_stops_new_steps_lets_calls_finish_then_compensates(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    gate1, gate2 = tmp_path / "gate1", tmp_path / "gate2"

    def wf(gate: Path) -> dict[str, Any]:
        return {
            "steps": [
                {
                    "id": "w1",
                    "tool": "ledger__record",
                    "arguments": {"id": f"w1-{gate.name}"},
                    "compensate": {"tool": "ledger__undo", "arguments": {"id": f"w1-{gate.name}"}},
                },
                {"id": "hold", "depends_on": ["w1"], "tool": "ledger__wait", "arguments": {"gate": str(gate)}},
                {"id": "w2", "depends_on": ["hold"], "tool": "ledger__record", "arguments": {"id": "w2"}},
            ]
        }

    data = {
        "mcpServers": {"ledger": ledger_entry(ledger)},
        "workflows": {"one": wf(gate1), "two": wf(gate2)},
        "gateway": {"workflows": {"lease_ms": 1000}},
    }
    async with serving(data) as (_gw, svc):
        journal = svc.require_journal()

        async def holding(run_id: str) -> bool:
            return any(e.kind == "step_started" and e.step == "hold" for e in await journal.events(run_id))

        # 1. through the journal, as `mcpopt workflows cancel` does from another process
        run, task = await svc.start_run(svc.definitions["one"], {}, link())
        await until(lambda: holding(run.run_id))
        assert await journal.request_cancel(run.run_id)

        async def stopping() -> bool:
            return run.stopping

        await until(stopping)  # seen at the next lease renewal
        gate1.touch()  # the read in flight finishes; nothing new starts
        result = await task
        assert result["status"] == "compensated" and result["cancelled"] is True
        assert result["not_run"] == ["w2"] and "mcpopt workflows cancel" in result["error"]
        # 2. the client cancels its call: the run stops the same way
        call = asyncio.create_task(svc.run(svc.definitions["two"], {}, link()))

        async def second_holding() -> bool:
            runs = await journal.runs(workflow="two")
            return bool(runs) and await holding(runs[0].run_id)

        await until(second_holding)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        gate2.touch()
        second = (await journal.runs(workflow="two"))[0].run_id

        async def finished() -> bool:
            info = await journal.get(second)
            return info is not None and info.status == "compensated"

        await until(finished)
    lines = [" ".join(line.split()[:2]) for line in ledger.read_text().splitlines()]
    assert lines == ["record w1-gate1", "undo w1-gate1", "record w1-gate2", "undo w1-gate2"]


def test_the_example_workflows_load() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "workflows.yaml")
    assert set(cfg.workflows) == {"standup", "clocks"}
    standup = cfg.workflows["standup"]
    assert standup.dependencies()["remember"] == {"now", "log", "notes"}
    assert standup.input_schema()["properties"]["commits"] == {
        "type": "integer",
        "description": "how many recent commits",
        "default": 3,
    }


async def test_a_clean_stop_leaves_the_run_to_the_next_start(tmp_path: Path) -> None:
    ledger, gate = tmp_path / "ledger", tmp_path / "gate"
    wf = {
        "steps": [
            {"id": "w1", "tool": "ledger__record", "arguments": {"id": "w1"}},
            {"id": "hold", "depends_on": ["w1"], "tool": "ledger__wait", "arguments": {"gate": str(gate)}},
            {"id": "w2", "depends_on": ["hold"], "tool": "ledger__record", "arguments": {"id": "w2"}},
        ]
    }
    data = {
        "mcpServers": {"ledger": ledger_entry(ledger)},
        "workflows": {"w": wf},
        "gateway": {"workflows": {"journal": {"path": str(tmp_path / "journal.db")}}},
    }
    async with serving(data) as (_gw, svc):
        journal = svc.require_journal()
        run, task = await svc.start_run(svc.definitions["w"], {}, link())

        async def holding() -> bool:
            return any(e.kind == "step_started" and e.step == "hold" for e in await journal.events(run.run_id))

        await until(holding)
        gate.touch()  # the call in flight may finish during the stop; nothing new starts
    suspended = await task
    assert suspended["status"] == "running" and "resumes" in suspended["error"]
    async with serving(data) as (_gw, svc):

        async def done() -> bool:
            info = await svc.require_journal().get(run.run_id)
            return info is not None and info.status == "completed"

        await until(done)
        events = await svc.require_journal().events(run.run_id)
    assert [" ".join(line.split()[:2]) for line in ledger.read_text().splitlines()] == ["record w1", "record w2"]
    assert sum(e.kind == "step_started" and e.step == "w1" for e in events) == 1
    assert sum(e.kind == "step_started" and e.step == "hold" for e in events) == 1  # it finished during the stop
