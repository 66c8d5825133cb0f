"""What one resource-watch sample costs: `python -m mcpopt.bench.watch_cost [trees] [rounds]`.

Starts `trees` idle Python processes (stand-ins for stdio upstreams), then times `sample_trees`
over them `rounds` times after 5 warm-up rounds, and prints CPU time (`time.process_time`, the
cost to the gateway) and wall time (which includes waiting for the scheduler on a busy machine)
as p50 / p99, with the number of processes on the machine (the /proc scan is over all of them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from mcpopt.upstream.watch import sample_trees


def main(trees: int = 5, rounds: int = 50) -> str:
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(trees)]
    try:
        pids = [p.pid for p in procs]
        for _ in range(5):
            sample_trees(pids)
        cpu, wall = [], []
        for _ in range(rounds):
            c0, w0 = time.process_time(), time.perf_counter()
            sample_trees(pids)
            cpu.append((time.process_time() - c0) * 1000)
            wall.append((time.perf_counter() - w0) * 1000)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    cpu.sort()
    wall.sort()

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{len(psutil.pids())} processes on the machine, {trees} upstream trees, {rounds} samples (load {load}): "
        f"CPU p50 {pct(cpu, 0.5):.2f} ms p99 {pct(cpu, 0.99):.2f} ms; wall p50 {pct(wall, 0.5):.2f} ms "
        f"p99 {pct(wall, 0.99):.2f} ms per sample"
    )


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    print(main(*args))
