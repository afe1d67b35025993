"""`jitmesh-coordinator`, built with a crash point: the process exits (status 137, no cleanup)
the first time it reaches the named step of an approval or an ack (`server.domain.steps.Step`).

    python -m tests.support.crashing_coordinator --crash-at after_commit -- dev --data DIR ...

Test support only (tests/faults): the shipped coordinator has no way to be told this.
"""

from __future__ import annotations

import argparse
import sys

from server.__main__ import main as coordinator_main
from server.domain.steps import Step

from .faults import crash_at, split_argv


def main(argv: list[str]) -> int:
    ours, theirs = split_argv(argv)
    parser = argparse.ArgumentParser(prog="python -m tests.support.crashing_coordinator")
    parser.add_argument("--crash-at", type=Step, choices=list(Step), required=True)
    args = parser.parse_args(ours)
    return coordinator_main(theirs, step=crash_at(args.crash_at))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
