"""Telemetry processes finished calls a batch at a time (`build_records`, `Monitor.observe_many`,
`PrometheusMetrics.observe_many`, `EwmaDetector.add_many`, `ArgumentHasher`): the records and every
figure must be exactly those of processing them one at a time. The SQLite sink gathers up to a
statement of rows per transaction (`fill`), its linger ended by a full batch or a `drain`."""

from __future__ import annotations

import random
import time
from pathlib import Path
from time import perf_counter
from typing import Any

import pytest

from mcpopt.auth.principal import LOCAL, Principal
from mcpopt.config import TelemetrySettings
from mcpopt.monitor import Monitor
from mcpopt.monitor.anomaly import EwmaDetector
from mcpopt.monitor.hub import Telemetry
from mcpopt.monitor.prom import PrometheusMetrics
from mcpopt.monitor.stats import Series
from mcpopt.pipeline import ToolCall
from mcpopt.telemetry.collector import Pending, build_record, build_records
from mcpopt.telemetry.privacy import ArgumentHasher, hash_arguments
from mcpopt.telemetry.record import FIELDS, OUTCOMES, CallRecord, group
from mcpopt.telemetry.sinks import FILL, LINGER_S, SqliteSink, ThreadedSink
from mcpopt.telemetry.store import ROWS_PER_INSERT


def _records(rng: random.Random, n: int, tools: list[tuple[str, str]], step_s: float) -> list[CallRecord]:
    t = 1_700_000_000.0 + rng.random()
    out = []
    for i in range(n):
        t += rng.random() * step_s
        server, tool = rng.choice(tools)
        ms = round(rng.lognormvariate(0, 1) * (40 if i > n // 2 else 1), 3)  # a latency shift halfway
        outcome = rng.choice(OUTCOMES) if rng.random() < (0.4 if i > 3 * n // 4 else 0.05) else "ok"
        out.append(
            CallRecord(
                round(t, 6),
                server,
                tool,
                f"{server}__{tool}",
                outcome,
                ms,
                upstream_ms=rng.choice([0.0, ms / 2]),
                request_bytes=rng.randint(0, 99),
                response_bytes=rng.randint(0, 999),
                tokens_in=rng.randint(0, 25),
                tokens_out=rng.randint(0, 250),
                tokens_saved=rng.randint(0, 2),
                cache=rng.choice(["", "hit", "miss"]),
                retries=rng.randint(0, 2),
            )
        )
    return out


def _series_state(s: Series) -> tuple[Any, ...]:
    detectors = [[getattr(d, k) for k in d.__slots__] for d in (s.latency, s.errors_ewma)]
    totals = [getattr(s, k) for k in s.__slots__ if k not in ("latency", "errors_ewma", "samples", "outcomes")]
    return (list(s.samples), list(s.outcomes.items()), totals, detectors)


def _monitor_state(m: Monitor) -> tuple[Any, ...]:
    return ([(k, _series_state(s)) for k, s in m.tools.items()], m.timeline.snapshot(1000))


def _prom_state(p: PrometheusMetrics) -> list[Any]:
    return [
        (
            key,
            [(o, h.counts, h.sum, h.count) for o, h in s.durations.items()],
            (s.upstream.counts, s.upstream.sum, s.upstream.count),
            [getattr(s, k) for k in s.__slots__ if k not in ("durations", "upstream")],
        )
        for key, s in p.series.items()
    ]


@pytest.mark.parametrize("seed", range(6))
def test_monitor_and_prometheus_batches_give_the_figures_of_one_by_one(seed: int) -> None:
    rng = random.Random(seed)
    tools = [("a", "x"), ("a", "y"), ("b", "x")][: 1 + seed % 3]
    # Calls 10 ms apart stay within one timeline bucket per batch; 0.3 s apart cross buckets.
    recs = _records(rng, 3000, tools, 0.3 if seed % 2 else 0.01)
    settings = TelemetrySettings(anomaly_min_calls=rng.choice([2, 5, 30]))
    one, many = Monitor(settings), Monitor(settings)
    p_one, p_many = PrometheusMetrics(None), PrometheusMetrics(None)  # type: ignore[arg-type]
    flagged = 0
    i = 0
    while i < len(recs):
        batch = recs[i : i + rng.randint(1, 40)]
        i += len(batch)
        for rec in batch:
            one.observe(rec)
            p_one.observe(rec)
        many.observe_many(batch)
        p_many.observe_many(batch)
        flagged += sum(s.latency.flagged or s.errors_ewma.flagged for s in many.tools.values())
    assert _monitor_state(many) == _monitor_state(one)
    assert _prom_state(p_many) == _prom_state(p_one)
    now = recs[-1].ts + 1
    assert many.summary(now) == one.summary(now)
    assert flagged  # the shifts were seen: the detectors' flagging paths ran too


def test_ewma_add_many_leaves_the_state_of_add() -> None:
    rng = random.Random(7)
    for kind in ("latency", "errors"):
        a, b = EwmaDetector(kind, min_samples=10, adapt_after=50), EwmaDetector(kind, min_samples=10, adapt_after=50)
        for step in range(200):
            level = 5.0 if step < 60 else 80.0
            samples = [
                (rng.lognormvariate(0, 0.2) * level) if kind == "latency" else float(rng.random() < level / 100)
                for _ in range(rng.randint(0, 9))
            ]
            for x in samples:
                a.add(x)
            b.add_many(samples)
            assert [getattr(b, k) for k in b.__slots__] == [getattr(a, k) for k in a.__slots__]


def test_argument_hasher_gives_hash_arguments(tmp_path: Path) -> None:
    salt = b"s" * 32
    hasher = ArgumentHasher(salt, size=4, max_bytes=64)
    cases: list[Any] = [None, {}, {"a": 1}, {"b": [1, 2], "a": "x"}, {1: 2}, {"q": "x" * 500}, {"a": 1}]
    cases += [{"n": i} for i in range(10)] + [{"n": 3}, {"a": 1}]  # past `size`: the oldest go
    for args in cases:
        assert hasher(args) == hash_arguments(args, salt)
    assert hasher({"a": [1, 2], "b": 1}) == hasher({"b": 1, "a": [1, 2]})  # canonical, cached or not
    assert ArgumentHasher(b"t" * 32)({"a": 1}) != hasher({"a": 1})


def _pending(i: int, **attrs: Any) -> Pending:
    call = ToolCall(
        "srv",
        "tool",
        "srv__tool",
        {"name": "tool", "arguments": {"password": "hunter2", "n": i}, "_meta": {"task_type": "t"}},
        session_id="s1",
        principal=Principal(subject="bob", kind="jwt") if i % 2 else LOCAL,
    )
    call.attrs.update(attrs)
    t0 = perf_counter()
    return (call, t0, t0 + 0.004, {"content": [], "isError": bool(i % 3 == 0)}, None)


@pytest.mark.parametrize("level", ["minimal", "standard", "detailed"])
def test_build_records_fill_every_field_by_name(tmp_path: Path, level: str) -> None:
    hub = Telemetry(TelemetrySettings(level=level), data_dir=tmp_path)
    hub.replica_id = "replica-1"
    item = _pending(
        1,
        queue_ms=0.25,
        upstream_ms=2.5,
        tokens_saved=7,
        cache="miss",
        coalesced=True,
        retries=2,
        replica=3,
        variants=["r1=canary"],
        decision="allow",
        policy_rule="p1",
        _trace=(5, 6, 7),
    )
    (rec,) = build_records(hub, [item])
    assert type(rec) is CallRecord and len(rec) == len(FIELDS)
    expected = {
        "server": "srv",
        "tool": "tool",
        "name": "srv__tool",
        "outcome": "ok",
        "queue_ms": 0.25,
        "upstream_ms": 2.5,
        "tokens_saved": 7,
        "cache": "miss",
        "coalesced": True,
        "retries": 2,
        "replica": 3,
        "error_code": None,
        "level": level,
        "variant": "r1=canary",
        "decision": "allow",
        "policy_rule": "p1",
        "gateway_replica": "replica-1",
    }
    assert {k: getattr(rec, k) for k in expected} == expected
    assert rec.total_ms == pytest.approx(4.0, abs=0.002) and rec.gateway_ms == round(rec.total_ms - 2.75, 3)
    assert rec.tokens_in == (rec.request_bytes + 3) // 4 > 0
    named = level != "minimal"
    assert (rec.session != "", rec.seq, rec.task_type, rec.trace_id) == (
        (True, 1, "t", f"{5:032x}") if named else (False, 0, "", "")
    )
    assert rec.args_hash == (hash_arguments({"password": "hunter2", "n": 1}, hub.salt) if named else "")
    who = item[0].principal
    assert rec.principal == {"minimal": "", "standard": hub.principal_hash(who.key), "detailed": who.label}[level]
    assert ("hunter2" not in rec.arguments) and (bool(rec.arguments) == (level == "detailed"))
    assert build_record(hub, item)._replace(ts=0.0, seq=0) == rec._replace(ts=0.0, seq=0)


def test_build_records_keep_the_others_when_one_fails(tmp_path: Path) -> None:
    hub = Telemetry(TelemetrySettings(), data_dir=tmp_path)
    items = [_pending(0), _pending(1, queue_ms="not a number"), _pending(2)]
    errors: list[Exception] = []
    recs = build_records(hub, items, errors.append)
    assert [r.outcome for r in recs] == ["tool_error", "ok"] and [type(e) for e in errors] == [ValueError]
    with pytest.raises(ValueError):
        build_records(hub, items)
    with pytest.raises(ValueError):
        build_record(hub, items[1])


def test_hub_processes_a_batch_with_a_bad_call_and_counts_the_rest(tmp_path: Path) -> None:
    hub = Telemetry(TelemetrySettings(sqlite_path=""), data_dir=tmp_path)
    for i in range(5):
        hub.pending.append(_pending(i, queue_ms="bad") if i == 2 else _pending(i))
    assert hub.process_pending() == 5
    assert hub.records == 4 and hub.monitor.tools[("srv", "tool")].calls == 4
    assert hub.prometheus.series[("srv", "tool")].durations["ok"].count == 2


def test_group_keeps_order_within_and_across_groups() -> None:
    recs = [CallRecord(float(i), s, "t", "n", "ok", 1.0) for i, s in enumerate("abab a".replace(" ", ""))]
    groups = group(recs, lambda r: r.server)
    assert list(groups) == ["a", "b"] and [r.ts for r in groups["a"]] == [0.0, 2.0, 4.0]
    assert group([], lambda r: r.server) == {} and list(group(recs[:1], lambda r: r.server)) == ["a"]


def test_cancelled_calls_feed_no_detector_in_a_batch() -> None:
    s_one, s_many = Series(min_samples=2), Series(min_samples=2)
    recs = [CallRecord(float(i), "s", "t", "n", ("cancelled", "ok", "timeout")[i % 3], 1.0 + i) for i in range(30)]
    for r in recs:
        s_one.add(r, r.ts)
    s_many.add_many(recs, [r.ts for r in recs])
    assert _series_state(s_many) == _series_state(s_one) and s_many.latency.n == 10 and s_many.errors_ewma.n == 20


class _Recording(ThreadedSink):
    def __init__(self, **kw: Any) -> None:
        super().__init__("recording", **kw)
        self.batches: list[list[Any]] = []

    def write(self, items: list[Any]) -> None:
        self.batches.append(list(items))


def test_a_sink_writes_once_fill_records_are_queued_without_waiting_out_its_linger() -> None:
    sink = _Recording(linger_s=600.0, fill=8, batch=512)
    sink.start()
    try:
        sink.offer_many(list(range(5)))
        sink.offer_many(list(range(5, 8)))  # the 8th record ends the linger
        deadline = time.monotonic() + 60
        while sum(map(len, sink.batches)) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [x for b in sink.batches for x in b] == list(range(8))
        sink.offer(8)  # fewer than `fill`: `drain` ends the linger
        assert sink.drain(60) and sink.batches[-1] == [8]
    finally:
        sink.stop()
    assert sink.written == 9 and sink.dropped == 0


def test_the_sqlite_sink_gathers_a_statement_of_rows_per_transaction(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "t.db")
    assert (sink.linger_s, sink.fill) == (LINGER_S, FILL) and FILL == ROWS_PER_INSERT and LINGER_S >= 1.0
    assert SqliteSink(tmp_path / "u.db", queue_size=100).fill == 100  # never more than the queue holds


def test_process_pending_takes_at_most_limit_records_and_none_for_a_negative_limit(tmp_path: Path) -> None:
    hub = Telemetry(TelemetrySettings(sqlite_path=""), data_dir=tmp_path)
    hub.pending.extend(_pending(i) for i in range(5))
    assert (hub.process_pending(-1), hub.process_pending(0), hub.process_pending(3)) == (0, 0, 3)
    assert hub.process_pending() == 2 and hub.records == 5 and not hub.pending
