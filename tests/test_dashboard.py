"""The dashboard: its data endpoint and script over HTTP, and the live page rendered by headless
Chromium (Debian's `chromium`) against a real gateway; the screenshot is kept in .artifacts/."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from conftest import ROOT, fake_entry, time_entry
from mcpopt.monitor.dashboard import chart_js_path
from test_telemetry import http_get, serve_http, telemetry_gateway

pytestmark = pytest.mark.anyio

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / ".artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]


@pytest.fixture(autouse=True)
def _no_level_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MCPOPT_TELEMETRY_LEVEL", raising=False)


def _servers() -> dict[str, Any]:
    return {
        "fake": fake_entry(read_only_tools=["echo"], cache={"ttl_ms": 60_000}),
        "time": time_entry(),
    }


async def _traffic(client: Client) -> None:
    for i in range(12):
        await client.call_tool("fake__echo", {"text": f"hello {i % 3}"})  # 3 misses, 9 cache hits
        await client.call_tool("time__get_current_time", {"timezone": "UTC"})
        await anyio.sleep(0.05)
    await client.call_tool("fake__sleep_then_answer", {"seconds": 0.02})


def test_chart_library_is_vendored() -> None:
    path = chart_js_path()
    assert path is not None and path.name == "chart.umd.min.js"
    assert "Chart.js v4" in path.read_text(encoding="utf-8")[:200]


async def test_dashboard_data_endpoint(tmp_path: Path) -> None:
    async with telemetry_gateway(tmp_path, {"fake": _servers()["fake"]}) as (gw, tel), serve_http(gw, tel) as port:
        async with Client(gw.server, mode="legacy") as client:
            for i in range(4):
                await client.call_tool("fake__echo", {"text": f"t{i % 2}"})
        status, body = await http_get(f"http://127.0.0.1:{port}/dashboard/data")
        assert status == 200
        data = json.loads(body)
        assert data["overall"]["total_calls"] == 4 and data["cache"]["hits"] == 2 and data["cache"]["hit_rate"] == 0.5
        assert data["timeline"] and data["timeline"][-1]["calls"] >= 1
        assert data["servers"][0]["health"]["replicas"][0]["breaker"] == "closed"
        status, body = await http_get(f"http://127.0.0.1:{port}/dashboard")
        assert status == 200 and b"dashboard/chart.umd.min.js" in body and b"cdn" not in body.lower()
        status, body = await http_get(f"http://127.0.0.1:{port}/dashboard/chart.umd.min.js")
        assert status == 200 and len(body) > 100_000
        status, _ = await http_get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200  # the front's own routes are untouched


async def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CHROMIUM or "chromium", *FLAGS, *args], capture_output=True, text=True, timeout=60, check=False
        )

    return await anyio.to_thread.run_sync(run)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is missing (Debian package 'chromium')")
async def test_dashboard_renders_in_headless_chromium(tmp_path: Path) -> None:
    async with telemetry_gateway(tmp_path, _servers()) as (gw, tel), serve_http(gw, tel) as port:
        async with Client(gw.server, mode="legacy") as client:
            await _traffic(client)
        url = f"http://127.0.0.1:{port}/dashboard"
        profile = tmp_path / "chromium-profile"
        # The page polls /dashboard/data every 2 s; virtual time lets it run a few rounds, and
        # waits for each fetch to the (real) gateway before time moves on.
        dom = await _chromium(f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url)
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        body = re.search(r"<body([^>]*)>", html)
        assert body is not None
        attrs = dict(re.findall(r'data-([a-z]+)="([^"]*)"', body.group(1)))
        assert attrs.get("state") == "live", f"page state {attrs}: {dom.stderr[-1000:]}"
        assert int(attrs["calls"]) == 25 and int(attrs["points"]) >= 1  # charts drawn from the timeline
        grade = re.search(r'<span id="grade" class="grade g-([A-F])">([A-F])</span>', html)
        assert grade is not None and grade.group(1) == grade.group(2)
        assert "fake / echo" in html and "time / get_current_time" in html
        assert re.search(r'id="k-hit">75\.0%<', html)  # 9 hits of 12 cacheable calls
        assert "#1 ready / closed" in html  # per-server health and breaker state
        assert attrs.get("sampled") == "2", attrs  # the upstream processes panel: one row per stdio replica
        assert re.search(r'<tr data-server="fake"><td>fake</td><td>#1</td><td class="num">\d+</td>', html), html
        assert re.search(r'<span id="status">updated [^<]+</span>', html)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        res = await _chromium(
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--window-size=1400,1500",
            f"--screenshot={shot}",
            url,
        )
        assert res.returncode == 0, res.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 30_000  # a rendered page, not a blank one
