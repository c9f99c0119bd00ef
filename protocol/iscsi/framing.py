"""Splitting a TCP byte stream into iSCSI PDUs, and joining PDUs into send buffers.

The reader never trusts a length it has not checked: a data segment longer than what this side
declared (MaxRecvDataSegmentLength) is a protocol error before a byte of it is buffered, so an
initiator cannot make the target allocate what it announces.
"""

from __future__ import annotations

from collections.abc import Callable

from .pdu import BHS_LEN, PduError, RejectReason, padded, pad_for, peek_lengths

Digest = Callable[[bytes | bytearray | memoryview], int]
MAX_AHS = 1024  # TotalAHSLength can say 1020 bytes at most


class DigestError(Exception):
    def __init__(self, header: bytes, is_header: bool) -> None:
        super().__init__("header digest mismatch" if is_header else "data digest mismatch")
        self.header = header
        self.is_header = is_header


class PduReader:
    """Accumulates received bytes; ``next_pdu`` returns (bhs, ahs, data) once a PDU is whole."""

    __slots__ = ("_buf", "_pos", "max_data", "header_digest", "data_digest")

    def __init__(self, max_data: int = 8192) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_data = max_data
        self.header_digest: Digest | None = None
        self.data_digest: Digest | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos >= len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_pdu(self) -> tuple[bytes, bytes, memoryview] | None:
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < BHS_LEN:
            self._compact()
            return None
        head = peek_lengths(memoryview(buf)[pos:pos + 8])
        hd = 4 if self.header_digest else 0
        dd = 4 if self.data_digest and head.data_len else 0
        if head.data_len > self.max_data:
            raise PduError(RejectReason.PROTOCOL_ERROR,
                           f"data segment of {head.data_len} bytes exceeds the declared "
                           f"MaxRecvDataSegmentLength {self.max_data}",
                           bytes(buf[pos:pos + BHS_LEN]), fatal=True)
        data_at = pos + BHS_LEN + head.ahs_len + hd
        end = data_at + padded(head.data_len) + dd
        if len(buf) < end:
            self._compact()
            return None
        view = memoryview(buf)
        bhs = bytes(view[pos:pos + BHS_LEN])
        ahs = bytes(view[pos + BHS_LEN:pos + BHS_LEN + head.ahs_len]) if head.ahs_len else b""
        if hd:
            assert self.header_digest is not None
            got = int.from_bytes(buf[data_at - 4:data_at], "little")
            if self.header_digest(view[pos:data_at - 4]) != got:
                # The lengths cannot be trusted either: the connection must go.
                view.release()
                self._pos = end
                raise DigestError(bhs, True)
        data = bytes(view[data_at:data_at + head.data_len]) if head.data_len else b""
        self._pos = end
        if dd:
            assert self.data_digest is not None
            got = int.from_bytes(buf[end - 4:end], "little")
            ok = self.data_digest(view[data_at:end - 4]) == got
            if not ok:
                view.release()
                raise DigestError(bhs, False)
        view.release()
        return bhs, ahs, memoryview(data)

    def _compact(self) -> None:
        # Dropping the consumed prefix keeps the buffer bounded by one PDU plus one read.
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0


def frame(header: bytes, data: bytes | bytearray | memoryview | None,
          header_digest: Digest | None = None,
          data_digest: Digest | None = None) -> list[bytes | bytearray | memoryview]:
    """Buffers for one PDU, ready for ``transport.writelines``; the payload is not copied."""
    parts: list[bytes | bytearray | memoryview] = [header]
    if header_digest:
        parts.append(header_digest(header).to_bytes(4, "little"))
    if data:
        parts.append(data)
        pad = pad_for(len(data))
        if pad:
            parts.append(pad)
        if data_digest:
            parts.append(data_digest(bytes(data) + pad).to_bytes(4, "little"))
    return parts
