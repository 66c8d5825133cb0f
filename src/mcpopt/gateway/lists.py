"""Prepared list responses: each list is built once and kept serialized until it may have changed.

`tools/list` (per exposure mode), `prompts/list`, `resources/list` and `resources/templates/list`
change only when the catalog does (an upstream's `list_changed`, a server going down or coming
back after a restart), when the gateway's own tools change, or when the policy is replaced. Yet
building one through the SDK -- pydantic models per tool, the per-era sieve, the dump, the JSON
encoding -- cost 8 ms for 347 tools on every request (issue 17). `PreparedLists` keeps the SDK's
own wire result (the dict its `ServerRunner` produced, cache hints, sieve and `serverInfo` stamp
included) and its orjson encoding, keyed by everything the result depends on:

    (method, protocol version, exposure mode, policy grant, cursor)

The policy grant is the identity of the rules a principal matched (plus its scopes when
`policy.tool_scopes` is set), so principals that match the same rules share one prepared list
and principals that do not never see each other's. Entries are stored only when nothing changed
while they were built (a generation counter), and `drop` (on any change) clears them all.

The fronts' fast paths answer a handshake-era list request with `response(id, entry)`: the
request id spliced into the prepared bytes, nothing re-serialized.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import orjson
from cachetools import LRUCache

LIST_METHODS = frozenset({"tools/list", "prompts/list", "resources/list", "resources/templates/list"})
"""The list methods served from prepared responses."""
MAX_ENTRIES = 512
"""Prepared lists kept (least recently used dropped first): methods x versions x modes x grants x pages."""

ListKey = tuple[str, str, str, Hashable, str | None]
"""(method, protocol version, exposure mode or "", policy grant key, cursor)."""


@dataclass(slots=True, frozen=True)
class Prepared:
    """One prepared list: the wire result (a dict the SDK produced; never mutated) and its JSON bytes."""

    wire: dict[str, Any]
    body: bytes


class PreparedLists:
    """The prepared list results of one gateway (see the module docstring).

    Attributes:
        generation: bumped by every `drop`; an entry built across a drop is not stored.
        hits, builds, drops: counters (status and tests).
    """

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.generation = 0
        self._entries: LRUCache[ListKey, Prepared] = LRUCache(maxsize=max_entries)
        self.hits = 0
        self.builds = 0
        self.drops = 0

    def __len__(self) -> int:
        return len(self._entries)

    def drop(self) -> None:
        """Forget every prepared list (the catalog, own tools or policy changed)."""
        self.generation += 1
        self.drops += 1
        self._entries.clear()

    def get(self, key: ListKey) -> Prepared | None:
        found = self._entries.get(key)
        if found is not None:
            self.hits += 1
        return found

    def put(self, key: ListKey, generation: int, wire: dict[str, Any]) -> Prepared | None:
        """Keep `wire` for `key` if nothing was dropped since `generation` was read (else None)."""
        if generation != self.generation:
            return None
        entry = Prepared(wire, orjson.dumps(wire))
        self._entries[key] = entry
        self.builds += 1
        return entry


def response(rid: Any, entry: Prepared) -> bytes:
    """The JSON-RPC response to request `rid` (an int or str) carrying `entry`, as bytes."""
    return b'{"jsonrpc":"2.0","id":' + orjson.dumps(rid) + b',"result":' + entry.body + b"}"


def request_cursor(params: Any) -> tuple[bool, str | None]:
    """`(ok, cursor)` of a handshake-era list request's params; not ok for anything the SDK must
    judge (params not an object, a non-string cursor, a 2026-07-28 envelope in `_meta`)."""
    if params is None:
        return True, None
    if not isinstance(params, dict):
        return False, None
    meta = params.get("_meta")
    if meta is not None and (not isinstance(meta, dict) or "io.modelcontextprotocol/protocolVersion" in meta):
        return False, None
    cursor = params.get("cursor")
    if cursor is not None and not isinstance(cursor, str):
        return False, None
    return True, cursor
