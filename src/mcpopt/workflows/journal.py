"""The durable journal of workflow runs: a small `Journal` protocol and its SQLite implementation.

Every run is one row of `runs` (workflow, status, parameters, the definition it runs -- a
snapshot, so a resumed run does what it started doing even if the config changed since --, the
owner holding its lease, and once finished its result); every step event is one row of `events`,
in order. The engine writes an event and waits until it is committed before it goes on: a step's
`step_started` is on disk before its call is sent, its `step_succeeded` / `step_failed` before any
step that depends on it starts; compensations likewise. So after a crash the journal tells, for
every call, whether it finished (and with what result), or was in flight (started, no outcome).

Event kinds: `step_started`, `step_succeeded`, `step_failed`, `step_skipped`, `comp_started`,
`comp_succeeded`, `comp_failed`, `note` (in-doubt decisions, take-overs). Each names its `step`
and `item` ("" for a plain step, the index of a `for_each` item, the target of a fan-out call)
and carries a JSON `data` object (arguments, idempotency key, result, error).

Run statuses: `running`, `compensating` (unfinished; a gateway resumes them), then one of
`completed`, `completed_with_errors` (`on_failure: continue`), `failed` (`abort`),
`compensated`, `compensation_failed`.

Leases: a run belongs to the gateway process that holds its lease (`owner`, `lease_until`);
the owner renews it while the run is live, and another process may take a run over
(`claim`) when the lease expired or the owner is a dead process on the same host. A Redis
backend (issue 12) implements the same protocol with the same semantics.

The SQLite file is in WAL mode (readers such as `mcpopt workflows status` never block the
gateway). With `synchronous: normal` a commit is one `write(2)` to the WAL (about 50 us here), so
statements run on the event loop itself: a worker-thread hop costs three times that (167 us
measured) and a run makes ~2 journal writes per step. With `synchronous: full` every commit also
fsyncs (about 3 ms here), so statements go to a worker thread, one at a time.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio
import orjson

from mcpopt.datafiles import ensure_private_file

ACTIVE = ("running", "compensating")
"""Statuses of unfinished runs."""
FINISHED = ("completed", "completed_with_errors", "failed", "compensated", "compensation_failed")
SCHEMA_VERSION = 1


@dataclass
class RunInfo:
    """One run as the journal keeps it.

    Times are Unix seconds. `definition` is the workflow as JSON (`Workflow.model_dump`),
    `result` the final structured result (None while running).
    """

    run_id: str
    workflow: str
    status: str
    params: dict[str, Any]
    definition: dict[str, Any]
    created: float
    updated: float
    owner: str = ""
    lease_until: float = 0.0
    partition: str = ""
    principal: dict[str, Any] | None = None
    """Who started the run (the principal's fields as JSON; None: the local user), so that a resumed
    run acts with the same rights."""
    cancel_requested: bool = False
    result: dict[str, Any] | None = None
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        """Without the definition and result: for lists."""
        return {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "status": self.status,
            "created": self.created,
            "updated": self.updated,
            "owner": self.owner,
            "error": self.error,
        }


@dataclass
class Event:
    """One journal event (see the module doc for the kinds)."""

    seq: int
    run_id: str
    ts: float
    kind: str
    step: str = ""
    item: str = ""
    attempt: int = 0
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "kind": self.kind,
            "step": self.step,
            "item": self.item,
            "attempt": self.attempt,
            "data": self.data,
        }


class Journal(Protocol):
    """What the engine needs of a journal. Every method is durable when it returns."""

    path: str
    """Where it lives (a file path, a Redis URL), for messages."""

    async def create(self, run: RunInfo) -> None:
        """Record a new run (status `running`, owned by `run.owner` until `run.lease_until`)."""
        ...

    async def record(
        self,
        run_id: str,
        kind: str,
        step: str = "",
        item: str = "",
        attempt: int = 0,
        data: dict[str, Any] | None = None,
    ) -> int:
        """Append one event; returns its sequence number."""
        ...

    async def events(self, run_id: str) -> list[Event]:
        """A run's events, oldest first."""
        ...

    async def set_status(self, run_id: str, status: str, *, result: Any = None, error: str | None = None) -> None:
        """Change a run's status (with its final result and error once finished)."""
        ...

    async def get(self, run_id: str) -> RunInfo | None: ...

    async def runs(
        self, *, statuses: Sequence[str] = (), workflow: str | None = None, limit: int = 50
    ) -> list[RunInfo]:
        """Runs, newest first (`statuses` empty: any)."""
        ...

    async def claim(self, run_id: str, owner: str, lease_s: float, *, force: bool = False) -> bool:
        """Take a run's lease: when it is free or expired, already ours, or `force` (its owner is
        known to be dead). True if `owner` holds it now."""
        ...

    async def renew(self, owner: str, run_ids: Sequence[str], lease_s: float) -> list[str]:
        """Extend the leases `owner` holds; returns the ids of those runs with a cancel request."""
        ...

    async def release(self, owner: str, run_ids: Sequence[str]) -> None:
        """Give the leases up at once (a clean stop: the next gateway resumes without waiting)."""
        ...

    async def request_cancel(self, run_id: str) -> bool:
        """Flag an active run for cancellation (its owner sees it when it renews). True if active."""
        ...

    async def save_definition(self, name: str, definition: dict[str, Any], source: str, partition: str) -> None:
        """Keep a workflow built at run time (by an agent) across restarts."""
        ...

    async def definitions(self) -> list[dict[str, Any]]:
        """`[{name, definition, source, partition, created, updated}]` of the kept workflows."""
        ...

    async def delete_definition(self, name: str) -> bool: ...

    async def prune(self, before: float) -> int:
        """Delete finished runs (and their events) last updated before `before`; the count."""
        ...

    async def close(self) -> None: ...


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, workflow TEXT NOT NULL, status TEXT NOT NULL, "
    "params TEXT, definition TEXT, created REAL, updated REAL, owner TEXT, lease_until REAL, partition TEXT, "
    "principal TEXT, cancel INTEGER DEFAULT 0, result TEXT, error TEXT)",
    "CREATE INDEX IF NOT EXISTS runs_status ON runs(status, updated)",
    "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, ts REAL, "
    "kind TEXT NOT NULL, step TEXT, item TEXT, attempt INTEGER, data TEXT)",
    "CREATE INDEX IF NOT EXISTS events_run ON events(run_id, seq)",
    "CREATE TABLE IF NOT EXISTS definitions (name TEXT PRIMARY KEY, definition TEXT, source TEXT, partition TEXT, "
    "created REAL, updated REAL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
)


def _dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def _loads(text: str | None) -> Any:
    return orjson.loads(text) if text else None


class SqliteJournal:
    """The embedded journal (see the module doc).

    Args:
        path: the database file (created with its folder).
        synchronous: `normal` or `full` (see `JournalSettings.synchronous`).
        readonly: open an existing file for reading only (CLI status pages).

    Raises:
        FileNotFoundError: `readonly` and no such file.
        sqlite3.DatabaseError: the file is not a journal.
    """

    def __init__(self, path: str | Path, *, synchronous: str = "normal", readonly: bool = False) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._inline = synchronous != "full"
        """Run statements on the calling (event-loop) thread: see the module doc."""
        if readonly:
            if not Path(path).exists():
                raise FileNotFoundError(f"no workflow journal at {path}")
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10, check_same_thread=False)
        else:
            if str(path) != ":memory:":
                ensure_private_file(path)  # 0600 in a 0700 folder: steps' arguments and results (WAL/shm alike)
            self.db = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
            for stmt in _SCHEMA:
                self.db.execute(stmt)
            self.db.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        self.db.row_factory = sqlite3.Row

    # ---- plumbing: one statement (or transaction) at a time, on a worker thread ---------------
    def _run(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            return fn(*args)

    async def _call(self, fn: Any, *args: Any) -> Any:
        if self._inline:
            return self._run(fn, *args)
        return await anyio.to_thread.run_sync(self._run, fn, *args)

    def _write(self, sql: str, args: Sequence[Any]) -> sqlite3.Cursor:
        return self.db.execute(sql, args)

    # ---- runs ---------------------------------------------------------------------------------
    async def create(self, run: RunInfo) -> None:
        await self._call(
            self._write,
            "INSERT INTO runs (run_id, workflow, status, params, definition, created, updated, owner, lease_until, "
            "partition, principal) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run.run_id,
                run.workflow,
                run.status,
                _dumps(run.params),
                _dumps(run.definition),
                run.created,
                run.updated,
                run.owner,
                run.lease_until,
                run.partition,
                _dumps(run.principal) if run.principal is not None else None,
            ),
        )

    async def record(
        self,
        run_id: str,
        kind: str,
        step: str = "",
        item: str = "",
        attempt: int = 0,
        data: dict[str, Any] | None = None,
    ) -> int:
        cur = await self._call(
            self._write,
            "INSERT INTO events (run_id, ts, kind, step, item, attempt, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (run_id, time.time(), kind, step, item, attempt, _dumps(data or {})),
        )
        return int(cur.lastrowid or 0)

    def _events(self, run_id: str) -> list[Event]:
        rows = self.db.execute("SELECT * FROM events WHERE run_id = ? ORDER BY seq", (run_id,)).fetchall()
        return [
            Event(
                r["seq"],
                r["run_id"],
                r["ts"],
                r["kind"],
                r["step"] or "",
                r["item"] or "",
                r["attempt"] or 0,
                _loads(r["data"]) or {},
            )
            for r in rows
        ]

    async def events(self, run_id: str) -> list[Event]:
        result: list[Event] = await self._call(self._events, run_id)
        return result

    async def set_status(self, run_id: str, status: str, *, result: Any = None, error: str | None = None) -> None:
        if status in FINISHED:
            await self._call(
                self._write,
                "UPDATE runs SET status = ?, updated = ?, result = ?, error = ?, lease_until = 0 WHERE run_id = ?",
                (status, time.time(), _dumps(result) if result is not None else None, error, run_id),
            )
        else:
            await self._call(
                self._write, "UPDATE runs SET status = ?, updated = ? WHERE run_id = ?", (status, time.time(), run_id)
            )

    @staticmethod
    def _info(r: sqlite3.Row) -> RunInfo:
        return RunInfo(
            run_id=r["run_id"],
            workflow=r["workflow"],
            status=r["status"],
            params=_loads(r["params"]) or {},
            definition=_loads(r["definition"]) or {},
            created=r["created"] or 0.0,
            updated=r["updated"] or 0.0,
            owner=r["owner"] or "",
            lease_until=r["lease_until"] or 0.0,
            partition=r["partition"] or "",
            principal=_loads(r["principal"]),
            cancel_requested=bool(r["cancel"]),
            result=_loads(r["result"]),
            error=r["error"],
        )

    def _get(self, run_id: str) -> RunInfo | None:
        row = self.db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return self._info(row) if row is not None else None

    async def get(self, run_id: str) -> RunInfo | None:
        found: RunInfo | None = await self._call(self._get, run_id)
        return found

    def _runs(self, statuses: Sequence[str], workflow: str | None, limit: int) -> list[RunInfo]:
        sql = "SELECT * FROM runs WHERE 1 = 1"
        args: list[Any] = []
        if statuses:
            sql += f" AND status IN ({', '.join('?' for _ in statuses)})"
            args += list(statuses)
        if workflow:
            sql += " AND workflow = ?"
            args.append(workflow)
        sql += " ORDER BY created DESC, rowid DESC LIMIT ?"
        args.append(limit)
        return [self._info(r) for r in self.db.execute(sql, args).fetchall()]

    async def runs(
        self, *, statuses: Sequence[str] = (), workflow: str | None = None, limit: int = 50
    ) -> list[RunInfo]:
        found: list[RunInfo] = await self._call(self._runs, tuple(statuses), workflow, limit)
        return found

    # ---- leases and cancellation -----------------------------------------------------------
    def _claim(self, run_id: str, owner: str, lease_s: float, force: bool) -> bool:
        now = time.time()
        cond = "" if force else " AND (owner = ? OR owner = '' OR lease_until < ?)"
        args: list[Any] = [owner, now + lease_s, run_id]
        if not force:
            args += [owner, now]
        cur = self.db.execute(
            f"UPDATE runs SET owner = ?, lease_until = ? WHERE run_id = ? AND status IN ('running', 'compensating')"
            f"{cond}",
            args,
        )
        return cur.rowcount == 1

    async def claim(self, run_id: str, owner: str, lease_s: float, *, force: bool = False) -> bool:
        got: bool = await self._call(self._claim, run_id, owner, lease_s, force)
        return got

    def _renew(self, owner: str, run_ids: Sequence[str], lease_s: float) -> list[str]:
        if not run_ids:
            return []
        marks = ", ".join("?" for _ in run_ids)
        self.db.execute(
            f"UPDATE runs SET lease_until = ? WHERE owner = ? AND run_id IN ({marks})",
            [time.time() + lease_s, owner, *run_ids],
        )
        rows = self.db.execute(f"SELECT run_id FROM runs WHERE cancel = 1 AND run_id IN ({marks})", list(run_ids))
        return [r["run_id"] for r in rows.fetchall()]

    async def renew(self, owner: str, run_ids: Sequence[str], lease_s: float) -> list[str]:
        cancelled: list[str] = await self._call(self._renew, owner, tuple(run_ids), lease_s)
        return cancelled

    async def release(self, owner: str, run_ids: Sequence[str]) -> None:
        if run_ids:
            marks = ", ".join("?" for _ in run_ids)
            await self._call(
                self._write,
                f"UPDATE runs SET lease_until = 0 WHERE owner = ? AND run_id IN ({marks})",
                [owner, *run_ids],
            )

    async def request_cancel(self, run_id: str) -> bool:
        cur = await self._call(
            self._write,
            "UPDATE runs SET cancel = 1 WHERE run_id = ? AND status IN ('running', 'compensating')",
            (run_id,),
        )
        return bool(cur.rowcount)

    # ---- definitions built at run time ------------------------------------------------------
    async def save_definition(self, name: str, definition: dict[str, Any], source: str, partition: str) -> None:
        now = time.time()
        await self._call(
            self._write,
            "INSERT INTO definitions (name, definition, source, partition, created, updated) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET definition = excluded.definition, source = excluded.source, "
            "updated = excluded.updated",
            (name, _dumps(definition), source, partition, now, now),
        )

    def _definitions(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM definitions ORDER BY created").fetchall()
        return [
            {
                "name": r["name"],
                "definition": _loads(r["definition"]) or {},
                "source": r["source"],
                "partition": r["partition"] or "",
                "created": r["created"],
                "updated": r["updated"],
            }
            for r in rows
        ]

    async def definitions(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await self._call(self._definitions)
        return found

    async def delete_definition(self, name: str) -> bool:
        cur = await self._call(self._write, "DELETE FROM definitions WHERE name = ?", (name,))
        return bool(cur.rowcount)

    # ---- housekeeping ------------------------------------------------------------------------
    def _prune(self, before: float) -> int:
        marks = ", ".join("?" for _ in FINISHED)
        self.db.execute("BEGIN")
        try:
            ids = [
                r["run_id"]
                for r in self.db.execute(
                    f"SELECT run_id FROM runs WHERE status IN ({marks}) AND updated < ?", [*FINISHED, before]
                ).fetchall()
            ]
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                q = ", ".join("?" for _ in chunk)
                self.db.execute(f"DELETE FROM events WHERE run_id IN ({q})", chunk)
                self.db.execute(f"DELETE FROM runs WHERE run_id IN ({q})", chunk)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return len(ids)

    async def prune(self, before: float) -> int:
        n: int = await self._call(self._prune, before)
        return n

    async def close(self) -> None:
        with self._lock:
            self.db.close()


# ---- who owns a run --------------------------------------------------------------------------
def _stat(pid: int) -> list[str]:
    """Fields 3.. of Linux `/proc/<pid>/stat` (state first), or [] when unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22), or ""."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else ""


def owner_id() -> str:
    """A lease owner: `host:pid:start-ticks:instance` -- the process (its start time tells a reused
    pid apart) and one service in it (a service started again in the same process is another owner)."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str) -> bool:
    """True when `owner` names a process on this host that no longer runs (or whose pid was reused).

    An owner on another host is never declared dead here: its lease has to expire.
    """
    host, _, rest = owner.partition(":")
    pid_text, _, rest = rest.partition(":")
    ticks = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    fields = _stat(pid)
    if fields and fields[0] in ("Z", "X"):
        return True  # killed, not yet reaped by its parent
    return bool(ticks) and len(fields) > 19 and fields[19] != ticks
