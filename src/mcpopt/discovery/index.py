"""Server-aware hybrid tool search: BM25 and static embeddings over tools *and* servers, fused by rank.

What one query does (all of it vectorised numpy over arrays built once per catalog change):

- **Lexical**: Okapi BM25, Lucene variant (Robertson & Zaragoza 2009, "The Probabilistic Relevance
  Framework: BM25 and Beyond"; idf and tf forms as in Kamphuis et al. 2020, "Which BM25 Do You Mean?",
  ECIR), k1 = 1.2, b = 0.75, over each tool's document: the tool name (split on `_ - . /` and camelCase),
  the server name, the description, the parameters' names and descriptions and the server's own
  description. Field weights repeat a field's terms (a cheap BM25F stand-in). Terms are lower-cased,
  English stop words dropped, Snowball-stemmed; Chinese text gets English glosses from CC-CEDICT
  (`lexicon.py`) *at index time* and is also indexed as character bigrams, so an English query finds a
  tool described in Chinese and a Chinese query finds it too.
- **Dense**: cosine similarity of the query's static embedding (`embed.py`: a table lookup and a mean,
  no model run at query time) with each tool's.
- **Servers in the same ranking** (Tool-to-Agent retrieval, arXiv 2511.01854; MCP-Zero's server-then-tool
  scoring, arXiv 2506.01056): every server also has a document (its name, its description, its tools'
  names and descriptions) ranked lexically and densely; a server's rank also counts its best tool. Every
  tool's final score adds a share of its server's, so one search brings forward the servers that can do
  the job and, within them, their best tools.
- **Fusion**: a convex combination of min-max normalised scores (Bruch, Gai & Ingber 2023, TOIS), with
  floors so a weak list is not stretched (`ToolIndex._fuse`); reciprocal rank fusion (k = 60; Cormack,
  Clarke & Buettcher 2009, SIGIR) is the alternative. Each ranking takes part with its best
  `SearchWeights.depth`.
- **Prerequisites** (`prerequisites`): from the definitions alone, which tool of a server provides an
  input another needs (coordinates, an id); a tool among the best results lifts them to just below it.
- **Implied steps** (`expansions`): generic rules add the best tool for a step a task implies but rarely
  names (write a file when a path is a destination, read one when it is a source, calculate, get the
  current date). Their answers are computed once per catalog change, never per query.

A tool of a `prefer` server (one the client session already used) wins over one scoring up to
`SearchWeights.tie` (5%) of the best score higher; exact ties then go to index order.

Incremental updates: `add_tools(server, tools)` analyses and embeds only that server's tools (the
costly part); the term postings, whose idf is global, are re-assembled lazily on the next query from
per-server term counts (~50-130 ms for 3,000 tools). Per-tool data lives in numpy arrays and strings,
not in per-document lists of Python objects, so a garbage collection has little of the index to walk
(issue 17: the old index's term lists and the dictionary's 190k sense lists were walked by every full
collection).

Measured by `mcpopt eval search` (README, "Tool search").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mcpopt.discovery.analysis import TextAnalyzer as TextAnalyzer
from mcpopt.discovery.analysis import split_identifier as split_identifier
from mcpopt.discovery.docs import ToolDoc as ToolDoc
from mcpopt.discovery.docs import compact_line as compact_line
from mcpopt.discovery.docs import purpose as purpose
from mcpopt.discovery.docs import signature as signature
from mcpopt.discovery.embed import Embedder
from mcpopt.discovery.lexicon import english_glosses
from mcpopt.discovery.ranking import RRF_K as RRF_K
from mcpopt.discovery.ranking import Postings, TermBag, TermShard, normalize_rows, rank_lookup, rrf_into, top_indices
from mcpopt.discovery.ranking import rrf as rrf
from mcpopt.discovery.results import SearchHit as SearchHit
from mcpopt.discovery.results import SearchWeights as SearchWeights
from mcpopt.discovery.results import ServerHit as ServerHit
from mcpopt.discovery.steps import IMPLIED_STEPS
from mcpopt.discovery.steps import expansions as expansions
from mcpopt.discovery.steps import prerequisites as prerequisites
from mcpopt.discovery.steps import query_text as query_text

Mode = Literal["lexical", "dense", "hybrid"]
MODES: tuple[Mode, ...] = ("lexical", "dense", "hybrid")


@dataclass(slots=True)
class _Built:
    """Everything a query reads, assembled from the shards in one go (replaced whole on rebuild)."""

    docs: list[ToolDoc]
    by_name: dict[str, int]
    servers: list[str]
    server_of: np.ndarray  # int32 per tool
    starts: np.ndarray  # first tool index of each server (servers are contiguous)
    tools: Postings | None
    servers_lex: Postings | None
    vectors: np.ndarray | None  # (n, dim) float32
    server_vectors: np.ndarray | None  # (servers, dim)
    mean: np.ndarray | None  # the tools' mean vector, removed from every vector (None: not centred)
    needs: np.ndarray  # (edges, 2) global (consumer, provider) tool indices, see `prerequisites`
    implied: dict[str, int] = field(default_factory=dict)  # implied-step sub-query -> best tool index


_NO_EDGES = np.zeros((0, 2), dtype=np.intp)


class ToolIndex:
    """An in-memory server-aware hybrid index of tools, updated one server at a time.

    Thread-safe for one writer and many readers: a query reads one immutable snapshot; a lock guards
    the lazy rebuild.

    Args:
        embedder: dense model (None: lexical only; `dense` and `hybrid` then fall back to lexical).
        weights: field, fusion and boost weights.
        analyzer: text analyzer shared by documents and queries.
    """

    def __init__(
        self,
        embedder: Embedder | None = None,
        weights: SearchWeights | None = None,
        analyzer: TextAnalyzer | None = None,
    ) -> None:
        self.embedder = embedder
        self.weights = weights or SearchWeights()
        self.analyzer = analyzer or TextAnalyzer()
        self._shards: dict[str, TermShard] = {}
        self._lock = threading.Lock()
        self._dirty = True
        self._built = _Built(
            [], {}, [], np.zeros(0, np.int32), np.zeros(0, np.intp), None, None, None, None, None, _NO_EDGES
        )
        self.rebuild_ms = 0.0
        """Milliseconds the last lazy re-assembly took."""

    # ---- updates ----
    def add_tools(self, server: str, tools: Iterable[ToolDoc | Any], server_description: str | None = None) -> int:
        """Index (or re-index) one server's tools, replacing what the index had for it.

        Args:
            server: the upstream's name.
            tools: `ToolDoc`s, `mcp_types.Tool`s or tools/list dicts.
            server_description: what the server says about itself (default: the first tool's
                `server_description`).

        Returns:
            the number of tools now indexed for `server`.
        """
        docs = [t if isinstance(t, ToolDoc) else ToolDoc.of(server, t) for t in tools]
        about = server_description if server_description is not None else (docs[0].server_description if docs else "")
        bag = TermBag.of([self._doc_terms(d) for d in docs])
        server_bag = TermBag.of([self._server_terms(server, about, docs)])
        vectors = server_vector = None
        if self.embedder is not None and docs:
            vectors = self.embedder.embed([self._dense_text(d) for d in docs])
            about_vec = self.embedder.embed([self._server_dense_text(server, about)])[0]
            server_vector = vectors.mean(axis=0) + about_vec
            norm = float(np.linalg.norm(server_vector))
            if norm > 0:
                server_vector = server_vector / norm
        needs = prerequisites(docs, self.analyzer)
        with self._lock:
            if docs:
                self._shards[server] = TermShard(docs, bag, vectors, server_bag, server_vector, needs)
            else:
                self._shards.pop(server, None)
            self._dirty = True
        return len(docs)

    def remove_server(self, server: str) -> bool:
        """Drop a server's tools. Returns False if the index had none for it."""
        with self._lock:
            gone = self._shards.pop(server, None) is not None
            self._dirty = self._dirty or gone
        return gone

    def servers(self) -> list[str]:
        """The indexed servers, in the order they were first added."""
        return list(self._shards)

    def server_tools(self, server: str) -> list[ToolDoc]:
        """The tools indexed for `server` (empty if none)."""
        shard = self._shards.get(server)
        return list(shard.docs) if shard is not None else []

    def __len__(self) -> int:
        return sum(len(s.docs) for s in self._shards.values())

    def refresh(self) -> None:
        """Re-assemble the postings now (else the next query does it); call after a batch of updates."""
        self._ensure()

    def get(self, name: str) -> ToolDoc | None:
        """The tool clients call `name` (exact match), if indexed."""
        built = self._ensure()
        i = built.by_name.get(name)
        return built.docs[i] if i is not None else None

    # ---- text per document ----
    def _text_terms(self, text: str) -> list[str]:
        a = self.analyzer
        return a.terms(text) + a.gloss_terms(text)

    def _doc_terms(self, d: ToolDoc) -> list[str]:
        a, w = self.analyzer, self.weights
        pnames: list[str] = []
        pdescs: list[str] = []
        for pname, pschema, _req in d.params():
            pnames.extend(a.identifier_terms(pname))
            pdesc = pschema.get("description")
            if isinstance(pdesc, str):
                pdescs.extend(self._text_terms(pdesc))
        return (
            a.identifier_terms(d.tool) * w.name
            + a.identifier_terms(d.server) * w.server_name
            + self._text_terms(d.description) * w.description
            + pnames * w.param_names
            + pdescs * w.param_descriptions
            + self._text_terms(d.server_description) * w.server_description
        )

    def _server_terms(self, server: str, about: str, docs: Sequence[ToolDoc]) -> list[str]:
        a = self.analyzer
        terms = a.identifier_terms(server) + self._text_terms(about)
        for d in docs:
            terms += a.identifier_terms(d.tool) + self._text_terms(d.description)
        return terms

    @staticmethod
    def _dense_text(d: ToolDoc) -> str:
        words = " ".join(split_identifier(d.tool))
        params = ", ".join(" ".join(split_identifier(n)) for n, _s, _r in d.params())
        desc = d.description
        gloss = english_glosses(desc)
        if gloss:
            desc = f"{desc} ({gloss})"
        return f"{words}: {desc} (arguments: {params}; server {' '.join(split_identifier(d.server))})"

    @staticmethod
    def _server_dense_text(server: str, about: str) -> str:
        gloss = english_glosses(about)
        return f"{' '.join(split_identifier(server))}: {about}" + (f" ({gloss})" if gloss else "")

    # ---- build ----
    def _ensure(self) -> _Built:
        if not self._dirty:
            return self._built
        with self._lock:
            if self._dirty:
                t0 = time.perf_counter()
                self._built = self._build()
                self._dirty = False
                self.rebuild_ms = (time.perf_counter() - t0) * 1000
            return self._built

    def _build(self) -> _Built:
        shards = list(self._shards.items())
        docs = [d for _s, shard in shards for d in shard.docs]
        by_name: dict[str, int] = {}
        for i, d in enumerate(docs):
            by_name.setdefault(d.name, i)
        sizes = np.asarray([len(shard.docs) for _s, shard in shards], dtype=np.intp)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.intp) if len(sizes) else sizes
        server_of = np.repeat(np.arange(len(shards), dtype=np.int32), sizes)
        w = self.weights
        tools = Postings([shard.bag for _s, shard in shards], w.k1, w.b) if docs else None
        servers_lex = Postings([shard.server_bag for _s, shard in shards], w.k1, w.b) if docs else None
        vectors = server_vectors = mean = None
        if self.embedder is not None:
            dim = self.embedder.dim
            vecs = [shard.vectors for _s, shard in shards if shard.vectors is not None]
            vectors = np.ascontiguousarray(np.vstack(vecs)) if vecs else np.zeros((0, dim), dtype=np.float32)
            svecs = [s.server_vector for _n, s in shards if s.server_vector is not None]
            server_vectors = np.ascontiguousarray(np.vstack(svecs)) if svecs else np.zeros((0, dim), np.float32)
            if w.center and len(vectors) > 1:
                mean = vectors.mean(axis=0)
                vectors = normalize_rows(vectors - mean)
                server_vectors = normalize_rows(server_vectors - mean)
        edges = [shard.needs + start for (_s, shard), start in zip(shards, starts, strict=True) if len(shard.needs)]
        needs = np.vstack(edges).astype(np.intp) if edges else _NO_EDGES
        built = _Built(
            docs,
            by_name,
            [s for s, _ in shards],
            server_of,
            starts,
            tools,
            servers_lex,
            vectors,
            server_vectors,
            mean,
            needs,
        )
        if docs and w.expansion > 0:
            for sub in IMPLIED_STEPS:
                final = self._score(built, sub, "hybrid")[0]
                best = int(np.argmax(final))
                if final[best] > 0:
                    built.implied[sub] = best
        return built

    # ---- query ----
    def lexical_scores(self, query: str) -> np.ndarray:
        """BM25 score per indexed tool (index order), shape (n,), float32; zeros if no term matches."""
        built = self._ensure()
        out = np.zeros(len(built.docs), dtype=np.float32)
        if built.tools is not None:
            built.tools.scores(self._text_terms(query), out)
        return out

    def dense_scores(self, query: str) -> np.ndarray | None:
        """Cosine similarity per indexed tool, shape (n,); None without an embedder."""
        built = self._ensure()
        if self.embedder is None or built.vectors is None:
            return None
        return self._dense(built.vectors, self._query_vector(built, query))

    @staticmethod
    def _dense(vectors: np.ndarray, q: np.ndarray) -> np.ndarray:
        # einsum's plain loop, not BLAS: a 3,000 x 256 GEMV gains nothing from threads, and BLAS
        # threads competing for busy cores cost milliseconds.
        return np.einsum("ij,j->i", vectors, q)

    def _query_vector(self, built: _Built, query: str) -> np.ndarray:
        assert self.embedder is not None
        q = self.embedder.embed_one(self._query_dense_text(query))
        if built.mean is not None and q.any():
            q = q - built.mean
            norm = float(np.linalg.norm(q))
            q = q / norm if norm > 0 else q
        return q.astype(np.float32, copy=False)

    @staticmethod
    def _query_dense_text(query: str) -> str:
        gloss = english_glosses(query)
        return f"{query} ({gloss})" if gloss else query

    def search(
        self,
        query: str,
        k: int = 10,
        mode: Mode = "hybrid",
        expand: bool = True,
        prefer: Collection[str] = (),
    ) -> list[SearchHit]:
        """The `k` best tools for a natural-language query.

        Ranking: tool and server rankings fused by RRF (module docstring), plus the best tool of each
        implied step (`expansions`); an exact tool-name query ranks that tool first.

        Args:
            query: what the agent wants to do (or a tool name).
            k: results wanted (>= 1).
            mode: `lexical` (BM25 only), `dense` (embeddings only) or `hybrid` (both).
            expand: add the implied-step tools.
            prefer: servers whose tools win ties (e.g. the servers this client session already used).

        Returns:
            up to `k` hits, best first; `score` is the final fused score.

        Raises:
            ValueError: `k` < 1 or an unknown mode.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1 (got {k})")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
        built = self._ensure()
        n = len(built.docs)
        if n == 0:
            return []
        final, lex_order, dense_order, server_order = self._score(built, query, mode)
        if expand and self.weights.expansion > 0:
            subs = [built.implied[s] for s in expansions(query) if s in built.implied]
            if subs:
                # On the scale of this query's scores: weight 1 ties the best result.
                lift = self.weights.expansion * float(final.max())
                for best in subs:
                    final[best] += lift
        exact = built.by_name.get(query.strip())
        if exact is not None:
            final[exact] = final.max() + 1.0
        top = self._top_k(built, final, k, prefer)
        lex_rank = rank_lookup(lex_order, top)
        dense_rank = rank_lookup(dense_order, top)
        srank = np.zeros(len(built.servers), dtype=np.int64)
        srank[server_order] = np.arange(1, len(server_order) + 1)
        return [
            SearchHit(built.docs[i], float(final[i]), lex_rank[j], dense_rank[j], int(srank[built.server_of[i]]))
            for j, i in enumerate(top)
        ]

    def search_servers(self, query: str, k: int = 5, per_server: int = 3, mode: Mode = "hybrid") -> list[ServerHit]:
        """The `k` best servers for a query, each with its `per_server` best tools (best first).

        Raises:
            ValueError: `k` or `per_server` < 1, or an unknown mode.
        """
        if k < 1 or per_server < 1:
            raise ValueError("k and per_server must be >= 1")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
        built = self._ensure()
        if not built.docs:
            return []
        final, _lex, _dense, server_order = self._score(built, query, mode)
        out: list[ServerHit] = []
        ends = np.append(built.starts[1:], len(built.docs))
        for s in server_order[:k]:
            lo, hi = int(built.starts[s]), int(ends[s])
            best = lo + np.argsort(-final[lo:hi], kind="stable")[:per_server]
            out.append(ServerHit(built.servers[s], float(final[best[0]]), tuple(built.docs[i] for i in best)))
        return out

    def _score(self, built: _Built, query: str, mode: Mode) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(final score per tool, lexical order, dense order, server order) for one query.

        Orders are tool (or server) indices best first, cut to `depth`; empty when a list is off.
        """
        w = self.weights
        n, ns = len(built.docs), len(built.servers)
        use_dense = mode != "lexical" and self.embedder is not None and built.vectors is not None
        use_lex = mode != "dense" or not use_dense
        empty = np.zeros(0, dtype=np.intp)
        lex_order = dense_order = empty
        fused = np.zeros(n, dtype=np.float64)
        server_fused = np.zeros(ns, dtype=np.float64)
        both = use_lex and use_dense
        if w.paths:
            query = query_text(query)
        if use_lex and built.tools is not None and built.servers_lex is not None:
            terms = self._text_terms(query)
            if w.unique_terms:
                terms = list(dict.fromkeys(terms))
            lex = np.zeros(n, dtype=np.float32)
            if built.tools.scores(terms, lex):
                lex_order = top_indices(lex, w.depth, positive=True)
                self._fuse(fused, lex, lex_order, w.lexical if both else 1.0)
                s_lex = np.zeros(ns, dtype=np.float32)
                built.servers_lex.scores(terms, s_lex)
                s_order = top_indices(s_lex, w.depth, positive=True)
                self._fuse(server_fused, s_lex, s_order, w.server_lexical)
        if use_dense and self.embedder is not None and built.vectors is not None:
            q = self._query_vector(built, query)
            if q.any():
                dense = self._dense(built.vectors, q)
                dense_order = top_indices(dense, w.depth, positive=True)
                self._fuse(fused, dense, dense_order, w.dense if both else 1.0, w.dense_floor)
                if built.server_vectors is not None and len(built.server_vectors):
                    s_dense = self._dense(built.server_vectors, q)
                    s_order = top_indices(s_dense, w.depth, positive=True)
                    self._fuse(server_fused, s_dense, s_order, w.server_dense, w.dense_floor)
        # A server's third ranking: by its best tool.
        best_tool = np.maximum.reduceat(fused, built.starts) if n else np.zeros(0)
        s_order = top_indices(best_tool, w.depth, positive=True)
        most = (w.lexical + w.dense) if both else 1.0  # the best fused score a tool can have
        self._fuse(server_fused, best_tool, s_order, w.server_tools, w.tools_floor * most)
        server_order = top_indices(server_fused, ns, positive=True)
        final = fused
        if w.server > 0 and len(server_order):
            if w.server_all:
                final = fused + w.server * server_fused[built.server_of]
            else:
                final = fused.copy()
                matched = fused > 0
                final[matched] += w.server * server_fused[built.server_of[matched]]
        if w.prerequisite > 0 and len(built.needs) and n:
            # A tool among the best results lifts the tools that provide its inputs to just below it.
            kk = min(w.prerequisite_depth, n)
            bar = np.partition(final, n - kk)[n - kk]
            consumer, provider = built.needs[:, 0], built.needs[:, 1]
            live = final[consumer] >= max(bar, 1e-12)
            if live.any():
                final = final.copy() if final is fused else final
                np.maximum.at(final, provider[live], w.prerequisite * final[consumer[live]])
        return final, lex_order, dense_order, server_order

    def _fuse(self, out: np.ndarray, scores: np.ndarray, order: np.ndarray, weight: float, floor: float = 0.0) -> None:
        """Add one ranking's share into `out`, `weight` at most per entry.

        `convex` (default): min-max normalised within the list -- a convex combination of normalised
        scores, which Bruch, Gai & Ingber 2023 (TOIS, "An Analysis of Fusion Functions for Hybrid
        Retrieval") found better than RRF once tuned -- except that the top counts as at least `floor`
        and the bottom as at least `noise * floor`, so a list whose best match is weak (a small index,
        a query about nothing indexed) is not stretched to look strong. `rrf`: `weight / (60 + rank)`.
        """
        if not len(order):
            return
        fusion = self.weights.fusion
        if fusion == "rrf":
            rrf_into(out, order, weight)
            return
        top = scores[order].astype(np.float64)
        # Min-max within the list (Bruch et al. 2023, TOIS, "An Analysis of Fusion Functions for Hybrid
        # Retrieval"), but never stretching a weak best match to 1: the top is at least `floor`.
        lo = max(top[-1] if len(order) >= self.weights.depth else 0.0, floor * self.weights.noise)
        hi = max(top[0], floor)
        span = hi - lo
        if span > 0:
            out[order] += weight * np.clip((top - lo) / span, 0.0, 1.0)

    def _top_k(self, built: _Built, final: np.ndarray, k: int, prefer: Collection[str]) -> np.ndarray:
        """The `k` best tool indices; a `prefer` server's tool wins over one scoring within `tie` of it."""
        cand = np.flatnonzero(final > 0)
        if len(cand) == 0:
            return cand
        scores = final[cand]
        if prefer:
            pref = np.fromiter((built.servers[s] in prefer for s in built.server_of[cand]), dtype=bool, count=len(cand))
            if pref.any():
                scores = scores + pref * (self.weights.tie * float(scores.max()))
        depth = min(len(cand), k)
        if len(cand) > depth:
            part = np.argpartition(-scores, depth - 1)[:depth]
            cand, scores = cand[part], scores[part]
        return cand[np.lexsort((cand, -scores))]

    def lines(self, hits: Sequence[SearchHit]) -> str:
        """Compact result text: one `compact_line` per hit, newline-separated."""
        return "\n".join(compact_line(h.doc) for h in hits)
