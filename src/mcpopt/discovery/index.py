"""Hybrid tool search: BM25 over tool text fused with dense embeddings by reciprocal rank fusion.

- Lexical: Okapi BM25 (Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework: BM25 and
  Beyond"; Lucene variant, k1=1.2, b=0.75) with the `bm25s` library over the tool name (split on
  `_ - . /` and camelCase), the server name, the description, and the parameters' names and
  descriptions. Field weights are applied by repeating a field's tokens (a cheap BM25F stand-in).
  Text is lower-cased, English stop words dropped and words Snowball-stemmed; CJK runs become
  character bigrams so Chinese descriptions are searchable too.
- Dense: cosine similarity between the query's and each tool's static embedding (`embed.py`).
- Fusion: reciprocal rank fusion, `score(d) = sum_i w_i / (k + rank_i(d))` with k = 60 (Cormack,
  Clarke & Buettcher 2009, "Reciprocal Rank Fusion outperforms Condorcet and individual rank learning
  methods", SIGIR), then a small boost for tools whose server ranks high (tasks tend to use several
  tools of one server).

Incremental updates: `add_tools(server, tools)` tokenizes and embeds only that server's tools (the
costly part) and `remove_server(server)` drops them; the BM25 term matrix, whose IDF is global, is
re-assembled lazily on the next query from the cached token lists (about 10 ms for 3,000 tools).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mcpopt.discovery.embed import Embedder

Mode = Literal["lexical", "dense", "hybrid"]
MODES: tuple[Mode, ...] = ("lexical", "dense", "hybrid")
RRF_K = 60
"""Reciprocal rank fusion constant (Cormack et al. 2009 found k = 60 robust across collections)."""

# ---- text ----------------------------------------------------------------------------------

_IDENT_SPLIT = re.compile(r"[_\-./\s:]+")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_TOKEN = re.compile(r"[A-Za-z]+|\d+|[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def split_identifier(name: str) -> list[str]:
    """Words of an identifier, lower-cased: split on `_ - . / :` and whitespace, then on camelCase.

    >>> split_identifier("getUserInfo_v2")
    ['get', 'user', 'info', 'v', '2']
    >>> split_identifier("HTTPServer.read-file")
    ['http', 'server', 'read', 'file']
    """
    words: list[str] = []
    for part in _IDENT_SPLIT.split(name):
        words.extend(w.lower() for w in _CAMEL.findall(part))
    return words


class TextAnalyzer:
    """Text -> index terms: identifier/camelCase splitting, lower case, stop words, Snowball stems.

    Args:
        stem: apply the English Snowball stemmer (PyStemmer) when it is installed.
    """

    def __init__(self, stem: bool = True) -> None:
        from bm25s.stopwords import STOPWORDS_EN

        self.stopwords = frozenset(STOPWORDS_EN)
        self._stemmer: Any = None
        if stem:
            try:
                import Stemmer

                self._stemmer = Stemmer.Stemmer("english")
            except ImportError:  # pragma: no cover - PyStemmer is a declared dependency
                self._stemmer = None
        self._cache: dict[str, str] = {}

    def _stem(self, word: str) -> str:
        out = self._cache.get(word)
        if out is None:
            out = self._stemmer.stemWord(word) if self._stemmer is not None else word
            if len(self._cache) < 200_000:
                self._cache[word] = out
        return out

    def terms(self, text: str) -> list[str]:
        """Index terms of free text (descriptions, queries).

        Returns:
            terms in text order; CJK runs as overlapping character bigrams (a lone character as itself).
        """
        out: list[str] = []
        for tok in _TOKEN.findall(text):
            if _CJK.match(tok):
                out.extend(tok[i : i + 2] for i in range(max(1, len(tok) - 1)))
                continue
            for word in _CAMEL.findall(tok):
                w = word.lower()
                if w not in self.stopwords and (len(w) > 1 or w.isdigit()):
                    out.append(self._stem(w))
        return out

    def identifier_terms(self, name: str) -> list[str]:
        """Index terms of an identifier (tool, server or parameter name), stemmed like free text."""
        return [self._stem(w) for w in split_identifier(name) if w not in self.stopwords or len(w) > 2]


# ---- documents ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolDoc:
    """One searchable tool.

    Attributes:
        name: the name clients call it by (the gateway name, e.g. `filesystem__read_file`).
        server: the upstream server that owns it.
        tool: its name on that server.
        description: the upstream's description ("" if none).
        input_schema: the upstream's JSON Schema for the arguments.
        server_description: what the server says about itself (its `instructions`, or a catalog's
            server description); searched lexically, never shown in results.
    """

    name: str
    server: str
    tool: str
    description: str = ""
    input_schema: Mapping[str, Any] = field(default_factory=dict)
    server_description: str = ""

    @classmethod
    def of(
        cls,
        server: str,
        tool: Any,
        name: str | None = None,
        upstream_name: str | None = None,
        server_description: str = "",
    ) -> ToolDoc:
        """Build from an `mcp_types.Tool` or a tools/list dict (`name`, `description`, `inputSchema`).

        Args:
            server: the owning upstream.
            tool: the definition.
            name: the name clients use (default: the definition's name).
            upstream_name: the name on the upstream (default: the definition's name).
            server_description: see the attribute.
        """
        if isinstance(tool, Mapping):
            tname = str(tool.get("name", ""))
            desc = tool.get("description") or ""
            schema = tool.get("inputSchema") or tool.get("input_schema") or {}
        else:
            tname = tool.name
            desc = getattr(tool, "description", None) or ""
            schema = getattr(tool, "input_schema", None) or {}
        return cls(
            name=name or tname,
            server=server,
            tool=upstream_name or tname,
            description=str(desc),
            input_schema=schema if isinstance(schema, Mapping) else {},
            server_description=server_description,
        )

    def params(self) -> list[tuple[str, Mapping[str, Any], bool]]:
        """(name, property schema, required) per argument, in schema order."""
        props = self.input_schema.get("properties")
        if not isinstance(props, Mapping):
            return []
        required = self.input_schema.get("required")
        req = set(required) if isinstance(required, list) else set()
        return [(str(k), v if isinstance(v, Mapping) else {}, k in req) for k, v in props.items()]

    def schema_json(self) -> str:
        """The full definition as compact JSON (what `get_tool_schema` returns)."""
        body = {"name": self.name, "description": self.description, "inputSchema": dict(self.input_schema)}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def _type_name(schema: Mapping[str, Any]) -> str:
    t = schema.get("type")
    if isinstance(t, list):
        return "|".join(str(x) for x in t if x != "null") or "any"
    if t == "array":
        items = schema.get("items")
        inner = _type_name(items) if isinstance(items, Mapping) else "any"
        return f"{inner}[]"
    if isinstance(t, str):
        return t
    if "enum" in schema:
        return "enum"
    for key in ("anyOf", "oneOf"):
        alts = schema.get(key)
        if isinstance(alts, list):
            names = [_type_name(a) for a in alts if isinstance(a, Mapping) and a.get("type") != "null"]
            return "|".join(dict.fromkeys(names)) or "any"
    return "any"


def signature(doc: ToolDoc, max_params: int = 8) -> str:
    """Argument signature, e.g. `(path: string, depth?: integer)`; `?` marks optional arguments.

    More than `max_params` arguments are elided as `, ...`.
    """
    parts = [f"{n}{'' if req else '?'}: {_type_name(s)}" for n, s, req in doc.params()]
    if len(parts) > max_params:
        parts = parts[:max_params] + ["..."]
    return "(" + ", ".join(parts) + ")"


_SENTENCE_END = re.compile(r"(?<=[.!?])\s|[。！？\n]")


def purpose(description: str, max_chars: int = 140) -> str:
    """The first sentence of a description, whitespace collapsed, cut to `max_chars` with an ellipsis."""
    text = description.strip()
    m = _SENTENCE_END.search(text)
    first = text[: m.start() + (1 if text[m.start()] in "。！？" else 0)] if m else text
    first = " ".join(first.split())
    if len(first) > max_chars:
        first = first[: max_chars - 1].rstrip() + "…"
    return first


def compact_line(doc: ToolDoc) -> str:
    """One line per tool: `name(arg: type, opt?: type) - purpose`."""
    p = purpose(doc.description)
    return f"{doc.name}{signature(doc)}" + (f" - {p}" if p else "")


# ---- the index ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SearchWeights:
    """Tunable knobs; the defaults were tuned on the tuning part of the LiveMCPBench dev split only
    (`mcpopt eval search` reports the held-out part too).

    Field repeats weight the BM25 fields (a term repeated n times counts n times, BM25F-style).
    `lexical` / `dense` weight the two rankings in RRF. `expansion` weights the top hit of each
    intent sub-query (see `expansions`; 0 turns them off). `server_boost` adds that share of the
    best fused score among a tool's server siblings (0: off).
    """

    name: int = 2
    server: int = 1
    description: int = 1
    param_names: int = 1
    param_descriptions: int = 1
    server_description: int = 1
    lexical: float = 0.7
    dense: float = 1.0
    expansion: float = 0.9
    server_boost: float = 0.0
    k1: float = 1.2
    b: float = 0.75


# ---- query expansion ------------------------------------------------------------------------

_PATH = re.compile(r"(?:~|\.{1,2})?/[\w.\-/]*\.[A-Za-z0-9]{1,5}\b")
_SAVE = re.compile(r"\b(save[sd]?|saving|write|writing|store|export|output|generate|create|put|record|produce)\b", re.I)
_READ = re.compile(r"\b(read|open|load|under|from|analy[sz]e|parse|extract|convert)\b", re.I)
_CALC = re.compile(
    r"\b(calculate|calculation|compute|estimate|how much|how many|total|sum|average|bmi|ratio|percentage)\b"
    r"|\d\s*[-+*/^]\s*\d",
    re.I,
)
_TIME = re.compile(
    r"\b(today|tonight|tomorrow|yesterday|now|current(ly)?|latest|recent(ly)?|last \d+\s*\w+"
    r"|past (day|week|month|year)|this (week|month|year)|24h)\b",
    re.I,
)


def expansions(query: str) -> list[str]:
    """Intent sub-queries for steps a task implies but rarely names (generic rules, no tool names).

    - a file path plus a verb of producing (save, write, generate, ...) -> `write file`;
    - a file path plus a verb of consuming (read, open, under, analyse, ...) -> `read file`;
    - arithmetic words or an expression (calculate, how much, BMI, 3*4) -> `calculate math expression`;
    - relative time (today, tomorrow, latest, last 24h) -> `get current date and time`.

    Each sub-query's best tool joins the fused ranking with weight `SearchWeights.expansion`,
    just below the main query's first few results.
    """
    out: list[str] = []
    if _PATH.search(query):
        if _SAVE.search(query):
            out.append("write file")
        if _READ.search(query):
            out.append("read file")
    if _CALC.search(query):
        out.append("calculate math expression")
    if _TIME.search(query):
        out.append("get current date and time")
    return out


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One result: the tool, its fused score, and its 1-based rank in each list (0: not ranked)."""

    doc: ToolDoc
    score: float
    lexical_rank: int = 0
    dense_rank: int = 0


@dataclass(slots=True)
class _Shard:
    docs: list[ToolDoc]
    terms: list[list[str]]
    vectors: np.ndarray | None


class ToolIndex:
    """An in-memory hybrid index of tools, updated one server at a time.

    Thread-safe for one writer and many readers (a lock guards the lazy rebuild).

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
        self._shards: dict[str, _Shard] = {}
        self._lock = threading.Lock()
        self._dirty = True
        self._docs: list[ToolDoc] = []
        self._by_name: dict[str, int] = {}
        self._server_of: np.ndarray = np.zeros(0, dtype=np.int32)
        self._vectors: np.ndarray | None = None
        self._bm25: Any = None
        self.rebuild_ms = 0.0
        """Milliseconds the last lazy BM25 re-assembly took."""

    # ---- updates ----
    def add_tools(self, server: str, tools: Iterable[ToolDoc | Any]) -> int:
        """Index (or re-index) one server's tools, replacing what the index had for it.

        Args:
            server: the upstream's name.
            tools: `ToolDoc`s, `mcp_types.Tool`s or tools/list dicts.

        Returns:
            the number of tools now indexed for `server`.
        """
        docs = [t if isinstance(t, ToolDoc) else ToolDoc.of(server, t) for t in tools]
        terms = [self._doc_terms(d) for d in docs]
        vectors = self.embedder.embed([self._dense_text(d) for d in docs]) if self.embedder and docs else None
        with self._lock:
            self._shards[server] = _Shard(docs, terms, vectors)
            self._dirty = True
        return len(docs)

    def remove_server(self, server: str) -> bool:
        """Drop a server's tools. Returns False if the index had none for it."""
        with self._lock:
            gone = self._shards.pop(server, None) is not None
            self._dirty = self._dirty or gone
        return gone

    def servers(self) -> list[str]:
        return list(self._shards)

    def __len__(self) -> int:
        return sum(len(s.docs) for s in self._shards.values())

    def refresh(self) -> None:
        """Re-assemble the BM25 matrix now (else the next query does it); call after a batch of updates."""
        self._ensure()

    def get(self, name: str) -> ToolDoc | None:
        """The tool clients call `name` (exact match), if indexed."""
        self._ensure()
        i = self._by_name.get(name)
        return self._docs[i] if i is not None else None

    # ---- text per document ----
    def _doc_terms(self, d: ToolDoc) -> list[str]:
        a, w = self.analyzer, self.weights
        name_terms = a.identifier_terms(d.tool)
        server_terms = a.identifier_terms(d.server)
        desc_terms = a.terms(d.description)
        pnames: list[str] = []
        pdescs: list[str] = []
        for pname, pschema, _req in d.params():
            pnames.extend(a.identifier_terms(pname))
            pdesc = pschema.get("description")
            if isinstance(pdesc, str):
                pdescs.extend(a.terms(pdesc))
        return (
            name_terms * w.name
            + server_terms * w.server
            + desc_terms * w.description
            + pnames * w.param_names
            + pdescs * w.param_descriptions
            + a.terms(d.server_description) * w.server_description
        )

    @staticmethod
    def _dense_text(d: ToolDoc) -> str:
        words = " ".join(split_identifier(d.tool))
        params = ", ".join(" ".join(split_identifier(n)) for n, _s, _r in d.params())
        return f"{words}: {d.description} (arguments: {params}; server {' '.join(split_identifier(d.server))})"

    # ---- build ----
    def _ensure(self) -> None:
        if not self._dirty:
            return
        with self._lock:
            if not self._dirty:
                return
            t0 = time.perf_counter()
            docs: list[ToolDoc] = []
            terms: list[list[str]] = []
            vecs: list[np.ndarray] = []
            server_ids: list[int] = []
            for sid, shard in enumerate(self._shards.values()):
                docs.extend(shard.docs)
                terms.extend(shard.terms)
                server_ids.extend([sid] * len(shard.docs))
                if shard.vectors is not None:
                    vecs.append(shard.vectors)
            self._docs = docs
            self._by_name = {}
            for i, d in enumerate(docs):
                self._by_name.setdefault(d.name, i)
            self._server_of = np.asarray(server_ids, dtype=np.int32)
            dim = self.embedder.dim if self.embedder else 0
            self._vectors = (
                (np.vstack(vecs) if vecs else np.zeros((0, dim), dtype=np.float32)) if self.embedder else None
            )
            self._bm25 = self._build_bm25(terms) if docs else None
            self._dirty = False
            self.rebuild_ms = (time.perf_counter() - t0) * 1000

    def _build_bm25(self, terms: list[list[str]]) -> Any:
        import bm25s

        logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets DEBUG on import
        retriever = bm25s.BM25(k1=self.weights.k1, b=self.weights.b, method="lucene")
        # An empty document would break bm25s' matrix; a placeholder term keeps row counts aligned.
        corpus = [t if t else ["\x00"] for t in terms]
        retriever.index(corpus, show_progress=False)
        return retriever

    # ---- query ----
    def lexical_scores(self, query: str) -> np.ndarray:
        """BM25 score per indexed tool (index order), shape (n,), float32; zeros if no term matches."""
        self._ensure()
        n = len(self._docs)
        if self._bm25 is None:
            return np.zeros(n, dtype=np.float32)
        ids = self._bm25.get_tokens_ids(self.analyzer.terms(query))
        if not ids:
            return np.zeros(n, dtype=np.float32)
        return np.asarray(self._bm25.get_scores_from_ids(ids), dtype=np.float32)

    def dense_scores(self, query: str) -> np.ndarray | None:
        """Cosine similarity per indexed tool, shape (n,); None without an embedder."""
        self._ensure()
        if self.embedder is None or self._vectors is None:
            return None
        q = self.embedder.embed_one(query)
        # einsum's plain loop, not BLAS: a 3,000 x 256 GEMV gains nothing from threads, and BLAS
        # threads competing for busy cores cost milliseconds.
        return np.einsum("ij,j->i", self._vectors, q)

    def search(self, query: str, k: int = 10, mode: Mode = "hybrid", expand: bool = True) -> list[SearchHit]:
        """The `k` best tools for a natural-language query.

        Ranking: the main query's lexical and dense rankings fused by RRF (`w / (60 + rank)`), then
        the fused ranking RRF-merged with the top hit of each intent sub-query (`expansions`); an
        exact tool-name query ranks that tool first.

        Args:
            query: what the agent wants to do (or a tool name).
            k: results wanted (>= 1).
            mode: `lexical` (BM25 only), `dense` (embeddings only) or `hybrid` (both).
            expand: add the intent sub-queries.

        Returns:
            up to `k` hits, best first; `score` is the final fused score.

        Raises:
            ValueError: `k` < 1 or an unknown mode.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1 (got {k})")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
        self._ensure()
        n = len(self._docs)
        if n == 0:
            return []
        fused, lex_rank, dense_rank = self._fused(query, mode)
        subs = expansions(query) if expand and self.weights.expansion > 0 else []
        if subs:
            # RRF of the main fused ranking with each sub-query's first result.
            main_rank = _ranks(fused, positive_only=True)
            final = np.where(main_rank > 0, 1.0 / (RRF_K + main_rank), 0.0)
            for sub in subs:
                sub_scores = self._fused(sub, mode)[0]
                best = int(np.argmax(sub_scores))
                if sub_scores[best] > 0:
                    final[best] += self.weights.expansion / (RRF_K + 1)
        else:
            final = fused
        exact = self._by_name.get(query.strip())
        if exact is not None:
            final[exact] = final.max() + 1.0
        kk = min(k, n)
        top = np.argpartition(-final, kk - 1)[:kk]
        top = top[np.argsort(-final[top], kind="stable")]
        return [
            SearchHit(
                self._docs[i],
                float(final[i]),
                int(lex_rank[i]) if lex_rank is not None else 0,
                int(dense_rank[i]) if dense_rank is not None else 0,
            )
            for i in top
            if final[i] > 0
        ]

    def _fused(self, query: str, mode: Mode) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(fused RRF score per tool, lexical ranks, dense ranks) for one query."""
        w = self.weights
        n = len(self._docs)
        lex = self.lexical_scores(query) if mode != "dense" else None
        dense = self.dense_scores(query) if mode != "lexical" else None
        if mode == "dense" and dense is None:
            lex = self.lexical_scores(query)
        lex_rank = _ranks(lex, positive_only=True) if lex is not None else None
        dense_rank = _ranks(dense, positive_only=True) if dense is not None else None
        fused = np.zeros(n, dtype=np.float64)
        if lex_rank is not None:
            fused += np.where(lex_rank > 0, (w.lexical if dense is not None else 1.0) / (RRF_K + lex_rank), 0.0)
        if dense_rank is not None:
            fused += np.where(dense_rank > 0, (w.dense if lex is not None else 1.0) / (RRF_K + dense_rank), 0.0)
        if w.server_boost and n > 1:
            best = np.zeros(int(self._server_of.max()) + 1, dtype=np.float64)
            np.maximum.at(best, self._server_of, fused)
            fused = fused + w.server_boost * best[self._server_of]
        return fused, lex_rank, dense_rank

    def lines(self, hits: Sequence[SearchHit]) -> str:
        """Compact result text: one `compact_line` per hit, newline-separated."""
        return "\n".join(compact_line(h.doc) for h in hits)


def _ranks(scores: np.ndarray, positive_only: bool = False) -> np.ndarray:
    """1-based rank of each entry by descending score (ties: index order); 0 where not ranked."""
    order = np.argsort(-scores, kind="stable")
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(scores) + 1)
    if positive_only:
        ranks[scores <= 0] = 0
    return ranks


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
