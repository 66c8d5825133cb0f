"""Wiring the workflows plugin into a gateway.

`workflows_running(gateway)` starts a `WorkflowService` over a running gateway and stops it on
exit. A gateway that offers `GatewayAPI` (`add_tool`, `own_tools`) is used as it is; today's
`Gateway` (tools registered in `gateway.own.tools` / `gateway.own.handlers`) is wrapped by
`GatewayAdapter`, which goes once the gateway is assembled in `gateway/assembly.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import mcp_types as types

from mcpopt.gateway.api import ToolHandler
from mcpopt.gateway.link import ClientLink
from mcpopt.workflows.service import WorkflowService


class GatewayAdapter:
    """`GatewayAPI` over a `Gateway` that registers its own tools in `gateway.own` (see the module doc)."""

    def __init__(self, gateway: Any) -> None:
        self._gateway = gateway

    @property
    def config(self) -> Any:
        return self._gateway.config

    @property
    def catalog(self) -> Any:
        return self._gateway.catalog

    @property
    def upstreams(self) -> Mapping[str, Any]:
        upstreams: Mapping[str, Any] = self._gateway.upstreams
        return upstreams

    @property
    def cache(self) -> Any:
        return self._gateway.cache

    @property
    def results(self) -> Any:
        return self._gateway.results

    async def call_tool(self, params: Mapping[str, Any] | None, link: ClientLink) -> dict[str, Any]:
        result: dict[str, Any] = await self._gateway.call_tool(params, link)
        return result

    def own_tools(self) -> list[types.Tool]:
        return list(self._gateway.own.tools)

    def tool_names(self) -> list[str]:
        """Every gateway tool callable by name (listed or not)."""
        return list(self._gateway.own.handlers)

    def add_tool(self, tool: types.Tool, handler: ToolHandler, *, listed: bool = True) -> None:
        own = self._gateway.own
        own.tools[:] = [t for t in own.tools if t.name != tool.name]
        if listed:
            own.tools.append(tool)
        own.handlers[tool.name] = handler

    def remove_tool(self, name: str) -> None:
        own = self._gateway.own
        own.tools[:] = [t for t in own.tools if t.name != name]
        own.handlers.pop(name, None)

    def status(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._gateway.status()
        return rows


def as_api(gateway: Any) -> Any:
    """`gateway` itself when it offers `add_tool`, else a `GatewayAdapter` around it."""
    return gateway if hasattr(gateway, "add_tool") else GatewayAdapter(gateway)


@contextlib.asynccontextmanager
async def workflows_running(gateway: Any, **kwargs: Any) -> AsyncIterator[WorkflowService | None]:
    """Serve workflows on a running gateway for the block (nothing when `gateway.workflows.enabled` is false)."""
    if not gateway.config.gateway.workflows.enabled:
        yield None
        return
    service = WorkflowService(as_api(gateway), **kwargs)
    await service.start()
    try:
        yield service
    finally:
        await service.aclose()
