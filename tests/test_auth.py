"""Token validation against a real authorization server (npm `oidc-provider`, client credentials).

JWT access tokens (RFC 9068) verified against the IdP's JWKS: issuer, audience (RFC 8707), expiry,
signature, unknown `kid` (re-fetch rate-limited), key rotation; opaque tokens by RFC 7662
introspection (cached); static API keys by SHA-256; the Principal built from the claims; the
RFC 9728 metadata and RFC 6750 challenges.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from idp import Idp, available, rsa_jwk

from conftest import free_port
from mcpopt.auth.errors import AuthError
from mcpopt.auth.metadata import challenge, metadata_paths, metadata_url, protected_resource_metadata
from mcpopt.auth.principal import LOCAL, Principal
from mcpopt.auth.tokens import ApiKeys, Authenticator, hash_key, new_key
from mcpopt.config import load_config
from mcpopt.errors import ConfigError

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not available(), reason="npm oidc-provider not installed (scripts/setup)"),
]

RESOURCE = "http://127.0.0.1:18080/mcp"
CLIENTS = [
    {"client_id": "alice", "client_secret": "alice-secret", "scope": "mcp:tools mcp:admin", "groups": ["ops"]},
    {"client_id": "bob", "client_secret": "bob-secret", "scope": "mcp:tools"},
    {"client_id": "opaque", "client_secret": "opaque-secret", "scope": "mcp:tools", "format": "opaque"},
    {"client_id": "brief", "client_secret": "brief-secret", "scope": "mcp:tools", "ttl": 3},
    {"client_id": "gateway", "client_secret": "gateway-secret", "scope": "mcp:tools"},
]


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Idp]:
    key, _ = rsa_jwk("key-1")
    server = Idp(tmp_path_factory.mktemp("idp"), free_port(), CLIENTS, [key])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def authenticator(idp: Idp, **auth: Any) -> Authenticator:
    settings = {"issuer": idp.issuer, "leeway_s": 0, **auth}
    cfg = load_config(data={"gateway": {"auth": settings}})
    return Authenticator(cfg.gateway.auth, RESOURCE)


async def test_valid_jwt_gives_its_principal(idp: Idp) -> None:
    auth = authenticator(idp)
    token = idp.access_token("alice", RESOURCE)
    p = await auth.authenticate(f"Bearer {token}")
    assert (p.kind, p.subject, p.client_id, p.issuer) == ("jwt", "alice", "alice", idp.issuer)
    assert p.scopes == {"mcp:tools", "mcp:admin"} and p.groups == {"ops"}
    assert p.key.startswith("p-") and p.key != LOCAL.key
    # Remembered: the same token again is a lookup, no second key-set fetch.
    fetched = auth.jwks.fetches if auth.jwks else -1
    assert await auth.authenticate(f"Bearer {token}") is p
    assert auth.jwks is not None and auth.jwks.fetches == fetched == 1
    # Another token of the same client is the same principal (same key: cache partition, limits).
    again = await auth.authenticate(f"Bearer {idp.access_token('alice', RESOURCE)}")
    assert again.key == p.key and again is not p
    await auth.aclose()


async def test_no_token_and_malformed_headers(idp: Idp) -> None:
    auth = authenticator(idp)
    with pytest.raises(AuthError) as missing:
        await auth.authenticate(None)
    assert missing.value.error is None  # RFC 6750 §3.1: no error code when no credential was sent
    for header in ("Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer    ", "token abc"):
        with pytest.raises(AuthError) as bad:
            await auth.authenticate(header)
        assert bad.value.error == "invalid_request", header
    with pytest.raises(AuthError, match="not a well-formed JWT|unknown token"):
        await auth.authenticate("Bearer a.b.c")
    with pytest.raises(AuthError, match="too long"):
        await auth.authenticate("Bearer " + "x" * 20_000)
    await auth.aclose()


async def test_wrong_audience_is_refused(idp: Idp) -> None:
    auth = authenticator(idp)
    other = idp.access_token("alice", "http://127.0.0.1:1/another-server/mcp")
    with pytest.raises(AuthError, match="not issued for this resource") as err:
        await auth.authenticate(f"Bearer {other}")
    assert err.value.error == "invalid_token"
    await auth.aclose()


async def test_expired_token_is_refused(idp: Idp) -> None:
    auth = authenticator(idp)
    token = idp.access_token("brief", RESOURCE)  # 3 s lifetime
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    try:  # valid now, and remembered
        assert (await auth.authenticate(f"Bearer {token}")).subject == "brief"
    except AuthError as exc:
        assert "expired" in str(exc)  # the machine stalled past the token's 3 s: the rest still holds
    while time.time() <= exp + 0.05:  # wait for the token's own exp, not a guessed duration
        await asyncio.sleep(0.1)
    # The remembered principal expires with its token too.
    with pytest.raises(AuthError, match="expired"):
        await auth.authenticate(f"Bearer {token}")
    fresh = authenticator(idp)
    with pytest.raises(AuthError, match="expired"):
        await fresh.authenticate(f"Bearer {token}")
    await auth.aclose()
    await fresh.aclose()


async def test_bad_signature_and_forged_tokens(idp: Idp) -> None:
    auth = authenticator(idp)
    token = idp.access_token("alice", RESOURCE)
    head, body, sig = token.split(".")
    flipped = sig[:-4] + ("AAAA" if sig[-4:] != "AAAA" else "BBBB")
    with pytest.raises(AuthError, match="signature"):
        await auth.authenticate(f"Bearer {head}.{body}.{flipped}")
    claims = jwt.decode(token, options={"verify_signature": False})
    # Same kid as the IdP's key, signed by someone else's key.
    _, rogue = rsa_jwk("key-1")
    forged = jwt.encode(claims, rogue, algorithm="RS256", headers={"kid": "key-1"})
    with pytest.raises(AuthError, match="signature"):
        await auth.authenticate(f"Bearer {forged}")
    # alg=none and HMAC (with the public key as secret, the classic confusion) are never accepted.
    unsigned = jwt.encode(claims, None, algorithm="none")
    with pytest.raises(AuthError, match="algorithm"):
        await auth.authenticate(f"Bearer {unsigned}")
    hmac = jwt.encode(claims, "s" * 32, algorithm="HS256", headers={"kid": "key-1"})
    with pytest.raises(AuthError, match="algorithm"):
        await auth.authenticate(f"Bearer {hmac}")
    # Claims changed after signing (a longer exp) break the signature.
    tampered_body = jwt.utils.base64url_encode(
        jwt.api_jws.json.dumps({**claims, "exp": claims["exp"] + 3600}).encode()
    ).decode()
    with pytest.raises(AuthError, match="signature"):
        await auth.authenticate(f"Bearer {head}.{tampered_body}.{sig}")
    await auth.aclose()


async def test_unknown_kid_refetches_at_most_once_per_interval(idp: Idp) -> None:
    auth = authenticator(idp, jwks_refresh_min_s=3600)
    good = idp.access_token("bob", RESOURCE)
    await auth.authenticate(f"Bearer {good}")
    before = idp.jwks_fetches()
    claims = jwt.decode(good, options={"verify_signature": False})
    _, rogue = rsa_jwk("x")
    for i in range(20):
        forged = jwt.encode({**claims, "jti": str(i)}, rogue, algorithm="RS256", headers={"kid": f"unknown-{i}"})
        with pytest.raises(AuthError, match="signing key"):
            await auth.authenticate(f"Bearer {forged}")
    # The first unknown kid may re-fetch the set (the cache was just filled: within the interval,
    # so none at all); twenty forged kids never cost the IdP twenty fetches.
    assert idp.jwks_fetches() - before <= 1
    await auth.aclose()


async def test_key_rotation_is_picked_up_on_kid_miss(tmp_path: Path) -> None:
    old, _ = rsa_jwk("old")
    server = Idp(tmp_path, free_port(), CLIENTS, [old])
    server.start()
    try:
        auth = authenticator(server, jwks_refresh_min_s=0)
        assert (await auth.authenticate(f"Bearer {server.access_token('bob', RESOURCE)}")).subject == "bob"
        new, _ = rsa_jwk("new")
        server.restart([new, old])  # the IdP now signs with "new"; the gateway has only "old" cached
        token = server.access_token("bob", RESOURCE)
        assert jwt.get_unverified_header(token)["kid"] == "new"
        assert (await auth.authenticate(f"Bearer {token}")).subject == "bob"
        assert auth.jwks is not None and set(auth.jwks.keys) == {"new", "old"}
        await auth.aclose()
    finally:
        server.stop()


async def test_opaque_tokens_by_introspection(idp: Idp, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_INTROSPECTION_SECRET", "gateway-secret")
    auth = authenticator(idp, introspection={"client_id": "gateway", "client_secret_env": "TEST_INTROSPECTION_SECRET"})
    token = idp.access_token("opaque", RESOURCE)
    assert token.count(".") != 2  # opaque indeed
    p = await auth.authenticate(f"Bearer {token}")
    assert (p.kind, p.subject, p.client_id, p.scopes) == ("introspection", "opaque", "opaque", {"mcp:tools"})
    assert auth.introspector is not None and auth.introspector.requests == 1
    # A second authenticator shares nothing but the IdP: the answer is cached by token hash.
    assert (await auth.authenticate(f"Bearer {token}")).subject == "opaque"
    assert auth.introspector.requests == 1
    # Opaque for another resource: active at the IdP, but not ours.
    elsewhere = idp.access_token("opaque", "http://127.0.0.1:1/other")
    with pytest.raises(AuthError, match="not issued for this resource"):
        await auth.authenticate(f"Bearer {elsewhere}")
    # Unknown: not active; asked once, then the negative answer is reused.
    for _ in range(3):
        with pytest.raises(AuthError, match="not active"):
            await auth.authenticate("Bearer not-a-token-the-idp-knows")
    assert auth.introspector.requests == 3
    await auth.aclose()


async def test_api_keys_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ci, ops = new_key(), new_key()
    assert ci.startswith("mcpk_") and len(ci) > 40 and ci != ops
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# team keys\nci-bot {hash_key(ci)} mcp:tools\n\n", encoding="utf-8")
    monkeypatch.setenv("TEST_KEYS", f"ops {hash_key(ops)} mcp:tools mcp:admin")
    cfg = load_config(data={"gateway": {"auth": {"api_keys": {"file": str(keys), "env": "TEST_KEYS"}}}})
    assert cfg.gateway.auth.enabled
    assert ci not in keys.read_text() and ops not in str(cfg.model_dump())  # only hashes are kept
    auth = Authenticator(cfg.gateway.auth, RESOURCE)
    p = await auth.authenticate(f"Bearer {ci}")
    assert (p.kind, p.api_key, p.subject, p.scopes) == ("api_key", "ci-bot", "apikey:ci-bot", {"mcp:tools"})
    q = await auth.authenticate(None, api_key=ops)
    assert q.api_key == "ops" and "mcp:admin" in q.scopes and q.key != p.key
    with pytest.raises(AuthError, match="unknown"):
        await auth.authenticate(None, api_key="mcpk_wrong")
    with pytest.raises(AuthError, match="unknown token"):
        await auth.authenticate("Bearer mcpk_wrong")
    await auth.aclose()


def test_api_key_lines_are_checked() -> None:
    with pytest.raises(ConfigError) as err:
        ApiKeys([("keys.txt:3", "ci-bot mcpk_plaintextkey")])
    assert "keys.txt:3" in str(err.value) and "mcpk_plaintextkey" not in str(err.value)
    with pytest.raises(ConfigError):
        ApiKeys([("x:1", "ci sha256:" + "z" * 64)])
    assert len(ApiKeys([("x:1", "ci " + hash_key("k"))])) == 1


def test_auth_is_off_by_default_and_config_errors_are_clear() -> None:
    assert not load_config(data={}).gateway.auth.enabled
    with pytest.raises(ConfigError, match="asymmetric"):
        load_config(data={"gateway": {"auth": {"issuer": "http://x", "algorithms": ["HS256"]}}})
    with pytest.raises(ConfigError, match="exactly one of client_secret_env"):
        load_config(data={"gateway": {"auth": {"introspection": {"client_id": "g"}}}})


def test_protected_resource_metadata_and_challenges() -> None:
    assert metadata_url("https://mcp.example.com/mcp") == (
        "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"
    )
    assert metadata_paths("https://mcp.example.com/mcp") == [
        "/.well-known/oauth-protected-resource/mcp",
        "/.well-known/oauth-protected-resource",
    ]
    assert metadata_paths("https://mcp.example.com/") == ["/.well-known/oauth-protected-resource"]
    doc = protected_resource_metadata("https://m/mcp", ["https://idp"], ["mcp:tools"], "team gateway")
    assert doc == {
        "resource": "https://m/mcp",
        "authorization_servers": ["https://idp"],
        "bearer_methods_supported": ["header"],
        "scopes_supported": ["mcp:tools"],
        "resource_name": "team gateway",
    }
    assert "authorization_servers" not in protected_resource_metadata("https://m/mcp", [], [])
    assert challenge("https://m/.well-known/oauth-protected-resource/mcp", ["a", "b"]) == (
        'Bearer resource_metadata="https://m/.well-known/oauth-protected-resource/mcp", scope="a b"'
    )
    value = challenge("u", [], "invalid_token", 'bad "quote"\nline')
    assert value == 'Bearer resource_metadata="u", error="invalid_token", error_description="bad  quote  line"'


def test_principal_keys_are_stable_and_distinct() -> None:
    a1 = Principal("alice", "jwt", issuer="https://idp")
    a2 = Principal("alice", "introspection", issuer="https://idp", scopes=frozenset({"x"}))
    assert a1.key == a2.key  # one person, whatever the token format
    assert Principal("alice", "jwt", issuer="https://other").key != a1.key
    assert Principal("apikey:alice", "api_key", api_key="alice").key != a1.key
    assert LOCAL.key == "" and LOCAL.is_local
    assert a1.audit_id("standard", lambda k: "h:" + k) == "h:" + a1.key
    assert a1.audit_id("detailed", lambda k: "h:" + k) == "alice"
    assert a1.audit_id("minimal", lambda k: "h:" + k) == ""


def test_cli_new_key_prints_a_key_and_its_hash_line() -> None:
    import subprocess

    from conftest import MCPOPT

    made = subprocess.run([MCPOPT, "auth", "new-key", "ci-bot", "-s", "mcp:tools"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    key, line = made.stdout.split()[0], made.stdout.strip().splitlines()[1]
    assert key.startswith("mcpk_") and line == f"ci-bot {hash_key(key)} mcp:tools"
    hashed = subprocess.run([MCPOPT, "auth", "hash-key"], input=key + "\n", capture_output=True, text=True)
    assert hashed.stdout.strip() == hash_key(key)
    assert len(ApiKeys([("line", line)])) == 1


async def test_an_unreachable_authorization_server_is_503_not_401() -> None:
    from mcpopt.auth.asgi import AuthMiddleware
    from mcpopt.auth.errors import AuthUnavailable

    cfg = load_config(data={"gateway": {"auth": {"issuer": f"http://127.0.0.1:{free_port()}"}}})
    auth = Authenticator(cfg.gateway.auth, RESOURCE)
    _, key = rsa_jwk("k")
    token = jwt.encode({"sub": "x", "exp": int(time.time()) + 60}, key, algorithm="RS256", headers={"kid": "k"})
    with pytest.raises(AuthUnavailable):
        await auth.authenticate(f"Bearer {token}")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("an unchecked request must not reach the app")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    mw = AuthMiddleware(app, cfg.gateway.auth, RESOURCE, authenticator=auth)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/mcp",
        "headers": [(b"authorization", f"Bearer {token}".encode())],
    }
    await mw(scope, None, send)
    start = sent[0]
    assert start["status"] == 503 and (b"retry-after", b"5") in start["headers"]
    assert not any(k == b"www-authenticate" for k, _ in start["headers"])
    await auth.aclose()


async def test_metadata_route_methods() -> None:
    from mcpopt.auth.asgi import AuthMiddleware

    cfg = load_config(data={"gateway": {"auth": {"issuer": "http://127.0.0.1:1"}}})

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("metadata is answered by the middleware")

    mw = AuthMiddleware(app, cfg.gateway.auth, RESOURCE)
    for method, status in (("GET", 200), ("OPTIONS", 204), ("POST", 405)):
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any], out: list[dict[str, Any]] = sent) -> None:
            out.append(message)

        path = "/.well-known/oauth-protected-resource/mcp"
        await mw({"type": "http", "method": method, "path": path, "headers": []}, None, send)
        assert sent[0]["status"] == status, method
        if method == "GET":
            assert (b"access-control-allow-origin", b"*") in sent[0]["headers"]
            assert b'"resource":"' + RESOURCE.encode() + b'"' in sent[1]["body"]
    await mw.authenticator.aclose()
