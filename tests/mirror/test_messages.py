import random
import re
import struct

import pytest
from hypothesis import given, settings, strategies as st

from vsand.mirror import messages as m
from vsand.mirror.messages import HEADER_LEN, MessageReader, MsgType, PeerProtocolError, encode
from vsand.protocol.block import BlockOp

HEAD = struct.Struct("!2sBBHHIIIIQQQQI")


def samples() -> list[m.Message]:
    """One or more of every message type, with every optional field set somewhere."""
    block = bytes(range(256)) * 2
    return [
        m.Hello(b"an encoded HelloBody"),
        m.ChallengeResponse(b"\x01" * 32),
        m.Welcome(1),
        m.Goodbye("LUN x: 2 blocks here, 3 at node b"),
        m.Goodbye(),
        m.Heartbeat(5, 123456789012345, 3),
        m.HeartbeatAck(5, 123456789012345, 3),
        m.Write(1, 2, 3, 4, 5, 2, block * 2, fua=True),
        m.Write(65535, 2**32 - 1, 2**64 - 1, 2**64 - 1, 2**64 - 1, 1, memoryview(block)),
        m.WriteSame(1, 2, 3, 4, 100, 8, block, fua=True, unmap=True),
        m.WriteSame(1, 2, 3, 4, 100, 8, bytes(4096)),
        m.Unmap(1, 2, 3, 4, ((0, 8), (2**64 - 1, 2**32 - 1))),
        m.Flush(1, 2, 3, 4),
        m.Ack(1, 2, 3, 4),
        m.Ack(1, 2, 3, 4, status=5),
        m.Forward(1, 2, 9, BlockOp.WRITE, 10, 1, block, fua=True),
        m.Forward(1, 2, 9, BlockOp.WRITE_SAME, 10, 4, block, unmap=True),
        m.Forward(1, 2, 9, BlockOp.UNMAP, ranges=((1, 2), (3, 4))),
        m.Forward(1, 2, 9, BlockOp.FLUSH),
        m.Forward(1, 2, 9, BlockOp.COMPARE_AND_WRITE, 10, 1, block * 2),
        m.Ordered(1, 2, 3, 9),
        m.Ordered(1, 2, 0, 9, status=84, info=511),
        m.CompareAndWrite(1, 2, 3, 4, 5, 1, block * 2, fua=True),
        m.Control(1, m.ControlKind.JOIN, 7, epoch=3, value=2**64 - 1, body=b"gens"),
        m.Control(1, m.ControlKind.SYNC_BEGIN, 8),
        m.State(1, 2, 3, 4, b"record"),
        m.Forward(1, 2, 9, BlockOp.STATE, data=b"record"),
        m.Generations(1, b"generation blob"),
        m.Generations(1, b""),
        m.ResyncRequest(1, 2, 3, 4),
        m.ResyncData(1, 2, 3, 4, 1, block),
        m.VerifyRequest(1, 2, 3, 4, 5),
        m.VerifyResult(1, 2, 3, 4, 5, b"\xaa" * 32),
        m.VerifyResult(1, 2, 3, 4, 5, b"", status=5),
    ]


def wire(msg: m.Message) -> bytes:
    return b"".join(encode(msg))


def raw(mtype: int, payload: bytes = b"", *, magic: bytes = b"VM", version: int = 1,
        flags: int = 0, lun: int = 0, length: int | None = None, blocks: int = 0,
        epoch: int = 0, arg: int = 0, seq: int = 0, rid: int = 0, lba: int = 0, arg64: int = 0,
        reserved: int = 0) -> bytes:
    """A frame with correct CRCs and whatever fields the test wants."""
    n = len(payload) if length is None else length
    head = HEAD.pack(magic, version, mtype, flags, lun, n, blocks, epoch, arg, seq, rid, lba,
                     arg64, reserved)
    out = head + struct.pack("!I", m.crc32c(head))
    if payload:
        out += payload + struct.pack("!I", m.crc32c(payload))
    return out


def parse_all(data: bytes, chunks: list[int] | None = None,
              reader: MessageReader | None = None) -> tuple[list[m.Message], str | None]:
    """Feed ``data`` in pieces; the messages parsed and the error, if any."""
    reader = reader or MessageReader()
    sizes = chunks or [len(data)]
    out: list[m.Message] = []
    at = 0
    try:
        for size in sizes:
            reader.feed(data[at:at + size])
            at += size
            while (msg := reader.next_message()) is not None:
                out.append(msg)
        if at < len(data):
            reader.feed(data[at:])
            while (msg := reader.next_message()) is not None:
                out.append(msg)
    except PeerProtocolError as e:
        return out, e.reason
    return out, None


def test_samples_cover_every_type():
    assert {type(msg).TYPE for msg in samples()} == set(MsgType)


@pytest.mark.parametrize("msg", samples(), ids=lambda msg: type(msg).__name__)
def test_round_trip(msg):
    data = wire(msg)
    assert data[:2] == b"VM" and data[3] == msg.TYPE
    got, err = parse_all(data)
    assert err is None and got == [msg]
    assert wire(got[0]) == data
    # Byte by byte: the same message, once.
    got, err = parse_all(data, [1] * len(data))
    assert err is None and got == [msg]


def test_stream_of_all_messages_in_random_chunks():
    data = b"".join(wire(msg) for msg in samples())
    rng = random.Random(1)
    for _ in range(20):
        chunks = [rng.randint(1, 300) for _ in range(len(data) // 50)]
        got, err = parse_all(data, chunks)
        assert err is None and got == samples()


def test_empty_payload_has_no_trailer():
    assert len(wire(m.Flush(1, 2, 3, 4))) == HEADER_LEN
    assert len(wire(m.Goodbye())) == HEADER_LEN
    assert len(wire(m.Goodbye("x"))) == HEADER_LEN + 1 + 4


def test_encode_does_not_copy_the_payload():
    data = bytearray(4096)
    parts = encode(m.Write(0, 0, 1, 1, 0, 8, data))
    assert len(parts) == 3 and parts[1] is data
    assert len(parts[0]) == HEADER_LEN
    view = memoryview(data)
    assert encode(m.ResyncData(0, 0, 0, 0, 8, view))[1] is view


def test_payload_is_a_view_into_the_reader_buffer():
    reader = MessageReader()
    reader.feed(wire(m.Write(0, 0, 1, 1, 0, 1, b"\x07" * 512)))
    msg = reader.next_message()
    assert isinstance(msg, m.Write)
    assert isinstance(msg.data, memoryview)
    assert msg.data.obj is reader._buf  # no copy: the bytes the socket wrote into
    assert msg.data.readonly is False and bytes(msg.data) == b"\x07" * 512


def test_buffered_protocol_path_receives_straight_into_the_buffer():
    frame = wire(m.Write(0, 0, 1, 1, 0, 2048, bytes(range(256)) * 4096))  # 1 MiB
    reader = MessageReader()
    at = 0
    msg = None
    while msg is None:
        buf = reader.writable()
        n = min(len(buf), len(frame) - at, 100_000)
        buf[:n] = frame[at:at + n]
        del buf
        reader.commit(n)
        at += n
        msg = reader.next_message()
    assert at == len(frame) and isinstance(msg, m.Write)
    assert msg.data.obj is reader._buf and msg.data == bytes(range(256)) * 4096


def test_writable_covers_the_rest_of_a_large_frame():
    frame = wire(m.Write(0, 0, 1, 1, 0, 8 * 2048, bytes(8 * 1024 * 1024)))
    reader = MessageReader()
    reader.feed(frame[:HEADER_LEN + 10])
    assert reader.next_message() is None
    assert len(reader.writable()) >= len(frame) - HEADER_LEN - 10


def test_a_held_view_is_never_overwritten():
    first = m.Write(0, 0, 1, 1, 0, 1, b"\x01" * 512)
    reader = MessageReader()
    reader.feed(wire(first))
    held = reader.next_message()
    assert isinstance(held, m.Write)
    others = [m.Write(0, 0, i, i, 0, 128, bytes([i]) * 65536) for i in range(2, 40)]
    for other in others:
        data = wire(other)
        buf = reader.writable()
        buf[:len(data)] = data
        del buf
        reader.commit(len(data))
        assert reader.next_message() == other
        reader.feed(wire(m.Flush(0, 0, 0, 0)))
        assert isinstance(reader.next_message(), m.Flush)
    assert bytes(held.data) == b"\x01" * 512


def test_trailing_partial_frame_waits():
    data = wire(m.Ack(1, 2, 3, 4)) + wire(m.Write(0, 0, 1, 1, 0, 1, bytes(512)))[:100]
    reader = MessageReader()
    reader.feed(data)
    assert reader.next_message() == m.Ack(1, 2, 3, 4)
    assert reader.next_message() is None
    assert reader.buffered == 100


# --- limits and refusals ----------------------------------------------------------------------

def test_oversized_length_refused_from_the_header_alone():
    reader = MessageReader(max_payload=4096)
    reader.feed(raw(MsgType.WRITE, length=4097, blocks=8)[:HEADER_LEN])
    with pytest.raises(PeerProtocolError, match="4097 bytes exceeds the limit of 4096"):
        reader.next_message()


def test_huge_length_refused_by_default():
    reader = MessageReader()
    reader.feed(raw(MsgType.WRITE, length=2**32 - 1, blocks=1)[:HEADER_LEN])
    with pytest.raises(PeerProtocolError, match="exceeds"):
        reader.next_message()
    assert len(reader._buf) < 1024 * 1024  # nothing was allocated for it


def test_payload_at_the_limit_is_accepted():
    msg = m.Write(0, 0, 1, 1, 0, 8, bytes(4096))
    got, err = parse_all(wire(msg), reader=MessageReader(max_payload=4096))
    assert err is None and got == [msg]


def test_default_limit_takes_an_8_MiB_write():
    msg = m.Write(0, 0, 1, 1, 0, 2048, bytes(8 * 1024 * 1024))
    got, err = parse_all(wire(msg))
    assert err is None and got == [msg]


@pytest.mark.parametrize("frame, reason", [
    (raw(1, magic=b"GE"), "bad magic"),
    (raw(MsgType.FLUSH, version=2), "frame version 2"),
    (raw(99), "unknown message type 99"),
    (raw(0), "unknown message type 0"),
    (raw(MsgType.FLUSH, reserved=1), "reserved"),
    (raw(MsgType.FLUSH, flags=m.FUA), "does not use"),
    (raw(MsgType.WRITE, bytes(512), blocks=1, flags=0x4), "does not use"),
    (raw(MsgType.WRITE, bytes(512), blocks=1, arg=1), "does not use"),
    (raw(MsgType.ACK, arg64=1), "does not use"),
    (raw(MsgType.FLUSH, b"x"), "does not use|payload"),
    (raw(MsgType.WRITE, bytes(500), blocks=1), "500 bytes of data for 1 blocks"),
    (raw(MsgType.WRITE, bytes(1024), blocks=3), "1024 bytes of data for 3 blocks"),
    (raw(MsgType.WRITE, b"", blocks=0), "at least one block"),
    (raw(MsgType.WRITE_SAME, bytes(1024), blocks=0), "no blocks"),
    (raw(MsgType.WRITE_SAME, bytes(1000), blocks=2), "block of 1000 bytes"),
    (raw(MsgType.UNMAP, bytes(13)), "ranges of 13 bytes"),
    (raw(MsgType.UNMAP), "without ranges"),
    (raw(MsgType.CHALLENGE_RESPONSE, bytes(31)), "response of 31 bytes"),
    (raw(MsgType.WELCOME, arg=0), "WELCOME version 0"),
    (raw(MsgType.GOODBYE, b"\xff"), "not UTF-8"),
    (raw(MsgType.GOODBYE, b"x" * 1025), "reason of 1025 bytes"),
    (raw(MsgType.FORWARD, arg=BlockOp.READ), "FORWARD of op 1"),
    (raw(MsgType.FORWARD, arg=BlockOp.FLUSH, lba=1), "address"),
    (raw(MsgType.FORWARD, bytes(512), arg=BlockOp.WRITE, blocks=1, flags=m.UNMAP_FLAG),
     "unmap flag"),
    (raw(MsgType.FORWARD, bytes(512), arg=BlockOp.COMPARE_AND_WRITE, blocks=1),
     "512 bytes of data"),
    (raw(MsgType.VERIFY_RESULT, bytes(65)), "checksum of 65 bytes"),
    (raw(MsgType.RESYNC_REQUEST), "no blocks"),
    (raw(MsgType.HELLO), "empty HELLO"),
])
def test_refusals(frame, reason):
    got, err = parse_all(frame)
    assert got == [] and err is not None
    assert re.search(reason, err), err


def test_encode_refuses_what_the_receiver_would():
    with pytest.raises(ValueError, match="100 bytes"):
        encode(m.Write(0, 0, 0, 0, 0, 1, bytes(100)))
    with pytest.raises(ValueError, match="out of range"):
        encode(m.Ack(70000, 0, 0, 0))
    with pytest.raises(ValueError, match="out of range"):
        encode(m.Heartbeat(-1, 0))
    with pytest.raises(ValueError, match="response of 31 bytes"):
        encode(m.ChallengeResponse(bytes(31)))
    with pytest.raises(ValueError, match="1024 bytes of data for 2 blocks"):
        encode(m.Forward(0, 0, 0, BlockOp.COMPARE_AND_WRITE, 0, 2, bytes(1024)))


@pytest.mark.parametrize("msg", [msg for msg in samples() if len(wire(msg)) < 400],
                         ids=lambda msg: type(msg).__name__)
def test_corruption_at_every_byte_is_detected(msg):
    frame = wire(msg)
    for i in range(len(frame)):
        for bit in (0x01, 0x80, 0x5A):
            bad = bytearray(frame)
            bad[i] ^= bit
            got, err = parse_all(bytes(bad))
            assert got == [] and err is not None, (i, bit)


def test_corruption_of_a_large_payload_is_detected():
    frame = bytearray(wire(m.Write(0, 0, 1, 1, 0, 2, bytes(range(256)) * 4)))
    for i in range(HEADER_LEN, len(frame), 37):
        bad = bytearray(frame)
        bad[i] ^= 0x10
        assert parse_all(bytes(bad))[1] is not None


def test_forward_to_request():
    f = m.Forward(1, 2, 9, BlockOp.WRITE, 5, 1, bytes(512), fua=True).to_request()
    assert (f.op, f.lba, f.blocks, f.fua, f.data) == (BlockOp.WRITE, 5, 1, True, bytes(512))
    f = m.Forward(1, 2, 9, BlockOp.UNMAP, ranges=((1, 2),)).to_request()
    assert (f.op, f.ranges, f.data) == (BlockOp.UNMAP, ((1, 2),), None)
    f = m.Forward(1, 2, 9, BlockOp.WRITE_SAME, 6, 9, bytes(512), unmap=True).to_request()
    assert (f.op, f.lba, f.blocks, f.unmap) == (BlockOp.WRITE_SAME, 6, 9, True)
    assert m.Forward(1, 2, 9, BlockOp.FLUSH).to_request().op == BlockOp.FLUSH


# --- fuzz ---------------------------------------------------------------------------------------

def check_any_input(data: bytes, cuts: list[int]) -> None:
    """Whole, byte by byte and in chunks: the same messages and the same verdict."""
    whole = parse_all(data)
    msgs, err = whole
    # Whatever parsed is canonical: it encodes back to exactly the bytes it came from.
    consumed = b"".join(wire(msg) for msg in msgs)
    assert data.startswith(consumed)
    assert parse_all(data, [1] * len(data)) == whole
    assert parse_all(data, cuts) == whole


_message = st.sampled_from(samples())


@st.composite
def _valid_crc_frame(draw: st.DrawFn) -> bytes:
    """A frame whose CRCs are right but whose fields are arbitrary: reaches the decoders."""
    mtype = draw(st.sampled_from(list(MsgType)) | st.integers(0, 255))
    payload = draw(st.binary(max_size=600) | st.sampled_from([bytes(512), bytes(1024),
                                                               bytes(32), b""]))
    small = st.integers(0, 3)
    return raw(mtype, payload, flags=draw(st.integers(0, 3) | st.integers(0, 0xFFFF)),
               lun=draw(small), blocks=draw(st.integers(0, 4)), epoch=draw(small),
               arg=draw(st.integers(0, 9)), seq=draw(small), rid=draw(small),
               lba=draw(small), arg64=draw(small), reserved=draw(st.sampled_from([0, 0, 1])))


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    frames = draw(st.lists(_message.map(wire) | _valid_crc_frame(), min_size=1, max_size=4))
    data = bytearray(b"".join(frames))
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


_cuts = st.lists(st.integers(1, 97), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), _cuts)
def test_fuzz_arbitrary_bytes(data, cuts):
    check_any_input(data, cuts)


@settings(max_examples=500, deadline=None)
@given(_mutated(), _cuts)
def test_fuzz_mutated_frames(data, cuts):
    check_any_input(data, cuts)


@settings(max_examples=500, deadline=None)
@given(st.lists(_valid_crc_frame(), min_size=1, max_size=3).map(b"".join), _cuts)
def test_fuzz_well_checksummed_frames(data, cuts):
    check_any_input(data, cuts)
