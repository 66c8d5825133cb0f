"""What a tool search is tuned by (`SearchWeights`) and what it returns (`SearchHit`, `ServerHit`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mcpopt.discovery.docs import ToolDoc

# ---- knobs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SearchWeights:
    """Tunable knobs. The defaults were tuned on the tuning split of the LiveMCPBench dev tasks only
    (the 30 tasks `tuning_split.json` beside this module names; `mcpopt eval search` reports the other
    20 apart, as `unseen`).

    Attributes:
        name, server_name, description, param_names, param_descriptions, server_description: BM25
            field weights as term repeats (a term repeated n times counts n times, BM25F-style).
        lexical, dense: weights of a tool's two rankings in the fusion.
        server: share of its server's fused score added to every tool of that server.
        server_lexical, server_dense, server_tools: weights of a server's three rankings: its document
            lexically, densely, and by its best tool.
        expansion: lift of the best tool of each implied step (`expansions`), as a share of the best
            score (1 ties it; 0 turns implied steps off).
        center: remove the tools' mean vector from every vector and the query's (hubness of mean-pooled
            static embeddings; Mu & Viswanath 2018, "All-but-the-Top", ICLR).
        paths: search file paths as their name, extension and media type (`query_text`).
        unique_terms: count a query term once (a path or a repeated word does not weigh double).
        fusion: `convex` (min-max normalised scores, see `ToolIndex._fuse`) or `rrf` (k = 60).
        server_all: the server's score lifts all its tools (else only those the query matched).
        dense_floor, noise, tools_floor: what a weak list is normalised against (see `_fuse`): a
            cosine of 0.25 is about the 10th percentile of the best cosine over the dev questions.
        tie: a tool of a `prefer` server beats one scoring at most this share of the best score higher.
        prerequisite, prerequisite_depth: a tool among the first `prerequisite_depth` lifts each
            tool that provides one of its inputs (`prerequisites`) to this share of its own score.
        depth: how many of each ranking take part in the fusion.
        k1, b: BM25 parameters (the usual Lucene defaults).
    """

    name: int = 2
    server_name: int = 1
    description: int = 1
    param_names: int = 1
    param_descriptions: int = 1
    server_description: int = 1
    lexical: float = 1.5
    dense: float = 1.0
    server: float = 0.5
    server_lexical: float = 1.0
    server_dense: float = 1.0
    server_tools: float = 1.0
    expansion: float = 0.9
    center: bool = True
    paths: bool = True
    unique_terms: bool = True
    fusion: Literal["convex", "rrf"] = "convex"
    server_all: bool = True
    dense_floor: float = 0.25
    noise: float = 0.4
    tools_floor: float = 0.15
    tie: float = 0.05
    prerequisite: float = 0.8
    prerequisite_depth: int = 10
    depth: int = 100
    k1: float = 1.2
    b: float = 0.75


# ---- results --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One result: the tool, its final score, and its 1-based rank in each list (0: not ranked).

    `server_rank` is the rank of the tool's server in the fused server ranking.
    """

    doc: ToolDoc
    score: float
    lexical_rank: int = 0
    dense_rank: int = 0
    server_rank: int = 0


@dataclass(frozen=True, slots=True)
class ServerHit:
    """One server in the fused server ranking: its name, score and best tools (best first)."""

    server: str
    score: float
    tools: tuple[ToolDoc, ...]
