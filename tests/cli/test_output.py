"""Formatting helpers: RFC 3339 with Z, relative times, aligned and sanitized tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from jitmesh import clock
from jitmesh.cli import output
from tests.sdk.scripted import NOW, make_agent, make_event, make_grant, make_request


def test_rfc3339_is_utc_with_z_and_always_milliseconds() -> None:
    assert output.rfc3339(NOW) == "2026-01-01T12:00:00.000Z"
    assert output.rfc3339(NOW + timedelta(milliseconds=5)) == "2026-01-01T12:00:00.005Z"
    assert output.rfc3339(NOW + timedelta(microseconds=999)) == "2026-01-01T12:00:00.000Z"
    plus_two = datetime(2026, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    assert output.rfc3339(plus_two) == "2026-01-01T12:00:00.000Z"
    assert output.rfc3339(None) is None
    # Fixed precision: the texts sort as the instants do (with the fraction only when there
    # was one, "12:00:00Z" sorted after "12:00:00.005Z").
    instants = [NOW + timedelta(milliseconds=ms) for ms in (1000, 0, 5, 999, 10)]
    texts = [clock.rfc3339(at) for at in instants]
    assert sorted(texts) == [clock.rfc3339(at) for at in sorted(instants)]


def test_human_and_relative_times() -> None:
    assert output.human_time(NOW) == "2026-01-01 12:00:00Z"
    assert output.human_time(None) == "-"
    assert output.relative(NOW + timedelta(minutes=14, seconds=30), NOW) == "in 14m30s"
    assert output.relative(NOW - timedelta(hours=3, minutes=5, seconds=9), NOW) == "3h5m ago"
    assert output.relative(NOW + timedelta(milliseconds=200), NOW) == "now"


def test_seconds_are_whole_when_they_can_be() -> None:
    assert output.seconds(timedelta(minutes=15)) == 900
    assert isinstance(output.seconds(timedelta(minutes=15)), int)
    assert output.seconds(timedelta(milliseconds=1500)) == 1.5


def test_table_aligns_columns_under_the_header() -> None:
    text = str(output.table(("A", "LONGER", "C"), [("xxxx", "y", "z"), ("", "yy", "")]))
    assert text.splitlines() == [
        "A     LONGER  C",
        "xxxx  y       z",
        "-     yy      -",
    ]


def test_cells_cannot_steer_the_terminal() -> None:
    assert output.cell("evil\x1b[2J\nnext line\tx") == "evil?[2J next line x"
    assert output.cell("\x9b31m") == "?31m"
    assert output.cell("") == "-"


def test_every_json_object_has_id_and_state() -> None:
    grant = make_grant()
    objects = [
        output.request_json(make_request(), grant),
        output.grant_json(grant),
        output.agent_json(make_agent()),
        output.event_json(make_event(1)),
        output.removed_json("web-1"),
    ]
    for value in objects:
        assert {"id", "state"} <= value.keys()
        assert isinstance(value["id"], str)
        assert isinstance(value["state"], str)


def test_policy_yaml_keeps_the_document_after_a_comment() -> None:
    from jitmesh.types import PolicyDocument

    doc = PolicyDocument("a: 1\n", 2, "ff", datetime(2026, 1, 1, tzinfo=UTC), "ops\nx")
    assert output.policy_yaml(doc).splitlines() == [
        "# policy v2 sha256:ff applied 2026-01-01 00:00:00Z by ops x",
        "a: 1",
    ]


def test_event_stream_rows_line_up_with_their_header() -> None:
    header = output.event_stream_header()
    row = output.event_stream_row(make_event(12, grant_id="grant-" + "0" * 32))
    for column in ("KIND", "ACTOR", "REF", "DETAILS"):
        start = header.index(column)
        assert row[start - 2 : start] == "  "
        assert row[start] != " "
