"""The agent's defaults, in one place (issue 10, item 14): `AgentConfig`, the settings behind
flags, environment and TOML (`agent/settings.py`) and the `Engine` take them from here, so a
default can never differ between them again (`remove_retries` was 1 in the engine and 6 in
the CLI). Values are seconds unless named otherwise; docs/promises.md gives their reasons."""

from __future__ import annotations

from typing import Final

BACKOFF_BASE: Final = 1.0
# Reconnect schedule: full jitter from the base, doubling up to the cap. The coordinator
# protects itself by admission control (a refused agent waits the coordinator's hint, never less
# than this schedule), so the cap need not be long: after a coordinator restart every agent dials
# within 15 s (with 60 s: p99 44.7 s back after repeated restarts; issue 16).
BACKOFF_CAP: Final = 15.0
HEARTBEAT: Final = 10.0
KEEPALIVE: Final = 30.0
KEEPALIVE_TIMEOUT: Final = 10.0
# A revoke's removal is tried this many times (jittered, doubling from the base) before the
# grant is reported REVOKE_FAILED; the background sweep keeps retrying after that.
REMOVE_RETRIES: Final = 6
REMOVE_RETRY_BASE: Final = 10.0
SKEW_TOLERANCE: Final = 60.0
RECONCILE_EVERY: Final = 300.0
# The longest lease a break-glass code gives on this host, whatever the code says (seconds).
BREAKGLASS_MAX: Final = 3600.0
# An ended lease's row stays in the lease table this long at least (a revoked one, or a
# tombstone, stays until no copy of its grant can still arrive: agent/domain/retention.py).
LEASE_RETENTION: Final = 7 * 24 * 3600.0
# Seconds between two passes that delete the ended rows kept long enough.
PRUNE_EVERY: Final = 3600.0
