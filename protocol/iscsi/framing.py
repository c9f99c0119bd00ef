"""Splitting a TCP byte stream into iSCSI PDUs, and joining PDUs into send buffers.

The reader never trusts a length it has not checked: a data segment longer than what this side
declared (MaxRecvDataSegmentLength) is a protocol error before a byte of it is buffered, so an
initiator cannot make the target allocate what it announces.
"""

from __future__ import annotations

from collections.abc import Callable

from ..recvbuf import EMPTY, ReceiveBuffer
from .pdu import BHS_LEN, PduError, RejectReason, padded, pad_for, peek_lengths

# CRC32C as iSCSI uses it (RFC 7143 §13.1): f(data, crc) continues a CRC begun with crc=0.
# The 32-bit result goes on the wire least significant byte first (RFC 3720 B.4 examples:
# 32 zero bytes -> aa 36 91 8a).
Digest = Callable[[bytes | bytearray | memoryview, int], int]
MAX_AHS = 1024  # TotalAHSLength can say 1020 bytes at most
MIN_CAPACITY = 64 * 1024


class DigestError(Exception):
    def __init__(self, header: bytes, is_header: bool) -> None:
        super().__init__("header digest mismatch" if is_header else "data digest mismatch")
        self.header = header
        self.is_header = is_header


class PduReader(ReceiveBuffer):
    """Accumulates received bytes; ``next_pdu`` returns (bhs, ahs, data) once a PDU is whole.

    Data segments are views into the receive buffer (see ``protocol.recvbuf``).
    """

    __slots__ = ("max_data", "header_digest", "data_digest")

    def __init__(self, max_data: int = 8192) -> None:
        self.max_data = max_data
        super().__init__(MIN_CAPACITY)
        self.header_digest: Digest | None = None
        self.data_digest: Digest | None = None

    def capacity(self) -> int:
        # Two of the largest PDUs this side accepts: one being parsed, one arriving.
        return max(MIN_CAPACITY, 2 * (BHS_LEN + MAX_AHS + 8 + padded(self.max_data)))

    def next_pdu(self) -> tuple[bytes, bytes, memoryview] | None:
        pos = self._pos
        if self._end - pos < BHS_LEN:
            return None
        buf = self._buf
        view = memoryview(buf)
        ahs_len, data_len = peek_lengths(view[pos:pos + 8])
        hd = 4 if self.header_digest else 0
        dd = 4 if self.data_digest and data_len else 0
        if data_len > self.max_data:
            raise PduError(RejectReason.PROTOCOL_ERROR,
                           f"data segment of {data_len} bytes exceeds the declared "
                           f"MaxRecvDataSegmentLength {self.max_data}",
                           bytes(view[pos:pos + BHS_LEN]), fatal=True)
        data_at = pos + BHS_LEN + ahs_len + hd
        end = data_at + padded(data_len) + dd
        if self._end < end:
            self.need = end - pos  # the next writable() makes room for all of it
            return None
        self.need = 0
        bhs = bytes(view[pos:pos + BHS_LEN])
        ahs = bytes(view[pos + BHS_LEN:pos + BHS_LEN + ahs_len]) if ahs_len else b""
        if hd:
            assert self.header_digest is not None
            got = int.from_bytes(view[data_at - 4:data_at], "little")
            if self.header_digest(view[pos:data_at - 4], 0) != got:
                # The lengths cannot be trusted either: the connection must go.
                self._pos = end
                raise DigestError(bhs, True)
        data = view[data_at:data_at + data_len] if data_len else EMPTY
        self._pos = end
        if dd:
            assert self.data_digest is not None
            got = int.from_bytes(view[end - 4:end], "little")
            if self.data_digest(view[data_at:end - 4], 0) != got:
                raise DigestError(bhs, False)
        return bhs, ahs, data


def frame(header: bytes, data: bytes | bytearray | memoryview | None,
          header_digest: Digest | None = None,
          data_digest: Digest | None = None) -> list[bytes | bytearray | memoryview]:
    """Buffers for one PDU, ready for ``transport.writelines``; the payload is not copied."""
    parts: list[bytes | bytearray | memoryview] = [header]
    if header_digest:
        parts.append(header_digest(header, 0).to_bytes(4, "little"))
    if data:
        parts.append(data)
        pad = pad_for(len(data))
        if pad:
            parts.append(pad)
        if data_digest:
            # CRC32C over data and padding, continued rather than joined: no copy of data.
            crc = data_digest(data, 0)
            parts.append((data_digest(pad, crc) if pad else crc).to_bytes(4, "little"))
    return parts
