"""iSCSI PDUs (RFC 7143 §11): decode what initiators send, encode what the target sends.

Every PDU starts with a 48-byte Basic Header Segment.  One precompiled ``struct.Struct`` reads
it as four bytes, the length word, the 8-byte LUN/ISID field, the ITT and the seven words of
bytes 20..47; each opcode then names the words it uses.  Decoders raise ``PduError`` carrying the
Reject reason to answer with; nothing here touches a socket.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

BHS_LEN = 48
_BHS = struct.Struct(">BBBBIQI7I")
_U32 = struct.Struct(">I")
RESERVED_TAG = 0xFFFFFFFF


class Op(enum.IntEnum):
    NOP_OUT = 0x00
    SCSI_CMD = 0x01
    TASK_MGMT_REQ = 0x02
    LOGIN_REQ = 0x03
    TEXT_REQ = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQ = 0x06
    SNACK = 0x10
    NOP_IN = 0x20
    SCSI_RSP = 0x21
    TASK_MGMT_RSP = 0x22
    LOGIN_RSP = 0x23
    TEXT_RSP = 0x24
    DATA_IN = 0x25
    LOGOUT_RSP = 0x26
    R2T = 0x31
    ASYNC_MSG = 0x32
    REJECT = 0x3F


INITIATOR_OPS = frozenset(
    {Op.NOP_OUT, Op.SCSI_CMD, Op.TASK_MGMT_REQ, Op.LOGIN_REQ, Op.TEXT_REQ, Op.DATA_OUT,
     Op.LOGOUT_REQ, Op.SNACK}
)


class RejectReason(enum.IntEnum):
    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    DEPRECATED = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


class PduError(Exception):
    """A PDU the target must answer with a Reject (or, when ``fatal``, by dropping the link)."""

    def __init__(self, reason: RejectReason, message: str, header: bytes = b"",
                 fatal: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.header = header
        self.fatal = fatal


class TmfFunction(enum.IntEnum):
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(enum.IntEnum):
    COMPLETE = 0
    NO_TASK = 1
    NO_LUN = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGN_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


class LogoutReason(enum.IntEnum):
    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_FOR_RECOVERY = 2


# ---------------------------------------------------------------------------------------------
# LUN field (SAM-5 single-level addressing, the form every initiator we meet uses)

def decode_lun(field: int) -> int:
    """Return the LUN number of an 8-byte LUN field, or -1 for a form we do not address."""
    first = field >> 48
    method = first >> 14
    if method == 0 and (first >> 8) & 0x3F == 0 and field & 0xFFFFFFFFFFFF == 0:
        return first & 0xFF
    if method == 1 and field & 0xFFFFFFFFFFFF == 0:  # flat space addressing
        return first & 0x3FFF
    return -1


def encode_lun(number: int) -> int:
    if number < 256:
        return number << 48
    return (0x4000 | number) << 48


# ---------------------------------------------------------------------------------------------
# PDUs the initiator sends.  ``data`` is the data segment without padding or digest.

@dataclass(slots=True)
class NopOut:
    immediate: bool
    lun: int
    itt: int
    ttt: int
    cmdsn: int
    expstatsn: int
    data: memoryview


@dataclass(slots=True)
class ScsiCommandPdu:
    immediate: bool
    final: bool
    read: bool
    write: bool
    attr: int
    lun: int
    itt: int
    edtl: int
    cmdsn: int
    expstatsn: int
    cdb: bytes
    data: memoryview
    bidi_read_length: int = 0


@dataclass(slots=True)
class TaskMgmtRequest:
    immediate: bool
    function: int
    lun: int
    itt: int
    rtt: int
    cmdsn: int
    expstatsn: int
    refcmdsn: int
    expdatasn: int


@dataclass(slots=True)
class LoginRequest:
    transit: bool
    cont: bool
    csg: int
    nsg: int
    version_max: int
    version_min: int
    isid: int
    tsih: int
    itt: int
    cid: int
    cmdsn: int
    expstatsn: int
    data: memoryview


@dataclass(slots=True)
class TextRequest:
    immediate: bool
    final: bool
    cont: bool
    lun: int
    itt: int
    ttt: int
    cmdsn: int
    expstatsn: int
    data: memoryview


@dataclass(slots=True)
class DataOut:
    final: bool
    lun: int
    itt: int
    ttt: int
    expstatsn: int
    datasn: int
    offset: int
    data: memoryview


@dataclass(slots=True)
class LogoutRequest:
    immediate: bool
    reason: int
    itt: int
    cid: int
    cmdsn: int
    expstatsn: int


@dataclass(slots=True)
class Snack:
    type: int
    lun: int
    itt: int
    ttt: int
    expstatsn: int
    begrun: int
    runlength: int


InitiatorPdu = (NopOut | ScsiCommandPdu | TaskMgmtRequest | LoginRequest | TextRequest | DataOut
                | LogoutRequest | Snack)


def peek_lengths(bhs: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(AHS length, data segment length) in bytes: all a reader needs to find a PDU's end.

    A tuple, not an object: this runs for every PDU received."""
    word: int = _U32.unpack_from(bhs, 4)[0]
    return (word >> 24) * 4, word & 0xFFFFFF


def padded(n: int) -> int:
    return (n + 3) & ~3


def decode(bhs: bytes | bytearray | memoryview, ahs: bytes | memoryview,
           data: memoryview) -> InitiatorPdu:
    """Decode one PDU from its header, additional header segments and data segment."""
    (b0, b1, b2, b3, _lenword, lunf, itt,
     w5, w6, w7, w8, w9, w10, w11) = _BHS.unpack_from(bhs)
    opcode = b0 & 0x3F
    immediate = bool(b0 & 0x40)
    if opcode == Op.SCSI_CMD:
        cdb = bytes(bhs[32:48])
        bidi = 0
        if ahs:
            cdb, bidi = _decode_cmd_ahs(ahs, cdb, bytes(bhs[:BHS_LEN]))
        return ScsiCommandPdu(immediate, bool(b1 & 0x80), bool(b1 & 0x40), bool(b1 & 0x20),
                              b1 & 0x07, lunf, itt, w5, w6, w7, cdb, data, bidi)
    if opcode == Op.DATA_OUT:
        return DataOut(bool(b1 & 0x80), lunf, itt, w5, w7, w9, w10, data)
    if opcode == Op.NOP_OUT:
        return NopOut(immediate, lunf, itt, w5, w6, w7, data)
    if opcode == Op.TASK_MGMT_REQ:
        return TaskMgmtRequest(immediate, b1 & 0x7F, lunf, itt, w5, w6, w7, w8, w9)
    if opcode == Op.LOGIN_REQ:
        return LoginRequest(bool(b1 & 0x80), bool(b1 & 0x40), (b1 >> 2) & 3, b1 & 3, b2, b3,
                            lunf >> 16, lunf & 0xFFFF, itt, w5 >> 16, w6, w7, data)
    if opcode == Op.TEXT_REQ:
        return TextRequest(immediate, bool(b1 & 0x80), bool(b1 & 0x40), lunf, itt, w5, w6, w7,
                           data)
    if opcode == Op.LOGOUT_REQ:
        return LogoutRequest(immediate, b1 & 0x7F, itt, w5 >> 16, w6, w7)
    if opcode == Op.SNACK:
        return Snack(b1 & 0x0F, lunf, itt, w5, w7, w10, w11)
    raise PduError(RejectReason.PROTOCOL_ERROR if opcode not in (0x1C, 0x1D, 0x1E)
                   else RejectReason.COMMAND_NOT_SUPPORTED,
                   f"opcode 0x{opcode:02x} is not one an initiator sends", bytes(bhs[:BHS_LEN]))


def _decode_cmd_ahs(ahs: bytes | memoryview, cdb: bytes, bhs: bytes) -> tuple[bytes, int]:
    """Extended CDB (type 1) and bidirectional read length (type 2) AHSs."""
    pos = 0
    bidi = 0
    while pos + 4 <= len(ahs):
        length = (ahs[pos] << 8) | ahs[pos + 1]
        kind = ahs[pos + 2]
        body = bytes(ahs[pos + 4:pos + 3 + length])
        if pos + 3 + length > len(ahs):
            raise PduError(RejectReason.INVALID_PDU_FIELD, "AHS runs past its segment", bhs)
        if kind == 1:
            cdb = cdb + body
        elif kind == 2 and length == 5:
            bidi = _U32.unpack_from(body, 0)[0]
        else:
            raise PduError(RejectReason.INVALID_PDU_FIELD, f"AHS type {kind} not understood", bhs)
        pos += padded(3 + length)
    return cdb, bidi


# ---------------------------------------------------------------------------------------------
# PDUs the target sends.  Each returns the 48-byte BHS; the caller appends data and padding.

def _bhs(b0: int, b1: int, b2: int, b3: int, data_len: int, lunf: int, itt: int,
         w5: int = 0, w6: int = 0, w7: int = 0, w8: int = 0, w9: int = 0, w10: int = 0,
         w11: int = 0) -> bytes:
    return _BHS.pack(b0, b1, b2, b3, data_len, lunf, itt, w5, w6, w7, w8, w9, w10, w11)


def nop_in(itt: int, ttt: int, lunf: int, statsn: int, expcmdsn: int, maxcmdsn: int,
           data_len: int) -> bytes:
    return _bhs(Op.NOP_IN, 0x80, 0, 0, data_len, lunf, itt, ttt, statsn, expcmdsn, maxcmdsn)


def scsi_response(itt: int, status: int, statsn: int, expcmdsn: int, maxcmdsn: int,
                  residual: int, data_len: int, response: int = 0, expdatasn: int = 0) -> bytes:
    """``residual`` > 0 is an underflow, < 0 an overflow."""
    flags = 0x80
    if residual > 0:
        flags |= 0x02
    elif residual < 0:
        flags |= 0x04
    return _bhs(Op.SCSI_RSP, flags, response, status, data_len, 0, itt, 0, statsn, expcmdsn,
                maxcmdsn, expdatasn, 0, min(abs(residual), 0xFFFFFFFF))


def data_in(itt: int, lunf: int, datasn: int, offset: int, data_len: int, final: bool,
            status: int | None, statsn: int, expcmdsn: int, maxcmdsn: int,
            residual: int) -> bytes:
    """A Data-In PDU; with ``status`` set it also carries the command's status (phase collapse)."""
    flags = 0x80 if final else 0
    st = 0
    if status is not None:
        flags |= 0x01
        st = status
        if residual > 0:
            flags |= 0x02
        elif residual < 0:
            flags |= 0x04
    else:
        statsn = 0
    return _bhs(Op.DATA_IN, flags, 0, st, data_len, lunf, itt, RESERVED_TAG, statsn, expcmdsn,
                maxcmdsn, datasn, offset,
                min(abs(residual), 0xFFFFFFFF) if status is not None else 0)


def r2t(itt: int, lunf: int, ttt: int, statsn: int, expcmdsn: int, maxcmdsn: int, r2tsn: int,
        offset: int, length: int) -> bytes:
    return _bhs(Op.R2T, 0x80, 0, 0, 0, lunf, itt, ttt, statsn, expcmdsn, maxcmdsn, r2tsn,
                offset, length)


def task_mgmt_response(itt: int, response: int, statsn: int, expcmdsn: int,
                       maxcmdsn: int) -> bytes:
    return _bhs(Op.TASK_MGMT_RSP, 0x80, response, 0, 0, 0, itt, 0, statsn, expcmdsn, maxcmdsn)


def login_response(transit: bool, cont: bool, csg: int, nsg: int, version_max: int,
                   version_active: int, isid: int, tsih: int, itt: int, statsn: int,
                   expcmdsn: int, maxcmdsn: int, status_class: int, status_detail: int,
                   data_len: int) -> bytes:
    b1 = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | nsg
    return _bhs(Op.LOGIN_RSP, b1, version_max, version_active, data_len, (isid << 16) | tsih,
                itt, 0, statsn, expcmdsn, maxcmdsn, (status_class << 24) | (status_detail << 16))


def text_response(final: bool, cont: bool, lunf: int, itt: int, ttt: int, statsn: int,
                  expcmdsn: int, maxcmdsn: int, data_len: int) -> bytes:
    b1 = (0x80 if final else 0) | (0x40 if cont else 0)
    return _bhs(Op.TEXT_RSP, b1, 0, 0, data_len, lunf, itt, ttt, statsn, expcmdsn, maxcmdsn)


def logout_response(itt: int, response: int, statsn: int, expcmdsn: int, maxcmdsn: int,
                    time2wait: int = 0, time2retain: int = 0) -> bytes:
    return _bhs(Op.LOGOUT_RSP, 0x80, response, 0, 0, 0, itt, 0, statsn, expcmdsn, maxcmdsn, 0,
                (time2wait << 16) | time2retain)


def async_message(event: int, statsn: int, expcmdsn: int, maxcmdsn: int, data_len: int = 0,
                  lunf: int = 0, param1: int = 0, param2: int = 0, param3: int = 0) -> bytes:
    return _bhs(Op.ASYNC_MSG, 0x80, 0, 0, data_len, lunf, RESERVED_TAG, 0, statsn, expcmdsn,
                maxcmdsn, (event << 24) | (param1 & 0xFFFF), (param2 << 16) | param3)


def reject(reason: int, statsn: int, expcmdsn: int, maxcmdsn: int, datasn: int = 0) -> bytes:
    """The Reject BHS; its data segment is the rejected PDU's 48-byte header."""
    return _bhs(Op.REJECT, 0x80, reason, 0, BHS_LEN, 0, RESERVED_TAG, 0, statsn, expcmdsn,
                maxcmdsn, datasn)


PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


def pad_for(n: int) -> bytes:
    return PAD[n & 3]
