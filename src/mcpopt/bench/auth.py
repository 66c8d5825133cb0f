"""What authentication, policy and rate limits cost per call (`mcpopt bench overhead --auth`).

Two measurements:

- **End to end** (a row of the overhead table): `tools/call` through `mcpopt serve -t http` with
  `gateway.auth` on (a bearer JWT, RS256, verified against a JWKS this benchmark serves itself on
  127.0.0.1, so no authorization server is needed), a policy rule and a per-principal rate limit,
  beside the same gateway without auth, calls alternated between the two.
- **In process** (microseconds): the ASGI authentication layer on one request with a token it has
  seen (the steady state: one dict lookup), with a fresh token (JWKS cached: header parse, RS256
  signature check, claims), and the policy + rate-limit filters on one call. Each figure is the
  p50/p95/p99 of `n` runs minus the same runs of an empty stand-in (the bare ASGI call, the bare
  filter chain), after warm-up.

The tokens are minted here with PyJWT and a fresh RSA-2048 key: this benchmark plays the
authorization server, which is what lets it run offline. The target (issue 10): <= 50 us p50
with a cached JWKS.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

KID = "bench-key"


class Signer:
    """An RSA-2048 signing key and its public JWKS (`{"keys": [...]}`)."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        public.update({"kid": KID, "alg": "RS256", "use": "sig"})
        self.jwks = {"keys": [public]}

    def token(self, issuer: str, audience: str, subject: str = "bench", ttl_s: int = 3600, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": issuer, "aud": audience, "sub": subject, "iat": now, "exp": now + ttl_s, **claims}
        return jwt.encode(payload, self.key, algorithm="RS256", headers={"kid": KID, "typ": "at+jwt"})


@contextlib.contextmanager
def serve_jwks(signer: Signer) -> Iterator[str]:
    """Serve `signer.jwks` at `http://127.0.0.1:<port>/jwks` from a thread; yields the issuer URL."""
    body = json.dumps(signer.jwks).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path != "/jwks":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def auth_config(issuer: str) -> dict[str, Any]:
    """`gateway` keys for the benchmark gateway with auth: JWT, a policy rule, a rate limit."""
    return {
        "auth": {"issuer": issuer, "jwks_uri": f"{issuer}/jwks", "required_scopes": ["mcp:tools"]},
        "policy": {"rules": [{"name": "bench", "match": {"subjects": ["bench"]}, "servers": ["*"]}]},
        "limits": {"per_principal": ["1000000/minute"]},
    }


def _stats(samples: list[float]) -> dict[str, float]:
    from mcpopt.monitor.stats import percentile

    s = sorted(samples)
    return {"p50_us": percentile(s, 0.50), "p95_us": percentile(s, 0.95), "p99_us": percentile(s, 0.99)}


async def in_process_costs(n: int = 5000, warmup: int = 500) -> list[dict[str, Any]]:
    """Microseconds per request/call of the auth layer and the access filters (see the module doc).

    Returns:
        rows `{what, p50_us, p95_us, p99_us, runs}`; each figure is with-part minus without-part
        at the same percentile.
    """
    from mcpopt.auth.asgi import AuthMiddleware
    from mcpopt.auth.policy import Policy
    from mcpopt.auth.ratelimit import RateLimiter
    from mcpopt.config import load_config
    from mcpopt.pipeline import Pipeline, ToolCall
    from mcpopt.pipeline.access import PolicyFilter, RateLimitFilter

    signer = Signer()
    rows: list[dict[str, Any]] = []
    with serve_jwks(signer) as issuer:
        resource = "http://127.0.0.1:1/mcp"
        cfg = load_config(data={"gateway": auth_config(issuer)})

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            return None

        mw = AuthMiddleware(app, cfg.gateway.auth, resource)
        token = signer.token(issuer, resource, scope="mcp:tools")
        headers = [(b"host", b"127.0.0.1:1"), (b"authorization", f"Bearer {token}".encode())]

        def scope() -> dict[str, Any]:
            return {"type": "http", "method": "POST", "path": "/mcp", "headers": headers}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, Any]) -> None:
            return None

        async def timed(fn: Any, runs: int) -> list[float]:
            out = []
            for _ in range(runs):
                t0 = time.perf_counter()
                await fn()
                out.append((time.perf_counter() - t0) * 1e6)
            return out

        async def bare() -> None:
            await app(scope(), receive, send)

        async def with_auth() -> None:
            await mw(scope(), receive, send)

        await timed(with_auth, warmup)  # fetches the JWKS once, remembers the token
        assert mw.authenticator.jwks is not None and mw.authenticator.jwks.fetches == 1
        base = sorted(await timed(bare, n))
        cached = sorted(await timed(with_auth, n))
        rows.append(_minus("auth layer, token seen before (JWKS cached)", cached, base, n))

        fresh_tokens = [signer.token(issuer, resource, scope="mcp:tools", jti=str(i)) for i in range(n + warmup)]
        tokens = iter(fresh_tokens)

        async def fresh() -> None:
            await mw.authenticator.authenticate(f"Bearer {next(tokens)}")

        await timed(fresh, warmup)
        rows.append(
            _minus("token verification, new token (RS256, JWKS cached)", sorted(await timed(fresh, n)), [0.0], n)
        )
        await mw.authenticator.aclose()

        g = cfg.gateway
        policy = Policy(g.policy, f"{g.name}{g.separator}")
        limiter = RateLimiter(g.limits)
        principal = await _principal(cfg, resource, token)

        async def terminal(call: Any) -> dict[str, Any]:
            return {"content": []}

        plain = Pipeline(terminal, [])
        guarded = Pipeline(terminal, [PolicyFilter(policy), RateLimitFilter(limiter, policy)])

        def call() -> Any:
            return ToolCall("time", "t", "time__t", {"name": "t"}, principal=principal)

        async def run_plain() -> None:
            await plain(call())

        async def run_guarded() -> None:
            await guarded(call())

        await timed(run_guarded, warmup)
        base = sorted(await timed(run_plain, n))
        rows.append(_minus("policy + rate-limit filters, one call", sorted(await timed(run_guarded, n)), base, n))
    return rows


async def _principal(cfg: Any, resource: str, token: str) -> Any:
    from mcpopt.auth.tokens import Authenticator

    auth = Authenticator(cfg.gateway.auth, resource)
    try:
        return await auth.authenticate(f"Bearer {token}")
    finally:
        await auth.aclose()


def _minus(what: str, with_part: list[float], without: list[float], runs: int) -> dict[str, Any]:
    a, b = _stats(with_part), _stats(without)
    return {"what": what, **{k: max(0.0, a[k] - b[k]) for k in a}, "runs": runs}
