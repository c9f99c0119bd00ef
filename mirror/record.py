"""The on-disk form every mirror metadata record shares: a header that starts with a magic
and a version, a body, and a CRC-32 of both, so a torn or foreign file is refused, never
half-read."""

from __future__ import annotations

import struct
import zlib
from typing import Any

_CRC = struct.Struct("<I")


def seal(body: bytes) -> bytes:
    """``body`` (header included) followed by its CRC."""
    return body + _CRC.pack(zlib.crc32(body))


def unseal(data: bytes, header: struct.Struct, magic: bytes, version: int, what: str,
           error: type[ValueError]) -> tuple[bytes, tuple[Any, ...]]:
    """Check length, CRC, magic and version; return the body and the unpacked header fields.

    ``header`` starts with the 4-byte magic and the version; ``what`` names the record in the
    messages of ``error``."""
    if len(data) < header.size + _CRC.size:
        raise error(f"{what} too short ({len(data)} bytes)")
    body, (crc,) = data[:-_CRC.size], _CRC.unpack(data[-_CRC.size:])
    if zlib.crc32(body) != crc:
        raise error(f"{what} CRC mismatch")
    fields = header.unpack_from(body)
    if fields[0] != magic:
        raise error(f"not a {what} (magic {fields[0]!r})")
    if fields[1] != version:
        raise error(f"unsupported {what} version {fields[1]}")
    return body, fields
