"""The shape of the CLI as a whole: every command has examples in its help and takes -o; YAML
output; colours only on a terminal; shell completion scripts; one spelling per option."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from ruamel.yaml import YAML

from jitmesh.cli import output
from jitmesh.cli.core import Output
from jitmesh.cli.main import cli
from jitmesh.clock import FakeClock
from tests.cli.conftest import Jitctl
from tests.sdk.scripted import NOW, Scripted, gid, make_agent, make_grant, make_request, rid


def _commands(
    command: click.Command, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))


ALL = list(_commands(cli))
LEAVES = [(path, c) for path, c in ALL if not isinstance(c, click.Group)]


@pytest.mark.parametrize(("path", "command"), ALL, ids=[" ".join(p) or "jitctl" for p, _ in ALL])
def test_every_help_has_examples(jitctl: Jitctl, path: tuple[str, ...], command: object) -> None:
    result = jitctl(*path, "--help")
    assert result.code == 0, result.err
    assert "Examples:\n" in result.out
    examples = result.out.split("Examples:\n", 1)[1]
    assert f"jitctl {' '.join(path)}".rstrip() in examples


def test_every_command_takes_the_global_options() -> None:
    for path, command in LEAVES:
        if path == ("completion",):
            continue
        names = {opt for p in command.params for opt in getattr(p, "opts", [])}
        assert {"-o", "--coordinator", "--token", "--ca-file", "--timeout"} <= names, path


def test_one_spelling_per_option_across_commands() -> None:
    """The same option means the same thing everywhere: its metavar (what it takes) is one."""
    seen: dict[str, set[str]] = {}
    for _path, command in LEAVES:
        for param in command.params:
            if isinstance(param, click.Option) and not param.is_flag:
                seen.setdefault(param.opts[-1], set()).add(param.metavar or param.type.name)
    clashes = {name: kinds for name, kinds in seen.items() if len(kinds) > 1}
    assert clashes == {}
    # Filters and targets are options, named alike everywhere (no `token create USER` beside
    # `token list --user USER`): the only arguments are the ids of what a verb acts on.
    arguments = {p.name for _path, c in LEAVES for p in c.params if isinstance(p, click.Argument)}
    assert arguments <= {"id", "name", "user", "serial", "shell"}


def test_yaml_output(model: Scripted, jitctl: Jitctl) -> None:
    model.put(make_grant(1), make_agent("web-1"))
    listed = YAML(typ="safe").load(jitctl("grant", "list", "-o", "yaml").out)
    assert [(g["id"], g["state"], g["expires_at"]) for g in listed] == [
        (gid(1), "ACTIVE", "2026-01-01T12:15:00.000Z")
    ]
    shown = YAML(typ="safe").load(jitctl("-o", "yaml", "agent", "show", "web-1").out)
    assert shown == jitctl("agent", "show", "web-1", "-o", "json").json()


def test_table_json_and_yaml_carry_the_same_request(model: Scripted, jitctl: Jitctl) -> None:
    model.put(make_request(1))
    as_json = jitctl("request", "show", rid(1), "-o", "json").json()
    as_yaml = YAML(typ="safe").load(jitctl("request", "show", rid(1), "-o", "yaml").out)
    assert as_json == as_yaml
    table = jitctl("request", "show", rid(1)).out
    assert "\x1b[" not in table  # not a terminal: no colour
    assert ["ID", rid(1)] in [line.split() for line in table.splitlines()]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_states_are_coloured_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("FORCE_COLOR", "1")
    stream = _Tty()
    out = Output("table", FakeClock(NOW), stream)
    grants = [make_grant(1), make_grant(2)]
    out.show(output.grants_table(grants, NOW))
    text = stream.getvalue()
    assert "\x1b[32mACTIVE\x1b[0m" in text  # green
    assert "\x1b[1m" in text  # bold header
    # Colour codes aside, the text is what a pipe gets.
    plain = str(output.grants_table(grants, NOW))
    assert re.sub(r"\x1b\[[0-9;]*m", "", text).rstrip("\n") == plain


def test_no_color_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("TERM", "xterm-256color")
    stream = _Tty()
    Output("table", FakeClock(NOW), stream).show(output.grants_table([make_grant(1)], NOW))
    # Bold may stay (NO_COLOR is about colour); no foreground colour code does.
    assert "ACTIVE" in stream.getvalue()
    assert not re.search(r"\x1b\[[0-9;]*(3[0-9]|9[0-7])[;m]", stream.getvalue())


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(jitctl: Jitctl, shell: str) -> None:
    result = jitctl("completion", shell)
    assert result.code == 0, result.err
    assert "_JITCTL_COMPLETE" in result.out
    assert f"{shell}_complete" in result.out


def test_bash_completion_script_is_valid_and_completes() -> None:
    """The generated script loads in a real bash, and the completion it asks for (through the
    installed console script) names the groups and the states."""
    bash = shutil.which("bash")
    assert bash is not None
    jitctl = str(Path(sys.executable).parent / "jitctl")
    script = subprocess.run(
        [jitctl, "completion", "bash"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    probe = (
        script
        + "\nCOMP_WORDS=(jitctl grant list --state re); COMP_CWORD=4;"
        + " _jitctl_completion jitctl; printf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    env = {"PATH": f"{Path(jitctl).parent}:/usr/bin:/bin"}
    done = subprocess.run(
        [bash, "--norc", "-c", probe], capture_output=True, text=True, timeout=30, env=env
    )
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == ["released", "revoke_failed", "revoked", "revoking"]


def test_human_times_in_tables(model: Scripted, jitctl: Jitctl) -> None:
    model.put(make_request(1))
    row = jitctl("request", "list").out.splitlines()[1]
    assert "2026-01-01 12:00:00Z (now)" in row
