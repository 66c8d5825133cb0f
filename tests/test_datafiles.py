"""Data files the gateway writes (telemetry SQLite and JSONL, the argument-hash salt, rules) are private:
files 0600, folders 0700, whatever the umask (issue 10: telemetry files were world-readable)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from conftest import time_entry, write_config
from mcpopt.api import ClientLink, no_progress
from mcpopt.config import load_config
from mcpopt.gateway.assembly import build_gateway

pytestmark = pytest.mark.anyio


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


async def poll(check: Any, timeout: float = 20.0) -> Any:
    for _ in range(int(timeout / 0.05)):
        if value := check():
            return value
        await anyio.sleep(0.05)
    return check()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_telemetry_and_data_files_are_private(tmp_path: Path, open_umask: None) -> None:
    data = tmp_path / "data" / "mcpopt"
    config = write_config(
        tmp_path / "g.yaml",
        {"time": time_entry()},
        {"telemetry": {"data_dir": str(data), "jsonl_path": str(data / "export" / "calls.jsonl")}},
    )
    gateway = build_gateway(load_config(config))
    async with gateway.running():
        link = ClientLink("2025-06-18", None, None, None, lambda _t: no_progress)
        result = await gateway.call_tool({"name": "time__get_current_time", "arguments": {"timezone": "UTC"}}, link)
        assert "UTC" in result["content"][0]["text"]
        gateway.rules.store.save()  # the optimizer's rules file, as `mcpopt optimize` writes it
        # While the gateway runs, SQLite's write-ahead log sits beside the database.
        wal = await poll(lambda: [p for p in data.rglob("*-wal")])
        assert wal, sorted(p.name for p in data.rglob("*"))
        assert not {p.name: oct(_mode(p)) for p in data.rglob("*") if p.is_file() and _mode(p) & 0o077}
    # Leaving `running()` flushed and closed the sinks.
    files = [p for p in data.rglob("*") if p.is_file()]
    dirs = [data, *[p for p in data.rglob("*") if p.is_dir()]]
    names = {p.name for p in files}
    assert any(n.endswith(".db") or n.endswith(".sqlite") for n in names), names
    assert "calls.jsonl" in names, names
    loose = {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in files if _mode(p) & 0o077}
    assert not loose, f"readable by others: {loose}"
    open_dirs = {str(p.relative_to(tmp_path)): oct(_mode(p)) for p in dirs if _mode(p) & 0o077}
    assert not open_dirs, f"folders open to others: {open_dirs}"


async def test_workflow_journal_is_private(tmp_path: Path, open_umask: None) -> None:
    from mcpopt.workflows.journal import SqliteJournal

    folder = tmp_path / "wf"
    journal = SqliteJournal(folder / "journal.db")
    try:
        made = [p for p in folder.rglob("*") if p.is_file()]
        assert made and not {p.name: oct(_mode(p)) for p in made if _mode(p) & 0o077}
        assert _mode(folder) == 0o700
    finally:
        await journal.close()
