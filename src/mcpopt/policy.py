"""Per-tool facts the request path needs, computed once per catalog change (never per call).

`ToolInfo` says whether a tool is read-only (MCP `ToolAnnotations.readOnlyHint`, or declared in
config), whether repeating it is safe (read-only, `idempotentHint` with `destructiveHint` false,
or declared idempotent), its cache TTL, and which cached reads a call to it invalidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import mcp_types as types

from mcpopt.config import ServerConfig


@dataclass(frozen=True, slots=True)
class ToolInfo:
    """What the pipeline knows about one upstream tool.

    Attributes:
        read_only: the tool does not modify its environment (cacheable if `ttl_ms` > 0).
        idempotent: calling it again with the same arguments has no additional effect
            (retryable). Read-only tools are idempotent.
        ttl_ms: cache TTL in ms; 0 = never cached.
        invalidates: tool-name globs of the same server whose cached results a call to this
            tool drops; None = all of the server's cached reads (the default for any tool
            that is not read-only).
    """

    read_only: bool = False
    idempotent: bool = False
    ttl_ms: int = 0
    invalidates: tuple[str, ...] | None = None


UNKNOWN = ToolInfo()
"""For a tool the gateway cannot describe: not read-only, not idempotent, never cached."""


def _matches(name: str, globs: list[str] | tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, g) for g in globs)


def tool_info(cfg: ServerConfig, tool: types.Tool) -> ToolInfo:
    """Derive a tool's `ToolInfo` from its annotations and the server's config.

    Config wins over annotations in one direction only: it can declare a tool read-only or
    idempotent, never the reverse (an annotation is a hint from the server, the config is the
    operator's statement). Sources: MCP spec 2025-11-25 server/tools#tool-annotations.
    """
    ann = tool.annotations
    name = tool.name
    per_tool = cfg.cache.tools.get(name)
    read_only = bool(ann and ann.read_only_hint) or _matches(name, cfg.read_only_tools)
    if per_tool is not None and per_tool.read_only is not None:
        read_only = per_tool.read_only or read_only
    idempotent = (
        read_only
        or bool(ann and ann.idempotent_hint and ann.destructive_hint is False)
        or _matches(name, cfg.idempotent_tools)
    )
    ttl = per_tool.ttl_ms if per_tool is not None and per_tool.ttl_ms is not None else cfg.cache.ttl_ms
    invalidates: tuple[str, ...] | None = None
    for pattern, targets in cfg.cache.invalidates.items():
        if fnmatchcase(name, pattern):
            invalidates = tuple(targets)
            break
    return ToolInfo(read_only=read_only, idempotent=idempotent, ttl_ms=ttl if read_only else 0, invalidates=invalidates)
