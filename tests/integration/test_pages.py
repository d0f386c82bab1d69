"""Where the arena's pages are: NUMA binding and huge pages, each read back
from the kernel (the daemon's own `stats` and, independently, the test's own
reading of /proc/<daemon pid>/numa_maps and smaps).

The huge page tests change machine settings (nr_hugepages, a hugetlbfs
mount, transparent_hugepage/shmem_enabled) and put every one back, also
when they fail. They need root and writable /proc/sys and /sys; where that
is missing they skip, saying why.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import shmarena
from shmarena.shm import hugepages, numa
from tests.conftest import Daemon, unique_name, wait_for

MiB = 1 << 20


def vma_lines(pid: int, where: str) -> tuple[str, dict[str, int]]:
    """The test's own reading: the daemon's numa_maps line for the mapping
    of `where`, and that mapping's smaps figures (kB as bytes)."""
    with open(f"/proc/{pid}/numa_maps") as f:
        line = next(line for line in f if where in line)
    start = int(line.split()[0], 16)
    with open(f"/proc/{pid}/smaps") as f:
        figures = numa.parse_smaps(f.read(), start, start + 1)
    return line, figures


def node_pages(line: str) -> dict[int, int]:
    return {
        int(word[1:].split("=")[0]): int(word.split("=")[1])
        for word in line.split()
        if word.startswith("N") and word[1:2].isdigit()
    }


# -- NUMA ------------------------------------------------------------------------


def test_numa_node_0_binds_every_page_before_the_first_touch(
    make_daemon: Callable[..., Daemon],
) -> None:
    """--numa-node 0: no page of the arena existed when mbind ran (mincore
    said 0), and afterwards the kernel puts every page on node 0 under the
    bind policy; the daemon runs on node 0's CPUs and clients learn both."""
    topology = numa.read_topology()
    daemon = make_daemon("64M", ["--numa-node", "0"])
    client = daemon.client()
    stats = client.stats()
    placement = stats["numa"]
    assert placement["requested"]["policy"] == "bind"
    assert placement["requested"]["nodes"] == [0]
    assert placement["resident_pages_at_bind"] == 0  # bound before anything was allocated
    assert placement["policy"] == "bind:0"  # as numa_maps reports it
    assert placement["bytes_by_node"] == {"0": 64 * MiB}
    assert placement["daemon_cpus"] == sorted(topology.nodes[0].cpus)
    assert stats["pages"]["mapped_bytes"] == 64 * MiB  # pre-faulted
    # The test's own reading of the kernel's files, not the daemon's.
    line, smaps = vma_lines(stats["pid"], daemon.shm_path)
    assert " bind:0 " in line
    page = smaps["KernelPageSize"]
    assert node_pages(line) == {0: 64 * MiB // page}
    print(f"FIGURE: --numa-node 0: {line.strip()}")
    assert client.numa_nodes == [0]
    script = (
        "import shmarena, os, sys\n"
        "c = shmarena.connect()\n"
        "print(sorted(c.pin_to_arena()), sorted(os.sched_getaffinity(0)))\n"
        "c.close()\n"
    )
    child = daemon.python(script, stdout=subprocess.PIPE)
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    expected = str(sorted(topology.nodes[0].cpus))
    assert out.strip() == f"{expected} {expected}"


def test_numa_node_that_does_not_exist_is_refused(run_dir: str) -> None:
    """--numa-node 7 on a machine without node 7 exits 1 and lists the nodes
    it has; nothing is left behind."""
    name = unique_name()
    daemon = Daemon(name, run_dir, "16M", ["--numa-node", "7"])
    result = subprocess.run(
        [sys.executable, "-m", "shmarena", "daemon", "--size", "16M", "--numa-node", "7"],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    topology = numa.read_topology()
    assert "--numa-node 7" in result.stderr
    assert "does not exist" in result.stderr
    for node in topology.ids:
        assert f"node {node} (cpus" in result.stderr
    print(f"FIGURE: --numa-node 7: {result.stderr.strip()}")
    daemon.assert_clean()


def test_numa_interleave_spreads_over_every_node(make_daemon: Callable[..., Daemon]) -> None:
    """--numa-interleave: the interleave policy over all nodes with memory,
    read back; every page is on one of them."""
    nodes = numa.read_topology().with_memory
    daemon = make_daemon("32M", ["--numa-interleave"])
    stats = daemon.client().stats()
    assert stats["numa"]["policy"] == "interleave:" + numa.format_cpulist(nodes)
    assert sum(stats["numa"]["bytes_by_node"].values()) == 32 * MiB
    assert set(stats["numa"]["bytes_by_node"]) <= {str(n) for n in nodes}


def test_numa_options_with_a_backing_file_are_a_usage_error(run_dir: str) -> None:
    daemon = Daemon(unique_name(), run_dir, "16M")
    result = subprocess.run(
        [sys.executable, "-m", "shmarena", "daemon", "--backing", f"{run_dir}/a.arena",
         "--numa-node", "0"],
        env=daemon.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--backing" in result.stderr and "--numa-node" in result.stderr
    assert not os.path.exists(f"{run_dir}/a.arena")


def test_the_default_arena_reports_its_pages_unbound(daemon: Daemon) -> None:
    """Without NUMA options the policy is the kernel's default and nothing
    claims to be bound."""
    stats = daemon.client().stats()
    assert stats["numa"]["requested"] is None
    assert stats["numa"]["policy"] == "default"
    assert stats["pages"]["kind"] == "shm"
    assert stats["pages"]["page_bytes"] == os.sysconf("SC_PAGE_SIZE")
    with pytest.raises(shmarena.ShmArenaError, match="--numa-node"):
        daemon.client().pin_to_arena()


# -- huge pages ------------------------------------------------------------------

NR = hugepages.NR_HUGEPAGES
SHMEM = hugepages.SHMEM_ENABLED


def _can_change_settings() -> str:
    """Why this process cannot change the huge page settings ("" if it can)."""
    if os.geteuid() != 0:
        return "changing nr_hugepages, mounts and shmem_enabled needs root"
    for path in (NR, SHMEM):
        if not os.access(path, os.W_OK):
            return f"{path} is not writable here (a container without the right)"
    return ""


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@contextlib.contextmanager
def machine_settings(nr_hugepages: int | None, shmem: str | None) -> Iterator[None]:
    """Set nr_hugepages and shmem_enabled for the test; put both back."""
    why = _can_change_settings()
    if why:
        pytest.skip(why)
    with open(NR) as f:
        old_nr = f.read().strip()
    with open(SHMEM) as f:
        old_shmem = hugepages.selected(f.read())
    try:
        if nr_hugepages is not None:
            _write(NR, str(nr_hugepages))
        if shmem is not None:
            _write(SHMEM, shmem)
        yield
    finally:
        _write(NR, old_nr)
        _write(SHMEM, old_shmem)


@contextlib.contextmanager
def stopped_after(daemon: Daemon) -> Iterator[Daemon]:
    """The daemon is stopped on the way out, also when the test fails, so
    that the hugetlbfs mount around it can be unmounted."""
    try:
        yield daemon
    finally:
        daemon.stop()


@contextlib.contextmanager
def hugetlbfs_mount() -> Iterator[str]:
    point = tempfile.mkdtemp(prefix="shma-huge-")
    result = subprocess.run(
        ["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", point],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        os.rmdir(point)
        pytest.skip(f"cannot mount hugetlbfs here: {result.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", point], check=False)
        os.rmdir(point)


def _other_huge_pages() -> str:
    """Huge pages this machine offers already (a mount with free pages, or
    THP for /dev/shm): they would be chosen instead of what a test sets up."""
    survey = hugepages.survey()
    if survey.devshm_huge != "never":
        return f"/dev/shm is mounted huge={survey.devshm_huge}"
    for point, page in survey.mounts:
        pool = survey.pools.get(page)
        if pool is not None and pool.available:
            return f"hugetlbfs at {point} has free pages"
    return ""


def stats_of(daemon: Daemon) -> dict[str, Any]:
    """`shmarena stats --json`: this process maps nothing (a client would map
    the arena, and a mapping of a hugetlbfs file keeps its mount busy)."""
    return json.loads(daemon.cli("stats", "--json", check=True).stdout)  # type: ignore[no-any-return]


HOLDER = """
import shmarena, sys
c = shmarena.connect(cache=False)
big = c.alloc(40 << 20)
big.view[-1] = 7
print(big.segment, *big.handle, flush=True)
sys.stdin.readline()
big.free()
c.close()
"""

READER = """
import shmarena, sys
c = shmarena.connect()
b = c.attach(shmarena.Handle(*map(int, sys.argv[1:])))
print(b.view[-1], b.segment)
"""


def test_hugepages_on_hugetlbfs_read_back_from_smaps(make_daemon: Callable[..., Daemon]) -> None:
    """With 2 MiB pages reserved and hugetlbfs mounted, --hugepages puts the
    arena (and a segment added by growth) on them: smaps of the daemon says
    2048 kB pages and Shared_Hugetlb for all of it, and a client's writes
    reach a second process through them. Clients run in child processes so
    that the mount is free again when they are gone."""
    if hugepages.survey().mounts:
        pytest.skip("hugetlbfs is mounted already; the daemon might pick that mount")
    with machine_settings(nr_hugepages=80, shmem=None), hugetlbfs_mount() as point:
        options = ["--hugepages", "--max-size", "96M", "--shrink-after", "0"]
        with stopped_after(make_daemon("32M", options)) as daemon:
            stats = stats_of(daemon)
            assert stats["pages"]["kind"] == "hugetlbfs"
            assert stats["pages"]["page_bytes"] == 2 * MiB
            assert stats["pages"]["huge_bytes"] == 32 * MiB
            path = os.path.join(point, os.path.basename(daemon.shm_path))
            assert stats["segments"][0]["where"] == path, (stats["segments"][0]["where"], path)
            _, smaps = vma_lines(stats["pid"], path)
            assert smaps["KernelPageSize"] == 2 * MiB
            assert smaps["Shared_Hugetlb"] + smaps["Private_Hugetlb"] == 32 * MiB
            # Growth adds a segment on huge pages too.
            holder = daemon.python(HOLDER, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            try:
                assert holder.stdout is not None and holder.stdin is not None
                segment, *handle = holder.stdout.readline().split()
                assert segment == "1"
                stats = stats_of(daemon)
                assert stats["pages"]["huge_bytes"] == stats["size_bytes"] == 96 * MiB
                reader = daemon.python(READER, *handle, stdout=subprocess.PIPE)
                out, _ = reader.communicate(timeout=30)
                assert out.split() == ["7", "1"]
                holder.stdin.write("done\n")
                holder.stdin.flush()
                assert holder.wait(timeout=30) == 0
            finally:
                holder.kill()
                holder.wait()
            print(
                f"FIGURE: hugetlbfs: {stats['pages']['huge_bytes'] >> 20} MiB on "
                f"{stats['pages']['page_bytes'] >> 10} kB pages in "
                f"{len(stats['segments'])} segments"
            )
            daemon.stop()
            daemon.assert_clean()
            assert not [f for f in os.listdir(point) if f.startswith("shmarena-")]


def test_hugepages_as_shmem_thp_read_back_from_smaps(make_daemon: Callable[..., Daemon]) -> None:
    """No reserved pages, but shmem_enabled = advise: the arena is a memfd on
    transparent huge pages; smaps of the daemon shows all of it PMD-mapped,
    and a client maps it and shares bytes with another process."""
    other = _other_huge_pages()
    if other:
        pytest.skip(f"{other}: the daemon would use those instead")
    with machine_settings(nr_hugepages=0, shmem="advise"):
        daemon = make_daemon("32M", ["--hugepages"])
        client = daemon.client(cache=False)
        stats = client.stats()
        assert stats["pages"]["kind"] == "thp-memfd"
        assert stats["pages"]["page_bytes"] == numa.pmd_bytes()
        assert stats["pages"]["huge_bytes"] == 32 * MiB
        where = stats["segments"][0]["where"]
        assert where.startswith(f"/proc/{stats['pid']}/fd/")
        with open(f"/proc/{stats['pid']}/smaps") as f:
            text = f.read()
        start = next(
            int(line.split("-")[0], 16)
            for line in text.splitlines()
            if "memfd:shmarena-" in line and daemon.name in line
        )
        smaps = numa.parse_smaps(text, start, start + 1)
        assert smaps["ShmemPmdMapped"] == 32 * MiB
        buf = client.alloc(4 * MiB)
        buf.view[:5] = b"huge!"
        assert daemon.read_in_child(buf.handle, 5) == b"huge!"
        print(f"FIGURE: shmem THP: ShmemPmdMapped {smaps['ShmemPmdMapped'] >> 20} MiB of 32 MiB")


def test_hugepages_refused_with_what_to_change(run_dir: str) -> None:
    """Neither reserved pages nor shmem THP: the daemon exits 1 and names
    each setting and the command that changes it."""
    other = _other_huge_pages()
    if other:
        pytest.skip(f"{other}: huge pages are available, so there is nothing to refuse")
    with machine_settings(nr_hugepages=0, shmem="never"):
        daemon = Daemon(unique_name(), run_dir, "64M")
        result = subprocess.run(
            [sys.executable, "-m", "shmarena", "daemon", "--size", "64M", "--hugepages"],
            env=daemon.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 1
        message = result.stderr
        for needed in (
            "/proc/sys/vm/nr_hugepages is 0",
            "echo 32 > /proc/sys/vm/nr_hugepages",
            "shmem_enabled is [never]",
            f"echo advise > {SHMEM}",
            "without --hugepages",
        ):
            assert needed in message, f"{needed!r} missing from: {message}"
        if not hugepages.survey().mounts:
            assert "mount -t hugetlbfs -o pagesize=2M none /dev/hugepages" in message
        print(f"FIGURE: refusal: {message.strip()}")
        daemon.assert_clean()


GROW_PAST_PAGES = """
import shmarena
c = shmarena.connect(cache=False)
first = c.alloc(30 << 20)
try:
    c.alloc(30 << 20)
except shmarena.OutOfMemory as e:
    print("refused:", e)
first.free()
c.close()
"""


def test_growth_without_free_huge_pages_is_out_of_memory_saying_why(
    make_daemon: Callable[..., Daemon],
) -> None:
    """Only the first segment's huge pages are reserved: growing needs more,
    the new segment cannot be made, and the request gets OutOfMemory that
    says why; the daemon goes on serving and nothing is left behind."""
    if hugepages.survey().mounts:
        pytest.skip("hugetlbfs is mounted already; the daemon might pick that mount")
    # Two withs: the mount is checked empty after the daemon stopped, before it goes.
    with machine_settings(nr_hugepages=16, shmem=None), hugetlbfs_mount() as point:  # noqa: SIM117
        with stopped_after(make_daemon("32M", ["--hugepages", "--max-size", "128M"])) as daemon:
            child = daemon.python(GROW_PAST_PAGES, stdout=subprocess.PIPE)
            out, _ = child.communicate(timeout=60)
            assert child.returncode == 0
            assert out.startswith("refused:"), out
            assert "adding a segment failed" in out and "huge pages" in out, out
            print(f"FIGURE: {out.strip()}")
            assert stats_of(daemon)["segments"][0]["size_bytes"] == 32 * MiB
            assert len(stats_of(daemon)["segments"]) == 1
            assert daemon.cli("check").returncode == 0
            daemon.stop()
            daemon.assert_clean()
            assert os.listdir(point) == []


def test_memfd_segments_released_and_added_again_stay_distinct(
    make_daemon: Callable[..., Daemon],
) -> None:
    """Shmem THP segments are memfds reached as /proc/<daemon>/fd/<n>, and a
    released segment's descriptor number comes back for the next one: a
    client that mapped the old segment must still map the new one anew, so
    that another process sees what it writes there."""
    other = _other_huge_pages()
    if other:
        pytest.skip(f"{other}: the daemon would use those instead")
    with machine_settings(nr_hugepages=0, shmem="advise"):
        daemon = make_daemon("16M", ["--hugepages", "--max-size", "128M", "--shrink-after", "0.2"])
        client = daemon.client(cache=False)
        first = client.alloc(20 * MiB)
        assert first.segment == 1
        old_where = client.stats()["segments"][1]["where"]
        first.free()
        wait_for(lambda: len(client.stats()["segments"]) == 1, timeout_s=30, what="release")
        second = client.alloc(20 * MiB)
        assert second.segment == 2
        assert client.stats()["segments"][1]["where"] == old_where  # the same fd number
        second.view[:6] = b"fresh!"
        assert daemon.read_in_child(second.handle, 6) == b"fresh!"
        second.free()
