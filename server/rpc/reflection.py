"""Server reflection, v1 and v1alpha, with `describe` of a method working.

grpcio-reflection serves only `grpc.reflection.v1alpha`; current clients (grpcurl 1.9+, grpcui,
Postman) ask for `grpc.reflection.v1` first. The two protos are the same messages under another
package name, so the same servicer answers both: the v1 service is registered with a generic
handler that decodes with the v1alpha classes, and its descriptor (v1alpha's, renamed) is added
to the pool so that it can be described too.

grpc/grpc#34743: the Python servicer looks a symbol up with `FindFileContainingSymbol`, which
knows services and messages but not methods, so `grpcurl describe pkg.Service.Method` answers
"Symbol not found". A method's file is its service's file: the lookup falls back to that.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._base import _file_descriptor_response

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
_V1ALPHA_PACKAGE = "grpc.reflection.v1alpha"


# grpcio-reflection ships no types; its aio servicer is defined only where grpc.aio exists.
_AioReflectionServicer: Any = getattr(reflection, "aio").ReflectionServicer  # noqa: B009


class ReflectionServicer(_AioReflectionServicer):  # type: ignore[misc]
    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        found = super()._file_containing_symbol(request, fully_qualified_name)
        if not found.HasField("error_response"):
            return found
        service_name, _, method = fully_qualified_name.rpartition(".")
        try:
            service = self._pool.FindServiceByName(service_name)
        except KeyError:
            return found
        if method not in service.methods_by_name:
            return found
        return _file_descriptor_response(service.file, request)


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = V1_FILE
    proto.package = "grpc.reflection.v1"
    old, new = f".{_V1ALPHA_PACKAGE}.", ".grpc.reflection.v1."
    for message in proto.message_type:
        for fld in message.field:
            if fld.HasField("type_name"):
                fld.type_name = fld.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.Add(proto)


def enable(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection (v1 and v1alpha) listing `service_names` and both reflection services."""
    pool = descriptor_pool.Default()
    _add_v1_descriptor(pool)
    names = [*service_names, reflection.SERVICE_NAME, V1_SERVICE]
    servicer = ReflectionServicer(names, pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                V1_SERVICE,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        servicer.ServerReflectionInfo,
                        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                    )
                },
            ),
        )
    )
