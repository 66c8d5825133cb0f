"""One exception hierarchy for mcpopt; every message says what to do next.

Errors that reach an MCP client are turned into JSON-RPC errors (`ErrorData`) by
`to_error_data`, always naming the upstream server involved, never carrying a traceback.
"""

from __future__ import annotations

from mcp_types import INTERNAL_ERROR, INVALID_PARAMS, METHOD_NOT_FOUND, ErrorData

# JSON-RPC server-error range (-32000..-32099) codes used by the gateway itself.
UPSTREAM_UNAVAILABLE = -32010
"""The upstream server is down, starting, or restarting."""
UPSTREAM_TIMEOUT = -32011
"""The upstream did not answer within its timeout."""
UPSTREAM_CLOSED = -32012
"""The upstream's connection closed while the call was in flight (crash, kill)."""
GATEWAY_REJECTED = -32013
"""The gateway refused the call (limits, queue full)."""
POLICY_DENIED = -32014
"""The caller's policy does not grant the call (`mcpopt.auth.policy.PolicyDenied`)."""
RATE_LIMITED = -32015
"""A rate limit or quota refused the call (`mcpopt.auth.ratelimit.RateLimited`)."""
CONFIG_INVALID = -32016
"""`mcpopt serve` over stdio could not load its config file: every request is answered with this
code and the config error (file, key paths, what was expected) until the client disconnects."""


class McpoptError(Exception):
    """Base of every error mcpopt raises on purpose."""


class ConfigError(McpoptError):
    """A configuration file or environment override is invalid.

    `str(err)` is one line naming the file, then every problem with its key path and what was
    expected: `config error: f.yaml: key 'a.b': msg` for one problem, `config error: f.yaml:
    2 problems: (1) key 'a.b': msg; (2) key 'c': msg` for more.

    Attributes:
        file: the file ("" when built in code, "(environment)" for `MCPOPT_*` values).
        key: the key path of the first problem ("" for the file as a whole).
        expected: what was expected there (the first problem's message).
        problems: every problem as `(key path, message)`, in file order.
    """

    def __init__(self, file: str, key: str, expected: str, *, problems: list[tuple[str, str]] | None = None) -> None:
        self.file = file
        self.problems = problems if problems else [(key, expected)]
        self.key, self.expected = self.problems[0]
        where = f"{file}: " if file else ""
        if len(self.problems) == 1:
            text = _problem(*self.problems[0])
        else:
            listed = "; ".join(f"({i}) {_problem(k, m)}" for i, (k, m) in enumerate(self.problems, 1))
            text = f"{len(self.problems)} problems: {listed}"
        super().__init__(f"config error: {where}{text}")

    @classmethod
    def many(cls, file: str, problems: list[tuple[str, str]]) -> ConfigError:
        """One error listing every `(key path, message)` problem (at least one)."""
        return cls(file, problems[0][0], problems[0][1], problems=problems)


def _problem(key: str, message: str) -> str:
    return f"key '{key}': {message}" if key else message


class GatewayError(McpoptError):
    """An error answered to an MCP client as a JSON-RPC error.

    Attributes:
        code: JSON-RPC error code.
        server: the upstream server name the error concerns, if any.
    """

    code: int = INTERNAL_ERROR

    def __init__(self, message: str, *, server: str | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.server = server
        if code is not None:
            self.code = code

    def to_error_data(self) -> ErrorData:
        data = {"server": self.server} if self.server else None
        return ErrorData(code=self.code, message=str(self), data=data)


class UnknownTarget(GatewayError):
    """No tool, prompt or resource of that name is served by the gateway."""

    code = INVALID_PARAMS


class MethodNotSupported(GatewayError):
    code = METHOD_NOT_FOUND


class UpstreamUnavailable(GatewayError):
    """The upstream is not connected (starting, crashed, restarting, or failed to start)."""

    code = UPSTREAM_UNAVAILABLE


class UpstreamTimeout(GatewayError):
    code = UPSTREAM_TIMEOUT


class UpstreamClosed(GatewayError):
    code = UPSTREAM_CLOSED
    restarted = False
    """True when mcpopt itself restarted the server (at `max_rss_mb`), cutting the call off."""
