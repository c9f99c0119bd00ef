import struct

import pytest
from hypothesis import given, settings, strategies as st

from vsand.protocol.iscsi import pdu
from vsand.protocol.iscsi.framing import PduReader, frame
from vsand.protocol.iscsi.pdu import Op, PduError


def bhs(op: int, b1: int = 0x80, data_len: int = 0, ahs_words: int = 0, lunf: int = 0,
        itt: int = 1, words: tuple[int, ...] = (0,) * 7, immediate: bool = False,
        b2: int = 0, b3: int = 0) -> bytes:
    return struct.pack(">BBBBIQI7I", op | (0x40 if immediate else 0), b1, b2, b3,
                       (ahs_words << 24) | data_len, lunf, itt, *words)


def whole(header: bytes, data: bytes = b"") -> bytes:
    return header + data + pdu.pad_for(len(data))


def test_scsi_command_fields():
    cdb = bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0]) + bytes(6)
    h = bhs(Op.SCSI_CMD, 0x80 | 0x40 | 0x01, lunf=pdu.encode_lun(3), itt=0x1234,
            words=(4096, 7, 9, 0, 0, 0, 0))[:32] + cdb
    msg = pdu.decode(h, b"", memoryview(b""))
    assert isinstance(msg, pdu.ScsiCommandPdu)
    assert msg.final and msg.read and not msg.write and msg.attr == 1
    assert pdu.decode_lun(msg.lun) == 3
    assert (msg.itt, msg.edtl, msg.cmdsn, msg.expstatsn) == (0x1234, 4096, 7, 9)
    assert msg.cdb == cdb


def test_extended_cdb_ahs():
    cdb = bytes(range(1, 17))
    ext = bytes(range(17, 33))
    ahs = struct.pack(">HBB", len(ext) + 1, 1, 0) + ext
    ahs += pdu.pad_for(len(ahs))
    h = bhs(Op.SCSI_CMD, 0x80, ahs_words=len(ahs) // 4)[:32] + cdb
    msg = pdu.decode(h, ahs, memoryview(b""))
    assert msg.cdb == cdb + ext


def test_login_request_fields():
    isid = 0x23D000000001
    h = bhs(Op.LOGIN_REQ, 0x80 | 0x04 | 0x01, immediate=True, lunf=(isid << 16) | 5,
            words=(0x0007 << 16, 11, 12, 0, 0, 0, 0), b2=0, b3=0)
    msg = pdu.decode(h, b"", memoryview(b"a=b\0"))
    assert isinstance(msg, pdu.LoginRequest)
    assert msg.transit and msg.csg == 1 and msg.nsg == 1
    assert (msg.isid, msg.tsih, msg.cid, msg.cmdsn, msg.expstatsn) == (isid, 5, 7, 11, 12)


def test_target_opcode_from_initiator_is_rejected():
    with pytest.raises(PduError) as e:
        pdu.decode(bhs(Op.SCSI_RSP), b"", memoryview(b""))
    assert e.value.reason == pdu.RejectReason.PROTOCOL_ERROR


def test_lun_encoding_round_trip():
    for n in (0, 1, 255, 256, 1000, 16383):
        assert pdu.decode_lun(pdu.encode_lun(n)) == n


def test_data_in_with_status_and_underflow():
    h = pdu.data_in(7, 0, 2, 8192, 512, True, 0, 40, 41, 60, 100)
    b0, b1, _, st, dl, lunf, itt, ttt, statsn, exp, mx, datasn, off, resid = struct.unpack(
        ">BBBBIQI7I", h)
    assert b0 == Op.DATA_IN and b1 == 0x80 | 0x01 | 0x02
    assert (dl, itt, ttt, statsn, exp, mx, datasn, off, resid) == (
        512, 7, 0xFFFFFFFF, 40, 41, 60, 2, 8192, 100)


def test_scsi_response_overflow_flag():
    h = pdu.scsi_response(1, 0, 1, 2, 3, -10, 0)
    assert h[1] == 0x80 | 0x04 and struct.unpack_from(">I", h, 44)[0] == 10


def test_reader_whole_and_byte_at_a_time():
    p1 = whole(bhs(Op.NOP_OUT, itt=1, data_len=5, immediate=True), b"hello")
    p2 = whole(bhs(Op.NOP_OUT, itt=2))
    stream = p1 + p2
    for chunk in (len(stream), 1, 7):
        r = PduReader(8192)
        got = []
        for i in range(0, len(stream), chunk):
            r.feed(stream[i:i + chunk])
            while (item := r.next_pdu()) is not None:
                got.append(pdu.decode(*item))
        assert [g.itt for g in got] == [1, 2]
        assert bytes(got[0].data) == b"hello"
        assert r.buffered == 0


def test_reader_refuses_oversized_segment_before_buffering():
    r = PduReader(8192)
    r.feed(bhs(Op.SCSI_CMD, data_len=1 << 23))
    with pytest.raises(PduError) as e:
        r.next_pdu()
    assert e.value.fatal


def test_frame_pads_without_copying_payload():
    payload = memoryview(bytearray(b"abcde"))
    parts = frame(b"h" * 48, payload)
    assert parts[1] is payload and parts[2] == b"\0\0\0"


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.integers(1, 64))
def test_fuzz_reader_and_decoder_only_raise_protocol_errors(data, chunk):
    r = PduReader(256)
    try:
        for i in range(0, len(data), chunk):
            r.feed(data[i:i + chunk])
            while (item := r.next_pdu()) is not None:
                try:
                    pdu.decode(*item)
                except PduError:
                    pass
    except PduError as e:
        assert e.fatal


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0x3F), st.integers(0, 255), st.binary(min_size=40, max_size=40),
       st.binary(max_size=64))
def test_fuzz_headers_of_every_opcode(op, b1, rest, ahs):
    header = bytes([op, b1]) + rest[:2] + bytes([len(ahs) // 4, 0, 0, 0]) + rest[4:]
    header = header[:48].ljust(48, b"\0")
    try:
        pdu.decode(header, ahs[: (len(ahs) // 4) * 4], memoryview(b""))
    except PduError:
        pass


def test_reader_views_stay_valid_while_held_and_buffer_stays_bounded():
    r = PduReader(4096)
    held = []
    for i in range(200):
        payload = bytes([i % 251]) * 4000
        r.feed(whole(bhs(Op.NOP_OUT, itt=i, data_len=len(payload), immediate=True), payload))
        item = r.next_pdu()
        assert item is not None
        if i % 3 == 0:
            held.append((i, item[2]))  # keep some views alive across many feeds
    for i, view in held:
        assert bytes(view) == bytes([i % 251]) * 4000
    held.clear()
    assert r.buffered == 0
    assert len(r._buf) <= 64 * 1024  # reused in place once no view is held


def test_reader_writable_commit_path_matches_feed():
    stream = b"".join(whole(bhs(Op.NOP_OUT, itt=i, data_len=i, immediate=True), bytes(i))
                      for i in range(1, 60))
    r = PduReader(8192)
    got = []
    pos = 0
    while pos < len(stream):
        room = r.writable()
        n = min(len(room), 777, len(stream) - pos)
        room[:n] = stream[pos:pos + n]
        del room
        r.commit(n)
        pos += n
        while (item := r.next_pdu()) is not None:
            got.append(pdu.decode(*item).itt)
    assert got == list(range(1, 60))
