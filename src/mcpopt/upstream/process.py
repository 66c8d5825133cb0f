"""Child processes of the gateway: spawned so that none can outlive it.

Every stdio upstream is started in its own session (process group) with
`PR_SET_PDEATHSIG = SIGKILL` (Linux), so:
- a normal shutdown closes its stdin, waits, then SIGTERMs and SIGKILLs the whole group
  (the MCP lifecycle's shutdown order, spec 2025-11-25 basic/lifecycle#shutdown);
- if the gateway itself is killed (even by SIGKILL), the kernel kills the direct child, and
  the child's own stdin reaches EOF, which MCP servers treat as the end of the session;
- and the rest of each group (grandchildren: `npx` -> `node`, a server's workers), plus any
  descendant the resource watch saw leave its group, is killed by the watchdog (`_watchdog.py`):
  a tiny process, started with the first upstream, that reads the list of groups on a pipe from
  the gateway and acts on that pipe's EOF, which the kernel delivers however the gateway died.
`ChildRegistry` remembers every live group so a signal handler can reap them all.

Why not `PR_SET_CHILD_SUBREAPER` on the gateway: orphans would then be re-parented to the gateway,
whose asyncio child watcher waits only for its own children, so they would linger as zombies; and
a subreaper that is itself SIGKILLed hands its orphans on to init anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except Exception:  # noqa: BLE001 - best effort; the process group kill still applies
            pass


class ChildRegistry:
    """The process groups of every live upstream child, for reaping on any exit path.

    Args:
        watchdog: start the watchdog process (`_watchdog.py`) with the first group, so the groups
            die with the gateway even when it is SIGKILLed.
    """

    def __init__(self, watchdog: bool = True) -> None:
        self._pgids: dict[int, str | None] = {}
        """pgid (its leader's pid) -> the leader's starttime at spawn (None: unknown)."""
        self._escaped: dict[int, str] = {}
        self._owner: dict[int, int] = {}
        """escaped pid -> the process group (upstream) it descends from."""
        self._watchdog_enabled = watchdog
        self._watchdog: subprocess.Popen[bytes] | None = None

    def add(self, pgid: int, started: str | None = None) -> None:
        """Remember an upstream's process group; `started` is its leader's starttime at spawn, which
        tells a reused pid from ours (`_watchdog.group_is_ours`)."""
        self._pgids[pgid] = started
        self._tell(f"g {pgid} {started}" if started is not None else f"g {pgid}")

    def discard(self, pgid: int) -> None:
        if pgid in self._pgids:
            del self._pgids[pgid]
            self._tell(f"-g {pgid}")

    def started(self, pgid: int) -> str | None:
        """The starttime recorded for group `pgid`'s leader at spawn (None: not ours, or unknown)."""
        return self._pgids.get(pgid)

    def is_ours(self, pgid: int) -> bool:
        """Group `pgid` is registered and its leader's pid was not reused since (`group_is_ours`)."""
        return pgid in self._pgids and _group_is_ours(pgid, self._pgids[pgid])

    def track_escaped(self, pid: int, starttime: str, owner: int) -> None:
        """Remember a descendant of upstream group `owner` that left it (it called setsid): it is
        killed with that upstream's group, and by the watchdog."""
        self._owner[pid] = owner
        if self._escaped.get(pid) != starttime:
            self._escaped[pid] = starttime
            self._tell(f"p {pid} {starttime}")

    def forget_escaped(self, pid: int) -> None:
        self._owner.pop(pid, None)
        if self._escaped.pop(pid, None) is not None:
            self._tell(f"-p {pid}")

    def kill_escaped(self, owner: int, sig: int = signal.SIGKILL) -> None:
        """Signal the tracked descendants of group `owner` that left it (the group's own stop)."""
        for pid, group in list(self._owner.items()):
            if group == owner:
                if _starttime(pid) == self._escaped.get(pid):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
                self.forget_escaped(pid)

    @property
    def escaped(self) -> dict[int, str]:
        """pid -> starttime of the descendants tracked outside the groups."""
        return dict(self._escaped)

    @property
    def watchdog_pid(self) -> int | None:
        return self._watchdog.pid if self._watchdog is not None else None

    def _tell(self, line: str) -> None:
        """One line to the watchdog (started on first use). A few bytes into a pipe the watchdog
        drains at once: the write does not block."""
        if not self._watchdog_enabled or not sys.platform.startswith("linux"):
            return
        dog = self._watchdog
        if dog is None or dog.poll() is not None:
            dog = self._watchdog = self._start_watchdog()
            if dog is None:
                return
        assert dog.stdin is not None
        try:
            dog.stdin.write(line.encode() + b"\n")
            dog.stdin.flush()
        except OSError as exc:
            logger.warning("upstream watchdog: cannot write to it (%s); restarting it", exc)
            self._watchdog = None

    def _start_watchdog(self) -> subprocess.Popen[bytes] | None:
        try:
            dog = subprocess.Popen(  # noqa: S603 - our own script, with our own interpreter
                [sys.executable, str(Path(__file__).with_name("_watchdog.py"))],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # signals for the gateway's group (Ctrl-C) are not for it
                close_fds=True,
            )
        except OSError as exc:
            logger.warning("upstream watchdog could not start (%s): grandchildren may outlive a killed gateway", exc)
            self._watchdog_enabled = False
            return None
        assert dog.stdin is not None
        # Re-send what an earlier watchdog knew (it may have been killed).
        lines = [f"g {g} {t}" if t is not None else f"g {g}" for g, t in self._pgids.items()]
        lines += [f"p {p} {t}" for p, t in self._escaped.items()]
        if lines:
            dog.stdin.write(("\n".join(lines) + "\n").encode())
            dog.stdin.flush()
        return dog

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Signal every remembered process group (synchronous; safe in signal handlers and atexit)."""
        for pgid, started in list(self._pgids.items()):
            if _group_is_ours(pgid, started):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, sig)
        for pid, started in list(self._escaped.items()):
            if _starttime(pid) == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        if sig == signal.SIGKILL:
            self._pgids.clear()
            self._escaped.clear()
            self._owner.clear()


def _starttime(pid: int) -> str | None:
    from mcpopt.upstream._watchdog import starttime

    return starttime(pid)


def _group_is_ours(pgid: int, started: str | None) -> bool:
    from mcpopt.upstream._watchdog import group_is_ours

    return group_is_ours(pgid, started)


children = ChildRegistry(watchdog=os.environ.get("MCPOPT_WATCHDOG", "1") != "0")
"""The gateway's registry (`MCPOPT_WATCHDOG=0` runs without the watchdog: tests show what it prevents)."""


async def spawn(
    command: str, args: list[str], env: Mapping[str, str] | None, cwd: str | None
) -> asyncio.subprocess.Process:
    """Start a stdio upstream in its own process group, with a parent-death signal.

    Raises:
        OSError: the command does not exist or cannot be executed.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = await asyncio.create_subprocess_exec(
        command,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_child_setup,
        limit=1 << 30,  # one JSON-RPC message per line; results of many MB are legal
    )
    # The leader's starttime tells our group from a later process given the same pid (None when
    # it already exited and was reaped: then any process holding that pid later is not ours).
    children.add(proc.pid, _starttime(proc.pid))
    return proc


async def stop(proc: asyncio.subprocess.Process, grace_s: float = 2.0) -> None:
    """Stop a child: close stdin, wait `grace_s`, SIGTERM the group, wait, SIGKILL the group."""
    try:
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        if await _exited(proc, grace_s):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        if await _exited(proc, grace_s):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await _exited(proc, grace_s)
    finally:
        # Descendants that ignored SIGTERM (or outlived the leader) go too -- unless the leader was
        # reaped and its pid reused (then our group is gone, and the newcomer is not ours).
        if children.is_ours(proc.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        children.kill_escaped(proc.pid)
        children.discard(proc.pid)


async def _exited(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    # Poll returncode rather than proc.wait(): wait() also waits for pipe EOF, which a
    # grandchild holding the pipe can delay forever.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while proc.returncode is None:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True
