"""Gateway behaviour behind the conformance suite's 2026-07-28 scenarios, on the real CLI gateway over
the conformance fixture (tests/fixtures/conformance_server.py, stdio, `protocol: auto`).

Each test is the reduced form of a scenario the gateway once failed while the fixture passed it
directly (`scripts/conformance`), so a regression shows up in pytest with a readable assertion:
- header values with surrounding whitespace (`http-header-validation`,
  `ServerAcceptsWhitespaceHeaderValue`): uvicorn's httptools parser keeps trailing whitespace and
  the SDK's Mcp-Name check refused the request with 400 / -32020;
- the client's own capabilities reaching a 2026-07-28 upstream (`server-stateless`
  undeclared-capability checks, `input-required-result-capability-check`).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest

from conftest import free_port, popen_gateway, wait_http, write_config
from mcpopt.gateway.headers import HeaderNormalizer

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "conformance_server.py"
MODERN = "2026-07-28"
CAPS_ALL = {"sampling": {}, "elicitation": {}, "roots": {"listChanged": True}}


def _serve(base: Path, protocol: str = "auto", **gateway: Any) -> Iterator[int]:
    entry = {"command": sys.executable, "args": [str(FIXTURE), "--transport", "stdio"], "prefix": ""}
    config = write_config(
        base / "gw.yaml", {"fixture": {**entry, "protocol": protocol}}, {"prefix_tools": False, **gateway}
    )
    port = free_port()
    with popen_gateway(config, "-t", "http", "--port", str(port)) as proc:
        wait_http(port, proc)
        yield port


@pytest.fixture(scope="module")
def gateway_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    yield from _serve(tmp_path_factory.mktemp("conformance-gw"))


@pytest.fixture(scope="module")
def legacy_gateway_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    # The fixture spoken to over the handshake era only (`protocol: legacy`).
    yield from _serve(tmp_path_factory.mktemp("conformance-gw-legacy"), protocol="legacy")


@pytest.fixture(scope="module")
def search_gateway_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    yield from _serve(tmp_path_factory.mktemp("conformance-gw-search"), exposure="search")


def modern_post(
    port: int,
    method: str,
    params: dict[str, Any],
    headers: list[tuple[str, str]],
    caps: dict[str, Any] | None = None,
) -> tuple[int, dict[str, Any]]:
    """One 2026-07-28 POST with exactly these extra headers (sent as given: http.client does not
    trim values); returns the HTTP status and the JSON-RPC message (the last one on an SSE stream)."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientInfo": {"name": "pytest", "version": "0"},
        "io.modelcontextprotocol/clientCapabilities": CAPS_ALL if caps is None else caps,
    }
    body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": method, "params": {**params, "_meta": meta}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("POST", "/mcp", skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Accept", "application/json, text/event-stream")
        conn.putheader("MCP-Protocol-Version", MODERN)
        for name, value in headers:
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body.encode())
        resp = conn.getresponse()
        raw = resp.read().decode()
        if resp.getheader("content-type", "").startswith("text/event-stream"):
            datas = [line[5:].strip() for line in raw.splitlines() if line.startswith("data:") and line[5:].strip()]
            return resp.status, json.loads(datas[-1])
        return resp.status, json.loads(raw)
    finally:
        conn.close()


def call_headers(name: str, *, method_value: str = "tools/call") -> list[tuple[str, str]]:
    return [("Mcp-Method", method_value), ("Mcp-Name", name)]


def test_whitespace_around_header_values_is_not_part_of_the_value(gateway_port: int) -> None:
    params = {"name": "test_simple_text", "arguments": {}}
    status, msg = modern_post(
        gateway_port, "tools/call", params, [("Mcp-Method", " tools/call\t"), ("Mcp-Name", "  test_simple_text  ")]
    )
    assert status == 200, msg
    assert msg["result"]["content"][0]["text"] == "This is a simple text response for testing."


def test_header_checks_still_refuse_a_mismatched_name(gateway_port: int) -> None:
    # The trimming must not weaken validation: a different name (whitespace or not) is still -32020.
    params = {"name": "test_simple_text", "arguments": {}}
    status, msg = modern_post(gateway_port, "tools/call", params, call_headers(" test_image_content "))
    assert status == 400
    assert msg["error"]["code"] == -32020


def test_custom_param_header_is_checked_against_the_argument(gateway_port: int) -> None:
    # SEP-2243 Mcp-Param-*: the gateway lists the upstream's x-mcp-header schema and checks it.
    params = {"name": "test_custom_header", "arguments": {"region": "eu-west"}}
    status, msg = modern_post(
        gateway_port, "tools/call", params, [*call_headers("test_custom_header"), ("Mcp-Param-Region", "eu-west ")]
    )
    assert status == 200, msg
    assert msg["result"]["content"][0]["text"] == "Region: eu-west"
    status, msg = modern_post(
        gateway_port, "tools/call", params, [*call_headers("test_custom_header"), ("Mcp-Param-Region", "us-east")]
    )
    assert status == 400
    assert msg["error"]["code"] == -32020


def test_param_header_of_a_tool_hidden_by_search_mode_is_checked(search_gateway_port: int) -> None:
    # In search mode tools/list shows only the discovery tools, but every tool stays callable by
    # name; its Mcp-Param-* headers are still checked against its own schema.
    params = {"name": "test_custom_header", "arguments": {"region": "eu-west"}}
    headers = call_headers("test_custom_header")
    status, msg = modern_post(search_gateway_port, "tools/call", params, [*headers, ("Mcp-Param-Region", "us-east")])
    assert status == 400, msg
    assert msg["error"]["code"] == -32020
    status, msg = modern_post(search_gateway_port, "tools/call", params, [*headers, ("Mcp-Param-Region", "eu-west")])
    assert status == 200, msg
    assert msg["result"]["content"][0]["text"] == "Region: eu-west"


MISSING = "test://nonexistent-resource"


def test_resource_not_found_reaches_a_2026_client_in_its_own_code(legacy_gateway_port: int) -> None:
    # sep-2164-resource-not-found: a handshake-era upstream says -32002; a 2026-07-28 client gets
    # -32602 with the URI in data.
    headers = [("Mcp-Method", "resources/read"), ("Mcp-Name", MISSING)]
    status, msg = modern_post(legacy_gateway_port, "resources/read", {"uri": MISSING}, headers)
    assert msg["error"]["code"] == -32602, msg
    assert msg["error"]["data"]["uri"] == MISSING


@pytest.mark.anyio
async def test_resource_not_found_reaches_a_2025_client_in_its_own_code(gateway_port: int) -> None:
    # ... and a 2026-07-28 upstream's -32602 (SEP-2164 shape) reaches a handshake-era client as -32002.
    from mcp import Client
    from mcp.shared.exceptions import MCPError

    async with Client(f"http://127.0.0.1:{gateway_port}/mcp", mode="legacy") as client:
        with pytest.raises(MCPError) as info:
            await client.read_resource(MISSING)
    assert info.value.error.code == -32002
    assert info.value.error.data == {"uri": MISSING}


async def _echo_scope(scope: dict[str, Any], receive: Any, send: Any) -> None:
    send.append(scope)


@pytest.mark.anyio
async def test_header_normalizer_trims_only_when_needed() -> None:
    seen: list[dict[str, Any]] = []
    app = HeaderNormalizer(_echo_scope)
    clean = {"type": "http", "headers": [(b"mcp-name", b"a b")]}
    await app(clean, None, seen)  # type: ignore[arg-type]
    assert seen[-1] is clean  # nothing to trim: the very same scope, no copy
    padded = {"type": "http", "headers": [(b"mcp-name", b" \ta b \t"), (b"host", b"x")]}
    await app(padded, None, seen)  # type: ignore[arg-type]
    assert seen[-1]["headers"] == [(b"mcp-name", b"a b"), (b"host", b"x")]
    assert padded["headers"][0][1] == b" \ta b \t"  # the server's own scope is left as it was
    lifespan = {"type": "lifespan"}
    await app(lifespan, None, seen)  # type: ignore[arg-type]
    assert seen[-1] is lifespan


def test_missing_client_capability_is_refused_upstream(gateway_port: int) -> None:
    # server-stateless sep-2575-server-rejects-undeclared-capability / missing-capability-http-400
    params = {"name": "test_missing_capability", "arguments": {}}
    status, msg = modern_post(gateway_port, "tools/call", params, call_headers("test_missing_capability"), caps={})
    assert msg.get("error", {}).get("code") == -32021, msg
    assert msg["error"]["data"]["requiredCapabilities"] == {"sampling": {}}
    assert status == 400


def test_upstream_asks_only_for_what_the_client_declared(gateway_port: int) -> None:
    # input-required-result-capability-check: a sampling-only client is never asked to elicit
    params = {"name": "test_input_required_result_capabilities", "arguments": {}}
    headers = call_headers("test_input_required_result_capabilities")
    status, msg = modern_post(gateway_port, "tools/call", params, headers, caps={"sampling": {}})
    assert status == 200, msg
    result = msg["result"]
    assert result["resultType"] == "input_required", result
    assert set(result["inputRequests"]) == {"sample_input"}


def test_all_capabilities_declared_means_all_asked(gateway_port: int) -> None:
    # The control for the two tests above: with everything declared, both questions are asked.
    params = {"name": "test_input_required_result_capabilities", "arguments": {}}
    headers = call_headers("test_input_required_result_capabilities")
    status, msg = modern_post(gateway_port, "tools/call", params, headers)
    assert status == 200, msg
    assert set(msg["result"]["inputRequests"]) == {"elicit_input", "sample_input"}


@pytest.mark.anyio
async def test_handshake_client_is_asked_only_for_what_it_declared(gateway_port: int) -> None:
    # A 2025-era client (sampling only) through the gateway to the 2026-07-28 fixture: the fixture
    # plans with that client's capabilities, so the gateway relays one sampling request and no
    # elicitation the client could not answer.
    from mcp import Client

    asked: list[str] = []

    async def sample(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(params.messages[0].content.text)  # type: ignore[union-attr]
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="ok"), model="m")

    url = f"http://127.0.0.1:{gateway_port}/mcp"
    async with Client(url, mode="legacy", sampling_callback=sample) as client:
        assert not client.protocol_version.startswith("2026")
        result = await client.call_tool("test_input_required_result_capabilities", {})
    assert not result.is_error, result
    assert result.content[0].text == "capabilities-ok: received sample_input"  # type: ignore[union-attr]
    assert asked == ["Sample request"]


# ---- the tasks extension (SEP-2663) through the gateway -------------------------------------
TASKS = "io.modelcontextprotocol/tasks"
CAPS_TASKS = {**CAPS_ALL, "extensions": {TASKS: {}}}


def task_call(port: int, method: str, task_id: str, caps: dict[str, Any] = CAPS_TASKS, **extra: Any) -> Any:
    headers = [("Mcp-Method", method), ("Mcp-Name", task_id)]
    return modern_post(port, method, {"taskId": task_id, **extra}, headers, caps=caps)


def wait_status(port: int, task_id: str, wanted: set[str]) -> dict[str, Any]:
    for _ in range(200):  # the tasks finish in well under a second; this is only a guard
        status, msg = task_call(port, "tasks/get", task_id)
        assert status == 200, msg
        if msg["result"]["status"] in wanted:
            return msg["result"]
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} never reached {wanted}: {msg}")


@pytest.fixture(scope="module")
def http_upstream_gateway_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    # The fixture over Streamable HTTP as the upstream: it checks the Mcp-Name routing header of
    # tasks/* strictly, so this shows the gateway sets it on the requests it forwards.
    base = tmp_path_factory.mktemp("conformance-gw-http")
    port = free_port()
    fixture = subprocess.Popen(
        [sys.executable, str(FIXTURE), "--transport", "http", "--port", str(port)], stderr=subprocess.DEVNULL
    )
    try:
        wait_http(port, fixture)
        config = write_config(
            base / "gw.yaml",
            {"fixture": {"url": f"http://127.0.0.1:{port}/mcp", "prefix": ""}},
            {"prefix_tools": False},
        )
        gw_port = free_port()
        with popen_gateway(config, "-t", "http", "--port", str(gw_port)) as proc:
            wait_http(gw_port, proc)
            yield gw_port
    finally:
        fixture.terminate()
        fixture.wait(10)


@pytest.mark.parametrize("upstream", ["stdio", "http"])
def test_a_task_runs_upstream_and_is_polled_and_cancelled_through_the_gateway(
    upstream: str, gateway_port: int, http_upstream_gateway_port: int
) -> None:
    port = gateway_port if upstream == "stdio" else http_upstream_gateway_port
    status, msg = modern_post(port, "server/discover", {}, [("Mcp-Method", "server/discover")], caps=CAPS_TASKS)
    assert TASKS in msg["result"]["capabilities"]["extensions"]

    params = {"name": "slow_compute", "arguments": {"seconds": 60, "label": "pytest"}}
    status, msg = modern_post(port, "tools/call", params, call_headers("slow_compute"), caps=CAPS_TASKS)
    assert status == 200, msg
    created = msg["result"]
    assert created["resultType"] == "task" and created["status"] == "working"
    task_id = created["taskId"]
    assert task_id.startswith("fixture:task-")  # named by the upstream that owns it
    status, msg = task_call(port, "tasks/get", task_id)
    assert msg["result"]["taskId"] == task_id and msg["result"]["status"] == "working"
    assert msg["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "mcpopt"
    status, msg = task_call(port, "tasks/cancel", task_id)
    assert status == 200 and msg["result"]["resultType"] == "complete" and "taskId" not in msg["result"]
    assert wait_status(port, task_id, {"cancelled", "completed", "failed"})["status"] == "cancelled"


def test_task_input_is_answered_with_tasks_update_through_the_gateway(gateway_port: int) -> None:
    params = {"name": "confirm_delete", "arguments": {"filename": "a.txt"}}
    status, msg = modern_post(gateway_port, "tools/call", params, call_headers("confirm_delete"), caps=CAPS_TASKS)
    task_id = msg["result"]["taskId"]
    parked = wait_status(gateway_port, task_id, {"input_required"})
    (key,) = parked["inputRequests"]
    assert parked["inputRequests"][key]["method"] == "elicitation/create"
    answer = {key: {"action": "accept", "content": {"confirm": True}}}
    status, msg = task_call(gateway_port, "tasks/update", task_id, inputResponses=answer)
    assert status == 200 and msg["result"]["resultType"] == "complete"
    done = wait_status(gateway_port, task_id, {"completed", "failed", "cancelled"})
    assert done["status"] == "completed" and done["result"]["content"][0]["text"] == "Deleted a.txt"


def test_task_requests_the_gateway_refuses_itself(gateway_port: int) -> None:
    params = {"name": "slow_compute", "arguments": {"seconds": 0.2, "label": "refusals"}}
    status, msg = modern_post(gateway_port, "tools/call", params, call_headers("slow_compute"), caps=CAPS_TASKS)
    task_id = msg["result"]["taskId"]
    # no extension declared on this request: -32021 naming it
    status, msg = task_call(gateway_port, "tasks/get", task_id, caps=CAPS_ALL)
    assert msg["error"]["code"] == -32021
    assert msg["error"]["data"]["requiredCapabilities"] == {"extensions": {TASKS: {}}}
    # an id no upstream minted: -32602
    status, msg = task_call(gateway_port, "tasks/get", "nobody:task-1")
    assert msg["error"]["code"] == -32602
    # Mcp-Name disagreeing with params.taskId: 400 / -32020
    headers = [("Mcp-Method", "tasks/get"), ("Mcp-Name", "fixture:task-other")]
    status, msg = modern_post(gateway_port, "tasks/get", {"taskId": task_id}, headers, caps=CAPS_TASKS)
    assert status == 400 and msg["error"]["code"] == -32020
    # without the extension a task-supporting tool runs synchronously (as directly)
    status, msg = modern_post(gateway_port, "tools/call", params, call_headers("slow_compute"))
    assert msg["result"]["resultType"] == "complete" and "taskId" not in msg["result"]
