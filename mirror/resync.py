"""Resync planning, sans-IO: which chunks to copy, when a region is done, what a target may serve.

Theory of operation
-------------------
Source side, ``ResyncPlan``.  A peer that was away lacks the regions set in its
``DirtyBitmap``.  The plan sweeps the bitmap in LBA order and cuts each dirty region into copy
jobs of at most ``chunk_bytes`` (a job never crosses a region boundary, so a region's bit
depends on its own chunks only).  At most ``max_in_flight`` jobs are outstanding; the caller
reads each job's range from the local backend, sends it (RESYNC_DATA, ``request_id = job.id``),
and calls ``job_done`` when the target has acknowledged it (``job_failed`` on an error).  The
copies of one region form a *pass*; when every chunk of a pass has completed, the region's bit
is cleared.  A full sync is a plan over a bitmap with ``mark_all()``; a sparse one costs only
its dirty regions (the scan skips clean bytes in C).

Writes during the resync, the rule.  A foreground write that lands in a region while a pass
over it is running may have been read by the copy before or after it: the copy cannot be
trusted.  So the caller calls ``redirty(offset, length)`` for every write applied to the
source while the plan exists, **after the write is on the source's backend and before asking
for more jobs** (calling it earlier as well does no harm).  ``redirty`` sets the bits and marks
every pass overlapping the write *stale*: a stale pass issues no more chunks, its outstanding
chunks complete without effect, and the region, still dirty, is copied again by a later pass.
A region is therefore cleared only by a pass whose every chunk was issued after the region's
last redirty, and such a chunk read the source after that write had landed.  A region that
was already clean simply becomes dirty again.  Sweeps repeat (wrapping to LBA 0) until the
bitmap is empty; a region rewritten faster than it can be copied is copied again each time,
so the caller should replicate foreground writes to the target while it syncs (DESIGN:
in-sync writes keep flowing) and redirty only what the target may have missed or what raced
with a copy.

Why clear only on the target's acknowledgement: a bit cleared early and flushed to disk would
lose the region for good if the copy then failed.  The caller must make the copied data stable
on the target (FUA on the write, or a flush) before it persists a bitmap with the bit cleared.

Target side, ``StaleMap``.  The node being synced holds a mix of old and new data.  Every
region not yet brought up to date is stale; ``is_stale(offset, length)`` tells the daemon to
serve a read elsewhere or refuse it (a stale read is a lie).  ``data_arrived`` records resync
data written; a region becomes fresh once all of its bytes have arrived since it was last
marked stale.  A foreground write does not make a stale region fresh (its other blocks are
still old).  The target must never let resync data overwrite a newer foreground write: data
read by the source before a write that the target has already applied is dropped, not written
(compare ``ResyncData.seq`` with the seq of the writes applied to those blocks) and reported
as failed, so that the source copies it again.

Progress: ``bytes_done`` counts the bytes of chunks that completed while their pass was valid
(it only grows); ``bytes_remaining`` is the dirty bytes less the valid bytes already copied in
passes still running; ``bytes_total`` is their sum, so it grows when writes add work.  The
rate is a moving average of all bytes moved (stale ones too: they used the link), and the ETA
is remaining over rate.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .bitmap import DEFAULT_REGION_SIZE, MIB, DirtyBitmap
from .ratelimit import MovingRate

DEFAULT_CHUNK = MIB
DEFAULT_MAX_IN_FLIGHT = 8


class ResyncState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class CopyJob:
    """Copy bytes ``[offset, offset + length)`` (``blocks`` blocks at ``lba``) to the target."""
    id: int
    region: int
    lba: int
    blocks: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ResyncProgress:
    state: ResyncState
    bytes_total: int
    bytes_done: int
    bytes_remaining: int
    bytes_stale: int  # copied by passes a write made stale: copied again
    regions_remaining: int
    in_flight: int
    rate: float | None  # bytes per second, moving average; None until measured
    eta: float | None  # seconds; None while the rate is unknown or zero
    started_at: float | None
    finished_at: float | None


@dataclass(slots=True)
class _Pass:
    """One copy of one region: chunks issued in order from ``offset`` to ``end``."""
    region: int
    end: int
    next: int  # the offset of the next chunk to issue
    in_flight: int = 0
    done_bytes: int = 0  # bytes of chunks completed while the pass was valid
    stale: bool = False  # a write landed in the region after this pass began


class ResyncPlan:
    """The source side of a resync over ``bitmap`` (which it clears as regions complete)."""

    __slots__ = ("bitmap", "region_size", "block_size", "chunk_bytes", "max_in_flight",
                 "_active", "_current", "_jobs", "_next_id", "_cursor", "_paused",
                 "_cancelled", "_partial", "bytes_done", "bytes_stale", "sweeps",
                 "stale_passes", "failures", "regions_cleared", "_rate", "started_at",
                 "finished_at")

    def __init__(
        self,
        bitmap: DirtyBitmap,
        region_size: int | None = None,
        chunk_bytes: int = DEFAULT_CHUNK,
        block_size: int = 512,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        *,
        rate_period: float = 1.0,
        rate_tau: float = 5.0,
    ) -> None:
        if region_size is not None and region_size != bitmap.region_size:
            raise ValueError(f"region size {region_size} differs from the bitmap's "
                             f"{bitmap.region_size}")
        if block_size <= 0 or bitmap.region_size % block_size or bitmap.size_bytes % block_size:
            raise ValueError(f"block size {block_size} must divide the region size "
                             f"{bitmap.region_size} and the LUN size {bitmap.size_bytes}")
        if chunk_bytes <= 0 or chunk_bytes % block_size:
            raise ValueError(f"chunk of {chunk_bytes} bytes is not whole {block_size}-byte "
                             "blocks")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self.bitmap = bitmap
        self.region_size = bitmap.region_size
        self.block_size = block_size
        self.chunk_bytes = chunk_bytes
        self.max_in_flight = max_in_flight
        self._active: dict[int, _Pass] = {}  # region -> its running pass (at most one)
        self._current: _Pass | None = None  # the pass still issuing chunks
        self._jobs: dict[int, tuple[CopyJob, _Pass]] = {}  # outstanding, by job id
        self._next_id = 1  # 0 is RESYNC_DATA's "pushed, no request": keep ids distinct from it
        self._cursor = 0  # the region the sweep continues from
        self._paused = False
        self._cancelled = False
        self._partial = 0  # sum of done_bytes over valid running passes
        self.bytes_done = 0
        self.bytes_stale = 0
        self.sweeps = 0  # wraps to LBA 0 (a region redirtied behind the cursor needs one)
        self.stale_passes = 0
        self.failures = 0
        self.regions_cleared = 0
        self._rate = MovingRate(rate_period, rate_tau)
        self.started_at: float | None = None
        self.finished_at: float | None = None

    # ----------------------------------------------------------------------------- state

    @property
    def state(self) -> ResyncState:
        if self._cancelled:
            return ResyncState.CANCELLED
        if self.finished:
            return ResyncState.DONE
        return ResyncState.PAUSED if self._paused else ResyncState.RUNNING

    @property
    def finished(self) -> bool:
        """Every region is clean and nothing is in flight: the target is up to date."""
        return not self._jobs and self.bitmap.count == 0

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    def pause(self) -> None:
        """Issue no new jobs; outstanding ones still complete normally."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def cancel(self) -> None:
        """Stop for good.  Outstanding jobs still count when they complete (their data did
        reach the target); the bitmap keeps the rest for a later resync."""
        self._cancelled = True
        self._current = None

    # ----------------------------------------------------------------------------- jobs

    def next_jobs(self, now: float) -> list[CopyJob]:
        """Jobs to start now, up to the in-flight bound; [] when paused, cancelled, done, or
        when every dirty region already has a pass running (ask again after ``job_done``)."""
        if self.started_at is None:
            self.started_at = now
            self._rate.start(now)
        if self._cancelled or self._paused:
            return []
        jobs: list[CopyJob] = []
        while len(self._jobs) < self.max_in_flight:
            p = self._current or self._start_pass()
            if p is None:
                break
            length = min(self.chunk_bytes, p.end - p.next)
            job = CopyJob(self._next_id, p.region, p.next // self.block_size,
                          length // self.block_size, p.next, length)
            self._next_id += 1
            p.next += length
            p.in_flight += 1
            self._current = p if p.next < p.end else None
            self._jobs[job.id] = (job, p)
            jobs.append(job)
        self._note_finished(now)
        return jobs

    def job_done(self, job: CopyJob, now: float) -> bool:
        """The target has ``job``'s data.  True if that completed (and cleared) its region."""
        p = self._take(job)
        self._rate.add(job.length, now)
        if p.stale:
            self.bytes_stale += job.length
        else:
            p.done_bytes += job.length
            self._partial += job.length
            self.bytes_done += job.length
        cleared = False
        if p.in_flight == 0 and (p.stale or p.next >= p.end):
            del self._active[p.region]
            if not p.stale:
                # Every chunk of this pass was issued after the region's last redirty.
                self._partial -= p.done_bytes
                self.bitmap.clear(p.region)
                self.regions_cleared += 1
                cleared = True
        self._note_finished(now)
        return cleared

    def job_failed(self, job: CopyJob, now: float) -> None:
        """The copy did not reach the target: its region stays dirty and is copied again."""
        p = self._take(job)
        self.failures += 1
        if not p.stale:
            self._invalidate(p)
        elif p.in_flight == 0:
            del self._active[p.region]

    def redirty(self, offset: int, length: int) -> list[int]:
        """A write landed on the source at ``[offset, offset + length)`` during the resync
        (rule: the module docstring).  Returns the regions that were clean and are dirty now."""
        fresh = self.bitmap.mark(offset, length)
        if length:
            end = offset + length
            for p in list(self._active.values()):
                start = p.region * self.region_size
                if not p.stale and start < end and offset < p.end:
                    self._invalidate(p)
        if fresh:
            self.finished_at = None
        return fresh

    # ----------------------------------------------------------------------------- progress

    def progress(self, now: float) -> ResyncProgress:
        remaining = max(0, self.bitmap.dirty_bytes - self._partial)
        rate = self._rate.value(now)
        eta = remaining / rate if rate else None
        if remaining == 0:
            eta = 0.0
        return ResyncProgress(
            state=self.state,
            bytes_total=self.bytes_done + remaining,
            bytes_done=self.bytes_done,
            bytes_remaining=remaining,
            bytes_stale=self.bytes_stale,
            regions_remaining=self.bitmap.count,
            in_flight=len(self._jobs),
            rate=rate,
            eta=eta,
            started_at=self.started_at,
            finished_at=self.finished_at,
        )

    # ----------------------------------------------------------------------------- internals

    def _start_pass(self) -> _Pass | None:
        """A pass over the next dirty region without one, sweeping on from the cursor and
        wrapping once to region 0: regions redirtied behind the cursor are found that way."""
        starts = (self._cursor, 0) if self._cursor else (0,)
        for wrapped, start in enumerate(starts):
            # At most len(_active) regions are skipped: those already being copied.
            for region in self.bitmap.dirty_regions(start):
                if region not in self._active:
                    offset, length = self.bitmap.region_extent(region)
                    p = _Pass(region, offset + length, offset)
                    self._active[region] = p
                    self._cursor = region + 1
                    self.sweeps += wrapped
                    return p
        return None

    def _invalidate(self, p: _Pass) -> None:
        p.stale = True
        self.stale_passes += 1
        # Its valid bytes were counted off the remaining work; they must be copied again.
        self._partial -= p.done_bytes
        if self._current is p:
            self._current = None
        if p.in_flight == 0:
            del self._active[p.region]

    def _take(self, job: CopyJob) -> _Pass:
        entry = self._jobs.pop(job.id, None)
        if entry is None or entry[0] != job:
            if entry is not None:
                self._jobs[job.id] = entry
            raise ValueError(f"job {job.id} is not outstanding")
        p = entry[1]
        p.in_flight -= 1
        return p

    def _note_finished(self, now: float) -> None:
        if self.finished_at is None and self.finished:
            self.finished_at = now

    def __repr__(self) -> str:
        return (f"ResyncPlan({self.state.value}, dirty={self.bitmap.count}, "
                f"in_flight={len(self._jobs)}, done={self.bytes_done})")


class StaleMap:
    """Target side: the regions of this replica that are not yet up to date (module doc)."""

    __slots__ = ("_bits", "_arrived")

    def __init__(self, size_bytes: int, region_size: int = DEFAULT_REGION_SIZE) -> None:
        # The same structure as a dirty bitmap, queried in the read path: range tests cost a
        # couple of big-int operations, not a step per region.
        self._bits = DirtyBitmap(size_bytes, region_size)
        # Stale regions partly rewritten by resync data: merged [start, end) byte intervals.
        self._arrived: dict[int, list[tuple[int, int]]] = {}

    @classmethod
    def from_bitmap(cls, bitmap: DirtyBitmap) -> StaleMap:
        """Stale where ``bitmap`` (the source's bitmap for this node) is dirty; a copy."""
        stale = cls(bitmap.size_bytes, bitmap.region_size)
        stale._bits.merge(bitmap)
        return stale

    @classmethod
    def full(cls, size_bytes: int, region_size: int = DEFAULT_REGION_SIZE) -> StaleMap:
        """Everything stale: the target of a full sync."""
        stale = cls(size_bytes, region_size)
        stale._bits.mark_all()
        return stale

    @property
    def size_bytes(self) -> int:
        return self._bits.size_bytes

    @property
    def region_size(self) -> int:
        return self._bits.region_size

    @property
    def count(self) -> int:
        return self._bits.count

    @property
    def stale_bytes(self) -> int:
        return self._bits.dirty_bytes

    @property
    def up_to_date(self) -> bool:
        return self._bits.count == 0

    def is_stale(self, offset: int, length: int) -> bool:
        """True if any byte of ``[offset, offset + length)`` may be out of date here."""
        return self._bits.is_dirty(offset, length)

    def stale_regions(self, start: int = 0) -> list[int]:
        return list(self._bits.dirty_regions(start))

    def mark_stale(self, offset: int, length: int) -> list[int]:
        """The range is out of date again (the source says so); returns regions newly stale.
        Resync data already received for those regions no longer counts."""
        end = offset + length
        for region in [r for r in self._arrived
                       if r * self.region_size < end and offset < (r + 1) * self.region_size]:
            del self._arrived[region]
        return self._bits.mark(offset, length)

    def mark_fresh(self, region: int) -> bool:
        """The whole region is up to date; True if it was stale."""
        self._arrived.pop(region, None)
        return self._bits.clear(region)

    def data_arrived(self, offset: int, length: int) -> list[int]:
        """Resync data for ``[offset, offset + length)`` is written here; returns the regions
        that are up to date now (every byte arrived since they were last marked stale)."""
        if length <= 0:
            return []
        if offset < 0 or offset + length > self.size_bytes:
            raise ValueError(f"range [{offset}, {offset + length}) outside the LUN")
        size = self.region_size
        fresh: list[int] = []
        for region in range(offset // size, (offset + length - 1) // size + 1):
            r_start, r_len = self._bits.region_extent(region)
            if not self._bits.is_dirty(r_start, r_len):
                continue
            lo, hi = max(offset, r_start), min(offset + length, r_start + r_len)
            got = _add_interval(self._arrived.get(region, []), lo, hi)
            if got == [(r_start, r_start + r_len)]:
                self.mark_fresh(region)
                fresh.append(region)
            else:
                self._arrived[region] = got
        return fresh

    def __repr__(self) -> str:
        return f"StaleMap(stale={self._bits.count}/{self._bits.regions})"


def _add_interval(intervals: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """``intervals`` (sorted, disjoint, non-adjacent) with ``[lo, hi)`` added and merged."""
    out: list[tuple[int, int]] = []
    for a, b in intervals:
        if b < lo or hi < a:
            out.append((a, b))
        else:
            lo, hi = min(lo, a), max(hi, b)
    out.append((lo, hi))
    out.sort()
    return out
