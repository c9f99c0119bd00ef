"""EXTENDED COPY(LID1), RECEIVE COPY RESULTS and VPD 8Fh, driven through the harness."""

from __future__ import annotations

import errno
import struct

import pytest

from vsand.protocol.block import BlockOp
from vsand.protocol.scsi import xcopy

from scsi_harness import GOOD, INVALID_CDB, INVALID_PARAM, NAA, Harness, field_pointer, sense

PARAM_LEN = (0x5, 0x1A, 0x00)
TOO_MANY_CSCD = (0x5, 0x26, 0x06)
UNSUPPORTED_CSCD = (0x5, 0x26, 0x07)
TOO_MANY_SEGMENTS = (0x5, 0x26, 0x08)
UNSUPPORTED_SEGMENT = (0x5, 0x26, 0x09)
NOT_REACHABLE = (0xA, 0x0D, 0x02)
IN_PROGRESS = (0x5, 0x00, 0x16)


def cscd(naa: bytes = NAA, block_size: int = 512, kind: int = 0xE4, byte1: int = 0) -> bytes:
    d = bytearray(32)
    d[0], d[1] = kind, byte1
    d[4:8] = bytes((0x01, 0x03, 0, len(naa)))  # binary, LU association, NAA
    d[8 : 8 + len(naa)] = naa
    d[29:32] = block_size.to_bytes(3, "big")
    return bytes(d)


def b2b(src: int, dst: int, blocks: int, src_lba: int, dst_lba: int, dc: bool = False) -> bytes:
    return struct.pack(">BBHHHHHQQ", 0x02, 0x02 if dc else 0, 0x18, src, dst, 0, blocks,
                       src_lba, dst_lba)


def b2b_off(src: int, dst: int, nbytes: int, src_lba: int, dst_lba: int, src_off: int = 0,
            dst_off: int = 0) -> bytes:
    return struct.pack(">BBHHHIQQHH", 0x0A, 0, 0x1C, src, dst, nbytes, src_lba, dst_lba,
                       src_off, dst_off)


def plist(cscds: list[bytes], segs: list[bytes], list_id: int = 1, usage: int = 0,
          inline: int = 0) -> bytes:
    t, s = b"".join(cscds), b"".join(segs)
    head = struct.pack(">BBHIII", list_id, usage << 3, len(t), 0, len(s), inline)
    return head + t + s


def xcopy_cdb(length: int) -> bytes:
    return bytes((0x83, 0, 0, 0, 0, 0, 0, 0, 0, 0)) + struct.pack(">I", length) + bytes(2)


def rcr_cdb(sa: int, list_id: int = 0, alloc: int = 1024) -> bytes:
    return bytes((0x84, sa, list_id, 0, 0, 0, 0, 0, 0, 0)) + struct.pack(">I", alloc) + bytes(2)


def fill(h: Harness, lun: int, lba: int, data: bytes) -> None:
    be = h.backends[lun]
    be.data[lba * be.block_size : lba * be.block_size + len(data)] = data


def blocks(h: Harness, lun: int, lba: int, n: int) -> bytes:
    be = h.backends[lun]
    return bytes(be.data[lba * be.block_size : (lba + n) * be.block_size])


def run_xcopy(h: Harness, p: bytes, lun: int = 0, nexus: str = "I1"):  # type: ignore[no-untyped-def]
    return h.run(xcopy_cdb(len(p)), p, lun=lun, nexus=nexus)


@pytest.fixture
def h() -> Harness:
    return Harness()


# -- success ------------------------------------------------------------------------------------
def test_copy_within_one_lun(h: Harness) -> None:
    pattern = bytes(range(256)) * 2 * 16
    fill(h, 0, 10, pattern)
    res = run_xcopy(h, plist([cscd()], [b2b(0, 0, 16, 10, 1000)]))
    assert sense(res) == GOOD
    assert blocks(h, 0, 1000, 16) == pattern


def test_copy_between_luns_routes_by_lun_number(h: Harness) -> None:
    other = h.add_lun(3, block_size=4096, blocks=256)
    data = b"\xab" * 8 * 512
    fill(h, 0, 0, data)
    p = plist([cscd(), cscd(NAA[:-1] + b"\x03", 4096)], [b2b(0, 1, 8, 0, 5)])
    assert sense(run_xcopy(h, p)) == GOOD
    assert blocks(h, 3, 5, 1) == data
    assert {r.lun for r in other.log} == {3}
    # DC=1: NUMBER OF BLOCKS counts destination blocks.
    p = plist([cscd(), cscd(NAA[:-1] + b"\x03", 4096)], [b2b(1, 0, 8, 5, 100, dc=True)])
    assert sense(run_xcopy(h, p)) == GOOD
    assert blocks(h, 0, 100, 8) == data
    # One 512-byte block is no whole number of 4 KiB blocks.
    p = plist([cscd(), cscd(NAA[:-1] + b"\x03", 4096)], [b2b(0, 1, 1, 0, 5)])
    assert sense(run_xcopy(h, p)) == (0xA, 0x0D, 0x04)


def test_large_copy_is_chunked(h: Harness) -> None:
    n = 8192  # 4 MiB in 512-byte blocks
    h = Harness(blocks=3 * n)
    payload = bytes((i * 7) & 0xFF for i in range(n * 512))
    fill(h, 0, 0, payload)
    be = h.backend
    be.log.clear()
    assert sense(run_xcopy(h, plist([cscd()], [b2b(0, 0, n, 0, n + 1)]))) == GOOD
    assert blocks(h, 0, n + 1, n) == payload
    sizes = [r.blocks * 512 for r in be.log]
    assert max(sizes) <= xcopy.CHUNK_BYTES
    assert [r.op for r in be.log[:2]] == [BlockOp.READ, BlockOp.WRITE]
    assert len(be.log) == 2 * (n * 512 // xcopy.CHUNK_BYTES)


def test_overlapping_copy_forward_is_memmove(h: Harness) -> None:
    n = 4096
    h = Harness(blocks=2 * n)
    payload = bytes((i * 13 + i // 512) & 0xFF for i in range(n * 512))
    fill(h, 0, 0, payload)
    assert sense(run_xcopy(h, plist([cscd()], [b2b(0, 0, n, 0, 100)]))) == GOOD
    assert blocks(h, 0, 100, n) == payload


def test_byte_offset_segment_read_modify_write(h: Harness) -> None:
    fill(h, 0, 0, bytes(range(256)) * 8)
    fill(h, 0, 50, b"\xee" * 4 * 512)
    p = plist([cscd()], [b2b_off(0, 0, 700, 0, 50, src_off=3, dst_off=100)])
    assert sense(run_xcopy(h, p)) == GOOD
    got = blocks(h, 0, 50, 4)
    src = (bytes(range(256)) * 8)[3 : 3 + 700]
    assert got[:100] == b"\xee" * 100
    assert got[100:800] == src
    assert got[800:] == b"\xee" * (4 * 512 - 800)


def test_zero_length_parameter_list_and_zero_blocks(h: Harness) -> None:
    assert sense(h.run(xcopy_cdb(0))) == GOOD
    assert sense(run_xcopy(h, plist([cscd()], [b2b(0, 0, 0, 0, 1)]))) == GOOD
    assert sense(run_xcopy(h, plist([cscd()], []))) == GOOD


def test_lu_id_type_and_nul_are_ignored(h: Harness) -> None:
    p = plist([cscd(byte1=0xA0)], [b2b(0, 0, 1, 0, 1)])
    assert sense(run_xcopy(h, p)) == GOOD


# -- parameter list errors ----------------------------------------------------------------------
def test_truncated_parameter_lists(h: Harness) -> None:
    p = plist([cscd()], [b2b(0, 0, 1, 0, 1)])
    for n in (8, 16 + 31, len(p) - 1):
        assert sense(h.run(xcopy_cdb(n), p[:n])) == PARAM_LEN


def test_descriptor_list_longer_than_maximum(h: Harness) -> None:
    segs = [b2b(0, 0, 1, 0, 1)] * ((xcopy.MAX_DESC_LIST // 28) + 1)
    assert sense(run_xcopy(h, plist([cscd()], segs))) == PARAM_LEN


def test_too_many_descriptors(h: Harness) -> None:
    p = plist([cscd()] * (xcopy.MAX_CSCD + 1), [b2b(0, 0, 1, 0, 1)])
    assert sense(run_xcopy(h, p)) == TOO_MANY_CSCD
    p = plist([cscd()], [b2b(0, 0, 1, 0, 1)] * (xcopy.MAX_SEGMENTS + 1))
    assert sense(run_xcopy(h, p)) == TOO_MANY_SEGMENTS
    # The limits themselves are fine.
    p = plist([cscd()] * xcopy.MAX_CSCD, [b2b(0, 0, 1, 0, 1)] * xcopy.MAX_SEGMENTS)
    assert sense(run_xcopy(h, p)) == GOOD


def test_unsupported_descriptor_types(h: Harness) -> None:
    res = run_xcopy(h, plist([cscd(kind=0xE0)], [b2b(0, 0, 1, 0, 1)]))
    assert sense(res) == UNSUPPORTED_CSCD
    assert field_pointer(res) == (16, None)
    stream = struct.pack(">BBHHH", 0x09, 0, 0x10, 0, 0) + bytes(16)
    assert sense(run_xcopy(h, plist([cscd()], [stream]))) == UNSUPPORTED_SEGMENT


def test_invalid_fields(h: Harness) -> None:
    assert sense(run_xcopy(h, plist([cscd()], [], usage=1))) == INVALID_PARAM
    assert sense(run_xcopy(h, plist([cscd()], [b2b(0, 0, 1, 0, 1)], inline=4)
                           + bytes(4))) == INVALID_PARAM
    bad_len = bytearray(b2b(0, 0, 1, 0, 1))
    bad_len[3] = 0x14
    res = run_xcopy(h, plist([cscd()], [bytes(bad_len)]))
    assert sense(res) == INVALID_PARAM and field_pointer(res) == (16 + 32 + 2, None)
    # A CSCD list that is not whole descriptors.
    p = bytearray(plist([cscd()], []))
    p[2:4] = struct.pack(">H", 30)
    assert sense(run_xcopy(h, bytes(p))) == INVALID_PARAM


def test_lid4_service_action_refused(h: Harness) -> None:
    cdb = bytearray(xcopy_cdb(0))
    cdb[1] = 0x01
    assert sense(h.run(bytes(cdb))) == INVALID_CDB


# -- segment errors: COPY ABORTED ---------------------------------------------------------------
def _segment_number(res) -> int:  # type: ignore[no-untyped-def]
    return struct.unpack_from(">I", res.sense, 8)[0]


def test_bad_index_and_unknown_designator(h: Harness) -> None:
    res = run_xcopy(h, plist([cscd()], [b2b(0, 0, 1, 0, 1), b2b(0, 1, 1, 0, 1)]))
    assert sense(res) == NOT_REACHABLE
    assert _segment_number(res) == 1
    assert field_pointer(res) == (16 + 32 + 28 + 6, None)
    res = run_xcopy(h, plist([cscd(b"\x60" + bytes(15))], [b2b(0, 0, 1, 0, 1)]))
    assert sense(res) == NOT_REACHABLE


def test_range_beyond_end(h: Harness) -> None:
    end = h.params.blocks
    res = run_xcopy(h, plist([cscd()], [b2b(0, 0, 16, 0, end - 1)]))
    assert sense(res) == (0xA, 0, 0)
    assert field_pointer(res) == (16 + 32 + 20, None)
    res = run_xcopy(h, plist([cscd()], [b2b(0, 0, 16, end - 15, 0)]))
    assert sense(res)[0] == 0xA


def test_wrong_block_length_or_device_type(h: Harness) -> None:
    assert sense(run_xcopy(h, plist([cscd(block_size=4096)], [b2b(0, 0, 1, 0, 1)]))) == \
        (0xA, 0x0D, 0x03)
    assert sense(run_xcopy(h, plist([cscd(byte1=0x01)], [b2b(0, 0, 1, 0, 1)]))) == \
        (0xA, 0x0D, 0x03)


def test_read_only_destination(h: Harness) -> None:
    h.add_lun(1, read_only=True)
    p = plist([cscd(), cscd(NAA[:-1] + b"\x01")], [b2b(0, 1, 1, 0, 0)])
    assert sense(run_xcopy(h, p)) == (0xA, 0x27, 0x00)


def test_lun_gone_during_copy(h: Harness) -> None:
    h.add_lun(1)
    p = plist([cscd(), cscd(NAA[:-1] + b"\x01")], [b2b(0, 1, 1, 0, 0)])
    del h.backends[1]  # the executor no longer finds LUN 1: ENODEV
    assert sense(run_xcopy(h, p)) == NOT_REACHABLE


def test_io_errors(h: Harness) -> None:
    p = plist([cscd()], [b2b(0, 0, 1, 0, 1)])
    h.backend.fail = OSError(errno.EIO, "boom")
    assert sense(run_xcopy(h, p)) == (0xA, 0x11, 0x00)  # the READ failed
    h.backend.fail = OSError(errno.ENOTCONN, "fenced")  # keeps its own sense: fail over
    assert sense(run_xcopy(h, p)) == (0x2, 0x04, 0x0C)


# -- RECEIVE COPY RESULTS -----------------------------------------------------------------------
def test_operating_parameters(h: Harness) -> None:
    res = h.run(rcr_cdb(0x03))
    d = bytes(res.data or b"")
    assert struct.unpack_from(">I", d)[0] == len(d) - 4
    assert struct.unpack_from(">HHII", d, 8) == (xcopy.MAX_CSCD, xcopy.MAX_SEGMENTS,
                                                 xcopy.MAX_DESC_LIST, xcopy.MAX_SEGMENT_BYTES)
    assert d[37] == 9  # data segment granularity: 512-byte blocks
    assert d[44 : 44 + d[43]] == bytes((0x02, 0x0A, 0xE4))


def test_copy_status_lifecycle(h: Harness) -> None:
    assert sense(h.run(rcr_cdb(0x00, 1))) == INVALID_CDB
    assert sense(run_xcopy(h, plist([cscd()], [b2b(0, 0, 4, 0, 8)] * 2, list_id=1))) == GOOD
    d = bytes(h.run(rcr_cdb(0x00, 1)).data or b"")
    assert struct.unpack(">IBHBI", d) == (8, 0x01, 2, 0, 2 * 4 * 512)
    # Per nexus: another one knows nothing of list 1.
    assert sense(h.run(rcr_cdb(0x00, 1), nexus="I2")) == INVALID_CDB
    fsd = bytes(h.run(rcr_cdb(0x04, 1)).data or b"")
    assert struct.unpack_from(">I", fsd)[0] == 56 and fsd[56] == 0
    assert bytes(h.run(rcr_cdb(0x01, 1)).data or b"") == bytes(4)
    # A failed copy: completed with errors, its sense in FAILED SEGMENT DETAILS.
    run_xcopy(h, plist([cscd()], [b2b(0, 0, 4, 0, 8), b2b(0, 5, 1, 0, 1)], list_id=2))
    d = bytes(h.run(rcr_cdb(0x00, 2)).data or b"")
    assert d[4] == 0x02 and struct.unpack_from(">H", d, 5)[0] == 1
    fsd = bytes(h.run(rcr_cdb(0x04, 2)).data or b"")
    assert fsd[56] == 0x02 and fsd[60 + 2] & 0x0F == 0xA
    # No hold (10b) and no list ID (11b): nothing kept.
    run_xcopy(h, plist([cscd()], [b2b(0, 0, 1, 0, 8)], list_id=3, usage=2))
    run_xcopy(h, plist([cscd()], [b2b(0, 0, 1, 0, 8)], list_id=4, usage=3))
    assert sense(h.run(rcr_cdb(0x00, 3))) == INVALID_CDB
    assert sense(h.run(rcr_cdb(0x00, 4))) == INVALID_CDB
    # A new login of the nexus forgets everything.
    h.target.attach("I1")
    assert sense(h.run(rcr_cdb(0x00, 1))) == INVALID_CDB


def test_in_progress_and_duplicate_list_id(h: Harness) -> None:
    from vsand.protocol.scsi import ScsiCommand

    p = plist([cscd()], [b2b(0, 0, 4, 0, 8)], list_id=7, usage=2)
    task = h.target.execute(ScsiCommand(xcopy_cdb(len(p)), 0, "I1", p, len(p)))
    req = next(task)  # type: ignore[arg-type]
    assert req.op == BlockOp.READ
    d = bytes(h.run(rcr_cdb(0x00, 7)).data or b"")
    assert d[4] == 0x00  # operation in progress
    assert sense(h.run(rcr_cdb(0x04, 7))) == INVALID_CDB  # not held: only COPY STATUS
    assert sense(run_xcopy(h, p)) == IN_PROGRESS
    task.close()  # aborted mid-copy: the list ID is free again
    assert sense(h.run(rcr_cdb(0x00, 7))) == INVALID_CDB
    assert sense(run_xcopy(h, p)) == GOOD


def test_held_results_are_bounded(h: Harness) -> None:
    for i in range(xcopy.MAX_HELD + 10):
        assert sense(run_xcopy(h, plist([cscd()], [], list_id=i))) == GOOD
    held = h.target.copy_manager.lists[("I1", 0)]
    assert len(held) == xcopy.MAX_HELD
    assert 0 not in held and xcopy.MAX_HELD + 9 in held


# -- VPD ------------------------------------------------------------------------------------------
def _inquiry(h: Harness, page: int) -> bytes:
    res = h.run(bytes((0x12, 1, page, 0x04, 0, 0)))
    assert sense(res) == GOOD
    return bytes(res.data or b"")


def test_vpd_third_party_copy(h: Harness) -> None:
    assert 0x8F in _inquiry(h, 0x00)[4:]
    d = _inquiry(h, 0x8F)
    assert d[1] == 0x8F and struct.unpack_from(">H", d, 2)[0] == len(d) - 4
    descs: dict[int, bytes] = {}
    off = 4
    while off < len(d):
        kind, n = struct.unpack_from(">HH", d, off)
        assert (n + 4) % 4 == 0
        descs[kind] = d[off + 4 : off + 4 + n]
        off += 4 + n
    assert off == len(d)
    assert set(descs) == {0x0001, 0x0004, 0x0008, 0x8001}
    cmds = descs[0x0001]
    listed, i = {}, 1
    while i < 1 + cmds[0]:
        listed[cmds[i]] = set(cmds[i + 2 : i + 2 + cmds[i + 1]])
        i += 2 + cmds[i + 1]
    assert listed == {0x83: {0x00}, 0x84: {0x00, 0x01, 0x03, 0x04}}


def test_report_supported_opcodes_lists_copy_commands(h: Harness) -> None:
    res = h.run(bytes((0xA3, 0x0C, 0x02, 0x84)) + struct.pack(">HI", 0x03, 64) + bytes(2))
    d = bytes(res.data or b"")
    assert d[1] & 0x07 == 0x03 and d[4] == 0x84
