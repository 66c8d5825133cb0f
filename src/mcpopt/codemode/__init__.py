"""Code mode: `execute_code` runs model-written Python with every upstream tool as an async function.

- `stubs`: Python stubs from tool schemas (`tools.<server>.<tool>(...)`, typed signatures,
  docstrings) and the prelude that defines them inside a sandbox;
- `sandbox`: the backend interface, `CodeModeSettings` (`gateway.code_mode`) and `Execution`;
- `monty_backend` (pydantic-monty, default) and `wasm_backend` (CPython on Pyodide in Deno);
- `tool`: `CodeModeTool(gateway)`, the tool definition and handler;
- `scenario`: the data-heavy token-ledger scenario (direct tool calls vs code mode).

This package imports its submodules lazily: `mcpopt.config` may import `CodeModeSettings` from
`mcpopt.codemode.sandbox` without pulling in the gateway.
"""

from mcpopt.codemode.sandbox import CodeModeSettings, Execution

__all__ = ["CodeModeSettings", "Execution"]
