"""`jitmesh-agent`, built with a wall clock moved from outside and optionally a crash point:

    python -m tests.support.faulty_agent --clock-offset-file F [--crash-at STEP] -- run ...

The agent's wall clock is the system's plus the seconds written in F (re-read at every reading;
`tests.support.faults.OffsetFileClock`), and the process exits (status 137, no cleanup) the
first time it reaches STEP of an apply or a revoke (`agent.domain.steps.Step`). Test support
only (tests/faults): the shipped agent has no way to be told either.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.__main__ import main as agent_main
from agent.domain.steps import Step

from .faults import OffsetFileClock, crash_at, split_argv


def main(argv: list[str]) -> int:
    ours, theirs = split_argv(argv)
    parser = argparse.ArgumentParser(prog="python -m tests.support.faulty_agent")
    parser.add_argument("--clock-offset-file", type=Path)
    parser.add_argument("--crash-at", type=Step, choices=list(Step))
    args = parser.parse_args(ours)
    clock = OffsetFileClock(args.clock_offset_file) if args.clock_offset_file else None
    step = crash_at(args.crash_at) if args.crash_at else None
    return agent_main(theirs, clock=clock, step=step)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
