"""Monitor: percentiles, grades (issue 5's table), anomaly detection ahead of thresholds, SLO alerts
with de-duplication and recovery (on a real upstream slowed by SIGSTOP and resumed by SIGCONT),
and the two gateway performance tools."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from conftest import FAKE, fake_entry
from mcpopt.config import TelemetrySettings
from mcpopt.monitor import Monitor, grade, percentile
from mcpopt.monitor.anomaly import EwmaDetector
from mcpopt.telemetry.record import CallRecord
from test_telemetry import Receiver, db_rows, telemetry_gateway, wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _no_level_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MCPOPT_TELEMETRY_LEVEL", raising=False)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def feed(mon: Monitor, clock: Clock, ms: float, *, tool: str = "t", outcome: str = "ok", n: int = 1) -> None:
    for _ in range(n):
        mon.observe(CallRecord(clock.now - ms / 1000, "srv", tool, f"srv__{tool}", outcome, ms))
        clock.now += 0.01


def test_percentiles_nearest_rank() -> None:
    data = list(range(1, 101))
    assert percentile(data, 0.5) == 50 and percentile(data, 0.95) == 95 and percentile(data, 0.99) == 99
    assert percentile([7.0], 0.99) == 7.0 and percentile([], 0.5) == 0.0


def test_grades_follow_the_issue_table_and_are_configurable() -> None:
    assert grade(49.9, 0.0) == "A"
    assert grade(50.0, 0.0) == "B" and grade(10.0, 0.01) == "B"  # bounds are strict: "< 50 ms", "< 1%"
    assert grade(150.0, 0.04) == "C" and grade(400.0, 0.09) == "D"
    assert grade(600.0, 0.0) == "F" and grade(10.0, 0.2) == "F"
    strict = [[10, 0.001], [20, 0.002], [30, 0.003], [40, 0.004]]
    assert grade(15.0, 0.0, strict) == "B" and grade(45.0, 0.0, strict) == "F"


def test_summary_per_tool_server_and_overall() -> None:
    clock = Clock()
    mon = Monitor(TelemetrySettings(), clock)
    feed(mon, clock, 20, n=98)
    feed(mon, clock, 300, n=1)
    feed(mon, clock, 20, outcome="timeout", n=1)
    feed(mon, clock, 120, tool="slow", n=10)
    s = mon.summary()
    t = next(r for r in s["tools"] if r["tool"] == "t")
    assert t["calls"] == 100 and t["errors"] == 1 and t["error_rate"] == 0.01
    assert t["p50_ms"] == 20 and t["p99_ms"] == 20 and t["max_ms"] == 300
    assert t["grade"] == "B"  # avg 22.8 ms but 1% errors is not < 1%
    assert next(r for r in s["tools"] if r["tool"] == "slow")["grade"] == "C"
    assert s["servers"][0]["calls"] == 110 and s["overall"]["calls"] == 110
    clock.now += 400  # past the 300 s window: figures empty, totals kept
    s = mon.summary()
    assert s["overall"]["calls"] == 0 and s["overall"]["grade"] is None and s["overall"]["total_calls"] == 110


def test_anomaly_flags_a_shift_long_before_the_threshold() -> None:
    """5 ms -> 40 ms: flagged within a few calls; the p95 SLO (150 ms) never fires."""
    clock = Clock()
    settings = TelemetrySettings(alert_window_s=5, alert_min_calls=3)
    mon = Monitor(settings, clock)
    jitter = [4.2, 5.1, 4.8, 5.6, 4.9, 5.3, 4.4, 6.0, 5.0, 4.7]
    for i in range(60):
        feed(mon, clock, jitter[i % 10])
        assert mon.evaluate() == []
    fired_after = None
    for i in range(20):
        feed(mon, clock, 40 + jitter[i % 10])
        events = mon.evaluate()
        assert all(e.metric != "latency_p95" for e in events)
        if any(e.metric == "latency_anomaly" and e.status == "firing" for e in events):
            fired_after = i + 1
            break
    assert fired_after is not None and fired_after <= 5
    active = mon.alerts.active()
    assert [a["metric"] for a in active] == ["latency_anomaly"] and "baseline" in active[0]["message"]


def test_detector_ignores_one_outlier_and_recovers() -> None:
    det = EwmaDetector("latency", z=4, min_samples=20)
    for _ in range(40):
        det.add(5.0)
    det.add(80.0)  # one spike
    for _ in range(3):
        det.add(5.0)
    assert not det.flagged
    for _ in range(5):
        det.add(80.0)
    assert det.flagged
    for _ in range(20):
        det.add(5.0)
    assert not det.flagged


def test_alerts_deduplicate_escalate_and_recover() -> None:
    clock = Clock()
    mon = Monitor(TelemetrySettings(alert_window_s=10, alert_min_calls=3, anomaly_min_calls=1000), clock)
    feed(mon, clock, 160, n=5)
    (ev,) = mon.evaluate()
    assert (ev.status, ev.severity, ev.metric, ev.scope, ev.threshold) == (
        "firing",
        "warning",
        "latency_p95",
        "srv/t",
        150,
    )
    assert mon.evaluate() == []  # de-duplicated: still warning, nothing new
    feed(mon, clock, 260, n=5)
    (ev,) = mon.evaluate()
    assert (ev.status, ev.severity) == ("firing", "critical")
    feed(mon, clock, 20, outcome="protocol_error", n=2)
    events = mon.evaluate()
    assert [(e.metric, e.severity) for e in events] == [("error_rate", "critical")]  # 2 of 12 = 16.7%
    clock.now += 11
    feed(mon, clock, 20, n=5)
    events = mon.evaluate()
    assert sorted((e.metric, e.status) for e in events) == [("error_rate", "resolved"), ("latency_p95", "resolved")]
    assert mon.alerts.active() == [] and mon.evaluate() == []
    assert [e["status"] for e in mon.alerts.recent()][:2] == ["resolved", "resolved"]


def _fake_process() -> psutil.Process:
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if FAKE in proc.cmdline():
                return proc
    raise AssertionError("the fake upstream process was not found")


async def test_alert_fires_on_sigstop_and_recovers_on_sigcont(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mcpopt.alerts")
    # The stopped server's calls time out after 1 s, well above the 800 ms critical SLO, while an
    # echo call needs a 500 ms p95 to warn: a loaded machine does not raise an alert of its own
    # (with a 400 ms timeout and the 150/200 ms defaults, slow warm-up calls did).
    telemetry: dict[str, Any] = {
        "alert_window_s": 3,
        "alert_min_calls": 3,
        "alert_interval_ms": 100,
        "slo_p95_warning_ms": 500,
        "slo_p95_critical_ms": 800,
    }
    with Receiver() as hook:
        telemetry["webhook_url"] = f"{hook.url}/hook"
        servers = {"fake": fake_entry(timeout_ms=1000)}
        async with telemetry_gateway(tmp_path, servers, telemetry) as (gw, tel):
            async with Client(gw.server, mode="legacy") as client:
                for i in range(5):
                    await client.call_tool("fake__echo", {"text": f"warm {i}"})
                await anyio.sleep(0.3)
                assert tel.monitor.alerts.active() == []
                proc = _fake_process()
                os.kill(proc.pid, signal.SIGSTOP)
                try:

                    async def stuck() -> None:
                        with contextlib.suppress(MCPError):
                            await client.call_tool("fake__echo", {"text": "stuck"})

                    async with anyio.create_task_group() as tg:
                        for _ in range(4):
                            tg.start_soon(stuck)

                    def critical() -> bool:
                        return any(
                            a["metric"] == "latency_p95" and a["severity"] == "critical"
                            for a in tel.monitor.alerts.active()
                        )

                    assert await wait_for(critical), tel.monitor.alerts.active()
                finally:
                    os.kill(proc.pid, signal.SIGCONT)
                for _ in range(200):  # sped up again: fast calls until every alert has recovered
                    await client.call_tool("fake__echo", {"text": "fast"})
                    if not tel.monitor.alerts.active():
                        break
                    await anyio.sleep(0.05)
                assert tel.monitor.alerts.active() == []
            await tel.flush()
        await wait_for(lambda: any(json.loads(b)["status"] == "resolved" for b in hook.bodies("/hook")))
    events = [json.loads(b) for b in hook.bodies("/hook")]
    latency = [(e["status"], e["severity"]) for e in events if e["metric"] == "latency_p95"]
    assert latency == [("firing", "critical"), ("resolved", "critical")]  # once each: de-duplicated
    errors = [e for e in events if e["metric"] == "error_rate"]
    assert errors[0]["status"] == "firing" and errors[-1]["status"] == "resolved"
    assert all(e["scope"] == "fake/echo" and e["source"] == "mcpopt" for e in events)
    text = caplog.text
    assert "ALERT critical: fake/echo: p95 latency" in text and "RESOLVED fake/echo: latency_p95" in text
    outcomes = {r["outcome"] for r in db_rows(tmp_path / "telemetry.db")}
    assert outcomes == {"ok", "timeout"}
    import sqlite3

    db = sqlite3.connect(tmp_path / "telemetry.db")
    stored = [r[0] for r in db.execute("SELECT status FROM alerts WHERE metric = 'latency_p95' ORDER BY id")]
    db.close()
    assert stored == ["firing", "resolved"]


async def test_anomaly_on_a_real_upstream(tmp_path: Path) -> None:
    """A real tool goes from ~1 ms to ~250 ms: flagged as an anomaly; the (5 s) SLO never fires.

    The shift is large and the SLO far above it so that neither verdict depends on the machine's
    load: a busy machine's baseline of a few ms to tens of ms still sees 250 ms as a shift (a
    60 ms shift against the 150 ms default SLO did not, either way, on a loaded machine)."""
    telemetry = {"anomaly_min_calls": 25, "alert_window_s": 30, "slo_p95_warning_ms": 5000, "slo_p95_critical_ms": 9000}
    async with telemetry_gateway(tmp_path, telemetry=telemetry) as (gw, tel):
        async with Client(gw.server, mode="legacy") as client:
            for _ in range(40):
                await client.call_tool("fake__sleep_then_answer", {"seconds": 0.001})
            tel.process_pending()
            for _ in range(8):
                await client.call_tool("fake__sleep_then_answer", {"seconds": 0.25})
            tel.process_pending()
            tel.evaluate()
        metrics = {(a["scope"], a["metric"]) for a in tel.monitor.alerts.active()}
        assert ("fake/sleep_then_answer", "latency_anomaly") in metrics
        assert ("fake/sleep_then_answer", "latency_p95") not in metrics


async def test_performance_status_and_benchmark_tools(tmp_path: Path) -> None:
    servers = {"fake": fake_entry(read_only_tools=["sleep_then_answer"])}
    async with telemetry_gateway(tmp_path, servers) as (gw, tel):
        async with Client(gw.server, mode="legacy") as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert {"mcpopt__get_performance_status", "mcpopt__run_performance_benchmark"} <= names
            for i in range(3):
                await client.call_tool("fake__echo", {"text": str(i)})
            status: Any = (await client.call_tool("mcpopt__get_performance_status", {})).structured_content
            assert status["level"] == "standard" and status["overall"]["grade"] in "ABCDF"
            echo = next(t for t in status["tools"] if t["tool"] == "echo")
            assert echo["calls"] == 3 and echo["p95_ms"] > 0 and echo["grade"] in "ABCDF"
            fake = next(s for s in status["servers"] if s["server"] == "fake")
            assert fake["health"]["state"] == "ready" and fake["health"]["replicas"][0]["breaker"] == "closed"
            assert status["alerts"] == [] and status["telemetry"]["dropped"]["pipeline"] == 0
            assert "timeline" not in status

            args = {
                "calls": [
                    {"name": "fake__sleep_then_answer", "arguments": {"seconds": 0.005}},
                    {"name": "fake__echo", "arguments": {"text": "x"}},
                    {"name": "nope__tool"},
                ],
                "iterations": 6,
                "concurrency": 2,
            }
            bench: Any = (await client.call_tool("mcpopt__run_performance_benchmark", args)).structured_content
            ok, write, unknown = bench["results"]
            assert ok["calls"] == 6 and ok["errors"] == 0 and ok["p50_ms"] >= 5 and ok["grade"] in "ABCDF"
            assert ok["min_ms"] <= ok["p50_ms"] <= ok["p95_ms"] <= ok["max_ms"]
            assert "read-only" in write["error"] and "unknown tool" in unknown["error"]
            args = {
                "calls": [{"name": "fake__echo", "arguments": {"text": "x"}}],
                "iterations": 3,
                "allow_writes": True,
            }
            bench = (await client.call_tool("mcpopt__run_performance_benchmark", args)).structured_content
            assert bench["results"][0]["calls"] == 3
            with pytest.raises(MCPError, match="iterations"):
                await client.call_tool(
                    "mcpopt__run_performance_benchmark", {"calls": [{"name": "fake__echo"}], "iterations": 10_000}
                )
