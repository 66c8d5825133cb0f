"""The tasks extension (`io.modelcontextprotocol/tasks`, SEP-2663) through the gateway.

An upstream that supports the extension answers a task-supporting `tools/call` from a client
that declared it with a `CreateTaskResult` (`resultType: "task"`, `taskId`, ...) and later serves
`tasks/get`, `tasks/update` and `tasks/cancel` for that id. The gateway:

- advertises the extension (`capabilities.extensions`, on `server/discover`) while at least one
  ready upstream does (`advertise`);
- lets the client's declaration reach the upstream (the client's `clientCapabilities`, see
  `eras.client_capabilities`), so the upstream decides between a task and a synchronous answer
  exactly as it would for that client directly;
- names every task by the upstream that owns it: the client sees `"<server>:<upstream taskId>"`
  (`TaskIds`), so any gateway process routes `tasks/*` without shared state, and ids minted by two
  upstreams never collide;
- answers `tasks/*` from a client that did not declare the extension with -32021
  MissingRequiredClientCapability (as the spec asks of a server), an id it cannot route with
  -32602, and on Streamable HTTP a `Mcp-Name` header that disagrees with `params.taskId` with
  -32020 HeaderMismatch (SEP-2663 routing headers; a missing header is tolerated: SDK clients of
  today do not send it for `tasks/*`).

Handshake-era clients never see tasks: their capabilities reach upstreams without `extensions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import mcp_types as types
from mcp.shared.exceptions import MCPError
from mcp_types import HEADER_MISMATCH, INVALID_PARAMS, MISSING_REQUIRED_CLIENT_CAPABILITY, SERVER_INFO_META_KEY
from pydantic import Field

TASKS_EXTENSION = "io.modelcontextprotocol/tasks"
TASK_METHODS = ("tasks/get", "tasks/update", "tasks/cancel")
"""The extension's request methods; each names its task in `params.taskId`."""
SEPARATOR = ":"


class TaskIdParams(types.RequestParams):
    """`tasks/get` and `tasks/cancel` params (validated; the raw params are what is forwarded)."""

    task_id: str = Field(alias="taskId")


class TaskUpdateParams(TaskIdParams):
    """`tasks/update` params: the answers to a task's pending input requests, by key."""

    input_responses: dict[str, Any] = Field(default_factory=dict, alias="inputResponses")


class TaskIds:
    """Gateway task ids: `"<server>:<upstream taskId>"`.

    Args:
        servers: the upstream names (a name may itself contain the separator: decoding takes the
            longest known name).
    """

    def __init__(self, servers: list[str]) -> None:
        self._servers = sorted(servers, key=len, reverse=True)

    def outward(self, server: str, task_id: str) -> str:
        return f"{server}{SEPARATOR}{task_id}"

    def inward(self, task_id: str) -> tuple[str, str]:
        """`(server, upstream taskId)` of a gateway task id.

        Raises:
            MCPError: -32602 when no upstream's name prefixes it.
        """
        for server in self._servers:
            head = server + SEPARATOR
            if task_id.startswith(head) and len(task_id) > len(head):
                return server, task_id[len(head) :]
        raise MCPError(code=INVALID_PARAMS, message=f"Unknown task: {task_id}", data={"taskId": task_id})

    def created(self, server: str, result: dict[str, Any]) -> dict[str, Any]:
        """A `CreateTaskResult` from `server` with its id made a gateway id (other results unchanged)."""
        task_id = result.get("taskId")
        if result.get("resultType") != "task" or not isinstance(task_id, str):
            return result
        return {**result, "taskId": self.outward(server, task_id)}

    def detailed(self, server: str, result: dict[str, Any]) -> dict[str, Any]:
        """A `tasks/*` result from `server` for the client: the gateway id, and the upstream's
        `serverInfo` stamp dropped (the SDK stamps the gateway's own)."""
        out = dict(result)
        task_id = out.get("taskId")
        if isinstance(task_id, str):
            out["taskId"] = self.outward(server, task_id)
        meta = out.get("_meta")
        if isinstance(meta, dict) and SERVER_INFO_META_KEY in meta:
            rest = {k: v for k, v in meta.items() if k != SERVER_INFO_META_KEY}
            if rest:
                out["_meta"] = rest
            else:
                del out["_meta"]
        return out


def declared(caps: Mapping[str, Any] | None) -> bool:
    """Whether client capabilities (wire form) declare the tasks extension."""
    extensions = caps.get("extensions") if caps else None
    return isinstance(extensions, Mapping) and TASKS_EXTENSION in extensions


def check_request(method: str, task_id: str, caps: Mapping[str, Any] | None, headers: Any) -> None:
    """The gateway's own checks of a `tasks/*` request before it is routed.

    Args:
        method: the request method.
        task_id: `params.taskId` (the gateway id).
        caps: the client's capabilities on this request (wire form), None if unknown.
        headers: the HTTP request headers (Starlette `Headers`), None off HTTP.

    Raises:
        MCPError: -32021 without the extension declared; -32020 on a mismatched `Mcp-Name`.
    """
    if not declared(caps):
        raise MCPError(
            code=MISSING_REQUIRED_CLIENT_CAPABILITY,
            message=f"{method} needs the client capability extensions['{TASKS_EXTENSION}']",
            data={"requiredCapabilities": {"extensions": {TASKS_EXTENSION: {}}}},
        )
    name = headers.get("mcp-name") if headers is not None else None
    if name is not None and name != task_id:
        raise MCPError(code=HEADER_MISMATCH, message=f"Mcp-Name header {name!r} does not match params.taskId")


def advertise(extensions: dict[str, dict[str, Any]], upstreams: Mapping[str, Any]) -> None:
    """Set (or remove) the extension in the gateway server's `extensions` map, read live by
    `server/discover`: present while at least one ready upstream advertises it."""
    supported = False
    for up in upstreams.values():
        caps = up.capabilities if up.state == "ready" else None
        if caps is not None and caps.extensions and TASKS_EXTENSION in caps.extensions:
            supported = True
            break
    if supported:
        extensions[TASKS_EXTENSION] = {}
    else:
        extensions.pop(TASKS_EXTENSION, None)
