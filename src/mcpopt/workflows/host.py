"""`WorkflowHost`: what `mcpopt__workflow` (`agent`) needs of the service that runs workflows.

A protocol, so that `agent` does not import `service` (which creates it): no import cycle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

from mcpopt.api import ClientLink
from mcpopt.workflow_model import Workflow
from mcpopt.workflows.engine import WorkflowRun
from mcpopt.workflows.journal import Journal


class WorkflowHost(Protocol):
    definitions: dict[str, Workflow]
    """The workflows served now, by name."""
    journal: Journal | None
    own_prefix: str
    """`{gateway.name}{separator}`: the prefix of the gateway's own tools."""

    def require_journal(self) -> Journal:
        """The journal (raises an MCP error when the service is not started)."""
        ...

    def register(self, wf: Workflow) -> None: ...

    def unregister(self, name: str) -> None: ...

    async def start_run(
        self, wf: Workflow, arguments: Mapping[str, Any] | None, link: ClientLink
    ) -> tuple[WorkflowRun, asyncio.Task[dict[str, Any]]]: ...

    async def run(self, wf: Workflow, arguments: Mapping[str, Any] | None, link: ClientLink) -> dict[str, Any]: ...

    async def status(self, run_id: str, partition: str | None = None) -> dict[str, Any]: ...

    async def cancel(self, run_id: str, partition: str | None = None) -> dict[str, Any]: ...
