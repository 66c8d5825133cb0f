"""The `wasm` backend: CPython (Pyodide, from the npm registry) in WebAssembly on Deno (from PyPI).

The Deno process is started with permissions that allow reading Pyodide's own folder and
nothing else: no network, environment, subprocesses, FFI, OS information or writes
(`--allow-read=<pyodide dir>` plus explicit `--deny-*`). Python inside sees Pyodide's in-memory
filesystem only: host files do not exist there; `/tmp` is a scratch folder, emptied before each
execution; the other folders are read-only. On top of that, the code's own `import` of
subprocess, ctypes, socket, multiprocessing, threading, signal, js and pyodide is refused
with an ImportError, and the process functions of `os` raise OSError.

Stateless executions share one warm Deno process (loading Pyodide takes ~2 s, once) and get a
fresh Python namespace each. A code session gets a Deno process of its own -- its live
interpreter, whose one namespace, imports and in-memory `/tmp` persist across the session's
calls (cells are named `<cell-N>` in tracebacks); a spare process keeps loading in the
background so a new session rarely waits. Tool calls cross stdin/stdout as JSON lines (see
pyodide_runner.js).

Layer 2 (`isolation`): each Deno process runs inside bubblewrap with seccomp, rlimits and
cgroups (`mcpopt.codemode.isolation`); the memory watcher then sums the process tree (bwrap and
its Deno child).
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
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from mcpopt.codemode.isolation import WASM_ADDRESS_SPACE, Isolation
from mcpopt.codemode.sandbox import (
    CodeModeSettings,
    Execution,
    SandboxBackend,
    SandboxUnavailable,
    SkillSaver,
    ToolBridge,
    timeout_message,
)

if TYPE_CHECKING:
    from mcpopt.codemode.sandbox import CodeSession

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


def _top_level_names(tree):
    # Names the module body binds (outside nested functions and classes): they stay globals
    # when the body runs inside `__mcpopt_main__` (a top-level `return`).
    names = set()
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name != "*":
                    names.add((alias.asname or alias.name).partition(".")[0])
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue
        stack.extend(ast.iter_child_nodes(node))
    return sorted(names)


def _format_error(exc):
    te = traceback.TracebackException.from_exception(exc)
    te.stack = traceback.StackSummary.from_list(
        [f for f in te.stack if f.filename in ("<code>", "<tools>") or f.filename.startswith("<cell-")])
    return "".join(te.format()).rstrip()


_SESSION = None
_CELLS = []
_SKILLS = []


def _save_skill(fn, code=None, docstring=None):
    name = getattr(fn, "__name__", fn)
    if not isinstance(name, str):
        raise TypeError("save_skill takes a function or its name first")
    if code is not None and not isinstance(code, str):
        raise TypeError("save_skill: code must be a string of Python source")
    if docstring is not None and not isinstance(docstring, str):
        raise TypeError("save_skill: docstring must be a string")
    if code is not None:
        compile(code, "<skill>", "exec")
    _SKILLS.append([name, code, docstring])
    return f"skill {name!r} is saved when this call ends; later calls can `from skills import {name}`"


async def _mcpopt_run(prelude, code, max_output, call_js, keep=False, skills=False):
    global _SESSION
    max_output = int(max_output)
    out = _Out(max_output)
    _SKILLS.clear()
    if keep:
        if _SESSION is None:
            _SESSION = {"__name__": "__main__", "__builtins__": builtins, "__mcpopt_sandbox__": True}
        ns = _SESSION
        filename = "<cell-%d>" % (len(_CELLS) + 1)
        _CELLS.append(filename)
        if len(_CELLS) > 64:
            linecache.cache.pop(_CELLS.pop(0), None)
    else:
        ns = {"__name__": "__main__", "__builtins__": builtins, "__mcpopt_sandbox__": True}
        filename = "<code>"
    if skills:
        ns["save_skill"] = _save_skill

    async def __mcp_call__(name, arguments):
        reply = json.loads(await call_js(name, json.dumps(_jsonable(arguments))))
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error") or "the tool call failed")
        return reply.get("value")

    ns["__mcp_call__"] = __mcp_call__
    if not keep:
        _clear_tmp()
        os.chdir("/tmp")
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = out
    answer = {"ok": True}
    try:
        exec(compile(prelude, "<tools>", "exec"), ns)
        tree = None
        try:
            tree = ast.parse(code, filename)
        except SyntaxError:
            pass
        if tree is not None and _has_top_level_return(tree):
            body = tree.body or [ast.Pass()]
            names = _top_level_names(tree)
            if names:
                body = [ast.Global(names=names)] + body
            main = ast.AsyncFunctionDef(name="__mcpopt_main__", args=ast.arguments(), body=body,
                                        decorator_list=[], returns=None, type_params=[])
            module = ast.fix_missing_locations(ast.Module(body=[main], type_ignores=[]))
            exec(compile(module, filename, "exec"), ns)
            value = await ns.pop("__mcpopt_main__")()
        else:
            value = await eval_code_async(code, ns, filename=filename)
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
        if not keep:
            linecache.cache.pop("<code>", None)
            os.chdir("/tmp")
    answer["output"] = "".join(out.parts)
    answer["output_bytes"] = out.total
    answer["skills"] = list(_SKILLS)
    return json.dumps(answer)
"""

UNGUARDED_BOOTSTRAP = BOOTSTRAP.replace("builtins.__import__ = _guarded_import", "pass").replace(
    "            setattr(_mod, _name, _no_process)", "            pass"
)
"""The bootstrap without the in-sandbox guards (tests that prove layer 2 on its own)."""


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
    """Resident memory of a process and its descendants (bytes; 0 when unknown). Inside layer 2
    the process we start is bubblewrap and Deno is its grandchild: the whole tree counts."""
    total = 0
    seen: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", "rb") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError, IndexError):
            continue
    return total


class _Killed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Interpreter:
    """One Deno process with Pyodide loaded: a session's live interpreter, or the shared one."""

    def __init__(self, backend: WasmBackend) -> None:
        self.backend = backend
        self.proc: asyncio.subprocess.Process | None = None
        self.baseline = 0
        self.lock = asyncio.Lock()
        self.run_id = 0
        self.tail: collections.deque[bytes] = collections.deque(maxlen=40)
        self.drain: asyncio.Task[None] | None = None
        self.load_ms = 0.0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> asyncio.subprocess.Process:
        if self.alive:
            assert self.proc is not None
            return self.proc
        be = self.backend
        cmd, env = be.spawn_command()
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
        be.starts += 1
        assert proc.stdin is not None and proc.stdout is not None
        self.tail = collections.deque(maxlen=40)
        self.drain = asyncio.create_task(_drain(proc, self.tail))
        bootstrap = BOOTSTRAP if be.layer1 else UNGUARDED_BOOTSTRAP
        proc.stdin.write(orjson.dumps({"op": "init", "bootstrap": bootstrap}) + b"\n")
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                await proc.stdin.drain()
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        raise SandboxUnavailable(
                            f"Deno/Pyodide exited while loading: {await _stderr_tail(proc, self.tail)}"
                        )
                    msg = _loads(line)
                    if msg is not None and msg.get("op") == "ready":
                        break
        except (TimeoutError, SandboxUnavailable, ConnectionError) as exc:
            await _kill(proc)
            if isinstance(exc, SandboxUnavailable):
                raise
            raise SandboxUnavailable(f"Pyodide did not load within {_START_TIMEOUT_S:g} s: {exc}") from None
        self.load_ms = be.load_ms = (time.perf_counter() - t0) * 1000
        self.baseline = _rss(proc.pid)
        self.proc = proc
        return proc

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            await _kill(proc)
        if self.drain is not None and self.drain.done():
            self.drain = None

    async def run(
        self,
        code: str,
        prelude: str,
        bridge: ToolBridge,
        settings: CodeModeSettings,
        *,
        keep: bool,
        skills: bool,
    ) -> dict[str, Any]:
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        self.run_id += 1
        run_id = self.run_id
        stdin = proc.stdin
        limit = self.baseline + settings.memory_mb * _MB if self.baseline and self.backend.layer1 else 0
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
                    raise _Killed("SandboxCrashed", f"the wasm sandbox exited: {await self.death()}")
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
        message = {
            "op": "run",
            "id": run_id,
            "prelude": prelude,
            "code": code,
            "max_output": settings.max_output_bytes,
            "keep": keep,
            "skills": skills,
        }
        try:
            await send(message)
        except ConnectionError:
            raise _Killed("SandboxCrashed", f"the wasm sandbox exited: {await self.death()}") from None
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

    async def death(self) -> str:
        """Why the process ended: its stderr's tail, or what layer 2 says about a SIGKILL."""
        assert self.proc is not None
        text = await _stderr_tail(self.proc, self.tail)
        iso = self.backend.isolation
        if iso is not None and iso.active and self.proc.returncode in (137, -9):
            cause = "memory cgroup" if iso.oom_killed() > self.backend.ooms_seen else "CPU-time rlimit or memory cgroup"
            self.backend.ooms_seen = iso.oom_killed()
            text += f" (killed by a layer-2 limit: the {cause}; gateway.code_mode.memory_mb / isolation.cpu_s)"
        return text


class WasmBackend(SandboxBackend):
    """Runs code in Pyodide on Deno (see the module docstring).

    Stateless executions share one warm Deno process (a fresh namespace each); a code session
    gets a Deno process of its own (its live interpreter), so sessions never share memory. A
    spare process is kept loading in the background so a new session does not wait for
    Pyodide (~2 s).

    Args:
        settings: where Deno and Pyodide are (`deno`, `pyodide_dir`), the V8 heap bound and
            `isolation` (layer 2).
        layer1: False runs Deno with every permission, without the in-sandbox guards and without
            the memory watcher: only for tests that prove layer 2 on its own.
    """

    name = "wasm"
    live_state = True

    def __init__(self, settings: CodeModeSettings, *, layer1: bool = True) -> None:
        self.settings = settings
        self.layer1 = layer1
        self._shared = _Interpreter(self)
        self._sessions: dict[str, _Interpreter] = {}
        self._spare: asyncio.Task[_Interpreter] | None = None
        self._warm: asyncio.Task[None] | None = None
        self.isolation: Isolation | None = None
        self.ooms_seen = 0
        self.starts = 0
        """How many Deno processes were started (restarts included)."""
        self.load_ms = 0.0
        """Milliseconds the last start took until Pyodide was ready."""

    # ---- command lines ------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The Deno command line (permissions: read Pyodide's folder, nothing else)."""
        pyodide = find_pyodide(self.settings)
        heap = max(256, self.settings.memory_mb + 128)
        permissions = (
            ["--allow-all"]
            if not self.layer1
            else [
                f"--allow-read={pyodide}",
                "--deny-net",
                "--deny-env",
                "--deny-run",
                "--deny-ffi",
                "--deny-sys",
                "--deny-write",
            ]
        )
        return [
            find_deno(self.settings),
            "run",
            "--quiet",
            "--no-prompt",
            "--no-config",
            "--no-lock",
            "--no-remote",
            "--no-npm",
            *permissions,
            f"--v8-flags=--max-old-space-size={heap}",
            str(RUNNER),
            str(pyodide),
        ]

    def memory_bytes(self) -> int:
        """The layer-2 memory bound of one Deno process (cgroup): the budget plus Deno and Pyodide's own."""
        return self.settings.memory_mb * _MB + _DENO_OWN

    def spawn_command(self) -> tuple[list[str], dict[str, str]]:
        """The command and environment that start one interpreter (inside layer 2 when active)."""
        cmd = self.command()
        env = {"NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"}
        if self.isolation is None:
            self.isolation = Isolation(self.settings.isolation)
        if not self.isolation.active:
            env["HOME"] = os.environ.get("HOME", "/tmp")
            if "DENO_DIR" in os.environ:
                env["DENO_DIR"] = os.environ["DENO_DIR"]
            return cmd, env
        pyodide = str(find_pyodide(self.settings))
        env["DENO_DIR"] = "/scratch/deno"
        argv, full_env, _ = self.isolation.command(
            cmd,
            ro_paths=[pyodide, str(RUNNER)],
            memory_bytes=self.memory_bytes(),
            address_space=WASM_ADDRESS_SPACE,
            env=env,
        )
        return argv, full_env

    def layers(self) -> dict[str, Any]:
        iso = self.isolation
        layer1 = (
            "wasm: CPython in WebAssembly (Pyodide) on Deno with deny-all permissions (reads: Pyodide's "
            "folder only; no network, environment, processes, FFI, system info or writes) and an import guard"
        )
        if not self.layer1:
            layer1 = "DISABLED (test only: Deno --allow-all, no import guard)"
        layer2 = (
            asdict(iso.report(memory_bytes=self.memory_bytes(), address_space=WASM_ADDRESS_SPACE))
            if iso is not None
            else {"active": False, "reason": "not started yet"}
        )
        return {"layer1": layer1, "layer2": layer2}

    # ---- lifecycle ----------------------------------------------------------------------------
    async def _prepare(self) -> None:
        if self.isolation is None:
            self.isolation = await asyncio.to_thread(Isolation, self.settings.isolation)

    async def start(self) -> None:
        await self._prepare()
        async with self._shared.lock:
            await self._shared.start()

    async def aclose(self) -> None:
        for task in (self._warm, self._spare):
            if task is not None and not task.done():
                task.cancel()
            if task is not None:
                with contextlib.suppress(BaseException):
                    spare = await task
                    if isinstance(spare, _Interpreter):
                        await spare.stop()
        self._warm = self._spare = None
        await self._shared.stop()
        for interp in list(self._sessions.values()):
            await interp.stop()
        self._sessions.clear()
        if self.isolation is not None:
            self.isolation.close()
            self.isolation = None

    @property
    def _proc(self) -> asyncio.subprocess.Process | None:
        """The shared interpreter's process (diagnostics and tests)."""
        return self._shared.proc

    def holds(self, key: str) -> bool:
        interp = self._sessions.get(key)
        return interp is not None and interp.alive

    async def drop_session(self, key: str) -> None:
        interp = self._sessions.pop(key, None)
        if interp is not None:
            await interp.stop()

    def _restart_soon(self) -> None:
        """Start a fresh shared process in the background after a kill, so the next execution finds it warm."""

        async def warm() -> None:
            with contextlib.suppress(Exception):
                await self.start()

        self._warm = asyncio.create_task(warm())

    def _keep_spare(self) -> None:
        if self._spare is None or (self._spare.done() and self._spare.exception() is not None):

            async def spare() -> _Interpreter:
                interp = _Interpreter(self)
                await interp.start()
                return interp

            self._spare = asyncio.create_task(spare())

    async def _session_interpreter(self, key: str) -> _Interpreter:
        interp = self._sessions.get(key)
        if interp is not None and interp.alive:
            return interp
        interp = None
        if self._spare is not None:
            task, self._spare = self._spare, None
            with contextlib.suppress(Exception):
                candidate = await task
                if candidate.alive:
                    interp = candidate
        if interp is None:
            interp = _Interpreter(self)
            await interp.start()
        self._sessions[key] = interp
        self._keep_spare()
        return interp

    # ---- execution ----------------------------------------------------------------------------
    async def execute(
        self,
        code: str,
        prelude: str,
        bridge: ToolBridge,
        settings: CodeModeSettings,
        session: CodeSession | None = None,
        save_skill: SkillSaver | None = None,
    ) -> Execution:
        await self._prepare()
        interp = self._shared if session is None else await self._session_interpreter(session.key)
        async with interp.lock:
            if session is None and interp.alive and interp.baseline and interp.proc is not None:
                # Wasm memory never shrinks: after a run that grew it by half the budget, start afresh.
                if _rss(interp.proc.pid) > interp.baseline + settings.memory_mb * _MB // 2:
                    await interp.stop()
            await interp.start()
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(settings.timeout_ms / 1000):
                    answer = await interp.run(
                        code, prelude, bridge, settings, keep=session is not None, skills=save_skill is not None
                    )
            except (TimeoutError, _Killed) as exc:
                await interp.stop()
                if session is None:
                    self._restart_soon()
                else:
                    self._sessions.pop(session.key, None)
                kind = exc.kind if isinstance(exc, _Killed) else "TimeoutError"
                return Execution(
                    ok=False,
                    error_type=kind,
                    error=str(exc) if isinstance(exc, _Killed) else timeout_message(settings),
                    duration_ms=(time.perf_counter() - t0) * 1000,
                    backend=self.name,
                    keep=False,
                )
            except BaseException:
                await interp.stop()  # cancelled mid-run: the process state is unknown
                if session is not None:
                    self._sessions.pop(session.key, None)
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
        requests = answer.get("skills")
        if isinstance(requests, list) and requests:
            execution.skills = [
                (str(r[0]), r[1] if isinstance(r[1], str) else None, r[2] if isinstance(r[2], str) else None)
                for r in requests
                if isinstance(r, list) and len(r) == 3
            ]
        return execution


_DENO_OWN = 384 * _MB
"""Deno and Pyodide's own memory beside the budget (measured: ~150 MB resident after loading)."""


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
