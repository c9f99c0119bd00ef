"""FileBackend and the buffer pool: data paths, deallocation, CAW atomicity, errors, bounds."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import random
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvloop

from vsand.backends import BufferPool, FileBackend, RangeLock, first_mismatch, release_buffer
from vsand.backends.base import PoolBuffer

MiB = 1 << 20



@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[FileBackend]:
    path = tmp_path / "lun0.img"
    FileBackend.create_sparse(path, 16 * MiB)
    be = FileBackend(path, block_size=512, io_threads=4)
    be.open()
    yield be
    be.close()


def _evict(be: FileBackend) -> None:
    os.fsync(be.fileno())
    os.posix_fadvise(be.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


class SlowWrites(FileBackend):
    """Pool writes land in two halves with a pause between: a torn state is observable."""

    pause = 0.05

    def _pwrite_all(self, offset: int, data: bytes | bytearray | memoryview, flags: int) -> None:
        view = memoryview(data)
        half = len(view) // 2
        super()._pwrite_all(offset, view[:half], flags)
        time.sleep(self.pause)
        super()._pwrite_all(offset + half, view[half:], flags)


# -- creation ---------------------------------------------------------------------------------


def test_create_sparse_new_file_is_sparse(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "lun.img"
    FileBackend.create_sparse(path, 1 << 30)
    st = path.stat()
    assert st.st_size == 1 << 30
    assert st.st_blocks * 512 < 1 * MiB


def test_create_sparse_grows_without_touching_data(tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    path.write_bytes(b"keep me" * 100)
    FileBackend.create_sparse(path, 4 * MiB)
    assert path.stat().st_size == 4 * MiB
    assert path.read_bytes()[:700] == b"keep me" * 100
    FileBackend.create_sparse(path, 4 * MiB)  # idempotent
    assert path.read_bytes()[:700] == b"keep me" * 100


def test_create_sparse_refuses_to_shrink(tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    path.write_bytes(b"x" * 8192)
    with pytest.raises(ValueError, match=str(path)):
        FileBackend.create_sparse(path, 4096)
    assert path.stat().st_size == 8192


def test_open_sizes(tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    FileBackend.create_sparse(path, 3 * MiB + 100)
    be = FileBackend(path, block_size=4096)
    be.open()
    try:
        assert be.size == 3 * MiB  # whole blocks only
        assert not be.is_block_device
    finally:
        be.close()
        be.close()  # idempotent


# -- read / write -----------------------------------------------------------------------------


async def test_round_trip_odd_offsets(backend: FileBackend) -> None:
    rnd = random.Random(1)
    shadow = bytearray(backend.size)
    for _ in range(200):
        off = rnd.randrange(0, backend.size - 70000)
        n = rnd.randrange(1, 70000)
        data = rnd.randbytes(n)
        await backend.write(off, data, fua=rnd.random() < 0.1)
        shadow[off : off + n] = data
    for _ in range(200):
        off = rnd.randrange(0, backend.size - 70000)
        n = rnd.randrange(1, 70000)
        buf = await backend.read(off, n)
        assert len(buf) == n
        assert buf == shadow[off : off + n]
        backend.release(buf)


async def test_read_of_never_written_range_is_zero(backend: FileBackend) -> None:
    buf = await backend.read(5 * MiB, 8192)
    assert bytes(buf) == bytes(8192)


async def test_read_past_eof_of_short_file_is_zero(tmp_path: Path) -> None:
    path = tmp_path / "short.img"
    path.write_bytes(b"\xaa" * 1000)
    be = FileBackend(path, block_size=512, size=8192)
    be.open()
    try:
        # Dirty the pooled buffer so stale data would show.
        stale = be._pool.acquire(8192)
        stale[:] = b"\xff" * 8192
        be.release(stale)
        buf = await be.read(0, 8192)
        assert bytes(buf[:1000]) == b"\xaa" * 1000
        assert bytes(buf[1000:]) == bytes(7192)
    finally:
        be.close()


async def test_uncached_read_goes_to_pool(backend: FileBackend) -> None:
    data = os.urandom(64 * 1024)
    await backend.write(MiB, data)
    _evict(backend)
    before_pool, before_inline = backend.pool_reads, backend.inline_reads
    buf = await backend.read(MiB, len(data))
    assert buf == data
    assert backend.pool_reads == before_pool + 1
    assert backend.inline_reads == before_inline
    # Now cached: served inline.
    buf2 = await backend.read(MiB, len(data))
    assert buf2 == data
    assert backend.inline_reads == before_inline + 1


async def test_write_without_inline_uses_pool(tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    FileBackend.create_sparse(path, MiB)
    be = FileBackend(path, inline_write_max=0)
    be.open()
    try:
        await be.write(4096, b"z" * 4096)
        assert be.pool_writes == 1 and be.inline_writes == 0
        assert path.read_bytes()[4096:8192] == b"z" * 4096
    finally:
        be.close()


async def test_fua_write_is_in_pool_and_readable(backend: FileBackend) -> None:
    before = backend.pool_writes
    await backend.write(512, b"f" * 512, fua=True)
    assert backend.pool_writes == before + 1
    assert await backend.read(512, 512) == b"f" * 512
    await backend.flush()


async def test_out_of_range_is_erange(backend: FileBackend) -> None:
    with pytest.raises(OSError) as ei:
        await backend.write(backend.size - 512, b"x" * 1024)
    assert ei.value.errno == errno.ERANGE
    with pytest.raises(OSError) as ei:
        await backend.read(backend.size, 1)
    assert ei.value.errno == errno.ERANGE
    assert os.fstat(backend.fileno()).st_size == backend.size


# -- unmap, write same, lba status --------------------------------------------------------------


async def test_unmap_punches_hole_and_reads_zero(backend: FileBackend) -> None:
    await backend.write(0, b"\x11" * (4 * MiB))
    os.fsync(backend.fileno())
    blocks_before = os.fstat(backend.fileno()).st_blocks
    assert await backend.lba_status(0, 4 * MiB) == [(0, 4 * MiB, True)]
    await backend.unmap([(MiB, MiB), (3 * MiB, 512 * 1024)])
    assert os.fstat(backend.fileno()).st_blocks < blocks_before
    buf = await backend.read(MiB, MiB)
    assert bytes(buf) == bytes(MiB)
    assert await backend.read(0, 4) == b"\x11" * 4
    status = await backend.lba_status(0, 4 * MiB)
    assert status == [
        (0, MiB, True),
        (MiB, MiB, False),
        (2 * MiB, MiB, True),
        (3 * MiB, 512 * 1024, False),
        (3 * MiB + 512 * 1024, 512 * 1024, True),
    ]
    # Past the data: one deallocated extent to the end of the LUN.
    assert await backend.lba_status(4 * MiB, backend.size) == [
        (4 * MiB, backend.size - 4 * MiB, False)
    ]


async def test_unmap_fallback_writes_zeroes(backend: FileBackend) -> None:
    await backend.write(0, b"\x22" * 65536)
    backend._punch_ok = False
    backend._zero_range_ok = False
    await backend.unmap([(4096, 8192 + 100)])
    buf = await backend.read(0, 65536)
    assert bytes(buf[:4096]) == b"\x22" * 4096
    assert bytes(buf[4096 : 4096 + 8292]) == bytes(8292)
    assert bytes(buf[4096 + 8292 :]) == b"\x22" * (65536 - 4096 - 8292)


async def test_write_same_pattern_chunks(backend: FileBackend) -> None:
    block = bytes(range(256)) * 2
    count = (3 * MiB) // 512 + 7  # more than one pattern chunk, not a multiple
    await backend.write_same(512, block, count)
    buf = await backend.read(0, 512 + count * 512 + 512)
    assert bytes(buf[:512]) == bytes(512)
    assert bytes(buf[512 : 512 + count * 512]) == block * count
    assert bytes(buf[512 + count * 512 :]) == bytes(512)


async def test_write_same_zero_with_unmap_deallocates(backend: FileBackend) -> None:
    await backend.write(0, b"\x33" * (2 * MiB))
    os.fsync(backend.fileno())
    await backend.write_same(0, bytes(512), (2 * MiB) // 512, unmap=True)
    assert await backend.lba_status(0, 2 * MiB) == [(0, 2 * MiB, False)]
    assert bytes(await backend.read(0, 2 * MiB)) == bytes(2 * MiB)


async def test_write_same_zero_without_unmap_stays_mapped(backend: FileBackend) -> None:
    await backend.write_same(0, bytes(512), (1 * MiB) // 512, unmap=False)
    os.fsync(backend.fileno())
    assert await backend.lba_status(0, MiB) == [(0, MiB, True)]
    assert bytes(await backend.read(0, MiB)) == bytes(MiB)


async def test_write_same_nonzero_with_unmap_writes(backend: FileBackend) -> None:
    await backend.write_same(0, b"\x01" * 512, 16, unmap=True)
    assert await backend.read(0, 8192) == b"\x01" * 8192


async def test_prefetch(backend: FileBackend) -> None:
    await backend.write(0, b"p" * 65536)
    _evict(backend)
    await backend.prefetch(0, 65536)
    assert await backend.read(0, 65536) == b"p" * 65536


# -- compare and write ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", [0, 1, 100, 511, 4095, 8191])
async def test_caw_mismatch_offset(backend: FileBackend, where: int) -> None:
    old = os.urandom(8192)
    await backend.write(4096, old)
    verify = bytearray(old)
    verify[where] ^= 0xFF
    verify[-1] ^= 0x01 if where != 8191 else 0
    assert await backend.compare_and_write(4096, verify, b"n" * 8192) == where
    assert await backend.read(4096, 8192) == old  # nothing written


async def test_caw_match_writes(backend: FileBackend) -> None:
    old = os.urandom(4096)
    await backend.write(0, old)
    assert await backend.compare_and_write(0, old, b"w" * 4096) == -1
    assert await backend.read(0, 4096) == b"w" * 4096


def test_first_mismatch() -> None:
    a = bytearray(os.urandom(100_000))
    assert first_mismatch(a, bytes(a)) == -1
    for where in (0, 1, 63, 64, 65, 4096, 99_999):
        b = bytearray(a)
        b[where] ^= 1
        b[-1] ^= 2 if where != 99_999 else 0
        assert first_mismatch(a, memoryview(b)) == where


async def test_caw_waits_for_inflight_overlapping_write(tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    FileBackend.create_sparse(path, MiB)
    be = SlowWrites(path, inline_write_max=0)
    be.open()
    try:
        n = 64 * 1024
        await be.write(0, b"A" * n)
        slow = asyncio.create_task(be.write(0, b"B" * n))
        await asyncio.sleep(0.01)  # first half of B is on disk, second half not yet
        # Unlocked, the CAW would read B/A and miscompare at n/2.
        assert await be.compare_and_write(0, b"B" * n, b"C" * n) == -1
        await slow
        assert await be.read(0, n) == b"C" * n
    finally:
        be.close()


async def test_write_waits_for_inflight_caw(tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    FileBackend.create_sparse(path, MiB)
    be = SlowWrites(path, inline_write_max=0)
    be.open()
    try:
        n = 64 * 1024
        await be.write(0, b"A" * n)
        caw = asyncio.create_task(be.compare_and_write(0, b"A" * n, b"C" * n))
        await asyncio.sleep(0.01)  # the CAW is halfway through its write
        be.inline_write_max = 1 << 20  # a write that would go inline must still wait
        at = 3 * n // 4  # in the half the CAW has not written yet
        await be.write(at, b"W" * 512)
        assert await caw == -1
        data = bytes(await be.read(0, n))
        assert data == b"C" * at + b"W" * 512 + b"C" * (n - at - 512)
        # A write elsewhere never waited: no exclusive holder is left.
        assert be._locks.exclusive == 0 and len(be._locks) == 0
    finally:
        be.close()


async def test_caw_counter_many_tasks(backend: FileBackend) -> None:
    """Increment a counter block with CAW from many tasks while other writes hammer it."""
    bs = 4096
    backend.inline_write_max = 0  # every write goes through the pool: real overlap in time

    def block(v: int) -> bytes:
        return v.to_bytes(8, "little") * (bs // 8)

    await backend.write(0, block(0))
    successes = 0

    async def incrementer(times: int) -> None:
        nonlocal successes
        for _ in range(times):
            while True:
                cur = bytes(await backend.read(0, bs))
                v = int.from_bytes(cur[:8], "little")
                assert cur == block(v), "torn counter block"
                if await backend.compare_and_write(0, cur, block(v + 1)) == -1:
                    successes += 1
                    break

    async def noise() -> None:
        # Overlapping writes of a *neighbour* range and non-overlapping ones: never torn.
        for i in range(50):
            await backend.write(bs, block(i))
            await backend.write(bs // 2 + bs, b"x" * 512)

    await asyncio.gather(*(incrementer(10) for _ in range(20)), noise(), noise())
    final = bytes(await backend.read(0, bs))
    assert final == block(successes) and successes == 200


async def test_range_lock_disjoint_never_waits() -> None:
    lock = RangeLock()
    caw = lock.register(0, 100, True)
    other = lock.register(100, 200, False)
    await asyncio.wait_for(lock.wait(other), 0.1)
    over = lock.register(50, 60, False)
    waiter = asyncio.create_task(lock.wait(over))
    await asyncio.sleep(0)
    assert not waiter.done()
    lock.release(caw)
    await asyncio.wait_for(waiter, 0.1)
    lock.release(other)
    lock.release(over)
    lock.release(over)  # idempotent
    assert len(lock) == 0 and lock.exclusive == 0


async def test_cancelled_pool_write_keeps_range_until_thread_done(tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    FileBackend.create_sparse(path, MiB)
    be = SlowWrites(path, inline_write_max=0)
    be.open()
    try:
        n = 64 * 1024
        await be.write(0, b"A" * n)
        w = asyncio.create_task(be.write(0, b"B" * n))
        await asyncio.sleep(0.01)
        w.cancel()
        await asyncio.sleep(0)
        # The thread is still writing: a CAW must see the finished B, not a torn A/B.
        assert await be.compare_and_write(0, b"B" * n, b"C" * n) == -1
    finally:
        be.close()


# -- errors -----------------------------------------------------------------------------------


async def test_read_only_backend_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    FileBackend.create_sparse(path, MiB)
    be = FileBackend(path, read_only=True)
    be.open()
    try:
        for call in (
            be.write(0, b"x" * 512),
            be.unmap([(0, 512)]),
            be.write_same(0, b"x" * 512, 2),
            be.compare_and_write(0, bytes(512), b"x" * 512),
        ):
            with pytest.raises(OSError) as ei:
                await call
            assert ei.value.errno == errno.EROFS
        assert await be.read(0, 512) == bytes(512)
    finally:
        be.close()


async def test_kernel_error_propagates_with_errno(backend: FileBackend) -> None:
    # A descriptor opened read-only under a read-write backend: the kernel says EBADF.
    ro = os.open(backend.path, os.O_RDONLY)
    real = backend._fd
    backend._fd = ro
    try:
        with pytest.raises(OSError) as ei:
            await backend.write(0, b"x" * 512)
        assert ei.value.errno == errno.EBADF
        with pytest.raises(OSError) as ei:
            await backend.write(0, b"x" * 512, fua=True)  # pool path
        assert ei.value.errno == errno.EBADF
    finally:
        backend._fd = real
        os.close(ro)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)])
    if r.returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


async def test_enospc_propagates(tiny_tmpfs: Path) -> None:
    path = tiny_tmpfs / "thin.img"
    FileBackend.create_sparse(path, 8 * MiB)
    be = FileBackend(path)
    be.open()
    try:
        with pytest.raises(OSError) as ei:
            for i in range(8):
                await be.write(i * MiB, b"y" * MiB)
        assert ei.value.errno == errno.ENOSPC
    finally:
        be.close()


# -- block devices ----------------------------------------------------------------------------


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    img = tmp_path / "loop.img"
    FileBackend.create_sparse(img, 8 * MiB)
    r = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"losetup failed: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev])


async def test_block_device(loop_device: str) -> None:
    be = FileBackend(loop_device, block_size=512)
    be.open()
    try:
        assert be.is_block_device and be.size == 8 * MiB and be.device_block_size == 512
        await be.write(4096, b"\x44" * 65536)
        await be.flush()
        assert await be.read(4096, 65536) == b"\x44" * 65536
        await be.unmap([(8192, 16384)])
        buf = bytes(await be.read(4096, 65536))
        assert buf == b"\x44" * 4096 + bytes(16384) + b"\x44" * (65536 - 4096 - 16384)
        assert await be.lba_status(0, 8 * MiB) == [(0, 8 * MiB, True)]
        assert await be.compare_and_write(4096, b"\x44" * 512, b"\x55" * 512) == -1
    finally:
        be.close()


# -- buffer pool ----------------------------------------------------------------------------------


def test_pool_bounded_under_churn() -> None:
    pool = BufferPool(max_bytes=4 * MiB)
    rnd = random.Random(7)
    held: list[memoryview] = []
    for i in range(100_000):
        held.append(pool.acquire(rnd.choice((512, 4096, 4097, 65536, 131072, 1 << 20))))
        if len(held) > 16 or rnd.random() < 0.5:
            pool.release(held.pop(rnd.randrange(len(held))))
        assert pool.free_bytes <= pool.max_bytes
    for v in held:
        pool.release(v)
    assert pool.free_bytes <= 4 * MiB
    assert pool.free_count <= 4 * MiB // 512
    assert pool.hits > 90_000  # the pool is actually reused


def test_pool_release_is_safe() -> None:
    pool = BufferPool()
    v = pool.acquire(1000)
    assert len(v) == 1000
    base = v.obj
    assert isinstance(base, PoolBuffer) and len(base) == 1024
    seg = v[100:200]  # e.g. a Data-In segment still queued in the transport
    pool.release(v)
    assert pool.free_count == 0 and pool.dropped == 1  # not recycled while a slice lives
    assert bytes(seg) == bytes(seg)  # and the slice is still valid
    pool.release(v)  # double release: ignored
    pool.release(seg)
    pool.release(b"not pooled")
    pool.release(memoryview(bytearray(10)))
    assert pool.free_count == 0

    v2 = pool.acquire(4096)
    pool.release(v2)
    assert pool.free_count == 1
    pool.release(v2)  # released view: ignored
    v3 = pool.acquire(4000)
    assert v3.obj is not None and pool.free_count == 0 and pool.hits == 1


def test_forgotten_buffers_are_collected() -> None:
    pool = BufferPool()
    for _ in range(1000):
        pool.acquire(1 << 20)  # never released
    gc.collect()
    assert pool.free_count == 0  # the pool held no reference to them


def test_release_buffer_routes_to_owner_pool() -> None:
    a, b = BufferPool(), BufferPool()
    va = a.acquire(4096)
    release_buffer(va)
    assert a.free_count == 1 and b.free_count == 0
    release_buffer(None)
    release_buffer(b"x")


# -- uvloop ---------------------------------------------------------------------------------------


def test_data_paths_under_uvloop(tmp_path: Path) -> None:
    """The daemon runs on uvloop: inline, pool, locked and cancelled paths work there too."""
    path = tmp_path / "lun.img"
    FileBackend.create_sparse(path, 4 * MiB)

    async def scenario() -> None:
        be = SlowWrites(path, io_threads=2)
        be.open()
        try:
            await be.write(0, b"A" * 65536)
            assert await be.read(0, 65536) == b"A" * 65536
            _evict(be)
            assert await be.read(0, 65536) == b"A" * 65536
            assert be.pool_reads >= 1 and be.inline_reads >= 1
            slow = asyncio.create_task(be.write(0, b"B" * 65536, fua=True))
            await asyncio.sleep(0.01)
            assert await be.compare_and_write(0, b"B" * 65536, b"C" * 65536) == -1
            await slow
            await be.unmap([(0, 4096)])
            assert await be.lba_status(0, 8192) == [(0, 4096, False), (4096, 4096, True)]
            await be.write_same(MiB, b"\x07" * 512, 100)
            assert await be.read(MiB, 51200) == b"\x07" * 51200
            await be.flush()
        finally:
            be.close()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
