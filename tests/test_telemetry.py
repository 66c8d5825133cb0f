"""Telemetry: outcomes, privacy levels on real calls, sinks that never slow a call, the SQLite
store and CLI, OTLP export to a local receiver with trace context propagated upstream, and a
real Prometheus scraping the gateway's /metrics.

Helpers here (`telemetry_gateway`, `serve_http`, `http_get`, ...) are shared with
test_monitor.py and test_dashboard.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from typer.testing import CliRunner

from conftest import FAKE, fake_entry, free_port
from mcpopt.config import TelemetrySettings, load_config
from mcpopt.errors import (
    GATEWAY_REJECTED,
    GatewayError,
    UpstreamClosed,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mcpopt.gateway.assembly import build_gateway
from mcpopt.gateway.server import Gateway
from mcpopt.monitor.hub import Telemetry
from mcpopt.pipeline import Pipeline, ToolCall
from mcpopt.telemetry.collector import classify
from mcpopt.telemetry.privacy import REDACTED, hash_arguments, load_salt, redact
from mcpopt.telemetry.record import CallRecord
from mcpopt.telemetry.sinks import ThreadedSink

pytestmark = pytest.mark.anyio

SECRET_ARGS = {
    "text": "weather in Paris; mail jane.doe@example.com, Authorization: Bearer abcDEF123456ghiJKL",
    "api_key": "sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c",
    "password": "hunter2hunter2",
    "note": "token=ghp_16C7e42F292c6912E7710c838347Ae178B4a",
}
SECRETS = (
    "jane.doe@example.com",
    "abcDEF123456ghiJKL",
    "sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c",
    "hunter2hunter2",
    "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
)


@pytest.fixture(autouse=True)
def _no_level_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MCPOPT_TELEMETRY_LEVEL", raising=False)
    monkeypatch.delenv("MCPOPT_TELEMETRY_ENABLED", raising=False)


# ---- shared helpers ----------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def telemetry_gateway(
    tmp: Path, servers: dict[str, Any] | None = None, telemetry: dict[str, Any] | None = None
) -> AsyncIterator[tuple[Gateway, Telemetry]]:
    """A real in-process gateway with its own telemetry (first and last filter, the two gateway
    tools, sinks started and stopped with it)."""
    cfg = load_config(
        data={
            "mcpServers": servers or {"fake": fake_entry()},
            "gateway": {"telemetry": {"data_dir": str(tmp), **(telemetry or {})}},
        }
    )
    gw = build_gateway(cfg)
    async with gw.running():
        yield gw, gw.telemetry


@contextlib.asynccontextmanager
async def serve_http(gw: Gateway, tel: Telemetry) -> AsyncIterator[int]:
    """Serve the gateway's HTTP front (the SDK app from `http_app`) plus telemetry's routes."""
    import uvicorn

    from mcpopt.gateway.front import http_app

    app = http_app(gw, "127.0.0.1")  # serves telemetry's routes itself
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", access_log=False)
    )
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        deadline = time.monotonic() + 60  # generous: returns as soon as it listens
        while not server.started and time.monotonic() < deadline:
            await anyio.sleep(0.02)
        assert server.started, "uvicorn did not start"
        yield port
    finally:
        server.should_exit = True
        with anyio.move_on_after(5):
            await task


async def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET in a thread (the gateway serves from this test's own event loop)."""

    def get() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    return await anyio.to_thread.run_sync(get)


class Receiver:
    """A local HTTP server that keeps every POST body by path (OTLP, webhooks)."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.posts.append((self.path, body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def bodies(self, path: str) -> list[bytes]:
        return [b for p, b in self.posts if p == path]


async def wait_for(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        await anyio.sleep(interval)


def db_rows(path: Path) -> list[dict[str, Any]]:
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM calls ORDER BY id")]
    finally:
        db.close()


def stored_bytes(tmp: Path) -> bytes:
    """Every byte telemetry wrote under `tmp` (database, WAL, JSONL), for leak checks."""
    return b"".join(p.read_bytes() for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != "salt")


# ---- outcomes and the filter ------------------------------------------------------------------
def test_classify_outcomes() -> None:
    from mcp_types import ErrorData

    assert classify({"content": []}, None) == ("ok", None)
    assert classify({"content": [], "isError": True}, None) == ("tool_error", None)
    assert classify(None, MCPError.from_error_data(ErrorData(code=-32602, message="bad")))[0] == "protocol_error"
    assert classify(None, UpstreamTimeout("slow", server="s")) == ("timeout", -32011)
    assert classify(None, GatewayError("busy", code=GATEWAY_REJECTED)) == ("rejected", GATEWAY_REJECTED)
    assert classify(None, UpstreamUnavailable("down"))[0] == "unavailable"
    assert classify(None, UpstreamClosed("gone"))[0] == "unavailable"
    assert classify(None, asyncio.CancelledError())[0] == "cancelled"
    assert classify(None, RuntimeError("bug"))[0] == "internal_error"


async def test_filter_records_every_outcome_and_reraises(tmp_path: Path) -> None:
    tel = Telemetry(TelemetrySettings(data_dir=str(tmp_path), sqlite_path=""))

    async def terminal(call: ToolCall) -> dict[str, Any]:
        kind = call.arguments["kind"]
        if kind == "timeout":
            raise UpstreamTimeout("no answer", server="srv")
        if kind == "bug":
            raise RuntimeError("boom")
        await anyio.sleep(0.01)
        return {"content": [{"type": "text", "text": "x" * 400}], "isError": kind == "tool_error"}

    pipe = Pipeline(terminal, [tel.filter, tel.timer])
    for kind in ("ok", "tool_error", "timeout", "bug"):
        call = ToolCall("srv", "t", "srv__t", {"name": "t", "arguments": {"kind": kind}})
        call.session_id = "client-1"
        call.attrs.update(retries=1 if kind == "ok" else 0, task={"task_type": "debug", "user_intent": "find it"})
        try:
            await pipe(call)
        except (UpstreamTimeout, RuntimeError):
            pass
    assert tel.filter.inflight == 0
    records: list[CallRecord] = []
    tel.dispatch_batch = records.extend  # type: ignore[method-assign]
    tel.process_pending()
    assert [r.outcome for r in records] == ["ok", "tool_error", "timeout", "internal_error"]
    ok = records[0]
    assert ok.total_ms >= 10 and ok.upstream_ms >= 10 and ok.gateway_ms < ok.total_ms
    assert ok.response_bytes > 400 and ok.tokens_out == (ok.response_bytes + 3) // 4
    assert ok.retries == 1 and ok.task_type == "debug" and ok.user_intent == "find it"
    assert [r.seq for r in records] == [1, 2, 3, 4] and len({r.session for r in records}) == 1
    assert records[0].session != "client-1"  # salted, never as given
    assert records[2].error_code == -32011


async def test_disabled_records_nothing(tmp_path: Path) -> None:
    tel = Telemetry(TelemetrySettings(enabled=False, data_dir=str(tmp_path)))
    assert tel.sinks == []

    async def terminal(call: ToolCall) -> dict[str, Any]:
        return {"content": []}

    await Pipeline(terminal, [tel.filter, tel.timer])(ToolCall("s", "t", "s__t", {"name": "t"}))
    await tel.start()
    await tel.flush()
    await tel.stop()
    assert not tel.pending and tel.records == 0 and not os.listdir(tmp_path)


async def test_full_queue_drops_and_counts_never_blocks(tmp_path: Path) -> None:
    """A stuck sink and a broken one: calls never wait for a sink; drops and failures are counted.

    The stuck sink's `write` waits for `release`, set only after the calls (or by a 60 s timer):
    had a call waited on it, the calls would end after the timer, which the test sees -- a verdict
    that does not depend on how fast the machine is (an `elapsed < 0.5 s` bound did)."""
    release = threading.Event()

    class Slow(ThreadedSink):
        def write(self, items: list[Any]) -> None:
            release.wait()

    class Broken(ThreadedSink):
        def write(self, items: list[Any]) -> None:
            raise OSError("disk full")

    tel = Telemetry(TelemetrySettings(data_dir=str(tmp_path), sqlite_path="", queue_size=16))
    slow, broken = Slow("slow", 16, batch=4), Broken("broken", 1000)
    tel.sinks += [slow, broken]
    await tel.start()

    async def terminal(call: ToolCall) -> dict[str, Any]:
        return {"content": []}

    pipe = Pipeline(terminal, [tel.filter, tel.timer])
    timer = threading.Timer(60, release.set)
    timer.start()
    try:
        for i in range(200):
            await pipe(ToolCall("s", "t", "s__t", {"name": "t", "arguments": {"i": i}}))
            if i % 50 == 49:
                tel.process_pending()
        assert not release.is_set(), "the calls waited for the stuck sink"
    finally:
        timer.cancel()
    assert tel.filter.dropped > 0  # the hand-off queue (16) overflowed between two drains
    tel.process_pending()
    assert slow.dropped > 0  # 200 records for a queue of 16 whose writer never finishes a batch
    await wait_for(lambda: broken.failed > 0)
    assert "disk full" in (broken.last_error or "")
    dropped = tel.dropped()
    assert dropped["pipeline"] == tel.filter.dropped and dropped["slow"] == slow.dropped
    slow.queue.clear()  # don't wait for the slow writer at stop
    release.set()
    await tel.stop()


# ---- privacy ------------------------------------------------------------------------------------
def test_salt_is_made_once_and_kept_private(tmp_path: Path) -> None:
    path = tmp_path / "mcpopt" / "salt"
    salt = load_salt(path)
    assert len(salt) == 32 and load_salt(path) == salt
    assert (path.stat().st_mode & 0o777) == 0o600
    h = hash_arguments({"b": 1, "a": [1, 2]}, salt)
    assert h == hash_arguments({"a": [1, 2], "b": 1}, salt)  # canonical: key order does not matter
    assert h != hash_arguments({"a": [1, 2], "b": 1}, load_salt(tmp_path / "other" / "salt"))


def test_redaction_rules() -> None:
    out = redact(
        {**SECRET_ARGS, "max_tokens": 100, "path": "/usr/lib/python3.11/site-packages", "nested": [{"secret": "x"}]}
    )
    text = json.dumps(out)
    for secret in SECRETS:
        assert secret not in text
    assert out["api_key"] == REDACTED and out["password"] == REDACTED and out["nested"][0]["secret"] == REDACTED
    assert "weather in Paris" in out["text"] and "[EMAIL]" in out["text"]
    assert out["max_tokens"] == 100 and out["path"] == "/usr/lib/python3.11/site-packages"


def test_level_from_short_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from mcpopt.errors import ConfigError

    monkeypatch.setenv("MCPOPT_TELEMETRY_LEVEL", "detailed")
    assert load_config(data={"mcpServers": {}}).gateway.telemetry.level == "detailed"
    monkeypatch.setenv("MCPOPT_TELEMETRY_LEVEL", "verbose")
    with pytest.raises(ConfigError, match="MCPOPT_TELEMETRY_LEVEL"):
        load_config(data={"mcpServers": {}})
    monkeypatch.delenv("MCPOPT_TELEMETRY_LEVEL")
    monkeypatch.setenv("MCPOPT_GATEWAY__TELEMETRY__LEVEL", "minimal")
    assert load_config(data={"mcpServers": {}}).gateway.telemetry.level == "minimal"


@pytest.mark.parametrize("level", ["minimal", "standard", "detailed"])
async def test_privacy_levels_on_real_calls(tmp_path: Path, level: str) -> None:
    """Real calls through a real gateway to a real upstream process; then every byte on disk is checked."""
    jsonl = tmp_path / "calls.jsonl"
    async with telemetry_gateway(tmp_path, telemetry={"level": level, "jsonl_path": str(jsonl)}) as (gw, tel):
        async with Client(gw.server, mode="legacy") as client:
            for _ in range(2):
                result = await client.call_tool("fake__echo", SECRET_ARGS)
                assert not result.is_error
            await client.call_tool("fake__echo", {"text": "something else"})
        await tel.flush()
        rows = db_rows(tmp_path / "telemetry.db")
    assert len(rows) == 3 and all(r["outcome"] == "ok" and r["level"] == level for r in rows)
    assert all(r["server"] == "fake" and r["tool"] == "echo" and r["total_ms"] > 0 for r in rows)
    on_disk = stored_bytes(tmp_path)
    assert len(jsonl.read_text().splitlines()) == 3
    for secret in SECRETS:
        assert secret.encode() not in on_disk, f"{secret!r} reached the {level} store"
    if level == "minimal":
        assert all(r["args_hash"] == "" and r["arguments"] == "" for r in rows)
        assert b"weather in Paris" not in on_disk
    elif level == "standard":
        assert rows[0]["args_hash"] == rows[1]["args_hash"] != rows[2]["args_hash"]
        assert all(r["arguments"] == "" for r in rows)
        for value in SECRET_ARGS.values():  # no raw argument at all, secret or not
            assert value.encode() not in on_disk
        assert b"weather in Paris" not in on_disk and b"something else" not in on_disk
    else:
        args = json.loads(rows[0]["arguments"])
        assert args["api_key"] == REDACTED and args["password"] == REDACTED
        assert args["text"].startswith("weather in Paris; mail [EMAIL]")
        assert json.loads(rows[2]["arguments"]) == {"text": "something else"}


# ---- store and CLI ------------------------------------------------------------------------------
async def test_store_stats_and_export_cli(tmp_path: Path) -> None:
    # The timeout makes `hang` a timeout; it applies to the echo calls too, so it is generous
    # enough that none of them times out on a loaded machine (300 ms was not).
    async with telemetry_gateway(tmp_path, {"fake": fake_entry(timeout_ms=3000)}) as (gw, tel):
        async with Client(gw.server, mode="legacy") as client:
            for i in range(6):
                await client.call_tool("fake__echo", {"text": f"hello {i}"})
            with pytest.raises(MCPError):
                await client.call_tool("fake__hang", {})
    db = tmp_path / "telemetry.db"
    runner = CliRunner()
    from mcpopt.cli import app

    res = runner.invoke(app, ["stats", "--db", str(db), "--since", "1h", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    echo = next(t for t in report["tools"] if t["tool"] == "echo")
    hang = next(t for t in report["tools"] if t["tool"] == "hang")
    assert hang["errors"] == 1 and report["overall"]["outcomes"] == {"ok": 6, "timeout": 1}
    assert echo["calls"] == 6 and echo["grade"] in "ABCDF" and echo["p95_ms"] >= echo["p50_ms"] > 0
    res = runner.invoke(app, ["stats", "--db", str(db)])
    assert res.exit_code == 0 and "echo" in res.output and "Tools" in res.output
    out = tmp_path / "export.jsonl"
    res = runner.invoke(app, ["telemetry", "export", "--db", str(db), "--since", "10m", "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(db_rows(db)) >= 6 and {"ts", "server", "tool", "outcome", "total_ms"} <= set(lines[0])
    future = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + 3600))
    res = runner.invoke(app, ["telemetry", "export", "--db", str(db), "--since", future, "--out", str(out)])
    assert res.exit_code == 0 and out.read_text() == ""
    res = runner.invoke(app, ["stats", "--db", str(db), "--since", "yesterday-ish"])
    assert res.exit_code == 2


async def test_retention_deletes_old_rows(tmp_path: Path) -> None:
    from mcpopt.telemetry.sinks import SqliteSink
    from mcpopt.telemetry.store import Store

    db = tmp_path / "t.db"
    store = Store(db)
    now = time.time()
    store.insert(
        [
            CallRecord(now - 40 * 86400, "s", "old", "s__old", "ok", 1.0),
            CallRecord(now, "s", "new", "s__new", "ok", 1.0),
        ]
    )
    store.close()
    sink = SqliteSink(db, retention_days=30)
    sink.start()
    sink.stop()
    assert [r["tool"] for r in db_rows(db)] == ["new"]


# ---- OpenTelemetry ------------------------------------------------------------------------------
META_UPSTREAM = f"""
import json, sys
sys.path.insert(0, {str(Path(FAKE).parent)!r})
import fake_upstream as f
f.TOOLS.append(f._tool("meta", "Return the request's _meta"))
_orig = f.handle
def handle(msg):
    p = msg.get("params") or {{}}
    if msg.get("method") == "tools/call" and p.get("name") == "meta":
        f.send({{"jsonrpc": "2.0", "id": msg["id"], "result": f.text_result(json.dumps(p.get("_meta") or {{}}))}})
        return
    _orig(msg)
f.handle = handle
f.main()
"""


async def test_otlp_spans_metrics_and_traceparent_upstream(tmp_path: Path) -> None:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    script = tmp_path / "meta_upstream.py"
    script.write_text(META_UPSTREAM, encoding="utf-8")
    client_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    with Receiver() as rx:
        settings = {"otlp_endpoint": rx.url, "otlp_interval_ms": 300, "sqlite_path": ""}
        servers = {"up": {"command": sys.executable, "args": [str(script)]}}
        async with telemetry_gateway(tmp_path, servers, settings) as (gw, tel):
            async with Client(gw.server, mode="legacy") as client:
                seen = json.loads(
                    (
                        await client.call_tool(
                            "up__meta", {"q": 1}, meta={"traceparent": f"00-{client_trace}-00f067aa0ba902b7-01"}
                        )
                    )
                    .content[0]
                    .text  # type: ignore[union-attr]
                )
                plain = json.loads((await client.call_tool("up__meta", {})).content[0].text)  # type: ignore[union-attr]
                await client.call_tool("up__echo", {"text": "x"})
            await tel.flush()
            assert await wait_for(lambda: len(rx.bodies("/v1/metrics")) > 0, timeout=30)
    # The upstream saw our span as its parent, in the client's trace.
    version, trace_id, span_id, flags = seen["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", client_trace, "01") and span_id != "00f067aa0ba902b7"
    assert plain["traceparent"].split("-")[1] != client_trace
    spans = []
    for body in rx.bodies("/v1/traces"):
        req = ExportTraceServiceRequest.FromString(body)
        for rs in req.resource_spans:
            service = {a.key: a.value.string_value for a in rs.resource.attributes}["service.name"]
            for ss in rs.scope_spans:
                spans += [(service, s) for s in ss.spans]
    assert len(spans) == 3
    service, span = next((sv, s) for sv, s in spans if s.trace_id.hex() == client_trace)
    attrs = {a.key: a.value for a in span.attributes}
    assert service == "mcpopt" and span.name == "tools/call meta"
    assert span.span_id.hex() == span_id and span.parent_span_id.hex() == "00f067aa0ba902b7"
    assert span.kind == 2  # SERVER
    assert attrs["mcp.method.name"].string_value == "tools/call"
    assert attrs["gen_ai.tool.name"].string_value == "meta"
    assert attrs["gen_ai.operation.name"].string_value == "execute_tool"
    assert attrs["mcpopt.server"].string_value == "up" and attrs["mcpopt.outcome"].string_value == "ok"
    assert attrs["mcpopt.arguments.hash"].string_value  # standard: hashed, never raw
    assert "gen_ai.tool.call.arguments" not in attrs
    names = set()
    for body in rx.bodies("/v1/metrics"):
        for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics:
            for sm in rm.scope_metrics:
                names |= {m.name for m in sm.metrics}
    assert {"mcp.server.operation.duration", "mcpopt.tool.calls"} <= names


# ---- Prometheus ---------------------------------------------------------------------------------
PROMETHEUS = shutil.which("prometheus")


@contextlib.asynccontextmanager
async def prometheus(
    tmp_path: Path, ports: list[int]
) -> AsyncIterator[tuple[subprocess.Popen[bytes], Callable[[str], Any]]]:
    """A real Prometheus scraping the gateways on `ports` every second (one job, `mcpopt`).

    Yields its process (to report its stderr if it dies) and `query(promql) -> list of series`
    (the instant-query API's `data.result`; [] while Prometheus is not answering yet)."""
    prom_port = free_port()
    targets = ", ".join(f"'127.0.0.1:{p}'" for p in ports)
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: mcpopt\n    static_configs: [{{targets: [{targets}]}}]\n",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [
            PROMETHEUS or "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    api = f"http://127.0.0.1:{prom_port}/api/v1/query?query="

    async def query(q: str) -> list[dict[str, Any]]:
        with contextlib.suppress(OSError):
            status, body = await http_get(api + urllib.parse.quote(q), timeout=2)
            if status == 200:
                return json.loads(body)["data"]["result"]
        return []

    try:
        yield proc, query
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc.poll() is None:
            proc.kill()
        if proc.stderr:
            proc.stderr.close()


@pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary is missing (Debian package 'prometheus')")
async def test_real_prometheus_scrapes_metrics(tmp_path: Path) -> None:
    servers = {"fake": fake_entry(read_only_tools=["echo"], cache={"ttl_ms": 60_000})}
    async with telemetry_gateway(tmp_path, servers) as (gw, tel), serve_http(gw, tel) as port:
        async with Client(gw.server, mode="legacy") as client:
            for i in range(5):
                await client.call_tool("fake__echo", {"text": f"t{i % 2}"})  # 2 misses, 3 hits
            await client.call_tool("fake__sleep_then_answer", {"seconds": 0.01})
        status, body = await http_get(f"http://127.0.0.1:{port}/metrics")
        text = body.decode()
        assert status == 200 and 'mcpopt_tool_call_duration_seconds_bucket{le="0.15",outcome="ok",server="fake"' in text
        async with prometheus(tmp_path, [port]) as (proc, query):
            deadline = time.monotonic() + 90  # Prometheus's start and first scrape, on a loaded machine
            series: list[dict[str, Any]] = []
            while time.monotonic() < deadline and not series:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
                series = await query('mcpopt_tool_call_duration_seconds_count{job="mcpopt"}')
                if not series:
                    await anyio.sleep(0.5)
            by_tool = {s["metric"]["tool"]: s for s in series}
            assert set(by_tool) == {"echo", "sleep_then_answer"}, series
            assert by_tool["echo"]["metric"]["server"] == "fake" and by_tool["echo"]["metric"]["outcome"] == "ok"
            assert float(by_tool["echo"]["value"][1]) == 5
            hits = await query('mcpopt_cache_hits_total{tool="echo"}')
            assert hits and float(hits[0]["value"][1]) == 3
            up = await query("mcpopt_upstream_up")
            assert up and up[0]["metric"]["server"] == "fake" and float(up[0]["value"][1]) == 1
            assert await query("mcpopt_breaker_state") and await query("mcpopt_inflight_calls")


@pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary is missing (Debian package 'prometheus')")
async def test_real_prometheus_scrapes_two_replicas(tmp_path: Path) -> None:
    """Two gateway replicas, two targets of one scrape job: each target's series are its own calls
    (Prometheus's `instance` label), and `mcpopt_gateway_info` names the replica behind each."""
    async with contextlib.AsyncExitStack() as stack:
        ports: dict[str, int] = {}
        for name, n in (("A", 2), ("B", 3)):
            cfg = load_config(
                data={
                    "mcpServers": {"fake": fake_entry()},
                    "gateway": {
                        "shared": {"replica": f"replica-{name}"},
                        "telemetry": {"data_dir": str(tmp_path / name)},
                    },
                }
            )
            gw = build_gateway(cfg)
            await stack.enter_async_context(gw.running())
            ports[name] = await stack.enter_async_context(serve_http(gw, gw.telemetry))
            async with Client(gw.server, mode="legacy") as client:
                for i in range(n):
                    await client.call_tool("fake__echo", {"text": f"t{i}"})
        async with prometheus(tmp_path, list(ports.values())) as (proc, query):
            deadline = time.monotonic() + 30
            counts: dict[str, float] = {}
            while time.monotonic() < deadline and len(counts) < 2:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
                series = await query('mcpopt_tool_call_duration_seconds_count{job="mcpopt",tool="echo"}')
                counts = {s["metric"]["instance"]: float(s["value"][1]) for s in series}
                if len(counts) < 2:
                    await anyio.sleep(0.5)
            assert counts == {f"127.0.0.1:{ports['A']}": 2.0, f"127.0.0.1:{ports['B']}": 3.0}
            info = await query("mcpopt_gateway_info")
            assert {s["metric"]["instance"]: s["metric"]["replica"] for s in info} == {
                f"127.0.0.1:{ports['A']}": "replica-A",
                f"127.0.0.1:{ports['B']}": "replica-B",
            }
            total = await query('sum(mcpopt_tool_call_duration_seconds_count{tool="echo"})')
            assert total and float(total[0]["value"][1]) == 5  # one query over every replica


def test_store_inserts_batches_across_statement_boundaries(tmp_path: Path) -> None:
    """Multi-row INSERTs of `ROWS_PER_INSERT` rows: a batch that spans several statements keeps
    every record, in order, field for field."""
    from mcpopt.telemetry.store import ROWS_PER_INSERT, Store

    n = ROWS_PER_INSERT * 2 + 37
    records = [
        CallRecord(1000.0 + i, "s", f"t{i % 3}", f"s__t{i % 3}", "ok", float(i), session=f"h{i}", seq=i)
        for i in range(n)
    ]
    store = Store(tmp_path / "t.db")
    store.insert(records)
    rows = list(store.calls())
    assert len(rows) == n
    assert [(r["tool"], r["total_ms"], r["seq"], r["session"]) for r in rows] == [
        (rec.tool, rec.total_ms, rec.seq, rec.session) for rec in records
    ]


async def test_http_fast_path_calls_carry_their_client_session(tmp_path: Path) -> None:
    """Handshake-era `tools/call` POSTs answered by the HTTP front's fast path are recorded under
    their own client session (regression: that path built its ClientLink without a session id, so
    sticky routing, per-session sequences and code sessions saw every HTTP client as one)."""
    async with telemetry_gateway(tmp_path) as (gw, tel), serve_http(gw, tel) as port:
        url = f"http://127.0.0.1:{port}/mcp"
        async with Client(url, mode="legacy") as one, Client(url, mode="legacy") as two:
            for client in (one, two, one, two):
                assert not (await client.call_tool("fake__echo", {"text": "x"})).is_error
        await tel.flush()
        assert tel.sqlite_path is not None
        rows = [r for r in db_rows(tel.sqlite_path) if r["tool"] == "echo"]
    by_session: dict[str, list[int]] = {}
    for r in rows:
        by_session.setdefault(r["session"], []).append(r["seq"])
    assert len(rows) == 4 and "" not in by_session
    assert sorted(by_session.values()) == [[1, 2], [1, 2]], by_session
