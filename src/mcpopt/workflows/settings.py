"""`gateway.workflows` settings, and where the journal lives.

The journal of a config lives in its own file (`<data dir>/workflows/<config stem>-<hash>.db`),
so two configs on one machine never resume each other's runs (issue 15 notes the same problem
for telemetry and rules sharing one data dir). The data dir is `gateway.telemetry.data_dir`,
else `$XDG_DATA_HOME/mcpopt` (`mcpopt.telemetry.privacy.default_data_dir`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JournalSettings(_Strict):
    """The durable journal of workflow runs (`gateway.workflows.journal`)."""

    backend: Literal["sqlite"] = "sqlite"
    """`sqlite` (embedded, the default). The `Journal` protocol is small so that a Redis backend
    (issue 12, scale-out) can implement it."""
    path: str | None = None
    """The SQLite file (default `<data dir>/workflows/<config stem>-<hash of its path>.db`)."""
    synchronous: Literal["normal", "full"] = "normal"
    """SQLite `synchronous` in WAL mode: `normal` survives any crash of the gateway process
    (SIGKILL included: the OS keeps what was written); `full` also a power loss (one fsync per
    journal write). sqlite.org/pragma.html#pragma_synchronous."""
    keep_days: float = Field(30.0, gt=0)
    """Finished runs older than this are deleted at start."""
    max_result_bytes: int = Field(1 << 20, ge=1024)
    """Larger results of read-only steps are not kept (a resumed run calls the read again);
    results of writes are always kept."""


class WorkflowSettings(_Strict):
    """Workflows (`gateway.workflows`; definitions under the top-level `workflows:` key)."""

    enabled: bool = True
    files: list[str] = Field(default_factory=list)
    """More workflow files or globs (relative to the config's folder): each a workflow, a list, or
    `{workflows: {name: ...}}`."""
    journal: JournalSettings = Field(default_factory=lambda: JournalSettings())
    resume: bool = True
    """At start, take over the runs a dead gateway left unfinished (resume or compensate each,
    per its workflow's `on_restart`)."""
    lease_ms: int = Field(15_000, ge=1_000)
    """A running run's owner renews its lease every `lease_ms / 5`; another gateway takes over a
    run whose lease expired (or at once, when the owner was a dead process on this host)."""
    max_items: int = Field(1_000, ge=1)
    """Items one `for_each` may expand to (ToolHive's limit is 1,000 as well)."""
    agent_workflows: bool = True
    """Serve `mcpopt__workflow` (agents create, edit, run and cancel workflows)."""
    fanout_tool: bool = True
    """Serve `mcpopt__fanout` (one call to several servers or every replica of one)."""


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
        from mcpopt.telemetry.privacy import default_data_dir

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
