"""Which mount holds a backing file, and whether it is DAX, from mountinfo text."""

from __future__ import annotations

from shmarena.shm.backing import parse_mountinfo

MOUNTINFO = """\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
25 22 0:21 / /dev/shm rw,nosuid,nodev shared:2 - tmpfs tmpfs rw
31 22 259:0 / /mnt/pmem rw,relatime shared:9 - ext4 /dev/pmem0 rw,dax=always
32 22 259:1 / /mnt/pmem/old rw,relatime shared:10 - xfs /dev/pmem1 rw,dax
33 22 0:40 / /mnt/with\\040space rw - ext4 /dev/vdb rw
"""


def test_longest_mount_point_wins_and_dax_is_read_from_the_options() -> None:
    assert parse_mountinfo(MOUNTINFO, "/mnt/pmem/arena") == ("/mnt/pmem", "ext4", True)
    assert parse_mountinfo(MOUNTINFO, "/mnt/pmem/old/a") == ("/mnt/pmem/old", "xfs", True)
    assert parse_mountinfo(MOUNTINFO, "/dev/shm/x") == ("/dev/shm", "tmpfs", False)
    assert parse_mountinfo(MOUNTINFO, "/tmp/x") == ("/", "ext4", False)
    assert parse_mountinfo(MOUNTINFO, "/mnt/pmemx/a") == ("/", "ext4", False)
    assert parse_mountinfo(MOUNTINFO, "/mnt/with space/a") == ("/mnt/with space", "ext4", False)


def test_garbage_lines_are_skipped() -> None:
    assert parse_mountinfo("nonsense\n\n1 2 3\n", "/x") == ("/", "unknown", False)
