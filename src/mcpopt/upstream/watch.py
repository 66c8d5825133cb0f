"""The upstream resource watch: CPU, memory, open descriptors and children of every stdio upstream.

Every `gateway.watch.interval_s` seconds `ResourceWatch` samples the process tree of each stdio
replica of each server (the server process plus all its descendants, found through one scan of
/proc per sample with psutil), in a worker thread so the event loop never waits on /proc. Per
replica it keeps:

- `cpu_seconds`: user + system CPU time of the tree (the leader's reaped children included);
  `cpu_percent`: its rate between the last two samples (100 = one core busy);
- `rss_bytes`: the sum of the tree's resident set sizes (pages shared between processes of the
  tree count once per process: an upper bound, like `ps`'s own sums);
- `open_fds`: file descriptors open in the tree (files, pipes, sockets: what `ulimit -n` counts);
- `children`: descendant processes;
- `rss_growth_bytes` / `rss_growth_pct`: RSS now minus RSS at the oldest sample inside
  `growth_window_s` (since its handshake completed, if it is younger); `rss_growth_alert` is true when
  both exceed `growth_warning_mb` / `growth_warning_pct` (the `rss_growth` alert reads it).

A server with `max_rss_mb` is restarted gracefully (`ServerPool.recycle`) once its RSS stayed
above the limit for `limit_samples` samples in a row; each restart is logged (warning) and counted
(`rss_restarts`, per server and replica). Descendants that left the server's process group
(setsid) are reported to `process.children`, so they die with it and with a killed gateway.

HTTP and SSE upstreams have no process of the gateway's to watch: they have no rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from mcpopt.config import WatchSettings
from mcpopt.upstream import process
from mcpopt.upstream._watchdog import starttime

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass(slots=True)
class TreeSample:
    """One reading of one upstream's process tree (what the worker thread returns).

    Attributes:
        pid: the server process. cpu_seconds: CPU time of the tree, s. rss_bytes: summed RSS.
        open_fds: descriptors of the tree. children: descendants. escaped: descendants outside
        the leader's process group, as (pid, starttime).
    """

    pid: int
    cpu_seconds: float
    rss_bytes: int
    open_fds: int
    children: int
    escaped: list[tuple[int, str]] = field(default_factory=list)


def sample_trees(pids: Sequence[int], started: Mapping[int, str | None] | None = None) -> dict[int, TreeSample]:
    """Read the process tree of each pid (blocking: run it in a thread).

    One pass over every process of the machine builds the parent -> children map for all trees
    (psutil's `children(recursive=True)` would scan once per tree). Processes that vanish while
    being read are skipped; a pid that is gone has no entry.

    Args:
        pids: the tree leaders (the upstream processes).
        started: pid -> its starttime recorded at spawn (/proc/<pid>/stat field 22). A pid whose
            process now has another starttime was reused by the kernel: it is not ours and has no
            entry (never sampled, so never restarted or its children tracked). None (unknown: the
            process had exited and been reaped before it was read): any process holding the pid
            now is another one, also skipped. Absent: not checked.
    """
    kids: dict[int, list[psutil.Process]] = {}
    for p in psutil.process_iter(["ppid"]):
        ppid = p.info.get("ppid")
        if ppid:
            kids.setdefault(ppid, []).append(p)
    out: dict[int, TreeSample] = {}
    for pid in pids:
        if started is not None and pid in started and starttime(pid) != started[pid]:
            continue  # the pid now belongs to another process (or, unknown at spawn, may)
        try:
            leader = psutil.Process(pid)
            with leader.oneshot():
                t = leader.cpu_times()
                cpu = t.user + t.system + t.children_user + t.children_system
                rss = leader.memory_info().rss
                fds = leader.num_fds()
        except psutil.Error:
            continue
        sample = TreeSample(pid, cpu, rss, fds, 0)
        stack = list(kids.get(pid, ()))
        seen = {pid}
        while stack:
            child = stack.pop()
            if child.pid in seen:
                continue
            seen.add(child.pid)
            stack.extend(kids.get(child.pid, ()))
            try:
                with child.oneshot():
                    t = child.cpu_times()
                    sample.cpu_seconds += t.user + t.system
                    sample.rss_bytes += child.memory_info().rss
                    sample.open_fds += child.num_fds()
                    if os.getpgid(child.pid) != pid:
                        child_started = starttime(child.pid)
                        if child_started is not None:
                            sample.escaped.append((child.pid, child_started))
            except (psutil.Error, OSError):
                continue
            sample.children += 1
        out[pid] = sample
    return out


def _watchable(up: Any) -> bool:
    """A replica with a process whose session is open: from the end of its handshake (so the growth
    baseline is the initialized server, not the interpreter still importing) until it closes, a
    restart's drain included."""
    return bool(getattr(up, "pid", None)) and getattr(up, "session", None) is not None


@dataclass
class _Track:
    """What the watch remembers of one replica between samples."""

    pid: int
    history: deque[tuple[float, int]] = field(default_factory=deque)
    """(monotonic s, rss bytes) inside the growth window."""
    last_cpu: float | None = None
    last_t: float | None = None
    cpu_percent: float | None = None
    sample: TreeSample | None = None
    over: int = 0
    """Consecutive samples above `max_rss_mb`."""
    sampled_at: float = 0.0


class ResourceWatch:
    """Samples every stdio upstream's process tree and enforces `max_rss_mb`.

    Args:
        settings: `gateway.watch`.
        pools: returns the gateway's server name -> `ServerPool` mapping (read at every sample, so
            servers started or replaced later are watched too).
        clock: monotonic seconds (tests may pass another).
        isolated: returns server name -> `IsolatedSessions` (per-owner pools of one replica): they
            are watched and limited too, and reported summed per server (owners are not named).
    """

    def __init__(
        self,
        settings: WatchSettings,
        pools: Callable[[], Mapping[str, Any]],
        clock: Callable[[], float] = time.monotonic,
        isolated: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.settings = settings
        self.pools = pools
        self.isolated = isolated
        self.clock = clock
        self._tracks: dict[tuple[str, int | str], _Track] = {}
        """(server, replica index) of the shared pools; (server, "isolated:<n>") of per-owner sessions."""
        self.rss_restarts: dict[str, int] = {}
        """Restarts at `max_rss_mb`, per server."""
        self.events: deque[dict[str, Any]] = deque(maxlen=50)
        """The latest restarts: `{ts (Unix s), server, replica, pid, rss_bytes, limit_bytes, reason}`."""
        self.samples = 0
        """Samples taken since start (every replica once per sample)."""
        self._task: asyncio.Task[None] | None = None
        self._restarting: set[tuple[str, int | str]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start sampling (no-op when `enabled: false` or already running)."""
        if not self.settings.enabled or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="mcpopt-resource-watch")

    async def stop(self) -> None:
        task, self._task = self._task, None
        for t in [task, *self._tasks]:
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    async def _loop(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:  # noqa: BLE001 - the watch must never take the gateway down
                logger.exception("resource watch: a sample failed")
            await asyncio.sleep(self.settings.interval_s)

    # ---- sampling -----------------------------------------------------------------------
    def _targets(self) -> list[tuple[str, int | str, int, Any, Any]]:
        """(server, track key, replica index in its pool, pool, upstream) of every stdio replica with a
        process: the shared pools' replicas, then the isolated sessions' (keyed by the pool's identity,
        which lasts as long as the owner's session does)."""
        out: list[tuple[str, int | str, int, Any, Any]] = []
        for name, pool in list(self.pools().items()):
            for i, up in enumerate(getattr(pool, "upstreams", ())):
                if _watchable(up):
                    out.append((name, i, i, pool, up))
        for name, sessions in list((self.isolated() if self.isolated else {}).items()):
            for pool in list(getattr(sessions, "pools", {}).values()):
                for i, up in enumerate(getattr(pool, "upstreams", ())):
                    if _watchable(up):
                        out.append((name, f"isolated:{id(pool)}:{i}", i, pool, up))
        return out

    async def sample(self) -> None:
        """Take one sample of every replica now (the loop calls it, and the gateway once its upstreams
        are ready); no-op with `enabled: false`. Samples never overlap."""
        if not self.settings.enabled:
            return
        async with self._lock:
            await self._sample()

    async def _sample(self) -> None:
        targets = self._targets()
        pids = [up.pid for *_, up in targets]
        spawned = {up.pid: getattr(up, "pid_started", None) for *_, up in targets}
        trees = await asyncio.to_thread(sample_trees, pids, spawned) if pids else {}
        now = self.clock()
        live: set[tuple[str, int | str]] = set()
        for name, slot, i, pool, up in targets:
            tree = trees.get(up.pid)
            if tree is None:
                continue
            key = (name, slot)
            live.add(key)
            track = self._tracks.get(key)
            if track is None or track.pid != tree.pid:
                track = self._tracks[key] = _Track(tree.pid)
            self._update(track, tree, now)
            for pid, started in tree.escaped:
                process.children.track_escaped(pid, started, tree.pid)
            self._check_limit(key, i, pool, up, track)
        for key in [k for k in self._tracks if k not in live]:
            del self._tracks[key]  # a replica that is down or gone: its figures are not current
        for pid, started in process.children.escaped.items():
            if starttime(pid) != started:
                process.children.forget_escaped(pid)
        self.samples += 1

    def _update(self, track: _Track, tree: TreeSample, now: float) -> None:
        if track.last_cpu is not None and track.last_t is not None and now > track.last_t:
            track.cpu_percent = max(0.0, (tree.cpu_seconds - track.last_cpu) / (now - track.last_t) * 100)
        track.last_cpu, track.last_t = tree.cpu_seconds, now
        track.sample = tree
        track.sampled_at = time.time()
        hist = track.history
        hist.append((now, tree.rss_bytes))
        window = self.settings.growth_window_s
        while len(hist) > 1 and hist[1][0] <= now - window:
            hist.popleft()  # keep one sample at or before the window's start: the baseline

    def _check_limit(self, key: tuple[str, int | str], i: int, pool: Any, up: Any, track: _Track) -> None:
        limit_mb = getattr(up.cfg, "max_rss_mb", None)
        sample = track.sample
        if not limit_mb or sample is None:
            return
        limit = int(limit_mb * MIB)
        if sample.rss_bytes <= limit:
            track.over = 0
            return
        track.over += 1
        if track.over < self.settings.limit_samples or key in self._restarting:
            return
        self._restarting.add(key)
        task = asyncio.get_running_loop().create_task(self._restart(key, i, pool, up, sample, limit))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(
        self, key: tuple[str, int | str], i: int, pool: Any, up: Any, sample: TreeSample, limit: int
    ) -> None:
        name, slot = key
        reason = (
            f"its memory (RSS {sample.rss_bytes / MIB:.0f} MiB) exceeded max_rss_mb {limit / MIB:g} "
            f"for {self.settings.limit_samples} sample(s)"
        )
        try:
            logger.warning("%s: %s; restarting it (calls in flight get %g s)", up.label, reason, self.settings.drain_s)
            if await pool.recycle(i, reason, self.settings.drain_s):
                self.rss_restarts[name] = self.rss_restarts.get(name, 0) + 1
                self.events.append(
                    {
                        "ts": time.time(),
                        "server": name,
                        "replica": i + 1 if isinstance(slot, int) else "isolated",
                        "pid": sample.pid,
                        "rss_bytes": sample.rss_bytes,
                        "limit_bytes": limit,
                        "reason": reason,
                    }
                )
        finally:
            self._restarting.discard(key)
            self._tracks.pop(key, None)

    # ---- reading ------------------------------------------------------------------------
    def usage(self, server: str, replica: int) -> dict[str, Any] | None:
        """The latest figures of one replica (0-based), None when it has no sampled process.

        Returns:
            `{pid, cpu_percent (None until two samples), cpu_seconds, rss_bytes, open_fds, children,
            rss_growth_bytes, rss_growth_pct, rss_growth_window_s, rss_growth_alert, growth_warning_mb,
            max_rss_bytes
            (None: no limit), sampled_at (Unix s)}`.
        """
        return self._usage(self._tracks.get((server, replica)), server)

    def _usage(self, track: _Track | None, server: str) -> dict[str, Any] | None:
        if track is None or track.sample is None:
            return None
        s = track.sample
        base_t, base = track.history[0]
        growth = s.rss_bytes - base
        pct = growth / base * 100 if base else 0.0
        cfg = self.settings
        limit_mb = self._limit_mb(server)
        return {
            "pid": s.pid,
            "cpu_percent": round(track.cpu_percent, 1) if track.cpu_percent is not None else None,
            "cpu_seconds": round(s.cpu_seconds, 3),
            "rss_bytes": s.rss_bytes,
            "open_fds": s.open_fds,
            "children": s.children,
            "rss_growth_bytes": growth,
            "rss_growth_pct": round(pct, 1),
            "rss_growth_window_s": round(track.last_t - base_t, 1) if track.last_t is not None else 0.0,
            "rss_growth_alert": growth > cfg.growth_warning_mb * MIB and pct > cfg.growth_warning_pct,
            "growth_warning_mb": cfg.growth_warning_mb,
            "max_rss_bytes": int(limit_mb * MIB) if limit_mb else None,
            "sampled_at": track.sampled_at,
        }

    def replicas(self, server: str) -> list[dict[str, Any]]:
        """`usage()` of every sampled replica of `server`, each with `replica` (1-based) added."""
        shared = sorted(i for (name, i) in self._tracks if name == server and isinstance(i, int))
        return [{"replica": i + 1, **row} for i in shared if (row := self.usage(server, i)) is not None]

    def isolated_usage(self, server: str) -> dict[str, Any] | None:
        """The per-owner isolated sessions of `server`, summed (None when it has none sampled).

        Returns:
            `{sessions, cpu_seconds, rss_bytes, open_fds, children, largest_rss_bytes (the largest one's),
            growth_alerts (how many are growing past the alert thresholds)}`.
        """
        rows = [
            row
            for (name, slot), track in self._tracks.items()
            if name == server and isinstance(slot, str) and (row := self._usage(track, server)) is not None
        ]
        if not rows:
            return None
        return {
            "sessions": len(rows),
            "cpu_seconds": round(sum(r["cpu_seconds"] for r in rows), 3),
            "rss_bytes": sum(r["rss_bytes"] for r in rows),
            "open_fds": sum(r["open_fds"] for r in rows),
            "children": sum(r["children"] for r in rows),
            "largest_rss_bytes": max(r["rss_bytes"] for r in rows),
            "growth_alerts": sum(1 for r in rows if r["rss_growth_alert"]),
        }

    def _limit_mb(self, server: str) -> float | None:
        pool = self.pools().get(server)
        return getattr(getattr(pool, "cfg", None), "max_rss_mb", None)

    def stats(self) -> dict[str, Any]:
        """`{enabled, interval_s, samples, rss_restarts: {server: n}, recent_restarts: [...]}`."""
        return {
            "enabled": self.settings.enabled,
            "interval_s": self.settings.interval_s,
            "samples": self.samples,
            "rss_restarts": dict(self.rss_restarts),
            "recent_restarts": list(self.events)[::-1],
        }
