"""mcpopt: an optimizing gateway for the Model Context Protocol.

One MCP endpoint in front of many MCP servers. Public API:

- `load_config(path)` -> `Config`: the standard `mcpServers` block plus mcpopt's keys.
- `Gateway(config)`: the aggregating server; `async with gateway.running(): ...`.
- `Pipeline`, `ToolCall`, `Filter`: the request path's filter chain.
"""

from mcpopt.config import Config, ServerConfig, load_config
from mcpopt.errors import ConfigError, GatewayError, McpoptError
from mcpopt.gateway.server import Gateway
from mcpopt.pipeline import Filter, Pipeline, ToolCall

__all__ = [
    "Config",
    "ConfigError",
    "Filter",
    "Gateway",
    "GatewayError",
    "McpoptError",
    "Pipeline",
    "ServerConfig",
    "ToolCall",
    "load_config",
]
__version__ = "0.1.0"
