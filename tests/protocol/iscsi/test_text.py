"""Text Requests in full feature phase: SendTargets, renegotiation, continuations."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsand.protocol.iscsi import keys as K
from vsand.protocol.iscsi import pdu
from vsand.protocol.iscsi.login import SessionParams, TargetInfo, TargetOffer
from vsand.protocol.iscsi.text import TextHandler

DISK1 = TargetInfo("iqn.2024-01.org.vsand:disk1", "one",
                   (("192.0.2.10", 3260, 1), ("2001:db8::10", 3260, 1)))
DISK2 = TargetInfo("iqn.2024-01.org.vsand:disk2", "", (("192.0.2.11", 3261, 2),))
RESERVED = 0xFFFFFFFF


def params(session_type: str = "Normal", max_send_dsl: int = 8192) -> SessionParams:
    return SessionParams(
        session_type=session_type, initiator_name="iqn.1994-05.com.redhat:abc",
        initiator_alias="", target_name=DISK1.name if session_type == "Normal" else "",
        isid=0x023D00000001, tsih=1, cid=0, header_digest=False, data_digest=False,
        max_recv_dsl_target=262144, max_send_dsl=max_send_dsl, first_burst_length=65536,
        max_burst_length=262144, immediate_data=True, initial_r2t=True, max_outstanding_r2t=1,
        max_connections=1, data_pdu_in_order=True, data_sequence_in_order=True,
        default_time2wait=2, default_time2retain=20, error_recovery_level=0)


def handler(session_type: str = "Normal", max_send_dsl: int = 8192,
            targets: list[TargetInfo] | None = None) -> TextHandler:
    all_targets = targets if targets is not None else [DISK1, DISK2]
    return TextHandler(params(session_type, max_send_dsl), TargetOffer(), lambda: all_targets,
                       DISK1 if session_type == "Normal" else None)


def text_req(data: bytes, *, f: bool = True, c: bool = False, itt: int = 0x10,
             ttt: int = RESERVED, cmdsn: int = 5) -> pdu.TextRequest:
    """Bytes as open-iscsi sends them (immediate bit clear), decoded by the PDU codec."""
    b1 = (0x80 if f else 0) | (0x40 if c else 0)
    bhs = (struct.pack(">BBBBI", 0x04, b1, 0, 0, len(data)) + bytes(8)
           + struct.pack(">IIII", itt, ttt, cmdsn, 2) + bytes(16))
    req = pdu.decode(bhs, b"", memoryview(data))
    assert isinstance(req, pdu.TextRequest)
    return req


def send(h: TextHandler, data: bytes, **kw: object) -> tuple[bytes, bytes]:
    out = h.respond(text_req(data, **kw), 11, 5, 20)  # type: ignore[arg-type]
    assert len(out) == 1
    header, body = out[0]
    assert len(header) == 48 and int.from_bytes(header[5:8], "big") == len(body)
    return header, body


def flags(header: bytes) -> tuple[bool, bool, int, int]:
    """(F, C, ITT, TTT) of a Text Response."""
    assert header[0] == 0x24
    itt, ttt = struct.unpack_from(">II", header, 16)
    return bool(header[1] & 0x80), bool(header[1] & 0x40), itt, ttt


def pairs(body: bytes) -> list[tuple[str, str]]:
    return K.parse_text(body)


# --------------------------------------------------------------------------------------------
# SendTargets (RFC 7143 Appendix C)

def test_discovery_all_lists_every_target_and_portal() -> None:
    header, body = send(handler("Discovery"), b"SendTargets=All\0")
    assert flags(header) == (True, False, 0x10, RESERVED)
    assert struct.unpack_from(">III", header, 24) == (11, 5, 20)
    assert pairs(body) == [
        ("TargetName", DISK1.name), ("TargetAddress", "192.0.2.10:3260,1"),
        ("TargetAddress", "[2001:db8::10]:3260,1"),
        ("TargetName", DISK2.name), ("TargetAddress", "192.0.2.11:3261,2")]


def test_discovery_named_target() -> None:
    _, body = send(handler("Discovery"), f"SendTargets={DISK2.name}\0".encode())
    assert pairs(body) == [("TargetName", DISK2.name), ("TargetAddress", "192.0.2.11:3261,2")]
    header, body = send(handler("Discovery"), b"SendTargets=iqn.2024-01.org.vsand:none\0")
    assert body == b"" and flags(header)[0]


def test_discovery_with_no_targets() -> None:
    _, body = send(handler("Discovery", targets=[]), b"SendTargets=All\0")
    assert body == b""


def test_discovery_empty_value_rejected() -> None:
    _, body = send(handler("Discovery"), b"SendTargets=\0")
    assert pairs(body) == [("SendTargets", "Reject")]


def test_normal_session_reports_only_its_target() -> None:
    _, body = send(handler(), b"SendTargets=\0")
    assert [v for k, v in pairs(body) if k == "TargetName"] == [DISK1.name]
    _, body = send(handler(), f"SendTargets={DISK1.name}\0".encode())
    assert [v for k, v in pairs(body) if k == "TargetName"] == [DISK1.name]
    _, body = send(handler(), f"SendTargets={DISK2.name}\0".encode())
    assert body == b""
    # "All" MUST NOT be supported on an operational session.
    _, body = send(handler(), b"SendTargets=All\0")
    assert pairs(body) == [("SendTargets", "Reject")]


# --------------------------------------------------------------------------------------------
# Long replies: C bit and our TTT; long requests: the initiator's C bit

def many_targets(n: int) -> list[TargetInfo]:
    return [TargetInfo(f"iqn.2024-01.org.vsand:lun{i:03d}", "", (("192.0.2.1", 3260, 1),))
            for i in range(n)]


def test_long_reply_continued_with_empty_requests() -> None:
    targets = many_targets(60)
    h = handler("Discovery", max_send_dsl=512, targets=targets)
    header, body = send(h, b"SendTargets=All\0", itt=0x77)
    got = body
    seen_ttts = set()
    count = 1
    while True:
        f, c, itt, ttt = flags(header)
        assert itt == 0x77 and len(body) <= 512
        if not c:
            assert f and ttt == RESERVED
            break
        assert not f and ttt != RESERVED and ttt not in seen_ttts
        seen_ttts.add(ttt)
        header, body = send(h, b"", itt=0x77, ttt=ttt)
        got += body
        count += 1
    assert count > 3
    names = [v for k, v in pairs(got) if k == "TargetName"]
    assert names == [t.name for t in targets]


def test_wrong_ttt_during_continuation_is_rejected() -> None:
    h = handler("Discovery", max_send_dsl=512, targets=many_targets(40))
    header, _ = send(h, b"SendTargets=All\0")
    ttt = flags(header)[3]
    out = h.respond(text_req(b"", ttt=ttt + 1), 12, 5, 20)
    (rheader, rdata), = out
    assert rheader[0] == 0x3F and rheader[2] == pdu.RejectReason.INVALID_PDU_FIELD
    assert len(rdata) == 48 and rdata[0] == 0x04 and rdata[20:24] == (ttt + 1).to_bytes(4, "big")
    # A fresh request (reserved TTT) starts over.
    header, body = send(h, b"SendTargets=All\0")
    assert flags(header)[1]


def test_request_continued_with_c_bit() -> None:
    h = handler("Discovery")
    whole = f"SendTargets={DISK2.name}\0".encode()
    header, body = send(h, whole[:9], f=False, c=True)
    f, c, _, ttt = flags(header)
    assert (f, c, body) == (False, False, b"") and ttt != RESERVED
    header, body = send(h, whole[9:], ttt=ttt)
    assert flags(header)[:2] == (True, False)
    assert pairs(body)[0] == ("TargetName", DISK2.name)


def test_initiator_not_final_keeps_exchange_open() -> None:
    h = handler()
    header, body = send(h, b"InitiatorAlias=bob\0", f=False)
    f, _, _, ttt = flags(header)
    assert not f and ttt != RESERVED and body == b""
    header, body = send(h, b"SendTargets=\0", ttt=ttt)
    assert flags(header)[0] and pairs(body)[0] == ("TargetName", DISK1.name)
    assert h.params.initiator_alias == "bob"


def test_c_and_f_together_is_a_protocol_error() -> None:
    (header, _), = handler().respond(text_req(b"SendTargets=\0", f=True, c=True), 1, 1, 1)
    assert header[0] == 0x3F and header[2] == pdu.RejectReason.PROTOCOL_ERROR


def test_unknown_ttt_without_exchange_rejected() -> None:
    (header, _), = handler().respond(text_req(b"", ttt=1234), 1, 1, 1)
    assert header[0] == 0x3F and header[2] == pdu.RejectReason.INVALID_PDU_FIELD


@pytest.mark.parametrize("data", [b"SendTargets=All", b"SendTargets\0", b"=x\0"])
def test_malformed_text_rejected(data: bytes) -> None:
    (header, _), = handler().respond(text_req(data), 1, 1, 1)
    assert header[0] == 0x3F and header[2] == pdu.RejectReason.PROTOCOL_ERROR


def test_oversized_request_rejected() -> None:
    h = handler()
    header, _ = send(h, b"X-a=" + b"b" * 60000, f=False, c=True)
    ttt = flags(header)[3]
    (header, _), = h.respond(text_req(b"b" * 8000, f=False, c=True, ttt=ttt), 1, 1, 1)
    assert header[0] == 0x3F


# --------------------------------------------------------------------------------------------
# Renegotiation in full feature phase

def test_max_recv_data_segment_length_renegotiated_after_exchange() -> None:
    h = handler(max_send_dsl=8192)
    header, body = send(h, b"MaxRecvDataSegmentLength=65536\0")
    assert flags(header)[0] and body == b""     # declarative: nothing to answer
    assert h.params.max_send_dsl == 65536


def test_new_max_recv_applies_only_when_exchange_completes() -> None:
    h = handler("Discovery", max_send_dsl=512, targets=many_targets(40))
    header, body = send(h, b"MaxRecvDataSegmentLength=4096\0SendTargets=All\0")
    assert len(body) <= 512 and flags(header)[1]
    assert h.params.max_send_dsl == 512
    while flags(header)[1]:
        header, body = send(h, b"", ttt=flags(header)[3])
        assert len(body) <= 512
    assert h.params.max_send_dsl == 4096


def test_bad_max_recv_rejected_and_unchanged() -> None:
    h = handler(max_send_dsl=8192)
    _, body = send(h, b"MaxRecvDataSegmentLength=100\0")
    assert pairs(body) == [("MaxRecvDataSegmentLength", "Reject")]
    assert h.params.max_send_dsl == 8192


@pytest.mark.parametrize("key", ["MaxBurstLength=65536", "HeaderDigest=CRC32C",
                                 "InitiatorName=iqn.x:y", "AuthMethod=None", "CHAP_A=5",
                                 "ImmediateData=No", "TargetAlias=x", "SessionType=Normal",
                                 "MaxRecvDataSegmentLength=Irrelevant"])
def test_keys_not_allowed_in_ffp_rejected(key: str) -> None:
    _, body = send(handler(), key.encode() + b"\0")
    assert pairs(body) == [(key.split("=")[0], "Reject")]


def test_unknown_keys_not_understood() -> None:
    _, body = send(handler(), b"X-com.example.x=1\0Frobnicate=2\0")
    assert pairs(body) == [("X-com.example.x", "NotUnderstood"), ("Frobnicate", "NotUnderstood")]


def test_repeated_key_answered_once_then_rejected() -> None:
    _, body = send(handler(), b"SendTargets=\0SendTargets=\0")
    got = pairs(body)
    assert got[-1] == ("SendTargets", "Reject") and got[0] == ("TargetName", DISK1.name)


# --------------------------------------------------------------------------------------------
# Never anything but PDUs

TEXTS = st.one_of(
    st.binary(max_size=120),
    st.lists(st.sampled_from(["SendTargets=All", "SendTargets=", f"SendTargets={DISK1.name}",
                              "MaxRecvDataSegmentLength=512", "MaxRecvDataSegmentLength=0x",
                              "InitiatorAlias=a", "X-y=1", "MaxBurstLength=1"]),
             max_size=5).map(lambda items: b"".join(i.encode() + b"\0" for i in items)))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(TEXTS, st.booleans(), st.booleans(),
                          st.sampled_from([RESERVED, 1, 2, 3, 0])), min_size=1, max_size=8),
       st.sampled_from(["Normal", "Discovery"]), st.sampled_from([512, 8192]))
def test_fuzz_always_pdus(steps: list[tuple[bytes, bool, bool, int]], session_type: str,
                          max_send_dsl: int) -> None:
    h = handler(session_type, max_send_dsl=max_send_dsl, targets=many_targets(20))
    for data, f, c, ttt in steps:
        out = h.respond(text_req(data, f=f, c=c, ttt=ttt), 1, 1, 1)
        assert len(out) == 1
        header, body = out[0]
        assert len(header) == 48 and header[0] in (0x24, 0x3F)
        if header[0] == 0x24:
            assert len(body) <= max(max_send_dsl, 512)
            assert int.from_bytes(header[5:8], "big") == len(body)
