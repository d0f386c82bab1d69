"""Who may use a daemon: by default only its own user (runtime dir 0700,
socket and arena 0600); with --group G also the members of G (0750 / 0660,
owned by G). Anybody else is refused with an error naming the path, its mode
and owner, and the uid that was refused.

The other user is this very test's child process after it gives up root
(setresuid), so no account or group has to exist on the machine."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable

import pytest

from tests.conftest import Daemon

NOBODY = 65534
GROUP = 4242  # a gid no account is likely to use; needs no /etc/group entry

# Drops root, then tries to connect and to map the arena; prints what happened.
AS_OTHER_USER = r"""
import os, sys
import shmarena
from shmarena.shm.arena import map_segment
# `import shmarena` is lazy: load it all while still root, since the other
# user cannot read this Python's files (a real user has a Python of their own).
for _name in shmarena.__all__:
    getattr(shmarena, _name)

uid, shm_name, size = int(sys.argv[1]), sys.argv[3], int(sys.argv[4])
groups = [int(g) for g in sys.argv[2].split(",") if g]
os.setgroups(groups)
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
try:
    client = shmarena.connect(timeout_s=3.0)
    buf = client.alloc(65536)
    buf.view[:6] = b"member"
    assert bytes(client.attach(buf.handle).view[:6]) == b"member"
    print("connect: ok", flush=True)
    client.close()
except shmarena.ShmArenaError as error:
    print(f"connect: refused: {error}", flush=True)
try:
    map_segment(shm_name, size)
    print("map: ok", flush=True)
except shmarena.ShmArenaError as error:
    print(f"map: refused: {error}", flush=True)
"""

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to run a process as another uid"
)


def as_other_user(daemon: Daemon, groups: list[int]) -> dict[str, str]:
    proc = daemon.python(
        AS_OTHER_USER,
        str(NOBODY),
        ",".join(map(str, groups)),
        f"shmarena-{daemon.name}",
        str(32 << 20),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return dict(line.split(": ", 1) for line in out.splitlines())


def mode_of(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return stat.S_IMODE(st.st_mode), st.st_gid


@needs_root
def test_other_user_can_neither_connect_nor_map(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(size="32M")
    lock = os.path.join(daemon.run_dir, f"{daemon.name}.lock")
    assert mode_of(daemon.run_dir)[0] == 0o700
    assert mode_of(daemon.socket_path)[0] == 0o600
    assert mode_of(daemon.shm_path)[0] == 0o600
    assert mode_of(lock)[0] == 0o600
    result = as_other_user(daemon, groups=[])
    connect, mapped = result["connect"], result["map"]
    assert connect.startswith("refused") and daemon.run_dir in connect
    assert "drwx------" in connect and f"uid {NOBODY}" in connect and "--group" in connect
    assert mapped.startswith("refused") and daemon.shm_path in mapped
    assert "-rw-------" in mapped and f"uid {NOBODY}" in mapped
    print(f"\nFIGURE: other uid refused: {connect[:160]} | {mapped[:160]}")


@needs_root
def test_group_members_may_use_the_daemon_others_may_not(
    make_daemon: Callable[..., Daemon], run_dir: str
) -> None:
    # The daemon opens only a runtime dir it creates; an existing one (this
    # test's) its owner opens to the group first, as the daemon's refusal says.
    os.chown(run_dir, -1, GROUP)
    os.chmod(run_dir, 0o750)
    daemon = make_daemon(size="32M", extra=["--group", str(GROUP)])
    assert mode_of(daemon.run_dir) == (0o750, GROUP)
    assert mode_of(daemon.socket_path) == (0o660, GROUP)
    assert mode_of(daemon.shm_path) == (0o660, GROUP)
    member = as_other_user(daemon, groups=[GROUP])
    assert member == {"connect": "ok", "map": "ok"}, member
    stranger = as_other_user(daemon, groups=[])
    assert stranger["connect"].startswith("refused") and "drwxr-x---" in stranger["connect"]
    assert stranger["map"].startswith("refused") and "-rw-rw----" in stranger["map"]
    client = daemon.client()
    assert client.stats()["used_bytes"] == 0  # the member's session was reclaimed
    assert client.check() == []


def test_unknown_group_is_refused_at_start(daemon: Daemon) -> None:
    result = daemon.cli("daemon", "--name", "other", "--group", "no-such-group-here")
    assert result.returncode == 1
    assert "no-such-group-here" in result.stderr and "no such group" in result.stderr
