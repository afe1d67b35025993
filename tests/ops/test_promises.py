"""The promises page is the project's own (issue 10 item 15): every citation points to
docs/promises.md, never to a file the repository does not have, and every test the page names
exists, so a promise cannot silently lose the test that keeps it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[2]
PAGE = ROOT / "docs" / "promises.md"
# The upper-case name of the file that was never in the repository (spelt in two halves so that
# this test does not find itself).
CITATION = re.compile(r"(?<![/\w])" + "PROM" + r"ISES(\.md)?\b")


def test_every_promise_names_tests_that_exist() -> None:
    text = PAGE.read_text()
    promises = re.findall(r"^\*\*P(\d+)\. ", text, re.M)
    assert promises == [str(n) for n in range(1, len(promises) + 1)]
    assert len(promises) >= 14
    for block in re.split(r"^\*\*P\d+\. ", text, flags=re.M)[1:]:
        named = re.findall(r"`(tests/[\w/]+\.py)`", block.split("\n\n")[0])
        assert named, block[:60]
        for path in named:
            assert (ROOT / path).is_file(), path


def test_nothing_cites_a_promises_file_the_repository_lacks() -> None:
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    cited = []
    for name in files:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".toml", ".sh", ""} or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        if CITATION.search(text):
            cited.append(name)
    assert cited == []
