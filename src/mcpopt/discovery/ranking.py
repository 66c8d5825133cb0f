"""Ranking primitives of tool search: BM25 term postings assembled from per-server term counts
(`TermBag`, `TermShard`, `Postings`), top-k selection, and reciprocal rank fusion (`rrf`, Cormack, Clarke &
Buettcher 2009, SIGIR).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from mcpopt.discovery.docs import ToolDoc

RRF_K = 60
"""Reciprocal rank fusion constant (Cormack et al. 2009 found k = 60 robust across collections)."""


# ---- index internals ------------------------------------------------------------------------


@dataclass(slots=True)
class TermBag:
    """Term counts of a batch of documents with a local vocabulary: doc `d` has `tf[j]` of `vocab[term[j]]`."""

    vocab: list[str]
    doc: np.ndarray  # int32, local document index per entry
    term: np.ndarray  # int32, index into vocab per entry
    tf: np.ndarray  # float32
    length: np.ndarray  # float32, terms per document

    @classmethod
    def of(cls, docs_terms: Sequence[Sequence[str]]) -> TermBag:
        vocab: dict[str, int] = {}
        rows: list[int] = []
        cols: list[int] = []
        counts: list[int] = []
        lengths = np.zeros(len(docs_terms), dtype=np.float32)
        for d, terms in enumerate(docs_terms):
            local: dict[int, int] = {}
            for t in terms:
                j = vocab.setdefault(t, len(vocab))
                local[j] = local.get(j, 0) + 1
            lengths[d] = len(terms)
            rows.extend([d] * len(local))
            cols.extend(local)
            counts.extend(local.values())
        return cls(
            list(vocab),
            np.asarray(rows, dtype=np.int32),
            np.asarray(cols, dtype=np.int32),
            np.asarray(counts, dtype=np.float32),
            lengths,
        )


@dataclass(slots=True)
class TermShard:
    """One server's part of the index: its tools' documents, term counts and vectors."""

    docs: list[ToolDoc]
    bag: TermBag  # one row per tool
    vectors: np.ndarray | None  # (tools, dim)
    server_bag: TermBag  # one row: the server's document
    server_vector: np.ndarray | None  # (dim,)
    needs: np.ndarray  # (edges, 2) int32 local indices: (tool, a tool that provides one of its inputs)


class Postings:
    """BM25 (Lucene variant) weights by term: docs `doc[ptr[t]:ptr[t+1]]` have weights `w[...]` for term t.

    idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)); weight = idf * tf / (tf + k1 * (1 - b + b * len / avglen)),
    as in Kamphuis et al. 2020 (the form `bm25s`' "lucene" method computes).
    """

    __slots__ = ("vocab", "ptr", "doc", "w", "n")

    def __init__(self, bags: Sequence[TermBag], k1: float, b: float) -> None:
        vocab: dict[str, int] = {}
        docs, terms, tfs, lengths = [], [], [], []
        offset = 0
        for bag in bags:
            ids = np.fromiter(
                (vocab.setdefault(t, len(vocab)) for t in bag.vocab), dtype=np.int32, count=len(bag.vocab)
            )
            docs.append(bag.doc + offset)
            terms.append(ids[bag.term] if len(bag.term) else bag.term)
            tfs.append(bag.tf)
            lengths.append(bag.length)
            offset += len(bag.length)
        self.vocab = vocab
        self.n = offset
        doc = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int32)
        term = np.concatenate(terms) if terms else np.zeros(0, dtype=np.int32)
        tf = np.concatenate(tfs) if tfs else np.zeros(0, dtype=np.float32)
        length = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.float32)
        order = np.argsort(term, kind="stable")
        doc, term, tf = doc[order], term[order], tf[order]
        df = np.bincount(term, minlength=len(vocab)).astype(np.float64)
        self.ptr = np.concatenate([[0], np.cumsum(df)]).astype(np.int64)
        avg = float(length.mean()) if len(length) and length.mean() > 0 else 1.0
        idf = np.log1p((offset - df + 0.5) / (df + 0.5))
        norm = k1 * (1.0 - b + b * length[doc] / avg)
        self.doc = doc.astype(np.intp)
        self.w = (idf[term] * tf / (tf + norm)).astype(np.float32)

    def scores(self, terms: Iterable[str], out: np.ndarray) -> bool:
        """Add each term's weights into `out` (shape (n,)); repeated terms count again. Returns any match."""
        hit = False
        vocab, ptr = self.vocab, self.ptr
        for t in terms:
            i = vocab.get(t)
            if i is None:
                continue
            lo, hi = ptr[i], ptr[i + 1]
            out[self.doc[lo:hi]] += self.w[lo:hi]
            hit = True
        return hit


def top_indices(scores: np.ndarray, depth: int, positive: bool) -> np.ndarray:
    """Indices of the `depth` best scores, best first (ties: lower index); only scores > 0 if `positive`."""
    if positive:
        cand = np.flatnonzero(scores > 0)
        if len(cand) > depth:
            cand = cand[np.argpartition(scores[cand], len(cand) - depth)[len(cand) - depth :]]
    elif len(scores) > depth:
        cand = np.argpartition(scores, len(scores) - depth)[len(scores) - depth :]
    else:
        cand = np.arange(len(scores))
    # lexsort: last key first -> by score descending, then index ascending.
    return cand[np.lexsort((cand, -scores[cand]))]


def rrf_into(out: np.ndarray, order: np.ndarray, weight: float, k: int = RRF_K) -> None:
    """out[order[r]] += weight / (k + r + 1) for each rank r."""
    if len(order):
        out[order] += weight / (k + 1.0 + np.arange(len(order)))


def normalize_rows(m: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32, C-contiguous."""
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    out = np.divide(m, norms, out=np.zeros_like(m), where=norms > 0)
    return np.ascontiguousarray(out, dtype=np.float32)


def rank_lookup(order: np.ndarray, items: np.ndarray) -> list[int]:
    """1-based rank of each of `items` in `order` (0 if absent)."""
    if not len(order) or not len(items):
        return [0] * len(items)
    match = order[None, :] == items[:, None]
    found = match.any(axis=1)
    return np.where(found, match.argmax(axis=1) + 1, 0).tolist()


def rrf(rankings: Sequence[Sequence[str]], k: int = RRF_K, weights: Sequence[float] | None = None) -> list[str]:
    """Reciprocal rank fusion of ranked id lists (Cormack, Clarke & Buettcher, SIGIR 2009).

    `score(d) = sum_i w_i / (k + rank_i(d))`, rank 1-based; an id absent from a list gets nothing from it.

    Returns:
        ids by descending fused score (ties: first appearance).
    """
    ws = list(weights) if weights is not None else [1.0] * len(rankings)
    if len(ws) != len(rankings):
        raise ValueError("one weight per ranking")
    scores: dict[str, float] = {}
    for wi, ranking in zip(ws, rankings, strict=True):
        for r, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + wi / (k + r)
    return sorted(scores, key=lambda d: -scores[d])
