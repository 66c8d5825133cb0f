"""`gateway.workflows` settings (the models live in `mcpopt.config`), and where the journal lives.

The journal of a config lives in its own file (`<data dir>/workflows/<config id>.db`, the id is
`<config stem>-<hash>`), so two configs never resume each other's runs, even when they share one
data dir on purpose (`gateway.data_dir`). The data dir is `mcpopt.config.config_data_dir`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mcpopt.config import Config, JournalSettings, WorkflowSettings, config_data_dir, config_id

__all__ = ["JournalSettings", "WorkflowSettings", "journal_path", "workflow_settings"]


def journal_path(config: Any) -> Path:
    """The SQLite journal of `config` (see the module doc)."""
    settings = workflow_settings(config)
    if settings.journal.path:
        return Path(settings.journal.path).expanduser()
    cfg = config if isinstance(config, Config) else None
    return config_data_dir(cfg) / "workflows" / f"{config_id(cfg)}.db"


def workflow_settings(config: Any) -> WorkflowSettings:
    """`config.gateway.workflows`, else the defaults."""
    found = getattr(getattr(config, "gateway", None), "workflows", None)
    return found if isinstance(found, WorkflowSettings) else WorkflowSettings()
