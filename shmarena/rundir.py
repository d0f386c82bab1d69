"""Whether the runtime dir, and the files in it, may be trusted. I/O only.

The runtime dir holds the socket a client connects to and the files the
daemon writes (lock, log, `.refusing` note). Whoever controls the dir
controls all of that, so both sides check it before they use it:

- the daemon creates it (0700; with --group 0750 to that group) and may set
  the mode and group only of a dir it has just created. An existing one must
  be a real directory (not a symlink), owned by the daemon's uid, and not
  writable by group or others; an existing one too narrow for --group is
  refused with the command that widens it. Nothing is ever chmod'ed.
- every file the daemon opens there is opened with O_NOFOLLOW, and anything
  of the wrong kind in its place is refused with a message, never deleted.
- a client accepts the dir when it is a real directory, not writable by
  group or others, and owned by this user; or, for a dir named explicitly
  (SHMARENA_RUNTIME_DIR, `runtime_dir=`, `--runtime-dir`) that is not one of
  this user's default dirs, owned by another uid whose group this process
  is in (a --group daemon). The socket must be a socket owned by the dir's
  owner; so must every segment the daemon names (see `check_owner`).

The rules live here once; the daemon, the cli package and the client call them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping

from shmarena.config import runtime_dir
from shmarena.errors import DaemonStartError, DaemonUnavailable, ShmArenaError

# Mode bits that let someone other than the owner add, remove or rename files.
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def describe(st: os.stat_result) -> str:
    """`mode drwx------, owner uid 0, group gid 0` for messages."""
    return f"mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}, group gid {st.st_gid}"


def kind(st: os.stat_result) -> str:
    """What a file is, in words: directory, symlink, FIFO, socket, ..."""
    mode = st.st_mode
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "a special file"


# -- the daemon ---------------------------------------------------------------


def prepare_runtime_dir(run_dir: str, gid: int | None = None) -> None:
    """Create the runtime dir, or check the one that is there (see the module
    docstring); DaemonStartError saying what was found and what to do."""
    parent = os.path.dirname(run_dir.rstrip("/")) or "/"
    exists = False
    try:
        if not os.path.isdir(parent):
            os.makedirs(parent)
        os.mkdir(run_dir, 0o700)
    except FileExistsError:
        exists = os.path.lexists(run_dir)
        failure = "its parent is not a directory"
    except OSError as exc:
        failure = exc.strerror or str(exc)
    else:
        failure = ""
    if exists:
        _check_existing(run_dir, gid)
        return
    if failure:
        raise DaemonStartError(
            f"cannot create runtime dir {run_dir}: {failure}; create it (mode 0700) or "
            "point SHMARENA_RUNTIME_DIR / --runtime-dir at a directory of your own"
        )
    # Ours: set the mode (mkdir's is cut by the umask) and group through a
    # descriptor of the very dir just made, never through the path again.
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():  # replaced in between: never touch it
            raise DaemonStartError(
                f"runtime dir {run_dir} changed owner while it was being created "
                f"({describe(st)}); remove it and start again"
            )
        if gid is not None:
            os.fchown(fd, -1, gid)
        os.fchmod(fd, 0o700 if gid is None else 0o750)
    finally:
        os.close(fd)


def _check_existing(run_dir: str, gid: int | None) -> None:
    st = os.lstat(run_dir)
    uid = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        raise DaemonStartError(
            f"runtime dir {run_dir} is a symlink (to {os.readlink(run_dir)}); a runtime dir "
            "must be a real directory: point SHMARENA_RUNTIME_DIR / --runtime-dir at the "
            "directory itself, or remove the link and let the daemon create the dir"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise DaemonStartError(
            f"runtime dir {run_dir} is not a directory but {kind(st)} ({describe(st)}); "
            "remove it or point SHMARENA_RUNTIME_DIR / --runtime-dir elsewhere"
        )
    if st.st_uid != uid:
        raise DaemonStartError(
            f"runtime dir {run_dir} belongs to uid {st.st_uid}, not to this user ({uid}) "
            f"({describe(st)}); another user may have created it first. Set "
            "SHMARENA_RUNTIME_DIR (or --runtime-dir) to a directory of your own"
        )
    if st.st_mode & _OTHERS_WRITE:
        raise DaemonStartError(
            f"runtime dir {run_dir} is writable by others ({describe(st)}): anyone could "
            "replace the daemon's socket or lock there. The daemon does not change a dir it "
            f"did not create; use a private one (SHMARENA_RUNTIME_DIR / --runtime-dir), or "
            f"`chmod go-w {run_dir}` if it is yours alone"
        )
    if gid is not None and (st.st_gid != gid or st.st_mode & 0o050 != 0o050):
        raise DaemonStartError(
            f"runtime dir {run_dir} is not open to group {gid} ({describe(st)}), so its "
            "members could not reach the socket. The daemon does not change a dir it did not "
            f"create: run `chgrp {gid} {run_dir} && chmod 0750 {run_dir}`, or remove the dir "
            "and let the daemon create it"
        )


def open_in_run_dir(path: str, flags: int, what: str, mode: int = 0o600) -> int:
    """Open a file of the daemon's in its runtime dir: never through a symlink,
    never a FIFO or device (O_NONBLOCK, then a regular file checked), only
    one of this user. DaemonStartError saying what is there instead."""
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        try:
            st = os.lstat(path)
        except OSError:
            raise DaemonStartError(f"cannot open the {what} {path}: {exc.strerror}") from None
        raise _wrong_kind(path, st, what) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise _wrong_kind(path, st, what)
    os.set_blocking(fd, True)
    return fd


def _wrong_kind(path: str, st: os.stat_result, what: str) -> DaemonStartError:
    if stat.S_ISREG(st.st_mode):
        found = f"a file of another user ({describe(st)})"
    else:
        found = f"{kind(st)} ({describe(st)})"
    remove = "rm -r" if stat.S_ISDIR(st.st_mode) else "rm"
    return DaemonStartError(
        f"the {what} {path} is {found}, not a regular file of this user; the daemon does not "
        f"use or delete it. Find out who put it there, remove it (`{remove} {path}`) and "
        "start again"
    )


def clear_socket_path(path: str) -> bool:
    """Make room for the daemon's socket: unlink a stale socket (the caller
    holds the lock, so no daemon of this name listens on it), refuse anything
    else. Whether a stale socket was removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid():
        os.unlink(path)
        return True
    found = "a socket of another user" if stat.S_ISSOCK(st.st_mode) else kind(st)
    remove = "rm -r" if stat.S_ISDIR(st.st_mode) else "rm"
    raise DaemonStartError(
        f"the socket path {path} is taken by {found} ({describe(st)}); the daemon does not "
        f"delete it. Find out who put it there, remove it (`{remove} {path}`) and start again"
    )


def write_note(path: str, text: str) -> bool:
    """Write a short note for clients (the `.refusing` file) in the runtime
    dir, as `open_in_run_dir` opens files. A note is a courtesy: whether it
    was written, never an exception while serving."""
    try:
        fd = open_in_run_dir(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "note")
    except (DaemonStartError, OSError):
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


# -- the client ---------------------------------------------------------------


def default_dirs(env: Mapping[str, str], uid: int) -> set[str]:
    """This user's runtime dirs when none is named: these must be its own."""
    without = {k: v for k, v in env.items() if k != "SHMARENA_RUNTIME_DIR"}
    return {runtime_dir(without, uid), runtime_dir({}, uid)}


def check_runtime_dir(run_dir: str, name: str, socket_path: str) -> int | None:
    """The uid that owns a trusted runtime dir (the daemon's), or
    DaemonUnavailable naming the path, what was found and what to do.
    None when the dir does not exist (the caller says no daemon is there)."""
    try:
        st = os.lstat(run_dir)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DaemonUnavailable(
            f"cannot reach daemon {name!r}: cannot look at its runtime dir {run_dir}: "
            f"{exc.strerror}",
            socket_path=socket_path,
        ) from None
    uid, gid = os.geteuid(), os.getegid()
    runs_as = f"this process runs as uid {uid}, gid {gid}"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise DaemonUnavailable(
            f"not connecting to daemon {name!r}: its runtime dir {run_dir} is {kind(st)}, not "
            f"a real directory ({describe(st)}); point SHMARENA_RUNTIME_DIR (or runtime_dir=) "
            "at the daemon's directory itself",
            socket_path=socket_path,
        )
    if st.st_uid != uid:
        if run_dir.rstrip("/") in default_dirs(os.environ, os.getuid()):
            raise DaemonUnavailable(
                f"not connecting to daemon {name!r}: the runtime dir {run_dir} belongs to "
                f"uid {st.st_uid}, not to this user ({describe(st)}; {runs_as}); another "
                "user may have created it first to serve a daemon of its own. Remove it (as "
                "root) or set SHMARENA_RUNTIME_DIR to a directory of your own",
                socket_path=socket_path,
            )
        if st.st_gid != gid and st.st_gid not in os.getgroups():
            raise DaemonUnavailable(
                f"cannot reach daemon {name!r}: its runtime dir {run_dir} belongs to another "
                f"user and this process is not in its group ({describe(st)}; {runs_as}); run "
                "as the daemon's user, or start the daemon with --group G and run as a "
                "member of G",
                socket_path=socket_path,
            )
    if st.st_mode & _OTHERS_WRITE:
        raise DaemonUnavailable(
            f"not connecting to daemon {name!r}: its runtime dir {run_dir} is writable by "
            f"others ({describe(st)}), so anyone could have put the socket there. Its owner "
            f"should `chmod go-w {run_dir}` (a daemon only creates private ones) or use "
            "another SHMARENA_RUNTIME_DIR",
            socket_path=socket_path,
        )
    return st.st_uid


def check_socket(socket_path: str, name: str, owner_uid: int) -> None:
    """DaemonUnavailable unless `socket_path` is a socket of `owner_uid`
    (the runtime dir's owner). A missing one is left to the caller."""
    try:
        st = os.lstat(socket_path)
    except OSError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise DaemonUnavailable(
            f"not connecting to daemon {name!r}: {socket_path} is {kind(st)}, not a socket "
            f"({describe(st)}); remove it and start the daemon again",
            socket_path=socket_path,
        )
    if st.st_uid != owner_uid:
        raise DaemonUnavailable(
            f"not connecting to daemon {name!r}: its socket {socket_path} belongs to uid "
            f"{st.st_uid}, not to uid {owner_uid} who owns the runtime dir ({describe(st)}); "
            "remove it and start the daemon again",
            socket_path=socket_path,
        )


def check_owner(fd: int, path: str, owner_uid: int | None) -> None:
    """ShmArenaError unless the open segment `fd` is a regular file of
    `owner_uid`, the daemon's uid (None: not checked). A client maps only
    what its daemon made, never a file some other user named."""
    if owner_uid is None:
        return
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != owner_uid:
        raise ShmArenaError(
            f"not mapping {path}: it is {kind(st)} of uid {st.st_uid} ({describe(st)}), but "
            f"the daemon runs as uid {owner_uid} and maps only files of its own; the daemon "
            "or its runtime dir is not what it should be (check who runs it)"
        )
