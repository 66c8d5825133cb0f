"""Workflow proposals: call sequences that repeat, turned into workflows the gateway can serve.

`propose_workflows(sessions, read_only)` looks for the same sequence of 2..`max_len` consecutive
successful calls (same tools, in order) in at least `min_repeats` places (sessions, or parts of one)
and builds, for the most valuable ones, a workflow definition (`mcpopt.workflow_model`) and the
`workflow` rule that serves it (`mcpopt.pipeline.rules`):

- **arguments**: a value equal in every occurrence stays literal; a value that equals something an
  earlier call of the sequence returned (the same JSON path, or the same line of text, in every
  occurrence; needs the results, which replays record) becomes a template
  (`{{steps.<id>.json.<path>}}`); any other varying value becomes a typed parameter of the
  workflow. The rule's `bindings` say which call and argument each parameter comes from (the
  replays use them to call the workflow instead of the sequence).
- **order**: the data flow when the rows record it (`depends_on`, from replays), else the
  analyzer's rule for sequential calls: reads that follow no write run in parallel; a write
  waits for every earlier call, and every later call waits for it (order may matter around
  writes).

Needs the calls' arguments: replays record them; live telemetry at the `detailed` level does. A
sequence whose arguments are unknown, inconsistent (a key present in some occurrences only, mixed
types) or hold template markers (`{{`) is reported, not proposed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mcpopt.pipeline.rules import Action, Condition, Rule
from mcpopt.templating import result_json, result_text

_MISSING = object()
Key = tuple[tuple[str, str, str], ...]
"""A sequence: ((server, tool, gateway name), ...)."""


@dataclass
class SequenceSettings:
    min_len: int = 2
    max_len: int = 8
    min_repeats: int = 3
    max_proposals: int = 3


@dataclass
class Proposal:
    key: Key
    occurrences: int
    sessions: int
    rule: Rule | None
    reason: str = ""
    """Why no workflow was built (when `rule` is None)."""
    round_trips_saved: float = 0.0
    ms_saved: float = 0.0


def _args(row: Mapping[str, Any]) -> dict[str, Any] | None:
    raw = row.get("arguments")
    if isinstance(raw, dict):
        return raw
    if not raw:
        return {} if row.get("args_hash") == "" else None
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _segments(calls: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Runs of successful calls (a failed call ends a sequence)."""
    out: list[list[Mapping[str, Any]]] = [[]]
    for r in calls:
        if r.get("outcome") == "ok" and r.get("name"):
            out[-1].append(r)
        elif out[-1]:
            out.append([])
    return [seg for seg in out if seg]


def find_sequences(
    sessions: Mapping[str, Sequence[Mapping[str, Any]]], settings: SequenceSettings
) -> dict[Key, list[list[Mapping[str, Any]]]]:
    """Sequences repeated at least `min_repeats` times (non-overlapping within a session), maximal:
    a sequence inside a longer one that repeats as often is left out."""
    found: dict[Key, list[list[Mapping[str, Any]]]] = defaultdict(list)
    for calls in sessions.values():
        for seg in _segments(calls):
            for length in range(settings.min_len, min(settings.max_len, len(seg)) + 1):
                ends: dict[Key, int] = {}
                for start in range(0, len(seg) - length + 1):
                    window = seg[start : start + length]
                    key: Key = tuple((str(r["server"]), str(r["tool"]), str(r["name"])) for r in window)
                    if len({k[2] for k in key}) == 1:
                        continue  # one tool repeated: a for_each, not a sequence
                    if ends.get(key, -1) > start:
                        continue  # overlaps the previous occurrence
                    ends[key] = start + length
                    found[key].append(window)
    repeated = {k: v for k, v in found.items() if len(v) >= settings.min_repeats}

    def inside(short: Key, long: Key) -> bool:
        n = len(short)
        return any(long[i : i + n] == short for i in range(len(long) - n + 1))

    return {
        k: v
        for k, v in repeated.items()
        if not any(len(o) > len(k) and inside(k, o) and len(repeated[o]) >= len(v) for o in repeated)
    }


def _ids(key: Key) -> list[str]:
    ids: list[str] = []
    for _, tool, _ in key:
        base = re.sub(r"[^A-Za-z0-9_\-]", "_", tool)[:40] or "step"
        sid, n = base, 2
        while sid in ids:
            sid, n = f"{base}_{n}", n + 1
        ids.append(sid)
    return ids


def _json_type(values: Sequence[Any]) -> str | None:
    kinds = set()
    for v in values:
        if isinstance(v, bool):
            kinds.add("boolean")
        elif isinstance(v, int):
            kinds.add("integer")
        elif isinstance(v, float):
            kinds.add("number")
        elif isinstance(v, str):
            kinds.add("string")
        elif isinstance(v, list):
            kinds.add("array")
        elif isinstance(v, dict):
            kinds.add("object")
        else:
            return None
    if kinds == {"integer", "number"}:
        return "number"
    return kinds.pop() if len(kinds) == 1 else None


def _paths(doc: Any, want: Any, prefix: str = "", depth: int = 0) -> list[str]:
    """Dotted paths in `doc` whose value equals `want` (depth-limited)."""
    if doc == want and prefix:
        return [prefix]
    if depth >= 5:
        return []
    out: list[str] = []
    if isinstance(doc, Mapping):
        for k, v in list(doc.items())[:200]:
            if isinstance(k, str) and "." not in k:
                out += _paths(v, want, f"{prefix}.{k}" if prefix else k, depth + 1)
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:200]):
            out += _paths(v, want, f"{prefix}.{i}" if prefix else str(i), depth + 1)
    return out


def _lookup(doc: Any, path: str) -> Any:
    for seg in path.split("."):
        if isinstance(doc, Mapping):
            doc = doc.get(seg, _MISSING)
        elif isinstance(doc, list) and seg.isdigit() and int(seg) < len(doc):
            doc = doc[int(seg)]
        else:
            return _MISSING
    return doc


def _data_flow(windows: Sequence[Sequence[Mapping[str, Any]]], pos: int, key: str, ids: Sequence[str]) -> str | None:
    """A template reading the value of argument `key` of call `pos` from an earlier call's result,
    when it is found at the same place in every occurrence (see the module doc)."""
    values = [(_args(w[pos]) or {}).get(key) for w in windows]
    for j in range(pos - 1, -1, -1):
        results = [w[j].get("result") for w in windows]
        if any(not isinstance(r, Mapping) for r in results):
            continue
        docs = [result_json(r) for r in results]  # type: ignore[arg-type]
        if docs[0] is not None:
            for path in _paths(docs[0], values[0]):
                if all(_lookup(d, path) == v for d, v in zip(docs, values, strict=True)):
                    return f"{{{{steps.{ids[j]}.json.{path}}}}}"
        if isinstance(values[0], str):
            texts = [result_text(r).splitlines() for r in results]  # type: ignore[arg-type]
            for n, line in enumerate(texts[0]):
                if line == values[0] and all(n < len(t) and t[n] == v for t, v in zip(texts, values, strict=True)):
                    return f"{{{{steps.{ids[j]}.lines.{n}}}}}"
    return None


def build(
    key: Key, windows: Sequence[Sequence[Mapping[str, Any]]], read_only: Callable[[str, str], bool]
) -> tuple[dict[str, Any] | None, dict[str, list[Any]], str]:
    """(workflow definition, bindings, why not) for a repeated sequence (see the module doc)."""
    ids = _ids(key)
    params: dict[str, Any] = {}
    bindings: dict[str, list[Any]] = {}
    steps: list[dict[str, Any]] = []
    known_flow = all("depends_on" in r for w in windows for r in w)
    writes_before: list[str] = []
    for pos, (server, tool, name) in enumerate(key):
        arg_sets = [_args(w[pos]) for w in windows]
        if any(a is None for a in arg_sets):
            return None, {}, "the calls' arguments are not recorded (telemetry level below detailed)"
        sets = [a for a in arg_sets if a is not None]
        arguments: dict[str, Any] = {}
        for k in sorted({k for a in sets for k in a}):
            values = [a.get(k, _MISSING) for a in sets]
            if any(v is _MISSING for v in values):
                return None, {}, f"{tool}: argument {k!r} is not passed every time"
            if "{{" in json.dumps(values, default=str):
                return None, {}, f"{tool}: argument {k!r} holds template markers"
            if all(v == values[0] for v in values):
                arguments[k] = values[0]
                continue
            flow = _data_flow(windows, pos, k, ids)
            if flow is not None:
                arguments[k] = flow
                continue
            jtype = _json_type(values)
            if jtype is None:
                return None, {}, f"{tool}: argument {k!r} has values of mixed types"
            pname = re.sub(r"[^A-Za-z0-9_\-]", "_", f"{ids[pos]}_{k}")[:64]
            params[pname] = {"type": jtype, "description": f"{tool}'s {k}"}
            arguments[k] = f"{{{{params.{pname}}}}}"
            bindings[pname] = [pos, k]
        deps: set[str] = set()
        if known_flow:  # calls outside the sequence that it uses are its parameters
            first = windows[0]
            by_seq = {int(r.get("seq") or 0): ids[i] for i, r in enumerate(first[:pos])}
            deps |= {by_seq[int(q)] for q in first[pos].get("depends_on") or () if int(q) in by_seq}
        deps |= set(writes_before)
        is_read = read_only(server, tool)
        if not is_read:
            deps |= set(ids[:pos])  # a write waits for every earlier call
            writes_before.append(ids[pos])
        step: dict[str, Any] = {"id": ids[pos], "tool": name, "arguments": arguments}
        if deps:
            step["depends_on"] = sorted(deps, key=ids.index)
        steps.append(step)
    tools = "_".join(ids)[:40]
    digest = hashlib.blake2b("/".join(n for _, _, n in key).encode(), digest_size=3).hexdigest()
    definition = {
        "name": f"seq_{tools}_{digest}",
        "description": (
            f"Proposed by the optimizer: {' -> '.join(n for _, _, n in key)}, a sequence seen "
            f"{len(windows)} times, as one call"
        ),
        "parameters": params,
        "steps": steps,
    }
    return definition, bindings, ""


def _critical_ms(definition: Mapping[str, Any], window: Sequence[Mapping[str, Any]]) -> float:
    """The longest dependency chain's time (ms) of one occurrence: what the workflow would take."""
    finish: dict[str, float] = {}
    for step, row in zip(definition["steps"], window, strict=True):
        start = max((finish[d] for d in step.get("depends_on", [])), default=0.0)
        finish[step["id"]] = start + float(row.get("total_ms") or 0.0)
    return max(finish.values(), default=0.0)


def propose_workflows(
    sessions: Mapping[str, Sequence[Mapping[str, Any]]],
    read_only: Callable[[str, str], bool],
    settings: SequenceSettings | None = None,
) -> list[Proposal]:
    """The repeated sequences, most valuable first, with a workflow rule for those that allow one."""
    s = settings or SequenceSettings()
    found = find_sequences(sessions, s)
    ranked = sorted(found.items(), key=lambda kv: -(len(kv[0]) - 1) * len(kv[1]))[: s.max_proposals]
    out = []
    for key, windows in ranked:
        n_sessions = len({str(w[0].get("session", "")) for w in windows})
        definition, bindings, why = build(key, windows, read_only)
        trips = float((len(key) - 1) * len(windows))
        if definition is None:
            out.append(Proposal(key, len(windows), n_sessions, None, why, trips))
            continue
        ms_saved = sum(sum(float(r.get("total_ms") or 0.0) for r in w) - _critical_ms(definition, w) for w in windows)
        all_read = all(read_only(server, tool) for server, tool, _ in key)
        name = definition["name"]
        evidence = {
            "sequence": [n for _, _, n in key],
            "occurrences": len(windows),
            "sessions": n_sessions,
            "parameters": sorted(definition["parameters"]),
            "examples": [{"session": w[0].get("session", ""), "seq": [r.get("seq") for r in w]} for w in windows[:3]],
        }
        rule = Rule(
            id=f"workflow:{name}",
            name=f"workflow {name}",
            description=f"{len(key)} calls made together {len(windows)} times: serve them as workflow__{name}",
            condition=Condition(calls=[f"{server}/{tool}" for server, tool, _ in key]),
            action=Action(
                type="workflow",
                workflow=definition,
                bindings=bindings,
                message=(
                    f"this call usually starts {', '.join(n for _, _, n in key)}: call workflow__{name} instead "
                    "(one round trip; independent steps run in parallel)"
                ),
            ),
            level="conservative" if all_read else "moderate",
            source="analyzer",
            evidence=evidence,
        )
        out.append(Proposal(key, len(windows), n_sessions, rule, "", trips, ms_saved))
    return out
