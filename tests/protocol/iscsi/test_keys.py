"""The RFC 7143 §13 key table and the key=value text codec."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vsand.protocol.iscsi import keys as K


# --------------------------------------------------------------------------------------------
# Table: every §13 key with its result function, default and range

@pytest.mark.parametrize("name,kind,default,low,high", [
    ("HeaderDigest", K.Kind.LIST, "None", 0, 0),
    ("DataDigest", K.Kind.LIST, "None", 0, 0),
    ("MaxConnections", K.Kind.NUM_MIN, "1", 1, 65535),
    ("InitialR2T", K.Kind.BOOL_OR, "Yes", 0, 0),
    ("ImmediateData", K.Kind.BOOL_AND, "Yes", 0, 0),
    ("MaxRecvDataSegmentLength", K.Kind.NUM_DECLARATIVE, "8192", 512, 2**24 - 1),
    ("MaxBurstLength", K.Kind.NUM_MIN, "262144", 512, 2**24 - 1),
    ("FirstBurstLength", K.Kind.NUM_MIN, "65536", 512, 2**24 - 1),
    ("DefaultTime2Wait", K.Kind.NUM_MAX, "2", 0, 3600),
    ("DefaultTime2Retain", K.Kind.NUM_MIN, "20", 0, 3600),
    ("MaxOutstandingR2T", K.Kind.NUM_MIN, "1", 1, 65535),
    ("DataPDUInOrder", K.Kind.BOOL_OR, "Yes", 0, 0),
    ("DataSequenceInOrder", K.Kind.BOOL_OR, "Yes", 0, 0),
    ("ErrorRecoveryLevel", K.Kind.NUM_MIN, "0", 0, 2),
    ("SessionType", K.Kind.DECLARATIVE, "Normal", 0, 0),
    ("iSCSIProtocolLevel", K.Kind.NUM_MIN, "1", 0, 31),
    ("TaskReporting", K.Kind.LIST, "RFC3720", 0, 0),
])
def test_table_rows(name: str, kind: K.Kind, default: str, low: int, high: int) -> None:
    spec = K.TABLE[name]
    assert spec.kind is kind
    assert spec.default == default
    assert (spec.low, spec.high) == (low, high)


def test_scopes_and_uses() -> None:
    assert K.TABLE["HeaderDigest"].scope is K.Scope.CONNECTION
    assert K.TABLE["MaxRecvDataSegmentLength"].scope is K.Scope.CONNECTION
    assert K.TABLE["MaxBurstLength"].scope is K.Scope.SESSION
    assert K.TABLE["MaxRecvDataSegmentLength"].use is K.Use.ALL
    assert K.TABLE["SendTargets"].use is K.Use.FFPO
    assert K.TABLE["MaxBurstLength"].use is K.Use.LO
    assert K.TABLE["HeaderDigest"].use is K.Use.IO
    assert K.TABLE["AuthMethod"].stage is K.Stage.SECURITY
    assert K.TABLE["CHAP_R"].kind is K.Kind.AUTH
    assert K.TABLE["InitiatorName"].stage is K.Stage.ANY
    assert not K.TABLE["TargetPortalGroupTag"].senders & K.Sender.INITIATOR
    assert not K.TABLE["TargetAlias"].senders & K.Sender.INITIATOR


def test_discovery_irrelevant_keys() -> None:
    irrelevant = {n for n, s in K.TABLE.items() if s.discovery_irrelevant}
    assert {"MaxConnections", "InitialR2T", "ImmediateData", "MaxBurstLength",
            "FirstBurstLength", "MaxOutstandingR2T", "DataPDUInOrder",
            "DataSequenceInOrder"} <= irrelevant
    assert "DefaultTime2Wait" not in irrelevant
    assert "ErrorRecoveryLevel" not in irrelevant
    assert "HeaderDigest" not in irrelevant


def test_first_burst_irrelevant_without_unsolicited_data() -> None:
    fbl = K.TABLE["FirstBurstLength"]
    assert K.irrelevant(fbl, False, initial_r2t=True, immediate_data=False)
    assert not K.irrelevant(fbl, False, initial_r2t=True, immediate_data=True)
    assert not K.irrelevant(fbl, False, initial_r2t=False, immediate_data=False)
    assert K.irrelevant(fbl, True, initial_r2t=False, immediate_data=True)
    assert not K.irrelevant(K.TABLE["MaxBurstLength"], False, True, False)


# --------------------------------------------------------------------------------------------
# Codec

def test_parse_text_pairs_in_order() -> None:
    data = b"InitiatorName=iqn.a:b\0SessionType=Normal\0HeaderDigest=None,CRC32C\0"
    assert K.parse_text(data) == [("InitiatorName", "iqn.a:b"), ("SessionType", "Normal"),
                                  ("HeaderDigest", "None,CRC32C")]
    assert K.parse_text(memoryview(data)) == K.parse_text(data)


def test_parse_text_empty_and_values() -> None:
    assert K.parse_text(b"") == []
    assert K.parse_text(b"\0\0") == []
    assert K.parse_text(b"SendTargets=\0") == [("SendTargets", "")]
    assert K.parse_text(b"A=b=c\0") == [("A", "b=c")]          # the first '=' separates
    assert K.parse_text(b"A=1\0\0B=2\0") == [("A", "1"), ("B", "2")]
    assert K.parse_text("X-a=\u00e9\0".encode()) == [("X-a", "\u00e9")]


@pytest.mark.parametrize("data", [
    b"InitiatorName=iqn.a:b",            # no NUL at the end
    b"InitiatorName\0",                  # no '='
    b"=value\0",                         # empty key
    b"Bad Key=1\0",                      # space in a key name
    b"1Key=1\0",                         # must start with a letter
    b"K" * 64 + b"=1\0",                 # 64-byte key name
    b"Key=\xff\xfe\0",                   # not UTF-8
    b"K\xc3\xa9y=1\0",                   # non-ASCII key
])
def test_parse_text_malformed(data: bytes) -> None:
    with pytest.raises(K.TextError):
        K.parse_text(data)


def test_key_name_limit_is_63() -> None:
    assert K.parse_text(b"K" * 63 + b"=1\0") == [("K" * 63, "1")]


def test_encode_and_split() -> None:
    pairs = [("TargetName", "iqn.x:y"), ("TargetAddress", "10.0.0.1:3260,1")]
    data = K.encode_text(pairs)
    assert data == b"TargetName=iqn.x:y\0TargetAddress=10.0.0.1:3260,1\0"
    assert K.parse_text(data) == pairs
    pieces = K.split_text(data, 7)
    assert all(len(p) <= 7 for p in pieces)
    assert b"".join(pieces) == data
    assert K.split_text(b"", 8192) == [b""]


@given(st.lists(st.tuples(st.from_regex(r"[A-Z][A-Za-z0-9.\-+@_]{0,62}", fullmatch=True),
                          st.text(alphabet=st.characters(blacklist_characters="\0",
                                                         blacklist_categories=("Cs",)),
                                  max_size=40)), max_size=20))
def test_codec_round_trip(pairs: list[tuple[str, str]]) -> None:
    assert K.parse_text(K.encode_text(pairs)) == pairs


@given(st.binary(max_size=300))
def test_parse_text_only_raises_text_error(data: bytes) -> None:
    try:
        K.parse_text(data)
    except K.TextError:
        pass


# --------------------------------------------------------------------------------------------
# Values and result functions

@pytest.mark.parametrize("text,value", [
    ("0", 0), ("8192", 8192), ("0x2000", 8192), ("0X2000", 8192), ("0xffff", 65535),
    ("18446744073709551615", 2**64 - 1),
])
def test_parse_number(text: str, value: int) -> None:
    assert K.parse_number(text) == value


@pytest.mark.parametrize("text", ["", "08192", "-1", "+1", "1.5", "0x", "abc", " 1", "1 ",
                                  "18446744073709551616", "0b101"])
def test_parse_number_malformed(text: str) -> None:
    assert K.parse_number(text) is None


def test_booleans() -> None:
    spec = K.TABLE["ImmediateData"]
    assert K.answer(spec, "Yes", True) == K.Answer("Yes", True)
    assert K.answer(spec, "Yes", False) == K.Answer("No", False)
    assert K.answer(spec, "No", True) == K.Answer("No", False)
    orr = K.TABLE["InitialR2T"]
    assert K.answer(orr, "No", False) == K.Answer("No", False)
    assert K.answer(orr, "No", True) == K.Answer("Yes", True)
    assert K.answer(orr, "Yes", False) == K.Answer("Yes", True)
    for bad in ("yes", "YES", "1", "", "Yes,No"):
        assert K.answer(spec, bad, True) == K.Answer(K.REJECT)


def test_numerical_min_max() -> None:
    mbl = K.TABLE["MaxBurstLength"]
    assert K.answer(mbl, "262144", 1048576) == K.Answer("262144", 262144)
    assert K.answer(mbl, "16776192", 1048576) == K.Answer("1048576", 1048576)
    assert K.answer(mbl, "0x40000", 1048576) == K.Answer("262144", 262144)
    t2w = K.TABLE["DefaultTime2Wait"]
    assert K.answer(t2w, "0", 2) == K.Answer("2", 2)
    assert K.answer(t2w, "5", 2) == K.Answer("5", 5)
    erl = K.TABLE["ErrorRecoveryLevel"]
    assert K.answer(erl, "2", 0) == K.Answer("0", 0)


@pytest.mark.parametrize("name,value", [
    ("MaxBurstLength", "511"), ("MaxBurstLength", "16777216"), ("MaxConnections", "0"),
    ("MaxConnections", "65536"), ("DefaultTime2Wait", "3601"), ("ErrorRecoveryLevel", "3"),
    ("MaxOutstandingR2T", "0"), ("MaxBurstLength", "0262144"), ("MaxBurstLength", "big"),
    ("MaxBurstLength", "1" * 256),
])
def test_out_of_range_or_malformed_is_rejected(name: str, value: str) -> None:
    assert K.answer(K.TABLE[name], value, 1) == K.Answer(K.REJECT)


def test_list_picks_first_offered_we_support() -> None:
    hd = K.TABLE["HeaderDigest"]
    assert K.answer(hd, "CRC32C,None", ("None",)) == K.Answer("None", "None")
    assert K.answer(hd, "CRC32C,None", ("CRC32C", "None")) == K.Answer("CRC32C", "CRC32C")
    assert K.answer(hd, "None,CRC32C", ("CRC32C", "None")) == K.Answer("None", "None")
    assert K.answer(hd, "MD5,None", ("None",)) == K.Answer("None", "None")  # unknown skipped
    assert K.answer(hd, "CRC32C", ("None",)) == K.Answer(K.REJECT)
    assert K.answer(hd, "None,,CRC32C", ("None",)) == K.Answer(K.REJECT)   # malformed list


def test_declarative_and_always_reject() -> None:
    assert K.answer(K.TABLE["MaxRecvDataSegmentLength"], "65536", None) == K.Answer(None, 65536)
    assert K.answer(K.TABLE["IFMarkInt"], "2048", None) == K.Answer(K.REJECT)
    assert K.answer(K.TABLE["IFMarker"], "No", False) == K.Answer("No", False)
    assert K.answer(K.TABLE["OFMarker"], "Yes", False) == K.Answer("No", False)


def test_default_values() -> None:
    assert K.default_value(K.TABLE["ImmediateData"]) is True
    assert K.default_value(K.TABLE["MaxBurstLength"]) == 262144
    assert K.default_value(K.TABLE["HeaderDigest"]) == "None"
    assert K.default_value(K.TABLE["TargetName"]) is None


def test_format_address() -> None:
    assert K.format_address("10.0.0.1", 3260, 1) == "10.0.0.1:3260,1"
    assert K.format_address("fe80::1", 3260, 2) == "[fe80::1]:3260,2"
    assert K.format_address("[fe80::1]", 3261, 2) == "[fe80::1]:3261,2"
    assert K.format_address("san.example", 3260, 1) == "san.example:3260,1"
