"""Sinks: where records go, each behind a bounded queue and its own writer thread.

A sink never slows or fails a call: `offer` is a non-blocking put on a bounded queue; when
the queue is full the record is dropped and counted (`dropped`), and a write that raises is
counted (`failed`, `last_error`) and logged at most once a minute. `stats()` reports both.

- `SqliteSink`: the embedded store (`mcpopt.telemetry.store`), with retention.
- `JsonlSink`: appends one JSON object per record to a file.
- `mcpopt.telemetry.otel.OtelSink`: OTLP/HTTP spans and metrics.
- `WebhookSink` (in `mcpopt.monitor.alerts`): alert notifications.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson

from mcpopt.datafiles import open_private
from mcpopt.telemetry.record import CallRecord

logger = logging.getLogger(__name__)


class ThreadedSink:
    """A bounded queue drained in batches by one daemon thread.

    The queue is a `deque` (append and popleft are atomic under the GIL) plus an `Event` that
    wakes the writer: a record costs the event loop one length check and one append, and the
    writer takes whole batches, so the two threads rarely contend.

    Args:
        name: shown in stats, logs and the `sink` label of `mcpopt_telemetry_dropped_total`.
        queue_size: records the queue holds before `offer` drops.
        batch: most records handed to one `write` call.
        linger_s: after waking, wait this long for more records before writing (batches
            writes; 0 = write at once).
        fill: records queued that end the linger at once (default `batch`): a busy gateway writes
            full batches, a quiet one what `linger_s` gathered; `drain` and `stop` end it too.
    """

    def __init__(
        self, name: str, queue_size: int = 4096, *, batch: int = 512, linger_s: float = 0.0, fill: int | None = None
    ) -> None:
        self.name = name
        self.queue: deque[Any] = deque()
        self.queue_size = queue_size
        self.batch = batch
        self.linger_s = linger_s
        self.fill = batch if fill is None else fill
        self.dropped = 0
        self.written = 0
        self.failed = 0
        self.last_error: str | None = None
        self._last_log = 0.0
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._now = threading.Event()
        """Ends the linger: `fill` records are queued, or a `drain`/`stop` waits."""
        self._stopping = False
        self._offered = 0
        self._handled = 0

    # ---- the producer side (the event loop) --------------------------------------------
    def offer(self, item: Any) -> bool:
        """Queue one item without blocking; False (and counted in `dropped`) when full."""
        if len(self.queue) >= self.queue_size:
            self.dropped += 1
            return False
        self.queue.append(item)
        self._offered += 1
        if not self._wake.is_set():
            self._wake.set()
        if len(self.queue) >= self.fill and not self._now.is_set():
            self._now.set()
        return True

    def offer_many(self, items: list[Any]) -> int:
        """Queue `items` in order as `offer` would one by one (those past the queue's room are
        dropped and counted), waking the writer once; returns how many were queued."""
        room = self.queue_size - len(self.queue)
        n = len(items)
        if n > room:
            self.dropped += n - max(room, 0)
            items = items[: max(room, 0)]
            n = len(items)
        if n:
            self.queue.extend(items)
            self._offered += n
            if not self._wake.is_set():
                self._wake.set()
            if len(self.queue) >= self.fill and not self._now.is_set():
                self._now.set()
        return n

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"mcpopt-telemetry-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (within `timeout_s`), then end the thread and `close()`."""
        thread = self._thread
        if thread is None:
            self.close()
            return
        self._stopping = True
        self._wake.set()
        self._now.set()
        thread.join(timeout_s)
        self._thread = None

    def drain(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything offered so far is written (tests, `flush`); False on timeout."""
        target = self._offered
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        self._now.set()
        while self._handled < target:
            if time.monotonic() > deadline or self._thread is None:
                return False
            time.sleep(0.005)
        return True

    def stats(self) -> dict[str, Any]:
        return {
            "sink": self.name,
            "queued": len(self.queue),
            "written": self.written,
            "dropped": self.dropped,
            "failed": self.failed,
            "last_error": self.last_error,
        }

    # ---- the writer thread -------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.open()
        except Exception as exc:  # noqa: BLE001 - a broken sink is reported, never fatal
            self._failed(exc, 0)
        q = self.queue
        while True:
            woke = self._wake.wait(self.idle_s())
            self._wake.clear()
            if woke and self.linger_s and not self._stopping and len(q) < self.fill:
                self._now.wait(self.linger_s)
            self._now.clear()
            popleft = q.popleft
            while q:
                # Only this thread takes from the queue: the `len(q)` counted now are there to pop.
                items: list[Any] = [popleft() for _ in range(min(len(q), self.batch))]
                try:
                    self.write(items)
                    self.written += len(items)
                except Exception as exc:  # noqa: BLE001
                    self._failed(exc, len(items))
                self._handled += len(items)
            if self._stopping:
                break
            self._guard(self.tick)
        self._guard(self.close)

    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            self._failed(exc, 0)

    def _failed(self, exc: BaseException, n: int) -> None:
        self.failed += n
        self.last_error = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if now - self._last_log > 60:
            self._last_log = now
            logger.warning("telemetry sink %s failed (%d record(s) lost): %s", self.name, n, self.last_error)

    # ---- for subclasses (all run on the writer thread) ---------------------------------
    def idle_s(self) -> float:
        """How long the thread sleeps without records before calling `tick` (seconds)."""
        return 1.0

    def open(self) -> None:
        """Acquire resources (files, connections) on the writer thread."""

    def write(self, items: list[Any]) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        """Periodic work when the queue is empty (retention, timed exports)."""

    def close(self) -> None:
        """Release resources; also called when the sink never started."""


class JsonlSink(ThreadedSink):
    """Appends each `CallRecord` as one JSON line to `path` (created 0600 with its folder, 0700)."""

    def __init__(self, path: str | Path, queue_size: int = 4096) -> None:
        super().__init__("jsonl", queue_size, linger_s=0.2)
        self.path = Path(path)
        self._fh: Any = None

    def open(self) -> None:
        self._fh = open_private(self.path, "ab")

    def write(self, items: list[Any]) -> None:
        if self._fh is None:
            self.open()
        lines = [orjson.dumps(r.to_dict()) for r in items if isinstance(r, CallRecord)]
        if lines:
            self._fh.write(b"\n".join(lines) + b"\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None


LINGER_S = 1.0
"""How long the SQLite sink gathers records before a transaction (seconds; `ThreadedSink.linger_s`).
A transaction costs about as much as 8 rows' inserts here (WAL frames, commit), and a writer thread
that wakes rarely competes less for the GIL and the caches: 1.0 s rather than 0.1 s."""
FILL = 256
"""Records queued that start the SQLite sink's transaction before `LINGER_S`: one multi-row
statement's worth (`mcpopt.telemetry.store.ROWS_PER_INSERT`; the store is imported at the
writer thread's start, not here)."""


class SqliteSink(ThreadedSink):
    """Writes records and alert events into the SQLite store at `path`, and applies retention.

    Args:
        path: the database file (created with its folder; WAL mode, so `mcpopt stats` can read
            while the gateway writes).
        retention_days: rows older than this are deleted at start and hourly.
    """

    def __init__(self, path: str | Path, retention_days: float = 30.0, queue_size: int = 4096) -> None:
        super().__init__("sqlite", queue_size, linger_s=LINGER_S, fill=min(FILL, queue_size))
        self.path = Path(path)
        self.retention_days = retention_days
        self._store: Any = None
        self._next_retention = 0.0

    def open(self) -> None:
        from mcpopt.telemetry.store import Store

        self._store = Store(self.path)
        self._retain()

    def write(self, items: list[Any]) -> None:
        if self._store is None:
            self.open()
        if all(map(CallRecord.__instancecheck__, items)):  # the usual batch: records only (C-level pass)
            self._store.insert(items, ())
            return
        records = [r for r in items if isinstance(r, CallRecord)]
        events = [e for e in items if not isinstance(e, CallRecord)]
        self._store.insert(records, events)

    def tick(self) -> None:
        if self._store is not None and time.monotonic() >= self._next_retention:
            self._retain()

    def _retain(self) -> None:
        self._next_retention = time.monotonic() + 3600
        self._store.delete_before(time.time() - self.retention_days * 86400)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
