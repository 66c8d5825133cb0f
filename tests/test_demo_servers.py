"""Every server of the demo (time, git, everything, filesystem, memory) through one stdio gateway."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from mcp import MCPError

from conftest import ROOT, text_of

pytestmark = pytest.mark.anyio

SERVERS = ("time", "git", "everything", "filesystem", "memory")


async def test_tools_are_namespaced(demo_client: Any) -> None:
    names = {t.name for t in (await demo_client.list_tools()).tools}
    for server in SERVERS:
        assert any(n.startswith(f"{server}__") for n in names), f"no tool of {server}: {sorted(names)}"
    assert {
        "time__get_current_time",
        "git__git_status",
        "everything__echo",
        "filesystem__read_text_file",
        "memory__read_graph",
    } <= names
    assert all("__" in n for n in names)


async def test_time(demo_client: Any) -> None:
    result = await demo_client.call_tool("time__get_current_time", {"timezone": "UTC"})
    assert not result.is_error
    assert "UTC" in text_of(result)


def _status_head() -> str:
    """The first line of `git status` for this repository: "On branch main", or "HEAD detached at
    <sha>" in a checkout at a commit (CI, `git worktree add`), which says no "branch"."""
    proc = subprocess.run(["git", "-C", str(ROOT), "status"], capture_output=True, text=True, check=True, timeout=60)
    return proc.stdout.splitlines()[0]


async def test_git_status(demo_client: Any) -> None:
    result = await demo_client.call_tool("git__git_status", {"repo_path": str(ROOT)})
    assert not result.is_error, text_of(result)
    head = _status_head()  # what git itself says of the checkout
    assert head.startswith(("On branch", "HEAD detached")), head
    assert head in text_of(result), text_of(result)


async def test_everything_echo(demo_client: Any) -> None:
    result = await demo_client.call_tool("everything__echo", {"message": "hi through mcpopt"})
    assert not result.is_error
    assert "hi through mcpopt" in text_of(result)


async def test_filesystem(demo_client: Any, demo_dir: Path) -> None:
    sample = demo_dir / "sample"
    listing = await demo_client.call_tool("filesystem__list_directory", {"path": str(sample)})
    assert "notes.txt" in text_of(listing)
    read = await demo_client.call_tool("filesystem__read_text_file", {"path": str(sample / "notes.txt")})
    assert not read.is_error, text_of(read)
    assert "hello from the sample folder" in text_of(read)


async def test_memory(demo_client: Any, demo_dir: Path) -> None:
    entity = {"name": "mcpopt-test", "entityType": "project", "observations": ["tested"]}
    created = await demo_client.call_tool("memory__create_entities", {"entities": [entity]})
    assert not created.is_error, text_of(created)
    graph = await demo_client.call_tool("memory__read_graph", {})
    assert "mcpopt-test" in text_of(graph)
    assert "mcpopt-test" in (demo_dir / "memory.jsonl").read_text()


async def test_everything_resource(demo_client: Any) -> None:
    every = (await demo_client.list_resources()).resources
    uris = [str(r.uri) for r in every]
    assert all(re.match(r"^(everything|memory|time|git|filesystem)\+", u) for u in uris), uris
    resources = [r for r in every if str(r.uri).startswith("everything+")]
    assert resources, "server-everything serves resources"
    text_res = next((r for r in resources if (r.mime_type or "").startswith("text/")), resources[0])
    result = await demo_client.read_resource(str(text_res.uri))
    assert result.contents
    assert str(result.contents[0].uri) == str(text_res.uri)
    content = result.contents[0]
    assert getattr(content, "text", None) or getattr(content, "blob", None)


async def test_everything_prompt(demo_client: Any) -> None:
    prompts = (await demo_client.list_prompts()).prompts
    assert prompts
    assert all(p.name.startswith("everything__") for p in prompts), [p.name for p in prompts]
    simple = next((p for p in prompts if not any(a.required for a in (p.arguments or []))), None)
    assert simple is not None, [p.name for p in prompts]
    result = await demo_client.get_prompt(simple.name, {})
    assert result.messages


async def test_unknown_tool_is_an_mcp_error(demo_client: Any) -> None:
    with pytest.raises(MCPError) as info:
        await demo_client.call_tool("nosuch__tool", {})
    assert "nosuch__tool" in str(info.value)
    # The gateway keeps serving after the error.
    assert not (await demo_client.call_tool("everything__echo", {"message": "still here"})).is_error


async def test_progress_is_relayed(demo_client: Any) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    result = await demo_client.call_tool(
        "everything__trigger-long-running-operation",
        {"duration": 1, "steps": 4},
        progress_callback=on_progress,
    )
    assert not result.is_error, text_of(result)
    assert len(seen) >= 2, seen
    assert [p for p, _, _ in seen] == sorted(p for p, _, _ in seen)


async def test_filesystem_10mb_file_intact(demo_client: Any, demo_dir: Path) -> None:
    line = "0123456789abcdefghijklmnopqrstuvwxyz-mcpopt-large-result-check\n"
    body = "".join(f"{i:08d} {line}" for i in range(10_000_000 // (len(line) + 9) + 1))
    path = demo_dir / "sample" / "big.txt"
    path.write_text(body, encoding="utf-8")
    assert len(body) >= 10_000_000
    result = await demo_client.call_tool("filesystem__read_text_file", {"path": str(path)})
    got = text_of(result)
    assert not result.is_error, got[:300]
    assert len(got) == len(body)
    assert hashlib.sha256(got.encode()).hexdigest() == hashlib.sha256(body.encode()).hexdigest()


async def test_structured_content_passes(demo_client: Any) -> None:
    result = await demo_client.call_tool("everything__get-structured-content", {"location": "Chicago"})
    assert not result.is_error
    assert result.structured_content, json.dumps(result.model_dump(mode="json"))[:500]
