"""NUMA nodes, binding a mapping to them, and reading back where its pages
really are. I/O at the edge; every parser takes text and is pure.

Why read back: `mbind` on a shared mapping sets the policy new pages are
allocated under, it does not move pages that exist already. On tmpfs (our
shm arenas) the policy is the file's own (a "shared policy"), so the daemon
binds the mapping *before* anything allocates a page (before fallocate,
before any touch), then allocates, then asks the kernel where the pages
went (`/proc/self/numa_maps`) instead of trusting that the call worked.
`resident_pages` (mincore) right before the bind proves the order: it is 0.

The topology comes from sysfs (``/sys/devices/system/node``): ``online``
lists the nodes, ``nodeN/cpulist`` their CPUs, ``nodeN/meminfo`` their
memory. `read_topology(root)` takes the root, so recorded trees of
multi-node machines test the parsing on a one-node host.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import platform
from dataclasses import dataclass, field
from typing import Any

from shmarena.config import format_size

SYSFS_NODES = "/sys/devices/system/node"

MPOL_DEFAULT, MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE = 0, 1, 2, 3
POLICY_NAMES = {MPOL_BIND: "bind", MPOL_INTERLEAVE: "interleave", MPOL_PREFERRED: "prefer"}

# mbind(2) has no libc wrapper; libnuma has one, else the raw system call.
_SYS_MBIND = {"x86_64": 237, "aarch64": 235, "arm64": 235, "ppc64le": 259, "s390x": 268}


# -- topology (pure parsers, plus one reader) ----------------------------------


def parse_cpulist(text: str) -> list[int]:
    """CPUs from the kernel's list format: "0-3,8,10-11" -> [0, 1, 2, 3, 8, 10, 11].
    ValueError on anything else."""
    cpus: list[int] = []
    text = text.strip()
    if not text:
        return cpus
    for part in text.split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"not a CPU list: {text!r}")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"not a CPU list: {text!r} (range {part} runs backwards)")
        cpus.extend(range(low, high + 1))
    return cpus


def parse_node_meminfo(text: str) -> int | None:
    """MemTotal of a ``nodeN/meminfo`` ("Node 0 MemTotal:  6926348 kB"), in bytes."""
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 4 and words[2] == "MemTotal:" and words[3].isdigit():
            return int(words[3]) * 1024
    return None


@dataclass(frozen=True)
class Node:
    """One NUMA node as sysfs describes it: its CPUs and its memory."""

    id: int
    cpus: tuple[int, ...]
    memory_bytes: int | None  # None: sysfs did not say


@dataclass(frozen=True)
class Topology:
    """The host's NUMA nodes by id (empty where the kernel has no NUMA support)."""

    nodes: dict[int, Node] = field(default_factory=dict)

    @property
    def ids(self) -> list[int]:
        return sorted(self.nodes)

    @property
    def with_memory(self) -> list[int]:
        """Nodes that can hold pages (CPU-only nodes have MemTotal 0)."""
        return [n for n in self.ids if self.nodes[n].memory_bytes != 0]

    def describe(self) -> str:
        """ "node 0 (cpus 0-1, 6.6 GiB), node 1 (...)" for messages."""
        parts = []
        for n in self.ids:
            node = self.nodes[n]
            memory = "" if node.memory_bytes is None else f", {format_size(node.memory_bytes)}"
            parts.append(f"node {n} (cpus {format_cpulist(node.cpus) or 'none'}{memory})")
        return ", ".join(parts) or "no nodes"


def format_cpulist(cpus: tuple[int, ...] | list[int]) -> str:
    """The inverse of `parse_cpulist`: [0, 1, 2, 5] -> "0-2,5"."""
    ranges: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        ranges.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(ranges)


def read_topology(root: str = SYSFS_NODES) -> Topology:
    """The nodes under a sysfs node directory. A machine without NUMA
    support in its kernel has no such directory: one node 0 with every CPU."""
    try:
        online = _read(os.path.join(root, "online"))
    except FileNotFoundError:
        if os.path.isdir(root):
            names = os.listdir(root)
            online = ",".join(n[4:] for n in names if n.startswith("node") and n[4:].isdigit())
        else:
            cpus = tuple(sorted(os.sched_getaffinity(0)))
            return Topology({0: Node(0, cpus, None)})
    nodes = {}
    for n in parse_cpulist(online):
        base = os.path.join(root, f"node{n}")
        try:
            cpus = tuple(parse_cpulist(_read(os.path.join(base, "cpulist"))))
        except FileNotFoundError:
            cpus = ()
        try:
            memory = parse_node_meminfo(_read(os.path.join(base, "meminfo")))
        except FileNotFoundError:
            memory = None
        nodes[n] = Node(n, cpus, memory)
    return Topology(nodes)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def node_mask(nodes: list[int]) -> tuple[ctypes.Array[ctypes.c_ulong], int]:
    """The nodemask mbind takes: an array of longs with bit n set per node,
    and maxnode (bits in it, plus one, as the kernel wants)."""
    bits = ctypes.sizeof(ctypes.c_ulong) * 8
    words = max(nodes) // bits + 1
    mask = (ctypes.c_ulong * words)()
    for n in nodes:
        mask[n // bits] |= 1 << (n % bits)
    return mask, words * bits + 1


# -- binding -------------------------------------------------------------------


def address_of(mapping: mmap.mmap) -> int:
    """The virtual address of an mmap object's first byte."""
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # release the export, so the mapping can still be closed


def _mbind_function() -> tuple[str, object]:
    name = ctypes.util.find_library("numa") or "libnuma.so.1"
    try:
        libnuma = ctypes.CDLL(name, use_errno=True)
        return "libnuma", libnuma.mbind
    except (OSError, AttributeError):
        pass
    number = _SYS_MBIND.get(platform.machine())
    if number is None:
        return "none", None
    libc = ctypes.CDLL(None, use_errno=True)
    return "syscall", lambda *args: libc.syscall(number, *args)


def mbind(address: int, length: int, policy: int, nodes: list[int]) -> str:
    """Set the memory policy of [address, address + length) of this process's
    mappings. Returns how it was called ("libnuma" or "syscall"); OSError
    with the kernel's errno when it refused."""
    via, function = _mbind_function()
    if function is None:
        raise OSError(
            38, f"mbind: no libnuma and no known system call number for {platform.machine()}"
        )
    mask, maxnode = node_mask(nodes)
    result = function(  # type: ignore[operator]
        ctypes.c_void_p(address),
        ctypes.c_ulong(length),
        ctypes.c_int(policy),
        mask,
        ctypes.c_ulong(maxnode),
        ctypes.c_uint(0),
    )
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mbind: {os.strerror(error)}")
    return via


def pin_to_cpus(cpus: tuple[int, ...] | list[int]) -> None:
    """Run this process only on these CPUs (all its threads started later too)."""
    os.sched_setaffinity(0, set(cpus))


def resident_pages(mapping: mmap.mmap, length: int) -> int:
    """Pages of the mapping's first `length` bytes that exist in memory
    (mincore: for tmpfs, pages of the file, mapped here or not)."""
    page = mmap.PAGESIZE
    count = (length + page - 1) // page
    vector = (ctypes.c_ubyte * count)()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mincore(ctypes.c_void_p(address_of(mapping)), ctypes.c_size_t(length), vector) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mincore: {os.strerror(error)}")
    return sum(1 for flag in vector if flag & 1)


# -- reading placement back ------------------------------------------------------


@dataclass
class Placement:
    """Where the pages of one mapping are, as the kernel reports them."""

    policy: str  # "default", "bind:0", "interleave:0-1", ...
    pages_by_node: dict[int, int]  # node -> pages (of page_bytes each)
    page_bytes: int  # the kernel page size of the mapping (2 MiB on hugetlbfs)

    @property
    def bytes_by_node(self) -> dict[int, int]:
        return {n: pages * self.page_bytes for n, pages in self.pages_by_node.items()}


def parse_numa_maps(text: str, start: int, end: int) -> Placement | None:
    """The placement of the mapping [start, end) from ``numa_maps`` text:
    every line (VMA) that starts inside it, summed. None when none does.

    A line reads ``7f12c0000000 bind:0 file=/dev/shm/x dirty=512 N0=512
    kernelpagesize_kB=4``; ``N<k>=`` counts pages of that kernel page size
    (huge pages on hugetlbfs; base pages for transparent huge pages)."""
    policy = ""
    pages: dict[int, int] = {}
    page_bytes = 0
    found = False
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2:
            continue
        try:
            address = int(words[0], 16)
        except ValueError:
            continue
        if not start <= address < end:
            continue
        found = True
        policy = policy or words[1]
        for word in words[2:]:
            key, _, value = word.partition("=")
            if key.startswith("N") and key[1:].isdigit() and value.isdigit():
                pages[int(key[1:])] = pages.get(int(key[1:]), 0) + int(value)
            elif key == "kernelpagesize_kB" and value.isdigit():
                page_bytes = int(value) * 1024
    if not found:
        return None
    return Placement(policy, dict(sorted(pages.items())), page_bytes or mmap.PAGESIZE)


def parse_smaps(text: str, start: int, end: int) -> dict[str, int]:
    """The ``smaps`` figures (in bytes, "kB" fields converted) of every VMA
    starting inside [start, end), summed; KernelPageSize is the largest seen.
    Empty when no VMA starts there."""
    figures: dict[str, int] = {}
    inside = False
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line.strip() else ""
        if "-" in head and not head.endswith(":"):
            low = head.split("-", 1)[0]
            try:
                inside = start <= int(low, 16) < end
            except ValueError:
                inside = False
            continue
        if not inside or ":" not in line:
            continue
        key, _, rest = line.partition(":")
        words = rest.split()
        if len(words) == 2 and words[1] == "kB" and words[0].isdigit():
            value = int(words[0]) * 1024
            if key == "KernelPageSize":
                figures[key] = max(figures.get(key, 0), value)
            else:
                figures[key] = figures.get(key, 0) + value
    return figures


def read_placement(mapping: mmap.mmap, length: int, pid: int | str = "self") -> dict[str, Any]:
    """This process's view of one of its mappings, read back from the kernel:
    the policy, bytes per node (of pages mapped here), the page size in use
    and how much of it sits on huge pages (hugetlbfs or transparent)."""
    return read_placements([(mapping, length)], pid)[0]


def read_placements(
    mappings: list[tuple[mmap.mmap, int]], pid: int | str = "self"
) -> list[dict[str, Any]]:
    """`read_placement` of several mappings, reading each /proc file once."""
    with open(f"/proc/{pid}/smaps") as f:
        smaps_text = f.read()
    try:
        with open(f"/proc/{pid}/numa_maps") as f:
            numa_text: str | None = f.read()
    except FileNotFoundError:  # a kernel without NUMA support
        numa_text = None
    records = []
    for mapping, length in mappings:
        start = address_of(mapping)
        smaps = parse_smaps(_vmas_from(smaps_text, start), start, start + length)
        placement = None if numa_text is None else parse_numa_maps(numa_text, start, start + length)
        records.append(describe_pages(smaps, placement, length))
    return records


def _vmas_from(smaps_text: str, start: int) -> str:
    """The smaps text from the VMA that starts at `start` on (the whole text
    when there is none): parsing skips the process's other mappings."""
    at = smaps_text.find(f"{start:x}-")
    while at > 0 and smaps_text[at - 1] != "\n":
        at = smaps_text.find(f"{start:x}-", at + 1)
    return smaps_text if at < 0 else smaps_text[at:]


def describe_pages(
    smaps: dict[str, int], placement: Placement | None, length: int
) -> dict[str, Any]:
    """The `stats` record of a mapping from its smaps figures and placement."""
    hugetlb = smaps.get("Shared_Hugetlb", 0) + smaps.get("Private_Hugetlb", 0)
    thp = smaps.get("ShmemPmdMapped", 0) + smaps.get("FilePmdMapped", 0)
    kernel_page = smaps.get("KernelPageSize", mmap.PAGESIZE)
    if hugetlb:
        page_bytes, huge_bytes = kernel_page, hugetlb
    elif thp:
        page_bytes, huge_bytes = pmd_bytes(), thp
    else:
        page_bytes, huge_bytes = kernel_page, 0
    record: dict[str, Any] = {
        "page_bytes": page_bytes,
        "huge_bytes": huge_bytes,
        "mapped_bytes": smaps.get("Rss", 0) + hugetlb,
        "length_bytes": length,
    }
    if placement is not None:
        record["policy"] = placement.policy
        record["bytes_by_node"] = {str(n): b for n, b in placement.bytes_by_node.items()}
    return record


def pmd_bytes() -> int:
    """The size of a PMD-mapped (transparent) huge page; 2 MiB on x86-64."""
    try:
        return int(_read("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"))
    except (OSError, ValueError):
        return 2 << 20
