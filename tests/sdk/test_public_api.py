"""The public surface is exactly what we mean to support, and every name in it resolves."""

from __future__ import annotations

import subprocess
import sys

import pytest

import jitmesh
from jitmesh import errors, types

INTENDED = {
    "Client",
    # value types
    "Agent",
    "ApprovalPlan",
    "ApprovalStage",
    "AuditEvent",
    "BreakglassCode",
    "ChainVerification",
    "Created",
    "Grant",
    "GrantState",
    "JoinToken",
    "JoinTokenInfo",
    "Lock",
    "LockTarget",
    "MeshStatus",
    "NotifyDelivery",
    "NotifyReceiver",
    "NotifyRoute",
    "OfflineMode",
    "OfflinePolicy",
    "PolicyDecision",
    "PolicyDocument",
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
    "UserInfo",
    # errors
    "JitmeshError",
    "AuthenticationError",
    "ConflictError",
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "PolicyDeniedError",
    "LockedError",
    "RateLimitedError",
    "UnavailableError",
    # durations
    "DurationError",
    "Extended",
    "format_duration",
    "parse_duration",
}


def test_all_is_exactly_the_intended_surface() -> None:
    assert set(jitmesh.__all__) == INTENDED
    assert len(jitmesh.__all__) == len(INTENDED), "no duplicates"


def test_every_public_name_resolves() -> None:
    for name in jitmesh.__all__:
        assert getattr(jitmesh, name) is not None, name
    assert jitmesh.Client.__module__ == "jitmesh.client"


def test_every_error_and_value_type_is_exported() -> None:
    assert set(errors.__all__) <= set(jitmesh.__all__)
    for name, value in vars(types).items():
        if isinstance(value, type) and value.__module__ == "jitmesh.types":
            assert name in jitmesh.__all__, name


def test_every_error_derives_from_jitmesh_error() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(jitmesh, name), jitmesh.JitmeshError)


def test_importing_the_value_types_does_not_load_grpc() -> None:
    # The agent's local check imports jitmesh.types on every sudo: it must stay cheap.
    code = "import sys, jitmesh, jitmesh.types; print('grpc' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        jitmesh.NoSuchThing  # noqa: B018
