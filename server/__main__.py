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

import psycopg
from pydantic import ValidationError

from server.app import Coordinator, DirectoryBusy, build
from server.config import CoordinatorConfig
from server.domain.models import ADMIN_GROUP, Principal, new_secret, user_name
from server.domain.policy import DEV_POLICY
from server.domain.ports import Tx
from server.shared import SecretKeyError
from server.store.postgres.importer import StoreImportError

log = logging.getLogger("jitmesh.coordinator")

DEV_USERS = {
    "alice": ["developers"],
    "bob": ["sre"],
    "carol": ["sre"],
    "admin": [ADMIN_GROUP],
}


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError("expected HOST:PORT, e.g. 127.0.0.1:7443")
    return host.strip("[]"), int(port)


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
        s = sub.add_parser(name, help=text)
        s.add_argument("--data", type=Path, required=True, help="data directory")
        s.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 7443))
        s.add_argument("--log-level", default="INFO")
        s.add_argument("--heartbeat", type=float, default=10.0, help="agent heartbeat, seconds")
        s.add_argument("--keepalive", type=float, default=30.0, help="HTTP/2 keepalive, seconds")
        s.add_argument("--keepalive-timeout", type=float, default=10.0)
        s.add_argument(
            "--agent-queue-limit",
            type=int,
            default=1000,
            help="messages queued per agent stream; a slower agent is cut off and resyncs",
        )
        s.add_argument(
            "--store",
            default="",
            help="postgresql://USER@HOST/DB to share the state with other replicas "
            "(default: SQLite in --data)",
        )
        s.add_argument(
            "--replica",
            default="",
            help="this replica's id (default: made once and kept in --data/replica.id)",
        )
        s.add_argument(
            "--secret-key-file",
            type=Path,
            help="with --store postgresql://: the key that encrypts the shared signing keys "
            "and CA (else JITMESH_SECRET_KEY)",
        )
        # Single sign-on and notifications (docs/sign-in.md, docs/notifications.md).
        s.add_argument("--oidc-issuer", default="", help="trusted OpenID Connect issuer URL")
        s.add_argument("--oidc-client-id", default="", help="audience of accepted ID tokens")
        s.add_argument("--oidc-username-claim", default="preferred_username")
        s.add_argument("--oidc-groups-claim", default="groups")
        s.add_argument(
            "--oidc-token-ttl", type=float, default=3600.0, help="seconds a sign-in token lasts"
        )
        s.add_argument("--web-url", default="", help="jitmesh-web's address, for links")
        s.add_argument(
            "--slack-signing-secret-file",
            type=Path,
            help="serve Slack's interaction endpoint (Approve/Deny) with this signing secret",
        )
        s.add_argument(
            "--slack-listen",
            type=parse_listen,
            default=("127.0.0.1", 0),
            help="HOST:PORT of the Slack interaction endpoint",
        )
        if name == "serve":
            s.add_argument("--policy", type=Path, help="initial policy (used if none is stored)")
            s.add_argument(
                "--insecure",
                action="store_true",
                help="serve without TLS (agents then use bearer credentials): testing only",
            )
            s.add_argument(
                "--agent-port",
                type=int,
                default=None,
                help="port where agents connect with mTLS (default: the listen port + 1)",
            )
            s.add_argument(
                "--tls-cert",
                type=Path,
                help="PEM certificate for the operator port (else the CA's)",
            )
            s.add_argument("--tls-key", type=Path, help="PEM key for --tls-cert")
            s.add_argument(
                "--request-rate",
                type=float,
                default=1.0,
                help="access requests per second per caller, after a burst of --request-burst",
            )
            s.add_argument("--request-burst", type=int, default=30)
            s.add_argument(
                "--enroll-rate",
                type=float,
                default=0.5,
                help="enrollments per second per peer address, after a burst of --enroll-burst "
                "(agents behind one NAT share an address)",
            )
            s.add_argument("--enroll-burst", type=int, default=20)
            s.add_argument(
                "--enroll-overall-rate",
                type=float,
                default=50.0,
                help="enrollments per second from all addresses, after --enroll-overall-burst",
            )
            s.add_argument("--enroll-overall-burst", type=int, default=500)
            s.add_argument(
                "--tls-name",
                action="append",
                default=[],
                help="extra DNS name or IP for the coordinator's certificate (repeatable)",
            )
    return p


def _store_flags(p: argparse.ArgumentParser, *, data_required: bool) -> None:
    p.add_argument("--data", type=Path, required=data_required, help="data directory (SQLite)")
    p.add_argument("--store", default="", help="postgresql://... (else SQLite in --data)")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "new-secret-key":
        from server.shared import new_key

        print(new_key())
        return 0
    if args.command == "migrate-store":
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
            return asyncio.run(_maintain(args.command, args.store, args.data))
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
    if args.command == "rotate-signing-key":
        from datetime import UTC, datetime

        from server.signing import SigningKeys

        if args.store:
            args.data.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                key_id = asyncio.run(_rotate_shared(args.store, args.data, args.secret_key_file))
            except (OSError, ValueError, SecretKeyError, psycopg.Error) as exc:
                print(f"jitmesh-coordinator: {exc}", file=sys.stderr)
                return 1
        else:
            now = datetime.now(UTC)
            key_id = SigningKeys.open(args.data, now).rotate(now)
        print(f"new signing key {key_id}")
        return 0
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("yoyo").setLevel(logging.WARNING)
    host, port = args.listen
    from datetime import timedelta

    common = {
        "data_dir": args.data,
        "host": host,
        "port": port,
        "heartbeat": timedelta(seconds=args.heartbeat),
        "keepalive": timedelta(seconds=args.keepalive),
        "keepalive_timeout": timedelta(seconds=args.keepalive_timeout),
        "agent_queue_limit": args.agent_queue_limit,
        "oidc_issuer": args.oidc_issuer,
        "oidc_client_id": args.oidc_client_id,
        "oidc_username_claim": args.oidc_username_claim,
        "oidc_groups_claim": args.oidc_groups_claim,
        "oidc_token_ttl": timedelta(seconds=args.oidc_token_ttl),
        "web_url": args.web_url,
        "slack_signing_secret_file": args.slack_signing_secret_file,
        "slack_host": args.slack_listen[0],
        "slack_port": args.slack_listen[1],
    }
    try:
        if args.command == "dev":
            if not _loopback(host):
                print("jitmesh-coordinator: dev mode listens on loopback only", file=sys.stderr)
                return 2
            config = CoordinatorConfig(**common, **_store_options(args), default_policy=DEV_POLICY)
        elif args.insecure:
            config = CoordinatorConfig(
                **common,
                **_store_options(args),
                initial_policy=args.policy,
                request_rate=args.request_rate,
                request_burst=args.request_burst,
                **_enroll_limits(args),
            )
        else:
            if (args.tls_cert is None) != (args.tls_key is None):
                print("jitmesh-coordinator: --tls-cert and --tls-key go together", file=sys.stderr)
                return 2
            agent_port = args.agent_port if args.agent_port is not None else port + 1 if port else 0
            config = CoordinatorConfig(
                **common,
                **_store_options(args),
                initial_policy=args.policy,
                request_rate=args.request_rate,
                request_burst=args.request_burst,
                **_enroll_limits(args),
                tls=True,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                tls_names=tuple(args.tls_name),
                agent_port=agent_port,
            )
    except ValidationError as exc:
        # Flags out of range (a rate of 0, a burst below 1): one line naming the flag.
        first = exc.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "a flag"
        print(f"jitmesh-coordinator: {flag}: {first['msg'].lower()}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config, dev=args.command == "dev"))
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError, SecretKeyError, psycopg.Error, DirectoryBusy) as exc:
        print(f"jitmesh-coordinator: {exc}", file=sys.stderr)
        return 1
    return 0


def _store_options(args: argparse.Namespace) -> dict[str, object]:
    return {
        "store": args.store,
        "replica": args.replica,
        "secret_key_file": args.secret_key_file,
    }


async def _rotate_shared(store_url: str, data: Path, key_file: Path | None) -> str:
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
        key_id = SigningKeys.open(data, clock.now()).rotate(clock.now())
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
            await SharedFiles(store, data, box).claim_missing(SystemClock())
        finally:
            await store.close()
        print("signing keys and CA uploaded (encrypted)")
    return 0


async def _maintain(command: str, store_url: str, data: Path | None) -> int:
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


def _enroll_limits(args: argparse.Namespace) -> dict[str, float | int]:
    return {
        "enroll_rate": args.enroll_rate,
        "enroll_burst": args.enroll_burst,
        "enroll_overall_rate": args.enroll_overall_rate,
        "enroll_overall_burst": args.enroll_overall_burst,
    }


async def _serve(config: CoordinatorConfig, *, dev: bool) -> None:
    coordinator = await build(config)
    if dev:
        await _dev_setup(coordinator)
    else:
        await _bootstrap_admin(coordinator)
    if coordinator.ca is not None:
        log.info(
            "TLS from the internal CA ca_file=%s agent_port=%d",
            coordinator.ca.directory / "ca.pem",
            coordinator.agent_port,
        )
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await coordinator.run()
    log.info("coordinator stopped")


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
    log.info("dev mode ready env_file=%s address=%s", env_path, coordinator.address)


async def _bootstrap_admin(coordinator: Coordinator) -> None:
    path = coordinator.config.data_dir / "admin.token"
    if path.exists():
        token = path.read_text().strip()
    else:
        token = new_secret("jmt")
        _write_private(path, token + "\n")
        log.info("bootstrap admin token written path=%s", path)
    await coordinator.identity.ensure_user("admin", [ADMIN_GROUP], token, label="bootstrap")


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
