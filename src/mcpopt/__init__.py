"""mcpopt: an optimizing gateway for the Model Context Protocol.

One MCP endpoint in front of many MCP servers. Public API:

- `load_config(path)` -> `Config`: the standard `mcpServers` block plus mcpopt's keys.
- `build_gateway(config)` -> `Gateway`: the aggregating server, assembled from its parts;
  `async with gateway.running(): ...`, then serve `gateway.server` (`mcpopt.gateway.front`).
- `Pipeline`, `ToolCall`, `Filter`: the request path's filter chain.
- `GatewayAPI`, `ClientLink`: what plugins get of the gateway, and how it reaches a client.

Names are imported on first use, so `import mcpopt.config` (or any light module) does not load
the whole gateway.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mcpopt.api import ClientLink, GatewayAPI
    from mcpopt.config import Config, ServerConfig, load_config
    from mcpopt.errors import ConfigError, GatewayError, McpoptError
    from mcpopt.gateway.assembly import build_gateway
    from mcpopt.gateway.server import Gateway
    from mcpopt.pipeline import Filter, Pipeline, ToolCall

_WHERE = {
    "ClientLink": "mcpopt.api",
    "Config": "mcpopt.config",
    "ConfigError": "mcpopt.errors",
    "Filter": "mcpopt.pipeline",
    "Gateway": "mcpopt.gateway.server",
    "GatewayAPI": "mcpopt.api",
    "GatewayError": "mcpopt.errors",
    "McpoptError": "mcpopt.errors",
    "Pipeline": "mcpopt.pipeline",
    "ServerConfig": "mcpopt.config",
    "ToolCall": "mcpopt.pipeline",
    "build_gateway": "mcpopt.gateway.assembly",
    "load_config": "mcpopt.config",
}
__all__ = [
    "ClientLink",
    "Config",
    "ConfigError",
    "Filter",
    "Gateway",
    "GatewayAPI",
    "GatewayError",
    "McpoptError",
    "Pipeline",
    "ServerConfig",
    "ToolCall",
    "build_gateway",
    "load_config",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'mcpopt' has no attribute {name!r}")
