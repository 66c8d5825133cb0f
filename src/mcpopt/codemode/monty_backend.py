"""The `monty` backend: pydantic-monty, a Python subset interpreter run in worker subprocesses.

Monty has no access to the host unless given: no `open` of host files (PermissionError), no
`subprocess`, `socket` or `ctypes` modules, no `os.system` or environment. Its standard library
is a subset (json, re, math, datetime, collections, itertools, functools, asyncio, dataclasses,
csv, hashlib, base64, random, time, decimal, bisect, copy, tomllib, typing, pathlib, ...).

One `AsyncMonty` pool per backend (started on first use, a few ms); each execution checks out
a worker session (a fresh namespace), feeds the prelude and then the code. Limits:
- wall time: the whole execution runs under `timeout_ms` (tool calls included); the same
  budget bounds pure execution time inside the worker (`max_feed_duration_secs`), and the pool
  kills the worker if the host cancels it;
- memory: `memory_mb` is the worker's heap limit (`max_memory`), a MemoryError in the sandbox;
- recursion: Monty's default depth limit (1000), a RecursionError;
- output: printed text beyond `max_output_bytes` is counted, not kept;
- files: `/tmp` is a scratch folder (an in-memory overlay over an empty folder, discarded after
  the execution); everything else is denied.
A crashed worker (`MontyCrashedError`) is replaced by the pool; the execution reports
`SandboxCrashed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from typing import Any

from mcpopt.codemode.sandbox import (
    CappedText,
    CodeModeSettings,
    Execution,
    SandboxBackend,
    SandboxUnavailable,
    ToolBridge,
    jsonable,
    timeout_message,
)
from mcpopt.codemode.stubs import CALL_FUNCTION

_MB = 1024 * 1024


class MontyBackend(SandboxBackend):
    """Runs code in pydantic-monty workers (see the module docstring for the limits)."""

    name = "monty"

    def __init__(self) -> None:
        self._pool: Any = None
        self._start_lock = asyncio.Lock()
        self._scratch = tempfile.mkdtemp(prefix="mcpopt-codemode-scratch-")

    async def start(self) -> None:
        async with self._start_lock:
            if self._pool is not None:
                return
            try:
                from pydantic_monty import AsyncMonty
            except ImportError as exc:  # pragma: no cover - a dependency of mcpopt
                raise SandboxUnavailable(
                    "code mode backend 'monty' needs pydantic-monty: pip install pydantic-monty"
                ) from exc
            pool = AsyncMonty(min_processes=1, feed_duration_limit_grace=1.0, turn_duration_limit_grace=1.0)
            try:
                await pool.__aenter__()
            except Exception as exc:  # noqa: BLE001 - e.g. the worker binary (pydantic-monty-runtime) is missing
                raise SandboxUnavailable(f"cannot start the monty worker pool: {exc}") from exc
            self._pool = pool

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.__aexit__(None, None, None)
            # pydantic-monty 1.4 finishes tearing the pool down on its own threads just after
            # `__aexit__` returns; an interpreter that exits meanwhile can abort (SIGABRT).
            await asyncio.sleep(0.25)

    def __del__(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)

    async def execute(self, code: str, prelude: str, bridge: ToolBridge, settings: CodeModeSettings) -> Execution:
        from pydantic_monty import MontyCrashedError, MontyError, MountDir

        await self.start()
        out = CappedText(settings.max_output_bytes)
        t0 = time.perf_counter()
        seconds = settings.timeout_ms / 1000
        limits: Any = {
            "max_feed_duration_secs": seconds,
            "max_turn_duration_secs": seconds,
            "max_memory": settings.memory_mb * _MB,
            "max_suspensions": max(1000, 4 * settings.max_tool_calls + 100),
            "max_total_sleep_secs": seconds,
        }

        def printed(_stream: str, text: str) -> None:
            out.write(text)

        def done(**fields: Any) -> Execution:
            return Execution(
                output=out.text(),
                output_bytes=out.total,
                duration_ms=(time.perf_counter() - t0) * 1000,
                backend=self.name,
                **fields,
            )

        lookup = {CALL_FUNCTION: bridge}
        try:
            async with asyncio.timeout(seconds):
                async with self._pool.checkout(limits=limits, script_name="code.py") as session:
                    await session.feed_run(prelude, external_lookup=lookup, print_callback=printed)
                    with MountDir(host_path=self._scratch, virtual_path="/tmp", mode="overlay") as scratch:
                        value = await session.feed_run(
                            code, external_lookup=lookup, print_callback=printed, mount=scratch, cwd="/tmp"
                        )
        except TimeoutError:
            return done(ok=False, error_type="TimeoutError", error=timeout_message(settings))
        except MontyCrashedError as exc:
            return done(ok=False, error_type="SandboxCrashed", error=f"the sandbox worker died and was replaced: {exc}")
        except MontyError as exc:
            return done(ok=False, **_describe(exc, settings))
        return done(ok=True, value=jsonable(value))


def _describe(exc: Any, settings: CodeModeSettings) -> dict[str, Any]:
    """`error_type` and `error` (with the traceback) of a Monty error."""
    try:
        head = exc.display(format="type-msg")
    except Exception:  # noqa: BLE001 - MontyTypingError and others have no formats
        head = str(exc)
    kind = head.split(":", 1)[0].strip() if ":" in head else type(exc).__name__
    if not kind.isidentifier():
        kind = type(exc).__name__
    try:
        text = exc.display()
    except Exception:  # noqa: BLE001
        text = head
    if kind == "TimeoutError" and "time limit" in text:
        text += f"\n({timeout_message(settings)})"
    elif kind == "MemoryError":
        text += f"\n(the sandbox may use {settings.memory_mb} MB: gateway.code_mode.memory_mb)"
    elif kind == "RecursionError":
        text += "\n(the sandbox allows a call depth of 1000)"
    return {"error_type": kind, "error": text}
