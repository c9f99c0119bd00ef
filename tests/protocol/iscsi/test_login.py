"""The login state machine: whole sequences as real initiators send them, and every rule."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsand.protocol.iscsi import keys as K
from vsand.protocol.iscsi import pdu
from vsand.protocol.iscsi.login import (AuthStep, LoginMachine, LoginReply, SessionParams,
                                        Status, TargetInfo, TargetOffer)

ISID = 0x80A1B2C30000          # libiscsi's "random" ISID format (type 0x80)
INITIATOR = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test"
TARGET = TargetInfo("iqn.2024-01.org.vsand:disk1", "disk one", (("192.0.2.10", 3260, 1),))
OTHER = TargetInfo("iqn.2024-01.org.vsand:disk2", "", (("192.0.2.11", 3260, 2),))
TSIH = 0x0042


# --------------------------------------------------------------------------------------------
# Helpers: build request bytes exactly as an initiator puts them on the wire, decode replies

def login_bhs(data: bytes, *, t: bool, csg: int, nsg: int, c: bool = False, isid: int = ISID,
              tsih: int = 0, itt: int = 0x1D, cid: int = 0, cmdsn: int = 0x1000,
              expstatsn: int = 0, vmax: int = 0, vmin: int = 0) -> bytes:
    b1 = (0x80 if t else 0) | (0x40 if c else 0) | (csg << 2) | nsg
    return (struct.pack(">BBBBI", 0x43, b1, vmax, vmin, len(data))
            + isid.to_bytes(6, "big") + tsih.to_bytes(2, "big")
            + struct.pack(">IHHII", itt, cid, 0, cmdsn, expstatsn) + bytes(16))


def login_req(data: bytes, **kw: object) -> pdu.LoginRequest:
    bhs = login_bhs(data, **kw)  # type: ignore[arg-type]
    req = pdu.decode(bhs, b"", memoryview(data))
    assert isinstance(req, pdu.LoginRequest)
    return req


def text(*items: str) -> bytes:
    return b"".join(i.encode() + b"\0" for i in items)


@dataclass
class Rsp:
    transit: bool
    cont: bool
    csg: int
    nsg: int
    vmax: int
    vactive: int
    isid: int
    tsih: int
    itt: int
    statsn: int
    expcmdsn: int
    maxcmdsn: int
    status: int
    pairs: list[tuple[str, str]]
    done: bool
    close: bool

    @property
    def keys(self) -> dict[str, str]:
        return dict(self.pairs)


def parse(reply: LoginReply) -> Rsp:
    h = reply.header
    assert len(h) == 48 and h[0] == 0x23
    dlen = int.from_bytes(h[5:8], "big")
    assert dlen == len(reply.data)
    (itt, _r, statsn, expcmdsn, maxcmdsn, st_word) = struct.unpack_from(">IIIIII", h, 16)
    return Rsp(bool(h[1] & 0x80), bool(h[1] & 0x40), (h[1] >> 2) & 3, h[1] & 3, h[2], h[3],
               int.from_bytes(h[8:14], "big"), int.from_bytes(h[14:16], "big"), itt, statsn,
               expcmdsn, maxcmdsn, st_word >> 16,
               K.parse_text(reply.data), reply.done, reply.close)


@dataclass
class Harness:
    machine: LoginMachine
    admitted: list[SessionParams] = field(default_factory=list)
    statsn: int = 7

    def send(self, data: bytes, **kw: object) -> Rsp:
        reply = self.machine.receive(login_req(data, **kw), self.statsn)
        assert isinstance(reply, LoginReply)
        return parse(reply)


def harness(offer: TargetOffer | None = None,
            admit: Callable[[SessionParams], tuple[int, int, int]] | None = None,
            **kw: object) -> Harness:
    h: Harness

    def _admit(params: SessionParams) -> tuple[int, int, int]:
        h.admitted.append(params)
        return admit(params) if admit else (0, 0, TSIH)

    targets = {TARGET.name: TARGET, OTHER.name: OTHER}
    m = LoginMachine(portal_group_tag=1, offer=offer or TargetOffer(),
                     lookup_target=targets.get, admit=_admit, **kw)  # type: ignore[arg-type]
    h = Harness(m)
    return h


# What libiscsi (lib/login.c) puts in its operational-stage Login Request, in its order.
LIBISCSI_OP_KEYS = (
    "HeaderDigest=None,CRC32C", "DataDigest=None", "InitialR2T=No", "ImmediateData=Yes",
    "MaxBurstLength=262144", "FirstBurstLength=262144", "DefaultTime2Wait=2",
    "DefaultTime2Retain=0", "MaxOutstandingR2T=1", "ErrorRecoveryLevel=0", "IFMarker=No",
    "OFMarker=No", "MaxConnections=1", "MaxRecvDataSegmentLength=262144", "DataPDUInOrder=Yes",
    "DataSequenceInOrder=Yes")


def libiscsi_opneg(session_type: str = "Normal", target: str = TARGET.name) -> bytes:
    names = [f"InitiatorName={INITIATOR}"]
    if session_type == "Normal":
        names.append(f"TargetName={target}")
    names.append(f"SessionType={session_type}")
    # HeaderDigest is added between SessionType and DataDigest (auth keys go in between).
    return text(*names, *LIBISCSI_OP_KEYS)


OPEN_ISCSI_INITIATOR = "iqn.2004-10.com.ubuntu:01:5e1f3a2b4c6d"
OPEN_ISCSI_OP_NORMAL = (
    "HeaderDigest=None", "DataDigest=None", "DefaultTime2Wait=2", "DefaultTime2Retain=0",
    "IFMarker=No", "OFMarker=No", "ErrorRecoveryLevel=0", "InitialR2T=No", "ImmediateData=Yes",
    "MaxBurstLength=16776192", "FirstBurstLength=262144", "MaxOutstandingR2T=1",
    "MaxConnections=1", "DataPDUInOrder=Yes", "DataSequenceInOrder=Yes",
    "MaxRecvDataSegmentLength=262144")
# Keys open-iscsi's login.c accepts in a reply; any other key fails its login.
OPEN_ISCSI_SECURITY_OK = {"TargetAlias", "TargetAddress", "TargetPortalGroupTag", "AuthMethod",
                          "CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"}
OPEN_ISCSI_OP_OK = {"TargetAlias", "TargetAddress", "TargetPortalGroupTag", "InitialR2T",
                    "ImmediateData", "MaxRecvDataSegmentLength", "FirstBurstLength",
                    "MaxBurstLength", "HeaderDigest", "DataDigest", "DefaultTime2Wait",
                    "DefaultTime2Retain", "OFMarker", "OFMarkInt", "IFMarker", "IFMarkInt",
                    "DataPDUInOrder", "DataSequenceInOrder", "MaxOutstandingR2T",
                    "MaxConnections", "ErrorRecoveryLevel"}


# --------------------------------------------------------------------------------------------
# Whole logins

def test_libiscsi_straight_to_operational() -> None:
    h = harness()
    r = h.send(libiscsi_opneg(), t=True, csg=1, nsg=3, cmdsn=0x1000)
    assert r.status == 0 and not r.close and r.done
    assert (r.transit, r.cont, r.csg, r.nsg) == (True, False, 1, 3)
    assert (r.vmax, r.vactive) == (0, 0)
    assert r.isid == ISID and r.tsih == TSIH and r.itt == 0x1D and r.statsn == 7
    assert r.expcmdsn == 0x1000 and r.maxcmdsn == 0x1000
    assert r.keys == {
        "TargetAlias": "disk one", "TargetPortalGroupTag": "1",
        "MaxRecvDataSegmentLength": "262144", "HeaderDigest": "None", "DataDigest": "None",
        "InitialR2T": "No", "ImmediateData": "Yes", "MaxBurstLength": "262144",
        "FirstBurstLength": "262144", "DefaultTime2Wait": "2", "DefaultTime2Retain": "0",
        "MaxOutstandingR2T": "1", "ErrorRecoveryLevel": "0", "IFMarker": "No",
        "OFMarker": "No", "MaxConnections": "1", "DataPDUInOrder": "Yes",
        "DataSequenceInOrder": "Yes"}
    p = h.machine.params
    assert p is not None and h.admitted == [p]
    assert p == SessionParams(
        session_type="Normal", initiator_name=INITIATOR, initiator_alias="",
        target_name=TARGET.name, isid=ISID, tsih=TSIH, cid=0, header_digest=False,
        data_digest=False, max_recv_dsl_target=262144, max_send_dsl=262144,
        first_burst_length=262144, max_burst_length=262144, immediate_data=True,
        initial_r2t=False, max_outstanding_r2t=1, max_connections=1, data_pdu_in_order=True,
        data_sequence_in_order=True, default_time2wait=2, default_time2retain=0,
        error_recovery_level=0)


def test_libiscsi_security_then_operational_resending_names() -> None:
    h = harness()
    first = text(f"InitiatorName={INITIATOR}", f"TargetName={TARGET.name}",
                 "SessionType=Normal", "AuthMethod=CHAP,None")
    r = h.send(first, t=True, csg=0, nsg=1)
    assert r.status == 0 and (r.transit, r.csg, r.nsg) == (True, 0, 1)
    assert r.pairs == [("TargetAlias", "disk one"), ("TargetPortalGroupTag", "1"),
                       ("AuthMethod", "None")]
    assert r.tsih == 0 and not r.done
    # libiscsi restates InitiatorName/TargetName/SessionType at the start of the new stage.
    r = h.send(libiscsi_opneg(), t=True, csg=1, nsg=3)
    assert r.status == 0 and r.done and r.tsih == TSIH
    assert "TargetPortalGroupTag" not in r.keys        # only in the first reply
    assert r.keys["MaxRecvDataSegmentLength"] == "262144"


def test_open_iscsi_normal_session() -> None:
    h = harness()
    r = h.send(text(f"InitiatorName={OPEN_ISCSI_INITIATOR}", "InitiatorAlias=host1",
                    f"TargetName={TARGET.name}", "SessionType=Normal", "AuthMethod=None"),
               t=True, csg=0, nsg=1)
    assert r.status == 0 and (r.transit, r.nsg) == (True, 1)
    assert set(r.keys) <= OPEN_ISCSI_SECURITY_OK
    r = h.send(text(*OPEN_ISCSI_OP_NORMAL), t=True, csg=1, nsg=3)
    assert r.status == 0 and r.done
    assert set(r.keys) <= OPEN_ISCSI_OP_OK
    assert r.keys["MaxBurstLength"] == "1048576"       # min(16776192, our 1 MiB)
    assert r.keys["MaxOutstandingR2T"] == "1"          # open-iscsi insists on exactly 1
    assert r.keys["MaxConnections"] == "1"
    p = h.machine.params
    assert p is not None
    assert p.initiator_alias == "host1" and p.max_burst_length == 1048576
    assert p.first_burst_length == 262144 and p.max_send_dsl == 262144


def test_open_iscsi_discovery_defaults_go_straight_to_ffp() -> None:
    h = harness()
    r = h.send(text(f"InitiatorName={OPEN_ISCSI_INITIATOR}", "InitiatorAlias=host1",
                    "SessionType=Discovery", "AuthMethod=None"), t=True, csg=0, nsg=3)
    assert r.status == 0 and r.done and (r.csg, r.nsg) == (0, 3)
    assert r.keys == {"AuthMethod": "None"}            # no TargetName: no TPGT
    p = h.machine.params
    assert p is not None and p.session_type == "Discovery" and p.target_name == ""
    assert p.max_recv_dsl_target == 8192 and p.max_send_dsl == 8192   # never declared


def test_open_iscsi_discovery_with_operational_stage() -> None:
    h = harness()
    h.send(text(f"InitiatorName={OPEN_ISCSI_INITIATOR}", "SessionType=Discovery",
                "AuthMethod=None"), t=True, csg=0, nsg=1)
    r = h.send(text("HeaderDigest=None", "DataDigest=None", "DefaultTime2Wait=2",
                    "DefaultTime2Retain=0", "IFMarker=No", "OFMarker=No",
                    "ErrorRecoveryLevel=0", "MaxRecvDataSegmentLength=32768"),
               t=True, csg=1, nsg=3)
    assert r.status == 0 and r.done
    assert set(r.keys) <= OPEN_ISCSI_OP_OK
    p = h.machine.params
    assert p is not None and p.max_send_dsl == 32768 and p.max_recv_dsl_target == 262144


def test_libiscsi_discovery_normal_only_keys_are_irrelevant() -> None:
    h = harness()
    r = h.send(libiscsi_opneg("Discovery"), t=True, csg=1, nsg=3)
    assert r.status == 0 and r.done
    for key in ("InitialR2T", "ImmediateData", "MaxBurstLength", "FirstBurstLength",
                "MaxOutstandingR2T", "MaxConnections", "DataPDUInOrder", "DataSequenceInOrder"):
        assert r.keys[key] == K.IRRELEVANT, key
    assert r.keys["DefaultTime2Wait"] == "2" and r.keys["ErrorRecoveryLevel"] == "0"
    assert r.keys["HeaderDigest"] == "None"


def test_discovery_may_name_a_target_and_gets_tpgt() -> None:
    h = harness()
    r = h.send(text(f"InitiatorName={INITIATOR}", "SessionType=Discovery",
                    "TargetName=iqn.2024-01.org.vsand:nothing"), t=True, csg=1, nsg=3)
    assert r.status == 0 and r.done and r.keys["TargetPortalGroupTag"] == "1"
    assert "TargetAlias" not in r.keys


def test_operational_stage_over_several_requests() -> None:
    h = harness()
    r = h.send(text(f"InitiatorName={INITIATOR}", f"TargetName={TARGET.name}",
                    "MaxBurstLength=65536"), t=False, csg=1, nsg=0)
    assert r.status == 0 and not r.transit and (r.csg, r.nsg) == (1, 0)
    assert r.keys["MaxBurstLength"] == "65536"
    assert r.keys["MaxRecvDataSegmentLength"] == "262144"
    r = h.send(text("FirstBurstLength=262144"), t=False, csg=1, nsg=0)
    # Negotiated in a later request, FirstBurstLength is still capped by MaxBurstLength.
    assert r.pairs == [("FirstBurstLength", "65536")]
    r = h.send(b"", t=True, csg=1, nsg=3)
    assert r.done and r.pairs == []
    p = h.machine.params
    assert p is not None and p.first_burst_length == 65536 and p.max_burst_length == 65536


def test_defaults_when_initiator_sends_nothing() -> None:
    h = harness()
    r = h.send(text(f"InitiatorName={INITIATOR}", f"TargetName={TARGET.name}"),
               t=True, csg=1, nsg=3)
    assert r.done
    p = h.machine.params
    assert p is not None
    assert (p.immediate_data, p.initial_r2t) == (True, True)
    assert (p.max_burst_length, p.first_burst_length) == (262144, 65536)
    assert (p.max_outstanding_r2t, p.default_time2wait, p.default_time2retain) == (1, 2, 20)
    assert p.max_send_dsl == 8192 and p.max_recv_dsl_target == 262144


def test_first_burst_never_exceeds_max_burst() -> None:
    h = harness(TargetOffer(first_burst_length=1048576, max_burst_length=1048576))
    r = h.send(text(f"InitiatorName={INITIATOR}", f"TargetName={TARGET.name}",
                    "FirstBurstLength=524288", "MaxBurstLength=131072"), t=True, csg=1, nsg=3)
    assert r.keys["FirstBurstLength"] == "131072" and r.keys["MaxBurstLength"] == "131072"
    assert h.machine.params is not None and h.machine.params.first_burst_length == 131072
    # MaxBurstLength below the FirstBurstLength default clamps the default too.
    h = harness()
    h.send(text(f"InitiatorName={INITIATOR}", f"TargetName={TARGET.name}",
                "MaxBurstLength=4096"), t=True, csg=1, nsg=3)
    assert h.machine.params is not None and h.machine.params.first_burst_length == 4096


def test_response_window_and_tsih_on_final_only() -> None:
    h = harness(cmd_window=32)
    r = h.send(text(f"InitiatorName={INITIATOR}", f"TargetName={TARGET.name}",
                    "AuthMethod=None"), t=True, csg=0, nsg=1, cmdsn=0xFFFFFFF0)
    assert r.tsih == 0 and r.expcmdsn == r.maxcmdsn == 0xFFFFFFF0
    r = h.send(b"", t=True, csg=1, nsg=3, cmdsn=0xFFFFFFF0)
    assert r.tsih == TSIH and r.expcmdsn == 0xFFFFFFF0 and r.maxcmdsn == 0x0F   # wraps


# --------------------------------------------------------------------------------------------
# Continuations in both directions

def test_request_continued_with_c_bit() -> None:
    h = harness()
    whole = libiscsi_opneg()
    cut1, cut2 = 37, 300                     # cuts fall inside a key and inside a value
    r = h.send(whole[:cut1], t=False, c=True, csg=1, nsg=3)
    assert r.status == 0 and r.pairs == [] and not r.transit and not r.cont
    r = h.send(whole[cut1:cut2], t=False, c=True, csg=1, nsg=3)
    assert r.status == 0 and r.pairs == []
    r = h.send(whole[cut2:], t=True, csg=1, nsg=3)
    assert r.status == 0 and r.done and r.keys["TargetPortalGroupTag"] == "1"


def test_long_reply_split_with_c_bit() -> None:
    h = harness()
    unknown = [f"X-k{i:04d}=" for i in range(700)]
    data = text(f"InitiatorName={INITIATOR}", f"TargetName={TARGET.name}", *unknown)
    assert len(data) <= 8192
    got = b""
    reply = h.machine.receive(login_req(data, t=True, csg=1, nsg=3), 1)
    pieces = 0
    while True:
        pieces += 1
        flags = reply.header[1]
        assert len(reply.data) <= 8192 and not reply.close
        got += reply.data
        if not flags & 0x40:
            break
        assert not flags & 0x80 and not reply.done      # C=1 comes with T=0
        assert reply.header[14:16] == b"\0\0"            # no TSIH until the last piece
        reply = h.machine.receive(login_req(b"", t=False, csg=1, nsg=3), 1)
    assert pieces >= 2
    assert reply.done and reply.header[1] == 0x87 and reply.header[14:16] == TSIH.to_bytes(2, "big")
    answers = dict(K.parse_text(got))
    assert all(answers[k.rstrip("=")] == K.NOT_UNDERSTOOD for k in unknown)


def test_data_while_our_reply_is_pending_fails() -> None:
    h = harness()
    unknown = [f"X-k{i:04d}=" for i in range(700)]
    h.machine.receive(login_req(text(f"InitiatorName={INITIATOR}", f"TargetName={TARGET.name}",
                                     *unknown), t=False, csg=1, nsg=3), 1)
    r = h.send(text("MaxBurstLength=4096"), t=False, csg=1, nsg=3)
    assert r.close and r.status == Status.INITIATOR_ERROR


def test_text_over_8192_bytes_across_continuations_fails() -> None:
    h = harness()
    chunk = b"X-a=" + b"b" * 4000
    assert h.send(chunk, t=False, c=True, csg=1, nsg=3).status == 0
    assert h.send(chunk, t=False, c=True, csg=1, nsg=3).status == 0
    r = h.send(chunk, t=False, c=True, csg=1, nsg=3)
    assert r.close and r.status == Status.INITIATOR_ERROR


# --------------------------------------------------------------------------------------------
# Failed logins

BASIC = (f"InitiatorName={INITIATOR}", f"TargetName={TARGET.name}")


@pytest.mark.parametrize("data,status", [
    (text(f"TargetName={TARGET.name}"), Status.MISSING_PARAMETER),
    (text("InitiatorName=", f"TargetName={TARGET.name}"), Status.MISSING_PARAMETER),
    (text(f"InitiatorName={INITIATOR}"), Status.MISSING_PARAMETER),
    (text(f"InitiatorName={INITIATOR}", "SessionType=Normal"), Status.MISSING_PARAMETER),
    (text(f"InitiatorName={INITIATOR}", "TargetName=iqn.2024-01.org.vsand:none"),
     Status.NOT_FOUND),
    (text(*BASIC, "SessionType=Boot"), Status.SESSION_TYPE_NOT_SUPPORTED),
    (text("InitiatorName=iqn.x:" + "a" * 220, f"TargetName={TARGET.name}"),
     Status.INITIATOR_ERROR),
    (text(*BASIC, "MaxBurstLength=65536", "MaxBurstLength=65536"), Status.INITIATOR_ERROR),
    (text(*BASIC, "X-foo=1", "X-foo=1"), Status.INITIATOR_ERROR),
    (text(*BASIC, f"InitiatorName={INITIATOR}x"), Status.INITIATOR_ERROR),
    (text(*BASIC, "SessionType=Normal", "SessionType=Discovery"), Status.INITIATOR_ERROR),
    (text(*BASIC, "MaxBurstLength=Reject"), Status.INITIATOR_ERROR),
    (text(*BASIC, "ImmediateData=Irrelevant"), Status.INITIATOR_ERROR),
    (text(*BASIC, "TargetPortalGroupTag=NotUnderstood"), Status.INITIATOR_ERROR),
    (text(*BASIC, "TargetPortalGroupTag=1"), Status.INITIATOR_ERROR),   # target-only key
    (text(*BASIC, "TargetAlias=x"), Status.INITIATOR_ERROR),
    (text(*BASIC, "AuthMethod=None"), Status.INITIATOR_ERROR),          # wrong stage
    (text(*BASIC, "CHAP_A=5"), Status.INITIATOR_ERROR),
    (b"InitiatorName=" + INITIATOR.encode(), Status.INITIATOR_ERROR),   # no NUL
    (text(*BASIC) + b"NoEquals\0", Status.INITIATOR_ERROR),
    (text(*BASIC, "K" * 64 + "=1"), Status.INITIATOR_ERROR),
])
def test_operational_first_request_failures(data: bytes, status: int) -> None:
    h = harness()
    r = h.send(data, t=True, csg=1, nsg=3, tsih=0)
    assert r.status == status and r.close and not r.done
    assert r.pairs == [] and (r.transit, r.cont, r.csg, r.nsg) == (False, False, 0, 0)
    assert r.isid == ISID and r.tsih == 0
    assert h.admitted == [] and h.machine.params is None


@pytest.mark.parametrize("data", [
    text(*BASIC, "MaxRecvDataSegmentLength=8192"),     # operational key in security stage
    text(*BASIC, "HeaderDigest=None"),
    text(*BASIC, "ImmediateData=Yes"),
])
def test_operational_keys_in_security_stage_fail(data: bytes) -> None:
    r = harness().send(data, t=True, csg=0, nsg=1)
    assert r.status == Status.INITIATOR_ERROR and r.close


@pytest.mark.parametrize("csg,nsg,t,c", [
    (0, 0, True, False), (1, 1, True, False), (1, 0, True, False), (0, 2, True, False),
    (3, 3, True, False), (2, 3, True, False), (3, 0, False, False), (1, 3, True, True),
])
def test_illegal_stages_and_flags(csg: int, nsg: int, t: bool, c: bool) -> None:
    r = harness().send(text(*BASIC), t=t, c=c, csg=csg, nsg=nsg)
    assert r.status == Status.INITIATOR_ERROR and r.close


def test_going_back_a_stage_fails() -> None:
    h = harness()
    assert h.send(text(*BASIC, "AuthMethod=None"), t=True, csg=0, nsg=1).status == 0
    r = h.send(b"", t=True, csg=0, nsg=1)
    assert r.status == Status.INITIATOR_ERROR and r.close


def test_stage_must_follow_our_answer() -> None:
    h = harness()
    # Without a transition agreed (T=0 here), the next request must stay in the same stage.
    h.send(text(*BASIC), t=False, csg=0, nsg=0)
    r = h.send(b"", t=True, csg=1, nsg=3)
    assert r.status == Status.INITIATOR_ERROR


@pytest.mark.parametrize("field_,value", [("isid", ISID + 1), ("tsih", 5), ("cid", 3)])
def test_identity_must_not_change(field_: str, value: int) -> None:
    h = harness()
    h.send(text(*BASIC), t=False, csg=1, nsg=0)
    r = h.send(b"", t=True, csg=1, nsg=3, **{field_: value})
    assert r.status == Status.INITIATOR_ERROR and r.close


def test_unsupported_version() -> None:
    r = harness().send(text(*BASIC), t=True, csg=1, nsg=3, vmax=2, vmin=1)
    assert r.status == Status.UNSUPPORTED_VERSION and r.close
    r = harness().send(text(*BASIC), t=True, csg=1, nsg=3, vmax=5, vmin=0)
    assert r.status == 0 and r.vmax == 0 and r.vactive == 0


def test_duplicate_across_requests_fails() -> None:
    h = harness()
    assert h.send(text(*BASIC, "MaxBurstLength=65536"), t=False, csg=1, nsg=0).status == 0
    r = h.send(text("MaxBurstLength=65536"), t=True, csg=1, nsg=3)
    assert r.status == Status.INITIATOR_ERROR and r.close and h.admitted == []


def test_restated_max_recv_data_segment_length_is_allowed() -> None:
    h = harness()
    h.send(text(*BASIC, "MaxRecvDataSegmentLength=65536"), t=False, csg=1, nsg=0)
    r = h.send(text("MaxRecvDataSegmentLength=131072"), t=True, csg=1, nsg=3)
    assert r.done and h.machine.params is not None
    assert h.machine.params.max_send_dsl == 131072


def test_admit_refusal_is_returned() -> None:
    h = harness(admit=lambda p: (2, 6, 0))
    r = h.send(text(*BASIC), t=True, csg=1, nsg=3)
    assert r.status == Status.TOO_MANY_CONNECTIONS and r.close and not r.done
    assert h.machine.params is None and len(h.admitted) == 1


def test_nothing_after_the_end() -> None:
    h = harness()
    assert h.send(text(*BASIC), t=True, csg=1, nsg=3).done
    r = h.send(b"", t=True, csg=1, nsg=3)
    assert r.close and r.status == Status.INITIATOR_ERROR
    h = harness()
    assert h.send(text(f"TargetName={TARGET.name}"), t=True, csg=1, nsg=3).close
    r = h.send(text(*BASIC), t=True, csg=1, nsg=3)
    assert r.close and r.status == Status.INITIATOR_ERROR and h.admitted == []


# --------------------------------------------------------------------------------------------
# Answers to individual keys

def op_answers(*items: str, offer: TargetOffer | None = None, tsih: int = 0) -> dict[str, str]:
    h = harness(offer)
    r = h.send(text(*BASIC, *items), t=False, csg=1, nsg=0, tsih=tsih)
    assert r.status == 0, hex(r.status)
    return r.keys


def test_unknown_and_private_keys_not_understood() -> None:
    a = op_answers("X-com.example.Feature=1", "FutureKey=abc", "X#Unregistered=1")
    assert a["X-com.example.Feature"] == a["FutureKey"] == K.NOT_UNDERSTOOD
    assert a["X#Unregistered"] == K.NOT_UNDERSTOOD


def test_send_targets_in_login_is_irrelevant() -> None:
    assert op_answers("SendTargets=All")["SendTargets"] == K.IRRELEVANT


def test_reject_out_of_range_and_malformed() -> None:
    a = op_answers("MaxBurstLength=100", "MaxConnections=0", "DefaultTime2Wait=4000",
                   "ErrorRecoveryLevel=7", "ImmediateData=maybe", "FirstBurstLength=0x",
                   "MaxOutstandingR2T=01", "IFMarkInt=2048", "OFMarkInt=2048-4096")
    assert all(v == K.REJECT for k, v in a.items() if k not in (
        "TargetAlias", "TargetPortalGroupTag", "MaxRecvDataSegmentLength")), a


def test_rejected_key_keeps_its_default() -> None:
    h = harness()
    h.send(text(*BASIC, "MaxBurstLength=100"), t=True, csg=1, nsg=3)
    assert h.machine.params is not None and h.machine.params.max_burst_length == 262144


def test_hex_values_accepted() -> None:
    assert op_answers("MaxBurstLength=0x10000")["MaxBurstLength"] == "65536"


def test_boolean_results() -> None:
    a = op_answers("InitialR2T=Yes", "ImmediateData=No", "DataPDUInOrder=No",
                   "DataSequenceInOrder=No")
    assert a == a | {"InitialR2T": "Yes", "ImmediateData": "No", "DataPDUInOrder": "Yes",
                     "DataSequenceInOrder": "Yes"}
    a = op_answers("InitialR2T=No", "ImmediateData=Yes",
                   offer=TargetOffer(initial_r2t=True, immediate_data=False))
    assert a["InitialR2T"] == "Yes" and a["ImmediateData"] == "No"


def test_numeric_results() -> None:
    a = op_answers("MaxConnections=8", "MaxOutstandingR2T=64", "DefaultTime2Wait=0",
                   "DefaultTime2Retain=60", "ErrorRecoveryLevel=2", "iSCSIProtocolLevel=2",
                   offer=TargetOffer(max_connections=4, default_time2wait=3))
    assert a["MaxConnections"] == "4" and a["MaxOutstandingR2T"] == "8"
    assert a["DefaultTime2Wait"] == "3" and a["DefaultTime2Retain"] == "0"
    assert a["ErrorRecoveryLevel"] == "0" and a["iSCSIProtocolLevel"] == "1"


def test_first_burst_irrelevant_with_r2t_and_no_immediate_data() -> None:
    a = op_answers("InitialR2T=Yes", "ImmediateData=No", "FirstBurstLength=65536",
                   offer=TargetOffer(initial_r2t=True, immediate_data=False))
    assert a["FirstBurstLength"] == K.IRRELEVANT
    # Order in the request does not matter: FirstBurstLength is judged after the others.
    a = op_answers("FirstBurstLength=65536", "InitialR2T=Yes", "ImmediateData=No",
                   offer=TargetOffer(initial_r2t=True, immediate_data=False))
    assert a["FirstBurstLength"] == K.IRRELEVANT


def test_digests() -> None:
    a = op_answers("HeaderDigest=CRC32C,None", "DataDigest=CRC32C")
    assert a["HeaderDigest"] == "None" and a["DataDigest"] == K.REJECT
    offer = TargetOffer(header_digests=("CRC32C", "None"), data_digests=("CRC32C", "None"))
    h = harness(offer)
    h.send(text(*BASIC, "HeaderDigest=CRC32C,None", "DataDigest=None,CRC32C"),
           t=True, csg=1, nsg=3)
    p = h.machine.params
    assert p is not None and p.header_digest and not p.data_digest


def test_error_recovery_level_capped_at_zero() -> None:
    a = op_answers("ErrorRecoveryLevel=2", offer=TargetOffer(error_recovery_level=2))
    assert a["ErrorRecoveryLevel"] == "0"


def test_task_reporting_and_node_architecture() -> None:
    a = op_answers("TaskReporting=FastAbort,RFC3720", "X#NodeArchitecture=Linux/6.1")
    assert a["TaskReporting"] == "RFC3720" and "X#NodeArchitecture" not in a


def test_leading_only_keys_irrelevant_on_added_connection() -> None:
    a = op_answers("MaxBurstLength=65536", "HeaderDigest=None", "MaxRecvDataSegmentLength=8192",
                   tsih=TSIH)
    assert a["MaxBurstLength"] == K.IRRELEVANT and a["HeaderDigest"] == "None"


def test_tpgt_and_alias_only_in_first_reply() -> None:
    h = harness()
    r = h.send(text(*BASIC, "AuthMethod=None"), t=False, csg=0, nsg=0)
    assert r.pairs[:2] == [("TargetAlias", "disk one"), ("TargetPortalGroupTag", "1")]
    r = h.send(b"", t=True, csg=0, nsg=1)
    assert r.pairs == [] and r.transit
    r = h.send(b"", t=True, csg=1, nsg=3)
    assert r.pairs == [("MaxRecvDataSegmentLength", "262144")] and r.done


def test_no_alias_no_alias_key() -> None:
    h = harness()
    r = h.send(text(f"InitiatorName={INITIATOR}", f"TargetName={OTHER.name}"),
               t=True, csg=1, nsg=3)
    assert "TargetAlias" not in r.keys and r.keys["TargetPortalGroupTag"] == "1"


# --------------------------------------------------------------------------------------------
# Security stage and the authenticator hook

class FakeChap:
    """A stand-in method: CHAP_A → challenge; CHAP_N/CHAP_R → pass or fail."""

    def __init__(self, initiator: str, target: str) -> None:
        assert (initiator, target) == (INITIATOR, TARGET.name)
        self.step = 0

    def receive(self, pairs: list[tuple[str, str]]) -> AuthStep:
        d = dict(pairs)
        if self.step == 0 and d == {"CHAP_A": "5"}:
            self.step = 1
            return AuthStep(reply=(("CHAP_A", "5"), ("CHAP_I", "1"),
                                   ("CHAP_C", "0x" + "ab" * 16)))
        if self.step == 1 and d.get("CHAP_N") == "user" and d.get("CHAP_R") == "0x00ff":
            return AuthStep(done=True)
        return AuthStep(failure=1)


CHAP_OFFER = TargetOffer(auth_methods=("CHAP",))


def chap_harness() -> Harness:
    return harness(CHAP_OFFER, authenticators={"CHAP": FakeChap})


def test_chap_exchange_as_libiscsi_sends_it() -> None:
    h = chap_harness()
    r = h.send(text(*BASIC, "SessionType=Normal", "AuthMethod=CHAP,None"), t=True, csg=0, nsg=1)
    assert r.status == 0 and not r.transit and r.keys["AuthMethod"] == "CHAP"
    r = h.send(text("CHAP_A=5"), t=False, csg=0, nsg=1)
    assert r.status == 0 and not r.transit and r.keys["CHAP_I"] == "1"
    r = h.send(text("CHAP_N=user", "CHAP_R=0x00ff"), t=True, csg=0, nsg=1)
    assert r.status == 0 and r.transit and r.nsg == 1 and r.pairs == []
    r = h.send(libiscsi_opneg(), t=True, csg=1, nsg=3)
    assert r.status == 0 and r.done


def test_chap_wrong_response_is_authentication_failure() -> None:
    h = chap_harness()
    h.send(text(*BASIC, "AuthMethod=CHAP"), t=True, csg=0, nsg=1)
    h.send(text("CHAP_A=5"), t=False, csg=0, nsg=1)
    r = h.send(text("CHAP_N=user", "CHAP_R=0x0000"), t=True, csg=0, nsg=1)
    assert r.status == Status.AUTHENTICATION_FAILURE and r.close


def test_only_unacceptable_auth_methods() -> None:
    r = harness().send(text(*BASIC, "AuthMethod=CHAP,SRP"), t=True, csg=0, nsg=1)
    assert r.status == Status.AUTHENTICATION_FAILURE and r.close
    # CHAP offered in configuration but with no authenticator plugged in is not acceptable.
    r = harness(CHAP_OFFER).send(text(*BASIC, "AuthMethod=CHAP"), t=True, csg=0, nsg=1)
    assert r.status == Status.AUTHENTICATION_FAILURE


def test_skipping_security_when_auth_required() -> None:
    r = chap_harness().send(text(*BASIC), t=True, csg=1, nsg=3)
    assert r.status == Status.AUTHENTICATION_FAILURE and r.close
    r = chap_harness().send(text(*BASIC), t=True, csg=0, nsg=1)   # leaving without a method
    assert r.status == Status.AUTHENTICATION_FAILURE and r.close


def test_security_stage_without_auth_method_when_none_allowed() -> None:
    h = harness()
    r = h.send(text(*BASIC), t=True, csg=0, nsg=1)
    assert r.status == 0 and r.transit and r.nsg == 1


def test_chap_keys_without_a_method_fail() -> None:
    r = harness().send(text(*BASIC, "AuthMethod=None", "CHAP_A=5"), t=True, csg=0, nsg=1)
    assert r.status == Status.AUTHENTICATION_FAILURE and r.close


def test_security_to_ffp_directly() -> None:
    h = harness()
    r = h.send(text(*BASIC, "AuthMethod=None"), t=True, csg=0, nsg=3)
    assert r.done and (r.csg, r.nsg) == (0, 3) and r.tsih == TSIH
    assert set(r.keys) <= OPEN_ISCSI_SECURITY_OK


# --------------------------------------------------------------------------------------------
# Never anything but a reply

KEY_NAMES = [*K.TABLE, "X-foo", "Bogus", "iSCSIProtocolLevel"]
VALUES = ["", "Yes", "No", "0", "1", "512", "8192", "262144", "0x10", "None", "CRC32C",
          "CRC32C,None", "All", "Normal", "Discovery", "Reject", "Irrelevant", "NotUnderstood",
          INITIATOR, TARGET.name, "x" * 300, "-1", "99999999999999999999999"]
pair_text = st.lists(st.tuples(st.sampled_from(KEY_NAMES), st.sampled_from(VALUES)),
                     max_size=12).map(lambda ps: text(*(f"{k}={v}" for k, v in ps)))
request = st.fixed_dictionaries({
    "data": st.one_of(pair_text, st.binary(max_size=200),
                      pair_text.map(lambda d: text(*BASIC) + d)),
    "t": st.booleans(), "c": st.booleans(), "csg": st.integers(0, 3),
    "nsg": st.integers(0, 3), "vmin": st.sampled_from([0, 0, 0, 1]),
    "tsih": st.sampled_from([0, 0, 0, 9]),
})


@settings(max_examples=400, deadline=None)
@given(st.lists(request, min_size=1, max_size=6),
       st.sampled_from([TargetOffer(), CHAP_OFFER]))
def test_fuzz_always_a_reply(requests: list[dict[str, object]], offer: TargetOffer) -> None:
    h = harness(offer, authenticators={"CHAP": FakeChap} if offer is CHAP_OFFER else None)
    closed = done = False
    for drawn in requests:
        kw = dict(drawn)
        data = kw.pop("data")
        assert isinstance(data, bytes)
        reply = h.machine.receive(login_req(data, **kw), 3)
        assert isinstance(reply, LoginReply) and len(reply.header) == 48
        assert not (reply.done and reply.close)
        if closed or done:
            assert reply.close          # nothing is accepted after the end
        closed |= reply.close
        done |= reply.done
        if reply.done:
            assert h.machine.params is not None
