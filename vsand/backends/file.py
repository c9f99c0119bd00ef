"""A regular file or a block device as LUN storage, through the page cache.

Theory of operation
-------------------
What matters for speed is not hopping to a thread when the kernel can answer at once:

* Reads first try ``preadv(..., RWF_NOWAIT)`` inline on the event loop.  A page-cache hit costs
  a few microseconds; a thread hop costs tens.  EAGAIN or a short read sends the rest to the
  thread pool (which loops until done and zero-fills past EOF of a short sparse file).
* Writes try ``pwritev(..., RWF_NOWAIT)`` inline.  Several file systems (ext4 on 6.x included)
  answer EOPNOTSUPP for buffered NOWAIT writes; the backend then remembers that and writes small
  buffered writes with a plain inline ``pwrite``, which only copies into the page cache.  Dirty
  throttling can still make such a write sleep, so an inline write that took longer than
  ``_STALL_NS`` sends the next ``_STALL_SKIP`` writes to the pool, keeping reads flowing.
  ``inline_write_max=0`` turns inline writes off.
* FUA writes use ``RWF_DSYNC`` in the pool; FLUSH is ``fdatasync`` in the pool.
* Everything slow or rare (UNMAP, WRITE SAME, lseek for LBA status, fadvise) runs in the pool.

Deallocation (UNMAP, WRITE SAME with UNMAP and a zero pattern) must leave zeroes behind because
LBPRZ is advertised.  Files and block devices alike get ``fallocate(PUNCH_HOLE|KEEP_SIZE)``: on a
block device (Linux >= 4.9) the kernel turns it into a write-zeroes request that may unmap and
never leaves stale data; if the device cannot do that, ``FALLOC_FL_ZERO_RANGE`` (the kernel writes
zeroes) and finally our own zero writes follow.  ``BLKDISCARD`` is deliberately not used: a
discard does not promise that the range reads back as zeroes.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from .base import DEFAULT_POOL, Backend, BufferPool, RangeLock, first_mismatch

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc_fallocate = _libc.fallocate
_libc_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_libc_fallocate.restype = ctypes.c_int

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

BLKSSZGET = 0x1268
BLKGETSIZE64 = 0x80081272

_RWF_NOWAIT = os.RWF_NOWAIT
_RWF_DSYNC = os.RWF_DSYNC
_BlockingIOError = BlockingIOError
_preadv = os.preadv
_pwritev = os.pwritev
_pwrite = os.pwrite
_now_ns = time.perf_counter_ns

_STALL_NS = 2_000_000  # an inline write slower than this blocked the loop (dirty throttling)
_STALL_SKIP = 1024  # writes sent to the pool after such a stall
_PATTERN_CHUNK = 1 << 20  # WRITE SAME / zero fill: bytes of pattern built per call
_MAX_EXTENTS = 1024  # LBA status: enough for any allocation length the frontend allows

Buffer = bytes | bytearray | memoryview


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)``; ``os.posix_fallocate`` has no mode flags.  Releases the GIL."""
    if _libc_fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileBackend(Backend):
    """A regular file (sparse, thin) or a block device (``stat.S_ISBLK``)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        block_size: int = 512,
        size: int | None = None,
        read_only: bool = False,
        io_threads: int = 8,
        executor: Executor | None = None,
        pool: BufferPool | None = None,
        inline_write_max: int = 1 << 20,
    ) -> None:
        self.path = os.fspath(path)
        self.block_size = block_size
        self._configured_size = size
        self.size = size or 0
        self.read_only = read_only
        self.is_block_device = False
        self.device_block_size = 0
        self.inline_write_max = inline_write_max
        self._io_threads = io_threads
        self._executor = executor
        self._own_executor = executor is None
        self._pool = pool or DEFAULT_POOL
        self._fd = -1
        self._locks = RangeLock()
        self._read_nowait = True  # cleared on EOPNOTSUPP
        self._write_nowait = True  # cleared on EOPNOTSUPP: then plain inline pwrite
        self._inline_skip = 0
        self._punch_ok = True
        self._zero_range_ok = True
        # Plain counters (metrics, tests): where I/O was served.
        self.inline_reads = 0
        self.pool_reads = 0
        self.inline_writes = 0
        self.pool_writes = 0
        self.write_stalls = 0

    # -- life cycle -------------------------------------------------------------------------

    @staticmethod
    def create_sparse(path: str | os.PathLike[str], size: int) -> None:
        """Make ``path`` a file of at least ``size`` bytes without touching existing data.

        Missing parent directories are created; a new or shorter file is grown sparse with
        ftruncate.  A longer file is refused (shrinking would destroy data), as is anything that
        is not a regular file.
        """
        p = os.fspath(path)
        parent = os.path.dirname(p)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{p}: not a regular file, cannot create a sparse backing file")
            if st.st_size > size:
                raise ValueError(
                    f"{p}: existing file is {st.st_size} bytes, larger than the configured "
                    f"{size}; refusing to shrink it"
                )
            if st.st_size < size:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def open(self) -> None:
        flags = (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC
        fd = os.open(self.path, flags)
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                self.is_block_device = True
                (actual,) = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))
                (self.device_block_size,) = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, bytes(4)))
                if self._configured_size and self._configured_size > actual:
                    raise ValueError(
                        f"{self.path}: device has {actual} bytes, fewer than the configured "
                        f"{self._configured_size}"
                    )
            elif stat.S_ISREG(st.st_mode):
                actual = st.st_size
                self.device_block_size = st.st_blksize
            else:
                raise ValueError(f"{self.path}: neither a regular file nor a block device")
        except BaseException:
            os.close(fd)
            raise
        # A configured size larger than a regular file is fine: the tail reads as zeroes.
        self.size = self._configured_size or actual
        if self.size % self.block_size:
            self.size -= self.size % self.block_size
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._io_threads, thread_name_prefix="vsand-io")
            self._own_executor = True
        self._fd = fd

    def close(self) -> None:
        """Wait for pool work to finish, then close the descriptor (idempotent)."""
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def fileno(self) -> int:
        return self._fd

    # -- helpers ----------------------------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        # The frontend checks LBA ranges; this guard keeps a bug from growing the file.
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.ERANGE, f"range {offset}+{length} outside 0..{self.size}")

    def _check_writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path} is read-only")

    def _in_pool(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _in_pool_holding(self, held: Any, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in the pool; the range ``held`` is released when the thread is done.

        Cancelling the caller must not release the range while a thread may still be writing
        (a CAW could then read half-written data), hence the shield and the done callback.
        """
        fut = self._in_pool(fn, *args)
        fut.add_done_callback(partial(self._held_done, held))
        return await asyncio.shield(fut)

    def _held_done(self, held: Any, fut: asyncio.Future[Any]) -> None:
        self._locks.release(held)
        if not fut.cancelled():
            fut.exception()  # retrieved: a cancelled caller must not leave a warning behind

    def grow(self, size: int) -> None:
        """Online resize: a regular file grows sparse to ``size``; never shrinks."""
        if size <= self.size:
            return
        if self.is_block_device:
            raise OSError(errno.EINVAL, f"{self.path}: a block device's size is its own")
        self._check_writable()
        os.ftruncate(self._fd, size)
        self.size = size

    # -- read -------------------------------------------------------------------------------

    def try_read(self, offset: int, length: int) -> memoryview | None:
        if not self._read_nowait or offset < 0 or offset + length > self.size:
            return None
        buf = self._pool.acquire(length)
        try:
            got = _preadv(self._fd, [buf], offset, _RWF_NOWAIT)
        except _BlockingIOError:
            got = -1
        except OSError as e:
            self._pool.release(buf)
            if e.errno != errno.EOPNOTSUPP:
                raise
            self._read_nowait = False
            return None
        if got == length:
            self.inline_reads += 1
            return buf
        self._pool.release(buf)
        return None

    def try_write(self, offset: int, data: Buffer) -> bool:
        """A whole write done inline, or False (nothing to undo: a partial inline write is
        simply written again, with the same bytes, by the async path)."""
        n = len(data)
        if (self.read_only or n > self.inline_write_max or self._locks.exclusive
                or offset < 0 or offset + n > self.size):
            return False
        return self._write_inline(offset, data) == n

    async def read(self, offset: int, length: int) -> memoryview:
        if offset < 0 or offset + length > self.size:
            self._check(offset, length)
        buf = self._pool.acquire(length)
        got = 0
        if self._read_nowait:
            try:
                got = _preadv(self._fd, [buf], offset, _RWF_NOWAIT)
            except _BlockingIOError:
                pass
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    self._pool.release(buf)
                    raise
                self._read_nowait = False
            if got == length:
                self.inline_reads += 1
                return buf
        self.pool_reads += 1
        # On failure or cancellation the buffer is dropped, not released: a thread may still be
        # filling it.
        await self._in_pool(self._read_rest, buf, offset, got)
        return buf

    def _read_rest(self, buf: memoryview, offset: int, done: int) -> None:
        n = len(buf)
        while done < n:
            got = _preadv(self._fd, [buf[done:]], offset + done)
            if got == 0:  # EOF of a file shorter than the LUN: the rest reads as zeroes
                buf[done:] = bytes(n - done)
                return
            done += got

    # -- write ------------------------------------------------------------------------------

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        if self.read_only:
            self._check_writable()
        n = len(data)
        if offset < 0 or offset + n > self.size:
            self._check(offset, n)
        try_inline = not fua and n <= self.inline_write_max
        if try_inline and not self._locks.exclusive:
            # No exclusive (CAW) range anywhere and no await below: this write cannot
            # interleave with a CAW, so it needs no range registration.
            try_inline = False  # once is enough: what is left goes to the pool
            done = self._write_inline(offset, data)
            if done == n:
                return
            if done:
                data = memoryview(data)[done:]
                offset += done
                n -= done
        held = self._locks.register(offset, offset + n, False)
        await self._locks.wait(held)
        await self._write_holding(held, offset, data, fua, try_inline)

    def _write_inline(self, offset: int, data: Buffer) -> int:
        """Bytes written without blocking the loop for long; 0 means "use the pool"."""
        if self._write_nowait:
            try:
                done: int = _pwritev(self._fd, [data], offset, _RWF_NOWAIT)
            except _BlockingIOError:
                return 0
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                self._write_nowait = False
            else:
                self.inline_writes += 1
                return done
        if self._inline_skip:
            self._inline_skip -= 1
            return 0
        t0 = _now_ns()
        done = _pwrite(self._fd, data, offset)
        if _now_ns() - t0 > _STALL_NS:
            self.write_stalls += 1
            self._inline_skip = _STALL_SKIP
        self.inline_writes += 1
        return done

    async def _write_holding(
        self, held: Any, offset: int, data: Buffer, fua: bool, try_inline: bool
    ) -> None:
        """Write while holding ``held`` (already granted); releases it in every case."""
        n = len(data)
        if try_inline:
            try:
                done = self._write_inline(offset, data)
            except BaseException:
                self._locks.release(held)
                raise
            if done == n:
                self._locks.release(held)
                return
            if done:
                data = memoryview(data)[done:]
                offset += done
        self.pool_writes += 1
        await self._in_pool_holding(
            held, self._pwrite_all, offset, data, _RWF_DSYNC if fua else 0
        )

    def _pwrite_all(self, offset: int, data: Buffer, flags: int) -> None:
        # A short write (signal, quota edge) is continued, never dropped.
        view = memoryview(data)
        n = len(view)
        done = _pwritev(self._fd, [view], offset, flags)
        while done < n:
            got = _pwritev(self._fd, [view[done:]], offset + done, flags)
            if got <= 0:
                raise OSError(errno.EIO, "write made no progress")
            done += got

    # -- flush, unmap, write same -----------------------------------------------------------

    async def flush(self) -> None:
        # Only writes completed before the flush must be stable: no range lock needed.
        await self._in_pool(os.fdatasync, self._fd)

    async def unmap(self, ranges: Sequence[tuple[int, int]]) -> None:
        self._check_writable()
        todo = [(o, n) for o, n in ranges if n > 0]
        if not todo:
            return
        for o, n in todo:
            self._check(o, n)
        # One registration for the envelope: only a CAW could wait for it, and UNMAP is rare.
        held = self._locks.register(min(o for o, _ in todo), max(o + n for o, n in todo), False)
        await self._locks.wait(held)
        await self._in_pool_holding(held, self._deallocate_all, todo)

    def _deallocate_all(self, ranges: list[tuple[int, int]]) -> None:
        for offset, length in ranges:
            self._deallocate(offset, length)

    def _deallocate(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeroes, freeing space where the kernel can."""
        if self._punch_ok:
            try:
                fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                self._punch_ok = False
        if self._zero_range_ok:
            try:
                fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                self._zero_range_ok = False
        self._write_pattern(offset, bytes(self.block_size), length // self.block_size, 0)
        tail = length % self.block_size
        if tail:
            self._pwrite_all(offset + length - tail, bytes(tail), 0)

    async def write_same(
        self,
        offset: int,
        block: Buffer,
        count: int,
        unmap: bool = False,
        fua: bool = False,
    ) -> None:
        self._check_writable()
        bs = len(block)
        total = bs * count
        self._check(offset, total)
        if total == 0:
            return
        pattern = bytes(block)
        if unmap and pattern == bytes(bs):
            await self.unmap([(offset, total)])
            if fua:
                await self.flush()
            return
        held = self._locks.register(offset, offset + total, False)
        await self._locks.wait(held)
        self.pool_writes += 1
        await self._in_pool_holding(
            held, self._write_pattern, offset, pattern, count, _RWF_DSYNC if fua else 0
        )

    def _write_pattern(self, offset: int, block: bytes, count: int, flags: int) -> None:
        # The repeated pattern is built once, at most _PATTERN_CHUNK bytes: bounded memory.
        bs = len(block)
        per = max(1, min(count, _PATTERN_CHUNK // bs))
        chunk = memoryview(block * per)
        pos, end = offset, offset + bs * count
        while pos < end:
            n = min(len(chunk), end - pos)
            self._pwrite_all(pos, chunk[:n], flags)
            pos += n

    # -- compare and write ------------------------------------------------------------------

    async def compare_and_write(
        self, offset: int, verify: Buffer, data: Buffer, fua: bool = False
    ) -> int:
        self._check_writable()
        n = len(verify)
        if len(data) != n:
            raise OSError(errno.EINVAL, "compare and write: verify and write lengths differ")
        self._check(offset, n)
        held = self._locks.register(offset, offset + n, True)
        await self._locks.wait(held)  # every earlier overlapping write has completed
        handed_off = False
        try:
            # An exact-size bytearray, not a pooled view: its equality runs memcmp.
            current = bytearray(n)
            view = memoryview(current)
            got = 0
            if self._read_nowait:
                try:
                    got = _preadv(self._fd, [view], offset, _RWF_NOWAIT)
                except _BlockingIOError:
                    pass
                except OSError as e:
                    if e.errno != errno.EOPNOTSUPP:
                        raise
            if got < n:
                await self._in_pool(self._read_rest, view, offset, got)
            view.release()
            mismatch = first_mismatch(current, verify)
            if mismatch >= 0:
                return mismatch
            handed_off = True
            await self._write_holding(
                held, offset, data, fua, not fua and n <= self.inline_write_max
            )
            return -1
        finally:
            if not handed_off:
                self._locks.release(held)

    # -- status and hints -------------------------------------------------------------------

    async def lba_status(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        length = max(0, min(length, self.size - offset))
        self._check(offset, length)
        if self.is_block_device or length == 0:
            # A block device does not tell us its thin allocation: everything is mapped.
            return [(offset, length, True)]
        return await self._in_pool(self._extents, offset, length)

    def _extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        out: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + length
        while pos < end and len(out) < _MAX_EXTENTS:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no data after pos, the rest is a hole
                    raise
                data = end
            if data > pos:
                stop = min(data, end)
                out.append((pos, stop - pos, False))
                pos = stop
                continue
            stop = min(os.lseek(self._fd, pos, os.SEEK_HOLE), end)
            out.append((pos, stop - pos, True))
            pos = stop
        return out

    async def prefetch(self, offset: int, length: int) -> None:
        self._check(offset, length)
        await self._in_pool(os.posix_fadvise, self._fd, offset, length, os.POSIX_FADV_WILLNEED)
