"""The initiator's side of the codec against the target's: what one builds, the other reads."""

import struct

import pytest
from hypothesis import given, strategies as st

from vsand.protocol.iscsi import chap, pdu
from vsand.protocol.iscsi import initiator as ini
from vsand.protocol.iscsi.keys import parse_text
from vsand.protocol.iscsi.pdu import BHS_LEN, Op


def _split(whole: bytes) -> tuple[bytes, memoryview]:
    ahs, padded = ini.data_length(whole[:BHS_LEN])
    assert len(whole) == BHS_LEN + ahs + padded
    n = int.from_bytes(whole[5:8], "big")
    return whole[:BHS_LEN], memoryview(whole[BHS_LEN + ahs:BHS_LEN + ahs + n])


def test_scsi_command_with_immediate_data_reads_back_as_the_target_decodes_it():
    data = bytes(range(256)) * 5  # 1280 bytes: a padded segment
    raw = ini.scsi_command(itt=7, lun=300, cmdsn=11, expstatsn=5, cdb=ini.write16(1 << 40, 3),
                           edtl=1536, write=True, data=data)
    bhs, seg = _split(raw)
    msg = pdu.decode(bhs, b"", seg)
    assert isinstance(msg, pdu.ScsiCommandPdu)
    assert msg.final and msg.write and not msg.read and msg.attr == 1 and not msg.immediate
    assert pdu.decode_lun(msg.lun) == 300
    assert (msg.itt, msg.edtl, msg.cmdsn, msg.expstatsn) == (7, 1536, 11, 5)
    assert msg.cdb[0] == 0x8A and int.from_bytes(msg.cdb[2:10], "big") == 1 << 40
    assert int.from_bytes(msg.cdb[10:14], "big") == 3 and bytes(msg.data) == data


def test_login_request_fields_and_keys():
    raw = ini.login_request(isid=0x23_0000_0001, tsih=0, itt=1, cmdsn=0, expstatsn=0,
                            csg=ini.SECURITY, nsg=ini.OPERATIONAL, transit=False,
                            pairs=ini.security_keys("iqn.x:i", "iqn.x:t", with_chap=True))
    bhs, seg = _split(raw)
    msg = pdu.decode(bhs, b"", seg)
    assert isinstance(msg, pdu.LoginRequest)
    assert not msg.transit and (msg.csg, msg.nsg, msg.isid) == (0, 1, 0x23_0000_0001)
    assert dict(parse_text(bytes(msg.data)))["AuthMethod"] == "CHAP,None"


@pytest.mark.parametrize("build,kind", [
    (lambda: ini.nop_out(itt=pdu.RESERVED_TAG, ttt=9, lunf=0, cmdsn=3, expstatsn=4,
                         data=b"ping"), pdu.NopOut),
    (lambda: ini.logout_request(itt=5, cmdsn=3, expstatsn=4), pdu.LogoutRequest),
    (lambda: ini.data_out(itt=5, lun=1, ttt=77, expstatsn=4, datasn=2, offset=8192,
                          data=b"x" * 10, final=True), pdu.DataOut),
])
def test_other_initiator_pdus_decode(build, kind):
    bhs, seg = _split(build())
    assert isinstance(pdu.decode(bhs, b"", seg), kind)


def test_target_pdus_read_back():
    rsp = ini.decode_target(pdu.scsi_response(9, 2, statsn=40, expcmdsn=12, maxcmdsn=44,
                                              residual=0, data_len=0), b"sense")
    assert (rsp.opcode, rsp.itt, rsp.b3, rsp.statsn, rsp.has_status) == (Op.SCSI_RSP, 9, 2,
                                                                         40, True)
    din = ini.decode_target(pdu.data_in(9, 0, 0, 4096, 512, final=True, status=None, statsn=0,
                                        expcmdsn=1, maxcmdsn=2, residual=0), b"d" * 512)
    assert din.offset == 4096 and not din.has_status and din.data == b"d" * 512
    r2t = ini.decode_target(pdu.r2t(9, 0, ttt=0x55, statsn=1, expcmdsn=1, maxcmdsn=2, r2tsn=0,
                                    offset=65536, length=8192), b"")
    assert (r2t.opcode, r2t.ttt, r2t.offset, r2t.w11) == (Op.R2T, 0x55, 65536, 8192)
    login = ini.decode_target(pdu.login_response(True, False, 1, 3, 0, 0, 0x23_0000_0001, 17,
                                                 1, 0, 1, 2, 2, 1, 0), b"")
    assert login.transit and login.nsg == 3 and login.tsih == 17
    assert login.login_status == 0x0201
    ping = ini.decode_target(pdu.nop_in(pdu.RESERVED_TAG, 0x99, 0, 3, 1, 2, 0), b"")
    assert ini.is_ping(ping)


def test_sense_fixed_and_descriptor_formats():
    fixed = bytes([0x70, 0, 0x02, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x04, 0x0A, 0, 0, 0, 0])
    assert ini.sense_of(struct.pack(">H", len(fixed)) + fixed) == ini.Sense(2, 0x04, 0x0A)
    desc = bytes([0x72, 0x06, 0x29, 0x00, 0, 0, 0, 0])
    assert ini.sense_of(struct.pack(">H", len(desc)) + desc) == ini.Sense(6, 0x29, 0)
    assert ini.sense_of(b"\0") is None and ini.sense_of(b"\0\x04abcd") is None


def test_chap_answer_is_what_the_target_checks():
    challenge = bytes(range(16))
    text = f"CHAP_A=5\0CHAP_I=7\0CHAP_C={chap.encode_binary(challenge)}\0".encode()
    got = dict(ini.chap_answer(text, "user", b"secret-of-12345"))
    assert got["CHAP_N"] == "user"
    assert chap.decode_binary(got["CHAP_R"]) == chap.response(5, 7, b"secret-of-12345",
                                                              challenge)
    with pytest.raises(ValueError):
        ini.chap_answer(b"CHAP_A=5\0", "user", b"x")
    with pytest.raises(ValueError):
        ini.chap_answer(b"CHAP_A=99\0CHAP_I=1\0CHAP_C=0x00\0", "user", b"x")


@given(st.binary(min_size=BHS_LEN, max_size=BHS_LEN), st.binary(max_size=64))
def test_any_target_header_decodes_without_surprises(bhs, data):
    p = ini.decode_target(bhs, data)
    assert 0 <= p.opcode < 64 and p.data == data
    ahs, padded = ini.data_length(bhs)
    assert ahs % 4 == 0 and padded % 4 == 0
