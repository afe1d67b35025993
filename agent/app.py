"""Composition root: builds the store, enforcers, engine and link, and runs them.

Start-up order: open and migrate the store; end what expired while the agent was down; reconcile
the enforcers with the table; only then connect. Everything then runs under one TaskGroup until
`stop` is set or the task is cancelled; the lease table stays as it is for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import stat
import uuid
from collections.abc import Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from agent.config import (
    AgentConfig,
    ExecEnforcerConfig,
    FileEnforcerConfig,
    GroupEnforcerConfig,
    SshEnforcerConfig,
    SudoEnforcerConfig,
)
from agent.domain import breakglass
from agent.domain.coverage import DriftMode
from agent.domain.errors import AgentError, EnrollmentError, StateError
from agent.domain.leases import EventKind, new_event
from agent.domain.steps import StepHook, no_hook
from agent.enforcers.base import Enforcer, EnforcerSet
from agent.enforcers.file import FileEnforcer
from agent.engine import Engine
from agent.identity import IdentityFile
from agent.local.breakglass import BreakglassDesk
from agent.local.protocol import SOCKET_NAME
from agent.local.server import LocalServer
from agent.local.sessions import EndSessions, Sessions
from agent.rpc.link import Link, LinkSettings
from agent.store.credential import CredentialFile
from agent.store.keys import BREAKGLASS_KEYS_NAME, BreakglassKeys, PinnedKeys
from agent.store.migrate import migrate_isolated
from agent.store.sqlite import SqliteLeaseStore
from jitmesh import sdnotify
from jitmesh.clock import Clock, SystemClock, to_ms

log = logging.getLogger(__name__)

CREDENTIAL_NAME = "credential"
STATE_DIR_MODE = 0o711
KEYS_NAME = "signing_keys.json"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


T = TypeVar("T")


class _Stopped(Exception):
    pass


async def run(
    config: AgentConfig,
    *,
    clock: Clock | None = None,
    pacing: Clock | None = None,
    stop: asyncio.Event | None = None,
    rand: Callable[[], float] = random.random,
    step: StepHook = no_hook,
) -> None:
    """Run the agent until `stop` is set (or the task is cancelled).

    `clock` decides lease time and stamps messages; `pacing` times reconnect backoff and
    heartbeats (tests give leases a fake clock and the network a real one). `step` is told each
    step of an apply and a revoke (the fault suite's crash points). Both are given here, by
    the caller, and never read from the environment.
    """
    clock = clock or SystemClock()
    pacing = pacing or clock
    state_dir = prepare_state_dir(config.state_dir)
    credentials = CredentialFile(state_dir / CREDENTIAL_NAME)
    join_token = config.join_token_value()
    enrolled = (
        IdentityFile(state_dir / "tls_identity.json").read()
        if config.ca_file
        else credentials.read()
    )
    if enrolled is None and not join_token:
        raise EnrollmentError(
            "no credential in the state directory and no join token: "
            "pass --join-token or set JITMESH_JOIN_TOKEN"
        )
    # Pending migrations run in a child process: yoyo never stays resident in the agent. A stop
    # (SIGTERM) while it runs ends the wait at once, and the child with it.
    opening = SqliteLeaseStore.open_or_recover(
        state_dir, now_ms=to_ms(clock.now()), migrations=migrate_isolated
    )
    try:
        store, moved_aside = await _unless_stopped(opening, stop)
    except _Stopped:
        log.info("agent stopped before it started")
        return
    try:
        boot_id = read_boot_id()
        await store.claim(config.name, boot_id)
        engine = Engine(
            name=config.name,
            store=store,
            enforcers=EnforcerSet(
                build_enforcers(config, clock),
                drift=[DriftMode(spec.drift) for spec in config.enforcers],
            ),
            clock=clock,
            rand=rand,
            remove_retries=config.remove_retries,
            remove_retry_base=config.remove_retry_base,
            skew_tolerance=timedelta(seconds=config.skew_tolerance),
            reconcile_every=config.reconcile_every,
            lease_retention=timedelta(seconds=config.lease_retention),
            step=step,
        )
        if moved_aside:
            # Fail closed: with an empty table the start-up reconcile removes every access the
            # enforcers observe; the coordinator then sends a snapshot (Hello says seq 0).
            log.error("lease table unreadable: moved aside", extra={"error": moved_aside})
            await store.add_event(
                new_event(
                    EventKind.STATE_MOVED_ASIDE, at=clock.now(), details={"error": moved_aside}
                )
            )
        await engine.start()
        breakglass_keys = BreakglassKeys(state_dir / BREAKGLASS_KEYS_NAME)
        link = Link(
            LinkSettings(
                target=config.coordinator,
                name=config.name,
                labels=dict(config.labels),
                join_token=join_token,
                ca_pem=config.ca_file.read_bytes() if config.ca_file else None,
                version=agent_version(),
                boot_id=boot_id,
                backoff_base=config.backoff_base,
                backoff_cap=config.backoff_cap,
                backoff_reset_after=config.backoff_reset_after,
                heartbeat=config.heartbeat,
                keepalive_time=config.keepalive_time,
                keepalive_timeout=config.keepalive_timeout,
                welcome_timeout=config.welcome_timeout,
            ),
            engine=engine,
            credentials=credentials,
            keys=PinnedKeys(state_dir / KEYS_NAME),
            breakglass_keys=breakglass_keys,
            clock=clock,
            pacing=pacing,
            rand=rand,
        )
        sessions = Sessions(
            clock=clock,
            audit=engine.audit,
            holds_any=engine.holds_any,
            grace=config.exec_grace,
            end=EndSessions(config.end_sessions),
        )
        engine.on_access_removed(sessions.removed)
        pinned = PinnedKeys(state_dir / KEYS_NAME)

        def code_keys() -> dict[str, bytes]:
            # Read at each use (a Welcome may have changed either file since), against the
            # engine's time: never behind the coordinator's, never going back.
            return breakglass.code_keys(pinned.read(), breakglass_keys.read(), engine.now())

        local = LocalServer(
            state_dir=state_dir,
            name=config.name,
            engine=engine,
            sessions=sessions,
            clock=clock,
            breakglass=BreakglassDesk(engine, code_keys, timedelta(seconds=config.breakglass_max)),
        )
        tighten_state_files(state_dir)
        log.info("agent started", extra={"state_dir": str(state_dir)})
        # The lease table is reconciled with the host: systemd may count us as started.
        sdnotify.ready(f"agent {config.name} started")
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(engine.run())
                tasks.create_task(store.run_checkpoints())
                tasks.create_task(sessions.run())
                tasks.create_task(local.run())
                tasks.create_task(link.run())
                if stop is not None:
                    tasks.create_task(_until(stop))
                if config.watchdog:
                    tasks.create_task(sdnotify.watchdog())
                if config.metrics_listen:
                    # Imported only here: without metrics the agent never loads the exporter.
                    from agent.metrics import AgentMetrics

                    metrics = AgentMetrics(store, engine, clock, config.metrics_listen)
                    tasks.create_task(metrics.run())
        except BaseExceptionGroup as group:
            _reraise(group)
        finally:
            await engine.checkpoint()
        log.info("agent stopped")
    finally:
        store.close()


def build_enforcers(config: AgentConfig, clock: Clock) -> list[Enforcer]:
    enforcers: list[Enforcer] = []
    for spec in config.enforcers:
        if isinstance(spec, FileEnforcerConfig):
            enforcers.append(FileEnforcer(spec.directory, clock=clock))
        elif isinstance(spec, ExecEnforcerConfig):
            # Imported only when configured (subprocess machinery the file enforcer never needs).
            from agent.enforcers.exec import ExecEnforcer, Hooks

            hooks = Hooks(
                apply=spec.hooks.apply,
                remove=spec.hooks.remove,
                observe=spec.hooks.observe,
                timeout=spec.hooks.timeout,
                env=dict(spec.hooks.env),
            )
            enforcers.append(ExecEnforcer(hooks, name=f"exec:{spec.path.name}"))
        elif isinstance(spec, SudoEnforcerConfig):
            from agent.enforcers.sudo import SudoEnforcer

            enforcers.append(SudoEnforcer(spec.settings))
        elif isinstance(spec, GroupEnforcerConfig):
            from agent.enforcers.group import GroupEnforcer

            enforcers.append(GroupEnforcer(spec.settings))
        elif isinstance(spec, SshEnforcerConfig):
            from agent.enforcers.ssh import SshEnforcer

            enforcers.append(SshEnforcer(spec.settings))
    if not enforcers:
        log.warning("no enforcers: leases are tracked and answer `check`, nothing else")
    return enforcers


def prepare_state_dir(path: Path) -> Path:
    """The state directory holds the credential: 0711, so that local users can reach the agent's
    socket by its name but list and read nothing (every file in it is 0600: see
    `tighten_state_files`)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != STATE_DIR_MODE:
            os.chmod(path, STATE_DIR_MODE)
        tighten_state_files(path)
    except OSError as exc:
        raise StateError(f"cannot prepare the state directory ({exc.strerror})") from None
    return path


def tighten_state_files(path: Path) -> None:
    """Every file in the state directory but the socket is the agent's alone (SQLite makes its
    -wal and -shm files with the database's mode)."""
    for entry in os.scandir(path):
        if entry.name == SOCKET_NAME or not entry.is_file(follow_symlinks=False):
            continue
        if stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode) & 0o077:
            os.chmod(entry.path, 0o600)


def read_boot_id() -> str:
    try:
        return BOOT_ID.read_text(encoding="ascii").strip()
    except OSError:
        # No boot id on this system: a fresh id per start is the safe approximation (the
        # coordinator then treats every start like a reboot).
        return f"start-{uuid.uuid4()}"


def agent_version() -> str:
    # The package's own constant (pyproject.toml reads its version from it): importlib.metadata
    # would cost 1.5 MiB of resident memory for this one string (docs/performance.md).
    from jitmesh import __version__

    return __version__


async def _unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event | None) -> T:
    """`work`'s result, or _Stopped (with `work` cancelled) as soon as `stop` is set."""
    if stop is None:
        return await work
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            # Its clean-up (killing the migration child, releasing the lock) finishes first.
            await asyncio.wait((task,))
    if task.cancelled():
        raise _Stopped()
    return task.result()


async def _until(stop: asyncio.Event) -> None:
    await stop.wait()
    raise _Stopped()


def _reraise(group: BaseExceptionGroup[BaseException]) -> None:
    """A stop request ends the agent normally; a lone agent error surfaces as itself."""
    _, rest = group.split(_Stopped)
    if rest is None:
        return
    errors = rest.exceptions
    if len(errors) == 1 and isinstance(errors[0], AgentError):
        raise errors[0]
    raise rest
