"""`jitmesh-coordinator`, built with a wall clock moved from outside:

    python -m tests.support.clocked_coordinator --clock-offset-file F -- dev --data DIR ...

The coordinator's wall clock is the system's plus the seconds written in F, re-read at every
reading (`tests.support.faults.OffsetFileClock`): a test lets days pass for the coordinator
(a signing key's rotation overlap, a code's validity) without waiting for them. Test support
only: the shipped coordinator has no way to be told this.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.__main__ import main as coordinator_main

from .faults import OffsetFileClock, split_argv


def main(argv: list[str]) -> int:
    ours, theirs = split_argv(argv)
    parser = argparse.ArgumentParser(prog="python -m tests.support.clocked_coordinator")
    parser.add_argument("--clock-offset-file", type=Path, required=True)
    args = parser.parse_args(ours)
    return coordinator_main(theirs, clock=OffsetFileClock(args.clock_offset_file))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
