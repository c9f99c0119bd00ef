"""Mode pages (SPC-5 7.5, SBC-4 6.5): caching, control, informational exceptions.

Only WCE in the caching page is changeable; it is the LU's write-cache mode.  Nothing is
savable, so PC=11b (saved values) and SP=1 are refused.
"""

from __future__ import annotations

from collections.abc import Callable

from .sense import (
    ILLEGAL_REQUEST,
    INVALID_FIELD_IN_CDB,
    PARAMETER_LIST_LENGTH_ERROR,
    SAVING_PARAMETERS_NOT_SUPPORTED,
    CheckCondition,
    bad_param,
    illegal,
)
from .unit import LogicalUnit

PC_CURRENT, PC_CHANGEABLE, PC_DEFAULT, PC_SAVED = range(4)

CACHING = 0x08
CONTROL = 0x0A
INFO_EXCEPTIONS = 0x1C
ALL_PAGES = 0x3F

WP = 0x80  # device-specific parameter: write protected
DPOFUA = 0x10  # device-specific parameter: DPO and FUA are supported


def _caching(lu: LogicalUnit, pc: int) -> bytes:
    page = bytearray(20)
    page[0], page[1] = CACHING, 18
    if pc == PC_CHANGEABLE:
        page[2] = 0x04
    else:
        wce = lu.write_cache if pc == PC_CURRENT else lu._default_wce
        page[2] = 0x04 if wce else 0x00  # WCE; RCD=0: reads may be served from cache
    return bytes(page)


def _control(lu: LogicalUnit, pc: int) -> bytes:
    page = bytearray(12)
    page[0], page[1] = CONTROL, 10
    if pc == PC_CHANGEABLE:
        return bytes(page)
    # TST=000b one task set; D_SENSE=0 fixed sense; GLTSD=1 (no log pages to save).
    page[2] = 0x02
    page[3] = 0x10  # QUEUE ALGORITHM MODIFIER=1: unrestricted reordering; QERR=00b
    page[4] = 0x08 if lu.params.read_only else 0x00  # SWP mirrors the LU's write protection
    page[5] = 0x40  # TAS: aborted tasks of other nexuses end with TASK ABORTED
    page[8:10] = b"\xff\xff"  # BUSY TIMEOUT PERIOD: unlimited
    return bytes(page)


def _info_exceptions(lu: LogicalUnit, pc: int) -> bytes:
    page = bytearray(12)
    page[0], page[1] = INFO_EXCEPTIONS, 10
    return bytes(page)  # no failure prediction: MRIE=0, everything zero


PAGES: dict[int, Callable[[LogicalUnit, int], bytes]] = {
    CACHING: _caching,
    CONTROL: _control,
    INFO_EXCEPTIONS: _info_exceptions,
}


def mode_sense(lu: LogicalUnit, cdb: bytes, ten: bool) -> bytes:
    """Build MODE SENSE(6)/(10) parameter data (not yet cut to the allocation length)."""
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pc, code, sub = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    if pc == PC_SAVED:
        raise CheckCondition(ILLEGAL_REQUEST, SAVING_PARAMETERS_NOT_SUPPORTED, field=2, bit=7)
    if code == ALL_PAGES:
        if sub not in (0x00, 0xFF):
            raise illegal(INVALID_FIELD_IN_CDB, 3)
        body = b"".join(build(lu, pc) for _, build in sorted(PAGES.items()))
    else:
        build = PAGES.get(code)
        if build is None:
            raise illegal(INVALID_FIELD_IN_CDB, 2, 5)
        if sub != 0x00:
            raise illegal(INVALID_FIELD_IN_CDB, 3)
        body = build(lu, pc)
    p = lu.params
    blockdesc = b""
    if not dbd:
        if llbaa:
            blockdesc = p.blocks.to_bytes(8, "big") + bytes(4) + p.block_size.to_bytes(4, "big")
        else:
            blockdesc = (min(p.blocks, 0xFFFFFFFF).to_bytes(4, "big") + b"\x00"
                         + p.block_size.to_bytes(3, "big"))
        if pc == PC_CHANGEABLE:
            blockdesc = bytes(len(blockdesc))
    dsp = DPOFUA | (WP if p.read_only else 0)
    if ten:
        total = 8 + len(blockdesc) + len(body)
        hdr = ((total - 2).to_bytes(2, "big") + bytes((0, dsp, 0x01 if llbaa else 0, 0))
               + len(blockdesc).to_bytes(2, "big"))
    else:
        total = 4 + len(blockdesc) + len(body)
        hdr = bytes((min(total - 1, 0xFF), 0, dsp, len(blockdesc)))
    return hdr + blockdesc + body


def mode_select(lu: LogicalUnit, cdb: bytes, data: bytes | bytearray | memoryview, ten: bool,
                nexus: str) -> None:
    """Apply MODE SELECT(6)/(10) parameter data; only WCE may change."""
    if cdb[1] & 0x01:  # SP: we cannot save pages
        raise illegal(INVALID_FIELD_IN_CDB, 1, 0)
    hlen = 8 if ten else 4
    if len(data) < hlen:
        raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
    bdl = int.from_bytes(data[6:8], "big") if ten else data[3]
    pos = hlen
    if bdl:
        long_lba = ten and bool(data[4] & 0x01)
        dlen = 16 if long_lba else 8
        if bdl != dlen:
            raise bad_param(6 if ten else 3)
        if len(data) < pos + bdl:
            raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        bsize = int.from_bytes(data[pos + dlen - 3 : pos + dlen], "big")
        if bsize != lu.params.block_size:  # the block size is not changeable
            raise bad_param(pos + dlen - 3)
        pos += bdl
    new_wce = lu.write_cache
    while pos < len(data):
        if len(data) < pos + 2:
            raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        code = data[pos] & 0x7F  # PS is reserved in MODE SELECT: ignore it
        if code & 0x40:  # SPF: no subpages
            raise bad_param(pos, 6)
        build = PAGES.get(code)
        if build is None:
            raise bad_param(pos, 5)
        current, changeable = build(lu, PC_CURRENT), build(lu, PC_CHANGEABLE)
        if data[pos + 1] != current[1]:
            raise bad_param(pos + 1)
        end = pos + 2 + current[1]
        if len(data) < end:
            raise CheckCondition(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        for i in range(2, len(current)):
            if (data[pos + i] ^ current[i]) & ~changeable[i]:
                raise bad_param(pos + i)
        if code == CACHING:
            new_wce = bool(data[pos + 2] & 0x04)
        pos = end
    # Validate everything first, then change: a refused MODE SELECT changes nothing.
    lu.set_write_cache(new_wce, nexus)
