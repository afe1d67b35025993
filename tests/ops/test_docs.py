"""The docs stay true: the policy reference's example is a valid policy, the CLI reference
matches the commands (scripts/check runs the same), and every page the README names exists."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from server.domain.policy import parse_policy

ROOT = Path(__file__).parents[2]


def test_policy_reference_example_is_valid() -> None:
    text = (ROOT / "docs" / "policy.md").read_text()
    example = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert example is not None
    policy = parse_policy(example.group(1))
    assert [rule.name for rule in policy.model.rules] == [
        "staging-self-service",
        "prod-with-approval",
        "no-shell-on-db",
    ]


def test_cli_reference_is_in_sync() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_cli_docs"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_pages_named_in_the_readme_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in re.findall(r"`((?:docs|examples|packaging)/[\w./-]+)`", readme):
        assert (ROOT / name).exists(), name


def _uncommented(
    proto: descriptor_pb2.FileDescriptorProto,
    message: descriptor_pb2.DescriptorProto,
    path: tuple[int, ...],
    commented: set[tuple[int, ...]],
) -> Iterator[str]:
    """Fields of `message` (and of its nested messages) without a comment, and one "" per
    field seen. Paths as in descriptor.proto: 2 is DescriptorProto.field, 3 nested_type."""
    for i, field in enumerate(message.field):
        yield "" if (*path, 2, i) in commented else f"{proto.name}: {message.name}.{field.name}"
    for i, nested in enumerate(message.nested_type):
        if not nested.options.map_entry:
            yield from _uncommented(proto, nested, (*path, 3, i), commented)


def test_every_proto_field_is_commented(tmp_path: Path) -> None:
    """The API reference is the protos: every field of every message says what it holds, in a
    comment protoc attaches to it (leading or trailing), as grpcurl describe and the generated
    stubs show it."""
    protos = ROOT / "protos"
    out = tmp_path / "set.pb"
    files = sorted(str(p.relative_to(protos)) for p in (protos / "jitmesh" / "v1").glob("*.proto"))
    assert files
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        ["protoc", f"-I{protos}", f"-I{include}", "--include_source_info",
         f"--descriptor_set_out={out}", *files]
    )  # fmt: skip
    assert code == 0
    seen: list[str] = []
    for proto in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        commented = {
            tuple(loc.path)
            for loc in proto.source_code_info.location
            if loc.leading_comments.strip() or loc.trailing_comments.strip()
        }
        for i, message in enumerate(proto.message_type):  # 4: FileDescriptorProto.message_type
            seen += _uncommented(proto, message, (4, i), commented)
    assert len(seen) > 400
    assert [name for name in seen if name] == []
