"""The generation table: what lets any process tell, without asking the
daemon, whether a handle still names a live block. Pure: words in, words out.

Each segment has a table in shared memory beside it: one 64-bit word per
minimum block, indexed by ``offset // min_block``, meaningful where a block
starts. A word is

- ``0``: no block was ever handed out starting there (in this epoch);
- a generation (``0 < word < DEAD``): the block starting there is live under
  that generation. Generations are below ``1 << 63``: the daemon's counter,
  and cache generations ``session << GEN_SHIFT | counter`` with sessions below
  ``1 << 23``;
- ``DEAD | reason << REASON_SHIFT | low bits of the generation it last had``:
  let go, and why (freed by its owner, owner recycled, its session ended,
  lost in a restart). The low bits tell "this very hand-out was freed" from
  "handed out again since".

Who writes: the daemon when it hands a block out itself (ALLOC, ALLOC_MANY,
FILL's direct sizes) and when a block leaves its owner (free, recycle,
session end), always before the block can be handed out again; a client
cache when the handle of a block it handed out leaves the process (`escape`:
only then can anyone else attach it) and when such a block is freed. A
block a cache hands out and takes back while its handle never left the
process needs no word: nobody can name it.

The daemon never overwrites a word live under another generation than the
one it lets go (`may_kill`): a cache may have handed the block out again
before the daemon heard that it came back.
"""

from __future__ import annotations

from shmarena.protocol import GEN_SHIFT

DEAD = 1 << 63
REASON_SHIFT = 56
LOW_BITS = (1 << REASON_SHIFT) - 1
WORD_BYTES = 8
TABLE_SUFFIX = ".gens"  # the table of shm object NAME is NAME.gens

LIVE = 0  # not a reason: the mark of a hand-out
FREED = 1
RECYCLED = 2
ENDED = 3
RECLAIMED = 4

_WHY = {
    FREED: "the block was freed by its owner",
    RECYCLED: "its owner was recycled, which freed the block",
    ENDED: (
        "its session ended: the process that held the block exited (or was killed, or "
        "closed its client) and the daemon reclaimed the block"
    ),
    RECLAIMED: "the block was lost when the daemon restarted (it was not in the recovered table)",
}


def dead_word(generation: int, reason: int) -> int:
    return DEAD | reason << REASON_SHIFT | generation & LOW_BITS


def is_live(word: int) -> bool:
    return 0 < word < DEAD


def any_of_session(session: int) -> int:
    """A generation that stands for every generation of a session's cache
    (counter 0, which a cache never hands out): for `may_kill` when the
    daemon lets go of a cached block without knowing its last hand-out."""
    return session << GEN_SHIFT


def may_kill(word: int, generation: int) -> bool:
    """Whether the dead word of `generation` may replace `word`."""
    if not is_live(word) or word == generation:
        return True
    counter_bits = (1 << GEN_SHIFT) - 1
    return generation & counter_bits == 0 and word >> GEN_SHIFT == generation >> GEN_SHIFT


def table_bytes(segment_bytes: int, min_block: int, page_bytes: int = 4096) -> int:
    """Bytes of the table of a segment, whole pages."""
    raw = -(-segment_bytes // min_block) * WORD_BYTES
    return -(-raw // page_bytes) * page_bytes


_KEYS = {FREED: "freed", RECYCLED: "recycled", ENDED: "session_ended", RECLAIMED: "reclaimed"}


def reason_key(word: int, generation: int) -> str:
    """`what_happened` as a key for programs (StaleHandle details "reason"):
    live, never, handed_out_again, freed, recycled, session_ended, reclaimed."""
    if word == generation:
        return "live"
    if word == 0:
        return "never"
    if is_live(word) or word & LOW_BITS != generation & LOW_BITS:
        return "handed_out_again"
    return _KEYS.get((word >> REASON_SHIFT) & 0x7F, "let_go")


def what_happened(word: int, generation: int) -> str | None:
    """Why a block whose table word is `word` is not live under
    `generation`, in words; None when it is."""
    if word == generation:
        return None
    if word == 0:
        return "a block was never handed out at that offset in this arena"
    if is_live(word):
        return (
            f"the block there was handed out again since, under generation {word} (or the "
            "handle was not one shmarena gave out)"
        )
    reason = (word >> REASON_SHIFT) & 0x7F
    why = _WHY.get(reason, "the block was let go")
    if word & LOW_BITS == generation & LOW_BITS:
        return why
    return f"the block there was handed out again since, and let go again ({why})"


def check_words(
    words: list[int], shift: int, blocks: dict[int, tuple[int, bool, bool]], segment: int = 0
) -> list[str]:
    """What is wrong with a segment's table, given the ledger's blocks of it
    (offset -> (generation, held by an owner, in a cache)); empty when right.

    A live word must name a block the ledger has that is held or cached (a
    cache may have handed it out under its own generation, unreported yet).
    A block the daemon numbered and an owner holds must be live under its
    generation, or freed by its holder whose FREE is on the way."""
    problems: list[str] = []
    where = f" of segment {segment}" if segment else ""
    for index, word in enumerate(words):
        if not is_live(word):
            continue
        found = blocks.get(index << shift)
        if found is None or not (found[1] or found[2]):
            problems.append(
                f"generation table{where}: offset {index << shift:#x} is live under "
                f"generation {word}, but no owner or cache holds a block there"
            )
    for offset, (generation, held, _) in blocks.items():
        if not held or generation >> GEN_SHIFT:
            continue  # only what the daemon numbered is its to know
        word = words[offset >> shift]
        if word != generation and word != dead_word(generation, FREED):
            problems.append(
                f"generation table{where}: block {offset:#x} is held under generation "
                f"{generation}, its word says {word:#x}"
            )
    return problems


def rebuilt(
    words: list[int], shift: int, blocks: dict[int, tuple[int, bool, int]], sessions: set[int]
) -> dict[int, int]:
    """The writes (index -> word) that make a kept table agree with a ledger
    recovered after a restart (`blocks`: offset -> (generation, held by an
    owner, the session whose cache it came from or 0); `sessions`: those
    recovered). A word live under a generation no owner holds goes dead
    (RECLAIMED), unless the block came from a living session's cache and
    the word is of that session (a hand-out whose report the crash lost);
    a block the daemon numbered and an owner holds is live. The words of
    cache hand-outs are the clients' and are kept."""
    writes: dict[int, int] = {}
    for index, word in enumerate(words):
        if not is_live(word):
            continue
        found = blocks.get(index << shift)
        if found is not None:
            generation, held, cache_session = found
            if held and generation == word:
                continue
            if cache_session in sessions and word >> GEN_SHIFT == cache_session:
                continue
        writes[index] = dead_word(word, RECLAIMED)
    for offset, (generation, held, _) in blocks.items():
        if held and not generation >> GEN_SHIFT and words[offset >> shift] != generation:
            writes[offset >> shift] = generation
    return writes
