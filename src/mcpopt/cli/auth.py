"""`mcpopt auth new-key|hash-key|check`: API keys and token checks for a shared gateway."""

from __future__ import annotations

import json
import sys

import typer

from mcpopt.cli.common import ConfigOpt, app, err, load, out, run

auth_app = typer.Typer(no_args_is_help=True, help="Authentication: API keys, token checks.")
app.add_typer(auth_app, name="auth")


@auth_app.command("new-key")
def new_key_cmd(
    name: str = typer.Argument(..., help="The key's name (what policy rules match with `api_keys`)."),
    scopes: list[str] = typer.Option([], "--scope", "-s", help="A scope the key carries (repeatable)."),
) -> None:
    """Make a random API key: prints the key (give it to the client, once) and the line for the
    keys file or $MCPOPT_API_KEYS (only the hash is kept)."""
    from mcpopt.auth.tokens import hash_key, new_key

    if not name or any(c.isspace() for c in name):
        err.print("[red]the name must be one word[/red]")
        raise typer.Exit(2)
    key = new_key()
    line = " ".join([name, hash_key(key), *scopes])
    err.print("API key (shown once; the gateway keeps only its hash):")
    print(key)
    err.print("line for gateway.auth.api_keys.file (or $MCPOPT_API_KEYS):")
    print(line)


@auth_app.command("hash-key")
def hash_key_cmd() -> None:
    """Read an API key on stdin, print its `sha256:` hash (for an existing key)."""
    from mcpopt.auth.tokens import hash_key

    key = sys.stdin.readline().strip()
    if not key:
        err.print("[red]no key on stdin[/red]")
        raise typer.Exit(2)
    print(hash_key(key))


@auth_app.command("check")
def check_cmd(
    token: str = typer.Argument(..., help="A bearer token or API key (use - to read it from stdin)."),
    config: str = ConfigOpt,
    resource: str = typer.Option("", "--resource", help="The gateway's resource URL (default: gateway.auth.resource)."),
) -> None:
    """Check a credential the way the gateway would: the principal it maps to, or why it is refused."""
    from mcpopt.auth.errors import AuthError
    from mcpopt.auth.policy import Policy
    from mcpopt.auth.tokens import Authenticator

    cfg = load(config)
    settings = cfg.gateway.auth
    target = resource or settings.resource
    if not settings.enabled or not target:
        err.print("[red]gateway.auth is off, or no resource URL (pass --resource or set gateway.auth.resource)[/red]")
        raise typer.Exit(2)
    value = sys.stdin.readline().strip() if token == "-" else token

    async def check() -> dict[str, object]:
        auth = Authenticator(settings, target)
        try:
            p = await auth.authenticate(f"Bearer {value}")
        except AuthError as exc:
            return {"refused": str(exc)}
        finally:
            await auth.aclose()
        g = cfg.gateway
        grant = Policy(g.policy, f"{g.name}{g.separator}").grant(p)
        return {
            "subject": p.subject,
            "kind": p.kind,
            "issuer": p.issuer,
            "client_id": p.client_id,
            "groups": sorted(p.groups),
            "scopes": sorted(p.scopes),
            "expires_at": p.expires_at,
            "rules": [label for label, _ in grant.rules],
            "admin": grant.admin,
            "exposure": grant.exposure,
            "missing_scopes": [s for s in settings.required_scopes if s not in p.scopes],
        }

    info = run(check())
    if "refused" in info:
        err.print(f"[red]refused: {info['refused']}[/red]", highlight=False)
        raise typer.Exit(1)
    out.print_json(json.dumps(info))
