"""Primary commands (SPC-5): INQUIRY and VPD pages, REPORT LUNS, REQUEST SENSE, MODE SENSE /
SELECT, TEST UNIT READY, START STOP UNIT, REPORT SUPPORTED OPERATION CODES, REPORT TARGET
PORT GROUPS.

Handlers take ``(target, lu, cmd)`` and return a ``ScsiResult`` or raise ``CheckCondition``.
``lu`` is None only for the commands the table marks ``no_lu``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from . import modepages
from .cdb import U16, U32, alloc_cut, data_out, no_lu
from .sense import (
    ILLEGAL_REQUEST,
    INVALID_FIELD_IN_CDB,
    LU_NOT_SUPPORTED,
    NO_ADDITIONAL_SENSE,
    NO_SENSE,
    UNIT_ATTENTION,
    CheckCondition,
    illegal,
)
from .types import ScsiCommand, ScsiResult, Status
from .unit import LogicalUnit
from .xcopy import vpd_third_party_copy

if TYPE_CHECKING:
    from .cdb import OpSpec
    from .target import ScsiTarget

GOOD = Status.GOOD

# Version descriptors (SPC-5 table 147): SAM-5, SPC-5, SBC-4, iSCSI, and SBC-3 because some
# initiators and test suites (libiscsi) only enable SBC-3 features when it is claimed.
_VERSION_DESCRIPTORS = (0x00A0, 0x05C0, 0x0600, 0x04C0, 0x0960)
_VPD_PAGES = (0x00, 0x80, 0x83, 0x8F, 0xB0, 0xB1, 0xB2)
MAX_COMPARE_AND_WRITE_BLOCKS = 64  # VPD B0; keeps the atomic compare region small


def _ascii(s: str, n: int) -> bytes:
    return s.encode("ascii", "replace")[:n].ljust(n, b" ")


def max_transfer_blocks(lu: LogicalUnit) -> int:
    p = lu.params
    return p.max_transfer_blocks or (8 << 20) // p.block_size


def max_write_same_blocks(lu: LogicalUnit) -> int:
    """MAXIMUM WRITE SAME LENGTH, advertised and enforced.

    At most FFFFh, the largest count WRITE SAME(10) can carry (LIO advertises the same): an
    initiator that sizes a WRITE SAME(10) from the VPD value must not see its count wrap, and
    libiscsi's WRITE SAME(10) limit tests assume this.
    """
    return min(lu.params.max_write_same_blocks, 0xFFFF)


def test_unit_ready(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return ScsiResult(GOOD)


def start_stop_unit(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    # Not removable and always spinning: every power condition and START value is accepted;
    # LOEJ has nothing to eject.
    return ScsiResult(GOOD)


# -- INQUIRY ----------------------------------------------------------------------------
def _standard_inquiry(lu: LogicalUnit | None) -> bytes:
    d = bytearray(96)
    if lu is None:
        d[0] = 0x7F  # qualifier 011b, type 1Fh: no logical unit here
        p = None
    else:
        p = lu.params
    d[2] = 0x06  # SPC-4: libiscsi's INQUIRY test refuses 0x07 (SPC-5) as a version
    d[3] = 0x12  # HISUP, response data format 2
    d[4] = len(d) - 5
    d[5] = 0x18  # TPGS=01b: implicit ALUA only; 3PC: EXTENDED COPY is supported
    d[6] = 0x10  # MULTIP: the LU is reachable through ports on several nodes
    d[7] = 0x02  # CMDQUE
    if p is not None:
        d[8:16] = _ascii(p.vendor, 8)
        d[16:32] = _ascii(p.product, 16)
        d[32:36] = _ascii(p.revision, 4)
    else:
        d[8:36] = b" " * 28
    for i, v in enumerate(_VERSION_DESCRIPTORS):
        d[58 + 2 * i : 60 + 2 * i] = U16.pack(v)
    return bytes(d)


def _designator(proto_codeset: int, piv_assoc_type: int, value: bytes) -> bytes:
    return bytes((proto_codeset, piv_assoc_type, 0, len(value))) + value


def relative_port(lu: LogicalUnit, nexus: str) -> int:
    """The relative target port a nexus uses: its target portal group tag, the last field of
    "<initiator>,i,0x<isid>,<target>,t,0x<tpgt>" (each portal group is one target port)."""
    head, sep, tag = nexus.rpartition(",t,0x")
    if sep:
        try:
            return int(tag, 16) & 0xFFFF
        except ValueError:
            pass
    return lu.params.relative_port


def _vpd_device_id(lu: LogicalUnit, nexus: str = "") -> bytes:
    p = lu.params
    port = relative_port(lu, nexus)
    out = [
        _designator(0x01, 0x03, bytes(p.naa_id)),  # binary, LU, NAA
        _designator(0x02, 0x01, _ascii(p.vendor, 8) + p.serial.encode("ascii", "replace")),
        # iSCSI protocol identifier (5) with PIV, associated with the target port.
        _designator(0x51, 0x94, U32.pack(port)),  # relative target port
        _designator(0x51, 0x95, U32.pack(p.port_group & 0xFFFF)),  # target port group
    ]
    if p.target_name:
        name = p.target_name.encode("utf-8") + b"\x00"
        name += bytes(-len(name) % 4)
        out.append(_designator(0x53, 0xA8, name[:252]))  # UTF-8, target device, SCSI name
    return b"".join(out)


def _vpd_block_limits(lu: LogicalUnit) -> bytes:
    p = lu.params
    d = bytearray(64)
    mtl = max_transfer_blocks(lu)
    # WSNZ=0: WRITE SAME with NUMBER OF BLOCKS 0 means "to the end of the medium".
    d[5] = MAX_COMPARE_AND_WRITE_BLOCKS
    d[6:8] = U16.pack(1)  # optimal transfer length granularity
    d[8:12] = U32.pack(mtl)
    d[12:16] = U32.pack(mtl)  # optimal transfer length
    d[16:20] = U32.pack(mtl)  # maximum prefetch length
    if p.thin:
        d[20:24] = U32.pack(p.max_unmap_blocks)
        d[24:28] = U32.pack(p.max_unmap_descriptors)
        d[28:32] = U32.pack(1)  # optimal unmap granularity
    d[36:44] = max_write_same_blocks(lu).to_bytes(8, "big")
    return bytes(d)


def _vpd_characteristics(lu: LogicalUnit) -> bytes:
    d = bytearray(64)
    d[4:6] = U16.pack(0x0001)  # non-rotating medium
    return bytes(d)


def _vpd_provisioning(lu: LogicalUnit) -> bytes:
    d = bytearray(8)
    if lu.params.thin:
        d[5] = 0x80 | 0x40 | 0x20 | 0x04  # LBPU, LBPWS, LBPWS10, LBPRZ=001b
        d[6] = 0x02  # provisioning type: thin
    return bytes(d)


def _vpd_serial(lu: LogicalUnit) -> bytes:
    return lu.params.serial.encode("ascii", "replace")[:251]


def _vpd_supported(lu: LogicalUnit) -> bytes:
    return bytes(_VPD_PAGES)


_VPD_BUILDERS: dict[int, Callable[[LogicalUnit], bytes]] = {
    0x80: _vpd_serial,
    0x83: _vpd_device_id,
    0x8F: vpd_third_party_copy,
    0xB0: _vpd_block_limits,
    0xB1: _vpd_characteristics,
    0xB2: _vpd_provisioning,
    0x00: _vpd_supported,
}


def inquiry(target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    evpd, page = cdb[1] & 0x01, cdb[2]
    alloc = U16.unpack_from(cdb, 3)[0]
    if not evpd:
        if page:
            raise illegal(INVALID_FIELD_IN_CDB, 2)
        return ScsiResult(GOOD, data=alloc_cut(_standard_inquiry(lu), alloc))
    if lu is None:
        raise no_lu()
    build = _VPD_BUILDERS.get(page)
    if build is None:
        raise illegal(INVALID_FIELD_IN_CDB, 2)
    body = _vpd_device_id(lu, cmd.nexus) if page == 0x83 else build(lu)
    if page in (0xB0, 0xB1, 0xB2):
        body = body[4:]  # the builders above lay the page out with its 4-byte header
    data = bytes((0, page)) + U16.pack(len(body)) + body
    return ScsiResult(GOOD, data=alloc_cut(data, alloc))


# -- REPORT LUNS / REQUEST SENSE --------------------------------------------------------
def _lun_bytes(n: int) -> bytes:
    if n < 256:
        return bytes((0, n)) + bytes(6)  # peripheral device addressing, single level
    return bytes((0x40 | (n >> 8) & 0x3F, n & 0xFF)) + bytes(6)  # flat space addressing


def report_luns(target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    select, alloc = cdb[2], U32.unpack_from(cdb, 6)[0]
    if alloc < 16:
        raise illegal(INVALID_FIELD_IN_CDB, 6)
    if select in (0x00, 0x02):
        luns = sorted(target.luns)
    elif select == 0x01:
        luns = []  # no well-known logical units
    else:
        raise illegal(INVALID_FIELD_IN_CDB, 2)
    body = b"".join(_lun_bytes(n) for n in luns)
    # SPC-5 6.33: REPORT LUNS clears this nexus' REPORTED LUNS DATA HAS CHANGED on every LU.
    target.clear_reported_luns_ua(cmd.nexus)
    return ScsiResult(GOOD, data=alloc_cut(U32.pack(len(body)) + bytes(4) + body, alloc))


def request_sense(target: ScsiTarget, lu: LogicalUnit | None, cmd: ScsiCommand) -> ScsiResult:
    desc, alloc = bool(cmd.cdb[1] & 0x01), cmd.cdb[4]
    if lu is None:
        sense = CheckCondition(ILLEGAL_REQUEST, LU_NOT_SUPPORTED)
    else:
        ua = lu.pop_ua(cmd.nexus)  # SPC-5 5.14: REQUEST SENSE reports and clears one UA
        sense = CheckCondition(UNIT_ATTENTION if ua else NO_SENSE, ua or NO_ADDITIONAL_SENSE)
    return ScsiResult(GOOD, data=alloc_cut(sense.to_bytes(desc), alloc))


# -- MODE SENSE / MODE SELECT -----------------------------------------------------------
def mode_sense6(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = bytes(cmd.cdb[:6])
    return ScsiResult(GOOD, data=alloc_cut(modepages.mode_sense(lu, cdb, False), cdb[4]))


def mode_sense10(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = bytes(cmd.cdb[:10])
    alloc = U16.unpack_from(cdb, 7)[0]
    return ScsiResult(GOOD, data=alloc_cut(modepages.mode_sense(lu, cdb, True), alloc))


def _mode_select(lu: LogicalUnit, cmd: ScsiCommand, length: int, ten: bool) -> ScsiResult:
    if length:
        modepages.mode_select(lu, bytes(cmd.cdb[:10]), data_out(cmd, length), ten, cmd.nexus)
    elif cmd.cdb[1] & 0x01:
        raise illegal(INVALID_FIELD_IN_CDB, 1, 0)
    return ScsiResult(GOOD)


def mode_select6(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return _mode_select(lu, cmd, cmd.cdb[4], False)


def mode_select10(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return _mode_select(lu, cmd, U16.unpack_from(cmd.cdb, 7)[0], True)


# -- REPORT SUPPORTED OPERATION CODES ---------------------------------------------------
def _timeouts(spec: OpSpec) -> bytes:
    # Command timeouts descriptor (SPC-5 6.35.4): length 0Ah, nominal and recommended seconds.
    return U16.pack(0x0A) + bytes(2) + U32.pack(0) + U32.pack(spec.timeout)


def report_supported_opcodes(target: ScsiTarget, lu: LogicalUnit,
                             cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    rctd, option = bool(cdb[2] & 0x80), cdb[2] & 0x07
    opcode, sa = cdb[3], U16.unpack_from(cdb, 4)[0]
    alloc = U32.unpack_from(cdb, 6)[0]
    specs = target.supported(lu)
    if option == 0:
        out = bytearray()
        for s in specs:
            flags = (0x02 if rctd else 0) | (0x01 if s.sa is not None else 0)
            out += bytes((s.usage[0], 0)) + U16.pack(s.sa or 0) + bytes((0, flags))
            out += U16.pack(s.length)
            if rctd:
                out += _timeouts(s)
        data = U32.pack(len(out)) + bytes(out)
        return ScsiResult(GOOD, data=alloc_cut(data, alloc))
    if option not in (1, 2, 3):
        raise illegal(INVALID_FIELD_IN_CDB, 2, 2)
    with_sa = {s.usage[0] for s in specs if s.sa is not None}
    if option == 1 and opcode in with_sa:
        raise illegal(INVALID_FIELD_IN_CDB, 3)
    if option == 2 and opcode not in with_sa:
        raise illegal(INVALID_FIELD_IN_CDB, 3)
    if opcode in with_sa:
        match = [s for s in specs if s.usage[0] == opcode and s.sa == sa]
    else:
        # Reporting option 011b with an opcode that has no service actions: the requested
        # service action must be zero for the command to count as supported.
        match = [s for s in specs if s.usage[0] == opcode and (option == 1 or sa == 0)]
    if not match:
        data = bytes((0, 0x01, 0, 0))  # SUPPORT=001b: not supported
    else:
        s = match[0]
        data = bytes((0, (0x80 if rctd else 0) | 0x03)) + U16.pack(s.length) + s.usage
        if rctd:
            data += _timeouts(s)
    return ScsiResult(GOOD, data=alloc_cut(data, alloc))


def report_target_port_groups(target: ScsiTarget, lu: LogicalUnit,
                              cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    fmt, alloc = cdb[1] >> 5, U32.unpack_from(cdb, 6)[0]
    if fmt not in (0, 1):
        raise illegal(INVALID_FIELD_IN_CDB, 1, 7)
    p = lu.params
    # One group per node; this node reports the group it is.  Supported states: transitioning,
    # unavailable, standby, active/non-optimized, active/optimized (T|U|S|AN|AO_SUP).
    ports = p.relative_ports or (p.relative_port,)
    # PREF stays clear: Linux multipath ranks a preferred group above a better state.
    desc = bytes((lu.alua_state, 0x8F)) + U16.pack(p.port_group & 0xFFFF)
    desc += bytes((0, 0, 0, len(ports)))
    for port in ports:
        desc += bytes(2) + U16.pack(port & 0xFFFF)
    if fmt == 1:
        data = U32.pack(len(desc) + 4) + bytes((0x10, 0, 0, 0)) + desc
    else:
        data = U32.pack(len(desc)) + desc
    return ScsiResult(GOOD, data=alloc_cut(data, alloc))
