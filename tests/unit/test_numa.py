"""NUMA topology, node masks and placement read back (shmarena.shm.numa).

The parsers run on recorded text: sysfs node trees of multi-node machines under
tests/unit/sysfs/<machine>/, and numa_maps / smaps of a daemon holding four
arenas (64 MiB bound to node 0, 32 MiB interleaved on transparent huge pages,
64 MiB on hugetlbfs bound to node 1, 16 MiB bound but never touched). The last
tests bind a real mapping on this machine and read its placement back.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
from pathlib import Path

import pytest

from shmarena.shm import numa
from shmarena.shm.numa import Node, Placement

SYSFS = Path(__file__).parent / "sysfs"
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
LONG_BITS = ctypes.sizeof(ctypes.c_ulong) * 8

# The four arenas of the recorded process (addresses as in numa_maps and smaps).
X_START, X_END = 0x7F3A40000000, 0x7F3A44000000  # 64 MiB, bind:0, small pages
Y_START, Y_END = 0x7F3A44000000, 0x7F3A46000000  # 32 MiB, interleave:0-1, THP
Z_START, Z_END = 0x7F3A46000000, 0x7F3A4A000000  # 64 MiB, bind:1, hugetlbfs 2 MiB
W_START, W_END = 0x7F3A4A000000, 0x7F3A4B000000  # 16 MiB, bind:0, nothing faulted

NUMA_MAPS = (
    "55d0c8a4e000 default file=/usr/bin/python3.11 mapped=105 mapmax=2"
    " N0=105 kernelpagesize_kB=4\n"
    "55d0ca1c3000 default heap anon=1520 dirty=1520 active=0 N0=1520 kernelpagesize_kB=4\n"
    "7f3a40000000 bind:0 file=/dev/shm/shmarena-x dirty=12288 mapped=16384 mapmax=2"
    " N0=16384 kernelpagesize_kB=4\n"
    "7f3a44000000 interleave:0-1 file=/dev/shm/shmarena-y dirty=8192"
    " N0=4096 N1=4096 kernelpagesize_kB=4\n"
    "7f3a46000000 bind:1 file=/dev/hugepages/shmarena-z huge dirty=32 mapmax=2"
    " N1=32 kernelpagesize_kB=2048\n"
    "7f3a4a000000 bind:0 file=/dev/shm/shmarena-w\n"
    "7f3a4b000000 default anon=2 dirty=2 active=0 N0=2 kernelpagesize_kB=4\n"
    "7ffd1c9d2000 default stack anon=33 dirty=33 active=0 N0=33 kernelpagesize_kB=4\n"
)

SMAPS = """\
55d0ca1c3000-55d0ca3e4000 rw-p 00000000 00:00 0                          [heap]
Size:               2180 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:                6080 kB
Pss:                6080 kB
Pss_Dirty:          6080 kB
Shared_Clean:          0 kB
Shared_Dirty:          0 kB
Private_Clean:         0 kB
Private_Dirty:      6080 kB
Referenced:         6080 kB
Anonymous:          6080 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
THPeligible:           0
ProtectionKey:         0
VmFlags: rd wr mr mw me ac
7f3a40000000-7f3a44000000 rw-s 00000000 00:1b 1953925                    /dev/shm/shmarena-x
Size:              65536 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:               65536 kB
Pss:               32768 kB
Pss_Dirty:         24576 kB
Shared_Clean:      16384 kB
Shared_Dirty:      49152 kB
Private_Clean:         0 kB
Private_Dirty:         0 kB
Referenced:        65536 kB
Anonymous:             0 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
THPeligible:           0
ProtectionKey:         0
VmFlags: rd wr sh mr mw me ms sd
7f3a44000000-7f3a46000000 rw-s 00000000 00:1b 1953931                    /dev/shm/shmarena-y
Size:              32768 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:               32768 kB
Pss:               32768 kB
Pss_Dirty:         32768 kB
Shared_Clean:          0 kB
Shared_Dirty:          0 kB
Private_Clean:         0 kB
Private_Dirty:     32768 kB
Referenced:        32768 kB
Anonymous:             0 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:    30720 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
THPeligible:           1
ProtectionKey:         0
VmFlags: rd wr sh mr mw me ms sd hg
7f3a46000000-7f3a4a000000 rw-s 00000000 00:2e 41                         /dev/hugepages/shmarena-z
Size:              65536 kB
KernelPageSize:     2048 kB
MMUPageSize:        2048 kB
Rss:                   0 kB
Pss:                   0 kB
Pss_Dirty:             0 kB
Shared_Clean:          0 kB
Shared_Dirty:          0 kB
Private_Clean:         0 kB
Private_Dirty:         0 kB
Referenced:            0 kB
Anonymous:             0 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:    49152 kB
Private_Hugetlb:   16384 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
THPeligible:           0
ProtectionKey:         0
VmFlags: rd wr sh mr mw me ms de ht sd
7f3a4a000000-7f3a4b000000 rw-s 00000000 00:1b 1953940                    /dev/shm/shmarena-w
Size:              16384 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:                   0 kB
Pss:                   0 kB
Pss_Dirty:             0 kB
Shared_Clean:          0 kB
Shared_Dirty:          0 kB
Private_Clean:         0 kB
Private_Dirty:         0 kB
Referenced:            0 kB
Anonymous:             0 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
THPeligible:           0
ProtectionKey:         0
VmFlags: rd wr sh mr mw me ms sd
7f3a4b000000-7f3a4b021000 rw-p 00000000 00:00 0
Size:                132 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:                   8 kB
Pss:                   8 kB
Pss_Dirty:             8 kB
Shared_Clean:          0 kB
Shared_Dirty:          0 kB
Private_Clean:         0 kB
Private_Dirty:         8 kB
Referenced:            8 kB
Anonymous:             8 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
THPeligible:           0
ProtectionKey:         0
VmFlags: rd wr mr mw me ac
"""


def machine(name: str) -> str:
    """The recorded /sys/devices/system/node tree of one machine."""
    return str(SYSFS / name)


# -- topology from recorded sysfs trees ------------------------------------------


def test_two_socket_server() -> None:
    """Both sockets are read with their interleaved SMT CPU lists and memory."""
    topology = numa.read_topology(machine("two_socket_x86"))
    assert topology.ids == [0, 1]
    assert topology.nodes[0] == Node(0, (*range(0, 16), *range(32, 48)), 131592612 * KIB)
    assert topology.nodes[1] == Node(1, (*range(16, 32), *range(48, 64)), 132120372 * KIB)
    assert topology.with_memory == [0, 1]
    assert topology.describe() == (
        "node 0 (cpus 0-15,32-47, 125.5 GiB), node 1 (cpus 16-31,48-63, 126 GiB)"
    )


def test_cpu_less_memory_node_and_memory_less_cpu_node() -> None:
    """A CXL node and a PMEM node (no CPUs) can hold pages; a socket without
    DIMMs (MemTotal 0) has CPUs but is left out of `with_memory`."""
    topology = numa.read_topology(machine("four_node_cxl"))
    assert topology.ids == [0, 1, 2, 3]
    assert topology.nodes[0].cpus == (*range(0, 12), *range(24, 36))
    assert topology.nodes[1] == Node(1, (*range(12, 24), *range(36, 48)), 0)
    assert topology.nodes[2] == Node(2, (), 64 * GIB)
    assert topology.nodes[3] == Node(3, (), 126 * GIB)
    assert topology.with_memory == [0, 2, 3]
    assert topology.describe() == (
        "node 0 (cpus 0-11,24-35, 188.7 GiB), node 1 (cpus 12-23,36-47, 0 B), "
        "node 2 (cpus none, 64 GiB), node 3 (cpus none, 126 GiB)"
    )


def test_non_contiguous_online_nodes() -> None:
    """`online` "0,2" yields nodes 0 and 2 only; node 1 (possible, offline, no
    directory) is not invented."""
    topology = numa.read_topology(machine("sparse_nodes"))
    assert topology.ids == [0, 2]
    assert topology.nodes[0] == Node(0, tuple(range(0, 8)), 32766976 * KIB)
    assert topology.nodes[2] == Node(2, tuple(range(8, 16)), 32 * GIB)
    assert topology.with_memory == [0, 2]
    text = topology.describe()
    assert "node 0 (cpus 0-7, " in text and "node 2 (cpus 8-15, 32 GiB)" in text
    assert "node 1" not in text


def test_missing_online_file_falls_back_to_node_directories(tmp_path: Path) -> None:
    """Without `online`, the nodeN directories name the nodes (and nothing
    else in the directory, such as has_cpu or possible, is taken for one)."""
    root = tmp_path / "node"
    shutil.copytree(machine("sparse_nodes"), root)
    (root / "online").unlink()
    topology = numa.read_topology(str(root))
    assert topology.ids == [0, 2]
    assert topology.nodes[2].cpus == tuple(range(8, 16))


def test_missing_node_files_give_no_cpus_and_unknown_memory(tmp_path: Path) -> None:
    """A node directory without cpulist has no CPUs; without meminfo its
    memory is unknown (None), which still counts as able to hold pages."""
    root = tmp_path / "node"
    shutil.copytree(machine("two_socket_x86"), root)
    (root / "node1" / "cpulist").unlink()
    (root / "node1" / "meminfo").unlink()
    topology = numa.read_topology(str(root))
    assert topology.nodes[1] == Node(1, (), None)
    assert topology.with_memory == [0, 1]
    assert topology.describe().endswith("node 1 (cpus none)")


def test_no_sysfs_node_directory_means_one_node_with_our_cpus(tmp_path: Path) -> None:
    """A kernel without NUMA has no node directory: one node 0 holding the
    CPUs this process may run on, memory unknown."""
    topology = numa.read_topology(str(tmp_path / "absent"))
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    assert topology.nodes == {0: Node(0, cpus, None)}
    assert topology.with_memory == [0]
    assert topology.describe() == f"node 0 (cpus {numa.format_cpulist(cpus)})"


def test_this_machine() -> None:
    """The real sysfs tree has a node 0 with CPUs."""
    topology = numa.read_topology()
    print(f"FIGURE: topology {topology.describe()}")
    assert 0 in topology.ids
    assert topology.nodes[0].cpus


# -- CPU lists -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("", []),
        ("0", [0]),
        ("0-3,8,10-11", [0, 1, 2, 3, 8, 10, 11]),
        ("0-15,32-47", [*range(0, 16), *range(32, 48)]),
        ("7,9", [7, 9]),
    ],
)
def test_cpulist_round_trip(text: str, cpus: list[int]) -> None:
    """The kernel's list format parses to CPUs and formats back to the same text
    (sysfs's trailing newline is accepted)."""
    assert numa.parse_cpulist(text) == cpus
    assert numa.parse_cpulist(text + "\n") == cpus
    assert numa.format_cpulist(cpus) == text


def test_format_cpulist_sorts_and_merges() -> None:
    """Unordered CPUs with repeats still make the shortest list."""
    assert numa.format_cpulist((5, 2, 0, 1, 2)) == "0-2,5"


@pytest.mark.parametrize("text", ["a-b", "3-1", "1,,2", "1-", "-1", "0-3,", "x"])
def test_cpulist_junk_is_refused(text: str) -> None:
    """Anything that is not a CPU list is a ValueError, not a wrong answer."""
    with pytest.raises(ValueError, match="not a CPU list"):
        numa.parse_cpulist(text)


# -- node meminfo ----------------------------------------------------------------


def test_parse_node_meminfo() -> None:
    """MemTotal comes out in bytes, for one- and two-digit node ids; text
    without a node MemTotal (or /proc/meminfo's layout) gives None."""
    recorded = (SYSFS / "two_socket_x86" / "node1" / "meminfo").read_text()
    assert numa.parse_node_meminfo(recorded) == 132120372 * KIB
    zero = (SYSFS / "four_node_cxl" / "node1" / "meminfo").read_text()
    assert numa.parse_node_meminfo(zero) == 0
    assert numa.parse_node_meminfo("Node 12 MemTotal:       65536 kB\n") == 64 * MIB
    assert numa.parse_node_meminfo("Node 0 MemFree:        1024 kB\n") is None
    assert numa.parse_node_meminfo("MemTotal:       20408096 kB\n") is None
    assert numa.parse_node_meminfo("") is None


# -- node masks ------------------------------------------------------------------


def test_node_mask_one_node() -> None:
    """Node 0: bit 0 of one long; maxnode counts the bits plus one."""
    mask, maxnode = numa.node_mask([0])
    assert list(mask) == [1]
    assert maxnode == LONG_BITS + 1


def test_node_mask_two_nodes() -> None:
    """Nodes 1 and 3: bits 1 and 3 of the same long."""
    mask, maxnode = numa.node_mask([1, 3])
    assert list(mask) == [0b1010]
    assert maxnode == LONG_BITS + 1


def test_node_mask_beyond_one_long() -> None:
    """Node 65 needs a second long (on 64-bit), its bit 1 set, the first empty."""
    mask, maxnode = numa.node_mask([65])
    words = 65 // LONG_BITS + 1
    assert len(mask) == words
    assert mask[65 // LONG_BITS] == 1 << (65 % LONG_BITS)
    assert sum(mask) == mask[65 // LONG_BITS]
    assert maxnode == words * LONG_BITS + 1
    if LONG_BITS == 64:
        assert list(mask) == [0, 2] and maxnode == 129


# -- numa_maps ---------------------------------------------------------------------


def test_numa_maps_bound_arena() -> None:
    """The VMA starting at the arena gives its policy, pages per node and
    page size; the file's other mappings are not counted."""
    placement = numa.parse_numa_maps(NUMA_MAPS, X_START, X_END)
    assert placement == Placement("bind:0", {0: 16384}, 4 * KIB)
    assert placement.bytes_by_node == {0: 64 * MIB}


def test_numa_maps_interleaved_arena() -> None:
    """Interleaving shows as pages on both nodes (base pages, even under THP)."""
    placement = numa.parse_numa_maps(NUMA_MAPS, Y_START, Y_END)
    assert placement == Placement("interleave:0-1", {0: 4096, 1: 4096}, 4 * KIB)
    assert placement.bytes_by_node == {0: 16 * MIB, 1: 16 * MIB}


def test_numa_maps_hugetlbfs_arena() -> None:
    """On hugetlbfs N1= counts 2 MiB pages, so 32 of them are 64 MiB."""
    placement = numa.parse_numa_maps(NUMA_MAPS, Z_START, Z_END)
    assert placement == Placement("bind:1", {1: 32}, 2 * MIB)
    assert placement.bytes_by_node == {1: 64 * MIB}


def test_numa_maps_untouched_arena() -> None:
    """A bound mapping with no page yet has a policy, no pages, and the
    kernel prints no page size: the base page size stands in."""
    placement = numa.parse_numa_maps(NUMA_MAPS, W_START, W_END)
    assert placement == Placement("bind:0", {}, mmap.PAGESIZE)
    assert placement.bytes_by_node == {}


def test_numa_maps_sums_every_vma_starting_inside() -> None:
    """A range over two VMAs sums their pages per node and keeps the first
    policy; one starting a page into a VMA leaves that VMA out, and the end
    is exclusive."""
    both = numa.parse_numa_maps(NUMA_MAPS, X_START, Z_START)
    assert both == Placement("bind:0", {0: 16384 + 4096, 1: 4096}, 4 * KIB)
    later = numa.parse_numa_maps(NUMA_MAPS, X_START + 4096, Y_END)
    assert later == Placement("interleave:0-1", {0: 4096, 1: 4096}, 4 * KIB)


def test_numa_maps_without_a_vma_in_range() -> None:
    """No VMA starts in the range (or the text is junk or empty): None."""
    assert numa.parse_numa_maps(NUMA_MAPS, X_START + 4096, X_END) is None
    assert numa.parse_numa_maps(NUMA_MAPS, 0x1000, 0x2000) is None
    assert numa.parse_numa_maps("", X_START, X_END) is None
    assert numa.parse_numa_maps("no such thing\nzz bind:0\n", 0, 1 << 64) is None


# -- smaps -----------------------------------------------------------------------


def test_smaps_one_vma() -> None:
    """kB figures become bytes; THPeligible, ProtectionKey and VmFlags (not
    kB figures) are left out."""
    figures = numa.parse_smaps(SMAPS, X_START, X_END)
    assert figures["Size"] == 64 * MIB
    assert figures["Rss"] == 64 * MIB
    assert figures["Pss"] == 32 * MIB
    assert figures["Shared_Dirty"] == 48 * MIB
    assert figures["KernelPageSize"] == 4 * KIB
    assert figures["ShmemPmdMapped"] == 0
    assert figures["Shared_Hugetlb"] == 0
    assert not {"THPeligible", "ProtectionKey", "VmFlags"} & set(figures)
    assert len(figures) == 22


def test_smaps_sums_vmas_and_keeps_the_largest_page_size() -> None:
    """Over the four arenas sizes add up and KernelPageSize is the largest
    (2 MiB, from the hugetlbfs VMA), not a sum; the heap and the anonymous
    mapping after the arenas are outside."""
    figures = numa.parse_smaps(SMAPS, X_START, W_END)
    assert figures["Size"] == (64 + 32 + 64 + 16) * MIB
    assert figures["Rss"] == (64 + 32) * MIB
    assert figures["KernelPageSize"] == 2 * MIB
    assert figures["ShmemPmdMapped"] == 30 * MIB
    assert figures["Shared_Hugetlb"] == 48 * MIB
    assert figures["Private_Hugetlb"] == 16 * MIB
    assert figures["Anonymous"] == 0


def test_smaps_only_vmas_starting_inside() -> None:
    """A range starting one page into a VMA skips it; an empty range gives {}."""
    figures = numa.parse_smaps(SMAPS, X_START + 4096, Z_START)
    assert figures["Size"] == 32 * MIB
    assert numa.parse_smaps(SMAPS, X_START + 4096, Y_START) == {}
    assert numa.parse_smaps(SMAPS, 0x1000, 0x2000) == {}


# -- the stats record ----------------------------------------------------------------


def record_of(start: int, end: int) -> dict[str, object]:
    smaps = numa.parse_smaps(SMAPS, start, end)
    return numa.describe_pages(smaps, numa.parse_numa_maps(NUMA_MAPS, start, end), end - start)


def test_describe_small_pages() -> None:
    """Small pages: the kernel page size, nothing huge, all of Rss mapped."""
    assert record_of(X_START, X_END) == {
        "page_bytes": 4 * KIB,
        "huge_bytes": 0,
        "mapped_bytes": 64 * MIB,
        "length_bytes": 64 * MIB,
        "policy": "bind:0",
        "bytes_by_node": {"0": 64 * MIB},
    }


def test_describe_transparent_huge_pages() -> None:
    """THP: the PMD size is the page size and ShmemPmdMapped the huge bytes
    (30 of 32 MiB: one huge page fell back to small ones)."""
    assert record_of(Y_START, Y_END) == {
        "page_bytes": numa.pmd_bytes(),
        "huge_bytes": 30 * MIB,
        "mapped_bytes": 32 * MIB,
        "length_bytes": 32 * MIB,
        "policy": "interleave:0-1",
        "bytes_by_node": {"0": 16 * MIB, "1": 16 * MIB},
    }


def test_describe_hugetlb() -> None:
    """hugetlbfs: shared plus private hugetlb bytes are huge and mapped (Rss
    does not count them), pages of the VMA's 2 MiB kernel page size."""
    assert record_of(Z_START, Z_END) == {
        "page_bytes": 2 * MIB,
        "huge_bytes": 64 * MIB,
        "mapped_bytes": 64 * MIB,
        "length_bytes": 64 * MIB,
        "policy": "bind:1",
        "bytes_by_node": {"1": 64 * MIB},
    }


def test_describe_without_placement() -> None:
    """Without numa_maps (no NUMA in the kernel) there is no policy or node split."""
    record = numa.describe_pages(numa.parse_smaps(SMAPS, X_START, X_END), None, 64 * MIB)
    assert "policy" not in record and "bytes_by_node" not in record
    assert record["mapped_bytes"] == 64 * MIB


# -- the real kernel -------------------------------------------------------------


def test_bind_before_touching_puts_every_page_on_node_0() -> None:
    """A shared anonymous mapping bound to node 0 before any page exists has
    no page resident until written, then every page, all on node 0 under a
    bind policy, as numa_maps reports it."""
    length = 4 * MIB
    pages = length // mmap.PAGESIZE
    mapping = mmap.mmap(-1, length)
    try:
        assert numa.resident_pages(mapping, length) == 0
        via = numa.mbind(numa.address_of(mapping), length, numa.MPOL_BIND, [0])
        assert via in ("libnuma", "syscall")
        assert numa.resident_pages(mapping, length) == 0
        for offset in range(0, length, mmap.PAGESIZE):
            mapping[offset] = 1
        assert numa.resident_pages(mapping, length) == pages
        record = numa.read_placement(mapping, length)
        print(f"FIGURE: mbind via {via}; placement {record}")
        assert record["policy"].startswith("bind")
        assert record["bytes_by_node"] == {"0": length}
        assert record["mapped_bytes"] == length
        assert record["length_bytes"] == length
    finally:
        mapping.close()


def test_bind_to_a_node_that_does_not_exist_is_refused() -> None:
    """Node 63 is not online here: the kernel says EINVAL and mbind raises."""
    length = 4 * MIB
    mapping = mmap.mmap(-1, length)
    try:
        with pytest.raises(OSError) as caught:
            numa.mbind(numa.address_of(mapping), length, numa.MPOL_BIND, [63])
        print(f"FIGURE: mbind to node 63: {caught.value}")
        assert caught.value.errno == errno.EINVAL
        assert numa.resident_pages(mapping, length) == 0
    finally:
        mapping.close()
