"""`Telemetry`: the hub between recording and monitoring -- filters, background loop, monitor, metrics, sinks.

It lives in `monitor/` because it feeds the monitor: `mcpopt.telemetry` records and never
imports what reads its records (ARCHITECTURE.md).

Lifecycle: build it with the gateway (`Telemetry(config.gateway.telemetry, gateway)`), put
`telemetry.filter` first and `telemetry.timer` last in the pipeline, `await telemetry.start()`
when the gateway starts and `await telemetry.stop()` when it stops. Between the two, a
background task drains the filter's hand-off queue every `TICK_S` (in slices, yielding to the
event loop between them), turns each call into a `CallRecord`, feeds the monitor and the
Prometheus metrics, and offers the record to each sink's bounded queue; every
`alert_interval_ms` it evaluates the alert rules. Every reader (status, `/metrics`, the
dashboard, alert evaluation, `flush`) processes what is pending first; `stop` processes what is left.

With `enabled: false` the filters pass calls straight through, no sink is made, nothing is
recorded; `/metrics` still shows the live gateway state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

from mcpopt.config import TelemetrySettings, config_data_dir, default_data_dir
from mcpopt.monitor.alerts import AlertEvent, WebhookSink
from mcpopt.monitor.monitor import Monitor
from mcpopt.telemetry.collector import Pending, TelemetryFilter, UpstreamTimer, build_records
from mcpopt.telemetry.privacy import ArgumentHasher, hash_id, load_salt
from mcpopt.telemetry.record import CallRecord
from mcpopt.telemetry.sinks import JsonlSink, SqliteSink, ThreadedSink
from mcpopt.telemetry.store import store_path

logger = logging.getLogger(__name__)

TICK_S = 0.05
"""How often the background loop drains the hand-off queue (seconds)."""
SLICE = 32
"""Records processed between two yields to the event loop (~2 ms here: a call whose answer
arrives meanwhile waits at most about that long)."""
_SESSIONS = 10_000
"""Sessions whose call counter is kept (least recently used go first)."""


def _log_failed(exc: Exception) -> None:
    logger.error("telemetry: a record could not be processed", exc_info=exc)


class Telemetry:
    """Everything telemetry for one gateway.

    Args:
        settings: `gateway.telemetry` from the config (defaults when None).
        gateway: the `Gateway` (for upstream health, the cache, and the benchmark tool); None
            for a standalone collector (benchmarks, tests).

    Attributes:
        filter: `TelemetryFilter`, first in the pipeline.
        timer: `UpstreamTimer`, last in the pipeline (optional; gives the upstream/gateway split).
        monitor: the `Monitor` (percentiles, grades, alerts).
        prometheus: the `PrometheusMetrics` (None when `prometheus: false`).
        sinks: the running sinks (SQLite, JSONL, OTLP, webhook).
    """

    def __init__(
        self, settings: TelemetrySettings | None = None, gateway: Any = None, data_dir: Path | None = None
    ) -> None:
        self.settings = settings = settings if settings is not None else TelemetrySettings()
        self.gateway = gateway
        shared = getattr(getattr(getattr(gateway, "config", None), "gateway", None), "shared", None)
        self.replica_id: str = str(getattr(shared, "replica", None) or "")
        """The gateway replica named in every record (`CallRecord.gateway_replica`)."""
        self.enabled = settings.enabled
        self.level = settings.level
        # The config's data dir (`config_data_dir`) when the gateway builds it; standalone hubs
        # (benchmarks, tests) fall back to the settings' own key, then the XDG default.
        if data_dir is None:
            data_dir = Path(settings.data_dir).expanduser() if settings.data_dir else default_data_dir()
        self.data_dir = data_dir
        self.pending: deque[Pending] = deque()
        self.filter = TelemetryFilter(
            self.pending,
            settings.queue_size,
            enabled=self.enabled,
            propagate=bool(
                self.enabled and settings.otlp_endpoint and settings.propagate_trace and self.level != "minimal"
            ),
        )
        self.timer = UpstreamTimer(self.enabled)
        self.monitor = Monitor(settings)
        self.prometheus: Any = None
        if settings.prometheus:
            from mcpopt.monitor.prom import PrometheusMetrics

            self.prometheus = PrometheusMetrics(self)
        self.sinks: list[ThreadedSink] = []
        self.sqlite: SqliteSink | None = None
        self.webhook: WebhookSink | None = None
        self._salt: bytes | None = None
        self._hasher: ArgumentHasher | None = None
        self._seqs: OrderedDict[str, int] = OrderedDict()
        self._session_hashes: dict[str, str] = {}
        self._wall0 = time.time()
        self._perf0 = time.perf_counter()
        self._task: asyncio.Task[None] | None = None
        self._next_eval = 0.0
        self.records = 0
        """Records processed since start."""
        if self.enabled:
            self._make_sinks()

    @classmethod
    def from_config(cls, config: Any, gateway: Any = None) -> Telemetry:
        """From a whole `Config` (`config.gateway.telemetry`, data dir `config_data_dir(config)`)."""
        return cls(config.gateway.telemetry, gateway, config_data_dir(config))

    # ---- sinks --------------------------------------------------------------------------
    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite store's file (None when disabled with `sqlite_path: ""`)."""
        return store_path(self.settings, self.data_dir)

    def _make_sinks(self) -> None:
        s = self.settings
        db = self.sqlite_path
        if db is not None:
            self.sqlite = SqliteSink(db, s.retention_days, s.queue_size)
            self.sinks.append(self.sqlite)
        if s.postgres_url:
            from mcpopt.telemetry.postgres import PostgresSink

            self.sinks.append(PostgresSink(s.postgres_url, s.retention_days, s.queue_size))
        if s.jsonl_path:
            self.sinks.append(JsonlSink(Path(s.jsonl_path).expanduser(), s.queue_size))
        if s.otlp_endpoint:
            from mcpopt.telemetry.otel import OtelSink

            self.sinks.append(
                OtelSink(
                    s.otlp_endpoint,
                    headers=s.otlp_headers,
                    interval_s=s.otlp_interval_ms / 1000,
                    service_name=s.service_name,
                    spans=self.level != "minimal",
                    queue_size=s.queue_size,
                )
            )
        if s.webhook_url:
            self.webhook = WebhookSink(s.webhook_url)
            self.sinks.append(self.webhook)

    @property
    def salt(self) -> bytes:
        """The per-install salt (`<data_dir>/salt`); a per-process one if that file cannot be used."""
        if self._salt is None:
            try:
                self._salt = load_salt(self.data_dir / "salt")
            except OSError as exc:
                logger.warning(
                    "telemetry: cannot keep a salt in %s (%s); hashes last this process only", self.data_dir, exc
                )
                self._salt = secrets.token_bytes(32)
        return self._salt

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start the sinks' threads and the background loop (idempotent)."""
        if not self.enabled or self._task is not None:
            return
        if self.level != "minimal":
            _ = self.salt
        for sink in self.sinks:
            sink.start()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="mcpopt-telemetry")

    async def stop(self) -> None:
        """Process what is pending, then flush and stop every sink (bounded: ~5 s per sink)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.process_pending()
        for sink in self.sinks:
            await asyncio.to_thread(sink.stop)

    async def flush(self, timeout_s: float = 30.0) -> None:
        """Process every pending call, evaluate alerts, and wait for the sinks to write (tests, CLI).

        `timeout_s` bounds the wait per sink; it returns as soon as a sink has written everything,
        and is generous because readers (the optimizer's telemetry rows, tests) need every record
        and a loaded machine's SQLite writer can lag by seconds."""
        self.process_pending()
        self.evaluate()
        for sink in self.sinks:
            await asyncio.to_thread(sink.drain, timeout_s)

    async def _loop(self) -> None:
        interval = self.settings.alert_interval_ms / 1000
        while True:
            await asyncio.sleep(TICK_S)
            while self.pending:
                self.process_pending(SLICE)
                await asyncio.sleep(0)
            now = time.monotonic()
            if now >= self._next_eval:
                self._next_eval = now + interval
                try:
                    self.evaluate()
                except Exception:  # noqa: BLE001 - the monitor must never take the gateway down
                    logger.exception("telemetry: alert evaluation failed")

    # ---- processing ---------------------------------------------------------------------
    def wall(self, t_perf: float) -> float:
        """Unix seconds of a `perf_counter()` reading."""
        return self._wall0 + (t_perf - self._perf0)

    def session_hash(self, session: str) -> str:
        """`hash_id(session, salt)`, remembered for the last `_SESSIONS` sessions (a session's calls
        all hash the same id, so this is one dict lookup per call)."""
        hashes = self._session_hashes
        digest = hashes.get(session)
        if digest is None:
            digest = hashes[session] = hash_id(session, self.salt)
            if len(hashes) > _SESSIONS:
                del hashes[next(iter(hashes))]
        return digest

    def principal_hash(self, key: str) -> str:
        """The audit id of a principal at `standard`: `hash_id` of its key with this install's salt."""
        return self.session_hash("principal\0" + key)

    def hash_arguments(self, arguments: Any) -> str:
        """`privacy.hash_arguments(arguments, salt)` (16 hex characters, "" for none), by an
        `ArgumentHasher` made at the first call."""
        hasher = self._hasher
        if hasher is None:
            hasher = self._hasher = ArgumentHasher(self.salt)
        return hasher(arguments)

    def next_seq(self, session: str) -> int:
        seqs = self._seqs
        n = seqs.pop(session, 0) + 1
        seqs[session] = n
        if len(seqs) > _SESSIONS:
            seqs.popitem(last=False)
        return n

    def process_pending(self, limit: int | None = None) -> int:
        """Build and dispatch up to `limit` pending records (all when None); returns how many."""
        pending = self.pending
        if not pending:
            return 0
        n = len(pending) if limit is None else max(0, min(limit, len(pending)))
        popleft = pending.popleft
        self.dispatch_batch(build_records(self, [popleft() for _ in range(n)], _log_failed))
        return n

    def dispatch(self, rec: CallRecord) -> None:
        """Feed one record to the monitor, Prometheus and every record sink."""
        self.dispatch_batch([rec])

    def dispatch_batch(self, recs: list[CallRecord]) -> None:
        """Feed records (in order) to the monitor and Prometheus, then to every record sink at once
        (one queue extension and one wake-up of its writer per batch, not per record)."""
        if not recs:
            return
        try:
            self.monitor.observe_many(recs)
        except Exception:  # noqa: BLE001
            logger.exception("telemetry: records could not be added to the monitor")
        if self.prometheus is not None:
            try:
                self.prometheus.observe_many(recs)
            except Exception:  # noqa: BLE001
                logger.exception("telemetry: records could not be counted for Prometheus")
        self.records += len(recs)
        for sink in self.sinks:
            if sink is not self.webhook:
                sink.offer_many(recs)

    def evaluate(self) -> list[AlertEvent]:
        """Run the alert rules (over every finished call: pending ones are processed first); send
        events to the store and the webhook."""
        self.process_pending()
        events = self.monitor.evaluate(self.upstream_health() if self.gateway is not None else None)
        for ev in events:
            if self.sqlite is not None:
                self.sqlite.offer(ev)
            if self.webhook is not None:
                self.webhook.offer(ev)
        return events

    # ---- reports ------------------------------------------------------------------------
    def dropped(self) -> dict[str, int]:
        """Records dropped per queue: `pipeline` (the filter's hand-off) and each sink."""
        out = {"pipeline": self.filter.dropped}
        for sink in self.sinks:
            out[sink.name] = sink.dropped
        return out

    def access_stats(self) -> dict[str, Any]:
        """Authentication, rate-limit and isolation counters of the gateway (`/metrics`, status).

        Returns:
            `{"auth": {refused: {"401": n, "403": n}, jwks_fetches, introspections} | {},
            "limits": RateLimiter.stats() | {}, "isolation": {server: IsolatedSessions.stats()}}`.
        """
        gw = self.gateway
        if gw is None:
            return {}
        out: dict[str, Any] = {"auth": {}, "limits": {}, "isolation": {}}
        auth = getattr(gw, "authenticator", None)
        if auth is not None:
            out["auth"] = auth.stats()
        limiter = getattr(gw, "limiter", None)
        if limiter is not None:
            out["limits"] = limiter.stats()
        for name, sessions in (getattr(gw, "isolated", None) or {}).items():
            out["isolation"][name] = sessions.stats()
        return out

    def upstream_health(self) -> list[dict[str, Any]]:
        """Per server: state, restarts, `rss_restarts` (at `max_rss_mb`), last error, and per replica
        its state, breaker and `resources` (`ResourceWatch.usage()`: pid, cpu_percent, cpu_seconds,
        rss_bytes, open_fds, children, rss growth; None for HTTP replicas or before the first sample).

        Works with a plain `Upstream` (one replica, breaker "closed") and with a `ServerPool`
        (its `stats()` rows).
        """
        gw = self.gateway
        if gw is None:
            return []
        rows = []
        watch = getattr(gw, "watch", None)
        for name, up in gw.upstreams.items():
            stats = getattr(up, "stats", None)
            if callable(stats):
                replicas = [
                    {
                        "replica": r.get("replica", i + 1),
                        "state": r.get("state", up.state),
                        "breaker": r.get("breaker", "closed"),
                        "inflight": r.get("inflight", 0),
                        "ewma_ms": r.get("ewma_ms"),
                    }
                    for i, r in enumerate(stats())
                ]
            else:
                replicas = [{"replica": 1, "state": up.state, "breaker": "closed", "inflight": None, "ewma_ms": None}]
            if watch is not None:
                for i, rep in enumerate(replicas):
                    rep["resources"] = watch.usage(name, i)
            rows.append(
                {
                    "server": name,
                    "state": up.state,
                    "restarts": getattr(up, "restarts", 0),
                    "rss_restarts": watch.rss_restarts.get(name, 0) if watch is not None else 0,
                    "isolated_processes": watch.isolated_usage(name) if watch is not None else None,
                    "error": getattr(up, "last_error", None),
                    "replicas": replicas,
                }
            )
        return rows

    def status(self) -> dict[str, Any]:
        """The performance status (`mcpopt__get_performance_status`, the dashboard's data).

        Returns:
            `{now, level, enabled, overall, tools, servers (with health), timeline, alerts
            (active), recent_alerts, cache, telemetry: {records, dropped, sinks}, watch (the resource
            watch's `stats()`: interval, samples, restarts at max_rss_mb, or None)}`; latencies
            in ms, rates 0..1; see `Monitor.summary` for the per-scope keys. Calls still pending
            are processed first: the figures include every call that has finished.
        """
        self.process_pending()
        summary = self.monitor.summary()
        health = {row["server"]: row for row in self.upstream_health()}
        servers = []
        for row in summary["servers"]:
            servers.append({**row, "health": health.pop(row["server"], None)})
        servers.extend({"server": name, "calls": 0, "grade": None, "health": h} for name, h in health.items())
        overall = summary["overall"]
        cache: dict[str, Any] = {
            "hits": overall["cache_hits"],
            "misses": overall["cache_misses"],
            "hit_rate": overall["hit_rate"],
        }
        gw_cache = getattr(self.gateway, "cache", None)
        if gw_cache is not None:
            with contextlib.suppress(Exception):
                cache["entries"] = len(gw_cache.l1)
                cache["bytes"] = gw_cache.l1.bytes
        return {
            "now": time.time(),
            "enabled": self.enabled,
            "level": self.level,
            "window_s": summary["window_s"],
            "overall": overall,
            "tools": summary["tools"],
            "servers": servers,
            "timeline": self.monitor.timeline.snapshot(),
            "alerts": self.monitor.alerts.active(),
            "recent_alerts": self.monitor.alerts.recent(20),
            "cache": cache,
            "tokens": {
                "input": overall["tokens_in"],
                "output": overall["tokens_out"],
                "saved": overall["tokens_saved"],
            },
            "telemetry": {
                "records": self.records,
                "pending": len(self.pending),
                "inflight": self.filter.inflight,
                "dropped": self.dropped(),
                "sinks": [s.stats() for s in self.sinks],
                "sqlite_path": str(self.sqlite_path) if self.sqlite is not None else None,
                "pid": os.getpid(),
            },
            "watch": watch.stats() if (watch := getattr(self.gateway, "watch", None)) is not None else None,
        }
