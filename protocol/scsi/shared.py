"""A logical unit's state shared by the nodes of a cluster, as values that travel.

Reservations (PERSISTENT RESERVE OUT, RESERVE/RELEASE) and logical unit resets change state
that initiators expect to be one, whichever node a command reaches (DESIGN invariant 5).  For
a shared logical unit the target does not apply such a command where it arrives: it yields it
encoded (``BlockOp.STATE``), the mirror orders it with the LUN's writes, and every replica
applies it with ``ScsiTarget.apply_shared`` in that order.  The handlers are deterministic
functions of the state and the command, so every replica reaches the same state, and the
node the command arrived at answers with the outcome of its own application.

Encoding: kind (u8), nexus length (u16), CDB length (u16), data length (u32), then the nexus
(UTF-8), CDB and data bytes.
"""

from __future__ import annotations

import struct

from .types import ScsiCommand

COMMAND = 1
LU_RESET = 2
# PERSISTENT RESERVE OUT, RESERVE(6), RELEASE(6), RESERVE(10), RELEASE(10).
SHARED_OPCODES = frozenset((0x5F, 0x16, 0x17, 0x56, 0x57))
MAX_DATA = 1 << 20  # more than any reservation parameter list
_HEAD = struct.Struct("!BHHI")


def encode_command(cmd: ScsiCommand) -> bytes:
    data = bytes(cmd.data_out or b"")[:cmd.edtl]
    return _encode(COMMAND, cmd.nexus, bytes(cmd.cdb), data)


def encode_lu_reset(nexus: str) -> bytes:
    return _encode(LU_RESET, nexus, b"", b"")


def _encode(kind: int, nexus: str, cdb: bytes, data: bytes) -> bytes:
    name = nexus.encode()
    return _HEAD.pack(kind, len(name), len(cdb), len(data)) + name + cdb + data


def decode(blob: bytes | bytearray | memoryview) -> tuple[int, str, bytes, bytes]:
    """(kind, nexus, cdb, data); ValueError for anything malformed."""
    raw = bytes(blob)
    if len(raw) < _HEAD.size:
        raise ValueError(f"shared state record of {len(raw)} bytes")
    kind, n, c, d = _HEAD.unpack_from(raw)
    if kind not in (COMMAND, LU_RESET):
        raise ValueError(f"shared state record of kind {kind}")
    if _HEAD.size + n + c + d != len(raw) or d > MAX_DATA:
        raise ValueError("shared state record lengths do not add up")
    at = _HEAD.size
    try:
        nexus = raw[at:at + n].decode()
    except UnicodeDecodeError:
        raise ValueError("shared state record nexus is not UTF-8") from None
    cdb = raw[at + n:at + n + c]
    if kind == COMMAND and (not cdb or cdb[0] not in SHARED_OPCODES):
        raise ValueError("shared state record of a command that is not shared")
    return kind, nexus, cdb, raw[at + n + c:]
