"""Tool discovery: a server-aware hybrid search index over the catalog and the search/code exposure modes.

- `ToolIndex`: BM25 + static embeddings over tools and servers, fused by rank; updated per server.
- `SearchTools`: `search_tools`, `get_tool_schema`, `call_tool` for a `Gateway`, kept in sync with its catalog.
- `eval` (search quality and latency) and `tokens` (what each exposure mode costs in context).

The names below are resolved on first access (PEP 562): importing `mcpopt.discovery.modes`, as the
gateway does, must not load numpy, the embedding model or the dictionary (issue 17: idle RSS).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mcpopt.discovery.embed import StaticEmbedder, default_embedder
    from mcpopt.discovery.index import SearchHit, SearchWeights, ServerHit, ToolDoc, ToolIndex, compact_line, rrf
    from mcpopt.discovery.modes import EXPOSURES, Exposure, SearchTools, discovery_tools, pinned

_WHERE = {
    "StaticEmbedder": "embed",
    "default_embedder": "embed",
    "SearchHit": "index",
    "SearchWeights": "index",
    "ServerHit": "index",
    "ToolDoc": "index",
    "ToolIndex": "index",
    "compact_line": "index",
    "rrf": "index",
    "EXPOSURES": "modes",
    "Exposure": "modes",
    "SearchTools": "modes",
    "discovery_tools": "modes",
    "pinned": "modes",
}

__all__ = [
    "EXPOSURES",
    "Exposure",
    "SearchHit",
    "SearchTools",
    "SearchWeights",
    "ServerHit",
    "StaticEmbedder",
    "ToolDoc",
    "ToolIndex",
    "compact_line",
    "default_embedder",
    "discovery_tools",
    "pinned",
    "rrf",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'mcpopt.discovery' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mcpopt.discovery.{module}"), name)
