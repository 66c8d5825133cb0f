"""Code sessions: what `execute_code` keeps between calls of one client (variables, helpers, scratch files).

**Whose session.** A session belongs to a *scope* and a backend:
- a handshake-era client's MCP session (`ClientLink.session_id`: the Streamable HTTP session id,
  or the stdio connection);
- else the caller's principal (`ClientLink.principal`; 2026-07-28 clients open no session, so
  all their calls share the principal's code session);
- or a name the caller gives (`execute_code`'s `session` argument), within its principal.
The scope and the principal are hashed into the session key (BLAKE2b), so a session id cannot
reach another principal's state, and sessions of different clients never meet.

**How state is kept.**
- `monty`: after each call the worker's session is serialized (`AsyncMontySession.dump()`,
  pydantic-monty's own snapshot format) together with the scratch folder's files and the
  sources of the cells run so far; the next call restores it into whichever worker it gets
  (`load_session`). The blob goes through the shared `StateStore` (memory now, Redis when the
  gateway is scaled out), signed with HMAC-SHA256 under a key every replica shares, so a
  session survives a replica change and a tampered blob is refused.
- `wasm`: a live Pyodide interpreter (its own Deno process) per session, kept by the backend;
  only a small marker goes to the store, so another replica can say where the session went.
  A live interpreter cannot move: on another replica or after a restart it is reported lost.

*Why snapshots and not a journal of cells.* Re-running the session's earlier cells would
repeat their tool calls -- writes included (a `create_entities` twice, a second payment), and
reads whose answers may have changed -- and the code could take different branches the second
time. A snapshot restores the state without running anything again, so no tool call is ever
repeated. Cells are kept only as text (for `save_skill` to find a function's source).

**Bounds.** `ttl_s` of idleness, `max_sessions` sessions, `max_bytes` of stored state in all,
`max_session_bytes` per session, `max_interpreters` live wasm interpreters; past a bound the
least recently used session is evicted (never one that is running). A session that is gone
(evicted, expired, too large, its interpreter stopped, the gateway restarted, another replica)
leaves a tombstone with the reason, and the next call of that client says so in its result
instead of failing later with a bare NameError.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from mcpopt.api import session_id_of
from mcpopt.codemode.sandbox import CodeSession
from mcpopt.state import StateStore, StateUnavailable

if TYPE_CHECKING:
    from mcpopt.api import ClientLink
    from mcpopt.codemode.sandbox import Execution, SandboxBackend, SessionSettings

logger = logging.getLogger(__name__)

REPLICA = secrets.token_hex(4)
"""This gateway process's id in stored session records."""
_MAGIC = b"MCPCS1"


def principal_of(link: ClientLink) -> str:
    """The caller's principal as a string: `link.principal` (its `id`, `subject`, `sub` or
    `name`, else `str()`; one with `is_local` true counts as none), else the auth partition
    (`partition:<hash>` of the Authorization header) when there is one, else `local` (the stdio
    front's one user)."""
    p = link.principal
    if p is None or getattr(p, "is_local", False) is True:
        return f"partition:{link.partition}" if link.partition else "local"
    if isinstance(p, str):
        return p
    if isinstance(p, Mapping):
        for attr in ("id", "subject", "sub", "name"):
            if isinstance(p.get(attr), str) and p[attr]:
                return str(p[attr])
    for attr in ("id", "subject", "sub", "name"):
        value = getattr(p, attr, None)
        if isinstance(value, str) and value:
            return value
    return str(p)


def scope_of(link: ClientLink, name: str | None = None) -> tuple[str, str]:
    """`(scope, keyed_by)`: what a session is keyed by for this call (see the module docstring).

    `keyed_by` is `name`, `client session` or `principal`.
    """
    if name:
        return f"name:{name}", "name"
    # The HTTP front's lean tools/call path leaves `session_id` empty: the connection has it.
    sid = link.session_id or session_id_of(link.connection)
    if sid and link.version not in MODERN_PROTOCOL_VERSIONS:
        return f"session:{sid}", "client session"
    return "principal", "principal"


def session_key(principal: str, scope: str, backend: str) -> str:
    """24 hex characters: BLAKE2b of (principal, scope, backend)."""
    data = "\0".join((principal, scope, backend)).encode()
    return hashlib.blake2b(data, digest_size=12, person=b"mcpopt-cs").hexdigest()


def encode_state(session: CodeSession, secret: bytes) -> bytes:
    """The signed blob of a session: magic, HMAC-SHA256, header length, JSON header, payload."""
    parts: list[bytes] = []
    dump = session.snapshot or b""
    parts.append(dump)
    files = sorted(session.files.items())
    parts.extend(data for _, data in files)
    cells = [c.encode() for c in session.cells]
    parts.extend(cells)
    header = orjson.dumps(
        {
            "v": 1,
            "key": session.key,
            "backend": session.backend,
            "principal": session.principal,
            "keyed_by": session.keyed_by,
            "created": session.created,
            "calls": session.calls,
            "replica": REPLICA,
            "dump": len(dump),
            "files": [[name, len(data)] for name, data in files],
            "cells": [len(c) for c in cells],
        }
    )
    body = len(header).to_bytes(4, "big") + header + b"".join(parts)
    return _MAGIC + hmac.new(secret, body, hashlib.sha256).digest() + body


class BadState(ValueError):
    """A stored blob that is not ours, was changed, or belongs to another session."""


def decode_state(blob: bytes, secret: bytes, key: str) -> dict[str, Any]:
    """The header of a signed blob with `dump` (bytes), `files` ({path: bytes}) and `cells` (list[str]).

    Raises:
        BadState: wrong magic, a signature that does not match, or another session's blob.
    """
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + 36:
        raise BadState("not a code-session blob")
    mac, body = blob[len(_MAGIC) : len(_MAGIC) + 32], blob[len(_MAGIC) + 32 :]
    if not hmac.compare_digest(mac, hmac.new(secret, body, hashlib.sha256).digest()):
        raise BadState("its signature does not match (another key, or it was changed)")
    n = int.from_bytes(body[:4], "big")
    header = orjson.loads(body[4 : 4 + n])
    if header.get("key") != key:
        raise BadState("it belongs to another session")
    pos = 4 + n
    header["dump"], pos = body[pos : pos + header["dump"]], pos + header["dump"]
    files: dict[str, bytes] = {}
    for name, size in header["files"]:
        files[name], pos = body[pos : pos + size], pos + size
    cells = []
    for size in header["cells"]:
        cells.append(body[pos : pos + size].decode("utf-8", "replace"))
        pos += size
    header["files"], header["cells"] = files, cells
    return header


class CodeSessions:
    """The code sessions of one gateway.

    Args:
        settings: `gateway.code_mode.sessions`.
        store: where serialized state goes (`MemoryStateStore`, or a shared one).
        secret: the HMAC key for stored state (the same on every replica sharing `store`).
        backend_of: backend name -> the `SandboxBackend` (to free a live interpreter on eviction).
        clock: monotonic seconds (tests may pass their own).

    Use `async with sessions.use(link, name, backend) as session:` around one execution, then
    `await sessions.commit(session, execution, backend)` inside it.
    """

    def __init__(
        self,
        settings: SessionSettings,
        store: StateStore,
        secret: bytes,
        backend_of: Callable[[str], SandboxBackend],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.store = store
        self._secret = secret
        self._backend_of = backend_of
        self._clock = clock
        self._local: OrderedDict[str, CodeSession] = OrderedDict()
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._held: dict[str, asyncio.Lock] = {}
        self.bytes = 0
        """Bytes of stored state of the sessions kept here."""
        self.evictions: dict[str, int] = {}
        """Evictions so far by cause (`max_sessions`, `max_bytes`, `max_interpreters`, `ttl`, ...)."""
        self._warned = False

    def __len__(self) -> int:
        return len(self._local)

    def stats(self) -> dict[str, Any]:
        """Sessions kept, their bytes, live interpreters and evictions by cause."""
        return {
            "sessions": len(self._local),
            "bytes": self.bytes,
            "interpreters": sum(1 for s in self._local.values() if self._backend_of(s.backend).live_state),
            "evictions": dict(self.evictions),
        }

    # ---- keys ---------------------------------------------------------------------------------
    @staticmethod
    def _skey(key: str) -> str:
        return f"codemode:session:{key}"

    @staticmethod
    def _tkey(key: str) -> str:
        return f"codemode:gone:{key}"

    # ---- one call -----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def use(self, link: ClientLink, name: str | None, backend: SandboxBackend) -> AsyncIterator[CodeSession]:
        """The session of this call, locked for its duration (calls of one session run one at a time)."""
        principal = principal_of(link)
        scope, keyed_by = scope_of(link, name)
        key = session_key(principal, scope, backend.name)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:
            await self._expire()  # this session too: an expired one must not be used
            self._held[key] = lock
            try:
                yield await self._open(key, principal, keyed_by, backend)
            finally:
                self._held.pop(key, None)

    async def _open(self, key: str, principal: str, keyed_by: str, backend: SandboxBackend) -> CodeSession:
        local = self._local.get(key)
        if local is not None:
            local.new, local.lost = False, None
            local.last_used = self._clock()
            self._local.move_to_end(key)
            if backend.live_state:
                if not backend.holds(key):
                    await self._forget(key, "its interpreter exited", cause="exited")
                    return self._fresh(key, principal, keyed_by, backend, lost="its interpreter exited")
                return local
            blob = await self._get(self._skey(key))
            if blob is None:
                await self._forget(key, "", cause="store")
                return self._fresh(
                    key,
                    principal,
                    keyed_by,
                    backend,
                    lost="its state is no longer in the shared store (the store's own memory bound, or it restarted)",
                )
            return self._restore(local, blob) or self._fresh(
                key, principal, keyed_by, backend, lost="its stored state failed its integrity check"
            )
        # Not known in this process: another replica's, from before a restart, or none.
        blob = await self._get(self._skey(key))
        if blob is not None:
            session = CodeSession(key, principal, backend.name, keyed_by, last_used=self._clock())
            restored = self._restore(session, blob)
            if restored is None:
                return self._fresh(
                    key, principal, keyed_by, backend, lost="its stored state failed its integrity check"
                )
            if backend.live_state:
                return self._fresh(
                    key,
                    principal,
                    keyed_by,
                    backend,
                    lost="wasm sessions live in one interpreter process, which is on another replica "
                    "or went away with a gateway restart",
                )
            restored.new = False
            self._local[key] = restored
            self._account()
            return restored
        tomb = await self._get(self._tkey(key))
        lost = tomb.decode("utf-8", "replace") if tomb else None
        return self._fresh(key, principal, keyed_by, backend, lost=lost)

    def _fresh(
        self, key: str, principal: str, keyed_by: str, backend: SandboxBackend, *, lost: str | None
    ) -> CodeSession:
        session = CodeSession(key, principal, backend.name, keyed_by, last_used=self._clock(), lost=lost)
        self._local[key] = session
        return session

    def _restore(self, session: CodeSession, blob: bytes) -> CodeSession | None:
        try:
            state = decode_state(blob, self._secret, session.key)
        except (BadState, ValueError, KeyError, orjson.JSONDecodeError) as exc:
            logger.warning("code session %s: stored state refused: %s", session.key[:12], exc)
            return None
        session.snapshot = state["dump"] or None
        session.files = state["files"]
        session.cells = state["cells"]
        session.calls = int(state.get("calls") or 0)
        session.created = float(state.get("created") or session.created)
        session.size = len(blob)
        return session

    async def commit(self, session: CodeSession, execution: Execution, backend: SandboxBackend) -> str | None:
        """Keep what `execution` left in the session (within the bounds); evict LRU sessions past them.

        Returns: a note for the model when the session's state was not kept, else None.
        """
        session.calls += 1
        key = session.key
        if not execution.keep:
            if backend.live_state:
                reason = f"its interpreter was stopped by a limit ({execution.error_type or 'error'})"
                await self._forget(key, reason, cause="stopped")
                return f"the code session was lost with its interpreter ({reason}); the next call starts afresh"
            if session.snapshot is None and not session.cells:
                await self._forget(key, "", cause="stopped")
            else:
                self._touch(session)
            return (
                "this call's changes to the code session were discarded (a limit stopped it mid-way); "
                "the session is as after the previous call"
            )
        if backend.live_state:
            session.snapshot, session.files = None, {}
            blob = encode_state(session, self._secret)
        else:
            session.snapshot = execution.snapshot
            session.files = execution.files or {}
            blob = encode_state(session, self._secret)
        limit = min(self.settings.max_session_bytes, self.settings.max_bytes)
        if len(blob) > limit:
            reason = (
                f"its state grew to {len(blob):,} bytes, over the {limit:,}-byte limit "
                "(gateway.code_mode.sessions.max_session_bytes)"
            )
            await self._forget(key, reason, cause="too_large")
            return f"the code session was not kept: {reason}; keep less in variables or scratch files"
        try:
            await self.store.set(self._skey(key), blob, self.settings.ttl_s)
        except StateUnavailable as exc:
            self._warn(exc)
            await self._forget(key, "", cause="store")
            return "the code session could not be stored (the shared store is unavailable); the next call starts afresh"
        session.size = len(blob)
        self._touch(session)
        await self._bound(keep=key)
        return None

    def _touch(self, session: CodeSession) -> None:
        session.last_used = self._clock()
        self._local[session.key] = session
        self._local.move_to_end(session.key)
        self._account()

    def _account(self) -> None:
        self.bytes = sum(s.size for s in self._local.values() if not self._backend_of(s.backend).live_state)

    # ---- bounds -------------------------------------------------------------------------------
    async def _bound(self, keep: str) -> None:
        s = self.settings

        def live() -> int:
            return sum(1 for v in self._local.values() if self._backend_of(v.backend).live_state)

        for cause, over, only_live in (
            ("max_sessions", lambda: len(self._local) > s.max_sessions, False),
            ("max_bytes", lambda: self.bytes > s.max_bytes, False),
            ("max_interpreters", lambda: live() > s.max_interpreters, True),
        ):
            while over():
                victim = next(
                    (
                        k
                        for k, v in self._local.items()
                        if k != keep
                        and k not in self._held
                        and (not only_live or self._backend_of(v.backend).live_state)
                    ),
                    None,
                )
                if victim is None:
                    break
                limit = {
                    "max_sessions": s.max_sessions,
                    "max_bytes": s.max_bytes,
                    "max_interpreters": s.max_interpreters,
                }
                await self.evict(
                    victim,
                    f"evicted as the least recently used session (gateway.code_mode.sessions.{cause}: "
                    f"{limit[cause]:,})",
                    cause=cause,
                )

    async def _expire(self) -> None:
        now = self._clock()
        ttl = self.settings.ttl_s
        for key in [k for k, v in self._local.items() if now - v.last_used > ttl and k not in self._held]:
            await self.evict(key, f"expired after {ttl:g} s unused (gateway.code_mode.sessions.ttl_s)", cause="ttl")

    async def evict(self, key: str, reason: str, *, cause: str = "evicted") -> None:
        """Drop a session (its stored state, its interpreter) and leave a tombstone with `reason`."""
        await self._forget(key, reason, cause=cause)

    async def _forget(self, key: str, reason: str, *, cause: str) -> None:
        session = self._local.pop(key, None)
        if cause not in ("store", "exited"):
            self.evictions[cause] = self.evictions.get(cause, 0) + 1
        self._account()
        with contextlib.suppress(StateUnavailable):
            await self.store.delete(self._skey(key))
            if reason:
                await self.store.set(self._tkey(key), reason.encode(), self.settings.ttl_s)
        if session is not None:
            with contextlib.suppress(Exception):
                await self._backend_of(session.backend).drop_session(key)

    async def _get(self, key: str) -> bytes | None:
        try:
            return await self.store.get(key)
        except StateUnavailable as exc:
            self._warn(exc)
            return None

    def _warn(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("code sessions: the shared state store is unavailable (%s); sessions stay local", exc)

    async def aclose(self) -> None:
        """Drop every session's live resources (the stored state stays for its TTL)."""
        for key, session in list(self._local.items()):
            with contextlib.suppress(Exception):
                await self._backend_of(session.backend).drop_session(key)
        self._local.clear()
        self.bytes = 0
