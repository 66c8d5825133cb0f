"""How a failure inside the gateway reaches the client: a JSON-RPC error for that request only,
never code 0 and never Python internals (issue 10).

The SDK's dispatcher answers a handler exception that is not an `MCPError` with code 0 and
`str(exc)` (`mcp.shared.jsonrpc_dispatcher`, "code=0 pins existing-server compat"), e.g.
`'list' object has no attribute 'get'`. Here every path maps it the same way (`error_for`):

* `MCPError` -> its own error (the upstream's or the gateway's, as raised);
* `GatewayError` (incl. `InvalidParams`) -> its code and message, naming the server;
* pydantic `ValidationError` -> -32602 "Invalid params", as the SDK does;
* anything else -> -32603 "mcpopt: internal error while serving <what>", with the traceback in
  the gateway's log only.

`guard` is the SDK server's first middleware (`mcpopt.gateway.handlers.build_server`), so the
SDK's own paths (every method, and `tools/call` off the fast paths) are covered; the fast paths
call `error_for` themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS, ErrorData
from pydantic import ValidationError

from mcpopt.errors import GatewayError
from mcpopt.wire import MAX_DEPTH, unencodable

logger = logging.getLogger(__name__)


def internal_error(what: str) -> dict[str, Any]:
    """The -32603 error data for an unforeseen failure while serving `what` (e.g. "tools/call x")."""
    return {"code": INTERNAL_ERROR, "message": f"mcpopt: internal error while serving {what} (logged by the gateway)"}


def error_for(exc: BaseException, what: str) -> dict[str, Any]:
    """The JSON-RPC error data (`{"code", "message", "data"?}`) a client gets for `exc` (see the module doc)."""
    if isinstance(exc, MCPError):
        return exc.error.model_dump(mode="json", exclude_none=True)
    if isinstance(exc, GatewayError):
        return exc.to_error_data().model_dump(mode="json", exclude_none=True)
    if isinstance(exc, ValidationError):
        return {"code": INVALID_PARAMS, "message": f"Invalid params for {what}"}
    logger.error("%s failed inside the gateway", what, exc_info=exc)
    return internal_error(what)


def what_of(method: str, params: Any) -> str:
    """`"tools/call <name>"` for a call with a string name, else the method."""
    name = params.get("name") if isinstance(params, dict) else None
    return f"{method} {name}" if method == "tools/call" and isinstance(name, str) else method


def encode_answer(message: dict[str, Any], what: str) -> bytes:
    """One JSON-RPC answer as bytes; an answer that cannot be serialized (an upstream's result nested
    past orjson's 254 levels) becomes a -32603 error for the same id instead of no answer at all."""
    try:
        return orjson.dumps(message)
    except TypeError as exc:
        reason = (
            unencodable(exc, "its contents", message.get("result"), MAX_DEPTH - 1)
            .args[0]
            .removeprefix("Invalid params: ")
        )
        error = {"code": INTERNAL_ERROR, "message": f"mcpopt could not forward the result of {what}: {reason}"}
        return orjson.dumps({"jsonrpc": "2.0", "id": message.get("id"), "error": error})


async def guard(ctx: Any, call_next: Callable[..., Awaitable[Any]]) -> Any:
    """SDK server middleware: map failures per `error_for`."""
    method = ctx.method
    try:
        return await call_next(ctx)
    except (MCPError, ValidationError):
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to a JSON-RPC error, never code 0
        raise MCPError.from_error_data(ErrorData.model_validate(error_for(exc, what_of(method, ctx.params)))) from None
