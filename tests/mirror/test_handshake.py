import random

import pytest
from hypothesis import given, settings, strategies as st

from vsand.mirror import messages as m
from vsand.mirror.handshake import (
    AUTH_FAILED, Handshake, HelloBody, HelloError, LinkRole, LunInfo, NodeIdentity, State,
    compute_mac,
)
from vsand.mirror.messages import MessageReader, encode

SECRET = b"correct horse battery staple"
LUNS = (LunInfo(0, "naa.600-a", 512, 2097152), LunInfo(1, "naa.600-b", 4096, 1000))
A = NodeIdentity("prod", "a", LUNS)
B = NodeIdentity("prod", "b", LUNS)
ALL = {"a", "b", "c"}


def rng(seed: int):
    return random.Random(seed).randbytes


def make(local=A, secret=SECRET, allowed=ALL, seed=1, role=LinkRole.SYNC) -> Handshake:
    return Handshake(local, secret, allowed, rng(seed), role=role)


def hello(node="b", lo=1, hi=1, nonce=b"\x42" * 32, role=LinkRole.SYNC, luns=LUNS,
          cluster="prod") -> m.Hello:
    return m.Hello(HelloBody(cluster, node, lo, hi, nonce, role, luns).encode())


def body(msg: m.Message) -> HelloBody:
    assert isinstance(msg, m.Hello)
    return HelloBody.decode(msg.body)


def over_the_wire(msgs):
    """Each message as the peer's reader would see it, through the real codec."""
    reader = MessageReader()
    for msg in msgs:
        reader.feed(b"".join(encode(msg)))
    out = []
    while (msg := reader.next_message()) is not None:
        out.append(msg)
    assert len(out) == len(msgs)
    return out


def pump(a: Handshake, b: Handshake, to_b: list, to_a: list, log: list | None = None) -> None:
    """Deliver messages both ways until neither side has anything to say."""
    while to_a or to_b:
        if to_b:
            msgs, to_b = over_the_wire(to_b), []
            for msg in msgs:
                if log is not None:
                    log.append(("a->b", msg))
                if b.state not in (State.DONE, State.FAILED):
                    to_a += b.receive(msg)
        if to_a:
            msgs, to_a = over_the_wire(to_a), []
            for msg in msgs:
                if log is not None:
                    log.append(("b->a", msg))
                if a.state not in (State.DONE, State.FAILED):
                    to_b += a.receive(msg)


def connect(a: Handshake, b: Handshake, simultaneous: bool = True,
            log: list | None = None) -> None:
    to_b = a.start()
    to_a = b.start() if simultaneous else []
    pump(a, b, to_b, to_a, log)


def assert_done(a: Handshake, b: Handshake) -> None:
    assert a.done and b.done, (a.failed, b.failed)
    assert a.failed is None and b.failed is None
    assert a.peer.node_id == "b" and b.peer.node_id == "a"
    assert a.version == b.version == 1
    assert a.common_luns == b.common_luns == {0: LUNS[0], 1: LUNS[1]}
    assert a.lun_notes == b.lun_notes == ()


def test_success_when_both_send_hello_first():
    a, b = make(A, seed=1), make(B, seed=2)
    connect(a, b, simultaneous=True)
    assert_done(a, b)


def test_success_when_one_side_speaks_first():
    a, b = make(A, seed=1), make(B, seed=2)
    connect(a, b, simultaneous=False)
    assert_done(a, b)


def test_success_with_an_accepting_side_that_adopts_the_role():
    a = make(A, seed=1, role=LinkRole.HEARTBEAT)
    b = make(B, seed=2, role=None)
    assert b.start() == []
    connect(a, b)
    assert_done(a, b)
    assert b.role is LinkRole.HEARTBEAT and b.peer.role is LinkRole.HEARTBEAT


def test_success_when_one_side_starts_after_receiving_hello():
    # b's start() comes late: the machine must not send a second HELLO.
    a, b = make(A, seed=1), make(B, seed=2)
    hello_a = a.start()
    out = b.receive(over_the_wire(hello_a)[0])
    assert [type(x) for x in out] == [m.Hello, m.ChallengeResponse]
    assert b.start() == []
    pump(a, b, [], out)
    assert_done(a, b)


def test_message_sequence():
    a, b = make(A, seed=1), make(B, seed=2)
    log: list = []
    connect(a, b, simultaneous=False, log=log)
    assert [(d, type(x).__name__) for d, x in log] == [
        ("a->b", "Hello"),
        ("b->a", "Hello"), ("b->a", "ChallengeResponse"),
        ("a->b", "ChallengeResponse"), ("a->b", "Welcome"),
        ("b->a", "Welcome"),
    ]


def test_nonces_come_from_random_bytes_and_differ_per_session():
    calls = []

    def rb(n):
        calls.append(n)
        return bytes([len(calls)]) * n
    a = Handshake(A, SECRET, ALL, rb)
    (first,) = a.start()
    assert calls == [32] and body(first).nonce == b"\x01" * 32


def failed_pair(a: Handshake, b: Handshake) -> tuple[Handshake, Handshake]:
    connect(a, b)
    assert not a.done and not b.done
    return a, b


def test_wrong_cluster_id():
    a, b = failed_pair(make(A), make(NodeIdentity("test", "b", LUNS), seed=2))
    assert a.failed == "wrong cluster id: 'test' at node b, 'prod' here"
    assert b.failed is not None and b.failed.startswith("wrong cluster id")


def test_same_node_id_as_ours():
    a, b = failed_pair(make(A), make(A, seed=2))
    assert a.failed == "node id 'a' is this node's own"


def test_unknown_node_id():
    a, b = failed_pair(make(A, allowed={"b"}), make(NodeIdentity("prod", "z", LUNS), seed=2))
    assert a.failed == "unknown node id 'z'"
    # z was told why, in a GOODBYE.
    assert b.failed == "refused by node a: unknown node id 'z'"


def test_no_common_version():
    a = make(A)
    a.start()
    (bye,) = a.receive(hello(lo=2, hi=3))
    assert a.failed == "no common protocol version: 1-1 here, 2-3 at node b"
    assert isinstance(bye, m.Goodbye) and bye.reason == a.failed


def test_versions_overlapping_pick_the_highest_common():
    a = make(A)
    a.start()
    out = a.receive(hello(hi=7))
    assert a.version == 1 and isinstance(out[0], m.ChallengeResponse)


def test_local_version_range_must_be_spoken_here():
    with pytest.raises(ValueError):
        make(NodeIdentity("prod", "a", LUNS, 1, 2))


def test_short_secret_refused():
    with pytest.raises(ValueError, match="at least 16"):
        make(secret=b"short")


def test_bad_hmac_says_only_authentication_failed():
    a, b = failed_pair(make(A), make(B, secret=b"another secret, just as long", seed=2))
    assert a.failed == AUTH_FAILED
    assert b.failed in (AUTH_FAILED, f"refused by node a: {AUTH_FAILED}")


def test_link_role_mismatch():
    a, b = failed_pair(make(A), make(B, seed=2, role=LinkRole.HEARTBEAT))
    assert a.failed == "link role mismatch: sync here, heartbeat at node b"


def test_lun_size_mismatch_names_the_lun_and_both_sizes():
    other = (LunInfo(0, "naa.600-a", 512, 2097151), LUNS[1])
    a, b = failed_pair(make(A), make(NodeIdentity("prod", "b", other), seed=2))
    assert a.failed == "LUN naa.600-a: 2097152 blocks here, 2097151 at node b"
    assert b.failed in ("LUN naa.600-a: 2097151 blocks here, 2097152 at node a",
                        "refused by node a: LUN naa.600-a: 2097152 blocks here, 2097151 at "
                        "node b")


def test_block_size_and_id_mismatches_are_all_reported():
    other = (LunInfo(0, "naa.600-a", 4096, 2097152), LunInfo(2, "naa.600-b", 4096, 1000))
    a = make(A)
    b = make(NodeIdentity("prod", "b", other), seed=2)
    connect(a, b)
    assert a.failed == ("LUN naa.600-a: block size 512 here, 4096 at node b; "
                        "LUN naa.600-b: id 1 here, 2 at node b")


def test_one_id_for_two_different_serials_is_refused():
    other = (LUNS[0], LunInfo(1, "naa.600-zzz", 4096, 1000))
    a, b = failed_pair(make(A), make(NodeIdentity("prod", "b", other), seed=2))
    assert a.failed == "LUN id 1: serial naa.600-b here, naa.600-zzz at node b"


def test_geometry_is_checked_only_after_authentication():
    other = (LunInfo(0, "naa.600-a", 512, 1),)
    a, b = failed_pair(make(A), make(NodeIdentity("prod", "b", other), seed=2,
                                     secret=b"another secret, just as long"))
    assert a.failed == AUTH_FAILED


def test_lun_missing_on_one_side_is_reported_not_fatal():
    extra = LunInfo(5, "naa.600-only-b", 512, 8)
    a = make(A)
    b = make(NodeIdentity("prod", "b", (LUNS[1], extra)), seed=2)
    connect(a, b)
    assert a.done and b.done
    assert a.common_luns == b.common_luns == {1: LUNS[1]}
    assert a.lun_notes == ("LUN naa.600-a: configured here, not at node b",
                           "LUN naa.600-only-b: configured at node b, not here")
    assert b.lun_notes == ("LUN naa.600-a: configured at node a, not here",
                           "LUN naa.600-only-b: configured here, not at node a")


def test_no_luns_in_common_still_links():
    a = make(NodeIdentity("prod", "a", ()), role=LinkRole.HEARTBEAT)
    b = make(B, seed=2, role=LinkRole.HEARTBEAT)
    connect(a, b)
    assert a.done and b.done and a.common_luns == {} and len(a.lun_notes) == 2


def test_replayed_response_from_another_session_fails():
    # Session 1: record everything b sends.
    a1, b1 = make(A, seed=1), make(B, seed=2)
    log: list = []
    connect(a1, b1, log=log)
    assert a1.done
    hello_b = next(x for d, x in log if d == "b->a" and isinstance(x, m.Hello))
    resp_b = next(x for d, x in log if d == "b->a" and isinstance(x, m.ChallengeResponse))
    # Session 2: an attacker without the secret replays b's messages to a (new nonce).
    a2 = make(A, seed=3)
    a2.start()
    out = a2.receive(hello_b)
    assert isinstance(out[-1], m.ChallengeResponse)
    (bye,) = a2.receive(resp_b)
    assert a2.failed == AUTH_FAILED and bye == m.Goodbye(AUTH_FAILED)
    assert not a2.done


def test_reflected_response_fails():
    # An attacker claiming to be b sends a's own response back to it.
    a = make(A, seed=1)
    (hello_a,) = a.start()
    (resp_a,) = a.receive(hello())
    assert isinstance(resp_a, m.ChallengeResponse)
    a.receive(resp_a)
    assert a.failed == AUTH_FAILED


def test_response_with_roles_swapped_does_not_verify():
    a = make(A, seed=1)
    (hello_a,) = a.start()
    hello_b = hello()
    a.receive(hello_b)
    # Someone who knows the secret but puts the roles the wrong way round.
    swapped = compute_mac(SECRET, hello_a.body, hello_b.body)
    assert swapped != compute_mac(SECRET, hello_b.body, hello_a.body)
    a.receive(m.ChallengeResponse(swapped))
    assert a.failed == AUTH_FAILED


def test_right_response_verifies():
    a = make(A, seed=1)
    (hello_a,) = a.start()
    hello_b = hello()
    a.receive(hello_b)
    assert a.receive(m.ChallengeResponse(compute_mac(SECRET, hello_b.body, hello_a.body))) == [
        m.Welcome(1)]
    a.receive(m.Welcome(1))
    assert a.done


def test_reflected_hello_is_refused():
    a = make(A, seed=1)
    (hello_a,) = a.start()
    a.receive(hello_a)
    assert a.failed == "node id 'a' is this node's own"


def test_hello_with_our_nonce_is_refused():
    a = make(A, seed=1)
    (hello_a,) = a.start()
    a.receive(hello(nonce=body(hello_a).nonce))
    assert a.failed == "the peer's nonce is ours"


@pytest.mark.parametrize("first", [
    m.ChallengeResponse(bytes(32)), m.Welcome(1), m.Flush(0, 0, 0, 0), m.Heartbeat(1, 2)])
def test_out_of_turn_messages_fail(first):
    a = make(A)
    a.start()
    (bye,) = a.receive(first)
    assert a.failed == f"unexpected {first.TYPE.name} while hello sent"
    assert isinstance(bye, m.Goodbye)


def test_second_hello_fails():
    a = make(A)
    a.start()
    hello_b = hello()
    a.receive(hello_b)
    a.receive(hello_b)
    assert a.failed == "unexpected HELLO while responded"


def test_welcome_before_verification_fails():
    a = make(A)
    a.start()
    a.receive(hello())
    a.receive(m.Welcome(1))
    assert a.failed == "unexpected WELCOME while responded"


def test_goodbye_from_the_peer():
    a = make(A)
    a.start()
    assert a.receive(m.Goodbye("maintenance")) == []
    assert a.failed == "refused by the peer: maintenance"


def test_receive_after_the_end_is_a_caller_error():
    a, b = make(A, seed=1), make(B, seed=2)
    connect(a, b)
    with pytest.raises(RuntimeError):
        a.receive(m.Flush(0, 0, 0, 0))


def test_peer_before_hello_is_a_caller_error():
    with pytest.raises(RuntimeError):
        make(A).peer


def test_long_failure_reason_still_fits_a_goodbye():
    many_a = tuple(LunInfo(i, f"serial-{i:04d}-" + "x" * 40, 512, 100) for i in range(60))
    many_b = tuple(LunInfo(i, f"serial-{i:04d}-" + "x" * 40, 512, 101) for i in range(60))
    a = make(NodeIdentity("prod", "a", many_a))
    b = make(NodeIdentity("prod", "b", many_b), seed=2)
    connect(a, b)
    assert a.failed is not None and len(a.failed) > 1024
    assert b.failed is not None


def test_hello_body_round_trip():
    b = HelloBody("cluster-1", "nöde-a", 1, 3, bytes(range(32)), LinkRole.HEARTBEAT,
                  (LunInfo(0, "serial-0", 512, 2097152), LunInfo(7, "sérial-7", 4096, 1)))
    assert HelloBody.decode(b.encode()) == b
    empty = HelloBody("c", "n", 1, 1, bytes(32), LinkRole.SYNC, ())
    assert HelloBody.decode(empty.encode()) == empty


FIXED = b"\x01\x01\x01" + bytes(32) + b"\x01c\x01n"
LUN_1 = b"\x00\x01\x00\x00\x02\x00" + bytes(7) + b"\x01"  # id 1, 512-byte blocks, 1 block


@pytest.mark.parametrize("raw, reason", [
    (b"", "HELLO too short"),
    (b"\x01\x01\x01" + bytes(32), "ends before its cluster id"),
    (b"\x01\x01\x03" + bytes(32), "unknown link role 3"),
    (b"\x01\x01\x01" + bytes(32) + b"\x05c", "ends inside its cluster id"),
    (b"\x01\x01\x01" + bytes(32) + b"\x01\xff", "cluster id is not UTF-8"),
    (FIXED, "ends before its LUN count"),
    (FIXED + b"\x00\x01" + LUN_1[:5], "ends inside its LUN table"),
    (FIXED + b"\x00\x01" + LUN_1, "ends before its LUN serial"),
    (FIXED + b"\x00\x00\x00", "trailing bytes"),
    (b"\x02\x01\x01" + bytes(32) + b"\x01c\x01n\x00\x00", "version range 2-1"),
    (b"\x01\x01\x01" + bytes(32) + b"\x00\x01n\x00\x00", "cluster id of 0 bytes"),
    (FIXED + b"\x00\x02" + LUN_1 + b"\x01s" + b"\x00\x02" + LUN_1[2:] + b"\x01s",
     "serial listed twice"),
    (FIXED + b"\x00\x02" + LUN_1 + b"\x01s" + LUN_1 + b"\x01t", "id listed twice"),
    (FIXED + b"\x00\x01" + LUN_1[:5] + b"\x01" + bytes(7) + b"\x01\x01s",
     "blocks of 513 bytes"),
    (FIXED + b"\x00\x01" + LUN_1[:-1] + b"\x00\x01s", "of 0 blocks"),
])
def test_malformed_hello_bodies(raw, reason):
    with pytest.raises(HelloError, match=reason):
        HelloBody.decode(raw)
    a = make(A)
    a.start()
    (bye,) = a.receive(m.Hello(raw or b"x"))
    assert a.failed is not None and a.failed.startswith("malformed HELLO: ")
    assert isinstance(bye, m.Goodbye)


def test_bad_local_identity_is_refused_at_construction():
    with pytest.raises(ValueError, match="id listed twice"):
        make(NodeIdentity("prod", "a", (LunInfo(1, "x", 512, 1), LunInfo(1, "y", 512, 1))))
    with pytest.raises(ValueError, match="node id of 0 bytes"):
        make(NodeIdentity("prod", "", LUNS))


def test_random_bytes_of_the_wrong_length_is_a_caller_error():
    a = Handshake(A, SECRET, ALL, lambda n: b"short")
    with pytest.raises(ValueError, match="not 32"):
        a.start()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_hello_body(raw):
    try:
        decoded = HelloBody.decode(raw)
    except HelloError:
        return
    assert decoded.encode() == raw  # canonical: the MAC covers what the decoder saw


_any_message = st.sampled_from([
    hello(), hello(node="a"), hello(node="zz"), hello(cluster="x"), m.Hello(b"junk"),
    m.ChallengeResponse(bytes(32)), m.Welcome(1), m.Welcome(2), m.Goodbye("bye"),
    m.Flush(0, 0, 0, 0), m.Heartbeat(1, 2),
])


@settings(max_examples=300, deadline=None)
@given(st.lists(_any_message, max_size=6), st.booleans())
def test_fuzz_any_message_sequence_ends_in_a_result(msgs, started):
    a = make(A)
    if started:
        a.start()
    for msg in msgs:
        if a.state in (State.DONE, State.FAILED):
            break
        for out in a.receive(msg):
            encode(out)  # whatever it answers can go on the wire
    assert not a.done  # nobody without the secret gets in
    assert (a.failed is None) == (a.state is not State.FAILED)


def test_accepting_side_tells_a_refused_stranger_nothing_of_itself():
    b = make(B, seed=2, role=None)
    assert b.start() == []
    out = b.receive(hello(node="intruder"))
    assert out == [m.Goodbye("unknown node id 'intruder'")]  # no HELLO, so no LUN table
