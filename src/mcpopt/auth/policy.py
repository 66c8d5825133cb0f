"""Per-principal policy: which servers, tools, prompts and resources a principal may see and call.

`gateway.policy.rules` (see `mcpopt.config.PolicyRule`) map principals -- by `sub`, group / role,
scope, API-key name, client id or issuer -- to grants. A principal's `Grant` is the union of the
rules it matches (`default` when it matches none); `exposure`, `code_mode` and `rate_limits`
come from the first matching rule that sets them. Grants are computed once per principal and
tool decisions once per (grant, tool), so a call pays one dict lookup.

The gateway's own tools: those matching `policy.admin_tools` need a rule with `admin: true`;
`execute_code` needs code mode on for the principal (`code_mode: true`, or an exposure of
`code`); the others (batch, search, get_tool_schema, call_tool, status) are allowed, and what
they reach goes through the same checks (batch and call_tool call `call_tool` again; search
results are filtered).

`LOCAL` (stdio, or HTTP without `gateway.auth`) is granted everything: the trusted local user.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, NamedTuple

from mcp_types import ErrorData

from mcpopt.auth.principal import Principal
from mcpopt.config import PolicyRule, PolicySettings, PrincipalMatch
from mcpopt.errors import POLICY_DENIED, GatewayError

_GRANTS_KEPT = 10_000


class Decision(NamedTuple):
    """A policy verdict on one call or listing entry.

    Attributes:
        allowed: the call may go on.
        reason: why not (for the client's error message and the audit record); "" when allowed.
        rule: the rule that decided (`default`, a rule's name or `#<index>`, `admin`, `local`).
        scopes: for a refusal for want of scopes: the scopes needed (HTTP 403 `insufficient_scope`).
    """

    allowed: bool
    reason: str = ""
    rule: str = ""
    scopes: tuple[str, ...] = ()


ALLOW_LOCAL = Decision(True, rule="local")


class PolicyDenied(GatewayError):
    """A call, read or prompt the principal's policy does not grant (never sent upstream).

    The message says what was refused and why; `data` carries `rule` (what decided) and, for a
    tool that needs scopes the token lacks, `requiredScopes` (the HTTP front answers such a call
    with 403 `insufficient_scope` naming them, the MCP spec's step-up signal).
    """

    code = POLICY_DENIED

    def __init__(self, decision: Decision, *, server: str | None = None) -> None:
        super().__init__(f"forbidden: {decision.reason}", server=server)
        self.decision = decision

    def to_error_data(self) -> ErrorData:
        data: dict[str, Any] = {"rule": self.decision.rule}
        if self.decision.scopes:
            data["requiredScopes"] = list(self.decision.scopes)
        if self.server:
            data["server"] = self.server
        return ErrorData(code=self.code, message=str(self), data=data)


def _any(patterns: Iterable[str], value: str) -> bool:
    return any(p == value or fnmatchcase(value, p) for p in patterns)


def matches(match: PrincipalMatch, principal: Principal) -> bool:
    """True when every key `match` gives matches the principal (each by any of its values)."""
    if match.subjects and not _any(match.subjects, principal.subject):
        return False
    if match.groups and not any(g in principal.groups for g in match.groups):
        return False
    if match.scopes and not any(s in principal.scopes for s in match.scopes):
        return False
    if match.api_keys and not (principal.api_key and _any(match.api_keys, principal.api_key)):
        return False
    if match.client_ids and not (principal.client_id and _any(match.client_ids, principal.client_id)):
        return False
    return not (match.issuers and not _any(match.issuers, principal.issuer))


@dataclass(slots=True)
class Grant:
    """What one principal may use: the rules it matched, merged.

    Attributes:
        rules: (label, rule) of every matching rule, in config order (`default` alone when none matched).
        admin: may call the administrative gateway tools.
        exposure: its exposure mode, or None (the gateway's default for its connection).
        code_mode: may call `execute_code` (None: only when its exposure is `code`).
        rate_limits: its own per-principal limits, or None (`limits.per_principal`).
        everything: the `LOCAL` grant: no check at all.
    """

    rules: list[tuple[str, PolicyRule]]
    admin: bool = False
    exposure: str | None = None
    code_mode: bool | None = None
    rate_limits: list[str] | None = None
    everything: bool = False
    _tools: dict[tuple[str, str | None], Decision] = field(default_factory=dict, repr=False)
    _servers: dict[str, bool] = field(default_factory=dict, repr=False)

    def allows_server(self, server: str) -> bool:
        """May it see this server's prompts and resources (and, with `tools`, its tools)?"""
        if self.everything:
            return True
        got = self._servers.get(server)
        if got is None:
            got = self._servers[server] = any(_any(rule.servers, server) for _, rule in self.rules)
        return got

    def tool(self, name: str, server: str | None) -> Decision:
        """The verdict on an upstream tool (`server` its server) by its gateway name."""
        if self.everything:
            return ALLOW_LOCAL
        key = (name, server)
        got = self._tools.get(key)
        if got is None:
            got = self._tools[key] = self._decide(name, server)
        return got

    def _decide(self, name: str, server: str | None) -> Decision:
        for label, rule in self.rules:
            if server is not None and not _any(rule.servers, server):
                continue
            if _any(rule.tools, name) and not _any(rule.deny_tools, name):
                return Decision(True, rule=label)
        labels = ", ".join(label for label, _ in self.rules)
        return Decision(False, f"the policy ({labels}) does not grant the tool {name!r}", rule=labels)


class Policy:
    """Decisions for principals under one `gateway.policy`.

    Args:
        settings: `gateway.policy`.
        own_prefix: `{gateway.name}{separator}`, the prefix of the gateway's own tools.
        code_tool: the gateway name of `execute_code`.
    """

    def __init__(self, settings: PolicySettings, own_prefix: str, code_tool: str | None = None) -> None:
        self.settings = settings
        self.own_prefix = own_prefix
        self.code_tool = code_tool if code_tool is not None else f"{own_prefix}execute_code"
        self.admin_tools = [f"{own_prefix}{p}" for p in settings.admin_tools]
        self.tool_scopes = dict(settings.tool_scopes)
        self._grants: OrderedDict[tuple[Any, ...], Grant] = OrderedDict()
        self._everything = Grant([("local", PolicyRule(name="local"))], admin=True, code_mode=True, everything=True)
        self._scope_needs: dict[str, tuple[str, ...]] = {}

    def grant(self, principal: Principal | None) -> Grant:
        """The merged grant of a principal (cached); `LOCAL` / None get everything."""
        if principal is None or principal.is_local:
            return self._everything
        key = (principal.key, principal.groups, principal.scopes, principal.client_id, principal.issuer)
        grant = self._grants.get(key)
        if grant is None:
            grant = self._grants[key] = self._merge(principal)
            if len(self._grants) > _GRANTS_KEPT:
                self._grants.popitem(last=False)
        return grant

    def _merge(self, principal: Principal) -> Grant:
        rules = [
            (rule.name or f"#{i}", rule) for i, rule in enumerate(self.settings.rules) if matches(rule.match, principal)
        ]
        if not rules:
            rules = [(self.settings.default.name or "default", self.settings.default)]
        grant = Grant(rules, admin=any(r.admin for _, r in rules))
        for _, rule in rules:
            if grant.exposure is None and rule.exposure is not None:
                grant.exposure = rule.exposure
            if grant.code_mode is None and rule.code_mode is not None:
                grant.code_mode = rule.code_mode
            if grant.rate_limits is None and rule.rate_limits:
                grant.rate_limits = list(rule.rate_limits)
        return grant

    # ---- decisions -----------------------------------------------------------------------
    def scopes_needed(self, name: str) -> tuple[str, ...]:
        """Scopes a token needs to call this tool (`policy.tool_scopes`), cached per name."""
        got = self._scope_needs.get(name)
        if got is None:
            needed: list[str] = []
            for pattern, scopes in self.tool_scopes.items():
                if pattern == name or fnmatchcase(name, pattern):
                    needed += [s for s in scopes if s not in needed]
            got = self._scope_needs[name] = tuple(needed)
        return got

    def check_tool(
        self, principal: Principal | None, name: str, server: str | None, exposure: str | None = None
    ) -> Decision:
        """May `principal` call the tool `name` (an upstream tool of `server`, or the gateway's own
        when `server` is None)? `exposure` is the connection's mode (for `execute_code`)."""
        grant = self.grant(principal)
        if grant.everything:
            return ALLOW_LOCAL
        assert principal is not None
        if self.tool_scopes:
            needed = self.scopes_needed(name)
            missing = tuple(s for s in needed if s not in principal.scopes)
            if missing:
                return Decision(
                    False, f"calling {name!r} needs the scope(s) {' '.join(missing)}", rule="tool_scopes", scopes=needed
                )
        if server is not None:
            return grant.tool(name, server)
        return self._own(grant, name, exposure)

    def _own(self, grant: Grant, name: str, exposure: str | None) -> Decision:
        if _any(self.admin_tools, name):
            if grant.admin:
                return Decision(True, rule="admin")
            return Decision(
                False, f"{name!r} is an administrative tool (needs a policy rule with admin: true)", "admin"
            )
        if name == self.code_tool:
            mode = grant.exposure or exposure
            on = grant.code_mode if grant.code_mode is not None else mode == "code"
            if on:
                return Decision(True, rule="code_mode")
            return Decision(
                False, f"{name!r} is callable only where code mode is on (a rule with code_mode: true)", "code_mode"
            )
        return Decision(True, rule="gateway")

    def allows_server(self, principal: Principal | None, server: str) -> bool:
        return self.grant(principal).allows_server(server)

    def visible(self, principal: Principal | None, name: str, server: str | None, exposure: str | None = None) -> bool:
        """Shown in lists and search results: exactly what `check_tool` would let it call."""
        return self.check_tool(principal, name, server, exposure).allowed
