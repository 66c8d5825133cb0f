"""Choosing a replica for a call, and deciding what to do when it fails.

Everything here is synchronous, allocation-light and free of I/O: `Router.pick` runs on every
call a `ServerPool` forwards, and must cost well under 50 us at p99 (`mcpopt bench routing`
measures it). The pieces:

* `Replica`: what the router knows of one replica (in-flight calls, latency EWMAs, breaker).
* `Router`: the strategies `round_robin`, `least_inflight`, `ewma_latency`, `weighted`,
  `predictive`, plus sticky sessions for tools matching `routing.sticky_tools` globs.
* `CircuitBreaker`: closed / open / half-open per replica (Nygard, *Release It!*, 2007,
  ch. 5 "Circuit Breaker"), with an injectable clock for tests.
* `LatencyWindow` / `AdaptiveTimeouts`: per-tool p99 of the last 256 latencies x a factor,
  clamped to a floor and a ceiling.
* `may_retry` / `backoff_s` / `SAFE_METHODS`: when repeating a request is safe, and how long
  to wait before it (exponential backoff with "full jitter", Marc Brooker, AWS Architecture
  Blog, "Exponential Backoff And Jitter", 2015).

Only replicas that are ready (their session is up) and whose breaker lets a call through are
candidates for `pick`.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from fnmatch import fnmatchcase
from typing import Any, Literal

from mcpopt.config import AdaptiveTimeoutConfig, BreakerConfig
from mcpopt.errors import UpstreamClosed, UpstreamTimeout, UpstreamUnavailable

Strategy = Literal["round_robin", "least_inflight", "ewma_latency", "weighted", "predictive"]
STRATEGIES: tuple[Strategy, ...] = ("round_robin", "least_inflight", "ewma_latency", "weighted", "predictive")
BreakerState = Literal["closed", "open", "half_open"]

EWMA_ALPHA = 0.3
"""Weight of the newest latency sample in every EWMA here: `ewma = a * sample + (1 - a) * ewma`.

0.3 gives a sample `n` calls old the weight 0.3 * 0.7**n: the estimate follows a replica that
slows down within ~3 calls (half the weight is on the last 2 samples) while one outlier moves
it by only 30%. The load score `ewma * (inflight + 1)` is Finagle's "Peak EWMA" cost
(latency x (outstanding + 1)), without its peak-sensitivity."""

_MIN_SCORE_MS = 1e-3
"""Latency assumed for a replica with no sample yet: it is tried first (and learns quickly)."""


class NoReplicaAvailable(UpstreamUnavailable):
    """No replica could take the call (all down, starting, or their breakers open).

    The request was never sent, so repeating it is always safe.
    """


# ---- circuit breaker -------------------------------------------------------------------------
class CircuitBreaker:
    """Closed / open / half-open breaker of one replica (Nygard, *Release It!*, "Circuit Breaker").

    * closed: every call passes; `failure_threshold` consecutive failures open it.
    * open: no call passes for `open_ms`; then it turns half-open.
    * half-open: up to `half_open_max` trial calls pass at once; a success closes it, a failure
      opens it again for another `open_ms`.

    Failures are the gateway's own transport outcomes (closed, timed out, unavailable), never a
    JSON-RPC error or an `isError` result: those prove the server is alive and answering.

    Args:
        cfg: the server's `breaker` settings (None: the defaults).
        clock: seconds, monotonic (`time.monotonic`; tests pass a fake).
    """

    __slots__ = (
        "enabled",
        "threshold",
        "open_s",
        "half_open_max",
        "clock",
        "_state",
        "failures",
        "opened_at",
        "trials",
        "on_change",
    )

    def __init__(self, cfg: BreakerConfig | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        cfg = cfg or BreakerConfig()
        self.enabled = cfg.enabled
        self.threshold = cfg.failure_threshold
        self.open_s = cfg.open_ms / 1000
        self.half_open_max = cfg.half_open_max
        self.clock = clock
        self._state: BreakerState = "closed"
        self.failures = 0
        """Consecutive failures while closed."""
        self.opened_at = 0.0
        self.trials = 0
        """Trial calls in flight while half-open."""
        self.on_change: Callable[[BreakerState], None] | None = None
        """Called with "open" / "closed" when this replica's own calls or checks open or close the
        breaker (not for states adopted from other gateway replicas: `adopt`)."""

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker whose `open_ms` elapsed reads as half-open)."""
        if self._state == "open" and self.clock() - self.opened_at >= self.open_s:
            self._state = "half_open"
            self.trials = 0
        return self._state

    def allows(self) -> bool:
        """True if a call may go to this replica now (does not reserve a half-open trial)."""
        state = self._state
        if state == "closed":
            return True
        if state == "open":
            if self.clock() - self.opened_at < self.open_s:
                return False
            self._state = "half_open"
            self.trials = 0
        return self.trials < self.half_open_max

    def acquire(self) -> None:
        """A call is being sent (after `allows()`): in half-open state it takes a trial slot."""
        if self._state == "half_open":
            self.trials += 1

    def release(self) -> None:
        """A call ended without a verdict (cancelled): give its trial slot back."""
        if self._state == "half_open" and self.trials > 0:
            self.trials -= 1

    def record_success(self) -> None:
        """The replica answered (a result, or a JSON-RPC error): closed stays closed, half-open closes."""
        if self._state == "open":
            return  # a late answer to a call sent before it opened proves little
        was = self._state
        self._state = "closed"
        self.failures = 0
        self.trials = 0
        if was != "closed" and self.on_change is not None:
            self.on_change("closed")

    def record_failure(self) -> None:
        """The replica failed a call or a health check (closed, timed out, unavailable)."""
        if not self.enabled:
            return
        if self._state == "closed":
            self.failures += 1
            if self.failures < self.threshold:
                return
        self._state = "open"
        self.opened_at = self.clock()
        self.trials = 0
        self.failures = 0
        if self.on_change is not None:
            self.on_change("open")

    def adopt(self, state: BreakerState, remaining_s: float = 0.0) -> bool:
        """Take a state another gateway replica observed for the same upstream (`mcpopt.gateway.shared`).

        "open": open for `remaining_s` more seconds (at most `open_ms`); "closed": close it. Never
        calls `on_change` (what was adopted is not re-published). Returns True if the state changed.
        """
        if not self.enabled:
            return False
        if state == "open":
            remaining = max(0.0, min(self.open_s, remaining_s))
            self._state = "open"
            self.opened_at = self.clock() - (self.open_s - remaining)
            self.trials = 0
            self.failures = 0
            return True
        if state == "closed" and self._state != "closed":
            self._state = "closed"
            self.failures = 0
            self.trials = 0
            return True
        return False

    def reset(self) -> None:
        """Close the breaker (the replica reconnected: a fresh session)."""
        self._state = "closed"
        self.failures = 0
        self.trials = 0

    def retry_in_s(self) -> float:
        """Seconds until an open breaker turns half-open (0 when not open)."""
        if self._state != "open":
            return 0.0
        return max(0.0, self.open_s - (self.clock() - self.opened_at))


# ---- replicas ---------------------------------------------------------------------------------
class Replica:
    """What the router knows of one replica.

    Attributes:
        index: 0-based position in the pool (shown to people as `index + 1`).
        target: the replica's session object; the router reads only `target.state`
            (a candidate must be "ready").
        breaker: its `CircuitBreaker`.
        inflight: calls sent to it and not yet answered.
        calls / failures: totals (failures = transport failures, as the breaker counts them).
        ewma_ms: EWMA of its latency in ms (`EWMA_ALPHA`), None before the first sample.
        tool_ewma: per-tool EWMA of its latency in ms (for `predictive`).
        last_error: the last transport failure seen on it.
    """

    __slots__ = ("index", "target", "breaker", "inflight", "calls", "failures", "ewma_ms", "tool_ewma", "last_error")

    def __init__(self, index: int, target: Any, breaker: CircuitBreaker | None = None) -> None:
        self.index = index
        self.target = target
        self.breaker = breaker or CircuitBreaker()
        self.inflight = 0
        self.calls = 0
        self.failures = 0
        self.ewma_ms: float | None = None
        self.tool_ewma: dict[str, float] = {}
        self.last_error: str | None = None

    def observe(self, key: str | None, ms: float) -> None:
        """Fold one latency sample (ms) into the replica's EWMA and, with `key`, the per-tool one."""
        prev = self.ewma_ms
        self.ewma_ms = ms if prev is None else prev + EWMA_ALPHA * (ms - prev)
        if key is not None:
            old = self.tool_ewma.get(key)
            self.tool_ewma[key] = ms if old is None else old + EWMA_ALPHA * (ms - old)


# ---- the router -------------------------------------------------------------------------------
class Router:
    """Picks the replica for each call.

    Strategies (ties are broken by a rotating start, so idle replicas share sequential calls):

    * `round_robin`: the next candidate in turn.
    * `least_inflight`: the candidate with the fewest calls in flight.
    * `ewma_latency`: min `ewma_ms * (inflight + 1)` (Finagle's Peak-EWMA load metric; the EWMA
      uses `EWMA_ALPHA`); a replica with no sample yet scores ~0 and is tried first.
    * `weighted`: smooth weighted round-robin as in nginx (`ngx_http_upstream_get_peer`, 2011):
      each candidate's current weight grows by its weight, the largest wins and loses the
      total; over any window of sum(weights) calls, replica `i` gets exactly `weights[i]`.
    * `predictive`: like `ewma_latency` but with the per-tool EWMA of each replica (its latency
      for *this* tool), falling back to the replica's overall EWMA.

    Sticky routing: a call to a tool matching one of `sticky_tools` (fnmatch globs) from a
    given session key goes to the replica that session used last, as long as that replica is a
    candidate; otherwise the strategy picks and the session moves there. At most
    `sticky_capacity` sessions are remembered (the oldest are forgotten first).

    Args:
        strategy: one of `STRATEGIES`.
        weights: `weighted` only: one positive weight per replica (default all 1).
        sticky_tools: tool-name globs routed stickily.
        sticky_capacity: sessions remembered for sticky routing.

    Raises:
        ValueError: an unknown strategy, or a non-positive weight.
    """

    def __init__(
        self,
        strategy: str = "least_inflight",
        *,
        weights: Sequence[float] | None = None,
        sticky_tools: Sequence[str] = (),
        sticky_capacity: int = 10_000,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"routing.strategy: expected one of {', '.join(STRATEGIES)} (got {strategy!r})")
        if weights is not None and any(w <= 0 for w in weights):
            raise ValueError("routing.weights: expected positive numbers")
        self.strategy = strategy
        self.weights: list[float] = list(weights or [])
        self._current: list[float] = []
        self.sticky_tools = tuple(sticky_tools)
        self._sticky_of: dict[str, bool] = {}
        self._sessions: dict[str, int] = {}
        self._capacity = max(1, sticky_capacity)
        self._tick = 0
        self._choose: Callable[[list[Replica], str | None], Replica] = getattr(self, "_" + strategy)

    def is_sticky(self, tool: str) -> bool:
        """True if calls to `tool` are routed stickily (cached per tool name)."""
        got = self._sticky_of.get(tool)
        if got is None:
            got = any(fnmatchcase(tool, g) for g in self.sticky_tools)
            if len(self._sticky_of) < 100_000:
                self._sticky_of[tool] = got
        return got

    def pick(
        self,
        replicas: Sequence[Replica],
        tool: str | None = None,
        session: str = "",
        exclude: Collection[int] = (),
    ) -> Replica | None:
        """Choose the replica for one call.

        Args:
            replicas: the pool's replicas (any order; `index` identifies them).
            tool: the tool (or method) called; used by `predictive` and sticky routing.
            session: the caller's session key for sticky routing (session id, else partition).
            exclude: indexes already tried by this call: avoided while another candidate exists.

        Returns:
            The chosen `Replica`, or None when no replica is ready with a breaker that allows a
            call. The caller sends the call and updates `inflight`, the EWMAs and the breaker.
        """
        if len(replicas) == 1 and not (tool is not None and self.sticky_tools):
            only = replicas[0]  # one replica, nothing sticky: it or none (what the general case gives)
            return only if only.target.state == "ready" and only.breaker.allows() else None
        cands = [r for r in replicas if r.target.state == "ready" and r.breaker.allows()]
        if not cands:
            return None
        if exclude:
            fresh = [r for r in cands if r.index not in exclude]
            if fresh:
                cands = fresh
        if tool is not None and self.sticky_tools and self.is_sticky(tool):
            sessions = self._sessions
            pinned = sessions.get(session)
            if pinned is not None:
                for r in cands:
                    if r.index == pinned:
                        return r
                del sessions[session]
            chosen = cands[0] if len(cands) == 1 else self._choose(cands, tool)
            if len(sessions) >= self._capacity:
                del sessions[next(iter(sessions))]
            sessions[session] = chosen.index
            return chosen
        if len(cands) == 1:
            return cands[0]
        return self._choose(cands, tool)

    def forget(self, session: str) -> None:
        """Drop a session's sticky replica (the client disconnected)."""
        self._sessions.pop(session, None)

    # ---- strategies (each gets >= 2 candidates) ----
    def _round_robin(self, cands: list[Replica], tool: str | None) -> Replica:
        self._tick += 1
        return cands[self._tick % len(cands)]

    def _least_inflight(self, cands: list[Replica], tool: str | None) -> Replica:
        self._tick += 1
        n = len(cands)
        start = self._tick % n
        best = cands[start]
        low = best.inflight
        for k in range(1, n):
            r = cands[(start + k) % n]
            if r.inflight < low:
                best, low = r, r.inflight
        return best

    def _ewma_latency(self, cands: list[Replica], tool: str | None) -> Replica:
        self._tick += 1
        n = len(cands)
        start = self._tick % n
        best = cands[start]
        low = math.inf
        for k in range(n):
            r = cands[(start + k) % n]
            e = r.ewma_ms
            score = (e if e is not None and e > _MIN_SCORE_MS else _MIN_SCORE_MS) * (r.inflight + 1)
            if score < low:
                best, low = r, score
        return best

    def _predictive(self, cands: list[Replica], tool: str | None) -> Replica:
        self._tick += 1
        n = len(cands)
        start = self._tick % n
        best = cands[start]
        low = math.inf
        for k in range(n):
            r = cands[(start + k) % n]
            e = r.tool_ewma.get(tool) if tool is not None else None
            if e is None:
                e = r.ewma_ms
            score = (e if e is not None and e > _MIN_SCORE_MS else _MIN_SCORE_MS) * (r.inflight + 1)
            if score < low:
                best, low = r, score
        return best

    def _weighted(self, cands: list[Replica], tool: str | None) -> Replica:
        current = self._current
        weights = self.weights
        top = max(r.index for r in cands)
        if top >= len(current):
            current.extend([0.0] * (top + 1 - len(current)))
        total = 0.0
        best = cands[0]
        best_w = -math.inf
        for r in cands:
            i = r.index
            w = weights[i] if i < len(weights) else 1.0
            cw = current[i] + w
            current[i] = cw
            total += w
            if cw > best_w:
                best, best_w = r, cw
        current[best.index] -= total
        return best


# ---- adaptive timeouts ------------------------------------------------------------------------
class LatencyWindow:
    """The last `size` latencies (ms) of one tool and their p99 (nearest-rank, recomputed at
    most every 8 new samples so a call never sorts the window)."""

    __slots__ = ("samples", "_p99", "_fresh")

    def __init__(self, size: int = 256) -> None:
        self.samples: deque[float] = deque(maxlen=size)
        self._p99 = -1.0
        """The last computed p99 (-1: never computed)."""
        self._fresh = 0
        """Samples added since the p99 was last computed."""

    def add(self, ms: float) -> None:
        self.samples.append(ms)
        self._fresh += 1

    def __len__(self) -> int:
        return len(self.samples)

    def p99(self) -> float:
        """The 99th percentile in ms (nearest rank: the ceil(0.99 n)-th smallest); 0 when empty."""
        if not self.samples:
            return 0.0
        if self._fresh >= 8 or self._p99 < 0:
            ordered = sorted(self.samples)
            self._p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
            self._fresh = 0
        return self._p99


class AdaptiveTimeouts:
    """Per-key (tool or method) timeouts learnt from observed latency.

    timeout = clamp(p99 of the last 256 latencies x `factor`, `floor_ms`, `ceiling_ms`) once
    `min_samples` were seen; before that, None (the caller uses the server's timeout).
    """

    def __init__(self, cfg: AdaptiveTimeoutConfig, window: int = 256) -> None:
        self.cfg = cfg
        self.window = window
        self._windows: dict[str, LatencyWindow] = {}

    def observe(self, key: str, ms: float) -> None:
        """Record one latency sample in ms (answered calls, and timed-out ones at their timeout)."""
        win = self._windows.get(key)
        if win is None:
            win = self._windows[key] = LatencyWindow(self.window)
        win.add(ms)

    def timeout_s(self, key: str) -> float | None:
        """The timeout to use for `key` in seconds, or None before `min_samples` samples."""
        cfg = self.cfg
        win = self._windows.get(key)
        if win is None or len(win) < cfg.min_samples:
            return None
        ms = min(max(win.p99() * cfg.factor, cfg.floor_ms), cfg.ceiling_ms)
        return ms / 1000


# ---- retry policy -----------------------------------------------------------------------------
SAFE_METHODS = frozenset(
    {
        "ping",
        "server/discover",
        "tools/list",
        "prompts/list",
        "prompts/get",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "completion/complete",
        "logging/setLevel",
        "resources/subscribe",
        "resources/unsubscribe",
    }
)
"""Methods other than tools/call that are safe to repeat (reads, or idempotent by the spec)."""


def may_retry(exc: BaseException, safe: bool) -> bool:
    """Whether a failed request may be sent again.

    Args:
        exc: what the attempt raised.
        safe: repeating the request has no additional effect (a read-only or idempotent tool,
            or a method in `SAFE_METHODS`).

    Returns:
        True for `UpstreamUnavailable` (incl. `NoReplicaAvailable`: no session, breaker open):
        the request never reached a server. For `UpstreamClosed` / `UpstreamTimeout` (it may
        have reached one and had its effect) only when `safe`. Never for anything else: a
        JSON-RPC error or an `isError` result is the server's answer, and a gateway rejection
        (queue full) is back-pressure.
    """
    if isinstance(exc, UpstreamUnavailable):
        return True
    if isinstance(exc, (UpstreamClosed, UpstreamTimeout)):
        return safe
    return False


def backoff_s(retry: int, initial_ms: float, max_ms: float, rand: Callable[[], float] = random.random) -> float:
    """Sleep before retry number `retry` (1 = the first retry), in seconds.

    "Full jitter" (Brooker, "Exponential Backoff And Jitter", AWS Architecture Blog, 2015):
    `uniform(0, min(max_ms, initial_ms * 2 ** (retry - 1)))` -- spreads retries of many callers
    so they do not hit a recovering server in lockstep.
    """
    cap = min(float(max_ms), float(initial_ms) * (2 ** max(0, retry - 1)))
    return rand() * cap / 1000
