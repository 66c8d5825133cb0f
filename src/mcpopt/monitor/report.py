"""`mcpopt stats` and `mcpopt telemetry export`: reports from the SQLite store.

Times on the command line: a duration back from now (`90s`, `15m`, `24h`, `7d`), an ISO-8601
date or date-time (`2025-06-01`, `2025-06-01T12:00:00`, local time unless it has an offset),
or Unix seconds.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from mcpopt.datafiles import open_private
from mcpopt.monitor.stats import DEFAULT_GRADES, grade, percentile
from mcpopt.telemetry.postgres import open_reader
from mcpopt.telemetry.record import ERROR_OUTCOMES

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str | None, now: float | None = None) -> float | None:
    """Unix seconds for a CLI time (see the module doc); None for None or "".

    Raises:
        ValueError: the text is none of the accepted forms (the message lists them).
    """
    if text is None or not text.strip():
        return None
    now = time.time() if now is None else now
    m = _DURATION.match(text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ValueError(
            f"expected a duration (90s, 15m, 24h, 7d), an ISO date/date-time or Unix seconds (got {text!r})"
        ) from None


def _figures(rows: list[dict[str, Any]], table: Any) -> dict[str, Any]:
    lat = sorted(r["total_ms"] for r in rows)
    n = len(lat)
    errors = sum(r["outcome"] in ERROR_OUTCOMES for r in rows)
    hits = sum(r["cache"] == "hit" for r in rows)
    misses = sum(r["cache"] == "miss" for r in rows)
    avg = sum(lat) / n if n else 0.0
    rate = errors / n if n else 0.0
    return {
        "calls": n,
        "errors": errors,
        "error_rate": round(rate, 4),
        "avg_ms": round(avg, 3),
        "p50_ms": round(percentile(lat, 0.5), 3),
        "p95_ms": round(percentile(lat, 0.95), 3),
        "p99_ms": round(percentile(lat, 0.99), 3),
        "grade": grade(avg, rate, table) if n else None,
        "cache_hits": hits,
        "cache_misses": misses,
        "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
        "tokens_out": sum(r["tokens_out"] or 0 for r in rows),
        "tokens_saved": sum(r["tokens_saved"] or 0 for r in rows),
        "upstream_ms_avg": round(sum(r["upstream_ms"] or 0 for r in rows) / n, 3) if n else 0.0,
        "gateway_ms_avg": round(sum(r["gateway_ms"] or 0 for r in rows) / n, 3) if n else 0.0,
    }


def redacted_url(target: str) -> str:
    """A database URL fit to print: its password replaced by `***`."""
    if "://" in target and "@" in target:
        scheme, rest = target.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}{':***' if ':' in creds else ''}@{host}"
    return target


def stats_report(
    db_path: str | Path, since: float | None = None, until: float | None = None, grades: Any = DEFAULT_GRADES
) -> dict[str, Any]:
    """Figures per tool, per server and overall for calls in [since, until), plus sessions and alerts.

    `db_path`: the SQLite file, or a `postgresql://` URL (the store shared by replicas); the
    report's `replicas` rows give the figures per gateway replica (`CallRecord.gateway_replica`).

    Raises:
        FileNotFoundError: no database at `db_path`.
    """
    store = open_reader(db_path)
    try:
        rows = list(store.calls(since, until))
        by_tool: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        by_server: dict[str, list[dict[str, Any]]] = defaultdict(list)
        outcomes: dict[str, int] = defaultdict(int)
        by_replica: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            by_tool[(r["server"], r["tool"])].append(r)
            by_server[r["server"]].append(r)
            outcomes[r["outcome"]] += 1
            by_replica[r.get("gateway_replica") or ""].append(r)
        return {
            "db": redacted_url(str(db_path)),
            "replicas": [{"replica": k, **_figures(rs, grades)} for k, rs in sorted(by_replica.items())],
            "since": since,
            "until": until,
            "overall": {**_figures(rows, grades), "outcomes": dict(outcomes)},
            "tools": [{"server": s, "tool": t, **_figures(rs, grades)} for (s, t), rs in sorted(by_tool.items())],
            "servers": [{"server": s, **_figures(rs, grades)} for s, rs in sorted(by_server.items())],
            "sessions": store.sessions(since),
            "alerts": store.alerts(since, limit=20),
        }
    finally:
        store.close()


def _g(letter: str | None) -> str:
    colors = {"A": "green", "B": "green3", "C": "yellow", "D": "dark_orange", "F": "red"}
    return f"[bold {colors[letter]}]{letter}[/]" if letter else "-"


def print_stats(report: dict[str, Any], console: Console) -> None:
    """Rich tables: overall, tools, servers, recent sessions and alerts."""
    o = report["overall"]
    when = "all time" if report["since"] is None else f"since {datetime.fromtimestamp(report['since']):%Y-%m-%d %H:%M}"
    console.print(
        f"[bold]mcpopt stats[/] ({when}, {report['db']}): {o['calls']} calls, grade {_g(o['grade'])}, "
        f"p50 {o['p50_ms']:.1f} ms, p95 {o['p95_ms']:.1f} ms, p99 {o['p99_ms']:.1f} ms, "
        f"errors {o['error_rate']:.1%}, cache hit rate "
        f"{'-' if o['hit_rate'] is None else format(o['hit_rate'], '.1%')}"
    )
    if not o["calls"]:
        console.print("no calls recorded in this range")
        return
    replicas = report.get("replicas") or []
    if len(replicas) > 1 or (replicas and replicas[0]["replica"]):
        for r in replicas:
            console.print(
                f"  replica {r['replica'] or '(unnamed)'}: {r['calls']} calls, grade {_g(r['grade'])}, "
                f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, errors {r['error_rate']:.1%}"
            )
    for title, rows, key in (("Tools", report["tools"], "tool"), ("Servers", report["servers"], "server")):
        table = Table(title=title)
        if key == "tool":
            table.add_column("server")
        table.add_column(key, style="bold")
        table.add_column("grade")
        for col in ("calls", "p50 ms", "p95 ms", "p99 ms", "avg ms", "errors", "cache hits", "tokens out"):
            table.add_column(col, justify="right")
        for r in rows:
            cells = [r["server"], r["tool"]] if key == "tool" else [r["server"]]
            hits = r["cache_hits"] + r["cache_misses"]
            table.add_row(
                *cells,
                _g(r["grade"]),
                str(r["calls"]),
                f"{r['p50_ms']:.1f}",
                f"{r['p95_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['avg_ms']:.1f}",
                f"{r['error_rate']:.1%}",
                f"{r['cache_hits']}/{hits}" if hits else "-",
                str(r["tokens_out"]),
            )
        console.print(table)
    if report["sessions"]:
        table = Table(title="Recent sessions")
        for col in ("session", "calls", "last", "tool sequence"):
            table.add_column(col)
        for s in report["sessions"][:10]:
            seq = s["sequence"] or ""
            table.add_row(
                s["session"][:12],
                str(s["calls"]),
                f"{datetime.fromtimestamp(s['last']):%H:%M:%S}",
                seq if len(seq) < 100 else seq[:97] + "...",
            )
        console.print(table)
    if report["alerts"]:
        table = Table(title="Recent alerts")
        for col in ("time", "status", "severity", "message"):
            table.add_column(col)
        for a in report["alerts"][:10]:
            table.add_row(f"{datetime.fromtimestamp(a['ts']):%H:%M:%S}", a["status"], a["severity"], a["message"])
        console.print(table)


def export_jsonl(db_path: str | Path, out: str | Path, since: float | None = None, until: float | None = None) -> int:
    """Write calls in [since, until) as JSON lines (the `CallRecord` fields); returns the count.

    Raises:
        FileNotFoundError: no database at `db_path`.
    """
    store = open_reader(db_path)
    n = 0
    try:
        with open_private(out, "wb") as fh:
            for row in store.calls(since, until):
                fh.write(orjson.dumps(row) + b"\n")
                n += 1
    finally:
        store.close()
    return n
