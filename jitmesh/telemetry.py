"""Telemetry names: the one list of log keys and metric names, shared by the coordinator's and
the agent's logs and metrics (after SPIRE's pkg/common/telemetry/names.go).

Log lines carry these keys through `extra={telemetry.GRANT_ID: ...}`; metrics are named from the
same words, so a log line and a metric about the same thing are found by the same name. Metrics
never carry a label per agent, subject, grant or request (10,000 agents, and the metrics endpoint
is unauthenticated): those are log keys only.
"""

from __future__ import annotations

from typing import Final

# ---------------------------------------------------------------------------------------------
# Log keys. The first ones come first in every line, in this order; any other key a caller
# passes in `extra` follows in alphabetical order (no key is ever dropped).

TS: Final = "ts"
LEVEL: Final = "level"
LOGGER: Final = "logger"
MSG: Final = "msg"
AGENT: Final = "agent"
GRANT_ID: Final = "grant_id"
REQUEST_ID: Final = "request_id"
SUBJECT: Final = "subject"
ACTION: Final = "action"
PEER: Final = "peer"
TRACE_ID: Final = "trace_id"
# Further keys in common use (not forced first).
METHOD: Final = "method"
CODE: Final = "code"
DURATION_MS: Final = "duration_ms"
SEQ: Final = "seq"
STATUS: Final = "status"
REASON: Final = "reason"
ENFORCER: Final = "enforcer"
EVENT_ID: Final = "event_id"
COUNT: Final = "count"
DELAY: Final = "delay"
COORDINATOR: Final = "coordinator"
STATE_DIR: Final = "state_dir"
ERROR: Final = "error"
ADDRESS: Final = "address"
EPOCH: Final = "epoch"
REPLICA: Final = "replica"  # a coordinator replica's id (docs/scaling.md)
PATH: Final = "path"

LEADING_KEYS: Final = (TS, LEVEL, LOGGER, MSG, AGENT, GRANT_ID, REQUEST_ID, SUBJECT, ACTION, PEER)

# ---------------------------------------------------------------------------------------------
# Metric names (Prometheus). Counters end in _total, histograms of time in _seconds.

PREFIX: Final = "jitmesh"

# Coordinator
AGENTS_CONNECTED: Final = f"{PREFIX}_agents_connected"
REQUESTS: Final = f"{PREFIX}_requests"  # _total by outcome
GRANTS_BY_STATE: Final = f"{PREFIX}_grants"  # gauge by state
PUSH_LATENCY: Final = f"{PREFIX}_grant_push_latency_seconds"  # decision -> agent ack (applied)
REVOKE_LATENCY: Final = f"{PREFIX}_grant_revoke_latency_seconds"  # revoke -> agent ack
UNACKED_COMMANDS: Final = f"{PREFIX}_commands_unacked"  # gauge: grants+revokes awaiting an ack
REVOKE_FAILED: Final = f"{PREFIX}_grants_revoke_failed"  # gauge: grants in REVOKE_FAILED
AUDIT_EVENTS: Final = f"{PREFIX}_audit_events"  # _total by kind
STORE_TX_LATENCY: Final = f"{PREFIX}_store_transaction_seconds"
RATE_LIMITED: Final = f"{PREFIX}_rate_limited"  # _total by limit
RPCS: Final = f"{PREFIX}_rpcs"  # _total by method and code

# Agent
AGENT_ACTIVE_GRANTS: Final = f"{PREFIX}_agent_active_grants"
AGENT_SECONDS_SINCE_CONTACT: Final = f"{PREFIX}_agent_seconds_since_contact"
AGENT_OUTBOX_DEPTH: Final = f"{PREFIX}_agent_outbox_depth"
AGENT_EXPIRY_OVERSTAY: Final = f"{PREFIX}_agent_expiry_overstay_seconds"
AGENT_ENFORCER_FAILURES: Final = f"{PREFIX}_agent_enforcer_failures"  # _total by enforcer kind
AGENT_CONNECTED: Final = f"{PREFIX}_agent_connected"
