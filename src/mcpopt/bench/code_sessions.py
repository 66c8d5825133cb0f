"""A multi-step data task in three `execute_code` calls, with code sessions and without, on real servers.

Task (what an agent does step by step, reading each step's output before writing the next):
1. **look**: read a ~1 MB order log (server-filesystem `read_text_file`) and count the ERROR
   lines by reason;
2. **filter**: take the most frequent reason and group its failed orders by service;
3. **store**: write one incident per service to the knowledge graph (server-memory
   `create_entities`) and report how many were stored.

- **With sessions** (`gateway.code_mode.sessions.enabled: true`): call 2 uses the `lines` and
  `kinds` call 1 left, call 3 the `groups` of call 2; the log is read once.
- **Without sessions, redoing**: nothing survives a call, so each call redoes the earlier
  steps -- its code carries them again and the log is read again;
- **Without sessions, through the model**: each call prints what the next one needs (the
  ERROR lines, then the groups) and the model copies it into the next call's code (with
  `max_output_bytes` raised to 200 KB so the ERROR lines fit in one output).

Both ways are real calls through the gateway. Tokens counted are what enters the model's
context: the code of each call (arguments) and what each call returns (results), with the
offline tokenizer of `mcpopt.bench.data_heavy`; the tool definitions are the same both ways and
listed apart. Wall time is measured per round (the three calls), the two ways alternating round
by round after a warm-up round, and reported as p50/p95 (ms). Each round is a new conversation
(a new client session): its session is opened by a trivial call before the three timed ones
(`open_ms`: for wasm that is where a session's interpreter starts, from a warm spare when one
is ready), so the figures are per-call costs of a conversation under way.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any

from mcp_types.version import LATEST_HANDSHAKE_VERSION

from mcpopt.api import ClientLink, GatewayAPI, no_progress
from mcpopt.bench.data_heavy import count_tokens, result_text, tool_tokens
from mcpopt.codemode.sandbox import CodeModeSettings
from mcpopt.codemode.tool import CodeModeTool

REASONS = ("card_declined", "timeout", "fraud_check")
SERVICES = ("api", "billing", "checkout", "search", "worker")

LOOK = """\
text = (await tools.{fs}.read_text_file(path={log!r}))["content"]
lines = text.splitlines()
kinds = {{}}
for line in lines:
    if " ERROR " in line:
        reason = line.split("reason=")[1].split()[0]
        kinds[reason] = kinds.get(reason, 0) + 1
"""
LOOK_PRINT = 'print(len(lines), "lines; ERROR by reason:", sorted(kinds.items(), key=lambda kv: -kv[1]))\n'
FILTER_TOP = "top = max(kinds, key=lambda k: kinds[k])\n"
FILTER = """\
groups = {}
for line in lines:
    if " ERROR " in line and "reason=" + top in line:
        groups.setdefault(line.split()[2], []).append(line.split("order=")[1].split()[0])
"""
FILTER_PRINT = "print(top, {service: len(orders) for service, orders in sorted(groups.items())})\n"
ERRORS_PRINT = 'import json\nprint(json.dumps([line for line in lines if " ERROR " in line]))\n'
GROUPS_PRINT = "import json\nprint(json.dumps(groups))\n"
STORE = """\
stored = await tools.{mem}.create_entities(entities=[
    {{"name": {prefix!r} + "-" + service, "entityType": "incident",
      "observations": [top + " orders: " + ", ".join(orders)]}}
    for service, orders in sorted(groups.items())
])
print(len(stored["entities"]), "incidents stored for", top)
"""


def make_order_log(path: Path, size_bytes: int = 1_000_000, errors: int = 240, seed: int = 11) -> dict[str, Any]:
    """Write an order log of about `size_bytes` with `errors` ERROR lines; returns the expected answers."""
    rng = random.Random(seed)
    lines: list[str] = []
    size, n = 0, 0
    while size < size_bytes:
        n += 1
        line = (
            f"2026-11-30T10:{n // 60 % 60:02d}:{n % 60:02d}Z INFO {rng.choice(SERVICES)} order={100000 + n} "
            f"status=ok took_ms={rng.randrange(5, 900)}"
        )
        lines.append(line)
        size += len(line) + 1
    weights = (0.5, 0.3, 0.2)
    for at in rng.sample(range(len(lines)), errors):
        reason = rng.choices(REASONS, weights)[0]
        service = rng.choice(SERVICES)
        lines[at] = f"2026-11-30T11:00:00Z ERROR {service} order={900000 + at} status=failed reason={reason}"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    kinds: dict[str, int] = {}
    groups: dict[str, list[str]] = {}
    for line in lines:
        if " ERROR " in line:
            kinds[line.split("reason=")[1]] = kinds.get(line.split("reason=")[1], 0) + 1
    top = max(kinds, key=lambda k: kinds[k])
    for line in lines:
        if " ERROR " in line and "reason=" + top in line:
            groups.setdefault(line.split()[2], []).append(line.split("order=")[1].split()[0])
    return {"lines": len(lines), "kinds": kinds, "top": top, "groups": groups, "bytes": path.stat().st_size}


WAYS = ("with_sessions", "without_sessions", "through_the_model")


def step(way: str, k: int, fs: str, mem: str, log: str, prefix: str, seen: list[str]) -> str:
    """The code of call `k` (0..2) one way, written after reading the outputs `seen` so far:

    - `with_sessions`: each step alone, on what the session kept;
    - `without_sessions`: each call redoes the earlier steps (the log is read again);
    - `through_the_model`: no sessions; each call prints what the next needs, and the next
      call's code carries it (the model copies it from the output it read).
    """
    look = LOOK.format(fs=fs, log=log)
    store = STORE.format(mem=mem, prefix=prefix)
    if way == "with_sessions":
        return [look + LOOK_PRINT, FILTER_TOP + FILTER + FILTER_PRINT, store][k]
    if way == "without_sessions":
        return [look + LOOK_PRINT, look + FILTER_TOP + FILTER + FILTER_PRINT, look + FILTER_TOP + FILTER + store][k]
    if k == 0:
        return look + LOOK_PRINT + ERRORS_PRINT
    if k == 1:
        summary, errors = seen[0].strip().splitlines()[:2]
        top = re.search(r"\('(\w+)', \d+\)", summary)
        assert top is not None, summary
        return f"lines = {errors}\ntop = {top.group(1)!r}\n" + FILTER + GROUPS_PRINT
    top = re.search(r"^top = '(\w+)'$", step(way, 1, fs, mem, log, prefix, seen), re.M)
    assert top is not None
    return f"top = {top.group(1)!r}\ngroups = {seen[1].strip().splitlines()[-1]}\n" + store


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def compare(gateway: GatewayAPI, folder: Path, *, rounds: int = 5, backend: str = "monty") -> dict[str, Any]:
    """Do the task `rounds` times each way (after one warm-up round each), alternating; report both.

    Args:
        gateway: a running gateway with server-filesystem (allowed `folder`) and server-memory.
        folder: where the order log is written.
        rounds: measured rounds per way.
        backend: the code-mode backend.

    Returns: `{log, definitions_tokens, with_sessions, without_sessions, through_the_model, ratio}`
    (ratio: each other way against `with_sessions`), each way with
    tokens (arguments, results, total), tool calls, upstream bytes read, wall ms p50/p95, and
    its last output; `open_ms_p50` is the untimed opening call's p50. Raises AssertionError when a
    way does not do the task right.
    """
    log = folder / "orders.log"
    expected = make_order_log(log)
    stateless = CodeModeSettings(backend=backend, timeout_ms=60_000, sessions={"enabled": False})
    ways = {
        "with_sessions": CodeModeTool(gateway, CodeModeSettings(backend=backend, timeout_ms=60_000)),
        "without_sessions": CodeModeTool(gateway, stateless),
        # What it prints must fit what comes back (24 KB of ERROR lines): a larger output cap.
        "through_the_model": CodeModeTool(gateway, stateless.model_copy(update={"max_output_bytes": 200_000})),
    }
    ns = ways["with_sessions"].namespaces
    fs = next(s.namespace for s in ns.by_name.values() if s.attr == "read_text_file")
    mem = next(s.namespace for s in ns.by_name.values() if s.attr == "create_entities")
    out: dict[str, Any] = {
        "log": {"bytes": expected["bytes"], "lines": expected["lines"], "top_reason": expected["top"]},
        "definitions_tokens": tool_tokens([ways["with_sessions"].tool]),
        "backend": backend,
        "rounds": rounds,
    }
    stats: dict[str, dict[str, Any]] = {w: {"ms": []} for w in ways}
    try:
        for r in range(rounds + 1):
            order = list(ways)[r % len(ways) :] + list(ways)[: r % len(ways)]  # rotate who goes first
            for way in order:
                tool = ways[way]
                link = ClientLink(
                    LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: no_progress, session_id=f"{way}-{r}"
                )
                # Open the conversation's session first (a new wasm session starts its interpreter):
                # the three calls are timed as they run in a conversation that is under way.
                t_open = time.perf_counter()
                assert not (await tool.handler({"code": "None"}, link)).get("isError")
                open_ms = (time.perf_counter() - t_open) * 1000
                t0 = time.perf_counter()
                codes: list[str] = []
                results: list[dict[str, Any]] = []
                texts: list[str] = []
                for k in range(3):
                    codes.append(step(way, k, fs, mem, str(log), f"{way}-{r}", texts))
                    results.append(await tool.handler({"code": codes[-1]}, link))
                    texts.append(result_text(results[-1]))
                    assert not results[-1].get("isError"), f"{way}: {texts[-1]}"
                ms = (time.perf_counter() - t0) * 1000
                want = f"{len(expected['groups'])} incidents stored for {expected['top']}"
                assert texts[-1].strip() == want, f"{way}: {texts[-1]!r} != {want!r}"
                if r == 0:
                    continue  # warm-up
                s = stats[way]
                s["ms"].append(ms)
                s.setdefault("open_ms", []).append(open_ms)
                s["arguments"] = sum(
                    count_tokens(json.dumps({"name": tool.name, "arguments": {"code": c}})) for c in codes
                )
                s["results"] = sum(count_tokens(t) for t in texts)
                s["tool_calls"] = sum(x["_meta"]["mcpopt/codeMode"]["tool_calls"] for x in results)
                s["log_reads"] = sum(c.count("read_text_file") for c in codes)
                s["output"] = texts
    finally:
        for tool in ways.values():
            await tool.aclose()
    for way, s in stats.items():
        s["total"] = s["arguments"] + s["results"]
        s["upstream_bytes_read"] = s["log_reads"] * expected["bytes"]
        s["ms_p50"] = round(statistics.median(s["ms"]), 1)
        s["ms_p95"] = round(_pct(s["ms"], 0.95), 1)
        s["ms"] = [round(v, 1) for v in s["ms"]]
        s["open_ms_p50"] = round(statistics.median(s.pop("open_ms")), 1)
        out[way] = s
    base = stats["with_sessions"]
    out["ratio"] = {
        way: {"tokens": round(s["total"] / base["total"], 2), "wall_p50": round(s["ms_p50"] / base["ms_p50"], 2)}
        for way, s in stats.items()
        if way != "with_sessions"
    }
    return out
