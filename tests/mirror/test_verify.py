"""Online verify: the walk and its resume cursor, the source/majority/tie rules, the recheck
before reporting, bounded reports with exact counts, repair jobs, progress and ETA."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vsand.mirror.bitmap import MIB
from vsand.mirror.verify import (Rule, VerifyPlan, judge, region_checksum)

A, B = region_checksum(b"a" * 4096), region_checksum(b"b" * 4096)
C = region_checksum(b"c" * 4096)


def run(plan: VerifyPlan, digests: dict[int, dict[str, bytes]], now: float = 0.0) -> None:
    """Verify to the end; regions absent from ``digests`` agree on three nodes."""
    while not plan.finished:
        for job in plan.next_batch(8, now):
            plan.compare(job.region, digests.get(job.region, {"n1": A, "n2": A, "n3": A}), now)


def test_checksum_is_blake2b_128() -> None:
    assert len(A) == 16 and A != B
    assert region_checksum(memoryview(b"a" * 4096)) == A


def test_walk_covers_every_region_once_with_a_short_last_one() -> None:
    plan = VerifyPlan(10 * MIB + 4096, MIB, 4096)
    seen = []
    while batch := plan.next_batch(4, 0.0):
        seen += batch
    assert [j.region for j in seen] == list(range(11))
    assert (seen[-1].offset, seen[-1].length, seen[-1].blocks) == (10 * MIB, 4096, 1)
    assert seen[3].lba == 3 * MIB // 4096 and seen[3].blocks == 256
    assert not plan.finished  # handed out, not yet judged
    for j in seen:
        plan.compare(j.region, {"n1": A, "n2": A}, 1.0)
    assert plan.finished and plan.checked == 11 and plan.finished_at == 1.0


def test_cursor_is_a_safe_resume_point() -> None:
    plan = VerifyPlan(10 * MIB, MIB, 512, start=4)
    jobs = plan.next_batch(3, 0.0)
    assert [j.region for j in jobs] == [4, 5, 6] and plan.cursor == 4
    plan.compare(4, {"a": A, "b": A}, 0.0)
    plan.compare(6, {"a": A, "b": A}, 0.0)
    assert plan.cursor == 5  # 5 is still out: a resume must redo it
    plan.compare(5, {"a": A, "b": A}, 0.0)
    assert plan.cursor == 7
    resumed = VerifyPlan(10 * MIB, MIB, 512, start=plan.cursor)
    assert [j.region for j in resumed.next_batch(10, 0.0)] == [7, 8, 9]
    assert resumed.status(0.0).regions_total == 3


def test_judge_with_a_source() -> None:
    v = judge({"src": A, "x": B, "y": A}, source="src")
    assert v is not None and (v.rule, v.good, v.bad) == (Rule.SOURCE, ("src", "y"), ("x",))
    # Even against a majority: the named source is the authority.
    v = judge({"src": A, "x": B, "y": B}, source="src")
    assert v is not None and v.bad == ("x", "y")
    v = judge({"src": A, "x": B}, source="src")  # a two-node "tie" is decided by the source
    assert v is not None and v.good == ("src",)
    assert judge({"src": A, "x": A}, source="src") is None
    with pytest.raises(ValueError):
        judge({"x": A, "y": B}, source="src")


def test_judge_majority_and_ties() -> None:
    v = judge({"n1": A, "n2": B, "n3": A})
    assert v is not None and (v.rule, v.good, v.bad) == (Rule.MAJORITY, ("n1", "n3"), ("n2",))
    v = judge({"n1": A, "n2": B})
    assert v is not None and (v.rule, v.good, v.bad) == (Rule.UNDECIDED, (), ("n1", "n2"))
    v = judge({"n1": A, "n2": B, "n3": C})
    assert v is not None and v.rule is Rule.UNDECIDED and v.bad == ("n1", "n2", "n3")
    with pytest.raises(ValueError):
        judge({"n1": A})


@given(st.dictionaries(st.sampled_from(["n1", "n2", "n3", "n4", "n5"]),
                       st.sampled_from([A, B, C]), min_size=2),
       st.sampled_from([None, "n1", "n2"]))
def test_judge_properties(digests: dict[str, bytes], source: str | None) -> None:
    if source is not None and source not in digests:
        with pytest.raises(ValueError):
            judge(digests, source)
        return
    v = judge(digests, source)
    if v is None:
        assert len(set(digests.values())) == 1
        return
    assert set(v.good) | set(v.bad) == set(digests) and not set(v.good) & set(v.bad)
    assert len({digests[n] for n in v.good}) <= 1  # the good ones agree
    if v.rule is Rule.MAJORITY:
        assert 2 * len(v.good) > len(digests)
    if v.rule is Rule.UNDECIDED:
        assert source is None and not v.good


def test_mismatch_is_rechecked_before_it_is_reported() -> None:
    plan = VerifyPlan(4 * MIB, MIB, 512)
    jobs = plan.next_batch(2, 0.0)
    assert plan.compare(0, {"n1": A, "n2": B, "n3": A}, 0.0) is None  # first look: no report
    assert plan.cursor == 0 and plan.rechecks == 1 and plan.checked == 0
    plan.compare(jobs[1].region, {"n1": A, "n2": A, "n3": A}, 0.0)
    again = plan.next_batch(2, 1.0)
    assert [(j.region, j.recheck) for j in again] == [(0, True), (2, False)]
    m = plan.compare(0, {"n1": A, "n2": B, "n3": A}, 1.0)
    assert m is not None and m.rule is Rule.MAJORITY and m.bad == ("n2",) and m.repairable
    assert m.found_at == 1.0 and m.checksums == (("n1", A), ("n2", B), ("n3", A))
    assert plan.mismatch_count == 1 and plan.mismatches == (m,) and plan.checked == 2


def test_transient_mismatch_is_counted_not_reported() -> None:
    plan = VerifyPlan(MIB, MIB, 512)
    plan.next_batch(1, 0.0)
    plan.compare(0, {"n1": A, "n2": B}, 0.0)
    (job,) = plan.next_batch(1, 0.0)
    assert job.recheck
    assert plan.compare(0, {"n1": B, "n2": B}, 0.0) is None
    assert plan.transient == 1 and plan.mismatch_count == 0 and plan.finished


def test_tie_is_reported_not_repaired() -> None:
    plan = VerifyPlan(2 * MIB, MIB, 512)
    run(plan, {1: {"n1": A, "n2": B}})
    (m,) = plan.mismatches
    assert m.rule is Rule.UNDECIDED and not m.repairable and m.region == 1
    assert plan.repair_jobs() == []


def test_repair_jobs_from_source_and_majority_each_once() -> None:
    plan = VerifyPlan(8 * MIB, MIB, 4096, source="n1")
    run(plan, {2: {"n1": A, "n2": B}, 5: {"n1": A, "n2": B, "n3": B}})
    jobs = plan.repair_jobs()
    assert [(j.region, j.source, j.targets, j.lba, j.blocks, j.offset, j.length) for j in jobs] \
        == [(2, "n1", ("n2",), 512, 256, 2 * MIB, MIB), (5, "n1", ("n2", "n3"), 1280, 256,
                                                         5 * MIB, MIB)]
    assert plan.repair_jobs() == []
    majority = VerifyPlan(8 * MIB, MIB, 4096)
    run(majority, {3: {"n1": A, "n2": B, "n3": B}})
    (job,) = majority.repair_jobs()
    assert (job.source, job.targets) == ("n2", ("n1",))


def test_missing_digests_skip_the_region() -> None:
    plan = VerifyPlan(3 * MIB, MIB, 512, source="n1")
    plan.next_batch(3, 0.0)
    assert plan.compare(0, {"n2": A, "n3": A}, 0.0) is None  # no word from the source
    plan.abandon(1, 0.0)  # the requests failed
    plan.compare(2, {"n1": A, "n2": A}, 0.0)
    s = plan.status(0.0)
    assert (s.regions_skipped, s.regions_checked, s.mismatch_count) == (2, 1, 0)
    assert s.fraction == 1.0 and plan.finished


def test_reports_are_bounded_counts_exact() -> None:
    plan = VerifyPlan(50 * MIB, MIB, 512, max_reported=5, max_repairs=7)
    run(plan, {r: {"n1": A, "n2": B, "n3": B} for r in range(50)})
    assert plan.mismatch_count == 50 and len(plan.mismatches) == 5
    assert [m.region for m in plan.mismatches] == [0, 1, 2, 3, 4]
    assert len(plan.repair_jobs()) == 7 and plan.repairs_dropped == 43


def test_compare_of_a_region_not_handed_out() -> None:
    plan = VerifyPlan(4 * MIB, MIB, 512)
    with pytest.raises(ValueError):
        plan.compare(0, {"a": A, "b": A}, 0.0)
    plan.next_batch(1, 0.0)
    plan.compare(0, {"a": A, "b": A}, 0.0)
    with pytest.raises(ValueError):
        plan.compare(0, {"a": A, "b": A}, 0.0)


def test_status_progress_and_eta() -> None:
    plan = VerifyPlan(100 * MIB, MIB, 512, rate_period=1.0)
    s = plan.status(0.0)
    assert s.started_at is None and s.eta is None and s.fraction == 0.0
    for t in (0.1, 0.5):
        for job in plan.next_batch(10, t):
            plan.compare(job.region, {"a": A, "b": A}, t)
    s = plan.status(1.1)  # the first one-second window, from the start at 0.1, has closed
    assert s.regions_checked == 20 and s.fraction == pytest.approx(0.2)
    assert s.rate == pytest.approx(20.0) and s.eta == pytest.approx(4.0)
    assert s.started_at == 0.1 and s.finished_at is None and s.cursor == 20
    run(plan, {}, 3.0)
    s = plan.status(3.0)
    assert s.finished_at == 3.0 and s.eta == 0.0


@pytest.mark.parametrize("args", [(MIB, MIB, 3), (MIB + 1, MIB, 512), (MIB, 1000, 512)])
def test_bad_geometry(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        VerifyPlan(*args)


def test_start_out_of_range() -> None:
    with pytest.raises(ValueError):
        VerifyPlan(4 * MIB, MIB, 512, start=5)
