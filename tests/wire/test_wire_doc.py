"""docs/wire.md describes the whole revision (issue 9, "Done when"): every RPC, message, enum,
enum value and field added to the wire since the last released revision is named there. New
messages' own fields are described by their comments in the .proto files (the field-by-field
reference, docs/wire.md), and so are a new enum's values; a request or response message counts
as named with its RPC, a map entry with its field, and a value added to a released enum by its
name with the enum's prefix dropped (`DUPLICATE`)."""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import descriptor_pb2

from tests.wire.test_compat import RELEASES, ROOT, _descriptors, _index, _released

WIRE = ROOT / "docs" / "wire.md"


def _named(word: str, text: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(word)}(?![A-Za-z0-9_])", text) is not None


def _enum_prefix(enum_name: str) -> str:
    """StageState -> STAGE_STATE_."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum_name).upper() + "_"


def undocumented(old: dict[str, object], new: dict[str, object], text: str) -> list[str]:
    missing: list[str] = []
    rpcs = {
        m.name
        for s in new.values()
        if isinstance(s, descriptor_pb2.ServiceDescriptorProto)
        for m in s.method
    }
    for name, after in sorted(new.items()):
        short = name.rsplit(".", 1)[-1]
        before = old.get(name)
        if isinstance(after, descriptor_pb2.DescriptorProto):
            if after.options.map_entry:
                continue
            if before is None:
                rpc = re.sub(r"(Request|Response)$", "", short)
                if not _named(short, text) and not (rpc in rpcs and _named(rpc, text)):
                    missing.append(f"message {name}")
                continue
            assert isinstance(before, descriptor_pb2.DescriptorProto)
            had = {f.name for f in before.field}
            missing += [
                f"field {name}.{f.name}"
                for f in after.field
                if f.name not in had and not _named(f.name, text)
            ]
        elif isinstance(after, descriptor_pb2.EnumDescriptorProto):
            if before is None and not _named(short, text):
                missing.append(f"enum {name}")
            if not isinstance(before, descriptor_pb2.EnumDescriptorProto):
                continue  # a new enum's values are described in its .proto
            had = {v.name for v in before.value}
            prefix = _enum_prefix(short)
            missing += [
                f"enum value {name}.{v.name}"
                for v in after.value
                if v.name not in had
                and not _named(v.name, text)
                and not _named(v.name.removeprefix(prefix), text)
            ]
        elif isinstance(after, descriptor_pb2.ServiceDescriptorProto):
            if before is None and not _named(short, text):
                missing.append(f"service {name}")
            had = (
                {m.name for m in before.method}
                if isinstance(before, descriptor_pb2.ServiceDescriptorProto)
                else set()
            )
            missing += [
                f"rpc {name}.{m.name}"
                for m in after.method
                if m.name not in had and not _named(m.name, text)
            ]
    return missing


def test_wire_md_names_everything_added_since_the_last_release(tmp_path: Path) -> None:
    version, commit = max(RELEASES.items())
    old = _index(_released(commit, tmp_path / version))
    new = _index(_descriptors(ROOT / "protos"))
    assert undocumented(old, new, WIRE.read_text()) == []


def test_the_check_finds_an_undocumented_addition(tmp_path: Path) -> None:
    version, commit = max(RELEASES.items())
    old = _index(_released(commit, tmp_path / version))
    new = _index(_descriptors(ROOT / "protos"))
    text = WIRE.read_text()
    assert undocumented(old, new, text.replace("AckBatch", "a batch")) == [
        "message jitmesh.v1.AckBatch"
    ]
    assert "field jitmesh.v1.CommandBody.replica" in undocumented(
        old, new, re.sub(r"\breplica\b", "-", text)
    )
    assert undocumented(old, new, text.replace("NOT_APPLIED", "not applied")) == [
        "enum value jitmesh.v1.AckStatus.ACK_STATUS_NOT_APPLIED"
    ]
