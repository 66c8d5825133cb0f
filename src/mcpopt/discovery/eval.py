"""Evaluation harness for tool search: question-level recall@k and MRR, served-server recall, step-level
recall, and query latency per mode.

Catalog layout (LiveMCPBench `tools.json`): a list of servers, each
`{name, description, tools: {<key>: {server_name, tools: [{name, description, inputSchema}]}}}`; a flat
list of tool dicts each carrying a `server` key is accepted too. Tools are named as the gateway would
serve them, `{server}__{tool}`. Task layout (`dev_tasks.json`): `[{task_id, question, tools: [names],
steps?: "1. ...\\n2. ..."}]`.

Metrics (labels name upstream tools, not servers, so a hit is any result whose upstream tool name is
labelled; labels missing from the catalog stay in the denominator):
- `recall` (question-level recall@k): |labelled names among the top k| / |labelled names|, per task;
- `mrr`: 1 / rank of the first labelled result in the top k (0 if none) (Voorhees 1999, TREC-8 QA);
- `server_recall` (served-server recall@`server_k`, issue 14): the labels' servers are the servers
  that serve a labelled name (a name several servers serve is satisfied by any of them; identical
  alternatives count once); the share of them among the first `server_k` distinct servers of the
  ranking;
- `step_recall`: each annotated step of a task searched on its own, as an agent searching step by
  step would; the share of labelled names in the union of the steps' top k (tasks without steps
  use the question);
- latency: wall time of one `ToolIndex.search` in ms (p50, p95, p99, nearest rank) and the thread's
  CPU time for it (`cpu_p50_ms`, `cpu_p99_ms`: what the query costs, whatever else the machine runs).
All metrics are averaged over tasks.

Every report covers **all tasks given**; tasks listed in a tuning split (by default
`tuning_split.json`, the LiveMCPBench dev tasks the defaults were tuned on) are also reported apart
(`tuning`) from the rest (`unseen`), and only `unseen` figures say anything about tasks never seen.
"""

from __future__ import annotations

import gc
import json
import math
import re
import statistics
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mcpopt.discovery.embed import Embedder, default_embedder, named_embedder
from mcpopt.discovery.index import MODES, Mode, SearchWeights, ToolDoc, ToolIndex

SERVER_K = 5
"""Distinct servers looked at by `server_recall` (issue 14: served-server recall@5)."""


@dataclass(frozen=True, slots=True)
class Task:
    """One evaluation task: a question, the tool names a reference solution used, its annotated steps."""

    task_id: str
    question: str
    tools: tuple[str, ...]
    steps: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Metrics:
    """Averages over `tasks` tasks (see the module docstring); latencies in milliseconds."""

    tasks: int
    recall: float
    mrr: float
    server_recall: float
    step_recall: float
    p50_ms: float
    p99_ms: float


# ---- data ----------------------------------------------------------------------------------


def load_catalog(path: str | Path) -> list[ToolDoc]:
    """Read a tool catalog file into `ToolDoc`s named `{server}__{tool}`.

    A server's description (`name. description` in the LiveMCPBench layout) becomes each of its
    tools' `server_description`.

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


_STEP_NUMBER = re.compile(r"^\s*(?:step\s*)?\d+\s*[.):]\s*", re.I)


def parse_steps(steps: Any) -> tuple[str, ...]:
    """Annotated steps as a tuple of texts: a list as is, or a numbered multi-line string split by line."""
    if isinstance(steps, list):
        items = [str(s) for s in steps]
    elif isinstance(steps, str):
        items = steps.splitlines()
    else:
        return ()
    return tuple(t for t in (_STEP_NUMBER.sub("", s).strip() for s in items) if t)


def load_tasks(path: str | Path) -> list[Task]:
    """Read tasks (`task_id`, `question`, `tools`, optional `steps`).

    Raises:
        OSError, ValueError (bad JSON or a task without a question or tools).
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of tasks")
    tasks: list[Task] = []
    for i, t in enumerate(data):
        if not isinstance(t, dict) or not t.get("question") or not isinstance(t.get("tools"), list):
            raise ValueError(f"{path}: task #{i} needs 'question' and a 'tools' list")
        tasks.append(
            Task(
                str(t.get("task_id", i)),
                str(t["question"]),
                tuple(dict.fromkeys(str(x) for x in t["tools"])),
                parse_steps(t.get("steps")),
            )
        )
    return tasks


def tuning_split(path: str | Path | None = None) -> frozenset[str]:
    """Task ids of a tuning split: `{"task_ids": [...]}` (default: the packaged `tuning_split.json`).

    Raises:
        OSError, ValueError (not that layout).
    """
    if path is None:
        text = resources.files("mcpopt.discovery").joinpath("tuning_split.json").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text)
    ids = data.get("task_ids") if isinstance(data, dict) else None
    if not isinstance(ids, list):
        raise ValueError(f"{path or 'tuning_split.json'}: expected {{'task_ids': [...]}}")
    return frozenset(str(i) for i in ids)


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


def build_index(
    docs: Iterable[ToolDoc],
    weights: SearchWeights | None = None,
    dense: bool = True,
    embedder: Embedder | None = None,
) -> ToolIndex:
    """A `ToolIndex` over `docs`, one `add_tools` per server (as the gateway feeds it), refreshed.

    `embedder` (default: the packaged model) is used when `dense`.
    """
    index = ToolIndex((embedder or default_embedder()) if dense else None, weights)
    by_server: dict[str, list[ToolDoc]] = {}
    for d in docs:
        by_server.setdefault(d.server, []).append(d)
    for server, items in by_server.items():
        index.add_tools(server, items)
    index.refresh()
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


def first_servers(servers: Iterable[str], k: int) -> list[str]:
    """The first `k` distinct servers of a ranking (given as each hit's server, best first)."""
    out: list[str] = []
    for s in servers:
        if s not in out:
            out.append(s)
            if len(out) == k:
                break
    return out


def server_recall_at_k(
    ranked_servers: Sequence[str], labels: Iterable[str], servers_of: Mapping[str, Collection[str]], k: int
) -> float:
    """Served-server recall@k: share of the labels' servers among the first `k` distinct servers.

    Args:
        ranked_servers: each hit's server, best first.
        labels: labelled tool names.
        servers_of: tool name -> the servers serving it (a label no server serves stays unmet).
        k: distinct servers looked at.
    """
    needs = {frozenset(servers_of.get(label, ())) for label in labels}
    if not needs:
        return 0.0
    top = set(first_servers(ranked_servers, k))
    return sum(1 for alternatives in needs if alternatives & top) / len(needs)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of `values`; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def servers_by_tool(index: ToolIndex) -> dict[str, set[str]]:
    """Upstream tool name -> the indexed servers that serve it."""
    out: dict[str, set[str]] = {}
    index.refresh()
    for server in index.servers():
        for doc in index.server_tools(server):
            out.setdefault(doc.tool, set()).add(server)
    return out


def evaluate(
    index: ToolIndex,
    tasks: Sequence[Task],
    k: int = 10,
    mode: Mode = "hybrid",
    server_k: int = SERVER_K,
) -> Metrics:
    """Run every task's question (and each of its steps) through `index.search`; average the metrics."""
    servers_of = servers_by_tool(index)
    depth = max(k, 50)  # deep enough to find `server_k` distinct servers
    index.search("warm up", k=k, mode=mode)
    recalls, rrs, srecalls, steps, times = [], [], [], [], []
    for task in tasks:
        t0 = time.perf_counter()
        hits = index.search(task.question, k=depth, mode=mode)
        times.append((time.perf_counter() - t0) * 1000)
        ranked = [h.doc.tool for h in hits]
        recalls.append(recall_at_k(ranked, task.tools, k))
        rrs.append(reciprocal_rank(ranked, task.tools, k))
        srecalls.append(server_recall_at_k([h.doc.server for h in hits], task.tools, servers_of, server_k))
        found: set[str] = set()
        for step in task.steps or (task.question,):
            found.update(h.doc.tool for h in index.search(step, k=k, mode=mode))
        steps.append(recall_at_k(list(found), task.tools, len(found)) if found else 0.0)
    return Metrics(
        tasks=len(tasks),
        recall=_mean(recalls),
        mrr=_mean(rrs),
        server_recall=_mean(srecalls),
        step_recall=_mean(steps),
        p50_ms=percentile(times, 50),
        p99_ms=percentile(times, 99),
    )


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def latency(
    index: ToolIndex, queries: Sequence[str], k: int = 10, mode: Mode = "hybrid", rounds: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Latency of `rounds` passes of `queries` after `warmup` passes: wall and thread-CPU percentiles (ms).

    Returns:
        `{queries, p50_ms, p95_ms, p99_ms, max_ms, cpu_p50_ms, cpu_p99_ms}`; `queries` is the count timed.
    """
    for _ in range(warmup):
        for q in queries:
            index.search(q, k=k, mode=mode)
    wall: list[float] = []
    cpu: list[float] = []
    for _ in range(rounds):
        for q in queries:
            c0, t0 = time.thread_time(), time.perf_counter()
            index.search(q, k=k, mode=mode)
            wall.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.thread_time() - c0) * 1000)
    return {
        "queries": len(wall),
        "p50_ms": round(percentile(wall, 50), 3),
        "p95_ms": round(percentile(wall, 95), 3),
        "p99_ms": round(percentile(wall, 99), 3),
        "max_ms": round(max(wall, default=0.0), 3),
        "cpu_p50_ms": round(percentile(cpu, 50), 3),
        "cpu_p99_ms": round(percentile(cpu, 99), 3),
    }


def run_search_eval(
    catalog: str | Path,
    tasks_file: str | Path,
    k: int = 10,
    scale_to: int = 3000,
    weights: SearchWeights | None = None,
    tuned_on: Collection[str] | None = None,
    embedder: str = "wordllama",
) -> dict[str, Any]:
    """The report behind `mcpopt eval search`.

    Args:
        catalog: tool catalog file.
        tasks_file: task file; every task in it is evaluated.
        k: results per query.
        scale_to: also time the questions and steps over the catalog replicated to this many tools (0: skip).
        weights: search knobs (default: `SearchWeights()`).
        tuned_on: ids of the tasks used for tuning (default: the packaged `tuning_split.json`).
        embedder: `wordllama` (default), `e5` or `none` (`embed.named_embedder`).

    Returns:
        `{catalog: {tools, servers}, k, server_k, embedder, tasks: {all, tuning, unseen},
        modes: {mode: {all, tuning, unseen}}, scaled: {tools, build_ms, modes: {mode: latency}}}`,
        metrics as in `Metrics` (`tuning`/`unseen` omitted when empty), latency as in `latency`.
    """
    docs = load_catalog(catalog)
    tasks = load_tasks(tasks_file)
    tuned = frozenset(tuned_on) if tuned_on is not None else tuning_split()
    parts = {
        "all": tasks,
        "tuning": [t for t in tasks if t.task_id in tuned],
        "unseen": [t for t in tasks if t.task_id not in tuned],
    }
    parts = {name: subset for name, subset in parts.items() if subset or name == "all"}
    model = named_embedder(embedder)
    index = build_index(docs, weights, dense=model is not None, embedder=model)
    report: dict[str, Any] = {
        "catalog": {"tools": len(docs), "servers": len({d.server for d in docs})},
        "k": k,
        "server_k": SERVER_K,
        "embedder": model.name if model is not None else None,
        "tasks": {name: len(subset) for name, subset in parts.items()},
        "modes": {
            mode: {name: asdict(evaluate(index, subset, k, mode)) for name, subset in parts.items()} for mode in MODES
        },
    }
    if scale_to:
        del index
        big = replicate(docs, scale_to)
        gc.collect()
        t0 = time.perf_counter()
        big_index = build_index(big, weights, dense=model is not None, embedder=model)
        build_ms = (time.perf_counter() - t0) * 1000
        queries = [t.question for t in tasks] + [s for t in tasks for s in t.steps]
        report["scaled"] = {
            "tools": len(big),
            "build_ms": round(build_ms, 1),
            "rebuild_ms": round(big_index.rebuild_ms, 1),
            "modes": {mode: latency(big_index, queries, k, mode) for mode in MODES},
        }
    return report
