"""PostgreSQL as an optional, shared telemetry store (`gateway.telemetry.postgres_url`, issue 12).

Every gateway replica writes its records into one database (each row names its replica in
`gateway_replica`), so `mcpopt stats --db postgresql://...` and the optimizer read all replicas'
calls at once; the embedded SQLite store stays each replica's local copy (turn it off with
`sqlite_path: ""`).

`PgStore` has the reading and writing methods of the SQLite `Store` (`insert`, `delete_before`,
`calls`, `alerts`, `sessions`, `close`) over the same columns (`CallRecord` fields), so the reports
and the optimizer take either. Inserts use `COPY ... FROM STDIN` (one round trip per batch).
Needs psycopg 3 (`pip install 'mcpopt[postgres]'`); without it, opening raises `ImportError` with
that hint.

Table layout: `calls (id BIGSERIAL, <fields>)` with indexes on ts, (server, tool, ts), (session,
seq) and gateway_replica; `alerts` as in SQLite. Columns added to `CallRecord` later are added
in place (`ALTER TABLE ... ADD COLUMN IF NOT EXISTS`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mcpopt.telemetry.record import CallRecord
from mcpopt.telemetry.sinks import ThreadedSink
from mcpopt.telemetry.store import FIELDS, Store, column_sql

_PG_TYPES = {"REAL": "DOUBLE PRECISION", "INTEGER": "BIGINT", "TEXT": "TEXT"}
_BOOL = {
    name
    for name, hint in CallRecord.__annotations__.items()
    if str(getattr(hint, "__forward_arg__", hint)).startswith(("bool", "<class 'bool'>"))
}
_ALERT_FIELDS = ("ts", "status", "severity", "scope", "metric", "value", "threshold", "message")
_INSERT_ALERT = f"INSERT INTO alerts ({', '.join(_ALERT_FIELDS)}) VALUES ({', '.join('%s' for _ in _ALERT_FIELDS)})"


def is_postgres_url(target: object) -> bool:
    """True for `postgresql://...` / `postgres://...` connection URLs."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def _pg_column(name: str) -> str:
    _, kind, *rest = column_sql(name).split(" ")  # e.g. "ts REAL NOT NULL"
    pg = "BOOLEAN" if name in _BOOL else _PG_TYPES.get(kind, "TEXT")
    return " ".join([name, pg, *rest])


def _create() -> list[str]:
    return [
        f"CREATE TABLE IF NOT EXISTS calls (id BIGSERIAL PRIMARY KEY, {', '.join(_pg_column(f) for f in FIELDS)})",
        *(f"ALTER TABLE calls ADD COLUMN IF NOT EXISTS {_pg_column(f)}" for f in FIELDS),
        "CREATE INDEX IF NOT EXISTS calls_ts ON calls(ts)",
        "CREATE INDEX IF NOT EXISTS calls_tool ON calls(server, tool, ts)",
        "CREATE INDEX IF NOT EXISTS calls_session ON calls(session, seq)",
        "CREATE INDEX IF NOT EXISTS calls_replica ON calls(gateway_replica, ts)",
        "CREATE TABLE IF NOT EXISTS alerts (id BIGSERIAL PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, status TEXT, "
        "severity TEXT, scope TEXT, metric TEXT, value DOUBLE PRECISION, threshold DOUBLE PRECISION, message TEXT)",
        "CREATE INDEX IF NOT EXISTS alerts_ts ON alerts(ts)",
    ]


class PgStore:
    """A connection to the shared telemetry database (one per thread).

    Args:
        url: `postgresql://user[:password]@host:port/dbname` (libpq syntax; `PG*` variables apply).
        readonly: do not create the tables (readers: `mcpopt stats`, the optimizer).

    Raises:
        ImportError: psycopg 3 is not installed.
        psycopg.OperationalError: the server cannot be reached (the message names it).
    """

    def __init__(self, url: str, *, readonly: bool = False) -> None:
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise ImportError(
                "the PostgreSQL telemetry store needs psycopg 3: pip install 'mcpopt[postgres]'"
            ) from None
        self.url = url
        self.db = psycopg.connect(url, connect_timeout=5, row_factory=dict_row)
        if not readonly:
            with self.db.transaction():
                for stmt in _create():
                    self.db.execute(stmt)
        self.db.commit()

    def insert(self, records: Sequence[CallRecord], events: Sequence[Any] = ()) -> None:
        """Insert records (COPY) and alert events in one transaction."""
        with self.db.transaction(), self.db.cursor() as cur:
            if records:
                with cur.copy(f"COPY calls ({', '.join(FIELDS)}) FROM STDIN") as copy:
                    for r in records:
                        copy.write_row(r)
            if events:
                cur.executemany(_INSERT_ALERT, [tuple(getattr(e, f) for f in _ALERT_FIELDS) for e in events])

    def delete_before(self, ts: float) -> int:
        """Retention: delete calls and alerts that started before `ts` (Unix seconds); the count of calls."""
        with self.db.transaction():
            n = self.db.execute("DELETE FROM calls WHERE ts < %s", (ts,)).rowcount
            self.db.execute("DELETE FROM alerts WHERE ts < %s", (ts,))
        return n

    def calls(self, since: float | None = None, until: float | None = None) -> Iterator[dict[str, Any]]:
        """Rows of `calls` with `since <= ts < until` (Unix seconds), oldest first, as dicts."""
        sql, args = "SELECT * FROM calls WHERE ts >= %s", [since or 0.0]
        if until is not None:
            sql += " AND ts < %s"
            args.append(until)
        with self.db.cursor() as cur:
            for row in cur.execute(sql + " ORDER BY ts, id", args):
                row.pop("id", None)
                yield row
        self.db.commit()

    def alerts(self, since: float | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The latest alert events (newest first)."""
        rows = self.db.execute(
            "SELECT * FROM alerts WHERE ts >= %s ORDER BY ts DESC, id DESC LIMIT %s", (since or 0.0, limit)
        ).fetchall()
        self.db.commit()
        return [dict(r) for r in rows]

    def sessions(self, since: float | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """Sessions (standard level and up): calls, first/last start, and the tool sequence."""
        rows = self.db.execute(
            "SELECT session, COUNT(*) AS calls, MIN(ts) AS first, MAX(ts) AS last, "
            "STRING_AGG(tool, ' > ' ORDER BY seq) AS sequence FROM calls WHERE session != '' AND ts >= %s "
            "GROUP BY session ORDER BY last DESC LIMIT %s",
            (since or 0.0, limit),
        ).fetchall()
        self.db.commit()
        return [dict(r) for r in rows]

    def close(self) -> None:
        self.db.close()


class PostgresSink(ThreadedSink):
    """Writes records and alert events into the shared PostgreSQL store, and applies retention.

    Args:
        url: the database URL (`gateway.telemetry.postgres_url`).
        retention_days: rows older than this are deleted at start and hourly (by every replica:
            the DELETE is idempotent).

    A database that is down costs no call: the batch fails on the writer thread and is counted
    (`failed`, `last_error`), the connection is made again for the next batch.
    """

    def __init__(self, url: str, retention_days: float = 30.0, queue_size: int = 4096) -> None:
        super().__init__("postgres", queue_size, linger_s=0.1)
        self.url = url
        self.retention_days = retention_days
        self._store: PgStore | None = None
        self._next_retention = 0.0

    def open(self) -> None:
        self._store = PgStore(self.url)
        self._retain()

    def write(self, items: list[Any]) -> None:
        if self._store is None:
            self.open()
        assert self._store is not None
        records = [r for r in items if isinstance(r, CallRecord)]
        events = [e for e in items if not isinstance(e, CallRecord)]
        try:
            self._store.insert(records, events)
        except Exception:
            self.close()  # a broken connection: the next batch connects again
            raise

    def tick(self) -> None:
        if self._store is not None and time.monotonic() >= self._next_retention:
            self._retain()

    def _retain(self) -> None:
        assert self._store is not None
        self._next_retention = time.monotonic() + 3600
        self._store.delete_before(time.time() - self.retention_days * 86400)

    def close(self) -> None:
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()
            self._store = None


def open_reader(target: str | Path) -> Any:
    """A reading store for `target`: a `postgresql://` URL (`PgStore`) or an SQLite file (`Store`).

    Raises:
        FileNotFoundError: an SQLite file that does not exist.
        ImportError: a PostgreSQL URL without psycopg installed.
    """
    if is_postgres_url(target):
        return PgStore(str(target), readonly=True)
    return Store(target, readonly=True)
