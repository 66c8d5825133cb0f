"""The aggregated catalog: every upstream's tools, prompts and resources under gateway names.

Naming (deterministic):
- tools and prompts are served as `{prefix}{separator}{name}`; the prefix is the server name
  unless the server sets `prefix` (`""` serves names as they are) or `gateway.prefix_tools`
  is false;
- resources and templates are served under a per-server URI prefix `{scheme-safe server}+{uri}`
  (e.g. `everything+demo://resource/static/document/x.md`); a server with `prefix: ""` keeps
  its URIs as they are;
- collisions: servers are taken in config order and the first keeps the name; the later one's
  item is left out with a warning (it stays callable under no other name, so rename or prefix it).

`Catalog.rebuild` is cheap (a few dict inserts per item) and runs only when an upstream's
lists change, never per call.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import mcp_types as types

from mcpopt.config import Config
from mcpopt.policy import ToolInfo, tool_info
from mcpopt.upstream.pool import ServerPool

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Route:
    """Where a gateway name goes: the upstream and the name (or URI) it has there."""

    server: str
    name: str


@dataclass
class GatewayCatalog:
    """Snapshot of the aggregated catalog (immutable once built; swapped whole on change)."""

    tools: list[types.Tool] = field(default_factory=list)
    prompts: list[types.Prompt] = field(default_factory=list)
    resources: list[types.Resource] = field(default_factory=list)
    templates: list[types.ResourceTemplate] = field(default_factory=list)
    tool_routes: dict[str, Route] = field(default_factory=dict)
    prompt_routes: dict[str, Route] = field(default_factory=dict)
    tool_defs: dict[str, types.Tool] = field(default_factory=dict)
    """Gateway tool name -> the upstream's own definition (annotations, schemas)."""
    tool_infos: dict[str, ToolInfo] = field(default_factory=dict)
    """Gateway tool name -> read-only / idempotent / TTL facts for the pipeline."""
    collisions: list[str] = field(default_factory=list)


def uri_prefix(server: str) -> str:
    """The URI scheme prefix of a server's resources: `name+` made scheme-safe (RFC 3986 3.1)."""
    safe = re.sub(r"[^A-Za-z0-9+.\-]", "-", server)
    if not safe[:1].isalpha():
        safe = "s" + safe
    return safe + "+"


class Namer:
    """Maps upstream names and URIs to gateway ones and back, per the config's rules."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.separator = config.gateway.separator
        self._uri_prefixes: dict[str, str] = {}
        for server in config.mcpServers:
            explicit = config.mcpServers[server].prefix
            self._uri_prefixes[server] = "" if explicit == "" else uri_prefix(server)

    def name(self, server: str, name: str) -> str:
        prefix = self.config.tool_prefix(server)
        return f"{prefix}{self.separator}{name}" if prefix else name

    def uri(self, server: str, uri: str) -> str:
        return self._uri_prefixes.get(server, "") + uri

    def resolve_uri(self, uri: str) -> Route | None:
        """The server and upstream URI for a gateway URI (prefixed servers first)."""
        for server, prefix in self._uri_prefixes.items():
            if prefix and uri.startswith(prefix):
                return Route(server, uri[len(prefix) :])
        return None

    def unprefixed_servers(self) -> list[str]:
        return [s for s, p in self._uri_prefixes.items() if not p]


def build_catalog(namer: Namer, upstreams: dict[str, ServerPool]) -> GatewayCatalog:
    """Aggregate the ready upstreams' lists (config order) into one catalog."""
    cat = GatewayCatalog()
    seen_uris: set[str] = set()
    for server, up in upstreams.items():
        if up.state not in ("ready", "idle"):  # an idle pool keeps serving its last lists
            continue
        for tool in up.catalog.tools:
            gname = namer.name(server, tool.name)
            if gname in cat.tool_routes:
                _collide(cat, "tool", gname, cat.tool_routes[gname].server, server)
                continue
            cat.tool_routes[gname] = Route(server, tool.name)
            cat.tool_defs[gname] = tool
            cat.tool_infos[gname] = tool_info(up.cfg, tool)
            cat.tools.append(tool if gname == tool.name else tool.model_copy(update={"name": gname}))
        for prompt in up.catalog.prompts:
            gname = namer.name(server, prompt.name)
            if gname in cat.prompt_routes:
                _collide(cat, "prompt", gname, cat.prompt_routes[gname].server, server)
                continue
            cat.prompt_routes[gname] = Route(server, prompt.name)
            cat.prompts.append(prompt if gname == prompt.name else prompt.model_copy(update={"name": gname}))
        for res in up.catalog.resources:
            guri = namer.uri(server, str(res.uri))
            if guri in seen_uris:
                _collide(cat, "resource", guri, "an earlier server", server)
                continue
            seen_uris.add(guri)
            cat.resources.append(res if guri == str(res.uri) else res.model_copy(update={"uri": guri}))
        for tpl in up.catalog.templates:
            gtpl = namer.uri(server, tpl.uri_template)
            cat.templates.append(tpl if gtpl == tpl.uri_template else tpl.model_copy(update={"uri_template": gtpl}))
    return cat


def _collide(cat: GatewayCatalog, kind: str, name: str, first: str, later: str) -> None:
    msg = f"{kind} name collision: '{name}' is served by '{first}'; the one from '{later}' is left out"
    cat.collisions.append(msg)
    logger.warning("%s (set a distinct `prefix` on one of the servers)", msg)
