"""Block commands against the in-memory backend."""

from __future__ import annotations

import errno
import struct

import pytest
from scsi_harness import (
    GOOD,
    INVALID_CDB,
    INVALID_IU,
    INVALID_OPCODE,
    INVALID_PARAM,
    LBA_OOB,
    MISCOMPARE,
    WRITE_PROTECT,
    Harness,
    field_pointer,
    info,
    rw6,
    rw10,
    rw12,
    rw16,
    sense,
)

from vsand.protocol.block import BlockOp
from vsand.protocol.scsi import ScsiCommand, ScsiResult, Status
from vsand.protocol.scsi.sbc import first_difference

READS = {6: (0x08, rw6), 10: (0x28, rw10), 12: (0xA8, rw12), 16: (0x88, rw16)}
WRITES = {6: (0x0A, rw6), 10: (0x2A, rw10), 12: (0xAA, rw12), 16: (0x8A, rw16)}


def _cdb(table: dict, size: int, lba: int, n: int, flags: int = 0) -> bytes:
    op, build = table[size]
    return build(op, lba, n) if size == 6 else build(op, lba, n, flags)


@pytest.mark.parametrize("size", [6, 10, 12, 16])
def test_write_then_read_round_trip(size: int) -> None:
    h = Harness()
    payload = bytes(range(256)) * 2 * 3
    assert sense(h.run(_cdb(WRITES, size, 7, 3), payload)) == GOOD
    res = h.run(_cdb(READS, size, 7, 3))
    assert res.status == Status.GOOD and bytes(res.data) == payload


@pytest.mark.parametrize("size", [10, 12, 16])
def test_zero_length_is_good_without_io(size: int) -> None:
    h = Harness()
    assert sense(h.run(_cdb(READS, size, 0, 0))) == GOOD
    assert sense(h.run(_cdb(WRITES, size, 0, 0))) == GOOD
    assert h.backend.log == []
    # ...but the LBA is still checked (libiscsi read10_0blocks: num_blocks + 1 is out of range)
    assert sense(h.run(_cdb(READS, size, h.params.blocks + 1, 0))) == LBA_OOB
    assert sense(h.run(_cdb(READS, size, h.params.blocks, 0))) == GOOD


def test_six_byte_length_zero_means_256() -> None:
    h = Harness()
    res = h.run(rw6(0x08, 0, 0))
    assert res.status == Status.GOOD and len(res.data) == 256 * h.bs
    assert sense(h.run(rw6(0x0A, 0, 0), bytes(256 * h.bs))) == GOOD


@pytest.mark.parametrize("size", [6, 10, 12, 16])
def test_beyond_end_of_medium(size: int) -> None:
    h = Harness()
    end = h.params.blocks
    assert sense(h.run(_cdb(READS, size, end - 1, 2))) == LBA_OOB
    assert sense(h.run(_cdb(WRITES, size, end - 1, 2), bytes(2 * h.bs))) == LBA_OOB
    assert sense(h.run(_cdb(READS, size, end - 2, 2))) == GOOD
    if size != 6:
        assert sense(h.run(_cdb(READS, size, -1, 1))) == LBA_OOB


@pytest.mark.parametrize("size", [10, 12, 16])
def test_protect_fields_are_refused(size: int) -> None:
    h = Harness()
    for prot in range(1, 8):
        assert sense(h.run(_cdb(READS, size, 0, 1, prot << 5))) == INVALID_CDB
        assert sense(h.run(_cdb(WRITES, size, 0, 1, prot << 5), bytes(h.bs))) == INVALID_CDB


def test_fua_and_wce_reach_the_request() -> None:
    h = Harness()
    h.run(rw10(0x2A, 0, 1, 0x08), bytes(h.bs))
    assert h.backend.log[-1].fua is True
    h.run(rw10(0x2A, 0, 1, 0x10 | 0x02), bytes(h.bs))  # DPO, FUA_NV: accepted, no FUA
    assert h.backend.log[-1].fua is False
    h.lu.set_write_cache(False, "I1")  # changed through I1: no UA for it
    h.run(rw10(0x2A, 0, 1), bytes(h.bs))
    assert h.backend.log[-1].fua is True  # WCE=0: every write is write-through


def test_no_copies_on_the_fast_path() -> None:
    h = Harness()
    buf = bytearray(b"x" * 5 * h.bs)
    h.run(rw10(0x2A, 0, 4), memoryview(buf))  # longer than needed: a view, not a copy
    req = h.backend.log[-1]
    assert isinstance(req.data, memoryview) and req.data.obj is buf and len(req.data) == 4 * h.bs
    exact = memoryview(bytearray(4 * h.bs))
    h.run(rw10(0x2A, 0, 4), exact)
    assert h.backend.log[-1].data is exact
    task = h.target.execute(ScsiCommand(rw10(0x28, 0, 4), 0, "I1", None, 4 * h.bs))
    assert not isinstance(task, ScsiResult)
    req = next(task)
    sentinel = memoryview(bytearray(4 * h.bs))
    with pytest.raises(StopIteration) as stop:
        task.send(sentinel)
    assert stop.value.value.data is sentinel


def test_read_only_lu_refuses_every_write() -> None:
    h = Harness(read_only=True)
    bs = h.bs
    cases = [
        (rw10(0x2A, 0, 1), bytes(bs)), (rw12(0xAA, 0, 1), bytes(bs)), (rw16(0x8A, 0, 1), bytes(bs)),
        (rw10(0x2E, 0, 1, 0x02), bytes(bs)), (rw16(0x8B, 0, 1), bytes(bs)),
        (rw10(0x41, 0, 1), bytes(bs)), (rw10(0x41, 0, 1, 0x08), None), (rw16(0x93, 0, 1), bytes(bs)),
        (struct.pack(">BBQ3sBBB", 0x89, 0, 0, b"", 1, 0, 0), bytes(2 * bs)),
        (bytes((0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0)), bytes(24)),
    ]
    for cdb, data in cases:
        assert sense(h.run(cdb, data)) == WRITE_PROTECT, cdb.hex()
    assert sense(h.run(rw10(0x28, 0, 1))) == GOOD


def test_residuals_short_data_out_writes_whole_blocks_that_came() -> None:
    h = Harness()
    bs = h.bs
    h.run(rw10(0x2A, 0, 2), b"a" * 2 * bs)
    # EDTL 0 or 200 bytes for a 1-block write: GOOD, nothing written (no whole block came).
    for n, data in ((1, None), (1, b"b" * 200)):
        assert sense(h.run(rw10(0x2A, 0, n), data, edtl=len(data or b""))) == GOOD
    assert bytes(h.backend.data[: 2 * bs]) == b"a" * 2 * bs
    # One block of data for a 2-block write: the block that came is written.
    assert sense(h.run(rw10(0x2A, 0, 2), b"b" * bs, edtl=bs)) == GOOD
    assert bytes(h.backend.data[: 2 * bs]) == b"b" * bs + b"a" * bs
    # EDTL of two blocks for a one-block write: the first block only.
    assert sense(h.run(rw10(0x2A, 0, 1), b"c" * 2 * bs)) == GOOD
    assert bytes(h.backend.data[: 2 * bs]) == b"c" * bs + b"a" * bs
    dol = h.target.data_out_length
    assert dol(ScsiCommand(rw10(0x2A, 0, 3), 0, "I1", None, 0)) == 3 * bs
    assert dol(ScsiCommand(rw6(0x0A, 0, 0), 0, "I1", None, 0)) == 256 * bs
    assert dol(ScsiCommand(rw16(0x93, 0, 9, 0x01), 0, "I1", None, 0)) == 0
    assert dol(ScsiCommand(rw10(0x2F, 0, 3, 0x02), 0, "I1", None, 0)) == 3 * bs
    assert dol(ScsiCommand(rw10(0x28, 0, 3), 0, "I1", None, 0)) is None
    assert dol(ScsiCommand(b"\x2a", 0, "I1", None, 0)) is None


def test_transfer_longer_than_maximum_is_refused() -> None:
    h = Harness(max_transfer_blocks=8)
    assert sense(h.run(rw10(0x28, 0, 9))) == INVALID_CDB
    assert sense(h.run(rw10(0x28, 0, 8))) == GOOD


def test_backend_errors_map_through_sense_for_errno() -> None:
    h = Harness()
    h.backend.fail = OSError(errno.EIO, "boom")
    assert sense(h.run(rw10(0x28, 0, 1))) == (0x3, 0x11, 0x00)
    assert sense(h.run(rw10(0x2A, 0, 1), bytes(h.bs))) == (0x3, 0x0C, 0x00)
    h.backend.fail = OSError(errno.ENOSPC, "full")
    assert sense(h.run(rw10(0x2A, 0, 1), bytes(h.bs))) == (0x7, 0x27, 0x07)


# -- VERIFY / WRITE AND VERIFY / ORWRITE ------------------------------------------------------
@pytest.mark.parametrize("op,build", [(0x2F, rw10), (0xAF, rw12), (0x8F, rw16)])
def test_verify(op: int, build) -> None:
    h = Harness()
    bs = h.bs
    pattern = bytes((i * 7) & 0xFF for i in range(3 * bs))
    h.run(rw10(0x2A, 5, 3), pattern)
    assert sense(h.run(build(op, 5, 3, 0x02), pattern)) == GOOD
    bad = bytearray(pattern)
    bad[777] ^= 0x58
    res = h.run(build(op, 5, 3, 0x02), bad)
    assert sense(res) == MISCOMPARE and info(res) == 777
    assert sense(h.run(build(op, 5, 3, 0x00))) == GOOD  # BYTCHK=0: no data, no compare
    assert sense(h.run(build(op, 5, 3, 0x04), pattern)) == INVALID_CDB  # BYTCHK=10b
    assert sense(h.run(build(op, 5, 3, 0x20), pattern)) == INVALID_CDB  # VRPROTECT
    assert sense(h.run(build(op, h.params.blocks - 1, 2, 0x02), bytes(2 * bs))) == LBA_OOB
    h.run(rw10(0x41, 20, 4), b"\x33" * bs)
    assert sense(h.run(build(op, 20, 4, 0x06), b"\x33" * bs)) == GOOD  # BYTCHK=11b
    assert sense(h.run(build(op, 20, 4, 0x06), b"\x34" * bs)) == MISCOMPARE


def test_first_difference() -> None:
    assert first_difference(b"abc", b"abc") == -1
    assert first_difference(b"abc", b"abd") == 2
    assert first_difference(b"\x00bc", b"\x01bc") == 0


@pytest.mark.parametrize("op,build", [(0x2E, rw10), (0xAE, rw12), (0x8E, rw16)])
def test_write_and_verify(op: int, build) -> None:
    h = Harness()
    data = b"v" * 2 * h.bs
    assert sense(h.run(build(op, 3, 2, 0x02), data)) == GOOD
    assert h.backend.log[-1].fua is True
    assert bytes(h.backend.data[3 * h.bs : 5 * h.bs]) == data
    assert sense(h.run(build(op, 3, 2, 0x10), data)) == GOOD  # DPO
    assert sense(h.run(build(op, 3, 2, 0x04), data)) == INVALID_CDB


def test_orwrite() -> None:
    h = Harness()
    h.run(rw10(0x2A, 0, 2), b"\xa5" * 2 * h.bs)
    assert sense(h.run(rw16(0x8B, 0, 2), b"\x5a" * 2 * h.bs)) == GOOD
    assert bytes(h.backend.data[: 2 * h.bs]) == b"\xff" * 2 * h.bs
    assert sense(h.run(rw16(0x8B, 0, 0))) == GOOD
    assert sense(h.run(rw16(0x8B, h.params.blocks, 1), bytes(h.bs))) == LBA_OOB
    assert sense(h.run(rw16(0x8B, 0, 1, 0x20), bytes(h.bs))) == INVALID_CDB


# -- PRE-FETCH / SYNCHRONIZE CACHE --------------------------------------------------------
@pytest.mark.parametrize("op,build", [(0x34, rw10), (0x90, rw16)])
def test_prefetch(op: int, build) -> None:
    h = Harness()
    end = h.params.blocks
    assert h.run(build(op, 0, 16, 0x02)).status == Status.GOOD  # GOOD, not CONDITION MET
    assert h.backend.log[-1].op == BlockOp.PREFETCH
    assert sense(h.run(build(op, 0, 0))) == GOOD
    assert h.backend.log[-1].blocks == end  # zero means to the end
    assert sense(h.run(build(op, end + 1, 0))) == LBA_OOB
    assert sense(h.run(build(op, end - 1, 2))) == LBA_OOB


@pytest.mark.parametrize("op,build", [(0x35, rw10), (0x91, rw16)])
def test_synchronize_cache(op: int, build) -> None:
    h = Harness()
    assert sense(h.run(build(op, 0, 0, 0x02))) == GOOD
    assert h.backend.log[-1].op == BlockOp.FLUSH
    assert sense(h.run(build(op, h.params.blocks, 1))) == LBA_OOB


# -- WRITE SAME / UNMAP ---------------------------------------------------------------------
@pytest.mark.parametrize("op,build", [(0x41, rw10), (0x93, rw16)])
def test_write_same(op: int, build) -> None:
    h = Harness(max_write_same_blocks=1024)
    bs, end = h.bs, h.params.blocks
    assert sense(h.run(build(op, 10, 5), b"\x77" * bs)) == GOOD
    assert bytes(h.backend.data[10 * bs : 15 * bs]) == b"\x77" * 5 * bs
    # UNMAP deallocates whatever the pattern, so the blocks read back as zeroes (LBPRZ).
    assert sense(h.run(build(op, 10, 5, 0x08), b"\xff" * bs)) == GOOD
    assert h.backend.log[-1].op == BlockOp.UNMAP and h.backend.log[-1].ranges == ((10, 5),)
    assert h.backend.deallocated[10:15] == b"\x01" * 5
    # zero blocks: through the end, unless that exceeds MAXIMUM WRITE SAME LENGTH
    assert sense(h.run(build(op, 0, 0), bytes(bs))) == INVALID_CDB
    assert sense(h.run(build(op, end - 1024, 0), bytes(bs))) == GOOD
    assert h.backend.log[-1].blocks == 1024
    assert sense(h.run(build(op, end - 1025, 1025), bytes(bs))) == INVALID_CDB
    assert sense(h.run(build(op, end + 1, 0), bytes(bs))) == LBA_OOB
    assert sense(h.run(build(op, -1, 0), bytes(bs))) == LBA_OOB
    # the Data-Out is exactly one block
    assert sense(h.run(build(op, 0, 1, 0x08), bytes(bs // 2)))[0] == 0x5
    assert sense(h.run(build(op, 0, 1, 0x08), bytes(2 * bs)))[0] == 0x5
    assert sense(h.run(build(op, 0, 1, 0x10), bytes(bs))) == INVALID_CDB  # ANCHOR
    assert sense(h.run(build(op, 0, 1, 0x18), bytes(bs))) == INVALID_CDB  # ANCHOR+UNMAP
    assert sense(h.run(build(op, 0, 1, 0x40), bytes(bs))) == INVALID_CDB  # WRPROTECT


def test_write_same10_limit_as_libiscsi_probes_it() -> None:
    # A LUN larger than 64K blocks: libiscsi builds WRITE SAME(10) counts from the advertised
    # maximum, truncated to 16 bits, so the maximum must fit in 16 bits.
    h = Harness(blocks=0x18000)
    bl = h.run(bytes((0x12, 1, 0xB0, 0, 64, 0))).data
    mws = struct.unpack_from(">Q", bl, 36)[0]
    assert mws == 0xFFFF
    end, bs = h.params.blocks, h.bs
    assert sense(h.run(rw10(0x41, 0, 0), bytes(bs))) == INVALID_CDB
    assert sense(h.run(rw10(0x41, end - (mws + 1), (mws + 1) & 0xFFFF), bytes(bs))) == INVALID_CDB
    assert sense(h.run(rw10(0x41, end - mws, mws), bytes(bs))) == GOOD
    assert sense(h.run(rw10(0x41, end - mws + 1, 0), bytes(bs))) == GOOD


def test_write_same16_ndob_and_thick_lu() -> None:
    h = Harness()
    h.run(rw10(0x2A, 0, 2), b"\xff" * 2 * h.bs)
    assert sense(h.run(rw16(0x93, 0, 2, 0x09))) == GOOD  # NDOB + UNMAP, no Data-Out
    assert bytes(h.backend.data[: 2 * h.bs]) == bytes(2 * h.bs)
    thick = Harness(thin=False)
    assert sense(thick.run(rw16(0x93, 0, 1, 0x08), bytes(thick.bs))) == INVALID_CDB
    assert sense(thick.run(rw16(0x93, 0, 1), bytes(thick.bs))) == GOOD


def _unmap(descs: list[tuple[int, int]], plen: int | None = None) -> tuple[bytes, bytes]:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in descs)
    data = struct.pack(">HH4x", 6 + len(body), len(body)) + body
    plen = len(data) if plen is None else plen
    return bytes((0x42, 0, 0, 0, 0, 0, 0)) + struct.pack(">HB", plen, 0), data


def test_unmap() -> None:
    h = Harness(max_unmap_descriptors=4, max_unmap_blocks=100)
    h.run(rw10(0x2A, 0, 8), b"\x11" * 8 * h.bs)
    cdb, data = _unmap([(0, 2), (4, 2), (6, 0)])
    assert sense(h.run(cdb, data)) == GOOD
    assert h.backend.log[-1].ranges == ((0, 2), (4, 2))
    assert bytes(h.backend.data[: h.bs]) == bytes(h.bs)
    cdb, data = _unmap([(0, 0)])
    n = len(h.backend.log)
    assert sense(h.run(cdb, data)) == GOOD and len(h.backend.log) == n  # nothing to do
    assert sense(h.run(*_unmap([]))) == GOOD
    assert sense(h.run(bytes(10)[:0] + bytes((0x42,)) + bytes(9))) == GOOD  # plen 0
    assert sense(h.run(*_unmap([(i, 1) for i in range(5)]))) == INVALID_PARAM
    assert sense(h.run(*_unmap([(0, 60), (100, 41)]))) == INVALID_PARAM
    assert sense(h.run(*_unmap([(h.params.blocks - 1, 2)]))) == LBA_OOB
    cdb, data = _unmap([(0, 1)], plen=4)
    assert sense(h.run(cdb, data[:4])) == (0x5, 0x1A, 0x00)
    cdb, data = _unmap([(0, 1)])
    assert sense(h.run(cdb, data[:10], edtl=10)) == INVALID_IU  # Data-Out shorter than list
    assert sense(h.run(bytes((0x42, 1)) + bytes(6) + bytes((0, 24, 0)), data)) == INVALID_CDB


def test_unmap_and_get_lba_status_absent_on_thick_lu() -> None:
    h = Harness(thin=False)
    assert sense(h.run(*_unmap([(0, 1)]))) == INVALID_OPCODE
    glbas = struct.pack(">BBQIBB", 0x9E, 0x12, 0, 64, 0, 0)
    assert sense(h.run(glbas)) == INVALID_OPCODE


# -- COMPARE AND WRITE -------------------------------------------------------------------
def _caw(lba: int, nlb: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQ3sBBB", 0x89, flags, lba, b"", nlb, 0, 0)


def test_compare_and_write() -> None:
    h = Harness()
    bs = h.bs
    h.run(rw16(0x8A, 4, 2), b"A" * 2 * bs)
    assert sense(h.run(_caw(4, 2, 0x18), b"A" * 2 * bs + b"B" * 2 * bs)) == GOOD
    assert bytes(h.backend.data[4 * bs : 6 * bs]) == b"B" * 2 * bs
    verify = bytearray(b"B" * 2 * bs)
    verify[2 * bs - 27] = ord("C")
    res = h.run(_caw(4, 2), bytes(verify) + b"D" * 2 * bs)
    assert sense(res) == MISCOMPARE and info(res) == 2 * bs - 27
    assert bytes(h.backend.data[4 * bs : 6 * bs]) == b"B" * 2 * bs
    assert sense(h.run(_caw(4, 0))) == GOOD
    assert sense(h.run(_caw(0, 65), bytes(130 * bs))) == INVALID_CDB
    assert sense(h.run(_caw(0, 1), bytes(4 * bs)))[0] == 0x5
    assert sense(h.run(_caw(0, 3), bytes(4 * bs)))[0] == 0x5
    assert sense(h.run(_caw(h.params.blocks, 1), bytes(2 * bs))) == LBA_OOB
    assert sense(h.run(_caw(0, 1, 0x20), bytes(2 * bs))) == INVALID_CDB


# -- capacity and provisioning status -----------------------------------------------------
def test_read_capacity() -> None:
    h = Harness()
    res = h.run(bytes((0x25,)) + bytes(9))
    assert struct.unpack(">II", res.data) == (h.params.blocks - 1, 512)
    assert sense(h.run(bytes((0x25, 0, 0, 0, 0, 1)) + bytes(4))) == INVALID_CDB
    big = Harness(blocks=2**33)
    res = big.run(bytes((0x25,)) + bytes(9))
    assert struct.unpack(">II", res.data)[0] == 0xFFFFFFFF
    res = big.run(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0))
    last, bsz, _, lbp = struct.unpack_from(">QIBxH", res.data)
    assert (last, bsz, lbp & 0xC000) == (2**33 - 1, 512, 0xC000)
    for alloc in range(16):
        res = h.run(struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc, 0, 0))
        assert res.status == Status.GOOD and len(res.data or b"") == alloc
    thick = Harness(thin=False)
    res = thick.run(struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0))
    assert res.data[14] & 0xC0 == 0


def test_get_lba_status() -> None:
    h = Harness()
    h.run(rw10(0x2A, 0, 8), b"\x11" * 8 * h.bs)
    h.run(*_unmap([(2, 3)]))
    res = h.run(struct.pack(">BBQIBB", 0x9E, 0x12, 1, 1024, 0, 0))
    (plen,) = struct.unpack_from(">I", res.data)
    descs = [struct.unpack_from(">QIB", res.data, 8 + 16 * i) for i in range((plen - 4) // 16)]
    assert descs[:3] == [(1, 1, 0), (2, 3, 1), (5, 3, 0)]
    assert descs[-1][0] + descs[-1][1] == h.params.blocks
    res = h.run(struct.pack(">BBQIBB", 0x9E, 0x12, 1, 24, 0, 0))
    assert len(res.data) == 24 and struct.unpack_from(">QIB", res.data, 8) == (1, 1, 0)
    for lba in (h.params.blocks, h.params.blocks + 1, 2**63, 2**64 - 1):
        assert sense(h.run(struct.pack(">BBQIBB", 0x9E, 0x12, lba, 24, 0, 0))) == LBA_OOB


def test_reserved_bits_point_at_the_field() -> None:
    h = Harness()
    res = h.run(bytes((0x28, 0, 0, 0, 0, 0, 0x80, 0, 1, 0)))  # byte 6 bit 7 reserved
    assert sense(res) == INVALID_CDB and field_pointer(res) == (6, 7)
    res = h.run(bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0x04)))  # NACA
    assert sense(res) == INVALID_CDB and field_pointer(res) == (9, 2)
    assert sense(h.run(bytes((0x28, 0, 0)))) == INVALID_CDB  # short CDB
