"""Settings for the whole test session."""

import os

from jitmesh import grpclog

# gRPC's core reads its log settings when grpc is first imported, which happens under this
# session: only its errors reach the test output (its INFO lines, `Got goaway` at every server
# stop, are noise there). Processes the tests start choose for themselves (jitmesh/grpclog.py).
grpclog.quiet("ERROR")

# The coordinators the tests start are development or `--insecure` ones on loopback, which speak
# plain text: tell clients (SDK, jitctl and agents started as subprocesses, which inherit this)
# so, as the dev coordinator's dev.env does. Tests of the TLS default remove it
# (tests/security/test_tls_default.py).
os.environ["JITMESH_INSECURE"] = "1"
