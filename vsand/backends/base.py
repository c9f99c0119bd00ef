"""What a LUN needs from its storage, plus the two pieces every backend shares.

Theory of operation
-------------------
A backend works on byte offsets; the LUN converts LBAs.  All methods are coroutines run on the
event loop; an implementation serves what it can without blocking inline (page-cache hits) and
hands the rest to a small thread pool.  Failures are ``OSError`` with the kernel's errno, which
the frontend maps to its own error (SCSI sense, NVMe status).

Read buffers come from a ``BufferPool``: ``read()`` returns a ``memoryview`` of exactly the
requested length over a pooled ``bytearray``.  The caller gives it back with
``release_buffer(view)`` (or ``Backend.release``) once nothing needs the bytes any more, e.g.
after the transport has sent them.  The pool is built so that mistakes cost memory, never data:

* a buffer that is never released is simply garbage-collected (the pool keeps no reference to
  buffers it has lent);
* releasing twice, or releasing something that is not a pooled view, is ignored;
* a buffer is recycled only when nothing else still exports it: ``release`` releases the view it
  is given and then probes the ``bytearray`` with a resize, which CPython refuses while any other
  ``memoryview`` (a slice kept by the transport, a pending write in uvloop's queue) is alive.
  Such a buffer is dropped instead of being handed to the next read.

``RangeLock`` gives COMPARE AND WRITE its atomicity without taxing ordinary writes: a write that
completes inline (no await) needs no lock at all while no exclusive range is held, and a write
that goes to the thread pool registers its range as shared so that a later CAW waits for it.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence

# Smallest and largest pooled size classes.  Larger requests get a plain bytearray.
_MIN_CLASS = 9  # 512 bytes
_MAX_CLASS = 24  # 16 MiB


class PoolBuffer(bytearray):
    """A pooled ``bytearray``; ``lent`` guards against double release."""

    __slots__ = ("lent", "pool")

    lent: bool
    pool: BufferPool | None


class BufferPool:
    """Free lists of power-of-two ``bytearray``s, bounded in total bytes kept.

    Used from the event loop thread only (no locking); worker threads fill buffers they were
    given but never acquire or release.
    """

    __slots__ = ("_free", "max_bytes", "free_bytes", "hits", "misses", "dropped")

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self._free: list[list[PoolBuffer]] = [[] for _ in range(_MAX_CLASS + 1)]
        self.max_bytes = max_bytes
        self.free_bytes = 0
        # Plain counters for metrics: reuse, fresh allocations, releases not kept.
        self.hits = 0
        self.misses = 0
        self.dropped = 0

    def acquire(self, length: int) -> memoryview:
        """A writable view of exactly ``length`` bytes; contents are undefined (stale)."""
        cls = (length - 1).bit_length() if length > 1 else 0
        if cls < _MIN_CLASS:
            cls = _MIN_CLASS
        elif cls > _MAX_CLASS:
            # Too big to be worth keeping: not pooled, release() will ignore it.
            self.misses += 1
            return memoryview(bytearray(length))
        free = self._free[cls]
        if free:
            buf = free.pop()
            self.free_bytes -= len(buf)
            self.hits += 1
        else:
            buf = PoolBuffer(1 << cls)
            buf.pool = self
            self.misses += 1
        buf.lent = True
        return memoryview(buf)[:length]

    def release(self, view: object) -> None:
        """Give back a view from ``acquire``; safe to call with anything, and more than once."""
        if type(view) is not memoryview:
            return
        try:
            buf = view.obj
        except ValueError:  # the view was already released: nothing we can check
            return
        if type(buf) is not PoolBuffer or not buf.lent or buf.pool is not self:
            return
        try:
            view.release()
        except BufferError:  # someone holds a buffer export of this very view
            self._drop(buf)
            return
        try:
            # A resize is refused while any memoryview of ``buf`` is still alive: the only
            # cheap way to learn that the bytes are no longer in use.  pop/append stays within
            # the allocation, so it costs no copy.
            buf.pop()
        except BufferError:
            self._drop(buf)
            return
        buf.append(0)
        buf.lent = False
        size = len(buf)
        if self.free_bytes + size > self.max_bytes:
            self.dropped += 1
            return
        self._free[size.bit_length() - 1].append(buf)
        self.free_bytes += size

    def _drop(self, buf: PoolBuffer) -> None:
        # Never recycled: whoever still references it keeps valid bytes; GC frees it later.
        buf.lent = False
        self.dropped += 1

    @property
    def free_count(self) -> int:
        return sum(len(f) for f in self._free)


DEFAULT_POOL = BufferPool()


def release_buffer(view: object) -> None:
    """Return a buffer from any backend's ``read`` to its pool (no-op for anything else)."""
    if type(view) is memoryview:
        try:
            buf = view.obj
        except ValueError:
            return
        if type(buf) is PoolBuffer and buf.pool is not None:
            buf.pool.release(view)


class _Range:
    __slots__ = ("seq", "start", "end", "exclusive", "waiters")

    def __init__(self, seq: int, start: int, end: int, exclusive: bool) -> None:
        self.seq = seq
        self.start = start
        self.end = end
        self.exclusive = exclusive
        self.waiters: list[asyncio.Future[None]] | None = None


class RangeLock:
    """Byte-range lock: shared holders (writes) exclude exclusive ones (CAW) and vice versa.

    Grants are FIFO per overlapping range: a new holder waits only for *earlier* conflicting
    holders, so a stream of writes cannot starve a CAW and there are no cycles.  Shared holders
    never wait for each other.  Holders are registered synchronously (``register``) so callers
    can take the no-await path when ``exclusive`` is zero.
    """

    __slots__ = ("_held", "_seq", "exclusive")

    def __init__(self) -> None:
        self._held: dict[int, _Range] = {}
        self._seq = 0
        self.exclusive = 0  # how many exclusive holders are registered (waiting or granted)

    def register(self, start: int, end: int, exclusive: bool) -> _Range:
        self._seq += 1
        r = _Range(self._seq, start, end, exclusive)
        self._held[r.seq] = r
        if exclusive:
            self.exclusive += 1
        return r

    async def wait(self, r: _Range) -> None:
        """Wait until every earlier conflicting holder is gone; on cancel, ``r`` is released."""
        if not r.exclusive and not self.exclusive:
            return
        try:
            for other in list(self._held.values()):
                if other.seq >= r.seq:
                    break
                if (
                    (r.exclusive or other.exclusive)
                    and other.start < r.end
                    and r.start < other.end
                    and other.seq in self._held
                ):
                    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    if other.waiters is None:
                        other.waiters = []
                    other.waiters.append(fut)
                    await fut
        except BaseException:
            self.release(r)
            raise

    def release(self, r: _Range) -> None:
        if self._held.pop(r.seq, None) is None:
            return
        if r.exclusive:
            self.exclusive -= 1
        if r.waiters:
            for fut in r.waiters:
                if not fut.done():
                    fut.set_result(None)

    def __len__(self) -> int:
        return len(self._held)


def first_mismatch(a: bytearray, b: bytes | bytearray | memoryview) -> int:
    """Byte offset of the first difference between equal-length ``a`` and ``b``, or -1.

    ``a`` is a ``bytearray`` on purpose: its equality takes any buffer and runs memcmp, while
    ``memoryview`` equality unpacks byte by byte (30x slower).  A mismatching range is halved
    until it is small, so no per-byte Python loop runs over more than 64 bytes.
    """
    n = len(a)
    if a == b:
        return -1
    bv = memoryview(b)
    lo, hi = 0, n
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if a[lo:mid] != bv[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != bv[i]:
            return i
    return -1  # unreachable for equal lengths


class Backend(abc.ABC):
    """Storage under one LUN, addressed in bytes.

    ``read`` returns a pooled view (see module doc); ``release`` gives it back.
    ``compare_and_write`` is atomic against every other write, unmap and write-same on this
    backend that overlaps it.  Reads of unmapped or never-written ranges return zeroes.
    """

    block_size: int
    size: int
    read_only: bool

    @abc.abstractmethod
    def open(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> memoryview: ...

    @abc.abstractmethod
    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False
    ) -> None: ...

    @abc.abstractmethod
    async def flush(self) -> None: ...

    @abc.abstractmethod
    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Deallocate (offset, length) byte ranges; they read back as zeroes."""

    @abc.abstractmethod
    async def write_same(
        self,
        offset: int,
        block: bytes | bytearray | memoryview,
        count: int,
        unmap: bool = False,
        fua: bool = False,
    ) -> None: ...

    @abc.abstractmethod
    async def compare_and_write(
        self,
        offset: int,
        verify: bytes | bytearray | memoryview,
        data: bytes | bytearray | memoryview,
        fua: bool = False,
    ) -> int:
        """-1 when ``verify`` matched and ``data`` was written, else the first mismatch."""

    @abc.abstractmethod
    async def lba_status(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Contiguous (offset, length, mapped) extents from ``offset``; at least one."""

    @abc.abstractmethod
    async def prefetch(self, offset: int, length: int) -> None: ...

    def release(self, buf: object) -> None:
        """Give back a buffer returned by ``read``; anything else is ignored."""
        release_buffer(buf)

    # Synchronous fast paths: serve what the page cache can serve without blocking the loop
    # and without a coroutine.  None / False means "use the async method instead".
    def try_read(self, offset: int, length: int) -> memoryview | None:
        return None

    def try_write(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        return False
