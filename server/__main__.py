"""jitmesh-coordinator: flags, configuration and logging; everything else is in app.py."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from jitmesh import __version__, grpclog, logs, sdnotify
from jitmesh.clock import Clock, SystemClock
from jitmesh.pidlock import DirectoryBusy
from server.config import CoordinatorConfig
from server.domain.bootstrap import DevDataError
from server.domain.models import ADMIN_GROUP, Principal, new_secret, user_name
from server.domain.policy import DEV_POLICY
from server.domain.ports import Tx
from server.domain.steps import StepHook, no_hook
from server.settings import (
    FLAG_NAMES,
    CoordinatorSettings,
    SettingsError,
    split_listen,
)
from server.settings import load as load_settings
from server.shared import SecretKeyError

if TYPE_CHECKING:
    # server.app imports grpc: the commands import it only after choosing gRPC's own logging
    # (jitmesh.grpclog), which its core reads at that first import.
    from collections.abc import Sequence
    from datetime import datetime

    from server.app import Coordinator
    from server.domain.breakglass import Voided
    from server.domain.ports import Store
    from server.signing import SigningKeys

log = logging.getLogger("jitmesh.coordinator")

DEV_USERS = {
    "alice": ["developers"],
    "bob": ["sre"],
    "carol": ["sre"],
    "admin": [ADMIN_GROUP],
}


SETTINGS_EPILOG = (
    "Every setting can also come from the TOML file given with --config (key log_level) or "
    "from the environment (JITMESH_LOG_LEVEL); flags win over the environment, which wins "
    "over the file. Durations are written as 10s, 15m or 1h30m."
)


def add_settings_flags(p: argparse.ArgumentParser) -> None:
    """One flag per setting, named after it. Defaults are SUPPRESSed so that only flags really
    given reach the settings (a default here would hide the file's and the environment's)."""
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings as TOML (secrets masked) and exit",
    )
    for name, info in CoordinatorSettings.model_fields.items():
        flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        default = info.get_default(call_default_factory=True)
        shown = "" if default in (None, (), False) else f" (default: {_shown(default)})"
        help_text = (info.description or name.replace("_", " ")) + shown
        if info.annotation is bool:
            p.add_argument(
                flag, dest=name, action="store_const", const=True, default=argparse.SUPPRESS,
                help=help_text,
            )  # fmt: skip
        elif name == "tls_names":
            p.add_argument(
                flag, dest=name, action="append", default=argparse.SUPPRESS, metavar="NAME",
                help="extra DNS name or IP for the coordinator's certificate (repeatable)",
            )  # fmt: skip
        elif name == "auditor_groups":
            p.add_argument(
                flag, dest=name, action="append", default=argparse.SUPPRESS, metavar="GROUP",
                help=f"{info.description} (repeatable)",
            )  # fmt: skip
        else:
            p.add_argument(
                flag, dest=name, default=argparse.SUPPRESS, metavar=name.split("_")[-1].upper(),
                help=help_text,
            )  # fmt: skip


def _shown(value: object) -> str:
    from datetime import timedelta

    from jitmesh.durations import format_duration

    return format_duration(value) if isinstance(value, timedelta) else str(value)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jitmesh-coordinator", description="jitmesh coordinator")
    sub = p.add_subparsers(dest="command", required=True)
    rotate = sub.add_parser(
        "rotate-signing-key",
        help="make a new command-signing key (run while the coordinator is stopped); the old "
        "one stays valid for a day and agents adopt the new one when they reconnect",
    )
    rotate.add_argument("--data", type=Path, required=True, help="data directory")
    rotate.add_argument(
        "--store",
        default="",
        help="replicas on postgresql://...: rotate the shared keys (while they run: each loads "
        "the new key within seconds and reconnects its agents)",
    )
    rotate.add_argument("--secret-key-file", type=Path, help="else JITMESH_SECRET_KEY")
    rotate.add_argument(
        "--compromised",
        action="store_true",
        help="the current key leaked: trust it for nothing from now on (no overlap; never "
        "announced for break-glass codes) and void the unused break-glass codes it signed; "
        "agents that pinned only it must enroll again",
    )
    retire = sub.add_parser(
        "retire-dev",
        help="revoke (and audit) the ready-made tokens and the reusable join token that 'dev' "
        "made in a data directory, so that 'serve' can use it (run while it is stopped)",
    )
    retire.add_argument("--data", type=Path, required=True, help="data directory")
    rotate_admin = sub.add_parser(
        "rotate-admin-token",
        help="replace the bootstrap admin token (DATA/admin.token): the old one is revoked, the "
        "new one expires after --ttl (run while the coordinator is stopped)",
    )
    rotate_admin.add_argument("--data", type=Path, required=True, help="data directory")
    rotate_admin.add_argument(
        "--ttl", default="24h", help="lifetime of the new token, e.g. 24h, 7d (default 24h)"
    )
    issue = sub.add_parser(
        "issue-operator-cert",
        help="sign an operator's CSR with the internal CA (jitmesh://user/NAME); the operator "
        "then calls the mTLS (agent) port with it, no token needed",
    )
    issue.add_argument("--data", type=Path, required=True, help="data directory")
    issue.add_argument("--user", required=True)
    issue.add_argument("--csr", type=Path, required=True, help="PEM CSR for an ECDSA P-256 key")
    migrate = sub.add_parser(
        "migrate",
        help="bring the store to the newest schema and exit (serve also does this at start)",
    )
    _store_flags(migrate, data_required=False)
    sub.add_parser(
        "new-secret-key",
        help="print a new key for --secret-key-file / JITMESH_SECRET_KEY (replicas on "
        "PostgreSQL encrypt their shared signing keys and CA with it)",
    )
    move = sub.add_parser(
        "migrate-store",
        help="copy a SQLite installation into an empty PostgreSQL store (coordinator stopped), "
        "then verify the audit chain there",
    )
    move.add_argument("--from", dest="source", required=True, help="sqlite:PATH")
    move.add_argument("--to", dest="target", required=True, help="postgresql://...")
    move.add_argument(
        "--data", type=Path, help="the SQLite coordinator's data directory: its signing keys and "
        "CA are uploaded (encrypted) for the replicas",
    )  # fmt: skip
    move.add_argument("--secret-key-file", type=Path, help="else JITMESH_SECRET_KEY")
    fence = sub.add_parser(
        "fence",
        help="raise the cluster epoch (after restoring the store from a backup): agents then "
        "refuse every command signed from the older history",
    )
    _store_flags(fence, data_required=False)
    for name, text in (
        ("serve", "run a coordinator"),
        ("dev", "run a development coordinator on loopback with ready-made users and tokens"),
    ):
        add_settings_flags(sub.add_parser(name, help=text, epilog=SETTINGS_EPILOG))
    return p


def _store_flags(p: argparse.ArgumentParser, *, data_required: bool) -> None:
    p.add_argument("--data", type=Path, required=data_required, help="data directory (SQLite)")
    p.add_argument("--store", default="", help="postgresql://... (else SQLite in --data)")


def main(
    argv: list[str] | None = None, *, step: StepHook = no_hook, clock: Clock | None = None
) -> int:
    """The command line. `step` and `clock` reach `server.app.build` (test launchers pass a
    crash point, or a wall clock they move); no flag or environment variable sets either."""
    args = parser().parse_args(argv)
    if args.command == "new-secret-key":
        from server.shared import new_key

        print(new_key())
        return 0
    if args.command == "migrate-store":
        import psycopg

        from server.store.postgres.importer import StoreImportError

        try:
            return asyncio.run(
                _migrate_store(args.source, args.target, args.data, args.secret_key_file)
            )
        except (OSError, ValueError, SecretKeyError, StoreImportError, psycopg.Error) as exc:
            print(f"jitmesh-coordinator: {exc}", file=sys.stderr)
            return 1
    if args.command in ("migrate", "fence"):
        if not args.store and args.data is None:
            print(
                "jitmesh-coordinator: give --store postgresql://... or --data DIR", file=sys.stderr
            )
            return 2
        try:
            return asyncio.run(_store_command(args.command, args.store, args.data))
        except (OSError, ValueError) as exc:
            print(f"jitmesh-coordinator: {exc}", file=sys.stderr)
            return 1
    if args.command == "issue-operator-cert":
        from datetime import UTC, datetime

        from jitmesh import validation
        from server.ca import CertificateError, InternalCA

        user = user_name(args.user)
        if not validation.SUBJECT.fullmatch(user):
            print("jitmesh-coordinator: --user is not a valid user name", file=sys.stderr)
            return 2
        now = datetime.now(UTC)
        try:
            issued = InternalCA.open(args.data, now).sign_user_csr(args.csr.read_bytes(), user, now)
        except (OSError, CertificateError) as exc:
            print(f"jitmesh-coordinator: {exc}", file=sys.stderr)
            return 1
        sys.stdout.write(issued.pem.decode())
        # What `jitctl cert revoke` takes, should the certificate need to be refused.
        print(f"issued certificate for {user} serial={issued.serial:x}", file=sys.stderr)
        return 0
    if args.command in ("retire-dev", "rotate-admin-token"):
        try:
            return asyncio.run(_maintain(args))
        except (OSError, DirectoryBusy) as exc:
            print(f"jitmesh-coordinator: {exc}", file=sys.stderr)
            return 1
    if args.command == "rotate-signing-key":
        from datetime import UTC, datetime

        from server.signing import SigningKeys

        if args.store:
            import psycopg

            args.data.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                key_id = asyncio.run(
                    _rotate_shared(
                        args.store, args.data, args.secret_key_file, compromised=args.compromised
                    )
                )
            except (OSError, ValueError, SecretKeyError, psycopg.Error) as exc:
                print(f"jitmesh-coordinator: {exc}", file=sys.stderr)
                return 1
        elif args.compromised:
            try:
                key_id = asyncio.run(_rotate_compromised_local(args.data))
            except (OSError, DirectoryBusy) as exc:
                print(f"jitmesh-coordinator: {exc}", file=sys.stderr)
                return 1
        else:
            now = datetime.now(UTC)
            key_id = SigningKeys.open(args.data, now).rotate(now)
        print(f"new signing key {key_id}")
        return 0
    flags = {
        k: v
        for k, v in vars(args).items()
        if k in CoordinatorSettings.model_fields and v is not None
    }
    try:
        settings = load_settings(args.config, flags)
        if settings.data is None:
            raise SettingsError("--data / JITMESH_DATA / data: is required")
        config = coordinator_config(settings, dev=args.command == "dev")
    except SettingsError as exc:
        print(f"jitmesh-coordinator: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import tomli_w

        sys.stdout.write(tomli_w.dumps(settings.masked()))
        return 0
    try:
        admin_token = _secret(settings.admin_token_file, "admin_token_file")
    except SettingsError as exc:
        print(f"jitmesh-coordinator: {exc}", file=sys.stderr)
        return 2
    # Before grpc is imported (by server.app): gRPC's own lines become our log records, and
    # with TLS each failed handshake is logged with its peer (jitmesh/grpclog.py).
    grpclog.capture(handshakes=log if config.tls else None)
    try:
        logs.setup(
            settings.log_level,
            settings.log_format,
            target=settings.log_target,
            syslog_address=settings.syslog_address,
            ident="jitmesh-coordinator",
        )
    except logs.LogTargetError as exc:
        print(f"jitmesh-coordinator: {exc}", file=sys.stderr)
        return 2
    serving = _serve(
        config,
        settings,
        dev=args.command == "dev",
        reload=(args.config, flags),
        admin_token=admin_token,
        step=step,
        clock=clock,
    )
    try:
        asyncio.run(serving)
    except KeyboardInterrupt:
        pass
    except _serve_errors() as exc:
        print(f"jitmesh-coordinator: {exc}", file=sys.stderr)
        return 1
    return 0


def _serve_errors() -> tuple[type[Exception], ...]:
    """What ends `serve` and `dev` with its message rather than a traceback. psycopg's errors
    only once the PostgreSQL store was opened (only then can one be raised): Python evaluates
    an `except` clause when an exception reaches it, so a SQLite coordinator never imports
    psycopg (about a tenth of its start's CPU; docs/performance.md, "Coordinator start")."""
    errors = (OSError, ValueError, SecretKeyError, DirectoryBusy, DevDataError)
    psycopg = sys.modules.get("psycopg")
    return errors if psycopg is None else (*errors, psycopg.Error)


async def _rotate_compromised_local(data: Path) -> str:
    """`rotate-signing-key --compromised` beside a SQLite store: under the data directory's lock
    (so never beside a running coordinator)."""
    from jitmesh.clock import SystemClock
    from server.app import lock_data_dir, open_store
    from server.signing import SigningKeys

    clock = SystemClock()
    lock_fd = lock_data_dir(data)
    try:
        keys = SigningKeys.open(data, clock.now())
        if not (data / "coordinator.db").exists():
            # No store: no code was ever issued.
            _print_voided(keys.current()[0], [])
            return keys.rotate(clock.now(), compromised=True)
        store = await open_store(data)
        try:
            return await _rotate_compromised(store, keys, clock.now())
        finally:
            await store.close()
    finally:
        os.close(lock_fd)


async def _rotate_compromised(store: Store, keys: SigningKeys, now: datetime) -> str:
    from server.domain import breakglass
    from server.domain.hub import Hub

    done = await breakglass.rotate_compromised(store, Hub(), keys, "rotate-signing-key", now)
    _print_voided(done.leaked, done.voided)
    return done.new


def _print_voided(leaked: str, voided: Sequence[Voided]) -> None:
    agents = sorted({v.agent for v in voided})
    print(f"compromised key {leaked}: trusted from now on for old audit checkpoints only")
    print(
        f"voided {len(voided)} unused break-glass code(s) it signed (audited breakglass.voided), "
        f"on {len(agents)} agent(s): {', '.join(agents) or 'none'}; issue them new codes"
    )
    print(
        "agents cannot take the new key from a Welcome (only a key they pinned may announce it, "
        "and the leaked one no longer does): every agent whose pinned keys are only the leaked "
        "one (all, unless a rotation less than a day ago left them an older key) refuses the "
        "new key's commands until you enroll it again (a join token)"
    )


async def _rotate_shared(
    store_url: str, data: Path, key_file: Path | None, *, compromised: bool = False
) -> str:
    """Rotate the signing keys the replicas share: take the store's, rotate, upload."""
    from jitmesh.clock import SystemClock
    from server.shared import SharedFiles, load_key
    from server.signing import SigningKeys
    from server.store.postgres import PostgresStore

    clock = SystemClock()
    box = load_key(key_file)
    store = await PostgresStore.open(store_url, min_size=1, max_size=2)
    try:
        shared = SharedFiles(store, data, box)
        await shared.sync(clock)
        keys = SigningKeys.open(data, clock.now())
        if compromised:
            key_id = await _rotate_compromised(store, keys, clock.now())
        else:
            key_id = keys.rotate(clock.now())
        await shared.push("signing_keys.json", clock)
    finally:
        await store.close()
    return key_id


async def _migrate_store(source: str, target: str, data: Path | None, key_file: Path | None) -> int:
    from jitmesh.clock import SystemClock
    from server.shared import SharedFiles, load_key
    from server.store.postgres import PostgresStore, import_sqlite

    if not source.startswith("sqlite:"):
        raise ValueError("--from takes sqlite:PATH")
    if not target.startswith(("postgresql://", "postgres://")):
        raise ValueError("--to takes a postgresql:// URL")
    box = load_key(key_file) if data is not None else None
    done = await import_sqlite(Path(source.removeprefix("sqlite:")), target)
    for table, count in done.rows.items():
        print(f"{table}: {count} rows")
    print(f"audit chain verified: {done.audit_head[0]} events, head {done.audit_head[1][:16]}")
    if data is not None and box is not None:
        store = await PostgresStore.open(target, min_size=1, max_size=2, migrate_now=False)
        try:
            await SharedFiles(store, data, box).claim_missing(SystemClock(), adopt=False)
        finally:
            await store.close()
        print("signing keys and CA uploaded (encrypted)")
    return 0


async def _store_command(command: str, store_url: str, data: Path | None) -> int:
    from server.app import open_store_url

    store = await open_store_url(store_url, data or Path("."))
    try:
        if command == "fence":

            async def raise_epoch(tx: Tx) -> int:
                epoch = int(await tx.get_meta("epoch") or "0") + 1
                await tx.set_meta("epoch", str(epoch))
                return epoch

            print(f"cluster epoch is now {await store.write(raise_epoch)}")
        else:
            print("store schema is up to date")
    finally:
        await store.close()
    return 0


def _secret(path: Path | None, name: str) -> str | None:
    """A secret from a file the operator manages (a systemd credential, a vault agent's file):
    never from the settings file, the environment or a flag, where it would be seen."""
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise SettingsError(f"{name}: cannot read {path}") from None
    if not text:
        raise SettingsError(f"{name}: {path} is empty")
    return text


def coordinator_config(settings: CoordinatorSettings, *, dev: bool) -> CoordinatorConfig:
    """The frozen config the parts are built from. Dev mode: loopback only, no TLS, no limits,
    the dev policy; serve: TLS from the internal CA unless --insecure, rate limits on."""
    assert settings.data is not None
    host, port = split_listen(settings.listen)
    slack_host, slack_port = split_listen(settings.slack_listen)
    common = {
        "data_dir": settings.data,
        "host": host,
        "port": port,
        "heartbeat": settings.heartbeat,
        "keepalive": settings.keepalive,
        "keepalive_timeout": settings.keepalive_timeout,
        "agent_queue_limit": settings.agent_queue_limit,
        "agent_undelivered_limit": settings.agent_undelivered_limit,
        "oidc_issuer": settings.oidc_issuer,
        "oidc_client_id": settings.oidc_client_id,
        "oidc_username_claim": settings.oidc_username_claim,
        "oidc_groups_claim": settings.oidc_groups_claim,
        "oidc_token_ttl": settings.oidc_token_ttl,
        "web_url": settings.web_url,
        "slack_signing_secret_file": settings.slack_signing_secret_file,
        "slack_host": slack_host,
        "slack_port": slack_port,
        "notify_expiry_warning": settings.notify_expiry_warning,
        "store": settings.store,
        "replica": settings.replica,
        "secret_key_file": settings.secret_key_file,
        "auditor_groups": settings.auditor_groups,
        "command_log_retention": settings.command_log_retention,
        "otel": settings.otel,
    }
    try:
        if dev:
            if not _loopback(host):
                raise SettingsError("dev mode listens on loopback only")
            return CoordinatorConfig(**common, default_policy=DEV_POLICY)
        limits = {
            "initial_policy": settings.policy,
            "request_rate": settings.request_rate,
            "request_burst": settings.request_burst,
            "enroll_rate": settings.enroll_rate,
            "enroll_burst": settings.enroll_burst,
            "enroll_overall_rate": settings.enroll_overall_rate,
            "enroll_overall_burst": settings.enroll_overall_burst,
        }
        if settings.insecure:
            return CoordinatorConfig(**common, **limits)
        if (settings.tls_cert is None) != (settings.tls_key is None):
            raise SettingsError("--tls-cert and --tls-key go together")
        agent_port = settings.agent_port
        if agent_port is None:
            agent_port = port + 1 if port else 0
        return CoordinatorConfig(
            **common,
            **limits,
            tls=True,
            tls_cert=settings.tls_cert,
            tls_key=settings.tls_key,
            tls_names=settings.tls_names,
            agent_port=agent_port,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "a setting"
        raise SettingsError(f"{name}: {str(first['msg']).lower()}") from None


async def _maintain(args: argparse.Namespace) -> int:
    """retire-dev and rotate-admin-token: on the store, under the data directory's lock (so
    never beside a running coordinator), every change audited."""
    from datetime import UTC, datetime

    from jitmesh.durations import DurationError, parse_duration
    from server.domain import bootstrap
    from server.domain.fleet import FleetService
    from server.domain.governance import IdentityService, TokenService
    from server.domain.hub import Hub
    from server.rpc.agentlink import LinkRegistry

    ttl = None
    if args.command == "rotate-admin-token":
        try:
            ttl = parse_duration(args.ttl)
        except DurationError as exc:
            print(f"jitmesh-coordinator: --ttl: {exc}", file=sys.stderr)
            return 2
    if not (args.data / "coordinator.db").exists():
        print(f"jitmesh-coordinator: {args.data} holds no coordinator database", file=sys.stderr)
        return 1
    clock = SystemClock()
    grpclog.quiet("ERROR")
    from server.app import lock_data_dir, open_store

    lock_fd = lock_data_dir(args.data)
    try:
        store = await open_store(args.data)
        try:
            hub = Hub()
            tokens = TokenService(store, hub, clock)
            now = datetime.now(UTC)
            if args.command == "retire-dev":
                fleet = FleetService(store, LinkRegistry(), hub, clock, 0, __version__)
                retired = await bootstrap.retire_dev(store, tokens, fleet, now)
                (args.data / "dev.env").unlink(missing_ok=True)
                for line in retired:
                    print(f"retired {line}")
                print(f"{len(retired)} dev credentials retired; dev.env removed")
                return 0
            assert ttl is not None
            token = new_secret("jmt")
            identity = IdentityService(store, hub, clock)
            revoked = await bootstrap.rotate_bootstrap(store, identity, tokens, token, ttl)
            _write_private(args.data / "admin.token", token + "\n")
            print(
                f"new bootstrap admin token in {args.data / 'admin.token'}, expires "
                f"{(now + ttl).isoformat(timespec='seconds').replace('+00:00', 'Z')}; "
                f"revoked: {', '.join(revoked) or 'none'}"
            )
            return 0
        finally:
            await store.close()
    finally:
        os.close(lock_fd)


async def _serve(
    config: CoordinatorConfig,
    settings: CoordinatorSettings,
    *,
    dev: bool,
    reload: tuple[Path | None, dict[str, object]],
    admin_token: str | None = None,
    step: StepHook = no_hook,
    clock: Clock | None = None,
) -> None:
    from server.app import build, tune_gc

    async def credentials(coordinator: Coordinator) -> None:
        if dev:
            await _dev_setup(coordinator)
        else:
            await _bootstrap_admin(coordinator, admin_token)

    # Written before the port serves (dev.env, admin.token): a client that saw the coordinator
    # healthy finds them complete.
    coordinator = await build(
        config, clock, refuse_dev_data=not dev, step=step, before_serving=credentials
    )
    tune_gc()
    if coordinator.ca is not None:
        log.info(
            "TLS from the internal CA",
            extra={
                "ca_file": str(coordinator.ca.directory / "ca.pem"),
                "port": coordinator.agent_port,
            },
        )
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()

    def stop() -> None:
        sdnotify.stopping("shutting down")
        task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(*reload))
    metrics = None
    if settings.metrics_listen:
        from server.metrics import serve_metrics

        metrics = serve_metrics(coordinator, settings.metrics_listen)
    # The store is open and the ports listen: systemd may start what depends on us.
    sdnotify.ready(f"serving on {coordinator.address}")
    try:
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.TaskGroup() as tg:
                helpers = []
                if settings.watchdog:
                    helpers.append(tg.create_task(sdnotify.watchdog()))
                if metrics is not None:
                    helpers.append(tg.create_task(metrics.run()))
                try:
                    await coordinator.run()
                finally:
                    for helper in helpers:
                        helper.cancel()
    finally:
        if metrics is not None:
            metrics.close()
    log.info("coordinator stopped")


def _reload(config_file: Path | None, flags: dict[str, object]) -> None:
    """SIGHUP: read the file and the environment again and apply what can change live (the log
    level). The policy changes only through `jitctl policy apply`; other settings need a
    restart, and a file that no longer validates changes nothing."""
    sdnotify.reloading()
    try:
        fresh = load_settings(config_file, dict(flags))
    except SettingsError as exc:
        log.error("configuration not reloaded", extra={"error": str(exc)})
    else:
        logs.set_level(fresh.log_level)
        log.info("configuration reloaded", extra={"log_level": fresh.log_level})
    sdnotify.ready()


async def _dev_setup(coordinator: Coordinator) -> None:
    """Users alice, bob, carol and admin with tokens, and a reusable join token, all written to
    DATA/dev.env. Restarted on the same directory, the same tokens are kept."""
    env_path = coordinator.config.data_dir / "dev.env"
    old = _read_env(env_path)
    values: dict[str, str] = {}
    for user, groups in DEV_USERS.items():
        key = f"JITMESH_TOKEN_{user.upper()}"
        token = old.get(key) or new_secret("jmt")
        await coordinator.identity.ensure_user(user, groups, token, label="dev")
        values[key] = token
    join = old.get("JITMESH_JOIN_TOKEN") or new_secret("jmj")
    admin = Principal("admin", frozenset({ADMIN_GROUP}))
    await coordinator.fleet.create_join_token(admin, {}, None, max_uses=None, token=join)
    values["JITMESH_JOIN_TOKEN"] = join
    # Dev mode speaks plain text on loopback; clients sourcing this file follow (jitmesh.tls).
    lines = [f"JITMESH_COORDINATOR={coordinator.address}", "JITMESH_INSECURE=1"]
    lines += [f"{k}={v}" for k, v in values.items()]
    _write_private(env_path, "\n".join(lines) + "\n")
    log.info("dev mode ready", extra={"env_file": str(env_path), "address": coordinator.address})


async def _bootstrap_admin(coordinator: Coordinator, given: str | None) -> None:
    """The bootstrap admin token (from admin_token_file, or DATA/admin.token made once): it
    expires like every token (24 h from its first registration; a restart never extends it)."""
    from server.domain import bootstrap
    from server.domain.access import hash_secret

    path = coordinator.config.data_dir / "admin.token"
    if given is not None:
        token = given
    elif path.exists():
        token = path.read_text().strip()
    else:
        token = new_secret("jmt")
        _write_private(path, token + "\n")
        log.info("bootstrap admin token written", extra={"path": str(path)})
    await bootstrap.register_bootstrap(coordinator.identity, token)
    now = coordinator.clock.now()
    expired = await bootstrap.bootstrap_expired(coordinator.store, hash_secret(token)[:16], now)
    if expired is not None:
        log.warning(
            "the bootstrap admin token expired at %s: make a new one with "
            "'jitmesh-coordinator rotate-admin-token --data %s' (while stopped)",
            expired.isoformat(),
            coordinator.config.data_dir,
        )


def _read_env(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
