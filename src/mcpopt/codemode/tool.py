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

Code sessions (`gateway.code_mode.sessions`, on by default): what one call defines -- variables,
functions, imports, files in /tmp -- is there in the next call of the same client (see
`mcpopt.codemode.sessions`); a call can name a session of its own with `session`. Skills
(`save_skill`, `from skills import ...`) are kept per principal (`mcpopt.codemode.skills`);
private data in the results of opted-in tools reaches the sandbox, and so the model, as tokens
(`mcpopt.codemode.private`). The result's `_meta["mcpopt/codeMode"]` says which session ran the
code and which sandbox layers were active.

Wiring (in `mcpopt.gateway.assembly`): `code = CodeModeTool(gateway)`, then
`gateway.add_tool(code.tool, code.handler, listed=False)` (exposure modes list it);
`code.stub_for(name)` gives a tool's Python signature for `get_tool_schema`;
`discovery.add_source(code.search_lines)` lists skills beside tools in `search_tools`;
`await code.aclose()` when the gateway stops. `CodeModeTool` uses only what `GatewayAPI`
offers: `config`, `catalog`, `call_tool`, `results` (and `state`, the shared `StateStore`, when
the gateway has one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mcp_types as types
import orjson
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

from mcpopt.api import ProgressSum, client_progress, nested_call
from mcpopt.codemode.private import PrivateDataError, TokenVault
from mcpopt.codemode.sandbox import (
    CodeModeSettings,
    CodeSession,
    Execution,
    SandboxBackend,
    SandboxUnavailable,
    ToolCallError,
    jsonable,
)
from mcpopt.codemode.sessions import CodeSessions, principal_of
from mcpopt.codemode.skills import (
    SkillError,
    SkillStore,
    check_source,
    find_source,
    rewrite_imports,
    skill_name_of,
    used_skills,
)
from mcpopt.codemode.skills import (
    prelude as skills_prelude,
)
from mcpopt.codemode.stubs import ToolNamespaces
from mcpopt.state import MemoryStateStore, StateStore

if TYPE_CHECKING:
    from mcpopt.api import ClientLink, GatewayAPI

logger = logging.getLogger(__name__)

_SHAPED = re.compile(r"resources/read (mcpopt://results/([0-9a-f]+))\]\s*$")
_MAX_CODE_BYTES = 200_000
META_KEY = "mcpopt/codeMode"
"""`_meta` key of an `execute_code` result: `{backend, tool_calls, duration_ms, output_bytes, ok,
error_type, session: {id, keyed_by, new, calls, bytes, lost?}, layers: {layer1, layer2}}`."""


def make_backend(name: str, settings: CodeModeSettings) -> SandboxBackend:
    """A new backend by name (`monty` or `wasm`)."""
    if name == "monty":
        from mcpopt.codemode.monty_backend import MontyBackend

        return MontyBackend(settings)
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
    elif not body and not execution.notes:
        body = "(no output: print something or end with an expression)"
    if execution.notes:
        notes = "\n".join(f"[mcpopt: {n}]" for n in execution.notes)
        body = f"{body}\n{notes}" if body else notes
    meta: dict[str, Any] = {
        "backend": execution.backend,
        "tool_calls": execution.tool_calls,
        "duration_ms": round(execution.duration_ms, 1),
        "output_bytes": execution.output_bytes,
        "ok": execution.ok,
        "error_type": execution.error_type,
    }
    if execution.session is not None:
        meta["session"] = execution.session
    if execution.layers:
        meta["layers"] = execution.layers
    result: dict[str, Any] = {"content": [{"type": "text", "text": body}], "_meta": {META_KEY: meta}}
    if not execution.ok:
        result["isError"] = True
    return result


class CodeModeTool:
    """The `execute_code` tool of one gateway.

    Args:
        gateway: the gateway (a `GatewayAPI`): its catalog becomes `tools`, its `call_tool`
            runs the calls, its config gives the settings and the data dir, and its `state`
            (a shared `StateStore`, when it has one) keeps serialized sessions.
        settings: limits and backend (default: `gateway.config.gateway.code_mode` when the
            config has it, else `CodeModeSettings()`).
        name: the tool's name (default `{gateway.name}{separator}execute_code`).
        state: where serialized sessions go (default: `gateway.state`, else a `MemoryStateStore`).

    Attributes:
        tool: the `types.Tool` definition to list.
        name: its name.
        sessions: the code sessions (`CodeSessions`).
        skills: the skill store (`SkillStore`), or None when skills are off.
    """

    def __init__(
        self,
        gateway: GatewayAPI,
        settings: CodeModeSettings | None = None,
        name: str | None = None,
        state: StateStore | None = None,
    ) -> None:
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
        data_dir = _data_dir(gateway)
        store = state if state is not None else getattr(gateway, "state", None)
        if store is None:
            store = MemoryStateStore(max_bytes=max(settings.sessions.max_bytes * 2, 1 << 20))
        self.sessions = CodeSessions(settings.sessions, store, _secret(settings, data_dir), self.backend)
        self.skills: SkillStore | None = None
        if settings.skills.enabled:
            path = Path(settings.skills.path).expanduser() if settings.skills.path else data_dir / "skills.db"
            self.skills = SkillStore(path, settings.skills.max_per_principal)
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
        keeps = ""
        if s.sessions.enabled:
            properties["session"] = {"type": "string", "description": "a named code session (default: yours)"}
            keeps = "Variables, functions and /tmp files persist across calls. "
        skills = ""
        if s.skills.enabled:
            skills = "save_skill(fn) keeps a function: `from skills import fn` later. "
        return types.Tool(
            name=self.name,
            description=(
                "Run Python in a sandbox where every tool is an async function: "
                "`r = await tools.<server>.<tool>(arg=...)` (names with - or . use _). "
                "get_tool_schema shows a tool's Python signature. A call returns the tool's structured result, "
                "else its text (JSON-parsed when possible). Only what the code prints and its last expression "
                f"come back (max {s.max_output_bytes:,} bytes): filter, join and summarize large data in code. "
                f"{keeps}{skills}"
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

    def search_lines(self, query: str, k: int, link: ClientLink) -> list[str]:
        """`search_tools` lines for the caller's skills matching `query` (at most `min(k, 5)`)."""
        if self.skills is None:
            return []
        try:
            found = self.skills.search(principal_of(link), query, min(k, 5))
        except Exception as exc:  # noqa: BLE001 - a broken skills file must not break tool search
            logger.warning("skills search failed: %s", exc)
            return []
        return [skill.line() for skill in found]

    # ---- lifecycle ----------------------------------------------------------------------
    def backend(self, name: str | None = None) -> SandboxBackend:
        """The (shared, lazily started) backend by name; default: the configured one."""
        name = name or self.settings.backend
        be = self._backends.get(name)
        if be is None:
            be = self._backends[name] = make_backend(name, self.settings)
        return be

    def layers(self) -> dict[str, dict[str, Any]]:
        """Backend name -> the sandbox layers its executions run in (started backends only)."""
        return {name: be.layers() for name, be in self._backends.items()}

    async def aclose(self) -> None:
        """Stop every started backend (worker pools, Deno processes) and drop live sessions."""
        with contextlib.suppress(Exception):
            await self.sessions.aclose()
        for be in list(self._backends.values()):
            with contextlib.suppress(Exception):
                await be.aclose()
        if self.skills is not None:
            self.skills.close()

    # ---- execution ----------------------------------------------------------------------
    async def run(
        self, code: str, link: ClientLink, backend: str | None = None, *, session: str | None = None
    ) -> Execution:
        """Run `code` with the catalog's tools on `backend` (default: configured) under the limits,
        in the caller's code session (or the named one) when sessions are on.

        Raises:
            SandboxUnavailable: the backend's runtime is missing or does not start.
        """
        be = self.backend(backend)
        if self.settings.skills.enabled:
            code = rewrite_imports(code)
        if not self.settings.sessions.enabled:
            return await self._execute(code, link, be, None)
        async with self.sessions.use(link, session, be) as cs:
            execution = await self._execute(code, link, be, cs)
            if execution.keep:
                cs.add_cell(code)
            note = await self.sessions.commit(cs, execution, be)
            if note:
                execution.notes.append(note)
            if cs.lost:
                execution.notes.insert(
                    0,
                    f"this call ran in a new code session: the previous one is gone ({cs.lost}); "
                    "variables, functions, imports and /tmp files of earlier calls do not exist here",
                )
            elif cs.new and execution.error_type in ("NameError", "AttributeError") and not execution.ok:
                execution.notes.append(
                    "this call ran in a new code session (no earlier state was found for this client: it "
                    "expired, the gateway restarted, or the call reached another replica without shared "
                    "state); names defined by earlier calls do not exist here"
                )
            execution.session = cs.meta()
        return execution

    async def _execute(self, code: str, link: ClientLink, be: SandboxBackend, cs: CodeSession | None) -> Execution:
        settings = self.settings
        namespaces = self.namespaces
        principal = principal_of(link)
        vault = cs.vault if cs is not None else None
        if vault is None and settings.private_data.enabled:
            vault = TokenVault(settings.private_data)
            if cs is not None:
                cs.vault = vault
        calls = 0
        over_limit: list[str] = []
        limit = asyncio.Semaphore(8)
        # The client's progress token (if any) follows the execution: each tool call's own
        # progress and its completion move it (no total: the calls are not known beforehand).
        client = client_progress(link)
        combined = ProgressSum(client) if client is not None else None

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
            if vault is not None:
                try:
                    arguments = vault.restore_arguments(name, arguments)
                except PrivateDataError as exc:
                    raise ToolCallError(f"{where} was not called: {exc}") from None
            part, relay = combined.part(None, where) if combined is not None else (0, None)
            params, nested = nested_call(name, arguments, link, relay)
            async with limit:
                try:
                    result = await self.gateway.call_tool(params, nested)
                except MCPError as exc:
                    raise ToolCallError(_private(vault, name, f"{where} failed: {exc.error.message}")) from None
                except Exception as exc:  # noqa: BLE001 - the sandbox sees every failure the same way
                    raise ToolCallError(_private(vault, name, f"{where} failed: {type(exc).__name__}: {exc}")) from None
                finally:
                    if combined is not None:
                        await combined.done(part, where)
            result = self._unshaped(result)
            if result.get("isError"):
                raise ToolCallError(_private(vault, name, f"{where} failed: {_error_text(result)}"))
            value = sandbox_value(result)
            if vault is not None and vault.applies_to(name):
                value = vault.tokenize_result(name, value)
            return value

        pending: list[tuple[str, str, str | None]] = []
        cells = [*(cs.cells if cs is not None else ()), code]

        def save_skill(fn: str, source: str | None, doc: str | None) -> str:
            skill_name = skill_name_of(fn)
            if source is None:
                source = find_source(skill_name, cells)
            check_source(skill_name, source, settings.skills.max_code_bytes)
            pending.append((skill_name, source, doc))
            return f"saved skill {skill_name!r}: later calls can `from skills import {skill_name}`"

        prelude = namespaces.prelude(code, keep=cs is not None)
        missing: set[str] = set()
        if self.skills is not None:
            wanted, everything = used_skills(code)
            if wanted or everything:
                if everything:
                    found = await asyncio.to_thread(self.skills.list, principal)
                else:
                    found = await asyncio.to_thread(self.skills.many, principal, wanted)
                missing = wanted - {s.name for s in found}
                prelude += skills_prelude(found)
        execution = await be.execute(
            code, prelude, bridge, settings, cs, save_skill if self.skills is not None else None
        )
        execution.tool_calls = calls
        execution.layers = be.layers()
        if over_limit and execution.ok:
            execution.ok = False
            execution.error_type = "ToolCallLimit"
            execution.error = over_limit[0]
        elif over_limit and execution.error_type == "RuntimeError":
            execution.error_type = "ToolCallLimit"
        for skill_name, source, doc in execution.skills or ():  # deferred requests (wasm)
            try:
                save_skill(skill_name, source, doc)
            except (SkillError, ValueError) as exc:
                execution.notes.append(f"skill {skill_name!r} was not saved: {exc}")
        if pending and self.skills is not None:
            for note in await asyncio.to_thread(self._store_skills, principal, pending):
                execution.notes.append(note)
        if missing and not execution.ok:
            execution.notes.append(
                f"no skill named {', '.join(sorted(missing))} for this principal (search_tools lists saved skills)"
            )
        if vault is not None and len(vault):
            _scrub(execution, vault)
        return execution

    def _store_skills(self, principal: str, pending: list[tuple[str, str, str | None]]) -> list[str]:
        assert self.skills is not None
        notes = []
        for name, source, doc in pending:
            try:
                self.skills.save(principal, name, source, doc, self.settings.skills.max_code_bytes)
            except SkillError as exc:
                notes.append(f"skill {name!r} was not saved: {exc}")
        return notes

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
        """The tool's handler: `{code, backend?, session?}` -> a raw `CallToolResult` dict.

        Raises:
            MCPError: INVALID_PARAMS for a missing/oversized `code`, an unknown/disallowed backend
                or a bad session name.
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
        session = arguments.get("session")
        if session is not None and (not isinstance(session, str) or not _SESSION_NAME.match(session)):
            raise MCPError(
                code=INVALID_PARAMS,
                message=f"{self.name}: 'session' must be a name of 1-64 letters, digits, '-', '_' or '.'",
            )
        try:
            execution = await self.run(code, link, backend, session=session)
        except SandboxUnavailable as exc:
            execution = Execution(ok=False, error_type="SandboxUnavailable", error=str(exc), backend=str(backend))
        return render(execution, self.settings)


_SESSION_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def _private(vault: TokenVault | None, tool: str, text: str) -> str:
    """An error text from `tool` as the sandbox may see it (tokenized when the tool is private)."""
    return vault.tokenize_text(text) if vault is not None and vault.applies_to(tool) else text


def _scrub(execution: Execution, vault: TokenVault) -> None:
    """Defence in depth: replace any known private value still in what goes back to the model."""
    execution.output = vault.scrub(execution.output)
    if execution.error:
        execution.error = vault.scrub(execution.error)
    if execution.value is not None:
        execution.value = _scrub_value(execution.value, vault, 0)


def _scrub_value(value: Any, vault: TokenVault, depth: int) -> Any:
    if isinstance(value, str):
        return vault.scrub(value)
    if depth > 64:
        return value
    if isinstance(value, dict):
        return {k: _scrub_value(v, vault, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_value(v, vault, depth + 1) for v in value]
    return value


def _data_dir(gateway: Any) -> Path:
    """The config's data dir (`mcpopt.config.config_data_dir`)."""
    from mcpopt.config import Config, config_data_dir

    config = getattr(gateway, "config", None)
    return config_data_dir(config if isinstance(config, Config) else None)


def _secret(settings: CodeModeSettings, data_dir: Path) -> bytes:
    """The key that signs stored session state: `sessions.secret`, else `<data dir>/codemode.key`."""
    if settings.sessions.secret:
        return settings.sessions.secret.encode()
    from mcpopt.telemetry.privacy import load_salt

    try:
        return load_salt(data_dir / "codemode.key")
    except OSError as exc:
        import secrets

        logger.warning("code mode: cannot keep a key in %s (%s); stored sessions last this process only", data_dir, exc)
        return secrets.token_bytes(32)
