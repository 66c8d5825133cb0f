"""Era bridging, complete: every server-to-client interaction in all four combinations of client era
x upstream era, over the stdio front and over the Streamable HTTP front.

Clients: the Python SDK's `Client` in `legacy` mode (the handshake, 2025-11-25) and in `auto` mode
(2026-07-28, the default of the Python SDK 2.3 and FastMCP 4.1). Upstreams: the interop fixture
(`tests/fixtures/interop_server.py`, mcp 2.3) once with `protocol: legacy` (it then asks the
handshake way: server-to-client requests mid-call) and once with `protocol: auto` (2026-07-28:
`InputRequiredResult`, `subscriptions/listen`); and the real server-everything (npm, handshake
era) for every interaction it has. Interactions: sampling, elicitation in form and URL modes,
roots, logging, progress, cancellation, list_changed and resource updates.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client

from conftest import (
    everything_entry,
    free_port,
    gateway_params,
    popen_gateway,
    text_of,
    wait_http,
    write_config,
)

pytestmark = [pytest.mark.anyio, pytest.mark.filterwarnings("ignore::mcp.MCPDeprecationWarning")]

FIXTURE = str(Path(__file__).resolve().parent / "fixtures" / "interop_server.py")
MODERN = "2026-07-28"
WAIT_S = 30.0


@dataclass
class Recorder:
    """What one client heard besides results."""

    logs: list[types.LoggingMessageNotificationParams] = field(default_factory=list)
    notes: list[Any] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)

    async def on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append(params)
        self._wake()

    async def on_message(self, message: Any) -> None:
        self.notes.append(getattr(message, "root", message))
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def until(self, check: Callable[[], Any], what: str) -> Any:
        with anyio.fail_after(WAIT_S):
            while not (found := check()):
                await self.changed.wait()
        return found


async def _sampling(ctx: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
    return types.CreateMessageResult(
        role="assistant", content=types.TextContent(type="text", text="py-sampled"), model="py-model"
    )


async def _elicitation(ctx: Any, params: Any) -> types.ElicitResult:
    if getattr(params, "mode", None) == "url":
        return types.ElicitResult(action="accept")
    props = (getattr(params, "requested_schema", None) or {}).get("properties", {})
    content = {k: v for k, v in (("answer", "py-answer"), ("name", "Ada")) if k in props}
    return types.ElicitResult(action="accept", content=content)


async def _roots(ctx: Any) -> types.ListRootsResult:
    return types.ListRootsResult(roots=[types.Root(uri="file:///py-root", name="py")])


@dataclass
class Side:
    """One connected client: its era, transport, recorder, and the gateway's event files."""

    client: Client
    era: str
    front: str
    rec: Recorder
    events: dict[str, Path]


def _config(base: Path) -> tuple[Path, dict[str, Path]]:
    events = {name: base / f"{name}-events.txt" for name in ("legacy", "modern")}
    servers: dict[str, Any] = {
        "legacy": {
            "command": sys.executable,
            "args": [FIXTURE],
            "protocol": "legacy",
            "env": {"INTEROP_EVENTS": str(events["legacy"])},
        },
        "modern": {"command": sys.executable, "args": [FIXTURE], "env": {"INTEROP_EVENTS": str(events["modern"])}},
        "everything": everything_entry(),
    }
    return write_config(base / "gateway.yaml", servers, {"call_timeout_ms": 60000}), events


def _client(target: Any, era: str, rec: Recorder) -> Client:
    return Client(
        target,
        mode="legacy" if era == "legacy" else "auto",
        sampling_callback=_sampling,  # type: ignore[arg-type]
        elicitation_callback=_elicitation,  # type: ignore[arg-type]
        list_roots_callback=_roots,  # type: ignore[arg-type]
        logging_callback=rec.on_log,
        message_handler=rec.on_message,
        log_level="info" if era == "modern" else None,
        read_timeout_seconds=60,
    )


@pytest.fixture(scope="module")
def http_gateway(tmp_path_factory: pytest.TempPathFactory) -> Any:
    config, events = _config(tmp_path_factory.mktemp("matrix-http"))
    port = free_port()
    with popen_gateway(config, "-t", "http", "--port", str(port)) as proc:
        wait_http(port, proc)
        yield f"http://127.0.0.1:{port}/mcp", events


@pytest.fixture(scope="module", params=["stdio-legacy", "stdio-modern", "http-legacy", "http-modern"])
async def side(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, http_gateway: Any
) -> AsyncIterator[Side]:
    front, era = request.param.split("-")
    rec = Recorder()
    if front == "stdio":
        config, events = _config(tmp_path_factory.mktemp(f"matrix-{request.param}"))
        target: Any = gateway_params(config)
    else:
        target, events = http_gateway
    async with _client(target, era, rec) as client:
        if era == "legacy":
            assert client.protocol_version.startswith("2025-"), client.protocol_version
            await client.set_logging_level("info")
        else:
            assert client.protocol_version == MODERN
        yield Side(client, era, front, rec, events)


# ---- the interactions -----------------------------------------------------------------------------
async def _call(side: Side, name: str, args: dict[str, Any], **kw: Any) -> str:
    result = await side.client.call_tool(name, args, **kw)
    assert not result.is_error, text_of(result)
    return text_of(result)


async def sampling(side: Side, up: str) -> None:
    if up == "everything":
        assert "py-sampled" in await _call(
            side, "everything__trigger-sampling-request", {"prompt": "hi", "maxTokens": 8}
        )
    else:
        assert await _call(side, f"{up}__ask_sampling", {"prompt": "hi"}) == "py-sampled"


async def elicitation_form(side: Side, up: str) -> None:
    if up == "everything":
        assert "Ada" in await _call(side, "everything__trigger-elicitation-request", {})
    else:
        assert await _call(side, f"{up}__ask_elicitation", {"question": "?"}) == "py-answer"


async def elicitation_url(side: Side, up: str) -> None:
    if up == "everything":
        text = await _call(side, "everything__trigger-url-elicitation", {"url": "https://example.com/py"})
        assert "completed the URL elicitation" in text
    else:
        before = len(side.rec.notes)
        assert await _call(side, f"{up}__ask_url", {"url": "https://example.com/py"}) == "accept"
        if side.era == "legacy" and up == "legacy":
            # The upstream's completion notice reaches the client that got the elicitation.
            await side.rec.until(
                lambda: any(
                    isinstance(n, types.ElicitCompleteNotification) and n.params.elicitation_id == "interop-1"
                    for n in side.rec.notes[before:]
                ),
                "notifications/elicitation/complete",
            )


async def roots(side: Side, up: str) -> None:
    if up == "everything":
        assert "file:///py-root" in await _call(side, "everything__get-roots-list", {})
    else:
        assert await _call(side, f"{up}__ask_roots", {}) == "file:///py-root"


async def logging(side: Side, up: str) -> None:
    marker = f"py-log-{uuid.uuid4().hex[:8]}"
    before = len(side.rec.logs)
    await _call(side, f"{up}__log", {"level": "debug", "text": marker + "-debug"})
    await _call(side, f"{up}__log", {"level": "warning", "text": marker})
    await side.rec.until(lambda: any(marker == str(m.data) for m in side.rec.logs[before:]), "the log message")
    fresh = side.rec.logs[before:]
    assert not any(str(m.data) == marker + "-debug" for m in fresh), "a debug message passed level info"
    assert any(str(m.logger or "").startswith(up) for m in fresh), [m.logger for m in fresh]


async def progress(side: Side, up: str) -> None:
    seen: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        seen.append(value)

    if up == "everything":
        await _call(
            side,
            "everything__trigger-long-running-operation",
            {"duration": 0.3, "steps": 3},
            progress_callback=on_progress,
        )
        assert len(seen) >= 2, seen  # its last notification races its result (measured directly too)
    else:
        assert await _call(side, f"{up}__progress", {"steps": 3}, progress_callback=on_progress) == "done"
        assert seen == [1, 2, 3], seen


async def cancellation(side: Side, up: str) -> None:
    events = side.events[up]

    def count(word: str) -> int:
        return events.read_text().count(word) if events.exists() else 0

    started, cancelled = count("slow started"), count("cancelled")
    async with anyio.create_task_group() as tg:

        async def call() -> None:
            with pytest.raises(BaseException):  # noqa: B017 - cancelled: whatever the client raises
                await side.client.call_tool(f"{up}__slow", {"seconds": 60})

        tg.start_soon(call)
        with anyio.fail_after(WAIT_S):
            while count("slow started") == started:
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    with anyio.fail_after(WAIT_S):
        while count("cancelled") == cancelled:
            await anyio.sleep(0.05)


async def list_changed(side: Side, up: str) -> None:
    name = f"added_{uuid.uuid4().hex[:8]}"
    wanted = f"{up}__{name}"
    if side.era == "legacy":
        before = len(side.rec.notes)
        assert await _call(side, f"{up}__add_tool", {"name": name}) == "added"
        await side.rec.until(
            lambda: any(isinstance(n, types.ToolListChangedNotification) for n in side.rec.notes[before:]),
            "notifications/tools/list_changed",
        )
    else:
        async with side.client.listen(tools_list_changed=True) as sub:
            assert await _call(side, f"{up}__add_tool", {"name": name}) == "added"
            with anyio.fail_after(WAIT_S):
                async for _event in sub:
                    if wanted in {t.name for t in (await side.client.list_tools()).tools}:
                        break
    assert wanted in {t.name for t in (await side.client.list_tools()).tools}
    assert await _call(side, wanted, {}) == f"I am {name}"


async def resource_updates(side: Side, up: str) -> None:
    uri = f"{up}+interop://counter"
    if side.era == "legacy":
        await side.client.subscribe_resource(uri)
        before = len(side.rec.notes)
        await _call(side, f"{up}__touch", {})
        await side.rec.until(
            lambda: any(
                isinstance(n, types.ResourceUpdatedNotification) and str(n.params.uri) == uri
                for n in side.rec.notes[before:]
            ),
            "notifications/resources/updated",
        )
        await side.client.unsubscribe_resource(uri)
    else:
        async with side.client.listen(resource_subscriptions=[uri]) as sub:
            await _call(side, f"{up}__touch", {})
            with anyio.fail_after(WAIT_S):
                async for event in sub:
                    if getattr(event, "uri", None) == uri:
                        break
    read = await side.client.read_resource(uri)
    assert int(read.contents[0].text) >= 1  # type: ignore[union-attr]


INTERACTIONS: dict[str, Callable[[Side, str], Awaitable[None]]] = {
    "sampling": sampling,
    "elicitation-form": elicitation_form,
    "elicitation-url": elicitation_url,
    "roots": roots,
    "logging": logging,
    "progress": progress,
    "cancellation": cancellation,
    "list_changed": list_changed,
    "resource-updates": resource_updates,
}
EVERYTHING = ["sampling", "elicitation-form", "elicitation-url", "roots", "progress"]
"""What server-everything (a real handshake-era server) covers; the fixture covers the rest."""


@pytest.mark.parametrize("interaction", list(INTERACTIONS))
@pytest.mark.parametrize("upstream", ["legacy", "modern"])
async def test_fixture_matrix(side: Side, upstream: str, interaction: str) -> None:
    where = f"{side.era} client over {side.front} -> {upstream} upstream: {interaction}"
    try:
        with anyio.fail_after(2 * WAIT_S):
            await INTERACTIONS[interaction](side, upstream)
    except Exception as exc:  # noqa: BLE001 - the failure names the cell of the matrix
        pytest.fail(f"{where}: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize("interaction", EVERYTHING)
async def test_server_everything(side: Side, interaction: str) -> None:
    where = f"{side.era} client over {side.front} -> server-everything: {interaction}"
    try:
        with anyio.fail_after(2 * WAIT_S):
            await INTERACTIONS[interaction](side, "everything")
    except Exception as exc:  # noqa: BLE001 - the failure names the cell of the matrix
        pytest.fail(f"{where}: {type(exc).__name__}: {exc}")


def test_matrix_is_complete() -> None:
    """The issue's list of interactions, every one in the matrix."""
    assert set(INTERACTIONS) == {
        "sampling", "elicitation-form", "elicitation-url", "roots", "logging", "progress", "cancellation",
        "list_changed", "resource-updates",
    }  # fmt: skip
    assert os.path.exists(FIXTURE)
