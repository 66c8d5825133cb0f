"""Evaluation harness for tool search: task-level recall@k, MRR and query latency per mode.

Catalog layout (LiveMCPBench `tools.json`): a list of servers, each
`{name, tools: {<key>: {server_name, tools: [{name, description, inputSchema}]}}}`; a flat list of
tool dicts each carrying a `server` key is accepted too. Tools are named as the gateway would serve
them, `{server}__{tool}`. Task layout (`dev_tasks.json`): `[{task_id, question, tools: [names]}]`.

Metrics (labels name tools, not servers, so a hit is any result whose upstream tool name is
labelled; labels missing from the catalog stay in the denominator):
- recall@k of a task = |labelled names among the top k| / |labelled names|; averaged over tasks;
- MRR = mean over tasks of 1 / rank of the first labelled result in the top k (0 if none)
  (Voorhees 1999, TREC-8 QA track);
- latency: wall time of `ToolIndex.search` per query in ms, p50 and p99 (nearest-rank).

The dev tasks are split once by a hash of `task_id` into a tuning part and a fixed held-out part
(`holdout` share, default 30%): weights are tuned on the first only, and both are reported.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mcpopt.discovery.embed import default_embedder
from mcpopt.discovery.index import MODES, Mode, SearchWeights, ToolDoc, ToolIndex


@dataclass(frozen=True, slots=True)
class Task:
    """One evaluation task: a question and the tool names a reference solution used."""

    task_id: str
    question: str
    tools: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Metrics:
    """Averages over `tasks` tasks; latencies in milliseconds."""

    tasks: int
    recall: float
    mrr: float
    p50_ms: float
    p99_ms: float


# ---- data ----------------------------------------------------------------------------------


def load_catalog(path: str | Path) -> list[ToolDoc]:
    """Read a tool catalog file into `ToolDoc`s named `{server}__{tool}`.

    Raises:
        OSError: the file cannot be read.
        ValueError: not JSON, or neither layout described in the module docstring.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of servers (LiveMCPBench layout) or of tools")
    docs: list[ToolDoc] = []
    for entry in data:
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: every entry must be an object")
        groups = entry.get("tools")
        if isinstance(groups, dict):
            about = ". ".join(str(entry[k]) for k in ("name", "description") if entry.get(k))
            for key, group in groups.items():
                server = str(group.get("server_name") or key)
                for tool in group.get("tools") or []:
                    docs.append(ToolDoc.of(server, tool, name=f"{server}__{tool['name']}", server_description=about))
        elif "server" in entry and "name" in entry:
            server = str(entry["server"])
            about = str(entry.get("server_description") or "")
            docs.append(ToolDoc.of(server, entry, name=f"{server}__{entry['name']}", server_description=about))
        else:
            raise ValueError(f"{path}: entry without 'tools' (server layout) or 'server'+'name' (tool layout)")
    return docs


def load_tasks(path: str | Path) -> list[Task]:
    """Read tasks (`task_id`, `question`, `tools`).

    Raises:
        OSError, ValueError (bad JSON or a task without a question or tools).
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    tasks: list[Task] = []
    for i, t in enumerate(data):
        if not isinstance(t, dict) or not t.get("question") or not isinstance(t.get("tools"), list):
            raise ValueError(f"{path}: task #{i} needs 'question' and a 'tools' list")
        tasks.append(Task(str(t.get("task_id", i)), str(t["question"]), tuple(dict.fromkeys(t["tools"]))))
    return tasks


def split_tasks(tasks: Sequence[Task], holdout: float = 0.3) -> tuple[list[Task], list[Task]]:
    """Deterministic split into (tune, held-out): the `holdout` share with the lowest SHA-1 of task_id."""
    ordered = sorted(tasks, key=lambda t: hashlib.sha1(t.task_id.encode()).hexdigest())
    n_out = round(len(ordered) * holdout)
    held = {t.task_id for t in ordered[:n_out]}
    return [t for t in tasks if t.task_id not in held], [t for t in tasks if t.task_id in held]


def replicate(docs: Sequence[ToolDoc], target: int) -> list[ToolDoc]:
    """Copies of a catalog under distinct server names (`{server}-copyN`) until >= `target` tools."""
    out = list(docs)
    copy = 1
    while len(out) < target and docs:
        for d in docs:
            server = f"{d.server}-copy{copy}"
            out.append(
                ToolDoc(f"{server}__{d.tool}", server, d.tool, d.description, d.input_schema, d.server_description)
            )
        copy += 1
    return out


def build_index(docs: Iterable[ToolDoc], weights: SearchWeights | None = None, dense: bool = True) -> ToolIndex:
    """A `ToolIndex` over `docs`, one `add_tools` per server (as the gateway feeds it)."""
    index = ToolIndex(default_embedder() if dense else None, weights)
    by_server: dict[str, list[ToolDoc]] = {}
    for d in docs:
        by_server.setdefault(d.server, []).append(d)
    for server, items in by_server.items():
        index.add_tools(server, items)
    return index


# ---- metrics -------------------------------------------------------------------------------


def recall_at_k(ranked: Sequence[str], labels: Iterable[str], k: int) -> float:
    """Share of distinct labels found among the first `k` ranked names (0.0 if no labels)."""
    wanted = set(labels)
    if not wanted:
        return 0.0
    return len(wanted & set(ranked[:k])) / len(wanted)


def reciprocal_rank(ranked: Sequence[str], labels: Iterable[str], k: int) -> float:
    """1 / (1-based rank of the first labelled name in the first `k`), or 0.0."""
    wanted = set(labels)
    for r, name in enumerate(ranked[:k], start=1):
        if name in wanted:
            return 1.0 / r
    return 0.0


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of `values`; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def evaluate(index: ToolIndex, tasks: Sequence[Task], k: int = 10, mode: Mode = "hybrid") -> Metrics:
    """Run every task's question through `index.search` and average the metrics."""
    index.search("warm up", k=k, mode=mode)
    recalls, rrs, times = [], [], []
    for task in tasks:
        t0 = time.perf_counter()
        hits = index.search(task.question, k=k, mode=mode)
        times.append((time.perf_counter() - t0) * 1000)
        ranked = [h.doc.tool for h in hits]
        recalls.append(recall_at_k(ranked, task.tools, k))
        rrs.append(reciprocal_rank(ranked, task.tools, k))
    return Metrics(
        tasks=len(tasks),
        recall=statistics.fmean(recalls) if recalls else 0.0,
        mrr=statistics.fmean(rrs) if rrs else 0.0,
        p50_ms=percentile(times, 50),
        p99_ms=percentile(times, 99),
    )


def latency(index: ToolIndex, queries: Sequence[str], k: int = 10, mode: Mode = "hybrid", rounds: int = 3) -> Metrics:
    """p50 / p99 of `rounds` passes of `queries` (recall and MRR left at 0)."""
    index.search("warm up", k=k, mode=mode)
    times = []
    for _ in range(rounds):
        for q in queries:
            t0 = time.perf_counter()
            index.search(q, k=k, mode=mode)
            times.append((time.perf_counter() - t0) * 1000)
    return Metrics(len(queries), 0.0, 0.0, percentile(times, 50), percentile(times, 99))


def run_search_eval(
    catalog: str | Path,
    tasks_file: str | Path,
    k: int = 10,
    holdout: float = 0.3,
    scale_to: int = 3000,
    weights: SearchWeights | None = None,
) -> dict[str, Any]:
    """The report behind `mcpopt eval search`.

    Returns:
        `{catalog: {tools, servers}, k, tasks: {all, tune, holdout}, modes: {mode: {all, tune, holdout}},
        scaled: {tools, build_ms, modes: {mode: {p50_ms, p99_ms}}}}`, metrics as in `Metrics`; `scaled`
        times the same questions over the catalog replicated to `scale_to` tools (skipped if 0).
    """
    docs = load_catalog(catalog)
    tasks = load_tasks(tasks_file)
    tune, held = split_tasks(tasks, holdout)
    index = build_index(docs, weights)
    report: dict[str, Any] = {
        "catalog": {"tools": len(docs), "servers": len({d.server for d in docs})},
        "k": k,
        "embedder": index.embedder.name if index.embedder else None,
        "tasks": {"all": len(tasks), "tune": len(tune), "holdout": len(held)},
        "modes": {},
    }
    for mode in MODES:
        report["modes"][mode] = {
            part: asdict(evaluate(index, subset, k, mode))
            for part, subset in (("all", tasks), ("tune", tune), ("holdout", held))
        }
    if scale_to:
        big = replicate(docs, scale_to)
        t0 = time.perf_counter()
        big_index = build_index(big, weights)
        big_index.search("warm up")
        build_ms = (time.perf_counter() - t0) * 1000
        report["scaled"] = {
            "tools": len(big),
            "build_ms": round(build_ms, 1),
            "modes": {
                mode: {
                    key: round(val, 3)
                    for key, val in asdict(latency(big_index, [t.question for t in tasks], k, mode)).items()
                    if key.endswith("_ms")
                }
                for mode in MODES
            },
        }
    return report
