"""DirtyBitmap: range marking at boundaries, scanning cost, merge, persistence and corruption."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vsand.mirror import bitmap as bitmap_mod
from vsand.mirror.bitmap import MIB, BitmapCorrupt, DirtyBitmap
from vsand.mirror.metastore import MemoryMetaStore

TIB = 1 << 40


def test_geometry_and_short_last_region() -> None:
    bm = DirtyBitmap(10 * MIB + 5, MIB)
    assert bm.regions == 11
    assert bm.region_extent(10) == (10 * MIB, 5)
    bm.mark(10 * MIB, 5)
    assert bm.count == 1 and bm.dirty_bytes == 5
    bm.mark(0, 1)
    assert bm.dirty_bytes == MIB + 5


def test_mark_boundaries() -> None:
    bm = DirtyBitmap(64 * MIB, MIB)
    assert bm.mark(MIB - 1, 1) == [0]  # last byte of region 0
    assert bm.mark(MIB - 1, 2) == [1]  # straddles 0|1; 0 already dirty
    assert bm.mark(2 * MIB, MIB) == [2]  # exactly one region, ends on a boundary
    assert bm.mark(5 * MIB, 0) == []  # empty write touches nothing
    assert not bm.is_dirty(3 * MIB, MIB)
    assert bm.is_dirty(3 * MIB - 1, 1)
    assert bm.mark(7 * MIB + 1, 20 * MIB) == list(range(7, 28))
    assert bm.mark(0, 64 * MIB) == [3, 4, 5, 6] + list(range(28, 64))
    assert bm.count == 64 and bm.mark(0, 64 * MIB) == []
    with pytest.raises(ValueError):
        bm.mark(64 * MIB, 1)
    with pytest.raises(ValueError):
        bm.mark(-1, 2)
    with pytest.raises(ValueError):
        bm.is_dirty(63 * MIB, MIB + 1)


def test_clear_and_is_dirty_ranges() -> None:
    bm = DirtyBitmap(100 * MIB, MIB)
    bm.mark(10 * MIB, 3 * MIB)
    assert bm.clear(11) and not bm.clear(11)
    assert bm.is_dirty(0, 100 * MIB)
    assert not bm.is_dirty(11 * MIB, MIB)
    assert list(bm.dirty_regions()) == [10, 12]
    assert list(bm.dirty_regions(11)) == [12]
    with pytest.raises(ValueError):
        bm.clear(100)
    bm.clear_all()
    assert bm.count == 0 and list(bm.dirty_regions()) == []


def test_mark_all_respects_spare_bits() -> None:
    bm = DirtyBitmap(13 * MIB, MIB)
    bm.mark_all()
    assert bm.count == 13
    assert list(bm.dirty_regions()) == list(range(13))
    assert DirtyBitmap.from_bytes(bm.to_bytes()).count == 13


def test_clear_while_iterating() -> None:
    bm = DirtyBitmap(64 * MIB, MIB)
    for r in (1, 2, 9, 40):
        bm.mark(r * MIB, 1)
    seen = []
    for region in bm.dirty_regions():
        seen.append(region)
        bm.clear(region)
    assert seen == [1, 2, 9, 40] and bm.count == 0


class _LineBudget:
    """Counts Python line events in the bitmap module; aborts far past the budget, so a
    per-region loop over a huge bitmap fails quickly instead of running for minutes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.lines = 0

    def tracer(self, frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        if frame.f_code.co_filename != bitmap_mod.__file__:
            return None
        return self._local

    def _local(self, frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        if event == "line":
            self.lines += 1
            if self.lines > self.budget * 100:
                raise AssertionError("per-region Python loop detected")
        return self._local


def test_scan_of_huge_mostly_clean_bitmap_is_not_per_region() -> None:
    bm = DirtyBitmap(16 * TIB, MIB)
    assert bm.regions == 16 * 1024 * 1024
    targets = [5, 8_000_000, bm.regions - 1]
    for r in targets:
        bm.mark(r * MIB, 4096)
    budget = _LineBudget(200)
    previous = sys.gettrace()
    sys.settrace(budget.tracer)
    try:
        found = list(bm.dirty_regions())
        assert bm.is_dirty(0, 16 * TIB)
    finally:
        sys.settrace(previous)
    assert found == targets
    # A handful of lines per dirty region, nothing per clean one.
    assert budget.lines < 200, budget.lines


def test_huge_merge_and_roundtrip() -> None:
    a = DirtyBitmap(16 * TIB, MIB)
    b = DirtyBitmap(16 * TIB, MIB)
    a.mark(0, 1)
    b.mark(16 * TIB - 1, 1)
    a.merge(b)
    assert list(a.dirty_regions()) == [0, a.regions - 1]
    blob = a.to_bytes()
    assert len(blob) < 64 * 1024  # mostly clean compresses
    c = DirtyBitmap.from_bytes(blob)
    assert list(c.dirty_regions()) == [0, a.regions - 1]


def test_merge_requires_same_geometry() -> None:
    with pytest.raises(ValueError):
        DirtyBitmap(10 * MIB).merge(DirtyBitmap(11 * MIB))


def test_flush_is_lazy_and_load_restores() -> None:
    store = MemoryMetaStore()
    bm = DirtyBitmap(32 * MIB, MIB)
    assert not bm.flush(store, "bm")  # nothing changed, nothing written
    bm.mark(3 * MIB, 1)
    assert bm.flush(store, "bm")
    assert not bm.flush(store, "bm")
    assert store.writes == 1
    loaded = DirtyBitmap.load(store, "bm", 32 * MIB, MIB)
    assert list(loaded.dirty_regions()) == [3] and not loaded.changed
    assert DirtyBitmap.load(store, "other", 32 * MIB, MIB).count == 0
    with pytest.raises(BitmapCorrupt):
        DirtyBitmap.load(store, "bm", 64 * MIB, MIB)


def test_failed_flush_stays_changed() -> None:
    store = MemoryMetaStore()
    bm = DirtyBitmap(8 * MIB, MIB)
    bm.mark(0, 1)
    store.arm_crash()
    with pytest.raises(Exception):
        bm.flush(store, "bm")
    assert bm.changed
    assert bm.flush(store, "bm")


def test_every_single_bit_flip_is_detected() -> None:
    bm = DirtyBitmap(40 * MIB, MIB)
    bm.mark(5 * MIB, 3 * MIB)
    blob = bm.to_bytes()
    for index in range(len(blob)):
        for bit in range(8):
            damaged = bytearray(blob)
            damaged[index] ^= 1 << bit
            with pytest.raises(BitmapCorrupt):
                DirtyBitmap.from_bytes(bytes(damaged))
    for cut in range(len(blob)):
        with pytest.raises(BitmapCorrupt):
            DirtyBitmap.from_bytes(blob[:cut])


def test_unknown_version_is_rejected() -> None:
    import struct
    import zlib

    blob = bytearray(DirtyBitmap(8 * MIB).to_bytes()[:-4])
    blob[4:6] = struct.pack("<H", 99)
    body = bytes(blob)
    with pytest.raises(BitmapCorrupt, match="version"):
        DirtyBitmap.from_bytes(body + struct.pack("<I", zlib.crc32(body)))


@given(
    st.integers(1, 300),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 50)), max_size=30),
    st.lists(st.integers(0, 299), max_size=10),
)
def test_matches_a_set_model(regions: int, writes: list[tuple[int, int]], clears: list[int]) -> None:
    size = regions * 1000 - 7 if regions > 1 else 1000
    bm = DirtyBitmap(size, 1000)
    model: set[int] = set()
    for start, length in writes:
        offset, length = start * 250 % size, length * 300
        length = min(length, size - offset)
        expected = set(range(offset // 1000, (offset + length - 1) // 1000 + 1)) if length else set()
        assert sorted(bm.mark(offset, length)) == sorted(expected - model)
        model |= expected
    for region in clears:
        if region < bm.regions:
            assert bm.clear(region) == (region in model)
            model.discard(region)
    assert list(bm.dirty_regions()) == sorted(model)
    assert bm.count == len(model)
    again = DirtyBitmap.from_bytes(bm.to_bytes())
    assert list(again.dirty_regions()) == sorted(model)
