"""An optimizing gateway session in one process: sandbox, gateway, rules, telemetry, runner, loop.

`OptimizeSession` is what `mcpopt quick`, `analyze`, `optimize` and `scenarios run` use, and what
the proof drives. Its pipeline is the gateway's own with two additions:

    telemetry -> [shaping] -> rules -> cache -> coalesce -> ... -> telemetry timer

(`install_rules` puts the `RulesFilter` right before the cache filter, as the lead wires it in
`Gateway` itself.)
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from mcpopt.config import Config
from mcpopt.optimize.analyzer import Analyzer, AnalyzerSettings, facts_from_gateway
from mcpopt.optimize.loop import OptimizationLoop
from mcpopt.optimize.runner import Progress, Runner
from mcpopt.optimize.sandbox import Sandbox, sandbox_config, server_vars
from mcpopt.optimize.scenarios import Scenario
from mcpopt.optimize.settings import OptimizationSettings, default_rules_path, optimization_settings
from mcpopt.pipeline.rules import RulesFilter, RuleStore


def install_rules(gateway: Any, rules_filter: RulesFilter) -> None:
    """Put `rules_filter` right before the gateway's cache filter (after telemetry and shaping)."""
    from mcpopt.pipeline.cache import CacheFilter

    filters = [f for f in gateway.pipeline.filters if not isinstance(f, RulesFilter)]
    at = next((i for i, f in enumerate(filters) if isinstance(f, CacheFilter)), len(filters))
    filters.insert(at, rules_filter)
    gateway.pipeline.set_filters(filters)


class OptimizeSession:
    """Everything the optimizer needs, started and stopped together (`async with session.open()`).

    Args:
        config: the loaded config.
        settings: optimization settings (default: the config's).
        rules_path: the rule file (default `default_rules_path(config)`).
        sandbox: replay against scratch copies of the servers' state (default: settings.sandbox).
        telemetry_path: record every call of this session in this SQLite store at the `detailed`
            level (None: nothing is recorded; the config's own store is read for analysis).
    """

    def __init__(
        self,
        config: Config,
        *,
        settings: OptimizationSettings | None = None,
        rules_path: str | Path | None = None,
        sandbox: bool | None = None,
        telemetry_path: str | Path | None = None,
    ) -> None:
        self.config = config
        self.settings = settings or optimization_settings(config)
        self.store = RuleStore(rules_path or default_rules_path(config))
        # Replays measure a rule's whole effect: no canary split in the session's own filter.
        self.rules_filter = RulesFilter(self.store, canary=False)
        self.use_sandbox = self.settings.sandbox if sandbox is None else sandbox
        self.telemetry_path = Path(telemetry_path) if telemetry_path else None
        self.sandbox: Sandbox | None = None
        self.gateway: Any = None
        self.telemetry: Any = None
        self.runner: Runner | None = None
        self.workflows: Any = None
        """The workflows plugin of the session's gateway (`WorkflowService`), once open."""
        self.started = time.time()

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[OptimizeSession]:
        from mcpopt.gateway.assembly import build_gateway

        cfg = self.config
        if self.use_sandbox:
            self.sandbox = sandbox_config(cfg)
            cfg = self.sandbox.config
        cfg = cfg.model_copy(deep=True)
        self._own_telemetry(cfg)
        scratch = Path(tempfile.mkdtemp(prefix="mcpopt-replay-"))
        # Replays keep workflow runs in a journal of their own, and never take over real runs.
        cfg.gateway.workflows.journal.path = str(scratch / "workflows.db")
        cfg.gateway.workflows.resume = False
        cfg.gateway.workflows.optimizer_workflows = False  # the runner serves what it measures
        try:
            self.gateway = build_gateway(cfg)
            self.telemetry = self.gateway.telemetry if self.telemetry_path is not None else None
            install_rules(self.gateway, self.rules_filter)
            async with self.gateway.running():
                self.workflows = self.gateway.workflows
                self.runner = Runner(
                    self.gateway,
                    server_vars=server_vars(cfg),
                    rules=lambda: self.rules_filter.ruleset,
                    honor_batch_hints=self.settings.honor_batch_hints,
                )
                yield self
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if self.sandbox is not None:
                self.sandbox.cleanup()

    def _own_telemetry(self, cfg: Config) -> None:
        """Replays never go to the user's telemetry: off, or (with `telemetry_path`) a store of their own."""
        tel = cfg.gateway.telemetry
        if self.telemetry_path is None:
            tel.enabled = False
            return
        tel.enabled = True
        tel.level = "detailed"
        tel.sqlite_path = str(self.telemetry_path)
        tel.data_dir = str(self.telemetry_path.parent)
        tel.jsonl_path = tel.otlp_endpoint = tel.webhook_url = tel.postgres_url = None
        tel.prometheus = False
        tel.alert_min_calls = 1 << 30  # replays are not production traffic: no SLO alerts

    def telemetry_store(self) -> Path | None:
        """The SQLite store to analyze: this session's own, else the config's (None when disabled)."""
        if self.telemetry_path is not None:
            return self.telemetry_path
        tel = self.config.gateway.telemetry
        if not tel.enabled or tel.sqlite_path == "":
            return None
        from mcpopt.config import config_data_dir
        from mcpopt.telemetry.store import store_path

        return store_path(tel, config_data_dir(self.config))

    async def rows(self, since: float | None = None) -> list[dict[str, Any]]:
        """Telemetry rows since `since` (default: this session's start) from `telemetry_store()`."""
        from mcpopt.telemetry.postgres import open_reader

        if self.telemetry is not None:
            await self.telemetry.flush()
        shared = None if self.telemetry_path is not None else self.config.gateway.telemetry.postgres_url
        path: Any = shared or self.telemetry_store()  # PostgreSQL: every replica's records
        if path is None or (not shared and not path.exists()):
            return []
        store = open_reader(path)
        try:
            return list(store.calls(since=since if since is not None else self.started))
        finally:
            store.close()

    def loop(
        self, scenarios: Sequence[Scenario], *, since: float | None = None, progress: Progress | None = None
    ) -> OptimizationLoop:
        """The autonomous loop over this session's gateway, analyzing telemetry since `since`."""
        assert self.runner is not None, "open() the session first"

        async def rows() -> list[dict[str, Any]]:
            return await self.rows(since)

        async def live(since_ts: float) -> list[dict[str, Any]]:
            return await self.rows(since_ts)

        return OptimizationLoop(
            self.gateway,
            self.rules_filter,
            self.store,
            scenarios,
            self.settings,
            runner=self.runner,
            rows=rows,
            analyzer=Analyzer(facts_from_gateway(self.gateway), AnalyzerSettings(workflows=self.settings.workflows)),
            progress=progress,
            live_rows=live,
        )
