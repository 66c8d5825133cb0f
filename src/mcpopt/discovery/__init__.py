"""Tool discovery: a hybrid search index over the catalog and the search/code exposure modes.

- `ToolIndex`: BM25 (bm25s) + static embeddings fused by reciprocal rank fusion; updated per server.
- `SearchTools`: `search_tools`, `get_tool_schema`, `call_tool` for a `Gateway`, kept in sync with its catalog.
- `eval` (search quality and latency) and `tokens` (what each exposure mode costs in context).
"""

from mcpopt.discovery.embed import StaticEmbedder, default_embedder
from mcpopt.discovery.index import SearchHit, SearchWeights, ToolDoc, ToolIndex, compact_line, rrf
from mcpopt.discovery.modes import EXPOSURES, Exposure, SearchTools, discovery_tools, pinned

__all__ = [
    "EXPOSURES",
    "Exposure",
    "SearchHit",
    "SearchTools",
    "SearchWeights",
    "StaticEmbedder",
    "ToolDoc",
    "ToolIndex",
    "compact_line",
    "default_embedder",
    "discovery_tools",
    "pinned",
    "rrf",
]
