"""A bare byte relay between a client and a stdio server: the floor of any out-of-process hop.

`python -m mcpopt.bench.relay CMD [ARGS...]` starts CMD and copies bytes stdin -> CMD's stdin
and CMD's stdout -> stdout with blocking `read(2)`/`write(2)` in two threads: no parsing, no
event loop, no logic. The throughput benchmark runs it beside mcpopt, so the price of one
extra process and two extra pipe hops per call (what any proxy pays before doing anything) is
measured on the same machine in the same run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading


def _copy(src: int, dst: int) -> None:
    try:
        while chunk := os.read(src, 1 << 16):
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst, view) :]
    except OSError:
        pass
    finally:
        try:
            os.close(dst)
        except OSError:
            pass


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m mcpopt.bench.relay CMD [ARGS...]", file=sys.stderr)
        return 2
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    up = threading.Thread(target=_copy, args=(0, proc.stdin.fileno()), daemon=True)
    down = threading.Thread(target=_copy, args=(proc.stdout.fileno(), 1), daemon=True)
    up.start()
    down.start()
    up.join()  # the client closed stdin: the relay closed the server's; wait for it to exit
    return proc.wait()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
