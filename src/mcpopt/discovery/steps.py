"""Rules read off the query and the tool definitions alone, no model: the steps a task implies but
rarely names (`expansions`, `query_text`) and which tool of a server provides an input another needs
(`prerequisites`). See `mcpopt.discovery.index` for how the index uses them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mcpopt.discovery.analysis import TextAnalyzer, split_identifier
from mcpopt.discovery.docs import ToolDoc

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
