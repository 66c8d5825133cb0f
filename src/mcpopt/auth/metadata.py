"""RFC 9728 protected-resource metadata and RFC 6750 `WWW-Authenticate` challenges.

The MCP authorization spec (2025-06-18, 2025-11-25, 2026-07-28) has the server answer a request
without a valid token with 401 and `WWW-Authenticate: Bearer resource_metadata="<url>"` (2025-11-25
on: also `scope="..."`, the scopes to ask for); a client follows `resource_metadata` to this
document, whose `authorization_servers` tell it where to get a token for `resource` (its
audience, RFC 8707). The document is served at the path-inserted well-known URL (RFC 9728 §3.1:
`/.well-known/oauth-protected-resource/mcp` for a resource at `/mcp`) and at the root form
`/.well-known/oauth-protected-resource`, which clients of the 2025-06-18 revision try.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

WELL_KNOWN = "/.well-known/oauth-protected-resource"


def metadata_url(resource: str) -> str:
    """The path-inserted metadata URL of a resource URL (RFC 9728 §3.1).

    `https://mcp.example.com/mcp` -> `https://mcp.example.com/.well-known/oauth-protected-resource/mcp`.
    """
    parts = urlsplit(resource)
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{WELL_KNOWN}{path}"


def metadata_paths(resource: str) -> list[str]:
    """The request paths serving the metadata: path-inserted first, then the root form."""
    path = urlsplit(metadata_url(resource)).path
    return list(dict.fromkeys([path, WELL_KNOWN]))


def protected_resource_metadata(
    resource: str,
    authorization_servers: list[str],
    scopes_supported: list[str],
    resource_name: str | None = None,
) -> dict[str, Any]:
    """The RFC 9728 §2 document (JSON object).

    `bearer_methods_supported` is `["header"]`: MCP sends tokens only in the Authorization header
    (never in the query string). Without an authorization server (API keys only) the member is
    left out, as RFC 9728 allows.
    """
    doc: dict[str, Any] = {"resource": resource, "bearer_methods_supported": ["header"]}
    if authorization_servers:
        doc["authorization_servers"] = authorization_servers
    if scopes_supported:
        doc["scopes_supported"] = scopes_supported
    if resource_name:
        doc["resource_name"] = resource_name
    return doc


def _quoted(value: str) -> str:
    # RFC 6750 §3: auth-param values are quoted-strings; keep them to printable ASCII without quotes.
    clean = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else " " for c in value)
    return f'"{clean}"'


def challenge(
    resource_metadata: str,
    scopes: list[str] | None = None,
    error: str | None = None,
    description: str | None = None,
) -> str:
    """A `WWW-Authenticate` value: `Bearer resource_metadata="...", scope="...", error="...", ...`.

    Args:
        resource_metadata: the metadata URL (`metadata_url(resource)`).
        scopes: the scopes the request needs (space-joined into `scope`), if any.
        error: `invalid_token`, `invalid_request` or `insufficient_scope`; None when the request
            had no credential at all (RFC 6750 §3.1: then no error code is sent).
        description: `error_description` for people (sent only with an error).
    """
    parts = [f"resource_metadata={_quoted(resource_metadata)}"]
    if scopes:
        parts.append(f"scope={_quoted(' '.join(scopes))}")
    if error:
        parts.append(f"error={_quoted(error)}")
        if description:
            parts.append(f"error_description={_quoted(description)}")
    return "Bearer " + ", ".join(parts)
