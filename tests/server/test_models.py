"""Who is the same person: names differing only by case, width, compatibility forms or
surrounding space."""

from __future__ import annotations

import pytest

from server.domain.models import ADMIN_GROUP, Principal, same_person


@pytest.mark.parametrize(
    "variant",
    [
        "alice",
        "Alice",
        "ALICE",
        "ＡＬＩＣＥ",  # full-width
        "ａｌｉｃｅ",
        " alice ",
        "\talice\n",
        "\u00a0alice",  # no-break space
        "ＡＬＩＣＥ ",
    ],
)
def test_variants_are_the_same_person(variant: str) -> None:
    assert same_person(variant, "alice")
    assert same_person("alice", variant)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("\ufb01ona", "fiona"),  # the fi ligature is a compatibility form
        ("straße", "STRASSE"),  # full case folding
        ("Ⅸ", "ix"),  # roman numeral
    ],
)
def test_compatibility_forms(a: str, b: str) -> None:
    assert same_person(a, b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("alice", "alice2"),
        ("alice", "al ice"),
        ("alice", "alíce"),
        ("alice", "bob"),
        ("alice", "аlice"),  # Cyrillic a: a different letter, not a variant
    ],
)
def test_different_people(a: str, b: str) -> None:
    assert not same_person(a, b)


def test_only_users_in_the_admin_group_are_admins() -> None:
    assert Principal("root", frozenset({ADMIN_GROUP})).is_admin
    assert not Principal("root", frozenset({"sre"})).is_admin
    assert not Principal("web-1", frozenset({ADMIN_GROUP}), kind="agent").is_admin
