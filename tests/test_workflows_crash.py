"""Crash test: SIGKILL the gateway process between workflow steps and in the middle of a step, start it
again, and check that the journal resumes or compensates the run and that the server-side ledger
shows every write step executed exactly once (and every in-doubt write neither re-sent nor lost).

The kills are placed by events, never by timing: the test watches the journal (SQLite, read-only)
and the ledger file, and kills when the run is exactly where it should be --
- *between write steps*: the first write is journaled as done and the next one has not started,
  because it waits for the workflow's only slot (`max_parallel: 1`), held by a read that waits for
  a gate file the test creates only after the restart;
- *mid-step*: the ledger shows the write executed, and the server holds its answer until a gate
  file exists (it never will in that gateway's life).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import MCPOPT, ROOT, write_config

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def ledger_entry(ledger: Path, *, keys: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "command": sys.executable,
        "args": [str(FIXTURES / "ledger_server.py")],
        "env": {"LEDGER_FILE": str(ledger), "LEDGER_KEYS": "1" if keys else "0"},
    }
    if keys:
        entry["idempotency_keys"] = True
    return entry


def record(step: str, server: str, rid: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": step,
        "tool": f"{server}__record",
        "arguments": {"id": rid},
        "compensate": {"tool": f"{server}__undo", "arguments": {"id": rid}},
        **extra,
    }


def workflows(gates: Path) -> dict[str, Any]:
    return {
        # w1, then w2 -- but w2 waits for the only slot, which `hold` (a read) keeps until the gate opens.
        "between": {
            "max_parallel": 1,
            "steps": [
                record("w1", "ledger", "between-w1"),
                {"id": "hold", "depends_on": ["w1"], "tool": "ledger__wait", "arguments": {"gate": str(gates / "b")}},
                record("w2", "ledger", "between-w2", depends_on=["w1"]),
            ],
        },
        # the middle write is caught in flight on a server that deduplicates by idempotency key
        "keyed": {
            "steps": [
                record("w1", "keyed", "keyed-w1"),
                {
                    "id": "w2",
                    "depends_on": ["w1"],
                    "tool": "keyed__record_slow",
                    "arguments": {"id": "keyed-w2", "gate": str(gates / "k")},
                },
                record("w3", "keyed", "keyed-w3", depends_on=["w2"]),
            ],
        },
        # the same on a server that does not: in doubt, never re-sent; its undo is harmless, so it runs
        "doubt": {
            "steps": [
                record("w1", "ledger", "doubt-w1"),
                {
                    "id": "w2",
                    "depends_on": ["w1"],
                    "tool": "ledger__record_slow",
                    "arguments": {"id": "doubt-w2", "gate": str(gates / "d")},
                    "compensate": {"tool": "ledger__undo", "arguments": {"id": "doubt-w2"}, "in_doubt": True},
                },
                record("w3", "ledger", "doubt-w3", depends_on=["w2"]),
            ],
        },
        # after a restart this one compensates instead of going on
        "undo_on_restart": {
            "on_restart": "compensate",
            "max_parallel": 1,
            "steps": [
                record("w1", "ledger", "undo-w1"),
                {"id": "hold", "depends_on": ["w1"], "tool": "ledger__wait", "arguments": {"gate": str(gates / "u")}},
                record("w2", "ledger", "undo-w2", depends_on=["w1"]),
            ],
        },
    }


class Gateway:
    """`mcpopt serve` over stdio, driven with raw JSON-RPC lines."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [MCPOPT, "serve", "-c", str(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=str(ROOT),
        )
        self.children: list[psutil.Process] = []
        self._id = 0
        self.request(
            "initialize",
            {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "crash-test", "version": "0"}},
        )
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        self.children = psutil.Process(self.proc.pid).children(recursive=True)

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        self.proc.stdin.flush()

    def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._id += 1
        self.send({"jsonrpc": "2.0", "id": self._id, "method": method, "params": params})
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            assert line, "the gateway closed stdout"
            msg = json.loads(line)
            if msg.get("id") == self._id:
                assert "result" in msg, msg
                result: dict[str, Any] = msg["result"]
                return result

    def start_run(self, name: str) -> str:
        result = self.request(
            "tools/call", {"name": "mcpopt__workflow", "arguments": {"action": "run", "name": name, "wait": False}}
        )
        body = json.loads(result["content"][0]["text"])
        run_id: str = body["run_id"]
        return run_id

    def sigkill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        gone, alive = psutil.wait_procs(self.children, timeout=10)
        assert not alive, f"upstreams outlived the gateway: {alive}"
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@contextlib.contextmanager
def gateway(config: Path) -> Iterator[Gateway]:
    gw = Gateway(config)
    try:
        yield gw
    finally:
        gw.close()


def events(journal: Path, run_id: str) -> list[tuple[str, str]]:
    if not journal.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5)) as db:
        rows = db.execute("SELECT kind, step FROM events WHERE run_id = ? ORDER BY seq", (run_id,)).fetchall()
    return [(k, s) for k, s in rows]


def status(journal: Path, run_id: str) -> str:
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5)) as db:
        row = db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    return str(row[0]) if row else ""


def ledger_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [" ".join(line.split()[:2]) for line in path.read_text().splitlines()]


def wait_for(check: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    gates = tmp_path / "gates"
    gates.mkdir()
    paths = {
        "config": tmp_path / "crash.yaml",
        "journal": tmp_path / "journal.db",
        "ledger": tmp_path / "ledger.txt",
        "keyed": tmp_path / "keyed.txt",
        "gates": gates,
    }
    write_config(
        paths["config"],
        {
            "ledger": ledger_entry(paths["ledger"], keys=False),
            "keyed": ledger_entry(paths["keyed"], keys=True),
        },
        {"workflows": {"journal": {"path": str(paths["journal"])}}, "telemetry": {"enabled": False}},
    )
    data = paths["config"].read_text()
    import yaml

    cfg = yaml.safe_load(data)
    cfg["workflows"] = workflows(gates)
    paths["config"].write_text(yaml.safe_dump(cfg, sort_keys=False))
    return paths


def test_sigkill_between_steps_resumes_without_running_a_write_twice(setup: dict[str, Path]) -> None:
    journal, ledger = setup["journal"], setup["ledger"]
    with gateway(setup["config"]) as gw:
        run_id = gw.start_run("between")
        wait_for(lambda: ("step_started", "hold") in events(journal, run_id), "w1 done and hold in flight")
        gw.sigkill()
    seen = events(journal, run_id)
    assert ("step_succeeded", "w1") in seen and ("step_started", "w2") not in seen  # killed between writes
    assert ledger_lines(ledger) == ["record between-w1"]
    (setup["gates"] / "b").touch()
    with gateway(setup["config"]):
        wait_for(lambda: status(journal, run_id) == "completed", "the resumed run to complete")
    assert ledger_lines(ledger) == ["record between-w1", "record between-w2"]
    seen = events(journal, run_id)
    assert seen.count(("step_started", "w1")) == 1  # w1 was not sent again
    assert seen.count(("step_started", "hold")) == 2  # the read in flight was sent again (safe)


def test_sigkill_mid_step_on_a_server_that_deduplicates_executes_it_once(setup: dict[str, Path]) -> None:
    journal, keyed = setup["journal"], setup["keyed"]
    with gateway(setup["config"]) as gw:
        run_id = gw.start_run("keyed")
        wait_for(lambda: "record keyed-w2" in ledger_lines(keyed), "w2 executed (its answer held back)")
        gw.sigkill()
    assert ("step_succeeded", "w2") not in events(journal, run_id)  # it was in flight when killed
    with gateway(setup["config"]):
        wait_for(lambda: status(journal, run_id) == "completed", "the resumed run to complete")
    assert ledger_lines(keyed) == ["record keyed-w1", "record keyed-w2", "record keyed-w3"]
    seen = events(journal, run_id)
    assert seen.count(("step_started", "w2")) == 2  # re-sent with the same key: the server answered from it


def test_sigkill_mid_step_without_deduplication_is_in_doubt_and_compensated(setup: dict[str, Path]) -> None:
    journal, ledger = setup["journal"], setup["ledger"]
    with gateway(setup["config"]) as gw:
        run_id = gw.start_run("doubt")
        wait_for(lambda: "record doubt-w2" in ledger_lines(ledger), "w2 executed (its answer held back)")
        gw.sigkill()
    with gateway(setup["config"]):
        wait_for(lambda: status(journal, run_id) not in ("", "running", "compensating"), "the run to finish")
    assert status(journal, run_id) == "compensated"
    # w2 ran once and was never re-sent; its harmless undo ran, then w1's; w3 never ran.
    assert ledger_lines(ledger) == ["record doubt-w1", "record doubt-w2", "undo doubt-w2", "undo doubt-w1"]
    seen = events(journal, run_id)
    assert seen.count(("step_started", "w2")) == 1 and ("step_started", "w3") not in seen


def test_sigkill_then_on_restart_compensate_undoes_what_completed(setup: dict[str, Path]) -> None:
    journal, ledger = setup["journal"], setup["ledger"]
    with gateway(setup["config"]) as gw:
        run_id = gw.start_run("undo_on_restart")
        wait_for(lambda: ("step_started", "hold") in events(journal, run_id), "w1 done and hold in flight")
        gw.sigkill()
    with gateway(setup["config"]):
        wait_for(lambda: status(journal, run_id) not in ("", "running", "compensating"), "the run to finish")
    assert status(journal, run_id) == "compensated"
    assert ledger_lines(ledger) == ["record undo-w1", "undo undo-w1"]
    assert ("step_started", "w2") not in events(journal, run_id)
