"""CDB decoding: precompiled structs, the command table's entry type, generic CDB checks."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .sense import (
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_INFORMATION_UNIT,
    LU_NOT_SUPPORTED,
    CheckCondition,
    illegal,
)

if TYPE_CHECKING:
    from .types import ScsiCommand

# Layouts of the common CDB shapes (big-endian; names per SBC-4).  ``unpack_from`` on the
# CDB memoryview decodes a READ/WRITE in one call.
RW6 = struct.Struct(">B3sBB")  # opcode, lba21 (3 bytes incl. reserved bits), length, control
RW10 = struct.Struct(">BBIBHB")  # opcode, flags, lba, group, length, control
RW12 = struct.Struct(">BBIIBB")  # opcode, flags, lba, length, group, control
RW16 = struct.Struct(">BBQIBB")  # opcode, flags, lba, length, group, control
CAW16 = struct.Struct(">BBQ3sBBB")  # opcode, flags, lba, reserved, nlb, group, control
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

# CONTROL byte: NACA (bit 2) is not supported (SAM-5 5.9: NACA=1 without support is INVALID
# FIELD IN CDB); LINK (bit 0) is obsolete and rejected the same way.
CONTROL_REJECT = 0x05

Handler = Callable[..., Any]


@dataclass(slots=True)
class OpSpec:
    """One row of the command table.

    ``usage`` is the CDB USAGE DATA of REPORT SUPPORTED OPERATION CODES (SPC-5 6.35.3): the
    opcode, then for each byte the bits this device server evaluates, with the service action
    value in place.  Bits outside it (``allowed``) are reserved: a CDB with one set gets INVALID
    FIELD IN CDB with a pointer to it, so reserved-bit checking and the reported usage data can
    never disagree.
    """

    name: str
    handler: Handler
    usage: bytes
    sa: int | None = None
    no_lu: bool = False  # also answered for a LUN that does not exist
    ua_exempt: bool = False  # INQUIRY, REPORT LUNS, REQUEST SENSE (SPC-5 5.14)
    thin_only: bool = False  # exists only when the LU supports logical block provisioning
    # Reservation conflict class (see protocol/scsi/pr.py): "a" never conflicts, "A" only
    # with another nexus' RESERVE(6), "R" read, "W" write (the default, SPC-5's "C C A C C"),
    # "S" START STOP UNIT, "P" PERSISTENT RESERVE IN/OUT, "L" RESERVE/RELEASE.
    pr: str = "W"
    timeout: int = 30  # recommended command timeout, seconds (RCTD)
    length: int = field(init=False)
    reserved: int = field(init=False)  # mask of reserved bits over CDB bytes 1 .. length-2

    def __post_init__(self) -> None:
        self.length = len(self.usage)
        allowed = bytearray(self.usage[1:-1])
        if self.sa is not None:
            allowed[0] |= 0x1F
        self.reserved = ~int.from_bytes(allowed, "big") & ((1 << (8 * len(allowed))) - 1)


def check_cdb(spec: OpSpec, cdb: Any) -> None:
    """Length, reserved bits and CONTROL byte of a CDB against its table row."""
    n = spec.length
    if len(cdb) < n:
        raise illegal(INVALID_FIELD_IN_CDB, 0)
    if cdb[n - 1] & CONTROL_REJECT:
        raise illegal(INVALID_FIELD_IN_CDB, n - 1, 2 if cdb[n - 1] & 0x04 else 0)
    bad = int.from_bytes(cdb[1 : n - 1], "big") & spec.reserved
    if bad:
        # Point at the first (most significant) offending bit.
        pos = bad.bit_length() - 1
        byte = n - 2 - pos // 8
        raise illegal(INVALID_FIELD_IN_CDB, byte, pos % 8)


def alloc_cut(data: bytes | bytearray, alloc: int) -> bytes | bytearray:
    """Data-In cut to the allocation length (SPC-5 4.2.5.6: never an error)."""
    return data if len(data) <= alloc else data[:alloc]


def data_out(cmd: ScsiCommand, need: int) -> bytes | bytearray | memoryview:
    """The first ``need`` bytes the initiator sent.

    Policy for a Data-Out shorter than the CDB asks for (EDTL < SPDTL, an overflow): a block
    device cannot apply part of a block, and FCP-4/SAM-5 allow refusing the command, so it
    ends with ILLEGAL REQUEST, INVALID FIELD IN INFORMATION UNIT and nothing is written
    (libiscsi's residual tests accept exactly this or a truncated write).  A longer Data-Out
    (underflow) is used up to the CDB's length; the transport reports the residual.
    """
    d = cmd.data_out
    if d is None or len(d) < need:
        raise illegal_iu()
    if len(d) == need:
        return d  # the common case: the buffer itself, no view, no copy
    return (d if isinstance(d, memoryview) else memoryview(d))[:need]


def illegal_iu() -> CheckCondition:
    return illegal(INVALID_FIELD_IN_INFORMATION_UNIT)


def no_lu() -> CheckCondition:
    return illegal(LU_NOT_SUPPORTED)
