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

import json
import re
import threading
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mcpopt.discovery.embed import Embedder
from mcpopt.discovery.lexicon import english_glosses

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

    def gloss_terms(self, text: str) -> list[str]:
        """Terms of the English glosses of the Chinese in `text` (empty without Chinese)."""
        gloss = english_glosses(text)
        return self.terms(gloss) if gloss else []


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
            server description); searched, never shown in results.
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


# ---- implied steps --------------------------------------------------------------------------

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

_MIME_NOISE = frozenset({"application", "vnd", "openxmlformats", "officedocument", "x", "ms"})


def _path_words(path: str) -> str:
    """What a file path says about the task: its file name's words, extension and media type.

    The media type comes from the standard library's `mimetypes` table (e.g. `.xlsx` ->
    `spreadsheet sheet`, `.md` -> `text markdown`); directories are dropped (they repeat words or
    are noise such as `root`).
    """
    import mimetypes

    name = path.rsplit("/", 1)[-1]
    stem, _, ext = name.rpartition(".")
    words = split_identifier(stem) + [ext.lower()]
    mime, _enc = mimetypes.guess_type(name, strict=False)
    if mime:
        for part in re.split(r"[/.+\-]", mime):
            part = part.lower()
            if part.endswith("ml") and len(part) > 6:  # OOXML part names: spreadsheetml, presentationml
                part = part[:-2]
            if part and part not in _MIME_NOISE:
                words.append(part)
    return " ".join(dict.fromkeys(words))


def query_text(query: str) -> str:
    """The query as searched: each file path replaced by `_path_words` of it."""
    return _PATH.sub(lambda m: " " + _path_words(m.group(0)) + " ", query)


IMPLIED_STEPS: tuple[str, ...] = ("write file", "read file", "calculate math expression", "get current date and time")
"""The sub-queries `expansions` can return; their best tools are computed once per catalog change."""


_DEST = re.compile(r"\b(to|into|at|on|as|in)\s+(?:\S+\s+){0,2}$", re.I)
_OWN = re.compile(r"\b(my|our|existing|the following)\b", re.I)


def _is_destination(before: str) -> bool:
    """Whether a path that `before` precedes is where something goes: a destination preposition just
    before it (`report in /x.md`, `save to /x.md`) and no verb of consuming or sign of an existing
    file (`read`, `from`, `my`) in the few words before that."""
    words = before.split()[-8:]
    tail = " ".join(words) + " "
    if not _DEST.search(tail):
        return False
    return not (_READ.search(tail) or _OWN.search(tail))


def expansions(query: str) -> list[str]:
    """Intent sub-queries for steps a task implies but rarely names (generic rules, no tool names).

    - a file path plus a verb of producing (save, write, generate, ...), or a path that is a
      destination (`a report in /root/x.md`, see `_is_destination`) -> `write file`;
    - a file path plus a verb of consuming (read, open, under, analyse, ...) -> `read file`;
    - arithmetic words or an expression (calculate, how much, BMI, 3*4) -> `calculate math expression`;
    - relative time (today, tomorrow, latest, last 24h) -> `get current date and time`.

    Each sub-query's best tool joins the fused ranking with weight `SearchWeights.expansion`.
    """
    out: list[str] = []
    paths = list(_PATH.finditer(query))
    if paths:
        destination = any(_is_destination(query[: m.start()]) for m in paths)
        if _SAVE.search(query) or destination:
            out.append("write file")
        if _READ.search(query):
            out.append("read file")
    if _CALC.search(query):
        out.append("calculate math expression")
    if _TIME.search(query):
        out.append("get current date and time")
    return out


# ---- prerequisites ---------------------------------------------------------------------------

_GENERIC_INPUTS = frozenset({"id", "ids", "uuid", "key", "slug", "handl", "code", "titl"})
"""Stemmed words of parameter names that say *which* thing, not *what*: `package_show(id)` needs an id of
the thing its name says (a package), which a tool about packages that needs no identifier provides."""


def _machine_value(name: str, schema: Mapping[str, Any], analyzer: TextAnalyzer) -> bool:
    """Whether a parameter takes a value a tool would produce rather than a person type: a number
    (coordinates, counts) or an identifier (`id`, `card_id`, `context7CompatibleLibraryID`)."""
    if schema.get("type") in ("number", "integer"):
        return True
    return bool(set(analyzer.identifier_terms(name)) & _GENERIC_INPUTS)


def prerequisites(docs: Sequence[ToolDoc], analyzer: TextAnalyzer) -> np.ndarray:
    """Which tools of one server provide an input another needs: `(consumer, provider)` local index pairs.

    A tool-dependency graph in the spirit of Graph RAG-Tool Fusion (arXiv 2502.07223), built from the
    definitions alone, with no model:
    - a tool whose description names another tool of its server (`"call 'resolve-library-id' first"`)
      needs that tool;
    - for each required parameter of a tool: if its words are specific (`from_latitude` -> `latitude`),
      a provider is a tool of the server that takes no parameter with those words but mentions them
      (`geocode_address`: "returns ... latitude/longitude"); if they only say which thing (`id`,
      `name`, `title`, ...), a provider is a tool that requires no such identifier itself and shares a
      word of the consumer's object (`package_search` for `package_show(id)`).

    Returns:
        int32 array of shape (edges, 2).
    """
    a = analyzer
    info = []
    for d in docs:
        words = a.identifier_terms(d.tool)
        text = set(words) | set(a.terms(d.description)) | set(a.gloss_terms(d.description))
        params = [(set(a.identifier_terms(n)), req, _machine_value(n, sch, a)) for n, sch, req in d.params()]
        obj = set(words) - _GENERIC_INPUTS
        needs_id = any(req and ws and ws <= _GENERIC_INPUTS for ws, req, _m in params)
        info.append((words, text, params, obj, needs_id))
    # Words most of the server's tool names share (`lol`, `playwright`, `get`) say nothing of the object.
    counts: dict[str, int] = {}
    for words, *_rest in info:
        for w in set(words):
            counts[w] = counts.get(w, 0) + 1
    common = {w for w, c in counts.items() if len(docs) >= 4 and c * 4 >= len(docs) * 3}
    edges: set[tuple[int, int]] = set()
    for b, d in enumerate(docs):
        desc = d.description.lower()
        for i, other in enumerate(docs):
            if i != b and len(other.tool) > 3 and other.tool.lower() in desc:
                edges.add((b, i))
        _words, _text, params, obj, _needs_id = info[b]
        for ws, req, machine in params:
            if not req or not ws or not machine:
                continue
            generic = ws <= _GENERIC_INPUTS
            specific = ws - _GENERIC_INPUTS
            for i, (_w, text, iparams, _o, needs_id) in enumerate(info):
                if i == b:
                    continue
                if generic:
                    if not needs_id and (obj - common) & text and not any(ws <= p for p, _r, _m in iparams):
                        edges.add((b, i))
                elif specific <= text and not any(specific & p for p, _r, _m in iparams):
                    edges.add((b, i))
    return np.asarray(sorted(edges), dtype=np.int32).reshape(-1, 2)


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


# ---- index internals ------------------------------------------------------------------------


@dataclass(slots=True)
class _Bag:
    """Term counts of a batch of documents with a local vocabulary: doc `d` has `tf[j]` of `vocab[term[j]]`."""

    vocab: list[str]
    doc: np.ndarray  # int32, local document index per entry
    term: np.ndarray  # int32, index into vocab per entry
    tf: np.ndarray  # float32
    length: np.ndarray  # float32, terms per document

    @classmethod
    def of(cls, docs_terms: Sequence[Sequence[str]]) -> _Bag:
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
class _Shard:
    docs: list[ToolDoc]
    bag: _Bag  # one row per tool
    vectors: np.ndarray | None  # (tools, dim)
    server_bag: _Bag  # one row: the server's document
    server_vector: np.ndarray | None  # (dim,)
    needs: np.ndarray  # (edges, 2) int32 local indices: (tool, a tool that provides one of its inputs)


class _Postings:
    """BM25 (Lucene variant) weights by term: docs `doc[ptr[t]:ptr[t+1]]` have weights `w[...]` for term t.

    idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)); weight = idf * tf / (tf + k1 * (1 - b + b * len / avglen)),
    as in Kamphuis et al. 2020 (the form `bm25s`' "lucene" method computes).
    """

    __slots__ = ("vocab", "ptr", "doc", "w", "n")

    def __init__(self, bags: Sequence[_Bag], k1: float, b: float) -> None:
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


def _top(scores: np.ndarray, depth: int, positive: bool) -> np.ndarray:
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


def _rrf_into(out: np.ndarray, order: np.ndarray, weight: float, k: int = RRF_K) -> None:
    """out[order[r]] += weight / (k + r + 1) for each rank r."""
    if len(order):
        out[order] += weight / (k + 1.0 + np.arange(len(order)))


@dataclass(slots=True)
class _Built:
    """Everything a query reads, assembled from the shards in one go (replaced whole on rebuild)."""

    docs: list[ToolDoc]
    by_name: dict[str, int]
    servers: list[str]
    server_of: np.ndarray  # int32 per tool
    starts: np.ndarray  # first tool index of each server (servers are contiguous)
    tools: _Postings | None
    servers_lex: _Postings | None
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
        self._shards: dict[str, _Shard] = {}
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
        bag = _Bag.of([self._doc_terms(d) for d in docs])
        server_bag = _Bag.of([self._server_terms(server, about, docs)])
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
                self._shards[server] = _Shard(docs, bag, vectors, server_bag, server_vector, needs)
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
        tools = _Postings([shard.bag for _s, shard in shards], w.k1, w.b) if docs else None
        servers_lex = _Postings([shard.server_bag for _s, shard in shards], w.k1, w.b) if docs else None
        vectors = server_vectors = mean = None
        if self.embedder is not None:
            dim = self.embedder.dim
            vecs = [shard.vectors for _s, shard in shards if shard.vectors is not None]
            vectors = np.ascontiguousarray(np.vstack(vecs)) if vecs else np.zeros((0, dim), dtype=np.float32)
            svecs = [s.server_vector for _n, s in shards if s.server_vector is not None]
            server_vectors = np.ascontiguousarray(np.vstack(svecs)) if svecs else np.zeros((0, dim), np.float32)
            if w.center and len(vectors) > 1:
                mean = vectors.mean(axis=0)
                vectors = _normalize(vectors - mean)
                server_vectors = _normalize(server_vectors - mean)
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
        lex_rank = _rank_lookup(lex_order, top)
        dense_rank = _rank_lookup(dense_order, top)
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
                lex_order = _top(lex, w.depth, positive=True)
                self._fuse(fused, lex, lex_order, w.lexical if both else 1.0)
                s_lex = np.zeros(ns, dtype=np.float32)
                built.servers_lex.scores(terms, s_lex)
                s_order = _top(s_lex, w.depth, positive=True)
                self._fuse(server_fused, s_lex, s_order, w.server_lexical)
        if use_dense and self.embedder is not None and built.vectors is not None:
            q = self._query_vector(built, query)
            if q.any():
                dense = self._dense(built.vectors, q)
                dense_order = _top(dense, w.depth, positive=True)
                self._fuse(fused, dense, dense_order, w.dense if both else 1.0, w.dense_floor)
                if built.server_vectors is not None and len(built.server_vectors):
                    s_dense = self._dense(built.server_vectors, q)
                    s_order = _top(s_dense, w.depth, positive=True)
                    self._fuse(server_fused, s_dense, s_order, w.server_dense, w.dense_floor)
        # A server's third ranking: by its best tool.
        best_tool = np.maximum.reduceat(fused, built.starts) if n else np.zeros(0)
        s_order = _top(best_tool, w.depth, positive=True)
        most = (w.lexical + w.dense) if both else 1.0  # the best fused score a tool can have
        self._fuse(server_fused, best_tool, s_order, w.server_tools, w.tools_floor * most)
        server_order = _top(server_fused, ns, positive=True)
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
            _rrf_into(out, order, weight)
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


def _normalize(m: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32, C-contiguous."""
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    out = np.divide(m, norms, out=np.zeros_like(m), where=norms > 0)
    return np.ascontiguousarray(out, dtype=np.float32)


def _rank_lookup(order: np.ndarray, items: np.ndarray) -> list[int]:
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
