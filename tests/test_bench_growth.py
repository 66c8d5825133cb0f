"""`mcpopt bench growth` end to end at its smallest (1 server, 1 and 3 clients): every figure is
there, no call failed, the sessions parked (the gateway said so) and their figures are given,
and the PNG is written; with parking off the parked figures are absent, never made up.
Behaviour only; the figures are not judged."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import MCPOPT, ROOT
from mcpopt.bench.catalog_server import catalog_tools
from mcpopt.bench.growth import WAVE, CallFigures, Growth, ListFigures, figure

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


def _growth(park_ms: int) -> Growth:
    """Figures of the shape `run_growth` returns (the values are not judged)."""
    g = Growth(rate=200.0, park_ms=park_ms, load=(1.0, 1.0, 1.0))
    g.lists = [ListFigures(n, 24 * n, 15_000 * n, 2.0, 0.3, 3.0, 250.0, 200) for n in (1, 5)]
    for n in (1, 5):
        for c in (1, 10, 100):
            parked = 40.0 if park_ms else None
            waves = 2.5 if park_ms else None
            g.calls.append(CallFigures(n, c, 600, 0, 1.5, 9.0, 900.0, 300.0, 90.0, 40.0, c, c, parked, waves, c))
    return g


def _legend_labels(ax: Any) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def test_png_names_every_line_style_and_server_count() -> None:
    """The PNG's panels say what each line is: the latency panel names p50 and p99, the memory
    panel's key (the sixth cell) names open / parked: RSS kept / parked: arriving WAVE at a time
    and every server count, singular for one; the memory title gives the park time."""
    import matplotlib.pyplot as plt

    fig = figure(_growth(10_000))
    try:
        latency, cpu, rss, memory, key = fig.axes[1:6]
        assert {"1 server", "5 servers", "p50", "p99"} <= set(_legend_labels(latency))
        assert {"1 server", "5 servers"} <= set(_legend_labels(cpu)) & set(_legend_labels(rss))
        labels = _legend_labels(key)
        assert labels[:2] == ["1 server", "5 servers"]
        assert labels[2:] == [
            "open (opened at once)",
            "parked: RSS kept (same sessions)",
            f"parked: arriving {WAVE} at a time",
        ]
        assert "10000 ms" in memory.get_title() and memory.get_ylabel() == "KiB per session"
        assert all(ax.get_xlabel() == "clients" for ax in (latency, cpu, rss, memory))
    finally:
        plt.close(fig)


def test_png_without_parking_has_no_parked_key() -> None:
    import matplotlib.pyplot as plt

    fig = figure(_growth(0))
    try:
        memory, key = fig.axes[4], fig.axes[5]
        assert "parking off" in memory.get_title()
        assert not [label for label in _legend_labels(key) if "parked" in label]
    finally:
        plt.close(fig)
