"""Who is the same person: names differing only by case, width, compatibility forms or
surrounding space."""

from __future__ import annotations

import gc
import re

import pytest

from server.domain.models import ADMIN_GROUP, Principal, gc_paused, new_id, new_ids, same_person


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


def test_new_ids_are_new_id_shaped_unique_and_time_prefixed() -> None:
    ids = new_ids("evt", 3000)
    one = new_id("evt")
    assert len(ids) == 3000 == len(set(ids))
    shape = re.compile(r"evt-[0-9a-f]{32}")
    assert all(shape.fullmatch(i) for i in [*ids, one])
    # 48 bits of milliseconds first: ids made later never sort before them.
    assert max(i[:16] for i in ids) <= new_id("evt")[:16]
    assert new_ids("evt", 0) == []


def test_gc_paused_pauses_only_inside_and_keeps_a_disabled_collector_disabled() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
