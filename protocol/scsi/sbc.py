"""Block commands (SBC-4).

Handlers validate eagerly and raise ``CheckCondition`` before any I/O; a command that needs
storage returns a generator (``ScsiTask``) that yields ``BlockRequest``s.  READ and WRITE are
the hot path: one ``unpack_from``, a handful of comparisons, no copies (Data-Out slices go
into the request as memoryviews, the READ buffer comes back as the Data-In unchanged).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from ..block import BlockOp, BlockRequest, ExtentState
from .cdb import CAW16, RW6, RW10, RW12, RW16, U16, U32, U64, alloc_cut, data_out, illegal_iu
from .sense import (
    DATA_PROTECT,
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    LBA_OUT_OF_RANGE,
    MISCOMPARE,
    MISCOMPARE_DURING_VERIFY,
    PARAMETER_LIST_LENGTH_ERROR,
    WRITE_PROTECTED,
    CheckCondition,
    illegal,
)
from .spc import MAX_COMPARE_AND_WRITE_BLOCKS, max_transfer_blocks, max_write_same_blocks
from .types import ScsiCommand, ScsiResult, ScsiTask, Status
from .unit import LogicalUnit

if TYPE_CHECKING:
    from .target import ScsiTarget

GOOD = Status.GOOD
READ, WRITE = BlockOp.READ, BlockOp.WRITE
Result = ScsiResult | ScsiTask

FUA = 0x08
PROTECT = 0xE0  # RDPROTECT / WRPROTECT / VRPROTECT / ORPROTECT: no protection information


def _oob() -> CheckCondition:
    return illegal(LBA_OUT_OF_RANGE)


def _write_protected() -> CheckCondition:
    return CheckCondition(DATA_PROTECT, WRITE_PROTECTED)


def _miscompare(offset: int) -> ScsiResult:
    sense = CheckCondition(MISCOMPARE, MISCOMPARE_DURING_VERIFY, info=offset)
    return ScsiResult(Status.CHECK_CONDITION, sense.to_bytes())


def first_difference(a: Any, b: Any) -> int:
    """Offset of the first differing byte of two equal-length buffers, -1 if equal.

    XOR of the two as big integers runs in C; the highest set bit is the first difference.
    """
    if a == b:
        return -1
    x = int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
    return len(a) - 1 - (x.bit_length() - 1) // 8


# -- generators: the only code that runs between yields -----------------------------------
def _read_task(req: BlockRequest) -> ScsiTask:
    buf = yield req
    return ScsiResult(GOOD, None, buf)


def _io_task(req: BlockRequest) -> ScsiTask:
    yield req
    return ScsiResult(GOOD)


def _verify_task(req: BlockRequest, expected: Any) -> ScsiTask:
    buf = yield req
    off = first_difference(buf, expected)
    return ScsiResult(GOOD) if off < 0 else _miscompare(off)


def _orwrite_task(lba: int, n: int, data: Any, fua: bool) -> ScsiTask:
    # Not atomic against a concurrent write to the same blocks (neither is a plain
    # read-modify-write anywhere else); SBC-4 leaves ORWRITE's atomicity to the implementation.
    old = yield BlockRequest(READ, lba, n)
    size = len(data)
    new = (int.from_bytes(old, "big") | int.from_bytes(data, "big")).to_bytes(size, "big")
    yield BlockRequest(WRITE, lba, n, new, fua=fua)
    return ScsiResult(GOOD)


def _caw_task(req: BlockRequest) -> ScsiTask:
    off = yield req
    return ScsiResult(GOOD) if off is None or off < 0 else _miscompare(off)


# -- READ / WRITE -------------------------------------------------------------------------
_PLAIN_FLAGS = frozenset((0, FUA, 0x10, 0x10 | FUA))  # only DPO and FUA may be set


def plain_read_write(lu: LogicalUnit, cdb: Any, nexus: str) -> BlockRequest | None:
    """The BlockRequest of a READ or WRITE (10/16) needing nothing else from the SCSI layer.

    A transport's fast path may execute it directly, bypassing ``ScsiTarget.execute``.  Returns
    None whenever ``execute`` could answer anything but GOOD with exactly this request (a
    pending unit attention, a reservation, a set reserved bit, a range or length problem, a
    read-only LU...): the general path then decides.  A WRITE's ``data`` is left for the
    caller to fill.
    """
    op = cdb[0]
    if op == 0x28 or op == 0x2A:
        _, flags, lba, group, n, control = RW10.unpack_from(cdb)
    elif op == 0x88 or op == 0x8A:
        _, flags, lba, n, group, control = RW16.unpack_from(cdb)
    else:
        return None
    # Any reservation (persistent or SPC-2) sends the command the general way, where
    # ScsiTarget.execute decides whether it conflicts.
    if ((lu.ua and nexus in lu.ua) or lu.pr.active or lu.alua_state > 1
            or flags not in _PLAIN_FLAGS or group
            or control or not n or lba + n > lu.params.blocks or n > max_transfer_blocks(lu)):
        return None
    p = lu.params
    if op & 0x02:
        if p.read_only:
            return None
        return BlockRequest(WRITE, lba, n, None, bool(flags & FUA) or not p.write_cache)
    return BlockRequest(READ, lba, n, None, bool(flags & FUA))


def _read(lu: LogicalUnit, flags: int, lba: int, n: int) -> Result:
    if flags & PROTECT:
        raise illegal(INVALID_FIELD_IN_CDB, 1, 7)
    if lba + n > lu.params.blocks:
        raise _oob()
    if not n:
        return ScsiResult(GOOD)
    if n > max_transfer_blocks(lu):
        raise illegal(INVALID_FIELD_IN_CDB)
    return _read_task(BlockRequest(READ, lba, n, None, bool(flags & FUA)))


def _check_write(lu: LogicalUnit, flags: int, lba: int, n: int) -> bool:
    """The checks every block-writing command shares; False for a zero-length no-op."""
    p = lu.params
    if flags & PROTECT:
        raise illegal(INVALID_FIELD_IN_CDB, 1, 7)
    if p.read_only:
        raise _write_protected()
    if lba + n > p.blocks:
        raise _oob()
    if n > max_transfer_blocks(lu):
        raise illegal(INVALID_FIELD_IN_CDB)
    return n > 0


def _write(lu: LogicalUnit, cmd: ScsiCommand, flags: int, lba: int, n: int) -> Result:
    p = lu.params
    if not _check_write(lu, flags, lba, n):
        return ScsiResult(GOOD)
    # EDTL shorter than the CDB's transfer (an overflow): write the whole blocks that came and
    # let the transport report the residual, as libiscsi's residual tests and LIO expect.
    sent = len(cmd.data_out) if cmd.data_out is not None else 0
    if sent < n * p.block_size:
        n = sent // p.block_size
        if not n:
            return ScsiResult(GOOD)
    data = data_out(cmd, n * p.block_size)
    # With the write cache disabled every write must be stable before GOOD (SBC-4 WCE=0).
    fua = bool(flags & FUA) or not p.write_cache
    return _io_task(BlockRequest(WRITE, lba, n, data, fua))


def read6(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    _, lba, n, _ = RW6.unpack_from(cmd.cdb)
    return _read(lu, 0, int.from_bytes(lba, "big") & 0x1FFFFF, n or 256)


def read10(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    _, flags, lba, _, n, _ = RW10.unpack_from(cmd.cdb)
    return _read(lu, flags, lba, n)


def read12(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    _, flags, lba, n, _, _ = RW12.unpack_from(cmd.cdb)
    return _read(lu, flags, lba, n)


def read16(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    _, flags, lba, n, _, _ = RW16.unpack_from(cmd.cdb)
    return _read(lu, flags, lba, n)


def write6(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    _, lba, n, _ = RW6.unpack_from(cmd.cdb)
    return _write(lu, cmd, 0, int.from_bytes(lba, "big") & 0x1FFFFF, n or 256)


def write10(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    _, flags, lba, _, n, _ = RW10.unpack_from(cmd.cdb)
    return _write(lu, cmd, flags, lba, n)


def write12(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    _, flags, lba, n, _, _ = RW12.unpack_from(cmd.cdb)
    return _write(lu, cmd, flags, lba, n)


def write16(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    _, flags, lba, n, _, _ = RW16.unpack_from(cmd.cdb)
    return _write(lu, cmd, flags, lba, n)


def _decode(cdb: Any) -> tuple[int, int, int]:
    """(flags, lba, length) of a 10/12/16-byte CDB in the READ/WRITE layout."""
    op = cdb[0]
    if op < 0x80:
        _, flags, lba, _, n, _ = RW10.unpack_from(cdb)
    elif op < 0xA0:
        _, flags, lba, n, _, _ = RW16.unpack_from(cdb)
    else:
        _, flags, lba, n, _, _ = RW12.unpack_from(cdb)
    return flags, lba, n


# -- VERIFY / WRITE AND VERIFY / ORWRITE ----------------------------------------------------
def verify(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    flags, lba, n = _decode(cmd.cdb)
    p = lu.params
    if flags & PROTECT:
        raise illegal(INVALID_FIELD_IN_CDB, 1, 7)
    bytchk = (flags >> 1) & 0x03
    if bytchk == 0x02:
        raise illegal(INVALID_FIELD_IN_CDB, 1, 2)
    if lba + n > p.blocks:
        raise _oob()
    if not n:
        return ScsiResult(GOOD)
    if n > max_transfer_blocks(lu):
        raise illegal(INVALID_FIELD_IN_CDB)
    if bytchk == 0:
        # No data to compare: the medium has no separate verification to run (the backend
        # reports read errors on reads), so checking the range is the whole command.
        return ScsiResult(GOOD)
    if bytchk == 0x01:
        expected: Any = data_out(cmd, n * p.block_size)
    else:  # 11b: one block of Data-Out is compared with every block in the range
        expected = bytes(data_out(cmd, p.block_size)) * n
    return _verify_task(BlockRequest(READ, lba, n), expected)


def write_and_verify(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    flags, lba, n = _decode(cmd.cdb)
    if (flags >> 1) & 0x03 > 1:
        raise illegal(INVALID_FIELD_IN_CDB, 1, 2)
    # The verification is of what reached the medium: write through (FUA), then there is
    # nothing to compare that the backend has not already acknowledged.
    return _write(lu, cmd, (flags & PROTECT) | FUA, lba, n)


def orwrite(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    _, flags, lba, n, _, _ = RW16.unpack_from(cmd.cdb)
    p = lu.params
    if not _check_write(lu, flags, lba, n):
        return ScsiResult(GOOD)
    data = data_out(cmd, n * p.block_size)
    return _orwrite_task(lba, n, data, bool(flags & FUA) or not p.write_cache)


# -- COMPARE AND WRITE --------------------------------------------------------------------
def compare_and_write(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    _, flags, lba, _, nlb, _, _ = CAW16.unpack_from(cmd.cdb)
    p = lu.params
    if flags & PROTECT:
        raise illegal(INVALID_FIELD_IN_CDB, 1, 7)
    if p.read_only:
        raise _write_protected()
    if lba + nlb > p.blocks:
        raise _oob()
    if nlb > MAX_COMPARE_AND_WRITE_BLOCKS:
        raise illegal(INVALID_FIELD_IN_CDB, 13)
    if not nlb:
        if cmd.edtl:
            # Data for zero blocks: the initiator meant a length the one-byte field cannot
            # hold (e.g. 256), so the field is what is wrong.
            raise illegal(INVALID_FIELD_IN_CDB, 13)
        return ScsiResult(GOOD)  # SBC-4 5.3: zero blocks is not an error
    need = 2 * nlb * p.block_size
    # The Data-Out is verify data then write data; any other length means initiator and
    # target disagree about the command, so nothing is compared or written.
    if cmd.data_out is None or len(cmd.data_out) != need:
        raise illegal_iu()
    data = data_out(cmd, need)
    fua = bool(flags & FUA) or not p.write_cache
    return _caw_task(BlockRequest(BlockOp.COMPARE_AND_WRITE, lba, nlb, data, fua))


# -- WRITE SAME / UNMAP -------------------------------------------------------------------
def _write_same(lu: LogicalUnit, cmd: ScsiCommand, flags: int, lba: int, n: int,
                len_field: int) -> Result:
    p = lu.params
    if flags & PROTECT:
        raise illegal(INVALID_FIELD_IN_CDB, 1, 7)
    if flags & 0x10:  # ANCHOR: anchored extents are not supported (ANC_SUP=0)
        raise illegal(INVALID_FIELD_IN_CDB, 1, 4)
    if p.read_only:
        raise _write_protected()
    unmap = bool(flags & 0x08)
    if unmap and not p.thin:  # LBPWS/LBPWS10 are clear
        raise illegal(INVALID_FIELD_IN_CDB, 1, 3)
    if lba + n > p.blocks:
        raise _oob()
    if not n:
        n = p.blocks - lba  # WSNZ=0: zero means through the last LBA
    if n > max_write_same_blocks(lu):
        raise illegal(INVALID_FIELD_IN_CDB, len_field)
    ndob = bool(flags & 0x01)
    if ndob:
        pattern: Any = lu.zero_block
    else:
        # Exactly one block of Data-Out; a longer or shorter transfer is refused (no partial
        # pattern can be repeated and a longer one means a confused initiator).
        if cmd.data_out is None or len(cmd.data_out) != p.block_size:
            raise illegal_iu()
        pattern = data_out(cmd, p.block_size)
    if not n:
        return ScsiResult(GOOD)
    fua = not p.write_cache
    if unmap:
        # The UNMAP bit deallocates whatever the pattern: with LBPRZ=1 the blocks then read
        # as zeroes, which is what initiators (and libiscsi's WRITE SAME tests) rely on.
        return _io_task(BlockRequest(BlockOp.UNMAP, lba, n, ranges=((lba, n),)))
    return _io_task(BlockRequest(BlockOp.WRITE_SAME, lba, n, pattern, fua))


def write_same10(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    _, flags, lba, _, n, _ = RW10.unpack_from(cmd.cdb)
    return _write_same(lu, cmd, flags, lba, n, 7)


def write_same16(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    _, flags, lba, n, _, _ = RW16.unpack_from(cmd.cdb)
    return _write_same(lu, cmd, flags, lba, n, 10)


def unmap(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    cdb = cmd.cdb
    p = lu.params
    if cdb[1] & 0x01:  # ANCHOR
        raise illegal(INVALID_FIELD_IN_CDB, 1, 0)
    if p.read_only:
        raise _write_protected()
    plen = U16.unpack_from(cdb, 7)[0]
    if plen == 0:
        return ScsiResult(GOOD)  # SBC-4 5.32: no parameter data, nothing to do
    if plen < 8:
        raise illegal(PARAMETER_LIST_LENGTH_ERROR)
    data = data_out(cmd, plen)
    bdl = U16.unpack_from(data, 2)[0]
    # Descriptors that do not fit the parameter list, and a trailing partial descriptor, are
    # ignored (SBC-4 5.32.2 asks the device server to use whole descriptors only).
    count = min(bdl, plen - 8) // 16
    if count > p.max_unmap_descriptors:
        raise illegal(INVALID_FIELD_IN_PARAMETER_LIST, 2, in_cdb=False)
    ranges: list[tuple[int, int]] = []
    total = 0
    blocks = p.blocks
    for i in range(count):
        off = 8 + 16 * i
        lba = U64.unpack_from(data, off)[0]
        n = U32.unpack_from(data, off + 8)[0]
        if lba + n > blocks:
            raise _oob()
        total += n
        if n:
            ranges.append((lba, n))
    if total > p.max_unmap_blocks:
        raise illegal(INVALID_FIELD_IN_PARAMETER_LIST, 8, in_cdb=False)
    if not ranges:
        return ScsiResult(GOOD)
    return _io_task(BlockRequest(BlockOp.UNMAP, ranges=tuple(ranges)))


# -- PRE-FETCH / SYNCHRONIZE CACHE -------------------------------------------------------
def _range_to_end(lu: LogicalUnit, cmd: ScsiCommand) -> tuple[int, int]:
    _, lba, n = _decode(cmd.cdb)
    blocks = lu.params.blocks
    if lba + n > blocks:
        raise _oob()
    return lba, n or blocks - lba  # zero blocks: through the last LBA


def prefetch(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    lba, n = _range_to_end(lu, cmd)
    # GOOD, not CONDITION MET: the cache is the host's page cache and we cannot promise the
    # range fits; SBC-4 allows GOOD and initiators (libiscsi) expect it.
    if not n:
        return ScsiResult(GOOD)
    return _io_task(BlockRequest(BlockOp.PREFETCH, lba, n))


def synchronize_cache(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    _range_to_end(lu, cmd)
    # IMMED may be honoured by finishing first: GOOD after the flush is always conformant.
    return _io_task(BlockRequest(BlockOp.FLUSH))


# -- READ CAPACITY / GET LBA STATUS ------------------------------------------------------
def read_capacity10(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    if not cdb[8] & 0x01 and U32.unpack_from(cdb, 2)[0]:
        raise illegal(INVALID_FIELD_IN_CDB, 2)  # LBA without PMI (SBC-3 5.16.1)
    p = lu.params
    last = min(max(p.blocks - 1, 0), 0xFFFFFFFF)  # FFFFFFFFh: use READ CAPACITY (16)
    return ScsiResult(GOOD, data=U32.pack(last) + U32.pack(p.block_size))


def read_capacity16(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    alloc = U32.unpack_from(cdb, 10)[0]
    if not cdb[14] & 0x01 and U64.unpack_from(cdb, 2)[0]:
        raise illegal(INVALID_FIELD_IN_CDB, 2)
    p = lu.params
    d = bytearray(32)
    d[0:8] = U64.pack(max(p.blocks - 1, 0))
    d[8:12] = U32.pack(p.block_size)
    # P_TYPE/PROT_EN 0; LBPPBE 0 (one logical block per physical block).
    if p.thin:
        d[14] = 0xC0  # LBPME, LBPRZ: deallocated blocks read as zeroes
    return ScsiResult(GOOD, data=alloc_cut(bytes(d), alloc))


def _lba_status_task(req: BlockRequest, end: int, alloc: int) -> ScsiTask:
    extents = yield req
    room = max((alloc - 8) // 16, 1)  # descriptors worth building for this allocation
    out = bytearray()
    for e in extents:
        lba, last = max(e.lba, req.lba), min(e.lba + e.blocks, end)
        while lba < last and len(out) < 16 * room:
            n = min(last - lba, 0xFFFFFFFF)  # the descriptor's count is 32 bits
            state = 1 if e.state == ExtentState.DEALLOCATED else 0
            out += U64.pack(lba) + U32.pack(n) + bytes((state, 0, 0, 0))
            lba += n
    return ScsiResult(GOOD, data=alloc_cut(U32.pack(len(out) + 4) + bytes(4) + out, alloc))


def get_lba_status(target: ScsiTarget, lu: LogicalUnit, cmd: ScsiCommand) -> Result:
    cdb = cmd.cdb
    lba, alloc = U64.unpack_from(cdb, 2)[0], U32.unpack_from(cdb, 10)[0]
    blocks = lu.params.blocks
    if lba >= blocks:
        raise _oob()
    if cdb[14] & 0x03 not in (0, 1):
        raise illegal(INVALID_FIELD_IN_CDB, 14, 1)  # report type: all, or nonzero-only
    if not alloc:
        return ScsiResult(GOOD)
    return _lba_status_task(BlockRequest(BlockOp.LBA_STATUS, lba, blocks - lba), blocks, alloc)


# -- Data-Out lengths for the transport's residual count ----------------------------------
def data_out_length(op: int, cdb: Any, lu: LogicalUnit) -> int | None:
    """Bytes of Data-Out the CDB describes (SPDTL), None when it is not a Data-Out command."""
    bs = lu.params.block_size
    try:
        if op in (0x0A,):
            return int(cdb[4] or 256) * bs
        if op in (0x2A, 0x2E, 0xAA, 0xAE, 0x8A, 0x8E, 0x8B):
            return _decode(cdb)[2] * bs
        if op in (0x2F, 0xAF, 0x8F):
            flags, _, n = _decode(cdb)
            bytchk = (flags >> 1) & 3
            return 0 if not bytchk else n * bs if bytchk == 1 else bs
        if op == 0x89:
            return 2 * int(cdb[13]) * bs
        if op in (0x41, 0x93):
            return 0 if op == 0x93 and cdb[1] & 0x01 else bs
        if op in (0x42, 0x55):
            return int(U16.unpack_from(cdb, 7)[0])
        if op == 0x15:
            return int(cdb[4])
    except (IndexError, struct.error):
        return None
    return None
