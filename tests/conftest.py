"""Settings for the whole test session."""

import os

# The coordinators the tests start are development or `--insecure` ones on loopback, which speak
# plain text: tell clients (SDK, jitctl and agents started as subprocesses, which inherit this)
# so, as the dev coordinator's dev.env does. Tests of the TLS default remove it
# (tests/security/test_tls_default.py).
os.environ["JITMESH_INSECURE"] = "1"
