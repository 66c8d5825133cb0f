"""A shared gateway: `mcpopt serve -t http` with authentication, policy, rate limits and isolation,
against a real authorization server (npm `oidc-provider`, client credentials) and the official
Python SDK client.

One gateway process for the module, over real servers: server-everything (stdio, isolated per
principal), mcp-server-time (stdio) and an HTTP upstream that records every header it receives.
Principals (oidc-provider clients): alice (group ops: admin), bob (time only), carol (3 calls an
hour), dave (time only, code mode on), erin and frank (default rule), noscope (a token without the
required scope); plus an API key `ci-bot`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jwt
import mcp_types as types
import pytest
from idp import Idp, available, rsa_jwk
from mcp import Client
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from mcp.shared.exceptions import MCPError

from conftest import (
    MCPOPT,
    ROOT,
    everything_entry,
    free_port,
    popen_gateway,
    text_of,
    time_entry,
    wait_http,
    write_config,
)
from mcpopt.auth.tokens import hash_key, new_key
from mcpopt.errors import POLICY_DENIED, RATE_LIMITED

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.integration,
    pytest.mark.skipif(not available(), reason="npm oidc-provider not installed (scripts/setup)"),
]

HEADER_SERVER = Path(__file__).resolve().parent / "fixtures" / "header_server.py"
TS_CLIENT = Path(__file__).resolve().parent / "fixtures" / "ts_client.mjs"
UPSTREAM_SECRET = "upstream-secret-7f3a9c"
CLIENTS = [
    {"client_id": "alice", "client_secret": "alice-pw", "scope": "mcp:tools mcp:admin", "groups": ["ops"]},
    {"client_id": "bob", "client_secret": "bob-pw", "scope": "mcp:tools"},
    {"client_id": "carol", "client_secret": "carol-pw", "scope": "mcp:tools"},
    {"client_id": "dave", "client_secret": "dave-pw", "scope": "mcp:tools"},
    {"client_id": "erin", "client_secret": "erin-pw", "scope": "mcp:tools"},
    {"client_id": "frank", "client_secret": "frank-pw", "scope": "mcp:tools"},
    {"client_id": "noscope", "client_secret": "noscope-pw", "scope": "profile"},
    {"client_id": "brief", "client_secret": "brief-pw", "scope": "mcp:tools", "ttl": 1},
]


@dataclass
class Shared:
    url: str
    idp: Idp
    header_log: Path
    data_dir: Path
    config: Path
    api_key: str
    proc: subprocess.Popen[bytes]

    def token(self, client: str, resource: str | None = None, scope: str | None = None) -> str:
        return self.idp.access_token(client, resource or self.url, scope)

    def upstream_requests(self) -> list[dict[str, Any]]:
        if not self.header_log.exists():
            return []
        return [json.loads(line) for line in self.header_log.read_text(encoding="utf-8").splitlines() if line]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    base = tmp_path_factory.mktemp("shared")
    key, _ = rsa_jwk("idp-key")
    idp = Idp(base, free_port(), CLIENTS, [key])
    hport = free_port()
    header_log = base / "upstream-headers.jsonl"
    upstream: subprocess.Popen[bytes] | None = None
    try:
        idp.start()
        upstream = subprocess.Popen(
            [sys.executable, str(HEADER_SERVER), str(hport), str(header_log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        cfg, api_key = shared_config(base, idp, hport)
        port = free_port()
        wait_port(hport, upstream)
        with popen_gateway(cfg, "-t", "http", "--port", str(port)) as proc:
            wait_http(port, proc, timeout=60)
            yield Shared(f"http://127.0.0.1:{port}/mcp", idp, header_log, base / "telemetry", cfg, api_key, proc)
    finally:  # nothing this fixture started outlives it, whatever failed
        if upstream is not None:
            upstream.terminate()
            upstream.wait(10)
        idp.stop()


def shared_config(base: Path, idp: Idp, hport: int) -> tuple[Path, str]:
    """The shared gateway's config (and the API key it accepts): see the module docstring."""
    secret_file = base / "upstream-token"
    secret_file.write_text(f"Bearer {UPSTREAM_SECRET}\n", encoding="utf-8")
    api_key = new_key()
    keys = base / "api-keys.txt"
    keys.write_text(f"ci-bot {hash_key(api_key)} mcp:tools\n", encoding="utf-8")
    cfg = write_config(
        base / "shared.yaml",
        {
            "everything": everything_entry(),
            "time": time_entry(),
            "hdr": {"url": f"http://127.0.0.1:{hport}/mcp", "header_files": {"Authorization": str(secret_file)}},
        },
        {
            "auth": {
                "issuer": idp.issuer,
                "required_scopes": ["mcp:tools"],
                "leeway_s": 0,
                "api_keys": {"file": str(keys), "env": None},
            },
            "policy": {
                "rules": [
                    {"name": "ops", "match": {"groups": ["ops"]}, "servers": ["*"], "admin": True},
                    {"name": "time-only", "match": {"subjects": ["bob"]}, "servers": ["time"]},
                    {"name": "metered", "match": {"subjects": ["carol"]}, "rate_limits": ["3/hour"]},
                    {"name": "coder", "match": {"subjects": ["dave"]}, "servers": ["time"], "code_mode": True},
                    {"name": "ci", "match": {"api_keys": ["ci-bot"]}, "servers": ["time", "hdr"]},
                ],
                "default": {"name": "team", "servers": ["everything", "hdr"]},
                "tool_scopes": {"everything__get-sum": ["mcp:admin"]},
            },
            "telemetry": {"data_dir": str(base / "telemetry")},
            "call_timeout_ms": 30000,
            "code_mode": {"timeout_ms": 60000},  # a loaded machine must not turn a verdict into a timeout
        },
    )
    return cfg, api_key


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("the header-recording upstream exited early")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


class MemoryTokens:
    """A `TokenStorage` for the SDK's OAuth providers."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


def bearer_client(url: str, token: str, **kwargs: Any) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30.0)
    return Client(streamable_http_client(url, http_client=http), mode="legacy", **kwargs)


def initialize_body() -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
    }


async def raw_post(url: str, body: Any, headers: dict[str, str] | None = None) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=30.0) as http:
        return await http.post(
            url,
            json=body,
            headers={"Accept": "application/json, text/event-stream", **(headers or {})},
        )


def challenge_params(header: str) -> dict[str, str]:
    assert header.startswith("Bearer "), header
    out = {}
    for part in header[len("Bearer ") :].split(", "):
        key, _, value = part.partition("=")
        out[key] = value.strip('"')
    return out


# ---- authentication --------------------------------------------------------------------------
async def test_no_token_gets_401_with_metadata_a_client_can_follow(shared: Shared) -> None:
    resp = await raw_post(shared.url, initialize_body())
    assert resp.status_code == 401
    params = challenge_params(resp.headers["www-authenticate"])
    port = shared.url.split(":")[2].split("/")[0]
    assert params["resource_metadata"] == f"http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp"
    assert params["scope"] == "mcp:tools"
    assert "error" not in params  # RFC 6750 §3.1: no error code when no credential was sent
    async with httpx2.AsyncClient() as http:
        for path in ("/.well-known/oauth-protected-resource/mcp", "/.well-known/oauth-protected-resource"):
            doc = (await http.get(f"http://127.0.0.1:{port}{path}")).json()
            assert doc["resource"] == shared.url
            assert doc["authorization_servers"] == [shared.idp.issuer]
            assert doc["scopes_supported"] == ["mcp:tools"] and doc["bearer_methods_supported"] == ["header"]
        # Every other route is behind authentication too.
        for path in ("/healthz", "/metrics", "/dashboard"):
            assert (await http.get(f"http://127.0.0.1:{port}{path}")).status_code == 401, path


async def test_sdk_client_follows_the_challenge_to_a_token(shared: Shared) -> None:
    """The SDK's own OAuth client (client credentials): 401 -> protected-resource metadata -> the
    IdP's metadata -> token for this resource -> served."""
    provider = ClientCredentialsOAuthProvider(
        server_url=shared.url,
        storage=MemoryTokens(),
        client_id="erin",
        client_secret="erin-pw",
        scope="mcp:tools",
        issuer=shared.idp.issuer,
    )
    http = httpx2.AsyncClient(auth=provider, timeout=30.0)
    async with Client(streamable_http_client(shared.url, http_client=http), mode="legacy") as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "everything__echo" in names
        result = await client.call_tool("everything__echo", {"message": "hi"})
        assert not result.is_error and "hi" in text_of(result)
    assert provider.context.current_tokens is not None
    claims = jwt.decode(provider.context.current_tokens.access_token, options={"verify_signature": False})
    assert claims["aud"] == shared.url and claims["sub"] == "erin"


@pytest.mark.parametrize("case", ["wrong_audience", "expired", "bad_signature", "unknown_kid", "garbage"])
async def test_invalid_tokens_get_401(shared: Shared, case: str) -> None:
    if case == "wrong_audience":
        token = shared.token("alice", "http://127.0.0.1:1/someone-else/mcp")
    elif case == "expired":
        token = shared.token("brief")
        exp = jwt.decode(token, options={"verify_signature": False})["exp"]
        while time.time() <= exp + 0.05:  # the token's own expiry, not a guessed duration
            await anyio.sleep(0.1)
    elif case in ("bad_signature", "unknown_kid"):
        claims = jwt.decode(shared.token("alice"), options={"verify_signature": False})
        _, other = rsa_jwk("x")
        kid = "idp-key" if case == "bad_signature" else "nobody-knows-this-kid"
        token = jwt.encode(claims, other, algorithm="RS256", headers={"kid": kid})
    else:
        token = "not-a-token"
    resp = await raw_post(shared.url, initialize_body(), {"Authorization": f"Bearer {token}"})
    assert resp.status_code == 401, resp.text
    params = challenge_params(resp.headers["www-authenticate"])
    assert params["error"] == "invalid_token" and params["resource_metadata"].endswith("/oauth-protected-resource/mcp")
    assert token not in resp.text and token not in resp.headers["www-authenticate"]  # never echoed


async def test_missing_scope_gets_403(shared: Shared) -> None:
    token = shared.token("noscope", scope="profile")
    resp = await raw_post(shared.url, initialize_body(), {"Authorization": f"Bearer {token}"})
    assert resp.status_code == 403
    params = challenge_params(resp.headers["www-authenticate"])
    assert params["error"] == "insufficient_scope" and params["scope"] == "mcp:tools"


async def test_valid_token_and_api_key_are_served(shared: Shared) -> None:
    async with bearer_client(shared.url, shared.token("alice")) as client:
        result = await client.call_tool("time__get_current_time", {"timezone": "UTC"})
        assert not result.is_error, text_of(result)
    http = httpx2.AsyncClient(headers={"X-API-Key": shared.api_key}, timeout=30.0)
    async with Client(streamable_http_client(shared.url, http_client=http), mode="legacy") as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert "time__get_current_time" in names and not any(n.startswith("everything__") for n in names)
        assert not (await client.call_tool("hdr__echo", {"text": "from ci"})).is_error


async def test_a_session_belongs_to_its_principal(shared: Shared) -> None:
    """Another principal presenting a session id gets 404, as if the session did not exist."""
    alice = {"Authorization": f"Bearer {shared.token('alice')}"}
    init = await raw_post(shared.url, initialize_body(), alice)
    sid = init.headers["mcp-session-id"]
    await raw_post(
        shared.url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, {**alice, "Mcp-Session-Id": sid}
    )
    call = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "time__get_current_time", "arguments": {"timezone": "UTC"}},
    }
    bob = {"Authorization": f"Bearer {shared.token('bob')}", "Mcp-Session-Id": sid}
    assert (await raw_post(shared.url, call, bob)).status_code == 404
    assert (await raw_post(shared.url, {**call, "method": "tools/list", "params": {}}, bob)).status_code == 404
    mine = await raw_post(shared.url, call, {**alice, "Mcp-Session-Id": sid})
    assert mine.status_code == 200 and "result" in mine.json()


# ---- policy ----------------------------------------------------------------------------------
async def test_a_principal_limited_to_one_server_sees_and_calls_only_its_tools(shared: Shared) -> None:
    async with bearer_client(shared.url, shared.token("bob")) as client:
        tools = [t.name for t in (await client.list_tools()).tools]
        upstream = [n for n in tools if not n.startswith("mcpopt__")]
        assert upstream and all(n.startswith("time__") for n in upstream), tools
        assert "mcpopt__cache_purge" not in tools and "mcpopt__run_performance_benchmark" not in tools
        assert (await client.list_prompts()).prompts == []
        assert (await client.list_resources()).resources == []
        assert not (await client.call_tool("time__get_current_time", {"timezone": "UTC"})).is_error
        for name, args in (("everything__echo", {"message": "x"}), ("hdr__echo", {"text": "bob-was-here"})):
            with pytest.raises(MCPError) as refused:
                await client.call_tool(name, args)
            assert refused.value.code == POLICY_DENIED
            assert "forbidden" in refused.value.message and name in refused.value.message
        with pytest.raises(MCPError) as admin:
            await client.call_tool("mcpopt__cache_purge", {})
        assert admin.value.code == POLICY_DENIED and "administrative" in admin.value.message
        with pytest.raises(MCPError) as read:
            await client.read_resource("everything+demo://resource/static/document/architecture.md")
        assert read.value.code == POLICY_DENIED
    # The refused call never reached the upstream: no request the HTTP server saw carried it.
    assert not any("bob-was-here" in r["body"] for r in shared.upstream_requests())
    async with bearer_client(shared.url, shared.token("alice")) as admin_client:  # group ops: admin
        purged = await admin_client.call_tool("mcpopt__cache_purge", {})
        assert not purged.is_error


async def test_code_mode_only_where_granted_and_its_calls_obey_the_policy(shared: Shared) -> None:
    code = "return await tools.time.get_current_time(timezone='UTC')"
    async with bearer_client(shared.url, shared.token("bob")) as bob:
        with pytest.raises(MCPError) as refused:
            await bob.call_tool("mcpopt__execute_code", {"code": code})
        assert refused.value.code == POLICY_DENIED and "code mode" in refused.value.message
    async with bearer_client(shared.url, shared.token("dave")) as dave:
        # dave's own time session first (its process start is no part of the sandbox's time limit).
        assert not (await dave.call_tool("time__get_current_time", {"timezone": "UTC"})).is_error
        ok = await dave.call_tool("mcpopt__execute_code", {"code": code})
        assert not ok.is_error and "UTC" in text_of(ok)
        sneaky = await dave.call_tool(
            "mcpopt__execute_code", {"code": "return await tools.everything.echo(message='leak')"}
        )
        assert sneaky.is_error and "forbidden" in text_of(sneaky)


async def test_search_results_show_only_what_the_principal_may_call(shared: Shared) -> None:
    async with bearer_client(shared.url, shared.token("bob")) as client:
        found = await client.call_tool("mcpopt__search_tools", {"query": "current time in a timezone", "k": 10})
        lines = [ln for ln in text_of(found).splitlines() if ln.strip()]
        assert any(ln.startswith("time__get_current_time") for ln in lines), lines
        assert all(ln.startswith(("time__", "mcpopt__")) for ln in lines), lines
        assert not any(ln.startswith(("mcpopt__cache_purge", "mcpopt__run_performance")) for ln in lines)
        # What only another server has is not found for bob (and its schema does not exist for him).
        echo = text_of(await client.call_tool("mcpopt__search_tools", {"query": "echo a message back", "k": 10}))
        assert "everything__" not in echo and "hdr__" not in echo, echo
        with pytest.raises(MCPError):
            await client.call_tool("mcpopt__get_tool_schema", {"name": "everything__echo"})
    async with bearer_client(shared.url, shared.token("erin")) as client:  # the same search, another grant
        echo = text_of(await client.call_tool("mcpopt__search_tools", {"query": "echo a message back", "k": 10}))
        assert "everything__echo" in echo, echo


# ---- rate limits -----------------------------------------------------------------------------
async def test_rate_limit_with_a_clear_retry_hint(shared: Shared) -> None:
    token = shared.token("carol")
    async with bearer_client(shared.url, token) as client:
        for _ in range(3):
            assert not (await client.call_tool("everything__echo", {"message": "x"})).is_error
        with pytest.raises(MCPError) as limited:
            await client.call_tool("everything__echo", {"message": "x"})
        assert limited.value.code == RATE_LIMITED
        assert "rate limited" in limited.value.message and "retry in" in limited.value.message
        data = limited.value.error.data
        assert isinstance(data, dict) and 1 <= data["retryAfterSeconds"] <= 3600 and data["scope"] == "principal"
    # On the HTTP fast path the refusal is an HTTP 429 with Retry-After (before any upstream work).
    init = await raw_post(shared.url, initialize_body(), {"Authorization": f"Bearer {token}"})
    sid = init.headers["mcp-session-id"]
    auth = {"Authorization": f"Bearer {token}", "Mcp-Session-Id": sid}
    await raw_post(shared.url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, auth)
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "everything__echo", "arguments": {}}}
    resp = await raw_post(shared.url, call, auth)
    assert resp.status_code == 429
    assert 1 <= int(resp.headers["retry-after"]) <= 3600
    assert resp.json()["error"]["code"] == RATE_LIMITED
    # Another principal is not affected by carol's limit.
    async with bearer_client(shared.url, shared.token("erin")) as other:
        assert not (await other.call_tool("everything__echo", {"message": "y"})).is_error


# ---- credentials upstream ----------------------------------------------------------------------
async def test_the_upstream_never_receives_the_clients_token(shared: Shared) -> None:
    token = shared.token("alice")
    async with bearer_client(shared.url, token) as client:
        result = await client.call_tool("hdr__echo", {"text": "hello upstream"})
        assert text_of(result) == "hello upstream"
    seen = shared.upstream_requests()
    assert any("hello upstream" in r["body"] for r in seen)  # the recorder does see calls
    assert seen, "the HTTP upstream recorded no request"
    for request in seen:
        values = " ".join(request["headers"].values())
        assert token not in values and shared.api_key not in values
        assert request["headers"].get("authorization") == f"Bearer {UPSTREAM_SECRET}"  # its own credential
    # The upstream's credential is redacted everywhere the gateway shows things.
    async with bearer_client(shared.url, token) as client:
        status = await client.call_tool("mcpopt__get_performance_status", {})
        assert UPSTREAM_SECRET not in text_of(status)
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http:
        port = shared.url.split(":")[2].split("/")[0]
        for path in ("/healthz", "/metrics"):
            assert UPSTREAM_SECRET not in (await http.get(f"http://127.0.0.1:{port}{path}")).text


# ---- isolation -------------------------------------------------------------------------------
async def test_two_clients_with_different_roots_each_see_only_their_own(shared: Shared) -> None:
    def roots(uri: str, name: str) -> Any:
        async def callback(_context: Any) -> types.ListRootsResult:
            return types.ListRootsResult(roots=[types.Root(uri=uri, name=name)])

        return callback

    alice = bearer_client(shared.url, shared.token("alice"), list_roots_callback=roots("file:///home/alice", "alice"))
    erin = bearer_client(shared.url, shared.token("erin"), list_roots_callback=roots("file:///home/erin", "erin"))
    async with alice as a, erin as e:
        first = text_of(await a.call_tool("everything__get-roots-list", {}))
        second = text_of(await e.call_tool("everything__get-roots-list", {}))
        again = text_of(await a.call_tool("everything__get-roots-list", {}))
    assert "file:///home/alice" in first and "file:///home/erin" not in first, first
    assert "file:///home/erin" in second and "file:///home/alice" not in second, second
    assert "file:///home/alice" in again and "file:///home/erin" not in again, again


# ---- audit -----------------------------------------------------------------------------------
async def test_every_call_and_refusal_is_in_the_exported_audit_trail(shared: Shared) -> None:
    async with bearer_client(shared.url, shared.token("bob")) as client:
        assert not (await client.call_tool("time__get_current_time", {"timezone": "UTC"})).is_error
        with pytest.raises(MCPError):
            await client.call_tool("everything__echo", {"message": "audit me"})
        with pytest.raises(MCPError):
            await client.call_tool("mcpopt__cache_purge", {})
    async with bearer_client(shared.url, shared.token("carol")) as client:  # 3 an hour: the 4th is refused
        with pytest.raises(MCPError):
            for _ in range(4):
                await client.call_tool("time__get_current_time", {"timezone": "UTC"})
    out = shared.data_dir / "export.jsonl"
    deadline = time.monotonic() + 60
    rows: list[dict[str, Any]] = []
    command = [MCPOPT, "telemetry", "export", "-c", str(shared.config), "-o", str(out)]
    while time.monotonic() < deadline:  # telemetry is written in batches by a background thread
        await anyio.to_thread.run_sync(lambda: subprocess.run(command, check=True, cwd=str(ROOT), capture_output=True))
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line]
        if any(r["name"] == "mcpopt__cache_purge" and r["decision"] == "deny" for r in rows):
            break
        await anyio.sleep(0.3)
    denied = [r for r in rows if r["outcome"] == "denied"]
    assert any(r["name"] == "everything__echo" and r["policy_rule"] == "time-only" for r in denied), denied
    assert any(r["name"] == "mcpopt__cache_purge" and r["policy_rule"] == "admin" for r in denied)
    allowed = [r for r in rows if r["name"] == "time__get_current_time" and r["decision"] == "allow"]
    assert allowed and all(r["principal"] and r["principal"] != "bob" for r in allowed)  # hashed at standard
    principals = {r["principal"] for r in denied if r["policy_rule"] == "time-only"}
    assert len(principals) == 1 and principals <= {r["principal"] for r in allowed}
    assert any(r["outcome"] == "limited" and r["decision"] == "limit" for r in rows)  # carol's refusal


async def test_refusals_and_sessions_are_counted_in_prometheus(shared: Shared) -> None:
    await raw_post(shared.url, initialize_body())  # one more 401
    async with bearer_client(shared.url, shared.token("carol")) as client:  # at least one rate-limit refusal
        with pytest.raises(MCPError):
            for _ in range(4):
                await client.call_tool("everything__echo", {"message": "m"})
    port = shared.url.split(":")[2].split("/")[0]
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {shared.token('alice')}"}) as http:
        text = ""
        for _ in range(300):  # per-call metrics are fed from records by a background loop
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            if 'outcome="limited"' in text:
                break
            await anyio.sleep(0.1)

    def value(line_start: str) -> float:
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(line_start))

    assert value('mcpopt_auth_refused_total{status="401"}') >= 1
    assert value('mcpopt_rate_limited_total{scope="principal"}') >= 1
    assert value('mcpopt_isolated_sessions{server="everything"}') >= 1  # carol's own session at least
    assert 'outcome="limited"' in text


async def test_cli_checks_tokens_and_purges_as_an_admin(shared: Shared) -> None:
    def mcpopt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MCPOPT, *args], cwd=str(ROOT), capture_output=True, text=True, timeout=60)

    alice, bob = shared.token("alice"), shared.token("bob")
    checked = await anyio.to_thread.run_sync(
        lambda: mcpopt("auth", "check", alice, "-c", str(shared.config), "--resource", shared.url)
    )
    assert checked.returncode == 0, checked.stderr
    info = json.loads(checked.stdout)
    assert info["subject"] == "alice" and info["rules"] == ["ops"] and info["admin"] and info["groups"] == ["ops"]
    wrong = await anyio.to_thread.run_sync(
        lambda: mcpopt("auth", "check", alice, "-c", str(shared.config), "--resource", "http://elsewhere/mcp")
    )
    assert wrong.returncode == 1 and "not issued for this resource" in wrong.stderr
    purged = await anyio.to_thread.run_sync(lambda: mcpopt("cache", "purge", "--url", shared.url, "--token", alice))
    assert purged.returncode == 0, purged.stderr
    refused = await anyio.to_thread.run_sync(lambda: mcpopt("cache", "purge", "--url", shared.url, "--token", bob))
    assert refused.returncode == 1 and "may this credential use it" in refused.stderr  # bob does not even see it


async def test_a_2026_client_gets_the_same_policy(shared: Shared) -> None:
    """A stateless 2026-07-28 client (no fast path: the SDK dispatches it) is the same principal."""
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {shared.token('bob')}"}, timeout=30.0)
    async with Client(streamable_http_client(shared.url, http_client=http), mode="auto") as client:
        assert client.protocol_version == "2026-07-28"
        tools = [t.name for t in (await client.list_tools()).tools]
        assert tools and all(n.startswith(("time__", "mcpopt__")) for n in tools), tools
        assert not (await client.call_tool("time__get_current_time", {"timezone": "UTC"})).is_error
        with pytest.raises(MCPError) as refused:
            await client.call_tool("everything__echo", {"message": "x"})
        assert refused.value.code == POLICY_DENIED


async def test_stdio_stays_the_trusted_local_user(shared: Shared) -> None:
    """The same config served over stdio: no credential, everything listed and callable."""
    from conftest import gateway_client

    async with gateway_client(shared.config, mode="legacy") as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"everything__echo", "time__get_current_time", "mcpopt__cache_purge"} <= names
        assert not (await client.call_tool("everything__echo", {"message": "local"})).is_error
        assert not (await client.call_tool("mcpopt__cache_purge", {})).is_error


async def test_a_tool_needing_a_scope_the_token_lacks_gets_403_insufficient_scope(shared: Shared) -> None:
    erin = shared.token("erin")  # mcp:tools only
    async with bearer_client(shared.url, erin) as client:
        assert "everything__get-sum" not in {t.name for t in (await client.list_tools()).tools}
        with pytest.raises(MCPError) as refused:
            await client.call_tool("everything__get-sum", {"a": 1, "b": 2})
        assert refused.value.code == POLICY_DENIED and "mcp:admin" in refused.value.message
    init = await raw_post(shared.url, initialize_body(), {"Authorization": f"Bearer {erin}"})
    auth = {"Authorization": f"Bearer {erin}", "Mcp-Session-Id": init.headers["mcp-session-id"]}
    await raw_post(shared.url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, auth)
    call = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {"name": "everything__get-sum", "arguments": {"a": 1, "b": 2}},
    }
    resp = await raw_post(shared.url, call, auth)
    assert resp.status_code == 403
    params = challenge_params(resp.headers["www-authenticate"])
    assert params["error"] == "insufficient_scope" and params["scope"] == "mcp:admin"
    assert resp.json()["error"]["data"]["requiredScopes"] == ["mcp:admin"]
    async with bearer_client(shared.url, shared.token("alice")) as client:  # has mcp:admin
        assert "3" in text_of(await client.call_tool("everything__get-sum", {"a": 1, "b": 2}))


async def test_the_typescript_sdk_client_authenticates_and_is_served(shared: Shared) -> None:
    """npm `@modelcontextprotocol/sdk`: ClientCredentialsProvider + StreamableHTTPClientTransport."""
    from idp import node

    script = TS_CLIENT
    command = [node(), str(script), shared.url, shared.idp.issuer, "bob", "bob-pw", "time__get_current_time"]
    command.append(json.dumps({"timezone": "UTC"}))
    done = await anyio.to_thread.run_sync(
        lambda: subprocess.run(command, cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    upstream = [n for n in answer["tools"] if not n.startswith("mcpopt__")]
    assert upstream and all(n.startswith("time__") for n in upstream)  # bob's policy, for this client too
    assert not answer["result"].get("isError") and "UTC" in json.dumps(answer["result"])


async def test_changed_roots_reach_only_the_owners_session(shared: Shared) -> None:
    """`notifications/roots/list_changed` goes to the client's own upstream session, which asks its
    client again (between calls: on the client's own connection) -- and no one else's."""
    current = {"uri": "file:///work/v1"}

    async def frank_roots(_context: Any) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri=current["uri"], name="work")])

    async def erin_roots(_context: Any) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri="file:///home/erin", name="erin")])

    frank = bearer_client(shared.url, shared.token("frank"), list_roots_callback=frank_roots)
    erin = bearer_client(shared.url, shared.token("erin"), list_roots_callback=erin_roots)
    async with frank as a, erin as e:
        assert "file:///work/v1" in text_of(await a.call_tool("everything__get-roots-list", {}))
        current["uri"] = "file:///work/v2"
        await a.session.send_roots_list_changed()
        seen = ""
        for _ in range(100):  # the server re-asks asynchronously; the loop is a guard, not a verdict
            seen = text_of(await a.call_tool("everything__get-roots-list", {}))
            if "v2" in seen:
                break
            await anyio.sleep(0.1)
        assert "file:///work/v2" in seen and "v1" not in seen, seen
        other = text_of(await e.call_tool("everything__get-roots-list", {}))
        assert "file:///home/erin" in other and "/work/" not in other, other


async def test_healthz_details_only_for_an_admin_principal(shared: Shared) -> None:
    """The edge shows per-server details on /healthz to a principal whose policy grants admin."""
    port = shared.url.split(":")[2].split("/")[0]
    bodies = {}
    for who in ("alice", "bob"):
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {shared.token(who)}"}) as http:
            bodies[who] = (await http.get(f"http://127.0.0.1:{port}/healthz")).json()
    assert isinstance(bodies["alice"]["servers"], list)  # ops: admin
    assert {r["server"] for r in bodies["alice"]["servers"]} == {"everything", "time", "hdr"}
    assert set(bodies["bob"]["servers"]) == {"total", "ready", "not_ready"}  # a summary, no names
