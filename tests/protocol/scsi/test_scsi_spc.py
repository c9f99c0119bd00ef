"""Primary commands, unit attentions, task management and the errno table."""

from __future__ import annotations

import errno
import struct

import pytest
from scsi_harness import (
    GOOD,
    INVALID_CDB,
    INVALID_OPCODE,
    INVALID_PARAM,
    LU_NOT_SUPPORTED,
    NAA,
    Harness,
    params,
    rw10,
    sense,
)

from vsand.protocol.scsi import LogicalUnit, ScsiCommand, ScsiTarget, Status, sense_for_errno
from vsand.protocol.scsi.target import SPECS

UA = 0x6


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBHB", 0x12, evpd, page, alloc, 0)


def vpd(h: Harness, page: int) -> bytes:
    res = h.run(inquiry(1, page, 1024))
    assert res.status == Status.GOOD, sense(res)
    data = bytes(res.data)
    assert data[1] == page and struct.unpack_from(">H", data, 2)[0] == len(data) - 4
    return data


def test_standard_inquiry() -> None:
    h = Harness(vendor="ACME", product="DISK", revision="0042")
    data = bytes(h.run(inquiry(alloc=260)).data)
    assert data[0] == 0x00 and data[2] == 0x06 and data[3] & 0x0F == 2 and data[3] & 0x10
    assert data[4] == len(data) - 5 and data[5] & 0x30 == 0x10 and data[7] & 0x02
    assert data[8:16] == b"ACME    " and data[16:32] == b"DISK".ljust(16) and data[32:36] == b"0042"
    versions = struct.unpack_from(">8H", data, 58)
    assert 0x05C0 in versions and 0x04C0 in versions
    for alloc in range(0, 100):
        assert len(h.run(inquiry(alloc=alloc)).data) == min(alloc, 96)
    assert sense(h.run(inquiry(0, 0x80))) == INVALID_CDB
    assert sense(h.run(inquiry(0x02))) == INVALID_CDB  # CMDDT is obsolete


def test_inquiry_to_missing_lun() -> None:
    h = Harness()
    res = h.run(inquiry(), lun=5)
    assert res.status == Status.GOOD and res.data[0] == 0x7F
    assert sense(h.run(inquiry(1, 0x83), lun=5)) == LU_NOT_SUPPORTED
    assert sense(h.run(bytes(6), lun=5)) == LU_NOT_SUPPORTED
    assert sense(h.run(bytes((0xEE,)) + bytes(9), lun=5)) == LU_NOT_SUPPORTED
    res = h.run(bytes((0x03, 0, 0, 0, 252, 0)), lun=5)
    assert res.status == Status.GOOD and (res.data[2], res.data[12]) == (0x5, 0x25)


def test_vpd_pages() -> None:
    h = Harness(serial="SER-42", relative_port=3, port_group=7)
    pages = vpd(h, 0x00)[4:]
    assert list(pages) == sorted(pages) and {0x80, 0x83, 0xB0, 0xB1, 0xB2} <= set(pages)
    for p in pages:
        vpd(h, p)
    assert vpd(h, 0x80)[4:] == b"SER-42"
    ids = vpd(h, 0x83)[4:]
    found = {}
    pos = 0
    while pos < len(ids):
        code_set, kind, length = ids[pos] & 0x0F, ids[pos + 1], ids[pos + 3]
        found[kind & 0x3F] = (code_set, ids[pos + 4 : pos + 4 + length])
        pos += 4 + length
    assert found[0x03] == (1, NAA)  # NAA, LU
    assert found[0x01][1].startswith(b"VSAND   ")  # T10 vendor ID
    assert found[0x14] == (1, b"\x00\x00\x00\x03")  # relative target port
    assert found[0x15] == (1, b"\x00\x00\x00\x07")  # target port group
    code_set, name = found[0x28]
    assert code_set == 3 and len(name) % 4 == 0 and name.rstrip(b"\0") == b"iqn.2026-01.io.vsand:disk1"
    bl = vpd(h, 0xB0)
    assert len(bl) == 64 and bl[5] == 64 and struct.unpack_from(">I", bl, 20)[0] == 0x100000
    assert vpd(h, 0xB1)[4:6] == b"\x00\x01"
    lbp = vpd(h, 0xB2)
    assert lbp[5] & 0xE0 == 0xE0 and lbp[5] & 0x1C == 0x04 and lbp[6] & 0x07 == 2
    assert sense(h.run(inquiry(1, 0x86))) == INVALID_CDB
    thick = Harness(thin=False)
    assert vpd(thick, 0xB2)[5] == 0 and struct.unpack_from(">I", vpd(thick, 0xB0), 20)[0] == 0


def test_report_luns() -> None:
    lu = LogicalUnit(params())
    t = ScsiTarget({0: lu, 3: lu, 300: lu})
    res = t.execute(ScsiCommand(struct.pack(">BBB3xIBB", 0xA0, 0, 0, 64, 0, 0), 9, "I", None, 64))
    assert res.status == Status.GOOD
    n = struct.unpack_from(">I", res.data)[0] // 8
    luns = [bytes(res.data[8 + 8 * i : 16 + 8 * i]) for i in range(n)]
    assert luns == [bytes(8), b"\x00\x03" + bytes(6), b"\x41\x2c" + bytes(6)]
    h = Harness()
    assert sense(h.run(struct.pack(">BBB3xIBB", 0xA0, 0, 0, 15, 0, 0))) == INVALID_CDB
    res = h.run(struct.pack(">BBB3xIBB", 0xA0, 0, 1, 16, 0, 0))
    assert bytes(res.data) == bytes(8)
    assert sense(h.run(struct.pack(">BBB3xIBB", 0xA0, 0, 7, 16, 0, 0))) == INVALID_CDB


def test_unit_attention_rules() -> None:
    h = Harness()
    h.run(bytes(6), nexus="I1")
    h.run(bytes(6), nexus="I2")
    h.lu.resize(4096)
    # INQUIRY and REPORT LUNS do not report (or clear) it ...
    assert h.run(inquiry(), nexus="I1").status == Status.GOOD
    # ... the next other command does, once.
    assert sense(h.run(bytes(6), nexus="I1")) == (UA, 0x2A, 0x09)
    assert sense(h.run(bytes(6), nexus="I1")) == GOOD
    # REQUEST SENSE reports it as data and clears it.
    res = h.run(bytes((0x03, 0, 0, 0, 18, 0)), nexus="I2")
    assert res.status == Status.GOOD and (res.data[2], res.data[12], res.data[13]) == (UA, 0x2A, 9)
    res = h.run(bytes((0x03, 0, 0, 0, 18, 0)), nexus="I2")
    assert (res.data[2], res.data[12]) == (0, 0)
    res = h.run(bytes((0x03, 1, 0, 0, 18, 0)), nexus="I2")
    assert res.data[0] == 0x72  # descriptor format on request


def test_lun_inventory_changes() -> None:
    h = Harness()
    h.run(bytes(6), nexus="I1")
    h.target.add_lun(1, LogicalUnit(params()))
    assert h.run(bytes(6), lun=1, nexus="I1").status == Status.GOOD  # the new LU: no UA
    h.target.remove_lun(1)
    h.target.add_lun(1, LogicalUnit(params()))
    # REPORT LUNS clears REPORTED LUNS DATA HAS CHANGED
    h.run(struct.pack(">BBB3xIBB", 0xA0, 0, 0, 64, 0, 0), nexus="I1")
    assert sense(h.run(bytes(6), nexus="I1")) == GOOD
    h.target.add_lun(2, LogicalUnit(params()))
    assert sense(h.run(bytes(6), nexus="I1")) == (UA, 0x3F, 0x0E)


def test_resets_and_nexus_loss() -> None:
    h = Harness()
    for n in ("I1", "I2"):
        h.run(bytes(6), nexus=n)
    h.lu.set_write_cache(False, "I1")
    assert sense(h.run(bytes(6), nexus="I2")) == (UA, 0x2A, 0x01)
    h.target.lun_reset(0, "I1")
    assert h.lu.write_cache is True  # defaults restored
    assert sense(h.run(bytes(6), nexus="I1")) == (UA, 0x29, 0x03)
    assert sense(h.run(bytes(6), nexus="I1")) == GOOD
    assert sense(h.run(bytes(6), nexus="I2")) == (UA, 0x29, 0x03)
    h.target.target_reset("I2")
    assert sense(h.run(bytes(6), nexus="I1")) == (UA, 0x29, 0x00)
    assert sense(h.run(bytes(6), nexus="I2")) == GOOD
    h.lu.resize(100)
    h.target.nexus_lost("I1")
    assert sense(h.run(bytes(6), nexus="I1")) == (UA, 0x29, 0x07)
    assert sense(h.run(bytes(6), nexus="I1")) == GOOD
    assert sense(h.run(bytes(6), nexus="I2")) == (UA, 0x2A, 0x09)


# -- MODE SENSE / MODE SELECT -----------------------------------------------------------
def mode_sense6(page: int, pc: int = 0, dbd: int = 0, alloc: int = 255, sub: int = 0) -> bytes:
    return bytes((0x1A, dbd << 3, (pc << 6) | page, sub, alloc, 0))


def pages_of(data: bytes, start: int) -> dict[int, bytes]:
    out = {}
    while start < len(data):
        out[data[start] & 0x3F] = data[start : start + 2 + data[start + 1]]
        start += 2 + data[start + 1]
    return out


def test_mode_sense() -> None:
    h = Harness()
    data = bytes(h.run(mode_sense6(0x3F)).data)
    assert data[0] == len(data) - 1 and data[2] & 0x10 and not data[2] & 0x80 and data[3] == 8
    assert struct.unpack_from(">I", data, 4)[0] == h.params.blocks and data[9:12] == b"\x00\x02\x00"
    pages = pages_of(data, 12)
    assert set(pages) == {0x08, 0x0A, 0x1C} and pages[0x08][2] & 0x04
    assert pages_of(bytes(h.run(mode_sense6(0x3F, sub=0xFF)).data), 12).keys() == pages.keys()
    ch = pages_of(bytes(h.run(mode_sense6(0x08, pc=1, dbd=1)).data), 4)
    assert ch[0x08][2] == 0x04
    assert sense(h.run(mode_sense6(0x08, pc=3))) == (0x5, 0x39, 0x00)
    assert sense(h.run(mode_sense6(0x19))) == INVALID_CDB
    assert sense(h.run(mode_sense6(0x08, sub=1))) == INVALID_CDB
    assert len(h.run(mode_sense6(0x3F, alloc=4)).data) == 4
    ro = Harness(read_only=True)
    assert ro.run(mode_sense6(0x3F)).data[2] & 0x80
    ten = bytes(h.run(bytes((0x5A, 0x10, 0x0A, 0, 0, 0, 0, 1, 0, 0))).data)
    assert struct.unpack_from(">HxxBxH", ten) == (len(ten) - 2, 0x01, 16)
    assert struct.unpack_from(">Q4xI", ten, 8) == (h.params.blocks, 512)
    assert ten[24] == 0x0A


def _select6(page: bytes, sp: int = 0) -> tuple[bytes, bytes]:
    data = bytes(4) + page
    return bytes((0x15, 0x10 | sp, 0, 0, len(data), 0)), data


def test_mode_select_changes_wce() -> None:
    h = Harness()
    for n in ("I1", "I2"):
        h.run(bytes(6), nexus=n)
    cur = pages_of(bytes(h.run(mode_sense6(0x08, dbd=1), nexus="I1").data), 4)[0x08]
    off = bytearray(cur)
    off[2] &= ~0x04
    assert sense(h.run(*_select6(bytes(off)), nexus="I1")) == GOOD
    assert h.lu.write_cache is False and h.params.write_cache is False
    assert sense(h.run(bytes(6), nexus="I2")) == (UA, 0x2A, 0x01)
    assert sense(h.run(bytes(6), nexus="I1")) == GOOD
    bad = bytearray(cur)
    bad[2] |= 0x01  # RCD is not changeable
    assert sense(h.run(*_select6(bytes(bad)), nexus="I1")) == INVALID_PARAM
    assert sense(h.run(*_select6(bytes(cur), sp=1), nexus="I1")) == INVALID_CDB
    assert sense(h.run(*_select6(b"\x19\x06" + bytes(6)), nexus="I1")) == INVALID_PARAM
    assert sense(h.run(*_select6(bytes(cur[:8])), nexus="I1")) == (0x5, 0x1A, 0x00)
    # MODE SELECT(10) with a block descriptor of the right block size turns WCE back on.
    on = bytearray(cur)
    on[2] |= 0x04
    data = bytes(6) + b"\x00\x08" + bytes(5) + b"\x00\x02\x00" + bytes(on)
    cdb = bytes((0x55, 0x10, 0, 0, 0, 0, 0)) + struct.pack(">HB", len(data), 0)
    assert sense(h.run(cdb, data, nexus="I1")) == GOOD and h.lu.write_cache is True
    wrong_bs = bytes(6) + b"\x00\x08" + bytes(5) + b"\x00\x10\x00" + bytes(on)
    assert sense(h.run(cdb, wrong_bs, nexus="I1")) == INVALID_PARAM


# -- REPORT SUPPORTED OPERATION CODES / RTPG / misc -------------------------------------
def rsoc(option: int, op: int = 0, sa: int = 0, rctd: int = 0, alloc: int = 65535) -> bytes:
    return struct.pack(">BBBBHIBB", 0xA3, 0x0C, (rctd << 7) | option, op, sa, alloc, 0, 0)


def test_report_supported_opcodes() -> None:
    h = Harness()
    data = bytes(h.run(rsoc(0)).data)
    n = struct.unpack_from(">I", data)[0] // 8
    listed = {(data[4 + 8 * i], struct.unpack_from(">H", data, 6 + 8 * i)[0], data[9 + 8 * i] & 1)
              for i in range(n)}
    assert listed == {(s.usage[0], s.sa or 0, int(s.sa is not None)) for s in SPECS}
    data = bytes(h.run(rsoc(0, rctd=1)).data)
    assert struct.unpack_from(">I", data)[0] == 20 * len(SPECS)
    assert all(data[9 + 20 * i] & 0x02 for i in range(len(SPECS)))
    one = bytes(h.run(rsoc(1, 0x89)).data)
    assert one[1] & 0x07 == 3 and one[4] == 0x89 and one[5] & 0x18 == 0x18
    assert struct.unpack_from(">H", one, 2)[0] == 16 == len(one) - 4
    assert sense(h.run(rsoc(1, 0x9E, 0x10))) == INVALID_CDB
    assert sense(h.run(rsoc(2, 0x28))) == INVALID_CDB
    two = bytes(h.run(rsoc(2, 0x9E, 0x10, rctd=1)).data)
    assert two[1] & 0x80 and two[4:6] == b"\x9e\x10" and len(two) == 4 + 16 + 12
    assert bytes(h.run(rsoc(1, 0xEE)).data)[1] & 0x07 == 1
    assert bytes(h.run(rsoc(3, 0x28)).data)[1] & 0x07 == 3
    assert sense(h.run(rsoc(5))) == INVALID_CDB
    thick = Harness(thin=False)
    data = bytes(thick.run(rsoc(0)).data)
    ops = {data[4 + 8 * i] for i in range(struct.unpack_from(">I", data)[0] // 8)}
    assert 0x42 not in ops


def test_report_target_port_groups() -> None:
    h = Harness(port_group=7, relative_port=3)
    res = h.run(struct.pack(">BB4xIBB", 0xA3, 0x0A, 256, 0, 0))
    data = bytes(res.data)
    assert struct.unpack_from(">I", data)[0] == len(data) - 4
    assert data[4] & 0x0F == 0 and struct.unpack_from(">H", data, 6)[0] == 7 and data[11] == 1
    assert struct.unpack_from(">H", data, 14)[0] == 3
    ext = bytes(h.run(struct.pack(">BB4xIBB", 0xA3, 0x2A, 256, 0, 0)).data)
    assert ext[4] == 0x10 and struct.unpack_from(">I", ext)[0] == len(ext) - 4
    assert len(h.run(struct.pack(">BB4xIBB", 0xA3, 0x0A, 4, 0, 0)).data) == 4


def test_misc_commands() -> None:
    h = Harness()
    assert sense(h.run(bytes(6))) == GOOD
    assert sense(h.run(bytes((0x1B, 1, 0, 0, 0x01, 0)))) == GOOD
    assert sense(h.run(bytes((0x1B, 0, 0, 0, 0x02, 0)))) == GOOD
    assert sense(h.run(bytes((0xEE,)) + bytes(15))) == INVALID_OPCODE
    assert sense(h.run(b"")) == INVALID_OPCODE
    assert sense(h.run(bytes((0x9E, 0x1F)) + bytes(14))) == INVALID_CDB
    assert sense(h.run(bytes((0x00, 0, 0, 0, 0, 0x04)))) == INVALID_CDB  # NACA


@pytest.mark.parametrize("err,write,expected", [
    (errno.EIO, False, (0x3, 0x11, 0x00)),
    (errno.EIO, True, (0x3, 0x0C, 0x00)),
    (errno.ENOSPC, True, (0x7, 0x27, 0x07)),
    (errno.EROFS, True, (0x7, 0x27, 0x00)),
    (errno.EAGAIN, False, (0xB, 0x55, 0x03)),
    (errno.ENOTCONN, False, (0x2, 0x04, 0x0C)),
    (errno.EINVAL, False, (0x4, 0x44, 0x00)),
    (None, False, (0x4, 0x44, 0x00)),
])
def test_sense_for_errno(err: int | None, write: bool, expected: tuple[int, int, int]) -> None:
    s = sense_for_errno(err, write).to_bytes()
    assert len(s) == 18 and s[0] == 0x70 and (s[2], s[12], s[13]) == expected


def test_daemon_side_wce_change_raises_ua_for_known_nexuses() -> None:
    h = Harness()
    h.run(bytes(6))
    h.lu.set_write_cache(False)
    assert sense(h.run(rw10(0x2A, 0, 1), bytes(512))) == (UA, 0x2A, 0x01)
