"""The witness's voting rule, its record, and leases."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vsand.mirror.quorum import Lease, WitnessRecord, WitnessRecordCorrupt, lease_for


def test_one_vote_per_epoch_to_the_first_asker() -> None:
    w = WitnessRecord()
    ok, w = w.grant("a", 1)
    assert ok and w == WitnessRecord(1, "a")
    ok, w2 = w.grant("b", 1)
    assert not ok and w2 == w  # b lost the race for epoch 1
    ok, _ = w.grant("a", 1)
    assert ok  # asking again (a retry, a restart of the winner) gets the same answer
    ok, w = w.grant("b", 2)
    assert ok and w == WitnessRecord(2, "b")
    assert not w.grant("a", 1)[0] and not w.grant("a", 2)[0]


def test_the_refused_node_cannot_come_back_through_the_witness_alone() -> None:
    # Epoch 3: a and b lose each other; b wins.  a keeps asking for 3 (its epoch + 1).
    w = WitnessRecord(2, "a")
    won, w = w.grant("b", 3)
    assert won
    for _ in range(3):
        assert not w.grant("a", 3)[0]
    # Only after a reconnects to b and adopts epoch 3 can it ask for 4.
    assert w.grant("a", 4)[0]


@given(st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 6)), max_size=40))
def test_never_two_nodes_for_one_epoch(requests: list[tuple[str, int]]) -> None:
    w = WitnessRecord()
    granted: dict[int, set[str]] = {}
    for node, epoch in requests:
        ok, w = w.grant(node, epoch)
        if ok:
            granted.setdefault(epoch, set()).add(node)
        assert WitnessRecord.from_bytes(w.to_bytes()) == w
    assert all(len(nodes) == 1 for nodes in granted.values())


def test_record_refuses_damage() -> None:
    data = bytearray(WitnessRecord(7, "node-a").to_bytes())
    data[10] ^= 1
    with pytest.raises(WitnessRecordCorrupt):
        WitnessRecord.from_bytes(bytes(data))
    with pytest.raises(WitnessRecordCorrupt):
        WitnessRecord.from_bytes(b"VSWR")


def test_lease_runs_from_the_send_time_of_the_answered_heartbeat() -> None:
    lease = Lease(lease_for(3.0))
    assert lease.duration == pytest.approx(2.4)
    assert not lease.valid(0.0)
    lease.renewed(10.0)
    assert lease.valid(12.3) and not lease.valid(12.4)
    lease.renewed(9.0)  # an old answer arriving late extends nothing
    assert not lease.valid(12.4)
    lease.drop()
    assert not lease.valid(10.0)
