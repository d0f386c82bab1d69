"""The generation table's words (shm/gens.py) and the marks the pure ledger
asks for (Ledger.gens), driven through the service without a daemon: a dict
stands for the table, written as the server writes it."""

from __future__ import annotations

from shmarena.protocol import ASSIGN, GEN_SHIFT, Handle, Op
from shmarena.shm import gens
from tests.unit.test_cache_ledger import filled, gen, post
from tests.unit.test_service import EPOCH, MIN, Peer, make_service


class Table(dict):
    """address -> word, written as GenTable.mark writes."""

    def mark(self, address: int, generation: int, reason: int) -> None:
        if reason == gens.LIVE:
            self[address] = generation
        elif gens.may_kill(self.get(address, 0), generation):
            self[address] = gens.dead_word(generation, reason)

    def verdict(self, handle: list[int]) -> str | None:
        """What attach says of a wire handle: None when it attaches."""
        return gens.what_happened(self.get(handle[2], 0), handle[4])


def served() -> tuple[Peer, Table]:
    service = make_service(4 << 20)
    table = Table()
    service.ledger.gens = table.mark
    return Peer(service, b"a"), table


def test_words_tell_freed_from_handed_out_again_and_never() -> None:
    assert gens.what_happened(5, 5) is None
    assert "never handed out" in (gens.what_happened(0, 5) or "")
    assert "handed out again" in (gens.what_happened(9, 5) or "")
    for reason, word in [(gens.FREED, "freed"), (gens.RECYCLED, "recycled"), (gens.ENDED, "ended")]:
        dead = gens.dead_word(5, reason)
        assert not gens.is_live(dead)
        assert word in (gens.what_happened(dead, 5) or "")
        assert "handed out again" in (gens.what_happened(dead, 6) or "")
    keys = [gens.reason_key(w, 5) for w in (5, 0, 9, gens.dead_word(6, gens.FREED))]
    assert keys == ["live", "never", "handed_out_again", "handed_out_again"]
    assert gens.reason_key(gens.dead_word(5, gens.ENDED), 5) == "session_ended"
    cache_gen = (7 << GEN_SHIFT) + 3
    assert gens.is_live(cache_gen) and gens.is_live((1 << 23) - 1 << GEN_SHIFT | 1)


def test_may_kill_spares_a_newer_hand_out_but_not_a_session_that_ended() -> None:
    old, new = (7 << GEN_SHIFT) + 3, (7 << GEN_SHIFT) + 4
    assert gens.may_kill(old, old) and gens.may_kill(0, old)
    assert gens.may_kill(gens.dead_word(1, gens.FREED), old)
    assert not gens.may_kill(new, old)  # the cache handed it out again meanwhile
    assert gens.may_kill(new, gens.any_of_session(7))
    assert not gens.may_kill(new, gens.any_of_session(8))


def test_daemon_allocations_are_marked_live_and_free_marks_them_freed() -> None:
    peer, table = served()
    (wire,) = peer.ok(Op.ALLOC, 3 * MIB, None, False)
    assert table.verdict(wire) is None
    peer.ok(Op.FREE, [wire])
    assert "freed" in (table.verdict(wire) or "")
    (again,) = peer.ok(Op.ALLOC, 3 * MIB, None, False)
    assert again[2] == wire[2]  # the same block, a new generation
    assert "handed out again" in (table.verdict(wire) or "")
    assert table.verdict(again) is None


def test_recycle_and_session_end_say_why() -> None:
    peer, table = served()
    peer.ok(Op.OWNER, "batch", False, -1)
    (wire,) = peer.ok(Op.ALLOC, 3 * MIB // 4, "batch", False)
    peer.ok(Op.RECYCLE, "batch")
    assert "recycled" in (table.verdict(wire) or "")
    (held,) = peer.ok(Op.ALLOC, MIB, None, False)
    peer.service.reclaim(peer.session, "exited", 0.0)
    assert "session ended" in (table.verdict(held) or "")


def test_a_dead_sessions_cache_hand_outs_die_with_it_reported_or_not() -> None:
    """The client wrote the live words of hand-outs whose handles left the
    process: one the daemon heard of, one it did not, and one it heard of
    under an older generation (given back and handed out again since, the
    reports of which died with the process). When the session ends, all die."""
    peer, table = served()
    first, second, third = filled(peer, MIN, 3)
    reported, unreported, older, newer = (gen(peer, n) for n in (2, 3, 4, 5))
    table[first], table[second], table[third] = reported, unreported, newer  # escape()
    assert post(peer, ASSIGN, first, 100, reported, 0) is None
    assert post(peer, ASSIGN, third, 100, older, 0) is None
    peer.service.reclaim(peer.session, "exited", 0.0)
    for address, generation in [(first, reported), (second, unreported), (third, newer)]:
        handle = [EPOCH, 0, address, 100, generation]
        assert "session ended" in (table.verdict(handle) or ""), Handle(*handle)


MIB = 1 << 20


def test_check_words_finds_a_live_word_without_a_block_and_a_block_without_its_word() -> None:
    shift = 12
    blocks = {0: (5, True, False), 4096: ((3 << GEN_SHIFT) + 1, False, True)}
    words = [5, (3 << GEN_SHIFT) + 2, 0, 0]  # a cache may hand out unreported
    assert gens.check_words(words, shift, blocks) == []
    words[0] = gens.dead_word(5, gens.FREED)  # freed by its holder, FREE on the way
    assert gens.check_words(words, shift, blocks) == []
    words[2] = 9
    assert "0x2000 is live under generation 9" in gens.check_words(words, shift, blocks)[0]
    words[2], words[0] = 0, 0
    assert "block 0x0 is held under generation 5" in gens.check_words(words, shift, blocks)[0]


def test_rebuild_after_a_restart_keeps_what_is_held_and_kills_what_was_lost() -> None:
    shift, session = 12, 3
    mine = (session << GEN_SHIFT) + 9
    blocks = {
        0: (5, True, 0),  # the daemon's, held
        4096: ((session << GEN_SHIFT) + 1, False, session),  # in a living cache
        8192: (7, True, 0),  # held, its word lost (zeros after a reboot)
    }
    words = [5, mine, 0, 11, (4 << GEN_SHIFT) + 2]  # 3, 4: live, no block any more
    writes = gens.rebuilt(words, shift, blocks, {session})
    assert writes == {
        2: 7,
        3: gens.dead_word(11, gens.RECLAIMED),
        4: gens.dead_word((4 << GEN_SHIFT) + 2, gens.RECLAIMED),
    }
    assert "restarted" in (gens.what_happened(writes[3], 11) or "")
    # The cache's session did not come back: its hand-out's word dies too.
    assert 1 in gens.rebuilt(words, shift, blocks, set())
