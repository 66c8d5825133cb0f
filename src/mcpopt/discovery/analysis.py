"""Text analysis for tool search: identifiers split on `_ - . /` and camelCase, English terms
lower-cased, stop words dropped and Snowball-stemmed, Chinese text glossed in English (CC-CEDICT) and
indexed as character bigrams (`TextAnalyzer`).
"""

from __future__ import annotations

import re
from typing import Any

from mcpopt.discovery.lexicon import english_glosses

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
