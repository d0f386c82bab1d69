"""Choosing huge pages for an arena (shmarena.shm.hugepages): `plan` on
constructed surveys, the sysfs and mountinfo parsers on recorded text, and
`survey` on this machine."""

from __future__ import annotations

import pytest

from shmarena.shm import hugepages
from shmarena.shm.hugepages import Plan, Pool, Survey
from shmarena.shm.numa import pmd_bytes

MIB, GIB = 1 << 20, 1 << 30
ARENA = 64 * MIB  # 32 pages of 2 MiB
SHMEM_WORDS = {"always", "within_size", "advise", "never", "deny", "force"}


def pools(*entries: Pool) -> dict[int, Pool]:
    return {pool.page_bytes: pool for pool in entries}


# -- plan ------------------------------------------------------------------------


def test_hugetlbfs_with_enough_free_pages() -> None:
    """A hugetlbfs mount whose pool has the pages (free minus reserved) wins,
    with that mount as the directory, even when THP is also allowed."""
    survey = Survey(
        pools=pools(Pool(2 * MIB, total=64, free=36, reserved=4)),
        mounts=[("/dev/hugepages", 2 * MIB)],
        shmem_enabled="advise",
        devshm_huge="within_size",
    )
    assert hugepages.plan(survey, ARENA, shared_with_group=True) == Plan(
        "hugetlbfs", 2 * MIB, "/dev/hugepages"
    )


def test_first_mount_with_enough_pages_wins() -> None:
    """A 1 GiB mount short of pages is passed over for a 2 MiB one that has them."""
    survey = Survey(
        pools=pools(Pool(GIB, 1, 0, 0), Pool(2 * MIB, 32, 32, 0)),
        mounts=[("/mnt/huge1g", GIB), ("/dev/hugepages", 2 * MIB)],
    )
    assert hugepages.plan(survey, ARENA, False) == Plan("hugetlbfs", 2 * MIB, "/dev/hugepages")


def test_too_few_hugetlbfs_pages_and_shmem_advise_gives_thp_memfd() -> None:
    """Reserved pages count against free ones (34 free, 4 promised: 30 < 32),
    so with shmem_enabled advise the arena goes on a memfd with THP."""
    survey = Survey(
        pools=pools(Pool(2 * MIB, 40, 34, 4)),
        mounts=[("/dev/hugepages", 2 * MIB)],
        shmem_enabled="advise",
    )
    assert hugepages.plan(survey, ARENA, False) == Plan("thp-memfd", 2 * MIB)


def test_devshm_huge_advise_gives_thp_shm() -> None:
    """/dev/shm mounted huge=advise: THP on /dev/shm, fine with --group too."""
    survey = Survey(devshm_huge="advise", thp_bytes=2 * MIB)
    assert hugepages.plan(survey, ARENA, False) == Plan("thp-shm", 2 * MIB)
    assert hugepages.plan(survey, ARENA, True) == Plan("thp-shm", 2 * MIB)


def test_shmem_force_gives_thp_shm() -> None:
    """shmem_enabled force makes every tmpfs huge, /dev/shm included."""
    survey = Survey(shmem_enabled="force", thp_bytes=2 * MIB)
    assert hugepages.plan(survey, ARENA, True) == Plan("thp-shm", 2 * MIB)


def test_memfd_thp_is_refused_with_group() -> None:
    """THP allowed only for memfds, and the arena is shared with a group: a
    refusal that names --group and the memfd, plus the hugetlbfs shortfall."""
    survey = Survey(
        pools=pools(Pool(2 * MIB, 8, 8, 0)),
        mounts=[("/dev/hugepages", 2 * MIB)],
        shmem_enabled="advise",
    )
    message = hugepages.plan(survey, ARENA, shared_with_group=True)
    assert isinstance(message, str)
    print(f"FIGURE: {message}")
    assert "--group" in message and "memfd" in message
    assert "hugetlbfs at /dev/hugepages has 8 free 2 MiB pages, the arena needs 32" in message
    assert "echo 32 > /proc/sys/vm/nr_hugepages" in message  # all 8 are free: 32 in all
    assert "mount -t hugetlbfs" not in message
    # The switch is already on; what would help a group is /dev/shm's own option.
    assert "mount -o remount,huge=advise /dev/shm" in message
    assert "echo advise >" not in message


def test_deny_forbids_transparent_huge_pages_everywhere() -> None:
    """shmem_enabled = deny overrides a huge= mount option: no THP kind is
    chosen, and the message says to lift deny first."""
    survey = Survey(shmem_enabled="deny", devshm_huge="advise")
    message = hugepages.plan(survey, ARENA, shared_with_group=False)
    assert isinstance(message, str)
    assert "is [deny]" in message
    assert "echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled" in message
    # hugetlbfs is unaffected by deny
    survey = Survey(
        pools=pools(Pool(2 * MIB, 32, 32, 0)),
        mounts=[("/dev/hugepages", 2 * MIB)],
        shmem_enabled="deny",
    )
    assert hugepages.plan(survey, ARENA, False) == Plan("hugetlbfs", 2 * MIB, "/dev/hugepages")


def test_nothing_available_says_what_to_change() -> None:
    """No pool pages, no mount, THP never: the message shows what was found,
    the exact commands to change it, the page count for the size, and the
    way out without huge pages."""
    survey = Survey(pools=pools(Pool(2 * MIB, 0, 0, 0), Pool(GIB, 0, 0, 0)))
    message = hugepages.plan(survey, ARENA, shared_with_group=False)
    assert isinstance(message, str)
    print(f"FIGURE: {message}")
    assert message.startswith("--hugepages: no huge pages can back an arena of 64 MiB here")
    for needed in (
        "/proc/sys/vm/nr_hugepages is 0 (0 of 2 MiB free)",
        "no hugetlbfs is mounted",
        "/sys/kernel/mm/transparent_hugepage/shmem_enabled is [never]",
        "/dev/shm is mounted huge=never",
        "echo 32 > /proc/sys/vm/nr_hugepages",
        "mkdir -p /dev/hugepages && mount -t hugetlbfs -o pagesize=2M none /dev/hugepages",
        "(hugetlbfs, 32 pages of 2 MiB)",
        "echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled",
        "without --hugepages",
    ):
        assert needed in message


def test_refusal_page_count_rounds_up_and_counts_pages_in_use() -> None:
    """65 MiB needs 33 pages; with 10 reserved of which 4 are free, 6 are in
    use, so nr_hugepages must become 6 + 33 = 39."""
    survey = Survey(pools=pools(Pool(2 * MIB, 10, 4, 0)))
    message = hugepages.plan(survey, 65 * MIB, False)
    assert isinstance(message, str)
    assert "echo 39 > /proc/sys/vm/nr_hugepages" in message
    assert "(hugetlbfs, 33 pages of 2 MiB)" in message


def test_refusal_with_pages_but_no_mount_asks_only_for_the_mount() -> None:
    """Enough reserved pages but nowhere to mount them: no nr_hugepages step."""
    survey = Survey(pools=pools(Pool(2 * MIB, 32, 32, 0)))
    message = hugepages.plan(survey, ARENA, False)
    assert isinstance(message, str)
    assert "mount -t hugetlbfs" in message
    assert "echo 32 > /proc/sys/vm/nr_hugepages" not in message
    assert "> /proc/sys/vm/nr_hugepages" not in message


# -- small pieces ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("always within_size advise [never] deny force\n", "never"),
        ("[always] madvise never\n", "always"),
        ("always within_size [advise] never deny force", "advise"),
        ("  never\n", "never"),
    ],
)
def test_selected(text: str, word: str) -> None:
    """The bracketed word of a sysfs switch, or the whole text when there is none."""
    assert hugepages.selected(text) == word


def test_parse_pools() -> None:
    """Each hugepages-<N>kB directory is a pool of N KiB pages; missing or
    junk counts are 0; other names are skipped."""
    entries = {
        "hugepages-2048kB": {
            "nr_hugepages": "64\n",
            "free_hugepages": "40\n",
            "resv_hugepages": "4\n",
        },
        "hugepages-1048576kB": {"nr_hugepages": "2\n", "free_hugepages": "2\n"},
        "hugepages-64kB": {"nr_hugepages": "junk\n", "free_hugepages": "", "resv_hugepages": ""},
        "README": {"nr_hugepages": "9\n"},
    }
    assert hugepages.parse_pools(entries) == {
        2 * MIB: Pool(2 * MIB, 64, 40, 4),
        GIB: Pool(GIB, 2, 2, 0),
        64 << 10: Pool(64 << 10, 0, 0, 0),
    }
    assert Pool(2 * MIB, 64, 40, 4).available == 36
    assert Pool(2 * MIB, 64, 2, 4).available == 0


MOUNTINFO = """\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
24 22 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=8130212k,mode=755,inode64
26 24 0:24 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw,inode64,huge=within_size
27 22 0:25 / /run rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw,size=1628480k
33 24 0:29 / /dev/hugepages rw,relatime shared:14 - hugetlbfs hugetlbfs rw,pagesize=2M
41 22 0:36 / /mnt/huge1g rw,relatime shared:20 - hugetlbfs nodev rw,pagesize=1G
42 22 0:37 / /mnt/huge\\040default rw,relatime shared:21 - hugetlbfs none rw
43 22 0:38 / /mnt/tmp\\040huge rw,relatime shared:22 - tmpfs tmpfs rw,huge=always
"""


def test_parse_mounts() -> None:
    """hugetlbfs mounts with their page size (pagesize=1G, else the default
    page size), \\040 unescaped; /dev/shm's huge= option, not another tmpfs's."""
    mounts, devshm = hugepages.parse_mounts(MOUNTINFO, default_page_bytes=GIB)
    assert mounts == [
        ("/dev/hugepages", 2 * MIB),
        ("/mnt/huge1g", GIB),
        ("/mnt/huge default", GIB),
    ]
    assert devshm == "within_size"
    mounts, _ = hugepages.parse_mounts(MOUNTINFO, default_page_bytes=2 * MIB)
    assert mounts[2] == ("/mnt/huge default", 2 * MIB)


def test_parse_mounts_devshm_defaults_and_overmounts() -> None:
    """/dev/shm without huge= is "never"; when /dev/shm is mounted twice the
    later (visible) mount decides; junk lines are skipped."""
    plain = "25 24 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24683656k\n"
    assert hugepages.parse_mounts(plain, 2 * MIB) == ([], "never")
    stacked = plain + "30 25 0:27 / /dev/shm rw,relatime - tmpfs tmpfs rw,huge=advise\n"
    assert hugepages.parse_mounts(stacked, 2 * MIB) == ([], "advise")
    assert hugepages.parse_mounts("junk\n1 2 3 - x\n\n", 2 * MIB) == ([], "never")


def test_plan_describe() -> None:
    """Each kind of plan says where the pages come from and their size."""
    assert (
        Plan("hugetlbfs", 2 * MIB, "/dev/hugepages").describe()
        == "hugetlbfs at /dev/hugepages (2 MiB pages, reserved)"
    )
    assert Plan("hugetlbfs", GIB, "/mnt/huge1g").describe() == (
        "hugetlbfs at /mnt/huge1g (1 GiB pages, reserved)"
    )
    assert Plan("thp-shm", 2 * MIB).describe() == "transparent huge pages (2 MiB) on /dev/shm"
    assert Plan("thp-memfd", 2 * MIB).describe() == "transparent huge pages (2 MiB) on a memfd"


# -- this machine ------------------------------------------------------------------


def test_survey_this_machine() -> None:
    """The real survey lists the 2 MiB pool and sane switch values, and `plan`
    gives a Plan or a message for it."""
    found = hugepages.survey()
    decision = hugepages.plan(found, ARENA, False)
    print(f"FIGURE: survey {found}")
    print(f"FIGURE: plan {decision if isinstance(decision, str) else decision.describe()}")
    assert 2 * MIB in found.pools
    assert found.pools[2 * MIB].page_bytes == 2 * MIB
    assert found.default_page_bytes in found.pools
    assert found.shmem_enabled in SHMEM_WORDS
    assert found.devshm_huge in {"never", "always", "within_size", "advise"}
    assert found.thp_bytes == pmd_bytes()
    assert isinstance(decision, (Plan, str))
