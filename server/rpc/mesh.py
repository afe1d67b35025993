"""The Mesh service: the mesh at a glance (admins)."""

from __future__ import annotations

from jitmesh import __version__
from jitmesh import convert as shared
from jitmesh.types import GrantState, RequestState
from jitmesh.v1 import mesh_pb2, mesh_pb2_grpc
from server.domain.status import StatusService

from .auth import Authenticator
from .errors import mapped
from .services import Ctx


class MeshServicer(mesh_pb2_grpc.MeshServicer):
    def __init__(self, auth: Authenticator, status: StatusService, replica: str = "") -> None:
        self._auth = auth
        self._status = status
        self._replica = replica

    @mapped
    async def Status(
        self, request: mesh_pb2.StatusRequest, context: Ctx
    ) -> mesh_pb2.StatusResponse:
        principal = await self._auth.operator(context)
        found = await self._status.status(principal)
        counts = found.counts
        return mesh_pb2.StatusResponse(
            coordinator_time=shared.time_to_proto(found.at),
            version=__version__,
            replica=self._replica,
            epoch=found.epoch,
            agents_enrolled=counts.agents_enrolled,
            agents_connected=found.agents_connected,
            requests=[
                mesh_pb2.RequestStateCount(
                    state=shared.request_state_to_proto(RequestState(state)), count=count
                )
                for state, count in sorted(counts.requests.items())
            ],
            grants=[
                mesh_pb2.GrantStateCount(
                    state=shared.grant_state_to_proto(GrantState(state)), count=count
                )
                for state, count in sorted(counts.grants.items())
            ],
            revokes_unacknowledged=counts.revokes_unacknowledged,
            commands_unacknowledged=counts.commands_unacknowledged,
            policy_version=counts.policy_version,
            audit_head_seq=found.audit_head_seq,
            locks_in_force=counts.locks_in_force,
            replicas=[
                mesh_pb2.Replica(
                    id=r.id,
                    address=r.address,
                    version=r.version,
                    started_at=shared.time_to_proto(r.started_at),
                    last_seen_at=shared.time_to_proto(r.last_seen_at),
                    agents_connected=r.agents_connected,
                )
                for r in found.replicas
            ],
        )
