"""`mcpopt bench workflow`: one workflow call vs the same calls made one by one by a client.

The task (issue 13): 4 independent reads on 4 real servers -- `time__get_current_time`,
`git__git_log` (a scratch repository), `filesystem__list_directory` (a scratch folder),
`memory__search_nodes` -- then 2 dependent writes: `memory__create_entities` (from the time and the
last commit) and `filesystem__write_file` (from the listing and the new entity). Three ways, through
the same `mcpopt serve` process and one SDK `Client` over stdio, alternated call by call after
warm-up, each iteration with its own names:

- `one_by_one`: six `tools/call`s in dependency order, the client building each write's arguments
  from the earlier results (what an agent does with one tool call per model turn);
- `batch_then_writes`: the four reads in one `mcpopt__batch`, then the two writes (3 round trips);
- `workflow`: one call of `workflow__bench` (reads in parallel, then the writes, journaled).

Wall time per iteration: p50 / p95 / p99 (nearest rank) and the ratio of p50s. Tokens (cl100k_base,
offline, `mcpopt.discovery.tokens`): what passes through the model -- each call it writes (tool name
and arguments) and each result it reads -- and what it re-reads when every model turn reads the
conversation so far (turn k reads the calls and results of turns 1..k-1). The model's own thinking
time per turn is not counted (it only widens the gap: one turn instead of six). The workflow
tool's definition is listed once per session; its tokens are reported beside.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from mcp import Client, StdioServerParameters

from mcpopt.bench.overhead import ROOT, SERVERS_PY, percentile
from mcpopt.discovery.tokens import ENCODING, ContextItem, count_context, tools_json

NODE_MODULES = ROOT / "node_modules" / "@modelcontextprotocol"
PATHS = ("one_by_one", "batch_then_writes", "workflow")


def _servers(base: Path) -> dict[str, Any]:
    def node(package: str, *args: str, **extra: Any) -> dict[str, Any]:
        return {"command": "node", "args": [str(NODE_MODULES / package / "dist" / "index.js"), *args], **extra}

    return {
        "time": {"command": str(SERVERS_PY / "mcp-server-time"), "args": ["--local-timezone", "UTC"]},
        "git": {"command": str(SERVERS_PY / "mcp-server-git"), "args": ["--repository", str(base / "repo")]},
        "filesystem": node("server-filesystem", str(base / "folder")),
        # server-memory loses writes under concurrent calls by itself: serialize them.
        "memory": node("server-memory", env={"MEMORY_FILE_PATH": str(base / "memory.jsonl")}, max_concurrency=1),
    }


def _workflow(base: Path) -> dict[str, Any]:
    folder, repo = str(base / "folder"), str(base / "repo")
    return {
        "description": "Record a benchmark run: the time, the last commit, the folder, then an entity and a note",
        "parameters": {"i": {"type": "integer"}},
        "steps": [
            {"id": "now", "tool": "time__get_current_time", "arguments": {"timezone": "UTC"}},
            {"id": "log", "tool": "git__git_log", "arguments": {"repo_path": repo, "max_count": 3}},
            {"id": "files", "tool": "filesystem__list_directory", "arguments": {"path": folder}},
            {"id": "seen", "tool": "memory__search_nodes", "arguments": {"query": "bench-{{params.i}}"}},
            {
                "id": "entity",
                "tool": "memory__create_entities",
                "depends_on": ["seen"],
                "arguments": {
                    "entities": [
                        {
                            "name": "bench-{{params.i}}",
                            "entityType": "run",
                            "observations": [
                                "at {{steps.now.json.datetime}}",
                                "commit {{steps.log.text | re: Commit: ([0-9a-f]+)}}",
                            ],
                        }
                    ]
                },
            },
            {
                "id": "note",
                "tool": "filesystem__write_file",
                "arguments": {
                    "path": f"{folder}/notes/bench-{{{{params.i}}}}.md",
                    "content": "# {{steps.entity.json.0.name}}\n{{steps.files.text}}\n",
                },
            },
        ],
        "output": {"entity": "{{steps.entity.json.0.name}}", "note": "{{steps.note.text}}"},
    }


def _setup(base: Path) -> Path:
    (base / "folder" / "notes").mkdir(parents=True)
    (base / "folder" / "readme.txt").write_text("benchmark folder\n", encoding="utf-8")
    repo = base / "repo"
    repo.mkdir()
    env = {
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@example.org",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@example.org",
        "PATH": "/usr/bin:/bin",
    }
    (repo / "a.txt").write_text("a\n", encoding="utf-8")
    for cmd in (["init", "-q"], ["add", "a.txt"], ["commit", "-q", "-m", "benchmark repository"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True, env=env)
    config = base / "bench.yaml"
    data = {
        "mcpServers": _servers(base),
        "gateway": {
            "data_dir": str(base / "data"),
            "telemetry": {"enabled": False},
            "workflows": {"journal": {"path": str(base / "journal.db")}},
        },
        "workflows": {"bench": _workflow(base)},
    }
    config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return config


def _text(result: Any) -> str:
    return "\n".join(getattr(b, "text", "") for b in result.content)


def _json(result: Any) -> Any:
    """The result's text as JSON, else its structured content (the scenarios' `json` view)."""
    try:
        return json.loads(_text(result))
    except ValueError:
        return result.structured_content


class _Path:
    """One way of doing the task: its calls (for the token ledger) and its wall time."""

    def __init__(self, client: Client, base: Path) -> None:
        self.client = client
        self.base = base
        self.items: list[list[ContextItem]] = []
        """Per model turn: the call it writes and the result it reads."""
        self.steps: dict[str, float] = {}
        """The workflow's own step times (ms), from its result."""

    async def call(self, name: str, arguments: dict[str, Any]) -> Any:
        result = await self.client.call_tool(name, arguments)
        if result.is_error:
            raise RuntimeError(f"bench: {name} failed: {_text(result)[:300]}")
        self.items.append(
            [
                ContextItem.of_json("arguments", name, {"name": name, "arguments": arguments}),
                ContextItem("result", name, _text(result)),
            ]
        )
        return result

    def reads(self, i: int) -> list[tuple[str, dict[str, Any]]]:
        return [
            ("time__get_current_time", {"timezone": "UTC"}),
            ("git__git_log", {"repo_path": str(self.base / "repo"), "max_count": 3}),
            ("filesystem__list_directory", {"path": str(self.base / "folder")}),
            ("memory__search_nodes", {"query": f"bench-{i}"}),
        ]

    async def writes(self, i: int, now: Any, log: str, files: str) -> None:
        import re

        commit = re.search(r"Commit: ([0-9a-f]+)", log)
        entity = {
            "name": f"bench-{i}",
            "entityType": "run",
            "observations": [f"at {now['datetime']}", f"commit {commit.group(1) if commit else ''}"],
        }
        created = await self.call("memory__create_entities", {"entities": [entity]})
        name = _json(created)[0]["name"]
        note = {"path": str(self.base / "folder" / "notes" / f"bench-{i}.md"), "content": f"# {name}\n{files}\n"}
        await self.call("filesystem__write_file", note)

    async def one_by_one(self, i: int) -> None:
        results = [await self.call(name, args) for name, args in self.reads(i)]
        await self.writes(i, _json(results[0]), _text(results[1]), _text(results[2]))

    async def batch_then_writes(self, i: int) -> None:
        calls = [{"name": n, "arguments": a} for n, a in self.reads(i)]
        batch = _json(await self.call("mcpopt__batch", {"calls": calls}))
        texts = ["\n".join(b.get("text", "") for b in r["result"]["content"]) for r in batch["results"]]
        await self.writes(i, json.loads(texts[0]), texts[1], texts[2])

    async def workflow(self, i: int) -> None:
        body = _json(await self.call("workflow__bench", {"i": i}))
        if body.get("status") != "completed":
            raise RuntimeError(f"bench: the workflow did not complete: {json.dumps(body)[:500]}")
        self.steps = {s["id"]: float(s["ms"]) for s in body.get("steps", [])}


def _tokens(turns: list[list[ContextItem]]) -> dict[str, Any]:
    flat = [item for turn in turns for item in turn]
    through = count_context(flat)
    reread = 0
    context = 0
    for turn in turns:
        reread += context  # this turn's model call reads everything before it
        context += count_context(turn)["total"]
    return {
        "round_trips": len(turns),
        "tokens_through_model": through["total"],
        "tokens_written": through["by_kind"].get("arguments", 0),
        "tokens_read": through["by_kind"].get("result", 0),
        "tokens_reread_over_turns": reread + context,
    }


async def bench_workflow(iterations: int = 30, warmup: int = 3) -> dict[str, Any]:
    """Run the benchmark (see the module doc).

    Returns:
        `{iterations, paths: {path: {p50_ms, p95_ms, p99_ms, round_trips, tokens_through_model,
        tokens_written, tokens_read, tokens_reread_over_turns}}, speedup_p50: {path: x},
        workflow_tool_tokens, workflow_steps_p50_ms: {step: ms}, encoding}`.

    Raises:
        RuntimeError: a call failed (the message names it).
    """
    with tempfile.TemporaryDirectory(prefix="mcpopt-bench-workflow-") as tmp:
        base = Path(tmp)
        config = _setup(base)
        params = StdioServerParameters(command=sys.executable, args=["-m", "mcpopt.cli", "serve", "-c", str(config)])
        samples: dict[str, list[float]] = {p: [] for p in PATHS}
        steps: dict[str, list[float]] = {}
        tokens: dict[str, dict[str, Any]] = {}
        async with Client(params, mode="legacy") as client:
            listed = {t.name: t for t in (await client.list_tools()).tools}
            tool_tokens = count_context(
                [ContextItem("tools", "workflow__bench", tools_json([listed["workflow__bench"]]))]
            )
            i = 0
            for round_no in range(warmup + iterations):
                order = PATHS if round_no % 2 == 0 else tuple(reversed(PATHS))
                for path in order:
                    i += 1
                    runner = _Path(client, base)
                    t0 = time.perf_counter()
                    await getattr(runner, path)(i)
                    ms = (time.perf_counter() - t0) * 1000
                    if round_no >= warmup:
                        samples[path].append(ms)
                        tokens.setdefault(path, _tokens(runner.items))
                        for sid, sms in runner.steps.items():
                            steps.setdefault(sid, []).append(sms)
        out: dict[str, Any] = {"iterations": iterations, "warmup": warmup, "encoding": ENCODING, "paths": {}}
        for path in PATHS:
            s = sorted(samples[path])
            out["paths"][path] = {
                "p50_ms": round(percentile(s, 50), 3),
                "p95_ms": round(percentile(s, 95), 3),
                "p99_ms": round(percentile(s, 99), 3),
                **tokens[path],
            }
        wf = out["paths"]["workflow"]["p50_ms"]
        out["speedup_p50"] = {p: round(out["paths"][p]["p50_ms"] / wf, 2) for p in PATHS if p != "workflow"}
        out["workflow_tool_tokens"] = tool_tokens["total"]
        # Inside the workflow: each step's time; the reads run together, so the slowest read plus the two
        # writes is its critical path (what parallelism cannot go below).
        out["workflow_steps_p50_ms"] = {sid: round(percentile(sorted(v), 50), 3) for sid, v in steps.items()}
        return out


def print_report(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"6-step task (4 independent reads, 2 dependent writes), {data['iterations']} iterations per path")
    cols = ("path", "p50 ms", "p95 ms", "p99 ms", "round trips", "tokens via model", "re-read over turns")
    for col in cols:
        t.add_column(col, justify="left" if col == "path" else "right")
    for path, row in data["paths"].items():
        t.add_row(
            path,
            f"{row['p50_ms']:.2f}",
            f"{row['p95_ms']:.2f}",
            f"{row['p99_ms']:.2f}",
            str(row["round_trips"]),
            f"{row['tokens_through_model']:,}",
            f"{row['tokens_reread_over_turns']:,}",
        )
    console.print(t)
    speed = ", ".join(f"{p} / workflow = {x:.2f}x" for p, x in data["speedup_p50"].items())
    console.print(
        f"p50 wall time: {speed}; the workflow tool's listing costs {data['workflow_tool_tokens']} tokens once"
    )
    inside = ", ".join(f"{sid} {ms:.1f}" for sid, ms in data["workflow_steps_p50_ms"].items())
    console.print(f"inside the workflow, p50 ms per step: {inside} (the reads together, then entity, then note)")
