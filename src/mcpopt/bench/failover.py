"""`mcpopt bench failover`: 3 replicas, one killed every few seconds under load.

Two pools behind one in-process gateway, each with 3 stdio replicas:
- `time`: the real `mcp-server-time`; workers call `get_current_time` (read-only: retried and
  failed over when a replica dies);
- `ledger`: `mcpopt.bench.ledger_server`, whose `record(id)` is destructive and appends the id
  to a shared ledger file on the server side.
A killer SIGKILLs a random replica process of each pool every `kill_every_s` seconds. At the end
the ledger is the truth: an id recorded twice was duplicated; an id the client saw succeed that
is absent was lost. A destructive call whose replica died mid-call fails with an error naming the
server, and is never sent again (it may or may not have run: the ledger says which).

Targets (issue #3): >= 99.9% of read-only calls succeed; 0 destructive calls duplicated or lost.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from mcpopt.bench.overhead import SERVERS_PY


async def bench_failover(
    duration_s: float = 60.0, kill_every_s: float = 5.0, readers: int = 8, writers: int = 2
) -> dict[str, Any]:
    from mcpopt.api import ClientLink
    from mcpopt.config import load_config
    from mcpopt.gateway.assembly import build_gateway

    with tempfile.TemporaryDirectory() as d:
        ledger = Path(d) / "ledger.txt"
        cfg = load_config(
            data={
                "mcpServers": {
                    "time": {
                        "command": str(SERVERS_PY / "mcp-server-time"),
                        "replicas": 3,
                        "retry": {"attempts": 3},
                        "breaker": {"failure_threshold": 2, "open_ms": 2000},
                    },
                    "ledger": {
                        "command": sys.executable,
                        "args": ["-m", "mcpopt.bench.ledger_server"],
                        "env": {"LEDGER_FILE": str(ledger)},
                        "replicas": 3,
                    },
                },
                "gateway": {"restart": {"initial_backoff_ms": 100, "max_backoff_ms": 1000}, "data_dir": d},
            }
        )
        gateway = build_gateway(cfg)

        async def nothing(*_: Any) -> None:
            return None

        link = ClientLink("2025-11-25", None, None, None, lambda _t: nothing)
        counts: collections.Counter[str] = collections.Counter()
        acked: set[str] = set()
        errors: collections.Counter[str] = collections.Counter()
        kills = 0
        stop_at = 0.0

        async def reader() -> None:
            while time.monotonic() < stop_at:
                try:
                    r = await gateway.call_tool(
                        {"name": "time__get_current_time", "arguments": {"timezone": "UTC"}}, link
                    )
                    counts["read_ok" if not r.get("isError") else "read_error"] += 1
                except Exception as exc:  # noqa: BLE001 - counted
                    counts["read_error"] += 1
                    errors[f"read: {str(exc)[:90]}"] += 1

        async def writer(w: int) -> None:
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                rid = f"w{w}-{n}"
                try:
                    r = await gateway.call_tool({"name": "ledger__record", "arguments": {"id": rid}}, link)
                    if not r.get("isError"):
                        acked.add(rid)
                        counts["write_ok"] += 1
                    else:
                        counts["write_error"] += 1
                except Exception as exc:  # noqa: BLE001 - counted
                    counts["write_error"] += 1
                    errors[f"write: {str(exc)[:90]}"] += 1

        async def killer() -> None:
            nonlocal kills
            me = psutil.Process()
            while time.monotonic() < stop_at - kill_every_s / 2:
                await asyncio.sleep(kill_every_s)
                for marker in ("mcp-server-time", "mcpopt.bench.ledger_server"):
                    victims = [p for p in me.children(recursive=True) if marker in " ".join(_cmdline(p))]
                    if victims:
                        victim = random.choice(victims)
                        try:
                            os.kill(victim.pid, signal.SIGKILL)
                            kills += 1
                        except ProcessLookupError:
                            pass

        async with gateway.running():
            stop_at = time.monotonic() + duration_s
            await asyncio.gather(*(reader() for _ in range(readers)), *(writer(w) for w in range(writers)), killer())
        recorded = collections.Counter(ledger.read_text().split()) if ledger.exists() else collections.Counter()
    duplicated = sorted(i for i, c in recorded.items() if c > 1)
    lost = sorted(i for i in acked if recorded.get(i, 0) == 0)
    reads = counts["read_ok"] + counts["read_error"]
    writes = counts["write_ok"] + counts["write_error"]
    return {
        "duration_s": duration_s,
        "kills": kills,
        "reads": reads,
        "read_success_rate": counts["read_ok"] / reads if reads else float("nan"),
        "writes": writes,
        "writes_acked": counts["write_ok"],
        "writes_failed": counts["write_error"],
        "writes_failed_but_ran": sum(1 for i in recorded if i not in acked),
        "duplicated": len(duplicated),
        "lost": len(lost),
        "errors": dict(errors.most_common(5)),
    }


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def print_failover(data: dict[str, Any], as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps(data, indent=2))
        return
    print(
        f"failover, {data['duration_s']:.0f} s, {data['kills']} replica kills: read-only calls "
        f"{data['read_success_rate'] * 100:.3f}% of {data['reads']} succeeded; "
        f"destructive calls: {data['writes']} sent, "
        f"{data['writes_acked']} acknowledged, {data['writes_failed']} failed with an error "
        f"({data['writes_failed_but_ran']} of those had run), duplicated {data['duplicated']}, lost {data['lost']}"
    )
    for message, n in data["errors"].items():
        print(f"  {n} x {message}")
