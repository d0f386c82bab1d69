"""The runtime dir and the files in it are trusted only when they should be.

The daemon creates its runtime dir (0700, or 0750 to its --group) and never
changes the mode or group of one it did not create; it refuses a symlink, a
non-directory, a dir of another uid or one writable by group/others, and
anything that is not what it should be in place of NAME.lock, NAME.sock or
NAME.log — with a message, nothing changed, nothing deleted. A client checks
the dir and the socket the same way before it connects, so another user who
got to /tmp/shmarena-<uid> first cannot serve it a fake daemon.

Other uids: the tests run as root (in CI) and give files to uid 65534 or run
a process as that uid; they are skipped for a normal user.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest

import shmarena
from shmarena.config import shm_name
from shmarena.shm.arena import map_segment
from tests.conftest import REPO, Daemon, subprocess_env, unique_name, wait_for

NOBODY = 65534
GROUP = 4242  # a gid no account is likely to use; needs no /etc/group entry

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another uid")


# `shmarena daemon ARGS...` as uid 65534. Python's own files may be out of that
# uid's reach (under /root), so the child imports what the daemon needs as
# root and only then gives root up.
AS_NOBODY = r"""
import os, sys
import shmarena.cli, shmarena.daemon.server, shmarena.daemon.logs, shmarena.daemon.metrics
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
sys.exit(shmarena.cli.main(sys.argv[1:]))
"""


def mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def start_daemon(run_dir: str, name: str, *extra: str, as_nobody: bool = False) -> tuple[int, str]:
    """Run `shmarena daemon` in the foreground, expecting it to refuse: its
    exit code and output. One that starts instead is stopped and the test fails."""
    python = [sys.executable, "-c", AS_NOBODY] if as_nobody else [sys.executable, "-m", "shmarena"]
    proc = subprocess.Popen(
        [*python, "daemon", "--size", "8M", *extra],
        env=subprocess_env(run_dir, name),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"the daemon started in {run_dir} instead of refusing:\n{out}")
    return proc.returncode, out


@pytest.fixture
def name() -> Iterator[str]:
    name = unique_name()
    yield name
    assert not os.path.exists(f"/dev/shm/shmarena-{name}"), "an arena was left behind"


# -- the daemon and its runtime dir --------------------------------------------


def test_daemon_creates_a_missing_runtime_dir_0700(run_dir: str, make_daemon) -> None:
    inner = os.path.join(run_dir, "r")
    daemon = Daemon(unique_name(), inner, "8M")
    try:
        daemon.start()
        assert mode(inner) == 0o700 and os.lstat(inner).st_uid == os.geteuid()
    finally:
        daemon.stop()
    daemon.assert_clean()


@needs_root
def test_daemon_with_group_creates_a_missing_runtime_dir_0750_to_it(run_dir: str) -> None:
    inner = os.path.join(run_dir, "r")
    daemon = Daemon(unique_name(), inner, "8M", ["--group", str(GROUP)])
    try:
        daemon.start()
        st = os.lstat(inner)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o750, GROUP)
    finally:
        daemon.stop()
    daemon.assert_clean()


def test_daemon_refuses_a_symlinked_runtime_dir_and_changes_nothing(
    run_dir: str, name: str
) -> None:
    private = os.path.join(run_dir, "private")
    os.mkdir(private, 0o700)
    link = os.path.join(run_dir, "link")
    os.symlink(private, link)
    code, out = start_daemon(link, name, *(["--group", str(GROUP)] if os.geteuid() == 0 else []))
    assert code == 1, out
    assert link in out and "symlink" in out and "Traceback" not in out
    st = os.stat(private)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_gid == os.getegid()
    assert os.listdir(private) == []


def test_daemon_refuses_a_world_writable_dir_and_leaves_its_mode(run_dir: str, name: str) -> None:
    shared = os.path.join(run_dir, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)
    code, out = start_daemon(shared, name)
    assert code == 1, out
    assert shared in out and "drwxrwxrwt" in out and "writable" in out
    assert "Traceback" not in out
    assert mode(shared) == 0o1777 and os.listdir(shared) == []


def test_daemon_refuses_a_regular_file_as_runtime_dir(run_dir: str, name: str) -> None:
    path = os.path.join(run_dir, "file")
    with open(path, "w") as f:
        f.write("not a dir\n")
    code, out = start_daemon(path, name)
    assert code == 1, out
    assert path in out and "not a directory" in out and "Traceback" not in out
    with open(path) as f:
        assert f.read() == "not a dir\n"


@needs_root
def test_daemon_refuses_a_runtime_dir_of_another_uid(run_dir: str, name: str) -> None:
    theirs = os.path.join(run_dir, "theirs")
    os.mkdir(theirs, 0o755)
    os.chown(theirs, NOBODY, NOBODY)
    code, out = start_daemon(theirs, name)
    assert code == 1, out
    assert theirs in out and f"uid {NOBODY}" in out and "Traceback" not in out
    assert os.listdir(theirs) == []


@needs_root
def test_daemon_with_group_refuses_a_private_dir_and_says_how_to_open_it(
    run_dir: str, name: str
) -> None:
    code, out = start_daemon(run_dir, name, "--group", str(GROUP))
    assert code == 1, out
    assert run_dir in out and f"chgrp {GROUP}" in out and "chmod 0750" in out
    st = os.stat(run_dir)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o700, os.getegid())


@needs_root
def test_a_second_uid_cannot_start_a_daemon_in_anothers_runtime_dir(
    run_dir: str, name: str
) -> None:
    os.chmod(run_dir, 0o755)  # readable: the refusal is ours, not the kernel's
    code, out = start_daemon(run_dir, name, as_nobody=True)
    assert code == 1, out
    assert run_dir in out and "uid 0" in out and "Traceback" not in out
    assert os.listdir(run_dir) == []


def make_fifo(path: str) -> None:
    os.mkfifo(path, 0o600)


def make_dir(path: str) -> None:
    os.mkdir(path, 0o700)


def make_file(path: str) -> None:
    with open(path, "w") as f:
        f.write("keep me\n")


def make_symlink(path: str) -> None:
    target = os.path.join(os.path.dirname(path), "target")
    make_file(target)
    os.symlink(target, path)


def kind_of(path: str) -> str:
    st = os.lstat(path)
    for test, kind in (
        (stat.S_ISDIR, "dir"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISREG, "file"),
    ):
        if test(st.st_mode):
            return kind
    return "other"


@pytest.mark.parametrize(
    ("suffix", "make", "found"),
    [
        (".sock", make_dir, "directory"),
        (".sock", make_fifo, "FIFO"),
        (".sock", make_file, "regular file"),
        (".sock", make_symlink, "symlink"),
        (".lock", make_dir, "directory"),
        (".lock", make_fifo, "FIFO"),
        (".lock", make_symlink, "symlink"),
    ],
    ids=[
        "sock-dir",
        "sock-fifo",
        "sock-file",
        "sock-symlink",
        "lock-dir",
        "lock-fifo",
        "lock-symlink",
    ],  # fmt: skip
)
def test_daemon_refuses_the_wrong_kind_of_file_in_its_place(
    run_dir: str, name: str, suffix: str, make, found: str
) -> None:
    path = os.path.join(run_dir, name + suffix)
    make(path)
    kind = kind_of(path)
    code, out = start_daemon(run_dir, name)
    assert code == 1, out
    assert path in out and found in out and "remove it" in out and "Traceback" not in out
    assert kind_of(path) == kind  # nothing deleted, nothing replaced
    if kind == "symlink":
        with open(os.path.join(run_dir, "target")) as f:
            assert f.read() == "keep me\n"
    left = sorted(f for f in os.listdir(run_dir) if f.startswith(name))
    assert left == [name + suffix]


def test_a_daemon_refused_for_a_taken_name_leaves_the_runnings_files(daemon: Daemon) -> None:
    note = daemon.socket_path + ".refusing"  # as the running daemon writes it when out of fds
    make_file(note)
    code, out = start_daemon(daemon.run_dir, daemon.name)
    assert code == 1 and "already running" in out, out
    assert os.path.exists(note) and os.path.exists(daemon.socket_path)
    os.unlink(note)
    assert daemon.client().ping()


def test_detach_does_not_write_its_log_through_a_symlink(run_dir: str, name: str) -> None:
    victim = os.path.join(run_dir, "victim.txt")
    make_file(victim)
    log = os.path.join(run_dir, f"{name}.log")
    os.symlink(victim, log)
    result = subprocess.run(
        [sys.executable, "-m", "shmarena", "daemon", "--size", "8M", "--detach"],
        env=subprocess_env(run_dir, name),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode == 0:  # it started: stop it before failing
        subprocess.run([sys.executable, "-m", "shmarena", "shutdown"],
                       env=subprocess_env(run_dir, name), timeout=30)  # fmt: skip
        wait_for(lambda: not os.path.exists(f"/dev/shm/shmarena-{name}"), what="arena removed")
    assert result.returncode == 1, result.stdout + result.stderr
    assert log in result.stderr and "symlink" in result.stderr
    with open(victim) as f:
        assert f.read() == "keep me\n"


# -- the client checks before it connects --------------------------------------


def test_client_refuses_a_runtime_dir_writable_by_others(daemon: Daemon) -> None:
    os.chmod(daemon.run_dir, 0o777)
    try:
        with pytest.raises(shmarena.DaemonUnavailable) as caught:
            shmarena.connect(daemon.name, runtime_dir=daemon.run_dir, timeout_s=2.0)
    finally:
        os.chmod(daemon.run_dir, 0o700)
    message = str(caught.value)
    assert daemon.run_dir in message and "drwxrwxrwx" in message and "writable" in message
    assert "chmod" in message
    assert daemon.client().ping()


def test_client_refuses_a_symlinked_runtime_dir(daemon: Daemon, tmp_path) -> None:
    link = str(tmp_path / "link")
    os.symlink(daemon.run_dir, link)
    with pytest.raises(shmarena.DaemonUnavailable) as caught:
        shmarena.connect(daemon.name, runtime_dir=link, timeout_s=2.0)
    assert link in str(caught.value) and "symlink" in str(caught.value)


def test_client_refuses_a_socket_that_is_not_a_socket(run_dir: str) -> None:
    name = unique_name()
    make_file(os.path.join(run_dir, f"{name}.sock"))
    with pytest.raises(shmarena.DaemonUnavailable) as caught:
        shmarena.connect(name, runtime_dir=run_dir, timeout_s=2.0)
    assert f"{name}.sock" in str(caught.value) and "not a socket" in str(caught.value)


def test_a_fifo_in_place_of_the_refusal_note_does_not_hang_the_client(run_dir: str) -> None:
    name = unique_name()
    make_fifo(os.path.join(run_dir, f"{name}.sock.refusing"))
    child = subprocess.run(
        [sys.executable, "-c",
         "import shmarena, sys\n"
         "try:\n"
         "    shmarena.connect(sys.argv[1], runtime_dir=sys.argv[2], timeout_s=2.0)\n"
         "except shmarena.DaemonUnavailable as error:\n"
         "    print(f'refused: {error}')\n",
         name, run_dir],
        env=subprocess_env(run_dir, name), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert child.stdout.startswith("refused: ") and "does not exist" in child.stdout, (
        child.stdout + child.stderr
    )


@needs_root
def test_client_refuses_a_socket_of_another_uid(daemon: Daemon) -> None:
    os.chown(daemon.socket_path, NOBODY, NOBODY)
    try:
        with pytest.raises(shmarena.DaemonUnavailable) as caught:
            shmarena.connect(daemon.name, runtime_dir=daemon.run_dir, timeout_s=2.0)
    finally:
        os.chown(daemon.socket_path, 0, 0)
    assert daemon.socket_path in str(caught.value) and f"uid {NOBODY}" in str(caught.value)


@needs_root
def test_client_does_not_map_a_segment_of_another_uid(daemon: Daemon) -> None:
    with pytest.raises(shmarena.ShmArenaError) as caught:
        map_segment(shm_name(daemon.name), 8 << 20, owner_uid=NOBODY)
    assert daemon.shm_path in str(caught.value) and "uid 0" in str(caught.value)


# A daemon of another uid in the default runtime dir of this one: it got to
# $XDG_RUNTIME_DIR/shmarena (or /tmp/shmarena-<uid>) first.
@needs_root
def test_a_squatted_default_runtime_dir_is_refused_and_nothing_mapped(run_dir: str) -> None:
    os.chmod(run_dir, 0o755)  # the other uid must reach its dir inside
    xdg = os.path.join(run_dir, "xdg")
    os.mkdir(xdg)
    os.chown(xdg, NOBODY, NOBODY)
    squatted = os.path.join(xdg, "shmarena")
    name = unique_name()
    attacker_env = subprocess_env(squatted, name)
    squatter = subprocess.Popen(
        [sys.executable, "-c", AS_NOBODY, "daemon", "--size", "8M"],
        env=attacker_env, cwd="/",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        sock = os.path.join(squatted, f"{name}.sock")
        wait_for(lambda: os.path.exists(sock) or squatter.poll() is not None, timeout_s=30,
                 what="the squatter's socket")  # fmt: skip
        assert squatter.poll() is None, squatter.communicate()[0]
        victim_env = {k: v for k, v in os.environ.items() if k != "SHMARENA_RUNTIME_DIR"}
        victim_env.update(XDG_RUNTIME_DIR=xdg, SHMARENA_NAME=name)
        victim_env["PYTHONPATH"] = REPO + os.pathsep + victim_env.get("PYTHONPATH", "")
        victim = subprocess.run(
            [sys.executable, "-c",
             "import shmarena, sys\n"
             "try:\n"
             "    shmarena.connect(timeout_s=3.0).alloc(4096).view[:4] = b'oops'\n"
             "    print('connected')\n"
             "except shmarena.DaemonUnavailable as error:\n"
             "    print(f'refused: {error}')\n"
             "maps = open('/proc/self/maps').read()\n"
             "print('mapped' if '/dev/shm/shmarena-' in maps else 'nothing mapped')\n"],
            env=victim_env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        out = victim.stdout
        assert out.startswith("refused: "), out + victim.stderr
        assert squatted in out and f"uid {NOBODY}" in out and "nothing mapped" in out
    finally:
        squatter.send_signal(signal.SIGTERM)
        squatter.communicate(timeout=30)
    assert not os.path.exists(f"/dev/shm/shmarena-{name}")


# -- started from the parent of a clone ---------------------------------------


@pytest.fixture
def shadowing_cwd(tmp_path) -> str:
    """A directory holding a folder `shmarena` that is not the package (as the
    parent of a git clone does); importing it fails loudly."""
    fake = tmp_path / "shmarena"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('the cwd shadowed the package')\n")
    return str(tmp_path)


def console_script() -> str:
    return os.path.join(os.path.dirname(sys.executable), "shmarena")


def test_detach_works_from_a_directory_that_holds_a_shmarena_folder(
    run_dir: str, shadowing_cwd: str
) -> None:
    name = unique_name()
    env = subprocess_env(run_dir, name)
    result = subprocess.run(
        [console_script(), "daemon", "--size", "8M", "--detach", "--backing", "arena.bin"],
        env=env, cwd=shadowing_cwd, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        # the relative --backing still means the file in the directory the user was in
        assert os.path.exists(os.path.join(shadowing_cwd, "arena.bin"))
    finally:
        subprocess.run([sys.executable, "-m", "shmarena", "shutdown"], env=env, timeout=30)
    wait_for(lambda: not os.path.exists(os.path.join(run_dir, f"{name}.sock")),
             what="the socket removed")  # fmt: skip


def test_demo_works_from_a_directory_that_holds_a_shmarena_folder(
    run_dir: str, shadowing_cwd: str
) -> None:
    name = unique_name("demo")
    small = ["--producers", "2", "--batches", "2", "--frames", "2", "--frame-size", "64K"]
    result = subprocess.run(
        [console_script(), "--name", name, "--runtime-dir", run_dir, "demo", *small,
         "--size", "8M"],
        env=subprocess_env(run_dir, name), cwd=shadowing_cwd, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "leaked: 0 bytes" in result.stdout
    assert not os.path.exists(f"/dev/shm/shmarena-{name}")
