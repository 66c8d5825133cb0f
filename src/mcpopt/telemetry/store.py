"""The embedded SQLite store: one row per call (`calls`), one per alert event (`alerts`).

Queryable with any SQLite client, e.g.::

    sqlite3 ~/.local/share/mcpopt/<config id>/telemetry.db \
      "SELECT server, tool, outcome, total_ms FROM calls ORDER BY ts DESC LIMIT 20"

Columns of `calls` are the fields of `CallRecord` (times in ms, sizes in bytes, `ts` in Unix
seconds). Tool sequences: `SELECT session, seq, tool FROM calls WHERE session != '' ORDER BY
session, seq`. The database is in WAL mode so readers (`mcpopt stats`, `mcpopt telemetry
export`) never block the gateway's writer thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Any

from mcpopt.config import TelemetrySettings, default_data_dir
from mcpopt.datafiles import ensure_private_file
from mcpopt.telemetry.record import FIELDS, CallRecord

SCHEMA_VERSION = 2
"""2: `principal`, `decision`, `policy_rule` (audit, issue 10); older files get the columns added."""

_TYPES = {
    "ts": "REAL NOT NULL",
    "server": "TEXT NOT NULL",
    "tool": "TEXT NOT NULL",
    "name": "TEXT",
    "outcome": "TEXT NOT NULL",
    "coalesced": "INTEGER",
    "replica": "INTEGER",
    "error_code": "INTEGER",
    "seq": "INTEGER",
    "retries": "INTEGER",
}


def column_sql(name: str) -> str:
    """The SQL column definition of the `CallRecord` field `name`, e.g. `"ts REAL NOT NULL"`
    (SQLite affinities; `telemetry.postgres` maps them to PostgreSQL types).

    Raises:
        KeyError: `name` is not a `CallRecord` field.
    """
    kind = _TYPES.get(name)
    if kind is None:
        hint = CallRecord.__annotations__[name]
        hint = str(getattr(hint, "__forward_arg__", hint))  # "float", "int", "str", "int | None"
        kind = "REAL" if hint.startswith("float") else "INTEGER" if hint.startswith(("int", "bool")) else "TEXT"
    return f"{name} {kind}"


_CREATE = [
    f"CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY, {', '.join(column_sql(f) for f in FIELDS)})",
    "CREATE INDEX IF NOT EXISTS calls_ts ON calls(ts)",
    "CREATE INDEX IF NOT EXISTS calls_tool ON calls(server, tool, ts)",
    "CREATE INDEX IF NOT EXISTS calls_session ON calls(session, seq)",
    "CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY, ts REAL NOT NULL, status TEXT, severity TEXT, "
    "scope TEXT, metric TEXT, value REAL, threshold REAL, message TEXT)",
    "CREATE INDEX IF NOT EXISTS alerts_ts ON alerts(ts)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
]
ROWS_PER_INSERT = 256
"""Rows per multi-row INSERT: 256 x 30 columns stays under SQLite's 32,766 variables. One
statement step per batch instead of per row: 10.5 -> 6.1 us of CPU per record here, and the
writer thread gives up and retakes the GIL once per batch rather than once per row."""
_ROW = f"({', '.join('?' for _ in FIELDS)})"


@lru_cache(maxsize=4)
def _insert_rows(n: int) -> str:
    return f"INSERT INTO calls ({', '.join(FIELDS)}) VALUES {', '.join([_ROW] * n)}"


_ALERT_FIELDS = ("ts", "status", "severity", "scope", "metric", "value", "threshold", "message")
_INSERT_ALERT = f"INSERT INTO alerts ({', '.join(_ALERT_FIELDS)}) VALUES ({', '.join('?' for _ in _ALERT_FIELDS)})"


class Store:
    """A connection to the telemetry database (one per thread).

    Args:
        path: the database file; created (with its folder) unless `readonly`, private (0600, folder 0700).
        readonly: open an existing file for reading only.

    Raises:
        FileNotFoundError: `readonly` and the file does not exist.
        sqlite3.DatabaseError: the file is not a telemetry database.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"no telemetry database at {self.path}")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        else:
            ensure_private_file(self.path)  # 0600 (its WAL and shm files take the same mode)
            self.db = sqlite3.connect(self.path, timeout=5)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            with self.db:
                for stmt in _CREATE:
                    self.db.execute(stmt)
                # Columns added since the file was made (e.g. `variant`): added in place, empty.
                have = {r[1] for r in self.db.execute("PRAGMA table_info(calls)")}
                for name in FIELDS:
                    if name not in have:
                        self.db.execute(f"ALTER TABLE calls ADD COLUMN {column_sql(name)}")
                self.db.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
        self.db.row_factory = sqlite3.Row

    def insert(self, records: Sequence[CallRecord], events: Sequence[Any] = ()) -> None:
        """Insert records and alert events (objects with the `alerts` columns as attributes) in one transaction."""
        with self.db:
            for i in range(0, len(records), ROWS_PER_INSERT):
                chunk = records[i : i + ROWS_PER_INSERT]  # records are tuples in column order
                self.db.execute(_insert_rows(len(chunk)), list(chain.from_iterable(chunk)))
            if events:
                self.db.executemany(_INSERT_ALERT, [tuple(getattr(e, f) for f in _ALERT_FIELDS) for e in events])

    def delete_before(self, ts: float) -> int:
        """Retention: delete calls and alerts that started before `ts` (Unix seconds); the count of calls."""
        with self.db:
            n = self.db.execute("DELETE FROM calls WHERE ts < ?", (ts,)).rowcount
            self.db.execute("DELETE FROM alerts WHERE ts < ?", (ts,))
        return n

    def calls(self, since: float | None = None, until: float | None = None) -> Iterator[dict[str, Any]]:
        """Rows of `calls` with `since <= ts < until` (Unix seconds), oldest first, as dicts."""
        sql, args = "SELECT * FROM calls WHERE ts >= ?", [since or 0.0]
        if until is not None:
            sql += " AND ts < ?"
            args.append(until)
        for row in self.db.execute(sql + " ORDER BY ts, id", args):
            out = dict(row)
            out.pop("id", None)
            out["coalesced"] = bool(out.get("coalesced"))
            yield out

    def alerts(self, since: float | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The latest alert events (newest first)."""
        rows = self.db.execute(
            "SELECT * FROM alerts WHERE ts >= ? ORDER BY ts DESC, id DESC LIMIT ?", (since or 0.0, limit)
        )
        return [dict(r) for r in rows]

    def sessions(self, since: float | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """Sessions (standard level and up): calls, first/last start, and the tool sequence."""
        rows = self.db.execute(
            "SELECT session, COUNT(*) AS calls, MIN(ts) AS first, MAX(ts) AS last, "
            "GROUP_CONCAT(tool, ' > ') AS sequence FROM (SELECT * FROM calls WHERE session != '' AND ts >= ? "
            "ORDER BY session, seq) GROUP BY session ORDER BY last DESC LIMIT ?",
            (since or 0.0, limit),
        )
        return [dict(r) for r in rows]

    def close(self) -> None:
        self.db.close()


def store_path(settings: TelemetrySettings, data_dir: Path | None = None) -> Path | None:
    """The SQLite store of these settings: `sqlite_path`, else `<data_dir>/telemetry.db`; None when "".

    `data_dir` is the config's (`mcpopt.config.config_data_dir`); without it (settings used on their
    own: benchmarks, tests) `settings.data_dir`, else `default_data_dir()`."""
    path = settings.sqlite_path
    if path == "":
        return None
    if path:
        return Path(path).expanduser()
    if data_dir is None:
        data_dir = Path(settings.data_dir).expanduser() if settings.data_dir else default_data_dir()
    return data_dir / "telemetry.db"
