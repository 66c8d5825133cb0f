"""The capability report: what each upstream declares, and which sandboxes and layers this machine offers.

`upstream_rows(gateway)` gives one row per upstream of a running gateway: its protocol era and
version, the capabilities it declared (tools / resources / prompts / logging / completions and
their `listChanged` / `subscribe` flags, experimental keys), its tool count and how many tools
carry each behaviour hint -- `readOnlyHint`, `idempotentHint`, `destructiveHint` (MCP
2025-03-26+, `ToolAnnotations`) -- which is what the cache (read-only tools only) and safe
retries (idempotent or non-destructive tools) can rely on without a config override.

`sandbox_report(settings)` says which code-mode backends can run here (monty: its worker
binary; wasm: Deno and Pyodide, with versions) and what layer 2 this machine offers
(`isolation.probe`: bubblewrap, user namespaces, seccomp, private uids, cgroups), with the
reason when something is missing.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from dataclasses import asdict
from typing import Any

from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from mcpopt.codemode.isolation import probe
from mcpopt.codemode.sandbox import CodeModeSettings, SandboxUnavailable


def _caps(caps: Any) -> dict[str, Any]:
    """Declared server capabilities as plain data (absent ones left out)."""
    if caps is None:
        return {}
    data = caps.model_dump(by_alias=True, exclude_none=True, mode="json")
    return {k: v for k, v in data.items() if v is not None}


def upstream_rows(gateway: Any) -> list[dict[str, Any]]:
    """One row per upstream: server, state, transport, era, protocol, capabilities, tools, hint counts."""
    rows = []
    for name, up in gateway.upstreams.items():
        tools = list(up.catalog.tools)
        hints = {"readOnlyHint": 0, "idempotentHint": 0, "destructiveHint": 0, "destructive_false": 0, "none": 0}
        for tool in tools:
            ann = tool.annotations
            if ann is None or all(
                getattr(ann, f) is None for f in ("read_only_hint", "idempotent_hint", "destructive_hint")
            ):
                hints["none"] += 1
                continue
            hints["readOnlyHint"] += ann.read_only_hint is True
            hints["idempotentHint"] += ann.idempotent_hint is True
            hints["destructiveHint"] += ann.destructive_hint is True
            hints["destructive_false"] += ann.destructive_hint is False
        version = up.protocol_version
        era = (
            None
            if version is None
            else ("2026-07-28 (stateless)" if version in MODERN_PROTOCOL_VERSIONS else "handshake")
        )
        rows.append(
            {
                "server": name,
                "state": up.state,
                "transport": up.cfg.kind,
                "era": era,
                "protocol": version,
                "capabilities": _caps(up.capabilities),
                "tools": len(tools),
                "hints": hints,
                "error": up.last_error,
            }
        )
    return rows


def _version(argv: list[str]) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        res = subprocess.run(argv, capture_output=True, timeout=20, check=False)
        if res.returncode == 0:
            return res.stdout.decode(errors="replace").strip().splitlines()[0]
    return None


def sandbox_report(settings: CodeModeSettings | None = None) -> dict[str, Any]:
    """The code-mode backends this machine can run and its layer-2 parts (see the module docstring)."""
    settings = settings or CodeModeSettings()
    backends: dict[str, Any] = {}
    try:
        import pydantic_monty
        from pydantic_monty._binary import find_monty_binary

        binary = find_monty_binary()
        backends["monty"] = {"available": True, "version": pydantic_monty.__version__, "worker": binary}
    except (ImportError, FileNotFoundError) as exc:
        backends["monty"] = {"available": False, "reason": str(exc)}
    from mcpopt.codemode.wasm_backend import find_deno, find_pyodide

    try:
        deno = find_deno(settings)
        pyodide = find_pyodide(settings)
        version = None
        with contextlib.suppress(OSError, ValueError):
            version = json.loads((pyodide / "package.json").read_text()).get("version")
        backends["wasm"] = {
            "available": True,
            "deno": deno,
            "deno_version": _version([deno, "--version"]),
            "pyodide": str(pyodide),
            "pyodide_version": version,
        }
    except SandboxUnavailable as exc:
        backends["wasm"] = {"available": False, "reason": str(exc)}
    found = probe(settings.isolation.bwrap)
    layer2 = asdict(found)
    layer2["mode"] = settings.isolation.mode
    layer2["active"] = settings.isolation.mode != "off" and found.works
    return {
        "default_backend": settings.backend,
        "backends": backends,
        "layer1": {
            "monty": "a Python-subset interpreter without host access, heap and time limits",
            "wasm": "Pyodide in Deno with deny-all permissions and an import guard",
        },
        "layer2": layer2,
    }
