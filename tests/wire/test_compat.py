"""The wire only grows: every message, field, enum value and RPC of a released revision is still
there with the same number, name and type (docs/wire.md, "Rules for changing the wire").

The released protos are read from this repository's history (CI runs in a full clone)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
# Released wire revisions: version -> the commit of its release (docs/wire.md).
RELEASES = {"0.1": "317f3c0"}


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True
    ).stdout


def _descriptors(proto_root: Path) -> descriptor_pb2.FileDescriptorSet:
    """The protos under `proto_root` compiled to descriptors (written to a temporary file: the
    source tree is never written to)."""
    files = sorted(str(p.relative_to(proto_root)) for p in proto_root.glob("jitmesh/v1/*.proto"))
    with tempfile.TemporaryDirectory() as scratch:
        return _compiled(proto_root, files, Path(scratch) / "set.pb")


def _compiled(proto_root: Path, files: list[str], out: Path) -> descriptor_pb2.FileDescriptorSet:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"--descriptor_set_out={out}",
            *files,
        ],
        check=True,
    )
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _released(commit: str, tmp: Path) -> descriptor_pb2.FileDescriptorSet:
    try:
        names = _git("ls-tree", "--name-only", commit, "protos/jitmesh/v1/").split()
    except subprocess.CalledProcessError:
        pytest.fail(f"commit {commit} is not in this clone: the wire test needs full history")
    for name in names:
        target = tmp / "jitmesh/v1" / Path(name).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_git("show", f"{commit}:{name}"))
    return _descriptors(tmp)


def _index(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, object]:
    """Every message, enum and service by full name."""
    found: dict[str, object] = {}

    def messages(prefix: str, items: list[descriptor_pb2.DescriptorProto]) -> None:
        for m in items:
            name = f"{prefix}.{m.name}"
            found[name] = m
            messages(name, list(m.nested_type))
            for e in m.enum_type:
                found[f"{name}.{e.name}"] = e

    for f in fds.file:
        messages(f.package, list(f.message_type))
        for e in f.enum_type:
            found[f"{f.package}.{e.name}"] = e
        for s in f.service:
            found[f"{f.package}.{s.name}"] = s
    return found


def _problems(old: dict[str, object], new: dict[str, object]) -> list[str]:
    problems: list[str] = []
    for name, before in old.items():
        after = new.get(name)
        if after is None or type(after) is not type(before):
            problems.append(f"{name} is gone")
            continue
        if isinstance(before, descriptor_pb2.DescriptorProto):
            assert isinstance(after, descriptor_pb2.DescriptorProto)
            now = {f.number: f for f in after.field}
            for field in before.field:
                f = now.get(field.number)
                where = f"{name}.{field.name} = {field.number}"
                if f is None:
                    problems.append(f"{where} is gone")
                    continue
                if (f.name, f.type, f.label, f.type_name) != (
                    field.name,
                    field.type,
                    field.label,
                    field.type_name,
                ):
                    problems.append(f"{where} changed its name, type or label")
                in_oneof = (
                    before.oneof_decl[field.oneof_index].name
                    if field.HasField("oneof_index")
                    else None
                )
                now_oneof = (
                    after.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None
                )
                if in_oneof != now_oneof:
                    problems.append(f"{where} moved into or out of a oneof")
        elif isinstance(before, descriptor_pb2.EnumDescriptorProto):
            assert isinstance(after, descriptor_pb2.EnumDescriptorProto)
            now_values = {v.number: v.name for v in after.value}
            for value in before.value:
                if now_values.get(value.number) != value.name:
                    problems.append(f"{name}.{value.name} = {value.number} changed or is gone")
        else:
            assert isinstance(before, descriptor_pb2.ServiceDescriptorProto)
            assert isinstance(after, descriptor_pb2.ServiceDescriptorProto)
            methods = {m.name: m for m in after.method}
            for method in before.method:
                m = methods.get(method.name)
                shape = (
                    method.input_type,
                    method.output_type,
                    method.client_streaming,
                    method.server_streaming,
                )
                if (
                    m is None
                    or (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
                    != shape
                ):
                    problems.append(f"{name}.{method.name} is gone or changed its shape")
    return problems


@pytest.mark.parametrize(("version", "commit"), sorted(RELEASES.items()))
def test_released_wire_is_kept(version: str, commit: str, tmp_path: Path) -> None:
    old = _index(_released(commit, tmp_path / "old"))
    new_root = tmp_path / "new"
    (new_root / "jitmesh/v1").mkdir(parents=True)
    for proto in (ROOT / "protos/jitmesh/v1").glob("*.proto"):
        (new_root / "jitmesh/v1" / proto.name).write_text(proto.read_text())
    new = _index(_descriptors(new_root))
    assert _problems(old, new) == [], f"the wire of release {version} was changed"


def test_the_check_finds_a_renamed_field(tmp_path: Path) -> None:
    """The comparison itself can fail: a renamed field and a removed enum value are caught."""
    old = _index(_released(RELEASES["0.1"], tmp_path / "old"))
    root = tmp_path / "edited"
    (root / "jitmesh/v1").mkdir(parents=True)
    for proto in (ROOT / "protos/jitmesh/v1").glob("*.proto"):
        text = proto.read_text()
        if proto.name == "agentlink.proto":
            text = text.replace("uint64 last_applied_seq = 3;", "uint64 last_seq = 3;")
            text = text.replace("ACK_STATUS_REJECTED = 3;", "")
        (root / "jitmesh/v1" / proto.name).write_text(text)
    problems = _problems(old, _index(_descriptors(root)))
    assert "jitmesh.v1.Hello.last_applied_seq = 3 changed its name, type or label" in problems
    assert "jitmesh.v1.AckStatus.ACK_STATUS_REJECTED = 3 changed or is gone" in problems
