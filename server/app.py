"""The coordinator's composition root: builds every part from the config and runs them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from jitmesh import __version__
from jitmesh import telemetry as t
from jitmesh.clock import Clock, MillisecondClock, SystemClock
from jitmesh.pidlock import DirectoryBusy, lock_directory
from jitmesh.types import ReviewDecision
from jitmesh.v1 import (
    access_pb2,
    access_pb2_grpc,
    agentlink_pb2,
    agentlink_pb2_grpc,
    agents_pb2,
    agents_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    breakglass_pb2,
    breakglass_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
    locks_pb2,
    locks_pb2_grpc,
    mesh_pb2,
    mesh_pb2_grpc,
    notify_pb2,
    notify_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
)
from server.ca import InternalCA
from server.checkpoints import Checkpoints
from server.config import CoordinatorConfig
from server.domain import breakglass
from server.domain.access import AccessService
from server.domain.admission import Admission, AdmissionSettings
from server.domain.bootstrap import DevDataError, dev_credentials, refuse_dev_data
from server.domain.breakglass import BreakglassService
from server.domain.delivery import DeliveryGate, DeliveryRates
from server.domain.expiring import ExpiryWarnings
from server.domain.expiry import Expirer
from server.domain.fleet import FleetService
from server.domain.governance import (
    AuditService,
    IdentityService,
    PolicyService,
    StoreVersions,
    TokenService,
)
from server.domain.hub import Hub
from server.domain.locks import LockService
from server.domain.models import Principal
from server.domain.ports import Tx
from server.domain.reads import Readers
from server.domain.receivers import ReceiverKind, ReceiverService
from server.domain.retention import CommandLogRetention
from server.domain.signin import SignInRules, SignInService
from server.domain.status import StatusService
from server.domain.steps import StepHook, no_hook
from server.notify.base import Links
from server.notify.factory import users_map
from server.notify.retry import RetryPolicy
from server.notify.secrets import Sealer
from server.notify.sender import Sender
from server.notify.slack import SlackInteractions
from server.oidc import OidcSettings, OidcVerifier
from server.rpc import reflection
from server.rpc.accesslog import AccessLog
from server.rpc.agentlink import MAX_AGENT_MESSAGE, AgentLinkServicer, LinkRegistry
from server.rpc.auth import Authenticator
from server.rpc.breakglass import BreakglassCodec, BreakglassServicer
from server.rpc.limits import Limiter, RateLimiter, SharedRateLimiter
from server.rpc.locks import LocksServicer
from server.rpc.malformed import MalformedRequests
from server.rpc.mesh import MeshServicer
from server.rpc.notify import NotifyServicer
from server.rpc.services import (
    AccessServicer,
    AgentsServicer,
    AuditServicer,
    IdentityServicer,
    PolicyServicer,
)
from server.shared import SharedFiles, load_key
from server.signing import SigningKeys, write_private
from server.store.sqlite import SqliteOutbox, SqliteStore

if TYPE_CHECKING:
    # Imported where a PostgreSQL store is opened, never by a SQLite coordinator: psycopg and
    # its pool are about a tenth of every start's CPU (docs/performance.md, "Coordinator
    # start"). Hence `isinstance(store, SqliteStore)` below, never the PostgreSQL class.
    from server.store.postgres import PostgresOutbox, PostgresStore

log = logging.getLogger(__name__)
# How often a replica reports itself running (FleetService.REPLICA_ALIVE: taken as gone).
REPLICA_REPORT = timedelta(seconds=10)

# What the coordinator may send: operators get pages of at most a few thousand items; agents
# get snapshots (the agent accepts up to 4 MiB). What it receives: `max_message_bytes` (1 MiB)
# from operators, MAX_AGENT_MESSAGE (64 KiB) on the agent port.
OPERATOR_MAX_SEND = 16 * 1024 * 1024
AGENT_MAX_SEND = 4 * 1024 * 1024

SERVICES = [
    access_pb2.DESCRIPTOR.services_by_name["Access"].full_name,
    agents_pb2.DESCRIPTOR.services_by_name["Agents"].full_name,
    policy_pb2.DESCRIPTOR.services_by_name["Policy"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["Audit"].full_name,
    identity_pb2.DESCRIPTOR.services_by_name["Identity"].full_name,
    agentlink_pb2.DESCRIPTOR.services_by_name["AgentLink"].full_name,
    locks_pb2.DESCRIPTOR.services_by_name["Locks"].full_name,
    breakglass_pb2.DESCRIPTOR.services_by_name["Breakglass"].full_name,
    notify_pb2.DESCRIPTOR.services_by_name["Notify"].full_name,
    mesh_pb2.DESCRIPTOR.services_by_name["Mesh"].full_name,
]
OPERATOR_SERVICES = [name for name in SERVICES if not name.endswith(".AgentLink")]
DB_NAME = "coordinator.db"
# How often health probes the store, and how long a probe may take before it counts as down.
STORE_PROBE_EVERY = 2.0
STORE_PROBE_TIMEOUT = 5.0
LOCK_NAME = "coordinator.lock"

__all__ = ["Coordinator", "DevDataError", "DirectoryBusy", "build", "lock_data_dir", "open_store"]


@dataclass
class Coordinator:
    """A running coordinator: its parts, and the port it listens on."""

    config: CoordinatorConfig
    store: SqliteStore | PostgresStore
    server: grpc.aio.Server
    port: int
    registry: LinkRegistry
    expirer: Expirer
    identity: IdentityService
    fleet: FleetService
    policy: PolicyService
    health: Any
    epoch: int
    keys: SigningKeys
    checkpoints: Checkpoints | None = None
    ca: InternalCA | None = None
    # Where AgentLink requires a client certificate (the main port without TLS).
    agent_port: int = 0
    clock: Clock = field(default_factory=SystemClock)
    # The mTLS agent port's own server (TLS only; else agents share `server`).
    agent_server: grpc.aio.Server | None = None
    access: AccessService | None = None
    replica: str = ""
    shared: SharedFiles | None = None
    started_at: datetime | None = None
    sender: Sender | None = None
    receivers: ReceiverService | None = None
    # Slack's interaction endpoint, when configured: its socket (bound at build) and app.
    slack_socket: Any = None
    slack_app: Any = None
    http: httpx.AsyncClient | None = None
    warnings: ExpiryWarnings | None = None
    retention: CommandLogRetention | None = None
    # Finishes whole-fleet lock handouts a stopped coordinator left half-way.
    locks: LockService | None = None
    # OpenTelemetry (server/tracing.Tracing) when `otel` is on: flushed and closed by stop().
    tracing: Any = None

    @property
    def slack_port(self) -> int:
        return int(self.slack_socket.getsockname()[1]) if self.slack_socket is not None else 0

    # The exclusive lock on the data directory (jitmesh.pidlock), released by stop().
    lock_fd: int = -1
    hub: Hub = field(default_factory=Hub)
    # Rate limiters by name ("requests", "enroll_peer", "enroll_overall"), for the metrics.
    limiters: dict[str, Limiter] = field(default_factory=dict)

    def rate_limit_refusals(self) -> dict[str, int]:
        return {name: limiter.refused for name, limiter in self.limiters.items()}

    _stopped: bool = field(default=False, init=False)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def run(self) -> None:
        """Serve until cancelled; then stop accepting calls and close streams and the store."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.expirer.run())
                if self.sender is not None:
                    tg.create_task(self.sender.run())
                if self.warnings is not None:
                    tg.create_task(self.warnings.run())
                if self.slack_app is not None:
                    from server.notify.http import serve

                    tg.create_task(serve(self.slack_app, self.slack_socket))
                if self.checkpoints is not None:
                    tg.create_task(
                        self.checkpoints.run(
                            self.clock, self.config.checkpoint_interval.total_seconds()
                        )
                    )
                if self.retention is not None:
                    tg.create_task(self.retention.run())
                if self.locks is not None:
                    tg.create_task(self.locks.run())
                tg.create_task(self._until_terminated())
                tg.create_task(self._report_running())
                if not isinstance(self.store, SqliteStore):
                    changed = self.hub.audit_advanced
                    tg.create_task(self.store.listen(self.registry.wake, changed))
                if self.shared is not None:
                    tg.create_task(self.shared.run(self.clock, self._shared_changed))
                tg.create_task(self._watch_store())
                if isinstance(self.store, SqliteStore):
                    tg.create_task(self.store.truncate_when_idle(self.clock))
        finally:
            await self.stop()

    async def _watch_store(self) -> None:
        """Health tells the truth: NOT_SERVING (every service, and "") while the store does not
        answer a read within STORE_PROBE_TIMEOUT, SERVING again once it does."""
        serving = True
        while True:
            try:
                async with asyncio.timeout(STORE_PROBE_TIMEOUT):
                    await self.store.get_meta("epoch")
                healthy = True
            except Exception as exc:  # any failure of the store is "not serving"
                healthy = False
                if serving:
                    log.error(
                        "store did not answer (unreachable or saturated); health NOT_SERVING: %s",
                        type(exc).__name__,
                    )
            if healthy != serving:
                serving = healthy
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if healthy
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                for name in [*SERVICES, ""]:
                    await self.health.set(name, status)
                if healthy:
                    log.info("store reachable again; health SERVING")
            await asyncio.sleep(STORE_PROBE_EVERY)

    async def _until_terminated(self) -> None:
        # grpc.aio's wait_for_termination() awaits the server's own shutdown future without a
        # shield: cancelling it cancels that future, and stop() then fails with CancelledError
        # and leaves the server half shut down (the process hangs at exit).
        await asyncio.shield(self.server.wait_for_termination())

    async def _report_running(self) -> None:
        """Tell the other replicas (and `jitctl agent list`) this one runs."""
        started_at = self.started_at or self.clock.now()
        while True:
            await self.clock.sleep(REPLICA_REPORT.total_seconds())
            try:
                await self.store.replica_seen(
                    self.replica, self.address, __version__, started_at, self.clock.now()
                )
            except Exception as exc:  # the store is down for a moment: report again later
                log.warning("cannot report this replica as running: %s", exc)

    def _shared_changed(self, names: list[str]) -> None:
        if "signing_keys.json" in names:
            self.keys.reload()
            # Agents learn the new key list from their next Welcome.
            self.registry.close_all("signing keys changed on another replica; reconnect")

    async def rotate_signing_key(self, *, compromised: bool = False) -> str:
        """A new command-signing key from now on. Agents are reconnected so their next Welcome
        announces it (signed by the key they trust); their leases, and so their grants, stay.
        With replicas, the others take the new keys from the store within a few seconds.
        `compromised`: the current key leaked (`breakglass.rotate_compromised`)."""
        if compromised:
            done = await breakglass.rotate_compromised(
                self.store, self.hub, self.keys, "rotate-signing-key", self.clock.now()
            )
            key_id = done.new
        else:
            key_id = self.keys.rotate(self.clock.now())
        if self.shared is not None:
            await self.shared.push("signing_keys.json", self.clock)
        self.registry.close_all("signing key rotated; reconnect")
        return key_id

    async def stop(self) -> None:
        """Stop serving and close the store; a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        # From the moment shutdown begins, health says NOT_SERVING (and stays so): load
        # balancers and systemd stop sending work before the ports close.
        await self.health.enter_graceful_shutdown()
        self.registry.close_all("coordinator shutting down")
        if self.agent_server is not None:
            await asyncio.gather(self.server.stop(grace=1.0), self.agent_server.stop(grace=1.0))
        else:
            await self.server.stop(grace=1.0)
        if self.checkpoints is not None:
            await self.checkpoints.append(self.clock.now())
        if self.slack_socket is not None:
            self.slack_socket.close()
        if self.http is not None:
            await self.http.aclose()
        try:
            # Off the list of running replicas at once (`jitctl status`), not 30 s later.
            await self.store.replica_stopped(self.replica)
        except Exception as exc:  # the store is away: the others stop counting it in 30 s
            log.warning("cannot record this replica as stopped: %s", type(exc).__name__)
        await self.store.close()
        if self.tracing is not None:
            self.tracing.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


# Allocations between young-generation collections (CPython's default: 700); see tune_gc.
GC_YOUNG = 50_000


def tune_gc() -> None:
    """The cyclic garbage collector, set for a server holding thousands of streams: for the
    entry points that run a coordinator (`jitmesh-coordinator`, bench/tlscoord.py), once it is
    built; never in a test's process, which would keep every object of its set-up forever.

    With CPython's defaults the coordinator spent about a quarter of its event loop's time in
    the collector during a fan-out to 1,000 agents (docs/performance.md, "Where the
    coordinator's CPU goes"): every 700 allocations a young collection promoted what was in
    flight at that moment (futures of a group commit, messages being written), so the old
    generation grew with objects that die a moment later, and each full collection walked
    every object of every stream (0.25-0.35 s at 1,000 agents). Everything that exists once
    the coordinator is built (modules, protobuf descriptors, policy, keys) lives as long as the
    process: frozen, no collection walks it again. A larger young generation lets a request's
    and a push's short-lived objects die young. Garbage cycles are still collected, only later:
    at most GC_YOUNG young objects (a few MiB) wait for it."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, middle, old)


async def build(
    config: CoordinatorConfig,
    clock: Clock | None = None,
    *,
    refuse_dev_data: bool = False,
    step: StepHook = no_hook,
    span_exporter: Any = None,
    before_serving: Callable[[Coordinator], Awaitable[None]] | None = None,
) -> Coordinator:
    """Open the store, load the policy, and start the gRPC server (listening, not yet `run`).

    `before_serving` runs on the built coordinator before its ports accept calls and health says
    SERVING: what it makes (dev mode's dev.env) exists once the coordinator reports ready.

    Raises `DirectoryBusy` when another coordinator holds the data directory, and with
    `refuse_dev_data` (`serve`) `DevDataError` before listening when the store still holds dev
    mode's ready-made credentials. `step` is told each step of an approval and an ack
    (`server.domain.steps`: the fault suite's crash points; production passes none)."""
    lock_fd = lock_data_dir(config.data_dir)
    try:
        # Every instant the coordinator makes has the stored precision (whole milliseconds):
        # what a call returns at once equals what a later read returns (issue 10 item 11).
        stored = MillisecondClock(clock or SystemClock())
        coordinator = await _build(
            config, stored, refuse_dev_data, step, span_exporter, before_serving
        )
    except BaseException:
        os.close(lock_fd)
        raise
    coordinator.lock_fd = lock_fd
    return coordinator


def lock_data_dir(data_dir: Path) -> int:
    """The data directory, made private (0700), locked for this process (the lock's fd)."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)
    return lock_directory(data_dir / LOCK_NAME, what="coordinator")


async def open_store(data_dir: Path) -> SqliteStore:
    """The SQLite store in `data_dir`, its files private (0600). SQLite gives the -wal and -shm
    files the database file's mode, so creating that one 0600 first covers all three; files
    made before this rule are tightened."""
    path = data_dir / DB_NAME
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(data_dir / name, 0o600)
    return await SqliteStore.open(path)


async def _build(
    config: CoordinatorConfig,
    clock: Clock,
    refuse_dev: bool,
    step: StepHook,
    span_exporter: Any = None,
    before_serving: Callable[[Coordinator], Awaitable[None]] | None = None,
) -> Coordinator:
    store = await open_store_url(config.store, config.data_dir, config.store_pool_size)
    servers: list[grpc.aio.Server] = []
    try:
        if refuse_dev:
            refuse_dev_data(await dev_credentials(store, clock.now()), str(config.data_dir))
        return await _assemble(config, clock, store, servers, step, span_exporter, before_serving)
    except BaseException:
        # A port already taken, a bad policy file: stop what was made, so the process exits
        # with its message instead of hanging on a half-built gRPC server.
        for server in servers:
            await server.stop(None)
        await store.close()
        raise


async def _assemble(
    config: CoordinatorConfig,
    clock: Clock,
    store: SqliteStore | PostgresStore,
    servers: list[grpc.aio.Server],
    step: StepHook,
    span_exporter: Any = None,
    before_serving: Callable[[Coordinator], Awaitable[None]] | None = None,
) -> Coordinator:
    replica = config.replica or _replica_id(config.data_dir)
    tracing = _tracing(config, replica, span_exporter)
    interceptors: list[Any] = [AccessLog(), MalformedRequests()]
    if tracing is not None:
        # Outermost: the access log line and everything the call logs fall inside its span.
        interceptors.insert(0, tracing.interceptor)
    if tracing is not None:
        store.observe_transaction = tracing.transaction(
            "sqlite" if isinstance(store, SqliteStore) else "postgresql"
        )
    shared: SharedFiles | None = None
    if not isinstance(store, SqliteStore):
        store.replica = replica
        # Signing keys and the CA come from the store before anything opens them.
        shared = SharedFiles(store, config.data_dir, load_key(config.secret_key_file))
        await shared.sync(clock)
    epoch = await _epoch(store)
    hub = Hub()
    registry = LinkRegistry(queue_limit=config.agent_queue_limit)
    # Replicas read the identity generation and the policy version together (one round trip
    # to PostgreSQL for both, shared by the calls that arrive together).
    # SQLite reads the generation inline on the event loop (no wait): nothing to share.
    sqlite = isinstance(store, SqliteStore)
    versions = None if sqlite else StoreVersions(store)
    identity = IdentityService(store, hub, clock, versions, shared_reads=not sqlite)
    initial = config.initial_policy.read_text() if config.initial_policy else config.default_policy
    policy = await PolicyService.load(store, hub, clock, initial, versions=versions)
    expirer = Expirer(store, hub, clock)
    # Grant commands an agent would not get in time are refused (server/domain/delivery.py):
    # never more undelivered than half its stream's queue, so accepted work never cuts it off.
    rates = DeliveryRates()
    undelivered = config.agent_undelivered_limit or config.agent_queue_limit // 2
    gate = DeliveryGate(rates, undelivered, registry.connected)
    readers = Readers(frozenset(config.auditor_groups))
    access = AccessService(
        store,
        registry,
        hub,
        clock,
        policy.current,
        epoch,
        expirer.deadlines_changed,
        # Replicas: a policy applied on another replica is in force here from the next call.
        None if isinstance(store, SqliteStore) else policy.refresh,
        delivery=gate,
        readers=readers,
        step=step,
    )
    expirer.start_due = access.start_scheduled
    keys = SigningKeys.open(config.data_dir, clock.now())
    codes = BreakglassCodec(keys)
    fleet = FleetService(
        store,
        registry,
        hub,
        clock,
        epoch,
        __version__,
        replica,
        rates=rates,
        step=step,
        codes=codes,
    )
    auth = Authenticator(identity)
    checkpoints = Checkpoints(store, keys)
    await checkpoints.import_file(config.data_dir)
    audit = AuditService(store, hub, checkpoints.verified, readers=readers)
    ca = InternalCA.open(config.data_dir, clock.now()) if config.tls else None
    if shared is not None and await shared.claim_missing(clock):
        # Another replica made the store's keys and CA first: use those.
        keys.reload()
        ca = InternalCA.open(config.data_dir, clock.now()) if config.tls else None

    # Operators (and enrolling agents) send small messages; so do agents. Each server has its
    # own limits because gRPC sets them per server, not per port (docs: THREAT_MODEL.md).
    server = grpc.aio.server(
        interceptors=interceptors,
        options=_server_options(config, config.max_message_bytes, OPERATOR_MAX_SEND),
    )
    servers.append(server)
    agent_server: grpc.aio.Server | None = None
    if ca is not None:
        tls = ca.server_tls([config.host, *config.tls_names], clock.now())
        if config.tls_cert is not None and config.tls_key is not None:
            main_pair = (config.tls_key.read_bytes(), config.tls_cert.read_bytes())
        else:
            main_pair = (tls.key_pem, tls.cert_pem)
        # gRPC asks for a client certificate only where it requires one, so agents get their
        # own port (and server, for the 64 KiB message limit); operators and enrolling agents
        # use the main port with server-side TLS.
        port = _listen(
            server.add_secure_port,
            f"{config.host}:{config.port}",
            grpc.ssl_server_credentials([main_pair]),
        )
        agent_server = grpc.aio.server(
            interceptors=interceptors,
            options=_server_options(config, MAX_AGENT_MESSAGE, AGENT_MAX_SEND),
        )
        servers.append(agent_server)
        agent_port = _listen(
            agent_server.add_secure_port,
            f"{config.host}:{config.agent_port}",
            grpc.ssl_server_credentials(
                [(tls.key_pem, tls.cert_pem)],
                root_certificates=tls.ca_pem,
                require_client_auth=True,
            ),
        )
    else:
        port = _listen(server.add_insecure_port, f"{config.host}:{config.port}")
        agent_port = port
    if port == 0 or agent_port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")

    # One HTTP client for the coordinator's own calls out (the IdP's keys, Slack's response_url);
    # closed by stop(). The notify sender has its own, owned by its run(). Made only when one
    # of them is configured: its TLS context (the CA bundle read and parsed) is about 0.1 s of
    # CPU, a twelfth of a start (docs/performance.md, "Coordinator start").
    http: httpx.AsyncClient | None = None

    def http_client() -> httpx.AsyncClient:
        nonlocal http
        if http is None:
            http = httpx.AsyncClient(timeout=10.0)
        return http

    sealer = Sealer.open(config.data_dir)
    outbox: SqliteOutbox | PostgresOutbox
    if isinstance(store, SqliteStore):
        outbox = SqliteOutbox(store)
    else:
        from server.store.postgres import PostgresOutbox

        outbox = PostgresOutbox(store)
    sender = _sender(config, store, outbox, sealer, clock) if config.notify else None
    if sender is not None:
        hub.on_audit.append(sender.wake)
    warnings = None
    if config.notify and config.notify_expiry_warning > timedelta(0):
        # It looks at least every 30 s: a warning is due minutes before the end, so it is not
        # woken by every commit (that would cost the hot paths a query each).
        warnings = ExpiryWarnings(store, hub, clock, config.notify_expiry_warning)
    receivers = ReceiverService(
        store, outbox, clock, sealer.seal, sender.wake if sender is not None else lambda: None
    )
    slack_app = None
    if config.slack_signing_secret_file is not None:
        # Starlette and uvicorn only where Slack's endpoint is served (4 % of a start's CPU).
        from server.notify.http import interactions_app

        slack_app = interactions_app(_slack(config, identity, outbox, access, clock, http_client()))

    def limiter(name: str, rate: float, burst: int) -> Limiter:
        if isinstance(store, SqliteStore):
            return RateLimiter(rate, burst, clock.monotonic)
        # Replicas share each caller's budget: spreading calls over them gains nothing.
        return SharedRateLimiter(name, rate, burst, store, clock)

    limiters: dict[str, Limiter] = {}
    if config.request_rate is not None:
        limiters["requests"] = limiter("requests", config.request_rate, config.request_burst)
    access_servicer = AccessServicer(
        auth, access, hub, limiters.get("requests"), links=Links(config.web_url)
    )
    enroll_limits = None
    if config.enroll_rate is not None:
        enroll_limits = (
            limiter("enroll_peer", config.enroll_rate, config.enroll_burst),
            limiter("enroll_overall", config.enroll_overall_rate, config.enroll_overall_burst),
        )
        limiters["enroll_peer"], limiters["enroll_overall"] = enroll_limits
    agents_servicer = AgentsServicer(
        auth, fleet, keys, ca, agent_port, enroll_limits, config.agent_cert_lifetime
    )
    policy_servicer = PolicyServicer(auth, policy)
    oidc, signin = None, None
    if config.oidc_issuer:
        if not config.oidc_client_id:
            raise ValueError("oidc_issuer needs oidc_client_id (the audience of ID tokens)")
        oidc = OidcVerifier(
            OidcSettings(config.oidc_issuer, config.oidc_client_id, config.oidc_scopes),
            http_client(),
            clock,
        )
        signin = SignInService(
            store,
            SignInRules(
                config.oidc_username_claim, config.oidc_groups_claim, config.oidc_token_ttl
            ),
        )
    identity_servicer = IdentityServicer(auth, TokenService(store, hub, clock), oidc, signin, clock)
    audit_servicer = AuditServicer(auth, audit, checkpoints)
    locks = LockService(store, registry, hub, clock)
    locks_servicer = LocksServicer(auth, locks)
    breakglass_servicer = BreakglassServicer(
        auth, BreakglassService(store, codes, hub, clock, epoch)
    )
    mesh_servicer = MeshServicer(
        auth,
        StatusService(
            store,
            clock,
            epoch,
            registry.count,
            store.audit_head,
            readers,
            replica=replica,
            shared_store=not isinstance(store, SqliteStore),
        ),
        replica,
    )
    notify_servicer = NotifyServicer(auth, receivers)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    # Operators with client certificates call the agent port too.
    for target in (server,) if agent_server is None else (server, agent_server):
        access_pb2_grpc.add_AccessServicer_to_server(access_servicer, target)
        agents_pb2_grpc.add_AgentsServicer_to_server(agents_servicer, target)
        policy_pb2_grpc.add_PolicyServicer_to_server(policy_servicer, target)
        identity_pb2_grpc.add_IdentityServicer_to_server(identity_servicer, target)
        audit_pb2_grpc.add_AuditServicer_to_server(audit_servicer, target)
        locks_pb2_grpc.add_LocksServicer_to_server(locks_servicer, target)
        breakglass_pb2_grpc.add_BreakglassServicer_to_server(breakglass_servicer, target)
        mesh_pb2_grpc.add_MeshServicer_to_server(mesh_servicer, target)
        notify_pb2_grpc.add_NotifyServicer_to_server(notify_servicer, target)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, target)
        # Reflection lists what the port serves: AgentLink only where agents connect.
        served = SERVICES if target is not server or agent_server is None else OPERATOR_SERVICES
        reflection.enable(target, [*served, health.SERVICE_NAME])
    agentlink_pb2_grpc.add_AgentLinkServicer_to_server(
        AgentLinkServicer(
            fleet,
            registry,
            clock,
            keys,
            config.heartbeat,
            require_certificate=ca is not None,
            admission=Admission(
                AdmissionSettings(
                    config.agent_admit_rate, config.agent_admit_burst, config.agent_max_handshakes
                ),
                clock.monotonic(),
            ),
        ),
        server if agent_server is None else agent_server,
    )
    retention = None
    if config.command_log_retention > timedelta(0):
        retention = CommandLogRetention(store, clock, config.command_log_retention)
    started_at = clock.now()
    coordinator = Coordinator(
        config,
        store,
        server,
        port,
        registry,
        expirer,
        identity,
        fleet,
        policy,
        health_servicer,
        epoch,
        keys,
        checkpoints,
        ca,
        agent_port,
        clock,
        agent_server,
        access,
        sender=sender,
        receivers=receivers,
        slack_app=slack_app,
        http=http,
        warnings=warnings,
        retention=retention,
        locks=locks,
        tracing=tracing,
        replica=replica,
        shared=shared,
        started_at=started_at,
        hub=hub,
        limiters=limiters,
    )
    if before_serving is not None:
        # Before the ports accept a call: a port that answers (health's "" service says SERVING
        # from the start) means what this makes exists.
        await before_serving(coordinator)
    await server.start()
    if agent_server is not None:
        await agent_server.start()
    if slack_app is not None:
        from server.notify.http import listen

        # A taken port raises here; _build stops the servers and closes the store.
        coordinator.slack_socket = listen(config.slack_host, config.slack_port)
        log.info(
            "slack interactions endpoint address=http://%s:%d/slack/interactions",
            *coordinator.slack_socket.getsockname()[:2],
        )
    for name in [*SERVICES, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await store.replica_seen(replica, f"{config.host}:{port}", __version__, started_at, started_at)
    log.info(
        "coordinator listening",
        extra={t.ADDRESS: f"{config.host}:{port}", t.EPOCH: epoch, "replica": replica},
    )
    return coordinator


def _tracing(config: CoordinatorConfig, replica: str, exporter: Any) -> Any:
    """The OpenTelemetry part when `otel` is on (server/tracing.py), else None; the extra must
    be installed for it."""
    if not config.otel:
        return None
    try:
        from server.tracing import Tracing
    except ImportError:
        raise ValueError("otel = true needs OpenTelemetry: pip install 'jitmesh[otel]'") from None
    return Tracing(exporter, replica)


def _sender(
    config: CoordinatorConfig,
    store: SqliteStore | PostgresStore,
    outbox: SqliteOutbox | PostgresOutbox,
    sealer: Sealer,
    clock: Clock,
) -> Sender:
    async def labels(agent: str) -> dict[str, str]:
        found = await store.get_agent(agent)
        return found.labels if found is not None else {}

    async def rule_of(request_id: str) -> str:
        found = await store.get_request(request_id)
        return found.rule if found is not None else ""

    policy = RetryPolicy(config.notify_retry_first, config.notify_retry_cap, config.notify_attempts)
    return Sender(
        outbox,
        sealer,
        clock,
        Links(config.web_url),
        labels=labels,
        rule_of=rule_of,
        policy=policy,
        poll=config.notify_poll,
    )


SLACK = Principal("slack")


def _slack(
    config: CoordinatorConfig,
    identity: IdentityService,
    outbox: SqliteOutbox | PostgresOutbox,
    access: AccessService,
    clock: Clock,
    http: httpx.AsyncClient,
) -> SlackInteractions:
    """Slack's clicks, reviewed for the mapped user: that user's own groups decide (a disabled
    or unknown user acts for nobody), and the audit log names both ("bob via slack")."""
    assert config.slack_signing_secret_file is not None
    secret = config.slack_signing_secret_file.read_bytes().strip()

    async def user_for(slack_user: str) -> str | None:
        for spec in await outbox.list_receivers():
            if spec.kind is ReceiverKind.SLACK:
                found = users_map(spec.settings.get("users", "")).get(slack_user)
                if found:
                    return found
        return None

    async def review(user: str, request_id: str, decision: ReviewDecision) -> str:
        # The same delegation a bridge's review-on-behalf token gets over the wire.
        principal = await identity.acting_for(SLACK, user)
        _request, grant = await access.review(principal, request_id, decision, "via Slack")
        if decision is ReviewDecision.DENY:
            return "Denied"
        return "Approved" if grant is not None else "Approval recorded"

    return SlackInteractions(
        secret,
        user_for,
        review,
        http,
        clock,
        response_hosts=config.slack_response_hosts,
    )


async def open_store_url(
    url: str, data_dir: Path, pool_size: int = 10
) -> SqliteStore | PostgresStore:
    """The store `url` names: a PostgreSQL URL, `sqlite:PATH`, or "" for DATA/coordinator.db."""
    if url.startswith(("postgresql://", "postgres://")):
        from server.store.postgres import PostgresStore

        return await PostgresStore.open(url, max_size=pool_size)
    if url.startswith("sqlite:"):
        return await SqliteStore.open(Path(url.removeprefix("sqlite:")))
    if url:
        raise ValueError("--store takes a postgresql:// URL or sqlite:PATH")
    return await open_store(data_dir)


async def _epoch(store: SqliteStore | PostgresStore) -> int:
    """The cluster epoch commands carry (docs/wire.md). A single SQLite coordinator raises it at
    each start (0.1 behaviour); replicas on PostgreSQL share one that only `fence` raises (after
    a restore from a backup), so an agent accepts commands from any of them."""

    async def work(tx: Tx) -> int:
        current = int(await tx.get_meta("epoch") or "0")
        epoch = current + 1 if isinstance(store, SqliteStore) or current == 0 else current
        if epoch != current:
            await tx.set_meta("epoch", str(epoch))
        return epoch

    return await store.write(work)


def _replica_id(data_dir: Path) -> str:
    """This replica's id, made once and kept in its data directory (stable across restarts)."""
    path = data_dir / "replica.id"
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        made = f"{socket.gethostname().split('.')[0][:40]}-{secrets.token_hex(3)}"
        write_private(path, made + "\n")
        return made


def _listen(add_port: Callable[..., int], address: str, *credentials: Any) -> int:
    """Bind one port; an address already taken (another coordinator) is one clear OSError."""
    try:
        port = add_port(address, *credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(
            f"cannot listen on {address}: the address is in use (another coordinator?) or "
            "not available on this host"
        )
    return port


def _server_options(
    config: CoordinatorConfig, max_receive: int, max_send: int
) -> list[tuple[str, int]]:
    keepalive_ms = int(config.keepalive.total_seconds() * 1000)
    return [
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout.total_seconds() * 1000)),
        ("grpc.http2.ping_timeout_ms", int(config.keepalive_timeout.total_seconds() * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Agents ping as often as every second in tests; do not punish them for it.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.max_receive_message_length", max_receive),
        ("grpc.max_send_message_length", max_send),
        # Thousands of agents reconnect at once after a restart: let them queue.
        ("grpc.server.max_pending_requests", 20000),
        # gRPC sets SO_REUSEPORT by default: a second coordinator on the same port would start
        # and take half the calls. Off, the second one fails with "address in use".
        ("grpc.so_reuseport", 0),
    ]
