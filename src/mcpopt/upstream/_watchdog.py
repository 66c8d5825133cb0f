"""The gateway's watchdog: kills the upstreams' process groups (and escaped descendants) once the gateway is gone.

Run as a script (`python _watchdog.py`), it imports nothing of mcpopt: it must start in a few
milliseconds and survive whatever state the gateway dies in. The gateway keeps the write end of
its stdin; the kernel closes it when the gateway exits for any reason, SIGKILL included, and EOF
here is the signal to act. `PR_SET_PDEATHSIG` alone kills only each upstream's direct child: a
grandchild (`npx` -> `node`, a server's worker) would live on, reparented to init.

Lines on stdin (ASCII):
    g <pgid> [starttime]  an upstream's process group (its leader's pid, and the leader's starttime)
    -g <pgid>             that group was stopped by the gateway itself
    p <pid> <starttime>   a descendant that left its group (setsid); starttime is field 22 of
                          /proc/<pid>/stat, checked before the kill so a reused pid is never hit
    -p <pid>
On EOF: SIGKILL every group still ours (`group_is_ours`) and every listed process whose starttime
still matches, then exit.
"""

from __future__ import annotations

import os
import signal
import sys


def starttime(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot), None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    rest = data[data.rfind(b")") + 2 :].split()
    return rest[19].decode() if len(rest) > 19 else None


def group_is_ours(pgid: int, started: str | None) -> bool:
    """Whether process group `pgid`, led at spawn by the process with starttime `started`, may be
    signalled as ours: its leader is that same process, or is gone (the group may outlive it). A
    leader pid held by another process means our group is gone: Linux reuses no pid that is still
    some group's id. `started` None (unknown: the leader had exited and been reaped before its
    starttime was read): ours only while no process holds that pid; one that does is a newcomer."""
    now = starttime(pgid)
    return now is None or now == started


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)  # a terminal's Ctrl-C is for the gateway; EOF is ours
    groups: dict[int, str | None] = {}
    procs: dict[int, str] = {}
    for raw in sys.stdin.buffer:
        parts = raw.split()
        try:
            if parts[0] == b"g":
                groups[int(parts[1])] = parts[2].decode() if len(parts) > 2 else None
            elif parts[0] == b"-g":
                groups.pop(int(parts[1]), None)
            elif parts[0] == b"p":
                procs[int(parts[1])] = parts[2].decode()
            elif parts[0] == b"-p":
                procs.pop(int(parts[1]), None)
        except (IndexError, ValueError):
            continue
    for pgid, started in groups.items():
        if not group_is_ours(pgid, started):
            continue
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    for pid, started in procs.items():
        if starttime(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


if __name__ == "__main__":
    main()
