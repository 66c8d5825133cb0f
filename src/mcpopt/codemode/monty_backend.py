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
  the execution; in a code session, the session's own files, kept with its state); everything
  else is denied.
A crashed worker (`MontyCrashedError`) is replaced by the pool; the execution reports
`SandboxCrashed`.

Code sessions: the worker's session is restored from the session's snapshot before the
prelude (`load_session`) and dumped after the code (`dump`), also after an error the code
raised (REPL semantics: what ran before the error stays); after a time or memory limit monty
gives no guarantee about the heap, so that call's changes are dropped (`keep=False`).

Layer 2 (`isolation`): the pool's workers are started through `Isolation.wrapper_script`, so
each runs in bubblewrap with seccomp, rlimits (address space `memory_mb` + 1 GiB, CPU, files)
and cgroups; the scratch folder is served host-side by the pool, so the worker needs no host
files at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import tempfile
import time
import weakref
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Literal

from mcpopt.codemode.isolation import Isolation
from mcpopt.codemode.sandbox import (
    CappedText,
    CodeModeSettings,
    Execution,
    SandboxBackend,
    SandboxUnavailable,
    SkillSaver,
    ToolBridge,
    jsonable,
    timeout_message,
)
from mcpopt.codemode.stubs import CALL_FUNCTION

if TYPE_CHECKING:
    from mcpopt.codemode.sandbox import CodeSession

_MB = 1024 * 1024
_GB = 1024 * _MB


class MontyBackend(SandboxBackend):
    """Runs code in pydantic-monty workers (see the module docstring for the limits).

    Args:
        settings: the limits, and `isolation` (layer 2) for the worker processes.
        layer1: False runs without monty's own time and memory limits: only for tests that
            prove layer 2 on its own (the worker's cgroup and rlimits then stop the bombs).
    """

    name = "monty"

    def __init__(self, settings: CodeModeSettings | None = None, *, layer1: bool = True) -> None:
        self.settings = settings or CodeModeSettings()
        self.layer1 = layer1
        self._pool: Any = None
        self._start_lock = asyncio.Lock()
        self._scratch = tempfile.mkdtemp(prefix="mcpopt-codemode-scratch-")
        weakref.finalize(self, shutil.rmtree, self._scratch, True)  # at GC, or at exit at the latest
        self.isolation: Isolation | None = None

    def _memory_bytes(self) -> int:
        return self.settings.memory_mb * _MB + _WORKER_OVERHEAD

    def _address_space(self) -> int:
        return self.settings.memory_mb * _MB + _GB

    async def start(self) -> None:
        async with self._start_lock:
            if self._pool is not None:
                return
            try:
                from pydantic_monty import AsyncMonty
                from pydantic_monty._binary import find_monty_binary
            except ImportError as exc:  # pragma: no cover - a dependency of mcpopt
                raise SandboxUnavailable(
                    "code mode backend 'monty' needs pydantic-monty: pip install pydantic-monty"
                ) from exc
            binary: str | None = None
            if self.isolation is None:
                self.isolation = await asyncio.to_thread(Isolation, self.settings.isolation)
            if self.isolation.active:
                try:
                    worker = find_monty_binary()
                except FileNotFoundError as exc:
                    raise SandboxUnavailable(f"cannot start the monty worker pool: {exc}") from exc
                binary = self.isolation.wrapper_script(
                    worker, memory_bytes=self._memory_bytes(), address_space=self._address_space()
                )
            pool = AsyncMonty(
                binary_path=binary,
                min_processes=1,
                max_checkouts_per_worker=_CHECKOUTS_PER_WORKER,
                feed_duration_limit_grace=1.0,
                turn_duration_limit_grace=1.0,
            )
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
        if self.isolation is not None:
            self.isolation.close()
            self.isolation = None

    def layer2_command(self, argv: list[str]) -> tuple[list[str], dict[str, str]]:
        """`argv` wrapped in exactly the layer 2 the pool's workers get (same rlimits, cgroup and
        mounts, with `argv[0]` bound in place of the worker binary): for tests and diagnostics.

        Raises:
            SandboxUnavailable: layer 2 is not active.
        """
        if self.isolation is None or not self.isolation.active:
            raise SandboxUnavailable("layer 2 is not active for the monty backend")
        cmd, env, _ = self.isolation.command(
            argv, memory_bytes=self._memory_bytes(), address_space=self._address_space()
        )
        return cmd, env

    def layers(self) -> dict[str, Any]:
        layer2 = (
            self.isolation.report(memory_bytes=self._memory_bytes(), address_space=self._address_space())
            if (self.isolation is not None)
            else None
        )
        return {
            "layer1": "monty: a Python-subset interpreter with no host access (files: /tmp scratch only; "
            "no subprocess, socket, ctypes or environment), heap and time limits",
            "layer2": asdict(layer2) if layer2 is not None else {"active": False, "reason": "not started yet"},
        }

    async def execute(
        self,
        code: str,
        prelude: str,
        bridge: ToolBridge,
        settings: CodeModeSettings,
        session: CodeSession | None = None,
        save_skill: SkillSaver | None = None,
    ) -> Execution:
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
        if not self.layer1:
            limits = {"max_suspensions": limits["max_suspensions"]}

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

        lookup: dict[str, Any] = {CALL_FUNCTION: bridge}
        if save_skill is not None:

            def save_skill_fn(fn: Any, code: Any = None, docstring: Any = None) -> str:
                if code is not None and not isinstance(code, str):
                    raise TypeError("save_skill: code must be a string of Python source")
                if docstring is not None and not isinstance(docstring, str):
                    raise TypeError("save_skill: docstring must be a string")
                return save_skill(str(fn), code, docstring)

            lookup["save_skill"] = save_skill_fn
        scratch_bytes = settings.isolation.scratch_mb * _MB
        folder = self._scratch if session is None else tempfile.mkdtemp(prefix="mcpopt-session-")
        snapshot: bytes | None = None
        files: dict[str, bytes] | None = None
        error: dict[str, Any] | None = None
        value: Any = None
        try:
            if session is not None:
                _write_files(folder, session.files)
            mode: Literal["overlay", "read-write"] = "overlay" if session is None else "read-write"
            async with asyncio.timeout(seconds):
                async with self._pool.checkout(limits=limits, script_name="code.py") as worker:
                    if session is not None and session.snapshot:
                        await worker.load_session(session.snapshot)
                    with MountDir(
                        host_path=folder, virtual_path="/tmp", mode=mode, write_bytes_limit=scratch_bytes
                    ) as scratch:
                        try:
                            await worker.feed_run(prelude, external_lookup=lookup, print_callback=printed)
                            value = await worker.feed_run(
                                code, external_lookup=lookup, print_callback=printed, mount=scratch, cwd="/tmp"
                            )
                        except MontyCrashedError:
                            raise
                        except MontyError as exc:
                            error = _describe(exc, settings)
                    if session is not None and (error is None or error["error_type"] not in _UNSAFE):
                        snapshot = await worker.dump()
                        files = _read_files(folder, scratch_bytes)
        except TimeoutError:
            return done(ok=False, error_type="TimeoutError", error=timeout_message(settings), keep=False)
        except MontyCrashedError as exc:
            return done(ok=False, keep=False, **self._crash(exc))
        except MontyError as exc:
            return done(ok=False, keep=False, **_describe(exc, settings))
        finally:
            if session is not None:
                shutil.rmtree(folder, ignore_errors=True)
        if error is not None:
            keep = error["error_type"] not in _UNSAFE
            return done(ok=False, snapshot=snapshot, files=files, keep=keep, **error)
        return done(ok=True, value=jsonable(value), snapshot=snapshot, files=files)

    def _crash(self, exc: Exception) -> dict[str, Any]:
        message = f"the sandbox worker died and was replaced: {exc}"
        if self.isolation is not None and self.isolation.active and "137" in str(exc):
            message += (
                " (killed by a layer-2 limit: the memory cgroup or the CPU-time rlimit, "
                "gateway.code_mode.memory_mb / isolation.cpu_s)"
            )
        return {"error_type": "SandboxCrashed", "error": message}


_UNSAFE = frozenset({"TimeoutError", "MemoryError"})
"""Errors after which monty gives no guarantee about the session's heap: its state is not kept."""
_WORKER_OVERHEAD = 256 * _MB
"""A worker's own memory beside the sandbox heap (measured: ~8 MB resident, 180 MB peak virtual)."""
_CHECKOUTS_PER_WORKER = 50
"""Workers are recycled after this many executions, so a worker's lifetime CPU (RLIMIT_CPU) stays bounded."""
_MAX_FILES = 1000


def _write_files(folder: str, files: dict[str, bytes]) -> None:
    """Materialize a session's scratch files (relative paths; anything else is skipped)."""
    root = os.path.realpath(folder)
    for rel, data in files.items():
        path = os.path.realpath(os.path.join(root, rel))
        if not path.startswith(root + os.sep) or os.path.isabs(rel) or ".." in rel.split("/"):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def _read_files(folder: str, limit: int) -> dict[str, bytes]:
    """The regular files under `folder` (no symlinks followed), up to `limit` bytes and 1000 files."""
    out: dict[str, bytes] = {}
    total = 0
    for base, dirs, names in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(base, d))]
        for name in names:
            path = os.path.join(base, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or total + st.st_size > limit or len(out) >= _MAX_FILES:
                    continue
                with open(path, "rb") as f:
                    data = f.read(st.st_size)
                total += len(data)
                out[os.path.relpath(path, folder)] = data
    return out


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
