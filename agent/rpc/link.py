"""The agent's link to the coordinator: `AgentLink.Connect`, kept open, resumed after every break.

Protocol, as the agent speaks it:

- Every call carries `authorization: Bearer <credential>`. Without `STATE/credential` the agent
  first calls `Agents.Enroll(join_token, name, labels)` (no authorization) and saves the returned
  credential (0600, atomically). A Connect refused with UNAUTHENTICATED deletes the credential
  and, when a join token is configured, the next attempt enrolls again.
- The agent's first message is `Hello` (name, labels, last applied sequence number, active grant
  ids, version, highest epoch seen, boot id, agent time). The coordinator's first message must be
  `Welcome` (coordinator time, epoch, resume point, heartbeat interval, the signed key lists:
  command-signing keys, and since 0.2 the retired keys kept for break-glass codes only, in
  `STATE/breakglass_keys.json`); then `Command`s follow in sequence order.
- Each `Command` is verified (`verify.py`: Ed25519 signature over the body bytes by a key pinned
  at enrollment in `STATE/signing_keys.json`; not from an earlier epoch), parsed, persisted,
  applied and then acknowledged with
  `Ack(seq, APPLIED | FAILED | REJECTED, reason, grant_id)`. Commands not meant for this agent,
  with a body sequence number that differs from the command's, or that do not parse are REJECTED
  and change nothing. Duplicates (seq at or below the last applied one, snapshots aside) are
  re-acked APPLIED without effect.
- After the Welcome the agent sends every event of its outbox as `AgentEvent` (then new ones as
  they come); the coordinator answers `EventAck(event_ids)` and acknowledged events are deleted.
  Unacknowledged events are sent again on the next stream; the coordinator deduplicates by id.
- The agent sends `Heartbeat(sent_at)` every `Welcome.heartbeat_interval` and ignores the
  coordinator's heartbeats.
- When the stream breaks, the agent reconnects after a full-jitter exponential backoff (base and
  cap configurable, reset after a stream that stayed healthy long enough) and says in its Hello
  where it stopped. Pushed back by admission control, it waits the coordinator's hint (never
  less than the schedule's delay); a pushback does not grow the schedule. With several addresses
  (replicas) it moves to the next one on a failure; a dial that nothing answered (UNAVAILABLE
  before any message: nothing listening) moves on at once if the next address has not been
  dialed since the last wait, so a dead replica costs no wait and no address is dialed twice
  between waits. A replica that pushed back keeps the agent: it dials that one again after the
  hint.

Writes to the stream never overlap (two at once crash it): a lock serializes them. The reader
hands commands to the applier task, which applies them and writes their acks itself, at once:
one by one when they come one by one, and when they come faster than they are applied, all those
waiting together (one commit, one `AckBatch` to a coordinator of wire 0.2 or later). A writer
task drains a bounded queue for everything else (the Hello, heartbeats, outbox events).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc

from agent import defaults
from agent.domain.breakglass import BreakglassKey
from agent.domain.commands import Ack, AckStatus, CommandSpec
from agent.domain.errors import (
    EnrollmentError,
    EnrollmentRefused,
    LinkError,
    MalformedCommand,
    NotReached,
)
from agent.domain.timekeeping import full_jitter
from agent.engine import Engine
from agent.identity import IdentityFile, TlsIdentity, new_key_and_csr
from agent.store.credential import CredentialFile
from agent.store.keys import BREAKGLASS_KEYS_NAME, BreakglassKeys, PinnedKeys
from jitmesh import __version__, telemetry
from jitmesh.clock import Clock, from_ms, to_ms
from jitmesh.keyset import MAX_CODE_VALID_FOR, breakglass_keys_bytes, key_entries, keys_bytes
from jitmesh.v1 import agentlink_pb2, agents_pb2
from jitmesh.v1.agentlink_pb2_grpc import AgentLinkStub
from jitmesh.v1.agents_pb2_grpc import AgentsStub
from jitmesh.versions import coordinator_supported, older_than
from jitmesh.versions import parse as parse_version

from . import convert
from .signature import signature_holds
from .verify import verify

log = logging.getLogger(__name__)

ENROLL_TIMEOUT = 30.0
OUTBOX_BATCH = 100
MIN_HEARTBEAT = 0.1
MAX_RECEIVE = 4 * 1024 * 1024  # snapshots can be large
MAX_SEND = 64 * 1024
# Commands received and not yet applied (beyond: the reader stops, and gRPC holds the sender),
# and the most applied together (their acks fit one message well under MAX_SEND).
RECEIVED_COMMANDS = 1024
# A coordinator's retry hint is believed up to this many seconds.
MAX_HINT = 600.0
# The most a retry hint is spread by the agent's own jitter (seconds).
HINT_SPREAD = 1.0
APPLY_BATCH = 128

_Call = grpc.aio.StreamStreamCall[agentlink_pb2.AgentMessage, agentlink_pb2.CoordinatorMessage]
_Queue = asyncio.Queue[agentlink_pb2.AgentMessage]


@dataclass(frozen=True, slots=True)
class LinkSettings:
    # "host:port", or several separated by commas (coordinator replicas): the agent stays on
    # one while it works and moves to the next when it fails.
    target: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    join_token: str | None = field(default=None, repr=False)
    # The coordinator's CA (PEM): with it the agent enrolls with a CSR over TLS and connects
    # with mTLS only; without it, plain loopback and a bearer credential (development).
    ca_pem: bytes | None = field(default=None, repr=False)
    version: str = __version__
    boot_id: str = ""
    backoff_base: float = defaults.BACKOFF_BASE
    backoff_cap: float = defaults.BACKOFF_CAP
    backoff_reset_after: float = 30.0
    heartbeat: float = 10.0
    keepalive_time: float = 30.0
    keepalive_timeout: float = 10.0
    queue_size: int = 256
    # A coordinator that accepts the stream but never welcomes the agent is treated as down.
    welcome_timeout: float = 30.0


class _StreamEnded(Exception):
    """The coordinator closed the stream without an error."""


class Link:
    def __init__(
        self,
        settings: LinkSettings,
        *,
        engine: Engine,
        credentials: CredentialFile,
        keys: PinnedKeys,
        breakglass_keys: BreakglassKeys | None = None,
        clock: Clock,
        pacing: Clock,
        rand: Callable[[], float] = random.random,
        identity: IdentityFile | None = None,
    ) -> None:
        """`clock` stamps messages; `pacing` times backoff and heartbeats."""
        self._identity = identity or IdentityFile(credentials.path.with_name("tls_identity.json"))
        self._settings = settings
        self._engine = engine
        self._credentials = credentials
        self._keys = keys
        self._breakglass_keys = breakglass_keys or BreakglassKeys(
            credentials.path.with_name(BREAKGLASS_KEYS_NAME)
        )
        self._pinned: dict[str, bytes] = {}
        # Break-glass uses the current Hello reported (adopted once its Welcome arrives).
        self._reported_breakglass: list[str] = []
        self._min_epoch = 0
        self._clock = clock
        self._pacing = pacing
        self._rand = rand
        self._welcomed_at: float | None = None
        self._sent: set[str] = set()
        # The coordinator's "try again after" (seconds) from the last attempt, if it gave one.
        self._retry_hint = 0.0
        # The current dial got a message from the coordinator (it was reached).
        self._heard = False
        self._targets = [t.strip() for t in settings.target.split(",") if t.strip()]
        self._current = 0

    @property
    def _target(self) -> str:
        return self._targets[self._current]

    @property
    def address(self) -> str:
        """The coordinator address the link is on (or dials next)."""
        return self._target

    async def run(self) -> None:
        """Connect, serve the stream until it breaks, back off, and again; until cancelled."""
        attempt = 0
        # Addresses dialed since the last wait: each at most once per wait of the schedule.
        dialed: set[int] = set()
        while True:
            self._welcomed_at = None
            self._heard = False
            dialed.add(self._current)
            unreached = False
            enrolled = self._identity.read() if self._settings.ca_pem else self._credentials.read()
            if enrolled is None and not self._settings.join_token:
                # Nothing to connect or enroll with: retrying cannot help.
                raise EnrollmentError(
                    "no credential in the state directory and no join token to enroll with"
                )
            try:
                await self._session()
                reason = "stream ended"
            except grpc.aio.AioRpcError as exc:
                reason = self._refused(exc)
                unreached = exc.code() == grpc.StatusCode.UNAVAILABLE and not self._heard
            except EnrollmentRefused:
                raise
            except (LinkError, EnrollmentError) as exc:
                reason = str(exc)
                unreached = isinstance(exc, NotReached)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A stop that arrived while the stream was already failing: the TaskGroup in
                # `_stream` reports the stream's error and swallows the cancellation, which
                # would leave the agent reconnecting forever after SIGTERM.
                raise asyncio.CancelledError
            await self._engine.coordinator_lost()
            pushed_back = self._retry_hint > 0
            if len(self._targets) > 1 and not pushed_back:
                # Fail over: the next replica. The log is shared, so the agent resumes there
                # from its last applied sequence number. A replica that pushed back stays: it
                # is up and said when to come back.
                self._current = (self._current + 1) % len(self._targets)
            if unreached and self._current not in dialed:
                # Nothing answered there (a dead replica's address): the next one at once,
                # without waiting out the schedule for an address that was never reached.
                log.warning("link down", extra={"reason": reason, "delay": "0.000s"})
                continue
            healthy_for = (
                None if self._welcomed_at is None else self._pacing.monotonic() - self._welcomed_at
            )
            if healthy_for is not None and healthy_for >= self._settings.backoff_reset_after:
                attempt = 0
            delay = full_jitter(
                attempt,
                base=self._settings.backoff_base,
                cap=self._settings.backoff_cap,
                rand=self._rand(),
            )
            if self._retry_hint > 0:
                reason = "RESOURCE_EXHAUSTED"  # pushed back, however the stream's end showed
                # Pushed back: the hint, spread by up to half again but by no more than
                # HINT_SPREAD (the coordinator gives each refused agent its own slot already; a
                # spread in proportion would push the last slots of a long queue out by many
                # seconds), never less than the schedule's own delay. A pushback is an answer,
                # not a failure: it does not grow the schedule (the coordinator paces the
                # refused itself; agents refused several times in a burst otherwise came back
                # on a doubled backoff long after their slot).
                hint = min(MAX_HINT, self._retry_hint)
                hinted = hint + self._rand() * min(0.5 * hint, HINT_SPREAD)
                delay = max(delay, hinted)
                self._retry_hint = 0.0
            else:
                attempt += 1
            log.warning("link down", extra={"reason": reason, "delay": f"{delay:.3f}s"})
            dialed.clear()
            await self._pacing.sleep(delay)

    def _refused(self, exc: grpc.aio.AioRpcError) -> str:
        code = exc.code()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and self._retry_hint <= 0:
            # The hint in the status details (the stream may have ended before it was read).
            self._retry_hint = convert.retry_after(exc.trailing_metadata()) or 0.0
        if code == grpc.StatusCode.UNAUTHENTICATED:
            # The coordinator no longer accepts the credential (removed agent, reset coordinator).
            # With a join token, drop it and enroll again on the next attempt; without one, keep
            # it and keep trying: it is the only identity this agent has.
            if self._settings.join_token:
                self._credentials.delete()
                self._identity.delete()
                log.warning("credential refused; enrolling again")
            else:
                log.error("credential refused and no join token to enroll again")
        name = code.name if code is not None else "UNKNOWN"
        # The one-line reason, printable and cut short: the coordinator's (e.g. this agent's
        # version is not served and what to upgrade, docs/wire.md "Mixed versions"; or why it
        # ended the stream) or gRPC's for a transport failure (a keepalive unanswered, a reset):
        # an UNAVAILABLE alone cannot tell an operator which of them happened.
        why = "".join(ch for ch in (exc.details() or "")[:200] if ch.isprintable())
        return f"{name}: {why}" if why else name

    async def _session(self) -> None:
        if self._settings.ca_pem is not None:
            await self._tls_session(self._settings.ca_pem)
            return
        credential = self._credentials.read()
        if credential is not None and not self._keys.read() and self._settings.join_token:
            # Enrolled before commands were signed: without pinned keys every command would be
            # refused, so enroll again to get them.
            credential = None
        async with grpc.aio.insecure_channel(self._target, options=self._options()) as ch:
            if credential is None:
                credential = await self._enroll(ch)
            await self._stream(ch, (("authorization", f"Bearer {credential}"),))

    async def _tls_session(self, ca_pem: bytes) -> None:
        identity = self._identity.read()
        if identity is None or not self._keys.read():
            server_only = grpc.ssl_channel_credentials(ca_pem)
            async with grpc.aio.secure_channel(
                self._target, server_only, options=self._options()
            ) as ch:
                identity = await self._enroll_tls(ch)
        host = self._target.rpartition(":")[0]
        target = f"{host}:{identity.port}"
        if self._clock.now() >= identity.renew_at():
            identity = await self._renew(target, ca_pem, identity)
        mutual = grpc.ssl_channel_credentials(ca_pem, identity.key_pem, identity.cert_pem)
        # A stream outlasting the certificate's renewal point is ended then, so the next session
        # renews; a failed renewal leaves the timer off (the old certificate serves until then).
        renew_in = (identity.renew_at() - self._clock.now()).total_seconds()
        async with grpc.aio.secure_channel(target, mutual, options=self._options()) as ch:
            try:
                async with asyncio.timeout(renew_in if renew_in > 0 else None) as renewal:
                    await self._stream(ch, ())
            except TimeoutError:
                if not renewal.expired():
                    raise
                raise LinkError("certificate renewal due") from None

    async def _renew(self, target: str, ca_pem: bytes, old: TlsIdentity) -> TlsIdentity:
        """A new key and certificate before the old one ends; the lease table is untouched, so
        grants carry on across the reconnect that follows."""
        key_pem, csr = new_key_and_csr(self._settings.name)
        mutual = grpc.ssl_channel_credentials(ca_pem, old.key_pem, old.cert_pem)
        async with grpc.aio.secure_channel(target, mutual, options=self._options()) as ch:
            try:
                response = await AgentsStub(ch).RenewCertificate(
                    agents_pb2.RenewCertificateRequest(csr=csr), timeout=ENROLL_TIMEOUT
                )
            except grpc.aio.AioRpcError as exc:
                # Keep the old certificate while it lasts; the next session tries again.
                log.warning("certificate renewal failed", extra={"reason": _code(exc)})
                return old
        new = TlsIdentity(key_pem, bytes(response.certificate), old.port)
        self._identity.write(new)
        log.info("certificate renewed")
        return new

    async def _enroll_tls(self, channel: grpc.aio.Channel) -> TlsIdentity:
        key_pem, csr = new_key_and_csr(self._settings.name)
        request = agents_pb2.EnrollRequest(
            join_token=self._settings.join_token or "",
            name=self._settings.name,
            labels=dict(self._settings.labels),
            csr=csr,
        )
        try:
            response = await AgentsStub(channel).Enroll(request, timeout=ENROLL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise _enrollment_error(exc) from None
        if not response.certificate or not 0 < response.agent_port < 65536:
            raise EnrollmentError("enrollment returned no usable certificate")
        self._pin(response)
        identity = TlsIdentity(key_pem, bytes(response.certificate), response.agent_port)
        self._identity.write(identity)
        log.info("enrolled")
        return identity

    def _pin(self, response: agents_pb2.EnrollResponse) -> None:
        keys = {k.key_id: k.public_key for k in response.signing_keys if len(k.public_key) == 32}
        if not keys:
            raise EnrollmentError("enrollment returned no command-signing key")
        self._keys.write(keys)
        # Break-glass keys were announced by the coordinator this agent was enrolled with
        # before: none of them holds for the new enrolment until its own Welcome says so.
        self._breakglass_keys.delete()

    async def _stream(self, ch: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> None:
        state = await self._engine.hello_state()
        self._pinned = self._keys.read()
        self._min_epoch = state.epoch
        # No request iterator: this call is written to only through `_Writes` (one at a time).
        call: _Call = AgentLinkStub(ch).Connect(None, metadata=metadata)
        queue: _Queue = asyncio.Queue(maxsize=self._settings.queue_size)
        out = _Writes(call)
        queue.put_nowait(
            convert.hello_to_pb(
                agent=self._settings.name,
                labels=self._settings.labels,
                last_applied_seq=state.last_applied_seq,
                active_grant_ids=state.active_grant_ids,
                version=self._settings.version,
                epoch=state.epoch,
                boot_id=self._settings.boot_id,
                agent_time=self._clock.now(),
                removing_grant_ids=state.removing_grant_ids,
                breakglass=state.breakglass,
            )
        )
        # Adopted by the coordinator before it answers this Hello (docs/wire.md, "Resume").
        self._reported_breakglass = [use.code_id for use in state.breakglass]
        self._sent = set()
        try:
            async with asyncio.TaskGroup() as tasks:
                writer = tasks.create_task(self._write(out, queue))
                reader = tasks.create_task(self._read(call, out, queue, tasks))
                # Wait inside the block: on Python 3.11 a child that fails after the block has
                # ended leaves a cancel request on this task that is never taken back, and
                # `run` could no longer tell a stop (SIGTERM) from a broken stream.
                await asyncio.wait([writer, reader], return_when=asyncio.FIRST_COMPLETED)
        except BaseExceptionGroup as group:
            await self._note_hint(call)
            _raise_most_telling(group)

    async def _note_hint(self, call: _Call) -> None:
        """A stream refused with RESOURCE_EXHAUSTED: keep its retry hint (status details),
        whichever of the stream's tasks noticed the end first."""
        if self._retry_hint > 0 or not call.done():
            return
        if await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self._retry_hint = convert.retry_after(await call.trailing_metadata()) or 0.0

    def _options(self) -> list[tuple[str, int]]:
        s = self._settings
        return [
            ("grpc.keepalive_time_ms", int(s.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout * 1000)),
            # Without it a silently dropped connection takes about a minute to notice.
            ("grpc.http2.ping_timeout_ms", int(s.keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            # Keep pinging while the stream carries no data (by default pings stop after two).
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", MAX_RECEIVE),
            ("grpc.max_send_message_length", MAX_SEND),
        ]

    async def _enroll(self, channel: grpc.aio.Channel) -> str:
        request = agents_pb2.EnrollRequest(
            join_token=self._settings.join_token or "",
            name=self._settings.name,
            labels=dict(self._settings.labels),
        )
        try:
            response = await AgentsStub(channel).Enroll(request, timeout=ENROLL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise _enrollment_error(exc) from None
        credential = response.credential
        # It travels in call metadata, which takes printable ASCII only.
        if not credential or not (credential.isascii() and credential.isprintable()):
            raise EnrollmentError("enrollment returned no usable credential")
        # Keys first: a credential is never saved without the keys that check its commands.
        self._pin(response)
        self._credentials.write(credential)
        if response.agent and response.agent != self._settings.name:
            log.warning("the coordinator enrolled this agent under another name")
        log.info("enrolled")
        return credential

    async def _write(self, out: _Writes, queue: _Queue) -> None:
        while True:
            await out.send(await queue.get())

    async def _read(
        self, call: _Call, out: _Writes, queue: _Queue, tasks: asyncio.TaskGroup
    ) -> None:
        try:
            async with asyncio.timeout(self._settings.welcome_timeout):
                first = await call.read()
        except TimeoutError:
            raise LinkError("no Welcome from the coordinator") from None
        self._heard = True
        if not isinstance(first, agentlink_pb2.CoordinatorMessage):
            raise _StreamEnded()
        if first.WhichOneof("body") == "pushback":
            # Admission control: "not now". The stream ends next (RESOURCE_EXHAUSTED); `run`
            # waits at least this long, never less than its own schedule.
            self._retry_hint = convert.duration_seconds(first.pushback.retry_after)
            await call.read()
            raise _StreamEnded()
        if first.WhichOneof("body") != "welcome":
            raise LinkError("the coordinator did not start with a Welcome")
        interval = await self._welcome(first.welcome)
        if self._reported_breakglass:
            await self._engine.breakglass_adopted(self._reported_breakglass)
            self._reported_breakglass = []
        batched = not older_than(first.welcome.version, 0, 2)
        received: asyncio.Queue[agentlink_pb2.Command] = asyncio.Queue(RECEIVED_COMMANDS)
        tasks.create_task(self._heartbeats(queue, interval))
        tasks.create_task(self._send_outbox(queue))
        tasks.create_task(self._apply(received, out, batched=batched))
        while True:
            message = await call.read()
            if not isinstance(message, agentlink_pb2.CoordinatorMessage):
                raise _StreamEnded()
            kind = message.WhichOneof("body")
            if kind == "command":
                # Full: stop reading, so gRPC's flow control holds the coordinator back.
                await received.put(message.command)
                if received.qsize() == 1:
                    # The applier may be waiting for just this one: let it apply the command
                    # and start its ack's write before this task asks gRPC for the next message
                    # (tens of microseconds of Python that came first, on the push's path).
                    # Commands arriving meanwhile wait in gRPC's buffer, read right after.
                    await asyncio.sleep(0)
            elif kind == "event_ack":
                ids = list(message.event_ack.event_ids)
                self._sent.difference_update(ids)
                await self._engine.events_delivered(ids)
            elif kind == "welcome":
                log.warning("ignoring a second Welcome on one stream")
            # Coordinator heartbeats need no answer; keepalive pings watch the connection.

    def _adopt_keys(self, welcome: agentlink_pb2.Welcome) -> None:
        """Pin the signing keys the Welcome announces (a rotation), and keep the break-glass
        keys it announces, each list only when a key already pinned signed it (the same key,
        under each list's own prefix); keys past their not_after are dropped."""
        public = self._pinned.get(welcome.keys_key_id)
        if welcome.breakglass_keys_signature:
            # Checked under the keys pinned before this Welcome, as the key list is.
            self._adopt_breakglass_keys(welcome, public)
        if not welcome.signing_keys:
            return
        if public is None or not signature_holds(
            public, welcome.keys_signature, keys_bytes(key_entries(welcome.signing_keys))
        ):
            log.warning("ignoring signing keys not signed by a pinned key")
            return
        now_ms = to_ms(self._clock.now())
        keys = {
            kid: pub
            for kid, pub, not_after in key_entries(welcome.signing_keys)
            if len(pub) == 32 and (not_after == 0 or not_after > now_ms)
        }
        if keys and keys != self._pinned:
            self._keys.write(keys)
            self._pinned = keys
            log.info("signing keys updated", extra={"keys": ",".join(sorted(keys))})

    def _adopt_breakglass_keys(self, welcome: agentlink_pb2.Welcome, public: bytes | None) -> None:
        """Replace the kept break-glass keys by the Welcome's list (docs/wire.md, "Break-glass
        codes"). They verify codes only (`code_keys`), never a command: `_pinned` stays as
        it is. The signature binds this agent's name and the Welcome's time: a list older
        than the one kept is refused (a replay). A key without a not_after, or past it, is not
        kept; none is kept past this agent's time + the longest a code is valid."""
        entries = key_entries(welcome.breakglass_keys)
        at_ms = (
            welcome.coordinator_time.ToMilliseconds() if welcome.HasField("coordinator_time") else 0
        )
        signed = breakglass_keys_bytes(entries, agent=self._settings.name, at_ms=at_ms)
        if (
            public is None
            or at_ms <= 0
            or not signature_holds(public, welcome.breakglass_keys_signature, signed)
        ):
            log.warning("ignoring break-glass keys not signed for this agent by a pinned key")
            return
        kept_at = self._breakglass_keys.listed_at()
        if kept_at is not None and at_ms < to_ms(kept_at):
            log.warning("ignoring a break-glass key list older than the one kept")
            return
        now = self._engine.now()
        now_ms, cap_ms = to_ms(now), to_ms(now + MAX_CODE_VALID_FOR)
        keys = {
            kid: BreakglassKey(pub, from_ms(min(not_after, cap_ms)))
            for kid, pub, not_after in entries
            if len(pub) == 32 and not_after > now_ms
        }
        if keys != self._breakglass_keys.read():
            # Written only when the keys change: every list between the kept one's time and
            # the latest then holds these same keys, so a replay of one changes nothing.
            self._breakglass_keys.write(keys, from_ms(at_ms))
            log.info("break-glass keys updated", extra={"keys": ",".join(sorted(keys))})

    async def _welcome(self, welcome: agentlink_pb2.Welcome) -> float:
        if not coordinator_supported(welcome.version, self._settings.version):
            # docs/wire.md, "Mixed versions": one clear line, and the stream ends before any
            # command is read; the link retries on its schedule (the coordinator may be
            # upgraded meanwhile) and the leases keep being enforced offline.
            theirs = welcome.version or "older than 0.2"
            log.error(
                "coordinator version %s is not supported by this agent (%s): %s",
                theirs,
                self._settings.version,
                "upgrade the coordinator first"
                if older_than(welcome.version, *_minor(self._settings.version))
                else "upgrade the agent",
                extra={"coordinator_version": theirs, "version": self._settings.version},
            )
            raise LinkError(f"coordinator version {theirs} is not supported")
        self._adopt_keys(welcome)
        await self._engine.note_epoch(welcome.epoch)
        self._min_epoch = max(self._min_epoch, welcome.epoch)
        if welcome.HasField("coordinator_time"):
            # Time never runs behind the coordinator's; an untrusted clock is trusted again.
            try:
                coordinator_time = convert.from_timestamp(welcome.coordinator_time, "time")
            except MalformedCommand:
                raise LinkError("the Welcome carries an impossible time") from None
            await self._engine.coordinator_time_seen(coordinator_time)
        await self._engine.coordinator_reached()
        self._welcomed_at = self._pacing.monotonic()
        if welcome.agent and welcome.agent != self._settings.name:
            log.warning("the coordinator knows this agent under another name")
        interval = self._settings.heartbeat
        if welcome.HasField("heartbeat_interval"):
            given = convert.duration_seconds(welcome.heartbeat_interval)
            if given > 0:
                interval = max(MIN_HEARTBEAT, given)
        log.info(
            "connected",
            extra={
                "coordinator": self._target,
                "seq": welcome.resume_after_seq,
                telemetry.REPLICA: welcome.replica[: convert.MAX_REPLICA],
            },
        )
        return interval

    async def _apply(
        self, received: asyncio.Queue[agentlink_pb2.Command], out: _Writes, *, batched: bool
    ) -> None:
        """Apply the commands as they arrive and ack them at once: one at a time when they
        come one at a time, and all those waiting together when they come faster than they are
        applied (one commit, one ack message: `Engine.handle_many`, `AckBatch`)."""
        while True:
            batch = [await received.get()]
            while not received.empty() and len(batch) < APPLY_BATCH:
                batch.append(received.get_nowait())
            acks = await self._commands(batch)
            if batched and len(acks) > 1:
                await out.send(convert.acks_to_pb(acks))
            else:
                for ack in acks:
                    await out.send(convert.ack_to_pb(ack))

    async def _commands(self, batch: list[agentlink_pb2.Command]) -> list[Ack]:
        """Each command verified (a refused one changes nothing), the others handled in order."""
        acks: dict[int, Ack] = {}
        specs: list[tuple[int, CommandSpec]] = []
        for k, command in enumerate(batch):
            try:
                body = verify(command, self._pinned, min_epoch=self._min_epoch)
                specs.append((k, convert.command_from_pb(command.seq, body)))
            except MalformedCommand as exc:
                log.warning("command rejected", extra={"seq": command.seq, "reason": str(exc)})
                acks[k] = Ack(command.seq, AckStatus.REJECTED, str(exc)[:256])
        if len(specs) == 1:
            acks[specs[0][0]] = await self._engine.handle(specs[0][1])
        elif specs:
            handled = await self._engine.handle_many([spec for _, spec in specs])
            acks.update(zip((k for k, _ in specs), handled, strict=True))
        return [acks[k] for k in range(len(batch))]

    async def _heartbeats(self, queue: _Queue, interval: float) -> None:
        while True:
            await self._pacing.sleep(interval)
            await queue.put(convert.heartbeat_to_pb(self._clock.now()))
            # The stream is up (keepalive would have broken it otherwise): note the contact, so
            # the offline grace after a crash counts from here.
            await self._engine.coordinator_alive()

    async def _send_outbox(self, queue: _Queue) -> None:
        changed = self._engine.outbox_changed
        while True:
            changed.clear()
            for event in await self._engine.pending_events(OUTBOX_BATCH):
                if event.event_id not in self._sent:
                    self._sent.add(event.event_id)
                    await queue.put(convert.event_to_pb(event))
            await changed.wait()


class _Writes:
    """The only way onto the stream: one write at a time. Uncontended (the usual case for an
    ack), the lock is taken without yielding to the event loop."""

    __slots__ = ("_call", "_lock")

    def __init__(self, call: _Call) -> None:
        self._call = call
        self._lock = asyncio.Lock()

    async def send(self, message: agentlink_pb2.AgentMessage) -> None:
        async with self._lock:
            try:
                await self._call.write(message)
            except asyncio.InvalidStateError:
                # The call finished (OK) while this message waited: the reader reports why.
                raise _StreamEnded() from None


# Enrollment answers that no retry can change: the agent stops with the coordinator's reason.
_REFUSALS = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)


def _enrollment_error(exc: grpc.aio.AioRpcError) -> EnrollmentError:
    """A refusal (stop, with the coordinator's one-line reason, printable and cut short) or a
    failure worth retrying (unavailable, rate limited, a deadline)."""
    if exc.code() in _REFUSALS:
        why = "".join(ch for ch in (exc.details() or "")[:200] if ch.isprintable())
        return EnrollmentRefused(f"enrollment refused ({_code(exc)}): {why or 'no reason given'}")
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return NotReached(f"enrollment failed: {_code(exc)}")
    return EnrollmentError(f"enrollment failed: {_code(exc)}")


def _code(exc: grpc.aio.AioRpcError) -> str:
    code = exc.code()
    return code.name if code is not None else "UNKNOWN"


def _raise_most_telling(group: BaseExceptionGroup[BaseException]) -> None:
    """Surface the error that explains why a stream's tasks ended: a status from the
    coordinator first, then a protocol error; a plain end of stream returns normally."""
    leaves = list(_leaves(group))
    for kind in (grpc.aio.AioRpcError, LinkError):
        for exc in leaves:
            if isinstance(exc, kind):
                raise exc
    if all(isinstance(exc, _StreamEnded) for exc in leaves):
        return
    raise group


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found.extend(_leaves(exc))
        else:
            found.append(exc)
    return found


def _minor(version: str) -> tuple[int, int]:
    parsed = parse_version(version) or (0, 0, 0)
    return parsed[0], parsed[1]
