"""jitmesh: just-in-time access for fleets of hosts. The public SDK surface.

`Client` is imported on first use: the value types, errors and durations are needed by code
that must start fast and never talks gRPC (the agent's local `check`, run on every sudo), and
importing the client pulls in gRPC and the generated protobuf modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jitmesh.durations import DurationError, format_duration, parse_duration
from jitmesh.errors import (
    AuthenticationError,
    ConflictError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    JitmeshError,
    LockedError,
    NotFoundError,
    PermissionDeniedError,
    PolicyDeniedError,
    RateLimitedError,
    UnavailableError,
)
from jitmesh.types import (
    Agent,
    ApprovalPlan,
    ApprovalStage,
    AuditEvent,
    BreakglassCode,
    ChainVerification,
    Created,
    Extended,
    Grant,
    GrantState,
    JoinToken,
    JoinTokenInfo,
    Lock,
    LockTarget,
    MeshStatus,
    NotifyDelivery,
    NotifyReceiver,
    NotifyRoute,
    OfflineMode,
    OfflinePolicy,
    PolicyDecision,
    PolicyDocument,
    Replica,
    Request,
    RequestOption,
    RequestState,
    Review,
    ReviewDecision,
    Reviewed,
    SignInConfig,
    StageMode,
    TokenInfo,
    UserInfo,
)

if TYPE_CHECKING:
    from jitmesh.client import Client

# The one place the version is written (pyproject.toml reads it from here).
__version__ = "0.2.0"

__all__ = [
    "Agent",
    "ApprovalPlan",
    "ApprovalStage",
    "AuditEvent",
    "AuthenticationError",
    "BreakglassCode",
    "ChainVerification",
    "Client",
    "ConflictError",
    "Created",
    "DeadlineExceededError",
    "DurationError",
    "Extended",
    "Grant",
    "GrantState",
    "InternalError",
    "InvalidArgumentError",
    "JitmeshError",
    "JoinToken",
    "JoinTokenInfo",
    "Lock",
    "LockTarget",
    "LockedError",
    "MeshStatus",
    "NotFoundError",
    "NotifyDelivery",
    "NotifyReceiver",
    "NotifyRoute",
    "OfflineMode",
    "OfflinePolicy",
    "PermissionDeniedError",
    "PolicyDecision",
    "PolicyDeniedError",
    "PolicyDocument",
    "RateLimitedError",
    "Replica",
    "Request",
    "RequestOption",
    "RequestState",
    "Review",
    "ReviewDecision",
    "Reviewed",
    "SignInConfig",
    "StageMode",
    "TokenInfo",
    "UnavailableError",
    "UserInfo",
    "format_duration",
    "parse_duration",
]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from jitmesh.client import Client

        return Client
    raise AttributeError(f"module 'jitmesh' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"Client"})
