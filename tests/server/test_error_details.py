"""Machine-readable errors and errors that say what to do (issue 10 items 9 and 10), through a
real coordinator over gRPC: every refusal carries a google.rpc.Status with an ErrorInfo whose
reason is stable, read here with grpcio-status as an independent client would, and the SDK turns
it into its exception tree."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from jitmesh import errors
from jitmesh.v1 import access_pb2, access_pb2_grpc, policy_pb2, policy_pb2_grpc
from server.rpc.errors import ERRORS
from tests.server.helpers import TOKENS, Env, bearer, channel

FIFTEEN = timedelta(minutes=15)


def _info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    # grpc-stubs types from_call for grpc.Call; an AioRpcError has the same three methods.
    status: status_pb2.Status | None = rpc_status.from_call(cast(Any, exc))
    assert status is not None, "no google.rpc.Status in the trailers"
    assert status.code == exc.code().value[0]
    assert status.message == exc.details()
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
            infos.append(info)
    assert len(infos) == 1, status
    return infos[0]


async def test_a_raw_grpc_client_reads_the_reason(env: Env) -> None:
    async with channel(env.address) as ch:
        access = access_pb2_grpc.AccessStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await access.CreateRequest(
                access_pb2.CreateRequestRequest(
                    agent="web-1", action="shell", duration=duration_pb2.Duration(seconds=900)
                ),
                metadata=bearer(TOKENS["alice"]),
            )
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        info = _info(denied.value)
        assert (info.reason, info.domain) == ("POLICY_DENIED", "jitmesh.dev")

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await access.GetGrant(
                access_pb2.GetGrantRequest(id="grt-" + "0" * 32),
                metadata=bearer(TOKENS["alice"]),
            )
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        assert _info(missing.value).reason == "NOT_FOUND"

        with pytest.raises(grpc.aio.AioRpcError) as nobody:
            await access.ListGrants(access_pb2.ListGrantsRequest(), metadata=bearer("jmt_wrong"))
        assert nobody.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert _info(nobody.value).reason == "UNAUTHENTICATED"

        policy = policy_pb2_grpc.PolicyStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await policy.ApplyPolicy(
                policy_pb2.ApplyPolicyRequest(yaml="actions: [deploy]\nrulez: []\n"),
                metadata=bearer(TOKENS["admin"]),
            )
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert _info(bad.value).reason == "INVALID_ARGUMENT"


async def test_the_sdk_maps_reasons_to_its_exception_tree(env: Env) -> None:
    with pytest.raises(errors.PolicyDeniedError) as denied:
        await env.alice.create_request(agent="web-1", action="shell", duration=FIFTEEN)
    assert denied.value.reason == "POLICY_DENIED"
    assert isinstance(denied.value, errors.PermissionDeniedError)

    created = await env.alice.create_request(
        agent="db-1", action="deploy", duration=FIFTEEN, reason="INC-1"
    )
    with pytest.raises(errors.PermissionDeniedError) as own:
        await env.alice.approve(created.request.id)
    assert own.value.reason == "SELF_APPROVAL"
    assert type(own.value) is errors.PermissionDeniedError

    with pytest.raises(errors.NotFoundError) as missing:
        await env.alice.get_request("req-" + "0" * 32)
    assert missing.value.reason == "NOT_FOUND"

    lock, _, _ = await env.admin.create_lock(agent="web-1", reason="INC-2")
    with pytest.raises(errors.LockedError) as locked:
        await env.alice.create_request(agent="web-1", action="deploy", duration=FIFTEEN)
    assert locked.value.reason == "LOCKED"
    assert isinstance(locked.value, errors.ConflictError)
    assert f"jitctl lock lift {lock.id}" in str(locked.value)


async def test_a_disabled_user_is_told_so(env: Env) -> None:
    await env.admin.set_user_disabled("dave")
    with pytest.raises(errors.AuthenticationError) as caught:
        await env.dave.list_grants()
    assert caught.value.reason == "USER_DISABLED"
    assert str(caught.value) == (
        "user dave is disabled: an admin enables it again with 'jitctl user enable dave'"
    )


async def test_unknown_action_lists_the_valid_ones(env: Env) -> None:
    with pytest.raises(errors.InvalidArgumentError) as caught:
        await env.alice.create_request(agent="web-1", action="deplyo", duration=FIFTEEN)
    assert str(caught.value) == (
        "unknown action deplyo: did you mean deploy? the policy's actions are "
        "deploy, restart, logs, shell, db-migrate"
    )


async def test_a_subject_who_may_not_revoke_is_pointed_to_release(env: Env) -> None:
    created = await env.alice.create_request(agent="web-1", action="deploy", duration=FIFTEEN)
    assert created.grant is not None
    with pytest.raises(errors.PermissionDeniedError) as caught:
        await env.alice.revoke_grant(created.grant.id, reason="done")
    assert f"'jitctl grant release {created.grant.id}'" in str(caught.value)
    with pytest.raises(errors.PermissionDeniedError) as other:
        await env.dave.release_grant(created.grant.id)
    assert "only its subject alice may" in str(other.value)
    assert f"'jitctl grant revoke {created.grant.id}'" in str(other.value)


async def test_an_id_of_the_wrong_kind_is_named(env: Env) -> None:
    request_id = "req-" + "0" * 32
    with pytest.raises(errors.InvalidArgumentError) as sdk:
        await env.alice.get_grant(request_id)
    assert str(sdk.value) == (
        "grant id is not valid: that is a request id (req-...); grant ids look like "
        "grt-<32 hex digits>"
    )
    # The coordinator says the same to a client that sends it anyway.
    async with channel(env.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await access_pb2_grpc.AccessStub(ch).GetGrant(
                access_pb2.GetGrantRequest(id=request_id), metadata=bearer(TOKENS["alice"])
            )
    assert raw.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert raw.value.details() == str(sdk.value)


async def test_an_unknown_policy_key_is_called_unknown_with_a_suggestion(env: Env) -> None:
    text = (
        "actions: [deploy]\n"
        "rules:\n"
        "  - name: r\n"
        "    subject: {groups: [developers]}\n"
        "    actions: [deploy]\n"
        "    agents: {labels: {env: staging}}\n"
    )
    with pytest.raises(errors.InvalidArgumentError) as caught:
        await env.admin.apply_policy(text)
    assert str(caught.value) == (
        "policy is invalid: rules[0]: unknown key 'subject' (did you mean 'subjects'?)"
    )
    with pytest.raises(errors.InvalidArgumentError) as top:
        await env.admin.apply_policy("actions: [deploy]\nrulez: []\n")
    assert str(top.value) == (
        "policy is invalid: document: unknown key 'rulez' (did you mean 'rules'?)"
    )


TIGHTER = """\
version: 1
actions: [deploy, restart, logs, shell, db-migrate]
rules:
  - name: staging-deploy-only
    subjects: {groups: [developers]}
    actions: [deploy]
    agents: {labels: {env: staging}}
"""


async def test_policy_test_asks_a_document_before_it_is_applied(env: Env) -> None:
    running = await env.admin.test_policy(subject="alice", action="restart", agent="web-1")
    assert running.allowed
    proposed = await env.admin.test_policy(
        subject="alice", action="restart", agent="web-1", policy_yaml=TIGHTER
    )
    assert not proposed.allowed
    allowed = await env.admin.test_policy(
        subject="alice", action="deploy", agent="web-1", policy_yaml=TIGHTER
    )
    assert allowed.allowed
    assert allowed.rule == "staging-deploy-only"
    with pytest.raises(errors.InvalidArgumentError):
        await env.admin.test_policy(
            subject="alice", action="deploy", agent="web-1", policy_yaml="rulez: []\n"
        )
    # Nothing was applied.
    assert (await env.admin.get_policy()).version == 1


async def test_apply_dry_run_validates_and_changes_nothing(env: Env) -> None:
    before = await env.admin.get_policy()
    dry = await env.admin.apply_policy(TIGHTER, dry_run=True)
    assert (dry.version, dry.yaml, dry.applied_at) == (before.version + 1, TIGHTER, None)
    after = await env.admin.get_policy()
    assert after == before
    with pytest.raises(errors.InvalidArgumentError):
        await env.admin.apply_policy("rulez: []\n", dry_run=True)
    with pytest.raises(errors.PermissionDeniedError):
        await env.alice.apply_policy(TIGHTER, dry_run=True)


def test_every_reason_the_coordinator_gives_is_listed_for_clients() -> None:
    given = {reason for _, reason in ERRORS.values()} | {"BUSY"}
    assert given == set(errors.REASONS)
