"""Which kind of huge pages can back the arena here, or exactly why none can.
`plan` is pure (it takes what `survey` read from /proc and /sys); `survey`
does the reading.

In order of preference:

1. **hugetlbfs**: a file on a mounted hugetlbfs with enough free reserved
   pages. The pages are set aside by the administrator
   (``/proc/sys/vm/nr_hugepages``), so they are there when asked for, and
   `fallocate` takes them all at start (a shortage fails then, not later).
2. **transparent huge pages on /dev/shm**: when its tmpfs mount says
   ``huge=always|within_size|advise``, or ``shmem_enabled`` is ``force``.
3. **transparent huge pages on a memfd**: ``shmem_enabled`` (which governs
   the kernel's internal shm mount, not /dev/shm) is ``always``,
   ``within_size`` or ``advise``. Clients open the daemon's descriptor
   through ``/proc/<pid>/fd/<n>``, which only the daemon's own user may do,
   so this kind is refused with ``--group``.

With transparent huge pages the daemon marks the mapping (``madvise
MADV_HUGEPAGE``) before any page exists and pre-faults it, because pages
allocated without a mapping (fallocate) are never huge. The kernel may still
fall back to small pages when memory is fragmented; `stats` says how many
bytes really sit on huge pages, read from ``smaps``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from shmarena.config import format_size
from shmarena.shm.backing import mount_entries
from shmarena.shm.numa import pmd_bytes

HUGEPAGES_SYSFS = "/sys/kernel/mm/hugepages"
SHMEM_ENABLED = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


@dataclass(frozen=True)
class Pool:
    """One size of reserved huge pages (``hugepages-2048kB``)."""

    page_bytes: int
    total: int
    free: int
    reserved: int  # promised to mappings already, not yet faulted

    @property
    def available(self) -> int:
        return max(0, self.free - self.reserved)


@dataclass(frozen=True)
class Survey:
    """What the host offers in huge pages: the reserved pools by page size, the
    hugetlbfs mounts, and the transparent huge page switches for shared memory."""

    pools: dict[int, Pool] = field(default_factory=dict)  # page bytes -> pool
    default_page_bytes: int = 2 << 20  # Hugepagesize in /proc/meminfo
    mounts: list[tuple[str, int]] = field(default_factory=list)  # hugetlbfs (point, page bytes)
    shmem_enabled: str = "never"  # the bracketed word of shmem_enabled
    devshm_huge: str = "never"  # /dev/shm's huge= mount option
    thp_bytes: int = 2 << 20  # hpage_pmd_size


@dataclass(frozen=True)
class Plan:
    """How the arena will get huge pages: reserved ones from a hugetlbfs mount, or
    transparent ones on /dev/shm or on a memfd."""

    kind: str  # "hugetlbfs", "thp-shm" or "thp-memfd"
    page_bytes: int
    directory: str = ""  # the hugetlbfs mount (kind "hugetlbfs")

    def describe(self) -> str:
        size = format_size(self.page_bytes)
        if self.kind == "hugetlbfs":
            return f"hugetlbfs at {self.directory} ({size} pages, reserved)"
        where = "/dev/shm" if self.kind == "thp-shm" else "a memfd"
        return f"transparent huge pages ({size}) on {where}"


def selected(word_list: str) -> str:
    """The bracketed choice of a sysfs switch: "always [advise] never" -> "advise"."""
    match = re.search(r"\[([^\]]+)\]", word_list)
    return match.group(1) if match else word_list.strip()


def plan(survey: Survey, size_bytes: int, shared_with_group: bool) -> Plan | str:
    """The huge pages to use for an arena of `size_bytes`, or the message
    that says why there are none and what to change."""
    shortfalls: list[str] = []
    for point, page_bytes in survey.mounts:
        pool = survey.pools.get(page_bytes)
        need = -(-size_bytes // page_bytes)
        if pool is not None and pool.available >= need:
            return Plan("hugetlbfs", page_bytes, point)
        have = pool.available if pool else 0
        shortfalls.append(
            f"hugetlbfs at {point} has {have} free {format_size(page_bytes)} pages, "
            f"the arena needs {need}"
        )
    if survey.shmem_enabled == "deny":  # the kernel's off switch for every shmem mount
        return refusal(survey, size_bytes, shortfalls)
    if survey.shmem_enabled == "force" or survey.devshm_huge in ("always", "within_size", "advise"):
        return Plan("thp-shm", survey.thp_bytes)
    if survey.shmem_enabled in ("always", "within_size", "advise"):
        if shared_with_group:
            shortfalls.append(
                "transparent huge pages are allowed only for memfds (shmem_enabled is "
                f"{survey.shmem_enabled!r}, /dev/shm is mounted huge={survey.devshm_huge}), "
                "and other users cannot open the daemon's memfd, which --group needs"
            )
        else:
            return Plan("thp-memfd", survey.thp_bytes)
    return refusal(survey, size_bytes, shortfalls)


def refusal(survey: Survey, size_bytes: int, shortfalls: list[str]) -> str:
    page = survey.default_page_bytes
    need = -(-size_bytes // page)
    pool = survey.pools.get(page)
    found = [
        f"/proc/sys/vm/nr_hugepages is {pool.total if pool else 0} "
        f"({pool.available if pool else 0} of {format_size(page)} free)",
        "hugetlbfs is mounted at " + ", ".join(p for p, _ in survey.mounts)
        if survey.mounts
        else "no hugetlbfs is mounted",
        f"{SHMEM_ENABLED} is [{survey.shmem_enabled}]",
        f"/dev/shm is mounted huge={survey.devshm_huge}",
    ]
    steps = []
    if not pool or pool.available < need:
        total = (pool.total if pool else 0) + need - (pool.available if pool else 0)
        steps.append(f"reserve pages: echo {total} > {NR_HUGEPAGES}")
    if not survey.mounts:
        steps.append(
            f"mount hugetlbfs: mkdir -p /dev/hugepages && mount -t hugetlbfs "
            f"-o pagesize={page >> 20}M none /dev/hugepages"
        )
    # Transparent huge pages: the switch governs memfds (not usable with
    # --group), a huge= mount option governs /dev/shm (usable by all).
    thp = "mount -o remount,huge=advise /dev/shm"
    if survey.shmem_enabled == "deny":
        thp = f"echo advise > {SHMEM_ENABLED} (deny forbids them everywhere), then {thp}"
    elif survey.shmem_enabled not in ("always", "within_size", "advise"):
        thp = f"echo advise > {SHMEM_ENABLED}, or {thp}"
    return (
        f"--hugepages: no huge pages can back an arena of {format_size(size_bytes)} here: "
        + "; ".join(found + shortfalls)
        + ". As root, either "
        + " and ".join(steps or ["free reserved huge pages"])
        + f" (hugetlbfs, {need} pages of {format_size(page)}), or allow transparent huge "
        f"pages for shared memory: {thp}" + "; or start the daemon without --hugepages"
    )


# -- reading the machine ---------------------------------------------------------


def parse_pools(entries: dict[str, dict[str, str]]) -> dict[int, Pool]:
    """Pools from the files of each ``hugepages-<N>kB`` directory."""
    pools = {}
    for name, files in entries.items():
        match = re.fullmatch(r"hugepages-(\d+)kB", name)
        if not match:
            continue
        page = int(match.group(1)) * 1024
        counts = [files.get(key, "0").strip() for key in ("nr_hugepages", "free_hugepages",
                                                          "resv_hugepages")]  # fmt: skip
        total, free, reserved = (int(c) if c.isdigit() else 0 for c in counts)
        pools[page] = Pool(page, total, free, reserved)
    return pools


def parse_mounts(mountinfo: str, default_page_bytes: int) -> tuple[list[tuple[str, int]], str]:
    """The hugetlbfs mounts (point, page bytes) and /dev/shm's huge= option."""
    hugetlbfs: list[tuple[str, int]] = []
    devshm = "never"
    for point, fstype, options in mount_entries(mountinfo):
        if fstype == "hugetlbfs":
            size = options.get("pagesize", "")
            hugetlbfs.append((point, _page_size(size) or default_page_bytes))
        elif point == "/dev/shm" and fstype == "tmpfs":
            devshm = options.get("huge", "never") or "never"
    return hugetlbfs, devshm


def _page_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if not match:
        return 0
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]


def survey() -> Survey:
    """What this machine offers now."""
    default_page = 2 << 20
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Hugepagesize:"):
                    default_page = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    entries: dict[str, dict[str, str]] = {}
    try:
        for name in os.listdir(HUGEPAGES_SYSFS):
            keys = ("nr_hugepages", "free_hugepages", "resv_hugepages")
            read = {key: _read_or_none(os.path.join(HUGEPAGES_SYSFS, name, key)) for key in keys}
            entries[name] = {key: text for key, text in read.items() if text is not None}
    except OSError:
        pass
    try:
        with open("/proc/self/mountinfo") as f:
            mounts, devshm = parse_mounts(f.read(), default_page)
    except OSError:
        mounts, devshm = [], "never"
    try:
        with open(SHMEM_ENABLED) as f:
            shmem = selected(f.read())
    except OSError:
        shmem = "never"
    return Survey(parse_pools(entries), default_page, mounts, shmem, devshm, pmd_bytes())


def _read_or_none(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None
