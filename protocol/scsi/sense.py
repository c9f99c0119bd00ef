"""SCSI errors as values: ``CheckCondition`` and its sense data (SPC-5 4.4).

Handlers raise ``CheckCondition``; the target's dispatcher turns it into a CHECK CONDITION
``ScsiResult``.  Backend failures arrive as ``OSError``; ``sense_for_errno`` is the one table
that maps them to sense codes.
"""

from __future__ import annotations

import errno as _errno
import struct

# Sense keys (SPC-5 table 52).
NO_SENSE = 0x0
RECOVERED_ERROR = 0x1
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
ABORTED_COMMAND = 0xB
MISCOMPARE = 0xE

# Additional sense code / qualifier pairs used by the emulation.
Asc = tuple[int, int]
NO_ADDITIONAL_SENSE: Asc = (0x00, 0x00)
LU_NOT_READY: Asc = (0x04, 0x00)
LU_NOT_ACCESSIBLE_UNAVAILABLE: Asc = (0x04, 0x0C)
LU_COMMUNICATION_TIMEOUT: Asc = (0x08, 0x01)
WRITE_ERROR: Asc = (0x0C, 0x00)
INVALID_FIELD_IN_INFORMATION_UNIT: Asc = (0x0E, 0x03)
UNRECOVERED_READ_ERROR: Asc = (0x11, 0x00)
MISCOMPARE_DURING_VERIFY: Asc = (0x1D, 0x00)
PARAMETER_LIST_LENGTH_ERROR: Asc = (0x1A, 0x00)
INVALID_COMMAND_OPERATION_CODE: Asc = (0x20, 0x00)
LBA_OUT_OF_RANGE: Asc = (0x21, 0x00)
INVALID_FIELD_IN_CDB: Asc = (0x24, 0x00)
LU_NOT_SUPPORTED: Asc = (0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST: Asc = (0x26, 0x00)
WRITE_PROTECTED: Asc = (0x27, 0x00)
SPACE_ALLOCATION_FAILED_WRITE_PROTECT: Asc = (0x27, 0x07)
POWER_ON_RESET: Asc = (0x29, 0x00)
BUS_DEVICE_RESET_FUNCTION_OCCURRED: Asc = (0x29, 0x03)
I_T_NEXUS_LOSS_OCCURRED: Asc = (0x29, 0x07)
MODE_PARAMETERS_CHANGED: Asc = (0x2A, 0x01)
CAPACITY_DATA_HAS_CHANGED: Asc = (0x2A, 0x09)
SAVING_PARAMETERS_NOT_SUPPORTED: Asc = (0x39, 0x00)
REPORTED_LUNS_DATA_HAS_CHANGED: Asc = (0x3F, 0x0E)
INTERNAL_TARGET_FAILURE: Asc = (0x44, 0x00)
INSUFFICIENT_RESOURCES: Asc = (0x55, 0x03)

class CheckCondition(Exception):
    """A command ends in CHECK CONDITION with this sense.

    ``field``/``bit`` make a sense-key-specific field pointer (SPC-5 4.4.2.4.2): ``field`` is
    the byte offset of the bad field in the CDB (``in_cdb``) or in the parameter list, ``bit``
    the highest bit of the field (None: pointer to the whole byte).  ``info`` fills the
    INFORMATION field (e.g. the miscompare offset).
    """

    __slots__ = ("key", "asc", "ascq", "info", "field", "bit", "in_cdb")

    def __init__(
        self,
        key: int,
        code: Asc,
        *,
        info: int | None = None,
        field: int | None = None,
        bit: int | None = None,
        in_cdb: bool = True,
    ) -> None:
        super().__init__(key, code)
        self.key = key
        self.asc, self.ascq = code
        self.info = info
        self.field = field
        self.bit = bit
        self.in_cdb = in_cdb

    def __repr__(self) -> str:
        return f"CheckCondition(key={self.key:#x}, asc={self.asc:#04x}, ascq={self.ascq:#04x})"

    def _sks(self) -> tuple[int, int]:
        if self.field is None:
            return 0, 0
        b = 0x80 | (0x40 if self.in_cdb else 0)
        if self.bit is not None:
            b |= 0x08 | (self.bit & 7)
        return b, self.field & 0xFFFF

    def to_bytes(self, descriptor: bool = False) -> bytes:
        """Fixed-format sense data (response code 70h), or descriptor format (72h)."""
        sks0, sks1 = self._sks()
        if descriptor:
            out = bytearray((0x72, self.key, self.asc, self.ascq, 0, 0, 0, 0))
            if self.info is not None:
                out += struct.pack(">BBBBQ", 0x00, 0x0A, 0x80, 0, self.info & (2**64 - 1))
            if sks0:
                out += struct.pack(">BBBBBHB", 0x02, 0x06, 0, 0, sks0, sks1, 0)
            out[7] = len(out) - 8
            return bytes(out)
        info = self.info
        valid = info is not None and 0 <= info <= 0xFFFFFFFF
        out = bytearray(18)
        out[0] = 0xF0 if valid else 0x70
        out[2] = self.key
        if valid:
            out[3:7] = info.to_bytes(4, "big")  # type: ignore[union-attr]
        out[7] = 10
        out[12] = self.asc
        out[13] = self.ascq
        out[15] = sks0
        out[16:18] = sks1.to_bytes(2, "big")
        return bytes(out)


def illegal(code: Asc = INVALID_FIELD_IN_CDB, field: int | None = None, bit: int | None = None,
            in_cdb: bool = True) -> CheckCondition:
    """ILLEGAL REQUEST, the commonest error, with an optional field pointer."""
    return CheckCondition(ILLEGAL_REQUEST, code, field=field, bit=bit, in_cdb=in_cdb)


def bad_param(field: int | None = None, bit: int | None = None) -> CheckCondition:
    return illegal(INVALID_FIELD_IN_PARAMETER_LIST, field, bit, in_cdb=False)


# errno -> (sense key, ASC/ASCQ).  EIO and data-integrity errors depend on the direction and
# are handled in the function.  Choices:
# - ENOSPC/EDQUOT: thin pool exhausted; SBC-4 4.7.3.6 names 27/07 for a failed allocation.
# - ENOMEM/EAGAIN/EBUSY/ENOBUFS: transient; ABORTED COMMAND is retried by every initiator.
# - ETIMEDOUT: a peer or the backend did not answer in time; 08/01 is retryable too.
# - ENOTCONN/ESHUTDOWN/ENOLINK: this node lost quorum (fenced); reporting the ALUA
#   "unavailable" state makes multipath initiators fail over to another node.
_ERRNO_TABLE: dict[int, tuple[int, Asc]] = {
    _errno.ENOSPC: (DATA_PROTECT, SPACE_ALLOCATION_FAILED_WRITE_PROTECT),
    _errno.EDQUOT: (DATA_PROTECT, SPACE_ALLOCATION_FAILED_WRITE_PROTECT),
    _errno.EROFS: (DATA_PROTECT, WRITE_PROTECTED),
    _errno.EPERM: (DATA_PROTECT, WRITE_PROTECTED),
    _errno.EACCES: (DATA_PROTECT, WRITE_PROTECTED),
    _errno.ENOMEM: (ABORTED_COMMAND, INSUFFICIENT_RESOURCES),
    _errno.ENOBUFS: (ABORTED_COMMAND, INSUFFICIENT_RESOURCES),
    _errno.EAGAIN: (ABORTED_COMMAND, INSUFFICIENT_RESOURCES),
    _errno.EBUSY: (ABORTED_COMMAND, INSUFFICIENT_RESOURCES),
    _errno.EINTR: (ABORTED_COMMAND, NO_ADDITIONAL_SENSE),
    _errno.ETIMEDOUT: (ABORTED_COMMAND, LU_COMMUNICATION_TIMEOUT),
    _errno.ENOTCONN: (NOT_READY, LU_NOT_ACCESSIBLE_UNAVAILABLE),
    _errno.ESHUTDOWN: (NOT_READY, LU_NOT_ACCESSIBLE_UNAVAILABLE),
    _errno.ENOLINK: (NOT_READY, LU_NOT_ACCESSIBLE_UNAVAILABLE),
    _errno.ENODEV: (NOT_READY, LU_NOT_READY),
    _errno.ENXIO: (NOT_READY, LU_NOT_READY),
    _errno.ERANGE: (ILLEGAL_REQUEST, LBA_OUT_OF_RANGE),
}
_MEDIUM_ERRNOS = frozenset((_errno.EIO, _errno.EILSEQ, _errno.EBADMSG))


def sense_for_errno(err: int | None, is_write: bool = False) -> CheckCondition:
    """The CHECK CONDITION to answer a backend ``OSError`` with."""
    if err in _MEDIUM_ERRNOS:
        return CheckCondition(MEDIUM_ERROR, WRITE_ERROR if is_write else UNRECOVERED_READ_ERROR)
    key, code = _ERRNO_TABLE.get(err or 0, (HARDWARE_ERROR, INTERNAL_TARGET_FAILURE))
    return CheckCondition(key, code)
