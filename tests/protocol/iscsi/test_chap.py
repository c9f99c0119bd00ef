"""CHAP and mutual CHAP (RFC 7143 §12.1.3, RFC 1994): the authenticator alone, then plugged
into the login machine, and a fuzzer over what an initiator can feed it."""

from __future__ import annotations

import base64
import hashlib
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsand.protocol.iscsi import keys as K
from vsand.protocol.iscsi import pdu
from vsand.protocol.iscsi.chap import (ALGORITHMS, CHALLENGE_LEN, ChapAuthenticator, ChapError,
                                       ChapCredentials, ReplayGuard, chap_factory,
                                       choose_algorithm, decode_binary, decode_identifier,
                                       encode_binary, response)
from vsand.protocol.iscsi.login import (AuthPolicy, AuthStep, LoginMachine, SessionParams,
                                        Status, TargetInfo, TargetOffer)

SECRET = b"initiator-secret-16"
MUTUAL = b"target-secret-xyz"
CREDS = ChapCredentials("alice", SECRET, "disk1", MUTUAL)
TARGET = TargetInfo("iqn.2024-01.org.vsand:disk1", "", (("192.0.2.10", 3260, 1),))
INITIATOR = "iqn.1994-05.com.redhat:client"


class FakeRandom:
    """Deterministic stand-in for os.urandom: bytes 0, 1, 2, ... (mod 256)."""

    def __init__(self) -> None:
        self.counter = itertools.count()

    def __call__(self, n: int) -> bytes:
        return bytes(next(self.counter) % 256 for _ in range(n))


def auth(creds: ChapCredentials = CREDS, guard: ReplayGuard | None = None) -> ChapAuthenticator:
    return ChapAuthenticator(creds, FakeRandom(), guard)


def challenge(a: ChapAuthenticator, algorithms: str = "5") -> tuple[int, int, bytes]:
    step = a.receive([("CHAP_A", algorithms)])
    assert not step.failure and not step.done
    d = dict(step.reply)
    assert list(d) == ["CHAP_A", "CHAP_I", "CHAP_C"]
    return int(d["CHAP_A"]), int(d["CHAP_I"]), decode_binary(d["CHAP_C"])


def answer(alg: int, ident: int, chal: bytes, secret: bytes = SECRET) -> str:
    return encode_binary(response(alg, ident, secret, chal))


# --------------------------------------------------------------------------------------------
# Known answers

def test_md5_known_answer() -> None:
    # RFC 1994 §4.1: MD5 over identifier, secret and challenge, concatenated.
    expected = hashlib.md5(b"\x07" + b"secret" + bytes(range(16))).digest()
    assert response(5, 7, b"secret", bytes(range(16))) == expected
    assert expected.hex() == hashlib.md5(bytes.fromhex(
        "07" + b"secret".hex() + "000102030405060708090a0b0c0d0e0f")).hexdigest()


@pytest.mark.parametrize("alg, name, size", [(5, "md5", 16), (6, "sha1", 20),
                                             (7, "sha256", 32), (8, "sha3_256", 32)])
def test_every_algorithm(alg: int, name: str, size: int) -> None:
    r = response(alg, 200, b"k" * 12, b"c" * 16)
    assert r == hashlib.new(name, bytes([200]) + b"k" * 12 + b"c" * 16).digest()
    assert len(r) == size


def test_fixed_vector_md5() -> None:
    # A frozen value, so a change to the hash input order is caught even if both sides move.
    assert response(5, 1, b"abcdefghijkl", b"\x00" * 16).hex() == hashlib.md5(
        b"\x01abcdefghijkl" + b"\x00" * 16).hexdigest()


# --------------------------------------------------------------------------------------------
# Codecs

@pytest.mark.parametrize("text, value", [
    ("0x00ff", b"\x00\xff"), ("0XABcd", b"\xab\xcd"), ("0xf", b"\x0f"),
    ("0b" + base64.b64encode(b"hello!").decode(), b"hello!"), ("0BAAE=", b"\x00\x01"),
])
def test_decode_binary(text: str, value: bytes) -> None:
    assert decode_binary(text) == value


@pytest.mark.parametrize("text", ["", "0x", "0b", "ff", "0xzz", "0b!!!!", "0bAAE", "12",
                                  "0x12 34", "0b\u00e9\u00e9\u00e9\u00e9"])
def test_decode_binary_rejects(text: str) -> None:
    with pytest.raises(ChapError):
        decode_binary(text)


@pytest.mark.parametrize("text, value", [("0", 0), ("255", 255), ("0x10", 16), ("007", 7)])
def test_decode_identifier(text: str, value: int) -> None:
    assert decode_identifier(text) == value


@pytest.mark.parametrize("text", ["", "256", "-1", "0x100", "a", "1.5", "\u0661", "0x"])
def test_decode_identifier_rejects(text: str) -> None:
    with pytest.raises(ChapError):
        decode_identifier(text)


@pytest.mark.parametrize("offered, chosen", [
    ("5", 5), ("7,5", 7), ("99,6,5", 6), ("8", 8), ("x,5", 5), ("4,3", None), ("", None),
    ("\u0665", None)])
def test_first_supported_algorithm_wins(offered: str, chosen: int | None) -> None:
    assert choose_algorithm(offered) == chosen


def test_credentials_rules() -> None:
    with pytest.raises(ValueError):
        ChapCredentials("u", b"short")
    with pytest.raises(ValueError):
        ChapCredentials("u", SECRET, "t", b"")
    with pytest.raises(ValueError):
        ChapCredentials("u", SECRET, "t", SECRET)      # one secret in both directions
    with pytest.raises(ValueError):
        ChapCredentials("", SECRET)
    assert SECRET.decode() not in repr(CREDS) and MUTUAL.decode() not in repr(CREDS)


# --------------------------------------------------------------------------------------------
# The exchange

def test_one_way_chap() -> None:
    a = auth()
    alg, ident, chal = challenge(a)
    assert alg == 5 and len(chal) == CHALLENGE_LEN
    step = a.receive([("CHAP_N", "alice"), ("CHAP_R", answer(alg, ident, chal))])
    assert step == AuthStep(done=True)


@pytest.mark.parametrize("alg", sorted(ALGORITHMS))
def test_mutual_chap(alg: int) -> None:
    a = auth()
    alg, ident, chal = challenge(a, f"{alg},5")
    my_chal = bytes(range(100, 116))
    step = a.receive([("CHAP_N", "alice"), ("CHAP_R", answer(alg, ident, chal)),
                      ("CHAP_I", "77"), ("CHAP_C", encode_binary(my_chal))])
    assert step.done and not step.failure
    d = dict(step.reply)
    assert d["CHAP_N"] == "disk1"
    assert decode_binary(d["CHAP_R"]) == response(alg, 77, MUTUAL, my_chal)


def test_base64_response_is_accepted() -> None:
    a = auth()
    alg, ident, chal = challenge(a)
    r = "0b" + base64.b64encode(response(alg, ident, SECRET, chal)).decode()
    assert a.receive([("CHAP_N", "alice"), ("CHAP_R", r)]).done


@pytest.mark.parametrize("name, secret", [("alice", b"wrong-secret-xx"), ("bob", SECRET),
                                          ("Alice", SECRET), ("", SECRET)])
def test_unknown_user_and_wrong_secret_fail_alike(name: str, secret: bytes) -> None:
    a = auth()
    alg, ident, chal = challenge(a)
    step = a.receive([("CHAP_N", name), ("CHAP_R", answer(alg, ident, chal, secret))])
    assert step == AuthStep(failure=1)


def test_reflected_challenge_is_refused() -> None:
    a = auth()
    alg, ident, chal = challenge(a)
    step = a.receive([("CHAP_N", "alice"), ("CHAP_R", answer(alg, ident, chal)),
                      ("CHAP_I", str(ident)), ("CHAP_C", encode_binary(chal))])
    assert step.failure and not step.reply


@pytest.mark.parametrize("size", [0, 1, 8, 15, 1025])
def test_challenge_length_limits(size: int) -> None:
    a = auth()
    alg, ident, chal = challenge(a)
    c = "0x" + "ab" * size if size else "0x"
    step = a.receive([("CHAP_N", "alice"), ("CHAP_R", answer(alg, ident, chal)),
                      ("CHAP_I", "1"), ("CHAP_C", c)])
    assert step.failure and not step.reply


def test_replayed_identifier_and_challenge_are_refused() -> None:
    guard = ReplayGuard()
    mine = encode_binary(b"\x42" * 16)
    results = []
    for _ in range(2):
        a = auth(guard=guard)
        alg, ident, chal = challenge(a)
        results.append(a.receive([("CHAP_N", "alice"), ("CHAP_R", answer(alg, ident, chal)),
                                  ("CHAP_I", "9"), ("CHAP_C", mine)]))
    assert results[0].done and results[1].failure
    # Another identifier with the same challenge is a different pair.
    a = auth(guard=guard)
    alg, ident, chal = challenge(a)
    assert a.receive([("CHAP_N", "alice"), ("CHAP_R", answer(alg, ident, chal)),
                      ("CHAP_I", "10"), ("CHAP_C", mine)]).done


def test_replay_guard_forgets_the_oldest() -> None:
    g = ReplayGuard(capacity=2)
    assert g.fresh(5, 1, b"a") and g.fresh(5, 2, b"b") and g.fresh(5, 3, b"c")
    assert not g.fresh(5, 3, b"c")
    assert g.fresh(5, 1, b"a")  # evicted, so new again


def test_mutual_without_a_mutual_secret_fails() -> None:
    a = auth(ChapCredentials("alice", SECRET))
    alg, ident, chal = challenge(a)
    step = a.receive([("CHAP_N", "alice"), ("CHAP_R", answer(alg, ident, chal)),
                      ("CHAP_I", "1"), ("CHAP_C", encode_binary(b"\x01" * 16))])
    assert step.failure and not step.reply


def test_mutual_needs_the_initiator_proven_first() -> None:
    # A wrong response never earns the target's answer to the initiator's challenge.
    a = auth()
    challenge(a)
    step = a.receive([("CHAP_N", "alice"), ("CHAP_R", "0x" + "00" * 16),
                      ("CHAP_I", "1"), ("CHAP_C", encode_binary(b"\x01" * 16))])
    assert step.failure and not step.reply


@pytest.mark.parametrize("first", [
    [("CHAP_A", "4")], [("CHAP_A", "5"), ("CHAP_N", "alice")], [("CHAP_N", "alice")],
    [("CHAP_R", "0x00")], [("CHAP_A", "")]])
def test_bad_first_step(first: list[tuple[str, str]]) -> None:
    assert auth().receive(first).failure


@pytest.mark.parametrize("second", [
    [("CHAP_A", "5")], [("CHAP_N", "alice")], [("CHAP_R", "0x00")],
    [("CHAP_N", "alice"), ("CHAP_R", "zz")], [("CHAP_N", "alice"), ("CHAP_R", "0x")],
    [("CHAP_N", "alice"), ("CHAP_R", "0x00"), ("CHAP_I", "1")],
    [("CHAP_N", "alice"), ("CHAP_R", "0x00"), ("CHAP_C", "0x" + "11" * 16)],
    [("CHAP_N", "alice"), ("CHAP_R", "0x00"), ("CHAP_I", "x"), ("CHAP_C", "0x" + "11" * 16)],
])
def test_bad_second_step(second: list[tuple[str, str]]) -> None:
    a = auth()
    challenge(a)
    assert a.receive(second).failure


def test_failed_and_finished_exchanges_stay_closed() -> None:
    a = auth()
    alg, ident, chal = challenge(a)
    good = [("CHAP_N", "alice"), ("CHAP_R", answer(alg, ident, chal))]
    assert a.receive(good).done
    assert a.receive(good).failure                  # nothing after done
    b = auth()
    alg, ident, chal = challenge(b)
    assert b.receive([("CHAP_N", "alice"), ("CHAP_R", "0x00")]).failure
    assert b.receive(good).failure                  # no second try on one login


def test_challenges_come_from_the_injected_source() -> None:
    calls: list[int] = []

    def rnd(n: int) -> bytes:
        calls.append(n)
        return b"\x05" * n
    a = ChapAuthenticator(CREDS, rnd)
    step = a.receive([("CHAP_A", "5")])
    assert dict(step.reply) == {"CHAP_A": "5", "CHAP_I": "5",
                                "CHAP_C": "0x" + "05" * CHALLENGE_LEN}
    assert calls == [1, CHALLENGE_LEN]


# --------------------------------------------------------------------------------------------
# Hypothesis: whatever an initiator sends, the authenticator answers with an AuthStep and
# never accepts without the secret.

_chap_keys = st.sampled_from(["CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"])
_values = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["5", "5,7", "0x", "0b", "0x" + "ab" * 16, "0b" + "A" * 24, "alice",
                     "255", "256", "0x" + "00" * 2000]),
    st.binary(min_size=0, max_size=40).map(lambda b: "0x" + b.hex()),
    st.binary(min_size=0, max_size=40).map(lambda b: "0b" + base64.b64encode(b).decode()),
)
_requests = st.lists(st.lists(st.tuples(_chap_keys, _values), max_size=6), max_size=4)


@settings(max_examples=400, deadline=None)
@given(_requests)
def test_fuzz_never_crashes_nor_accepts_without_the_secret(requests: list[list[tuple[str, str]]]
                                                           ) -> None:
    a = auth()
    for pairs in requests:
        step = a.receive(pairs)
        assert isinstance(step, AuthStep)
        assert not step.done, "accepted without knowing the secret"
        for key, value in step.reply:
            assert SECRET.decode() not in value and MUTUAL.decode() not in value


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_chap_keys, _values), max_size=4))
def test_fuzz_extra_keys_after_a_right_answer(extra: list[tuple[str, str]]) -> None:
    a = auth()
    alg, ident, chal = challenge(a)
    pairs = [("CHAP_N", "alice"), ("CHAP_R", answer(alg, ident, chal))] + extra
    step = a.receive(pairs)
    if step.done:
        # Only the two optional mutual keys may ride along, and they must be well formed.
        assert {k for k, _ in extra} <= {"CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"}


# --------------------------------------------------------------------------------------------
# Through the login machine, as libiscsi and open-iscsi send it

def login_bhs(data: bytes, *, t: bool, csg: int, nsg: int, itt: int = 1) -> bytes:
    b1 = (0x80 if t else 0) | (csg << 2) | nsg
    return (struct.pack(">BBBBI", 0x43, b1, 0, 0, len(data)) + (0x80A1B2C30000).to_bytes(6, "big")
            + b"\0\0" + struct.pack(">IHHII", itt, 0, 0, 0x1000, 0) + bytes(16))


def send(m: LoginMachine, pairs: list[tuple[str, str]], *, t: bool, csg: int, nsg: int
         ) -> tuple[int, bool, dict[str, str]]:
    data = K.encode_text(pairs)
    req = pdu.decode(login_bhs(data, t=t, csg=csg, nsg=nsg), b"", memoryview(data))
    assert isinstance(req, pdu.LoginRequest)
    reply = m.receive(req, 0)
    status = int.from_bytes(reply.header[36:38], "big")
    return status, bool(reply.header[1] & 0x80), dict(K.parse_text(reply.data))


def machine(policy: AuthPolicy, admitted: list[SessionParams] | None = None) -> LoginMachine:
    def admit(p: SessionParams) -> tuple[int, int, int]:
        if admitted is not None:
            admitted.append(p)
        return (0, 0, 7)
    return LoginMachine(portal_group_tag=1, offer=TargetOffer(),
                        lookup_target=lambda n: TARGET if n == TARGET.name else None,
                        admit=admit, auth_policy=lambda kind, name: policy)


CHAP_POLICY = AuthPolicy(("CHAP",), {"CHAP": chap_factory(CREDS, FakeRandom(), ReplayGuard())})
BASIC = [("InitiatorName", INITIATOR), ("TargetName", TARGET.name), ("SessionType", "Normal")]


def test_login_with_mutual_chap_reaches_full_feature() -> None:
    admitted: list[SessionParams] = []
    m = machine(CHAP_POLICY, admitted)
    st_, transit, keys = send(m, BASIC + [("AuthMethod", "CHAP,None")], t=True, csg=0, nsg=1)
    assert (st_, transit, keys["AuthMethod"]) == (0, False, "CHAP")
    st_, transit, keys = send(m, [("CHAP_A", "7,5")], t=True, csg=0, nsg=1)
    assert st_ == 0 and not transit and keys["CHAP_A"] == "7"
    alg, ident, chal = 7, int(keys["CHAP_I"]), decode_binary(keys["CHAP_C"])
    mine = b"\x99" * 16
    st_, transit, keys = send(m, [("CHAP_N", "alice"), ("CHAP_R", answer(alg, ident, chal)),
                                  ("CHAP_I", "3"), ("CHAP_C", encode_binary(mine))],
                              t=True, csg=0, nsg=1)
    assert st_ == 0 and transit
    assert decode_binary(keys["CHAP_R"]) == response(7, 3, MUTUAL, mine)
    st_, transit, _ = send(m, [("HeaderDigest", "None")], t=True, csg=1, nsg=3)
    assert st_ == 0 and transit and admitted


def test_login_wrong_secret_is_0201() -> None:
    m = machine(CHAP_POLICY)
    send(m, BASIC + [("AuthMethod", "CHAP")], t=True, csg=0, nsg=1)
    _, _, keys = send(m, [("CHAP_A", "5")], t=True, csg=0, nsg=1)
    chal = decode_binary(keys["CHAP_C"])
    st_, _, _ = send(m, [("CHAP_N", "alice"), ("CHAP_R", answer(5, int(keys["CHAP_I"]), chal,
                                                                 b"not-the-secret"))],
                     t=True, csg=0, nsg=1)
    assert st_ == Status.AUTHENTICATION_FAILURE


@pytest.mark.parametrize("offer", ["None", "SRP", "KRB5,None"])
def test_login_without_chap_is_refused_when_required(offer: str) -> None:
    st_, _, _ = send(machine(CHAP_POLICY), BASIC + [("AuthMethod", offer)], t=True, csg=0, nsg=1)
    assert st_ == Status.AUTHENTICATION_FAILURE


def test_login_skipping_security_is_refused_when_chap_is_required() -> None:
    st_, _, _ = send(machine(CHAP_POLICY), BASIC + [("HeaderDigest", "None")],
                     t=True, csg=1, nsg=3)
    assert st_ == Status.AUTHENTICATION_FAILURE


def test_policy_is_asked_with_session_type_and_target() -> None:
    asked: list[tuple[str, str]] = []

    def policy(kind: str, name: str) -> AuthPolicy:
        asked.append((kind, name))
        return AuthPolicy()
    m = LoginMachine(portal_group_tag=1, offer=TargetOffer(), lookup_target=lambda n: TARGET,
                     admit=lambda p: (0, 0, 1), auth_policy=policy)
    send(m, [("InitiatorName", INITIATOR), ("SessionType", "Discovery"),
             ("AuthMethod", "None")], t=True, csg=0, nsg=1)
    assert asked == [("Discovery", "")]
