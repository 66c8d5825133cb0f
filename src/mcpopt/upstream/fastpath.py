"""A lean JSON-RPC request channel beside the SDK session on a stdio upstream.

The SDK's `ClientSession` owns the connection (handshake, lists, notifications, the server's
own requests). Forwarded calls, which only need "send these params, give me the result dict",
take this side channel on the same pipe: the request line is written with orjson under an id
the SDK never mints (`"~<n>"`), and the transport's reader hands the matching response (and
progress for its token) straight to the waiting call as a plain dict -- no pydantic model is
built for a message the gateway only passes on. Everything else on the pipe goes to the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from mcp.shared.exceptions import MCPError
from mcp_types import CLIENT_CAPABILITIES_META_KEY, LOG_LEVEL_META_KEY

from mcpopt.upstream.pipes import CorkedWriter
from mcpopt.wire import dumps_request

ProgressFn = Callable[[float, float | None, str | None], Awaitable[None]]
Fail = Callable[[Exception, str, float], Exception]
"""`(failure, method, timeout_s) -> the exception to raise instead` (see `FastChannel.request`)."""
ID_PREFIX = "~"
_HIGH_WATER = 1 << 16
PROGRESS_DRAIN_S = 5.0
"""How long a finished request waits for its progress relays still running (a guard against a stuck
client; they normally finish within the same few event-loop iterations)."""


class _Pending:
    """A request waiting for its answer, and the relays of its progress notifications."""

    __slots__ = ("future", "on_progress", "relays")

    def __init__(self, future: asyncio.Future[dict[str, Any]], on_progress: ProgressFn | None) -> None:
        self.future = future
        self.on_progress = on_progress
        self.relays: list[asyncio.Task[None]] = []


class ChannelClosed(Exception):
    """The pipe closed (the server exited) while a request was waiting."""


class FastChannel:
    """Correlates `~n`-id requests with their responses on one stdio pipe."""

    def __init__(self, writer: CorkedWriter) -> None:
        self._writer = writer
        self._next = 0
        self._pending: dict[str, _Pending] = {}
        self._closed = False
        self.on_log: Callable[[Any], Awaitable[None]] | None = None
        """Takes `notifications/message` params while calls are in flight (set by the `Upstream`).
        Through the SDK's session a log message would be handled after the response that follows it
        on the pipe, too late for the call it belongs to; here every call in flight awaits its relay
        before it returns, as it awaits its progress relays."""

    # ---- called by the transport's reader ------------------------------------------------
    def offer(self, msg: Any) -> bool:
        """Take `msg` if it is ours (a response to a `~` id, or progress for one); else False."""
        if not isinstance(msg, dict):
            return False
        rid = msg.get("id")
        if isinstance(rid, str) and rid.startswith(ID_PREFIX):
            if "method" in msg:
                return False  # a server request that happens to use such an id: not ours
            entry = self._pending.get(rid)
            if entry is not None and not entry.future.done():
                if "error" in msg and isinstance(msg["error"], dict):
                    err = msg["error"]
                    entry.future.set_exception(
                        MCPError(
                            code=int(err.get("code", -32603)), message=str(err.get("message", "")), data=err.get("data")
                        )
                    )
                else:
                    result = msg.get("result")
                    entry.future.set_result(result if isinstance(result, dict) else {})
            return True
        if msg.get("method") == "notifications/message" and self.on_log is not None and self._pending:
            log_relay = asyncio.get_running_loop().create_task(_safe(self.on_log(msg.get("params"))))
            for waiting in self._pending.values():
                waiting.relays = [t for t in waiting.relays if not t.done()]
                waiting.relays.append(log_relay)
            return True
        if msg.get("method") == "notifications/progress":
            params = msg.get("params")
            token = params.get("progressToken") if isinstance(params, dict) else None
            if isinstance(token, str) and token.startswith(ID_PREFIX):
                entry = self._pending.get(token)
                if entry is not None and entry.on_progress is not None:
                    assert isinstance(params, dict)
                    # The reader cannot await; the request awaits its relays before it returns,
                    # so every progress notification reaches the client before the result does.
                    relay = entry.on_progress(params.get("progress", 0), params.get("total"), params.get("message"))
                    entry.relays = [t for t in entry.relays if not t.done()]
                    entry.relays.append(asyncio.get_running_loop().create_task(_safe(relay)))
                return True
        return False

    def close(self) -> None:
        """Fail every waiting request: the connection is gone."""
        self._closed = True
        for entry in self._pending.values():
            if not entry.future.done():
                entry.future.set_exception(ChannelClosed())

    # ---- called by the gateway -----------------------------------------------------------
    async def request(
        self,
        method: str,
        params: Mapping[str, Any],
        timeout_s: float,
        on_progress: ProgressFn | None = None,
        fail: Fail | None = None,
    ) -> dict[str, Any]:
        """Send one request and wait for its result dict.

        `fail(exc, method, timeout_s)`, when given, turns each failure below (`MCPError`,
        `TimeoutError`, `ChannelClosed`) into the exception raised instead (the `Upstream`'s own
        errors naming the server), so the caller needs no coroutine of its own around this one.

        Raises:
            MCPError: the server answered with a JSON-RPC error.
            TimeoutError: no answer within `timeout_s` (a cancel notification is sent).
            ChannelClosed: the pipe closed first.
            InvalidParams: the params cannot be serialized (nothing was sent; not the server's fault).
        """
        if self._closed or self._writer.is_closing():
            if fail is not None:
                raise fail(ChannelClosed(), method, timeout_s)
            raise ChannelClosed()
        self._next += 1
        rid = f"{ID_PREFIX}{self._next}"
        if on_progress is not None:
            meta = dict(params.get("_meta") or {})
            meta["progressToken"] = rid
            params = {**params, "_meta": meta}
        # Serialized before anything is registered or sent: arguments that cannot be (nested past
        # orjson's limit) are the client's InvalidParams, not a failure of this server.
        line = dumps_request({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}, method, params) + b"\n"
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        pending = self._pending
        entry = pending[rid] = _Pending(fut, on_progress)
        # One timer handle per request instead of an `asyncio.timeout` context (its task
        # bookkeeping is most of its cost); expiry fails the future with TimeoutError.
        timer = loop.call_at(loop.time() + timeout_s, _expire, fut)
        try:
            if len(pending) == 1:
                self._writer.write_now(line)  # alone in flight: no batching to wait for
            else:
                self._writer.write(line)
            if self._writer.over(_HIGH_WATER):
                await self._writer.drain()
            result = await fut
            if entry.relays:  # most calls have none: no list built for them
                relays = [t for t in entry.relays if not t.done()]
                if relays:
                    await asyncio.wait(relays, timeout=PROGRESS_DRAIN_S)
            return result
        except (TimeoutError, asyncio.CancelledError) as exc:
            # Tell the server to stop (MCP cancellation, basic/utilities/cancellation).
            with contextlib.suppress(Exception):
                reason = "cancelled by the client" if fut.cancelled() or not fut.done() else "timed out"
                self._write(
                    {
                        "jsonrpc": "2.0",
                        "method": "notifications/cancelled",
                        "params": {"requestId": rid, "reason": reason},
                    }
                )
            if fail is not None and isinstance(exc, TimeoutError):
                raise fail(exc, method, timeout_s) from None
            raise
        except MCPError as exc:
            if fail is not None:
                raise fail(exc, method, timeout_s) from None
            raise
        except ChannelClosed as exc:
            if fail is not None:
                raise fail(exc, method, timeout_s) from None
            raise
        except (BrokenPipeError, ConnectionResetError, RuntimeError) as exc:
            if fail is not None:
                raise fail(ChannelClosed(), method, timeout_s) from None
            raise ChannelClosed() from exc
        finally:
            timer.cancel()
            pending.pop(rid, None)

    def _write(self, message: dict[str, Any]) -> None:
        self._writer.write(orjson.dumps(message) + b"\n")


class StampedMeta:
    """A session stamp's `_meta` keys, learnt once and merged into each side-channel request.

    A 2026-07-28 session stamps every request with the same `_meta` keys (protocol version, client
    info, capabilities, the log-level default) and with HTTP headers, which a stdio pipe never
    sends. Running the stamp per call (its header encoding and all) is a per-call cost of the
    forwarding path for bytes nobody reads; this runs it once per stamp, on an empty probe request,
    and then only merges: `merge(params)` gives what `stamp` would have left in `params`, the
    headers aside -- the caller's `_meta` kept, the stamp's keys over it, except the caller's log
    level (the stamp only sets a default) and the caller's own client capabilities (a 2026-07-28
    client's, kept in place of the gateway's: `keep_client_capabilities`).
    """

    __slots__ = ("stamp", "_keys")

    def __init__(self, stamp: Callable[[dict[str, Any], Any], None]) -> None:
        self.stamp = stamp
        probe: dict[str, Any] = {"method": "tools/call", "params": {}}
        stamp(probe, {})
        meta = probe["params"].get("_meta")
        self._keys: dict[str, Any] = dict(meta) if isinstance(meta, dict) else {}

    def merge(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """A new params dict (`params` is not modified) with the stamp's `_meta` keys."""
        out = dict(params) if params else {}
        mine = out.get("_meta")
        meta = dict(mine) if isinstance(mine, dict) else {}
        meta.update(self._keys)
        if isinstance(mine, dict):
            if LOG_LEVEL_META_KEY in mine:
                meta[LOG_LEVEL_META_KEY] = mine[LOG_LEVEL_META_KEY]
            if isinstance(mine.get(CLIENT_CAPABILITIES_META_KEY), dict):
                meta[CLIENT_CAPABILITIES_META_KEY] = mine[CLIENT_CAPABILITIES_META_KEY]
        out["_meta"] = meta
        return out


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


async def _safe(coro: Awaitable[None]) -> None:
    with contextlib.suppress(Exception):
        await coro
