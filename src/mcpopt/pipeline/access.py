"""The policy and rate-limit filters of the request path (telemetry -> policy -> rate limit -> ...).

Both read `call.principal` (set once at the edge) and leave their verdict in `call.attrs` for the
audit record: `decision` (`allow`, `deny`, `limit`) and `policy_rule` (the rule that decided, or
the limit's scope). A refused call raises before it reaches any later filter or the upstream.

They are put in the pipeline only when there is something to decide: `PolicyFilter` when
`gateway.auth` is on, `RateLimitFilter` when `gateway.limits` names a limit; the trusted local
user (`LOCAL`) passes the policy at once.
"""

from __future__ import annotations

from mcpopt.auth.policy import Policy, PolicyDenied
from mcpopt.auth.ratelimit import RateLimited, RateLimiter
from mcpopt.pipeline import Next, ToolCall, ToolResult


class PolicyFilter:
    """Refuses a call its principal's grant does not cover (`PolicyDenied`, never sent upstream)."""

    __slots__ = ("policy",)

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    async def __call__(self, call: ToolCall, next: Next) -> ToolResult:
        decision = self.policy.check_tool(call.principal, call.name, call.server)
        attrs = call.attrs
        attrs["policy_rule"] = decision.rule
        if not decision.allowed:
            attrs["decision"] = "deny"
            raise PolicyDenied(decision, server=call.server)
        attrs["decision"] = "allow"
        return await next(call)


class RateLimitFilter:
    """Counts the call against `gateway.limits` (and the principal's own `rate_limits`);
    raises `RateLimited` with the retry hint when a limit is used up."""

    __slots__ = ("limiter", "policy")

    def __init__(self, limiter: RateLimiter, policy: Policy | None = None) -> None:
        self.limiter = limiter
        self.policy = policy

    async def __call__(self, call: ToolCall, next: Next) -> ToolResult:
        principal = call.principal
        own = self.policy.grant(principal).rate_limits if self.policy is not None and principal is not None else None
        try:
            await self.limiter.hit(principal, call.name, own)
        except RateLimited as exc:
            call.attrs["decision"] = "limit"
            call.attrs["policy_rule"] = exc.scope
            exc.server = call.server
            raise
        return await next(call)
