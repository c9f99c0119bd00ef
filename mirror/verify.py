"""Online verify, sans-IO: walk every region, compare replica checksums, name the bad copy.

Theory of operation
-------------------
``VerifyPlan`` walks a LUN's regions in LBA order.  ``next_batch(n, now)`` hands out regions to
checksum; for each, the caller sends VERIFY_REQUEST to every in-sync replica (itself included),
collects the digests and calls ``compare(region, {node: digest}, now)``.  The walk can start
from a cursor (``start``), and ``cursor`` is always a safe place to resume: every region before
it has been judged.

Checksum: ``region_checksum`` is BLAKE2b with a 16-byte digest over the region's bytes, every
node computing it the same way.  It runs about as fast as memory in CPython's C code and a
chance collision (a corrupted region reported equal) is out of the question at 128 bits, where
a 32-bit CRC would let one bad region in four billion pass.  The planner only compares bytes,
so the caller may pick another function as long as every node uses the same one.

Consistency under concurrent writes.  Writes keep running during a verify; a region checksummed
on one replica before a write and on another after it would differ for no fault.  The rule:
every replica checksums a region *as of the same sequence number*.  The ``seq`` in
VERIFY_REQUEST means: each node applies every write numbered below ``seq`` that touches the
region, and none numbered at or above it, before reading the region (it holds later
overlapping writes back until the checksum is taken).  The simplest way to get that is to have
the sequencer number the checksum like a write over the region: the ordering engine already
runs it on every replica after each earlier overlapping write and before each later one.
Even so, a mismatch is first *rechecked*: ``compare`` does not report it but queues
the region, ``next_batch`` hands it out again first (``job.recheck``), and only a second
mismatch is reported; a mismatch that vanished is counted as ``transient`` (a sign the as-of
rule is not being kept, worth an alarm of its own).

Deciding who is wrong (``judge``):

* a designated ``source`` node: it is right; every node whose digest differs from it is bad.
  Without the source's digest the region is skipped (no authority, no verdict);
* no source: the digest held by a strict majority of the answering nodes is right and the rest
  are bad (three nodes, two against one: the odd one out);
* no strict majority (two nodes that differ, or three different digests): reported as
  undecided with every node listed, and never repaired automatically: which copy is right is
  an operator's choice (DESIGN invariant 4: the direction is never guessed).
Fewer than two digests cannot be compared: the region is counted as skipped.

Results: exact counts (regions checked, skipped, mismatched, rechecked, transient), the first
``max_reported`` mismatches in full, the run's start and end times, a moving-average rate and an
ETA.  ``repair_jobs()`` hands out, once each, the copy jobs (from a good node to the bad ones)
of the repairable mismatches; whether to call it is the operator's "verify --repair" choice.
At most ``max_repairs`` wait to be handed out (the rest are counted in ``repairs_dropped``):
that many bad regions mean a replica to rebuild with a full resync, not to patch.
A repair is a resync of one region: copy it like a ``CopyJob`` (with the same redirty rule),
then verify it again.
"""

from __future__ import annotations

import enum
import hashlib
from collections import deque
from dataclasses import dataclass
from typing import TypeAlias

from .bitmap import DEFAULT_REGION_SIZE
from .ratelimit import MovingRate

Buffer: TypeAlias = bytes | bytearray | memoryview
CHECKSUM_BYTES = 16
DEFAULT_MAX_REPORTED = 100
DEFAULT_MAX_REPAIRS = 65536


def region_checksum(data: Buffer) -> bytes:
    """The digest every node computes over a region's bytes (BLAKE2b-128)."""
    return hashlib.blake2b(data, digest_size=CHECKSUM_BYTES).digest()


class Rule(enum.Enum):
    SOURCE = "source"  # the designated source is right
    MAJORITY = "majority"  # the digest of a strict majority is right
    UNDECIDED = "undecided"  # no authority: report, do not repair


@dataclass(frozen=True, slots=True)
class Verdict:
    rule: Rule
    good: tuple[str, ...]  # nodes holding the right data; () when undecided
    bad: tuple[str, ...]  # nodes to repair; every node when undecided


def judge(checksums: dict[str, bytes], source: str | None = None) -> Verdict | None:
    """The rules of the module docstring; None when the replicas agree.

    Raises ValueError when no verdict is possible (fewer than two digests, or the source's
    missing); ``VerifyPlan.compare`` counts that as a skipped region.
    """
    if len(checksums) < 2:
        raise ValueError(f"{len(checksums)} checksum(s): nothing to compare")
    # Before the agreement test: replicas agreeing among themselves without the source do
    # not show that they hold the source's data.
    if source is not None and source not in checksums:
        raise ValueError(f"no checksum from the source {source}")
    if len(set(checksums.values())) == 1:
        return None
    if source is not None:
        right = checksums[source]
        good = tuple(sorted(n for n, c in checksums.items() if c == right))
        bad = tuple(sorted(n for n, c in checksums.items() if c != right))
        return Verdict(Rule.SOURCE, good, bad)
    groups: dict[bytes, list[str]] = {}
    for node, digest in checksums.items():
        groups.setdefault(digest, []).append(node)
    largest = max(groups.values(), key=len)
    if 2 * len(largest) > len(checksums):
        good = tuple(sorted(largest))
        return Verdict(Rule.MAJORITY, good,
                       tuple(sorted(n for n in checksums if n not in largest)))
    return Verdict(Rule.UNDECIDED, (), tuple(sorted(checksums)))


@dataclass(frozen=True, slots=True)
class VerifyJob:
    """Checksum bytes ``[offset, offset + length)`` (``blocks`` at ``lba``) on every replica."""
    region: int
    lba: int
    blocks: int
    offset: int
    length: int
    recheck: bool  # a second look after a first mismatch


@dataclass(frozen=True, slots=True)
class Mismatch:
    region: int
    lba: int
    blocks: int
    rule: Rule
    good: tuple[str, ...]
    bad: tuple[str, ...]
    checksums: tuple[tuple[str, bytes], ...]  # by node name, as the second look saw them
    found_at: float

    @property
    def repairable(self) -> bool:
        return bool(self.good)


@dataclass(frozen=True, slots=True)
class RepairJob:
    """Copy region ``region`` from ``source`` to every node of ``targets``."""
    region: int
    lba: int
    blocks: int
    offset: int
    length: int
    source: str
    targets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class VerifyStatus:
    regions_total: int  # in this run: from the start cursor to the end of the LUN
    regions_checked: int  # judged (agreeing or reported), rechecks not counted twice
    regions_skipped: int  # too few digests, or none from the source
    mismatch_count: int  # exact
    mismatches: tuple[Mismatch, ...]  # the first ``max_reported``
    rechecks: int
    transient: int  # mismatches gone on recheck
    in_flight: int
    cursor: int
    started_at: float | None
    finished_at: float | None
    rate: float | None  # regions per second, moving average
    eta: float | None  # seconds

    @property
    def fraction(self) -> float:
        done = self.regions_checked + self.regions_skipped
        return 1.0 if self.regions_total == 0 else done / self.regions_total


class VerifyPlan:
    """One verify run over a LUN of ``size_bytes`` (module docstring)."""

    __slots__ = ("size_bytes", "region_size", "block_size", "regions", "source",
                 "max_reported", "start", "_next", "_out", "_recheck", "_repairs",
                 "checked", "skipped", "mismatch_count", "_reported", "rechecks", "transient",
                 "max_repairs", "repairs_dropped", "started_at", "finished_at", "_rate")

    def __init__(
        self,
        size_bytes: int,
        region_size: int = DEFAULT_REGION_SIZE,
        block_size: int = 512,
        *,
        source: str | None = None,
        start: int = 0,
        max_reported: int = DEFAULT_MAX_REPORTED,
        max_repairs: int = DEFAULT_MAX_REPAIRS,
        rate_period: float = 1.0,
        rate_tau: float = 5.0,
    ) -> None:
        if block_size <= 0 or region_size <= 0 or region_size % block_size \
                or size_bytes < 0 or size_bytes % block_size:
            raise ValueError(f"block size {block_size} must divide the region size "
                             f"{region_size} and the LUN size {size_bytes}")
        self.size_bytes = size_bytes
        self.region_size = region_size
        self.block_size = block_size
        self.regions = -(-size_bytes // region_size)
        if not 0 <= start <= self.regions:
            raise ValueError(f"start region {start} outside 0..{self.regions}")
        self.source = source
        self.max_reported = max_reported
        self.start = start
        self._next = start  # the next region never handed out
        self._out: dict[int, bool] = {}  # region handed out -> is it a recheck
        self._recheck: deque[int] = deque()  # first mismatches waiting for a second look
        self._repairs: deque[Mismatch] = deque()  # repairable, not yet handed out
        self.checked = 0
        self.skipped = 0
        self.mismatch_count = 0
        self._reported: list[Mismatch] = []
        self.rechecks = 0
        self.transient = 0
        self.max_repairs = max_repairs
        self.repairs_dropped = 0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._rate = MovingRate(rate_period, rate_tau)

    # ----------------------------------------------------------------------------- walk

    @property
    def finished(self) -> bool:
        return self._next >= self.regions and not self._out and not self._recheck

    @property
    def cursor(self) -> int:
        """Where a new run may resume without missing a region: all before it are judged."""
        pending = list(self._out) + list(self._recheck)
        return min(pending, default=self._next)

    def next_batch(self, n: int, now: float) -> list[VerifyJob]:
        """Up to ``n`` regions to checksum now: pending rechecks first, then the walk."""
        if self.started_at is None:
            self.started_at = now
            self._rate.start(now)
        jobs: list[VerifyJob] = []
        while len(jobs) < n and self._recheck:
            region = self._recheck.popleft()
            self._out[region] = True
            jobs.append(self._job(region, True))
        while len(jobs) < n and self._next < self.regions:
            region = self._next
            self._next += 1
            self._out[region] = False
            jobs.append(self._job(region, False))
        self._note_finished(now)
        return jobs

    def compare(self, region: int, checksums: dict[str, bytes], now: float) -> Mismatch | None:
        """Judge the digests of a region handed out by ``next_batch``.  Returns the mismatch
        when one is *reported* (only after a recheck), else None."""
        if region not in self._out:
            raise ValueError(f"region {region} was not handed out")
        recheck = self._out.pop(region)
        self._rate.add(1, now)
        try:
            verdict = judge(checksums, self.source)
        except ValueError:
            self.skipped += 1
            self._note_finished(now)
            return None
        mismatch = None
        if verdict is None:
            self.checked += 1
            if recheck:
                self.transient += 1
        elif not recheck:
            # Not counted as checked yet: the region's verdict waits for its second look.
            self._recheck.append(region)
            self.rechecks += 1
        else:
            self.checked += 1
            mismatch = self._report(region, verdict, checksums, now)
        self._note_finished(now)
        return mismatch

    def abandon(self, region: int, now: float) -> None:
        """No digests will come for a handed-out region (the request failed): skip it."""
        self.compare(region, {}, now)

    # ----------------------------------------------------------------------------- results

    @property
    def mismatches(self) -> tuple[Mismatch, ...]:
        return tuple(self._reported)

    def status(self, now: float) -> VerifyStatus:
        total = self.regions - self.start
        rate = self._rate.value(now)
        left = total - self.checked - self.skipped
        eta = 0.0 if left <= 0 else (left / rate if rate else None)
        return VerifyStatus(
            regions_total=total,
            regions_checked=self.checked,
            regions_skipped=self.skipped,
            mismatch_count=self.mismatch_count,
            mismatches=tuple(self._reported),
            rechecks=self.rechecks,
            transient=self.transient,
            in_flight=len(self._out),
            cursor=self.cursor,
            started_at=self.started_at,
            finished_at=self.finished_at,
            rate=rate,
            eta=eta,
        )

    def repair_jobs(self) -> list[RepairJob]:
        """Copy jobs for the repairable mismatches reported since the last call (each once).
        The copy source is the designated source, else the first node of the majority."""
        jobs: list[RepairJob] = []
        while self._repairs:
            m = self._repairs.popleft()
            source = self.source if self.source in m.good else m.good[0]
            offset = m.region * self.region_size
            jobs.append(RepairJob(m.region, m.lba, m.blocks, offset, m.blocks * self.block_size,
                                  source, m.bad))
        return jobs

    # ----------------------------------------------------------------------------- internals

    def _job(self, region: int, recheck: bool) -> VerifyJob:
        offset = region * self.region_size
        length = min(self.region_size, self.size_bytes - offset)
        return VerifyJob(region, offset // self.block_size, length // self.block_size, offset,
                         length, recheck)

    def _report(self, region: int, verdict: Verdict, checksums: dict[str, bytes],
                now: float) -> Mismatch:
        job = self._job(region, True)
        m = Mismatch(region, job.lba, job.blocks, verdict.rule, verdict.good, verdict.bad,
                     tuple(sorted(checksums.items())), now)
        self.mismatch_count += 1
        # The list is bounded (a wholly corrupt replica would fill memory); the count is not.
        if len(self._reported) < self.max_reported:
            self._reported.append(m)
        if m.repairable:
            if len(self._repairs) < self.max_repairs:
                self._repairs.append(m)
            else:
                self.repairs_dropped += 1
        return m

    def _note_finished(self, now: float) -> None:
        if self.finished_at is None and self.finished:
            self.finished_at = now

    def __repr__(self) -> str:
        return (f"VerifyPlan(cursor={self.cursor}/{self.regions}, checked={self.checked}, "
                f"mismatches={self.mismatch_count})")
