"""Resync planning: only dirty chunks, the in-flight bound, the redirty rule (a region is clean
only after a copy issued after its last write), progress and ETA arithmetic, the target's
stale map, and a randomized check of the redirty rule over arbitrary interleavings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsand.mirror.bitmap import MIB, DirtyBitmap
from vsand.mirror.resync import CopyJob, ResyncPlan, ResyncState, StaleMap

TIB = 1 << 40
KIB = 1 << 10


def state(plan: ResyncPlan) -> ResyncState:
    """The plan's state, read afresh (a plain attribute read would stay narrowed for mypy)."""
    return plan.state


def drain(plan: ResyncPlan, now: float = 0.0) -> list[CopyJob]:
    """Run the plan to the end with no writes; the jobs it issued."""
    issued: list[CopyJob] = []
    while True:
        jobs = plan.next_jobs(now)
        if not jobs:
            break
        issued += jobs
        for job in jobs:
            plan.job_done(job, now)
    assert plan.finished
    return issued


def test_sparse_bitmap_copies_only_dirty_chunks() -> None:
    bm = DirtyBitmap(16 * TIB, MIB)
    for region in (7, 1_000_000, 16 * 1024 * 1024 - 1):  # the last region of the LUN
        bm.mark(region * MIB, 1)
    plan = ResyncPlan(bm, MIB, chunk_bytes=256 * KIB, block_size=4096, max_in_flight=64)
    jobs = plan.next_jobs(0.0)
    assert [(j.region, j.offset) for j in jobs] == [
        (r, r * MIB + i * 256 * KIB) for r in (7, 1_000_000, 16 * 1024 * 1024 - 1)
        for i in range(4)]
    assert all(j.blocks == 64 and j.lba == j.offset // 4096 for j in jobs)
    assert len({j.id for j in jobs}) == 12 and 0 not in {j.id for j in jobs}
    assert plan.next_jobs(0.0) == []
    for j in jobs:
        plan.job_done(j, 1.0)
    assert bm.count == 0 and plan.finished and state(plan) is ResyncState.DONE
    assert plan.finished_at == 1.0
    assert plan.progress(1.0).bytes_done == 3 * MIB


def test_chunks_do_not_cross_regions_and_last_region_is_short() -> None:
    bm = DirtyBitmap(3 * MIB + 8 * KIB, MIB)
    bm.mark_all()
    plan = ResyncPlan(bm, chunk_bytes=768 * KIB, block_size=4096, max_in_flight=100)
    jobs = drain(plan)
    assert [(j.offset, j.length) for j in jobs] == [
        (0, 768 * KIB), (768 * KIB, 256 * KIB),
        (MIB, 768 * KIB), (MIB + 768 * KIB, 256 * KIB),
        (2 * MIB, 768 * KIB), (2 * MIB + 768 * KIB, 256 * KIB),
        (3 * MIB, 8 * KIB)]
    assert sum(j.length for j in jobs) == bm.size_bytes


def test_in_flight_bound() -> None:
    bm = DirtyBitmap(64 * MIB, MIB)
    bm.mark_all()
    plan = ResyncPlan(bm, block_size=512, max_in_flight=3)
    first = plan.next_jobs(0.0)
    assert len(first) == 3 and plan.in_flight == 3
    assert plan.next_jobs(0.0) == []
    plan.job_done(first[1], 0.1)
    again = plan.next_jobs(0.1)
    assert len(again) == 1 and again[0].region == 3


def test_redirty_during_copy_copies_again() -> None:
    bm = DirtyBitmap(8 * MIB, MIB)
    bm.mark(2 * MIB, MIB)
    plan = ResyncPlan(bm, block_size=512)
    (job,) = plan.next_jobs(0.0)
    assert plan.redirty(2 * MIB + 4096, 512) == []  # already dirty: nothing newly dirty
    assert plan.job_done(job, 0.1) is False  # the copy may predate the write
    assert bm.is_dirty(2 * MIB, MIB) and not plan.finished
    (again,) = plan.next_jobs(0.2)
    assert again.region == 2 and again.id != job.id
    assert plan.job_done(again, 0.3) is True
    assert plan.finished and plan.stale_passes == 1
    p = plan.progress(0.3)
    assert p.bytes_stale == MIB and p.bytes_done == MIB and p.bytes_remaining == 0


def test_redirty_of_a_multi_chunk_region_stops_its_pass() -> None:
    bm = DirtyBitmap(8 * MIB, 4 * MIB)
    bm.mark(0, 1)
    plan = ResyncPlan(bm, chunk_bytes=MIB, block_size=512, max_in_flight=2)
    a, b = plan.next_jobs(0.0)
    plan.job_done(a, 0.0)
    plan.redirty(3 * MIB, 512)  # lands in a chunk not yet issued: the pass is stale all the same
    # The stale pass issues nothing more; its last chunk drains, then a new pass starts.
    assert plan.next_jobs(0.0) == []
    assert plan.job_done(b, 0.0) is False
    jobs = drain(plan)
    assert [j.offset for j in jobs] == [0, MIB, 2 * MIB, 3 * MIB]


def test_redirty_of_a_clean_region_and_behind_the_cursor() -> None:
    bm = DirtyBitmap(8 * MIB, MIB)
    bm.mark(5 * MIB, 1)
    plan = ResyncPlan(bm, block_size=512)
    drain(plan)
    assert state(plan) is ResyncState.DONE
    assert plan.redirty(MIB, 1) == [1]  # behind the cursor: found by wrapping
    assert state(plan) is ResyncState.RUNNING and plan.finished_at is None
    (job,) = plan.next_jobs(1.0)
    assert job.region == 1 and plan.sweeps == 1
    plan.job_done(job, 2.0)
    assert plan.finished and plan.finished_at == 2.0


def test_redirty_elsewhere_does_not_spoil_a_pass() -> None:
    bm = DirtyBitmap(8 * MIB, MIB)
    bm.mark(0, 1)
    plan = ResyncPlan(bm, block_size=512)
    (job,) = plan.next_jobs(0.0)
    plan.redirty(MIB, MIB)  # the next region, touching region 0 not at all
    assert plan.job_done(job, 0.0) is True
    assert [j.region for j in drain(plan)] == [1]


def test_failed_job_leaves_region_dirty_for_a_retry() -> None:
    bm = DirtyBitmap(4 * MIB, 2 * MIB)
    bm.mark(0, 1)
    plan = ResyncPlan(bm, chunk_bytes=MIB, block_size=512)
    a, b = plan.next_jobs(0.0)
    plan.job_done(a, 0.0)
    plan.job_failed(b, 0.0)
    assert plan.failures == 1 and bm.count == 1
    assert plan.progress(0.0).bytes_remaining == 2 * MIB
    assert [j.offset for j in drain(plan)] == [0, MIB]


def test_unknown_or_repeated_job_is_refused() -> None:
    bm = DirtyBitmap(4 * MIB, MIB)
    bm.mark_all()
    plan = ResyncPlan(bm, block_size=512, max_in_flight=1)
    (job,) = plan.next_jobs(0.0)
    plan.job_done(job, 0.0)
    with pytest.raises(ValueError):
        plan.job_done(job, 0.0)
    (other,) = plan.next_jobs(0.0)
    forged = CopyJob(other.id, other.region + 1, other.lba, other.blocks, other.offset,
                     other.length)
    with pytest.raises(ValueError):
        plan.job_done(forged, 0.0)
    assert plan.job_done(other, 0.0)  # the real one is still outstanding


def test_progress_and_eta_arithmetic() -> None:
    bm = DirtyBitmap(100 * MIB, MIB)
    bm.mark(0, 10 * MIB)
    plan = ResyncPlan(bm, block_size=512, max_in_flight=2, rate_period=1.0)
    p = plan.progress(0.0)
    assert (p.bytes_total, p.bytes_done, p.bytes_remaining) == (10 * MIB, 0, 10 * MIB)
    assert p.rate is None and p.eta is None and p.started_at is None
    a, b = plan.next_jobs(0.0)
    plan.job_done(a, 0.5)
    plan.job_done(b, 0.9)  # both in the first one-second window
    p = plan.progress(1.0)
    assert (p.bytes_done, p.bytes_remaining, p.regions_remaining) == (2 * MIB, 8 * MIB, 8)
    assert p.rate == pytest.approx(2 * MIB) and p.eta == pytest.approx(4.0)
    assert p.started_at == 0.0 and p.finished_at is None
    plan.redirty(50 * MIB, 1)  # a write to a clean region adds work
    assert plan.progress(1.0).bytes_total == 11 * MIB


def test_progress_counts_chunks_of_a_running_pass() -> None:
    bm = DirtyBitmap(16 * MIB, 4 * MIB)
    bm.mark(0, 8 * MIB)
    plan = ResyncPlan(bm, chunk_bytes=MIB, block_size=512, max_in_flight=1)
    (job,) = plan.next_jobs(0.0)
    plan.job_done(job, 0.0)
    p = plan.progress(0.0)
    assert (p.bytes_done, p.bytes_remaining, p.bytes_total) == (MIB, 7 * MIB, 8 * MIB)
    plan.redirty(0, 1)  # the copied MiB must go again: remaining grows back
    p = plan.progress(0.0)
    assert (p.bytes_done, p.bytes_remaining, p.bytes_total) == (MIB, 8 * MIB, 9 * MIB)


def test_pause_resume_cancel() -> None:
    bm = DirtyBitmap(8 * MIB, MIB)
    bm.mark_all()
    plan = ResyncPlan(bm, block_size=512, max_in_flight=2)
    a, b = plan.next_jobs(0.0)
    plan.pause()
    assert state(plan) is ResyncState.PAUSED and plan.next_jobs(0.0) == []
    assert plan.job_done(a, 0.0)  # in-flight work still counts while paused
    plan.resume()
    assert len(plan.next_jobs(0.0)) == 1
    plan.cancel()
    assert state(plan) is ResyncState.CANCELLED and plan.next_jobs(0.0) == []
    plan.job_done(b, 0.0)
    assert bm.count == 6  # regions 0 and 1 done; the rest stay for a later resync


def test_full_sync_is_a_plan_over_a_full_bitmap() -> None:
    bm = DirtyBitmap(10 * MIB, MIB)
    bm.mark_all()
    jobs = drain(ResyncPlan(bm, block_size=4096, max_in_flight=4))
    assert [j.region for j in jobs] == list(range(10)) and bm.count == 0


def test_nothing_dirty_is_done_at_once() -> None:
    plan = ResyncPlan(DirtyBitmap(MIB, MIB), block_size=512)
    assert plan.next_jobs(3.0) == [] and state(plan) is ResyncState.DONE
    assert plan.progress(3.0).eta == 0.0


@pytest.mark.parametrize("kw", [dict(region_size=2 * MIB), dict(block_size=3),
                                dict(chunk_bytes=1000), dict(max_in_flight=0)])
def test_plan_rejects_bad_geometry(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        ResyncPlan(DirtyBitmap(8 * MIB, MIB), **kw)


# --- the target's stale map ------------------------------------------------------------------

def test_stale_map_from_bitmap_is_a_copy() -> None:
    bm = DirtyBitmap(8 * MIB, MIB)
    bm.mark(2 * MIB, 2 * MIB)
    stale = StaleMap.from_bitmap(bm)
    bm.clear(2)
    assert stale.is_stale(2 * MIB, 1) and stale.is_stale(MIB, MIB + 1)
    assert not stale.is_stale(0, MIB) and not stale.is_stale(4 * MIB, 4 * MIB)
    assert stale.count == 2 and stale.stale_regions() == [2, 3]


def test_stale_map_fresh_only_when_the_whole_region_arrived() -> None:
    stale = StaleMap.full(2 * MIB + 4096, MIB)
    assert stale.stale_bytes == 2 * MIB + 4096
    assert stale.data_arrived(0, 512 * KIB) == []
    assert stale.data_arrived(768 * KIB, 256 * KIB) == []
    assert stale.is_stale(0, 1)  # a hole at 512..768 KiB remains
    assert stale.data_arrived(256 * KIB, 768 * KIB) == [0]
    assert not stale.is_stale(0, MIB) and stale.is_stale(0, MIB + 1)
    # A chunk spanning two regions, one of them fresh already; the short last region.
    assert stale.data_arrived(MIB - 4096, MIB + 4096) == [1]
    assert stale.data_arrived(2 * MIB, 4096) == [2]
    assert stale.up_to_date


def test_stale_map_mark_stale_forgets_partial_arrivals() -> None:
    stale = StaleMap.full(4 * MIB, 2 * MIB)
    stale.data_arrived(0, MIB)
    assert stale.mark_stale(0, 1) == []  # still stale; what arrived no longer counts
    assert stale.data_arrived(MIB, MIB) == []
    assert stale.data_arrived(0, MIB) == [0]
    assert stale.mark_stale(512, 1) == [0]
    assert stale.mark_fresh(0) and not stale.mark_fresh(0)


def test_stale_map_ranges_are_checked() -> None:
    stale = StaleMap(MIB, MIB)
    with pytest.raises(ValueError):
        stale.data_arrived(MIB - 1, 2)
    with pytest.raises(ValueError):
        stale.is_stale(-1, 1)
    assert stale.data_arrived(0, 0) == []


# --- the redirty rule, randomized ---------------------------------------------------------------

REGIONS = 6
BLOCK = 512
REGION = 4 * BLOCK
OPS = st.one_of(
    st.tuples(st.just("next"), st.just(0), st.just(0)),
    st.tuples(st.just("done"), st.integers(0, 63), st.just(0)),
    st.tuples(st.just("fail"), st.integers(0, 63), st.just(0)),
    st.tuples(st.just("redirty"), st.integers(0, REGIONS * 4 - 1), st.integers(1, 6)),
)


@settings(max_examples=300, deadline=None)
@given(initial=st.sets(st.integers(0, REGIONS - 1)),
       chunk_blocks=st.sampled_from([1, 2, 3, 4, 8]),
       max_in_flight=st.integers(1, 5),
       ops=st.lists(OPS, max_size=80))
def test_region_clean_only_after_a_copy_issued_after_its_last_write(
        initial: set[int], chunk_blocks: int, max_in_flight: int,
        ops: list[tuple[str, int, int]]) -> None:
    size = REGIONS * REGION
    bm = DirtyBitmap(size, REGION)
    for r in initial:
        bm.mark(r * REGION, 1)
    plan = ResyncPlan(bm, REGION, chunk_bytes=chunk_blocks * BLOCK, block_size=BLOCK,
                      max_in_flight=max_in_flight)
    clock = 0
    last_write = {r: 0 for r in initial}  # region -> logical time of its last write
    issued_at: dict[int, int] = {}
    outstanding: list[CopyJob] = []
    # (byte offset of a block) -> logical issue times of completed copies that covered it
    copied: dict[int, list[int]] = {}

    def check() -> None:
        for r, t in last_write.items():
            if not bm.is_dirty(r * REGION, REGION):
                for off in range(r * REGION, (r + 1) * REGION, BLOCK):
                    assert any(s > t for s in copied.get(off, [])), (r, off, t)
        p = plan.progress(float(clock))
        assert p.bytes_total == p.bytes_done + p.bytes_remaining and p.bytes_remaining >= 0
        assert plan.in_flight <= max_in_flight

    def complete(job: CopyJob) -> None:
        plan.job_done(job, float(clock))
        for off in range(job.offset, job.offset + job.length, BLOCK):
            copied.setdefault(off, []).append(issued_at[job.id])

    for op, a, b in ops:
        clock += 1
        if op == "next":
            for job in plan.next_jobs(float(clock)):
                issued_at[job.id] = clock
                outstanding.append(job)
        elif op in ("done", "fail") and outstanding:
            job = outstanding.pop(a % len(outstanding))
            if op == "done":
                complete(job)
            else:
                plan.job_failed(job, float(clock))
        elif op == "redirty":
            offset, length = a * BLOCK, min(b * BLOCK, size - a * BLOCK)
            plan.redirty(offset, length)
            for r in range(offset // REGION, (offset + length - 1) // REGION + 1):
                last_write[r] = clock
        check()
    # Quiesce: finish what is in flight, then run to the end with no more writes.
    while outstanding or not plan.finished:
        clock += 1
        for job in plan.next_jobs(float(clock)):
            issued_at[job.id] = clock
            outstanding.append(job)
        complete(outstanding.pop(0))
        check()
    assert bm.count == 0
    assert plan.progress(float(clock)).bytes_remaining == 0
