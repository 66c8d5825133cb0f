"""The `mcpopt` command line (typer). Each command group lives in its own module of this package."""

from __future__ import annotations

import mcpopt.cli.clients  # noqa: F401 - import, install, uninstall
import mcpopt.cli.workflows  # noqa: F401 - registers `mcpopt workflows`
from mcpopt.cli import (  # noqa: F401 - they register commands
    auth,
    bench,
    cache,
    capabilities,
    eval,
    optimize,
    serve,
    skills,
    status,
    telemetry,
    tools,
)
from mcpopt.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
