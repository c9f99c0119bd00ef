"""Quorum for two data nodes and a witness, sans-IO: who may serve, and until when.

Theory of operation
-------------------
Three votes: node a, node b, the witness.  A node serves I/O (reads too: a stale read is a
lie) only while it holds two of them.  While the two nodes talk, each holds the other's vote
for as long as its *lease* runs; when they stop talking, at most one of them gets the
witness's vote, and only after the other's lease has run out.

Leases.  A node's lease is renewed only by a round trip: a HEARTBEAT it sent and the peer
answered.  Renewed at the answer, it runs ``lease`` seconds from the moment the heartbeat was
*sent* (the peer held this node's vote at least until it answered, which was after that).
One-way loss (this node hears the peer, the peer does not hear this node) renews nothing: a
node that cannot make itself heard cannot keep serving.

Taking over.  A node declares its peer lost after ``peer_timeout`` without receiving anything
from it (``vsand.peer``), then asks the witness for its vote for the next epoch.  Why the other
node has stopped serving by then: let t_r be the last time (on the survivor's clock) the
survivor received anything from the other node.  Every heartbeat the other node sent and got
answered was received by the survivor at or before t_r, so was sent before t_r; its lease
therefore ends no later than t_r + lease on any clock that runs at about the same rate.  The
survivor asks the witness only at t_r + peer_timeout, and ``lease = LEASE_FRACTION *
peer_timeout`` leaves (1 - LEASE_FRACTION) of the timeout as margin.  The clock assumption:
the two nodes' monotonic clocks advance at rates that differ by less than that margin over a
peer timeout (20 %: any working quartz clock, NTP-disciplined or not; no synchronized time
of day is needed, only durations).  Messages delayed longer than the timeout do not matter:
a node never extends its own lease with an answer to a heartbeat sent more than ``lease`` ago.

The witness's rule (``WitnessRecord.grant``): it grants its vote for epoch E to the first node
asking for an epoch higher than any it granted before, records (E, node) on stable storage
before answering, and grants the same epoch again only to that node.  A node asks for its own
epoch + 1, so of two nodes that lost each other at epoch E exactly one gets E + 1.  The one
refused stays fenced: it cannot get E + 1 later either (even once the winner is gone too:
it lacks the winner's writes), and it learns a newer epoch only by reconnecting to its peer,
which also resyncs it first.  A node that restarts alone asks for its persisted epoch + 1, or
gets its own last grant again if it was the last winner.

When both nodes are connected again and in sync they adopt the larger of their epochs, so the
next loss asks for a fresh epoch.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .record import seal, unseal

LEASE_FRACTION = 0.8

_MAGIC = b"VSWR"
_VERSION = 1
_HEADER = struct.Struct("<4sHHQB")  # magic, version, reserved, epoch, node name length


class WitnessRecordCorrupt(ValueError):
    """The stored witness record failed validation."""


@dataclass(frozen=True, slots=True)
class WitnessRecord:
    """What a witness has voted for: the highest epoch granted and to whom."""
    epoch: int = 0
    node: str = ""

    def grant(self, node: str, epoch: int) -> tuple[bool, WitnessRecord]:
        """Whether ``node`` gets the vote for ``epoch``, and the record to persist first."""
        if not node:
            raise ValueError("a vote needs a node name")
        if epoch > self.epoch:
            return True, WitnessRecord(epoch, node)
        return (epoch == self.epoch and node == self.node), self

    def to_bytes(self) -> bytes:
        name = self.node.encode()
        return seal(_HEADER.pack(_MAGIC, _VERSION, 0, self.epoch, len(name)) + name)

    @classmethod
    def from_bytes(cls, data: bytes) -> WitnessRecord:
        body, (_, _, _, epoch, n) = unseal(data, _HEADER, _MAGIC, _VERSION, "witness record",
                                          WitnessRecordCorrupt)
        if len(body) != _HEADER.size + n:
            raise WitnessRecordCorrupt("witness record length does not match its name")
        try:
            return cls(epoch, body[_HEADER.size:].decode())
        except UnicodeDecodeError:
            raise WitnessRecordCorrupt("witness record name is not UTF-8") from None


class Lease:
    """A node's hold on its peer's vote: renewed by answered heartbeats (module docstring).

    Times are seconds on one monotonic clock: ``sent_at`` of the heartbeat that was answered,
    ``now`` when asking.
    """

    __slots__ = ("duration", "until")

    def __init__(self, duration: float) -> None:
        if duration <= 0:
            raise ValueError(f"lease of {duration} s")
        self.duration = duration
        self.until = float("-inf")

    def renewed(self, sent_at: float) -> None:
        self.until = max(self.until, sent_at + self.duration)

    def valid(self, now: float) -> bool:
        return now < self.until

    def drop(self) -> None:
        self.until = float("-inf")


def lease_for(peer_timeout: float) -> float:
    return LEASE_FRACTION * peer_timeout
