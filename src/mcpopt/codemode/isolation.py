"""The second sandbox layer: sandbox processes run inside OS isolation (bubblewrap + seccomp + rlimits + cgroups).

Layer 1 is each backend's own confinement (monty: an interpreter with no host access; wasm:
Pyodide in Deno with deny-all permissions and an import guard). Layer 2 wraps the *process*
that runs it -- the monty worker, the Deno process -- so an escape from layer 1 still meets:

- **namespaces** (bubblewrap, Debian `bubblewrap`): its own user, network (loopback only,
  nothing listening), PID, mount, IPC and UTS namespaces; `--die-with-parent`, `--new-session`;
- **a read-only root**: a fresh root holding only `/usr` (and its `/bin`, `/lib*` links), the
  dynamic loader's cache, `/proc`, a minimal `/dev` and the few files the runtime needs (its
  binary, Pyodide's folder); the one writable place is `/scratch`, a tmpfs of
  `scratch_bytes`. Host files (`/home`, `/root`, `/work`, `/etc`, the gateway's config) are
  not there at all;
- **seccomp** (a classic BPF filter built here, loaded by bwrap): no new processes (`fork`,
  `vfork`, `clone` without `CLONE_THREAD`; `clone3` answers ENOSYS so threads fall back to
  `clone`), and none of ptrace, mount, namespaces, kernel modules, bpf, perf, io_uring, keyrings;
- **rlimits**: CPU seconds (`cpu_s`, per process lifetime), open files, file size, core size 0;
  address space for monty workers (`memory_mb` + 1 GiB). Deno cannot run under a tight
  RLIMIT_AS: V8 reserves ~50 GiB of address space for its heap cages and wasm guard regions
  and aborts below ~64 GiB (measured: Deno 2.x dies at start under any limit up to 32 GiB),
  so for wasm the address-space limit is 96 GiB (a bound on runaway native mappings only)
  and memory is bounded by the cgroup;
- **a private uid and processes**: when the gateway runs as root, each sandbox process runs
  as its own unprivileged uid (1,000,000,000 + its pid), so RLIMIT_NPROC (`processes`) counts
  its own tasks only; not as root, NPROC is left alone (it would count all the user's processes);
- **cgroups** where the gateway may create them (root with cgroup v1 `memory` / `pids`, or a
  writable cgroup v2 subtree): memory (`memory_mb` + the runtime's own) and task count.

Which layers are active is probed once per process (`probe()`, a real `bwrap ... true`) and
reported by `report()` (the `execute_code` result's `_meta` and `mcpopt capabilities`).
`mode: auto` uses bubblewrap when it works and reports why not otherwise; `mode: bwrap` makes
a missing layer 2 an error (`SandboxUnavailable`); `mode: off` runs layer 1 alone.

Processes are started through a small launcher (`LAUNCHER`, run with `python -I -S`): it sets
the rlimits, joins the cgroups, opens the seccomp program for bwrap, drops to the private uid
and execs bwrap. The monty pool takes a binary path, so it gets a generated shell script that
runs the launcher (`wrapper_script`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mcpopt.config import IsolationSettings

logger = logging.getLogger(__name__)

_MB = 1024 * 1024
_GB = 1024 * _MB
UID_BASE = 1_000_000_000
"""Private uids are UID_BASE + the sandbox process's pid (pid_max is at most 2**22)."""
WASM_ADDRESS_SPACE = 96 * _GB
"""RLIMIT_AS for Deno (see the module docstring: V8 needs ~50-64 GiB of address space)."""


# ---- seccomp ---------------------------------------------------------------------------------
_ARCH = {
    # machine: (AUDIT_ARCH, syscall table); numbers from the kernel's syscall_64.tbl / unistd.h
    "x86_64": (
        0xC000003E,
        {
            "clone": 56,
            "clone3": 435,
            "fork": 57,
            "vfork": 58,
            "ptrace": 101,
            "mount": 165,
            "umount2": 166,
            "pivot_root": 155,
            "chroot": 161,
            "unshare": 272,
            "setns": 308,
            "kexec_load": 246,
            "kexec_file_load": 320,
            "init_module": 175,
            "finit_module": 313,
            "delete_module": 176,
            "bpf": 321,
            "perf_event_open": 298,
            "userfaultfd": 323,
            "keyctl": 250,
            "add_key": 248,
            "request_key": 249,
            "process_vm_readv": 310,
            "process_vm_writev": 311,
            "open_by_handle_at": 304,
            "io_uring_setup": 425,
            "io_uring_enter": 426,
            "io_uring_register": 427,
            "swapon": 167,
            "swapoff": 168,
            "reboot": 169,
            "acct": 163,
            "iopl": 172,
            "ioperm": 173,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            "clone": 220,
            "clone3": 435,
            "ptrace": 117,
            "mount": 40,
            "umount2": 39,
            "pivot_root": 41,
            "chroot": 51,
            "unshare": 97,
            "setns": 268,
            "kexec_load": 104,
            "kexec_file_load": 294,
            "init_module": 105,
            "finit_module": 273,
            "delete_module": 106,
            "bpf": 280,
            "perf_event_open": 241,
            "userfaultfd": 282,
            "keyctl": 219,
            "add_key": 217,
            "request_key": 218,
            "process_vm_readv": 270,
            "process_vm_writev": 271,
            "open_by_handle_at": 265,
            "io_uring_setup": 425,
            "io_uring_enter": 426,
            "io_uring_register": 427,
            "swapon": 224,
            "swapoff": 225,
            "reboot": 142,
            "acct": 89,
        },
    ),
}
_CLONE_THREAD = 0x00010000
_EPERM, _ENOSYS = 1, 38
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_X32_BIT = 0x40000000


def _ret_errno(errno: int) -> int:
    return 0x00050000 | errno


def seccomp_program(machine: str | None = None) -> bytes | None:
    """The seccomp filter (classic BPF, `struct sock_filter[]` bytes) for this machine, or None
    when its architecture is not known here.

    Denied with EPERM: new processes (`fork`, `vfork`, `clone` without CLONE_THREAD) and the
    syscalls in `_ARCH` (tracing, mounts, namespaces, modules, bpf, perf, io_uring, keyrings...);
    `clone3` answers ENOSYS (glibc then creates threads with `clone`, whose flags a filter can
    read); another architecture's calls (and x86 x32 calls) kill the process. Everything else
    is allowed: layer 1 and the namespaces do the rest. See seccomp(2) for the format.
    """
    machine = machine or platform.machine()
    if machine not in _ARCH:
        return None
    audit_arch, table = _ARCH[machine]
    denied = [nr for name, nr in table.items() if name not in ("clone", "clone3")]
    ld_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    prog: list[tuple[int, int, int, int]] = []

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> None:
        prog.append((code, jt, jf, k))

    op(ld_abs, 4)  # seccomp_data.arch
    op(jeq, audit_arch, 1, 0)
    op(ret, _RET_KILL_PROCESS)
    op(ld_abs, 0)  # seccomp_data.nr
    if machine == "x86_64":
        op(jge, _X32_BIT, 0, 1)
        op(ret, _RET_KILL_PROCESS)
    for nr in denied:
        op(jeq, nr, 0, 1)
        op(ret, _ret_errno(_EPERM))
    op(jeq, table["clone3"], 0, 1)
    op(ret, _ret_errno(_ENOSYS))
    op(jeq, table["clone"], 1, 0)
    op(ret, _RET_ALLOW)
    op(ld_abs, 16)  # low 32 bits of args[0] (clone flags; little-endian on both arches)
    op(jset, _CLONE_THREAD, 0, 1)
    op(ret, _RET_ALLOW)
    op(ret, _ret_errno(_EPERM))
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


# ---- the launcher ------------------------------------------------------------------------------
LAUNCHER = r"""
import json, os, resource, sys
def fail(msg):
    sys.stderr.write("mcpopt sandbox launcher: " + msg + "\n")
    os._exit(126)
spec = json.loads(sys.argv[1])
pid = os.getpid()
try:
    for name, value in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    for group in spec["cgroups"]:
        path = os.path.join(group["dir"], "p%d" % pid)
        os.makedirs(path, exist_ok=True)
        for fname, value in group["files"].items():
            with open(os.path.join(path, fname), "w") as f:
                f.write(str(value))
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(pid))
    fd = os.open(spec["seccomp"], os.O_RDONLY)
    os.set_inheritable(fd, True)
    if spec["private_uid"]:
        uid = spec["uid_base"] + pid
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        resource.setrlimit(resource.RLIMIT_NPROC, (spec["processes"], spec["processes"]))
except OSError as exc:
    fail("%s: %s" % (type(exc).__name__, exc))
argv = [a.replace("@SECCOMP_FD@", str(fd)) for a in spec["argv"]] + sys.argv[2:]
try:
    os.execv(argv[0], argv)
except OSError as exc:
    fail("cannot run %s: %s" % (argv[0], exc))
"""


@dataclass
class Probe:
    """What this machine offers for layer 2 (found once per process by `probe`)."""

    bwrap: str | None = None
    """The bubblewrap binary, if any."""
    bwrap_version: str | None = None
    works: bool = False
    """A real `bwrap` with every namespace, the read-only root and the seccomp filter ran `true`."""
    reason: str | None = None
    """Why layer 2 is not available (what would unblock it)."""
    root: bool = False
    user_namespaces: bool = False
    """Unprivileged user namespaces work (what bwrap uses when not root, and after the uid drop)."""
    seccomp: bool = False
    private_uid: bool = False
    """Sandbox processes run as their own unprivileged uid (the gateway is root and bwrap works after the drop)."""
    cgroup: str | None = None
    """"v1" or "v2" when memory and pids cgroups can be created here, else None."""
    cgroup_reason: str | None = None


def _run(argv: Sequence[str], timeout: float = 20.0) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(argv), capture_output=True, timeout=timeout, check=False)


def _cgroup_dirs() -> tuple[str | None, dict[str, str], str | None]:
    """(kind, {controller: base dir}, reason) for the cgroups the gateway may create."""
    v1 = {c: f"/sys/fs/cgroup/{c}" for c in ("memory", "pids")}
    if all(os.path.isdir(d) and os.access(d, os.W_OK) for d in v1.values()):
        return "v1", v1, None
    root = "/sys/fs/cgroup"
    controllers = Path(root, "cgroup.controllers")
    if controllers.is_file():
        here = Path("/proc/self/cgroup").read_text().strip().splitlines()[-1].split(":", 2)[-1]
        base = os.path.join(root, here.lstrip("/"))
        enabled = Path(base, "cgroup.subtree_control")
        have = set(controllers.read_text().split())
        if {"memory", "pids"} <= have and os.access(base, os.W_OK) and enabled.is_file():
            return "v2", {"memory": base, "pids": base}, None
        return None, {}, f"cgroup v2 at {base} is not writable or lacks memory/pids (delegate a subtree to this user)"
    return None, {}, "no writable memory and pids cgroups (cgroup v1 needs root; v2 needs a delegated subtree)"


@functools.lru_cache(maxsize=4)
def probe(bwrap: str | None = None) -> Probe:
    """Find out, once per process, which layer-2 parts work here (runs bwrap for real)."""
    found = Probe(root=os.geteuid() == 0)
    found.seccomp = seccomp_program() is not None
    found.cgroup, _dirs, found.cgroup_reason = _cgroup_dirs()
    path = bwrap or shutil.which("bwrap")
    if not path:
        found.reason = "bubblewrap is not installed (Debian: apt-get install bubblewrap)"
        return found
    found.bwrap = path
    with contextlib.suppress(Exception):
        found.bwrap_version = _run([path, "--version"]).stdout.decode().strip().split()[-1]
    try:
        res = _run([path, "--unshare-user", "--ro-bind", "/", "/", "true"])
        found.user_namespaces = res.returncode == 0
        # As root, first try the private-uid drop (bwrap then needs unprivileged user namespaces).
        for private in [True, False] if found.root else [False]:
            found.private_uid = private
            iso = Isolation(IsolationSettings(mode="bwrap", bwrap=path, cgroups=False), found, checked=False)
            try:
                argv, env, pass_fds = iso.command([_true_binary()], memory_bytes=64 * _MB)
                res = subprocess.run(argv, env=env, pass_fds=pass_fds, capture_output=True, timeout=20, check=False)
            finally:
                iso.close()
            if res.returncode == 0:
                break
        if res.returncode != 0:
            found.private_uid = False
    except (OSError, subprocess.SubprocessError) as exc:
        found.reason = f"cannot run {path}: {exc}"
        return found
    if res.returncode == 0:
        found.works = True
    else:
        err = res.stderr.decode(errors="replace").strip()[-300:]
        hint = (
            "; unprivileged user namespaces look disabled (sysctl kernel.unprivileged_userns_clone=1 or "
            "user.max_user_namespaces > 0), or a container's seccomp profile blocks them: run as root or allow them"
            if not found.user_namespaces
            else ""
        )
        found.reason = f"bwrap failed here (exit {res.returncode}): {err or 'no message'}{hint}"
    return found


def _true_binary() -> str:
    return shutil.which("true") or "/usr/bin/true"


@dataclass
class Layer2Report:
    """Layer 2 as `report()` gives it (JSON-able with `asdict`)."""

    active: bool
    kind: str | None = None
    namespaces: list[str] = field(default_factory=list)
    read_only_root: bool = False
    scratch_mb: int = 0
    seccomp: str | None = None
    rlimits: dict[str, int] = field(default_factory=dict)
    private_uid: bool = False
    cgroup: dict[str, Any] | None = None
    reason: str | None = None


class Isolation:
    """Layer 2 for one backend: builds the command lines that start its sandbox processes.

    Args:
        settings: `gateway.code_mode.isolation`.
        found: the machine's `Probe` (default: `probe(settings.bwrap)`).
        checked: raise `SandboxUnavailable` in `mode: bwrap` when layer 2 does not work.

    Attributes:
        active: processes started through `command` / `wrapper_script` run inside layer 2.
    """

    def __init__(self, settings: IsolationSettings, found: Probe | None = None, *, checked: bool = True) -> None:
        self.settings = settings
        self.found = found if found is not None else (probe(settings.bwrap) if settings.mode != "off" else Probe())
        self.active = settings.mode != "off" and (self.found.works or not checked)
        if checked and settings.mode == "bwrap" and not self.found.works:
            from mcpopt.codemode.sandbox import SandboxUnavailable

            why = self.found.reason or "bubblewrap does not work here"
            raise SandboxUnavailable(f"gateway.code_mode.isolation.mode is 'bwrap' but {why}")
        if settings.mode == "auto" and not self.active and checked:
            logger.warning("code mode runs without its second sandbox layer: %s", self.found.reason)
        self._dir: str | None = None
        self._cgroup_kind, self._cgroup_dirs, _ = _cgroup_dirs() if settings.cgroups else (None, {}, None)
        if self.active:
            self.sweep_cgroups()

    # ---- files the launcher needs -------------------------------------------------------------
    def _private_dir(self) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="mcpopt-sandbox-")
            # Removed by `close`, or at exit / garbage collection when a gateway stops without it.
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._dir, True)
            program = seccomp_program()
            if program is None:
                raise OSError(f"no seccomp filter for {platform.machine()}")
            Path(self._dir, "seccomp.bpf").write_bytes(program)
            Path(self._dir, "launcher.py").write_text(LAUNCHER, encoding="utf-8")
        return self._dir

    def close(self) -> None:
        """Remove the launcher's files and the cgroups left by exited sandbox processes."""
        self.sweep_cgroups(final=True)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def sweep_cgroups(self, *, final: bool = False) -> None:
        """rmdir the per-process cgroups whose processes are gone (the kernel refuses busy ones),
        and the groups of gateways that exited without doing so; `final`: this gateway's own too."""
        for base in set(self._cgroup_dirs.values()):
            with contextlib.suppress(OSError):
                for group in os.listdir(base):
                    owner = group.removeprefix("mcpopt-")
                    if not group.startswith("mcpopt-") or not owner.isdigit():
                        continue
                    mine = int(owner) == os.getpid()
                    if not mine and os.path.exists(f"/proc/{owner}"):
                        continue
                    path = os.path.join(base, group)
                    with contextlib.suppress(OSError):
                        for entry in os.listdir(path):
                            if entry.startswith("p") and entry[1:].isdigit():
                                with contextlib.suppress(OSError):
                                    os.rmdir(os.path.join(path, entry))
                    if final or not mine:
                        with contextlib.suppress(OSError):
                            os.rmdir(path)

    def oom_killed(self) -> int:
        """How many sandbox processes of this gateway the memory cgroup killed so far."""
        total = 0
        base = self._cgroup_dirs.get("memory")
        if not base:
            return 0
        mine = os.path.join(base, f"mcpopt-{os.getpid()}")
        name = "memory.oom_control" if self._cgroup_kind == "v1" else "memory.events"
        with contextlib.suppress(OSError):
            for entry in os.listdir(mine):
                with contextlib.suppress(OSError, ValueError):
                    for line in Path(mine, entry, name).read_text().splitlines():
                        if line.startswith("oom_kill "):
                            total += int(line.split()[1])
        return total

    # ---- command lines ------------------------------------------------------------------------
    def bwrap_args(self, ro_paths: Iterable[str], *, chdir: str = "/scratch") -> list[str]:
        """bubblewrap's arguments (up to and including `--`): namespaces, the read-only root with
        `ro_paths` bound at their own paths, `/scratch`, seccomp (fd placeholder)."""
        s = self.settings
        args = [
            self.found.bwrap or "bwrap",
            "--unshare-user",
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "sandbox",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--ro-bind",
            "/usr",
            "/usr",
        ]
        for link in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            top = f"/{link}"
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += ["--size", str(s.scratch_mb * _MB), "--tmpfs", "/scratch"]
        seen: set[str] = set()
        for path in ro_paths:
            real = os.path.realpath(path)
            if real in seen or real.startswith("/usr/"):
                continue
            seen.add(real)
            args += ["--ro-bind", real, real]
        args += ["--remount-ro", "/", "--chdir", chdir, "--seccomp", "@SECCOMP_FD@", "--"]
        return args

    def spec(self, ro_paths: Iterable[str], *, memory_bytes: int, address_space: int | None) -> dict[str, Any]:
        """The launcher's spec: rlimits, cgroups, seccomp file, uid drop and the bwrap argv prefix."""
        s = self.settings
        rlimits: dict[str, int] = {
            "RLIMIT_CPU": s.cpu_s,
            "RLIMIT_NOFILE": s.open_files,
            "RLIMIT_FSIZE": s.scratch_mb * _MB,
            "RLIMIT_CORE": 0,
        }
        if address_space:
            rlimits["RLIMIT_AS"] = address_space
        cgroups = []
        if self._cgroup_kind == "v1":
            mem = os.path.join(self._cgroup_dirs["memory"], f"mcpopt-{os.getpid()}")
            pids = os.path.join(self._cgroup_dirs["pids"], f"mcpopt-{os.getpid()}")
            for d in (mem, pids):
                os.makedirs(d, exist_ok=True)
            cgroups = [
                {"dir": mem, "files": {"memory.limit_in_bytes": memory_bytes}},
                {"dir": pids, "files": {"pids.max": s.processes}},
            ]
        elif self._cgroup_kind == "v2":
            base = os.path.join(self._cgroup_dirs["memory"], f"mcpopt-{os.getpid()}")
            if not os.path.isdir(base):
                os.makedirs(base, exist_ok=True)
                with contextlib.suppress(OSError), open(os.path.join(base, "cgroup.subtree_control"), "w") as f:
                    f.write("+memory +pids")
            cgroups = [
                {"dir": base, "files": {"memory.max": memory_bytes, "memory.swap.max": 0, "pids.max": s.processes}}
            ]
        private_uid = self.found.private_uid and all(_world_readable(p) for p in ro_paths)
        return {
            "rlimits": rlimits,
            "cgroups": cgroups,
            "seccomp": os.path.join(self._private_dir(), "seccomp.bpf"),
            "private_uid": private_uid,
            "uid_base": UID_BASE,
            "processes": s.processes,
            "argv": self.bwrap_args(ro_paths),
        }

    def command(
        self,
        argv: Sequence[str],
        *,
        ro_paths: Iterable[str] = (),
        memory_bytes: int,
        address_space: int | None = None,
        env: dict[str, str] | None = None,
    ) -> tuple[list[str], dict[str, str], tuple[int, ...]]:
        """`argv` wrapped in layer 2: (command line, environment, fds to pass) for `subprocess`.

        Args:
            argv: the sandbox process's own command (its binary is bound read-only).
            ro_paths: more files or folders it must read (bound read-only at their own paths).
            memory_bytes: its memory bound (cgroup), bytes.
            address_space: its RLIMIT_AS (bytes), or None for none.
            env: its environment (default: HOME and TMPDIR at /scratch, PATH=/usr/bin).
        """
        binary = shutil.which(argv[0]) or argv[0]
        spec = self.spec([binary, *ro_paths], memory_bytes=memory_bytes, address_space=address_space)
        launcher = os.path.join(self._private_dir(), "launcher.py")
        full = [sys.executable, "-I", "-S", launcher, json.dumps(spec), binary, *argv[1:]]
        base_env = {"HOME": "/scratch", "TMPDIR": "/scratch", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        return full, {**base_env, **(env or {})}, ()

    def wrapper_script(
        self, binary: str, *, memory_bytes: int, address_space: int | None, ro_paths: Iterable[str] = ()
    ) -> str:
        """An executable that runs `binary "$@"` inside layer 2 (for pools that take a binary path)."""
        spec = self.spec([binary, *ro_paths], memory_bytes=memory_bytes, address_space=address_space)
        spec["argv"] = [*spec["argv"], binary]
        directory = self._private_dir()
        launcher = os.path.join(directory, "launcher.py")
        spec_path = os.path.join(directory, f"spec-{os.path.basename(binary)}.json")
        Path(spec_path).write_text(json.dumps(spec), encoding="utf-8")
        script = os.path.join(directory, f"run-{os.path.basename(binary)}")
        py = sys.executable
        Path(script).write_text(
            "#!/bin/sh\n"
            "# mcpopt code mode: run the sandbox binary inside layer 2 (bubblewrap, seccomp, rlimits)\n"
            f'exec {_sh(py)} -I -S {_sh(launcher)} "$(cat {_sh(spec_path)})" "$@"\n',
            encoding="utf-8",
        )
        os.chmod(script, 0o700)
        return script

    # ---- what is active -----------------------------------------------------------------------
    def report(self, *, memory_bytes: int = 0, address_space: int | None = None) -> Layer2Report:
        """Layer 2 as it applies to processes started now."""
        s = self.settings
        if not self.active:
            reason = "isolation.mode is off" if s.mode == "off" else self.found.reason
            return Layer2Report(active=False, reason=reason)
        rlimits = {"cpu_s": s.cpu_s, "open_files": s.open_files, "file_bytes": s.scratch_mb * _MB, "core_bytes": 0}
        if address_space:
            rlimits["address_space_bytes"] = address_space
        if self.found.private_uid:
            rlimits["processes"] = s.processes
        cgroup = None
        if self._cgroup_kind:
            cgroup = {"version": self._cgroup_kind, "memory_bytes": memory_bytes, "pids": s.processes}
        return Layer2Report(
            active=True,
            kind=f"bubblewrap {self.found.bwrap_version or ''}".strip(),
            namespaces=["user", "network", "pid", "mount", "ipc", "uts", "cgroup"],
            read_only_root=True,
            scratch_mb=s.scratch_mb,
            seccomp="no new processes; no ptrace, mount, namespaces, modules, bpf, perf, io_uring, keyrings",
            rlimits=rlimits,
            private_uid=self.found.private_uid,
            cgroup=cgroup,
        )


def _world_readable(path: str) -> bool:
    """Others may read `path` and pass through every folder above it (a private uid can bind it)."""
    try:
        real = Path(os.path.realpath(path))
        mode = real.stat().st_mode
        if not mode & (0o005 if real.is_dir() else 0o004):
            return False
        return all(parent.stat().st_mode & 0o001 for parent in real.parents)
    except OSError:
        return False


def _sh(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def machine_report(settings: IsolationSettings | None = None) -> dict[str, Any]:
    """What this machine offers for layer 2 (for `mcpopt capabilities`)."""
    found = probe((settings or IsolationSettings()).bwrap)
    return asdict(found)
