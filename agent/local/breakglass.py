"""The socket's `breakglass {code}` method: verify the code under the keys a code may be signed
by (the pinned command keys and the break-glass keys: `agent.domain.breakglass.code_keys`), then
let the engine grant what it allows (docs/host.md, "Break-glass"). The caller is who the kernel
says; the code's subject must be that user, or the caller root."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Protocol

from agent.domain.breakglass import Code, Refused
from agent.domain.leases import Lease
from agent.local.peers import Caller
from agent.local.server import Refused as Answer
from agent.rpc.breakglass import BadCode, read_code

Message = dict[str, Any]


class BreakglassEngine(Protocol):
    async def use_breakglass(
        self, code: Code, *, caller: str | None, caller_is_root: bool, cap: timedelta
    ) -> Lease | Refused: ...


class BreakglassDesk:
    def __init__(
        self,
        engine: BreakglassEngine,
        keys: Callable[[], Mapping[str, bytes]],
        cap: timedelta,
    ) -> None:
        """`keys` reads the keys a code may be signed by now (after a rotation too); `cap`
        bounds a break-glass lease whatever the code says."""
        self._engine = engine
        self._keys = keys
        self._cap = cap

    async def __call__(self, caller: Caller, request: Message) -> Message:
        text = request.get("code")
        if not isinstance(text, str):
            raise Answer("breakglass: a code is required", "invalid")
        try:
            code = read_code(text, self._keys())
        except BadCode as exc:
            raise Answer(str(exc), "denied") from None
        result = await self._engine.use_breakglass(
            code, caller=caller.user, caller_is_root=caller.is_root, cap=self._cap
        )
        if isinstance(result, Refused):
            raise Answer(result.reason, "denied")
        return {
            "ok": True,
            "grant_id": result.grant_id,
            "subject": result.subject,
            "action": result.action,
            "not_after": result.not_after.isoformat(timespec="seconds").replace("+00:00", "Z"),
        }
