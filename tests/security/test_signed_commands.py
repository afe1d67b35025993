"""Signed commands, attacked from the wire: a scripted coordinator (standing in for anyone who can
put bytes on the agent's stream) sends forged, altered and replayed commands to the real agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import app
from agent.config import AgentConfig, FileEnforcerConfig
from jitmesh.clock import FakeClock, SystemClock
from jitmesh.v1 import agentlink_pb2
from tests.agent.coordinator import (
    KEY_ID,
    Coordinator,
    CoordinatorMessage,
    command,
    grant_body,
    revoke_body,
    serving,
)
from tests.agent.factories import T0, gid

APPLIED = agentlink_pb2.ACK_STATUS_APPLIED
REJECTED = agentlink_pb2.ACK_STATUS_REJECTED
MIN = timedelta(minutes=1)


class Host:
    def __init__(self, root: Path) -> None:
        self.state = root / "state"
        self.markers = root / "markers"
        self.clock = FakeClock(T0)

    def pairs(self) -> set[str]:
        """The markers in force (not the file enforcer's spares: dot files)."""
        if not self.markers.exists():
            return set()
        return {p.name for p in self.markers.iterdir() if not p.name.startswith(".")}

    def config(self, coordinator: Coordinator) -> AgentConfig:
        return AgentConfig(
            coordinator=coordinator.address,
            name="web-1",
            join_token="join-1",
            insecure=True,
            state_dir=self.state,
            enforcers=(FileEnforcerConfig(directory=self.markers),),
            backoff_base=0.05,
            backoff_cap=0.2,
        )


@pytest.fixture
async def coordinator() -> AsyncIterator[Coordinator]:
    async with serving() as fake:
        yield fake


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


@contextlib.asynccontextmanager
async def running(host: Host, coordinator: Coordinator) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.ensure_future(
        app.run(
            host.config(coordinator),
            clock=host.clock,
            pacing=SystemClock(),
            stop=stop,
            rand=lambda: 0.5,
        )
    )
    try:
        yield
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task


def tampered(message: CoordinatorMessage, **changes: object) -> CoordinatorMessage:
    out = CoordinatorMessage()
    out.CopyFrom(message)
    for name, value in changes.items():
        setattr(out.command, name, value)
    return out


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


async def test_keys_are_pinned_privately_at_enrollment(
    coordinator: Coordinator, host: Host
) -> None:
    async with running(host, coordinator):
        await coordinator.session()
        pinned = host.state / "signing_keys.json"
        assert list(json.loads(pinned.read_text())) == [KEY_ID]
        assert stat.S_IMODE(pinned.stat().st_mode) == 0o600


async def test_forged_and_altered_commands_are_rejected_and_change_nothing(
    coordinator: Coordinator, host: Host
) -> None:
    async with running(host, coordinator):
        session = await coordinator.session()
        good = command(grant_body(1, gid(), T0, T0 + 10 * MIN))
        body, signature = good.command.body, good.command.signature
        attacker = Ed25519PrivateKey.generate()
        attacks = {
            "flipped body bit": tampered(good, body=flip(body, len(body) // 2)),
            "flipped signature bit": tampered(good, signature=flip(signature, 5)),
            "no signature": tampered(good, signature=b""),
            "unknown key id": tampered(good, key_id="ed25519:unknown"),
            "attacker key under the pinned id": tampered(good, signature=attacker.sign(body)),
            "attacker key under its own id": tampered(
                good, key_id="attacker", signature=attacker.sign(body)
            ),
        }
        for name, message in attacks.items():
            session.send(message)
            ack = await session.ack()
            assert ack.status == REJECTED, name
            assert ack.reason in {
                "command signature is not valid",
                "command is signed by an unknown key",
            }, name
        assert host.pairs() == set()
        # None of them moved the log: the genuine command with seq 1 still applies.
        session.send(good)
        assert (await session.ack()).status == APPLIED
        assert host.pairs() == {"alice:deploy"}


async def test_a_validly_signed_grant_for_another_agent_is_rejected(
    coordinator: Coordinator, host: Host
) -> None:
    async with running(host, coordinator):
        session = await coordinator.session()
        ack = await session.command(grant_body(1, gid(), T0, T0 + 10 * MIN, agent="web-2"))
        assert (ack.status, ack.reason) == (REJECTED, "not for this agent")
        assert host.pairs() == set()


async def test_a_signed_command_from_an_earlier_epoch_is_rejected(
    coordinator: Coordinator, host: Host
) -> None:
    async with running(host, coordinator):
        session = await coordinator.session()  # welcomed with epoch 7
        ack = await session.command(grant_body(1, gid(), T0, T0 + 10 * MIN, epoch=6))
        assert (ack.status, ack.reason) == (
            REJECTED,
            "command is from an earlier coordinator epoch",
        )
        assert host.pairs() == set()


async def test_replays_after_revoke_and_after_expiry_grant_nothing(
    coordinator: Coordinator, host: Host
) -> None:
    async with running(host, coordinator):
        session = await coordinator.session()
        grant_id = gid()
        grant = command(grant_body(1, grant_id, T0, T0 + 10 * MIN))
        session.send(grant)
        assert (await session.ack()).status == APPLIED
        assert (await session.command(revoke_body(2, grant_id))).status == APPLIED
        assert host.pairs() == set()
        session.send(grant)  # the exact signed bytes again
        replay = await session.ack()
        assert (replay.status, replay.reason) == (agentlink_pb2.ACK_STATUS_DUPLICATE, "")
        assert host.pairs() == set()

        # The same grant id under a fresh, validly signed seq: the ended lease wins.
        late = await session.command(grant_body(3, grant_id, T0, T0 + 10 * MIN))
        assert (late.status, late.reason) == (REJECTED, "grant already ended")

        # A grant whose window has ended is refused even when signed and new.
        expired_id = gid()
        await host.clock.advance(timedelta(minutes=20))
        old = await session.command(grant_body(4, expired_id, T0, T0 + 10 * MIN))
        assert (old.status, old.reason) == (REJECTED, "expired on arrival")
        assert host.pairs() == set()
