"""`gateway.workflows` settings (the models live in `mcpopt.config`), and where the journal lives.

The journal of a config lives in its own file (`<data dir>/workflows/<config stem>-<hash>.db`),
so two configs on one machine never resume each other's runs (issue 15 notes the same problem
for telemetry and rules sharing one data dir). The data dir is `gateway.telemetry.data_dir`,
else `$XDG_DATA_HOME/mcpopt` (`mcpopt.config.default_data_dir`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from mcpopt.config import JournalSettings, WorkflowSettings

__all__ = ["JournalSettings", "WorkflowSettings", "journal_path", "workflow_settings"]


def journal_path(config: Any) -> Path:
    """The SQLite journal of `config` (see the module doc)."""
    settings = workflow_settings(config)
    if settings.journal.path:
        return Path(settings.journal.path).expanduser()
    tel = getattr(getattr(config, "gateway", None), "telemetry", None)
    data_dir = getattr(tel, "data_dir", None)
    if data_dir:
        base = Path(data_dir).expanduser()
    else:
        from mcpopt.config import default_data_dir

        base = default_data_dir()
    source = getattr(config, "source", "") or ""
    if source:
        resolved = os.path.realpath(source)
        stem = Path(resolved).stem or "config"
        tag = hashlib.blake2b(resolved.encode(), digest_size=4).hexdigest()
        name = f"{stem}-{tag}.db"
    else:
        name = "default.db"
    return base / "workflows" / name


def workflow_settings(config: Any) -> WorkflowSettings:
    """`config.gateway.workflows`, else the defaults."""
    found = getattr(getattr(config, "gateway", None), "workflows", None)
    return found if isinstance(found, WorkflowSettings) else WorkflowSettings()
