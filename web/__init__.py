"""jitmesh-web: the web page for requesters and approvers. A client of the coordinator's public
gRPC API through the SDK (like jitctl), acting only with the signed-in person's own short-lived
token; it holds no credential of its own and never opens the store."""

from jitmesh import grpclog

# Before grpc is imported (by the page): failures reach the page and its log through the SDK's
# errors, which carry the core's reason, so the core prints nothing of its own
# (jitmesh/grpclog.py; GRPC_VERBOSITY, when set, wins).
grpclog.quiet("NONE")
