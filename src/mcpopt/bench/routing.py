"""`mcpopt bench routing`: the cost of choosing a replica (`Router.pick`), per strategy.

`pick()` runs on every forwarded call of a replicated server, so it has a budget: p99 < 50 us.
For each strategy (and least_inflight with sticky sessions) and each pool size (3 and 16
replicas by default), `picks` timed calls of `Router.pick` run after a warm-up, on replicas
with realistic state: random latency EWMAs (overall and for 20 tools), 0-3 calls in flight,
one replica down and, in pools of more than 3, one breaker open (filtering is part of the cost).
Each pick is timed alone with `time.perf_counter_ns` (its own ~0.1 us overhead included).

Figures: p50 / p99 / max in microseconds (nearest-rank percentiles), and whether p99 meets the
budget.
"""

from __future__ import annotations

import gc
import json
import random
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace

from mcpopt.upstream.routing import STRATEGIES, CircuitBreaker, Replica, Router

BUDGET_US = 50.0
"""p99 budget of one pick, in microseconds."""


@dataclass
class PickResult:
    strategy: str
    replicas: int
    picks: int
    p50_us: float
    p99_us: float
    max_us: float
    mean_us: float
    within_budget: bool


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def _replicas(n: int, rng: random.Random) -> list[Replica]:
    reps = []
    for i in range(n):
        rep = Replica(i, SimpleNamespace(state="ready"), CircuitBreaker())
        for t in range(20):
            rep.observe(f"tool_{t}", rng.uniform(1, 50))
        rep.inflight = rng.randint(0, 3)
        reps.append(rep)
    if n >= 3:
        reps[1].target.state = "down"
    if n > 3:
        for _ in range(reps[2].breaker.threshold):
            reps[2].breaker.record_failure()
    return reps


def measure(strategy: str, n: int, picks: int, warmup: int = 2000, seed: int = 7) -> PickResult:
    """Time `picks` calls of `Router.pick` for one strategy and pool size.

    Args:
        strategy: a routing strategy, or "least_inflight+sticky" (sticky tool, 1000 sessions).
        n: replicas in the pool.
        picks: timed picks (after `warmup` untimed ones).

    Returns:
        A `PickResult` with p50/p99/max/mean in microseconds.
    """
    rng = random.Random(seed)
    sticky = strategy.endswith("+sticky")
    base = strategy.removesuffix("+sticky")
    weights = [float(rng.randint(1, 5)) for _ in range(n)] if base == "weighted" else None
    router = Router(base, weights=weights, sticky_tools=["sticky_*"] if sticky else ())
    reps = _replicas(n, rng)
    tools = [f"sticky_{i}" if sticky else f"tool_{i}" for i in range(20)]
    sessions = [f"session-{i}" for i in range(1000)]
    samples: list[float] = []
    pick = router.pick
    clock = time.perf_counter_ns
    gc.collect()
    for k in range(warmup + picks):
        tool = tools[k % 20]
        session = sessions[k % 1000]
        t0 = clock()
        chosen = pick(reps, tool, session)
        t1 = clock()
        if k >= warmup:
            samples.append((t1 - t0) / 1000)
        if chosen is not None:  # keep in-flight counts moving, as calls start and end
            chosen.inflight = (chosen.inflight + 1) % 4
    samples.sort()
    p99 = _percentile(samples, 99)
    return PickResult(
        strategy=strategy,
        replicas=n,
        picks=picks,
        p50_us=_percentile(samples, 50),
        p99_us=p99,
        max_us=samples[-1],
        mean_us=sum(samples) / len(samples),
        within_budget=p99 < BUDGET_US,
    )


def run_routing(picks: int = 20_000, sizes: tuple[int, ...] = (3, 16), as_json: bool = False) -> list[PickResult]:
    """Measure every strategy at every pool size and print a table (or JSON with `as_json`)."""
    results = [measure(strategy, n, picks) for strategy in (*STRATEGIES, "least_inflight+sticky") for n in sizes]
    if as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return results
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Router.pick cost (us), {picks} picks each; budget p99 < {BUDGET_US:g} us")
    for col in ("strategy", "replicas", "p50", "p99", "max", "mean", "p99 ok"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for r in results:
        table.add_row(
            r.strategy,
            str(r.replicas),
            f"{r.p50_us:.2f}",
            f"{r.p99_us:.2f}",
            f"{r.max_us:.1f}",
            f"{r.mean_us:.2f}",
            "yes" if r.within_budget else "NO",
        )
    Console().print(table)
    return results
