"""The `execute_code` gateway tool: model-written Python with every upstream tool as an async function.

Inside the sandbox, `await tools.<server>.<tool>(...)` calls a tool through `Gateway.call_tool`,
the same pipeline as any client call (cache, routing, breakers, telemetry, shaping), on the
calling client's link. What a call gives the code:
- `structuredContent` when the result has it; else its text, JSON-parsed when it parses
  (several content blocks: a list; non-text blocks as dicts);
- a result cut by response shaping is replaced by the whole result the gateway kept;
- a failed call (an error result or an MCP error) raises `RuntimeError` with the tool's message.

Only what the code prints and the value of its last expression (or a top-level `return`) go
back to the model, at most `max_output_bytes` together; the rest is cut with a marker saying
how much was left out. A limit (wall time, memory, tool calls) or an uncaught exception gives an
error result (`isError`) with the exception type, message and traceback, after any output.

Wiring (in `mcpopt.gateway.assembly`): `code = CodeModeTool(gateway)`, then
`gateway.add_tool(code.tool, code.handler, listed=False)` (exposure modes list it);
`code.stub_for(name)` gives a tool's Python signature for `get_tool_schema`; `await code.aclose()`
when the gateway stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import TYPE_CHECKING, Any

import mcp_types as types
import orjson
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from mcpopt.codemode.sandbox import (
    CodeModeSettings,
    Execution,
    SandboxBackend,
    SandboxUnavailable,
    ToolCallError,
    jsonable,
)
from mcpopt.codemode.stubs import ToolNamespaces

if TYPE_CHECKING:
    from mcpopt.api import ClientLink, GatewayAPI

_SHAPED = re.compile(r"resources/read (mcpopt://results/([0-9a-f]+))\]\s*$")
_MAX_CODE_BYTES = 200_000
META_KEY = "mcpopt/codeMode"
"""`_meta` key of an `execute_code` result: `{backend, tool_calls, duration_ms, output_bytes}`."""


def make_backend(name: str, settings: CodeModeSettings) -> SandboxBackend:
    """A new backend by name (`monty` or `wasm`)."""
    if name == "monty":
        from mcpopt.codemode.monty_backend import MontyBackend

        return MontyBackend()
    if name == "wasm":
        from mcpopt.codemode.wasm_backend import WasmBackend

        return WasmBackend(settings)
    raise ValueError(f"unknown code mode backend {name!r} (expected 'monty' or 'wasm')")


def sandbox_value(result: dict[str, Any]) -> Any:
    """What a tool's raw `CallToolResult` dict is inside the sandbox (see the module docstring)."""
    if "structuredContent" in result and result["structuredContent"] is not None:
        return result["structuredContent"]
    values: list[Any] = []
    for block in result.get("content") or ():
        if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
            values.append(_parse(block["text"]))
        else:
            values.append(block)
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return values


def _parse(text: str) -> Any:
    head = text.lstrip()[:1]
    if head and (head in '{["-' or head.isdigit() or head in "tfn"):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            return text
    return text


def _error_text(result: dict[str, Any]) -> str:
    texts = [b.get("text", "") for b in result.get("content") or () if isinstance(b, dict) and b.get("type") == "text"]
    return " ".join(t.strip() for t in texts if t.strip())[:2000] or "the tool reported an error"


def render(execution: Execution, settings: CodeModeSettings) -> dict[str, Any]:
    """The `CallToolResult` dict the model gets: printed output, then the value, capped; or the error."""
    cap = settings.max_output_bytes
    parts: list[str] = []
    if execution.output:
        parts.append(execution.output.rstrip("\n"))
    dropped = max(0, execution.output_bytes - len(execution.output.encode())) + execution.value_cut_bytes
    if execution.value is not None:
        value = execution.value
        text = value if isinstance(value, str) else orjson.dumps(value).decode()
        parts.append(text)
    body = "\n".join(parts)
    data = body.encode()
    if len(data) > cap:
        dropped += len(data) - cap
        body = data[:cap].decode("utf-8", "ignore")
    if dropped:
        body += (
            f"\n[mcpopt: output cut at {cap:,} bytes; {dropped:,} bytes left out "
            "(gateway.code_mode.max_output_bytes). Print less: filter or summarize in the code.]"
        )
    if not execution.ok:
        err = f"{execution.error_type}: {execution.error}" if execution.error_type else str(execution.error)
        if err.startswith(f"{execution.error_type}: {execution.error_type}:"):
            err = str(execution.error)
        body = f"{body}\n{err}" if body else err
    elif not body:
        body = "(no output: print something or end with an expression)"
    result: dict[str, Any] = {
        "content": [{"type": "text", "text": body}],
        "_meta": {
            META_KEY: {
                "backend": execution.backend,
                "tool_calls": execution.tool_calls,
                "duration_ms": round(execution.duration_ms, 1),
                "output_bytes": execution.output_bytes,
                "ok": execution.ok,
                "error_type": execution.error_type,
            }
        },
    }
    if not execution.ok:
        result["isError"] = True
    return result


class CodeModeTool:
    """The `execute_code` tool of one gateway.

    Args:
        gateway: the gateway whose catalog becomes `tools` and whose `call_tool` runs the calls.
        settings: limits and backend (default: `gateway.config.gateway.code_mode` when the
            config has it, else `CodeModeSettings()`).
        name: the tool's name (default `{gateway.name}{separator}execute_code`).

    Attributes:
        tool: the `types.Tool` definition to list.
        name: its name.
    """

    def __init__(self, gateway: GatewayAPI, settings: CodeModeSettings | None = None, name: str | None = None) -> None:
        self.gateway = gateway
        cfg = gateway.config.gateway
        if settings is None:
            settings = getattr(cfg, "code_mode", None)
            if not isinstance(settings, CodeModeSettings):
                settings = CodeModeSettings.model_validate(settings.model_dump()) if settings else CodeModeSettings()
        self.settings: CodeModeSettings = settings
        self.name = name or f"{cfg.name}{cfg.separator}execute_code"
        self._backends: dict[str, SandboxBackend] = {}
        self._namespaces: ToolNamespaces | None = None
        self._namespaces_of: object = None
        self.tool = self._definition()

    # ---- definition ---------------------------------------------------------------------
    def _definition(self) -> types.Tool:
        s = self.settings
        properties: dict[str, Any] = {
            "code": {
                "type": "string",
                "description": "Python source; top-level await allowed. Print results or end with an expression.",
            }
        }
        if s.allow_backend_choice:
            properties["backend"] = {
                "type": "string",
                "enum": ["monty", "wasm"],
                "description": f"monty: fast, a Python subset; wasm: full CPython stdlib, slower start "
                f"(default {s.backend})",
            }
        return types.Tool(
            name=self.name,
            description=(
                "Run Python in a sandbox where every tool is an async function: "
                "`r = await tools.<server>.<tool>(arg=...)` (names with - or . use _). "
                "get_tool_schema shows a tool's Python signature. A call returns the tool's structured result, "
                "else its text (JSON-parsed when possible). Only what the code prints and its last expression "
                f"come back (max {s.max_output_bytes:,} bytes): filter, join and summarize large data in code. "
                f"Limits: {s.timeout_ms / 1000:g} s, {s.memory_mb} MB, {s.max_tool_calls} tool calls. "
                "No network, processes or host files; /tmp is scratch."
            ),
            input_schema={"type": "object", "properties": properties, "required": ["code"]},
            annotations=types.ToolAnnotations(read_only_hint=False, open_world_hint=True),
        )

    # ---- discovery ----------------------------------------------------------------------
    @property
    def namespaces(self) -> ToolNamespaces:
        """The `tools` namespaces of the gateway's current catalog (rebuilt when it changes)."""
        catalog = self.gateway.catalog
        if self._namespaces is None or self._namespaces_of is not catalog:
            self._namespaces = ToolNamespaces.from_catalog(catalog)
            self._namespaces_of = catalog
        return self._namespaces

    def stub_for(self, tool_name: str) -> str | None:
        """The Python stub (`tools.<server>.<tool>` signature and docstring) of a gateway tool
        name, or None if it is not an upstream tool."""
        return self.namespaces.stub_for(tool_name)

    def signature_of(self, tool_name: str) -> str | None:
        """One line for compact listings, e.g. `tools.everything.get_sum(a: float, b: float) -> Any`,
        or None if it is not an upstream tool."""
        return self.namespaces.signature_of(tool_name)

    # ---- lifecycle ----------------------------------------------------------------------
    def backend(self, name: str | None = None) -> SandboxBackend:
        """The (shared, lazily started) backend by name; default: the configured one."""
        name = name or self.settings.backend
        be = self._backends.get(name)
        if be is None:
            be = self._backends[name] = make_backend(name, self.settings)
        return be

    async def aclose(self) -> None:
        """Stop every started backend (worker pools, the Deno process)."""
        for be in list(self._backends.values()):
            with contextlib.suppress(Exception):
                await be.aclose()

    # ---- execution ----------------------------------------------------------------------
    async def run(self, code: str, link: ClientLink, backend: str | None = None) -> Execution:
        """Run `code` with the catalog's tools on `backend` (default: configured) under the limits.

        Raises:
            SandboxUnavailable: the backend's runtime is missing or does not start.
        """
        settings = self.settings
        namespaces = self.namespaces
        calls = 0
        over_limit: list[str] = []
        limit = asyncio.Semaphore(8)

        async def bridge(name: str, arguments: dict[str, Any]) -> Any:
            nonlocal calls
            stub = namespaces.by_name.get(name)
            if stub is None:
                raise ToolCallError(f"unknown tool {name!r}: the sandbox reaches the upstream tools only")
            where = stub.path
            if over_limit or calls >= settings.max_tool_calls:
                msg = (
                    f"tool call limit reached: at most {settings.max_tool_calls} tool calls per execution "
                    f"(gateway.code_mode.max_tool_calls); {where} was not called"
                )
                if not over_limit:
                    over_limit.append(msg)
                raise ToolCallError(msg)
            calls += 1
            if not isinstance(arguments, dict):
                raise ToolCallError(f"{where}: arguments must be a dict")
            optional = stub.optional_keys()
            arguments = {k: jsonable(v) for k, v in arguments.items() if not (v is None and k in optional)}
            async with limit:
                try:
                    result = await self.gateway.call_tool({"name": name, "arguments": arguments}, link)
                except MCPError as exc:
                    raise ToolCallError(f"{where} failed: {exc.error.message}") from None
                except Exception as exc:  # noqa: BLE001 - the sandbox sees every failure the same way
                    raise ToolCallError(f"{where} failed: {type(exc).__name__}: {exc}") from None
            result = self._unshaped(result)
            if result.get("isError"):
                raise ToolCallError(f"{where} failed: {_error_text(result)}")
            return sandbox_value(result)

        be = self.backend(backend)
        execution = await be.execute(code, namespaces.prelude(code), bridge, settings)
        execution.tool_calls = calls
        if over_limit and execution.ok:
            execution.ok = False
            execution.error_type = "ToolCallLimit"
            execution.error = over_limit[0]
        elif over_limit and execution.error_type == "RuntimeError":
            execution.error_type = "ToolCallLimit"
        return execution

    def _unshaped(self, result: dict[str, Any]) -> dict[str, Any]:
        """The whole result when response shaping cut it (the sandbox wants all of it)."""
        content = result.get("content")
        if not isinstance(content, list) or not content:
            return result
        last = content[-1]
        if not isinstance(last, dict) or not isinstance(last.get("text"), str):
            return result
        m = _SHAPED.search(last["text"])
        if m is None:
            return result
        full = self.gateway.results.get(m.group(2))
        return full if full is not None else result

    async def handler(self, arguments: dict[str, Any], link: ClientLink) -> dict[str, Any]:
        """The tool's handler: `{code, backend?}` -> a raw `CallToolResult` dict.

        Raises:
            MCPError: INVALID_PARAMS for a missing/oversized `code` or an unknown/disallowed backend.
        """
        code = arguments.get("code")
        if not isinstance(code, str) or not code.strip():
            raise MCPError(code=INVALID_PARAMS, message=f"{self.name}: 'code' must be a non-empty string")
        if len(code.encode()) > _MAX_CODE_BYTES:
            raise MCPError(code=INVALID_PARAMS, message=f"{self.name}: 'code' is over {_MAX_CODE_BYTES:,} bytes")
        backend = arguments.get("backend")
        if backend is not None:
            if backend not in ("monty", "wasm"):
                raise MCPError(code=INVALID_PARAMS, message=f"{self.name}: backend must be 'monty' or 'wasm'")
            if not self.settings.allow_backend_choice and backend != self.settings.backend:
                raise MCPError(code=INVALID_PARAMS, message=f"{self.name}: only backend {self.settings.backend!r}")
        try:
            execution = await self.run(code, link, backend)
        except SandboxUnavailable as exc:
            execution = Execution(ok=False, error_type="SandboxUnavailable", error=str(exc), backend=str(backend))
        return render(execution, self.settings)
