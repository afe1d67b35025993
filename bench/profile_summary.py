"""Summarize a py-spy raw (collapsed stacks) profile: the functions with the most samples,
inclusive and self, so "where the time goes" fits in a table.

    python -m bench.profile_summary FILE [--top N] [--match TEXT]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def summarize(path: Path, top: int, match: str) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f.split(" (")[0] + " " + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
                  if " (" in f else f for f in stack.split(";")]  # fmt: skip
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    lines = [f"{total} samples"]
    lines.append("inclusive:")
    for frame, count in inclusive.most_common():
        if match in frame:
            lines.append(f"  {100 * count / total:5.1f}%  {frame}")
            if len(lines) > top + 2:
                break
    lines.append("self:")
    for frame, count in own.most_common(top):
        lines.append(f"  {100 * count / total:5.1f}%  {frame}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_summary")
    p.add_argument("file", type=Path)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--match", default="")
    args = p.parse_args(argv)
    print(summarize(args.file, args.top, args.match))
    return 0


if __name__ == "__main__":
    sys.exit(main())
