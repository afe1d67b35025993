"""The version rule both sides use (jitmesh/versions.py, docs/wire.md "Mixed versions")."""

from __future__ import annotations

import pytest

from jitmesh.versions import (
    Compatibility,
    agent_compatibility,
    coordinator_supported,
    older_than,
    parse,
)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("0.2.0", (0, 2, 0)),
        ("0.2.0.dev1", (0, 2, 0)),
        ("0.2.0+local", (0, 2, 0)),
        ("10.20.30-rc1", (10, 20, 30)),
        ("", None),
        ("0.2", None),
        ("v0.2.0", None),
        ("0.2.0\n", None),
        ("0.2.0 extra words", None),
        ("99999.0.0", None),
    ],
)
def test_parse(text: str, parsed: tuple[int, int, int] | None) -> None:
    assert parse(text) == parsed


@pytest.mark.parametrize(
    ("agent", "coordinator", "expected"),
    [
        ("0.2.0", "0.2.0", Compatibility.SUPPORTED),
        ("0.2.9", "0.2.1", Compatibility.SUPPORTED),
        ("0.1.0", "0.2.0", Compatibility.COMPAT),
        ("0.0.5", "0.2.0", Compatibility.REFUSED),
        ("0.3.0", "0.2.0", Compatibility.REFUSED),
        ("1.2.0", "0.2.0", Compatibility.REFUSED),
        ("0.2.0", "1.2.0", Compatibility.REFUSED),
        ("1.0.0", "1.1.0", Compatibility.COMPAT),
        ("0.9.0", "1.0.0", Compatibility.REFUSED),  # a new major serves no older major
        ("", "0.2.0", Compatibility.REFUSED),
        ("junk", "0.2.0", Compatibility.REFUSED),
    ],
)
def test_a_coordinator_serves_its_own_minor_and_the_one_before(
    agent: str, coordinator: str, expected: Compatibility
) -> None:
    assert agent_compatibility(agent, coordinator) is expected


@pytest.mark.parametrize(
    ("coordinator", "supported"),
    [
        ("0.2.0", True),
        ("0.3.4", True),  # one minor newer: it serves this agent
        ("0.4.0", False),
        ("0.1.0", False),
        ("", False),  # a coordinator older than wire 0.2 sends no version
        ("1.2.0", False),
    ],
)
def test_an_agent_works_with_its_own_minor_or_the_next(coordinator: str, supported: bool) -> None:
    assert coordinator_supported(coordinator, "0.2.1") is supported


def test_older_than() -> None:
    assert older_than("0.1.9", 0, 2)
    assert not older_than("0.2.0", 0, 2)
    assert not older_than("1.0.0", 0, 2)
    assert older_than("", 0, 2)  # unparsable counts as older
