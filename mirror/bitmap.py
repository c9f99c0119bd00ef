"""Dirty-region bitmap: which regions of a LUN a peer does not have.

Theory of operation
-------------------
While a peer is out of the in-sync set, every write applied here sets the bit of each region it
touches in that peer's ``DirtyBitmap`` (one bitmap per absent peer).  Resync copies exactly the
dirty regions to the peer and clears each bit when the peer has the region.  One bit per region
(1 MiB by default) keeps a 16 TiB LUN's bitmap at 2 MiB.

The bitmap is kept in memory and written *lazily*: the owner calls ``flush`` now and then and at
clean shutdown.  The copy on disk may therefore be behind; what keeps tracking correct across a
crash is the activity log (``activity_log.py``): every region a write may be in flight on is in
the log on stable storage, so after a crash "log regions ∪ bitmap on disk" covers every region a
peer may lack.  The one ordering the owner must keep: before an activity-log transaction that
drops (evicts) a region becomes durable, a bitmap holding that region's bit must be flushed.

Scanning must not cost a Python step per region: a mostly clean multi-terabyte bitmap is
searched for non-zero bytes with a compiled regular expression (a C loop), and only dirty bytes
are expanded into region numbers.  Marking and testing ranges work on whole slices as Python
ints.

Encoding (``to_bytes``): a fixed header (magic, version, encoding, geometry, bit count, payload
length), the zlib-compressed bit array (a mostly clean bitmap compresses to almost nothing), and
a CRC-32 of everything before it.  Any mismatch raises ``BitmapCorrupt``; the caller must then
treat the whole LUN as dirty for that peer (a full resync), never as clean.
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterator

from .metastore import MetaStore
from .record import seal, unseal

MIB = 1 << 20
DEFAULT_REGION_SIZE = MIB

_MAGIC = b"VSBM"
_VERSION = 1
_ENC_ZLIB = 1
# magic, version, encoding, size_bytes, region_size, regions, dirty count, payload length
_HEADER = struct.Struct("<4sHHQQQQQ")

_NONZERO_RUN = re.compile(rb"[^\x00]+")
# For each byte value, the positions of its set bits: expands a dirty byte without a bit loop.
_BITS: tuple[tuple[int, ...], ...] = tuple(
    tuple(bit for bit in range(8) if value >> bit & 1) for value in range(256)
)


class BitmapCorrupt(ValueError):
    """A stored bitmap failed validation; its content must not be trusted."""


class DirtyBitmap:
    """One bit per region of a LUN of ``size_bytes``; region ``r`` covers bytes
    ``[r * region_size, (r + 1) * region_size)`` (the last region may be short)."""

    __slots__ = ("size_bytes", "region_size", "regions", "_bits", "_count", "changed")

    def __init__(self, size_bytes: int, region_size: int = DEFAULT_REGION_SIZE) -> None:
        if size_bytes < 0:
            raise ValueError(f"negative size {size_bytes}")
        if region_size <= 0:
            raise ValueError(f"region size must be positive, not {region_size}")
        self.size_bytes = size_bytes
        self.region_size = region_size
        self.regions = -(-size_bytes // region_size)
        self._bits = bytearray((self.regions + 7) // 8)
        self._count = 0
        # Set by every change, cleared by flush: lets the owner's timer skip idle bitmaps.
        self.changed = False

    # ----------------------------------------------------------------------------- queries

    @property
    def count(self) -> int:
        """Number of dirty regions."""
        return self._count

    @property
    def dirty_bytes(self) -> int:
        """Bytes covered by dirty regions (a short last region counts its real length)."""
        total = self._count * self.region_size
        last = self.regions - 1
        if last >= 0 and self._test(last):
            total -= self.regions * self.region_size - self.size_bytes
        return total

    def is_dirty(self, offset: int, length: int) -> bool:
        """True if any region overlapping ``[offset, offset + length)`` is dirty."""
        span = self._span(offset, length)
        if span is None:
            return False
        first, last = span
        if first == last:
            return self._test(first)
        lo, hi, mask = self._slice_mask(first, last)
        return int.from_bytes(self._bits[lo:hi], "little") & mask != 0

    def region_of(self, offset: int) -> int:
        return offset // self.region_size

    def region_extent(self, region: int) -> tuple[int, int]:
        """``(offset, length)`` of a region, clipped to the LUN's end."""
        self._check_region(region)
        start = region * self.region_size
        return start, min(self.region_size, self.size_bytes - start)

    def dirty_regions(self, start: int = 0) -> Iterator[int]:
        """Dirty region numbers in increasing order, from region ``start`` on.

        Costs one C-level search per run of non-zero bytes plus one step per dirty region, so a
        clean terabyte LUN scans in milliseconds.  Clearing regions while iterating is safe;
        regions marked meanwhile may or may not be reported (resync rescans until clean).
        """
        bits = self._bits
        pos = max(start, 0) // 8
        while True:
            match = _NONZERO_RUN.search(bits, pos)
            if match is None:
                return
            run_start, run_end = match.span()
            for index in range(run_start, run_end):
                base = index * 8
                for bit in _BITS[bits[index]]:
                    if base + bit >= start:
                        yield base + bit
            pos = run_end

    # ----------------------------------------------------------------------------- changes

    def mark(self, offset: int, length: int) -> list[int]:
        """Set the regions overlapping ``[offset, offset + length)``; return the newly dirty ones."""
        span = self._span(offset, length)
        if span is None:
            return []
        first, last = span
        if first == last:
            # The common case (a write inside one region) without any big-int work.
            index, bit = first >> 3, 1 << (first & 7)
            if self._bits[index] & bit:
                return []
            self._bits[index] |= bit
            self._count += 1
            self.changed = True
            return [first]
        lo, hi, mask = self._slice_mask(first, last)
        old = int.from_bytes(self._bits[lo:hi], "little")
        fresh = mask & ~old
        if not fresh:
            return []
        self._bits[lo:hi] = (old | mask).to_bytes(hi - lo, "little")
        self._count += fresh.bit_count()
        self.changed = True
        return _set_bits(fresh, lo * 8)

    def mark_all(self) -> None:
        """Every region dirty: the start of a full sync."""
        if self.regions == 0:
            return
        self._bits[:] = b"\xff" * len(self._bits)
        spare = len(self._bits) * 8 - self.regions
        if spare:
            self._bits[-1] = 0xFF >> spare
        self._count = self.regions
        self.changed = True

    def clear(self, region: int) -> bool:
        """Clear one region (the peer has it now); True if it was dirty."""
        self._check_region(region)
        index, bit = region >> 3, 1 << (region & 7)
        if not self._bits[index] & bit:
            return False
        self._bits[index] &= ~bit & 0xFF
        self._count -= 1
        self.changed = True
        return True

    def clear_all(self) -> None:
        if self._count:
            self._bits[:] = bytes(len(self._bits))
            self._count = 0
            self.changed = True

    def merge(self, other: DirtyBitmap) -> None:
        """Union with ``other`` (same geometry): after a handshake the resync set is the union
        of what each side knows the other lacks."""
        if (other.size_bytes, other.region_size) != (self.size_bytes, self.region_size):
            raise ValueError(
                f"geometry mismatch: {other.size_bytes}/{other.region_size} "
                f"vs {self.size_bytes}/{self.region_size}"
            )
        if not other._count:
            return
        merged = int.from_bytes(self._bits, "little") | int.from_bytes(other._bits, "little")
        count = merged.bit_count()
        if count != self._count:
            self._bits[:] = merged.to_bytes(len(self._bits), "little")
            self._count = count
            self.changed = True

    # ----------------------------------------------------------------------------- persistence

    def to_bytes(self) -> bytes:
        payload = zlib.compress(bytes(self._bits), 1)
        header = _HEADER.pack(
            _MAGIC,
            _VERSION,
            _ENC_ZLIB,
            self.size_bytes,
            self.region_size,
            self.regions,
            self._count,
            len(payload),
        )
        return seal(header + payload)

    @classmethod
    def from_bytes(cls, data: bytes) -> DirtyBitmap:
        body, fields = unseal(data, _HEADER, _MAGIC, _VERSION, "bitmap record", BitmapCorrupt)
        _, _, encoding, size, region_size, regions, count, plen = fields
        if encoding != _ENC_ZLIB:
            raise BitmapCorrupt(f"unknown bitmap encoding {encoding}")
        if region_size <= 0 or regions != -(-size // region_size):
            raise BitmapCorrupt("bitmap geometry inconsistent")
        if plen != len(body) - _HEADER.size:
            raise BitmapCorrupt("bitmap payload length mismatch")
        expected = (regions + 7) // 8
        inflater = zlib.decompressobj()
        try:
            # Bounded: a hostile or damaged payload cannot inflate past the bitmap's size.
            raw = inflater.decompress(body[_HEADER.size :], expected + 1)
        except zlib.error as exc:
            raise BitmapCorrupt(f"bitmap payload does not inflate: {exc}") from exc
        if len(raw) != expected or not inflater.eof or inflater.unconsumed_tail:
            raise BitmapCorrupt("bitmap payload size mismatch")
        bitmap = cls(size, region_size)
        bitmap._bits[:] = raw
        spare = expected * 8 - regions
        if spare and raw[-1] >> (8 - spare):
            raise BitmapCorrupt("bits set past the last region")
        bitmap._count = int.from_bytes(raw, "little").bit_count()
        if bitmap._count != count:
            raise BitmapCorrupt("bitmap dirty count mismatch")
        return bitmap

    def flush(self, store: MetaStore, name: str) -> bool:
        """Write the bitmap if it changed since the last flush; True if it wrote.

        ``changed`` is cleared before the write and set again if the write fails, so a change
        made while a threaded write is running is never forgotten.
        """
        if not self.changed:
            return False
        data = self.to_bytes()
        self.changed = False
        try:
            store.write(name, data)
        except BaseException:
            self.changed = True
            raise
        return True

    @classmethod
    def load(
        cls,
        store: MetaStore,
        name: str,
        size_bytes: int,
        region_size: int = DEFAULT_REGION_SIZE,
    ) -> DirtyBitmap:
        """The stored bitmap, or a clean one if none was ever written.

        A stored bitmap of another geometry is an error, not a reason to start clean: the caller
        decides (a grown LUN, say, needs its new space marked dirty).
        """
        data = store.read(name)
        if data is None:
            return cls(size_bytes, region_size)
        bitmap = cls.from_bytes(data)
        if (bitmap.size_bytes, bitmap.region_size) != (size_bytes, region_size):
            raise BitmapCorrupt(
                f"stored bitmap is for {bitmap.size_bytes}/{bitmap.region_size}, "
                f"expected {size_bytes}/{region_size}"
            )
        return bitmap

    # ----------------------------------------------------------------------------- helpers

    def _span(self, offset: int, length: int) -> tuple[int, int] | None:
        if offset < 0 or length < 0 or offset + length > self.size_bytes:
            raise ValueError(
                f"range [{offset}, {offset + length}) outside LUN of {self.size_bytes} bytes"
            )
        if length == 0:
            return None
        return offset // self.region_size, (offset + length - 1) // self.region_size

    def _slice_mask(self, first: int, last: int) -> tuple[int, int, int]:
        lo, hi = first >> 3, (last >> 3) + 1
        mask = ((1 << (last - first + 1)) - 1) << (first - lo * 8)
        return lo, hi, mask

    def _test(self, region: int) -> bool:
        return bool(self._bits[region >> 3] >> (region & 7) & 1)

    def _check_region(self, region: int) -> None:
        if not 0 <= region < self.regions:
            raise ValueError(f"region {region} outside 0..{self.regions - 1}")

    def __repr__(self) -> str:
        return (
            f"DirtyBitmap(size_bytes={self.size_bytes}, region_size={self.region_size}, "
            f"dirty={self._count}/{self.regions})"
        )


def _set_bits(value: int, base: int) -> list[int]:
    """Positions (plus ``base``) of the set bits of ``value``, one step per non-zero byte."""
    raw = value.to_bytes((value.bit_length() + 7) // 8, "little")
    out: list[int] = []
    for match in _NONZERO_RUN.finditer(raw):
        for index in range(*match.span()):
            offset = base + index * 8
            out.extend(offset + bit for bit in _BITS[raw[index]])
    return out
