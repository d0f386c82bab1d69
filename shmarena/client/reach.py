"""Whether this process may reach a daemon's socket, and why not: the checks
made before a client connects, so a refused permission or a daemon that
stopped taking clients is said as such, not as a daemon that never answers."""

from __future__ import annotations

import os
import stat

from shmarena.errors import DaemonUnavailable
from shmarena.rundir import check_runtime_dir, check_socket


def check_reachable(socket_path: str, name: str) -> int:
    """DaemonUnavailable, saying why, unless the runtime dir and the socket
    may be trusted (see shmarena.rundir), the socket exists and this process
    may connect to it (a refused permission would otherwise look like a
    daemon that never answers). The uid the daemon runs as."""
    run_dir = os.path.dirname(socket_path)
    owner_uid = check_runtime_dir(run_dir, name, socket_path)
    if not os.access(run_dir, os.X_OK) and os.path.isdir(run_dir):
        raise DaemonUnavailable(
            f"cannot reach daemon {name!r}: permission denied on its runtime dir "
            f"{run_dir} ({_describe(run_dir)}; this process runs as uid {os.getuid()}, "
            f"gid {os.getgid()}); run as the daemon's user, or start the daemon with "
            "--group G and run as a member of G",
            socket_path=socket_path,
        )
    why = refusing(socket_path)
    if why:
        raise DaemonUnavailable(why, socket_path=socket_path)
    if not os.path.exists(socket_path):
        # It may have stopped listening just now (and said why since).
        why = refusing(socket_path)
        if why:
            raise DaemonUnavailable(why, socket_path=socket_path)
        raise DaemonUnavailable(
            f"no shmarena daemon named {name!r}: socket {socket_path} does not exist; "
            f"start one with `shmarena daemon --name {name}` (or check --name, "
            "SHMARENA_NAME and SHMARENA_RUNTIME_DIR)",
            socket_path=socket_path,
        )
    if owner_uid is None:  # the dir was made after it was checked: check it now
        owner_uid = check_runtime_dir(run_dir, name, socket_path)
        if owner_uid is None:
            raise DaemonUnavailable(
                f"daemon {name!r} stopped listening on {socket_path} just now; try again",
                socket_path=socket_path,
            )
    check_socket(socket_path, name, owner_uid)
    if not os.access(socket_path, os.W_OK):
        if not os.path.exists(socket_path):  # gone between the two checks
            raise DaemonUnavailable(
                refusing(socket_path)
                or f"daemon {name!r} stopped listening on {socket_path} just now; try again",
                socket_path=socket_path,
            )
        raise DaemonUnavailable(
            f"cannot reach daemon {name!r}: permission denied on its socket {socket_path} "
            f"({_describe(socket_path)}; this process runs as uid {os.getuid()}, gid "
            f"{os.getgid()}); run as the daemon's user, or start the daemon with --group G "
            "and run as a member of G",
            socket_path=socket_path,
        )
    return owner_uid


def refusing(socket_path: str) -> str:
    """Why the daemon does not take new clients now, if it said so."""
    path = socket_path + ".refusing"
    try:  # never through a link, never blocking on a FIFO
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    with os.fdopen(fd, errors="replace") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return f.read(4096).strip()


def _describe(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot stat: {exc.strerror}"
    return f"mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}, group gid {st.st_gid}"
