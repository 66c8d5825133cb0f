"""Private data kept out of the model: PII fetched from the real server-memory reaches the model as
tokens, and the real values are restored when code passes the tokens to the next tool call.

server-memory loses writes under concurrent calls by itself, so its writes are serialized
(`max_concurrency: 1`), as a user should configure it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mcp_types.version import LATEST_HANDSHAKE_VERSION

from conftest import everything_entry, memory_entry
from mcpopt.api import ClientLink, no_progress
from mcpopt.codemode.private import TokenVault
from mcpopt.codemode.sandbox import CodeModeSettings, PrivateDataSettings
from mcpopt.codemode.tool import CodeModeTool
from mcpopt.config import load_config
from mcpopt.gateway.assembly import build_gateway
from mcpopt.gateway.server import Gateway

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

EMAIL, PHONE = "jane.doe@example.com", "+1 415 555 0132"


def link(session_id: str) -> ClientLink:
    return ClientLink(LATEST_HANDSHAKE_VERSION, None, None, None, lambda _t: no_progress, session_id=session_id)


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder: Path = tmp_path_factory.mktemp("codemode-private")
    servers = {
        "memory": {**memory_entry(folder / "memory.jsonl"), "max_concurrency": 1},
        "everything": everything_entry(),
    }
    gw = build_gateway(load_config(data={"mcpServers": servers, "gateway": {"call_timeout_ms": 30000}}))
    async with gw.running():
        created = await gw.call_tool(
            {
                "name": "memory__create_entities",
                "arguments": {
                    "entities": [
                        {
                            "name": "customer-1",
                            "entityType": "customer",
                            "observations": [f"email {EMAIL}", f"phone {PHONE}", "plan gold"],
                        }
                    ]
                },
            },
            link("setup"),
        )
        assert not created.get("isError")
        yield gw


def text(result: dict[str, Any]) -> str:
    return "".join(b.get("text", "") for b in result["content"])


def private(**extra: Any) -> CodeModeSettings:
    return CodeModeSettings(timeout_ms=30_000, private_data={"tools": ["memory__*"], **extra})


async def stored_observations(gateway: Gateway, name: str) -> list[str]:
    found = await gateway.call_tool({"name": "memory__open_nodes", "arguments": {"names": [name]}}, link("check"))
    data = found.get("structuredContent") or json.loads(text(found))
    return [o for e in data["entities"] for o in e["observations"]]


async def test_pii_reaches_the_model_tokenized_and_is_restored_in_the_next_tool_call(gateway: Gateway) -> None:
    tool = CodeModeTool(gateway, private())
    me = link("agent")
    try:
        fetched = await tool.handler(
            {
                "code": "g = await tools.memory.search_nodes(query='customer-1')\n"
                "obs = g['entities'][0]['observations']\nprint(obs)"
            },
            me,
        )
        seen = text(fetched)
        assert not fetched.get("isError"), seen
        assert "[EMAIL_1]" in seen and "[PHONE_1]" in seen and "plan gold" in seen, seen
        assert EMAIL not in seen and "415" not in seen
        # The next call (same code session) passes a token on, as the model would write it.
        wrote = await tool.handler(
            {
                "code": "r = await tools.memory.create_entities(entities=[{'name': 'followup', 'entityType': 'task', "
                "'observations': ['send the invoice to [EMAIL_1]', obs[1]]}])\nprint(r)"
            },
            me,
        )
        echoed = text(wrote)
        assert not wrote.get("isError"), echoed
        assert EMAIL not in echoed and "[EMAIL_1]" in echoed  # the write's own echo is tokenized again
        # What reached server-memory is the real data.
        assert await stored_observations(gateway, "followup") == [f"send the invoice to {EMAIL}", f"phone {PHONE}"]
    finally:
        await tool.aclose()


async def test_a_token_is_restored_only_in_its_own_session_and_only_where_allowed(gateway: Gateway) -> None:
    tool = CodeModeTool(gateway, private(restore_to=["memory__create_entities"]))
    try:
        setup = await tool.handler(
            {"code": "g = await tools.memory.open_nodes(names=['customer-1'])\nprint(g)"}, link("a")
        )
        assert "[EMAIL_1]" in text(setup), text(setup)
        # Another client guesses the token: its session has no mapping, nothing is written.
        guess = await tool.handler(
            {
                "code": "await tools.memory.create_entities(entities=[{'name': 'leak', 'entityType': 'x', "
                "'observations': ['[EMAIL_1]']}])"
            },
            link("b"),
        )
        assert guess.get("isError") and "private-data token [EMAIL_1] is not known in this code session" in text(guess)
        assert await stored_observations(gateway, "leak") == []
        # The owner may not send it to a tool outside restore_to.
        echo = await tool.handler({"code": "await tools.everything.echo(message='[EMAIL_1]')"}, link("a"))
        assert echo.get("isError") and "may not be sent to everything__echo" in text(echo)
        assert EMAIL not in text(echo)
    finally:
        await tool.aclose()


async def test_private_fields_are_tokenized_whole(gateway: Gateway) -> None:
    tool = CodeModeTool(gateway, CodeModeSettings(private_data={"fields": {"memory__open_nodes": ["name"]}}))
    try:
        result = await tool.handler(
            {"code": "g = await tools.memory.open_nodes(names=['customer-1'])\n[e['name'] for e in g['entities']]"},
            link("f"),
        )
        assert text(result) == '["[PRIVATE_1]"]', text(result)
        # Only the field is private here: the observations are not scanned.
        obs = await tool.handler({"code": "g['entities'][0]['observations'][0]"}, link("f"))
        assert EMAIL in text(obs)
    finally:
        await tool.aclose()


def test_the_vault_recognises_the_configured_kinds() -> None:
    vault = TokenVault(
        PrivateDataSettings(tools=["t"], kinds=["email", "phone", "card", "iban", "ssn", "ipv4", "secret"])
    )
    samples = {
        "write to ann@example.org today": "write to [EMAIL_1] today",
        "card 4111 1111 1111 1111, exp 12/30": "card [CARD_1], exp 12/30",
        "card 4111 1111 1111 1112 fails Luhn": "card 4111 1111 1111 1112 fails Luhn",
        "IBAN DE89 3704 0044 0532 0130 00": "IBAN [IBAN_1]",
        "ssn 123-45-6789": "ssn [SSN_1]",
        "host 10.1.2.3": "host [IP_1]",
        "Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345": "Authorization: [SECRET_1]",
        "at 2025-06-01T12:00:00Z id=00001234 version 1.2.3": "at 2025-06-01T12:00:00Z id=00001234 version 1.2.3",
        "ann@example.org again": "[EMAIL_1] again",
    }
    for given, expected in samples.items():
        assert vault.tokenize_text(given) == expected, given
    assert vault.restore_arguments("t", {"to": ["[EMAIL_1]", "x [CARD_1] y"]}) == {
        "to": ["ann@example.org", "x 4111 1111 1111 1111 y"]
    }
