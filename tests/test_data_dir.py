"""Per-config data dirs (issue 15): telemetry, rules, journal and skills of one config are not another's
unless both name one folder (`gateway.data_dir`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mcp import Client
from typer.testing import CliRunner

from conftest import time_entry, write_config
from mcpopt.config import config_data_dir, config_id, load_config
from mcpopt.errors import ConfigError
from mcpopt.gateway.assembly import build_gateway
from mcpopt.pipeline.rules import default_rules_path
from mcpopt.workflows.settings import journal_path

pytestmark = pytest.mark.anyio


@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "xdg"
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    return data / "mcpopt"


def test_each_config_file_has_its_own_stable_dir(tmp_path: Path, xdg: Path) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = write_config(tmp_path / "a" / "mcpopt.yaml", {"t": time_entry()})
    b = write_config(tmp_path / "b" / "mcpopt.yaml", {"t": time_entry()})
    ca, cb = load_config(a), load_config(b)
    assert config_id(ca) == config_id(load_config(a))  # stable across loads
    assert config_id(ca) != config_id(cb) and config_id(ca).startswith("mcpopt-")
    assert config_data_dir(ca) == xdg / config_id(ca) and config_data_dir(cb) == xdg / config_id(cb)
    # Every part that keeps state asks the same function.
    assert default_rules_path(ca) == config_data_dir(ca) / "rules.json"
    assert journal_path(ca) == config_data_dir(ca) / "workflows" / f"{config_id(ca)}.db"
    gw = build_gateway(ca)
    assert gw.telemetry.sqlite_path == config_data_dir(ca) / "telemetry.db"
    assert gw.telemetry.data_dir == config_data_dir(ca)
    # Built in code (no file): the id is gateway.name.
    assert config_data_dir(load_config(data={"gateway": {"name": "work"}})) == xdg / "work"


def test_explicit_share_and_conflicting_keys(tmp_path: Path, xdg: Path) -> None:
    shared = tmp_path / "shared"
    a = load_config(write_config(tmp_path / "a.yaml", {}, {"data_dir": str(shared)}))
    b = load_config(write_config(tmp_path / "b.yaml", {}, {"data_dir": str(shared)}))
    assert config_data_dir(a) == config_data_dir(b) == shared
    assert default_rules_path(a) == default_rules_path(b) == shared / "rules.json"
    # Shared on purpose, the journals still stay apart: no config resumes another's runs.
    assert journal_path(a) != journal_path(b) and journal_path(a).parent == shared / "workflows"
    # The older key means the same.
    old = load_config(write_config(tmp_path / "c.yaml", {}, {"telemetry": {"data_dir": str(shared)}}))
    assert config_data_dir(old) == shared
    with pytest.raises(ConfigError, match="gateway.data_dir"):
        load_config(
            write_config(
                tmp_path / "d.yaml", {}, {"data_dir": str(shared), "telemetry": {"data_dir": str(tmp_path / "x")}}
            )
        )


async def _record_one_call(config: Path, server: str) -> None:
    gw = build_gateway(load_config(config))
    async with gw.running():
        async with Client(gw.server, mode="legacy") as client:
            result = await client.call_tool(f"{server}__get_current_time", {"timezone": "UTC"})
            assert not result.is_error
    # `running()` exit stops telemetry, which flushes the SQLite sink.


def _stats_servers(config: Path) -> set[str]:
    from mcpopt.cli import app

    res = CliRunner().invoke(app, ["stats", "-c", str(config), "--since", "1h", "--json"])
    assert res.exit_code == 0, res.output
    return {t["server"] for t in json.loads(res.output)["tools"]}


async def test_two_configs_do_not_see_each_others_telemetry(tmp_path: Path, xdg: Path) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = write_config(tmp_path / "a" / "mcpopt.yaml", {"alpha": time_entry()})
    b = write_config(tmp_path / "b" / "mcpopt.yaml", {"beta": time_entry()})
    await _record_one_call(a, "alpha")
    await _record_one_call(b, "beta")
    assert _stats_servers(a) == {"alpha"}
    assert _stats_servers(b) == {"beta"}


async def test_configs_sharing_a_data_dir_see_each_others_telemetry(tmp_path: Path, xdg: Path) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    shared = {"data_dir": str(tmp_path / "shared")}
    a = write_config(tmp_path / "a" / "mcpopt.yaml", {"alpha": time_entry()}, shared)
    b = write_config(tmp_path / "b" / "mcpopt.yaml", {"beta": time_entry()}, shared)
    await _record_one_call(a, "alpha")
    await _record_one_call(b, "beta")
    assert _stats_servers(a) == _stats_servers(b) == {"alpha", "beta"}
    assert _files(tmp_path / "shared") >= {"telemetry.db", "salt"}
    assert _files(xdg) == set()  # nothing went to the default place


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def test_stats_without_a_store_points_at_the_old_shared_one(tmp_path: Path, xdg: Path) -> None:
    from mcpopt.cli import app

    (tmp_path / "a").mkdir()
    a = write_config(tmp_path / "a" / "mcpopt.yaml", {"alpha": time_entry()})
    res = CliRunner().invoke(app, ["stats", "-c", str(a)])
    assert res.exit_code == 1 and "before data dirs were per config" not in res.output
    xdg.mkdir(parents=True)
    (xdg / "telemetry.db").write_bytes(b"")  # what every config shared before issue 15
    res = CliRunner().invoke(app, ["stats", "-c", str(a)])
    assert res.exit_code == 1 and f"--db {xdg / 'telemetry.db'}" in res.output.replace("\n", "")
