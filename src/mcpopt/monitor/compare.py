"""Fair comparisons of paths (direct, gateway, relay, peers): an alternating schedule after warm-up,
and the spread of each path's samples.

Why (issue 15): a benchmark that makes every call of one path and then every call of the next
measures the first path cold (process start, JIT, page cache, first connections) and the machine's
drift between the two blocks as much as the paths themselves; on a shared machine that reversed
verdicts (the gateway "faster" than the direct path it sits in front of). So every benchmark that
compares paths:

1. warms each path up first (`warmup_rounds` untimed rounds, every path in each);
2. then alternates: round `r` visits every path once, in the given order rotated by `r`
   (A B C, B C A, C A B, A B C, ...), so no path is always first or always follows the same one,
   and slow drifts of the machine reach every path alike;
3. reports the spread, not one number: p50, p95, p99 and the interquartile range (`spread`).

`schedule` is pure (the tests check it); `run_schedule` plays it with one coroutine per slot.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mcpopt.monitor.stats import percentile

__all__ = ["Slot", "added", "run_schedule", "schedule", "spread"]


@dataclass(frozen=True)
class Slot:
    """One turn of one path: `round` counts from 0 over warm-up and timed rounds alike."""

    round: int
    path: str
    warmup: bool


def schedule(paths: Sequence[str], rounds: int, warmup_rounds: int = 1) -> list[Slot]:
    """The order in which to run `paths`: `warmup_rounds` rounds (untimed) then `rounds` timed ones,
    every path once per round, round `r` in the order of `paths` rotated left by `r`.

    Raises:
        ValueError: no paths, a path named twice, or negative round counts.
    """
    if not paths or len(set(paths)) != len(paths):
        raise ValueError(f"paths: expected distinct names (got {list(paths)!r})")
    if rounds < 0 or warmup_rounds < 0:
        raise ValueError("rounds and warmup_rounds: expected >= 0")
    out: list[Slot] = []
    n = len(paths)
    for r in range(warmup_rounds + rounds):
        for i in range(n):
            out.append(Slot(r, paths[(r + i) % n], r < warmup_rounds))
    return out


async def run_schedule(
    slots: Iterable[Slot], turn: Callable[[Slot], Awaitable[Sequence[float]]]
) -> dict[str, list[float]]:
    """Play `slots` in order; `turn(slot)` makes that slot's calls and returns their milliseconds.
    Returns the timed samples per path (warm-up slots' samples are dropped), in schedule order."""
    samples: dict[str, list[float]] = {}
    for slot in slots:
        got = await turn(slot)
        samples.setdefault(slot.path, [])
        if not slot.warmup:
            samples[slot.path].extend(got)
    return samples


def spread(samples_ms: Iterable[float]) -> dict[str, Any]:
    """`{n, p50, p95, p99, q1, q3, iqr, min, max}` of samples in ms (nearest-rank percentiles, see
    `mcpopt.monitor.stats.percentile`); every figure is None when there are no samples."""
    s = sorted(samples_ms)
    if not s:
        return {"n": 0, **dict.fromkeys(("p50", "p95", "p99", "q1", "q3", "iqr", "min", "max"))}
    q1, q3 = percentile(s, 0.25), percentile(s, 0.75)
    return {
        "n": len(s),
        "p50": percentile(s, 0.50),
        "p95": percentile(s, 0.95),
        "p99": percentile(s, 0.99),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": s[0],
        "max": s[-1],
    }


def added(path: Mapping[str, Any], base: Mapping[str, Any], keys: Sequence[str] = ("p50", "p99")) -> dict[str, Any]:
    """What `path` adds over `base` (two `spread` results): `{key: path[key] - base[key]}` in ms,
    None where either lacks the figure."""
    out: dict[str, Any] = {}
    for k in keys:
        a, b = path.get(k), base.get(k)
        out[k] = a - b if a is not None and b is not None else None
    return out
