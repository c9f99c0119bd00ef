"""Generation identifiers: every row of the decision table, mirror symmetry, life-cycle
scenarios (degraded, split brain, three nodes, crash, interrupted resync), persistence."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vsand.mirror.generations import (
    HISTORY_LEN,
    Decision,
    Generations,
    GenerationsCorrupt,
    Outcome,
    SyncKind,
    decide,
)

A, B, C, D, X, Y = 0xA, 0xB, 0xC, 0xD, 0x1111, 0x2222
LOCAL, PEER = 1, 2
IN_SYNC, LOCAL_SRC, PEER_SRC = Outcome.IN_SYNC, Outcome.LOCAL_IS_SOURCE, Outcome.PEER_IS_SOURCE
SPLIT, UNRELATED, NO_SOURCE = Outcome.SPLIT_BRAIN, Outcome.UNRELATED, Outcome.NO_SOURCE
NONE, BITMAP, FULL = SyncKind.NONE, SyncKind.BITMAP, SyncKind.FULL


def G(
    current: int = 0,
    history: tuple[int, ...] = (),
    bitmaps: dict[int, int] | None = None,
    inconsistent: bool = False,
) -> Generations:
    return Generations(current, tuple(sorted((bitmaps or {}).items())), history, inconsistent)


def counter_random() -> Callable[[int], bytes]:
    values = itertools.count(0x100)
    return lambda n: next(values).to_bytes(n, "little")


# Each row: local, peer, outcome, sync, rule number.  Local is node 1, peer node 2.
ROWS = [
    (G(), G(), NO_SOURCE, NONE, "1"),
    (G(A, inconsistent=True), G(A, inconsistent=True), NO_SOURCE, NONE, "1"),
    (G(), G(A), PEER_SRC, FULL, "2"),
    (G(A), G(), LOCAL_SRC, FULL, "2"),
    (G(), G(A, inconsistent=True), NO_SOURCE, NONE, "1"),
    # inconsistent, the peer's bitmap covers us: resume
    (G(A, inconsistent=True), G(B, (A,), {LOCAL: A}), PEER_SRC, BITMAP, "3"),
    (G(B, (A,), {PEER: A}), G(A, inconsistent=True), LOCAL_SRC, BITMAP, "3"),
    # inconsistent, related, no covering bitmap
    (G(A, inconsistent=True), G(B, (A,)), PEER_SRC, FULL, "3"),
    (G(X, (A,), inconsistent=True), G(B, (A,)), PEER_SRC, FULL, "3"),
    (G(X, (Y,), inconsistent=True), G(B, (A,)), UNRELATED, FULL, "4"),
    (G(A), G(A), IN_SYNC, NONE, "5"),
    (G(B, (A,), {PEER: A}), G(B), IN_SYNC, NONE, "5"),  # old bitmap, peer got B elsewhere
    (G(A, bitmaps={PEER: A}), G(A), PEER_SRC, BITMAP, "6"),
    (G(A), G(A, bitmaps={LOCAL: A}), LOCAL_SRC, BITMAP, "6"),
    (G(A, bitmaps={PEER: A}), G(A, bitmaps={LOCAL: A}), LOCAL_SRC, BITMAP, "7"),
    (G(A, (B,)), G(B, (A,)), SPLIT, FULL, "8"),
    (G(B, (A,), {PEER: A}), G(A), LOCAL_SRC, BITMAP, "9"),
    (G(A), G(B, (A,), {LOCAL: A}), PEER_SRC, BITMAP, "9"),
    (G(C, (B, A), {PEER: A}), G(B), LOCAL_SRC, BITMAP, "9"),  # bitmap older than peer's gen
    (G(C, (B, A), {PEER: B}), G(A), LOCAL_SRC, FULL, "10"),  # bitmap newer than peer's gen
    (G(C, (B, A)), G(A), LOCAL_SRC, FULL, "10"),
    (G(A), G(C, (B, A)), PEER_SRC, FULL, "10"),
    (G(B, (A,), {PEER: A}), G(C, (A,), {LOCAL: A}), SPLIT, BITMAP, "11"),
    (G(B, (A,)), G(C, (A,)), SPLIT, FULL, "12"),
    (G(B, (A,), {PEER: A}), G(C, (D, A)), SPLIT, FULL, "12"),
    (G(A), G(B), UNRELATED, FULL, "13"),
    (G(A, (X,)), G(B, (Y,)), UNRELATED, FULL, "13"),
]


@pytest.mark.parametrize(("local", "peer", "outcome", "sync", "rule"), ROWS)
def test_decision_table(
    local: Generations, peer: Generations, outcome: Outcome, sync: SyncKind, rule: str
) -> None:
    got = decide(local, peer, LOCAL, PEER)
    assert (got.outcome, got.sync) == (outcome, sync)
    assert got.rule.split()[0] == rule
    assert decide(peer, local, PEER, LOCAL) == got.mirrored()


def test_every_rule_has_a_row() -> None:
    assert {row[4] for row in ROWS} == {str(n) for n in range(1, 14)}


def test_tie_break_is_by_node_id_on_both_sides() -> None:
    a = G(A, bitmaps={5: A})
    b = G(A, bitmaps={3: A})
    assert decide(a, b, 3, 5).outcome is LOCAL_SRC  # node 3 (lower) is the source
    assert decide(b, a, 5, 3).outcome is PEER_SRC
    with pytest.raises(ValueError):
        decide(a, b, 3, 3)


uuids = st.sampled_from([A, B, C, D])


@st.composite
def generations(draw: st.DrawFn) -> Generations:
    current = draw(st.sampled_from([0, A, B, C, D]))
    history = tuple(draw(st.lists(uuids, unique=True, max_size=3)))
    bitmaps = {node: draw(uuids) for node in draw(st.sets(st.sampled_from([LOCAL, PEER, 3])))}
    return G(current, history, bitmaps, draw(st.booleans()))


@given(generations(), generations())
def test_decisions_are_mirror_images(a: Generations, b: Generations) -> None:
    ab = decide(a, b, LOCAL, PEER)
    ba = decide(b, a, PEER, LOCAL)
    assert ba == ab.mirrored()
    assert ab.mirrored().mirrored() == ab


@given(generations(), generations())
def test_a_source_always_has_consistent_data(a: Generations, b: Generations) -> None:
    d = decide(a, b, LOCAL, PEER)
    if d.outcome is LOCAL_SRC:
        assert a.has_data
    if d.outcome is PEER_SRC:
        assert b.has_data
    if d.outcome is IN_SYNC:
        assert a.current == b.current and d.sync is NONE
    # Split brain and unrelated are never resolved automatically: no direction is implied.
    assert d.outcome not in (SPLIT, UNRELATED) or d.sync is not NONE


# --------------------------------------------------------------------------------- scenarios


def test_degraded_then_bitmap_resync_interrupted_and_finished() -> None:
    rnd = counter_random()
    a = G().new_current(rnd)
    b = G().adopt_current(a.current)  # created together on fresh disks
    assert decide(a, b, 1, 2).outcome is IN_SYNC
    # b leaves the in-sync set; a keeps writing.
    a = a.start_tracking(2)
    assert a.needs_new_current()
    a = a.new_current(rnd)
    assert not a.needs_new_current()
    b_restarted = b.start_tracking(1)  # b saw a leave too (or crashed): tracks a at the old gen
    d = decide(a, b_restarted, 1, 2)
    assert (d.outcome, d.sync) == (LOCAL_SRC, BITMAP)
    a, handle = a.begin_sync_source(2)
    b = b_restarted.begin_sync_target(handle)
    # Interrupted: resumes from a's bitmap, never the other way round.
    assert (decide(a, b, 1, 2).outcome, decide(a, b, 1, 2).sync) == (LOCAL_SRC, BITMAP)
    assert decide(b, a, 2, 1).outcome is PEER_SRC
    b = b.adopt(a)
    a = a.sync_finished(2)
    assert decide(a, b, 1, 2).outcome is IN_SYNC
    assert a == b


def test_split_brain_is_detected_not_merged() -> None:
    rnd = counter_random()
    a = G().new_current(rnd)
    b = G().adopt_current(a.current)
    a = a.start_tracking(2).new_current(rnd)
    b = b.start_tracking(1).new_current(rnd)
    d = decide(a, b, 1, 2)
    assert (d.outcome, d.sync) == (SPLIT, BITMAP)
    # Later generations on both sides: still a split brain, now only a full sync repairs it.
    a = a.sync_finished(2).new_current(rnd)
    assert decide(a, b, 1, 2).outcome is SPLIT


def test_three_nodes_successive_failures() -> None:
    rnd = counter_random()
    g1 = G().new_current(rnd)
    a, b, c = g1, g1, g1
    # c leaves: a and b track it and adopt one new current chosen by the sequencer (a).
    a = a.start_tracking(3)
    b = b.start_tracking(3)
    a = a.new_current(rnd)
    b = b.adopt_current(a.current)
    assert decide(a, b, 1, 2).outcome is IN_SYNC
    # b leaves: a tracks it and moves on alone.
    a = a.start_tracking(2).new_current(rnd)
    # b and c meet (a down): b is the source, its bitmap for c suffices.
    d = decide(b, c, 2, 3)
    assert (d.outcome, d.sync) == (LOCAL_SRC, BITMAP)
    b, handle = b.begin_sync_source(3)
    c = c.begin_sync_target(handle).adopt(b)
    b = b.sync_finished(3)
    assert decide(b, c, 2, 3).outcome is IN_SYNC
    # a returns: source for both; for c its older bitmap (since g1) still covers c's generation.
    assert (decide(a, b, 1, 2).outcome, decide(a, b, 1, 2).sync) == (LOCAL_SRC, BITMAP)
    assert (decide(a, c, 1, 3).outcome, decide(a, c, 1, 3).sync) == (LOCAL_SRC, BITMAP)


def test_two_sequencers_drawing_independently_look_like_split_brain() -> None:
    # Why in-sync nodes must adopt one value rather than each draw their own.
    rnd = counter_random()
    g1 = G().new_current(rnd)
    a = g1.start_tracking(3).new_current(rnd)
    b = g1.start_tracking(3).new_current(rnd)
    assert decide(a, b, 1, 2).outcome is SPLIT


def test_crash_of_one_node_resyncs_its_activity_log_regions() -> None:
    rnd = counter_random()
    g1 = G().new_current(rnd)
    crashed = g1.start_tracking(2)  # restart: AL regions marked in every peer's bitmap
    survivor = g1  # saw nothing yet
    d = decide(crashed, survivor, 1, 2)
    assert (d.outcome, d.sync) == (PEER_SRC, BITMAP)
    survivor = survivor.start_tracking(1).new_current(rnd)  # survivor wrote meanwhile
    d = decide(crashed, survivor, 1, 2)
    assert (d.outcome, d.sync) == (PEER_SRC, BITMAP)


def test_new_node_gets_full_sync_and_interrupted_full_sync_resumes() -> None:
    rnd = counter_random()
    a = G().new_current(rnd).new_current(rnd)
    fresh = G()
    assert (decide(a, fresh, 1, 2).outcome, decide(a, fresh, 1, 2).sync) == (LOCAL_SRC, FULL)
    a, handle = a.begin_sync_source(2)
    assert handle == a.current
    fresh = fresh.begin_sync_target(handle)
    d = decide(a, fresh, 1, 2)
    assert (d.outcome, d.sync) == (LOCAL_SRC, BITMAP)  # the all-set bitmap, minus what's done


def test_new_current_skips_zero_and_known_values() -> None:
    draws = iter([0, A, 0x77])
    gens = G(A, (B,))
    nxt = gens.new_current(lambda n: next(draws).to_bytes(n, "little"))
    assert nxt.current == 0x77 and nxt.history == (A, B)
    with pytest.raises(RuntimeError):
        gens.new_current(lambda n: bytes(n))


def test_history_is_bounded() -> None:
    gens = G()
    rnd = counter_random()
    for _ in range(HISTORY_LEN + 5):
        gens = gens.new_current(rnd)
    assert len(gens.history) == HISTORY_LEN
    assert gens.adopt_current(gens.current) is gens


def test_start_tracking_keeps_the_older_bitmap() -> None:
    gens = G(A).start_tracking(2).adopt_current(B).start_tracking(2).start_tracking(3)
    assert gens.bitmap_for(2) == A and gens.bitmap_for(3) == B
    with pytest.raises(ValueError):
        G().start_tracking(2)
    with pytest.raises(ValueError):
        G(A).adopt(G(B, inconsistent=True))


# --------------------------------------------------------------------------------- persistence


@given(generations())
def test_roundtrip(gens: Generations) -> None:
    assert Generations.from_bytes(gens.to_bytes()) == gens


def test_every_bit_flip_and_truncation_is_detected() -> None:
    blob = G(A, (B, C), {2: B, 3: C}, inconsistent=True).to_bytes()
    for index in range(len(blob)):
        for bit in range(8):
            damaged = bytearray(blob)
            damaged[index] ^= 1 << bit
            with pytest.raises(GenerationsCorrupt):
                Generations.from_bytes(bytes(damaged))
    for cut in range(len(blob)):
        with pytest.raises(GenerationsCorrupt):
            Generations.from_bytes(blob[:cut])


def test_invalid_values_are_refused() -> None:
    cases: list[Callable[[], Generations]] = [
        lambda: Generations(-1),
        lambda: Generations(A, history=(0,)),
        lambda: Generations(A, history=(B, B)),
        lambda: Generations(A, bitmaps=((3, A), (2, A))),
        lambda: Generations(A, bitmaps=((2, 0),)),
        lambda: Generations(A, history=tuple(range(1, HISTORY_LEN + 2))),
    ]
    for bad in cases:
        with pytest.raises(ValueError):
            bad()


def test_decision_repr_names_the_rule() -> None:
    d = decide(G(A), G(B), 1, 2)
    assert isinstance(d, Decision) and d.rule.startswith("13")
