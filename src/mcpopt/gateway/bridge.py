"""Input-required bridging (SEP-2322): a 2026-07-28 client calling a handshake-era upstream that
asks its client something in the middle of a call.

A handshake-era server asks with a server-to-client request (`sampling/createMessage`,
`elicitation/create`, `roots/list`) while its `tools/call` (or `prompts/get`, `resources/read`) is
in flight. A 2026-07-28 client has no channel for such requests: it expects an
`InputRequiredResult` and repeats its request with `inputResponses` and `requestState`.
`InputBridge` turns the one into the other (issue 11, failure 2):

- round 1: the call goes upstream (the whole pipeline) in a task of its own. If it completes, its
  result is the answer, as without the bridge. If the upstream asks first, its request is parked
  and the client gets `{"resultType": "input_required", "inputRequests": {"q1": {...}},
  "requestState": "mcpopt-ir:<id>"}` (requests that arrive together travel together).
- round n: the client's repeat carries that `requestState` and `inputResponses`; each response
  answers its parked upstream request, and the call is awaited again: its result, or the next
  questions. Progress and log messages of the call go to the request of the current round;
  between rounds nobody is listening and they are dropped.

A parked call waits at most `timeout_s` for the client's next round; then its upstream requests
are answered with an error, the call is cancelled upstream and the state forgotten. A repeat
whose state is unknown (expired, or made to another gateway process: the state lives in the
process that holds the call) is refused with INVALID_PARAMS saying so, as is one from another
auth partition. A client whose 2026-07-28 capabilities (`_meta`) lack what the upstream asks for
has the upstream's request answered with an error at once, as a handshake-era client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import mcp_types as types
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, REQUEST_TIMEOUT

from mcpopt.api import ProgressFn
from mcpopt.gateway.eras import INPUT_RESULT_TYPES

STATE_PREFIX = "mcpopt-ir:"
"""`requestState` values the bridge minted (any other state is an upstream's own, passed through)."""
NotifyFn = Callable[..., Awaitable[None]]


def bridged_state(params: Mapping[str, Any]) -> str | None:
    """The bridge's call id if `params` is the repeat of a bridged request, else None."""
    state = params.get("requestState")
    if isinstance(state, str) and state.startswith(STATE_PREFIX):
        return state[len(STATE_PREFIX) :]
    return None


def missing_capability(capabilities: Any, request: types.InputRequest) -> str | None:
    """What a 2026-07-28 client's declared capabilities lack for `request` (None: nothing, or no
    capabilities declared at all, which is taken as "try")."""
    if not isinstance(capabilities, Mapping):
        return None
    if isinstance(request, types.CreateMessageRequest):
        return None if "sampling" in capabilities else "sampling"
    if isinstance(request, types.ListRootsRequest):
        return None if "roots" in capabilities else "roots"
    elicitation = capabilities.get("elicitation")
    if not isinstance(elicitation, Mapping):
        return "elicitation"
    if getattr(request.params, "mode", None) == "url" and "url" not in elicitation:
        return "elicitation.url"
    return None


def _wire(request: types.InputRequest) -> dict[str, Any]:
    data = request.model_dump(by_alias=True, mode="json", exclude_none=True)
    params = data.get("params")
    if isinstance(params, dict):
        params.pop("elicitationId", None)  # removed at 2026-07-28 (a handshake-era URL elicitation has one)
        params.pop("task", None)  # 2025-11-25 task augmentation: not in the 2026-07-28 envelope
    return data


@dataclass
class _Question:
    key: str
    request: types.InputRequest
    answer: asyncio.Future[types.InputResponse | types.ErrorData]


class ParkedCall:
    """One bridged call: its upstream task, its questions, and the current round's channels."""

    def __init__(self, call_id: str, partition: str, target: str, capabilities: Any) -> None:
        self.id = call_id
        self.partition = partition
        self.target = target
        """What the client called (`tools/call <name>`), so a repeat cannot resume another call."""
        self.capabilities = capabilities
        self.relay: ProgressFn | None = None
        self.notify: NotifyFn | None = None
        self.task: asyncio.Task[dict[str, Any]] | None = None
        self._pending: list[_Question] = []
        self._asked: dict[str, _Question] = {}
        self._count = 0
        self._changed = asyncio.Event()
        self._expiry: asyncio.TimerHandle | None = None

    # ---- what the call's trampolines see -------------------------------------------------
    async def progress(self, progress: float, total: float | None, message: str | None) -> None:
        relay = self.relay
        if relay is not None:
            await relay(progress, total, message)

    async def send(self, method: str, params: Any = None, *rest: Any) -> None:
        notify = self.notify
        if notify is not None:
            await notify(method, params, *rest)

    async def ask(self, request: types.InputRequest) -> types.InputResponse | types.ErrorData:
        """The upstream asks (via `Caller.ask`): park the request until the client answers it."""
        lacking = missing_capability(self.capabilities, request)
        if lacking is not None:
            return types.ErrorData(
                code=INVALID_PARAMS,
                message=f"the client calling through mcpopt did not declare the {lacking} capability",
            )
        self._count += 1
        question = _Question(f"q{self._count}", request, asyncio.get_running_loop().create_future())
        self._pending.append(question)
        self._changed.set()
        return await question.answer

    # ---- rounds -----------------------------------------------------------------------
    async def next_round(self) -> dict[str, Any]:
        """The call's result, or an `InputRequiredResult` dict with the questions asked since.

        Raises:
            whatever the call raised (MCPError, GatewayError, ...).
        """
        assert self.task is not None
        while True:
            if self.task.done():
                return self.task.result()
            if self._pending:
                await asyncio.sleep(0)  # requests sent together travel in one round
                batch, self._pending = self._pending, []
                for q in batch:
                    self._asked[q.key] = q
                return {
                    "resultType": "input_required",
                    "inputRequests": {q.key: _wire(q.request) for q in batch},
                    "requestState": STATE_PREFIX + self.id,
                }
            self._changed.clear()
            waiter = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({self.task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()

    def answer(self, responses: Any) -> None:
        """Give the client's `inputResponses` to the upstream requests they answer; a parked
        request left without an answer is answered with an error."""
        got = responses if isinstance(responses, Mapping) else {}
        for key, question in list(self._asked.items()):
            del self._asked[key]
            raw = got.get(key)
            if question.answer.done():
                continue
            if not isinstance(raw, Mapping):
                question.answer.set_result(
                    types.ErrorData(code=INVALID_PARAMS, message=f"the client sent no answer to input request {key!r}")
                )
                continue
            try:
                question.answer.set_result(_response(question.request, raw))
            except ValueError as exc:
                question.answer.set_result(
                    types.ErrorData(code=INVALID_PARAMS, message=f"the client's answer to {key!r} is invalid: {exc}")
                )

    def fail_questions(self, error: types.ErrorData) -> None:
        for question in [*self._pending, *self._asked.values()]:
            if not question.answer.done():
                question.answer.set_result(error)
        self._pending, self._asked = [], {}

    def cancel(self) -> None:
        self.fail_questions(types.ErrorData(code=REQUEST_TIMEOUT, message="the client gave up on the call"))
        if self.task is not None:
            self.task.cancel()


def _response(request: types.InputRequest, raw: Mapping[str, Any]) -> types.InputResponse:
    method = request.method
    model: Any = INPUT_RESULT_TYPES[method]
    if method == "sampling/createMessage" and isinstance(raw.get("content"), list):
        model = types.CreateMessageResultWithTools
    data = {k: v for k, v in raw.items() if k not in ("resultType",)}
    return model.model_validate(data, by_name=False)  # type: ignore[no-any-return]


class InputBridge:
    """The parked calls of one gateway process (see the module docstring).

    Args:
        timeout_s: how long a parked call waits for the client's next round (seconds).
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._parked: dict[str, ParkedCall] = {}

    def __len__(self) -> int:
        return len(self._parked)

    async def start(
        self,
        run: Callable[[ParkedCall], Awaitable[dict[str, Any]]],
        *,
        partition: str,
        target: str,
        capabilities: Any,
        relay: ProgressFn | None,
        notify: NotifyFn | None,
    ) -> dict[str, Any]:
        """Round 1: run `run(parked)` (the upstream call, wired to `parked.ask`, `parked.progress`
        and `parked.send`) and return its result or the first questions."""
        call = ParkedCall(secrets.token_urlsafe(18), partition, target, capabilities)
        call.relay, call.notify = relay, notify
        call.task = asyncio.ensure_future(run(call))
        call.task.add_done_callback(_retrieved)
        return await self._round(call)

    async def resume(
        self,
        call_id: str,
        responses: Any,
        *,
        partition: str,
        target: str,
        relay: ProgressFn | None,
        notify: NotifyFn | None,
    ) -> dict[str, Any]:
        """Round n: answer the parked requests with `responses` and await the call again.

        Raises:
            MCPError: INVALID_PARAMS when the state is unknown, expired, or not this caller's.
        """
        call = self._parked.get(call_id)
        if call is None or call.partition != partition or call.target != target:
            raise MCPError(
                code=INVALID_PARAMS,
                message="unknown or expired requestState: the gateway holds a waiting call for "
                f"{self.timeout_s:g} s after asking, in the process that asked; call the tool again",
            )
        del self._parked[call_id]
        if call._expiry is not None:  # noqa: SLF001 - same module
            call._expiry.cancel()  # noqa: SLF001
        call.relay, call.notify = relay, notify
        call.answer(responses)
        return await self._round(call)

    async def _round(self, call: ParkedCall) -> dict[str, Any]:
        try:
            result = await call.next_round()
        except asyncio.CancelledError:
            call.cancel()  # the client gave up on this request: the call goes with it
            raise
        except BaseException:
            call.fail_questions(types.ErrorData(code=INVALID_PARAMS, message="the call failed"))
            raise
        call.relay = call.notify = None
        if result.get("resultType") == "input_required" and isinstance(result.get("requestState"), str):
            self._parked[call.id] = call
            call._expiry = asyncio.get_running_loop().call_later(self.timeout_s, self._expire, call.id)  # noqa: SLF001
        return result

    def _expire(self, call_id: str) -> None:
        call = self._parked.pop(call_id, None)
        if call is None:
            return
        call.fail_questions(
            types.ErrorData(
                code=REQUEST_TIMEOUT, message=f"the client did not answer within {self.timeout_s:g} s (via mcpopt)"
            )
        )
        if call.task is not None:
            call.task.cancel()

    def close(self) -> None:
        """Cancel every parked call (the gateway stops)."""
        for call in list(self._parked.values()):
            if call._expiry is not None:  # noqa: SLF001
                call._expiry.cancel()  # noqa: SLF001
            with contextlib.suppress(Exception):
                call.cancel()
        self._parked.clear()


def _retrieved(task: asyncio.Task[Any]) -> None:
    """A parked call cancelled or failed while nobody awaits it: its outcome is consumed here."""
    if not task.cancelled():
        task.exception()
