"""JSON-RPC on the wire: what a message must look like before the gateway acts on it, and encoding
that fails with a clear error instead of a Python internal.

Used by both fronts (request ids, `tools/call` params) and by everything that serializes a
client's arguments (the upstream channels, cache keys), so a client's malformed or unforwardable
message is answered for that call only -- `-32600` for an invalid request, `-32602` for params
the gateway cannot use -- and never reaches an upstream or counts against its circuit breaker.

Sources: JSON-RPC 2.0 section 4 (ids: string, number or null; section 5.1 error codes) narrowed by
MCP (basic/index, "Requests": the id MUST be a string or integer, and MUST NOT be null); orjson's
serializer stops at 255 levels of nesting ("Recursion limit reached") and its parser at 1024.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from mcp_types import INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR

from mcpopt.errors import GatewayError

MAX_DEPTH = 254
"""Deepest JSON orjson serializes (it raises "Recursion limit reached" at 255 levels); a forwarded
request wraps a tool's arguments in 3 more levels (message, params, arguments)."""
MAX_ARGUMENT_DEPTH = MAX_DEPTH - 2
"""Deepest `arguments` a forwarded `tools/call` can carry: the message and its params add 2 levels."""
MAX_PARSE_DEPTH = 1024
"""Deepest JSON orjson parses."""


class InvalidParams(GatewayError):
    """The client's params cannot be used or forwarded (JSON-RPC -32602): that call fails, nothing else."""

    code = INVALID_PARAMS


def valid_id(rid: Any) -> bool:
    """An MCP request id: a string or an integer (not a bool, float, null, object or array)."""
    kind = type(rid)
    if kind is str or kind is int:  # the usual ids, without the subclass checks
        return True
    return isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool))


def request_id_problem(msg: Any) -> str | None:
    """Why a parsed JSON-RPC message is an invalid request because of its id, or None.

    Only messages with a `method` and an `id` member are judged here (requests); a notification
    has no id, and responses are the SDK's to correlate.
    """
    if not isinstance(msg, dict) or "method" not in msg or "id" not in msg:
        return None
    rid = msg["id"]
    id_type = type(rid)
    if id_type is str or id_type is int or valid_id(rid):
        return None
    kind = "null" if rid is None else type(rid).__name__
    kind = {"float": "a number with a fraction", "dict": "an object", "list": "an array", "bool": "a boolean"}.get(
        kind, kind
    )
    return f"Invalid Request: the request id must be a string or an integer (got {kind})"


def error_message(code: int, message: str, rid: Any = None) -> dict[str, Any]:
    """A JSON-RPC error response (`id` null when the request's id is unknown or invalid)."""
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}


def invalid_request(message: str, rid: Any = None) -> dict[str, Any]:
    return error_message(INVALID_REQUEST, message, rid)


def parse_error(exc: Exception | None = None) -> dict[str, Any]:
    """-32700 for a message that is not JSON (orjson's reason, e.g. nesting past 1024 levels)."""
    why = f": {exc}" if exc is not None and str(exc) else ""
    return error_message(PARSE_ERROR, f"Parse error: the message is not valid JSON{why}")


def check_call_params(params: Any) -> None:
    """Check `tools/call` params before anything uses them.

    Raises:
        InvalidParams: params is not an object; `name` is not a string; `arguments` is present
            and not an object; `_meta` is present and not an object; `_meta.progressToken` is
            present and not a string or integer. The message names the member.
    """
    # `type(x) is dict` first: the `Mapping` ABC check runs a Python frame, and these are dicts.
    if type(params) is not dict and not isinstance(params, Mapping):
        raise InvalidParams(f"Invalid params: tools/call params must be an object (got {_kind(params)})")
    name = params.get("name")
    if not isinstance(name, str):
        raise InvalidParams(f"Invalid params: tools/call needs params.name, a string (got {_kind(name)})")
    args = params.get("arguments")
    if args is not None and type(args) is not dict and not isinstance(args, Mapping):
        raise InvalidParams(f"Invalid params: params.arguments of {name} must be an object (got {_kind(args)})")
    meta = params.get("_meta")
    if meta is not None:
        if type(meta) is not dict and not isinstance(meta, Mapping):
            raise InvalidParams(f"Invalid params: params._meta must be an object (got {_kind(meta)})")
        token = meta.get("progressToken")
        if token is not None and not valid_id(token):
            raise InvalidParams(
                f"Invalid params: params._meta.progressToken must be a string or an integer (got {_kind(token)})"
            )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        "dict": "an object",
        "list": "an array",
        "str": "a string",
        "bool": "a boolean",
        "int": "an integer",
        "float": "a number",
    }.get(type(value).__name__, type(value).__name__)


def nesting_depth(value: Any) -> int:
    """Levels of arrays/objects in `value` (a scalar is 0, `[]` is 1, `[[1]]` is 2); iterative."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)
    return deepest


def unencodable(exc: Exception, what: str, value: Any, room: int = MAX_ARGUMENT_DEPTH) -> InvalidParams:
    """The `InvalidParams` for a value orjson refused to serialize, saying why in the user's terms.

    Args:
        exc: orjson's `JSONEncodeError` (a `TypeError`).
        what: what the value is, e.g. "the arguments of tools/call memory__create_entities" (plural:
            the message reads "{what} nest N levels deep").
        value: the value (measured only here, on the failure path).
        room: the deepest `value` that can be forwarded where it sits in its message.
    """
    text = str(exc)
    if "Recursion limit" in text:
        depth = nesting_depth(value)
        return InvalidParams(
            f"Invalid params: {what} nest {depth} levels deep; mcpopt can forward at most {room} levels there"
        )
    if "Integer exceeds" in text:
        return InvalidParams(f"Invalid params: {what} hold an integer outside the 64-bit range (cannot be forwarded)")
    return InvalidParams(f"Invalid params: {what} cannot be encoded as JSON ({text})")


def dumps(value: Any, what: str, option: int | None = None) -> bytes:
    """`orjson.dumps(value)`, raising `InvalidParams` (naming `what`) instead of orjson's TypeError."""
    try:
        return orjson.dumps(value, option=option)
    except TypeError as exc:
        raise unencodable(exc, what, value) from None


def dumps_request(message: Mapping[str, Any], method: str, params: Mapping[str, Any] | None) -> bytes:
    """Serialize an outgoing request; `InvalidParams` naming the tool's arguments if they cannot be.

    The gateway parses what a client sends with orjson (up to 1024 levels) but can re-serialize only
    254: a client's deeply nested arguments fail here, before anything is sent upstream.
    """
    try:
        return orjson.dumps(message)
    except TypeError as exc:
        name = params.get("name") if method == "tools/call" and params is not None else None
        if isinstance(name, str):
            raise unencodable(exc, f"the arguments of tools/call {name}", params.get("arguments")) from None  # type: ignore[union-attr]
        raise unencodable(exc, f"the params of {method}", params) from None
