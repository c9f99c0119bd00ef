"""Third-party copy (SPC-4 5.17, 6.4, 6.18): EXTENDED COPY(LID1), RECEIVE COPY RESULTS and the
Third-party Copy VPD page (8Fh).

Theory of operation: the copy manager is this target; its copy targets (CSCDs) are the LUNs of
the same target, named by identification descriptors (E4h) carrying the NAA designator of VPD
83h.  ``extended_copy`` checks the whole parameter list before any I/O (errors there are
ILLEGAL REQUEST), then returns a generator that processes the segment descriptors in order,
each as READ then WRITE ``BlockRequest``s of at most ``CHUNK_BYTES`` addressed to the copy
targets' LUN numbers (``BlockRequest.lun``).  An error while processing segment N (an index
naming no CSCD, an unknown designator, a range past the end, an I/O failure) ends the command
with COPY ABORTED; N is in the COMMAND-SPECIFIC INFORMATION field, and a segment pointer names
the offending field of the parameter list when there is one.

Copy status is kept per (I_T nexus, LUN the command was sent to), keyed by list identifier,
for the LIST ID USAGE values that name one: while the copy runs (00b, 10b: a second command
with the same list ID is refused) and after it ends (00b only, the oldest results dropped past
``MAX_HELD``).  It lives in ``CopyManager``, one per ``ScsiTarget``; a new login of the nexus
(a new session) or its loss discards it.
"""

from __future__ import annotations

import errno
import struct
from collections import OrderedDict
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..block import BlockOp, BlockRequest
from .cdb import U16, U32, alloc_cut, data_out
from .sense import (
    ABORTED_COMMAND,
    INSUFFICIENT_RESOURCES,
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    NO_ADDITIONAL_SENSE,
    NOT_READY,
    PARAMETER_LIST_LENGTH_ERROR,
    WRITE_PROTECTED,
    Asc,
    CheckCondition,
    illegal,
    sense_for_errno,
)
from .types import ScsiCommand, ScsiResult, ScsiTask, Status
from .unit import LogicalUnit

if TYPE_CHECKING:
    from .target import ScsiTarget

GOOD = Status.GOOD
COPY_ABORTED = 0x0A  # sense key

OPERATION_IN_PROGRESS: Asc = (0x00, 0x16)
COPY_TARGET_DEVICE_NOT_REACHABLE: Asc = (0x0D, 0x02)
INCORRECT_COPY_TARGET_DEVICE_TYPE: Asc = (0x0D, 0x03)
COPY_TARGET_DEVICE_DATA_UNDERRUN: Asc = (0x0D, 0x04)
TOO_MANY_TARGET_DESCRIPTORS: Asc = (0x26, 0x06)
UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE: Asc = (0x26, 0x07)
TOO_MANY_SEGMENT_DESCRIPTORS: Asc = (0x26, 0x08)
UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE: Asc = (0x26, 0x09)

# Limits, reported by RECEIVE COPY RESULTS (OPERATING PARAMETERS) and VPD 8Fh.  The descriptor
# list may hold the maximum of either kind plus one of the other (libiscsi's limit tests send
# exactly that and expect TOO MANY ... rather than a length error).
MAX_CSCD = 16
MAX_SEGMENTS = 64
MAX_DESC_LIST = 4096
MAX_SEGMENT_BYTES = 256 << 20  # >= 65535 blocks of 4 KiB: any block→block (02h) segment fits
MAX_CONCURRENT = 16  # copies with a list ID in progress per nexus and LUN
MAX_HELD = 32  # completed copy statuses remembered per nexus and LUN
CHUNK_BYTES = 1 << 20  # one READ + one WRITE each: bounded memory per copy

HEADER = 16  # parameter list header
CSCD_LEN = 32  # identification descriptor (E4h)
SEG_B2B = 0x02  # block device to block device
SEG_B2B_OFFSET = 0x0A  # block device to block device with byte offsets
CSCD_IDENT = 0xE4
_SEG_LENGTHS = {SEG_B2B: 0x18, SEG_B2B_OFFSET: 0x1C}  # DESCRIPTOR LENGTH, after the 4-byte header
_IMPLEMENTED = bytes((SEG_B2B, SEG_B2B_OFFSET, CSCD_IDENT))

# LIST ID USAGE (SPC-4 table 110)
_HOLD, _RESERVED_USAGE, _NO_HOLD, _NO_LIST_ID = 0, 1, 2, 3

# COPY MANAGER STATUS (SPC-4 6.18.2)
IN_PROGRESS, COMPLETED, COMPLETED_WITH_ERRORS = 0x00, 0x01, 0x02

_SEG = struct.Struct(">BBHHH")  # type, flags, descriptor length, source index, destination index


class CopyAborted(CheckCondition):
    """COPY ABORTED sense with the number of the failing segment (SPC-4 6.4.5)."""

    __slots__ = ("segment",)

    def __init__(self, code: Asc, segment: int, field: int | None = None,
                 bit: int | None = None, key: int = COPY_ABORTED) -> None:
        super().__init__(key, code, field=field, bit=bit, in_cdb=False)
        self.segment = segment

    def to_bytes(self, descriptor: bool = False) -> bytes:
        out = super().to_bytes(descriptor)
        if descriptor:
            # Command-specific information descriptor (type 01h), appended.
            extra = struct.pack(">BBHQ", 0x01, 0x0A, 0, self.segment)
            b = bytearray(out + extra)
            b[7] = len(b) - 8
            return bytes(b)
        return out[:8] + U32.pack(self.segment) + out[12:]


@dataclass(slots=True)
class Cscd:
    """A copy target named by an identification descriptor."""

    offset: int  # of the descriptor in the parameter list, for segment pointers
    device_type: int
    designator_type: int  # low 4 bits of the designation descriptor's byte 1 (3 = NAA)
    association: int
    designator: bytes
    block_length: int  # DISK BLOCK LENGTH; 0 = not given


@dataclass(slots=True)
class Segment:
    offset: int  # of the descriptor in the parameter list
    kind: int
    dc: bool
    src: int
    dst: int
    count: int  # blocks (02h) or bytes (0Ah)
    src_lba: int
    dst_lba: int
    src_off: int = 0
    dst_off: int = 0


@dataclass(slots=True)
class CopyState:
    """What RECEIVE COPY RESULTS reports of one list identifier."""

    status: int = IN_PROGRESS
    segments: int = 0  # SEGMENTS PROCESSED
    transferred: int = 0  # bytes written to copy targets
    sense: bytes = b""  # of a failed copy, for FAILED SEGMENT DETAILS
    hold: bool = True


@dataclass(slots=True)
class CopyManager:
    """Copy states per (nexus, LUN) and list ID, bounded (see the module docstring)."""

    lists: dict[tuple[str, int], OrderedDict[int, CopyState]] = field(default_factory=dict)

    def get(self, nexus: str, lun: int, list_id: int) -> CopyState | None:
        held = self.lists.get((nexus, lun))
        return None if held is None else held.get(list_id)

    def begin(self, nexus: str, lun: int, list_id: int, hold: bool) -> CopyState:
        held = self.lists.setdefault((nexus, lun), OrderedDict())
        old = held.get(list_id)
        if old is not None and old.status == IN_PROGRESS:
            raise illegal(OPERATION_IN_PROGRESS, 0, in_cdb=False)
        if sum(1 for s in held.values() if s.status == IN_PROGRESS) >= MAX_CONCURRENT:
            raise illegal(INSUFFICIENT_RESOURCES)
        held.pop(list_id, None)
        state = held[list_id] = CopyState(hold=hold)
        return state

    def end(self, nexus: str, lun: int, list_id: int, state: CopyState) -> None:
        held = self.lists.get((nexus, lun))
        if held is None or held.get(list_id) is not state:
            return  # discarded meanwhile (new session, nexus loss)
        if not state.hold:
            del held[list_id]
        else:
            held.move_to_end(list_id)
            done = [k for k, s in held.items() if s.status != IN_PROGRESS]
            for k in done[: max(0, len(done) - MAX_HELD)]:
                del held[k]
        if not held:
            del self.lists[(nexus, lun)]

    def forget(self, nexus: str) -> None:
        """The nexus is gone or starts over: its copy results are discarded."""
        for key in [k for k in self.lists if k[0] == nexus]:
            del self.lists[key]


# -- EXTENDED COPY: the parameter list ----------------------------------------------------------
def _bad(offset: int, bit: int | None = None) -> CheckCondition:
    return illegal(INVALID_FIELD_IN_PARAMETER_LIST, offset, bit, in_cdb=False)


def _length_error() -> CheckCondition:
    return illegal(PARAMETER_LIST_LENGTH_ERROR)


def parse_parameter_list(p: Any) -> tuple[int, int, list[Cscd], list[Segment]]:
    """(list ID, LIST ID USAGE, CSCDs, segments), or raise the ILLEGAL REQUEST SPC-4 names."""
    n = len(p)
    if n < HEADER:
        raise _length_error()
    list_id, flags = p[0], p[1]
    usage = (flags >> 3) & 3
    if usage == _RESERVED_USAGE:
        raise _bad(1, 4)
    tdl = U16.unpack_from(p, 2)[0]
    sdl, inline = struct.unpack_from(">II", p, 8)
    if tdl + sdl > MAX_DESC_LIST:
        raise _length_error()
    if inline:
        raise _bad(12)  # no segment descriptor type that uses inline data is implemented
    if HEADER + tdl + sdl > n:
        raise _length_error()  # a descriptor is cut off by the parameter list length
    if tdl % CSCD_LEN:
        raise _bad(2)
    if tdl // CSCD_LEN > MAX_CSCD:
        raise illegal(TOO_MANY_TARGET_DESCRIPTORS, 2, in_cdb=False)
    cscds: list[Cscd] = []
    for off in range(HEADER, HEADER + tdl, CSCD_LEN):
        if p[off] != CSCD_IDENT:
            raise illegal(UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE, off, in_cdb=False)
        cscds.append(_parse_cscd(p, off))
    segments: list[Segment] = []
    off, end = HEADER + tdl, HEADER + tdl + sdl
    while off < end:
        if end - off < 4:
            raise _bad(8)  # SEGMENT DESCRIPTOR LIST LENGTH ends inside a descriptor header
        kind, flags, dlen = p[off], p[off + 1], U16.unpack_from(p, off + 2)[0]
        want = _SEG_LENGTHS.get(kind)
        if want is None:
            raise illegal(UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE, off, in_cdb=False)
        if len(segments) == MAX_SEGMENTS:
            raise illegal(TOO_MANY_SEGMENT_DESCRIPTORS, 8, in_cdb=False)
        if dlen != want:
            raise _bad(off + 2)
        if off + 4 + dlen > end:
            raise _bad(8)
        segments.append(_parse_segment(p, off, kind, flags))
        off += 4 + dlen
    return list_id, usage, cscds, segments


def _parse_cscd(p: Any, off: int) -> Cscd:
    # Byte 1: LU ID TYPE and NUL are ignored (SPC-4 made them obsolete; libiscsi expects GOOD
    # with a reserved LU ID TYPE from an SPC-4 target); RELATIVE INITIATOR PORT IDENTIFIER too.
    device_type = p[off + 1] & 0x1F
    d = off + 4  # designation descriptor: code set, PIV/association/type, reserved, length
    dlen = p[d + 3]
    if dlen > 20:
        raise _bad(d + 3)
    block_length = int.from_bytes(p[off + 29 : off + 32], "big") if device_type == 0 else 0
    return Cscd(off, device_type, p[d + 1] & 0x0F, (p[d + 1] >> 4) & 3,
                bytes(p[d + 4 : d + 4 + dlen]), block_length)


def _parse_segment(p: Any, off: int, kind: int, flags: int) -> Segment:
    src, dst = U16.unpack_from(p, off + 4)[0], U16.unpack_from(p, off + 6)[0]
    if kind == SEG_B2B:
        count = U16.unpack_from(p, off + 10)[0]
        src_lba, dst_lba = struct.unpack_from(">QQ", p, off + 12)
        return Segment(off, kind, bool(flags & 0x02), src, dst, count, src_lba, dst_lba)
    count = U32.unpack_from(p, off + 8)[0]
    if count > MAX_SEGMENT_BYTES:
        raise _bad(off + 8)
    src_lba, dst_lba, src_off, dst_off = struct.unpack_from(">QQHH", p, off + 12)
    return Segment(off, kind, False, src, dst, count, src_lba, dst_lba, src_off, dst_off)


# -- EXTENDED COPY: the command -----------------------------------------------------------------
def extended_copy(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult | ScsiTask:
    length = U32.unpack_from(cmd.cdb, 10)[0]
    if length == 0:
        return ScsiResult(GOOD)  # SPC-4 6.4.1: no parameter list, nothing to do
    if length > HEADER + MAX_DESC_LIST:
        raise _length_error()
    list_id, usage, cscds, segments = parse_parameter_list(data_out(cmd, length))
    manager: CopyManager = target.copy_manager
    state: CopyState | None = None
    if usage != _NO_LIST_ID:
        state = manager.begin(cmd.nexus, cmd.lun, list_id, usage == _HOLD)
    return _copy_task(target, cmd, list_id, state, cscds, segments)


def _copy_task(target: ScsiTarget, cmd: ScsiCommand, list_id: int, state: CopyState | None,
               cscds: list[Cscd], segments: list[Segment]) -> ScsiTask:
    st = state if state is not None else CopyState(hold=False)
    result: ScsiResult | None = None
    try:
        for i, seg in enumerate(segments):
            try:
                yield from _segment(target, cmd, cscds, seg, i, st)
            except CheckCondition as e:
                st.sense = e.to_bytes()
                result = ScsiResult(Status.CHECK_CONDITION, st.sense)
                return result
            st.segments = i + 1
        result = ScsiResult(GOOD)
        return result
    finally:
        # Also reached when the task is dropped mid-copy (abort, session gone): the list ID
        # must not stay "in progress" for ever.
        if result is None:
            st.sense = CheckCondition(ABORTED_COMMAND, NO_ADDITIONAL_SENSE).to_bytes()
        st.status = COMPLETED if result is not None and result.status == GOOD else \
            COMPLETED_WITH_ERRORS
        if state is not None:
            target.copy_manager.end(cmd.nexus, cmd.lun, list_id, state)


def _resolve(target: ScsiTarget, cscds: list[Cscd], index: int, seg: Segment, i: int,
             index_field: int) -> tuple[int, LogicalUnit]:
    """The LUN number and LU a segment's CSCD index names, or COPY ABORTED."""
    if index >= len(cscds):
        raise CopyAborted(COPY_TARGET_DEVICE_NOT_REACHABLE, i, seg.offset + index_field)
    c = cscds[index]
    found: tuple[int, LogicalUnit] | None = None
    if c.designator_type == 3 and c.association == 0:  # NAA, associated with the LU
        for n, lu in target.luns.items():
            if bytes(lu.params.naa_id) == c.designator:
                found = (n, lu)
                break
    if found is None:
        raise CopyAborted(COPY_TARGET_DEVICE_NOT_REACHABLE, i, c.offset + 4)
    if c.device_type != 0:
        raise CopyAborted(INCORRECT_COPY_TARGET_DEVICE_TYPE, i, c.offset + 1, 4)
    if c.block_length and c.block_length != found[1].params.block_size:
        # The initiator computed its ranges with another block size than the LU has.
        raise CopyAborted(INCORRECT_COPY_TARGET_DEVICE_TYPE, i, c.offset + 29)
    return found


def _segment(target: ScsiTarget, cmd: ScsiCommand, cscds: list[Cscd], seg: Segment, i: int,
             st: CopyState) -> Generator[BlockRequest, Any, None]:
    src_n, src_lu = _resolve(target, cscds, seg.src, seg, i, 4)
    dst_n, dst_lu = _resolve(target, cscds, seg.dst, seg, i, 6)
    sbs, dbs = src_lu.params.block_size, dst_lu.params.block_size
    if seg.kind == SEG_B2B:
        nbytes = seg.count * (dbs if seg.dc else sbs)
        if nbytes % sbs or nbytes % dbs:
            # Whole blocks of one side are not whole blocks of the other; no residue handling.
            raise CopyAborted(COPY_TARGET_DEVICE_DATA_UNDERRUN, i, seg.offset + 10)
    else:
        nbytes = seg.count
    sp = seg.src_lba * sbs + seg.src_off
    dp = seg.dst_lba * dbs + seg.dst_off
    if sp + nbytes > src_lu.params.blocks * sbs:
        raise CopyAborted(NO_ADDITIONAL_SENSE, i, seg.offset + 12)
    if dp + nbytes > dst_lu.params.blocks * dbs:
        raise CopyAborted(NO_ADDITIONAL_SENSE, i, seg.offset + 20)
    if nbytes and dst_lu.params.read_only:
        raise CopyAborted(WRITE_PROTECTED, i, seg.offset + 6)
    yield from copy_bytes(src_n, sbs, sp, dst_n, dbs, dp, nbytes, st, i)


def _io_failure(e: OSError, is_write: bool, i: int) -> CheckCondition:
    """A copy target's I/O failed.

    A LUN gone from the target is COPY TARGET DEVICE NOT REACHABLE.  Transient and fencing
    errors keep their own sense (ABORTED COMMAND, NOT READY) so the initiator retries the copy
    or fails over like for any other command; the rest are COPY ABORTED with the ASC the
    failing READ or WRITE would have had.
    """
    if e.errno == errno.ENODEV:
        return CopyAborted(COPY_TARGET_DEVICE_NOT_REACHABLE, i)
    cc = sense_for_errno(e.errno, is_write)
    if cc.key in (ABORTED_COMMAND, NOT_READY):
        return cc
    return CopyAborted((cc.asc, cc.ascq), i)


def copy_bytes(src: int, sbs: int, sp: int, dst: int, dbs: int, dp: int, n: int,
               st: CopyState, segment: int) -> Generator[BlockRequest, Any, None]:
    """Copy ``n`` bytes from byte ``sp`` of LUN ``src`` to byte ``dp`` of LUN ``dst``.

    A failed READ or WRITE ends the copy with the ``CheckCondition`` of ``_io_failure``.

    Chunks end on destination block boundaries, so only the first and last may need the
    destination's partial blocks read first (read-modify-write, for byte offsets).  When source
    and destination overlap on one LUN with the destination later, chunks go from the end, as
    memmove does, so no source byte is overwritten before it is read.
    """
    chunks: list[tuple[int, int]] = []
    pos = 0
    while pos < n:
        step = min(n - pos, CHUNK_BYTES - (dp + pos) % dbs)
        chunks.append((pos, step))
        pos += step
    same = src == dst
    if same and sp < dp < sp + n:
        chunks.reverse()
    for pos, step in chunks:
        s0, d0 = sp + pos, dp + pos
        slba = s0 // sbs
        sblocks = -(-(s0 + step) // sbs) - slba
        try:
            buf = yield BlockRequest(BlockOp.READ, slba, sblocks, lun=src)
        except OSError as e:
            raise _io_failure(e, False, segment) from None
        head = s0 - slba * sbs
        view = memoryview(buf)[head : head + step]
        dlba = d0 // dbs
        dblocks = -(-(d0 + step) // dbs) - dlba
        dhead = d0 - dlba * dbs
        out: bytes | bytearray | memoryview
        if dhead or (d0 + step) % dbs:
            try:
                old = yield BlockRequest(BlockOp.READ, dlba, dblocks, lun=dst)
            except OSError as e:
                raise _io_failure(e, False, segment) from None
            out = bytearray(old)
            out[dhead : dhead + step] = view
        elif same and abs(s0 - d0) < step:
            out = bytes(view)  # the read buffer may alias the blocks this write changes
        else:
            out = view
        try:
            yield BlockRequest(BlockOp.WRITE, dlba, dblocks, out, lun=dst)
        except OSError as e:
            raise _io_failure(e, True, segment) from None
        st.transferred += step


# -- RECEIVE COPY RESULTS -------------------------------------------------------------------------
def receive_copy_results(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    sa, list_id = cdb[1] & 0x1F, cdb[2]
    alloc = U32.unpack_from(cdb, 10)[0]
    if sa == 0x03:
        return ScsiResult(GOOD, data=alloc_cut(_operating_parameters(lu), alloc))
    state = target.copy_manager.get(cmd.nexus, cmd.lun, list_id)
    if state is None or (sa != 0x00 and not state.hold):
        raise illegal(INVALID_FIELD_IN_CDB, 2)  # no copy with this list ID (SPC-4 6.18.1)
    if sa == 0x00:
        data = _copy_status(state)
    elif state.status == IN_PROGRESS:
        raise illegal(OPERATION_IN_PROGRESS)
    elif sa == 0x01:
        data = U32.pack(0)  # RECEIVE DATA: no implemented segment type holds data
    else:  # 0x04, FAILED SEGMENT DETAILS
        status = Status.CHECK_CONDITION if state.sense else GOOD
        data = (U32.pack(56 + len(state.sense)) + bytes(52) + bytes((status, 0))
                + U16.pack(len(state.sense)) + state.sense)
    return ScsiResult(GOOD, data=alloc_cut(data, alloc))


def _copy_status(st: CopyState) -> bytes:
    count, units = st.transferred, 0
    while count > 0xFFFFFFFF:  # TRANSFER COUNT UNITS: bytes, KiB, MiB, GiB ... (SPC-4 t. 367)
        count = -(-count // 1024)
        units += 1
    return (U32.pack(8) + bytes((st.status,)) + U16.pack(min(st.segments, 0xFFFF))
            + bytes((units,)) + U32.pack(count))


def _log2(n: int) -> int:
    return n.bit_length() - 1


def _operating_parameters(lu: LogicalUnit) -> bytes:
    g = _log2(lu.params.block_size)
    d = bytearray(44)
    d[4] = 0x01  # SNLID: LIST ID USAGE 11b (no list identifier) is supported
    struct.pack_into(">HHIIIII", d, 8, MAX_CSCD, MAX_SEGMENTS, MAX_DESC_LIST,
                     MAX_SEGMENT_BYTES, 0, 0, 0)  # inline data, held data, stream: none
    struct.pack_into(">HBBBB", d, 34, MAX_CONCURRENT, MAX_CONCURRENT, g, g, g)
    d[43] = len(_IMPLEMENTED)
    d += _IMPLEMENTED
    d[0:4] = U32.pack(len(d) - 4)
    return bytes(d)


# -- VPD page 8Fh: Third-party Copy ---------------------------------------------------------------
def _tpc_descriptor(kind: int, body: bytes) -> bytes:
    body += bytes(-(len(body) + 4) % 4)  # descriptors are a multiple of four bytes long
    return U16.pack(kind) + U16.pack(len(body)) + body


def vpd_third_party_copy(lu: LogicalUnit) -> bytes:
    """The page's descriptors (without the 4-byte page header), for SPC-4 LID1 copies."""
    commands = bytes((0x83, 1, 0x00)) + bytes((0x84, 4, 0x00, 0x01, 0x03, 0x04))
    g = _log2(lu.params.block_size)
    return b"".join((
        # Supported Commands: EXTENDED COPY(LID1); RECEIVE COPY RESULTS' LID1 service actions.
        _tpc_descriptor(0x0001, bytes((len(commands),)) + commands),
        # Parameter Data.
        _tpc_descriptor(0x0004, bytes(4) + struct.pack(">HHII", MAX_CSCD, MAX_SEGMENTS,
                                                     MAX_DESC_LIST, 0) + bytes(12)),
        # Supported Descriptors.
        _tpc_descriptor(0x0008, bytes((len(_IMPLEMENTED),)) + _IMPLEMENTED),
        # General Copy Operations.
        _tpc_descriptor(0x8001, struct.pack(">IIIBB", MAX_CONCURRENT, MAX_CONCURRENT,
                                            MAX_SEGMENT_BYTES, g, g) + bytes(18)),
    ))

