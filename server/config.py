"""Coordinator configuration: parsed and validated once, at the edge, into a frozen model."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from server.domain.policy import EMPTY_POLICY


class CoordinatorConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path
    # Where the state lives: "" for SQLite in data_dir (one coordinator), or a PostgreSQL URL
    # (postgresql://...) shared by several replicas (docs/scaling.md).
    store: str = ""
    # Connections each replica keeps to PostgreSQL at most.
    store_pool_size: int = Field(default=10, ge=2)
    # This replica's stable identity ("" : made once and kept in DATA/replica.id).
    replica: str = ""
    # PostgreSQL replicas: the key that encrypts the shared signing keys and CA in the store
    # (else JITMESH_SECRET_KEY).
    secret_key_file: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=7443, ge=0, le=65535)
    # Used only when the store holds no policy yet.
    initial_policy: Path | None = None
    default_policy: str = EMPTY_POLICY
    heartbeat: timedelta = timedelta(seconds=10)
    keepalive: timedelta = timedelta(seconds=30)
    keepalive_timeout: timedelta = timedelta(seconds=10)
    agent_queue_limit: int = Field(default=1000, ge=10)
    # Undelivered commands for one agent beyond which new grants for it are pushed back
    # (server/domain/delivery.py); None: half the stream queue, so accepted work never cuts it.
    agent_undelivered_limit: int | None = Field(default=None, ge=1)
    # Admission control of agent streams (server/domain/admission.py): new streams per second,
    # in bursts of, and at most this many between their first byte and their Welcome; the
    # excess is refused with a retry hint the agents wait out.
    agent_admit_rate: float = Field(default=1000.0, gt=0)
    agent_admit_burst: int = Field(default=1000, ge=1)
    agent_max_handshakes: int = Field(default=1000, ge=1)
    # Largest message the operator port accepts (the agent port: 64 KiB, fixed).
    max_message_bytes: int = Field(default=1024 * 1024, ge=64 * 1024)
    # TLS from the internal CA (DATA/ca/). Operators and enrolling agents use `port` with
    # server-side TLS (or with tls_cert/tls_key when given); AgentLink needs a client certificate
    # from the CA on `agent_port`, and enrollment then requires a CSR.
    # Access requests per caller: a burst, then a steady rate per second. None: no limit (dev
    # mode, tests, benchmarks); `serve` sets one by default.
    request_burst: int = Field(default=30, ge=1)
    request_rate: float | None = Field(default=None, gt=0)
    # Enrollments (no credential yet) per peer address and overall: a burst, then a rate per
    # second. None: no limit (dev mode, tests, benchmarks); `serve` sets them by default.
    enroll_burst: int = Field(default=20, ge=1)
    enroll_rate: float | None = Field(default=None, gt=0)
    enroll_overall_burst: int = Field(default=500, ge=1)
    enroll_overall_rate: float = Field(default=50.0, gt=0)
    # How often the audit head is signed into the store's checkpoints (when it moved).
    checkpoint_interval: timedelta = timedelta(seconds=10)
    # OpenTelemetry spans for gRPC calls, exported over OTLP (server/tracing.py; the `otel` extra).
    otel: bool = False
    # How often each agent's command log is truncated behind its acknowledged position
    # (domain/retention.py); 0: never.
    command_log_retention: timedelta = Field(default=timedelta(minutes=1), ge=timedelta(0))
    tls: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_names: tuple[str, ...] = ()
    agent_port: int = Field(default=0, ge=0, le=65535)
    # Single sign-on (OpenID Connect): ID tokens from `oidc_issuer` for `oidc_client_id` are
    # exchanged for short-lived jitmesh tokens (docs/sign-in.md).
    oidc_issuer: str = ""
    oidc_client_id: str = ""
    oidc_scopes: tuple[str, ...] = ("openid", "profile", "email")
    oidc_username_claim: str = "preferred_username"
    oidc_groups_claim: str = "groups"
    oidc_token_ttl: timedelta = Field(default=timedelta(hours=1), gt=timedelta(0))
    # Notifications (docs/notifications.md). `web_url`: where messages link to (jitmesh-web).
    notify: bool = True
    web_url: str = ""
    notify_retry_first: timedelta = Field(default=timedelta(seconds=2), gt=timedelta(0))
    notify_retry_cap: timedelta = Field(default=timedelta(minutes=10), gt=timedelta(0))
    notify_attempts: int = Field(default=30, ge=1)
    # How often the sender looks for work written by another replica (its own wakes it at once).
    # Grants are warned about (grant.expiring) this long before they end; 0 turns it off.
    notify_expiry_warning: timedelta = Field(default=timedelta(minutes=10), ge=timedelta(0))
    notify_poll: timedelta = Field(default=timedelta(seconds=5), gt=timedelta(0))
    # Slack's interaction endpoint (Approve/Deny): served when a signing secret file is given.
    slack_signing_secret_file: Path | None = None
    slack_host: str = "127.0.0.1"
    slack_port: int = Field(default=0, ge=0, le=65535)
    # Hosts the endpoint may post outcomes to (Slack's `response_url`).
    slack_response_hosts: tuple[str, ...] = ("hooks.slack.com",)
    # Agent certificates; agents renew them once two thirds of this have passed.
    # Groups that read the whole audit log and every request and grant (domain/reads.py), named
    # here and never in the policy document, which admins change at run time.
    auditor_groups: tuple[str, ...] = ()
    agent_cert_lifetime: timedelta = Field(default=timedelta(days=30), ge=timedelta(seconds=1))
