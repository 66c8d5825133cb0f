"""Turning a credential into a `Principal`: JWTs against a JWKS, RFC 7662 introspection, API keys.

- **JWT** (RFC 9068 access tokens, or any JWS the issuer signs): PyJWT verifies the signature
  with a key from the issuer's JWKS and checks `iss`, `aud` (the gateway's resource URL, RFC 8707),
  `exp` and `nbf` (with `leeway_s`); `exp` is required. Keys are cached by `kid`; an unknown `kid`
  triggers one re-fetch of the key set, at most every `jwks_refresh_min_s`, so a flood of forged
  kids costs the IdP one request per interval. PyJWT's own `PyJWKClient` is not used because it
  fetches with blocking `urllib` inside the event loop and refreshes on every miss; its `PyJWKSet`
  parses the keys.
- **Opaque tokens** (no JWS shape) go to the authorization server's RFC 7662 introspection
  endpoint, when configured; answers are cached by the token's SHA-256 until `exp` (at most
  `cache_s`), inactive ones for `negative_cache_s`.
- **API keys** (`Authorization: Bearer <key>` or `X-API-Key`) are matched by SHA-256: the config
  holds only hashes. They are random secrets (`mcpopt auth new-key`), so a plain digest suffices;
  a password KDF (scrypt) would add ~50 ms per request and protect nothing more for 256-bit keys.

Verified credentials are remembered (the token string -> its `Principal`, until `exp`, bounded
LRU): a repeated bearer token costs one dict lookup, which keeps authentication well inside the
50 us per call target (issue 10) once the JWKS is cached.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx2
import jwt
from jwt import PyJWK, PyJWKSet

from mcpopt.auth.errors import AuthError, AuthUnavailable
from mcpopt.auth.principal import Principal, principal_from_claims
from mcpopt.config import AuthSettings
from mcpopt.errors import ConfigError

logger = logging.getLogger(__name__)

MAX_REMEMBERED = 10_000
"""Verified tokens (and introspection answers) kept, oldest dropped first: bounds memory at ~10-20 MB."""
FAILED_RETRY_S = 5.0
"""After a failed key-set fetch, the next one is tried after at most this long (seconds)."""
MAX_TOKEN_BYTES = 16_384
"""Longer bearer values are refused before any parsing (no IdP issues such tokens)."""


def _canonical(url: str) -> str:
    return url.rstrip("/")


class AuthorizationServerMetadata:
    """RFC 8414 / OpenID Connect discovery of one issuer, fetched once and kept.

    `get()` tries `/.well-known/oauth-authorization-server` (path-inserted, RFC 8414 §3.1), then
    `/.well-known/openid-configuration` (OIDC Discovery §4) and returns the first JSON document
    whose `issuer` is the configured one.

    Raises (from `get`):
        AuthError: the metadata cannot be fetched (the request is refused, not served blindly).
    """

    RETRY_S = 5.0
    """After a failed discovery, requests are refused at once for this long (no IdP hammering)."""

    def __init__(self, issuer: str, http: httpx2.AsyncClient) -> None:
        self.issuer = issuer
        self.http = http
        self.doc: dict[str, Any] | None = None
        self._lock = asyncio.Lock()
        self._failed_at = -1e18

    def _candidates(self) -> list[str]:
        from urllib.parse import urlsplit

        parts = urlsplit(self.issuer)
        path = parts.path.rstrip("/")
        origin = f"{parts.scheme}://{parts.netloc}"
        return [
            f"{origin}/.well-known/oauth-authorization-server{path}",
            f"{_canonical(self.issuer)}/.well-known/openid-configuration",
            f"{origin}/.well-known/openid-configuration{path}",
        ]

    async def get(self) -> dict[str, Any]:
        if self.doc is not None:
            return self.doc
        async with self._lock:
            if self.doc is not None:
                return self.doc
            if time.monotonic() - self._failed_at < self.RETRY_S:
                raise AuthUnavailable(f"the gateway cannot reach its authorization server's metadata ({self.issuer})")
            errors = []
            for url in dict.fromkeys(self._candidates()):
                try:
                    resp = await self.http.get(url)
                    if resp.status_code != 200:
                        errors.append(f"{url}: HTTP {resp.status_code}")
                        continue
                    doc = resp.json()
                except (httpx2.HTTPError, ValueError) as exc:
                    errors.append(f"{url}: {type(exc).__name__}")
                    continue
                if isinstance(doc, dict) and _canonical(str(doc.get("issuer", ""))) == _canonical(self.issuer):
                    self.doc = doc
                    return doc
                errors.append(f"{url}: issuer mismatch")
            self._failed_at = time.monotonic()
            logger.warning("authorization server metadata of %s not found (%s)", self.issuer, "; ".join(errors))
            raise AuthUnavailable(f"the gateway cannot reach its authorization server's metadata ({self.issuer})")


class JwksCache:
    """Signing keys of one issuer by `kid`, re-fetched on a miss (rate-limited) and when stale.

    Args:
        uri: the JWKS URL, or a coroutine function returning it (from the issuer's metadata).
        http: the HTTP client.
        min_refresh_s: fewest seconds between two fetches caused by unknown kids.
        max_age_s: keys older than this are re-fetched in the background (stale keys still serve).

    Attributes:
        fetches: key-set fetches made (tests and `/metrics` read it).
    """

    def __init__(self, uri: Any, http: httpx2.AsyncClient, *, min_refresh_s: float, max_age_s: float) -> None:
        self._uri = uri
        self.http = http
        self.min_refresh_s = min_refresh_s
        self.max_age_s = max_age_s
        self.keys: dict[str, PyJWK] = {}
        self._anonymous: list[PyJWK] = []
        self._fetched_at = -1e18
        self._attempted_at = -1e18
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        self._failing = False
        self.fetches = 0

    async def key(self, kid: str | None, alg: str) -> PyJWK:
        """The verification key for a JWS header's `kid` and `alg`.

        Raises:
            AuthError: no such key (after at most one re-fetch), or the key is for another algorithm.
        """
        found = self._lookup(kid)
        now = time.monotonic()
        # After a failed fetch, try again sooner (the IdP may be back), still never in a tight loop.
        interval = min(self.min_refresh_s, FAILED_RETRY_S) if self._failing else self.min_refresh_s
        if found is None and now - self._attempted_at >= interval:
            await self._refresh(now)
            found = self._lookup(kid)
        elif found is not None and now - self._fetched_at > self.max_age_s and self._background is None:
            self._background = asyncio.ensure_future(self._refresh_in_background())
        if found is None:
            if self._failing:  # the set could not be fetched: the key may exist, the token may be fine
                raise AuthUnavailable("the gateway cannot fetch its authorization server's signing keys")
            raise AuthError(f"the token's signing key (kid {kid!r}) is not in the issuer's key set")
        if found.algorithm_name and found.algorithm_name != alg and found._jwk_data.get("alg"):  # noqa: SLF001
            raise AuthError(f"the token's algorithm {alg} does not match its key's ({found.algorithm_name})")
        return found

    def _lookup(self, kid: str | None) -> PyJWK | None:
        if kid is not None:
            return self.keys.get(kid)
        # No kid in the header: usable only when the set has a single signing key.
        pool = [*self.keys.values(), *self._anonymous]
        return pool[0] if len(pool) == 1 else None

    async def _refresh_in_background(self) -> None:
        try:
            await self._refresh(time.monotonic())
        except AuthError:  # AuthUnavailable: stale keys keep serving; the failure was logged
            pass
        finally:
            self._background = None

    async def _refresh(self, now: float) -> None:
        async with self._lock:
            if self._attempted_at >= now:  # another request fetched while this one waited
                return
            self._attempted_at = time.monotonic()
            try:
                uri = self._uri if isinstance(self._uri, str) else await self._uri()
            except AuthUnavailable:
                self._failing = True
                raise
            self.fetches += 1
            try:
                resp = await self.http.get(uri)
                resp.raise_for_status()
                keyset = PyJWKSet.from_dict(resp.json())
            except (httpx2.HTTPError, ValueError, jwt.PyJWKSetError) as exc:
                self._failing = True
                logger.warning("fetching the key set %s failed: %s", uri, exc)
                raise AuthUnavailable("the gateway cannot fetch its authorization server's signing keys") from None
            self._failing = False
            keys: dict[str, PyJWK] = {}
            anonymous: list[PyJWK] = []
            for k in keyset.keys:
                if k._jwk_data.get("use", "sig") != "sig":  # noqa: SLF001
                    continue
                if k.key_id:
                    keys[k.key_id] = k
                else:
                    anonymous.append(k)
            self.keys, self._anonymous = keys, anonymous
            self._fetched_at = time.monotonic()


class Introspector:
    """RFC 7662 token introspection with client_secret_basic authentication, cached.

    Raises (from `introspect`):
        AuthError: the token is not active, or the endpoint cannot be reached.
    """

    def __init__(self, settings: Any, endpoint: Any, http: httpx2.AsyncClient) -> None:
        self.settings = settings
        self._endpoint = endpoint
        self.http = http
        secret = _secret(settings)
        creds = f"{settings.client_id}:{secret}".encode()
        self._auth_header = "Basic " + base64.b64encode(creds).decode()
        self._cache: OrderedDict[str, tuple[float, dict[str, Any] | None]] = OrderedDict()
        self.requests = 0

    async def introspect(self, token: str) -> dict[str, Any]:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.time()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(digest)
            if hit[1] is None:
                raise AuthError("the token is not active (revoked, expired or unknown)")
            return hit[1]
        endpoint = self._endpoint if isinstance(self._endpoint, str) else await self._endpoint()
        self.requests += 1
        try:
            resp = await self.http.post(
                endpoint,
                data={"token": token, "token_type_hint": "access_token"},
                headers={"Authorization": self._auth_header, "Accept": "application/json"},
                timeout=self.settings.timeout_s,
            )
            resp.raise_for_status()
            answer = resp.json()
        except (httpx2.HTTPError, ValueError) as exc:
            logger.warning("token introspection at %s failed: %s", endpoint, exc)
            raise AuthUnavailable("the gateway cannot check the token (introspection failed)") from None
        if not isinstance(answer, dict) or answer.get("active") is not True:
            self._remember(digest, now + self.settings.negative_cache_s, None)
            raise AuthError("the token is not active (revoked, expired or unknown)")
        exp = answer.get("exp")
        until = now + self.settings.cache_s
        if isinstance(exp, (int, float)):
            until = min(until, float(exp))
        self._remember(digest, until, answer)
        return answer

    def _remember(self, digest: str, until: float, answer: dict[str, Any] | None) -> None:
        self._cache[digest] = (until, answer)
        self._cache.move_to_end(digest)
        while len(self._cache) > MAX_REMEMBERED:
            self._cache.popitem(last=False)


def _secret(settings: Any) -> str:
    if settings.client_secret_env:
        value = os.environ.get(settings.client_secret_env)
        if not value:
            raise ConfigError(
                "(environment)",
                "gateway.auth.introspection.client_secret_env",
                f"the environment variable {settings.client_secret_env} to hold the client secret",
            )
        return value
    path = Path(settings.client_secret_file).expanduser()
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            "", "gateway.auth.introspection.client_secret_file", f"a readable file ({path}: {exc.strerror})"
        ) from None


class ApiKeys:
    """Static API keys by SHA-256 (see `mcpopt.config.ApiKeySettings` for the line format).

    Raises (from the constructor):
        ConfigError: a malformed line (naming its file and line number, never its content).
    """

    def __init__(self, lines: Iterable[tuple[str, str]] = ()) -> None:
        self.by_hash: dict[str, Principal] = {}
        for where, line in lines:
            self._add(where, line)

    @classmethod
    def from_settings(cls, settings: Any) -> ApiKeys:
        lines: list[tuple[str, str]] = []
        if settings.file:
            path = Path(settings.file).expanduser()
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(
                    "", "gateway.auth.api_keys.file", f"a readable file ({path}: {exc.strerror})"
                ) from None
            lines += [(f"{path}:{i}", ln) for i, ln in enumerate(text.splitlines(), 1)]
        if settings.env and os.environ.get(settings.env):
            raw = os.environ[settings.env].replace(",", "\n")
            lines += [(f"${settings.env} entry {i}", ln) for i, ln in enumerate(raw.splitlines(), 1)]
        return cls(lines)

    def _add(self, where: str, line: str) -> None:
        line = line.split("#", 1)[0].strip()
        if not line:
            return
        parts = line.split()
        if len(parts) < 2 or not parts[1].startswith("sha256:") or len(parts[1]) != 7 + 64:
            raise ConfigError(where, "gateway.auth.api_keys", "a line '<name> sha256:<64 hex digits> [scope ...]'")
        digest = parts[1][7:].lower()
        try:
            bytes.fromhex(digest)
        except ValueError:
            raise ConfigError(where, "gateway.auth.api_keys", "sha256:<64 hex digits> after the key's name") from None
        name = parts[0]
        self.by_hash[digest] = Principal(
            subject=f"apikey:{name}", kind="api_key", api_key=name, scopes=frozenset(parts[2:])
        )

    def __len__(self) -> int:
        return len(self.by_hash)

    def match(self, key: str) -> Principal | None:
        return self.by_hash.get(hashlib.sha256(key.encode()).hexdigest())


def hash_key(key: str) -> str:
    """`sha256:<hex>` of an API key, as the key lines hold it."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh API key: `mcpk_` + 43 characters of URL-safe base64 (256 random bits)."""
    import secrets

    return "mcpk_" + secrets.token_urlsafe(32)


class Authenticator:
    """Checks the credential of one HTTP request (see the module docstring).

    Args:
        settings: `gateway.auth`.
        resource: the gateway's resource URL (the default audience), e.g. `http://127.0.0.1:8080/mcp`.

    Use `await authenticate(authorization, api_key)`; call `await aclose()` at shutdown.
    """

    def __init__(self, settings: AuthSettings, resource: str) -> None:
        self.settings = settings
        self.resource = resource
        aud = settings.audience or [resource]
        self.audiences = list(dict.fromkeys([*aud, *(_canonical(a) for a in aud), *(_canonical(a) + "/" for a in aud)]))
        self.api_keys = ApiKeys.from_settings(settings.api_keys)
        self._http: httpx2.AsyncClient | None = None
        self.metadata: AuthorizationServerMetadata | None = None
        self.jwks: JwksCache | None = None
        self.introspector: Introspector | None = None
        self._remembered: OrderedDict[str, Principal] = OrderedDict()
        self._groups = tuple(settings.groups_claims)
        self._algorithms = list(settings.algorithms)
        self.refused = {"401": 0, "403": 0}
        """HTTP requests the edge refused (counted by `AuthMiddleware`)."""
        if settings.issuer or settings.jwks_uri or settings.introspection is not None:
            self._http = httpx2.AsyncClient(timeout=settings.timeout_s, follow_redirects=False)
            if settings.issuer:
                self.metadata = AuthorizationServerMetadata(settings.issuer, self._http)
            if settings.jwks_uri or self.metadata is not None:
                self.jwks = JwksCache(
                    settings.jwks_uri or self._jwks_uri,
                    self._http,
                    min_refresh_s=settings.jwks_refresh_min_s,
                    max_age_s=settings.jwks_max_age_s,
                )
            if settings.introspection is not None:
                endpoint = settings.introspection.endpoint or self._introspection_endpoint
                self.introspector = Introspector(settings.introspection, endpoint, self._http)

    async def _jwks_uri(self) -> str:
        assert self.metadata is not None
        uri = (await self.metadata.get()).get("jwks_uri")
        if not isinstance(uri, str):
            raise AuthError(f"the authorization server {self.settings.issuer} publishes no jwks_uri")
        return uri

    async def _introspection_endpoint(self) -> str:
        if self.metadata is None:
            raise AuthError("token introspection needs gateway.auth.introspection.endpoint or gateway.auth.issuer")
        uri = (await self.metadata.get()).get("introspection_endpoint")
        if not isinstance(uri, str):
            raise AuthError(f"the authorization server {self.settings.issuer} publishes no introspection_endpoint")
        return uri

    def stats(self) -> dict[str, Any]:
        """`{refused: {"401": n, "403": n}, jwks_fetches, introspections, api_keys, remembered}`."""
        return {
            "refused": dict(self.refused),
            "jwks_fetches": self.jwks.fetches if self.jwks is not None else 0,
            "introspections": self.introspector.requests if self.introspector is not None else 0,
            "api_keys": len(self.api_keys),
            "remembered": len(self._remembered),
        }

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    # ---- the check ---------------------------------------------------------------------
    async def authenticate(self, authorization: str | None, api_key: str | None = None) -> Principal:
        """The principal behind an `Authorization` header value (and/or an `X-API-Key` value).

        Raises:
            AuthError: no credential (`error` None), a malformed header (`invalid_request`), or
                a credential that does not verify (`invalid_token`, with the reason).
        """
        if authorization is None:
            if api_key is not None:
                principal = self.api_keys.match(api_key)
                if principal is None:
                    raise AuthError("unknown API key")
                return principal
            raise AuthError("this gateway needs a bearer token (see its protected-resource metadata)", error=None)
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("the Authorization header must be 'Bearer <token>'", error="invalid_request")
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("the bearer token is too long")
        known = self._remembered.get(token)
        if known is not None:
            if known.expires_at is None or known.expires_at + self.settings.leeway_s > time.time():
                return known
            del self._remembered[token]
        principal = await self._verify(token)
        self._remember(token, principal)
        return principal

    async def _verify(self, token: str) -> Principal:
        if token.count(".") == 2 and self.jwks is not None:
            return await self._verify_jwt(token)
        principal = self.api_keys.match(token)
        if principal is not None:
            return principal
        if self.introspector is not None:
            return await self._verify_introspection(token)
        if token.count(".") == 2:
            raise AuthError("JWT access tokens are not accepted here (no issuer or key set configured)")
        raise AuthError("unknown token")

    async def _verify_jwt(self, token: str) -> Principal:
        assert self.jwks is not None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise AuthError("the token is not a well-formed JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthError(f"the token's algorithm {alg!r} is not accepted")
        kid = header.get("kid")
        key = await self.jwks.key(kid if isinstance(kid, str) else None, alg)
        s = self.settings
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=self.audiences,
                issuer=s.issuer or None,
                leeway=s.leeway_s,
                options={"require": ["exp"], "verify_iss": bool(s.issuer)},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("the token is not valid yet (nbf / iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthError(f"the token was not issued for this resource (audience must be {self.resource})") from None
        except jwt.InvalidIssuerError:
            raise AuthError(f"the token was not issued by {s.issuer}") from None
        except jwt.InvalidSignatureError:
            raise AuthError("the token's signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"the token has no {exc.claim!r} claim") from None
        except jwt.PyJWTError:
            raise AuthError("the token is not a valid JWT") from None
        return principal_from_claims(claims, "jwt", self._groups)

    async def _verify_introspection(self, token: str) -> Principal:
        assert self.introspector is not None
        answer = await self.introspector.introspect(token)
        now = time.time()
        leeway = self.settings.leeway_s
        exp = answer.get("exp")
        if isinstance(exp, (int, float)) and exp + leeway < now:
            raise AuthError("the token has expired")
        nbf = answer.get("nbf")
        if isinstance(nbf, (int, float)) and nbf - leeway > now:
            raise AuthError("the token is not valid yet (nbf in the future)")
        iss = answer.get("iss")
        if self.settings.issuer and iss is not None and _canonical(str(iss)) != _canonical(self.settings.issuer):
            raise AuthError(f"the token was not issued by {self.settings.issuer}")
        aud = answer.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(a in self.audiences for a in auds):
            raise AuthError(f"the token was not issued for this resource (audience must be {self.resource})")
        return principal_from_claims(answer, "introspection", self._groups)

    def _remember(self, token: str, principal: Principal) -> None:
        remembered = self._remembered
        remembered[token] = principal
        if len(remembered) > MAX_REMEMBERED:
            remembered.popitem(last=False)
