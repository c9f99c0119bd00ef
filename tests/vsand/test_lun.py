"""Lun.execute_block (LBA → byte mapping, counters, WCE) and run_scsi (driving SCSI tasks)."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path
from typing import Any

import pytest

from vsand.backends import FileBackend
from vsand.backends.base import DEFAULT_POOL
from vsand.lun import start_scsi, Lun, release_result, run_scsi
from vsand.protocol.block import BlockOp, BlockRequest, Extent, ExtentState
from vsand.protocol.scsi.sense import CheckCondition, sense_for_errno
from vsand.protocol.scsi.types import LunParams, ScsiCommand, ScsiResult, Status

MiB = 1 << 20

BS = 512


def _params(blocks: int, **kw: Any) -> LunParams:
    return LunParams(block_size=BS, blocks=blocks, serial="s0", naa_id=bytes(16), **kw)


@pytest.fixture
async def lun(tmp_path: Path) -> AsyncIterator[Lun]:
    path = tmp_path / "lun.img"
    FileBackend.create_sparse(path, 8 * MiB)
    be = FileBackend(path, block_size=BS)
    be.open()
    yield Lun.from_params(0, _params(be.size // BS), be)
    be.close()


def _cmd(lun: int = 0) -> ScsiCommand:
    return ScsiCommand(cdb=b"\x28" + bytes(9), lun=lun, nexus="i,t", data_out=None, edtl=0)


class FakeTarget:
    """Returns whatever the test's factory makes of the command."""

    def __init__(self, make: Callable[[ScsiCommand], Any]) -> None:
        self.make = make

    def execute(self, cmd: ScsiCommand) -> Any:
        return self.make(cmd)


def _sense_key_asc(sense: bytes | None) -> tuple[int, int, int]:
    assert sense is not None
    return sense[2] & 0xF, sense[12], sense[13]


# -- execute_block ----------------------------------------------------------------------------


async def test_write_read_by_lba(lun: Lun) -> None:
    data = os.urandom(4 * BS)
    await lun.execute_block(BlockRequest(BlockOp.WRITE, lba=10, blocks=4, data=data))
    buf = await lun.execute_block(BlockRequest(BlockOp.READ, lba=10, blocks=4))
    assert buf == data
    raw = await lun.backend.read(10 * BS, 4 * BS)
    assert raw == data
    assert (lun.read_ops, lun.read_bytes, lun.write_ops, lun.write_bytes) == (1, 4 * BS, 1, 4 * BS)
    assert lun.read_ns > 0 and lun.write_ns > 0 and lun.errors == 0
    lun.release(buf)
    assert lun.counters()["read_ops"] == 1


async def test_other_ops(lun: Lun) -> None:
    await lun.execute_block(BlockRequest(BlockOp.WRITE, lba=0, blocks=2048, data=b"\x07" * MiB))
    await lun.execute_block(BlockRequest(BlockOp.FLUSH))
    await lun.execute_block(BlockRequest(BlockOp.UNMAP, ranges=((0, 1024), (1536, 512))))
    await lun.execute_block(BlockRequest(BlockOp.FLUSH))
    ext = await lun.execute_block(BlockRequest(BlockOp.LBA_STATUS, lba=0, blocks=4096))
    assert ext == [
        Extent(0, 1024, ExtentState.DEALLOCATED),
        Extent(1024, 512, ExtentState.MAPPED),
        Extent(1536, 4096 - 1536, ExtentState.DEALLOCATED),
    ]
    # blocks=0: up to the end of the LUN
    ext = await lun.execute_block(BlockRequest(BlockOp.LBA_STATUS, lba=1024, blocks=0))
    assert ext[0] == Extent(1024, 512, ExtentState.MAPPED)
    assert sum(e.blocks for e in ext) == lun.backend.size // BS - 1024

    await lun.execute_block(
        BlockRequest(BlockOp.WRITE_SAME, lba=100, blocks=8, data=b"\x09" * BS)
    )
    assert await lun.execute_block(BlockRequest(BlockOp.READ, lba=100, blocks=8)) == b"\x09" * 4096
    verify_write = b"\x09" * 1024 + b"\x0a" * 1024
    r = await lun.execute_block(
        BlockRequest(BlockOp.COMPARE_AND_WRITE, lba=100, blocks=2, data=verify_write)
    )
    assert r == -1
    bad = b"\x09" * 700 + b"\x00" * 324 + b"\x0b" * 1024
    r = await lun.execute_block(BlockRequest(BlockOp.COMPARE_AND_WRITE, lba=100, blocks=2, data=bad))
    assert r == 0  # block 100 now holds 0x0a
    await lun.execute_block(BlockRequest(BlockOp.PREFETCH, lba=0, blocks=16))


async def test_lba_status_rounds_partial_blocks_to_mapped(lun: Lun) -> None:
    async def fake_status(offset: int, length: int) -> list[tuple[int, int, bool]]:
        # A 4096-byte LUN over a file system with 1000-byte granularity (contrived).
        return [(offset, 1000, True), (offset + 1000, 8000, False), (offset + 9000, length - 9000, True)]

    lun.backend.lba_status = fake_status  # type: ignore[method-assign]
    ext = await lun.execute_block(BlockRequest(BlockOp.LBA_STATUS, lba=0, blocks=40))
    # bytes 0..1000 mapped -> block 0..1 (ceil: 2 blocks of 512); hole 1000..9000 -> blocks 2..17
    assert ext == [
        Extent(0, 2, ExtentState.MAPPED),
        Extent(2, 15, ExtentState.DEALLOCATED),
        Extent(17, 23, ExtentState.MAPPED),
    ]


async def test_write_cache_off_means_fua(lun: Lun) -> None:
    seen: list[bool] = []
    real = lun.backend.write

    async def spy(offset: int, data: Any, fua: bool = False) -> None:
        seen.append(fua)
        await real(offset, data, fua)

    lun.backend.write = spy  # type: ignore[method-assign]
    await lun.execute_block(BlockRequest(BlockOp.WRITE, lba=0, blocks=1, data=bytes(BS)))
    lun.unit.set_write_cache(False)
    await lun.execute_block(BlockRequest(BlockOp.WRITE, lba=0, blocks=1, data=bytes(BS)))
    await lun.execute_block(BlockRequest(BlockOp.WRITE, lba=0, blocks=1, data=bytes(BS), fua=True))
    assert seen == [False, True, True]


async def test_errors_are_counted(lun: Lun) -> None:
    with pytest.raises(OSError) as ei:
        await lun.execute_block(BlockRequest(BlockOp.READ, lba=lun.backend.size // BS, blocks=1))
    assert ei.value.errno == errno.ERANGE
    assert lun.errors == 1


def test_block_size_mismatch_refused(tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    FileBackend.create_sparse(path, MiB)
    be = FileBackend(path, block_size=4096)
    with pytest.raises(ValueError):
        Lun.from_params(0, _params(256), be)


# -- run_scsi -------------------------------------------------------------------------------------


async def test_direct_result(lun: Lun) -> None:
    res = ScsiResult(Status.GOOD, data=b"inquiry")
    assert await run_scsi(FakeTarget(lambda c: res), _cmd(), {0: lun}) is res


async def test_task_reads_and_writes(lun: Lun) -> None:
    def task(cmd: ScsiCommand) -> Generator[BlockRequest, Any, ScsiResult]:
        yield BlockRequest(BlockOp.WRITE, lba=3, blocks=1, data=b"\x5a" * BS)
        buf = yield BlockRequest(BlockOp.READ, lba=3, blocks=1)
        return ScsiResult(Status.GOOD, data=buf)

    res = await run_scsi(FakeTarget(task), _cmd(), {0: lun})
    assert res.status == Status.GOOD and res.data == b"\x5a" * BS
    # The buffer contract: released after transmission, recycled by the pool.
    free = DEFAULT_POOL.free_count
    release_result(res)
    assert DEFAULT_POOL.free_count == free + 1


async def test_oserror_thrown_into_task(lun: Lun) -> None:
    def task(cmd: ScsiCommand) -> Generator[BlockRequest, Any, ScsiResult]:
        try:
            yield BlockRequest(BlockOp.READ, lba=1 << 40, blocks=1)
        except OSError as e:
            return ScsiResult(Status.GOOD, data=str(e.errno).encode())
        return ScsiResult(Status.BUSY)

    res = await run_scsi(FakeTarget(task), _cmd(), {0: lun})
    assert res.data == str(errno.ERANGE).encode()


async def test_request_naming_a_lun_runs_there(lun: Lun, tmp_path: Path) -> None:
    """EXTENDED COPY's requests carry the LUN they address; a missing one is ENODEV."""
    path = tmp_path / "other.img"
    FileBackend.create_sparse(path, MiB)
    be = FileBackend(path, block_size=BS)
    be.open()
    try:
        other = Lun.from_params(5, _params(be.size // BS), be)

        def task(cmd: ScsiCommand) -> Generator[BlockRequest, Any, ScsiResult]:
            yield BlockRequest(BlockOp.WRITE, lba=2, blocks=1, data=b"\x11" * BS)
            yield BlockRequest(BlockOp.WRITE, lba=2, blocks=1, data=b"\x22" * BS, lun=5)
            here = yield BlockRequest(BlockOp.READ, lba=2, blocks=1, lun=0)
            there = yield BlockRequest(BlockOp.READ, lba=2, blocks=1, lun=5)
            try:
                yield BlockRequest(BlockOp.READ, lba=0, blocks=1, lun=9)
            except OSError as e:
                gone = e.errno
            return ScsiResult(Status.GOOD, data=bytes(here) + bytes(there) + bytes((gone,)))

        outcome = start_scsi(FakeTarget(task), _cmd(), {0: lun, 5: other})
        assert not isinstance(outcome, ScsiResult)  # routed requests take the async path
        res = await outcome
        assert res.data == b"\x11" * BS + b"\x22" * BS + bytes((errno.ENODEV,))
        assert other.write_ops == 1 and other.read_ops == 1
    finally:
        be.close()


@pytest.mark.parametrize(
    ("err", "op", "expect"),
    [
        (errno.EROFS, BlockOp.WRITE, (0x7, 0x27, 0x00)),
        (errno.ENOSPC, BlockOp.WRITE, (0x7, 0x27, 0x07)),
        (errno.EIO, BlockOp.READ, (0x3, 0x11, 0x00)),
        (errno.EIO, BlockOp.WRITE, (0x3, 0x0C, 0x00)),
    ],
)
async def test_escaping_oserror_becomes_sense(
    lun: Lun, err: int, op: BlockOp, expect: tuple[int, int, int]
) -> None:
    async def failing(*args: Any) -> Any:
        raise OSError(err, os.strerror(err))

    lun.backend.read = failing  # type: ignore[method-assign]
    lun.backend.write = failing  # type: ignore[method-assign]
    # Push the request off the synchronous page-cache path onto the async one.
    lun.backend.try_read = lambda *a: None  # type: ignore[method-assign]
    lun.backend.try_write = lambda *a: False  # type: ignore[method-assign]

    def task(cmd: ScsiCommand) -> Generator[BlockRequest, Any, ScsiResult]:
        yield BlockRequest(op, lba=0, blocks=1, data=bytes(BS))
        return ScsiResult(Status.GOOD)

    res = await run_scsi(FakeTarget(task), _cmd(), {0: lun})
    assert res.status == Status.CHECK_CONDITION
    assert _sense_key_asc(res.sense) == expect
    assert res.sense == sense_for_errno(err, op is not BlockOp.READ).to_bytes()


def test_fast_path_failure_also_becomes_sense(lun: Lun) -> None:
    def failing(*args: Any) -> Any:
        raise OSError(errno.EIO, "injected")

    lun.backend.try_read = failing  # type: ignore[method-assign]

    def task(cmd: ScsiCommand) -> Generator[BlockRequest, Any, ScsiResult]:
        yield BlockRequest(BlockOp.READ, lba=0, blocks=1)
        return ScsiResult(Status.GOOD)

    res = start_scsi(FakeTarget(task), _cmd(), {0: lun})
    assert isinstance(res, ScsiResult) and res.status == Status.CHECK_CONDITION
    assert _sense_key_asc(res.sense) == (0x3, 0x11, 0x00)


async def test_read_only_lun_answers_write_protected(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    FileBackend.create_sparse(path, MiB)
    be = FileBackend(path, read_only=True)
    be.open()
    try:
        lun = Lun.from_params(0, _params(be.size // BS, read_only=True), be)

        def task(cmd: ScsiCommand) -> Generator[BlockRequest, Any, ScsiResult]:
            yield BlockRequest(BlockOp.WRITE, lba=0, blocks=1, data=bytes(BS))
            return ScsiResult(Status.GOOD)

        res = await run_scsi(FakeTarget(task), _cmd(), {0: lun})
        assert _sense_key_asc(res.sense) == (0x7, 0x27, 0x00)
    finally:
        be.close()


async def test_bugs_answer_internal_target_failure(
    lun: Lun, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(cmd: ScsiCommand) -> Any:
        raise ZeroDivisionError

    def bad_task(cmd: ScsiCommand) -> Generator[BlockRequest, Any, ScsiResult]:
        yield BlockRequest(BlockOp.FLUSH)
        raise KeyError("handler bug")

    def returns_junk(cmd: ScsiCommand) -> Generator[BlockRequest, Any, Any]:
        yield BlockRequest(BlockOp.FLUSH)
        return "not a result"

    def task(cmd: ScsiCommand) -> Generator[BlockRequest, Any, ScsiResult]:
        yield BlockRequest(BlockOp.FLUSH)
        return ScsiResult(Status.GOOD)

    with caplog.at_level(logging.ERROR, logger="vsand.lun"):
        for make, luns in ((boom, {0: lun}), (bad_task, {0: lun}), (returns_junk, {0: lun}),
                           (task, {})):
            res = await run_scsi(FakeTarget(make), _cmd(), luns)
            assert res.status == Status.CHECK_CONDITION
            assert _sense_key_asc(res.sense) == (0x4, 0x44, 0x00)
    assert "Traceback" in caplog.text


async def test_check_condition_escaping_task(lun: Lun) -> None:
    def task(cmd: ScsiCommand) -> Generator[BlockRequest, Any, ScsiResult]:
        r = yield BlockRequest(BlockOp.COMPARE_AND_WRITE, lba=0, blocks=1, data=b"\x01" * (2 * BS))
        raise CheckCondition(0xE, (0x1D, 0x00), info=r)

    res = await run_scsi(FakeTarget(task), _cmd(), {0: lun})
    assert _sense_key_asc(res.sense) == (0xE, 0x1D, 0x00)


# -- with the real SCSI emulation -----------------------------------------------------------------


async def test_real_target_read_write_caw(lun: Lun) -> None:
    import struct

    from vsand.protocol.scsi.target import ScsiTarget

    target = ScsiTarget({0: lun.unit})
    luns = {0: lun}

    async def run(cdb: bytes, data: bytes | None = None, edtl: int = 0) -> ScsiResult:
        return await run_scsi(target, ScsiCommand(cdb, 0, "i,t", data, edtl), luns)

    while (await run(bytes(6))).status != Status.GOOD:  # TEST UNIT READY clears UAs
        pass
    payload = os.urandom(8 * BS)
    res = await run(struct.pack(">BBIBHB", 0x2A, 0, 16, 0, 8, 0), payload, len(payload))
    assert res.status == Status.GOOD
    res = await run(struct.pack(">BBIBHB", 0x28, 0, 16, 0, 8, 0), None, len(payload))
    assert res.status == Status.GOOD and bytes(res.data or b"") == payload
    release_result(res)
    # COMPARE AND WRITE of one block whose verify data differs at byte 5: MISCOMPARE, info 5.
    verify = bytearray(payload[:BS])
    verify[5] ^= 0xFF
    cdb = struct.pack(">BBQ3xBBB", 0x89, 0, 16, 1, 0, 0)
    res = await run(cdb, bytes(verify) + bytes(BS), 2 * BS)
    assert res.status == Status.CHECK_CONDITION
    assert _sense_key_asc(res.sense) == (0xE, 0x1D, 0x00)
    assert res.sense is not None and int.from_bytes(res.sense[3:7], "big") == 5
