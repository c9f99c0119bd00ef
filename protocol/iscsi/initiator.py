"""The initiator's side of iSCSI, sans-IO: the PDUs an initiator sends, the target's PDUs
decoded, a login's keys, and the sense data of a CHECK CONDITION.

The target's side (``pdu``, ``login``) is what vsand is; this side exists so that vsand can
reach a LUN the way an initiator does, through each node's portal (``vsanctl drill``): one
command at a time per session, no digests, error recovery level 0.  Every builder returns the
PDU's whole bytes: header, data segment and padding.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import chap
from .keys import encode_text, parse_text
from .pdu import _BHS, BHS_LEN, Op, RESERVED_TAG, encode_lun, pad_for, padded

SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
MAX_RECV_SEGMENT = 256 * 1024  # what this initiator declares it takes in one Data-In
GOOD, CHECK_CONDITION = 0x00, 0x02
NOT_READY, UNIT_ATTENTION = 0x2, 0x6
_CDB16 = struct.Struct(">BBQIBB")


def _pdu(b0: int, b1: int, b2: int, b3: int, lunf: int, itt: int, w5: int, w6: int, w7: int,
         data: bytes = b"", w8: int = 0, w9: int = 0, w10: int = 0, w11: int = 0) -> bytes:
    header = _BHS.pack(b0, b1, b2, b3, len(data), lunf, itt, w5, w6, w7, w8, w9, w10, w11)
    return header + data + pad_for(len(data))


def login_request(*, isid: int, tsih: int, itt: int, cmdsn: int, expstatsn: int, csg: int,
                  nsg: int, pairs: list[tuple[str, str]], transit: bool = True,
                  cid: int = 0) -> bytes:
    b1 = (0x80 if transit else 0) | (csg << 2) | nsg
    return _pdu(Op.LOGIN_REQ | 0x40, b1, 0, 0, (isid << 16) | tsih, itt, cid << 16, cmdsn,
                expstatsn, encode_text(pairs))


def scsi_command(*, itt: int, lun: int, cmdsn: int, expstatsn: int, cdb: bytes, edtl: int,
                 read: bool = False, write: bool = False, data: bytes = b"") -> bytes:
    """A SIMPLE-task command; ``data`` (immediate data) at most the negotiated first burst."""
    b1 = 0x80 | (0x40 if read else 0) | (0x20 if write else 0) | 0x01
    return _pdu(Op.SCSI_CMD, b1, 0, 0, encode_lun(lun), itt, edtl, cmdsn, expstatsn, data,
                *struct.unpack(">4I", cdb.ljust(16, b"\0")))


def data_out(*, itt: int, lun: int, ttt: int, expstatsn: int, datasn: int, offset: int,
             data: bytes, final: bool) -> bytes:
    return _pdu(Op.DATA_OUT, 0x80 if final else 0, 0, 0, encode_lun(lun), itt, ttt, 0,
                expstatsn, data, 0, datasn, offset)


def nop_out(*, itt: int, ttt: int, lunf: int, cmdsn: int, expstatsn: int,
            data: bytes = b"") -> bytes:
    """Immediate: a ping answer (``itt`` reserved, ``ttt`` the target's) or our own ping."""
    return _pdu(Op.NOP_OUT | 0x40, 0x80, 0, 0, lunf, itt, ttt, cmdsn, expstatsn, data)


def logout_request(*, itt: int, cmdsn: int, expstatsn: int, cid: int = 0) -> bytes:
    return _pdu(Op.LOGOUT_REQ | 0x40, 0x80, 0, 0, 0, itt, cid << 16, cmdsn, expstatsn)


def read16(lba: int, blocks: int) -> bytes:
    return _CDB16.pack(0x88, 0, lba, blocks, 0, 0)


def write16(lba: int, blocks: int, fua: bool = False) -> bytes:
    return _CDB16.pack(0x8A, 0x08 if fua else 0, lba, blocks, 0, 0)


@dataclass(frozen=True, slots=True)
class TargetPdu:
    """A PDU the target sent, with the fields an initiator acts on."""
    opcode: int
    final: bool
    b2: int  # SCSI response, Reject reason, login version-max
    b3: int  # SCSI status (SCSI Response, Data-In with S)
    lunf: int
    itt: int
    ttt: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    w9: int  # DataSN, R2TSN; login status class << 8 | detail in the top half of w9
    offset: int  # Data-In buffer offset, R2T buffer offset
    w11: int  # residual count, R2T desired length
    data: bytes
    has_status: bool  # Data-In's S bit; always true for a SCSI Response
    transit: bool  # login: T bit
    nsg: int  # login: next stage
    tsih: int  # login

    @property
    def login_status(self) -> int:
        return self.w9 >> 16


def data_length(bhs: bytes) -> tuple[int, int]:
    """(AHS bytes, padded data segment bytes) that follow this BHS."""
    word: int = struct.unpack_from(">I", bhs, 4)[0]
    return (word >> 24) * 4, padded(word & 0xFFFFFF)


def decode_target(bhs: bytes, data: bytes) -> TargetPdu:
    """``data``: the data segment without padding."""
    (b0, b1, b2, b3, _len, lunf, itt, w5, w6, w7, w8, w9, w10, w11) = _BHS.unpack_from(bhs)
    opcode = b0 & 0x3F
    final = bool(b1 & 0x80)
    if opcode == Op.SCSI_RSP:
        has_status = True
    elif opcode == Op.DATA_IN:
        has_status = bool(b1 & 0x01)
    else:
        has_status = False
    return TargetPdu(opcode, final, b2, b3, lunf, itt, w5, w6, w7, w8, w9, w10, w11, data,
                     has_status, final if opcode == Op.LOGIN_RSP else False, b1 & 3,
                     lunf & 0xFFFF)


def is_ping(p: TargetPdu) -> bool:
    """A NOP-In that wants an answer (its TTT is not the reserved tag)."""
    return p.opcode == Op.NOP_IN and p.ttt != RESERVED_TAG


def security_keys(initiator: str, target: str, with_chap: bool) -> list[tuple[str, str]]:
    return [("InitiatorName", initiator), ("TargetName", target), ("SessionType", "Normal"),
            ("AuthMethod", "CHAP,None" if with_chap else "None")]


def operational_keys() -> list[tuple[str, str]]:
    return [("HeaderDigest", "None"), ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", str(MAX_RECV_SEGMENT)), ("ImmediateData", "Yes"),
            # Unsolicited data only as immediate data, the rest on R2Ts: no Data-Out burst
            # to keep track of.
            ("InitialR2T", "Yes"), ("FirstBurstLength", "65536"),
            ("MaxBurstLength", str(MAX_RECV_SEGMENT)), ("ErrorRecoveryLevel", "0"),
            ("MaxConnections", "1")]


def chap_answer(text: bytes, user: str, secret: bytes) -> list[tuple[str, str]]:
    """Our CHAP_N/CHAP_R for the target's CHAP_A/CHAP_I/CHAP_C (one-way CHAP)."""
    got = dict(parse_text(text))
    try:
        algorithm = int(got["CHAP_A"])
        ident = chap.decode_identifier(got["CHAP_I"])
        challenge = chap.decode_binary(got["CHAP_C"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"the target's CHAP challenge is not usable: {e}") from None
    if algorithm not in chap.ALGORITHMS:
        raise ValueError(f"the target chose CHAP algorithm {algorithm}")
    digest = chap.response(algorithm, ident, secret, challenge)
    return [("CHAP_N", user), ("CHAP_R", chap.encode_binary(digest))]


def chap_algorithms() -> str:
    return ",".join(str(a) for a in sorted(chap.ALGORITHMS, reverse=True))


def negotiated(text: bytes) -> dict[str, str]:
    return dict(parse_text(text))


@dataclass(frozen=True, slots=True)
class Sense:
    key: int
    asc: int
    ascq: int

    def __str__(self) -> str:
        return f"sense key {self.key:#x}, ASC/ASCQ {self.asc:02x}/{self.ascq:02x}"


def sense_of(data: bytes) -> Sense | None:
    """The sense in a SCSI Response's data segment (a 2-byte length, then the sense data),
    fixed (0x70/0x71) or descriptor (0x72/0x73) format."""
    if len(data) < 2:
        return None
    n = int.from_bytes(data[:2], "big")
    s = data[2:2 + n]
    if len(s) >= 14 and s[0] & 0x7F in (0x70, 0x71):
        return Sense(s[2] & 0x0F, s[12], s[13])
    if len(s) >= 4 and s[0] & 0x7F in (0x72, 0x73):
        return Sense(s[1] & 0x0F, s[2], s[3])
    return None


__all__ = ["BHS_LEN", "CHECK_CONDITION", "GOOD", "NOT_READY", "Sense", "TargetPdu",
           "UNIT_ATTENTION", "chap_answer", "chap_algorithms", "data_length", "data_out",
           "decode_target", "is_ping", "login_request", "logout_request",
           "negotiated", "nop_out", "operational_keys", "read16", "scsi_command",
           "security_keys", "sense_of", "write16"]
