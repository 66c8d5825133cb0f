"""The `mcpopt` command line (typer). Each command group lives in its own module of this package."""

from __future__ import annotations

import mcpopt.cli.workflows  # noqa: F401 - registers `mcpopt workflows`
from mcpopt.cli import auth, bench, cache, eval, optimize, serve, telemetry, tools  # noqa: F401 - they register commands
from mcpopt.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
