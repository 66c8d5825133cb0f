"""The `wasm` backend: CPython (Pyodide, from the npm registry) in WebAssembly on Deno (from PyPI).

The Deno process is started with permissions that allow reading Pyodide's own folder and
nothing else: no network, environment, subprocesses, FFI, OS information or writes
(`--allow-read=<pyodide dir>` plus explicit `--deny-*`). Python inside sees Pyodide's in-memory
filesystem only: host files do not exist there; `/tmp` is a scratch folder, emptied before each
execution; the other folders are read-only. On top of that, the code's own `import` of
subprocess, ctypes, socket, multiprocessing, threading, signal, js and pyodide is refused
with an ImportError, and the process functions of `os` raise OSError.

One warm Deno process per backend (loading Pyodide takes ~2 s, once); each execution gets a
fresh Python namespace. Tool calls cross stdin/stdout as JSON lines (see pyodide_runner.js).
Limits:
- wall time: past `timeout_ms` the process is killed (and restarted on the next execution);
- memory: the process's resident memory is watched (every 50 ms); past its size after loading
  plus `memory_mb` it is killed (a MemoryError); Python's own MemoryError comes first when an
  allocation cannot be had at all;
- recursion: CPython's limit (RecursionError);
- output: printed text beyond `max_output_bytes` is counted, not kept; so is the value's JSON.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import orjson

from mcpopt.codemode.sandbox import (
    CodeModeSettings,
    Execution,
    SandboxBackend,
    SandboxUnavailable,
    ToolBridge,
    timeout_message,
)

logger = logging.getLogger(__name__)

RUNNER = Path(__file__).with_name("pyodide_runner.js")
_MB = 1024 * 1024
_START_TIMEOUT_S = 90.0
_LINE_LIMIT = 256 * _MB

BOOTSTRAP = r"""
import ast, builtins, json, linecache, os, shutil, sys, traceback
from pyodide.code import eval_code_async

_BLOCKED = frozenset({
    "subprocess", "ctypes", "_ctypes", "socket", "_socket", "multiprocessing", "_multiprocessing",
    "threading", "_thread", "signal", "select", "selectors", "ssl", "_ssl", "js", "pyodide_js",
    "pyodide", "_pyodide", "micropip", "importlib", "_posixsubprocess", "pty", "termios", "fcntl",
})
_real_import = builtins.__import__


def _guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and globals is not None and globals.get("__mcpopt_sandbox__") is True:
        if name.partition(".")[0] in _BLOCKED:
            raise ImportError(
                f"import of {name!r} is not allowed in the code-mode sandbox "
                "(no processes, sockets, threads, FFI or host access)", name=name)
    return _real_import(name, globals, locals, fromlist, level)


builtins.__import__ = _guarded_import


def _no_process(*args, **kwargs):
    raise OSError("the code-mode sandbox cannot start processes")


for _name in ("system", "popen", "fork", "forkpty", "execv", "execve", "execl", "execle", "execlp",
              "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl",
              "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp"):
    for _mod in (os, sys.modules.get("posix")):
        if _mod is not None and hasattr(_mod, _name):
            setattr(_mod, _name, _no_process)
os.environ.clear()
os.environ.update({"HOME": "/home/pyodide", "TMPDIR": "/tmp"})


class _Out:
    encoding = "utf-8"
    errors = "replace"

    def __init__(self, limit):
        self.limit, self.parts, self.kept, self.total = limit, [], 0, 0

    def write(self, text):
        text = str(text)
        data = text.encode("utf-8", "replace")
        self.total += len(data)
        room = self.limit - self.kept
        if room > 0:
            piece = data[:room]
            self.parts.append(piece.decode("utf-8", "ignore"))
            self.kept += len(piece)
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass

    def isatty(self):
        return False


def _jsonable(value, depth=0):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth > 64:
        return repr(value)
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return repr(value)


def _clear_tmp():
    for entry in os.listdir("/tmp"):
        path = os.path.join("/tmp", entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                pass


def _has_top_level_return(tree):
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Return):
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        stack.extend(ast.iter_child_nodes(node))
    return False


def _format_error(exc):
    te = traceback.TracebackException.from_exception(exc)
    te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename in ("<code>", "<tools>")])
    return "".join(te.format()).rstrip()


async def _mcpopt_run(prelude, code, max_output, call_js):
    max_output = int(max_output)
    out = _Out(max_output)
    ns = {"__name__": "__main__", "__builtins__": builtins, "__mcpopt_sandbox__": True}

    async def __mcp_call__(name, arguments):
        reply = json.loads(await call_js(name, json.dumps(_jsonable(arguments))))
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error") or "the tool call failed")
        return reply.get("value")

    ns["__mcp_call__"] = __mcp_call__
    _clear_tmp()
    os.chdir("/tmp")
    linecache.cache["<code>"] = (len(code), None, code.splitlines(True), "<code>")
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = out
    answer = {"ok": True}
    try:
        exec(compile(prelude, "<tools>", "exec"), ns)
        tree = None
        try:
            tree = ast.parse(code, "<code>")
        except SyntaxError:
            pass
        if tree is not None and _has_top_level_return(tree):
            main = ast.AsyncFunctionDef(name="__mcpopt_main__", args=ast.arguments(), body=tree.body or [ast.Pass()],
                                        decorator_list=[], returns=None, type_params=[])
            module = ast.fix_missing_locations(ast.Module(body=[main], type_ignores=[]))
            exec(compile(module, "<code>", "exec"), ns)
            value = await ns["__mcpopt_main__"]()
        else:
            value = await eval_code_async(code, ns, filename="<code>")
        text = json.dumps(_jsonable(value), ensure_ascii=False, separators=(",", ":"))
        data = text.encode()
        if len(data) > max_output:
            answer["value"] = data[:max_output].decode("utf-8", "ignore")
            answer["value_cut_bytes"] = len(data) - max_output
        else:
            answer["value_json"] = text
    except BaseException as exc:  # noqa: BLE001 - everything the code does is reported
        answer = {"ok": False, "error_type": type(exc).__name__, "error": _format_error(exc)}
    finally:
        sys.stdout, sys.stderr = saved
        linecache.cache.pop("<code>", None)
        os.chdir("/tmp")
    answer["output"] = "".join(out.parts)
    answer["output_bytes"] = out.total
    return json.dumps(answer)
"""


def find_deno(settings: CodeModeSettings) -> str:
    """The Deno binary: `settings.deno`, the PyPI package `deno`'s, or `deno` on PATH.

    Raises:
        SandboxUnavailable: none found.
    """
    if settings.deno:
        return settings.deno
    with contextlib.suppress(Exception):
        import deno  # type: ignore[import-not-found]

        path = str(deno.find_deno_bin())
        if os.path.isfile(path):
            return path
    found = shutil.which("deno")
    if found:
        return found
    raise SandboxUnavailable("code mode backend 'wasm' needs Deno: pip install deno")


def find_pyodide(settings: CodeModeSettings) -> Path:
    """Pyodide's folder: `settings.pyodide_dir`, or `node_modules/pyodide` of the project or the cwd.

    Raises:
        SandboxUnavailable: not found.
    """
    candidates = [Path(settings.pyodide_dir)] if settings.pyodide_dir else []
    candidates += [
        Path(__file__).resolve().parents[3] / "node_modules" / "pyodide",
        Path.cwd() / "node_modules" / "pyodide",
    ]
    for path in candidates:
        if (path / "pyodide.mjs").is_file() and (path / "pyodide.asm.wasm").is_file():
            return path.resolve()
    raise SandboxUnavailable(
        "code mode backend 'wasm' needs Pyodide: npm install pyodide (in the project), "
        "or set gateway.code_mode.pyodide_dir"
    )


def _rss(pid: int) -> int:
    """Resident memory of a process (bytes; 0 when unknown)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return 0


class _Killed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class WasmBackend(SandboxBackend):
    """Runs code in Pyodide on one warm Deno process (see the module docstring).

    Args:
        settings: where Deno and Pyodide are (`deno`, `pyodide_dir`) and the V8 heap bound.
    """

    name = "wasm"

    def __init__(self, settings: CodeModeSettings) -> None:
        self.settings = settings
        self._proc: asyncio.subprocess.Process | None = None
        self._baseline = 0
        self._lock = asyncio.Lock()
        self._run_id = 0
        self._stderr: dict[int, collections.deque[bytes]] = {}
        self._drains: set[asyncio.Task[None]] = set()
        self._warm: asyncio.Task[None] | None = None
        self.starts = 0
        """How many Deno processes were started (restarts included)."""
        self.load_ms = 0.0
        """Milliseconds the last start took until Pyodide was ready."""

    def command(self) -> list[str]:
        """The Deno command line (permissions: read Pyodide's folder, nothing else)."""
        pyodide = find_pyodide(self.settings)
        heap = max(256, self.settings.memory_mb + 128)
        return [
            find_deno(self.settings),
            "run",
            "--quiet",
            "--no-prompt",
            "--no-config",
            "--no-lock",
            "--no-remote",
            "--no-npm",
            f"--allow-read={pyodide}",
            "--deny-net",
            "--deny-env",
            "--deny-run",
            "--deny-ffi",
            "--deny-sys",
            "--deny-write",
            f"--v8-flags=--max-old-space-size={heap}",
            str(RUNNER),
            str(pyodide),
        ]

    async def start(self) -> None:
        async with self._lock:
            await self._ensure()

    async def _ensure(self) -> asyncio.subprocess.Process:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            return proc
        cmd = self.command()
        env = {"HOME": os.environ.get("HOME", "/tmp"), "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"}
        if "DENO_DIR" in os.environ:
            env["DENO_DIR"] = os.environ["DENO_DIR"]
        t0 = time.perf_counter()
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                limit=_LINE_LIMIT,
                start_new_session=True,
            )
        except OSError as exc:
            raise SandboxUnavailable(f"cannot start Deno for code mode: {exc}") from exc
        self.starts += 1
        assert proc.stdin is not None and proc.stdout is not None
        tail: collections.deque[bytes] = collections.deque(maxlen=40)
        self._stderr[proc.pid] = tail
        self._drains.add(asyncio.create_task(_drain(proc, tail)))
        proc.stdin.write(orjson.dumps({"op": "init", "bootstrap": BOOTSTRAP}) + b"\n")
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                await proc.stdin.drain()
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        raise SandboxUnavailable(f"Deno/Pyodide exited while loading: {await _stderr_tail(proc, tail)}")
                    msg = _loads(line)
                    if msg is not None and msg.get("op") == "ready":
                        break
        except (TimeoutError, SandboxUnavailable) as exc:
            await _kill(proc)
            if isinstance(exc, SandboxUnavailable):
                raise
            raise SandboxUnavailable(f"Pyodide did not load within {_START_TIMEOUT_S:g} s") from None
        self.load_ms = (time.perf_counter() - t0) * 1000
        self._baseline = _rss(proc.pid)
        self._proc = proc
        return proc

    async def aclose(self) -> None:
        warm, self._warm = self._warm, None
        if warm is not None and not warm.done():
            warm.cancel()
            with contextlib.suppress(BaseException):
                await warm
        await self._stop()

    def _restart_soon(self) -> None:
        """Start a fresh process in the background after a kill, so the next execution finds it warm."""

        async def warm() -> None:
            with contextlib.suppress(Exception):
                await self.start()

        self._warm = asyncio.create_task(warm())

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await _kill(proc)
            self._stderr.pop(proc.pid, None)
        for task in list(self._drains):
            if task.done():
                self._drains.discard(task)

    async def execute(self, code: str, prelude: str, bridge: ToolBridge, settings: CodeModeSettings) -> Execution:
        async with self._lock:
            proc = self._proc
            if proc is not None and proc.returncode is None and self._baseline:
                # Wasm memory never shrinks: after a run that grew it by half the budget, start afresh.
                if _rss(proc.pid) > self._baseline + settings.memory_mb * _MB // 2:
                    await self._stop()
            proc = await self._ensure()
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(settings.timeout_ms / 1000):
                    answer = await self._run(proc, code, prelude, bridge, settings)
            except TimeoutError:
                await self._stop()
                self._restart_soon()
                return Execution(
                    ok=False,
                    error_type="TimeoutError",
                    error=timeout_message(settings),
                    duration_ms=(time.perf_counter() - t0) * 1000,
                    backend=self.name,
                )
            except _Killed as exc:
                await self._stop()
                self._restart_soon()
                return Execution(
                    ok=False,
                    error_type=exc.kind,
                    error=str(exc),
                    duration_ms=(time.perf_counter() - t0) * 1000,
                    backend=self.name,
                )
            except BaseException:
                await self._stop()  # cancelled mid-run: the process state is unknown
                raise
        execution = Execution(
            ok=bool(answer.get("ok")),
            output=str(answer.get("output") or ""),
            output_bytes=int(answer.get("output_bytes") or 0),
            error_type=answer.get("error_type"),
            error=answer.get("error"),
            duration_ms=(time.perf_counter() - t0) * 1000,
            backend=self.name,
        )
        if "value_json" in answer:
            execution.value = orjson.loads(answer["value_json"])
        elif "value" in answer:
            execution.value = answer["value"]
            execution.value_cut_bytes = int(answer.get("value_cut_bytes") or 0)
        if execution.error_type == "MemoryError" and execution.error:
            execution.error += f"\n(the sandbox may use {settings.memory_mb} MB: gateway.code_mode.memory_mb)"
        return execution

    async def _run(
        self,
        proc: asyncio.subprocess.Process,
        code: str,
        prelude: str,
        bridge: ToolBridge,
        settings: CodeModeSettings,
    ) -> dict[str, Any]:
        assert proc.stdin is not None and proc.stdout is not None
        self._run_id += 1
        run_id = self._run_id
        stdin = proc.stdin
        limit = self._baseline + settings.memory_mb * _MB if self._baseline else 0
        write_lock = asyncio.Lock()

        async def send(message: dict[str, Any]) -> None:
            data = orjson.dumps(message, default=repr) + b"\n"
            async with write_lock:
                stdin.write(data)
                await stdin.drain()

        async def answer_call(msg: dict[str, Any]) -> None:
            try:
                args = msg.get("arguments")
                value = await bridge(str(msg.get("name")), args if isinstance(args, dict) else {})
                reply: dict[str, Any] = {"op": "reply", "id": msg.get("id"), "ok": True, "value": value}
            except Exception as exc:  # noqa: BLE001 - the sandbox sees it as a RuntimeError
                reply = {"op": "reply", "id": msg.get("id"), "ok": False, "error": str(exc)}
            with contextlib.suppress(ConnectionError, RuntimeError):
                await send(reply)

        async def watch_memory() -> None:
            while True:
                await asyncio.sleep(0.05)
                rss = _rss(proc.pid)
                if limit and rss > limit:
                    raise _Killed(
                        "MemoryError",
                        f"execution stopped: the sandbox grew past its {settings.memory_mb} MB memory limit "
                        f"(gateway.code_mode.memory_mb; {rss / _MB:.0f} MB resident)",
                    )

        async def read() -> dict[str, Any]:
            assert proc.stdout is not None
            while True:
                line = await proc.stdout.readline()
                if not line:
                    raise _Killed(
                        "SandboxCrashed",
                        f"the wasm sandbox exited: {await _stderr_tail(proc, self._stderr.get(proc.pid))}",
                    )
                msg = _loads(line)
                if msg is None:
                    continue
                op = msg.get("op")
                if op == "call" and msg.get("run") == run_id:
                    calls.append(asyncio.create_task(answer_call(msg)))
                elif op == "done" and msg.get("id") == run_id:
                    result = _loads(str(msg.get("result", "")).encode())
                    if result is None:
                        raise _Killed("SandboxCrashed", "the wasm sandbox sent an unreadable result")
                    return result

        calls: list[asyncio.Task[None]] = []
        await send(
            {"op": "run", "id": run_id, "prelude": prelude, "code": code, "max_output": settings.max_output_bytes}
        )
        watcher = asyncio.create_task(watch_memory())
        reader = asyncio.create_task(read())
        try:
            done, _ = await asyncio.wait({watcher, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                return reader.result()
            watcher.result()  # raises _Killed
            raise AssertionError("unreachable")
        finally:
            for task in (watcher, reader, *calls):
                task.cancel()
            for task in (watcher, reader, *calls):
                with contextlib.suppress(BaseException):
                    await task


def _loads(line: bytes) -> dict[str, Any] | None:
    try:
        msg = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return msg if isinstance(msg, dict) else None


async def _drain(proc: asyncio.subprocess.Process, tail: collections.deque[bytes]) -> None:
    """Keep reading the process's stderr (so it never blocks on a full pipe), keeping the last lines."""
    if proc.stderr is None:
        return
    with contextlib.suppress(Exception):
        while line := await proc.stderr.readline():
            tail.append(line[:400])


async def _stderr_tail(proc: asyncio.subprocess.Process, tail: collections.deque[bytes] | None) -> str:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1):
            if proc.returncode is None:
                await proc.wait()
    await asyncio.sleep(0.05)
    text = b"".join(tail or ()).decode(errors="replace").strip()
    return text[-1500:] or f"exit code {proc.returncode}"


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5):
            await proc.wait()
    for stream in (proc.stdin,):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
