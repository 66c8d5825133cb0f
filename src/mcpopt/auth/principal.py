"""`Principal`: who is calling, as the edge established it once per request.

The HTTP front turns a credential (a JWT, an opaque token checked by introspection, or an API
key) into a `Principal`; `ClientLink.principal` carries it to the dispatcher, `ToolCall.principal`
through the pipeline, and policy, rate limits, cache partitions, upstream-session isolation,
telemetry and audit all read that one object (ARCHITECTURE.md, "Identity flows with the call").
The stdio front (and an HTTP front without `gateway.auth`) calls as `LOCAL`, the trusted local user.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

PrincipalKind = Literal["local", "jwt", "introspection", "api_key"]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller.

    Attributes:
        subject: the token's `sub` (unique per issuer); `apikey:<name>` for an API key; `local`.
        kind: how it was established: `jwt`, `introspection` (RFC 7662), `api_key`, `local`.
        issuer: the token's `iss` ("" for API keys and `local`).
        client_id: the OAuth client (`client_id`, else `azp`) the token was issued to, if known.
        groups: group / role names from the claims named by `auth.groups_claims`.
        scopes: the token's scopes (`scope`, space-separated, or `scp`); an API key's configured ones.
        api_key: the API key's name ("" otherwise).
        expires_at: the token's `exp` (Unix seconds), None when it has none.
        claims: the verified claims (JWT payload or introspection answer), for policy extensions.
        key: a stable, non-secret id of the principal, `p-<16 hex>` (BLAKE2b-64 of issuer and
            subject; of the key name for API keys): the cache partition, the rate-limit identity
            and the owner of isolated upstream sessions. "" for `LOCAL` (the single-user partition).
    """

    subject: str
    kind: PrincipalKind
    issuer: str = ""
    client_id: str = ""
    groups: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    api_key: str = ""
    expires_at: float | None = None
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    key: str = field(default="", compare=False)
    admin: bool = field(default=False, compare=False)
    """Its policy grants the administrative tools (set by the HTTP front's auth layer for readers that
    have no policy at hand, e.g. the edge's `/healthz` details; the policy itself stays the judge)."""

    def __post_init__(self) -> None:
        if not self.key and self.kind != "local":
            ident = f"apikey\0{self.api_key}" if self.kind == "api_key" else f"{self.issuer}\0{self.subject}"
            object.__setattr__(self, "key", "p-" + hashlib.blake2b(ident.encode(), digest_size=8).hexdigest())

    @property
    def id(self) -> str:
        """A stable, non-secret identity (`key`; `local` for the local user): what the edge's session
        admission counts sessions by."""
        return self.key or "local"

    @property
    def is_local(self) -> bool:
        """The trusted local user (stdio, or HTTP without authentication): everything allowed."""
        return self.kind == "local"

    @property
    def label(self) -> str:
        """Who, for people: `sub` (with `@issuer` host when known), `apikey:<name>`, or `local`."""
        if self.kind == "api_key":
            return f"apikey:{self.api_key}"
        return self.subject

    def audit_id(self, level: str, hash_fn: Any) -> str:
        """The principal as telemetry records it: "" at `minimal`, `hash_fn(key)` at `standard`,
        `label` at `detailed` (see `mcpopt.telemetry.record.CallRecord.principal`)."""
        if level == "minimal" or self.is_local:
            return "" if level == "minimal" else "local"
        if level == "detailed":
            return self.label
        return str(hash_fn(self.key))


LOCAL = Principal(subject="local", kind="local")
"""The trusted local user: the stdio front, and the HTTP front when `gateway.auth` is off."""


def principal_from_claims(
    claims: Mapping[str, Any], kind: PrincipalKind, groups_claims: tuple[str, ...] | list[str]
) -> Principal:
    """A `Principal` from verified JWT claims or an RFC 7662 introspection answer.

    Scopes: `scope` (RFC 8693 / 9068: space-separated) or `scp` (a list, as some IdPs send).
    Groups: every claim named in `groups_claims` that holds a string or a list of strings.
    """
    scope = claims.get("scope")
    scopes: set[str] = set()
    if isinstance(scope, str):
        scopes.update(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, str):
        scopes.update(scp.split())
    elif isinstance(scp, list):
        scopes.update(s for s in scp if isinstance(s, str))
    groups: set[str] = set()
    for name in groups_claims:
        value = claims.get(name)
        if isinstance(value, str):
            groups.add(value)
        elif isinstance(value, list):
            groups.update(v for v in value if isinstance(v, str))
    client = claims.get("client_id") or claims.get("azp") or ""
    sub = claims.get("sub") or client or ""
    exp = claims.get("exp")
    return Principal(
        subject=str(sub),
        kind=kind,
        issuer=str(claims.get("iss") or ""),
        client_id=str(client),
        groups=frozenset(groups),
        scopes=frozenset(scopes),
        expires_at=float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None,
        claims=dict(claims),
    )
