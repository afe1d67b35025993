"""Run a test's host half in a private mount namespace, never against this machine's own /etc.

`run(tmp_path, "name", ...)` starts `python -m tests.host.inside name ARGS` under
`unshare --mount` after mounting an overlay over /etc (so `useradd`, sudoers drop-ins, sshd and
PAM configuration change only the overlay's upper directory in tmp_path) and empty tmpfs over
/home, /run, /var/log and /var/mail (home directories, sudo's timestamps, sshd's run directory,
lastlog). It has its own process ids (`--pid`, its own /proc) and its own loopback (`--net`):
the test users made here get uids that real processes on a shared machine may have (another
sandbox's alice), so `pgrep -u alice`, `pidof` and the agent's end-sessions scan see only this
sandbox's processes, and fixed ports (the README's 7443) are free. Whatever the scenario starts
(the agent, sshd, sudo, su) inherits the namespaces; when the scenario ends, the kernel ends
every process left in them and the mounts are gone. The scenario prints one JSON line last; the
test asserts on it.

Needs root (mount namespaces and overlay) and Debian's sudo, passwd, openssh-server and
pamtester: scripts/test installs them when run as root and they are missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = (
    "unshare", "ip", "pgrep", "visudo", "sudo", "useradd", "gpasswd", "sshd", "ssh", "pamtester",
)  # fmt: skip
TMPFS = ("/home", "/run", "/var/log", "/var/mail")

_SETUP = """
set -e
upper=$1; work=$2; layers=$3; tops=$4; reach=$5; shift 5
ip link set lo up
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$upper,workdir=$work" /etc
for d in {dirs}; do [ -d "$d" ] && mount -t tmpfs -o mode=0755 tmpfs "$d"; done
# Test users must reach the interpreter and the checkout even where a directory on the way is
# private (/root, a CI clone in a 0700 temporary directory): the topmost such directories get an
# overlay, and inside them the directories on the way get o+x (the real ones are untouched).
i=0
for d in $tops; do
  i=$((i+1)); mkdir -p "$layers/$i/u" "$layers/$i/w"
  mount -t overlay overlay -o "lowerdir=$d,upperdir=$layers/$i/u,workdir=$layers/$i/w" "$d"
done
for d in $reach; do chmod o+x "$d"; done
# This shell is the namespace's pid 1: it stays, so that processes orphaned inside (a session
# ended under su) are reaped by its wait instead of lingering as zombies that pgrep still lists.
"$@" &
wait $!
""".format(dirs=" ".join(TMPFS))


def _reach() -> tuple[str, str]:
    """The directories on the way to the interpreter and the checkout that others cannot
    traverse, and the topmost of them (the ones that get an overlay)."""
    needed: set[Path] = set()
    for target in (Path(os.path.realpath(sys.executable)).parent, ROOT):
        for directory in (target, *target.parents):
            if directory.is_dir() and not directory.stat().st_mode & 0o001:
                needed.add(directory)
    tops = {d for d in needed if not any(other in d.parents for other in needed)}
    return " ".join(sorted(map(str, tops))), " ".join(sorted(map(str, needed)))


def missing() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [p for p in PROGRAMS if shutil.which(p, path=path) is None]


def run(tmp_path: Path, scenario: str, *args: Any, timeout: float = 100) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise AssertionError("host tests need root (a private mount namespace with an overlay)")
    absent = missing()
    if absent:
        raise AssertionError(
            f"host tests need {', '.join(absent)}: apt-get install -y sudo passwd "
            "openssh-server openssh-client pamtester iproute2 procps (scripts/test does it "
            "when run as root)"
        )
    dirs = [tmp_path / n for n in ("etc-upper", "etc-work", "layers", "scratch")]
    for d in dirs:
        d.mkdir(exist_ok=True)
    tops, reach = _reach()
    argv = [
        "unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc", "--net",
        "--propagation", "private", "--", "sh", "-c", _SETUP, "sh",
        *[str(d) for d in dirs[:3]], tops, reach, sys.executable, "-m", "tests.host.inside",
        scenario, json.dumps([str(dirs[3]), *args]),
    ]  # fmt: skip
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    # Its own session: on a timeout everything the scenario started (an agent, sshd, sleeps
    # holding our pipes) is killed with it.
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"scenario {scenario} timed out after {timeout}s\n--- stdout\n{stdout[-4000:]}\n"
            f"--- stderr\n{stderr[-6000:]}"
        ) from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    lines = stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise AssertionError(
            f"scenario {scenario} failed (exit {proc.returncode})\n"
            f"--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-6000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def assert_refused_on_time(refused: dict[str, float]) -> None:
    """What `inside.first_refusal` saw around a deadline that sudo or sshd enforce themselves
    (whole seconds): never allowed late (no allowed attempt began more than 0.5 s after it) and
    at most a second early (the first refused attempt did not end more than 1.5 s before it).
    An attempt's own time check lies somewhere inside it, so these are the bounds that hold
    however slowly `su` and `sudo` run on a loaded machine."""
    assert refused["allowed_began_s"] <= 0.5, f"allowed late: {refused}"
    assert refused["refused_ended_s"] >= -1.5, f"refused early: {refused}"
