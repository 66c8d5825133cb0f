"""`mcpopt bench growth` end to end at its smallest (1 server, 1 and 3 clients): every figure is
there, no call failed, the sessions parked (the gateway said so) and their figures are given,
and the PNG is written; with parking off the parked figures are absent, never made up.
Behaviour only; the figures are not judged."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import MCPOPT, ROOT
from mcpopt.bench.catalog_server import catalog_tools

CATALOG = ROOT.parent / "shared" / "datasets" / "livemcpbench" / "tools.json"


def test_growth_runs_and_reports_every_step(tmp_path: Path) -> None:
    png = tmp_path / "growth.png"
    args = ["bench", "growth", "--servers", "1", "--clients", "1,3", "--seconds", "0.5", "--rate", "50"]
    done = subprocess.run(
        [MCPOPT, *args, "--lists", "5", "--park-ms", "300", "--json", "--png", str(png)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(done.stdout)
    (lists,) = data["lists"]
    assert lists["servers"] == 1 and lists["tools"] > 10 and lists["requests"] == 5
    assert [(c["servers"], c["clients"]) for c in data["calls"]] == [(1, 1), (1, 3)]
    assert data["park_ms"] == 300
    for step in data["calls"]:
        # Parked sessions resumed by the calls answer as live ones did.
        assert step["errors"] == 0 and step["calls"] >= 2 * step["clients"]
        assert step["parked"] == step["parked_waves"] == step["clients"]
        assert isinstance(step["parked_session_kib"], float) and isinstance(step["parked_waves_kib"], float)
        assert isinstance(step["idle_session_kib"], float) and 0 <= step["idle_open"] <= step["clients"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_growth_without_parking_reports_no_parked_figure() -> None:
    args = ["bench", "growth", "--servers", "1", "--clients", "2", "--seconds", "0.3", "--rate", "50"]
    done = subprocess.run(
        [MCPOPT, *args, "--lists", "2", "--park-ms", "0"], capture_output=True, text=True, timeout=300, cwd=str(ROOT)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The title and both parked cells say so; no open session is said to have parked.
    assert done.stdout.count("parking off") >= 3, done.stdout
    assert "not parked" not in done.stdout and "parked already" not in done.stdout, done.stdout


def test_growth_refuses_a_negative_park_time() -> None:
    done = subprocess.run(
        [MCPOPT, "bench", "growth", "--park-ms", "-1"], capture_output=True, text=True, timeout=60, cwd=str(ROOT)
    )
    assert done.returncode == 2 and "--park-ms" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(("option", "value"), [("--servers", "1,x"), ("--clients", "0"), ("--alternate", "-1")])
def test_growth_refuses_bad_counts_naming_the_option(option: str, value: str) -> None:
    done = subprocess.run(
        [MCPOPT, "bench", "growth", option, value], capture_output=True, text=True, timeout=60, cwd=str(ROOT)
    )
    assert done.returncode == 2 and option in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.skipif(not CATALOG.exists(), reason="the LiveMCPBench dataset is not on this machine")
def test_catalog_server_lists_the_catalogs_tools() -> None:
    tools = catalog_tools(CATALOG)
    assert len(tools) == len({t["name"] for t in tools}) == 527
    assert all("__" in t["name"] and t["inputSchema"] for t in tools)


def test_alternate_times_every_server_count_at_once() -> None:
    """`--alternate N`: every server count's gateway runs at once and each gets N timed calls,
    none failed, with its own CPU per call; rows in the order of `--servers`."""
    args = ["bench", "growth", "--servers", "1,2", "--clients", "1", "--seconds", "0.5", "--rate", "50"]
    done = subprocess.run(
        [MCPOPT, *args, "--lists", "2", "--alternate", "12", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)["servers_alternated"]
    assert [r["path"] for r in rows] == ["1 server", "2 servers"]
    for r in rows:
        assert r["calls"] == 12 and r["errors"] == 0
        # CPU is psutil's (10 ms ticks): 12 short calls may well read 0; present is what is checked.
        assert r["p50_ms"] > 0 and r["cpu_us_per_call"] is not None and r["cpu_us_per_call"] >= 0
