"""Child processes of the gateway: spawned so that none can outlive it.

Every stdio upstream is started in its own session (process group) with
`PR_SET_PDEATHSIG = SIGKILL` (Linux), so:
- a normal shutdown closes its stdin, waits, then SIGTERMs and SIGKILLs the whole group
  (the MCP lifecycle's shutdown order, spec 2025-11-25 basic/lifecycle#shutdown);
- if the gateway itself is killed (even by SIGKILL), the kernel kills the direct child, and
  the child's own stdin reaches EOF, which MCP servers treat as the end of the session.
`ChildRegistry` remembers every live group so a signal handler can reap them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Mapping

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
    """The process groups of every live upstream child, for reaping on any exit path."""

    def __init__(self) -> None:
        self._pgids: set[int] = set()

    def add(self, pgid: int) -> None:
        self._pgids.add(pgid)

    def discard(self, pgid: int) -> None:
        self._pgids.discard(pgid)

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Signal every remembered process group (synchronous; safe in signal handlers and atexit)."""
        for pgid in list(self._pgids):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        if sig == signal.SIGKILL:
            self._pgids.clear()


children = ChildRegistry()


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
    children.add(proc.pid)
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
        # Descendants that ignored SIGTERM (or outlived the leader) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
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
