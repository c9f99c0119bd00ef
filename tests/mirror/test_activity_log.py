"""ActivityLog: metadata writes only for new regions, shared pending transactions, eviction,
crash recovery, and a state machine checking the tracking invariant against the store."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vsand.mirror.activity_log import (
    ActivityLog,
    ActivityLogCorrupt,
    ActivityLogFull,
    Transaction,
    TxState,
    mark_regions,
)
from vsand.mirror.bitmap import DirtyBitmap
from vsand.mirror.metastore import MemoryMetaStore, SimulatedCrash

R = 1 << 20  # region size used throughout


def make(slots: int = 4) -> tuple[MemoryMetaStore, ActivityLog]:
    store = MemoryMetaStore()
    return store, ActivityLog(store, "al", slots=slots, region_size=R)


def test_persists_only_when_a_region_enters() -> None:
    store, al = make()
    tx = al.begin_write(0, 4096)
    assert tx is not None and not al.covers(0, 4096)
    assert al.persist_pending() == 1
    assert tx.committed and al.covers(0, 4096)
    al.end_write(0, 4096)
    # The same region again, many times: no metadata write at all.
    for i in range(100):
        assert al.begin_write(i * 4096, 4096) is None
        al.end_write(i * 4096, 4096)
    assert store.writes == 1
    assert al.begin_write(R, 1) is not None  # a new region
    assert al.persist_pending() == 1 and store.writes == 2
    assert ActivityLog.recover(store, "al", R) == {0, 1}


def test_concurrent_writes_share_pending_transactions() -> None:
    store, al = make()
    tx1 = al.begin_write(0, 1)
    assert tx1 is not None
    assert al.begin_write(1, 1) is tx1  # same region, still open: same transaction
    sealed = al.next_transaction()
    assert sealed is tx1 and tx1.state is TxState.WRITING and tx1.added == {0}
    assert al.begin_write(2, 1) is tx1  # same region, being written: wait for it
    tx2 = al.begin_write(R, 1)  # a new region while tx1 is being written: the next one
    assert tx2 is not None and tx2 is not tx1
    assert al.begin_write(2 * R, 1) is tx2
    assert al.next_transaction() is None  # one at a time, in order
    al.persist(tx1)
    al.commit(tx1)
    assert al.covers(0, 1) and not al.covers(R, 1)
    assert al.next_transaction() is tx2 and tx2.added == {1, 2}
    assert al.begin_write(R + 5, 1) is tx2
    al.persist(tx2)
    al.commit(tx2)
    assert al.covers(0, 3 * R) and store.writes == 2
    assert al.next_transaction() is None


def test_region_evicted_then_reused_waits_for_the_right_transaction() -> None:
    store, al = make(slots=1)
    assert al.begin_write(0, 1) is not None
    al.persist_pending()
    al.end_write(0, 1)
    tx = al.begin_write(R, 1)  # evicts region 0
    assert tx is not None
    assert al.next_transaction() is tx and tx.evicted == {0} and tx.added == {1}
    al.end_write(R, 1)
    # Region 0 is still on disk, but the transaction being written drops it: not covered.
    later = al.begin_write(0, 1)
    assert later is not None and later is not tx
    al.persist(tx)
    al.commit(tx)
    assert not al.covers(0, 1)
    assert al.persist_pending() == 1 and al.covers(0, 1)
    assert ActivityLog.recover(store, "al", R) == {0}


def test_lru_eviction_skips_regions_in_flight() -> None:
    _, al = make(slots=3)
    for r in range(3):
        al.begin_write(r * R, 1)
    al.persist_pending()
    al.end_write(1 * R, 1)
    al.end_write(2 * R, 1)
    al.begin_write(1 * R, 1)  # region 1 becomes most recently used
    al.end_write(1 * R, 1)
    tx = al.begin_write(3 * R, 1)
    assert tx is not None
    assert al.next_transaction() is tx
    assert tx.evicted == {2}  # region 0 has a write in flight, region 2 is the coldest idle
    assert al.active_regions() == {0, 1, 3}


def test_full_log_refuses_without_changing_state() -> None:
    store, al = make(slots=2)
    al.begin_write(0, 2 * R)  # regions 0 and 1, both in flight
    al.persist_pending()
    before = (al.active_regions(), al.in_flight(0), al.in_flight(1))
    with pytest.raises(ActivityLogFull):
        al.begin_write(5 * R, 1)
    assert (al.active_regions(), al.in_flight(0), al.in_flight(1)) == before
    al.end_write(R, 1)  # one region idle now
    assert al.begin_write(5 * R, 1) is not None
    assert al.active_regions() == {0, 5}


def test_write_larger_than_the_log_is_refused() -> None:
    _, al = make(slots=4)
    with pytest.raises(ValueError):
        al.begin_write(0, 5 * R)
    assert al.begin_write(0, 4 * R) is not None


def test_end_write_without_begin_is_an_error() -> None:
    _, al = make()
    with pytest.raises(ValueError):
        al.end_write(0, 1)


@pytest.mark.parametrize("lands", [True, False])
def test_crash_between_transaction_data_and_commit(lands: bool) -> None:
    store, al = make()
    al.begin_write(0, 1)
    al.persist_pending()
    tx = al.begin_write(3 * R, 1)
    assert tx is not None
    store.arm_crash(lands=lands)
    with pytest.raises(SimulatedCrash):
        al.persist_pending()
    # The write to region 3 was never issued (its transaction never committed), so whether
    # region 3 is recovered or not, nothing is lost; region 0 must be there either way.
    recovered = ActivityLog.recover(store, "al", R)
    assert recovered == ({0, 3} if lands else {0})


def test_recovered_regions_leave_only_after_bitmap_flush() -> None:
    store, al = make()
    al.begin_write(0, 1)
    al.begin_write(7 * R, 1)
    al.persist_pending()
    # crash: restart
    recovered = ActivityLog.recover(store, "al", R)
    assert recovered == {0, 7}
    bm = DirtyBitmap(16 * R, R)
    mark_regions(bm, recovered, R)
    bm.flush(store, "bm")
    al2 = ActivityLog(store, "al", slots=4, region_size=R, on_disk=recovered)
    assert al2.begin_write(2 * R, 1) is not None
    flushed: list[Transaction] = []
    al2.persist_pending(before_write=flushed.append)
    assert flushed[0].evicted == {0, 7} and flushed[0].added == {2}
    assert ActivityLog.recover(store, "al", R) == {2}


def test_abort_then_retry() -> None:
    store, al = make()
    tx = al.begin_write(0, 1)
    assert tx is not None
    store.arm_crash(lands=False)
    with pytest.raises(SimulatedCrash):
        al.persist_pending()
    assert tx.state is TxState.ABORTED and not al.covers(0, 1)
    al.end_write(0, 1)  # the waiting write failed
    again = al.begin_write(0, 1)
    assert again is not None and again is not tx
    al.persist_pending()
    assert al.covers(0, 1)


def test_clean_shutdown_empties_the_log() -> None:
    store, al = make()
    al.begin_write(0, 3 * R)
    al.persist_pending()
    al.end_write(0, 3 * R)
    al.evict_idle()
    al.persist_pending()
    assert ActivityLog.recover(store, "al", R) == set()


def test_recover_converts_region_size() -> None:
    store = MemoryMetaStore()
    al = ActivityLog(store, "al", slots=4, region_size=4 * R)
    al.begin_write(4 * R + 10, 1)  # 4 MiB region 1 = bytes [4 MiB, 8 MiB)
    al.persist_pending()
    assert ActivityLog.recover(store, "al", R) == {4, 5, 6, 7}
    assert ActivityLog.recover(store, "al", 8 * R) == {0}


def test_missing_and_corrupt_records() -> None:
    store, al = make()
    assert ActivityLog.recover(store, "al", R) == set()
    al.begin_write(0, 1)
    al.persist_pending()
    blob = store.read("al")
    assert blob is not None
    for index in range(len(blob)):
        store.corrupt("al", index)
        with pytest.raises(ActivityLogCorrupt):
            ActivityLog.recover(store, "al", R)
        store.corrupt("al", index)  # flip it back
    assert ActivityLog.recover(store, "al", R) == {0}


def test_mark_regions_clips_at_lun_end() -> None:
    bm = DirtyBitmap(10 * R + 3, R)
    mark_regions(bm, {2, 10, 11, 500}, 4 * R)
    assert list(bm.dirty_regions()) == [8, 9, 10]


# --------------------------------------------------------------------------------- state machine

REGIONS = 6
SIZE = REGIONS * R
SLOTS = 2


class Degraded(RuleBasedStateMachine):
    """A node writing while its only peer is away, crashing at any point.

    The owner follows the documented protocol: mark the peer's bitmap in memory when issuing a
    write, issue only once the activity log covers it, flush the bitmap before writing a
    transaction that evicts, and after a crash mark the recovered regions into the bitmap and
    flush it before starting a new log.  Checked after every step, against what is on the
    store: every region the peer lacks is in the stored log or the stored bitmap.
    """

    @initialize()
    def start(self) -> None:
        self.store = MemoryMetaStore()
        self.al = ActivityLog(self.store, "al", slots=SLOTS, region_size=R)
        self.bm = DirtyBitmap(SIZE, R)
        self.lacking: set[int] = set()  # regions the peer lacks (a local write may have landed)
        self.waiting: list[tuple[int, int, Transaction | None]] = []
        self.issued: list[tuple[int, int]] = []
        self.sealed: Transaction | None = None
        self.sealed_flushed = False
        self.sealed_persisted = False

    @rule(start=st.integers(0, REGIONS - 1), count=st.integers(1, 3), inner=st.integers(0, R - 1))
    def begin(self, start: int, count: int, inner: int) -> None:
        count = min(count, REGIONS - start, SLOTS)
        offset, length = start * R + inner, (count - 1) * R + 1
        try:
            tx = self.al.begin_write(offset, length)
        except ActivityLogFull:
            return
        if tx is None:
            assert self.al.covers(offset, length)
        self.waiting.append((offset, length, tx))

    @precondition(lambda self: self.sealed is None)
    @rule(start=st.integers(0, REGIONS - 1))
    def whole_write(self, start: int) -> None:
        """The common path in one step: begin, persist what is needed, issue, complete."""
        try:
            tx = self.al.begin_write(start * R, 1)
        except ActivityLogFull:
            return
        if tx is not None:
            self.al.persist_pending(before_write=self._before_write)
        self.issued.append((start * R, 1))
        self.issue_checked(start * R, 1)
        self.complete(len(self.issued) - 1)

    def _before_write(self, tx: Transaction) -> None:
        if tx.evicted:
            self.bm.flush(self.store, "bm")

    def issue_checked(self, offset: int, length: int) -> None:
        assert self.al.covers(offset, length)
        self.bm.mark(offset, length)
        self.lacking.update(range(offset // R, (offset + length - 1) // R + 1))

    @precondition(lambda self: any(tx is None or tx.committed for _, _, tx in self.waiting))
    @rule(pick=st.integers(0, 100))
    def issue(self, pick: int) -> None:
        ready = [w for w in self.waiting if w[2] is None or w[2].committed]
        offset, length, tx = ready[pick % len(ready)]
        self.waiting.remove((offset, length, tx))
        self.issue_checked(offset, length)
        self.issued.append((offset, length))

    @precondition(lambda self: bool(self.issued))
    @rule(pick=st.integers(0, 100))
    def complete(self, pick: int) -> None:
        offset, length = self.issued.pop(pick % len(self.issued))
        self.al.end_write(offset, length)

    @precondition(lambda self: self.sealed is None)
    @rule()
    def seal(self) -> None:
        self.sealed = self.al.next_transaction()
        self.sealed_flushed = self.sealed_persisted = False

    @precondition(lambda self: self.sealed is not None and not self.sealed_persisted)
    @rule()
    def flush_for_eviction(self) -> None:
        assert self.sealed is not None
        self._before_write(self.sealed)
        self.sealed_flushed = True

    @precondition(
        lambda self: self.sealed is not None
        and not self.sealed_persisted
        and (self.sealed_flushed or not self.sealed.evicted)
    )
    @rule()
    def persist(self) -> None:
        assert self.sealed is not None
        self.al.persist(self.sealed)
        self.sealed_persisted = True

    @precondition(lambda self: self.sealed is not None and self.sealed_persisted)
    @rule()
    def commit(self) -> None:
        assert self.sealed is not None
        self.al.commit(self.sealed)
        self.sealed = None

    @rule()
    def periodic_flush(self) -> None:
        self.bm.flush(self.store, "bm")

    @rule(region=st.integers(0, REGIONS - 1))
    def resync_region(self, region: int) -> None:
        busy = {
            r
            for offset, length in self.issued
            for r in range(offset // R, (offset + length - 1) // R + 1)
        }
        if region in busy:
            return
        self.bm.clear(region)
        self.lacking.discard(region)

    @rule(lands=st.booleans())
    def crash(self, lands: bool) -> None:
        # A sealed transaction whose store write was under way may or may not have landed.
        if self.sealed is not None and not self.sealed_persisted and lands:
            if self.sealed_flushed or not self.sealed.evicted:
                self.store.write("al", self.sealed.data)
        recovered = ActivityLog.recover(self.store, "al", R)
        bm = DirtyBitmap.load(self.store, "bm", SIZE, R)
        assert self.lacking <= recovered | set(bm.dirty_regions())
        mark_regions(bm, recovered, R)
        bm.flush(self.store, "bm")
        self.bm = bm
        self.al = ActivityLog(self.store, "al", slots=SLOTS, region_size=R, on_disk=recovered)
        self.waiting, self.issued = [], []
        self.sealed = None
        # The peer still lacks what it lacked; the bitmap now says so in memory too.
        assert self.lacking <= set(self.bm.dirty_regions())

    @invariant()
    def lacking_regions_are_on_stable_storage(self) -> None:
        recovered = ActivityLog.recover(self.store, "al", R)
        stored = self.store.read("bm")
        on_disk_bm = set(DirtyBitmap.from_bytes(stored).dirty_regions()) if stored else set()
        assert self.lacking <= recovered | on_disk_bm

    @invariant()
    def issued_writes_are_covered(self) -> None:
        for offset, length in self.issued:
            assert self.al.covers(offset, length)

    @invariant()
    def memory_is_bounded(self) -> None:
        assert len(self.al) <= SLOTS


TestDegraded = Degraded.TestCase
TestDegraded.settings = settings(max_examples=1000, stateful_step_count=50, deadline=None)
