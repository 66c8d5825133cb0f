"""A scratch copy of a config's local state, so that replays never change the real thing.

Scenarios exercise write tools (git_commit, write_file, create_entities, write_query, ...). Run
against the configured servers as they are, they would commit to the user's repository or edit
their files. `sandbox_config` rewrites a config so that every stdio server works on copies:

- an argument naming an existing directory: a git work tree is cloned (`git clone --shared`,
  cheap: objects are borrowed, the clone has its own index, HEAD and branches; a detached HEAD is
  put on a branch of the clone, `_attach_head`), a folder inside
  such a work tree maps to the same place in the clone, any other folder is copied (up to
  `max_copy_bytes`);
- the value after a flag that names a file (`--db-path`, `--file`, `--database`, ...) and an env
  value of a key ending in `_PATH`, `_FILE`, `_DB` or `_DIR`: the file is copied (or, when it
  does not exist yet, the new file lands in the scratch folder).

Remote (HTTP) servers are left alone: say so to the user (`Sandbox.untouched`).

Errors: `SandboxError` when a folder is too large to copy (use the real one knowingly, with
`--no-sandbox`) or a clone fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcpopt.config import Config
from mcpopt.errors import McpoptError

_FILE_FLAG = re.compile(r"^--?[\w-]*(path|file|db|database|dir|directory|root|repo|repository)$", re.IGNORECASE)
_FILE_ENV = re.compile(r"_(PATH|FILE|DB|DIR)$")


class SandboxError(McpoptError):
    """A server's local state cannot be copied into the sandbox (the message says which and why)."""


@dataclass
class Sandbox:
    """The rewritten config and where its copies live.

    Attributes:
        config: a deep copy of the config whose stdio servers point at the copies.
        root: the scratch folder (removed by `cleanup`).
        mapping: original absolute path -> its copy.
        untouched: servers whose state could not be sandboxed (remote ones).
    """

    config: Config
    root: Path
    mapping: dict[str, str] = field(default_factory=dict)
    untouched: list[str] = field(default_factory=list)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _size(path: Path, limit: int) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                continue
            if total > limit:
                return total
    return total


def _copy_dir(src: Path, dst: Path, max_bytes: int) -> None:
    if (src / ".git").exists():
        proc = subprocess.run(
            ["git", "clone", "--quiet", "--shared", str(src), str(dst)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise SandboxError(f"cannot clone {src} into the sandbox: {proc.stderr.strip()[:300]}")
        # The clone must be able to commit whatever the user's git config says.
        for key, value in (("user.name", "mcpopt sandbox"), ("user.email", "sandbox@mcpopt.invalid")):
            subprocess.run(["git", "-C", str(dst), "config", key, value], capture_output=True, timeout=10)
        _attach_head(dst)
        return
    size = _size(src, max_bytes)
    if size > max_bytes:
        raise SandboxError(
            f"{src} is larger than {max_bytes:,} bytes: too big to copy into the sandbox "
            "(raise max_copy_bytes, or run with --no-sandbox to use the real folder)"
        )
    shutil.copytree(src, dst, symlinks=True)


SANDBOX_BRANCH = "mcpopt-sandbox"
"""The branch a clone of a work tree with a detached HEAD is put on (at the same commit)."""


def _attach_head(repo: Path) -> None:
    """Put a clone whose HEAD is detached on a local branch at the same commit (`SANDBOX_BRANCH`).

    A work tree checked out at a commit rather than a branch (CI checkouts, `git worktree add`
    without a branch, bisect) clones with a detached HEAD, and a git server cannot branch from it
    (mcp-server-git's `git_create_branch`: "HEAD is detached, so there is no branch to base on"):
    a scenario that branches would fail in the sandbox where it passes on a branch. The branch lives
    in the clone only. Raises `SandboxError` when git cannot create it.
    """
    attached = subprocess.run(["git", "-C", str(repo), "symbolic-ref", "-q", "HEAD"], capture_output=True, timeout=10)
    if attached.returncode == 0:
        return
    proc = subprocess.run(
        ["git", "-C", str(repo), "checkout", "--quiet", "-b", SANDBOX_BRANCH],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if proc.returncode != 0:
        raise SandboxError(f"cannot put the sandbox clone {repo} on a branch: {proc.stderr.strip()[:300]}")


class _Copier:
    def __init__(self, root: Path, base: Path, max_bytes: int) -> None:
        self.root = root
        self.base = base
        self.max_bytes = max_bytes
        self.mapping: dict[str, str] = {}
        self.repos: dict[str, str] = {}

    def _abs(self, value: str, cwd: str | None) -> Path:
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else (Path(cwd) if cwd else self.base) / path

    def _target(self, src: Path) -> Path:
        dst = self.root / f"{len(self.mapping):02d}-{src.name or 'root'}"
        self.mapping[str(src)] = str(dst)
        return dst

    def inside(self, src: Path) -> str | None:
        """The copy of `src` when it lies inside an already cloned repository (one copy, one state)."""
        for original, copy in self.repos.items():
            if src == Path(original) or Path(original) in src.parents:
                return str(Path(copy) / src.relative_to(original))
        return None

    def directory(self, value: str, cwd: str | None, *, repos_only: bool = False) -> str | None:
        src = self._abs(value, cwd).resolve()
        if not src.is_dir() or src == Path("/"):
            return None
        if str(src) in self.mapping:
            return self.mapping[str(src)]
        nested = self.inside(src)
        if nested is not None:
            return nested
        is_repo = (src / ".git").exists()
        if repos_only and not is_repo:
            return None
        dst = self._target(src)
        _copy_dir(src, dst, self.max_bytes)
        if is_repo:
            self.repos[str(src)] = str(dst)
        return str(dst)

    def file(self, value: str, cwd: str | None) -> str | None:
        if "/" not in value and "." not in value:
            return None
        src = self._abs(value, cwd).resolve()
        if src.is_dir():
            return self.directory(value, cwd)
        if not src.parent.is_dir():
            return None
        if str(src) in self.mapping:
            return self.mapping[str(src)]
        nested = self.inside(src)
        if nested is not None:
            # Untracked state (an ignored data folder) is not in the clone: bring it along.
            Path(nested).parent.mkdir(parents=True, exist_ok=True)
            if src.is_file() and not Path(nested).exists():
                shutil.copy2(src, nested)
            return nested
        dst = self._target(src)
        dst.mkdir(parents=True)
        dst = dst / src.name
        if src.exists():
            shutil.copy2(src, dst)
        self.mapping[str(src)] = str(dst)
        return str(dst)


def sandbox_config(config: Config, *, max_copy_bytes: int = 50 * 1024 * 1024, base: str | None = None) -> Sandbox:
    """A copy of `config` whose stdio servers work on scratch copies of their local state.

    Args:
        config: the loaded config (not changed).
        max_copy_bytes: largest folder (not a git work tree) that is copied.
        base: relative paths resolve against this folder (default: the current directory, where
            the gateway starts its servers).

    Raises:
        SandboxError: a folder is too large, or a git clone failed.
    """
    root = Path(tempfile.mkdtemp(prefix="mcpopt-sandbox-"))
    copier = _Copier(root, Path(base or os.getcwd()), max_copy_bytes)
    new = config.model_copy(deep=True)
    untouched: list[str] = []
    try:
        # Repositories first, so that a folder inside one (a filesystem server's root in the
        # demo) maps into the same clone: what one server writes, the other sees.
        for server in new.mcpServers.values():
            if server.kind == "stdio" and not server.disabled:
                for arg in server.args[1:]:
                    if not arg.startswith("-") and not _is_program(arg):
                        copier.directory(arg, server.cwd, repos_only=True)
        for name, server in new.mcpServers.items():
            if server.disabled:
                continue
            if server.kind != "stdio":
                untouched.append(name)
                continue
            args: list[str] = []
            prev = ""
            for i, arg in enumerate(server.args):
                out: str | None = None
                if i > 0 and not arg.startswith("-"):
                    if _FILE_FLAG.match(prev):
                        out = copier.file(arg, server.cwd)
                    elif not _is_program(arg):
                        out = copier.directory(arg, server.cwd)
                elif arg.startswith("--") and "=" in arg:
                    flag, _, value = arg.partition("=")
                    if _FILE_FLAG.match(flag):
                        copied = copier.file(value, server.cwd)
                        out = f"{flag}={copied}" if copied else None
                args.append(out or arg)
                prev = arg
            server.args = args
            env = dict(server.env)
            for key, value in server.env.items():
                if _FILE_ENV.search(key) and key not in ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "NODE_PATH"):
                    env[key] = copier.file(value, server.cwd) or value
            server.env = env
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    new.source = config.source
    return Sandbox(new, root, copier.mapping, untouched)


def _is_program(arg: str) -> bool:
    """A script the server runs (its own code), never its state."""
    return arg.endswith((".js", ".mjs", ".cjs", ".py", ".ts"))


def server_vars(config: Config) -> dict[str, Any]:
    """`{server: {"args": [...], "arg": {flag: value}}}` for `{{servers.<name>...}}` templates.

    Relative paths among the values are made absolute (against the current directory), since
    servers such as mcp-server-git compare them with absolute paths.
    """
    out: dict[str, Any] = {}
    for name, server in config.mcpServers.items():
        args = [_absolute(a) for a in server.args]
        flags: dict[str, str] = {}
        for i, arg in enumerate(args):
            if arg.startswith("--") and "=" in arg:
                k, _, v = arg.partition("=")
                flags[k.lstrip("-")] = _absolute(v)
            elif arg.startswith("-") and i + 1 < len(args) and not args[i + 1].startswith("-"):
                flags[arg.lstrip("-")] = args[i + 1]
        out[name] = {"args": args, "arg": flags, "env": dict(server.env)}
    return out


def _absolute(value: str) -> str:
    if value.startswith("-") or "/" not in value and value != ".":
        return value
    path = Path(value)
    return str(path.resolve()) if not path.is_absolute() and path.exists() else value
