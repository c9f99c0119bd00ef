"""Ordering concurrent writes across replicas: one sequencer per LUN, sans-IO.

Theory of operation.  Every node of a mirrored LUN accepts writes (active-active).  To keep the
replicas byte-identical when writes to overlapping blocks arrive at different nodes at the
same time, one node per epoch, the *sequencer*, gives every write a sequence number, and every
replica applies overlapping writes in sequence order.  Non-overlapping writes are applied as
soon as they are known, in parallel.

- A write arriving at the sequencer gets the next number; the sequencer sends REPL (with the
  data) to every other in-sync replica and applies it locally.
- A write arriving elsewhere is sent with its data to the sequencer (FORWARD); the sequencer
  numbers it and sends REPL to every other in-sync replica: with the data to the others, without
  it to the origin, which already holds it.
- A replica learns sequence numbers in order: the sequencer sends every REPL over one ordered
  stream per peer, so a replica can hold back numbers after a gap and deliver them in order.
  A delivered write is applied once every earlier *overlapping* write has been applied.
- Each replica, once it has applied a write, acknowledges it to the write's origin.  The origin
  answers the initiator when every replica of the in-sync set has applied the write.

Why replicas end identical: for any block, every replica applies the writes covering it in
the same order, sequence order, because a write is applied only after all lower-numbered
writes that overlap it (each replica sees every number, in order, before applying a later
one).  Why a read after an acknowledged write sees it or a later one: the origin answers only
when every in-sync replica has applied the write, and a replica never applies an older
overlapping write after a newer one.

The engine is a pure state machine: calls in (``local_write``, ``receive``, ``applied``,
``peer_lost``), actions out (``Apply``, ``Send``, ``Complete``).  Timing, sockets and storage
belong to the caller.  Leaving the in-sync set is decided outside (by the quorum layer); the
engine only stops waiting for a replica once told, and reports which writes it was waiting for
so that their regions are recorded as dirty for that replica first.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


# -- messages between engines --------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Forward:
    origin: str
    req: int
    lba: int
    blocks: int
    data: Any


@dataclass(frozen=True, slots=True)
class Repl:
    seq: int
    origin: str
    req: int
    lba: int
    blocks: int
    data: Any  # None when sent to the origin, which holds the data


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    req: int
    replica: str


Message = Forward | Repl | Ack


# -- actions for the caller ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Apply:
    """Write ``data`` at ``lba`` to the local replica, then call ``applied(seq)``."""
    seq: int
    lba: int
    blocks: int
    data: Any


@dataclass(frozen=True, slots=True)
class Send:
    to: str
    message: Message


@dataclass(frozen=True, slots=True)
class Complete:
    """The local write ``req`` is on every in-sync replica: answer the initiator."""
    req: int


Action = Apply | Send | Complete


@dataclass(slots=True)
class _Known:
    seq: int
    origin: str
    req: int
    lba: int
    blocks: int
    data: Any
    applied: bool = False

    def overlaps(self, lba: int, blocks: int) -> bool:
        return self.lba < lba + blocks and lba < self.lba + self.blocks


@dataclass(slots=True)
class _Pending:
    """A write this node must answer: who has applied it so far."""
    lba: int
    blocks: int
    data: Any
    seq: int = -1
    acked: set[str] = field(default_factory=set)


class OrderingEngine:
    def __init__(self, node: str, replicas: set[str], sequencer: str) -> None:
        if node not in replicas or sequencer not in replicas:
            raise ValueError("the node and the sequencer must be replicas")
        self.node = node
        self.in_sync = set(replicas)
        self.sequencer = sequencer
        self._next_seq = 0  # at the sequencer: the next number to give
        self._expected = 0  # at every replica: the next number to deliver
        self._held: dict[int, Repl] = {}  # numbers that arrived after a gap
        # Delivered, not yet applied (or applied but still needed for ordering).
        self._window: deque[_Known] = deque()
        self._pending: dict[int, _Pending] = {}  # req -> a local write awaiting its acks
        self._by_seq_origin: dict[int, int] = {}  # seq -> req, for local writes

    @property
    def is_sequencer(self) -> bool:
        return self.node == self.sequencer

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    # -- calls in ------------------------------------------------------------------------
    def local_write(self, req: int, lba: int, blocks: int, data: Any) -> list[Action]:
        if req in self._pending:
            raise ValueError(f"request {req} is already in flight")
        self._pending[req] = _Pending(lba, blocks, data)
        if self.is_sequencer:
            return self._sequence(self.node, req, lba, blocks, data)
        return [Send(self.sequencer, Forward(self.node, req, lba, blocks, data))]

    def receive(self, sender: str, message: Message) -> list[Action]:
        if isinstance(message, Forward):
            if not self.is_sequencer:
                raise ValueError(f"FORWARD from {sender} but {self.node} is not the sequencer")
            return self._sequence(message.origin, message.req, message.lba, message.blocks,
                                  message.data)
        if isinstance(message, Repl):
            return self._deliver_in_order(message)
        if isinstance(message, Ack):
            return self._ack(message.req, message.seq, message.replica)
        raise TypeError(f"not an ordering message: {message!r}")

    def applied(self, seq: int) -> list[Action]:
        """The local replica has applied ``seq``."""
        actions: list[Action] = []
        for known in self._window:
            if known.seq == seq:
                known.applied = True
                if known.origin == self.node:
                    actions += self._ack(known.req, seq, self.node)
                else:
                    actions.append(Send(known.origin, Ack(seq, known.req, self.node)))
                break
        else:
            raise ValueError(f"applied({seq}) for a write this node was not applying")
        self._trim()
        actions += self._ready()
        return actions

    def peer_lost(self, peer: str) -> tuple[list[Action], list[tuple[int, int]]]:
        """``peer`` left the in-sync set (a decision made elsewhere).  Returns the actions that
        follow (writes that were only waiting for it complete) and the block ranges of those
        writes, which the caller must record as dirty for ``peer`` *before* performing the
        Complete actions."""
        self.in_sync.discard(peer)
        dirty: list[tuple[int, int]] = []
        actions: list[Action] = []
        for req, p in list(self._pending.items()):
            if p.seq >= 0 and peer not in p.acked:
                dirty.append((p.lba, p.blocks))
            actions += self._maybe_complete(req)
        return actions, dirty

    def abandon_unsequenced(self) -> list[tuple[int, Any]]:
        """Forget the local writes the sequencer never numbered (it is gone): (req, data) for
        each, for the caller to run again under a new sequencer."""
        gone = [(req, p.data) for req, p in self._pending.items() if p.seq < 0]
        for req, _ in gone:
            del self._pending[req]
        return gone

    @property
    def idle(self) -> bool:
        """No local write awaits acks and every delivered write has been applied."""
        return not self._pending and not self._window and not self._held

    # -- internals -----------------------------------------------------------------------
    def _sequence(self, origin: str, req: int, lba: int, blocks: int,
                  data: Any) -> list[Action]:
        seq = self._next_seq
        self._next_seq += 1
        actions: list[Action] = []
        for replica in sorted(self.in_sync - {self.node}):
            payload = None if replica == origin else data
            actions.append(Send(replica, Repl(seq, origin, req, lba, blocks, payload)))
        actions += self._deliver_in_order(Repl(seq, origin, req, lba, blocks, data))
        return actions

    def _deliver_in_order(self, repl: Repl) -> list[Action]:
        if repl.seq < self._expected:
            return []  # a duplicate: already delivered
        self._held[repl.seq] = repl
        actions: list[Action] = []
        while self._expected in self._held:
            r = self._held.pop(self._expected)
            data, lba, blocks = r.data, r.lba, r.blocks
            if r.origin == self.node:
                p = self._pending.get(r.req)
                if p is None:
                    raise ValueError(f"sequence {r.seq} names unknown local request {r.req}")
                # The origin's copy is authoritative: the sequencer's answer to a FORWARD need
                # not repeat the address.
                p.seq = r.seq
                data, lba, blocks = p.data, p.lba, p.blocks
            self._window.append(_Known(r.seq, r.origin, r.req, lba, blocks, data))
            self._expected += 1
        if not self.is_sequencer:
            # Only the sequencer numbers; a replica follows its numbering.
            self._next_seq = self._expected
        actions += self._ready()
        return actions

    def _ready(self) -> list[Action]:
        """Apply every delivered write that no earlier, unapplied write overlaps."""
        actions: list[Action] = []
        earlier: list[_Known] = []
        for known in self._window:
            if not known.applied and known.data is not _ISSUED:
                if not any(e.overlaps(known.lba, known.blocks) for e in earlier):
                    actions.append(Apply(known.seq, known.lba, known.blocks, known.data))
                    known.data = _ISSUED
            if not known.applied:
                earlier.append(known)
        return actions

    def _trim(self) -> None:
        # An applied write no longer constrains anything once every write before it is applied.
        while self._window and self._window[0].applied:
            self._window.popleft()

    def _ack(self, req: int, seq: int, replica: str) -> list[Action]:
        p = self._pending.get(req)
        if p is None:
            return []  # late ack of a write already answered (e.g. after peer_lost)
        p.acked.add(replica)
        return self._maybe_complete(req)

    def _maybe_complete(self, req: int) -> list[Action]:
        p = self._pending[req]
        if p.seq >= 0 and self.in_sync <= p.acked:
            del self._pending[req]
            return [Complete(req)]
        return []


class _IssuedMarker:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<issued>"


_ISSUED: Any = _IssuedMarker()
