"""jitctl, the operator CLI: `main.main` is the entry point, `output` formats results."""

from jitmesh import grpclog

# Before grpc is imported (by the commands): jitctl reports every failure itself, as one line
# (gRPC's status carries the core's reason, such as a certificate that did not verify), so the
# core prints nothing of its own (jitmesh/grpclog.py; GRPC_VERBOSITY, when set, wins).
grpclog.quiet("NONE")
