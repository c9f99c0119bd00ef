"""The peer (replication) wire protocol: framed, checksummed, versioned messages.

Frame layout (all integers big-endian)::

    offset size field
     0     2    magic b"VM"
     2     1    frame version (1)
     3     1    message type (MsgType)
     4     2    flags (FUA 0x1, UNMAP 0x2; only those a type defines, others must be 0)
     6     2    LUN id (the LUN's id on peer links; the same on every node)
     8     4    payload length
    12     4    blocks
    16     4    epoch (of the LUN's sequencer)
    20     4    arg: a per-type u32 (ACK status errno, FORWARD op, WELCOME version)
    24     8    sequence number
    32     8    request id
    40     8    lba
    48     8    arg64: a per-type u64 (heartbeat timestamps, a miscompare offset)
    56     4    reserved, 0
    60     4    CRC32C of bytes 0..59
    64     n    payload
    64+n   4    CRC32C of the payload, present only when n > 0

The 64-byte header keeps a payload 8-byte aligned in a fresh buffer.  Each message type is a
frozen dataclass naming the header fields it uses; every field it does not use must be zero.
So decoding is canonical (a frame that parses encodes back to the same bytes) and a frame with
stray bits is refused: a change of meaning needs a new frame version, not a silent ignore.

``encode(msg)`` returns buffers for ``transport.writelines``; ``MessageReader`` splits a
received stream, handing bulk data (WRITE, WRITE_SAME, FORWARD, RESYNC_DATA) out as views and
small payloads as copies.  Anything malformed raises ``PeerProtocolError``: drop the link.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from vsand.protocol.block import BlockOp, BlockRequest
from vsand.protocol.recvbuf import EMPTY as _EMPTY, ReceiveBuffer

Buffer: TypeAlias = bytes | bytearray | memoryview

# The crc32c package uses the CPU's CRC32 instruction; crcmod's table code computes the same
# function ~60x slower (vsand/targets.py makes the same choice).
try:
    from crc32c import crc32c
except ImportError:  # pragma: no cover - the package is a dependency
    import crcmod.predefined  # type: ignore[import-untyped]
    crc32c = crcmod.predefined.mkCrcFun("crc-32c")

MAGIC = b"VM"
FRAME_VERSION = 1
HEADER_LEN = 64
TRAILER_LEN = 4
# An 8 MiB write plus room for the few bytes other payloads add around their data.
DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024 + 64 * 1024
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 65536
MAC_LEN = 32
MAX_CHECKSUM = 64
MAX_REASON = 1024
MIN_CAPACITY = 256 * 1024  # of a reader's buffer; it grows to hold the largest frame seen
MIN_ROOM = 64 * 1024

FUA = 0x1
UNMAP_FLAG = 0x2

_HEAD = struct.Struct("!2sBBHHIIIIQQQQI")
_CRC = struct.Struct("!I")
_RANGE = struct.Struct("!QI")
assert _HEAD.size + _CRC.size == HEADER_LEN

# The header fields after type, in wire order, less the payload length and reserved word:
# (flags, lun, blocks, epoch, arg, seq, request_id, lba, arg64).
Fields: TypeAlias = tuple[int, int, int, int, int, int, int, int, int]


class PeerProtocolError(Exception):
    """A peer sent something malformed; the connection must be dropped."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MsgType(enum.IntEnum):
    HELLO = 1
    CHALLENGE_RESPONSE = 2
    WELCOME = 3
    GOODBYE = 4
    HEARTBEAT = 5
    HEARTBEAT_ACK = 6
    WRITE = 16
    WRITE_SAME = 17
    UNMAP = 18
    FLUSH = 19
    ACK = 20
    FORWARD = 21
    ORDERED = 22
    COMPARE_AND_WRITE = 23
    CONTROL = 24
    STATE = 25
    GENERATIONS = 32
    RESYNC_REQUEST = 33
    RESYNC_DATA = 34
    VERIFY_REQUEST = 35
    VERIFY_RESULT = 36


def _nbytes(data: Buffer) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


# The frame layer does not know a LUN's block size, but it can refuse data that cannot be
# whole blocks of any size a LUN may have; the receiver still checks the LUN's own size.
def _is_block_size(n: int) -> bool:
    return MIN_BLOCK_SIZE <= n <= MAX_BLOCK_SIZE and not n & (n - 1)


def _data_problem(nbytes: int, blocks: int, per_block: int = 1) -> str | None:
    unit = blocks * per_block
    if blocks < 1:
        return "a data message must cover at least one block"
    if nbytes % unit or not _is_block_size(nbytes // unit):
        return f"{nbytes} bytes of data for {blocks} blocks"
    return None


def _same_problem(nbytes: int, blocks: int) -> str | None:
    if blocks < 1:
        return "WRITE_SAME of no blocks"
    return None if _is_block_size(nbytes) else f"WRITE_SAME block of {nbytes} bytes"


def _encode_ranges(ranges: tuple[tuple[int, int], ...]) -> bytes:
    return b"".join(_RANGE.pack(lba, blocks) for lba, blocks in ranges)


def _decode_ranges(payload: memoryview) -> tuple[tuple[int, int], ...]:
    if len(payload) % _RANGE.size:
        raise PeerProtocolError(f"UNMAP ranges of {len(payload)} bytes")
    return tuple(_RANGE.iter_unpack(payload))


class _Base:
    __slots__ = ()  # the message dataclasses below hold the data
    TYPE: ClassVar[MsgType]

    def _problem(self) -> str | None:
        """Why this message may not go on the wire, or None; checked on both ends."""
        return None


# --- handshake (the contents are handshake.py's business) ------------------------------------
@dataclass(frozen=True, slots=True)
class Hello(_Base):
    """``body`` is an encoded handshake.HelloBody: bytes, so the MAC covers what travelled."""
    body: bytes
    TYPE: ClassVar[MsgType] = MsgType.HELLO

    def _pack(self) -> tuple[Fields, Buffer]:
        return (0, 0, 0, 0, 0, 0, 0, 0, 0), self.body

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> Hello:
        return cls(bytes(payload))

    def _problem(self) -> str | None:
        return None if self.body else "empty HELLO"


@dataclass(frozen=True, slots=True)
class ChallengeResponse(_Base):
    mac: bytes
    TYPE: ClassVar[MsgType] = MsgType.CHALLENGE_RESPONSE

    def _pack(self) -> tuple[Fields, Buffer]:
        return (0, 0, 0, 0, 0, 0, 0, 0, 0), self.mac

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> ChallengeResponse:
        return cls(bytes(payload))

    def _problem(self) -> str | None:
        return None if len(self.mac) == MAC_LEN else f"response of {len(self.mac)} bytes"


@dataclass(frozen=True, slots=True)
class Welcome(_Base):
    version: int  # the protocol version both sides now speak
    TYPE: ClassVar[MsgType] = MsgType.WELCOME

    def _pack(self) -> tuple[Fields, Buffer]:
        return (0, 0, 0, 0, self.version, 0, 0, 0, 0), b""

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> Welcome:
        return cls(f[4])

    def _problem(self) -> str | None:
        return None if 1 <= self.version <= 255 else f"WELCOME version {self.version}"


@dataclass(frozen=True, slots=True)
class Goodbye(_Base):
    reason: str = ""  # for the peer's log; may be empty
    TYPE: ClassVar[MsgType] = MsgType.GOODBYE

    def _pack(self) -> tuple[Fields, Buffer]:
        return (0, 0, 0, 0, 0, 0, 0, 0, 0), self.reason.encode()

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> Goodbye:
        try:
            return cls(bytes(payload).decode())
        except UnicodeDecodeError:
            raise PeerProtocolError("GOODBYE reason is not UTF-8") from None

    def _problem(self) -> str | None:
        n = len(self.reason.encode())
        return None if n <= MAX_REASON else f"GOODBYE reason of {n} bytes"


@dataclass(frozen=True, slots=True)
class Heartbeat(_Base):
    seq: int  # the sender's heartbeat counter
    sent_ns: int  # the sender's clock, echoed back for the round-trip time
    epoch: int = 0
    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT

    def _pack(self) -> tuple[Fields, Buffer]:
        return (0, 0, 0, self.epoch, 0, self.seq, 0, 0, self.sent_ns), b""

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> Heartbeat:
        return cls(f[5], f[8], f[3])


@dataclass(frozen=True, slots=True)
class HeartbeatAck(_Base):
    seq: int  # the HEARTBEAT's counter
    echo_ns: int  # its sent_ns, unchanged
    epoch: int = 0
    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT_ACK

    def _pack(self) -> tuple[Fields, Buffer]:
        return (0, 0, 0, self.epoch, 0, self.seq, 0, 0, self.echo_ns), b""

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> HeartbeatAck:
        return cls(f[5], f[8], f[3])


# --- replicated I/O ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Write(_Base):
    """A sequenced write, sent by the sequencer to the other replicas."""
    lun: int
    epoch: int
    seq: int
    request_id: int
    lba: int
    blocks: int
    data: Buffer  # blocks * block_size bytes
    fua: bool = False
    TYPE: ClassVar[MsgType] = MsgType.WRITE

    def _pack(self) -> tuple[Fields, Buffer]:
        return ((FUA if self.fua else 0, self.lun, self.blocks, self.epoch, 0, self.seq,
                 self.request_id, self.lba, 0), self.data)

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> Write:
        return cls(f[1], f[3], f[5], f[6], f[7], f[2], payload, bool(f[0] & FUA))

    def _problem(self) -> str | None:
        return _data_problem(_nbytes(self.data), self.blocks)


@dataclass(frozen=True, slots=True)
class WriteSame(_Base):
    lun: int
    epoch: int
    seq: int
    request_id: int
    lba: int
    blocks: int  # how many times ``data`` is repeated
    data: Buffer  # one block
    fua: bool = False
    unmap: bool = False  # the receiver may deallocate instead when ``data`` is all zeroes
    TYPE: ClassVar[MsgType] = MsgType.WRITE_SAME

    def _pack(self) -> tuple[Fields, Buffer]:
        flags = (FUA if self.fua else 0) | (UNMAP_FLAG if self.unmap else 0)
        return ((flags, self.lun, self.blocks, self.epoch, 0, self.seq, self.request_id,
                 self.lba, 0), self.data)

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> WriteSame:
        return cls(f[1], f[3], f[5], f[6], f[7], f[2], payload, bool(f[0] & FUA),
                   bool(f[0] & UNMAP_FLAG))

    def _problem(self) -> str | None:
        return _same_problem(_nbytes(self.data), self.blocks)


@dataclass(frozen=True, slots=True)
class Unmap(_Base):
    lun: int
    epoch: int
    seq: int
    request_id: int
    ranges: tuple[tuple[int, int], ...]  # (lba, blocks) pairs
    TYPE: ClassVar[MsgType] = MsgType.UNMAP

    def _pack(self) -> tuple[Fields, Buffer]:
        return ((0, self.lun, 0, self.epoch, 0, self.seq, self.request_id, 0, 0),
                _encode_ranges(self.ranges))

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> Unmap:
        return cls(f[1], f[3], f[5], f[6], _decode_ranges(payload))

    def _problem(self) -> str | None:
        return None if self.ranges else "UNMAP without ranges"


@dataclass(frozen=True, slots=True)
class Flush(_Base):
    """Make everything sequenced before ``seq`` stable."""
    lun: int
    epoch: int
    seq: int
    request_id: int
    TYPE: ClassVar[MsgType] = MsgType.FLUSH

    def _pack(self) -> tuple[Fields, Buffer]:
        return (0, self.lun, 0, self.epoch, 0, self.seq, self.request_id, 0, 0), b""

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> Flush:
        return cls(f[1], f[3], f[5], f[6])


@dataclass(frozen=True, slots=True)
class Ack(_Base):
    """A replica's answer to WRITE, WRITE_SAME, UNMAP, FLUSH (and RESYNC_DATA)."""
    lun: int
    epoch: int
    seq: int
    request_id: int
    status: int = 0  # 0, or the errno the replica's backend failed with
    TYPE: ClassVar[MsgType] = MsgType.ACK

    def _pack(self) -> tuple[Fields, Buffer]:
        return (0, self.lun, 0, self.epoch, self.status, self.seq, self.request_id, 0, 0), b""

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> Ack:
        return cls(f[1], f[3], f[5], f[6], f[4])


# FORWARD carries the request as the frontend made it; what its payload holds depends on op.
_FORWARD_OPS = frozenset({BlockOp.WRITE, BlockOp.WRITE_SAME, BlockOp.UNMAP, BlockOp.FLUSH,
                          BlockOp.COMPARE_AND_WRITE, BlockOp.STATE, BlockOp.VERIFY})


@dataclass(frozen=True, slots=True)
class Forward(_Base):
    """A request that arrived at a non-sequencer node, sent to the sequencer to be numbered.

    The sequencer answers ORDERED with the seq it assigned (the forwarding node keeps its data
    and applies it at that seq) and sends the request to the other replicas as WRITE etc.
    """
    lun: int
    epoch: int
    request_id: int
    op: BlockOp
    lba: int = 0
    blocks: int = 0
    data: Buffer = b""  # as in BlockRequest; COMPARE_AND_WRITE: verify then write blocks
    ranges: tuple[tuple[int, int], ...] = ()  # UNMAP only
    fua: bool = False
    unmap: bool = False  # WRITE_SAME only
    TYPE: ClassVar[MsgType] = MsgType.FORWARD

    def _pack(self) -> tuple[Fields, Buffer]:
        flags = (FUA if self.fua else 0) | (UNMAP_FLAG if self.unmap else 0)
        payload = _encode_ranges(self.ranges) if self.op == BlockOp.UNMAP else self.data
        return ((flags, self.lun, self.blocks, self.epoch, self.op, 0, self.request_id,
                 self.lba, 0), payload)

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> Forward:
        if f[4] not in _FORWARD_OPS:
            raise PeerProtocolError(f"FORWARD of op {f[4]}")
        op = BlockOp(f[4])
        data, ranges = (b"", _decode_ranges(payload)) if op == BlockOp.UNMAP else (payload, ())
        return cls(f[1], f[3], f[6], op, f[7], f[2], data, ranges, bool(f[0] & FUA),
                   bool(f[0] & UNMAP_FLAG))

    def _problem(self) -> str | None:
        op, n = self.op, _nbytes(self.data)
        if op not in _FORWARD_OPS:
            return f"FORWARD of op {op}"
        if (self.unmap and op != BlockOp.WRITE_SAME) or (self.ranges and op != BlockOp.UNMAP):
            return f"FORWARD {op.name} with the unmap flag or ranges"
        if op in (BlockOp.WRITE, BlockOp.COMPARE_AND_WRITE):
            return _data_problem(n, self.blocks, 2 if op == BlockOp.COMPARE_AND_WRITE else 1)
        if op == BlockOp.WRITE_SAME:
            return _same_problem(n, self.blocks)
        if op == BlockOp.STATE:
            if self.lba or self.blocks or self.fua or not n:
                return "FORWARD STATE with an address or FUA, or without a record"
            return None
        if op == BlockOp.VERIFY:
            if not self.blocks or n or self.fua:
                return "FORWARD VERIFY without blocks, or with data or FUA"
            return None
        # UNMAP and FLUSH address nothing through lba/blocks and carry no data.
        if self.lba or self.blocks or n or self.fua:
            return f"FORWARD {op.name} with an address, data or FUA"
        return "UNMAP without ranges" if op == BlockOp.UNMAP and not self.ranges else None

    def to_request(self) -> BlockRequest:
        data = None if self.op in (BlockOp.UNMAP, BlockOp.FLUSH, BlockOp.VERIFY) else self.data
        return BlockRequest(self.op, self.lba, self.blocks, data, self.fua, self.ranges,
                            self.unmap)


@dataclass(frozen=True, slots=True)
class Ordered(_Base):
    """The sequencer's answer to FORWARD."""
    lun: int
    epoch: int
    seq: int  # where the request sits in the LUN's order (meaningless when status != 0)
    request_id: int  # the FORWARD's
    status: int = 0  # 0, or an errno: the request was refused and will not be applied
    # COMPARE_AND_WRITE: the byte offset of the first mismatch when status is EILSEQ.
    info: int = 0
    TYPE: ClassVar[MsgType] = MsgType.ORDERED

    def _pack(self) -> tuple[Fields, Buffer]:
        return ((0, self.lun, 0, self.epoch, self.status, self.seq, self.request_id, 0,
                 self.info), b"")

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> Ordered:
        return cls(f[1], f[3], f[5], f[6], f[4], f[8])


@dataclass(frozen=True, slots=True)
class CompareAndWrite(_Base):
    """A sequenced COMPARE AND WRITE: every replica compares and writes in sequence order, so
    all of them, holding the same data, reach the same outcome (the origin answers its own)."""
    lun: int
    epoch: int
    seq: int
    request_id: int
    lba: int
    blocks: int
    data: Buffer  # verify blocks then write blocks
    fua: bool = False
    TYPE: ClassVar[MsgType] = MsgType.COMPARE_AND_WRITE

    def _pack(self) -> tuple[Fields, Buffer]:
        return ((FUA if self.fua else 0, self.lun, self.blocks, self.epoch, 0, self.seq,
                 self.request_id, self.lba, 0), self.data)

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> CompareAndWrite:
        return cls(f[1], f[3], f[5], f[6], f[7], f[2], payload, bool(f[0] & FUA))

    def _problem(self) -> str | None:
        return _data_problem(_nbytes(self.data), self.blocks, 2)


@dataclass(frozen=True, slots=True)
class State(_Base):
    """A sequenced change of the LUN's shared SCSI state (protocol.scsi.shared's record)."""
    lun: int
    epoch: int
    seq: int
    request_id: int
    record: Buffer
    TYPE: ClassVar[MsgType] = MsgType.STATE

    def _pack(self) -> tuple[Fields, Buffer]:
        return (0, self.lun, 0, self.epoch, 0, self.seq, self.request_id, 0, 0), self.record

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> State:
        return cls(f[1], f[3], f[5], f[6], bytes(payload))

    def _problem(self) -> str | None:
        return None if _nbytes(self.record) else "STATE without a record"


class ControlKind(enum.IntEnum):
    SYNC_BEGIN = 1  # source -> target: a resync starts; value = the sync handle
    JOIN = 2  # source -> target: resync done, in sync from epoch ``epoch``; body = generations
    STATE = 3  # a node's replica state after a link came up; body = generations and bitmap
    INFO = 4  # a node's software version and shared-config digest (lun 0); body = JSON
    VOTE = 5  # node -> witness: its vote for ``epoch`` (lun 0); ACK status 0 or EPERM
    DRILL = 6  # a failover drill: the receiver plays a hung node for ``value`` ms (lun 0)
    ACTIVE = 7  # with several networks: this link carries the replication (lun 0; sent by
    #             the node with the lower id, first thing on the link it chose)
    VIEW = 8  # three or more nodes: a membership message (lun 0; body: mirror.membership)
    REPAIR = 9  # verify's repair: the peer holds writes (value 1) while the source copies
    #             the differing regions over its own (RESYNC_DATA), until released (value 0)
    RECONCILE = 10  # three or more nodes, a LUN's epoch change run by its source (the lowest
    #                 member): ``value`` says which step (vsand/viewlun.py), ``body`` a bitmap
    #                 or the new epoch's replicas
    STABLE = 11  # three or more nodes: every sequence number up to ``value`` is applied here


@dataclass(frozen=True, slots=True)
class Control(_Base):
    """A change of a LUN's replication state between two nodes, answered by ACK
    (``request_id`` echoed, ``status`` 0 or an errno)."""
    lun: int
    kind: ControlKind
    request_id: int
    epoch: int = 0
    value: int = 0
    body: bytes = b""
    TYPE: ClassVar[MsgType] = MsgType.CONTROL

    def _pack(self) -> tuple[Fields, Buffer]:
        return ((0, self.lun, 0, self.epoch, self.kind, 0, self.request_id, 0, self.value),
                self.body)

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> Control:
        try:
            kind = ControlKind(f[4])
        except ValueError:
            raise PeerProtocolError(f"CONTROL of kind {f[4]}") from None
        return cls(f[1], kind, f[6], f[3], f[8], bytes(payload))


# --- resync, verify ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Generations(_Base):
    """A node's data generation identifiers for one LUN (the blob generations.py defines)."""
    lun: int
    blob: bytes
    TYPE: ClassVar[MsgType] = MsgType.GENERATIONS

    def _pack(self) -> tuple[Fields, Buffer]:
        return (0, self.lun, 0, 0, 0, 0, 0, 0, 0), self.blob

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> Generations:
        return cls(f[1], bytes(payload))


@dataclass(frozen=True, slots=True)
class ResyncRequest(_Base):
    lun: int
    request_id: int
    lba: int
    blocks: int
    TYPE: ClassVar[MsgType] = MsgType.RESYNC_REQUEST

    def _pack(self) -> tuple[Fields, Buffer]:
        return (0, self.lun, self.blocks, 0, 0, 0, self.request_id, self.lba, 0), b""

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> ResyncRequest:
        return cls(f[1], f[6], f[7], f[2])

    def _problem(self) -> str | None:
        return None if self.blocks >= 1 else "RESYNC_REQUEST of no blocks"


@dataclass(frozen=True, slots=True)
class ResyncData(_Base):
    lun: int
    request_id: int  # the RESYNC_REQUEST's, or 0 when the source pushes
    seq: int  # the data includes every write sequenced before this
    lba: int
    blocks: int
    data: Buffer
    TYPE: ClassVar[MsgType] = MsgType.RESYNC_DATA

    def _pack(self) -> tuple[Fields, Buffer]:
        return (0, self.lun, self.blocks, 0, 0, self.seq, self.request_id, self.lba, 0), self.data

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> ResyncData:
        return cls(f[1], f[6], f[5], f[7], f[2], payload)

    def _problem(self) -> str | None:
        return _data_problem(_nbytes(self.data), self.blocks)


@dataclass(frozen=True, slots=True)
class VerifyRequest(_Base):
    """Sequenced like a write over the region: every replica checksums it at that point of
    the order and answers VERIFY_RESULT to the request's origin before its ACK."""
    lun: int
    request_id: int
    seq: int  # checksum the region as of this point in the LUN's write order
    lba: int
    blocks: int
    epoch: int = 0
    TYPE: ClassVar[MsgType] = MsgType.VERIFY_REQUEST

    def _pack(self) -> tuple[Fields, Buffer]:
        return ((0, self.lun, self.blocks, self.epoch, 0, self.seq, self.request_id, self.lba,
                 0), b"")

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> VerifyRequest:
        return cls(f[1], f[6], f[5], f[7], f[2], f[3])

    def _problem(self) -> str | None:
        return None if self.blocks >= 1 else "VERIFY_REQUEST of no blocks"


@dataclass(frozen=True, slots=True)
class VerifyResult(_Base):
    lun: int
    request_id: int
    seq: int
    lba: int
    blocks: int
    checksum: bytes  # empty when status != 0
    status: int = 0
    TYPE: ClassVar[MsgType] = MsgType.VERIFY_RESULT

    def _pack(self) -> tuple[Fields, Buffer]:
        return ((0, self.lun, self.blocks, 0, self.status, self.seq, self.request_id,
                 self.lba, 0), self.checksum)

    @classmethod
    def _unpack(cls, f: Fields, payload: memoryview) -> VerifyResult:
        return cls(f[1], f[6], f[5], f[7], f[2], bytes(payload), f[4])

    def _problem(self) -> str | None:
        n = len(self.checksum)
        return None if n <= MAX_CHECKSUM else f"VERIFY_RESULT checksum of {n} bytes"


Message: TypeAlias = (Hello | ChallengeResponse | Welcome | Goodbye | Heartbeat | HeartbeatAck
                      | Write | WriteSame | Unmap | Flush | Ack | Forward | Ordered
                      | CompareAndWrite | Control | State
                      | Generations | ResyncRequest | ResyncData | VerifyRequest | VerifyResult)

_Unpack: TypeAlias = Callable[[Fields, memoryview], Message]
_DECODERS: dict[int, _Unpack] = {
    cls.TYPE: cls._unpack for cls in (
        Hello, ChallengeResponse, Welcome, Goodbye, Heartbeat, HeartbeatAck, Write, WriteSame,
        Unmap, Flush, Ack, Forward, Ordered, CompareAndWrite, Control, State, Generations, ResyncRequest, ResyncData,
        VerifyRequest, VerifyResult)
}
assert set(_DECODERS) == set(MsgType)


def encode(msg: Message) -> list[Buffer]:
    """Header, payload object (not copied) and payload CRC, for ``transport.writelines``.

    A message the receiver would refuse raises ValueError: a programming error on this side.
    """
    problem = msg._problem()
    if problem:
        raise ValueError(problem)
    fields, payload = msg._pack()
    n = _nbytes(payload)
    try:
        head = _HEAD.pack(MAGIC, FRAME_VERSION, msg.TYPE, *fields[:2], n, *fields[2:], 0)
    except struct.error as e:
        raise ValueError(f"{msg.TYPE.name}: a field is out of range ({e})") from None
    if not n:
        return [head + _CRC.pack(crc32c(head))]
    return [head + _CRC.pack(crc32c(head)), payload, _CRC.pack(crc32c(payload))]


class MessageReader(ReceiveBuffer):
    """Accumulates received bytes; ``next_message`` returns each message once it is whole.

    Bytes live in one buffer that the socket reads straight into (``writable``/``commit``, for
    ``asyncio.BufferedProtocol``) or that ``feed`` copies into; bulk payloads are views of it.
    It is never changed in place while such a view may be alive: the unread bytes move to a
    fresh buffer instead, so a held view costs memory, not correctness (drop it once applied).
    A payload length over ``max_payload`` is refused from the header, before any of it is
    buffered.  After a PeerProtocolError the stream is out of step: discard the reader.
    """

    __slots__ = ("max_payload",)

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        if max_payload < 0:
            raise ValueError("max_payload must not be negative")
        self.max_payload = max_payload
        super().__init__(MIN_CAPACITY)

    def writable(self, min_room: int = MIN_ROOM) -> memoryview:
        return super().writable(min_room)

    def next_message(self) -> Message | None:
        """The next whole message, or None until more bytes arrive."""
        pos = self._pos
        if self._end - pos < HEADER_LEN:
            return None
        view = memoryview(self._buf)
        (magic, version, mtype, flags, lun, length, blocks, epoch, arg, seq, request_id, lba,
         arg64, reserved) = _HEAD.unpack_from(view, pos)
        # Magic and version first: a stranger (or an old node) gets a message that says so.
        if magic != MAGIC:
            raise PeerProtocolError(f"bad magic {bytes(magic)!r}: not a vsand peer")
        if version != FRAME_VERSION:
            raise PeerProtocolError(f"frame version {version}, this node speaks "
                                    f"{FRAME_VERSION}")
        head_end = pos + _HEAD.size
        (want,) = _CRC.unpack_from(view, head_end)
        if crc32c(view[pos:head_end]) != want:
            raise PeerProtocolError("header CRC mismatch")
        unpack = _DECODERS.get(mtype)
        if unpack is None:
            raise PeerProtocolError(f"unknown message type {mtype}")
        if length > self.max_payload:
            raise PeerProtocolError(f"{MsgType(mtype).name} payload of {length} bytes exceeds "
                                    f"the limit of {self.max_payload}")
        if reserved:
            raise PeerProtocolError("reserved header word is not zero")
        data_at = pos + HEADER_LEN
        end = data_at + length + (TRAILER_LEN if length else 0)
        if self._end < end:
            self.need = end - pos
            return None
        self.need = 0
        self._pos = end
        # An empty payload must not be a view: it would pin this buffer for nothing.
        payload = view[data_at:data_at + length] if length else _EMPTY
        if length and crc32c(payload) != _CRC.unpack_from(view, data_at + length)[0]:
            raise PeerProtocolError(f"{MsgType(mtype).name} payload CRC mismatch")
        fields = (flags, lun, blocks, epoch, arg, seq, request_id, lba, arg64)
        msg = unpack(fields, payload)
        problem = msg._problem()
        if problem:
            raise PeerProtocolError(problem)
        # Canonical form: what re-encodes differently had bits that mean nothing here.
        used, again = msg._pack()
        if used != fields:
            raise PeerProtocolError(f"{msg.TYPE.name} with header fields or flags set that "
                                    "it does not use")
        if _nbytes(again) != length:
            raise PeerProtocolError(f"{msg.TYPE.name} with {length} payload bytes, of which "
                                    f"it uses {_nbytes(again)}")
        return msg
