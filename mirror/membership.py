"""Membership of three or more data nodes, sans-IO: who is in sync, how that changes, who serves.

Theory of operation
-------------------
Every data node votes; there is no witness.  The *view* is the in-sync set with the epoch it
was decided in: every write is applied on every member before it is acknowledged, so any
member holds every acknowledged write.  A node serves I/O (reads too) only while it is a
member of the newest view it knows to be decided and holds the votes of a majority of the
nodes (its own and leases from others).

Deciding a view.  A view changes (a member is lost, a node has caught up and joins, the
cluster restarts) only through a round run by a member of the newest view it knows (the
*coordinator*), one decree of Paxos per epoch:

1. PREPARE(E): every node that has not promised an epoch >= E (or promised E to this same
   coordinator) promises E, persists the promise, and answers PROMISE with the view it last
   accepted and how long ago it last renewed anybody's lease.  Having promised E, it renews
   no lease of an older epoch, and serves nothing in one itself.
2. With promises from a majority the coordinator takes the newest view among them (V).  It
   must be a member of V (a node left out holds no proof that it has the data; it waits to be
   added).  It proposes itself, the members of V and then the non-members (joiners) that it
   is linked to and the data layer reports in sync with it, each only if linked to every one
   chosen before it: every write goes from its origin to every member, so two members must
   reach each other (nodes tell their peers what they are linked to, LINKS; of two members
   cut apart, the one a third node reaches both of keeps the lower name).  ACCEPT(E,
   members): a node accepts unless it promised a higher epoch (or E to someone else), and
   persists that.
3. With a majority of acceptances the view is decided: COMMIT tells every linked node, with
   how long the members must still wait before serving (below).

Why two members can never serve diverging data: two majorities share a node, so the promises
of round E include one that accepted every view decided before E, and the proposal keeps only
members of the newest accepted view (by induction, members of the last decided view or
joiners brought in sync by one).  Two coordinators with the same epoch: a node promises E to
one of them, so at most one gathers a majority for E.  Every member of the last decided view
applied every write acknowledged in it; every joiner received each of them from the member it
is in sync with (the data layer's promise: a node reported in sync receives every write its
reporter applies, or is reported out of sync before that write is acknowledged).

Leases.  A member renews its hold on another node's vote by a heartbeat that node answers
with a grant (``grant``: only for the epoch it accepted and has promised nothing newer than);
the lease runs ``lease`` seconds from when that heartbeat was *sent* (``Lease``).  Waiting out
old leases: a member of the old view may still serve while it holds a majority.  A promiser
stops serving at its promise, so only a node outside the promisers can, and since those are
fewer than a majority, it needs a lease granted by a promiser.  Each promise says, per node,
how long ago (``s``) its sender last granted that node a lease; the coordinator lets the new
view serve only ``FENCE_FACTOR * lease - s`` after receiving it, the longest over the
promisers and the nodes outside them, and each member counts the rest of that wait again on
its own clock after COMMIT.  The clock assumption: monotonic clocks run within 10 % of real
time (1.1/0.9 < FENCE_FACTOR = 1.25; no time of day needed).  What it costs: a node that fell
silent (hung, cut off, or a crash nobody saw) was last granted a lease when its last
heartbeat arrived, a peer timeout before its link is dropped, and ``FENCE_FACTOR * lease`` is
one peer timeout: no wait after the detection.  A link closed at once (a crash seen as a
reset) and a cut between two members that both still reach the third cost up to one peer
timeout.  A node that restarts does not know what it granted before it stopped: it counts as
having granted every node a lease at its start.

Liveness: the lowest linked member coordinates first; the others wait one peer timeout per
reachable member with a lower name before trying, and a node that promised waits for the
round it promised to.  A member that learns of a newer view without it stops coordinating,
and a node that missed a COMMIT hears it again when its heartbeats name an older epoch.  Duels
(two coordinators at once) are safe and end when one finds the other's higher epoch.

Everything here is a pure function of the messages and times given: the driver persists each
``Persist`` before sending anything that follows it, and delivers ``Send``.

What the data layer must do for this to hold (per LUN; ``tests/mirror/test_membership.py``
simulates the first two, with writes that land on all members at once):

- A write is acknowledged only when every member of the view it was ordered in applied it,
  and a node that promised a newer epoch applies no write of an older one (its answers to
  them are refusals), so nothing is acknowledged in a view once a round began to replace it.
- ``set_in_sync`` names a peer only if it holds everything this node holds and receives every
  write this node applies from then on; a peer that misses one is taken out first.
- When a view is decided, writes that were in flight (ordered or not) may be on some members
  and not others: every member marks its activity log's regions for the others, and the
  lowest member copies its version of all of them to the rest before the view serves.
- The lowest member is the resync source of every non-member, from its bitmap for that node
  united with the node's own (what the node wrote that the others may lack).
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass, field

from .quorum import Lease, lease_for
from .record import seal, unseal

FENCE_FACTOR = 1.25
ROUND_TIMEOUT = 2.0  # peer timeouts a round may take before it is abandoned

_MAGIC = b"VSVR"
_VERSION = 1
_RECORD = struct.Struct("<4sHHQQ")  # magic, version, member count, promised, accepted epoch;
#                                     then the coordinator's and the members' names (u8 length)


class MembershipError(ValueError):
    """A malformed membership message or a damaged vote record."""


@dataclass(frozen=True, slots=True)
class View:
    """An in-sync set and the epoch that decided it."""
    epoch: int
    members: frozenset[str]


@dataclass(frozen=True, slots=True)
class VoteRecord:
    """What one node has promised and accepted: persisted before it answers."""
    promised: int
    coordinator: str
    accepted: View

    @classmethod
    def initial(cls, voters: list[str]) -> VoteRecord:
        # Epoch 0 names every node: a new cluster starts in sync (the data layer checks that
        # before anyone reports a peer in sync), and nobody serves before a round decides.
        return cls(0, "", View(0, frozenset(voters)))

    def _allows(self, coordinator: str, epoch: int) -> bool:
        return epoch > self.promised or (epoch == self.promised and
                                         coordinator == self.coordinator)

    def promise(self, coordinator: str, epoch: int) -> tuple[bool, VoteRecord]:
        if not self._allows(coordinator, epoch):
            return False, self
        return True, VoteRecord(epoch, coordinator, self.accepted)

    def accept(self, coordinator: str, view: View) -> tuple[bool, VoteRecord]:
        if not self._allows(coordinator, view.epoch):
            return False, self
        return True, VoteRecord(view.epoch, coordinator, view)

    def to_bytes(self) -> bytes:
        names = [self.coordinator, *sorted(self.accepted.members)]
        body = b"".join(struct.pack("<B", len(n.encode())) + n.encode() for n in names)
        return seal(_RECORD.pack(_MAGIC, _VERSION, len(names) - 1, self.promised,
                                 self.accepted.epoch) + body)

    @classmethod
    def from_bytes(cls, data: bytes) -> VoteRecord:
        body, (_, _, count, promised, epoch) = unseal(
            data, _RECORD, _MAGIC, _VERSION, "vote record", MembershipError)
        names, at = [], _RECORD.size
        for _ in range(count + 1):
            if at >= len(body) or at + 1 + body[at] > len(body):
                raise MembershipError("vote record names run past its end")
            try:
                names.append(body[at + 1:at + 1 + body[at]].decode())
            except UnicodeDecodeError:
                raise MembershipError("vote record name is not UTF-8") from None
            at += 1 + body[at]
        if at != len(body) or promised < epoch or count == 0:
            raise MembershipError("vote record is inconsistent")
        return cls(promised, names[0], View(epoch, frozenset(names[1:])))


# ---------------------------------------------------------------------- messages
class Kind(enum.IntEnum):
    PREPARE = 1
    PROMISE = 2
    REFUSE = 3  # value: the epoch the refusing node promised
    ACCEPT = 4
    ACCEPTED = 5
    COMMIT = 6  # value: milliseconds the members still wait before serving
    LINKS = 7  # view (epoch 0): the nodes the sender is linked to now


@dataclass(frozen=True, slots=True)
class Message:
    """One membership message.  ``view`` is the proposal (ACCEPT), the decision (COMMIT), the
    view last accepted (PROMISE) or the nodes linked to the sender (LINKS); ``value`` as
    ``Kind`` says.  A PROMISE's ``ages``: per voter (in the voters' order), milliseconds since
    the sender last granted that voter a lease, ``NEVER`` if it has not."""
    kind: Kind
    epoch: int
    view: View | None = None
    value: int = 0
    ages: tuple[int, ...] = ()


NEVER = 0xFFFFFFFF
_WIRE = struct.Struct(">BQQIQ")  # kind, epoch, view epoch, members (bit i: voters[i]), value
_HAS_VIEW = {Kind.PROMISE, Kind.ACCEPT, Kind.COMMIT, Kind.LINKS}
_AGE = struct.Struct(">I")


def encode(msg: Message, voters: list[str]) -> bytes:
    mask, view_epoch = 0, 0
    if msg.view is not None:
        view_epoch = msg.view.epoch
        for name in msg.view.members:
            mask |= 1 << voters.index(name)
    tail = b"".join(_AGE.pack(age) for age in msg.ages) if msg.kind is Kind.PROMISE else b""
    return _WIRE.pack(msg.kind, msg.epoch, view_epoch, mask, msg.value) + tail


def decode(raw: bytes, voters: list[str]) -> Message:
    if len(raw) < _WIRE.size:
        raise MembershipError(f"membership message of {len(raw)} bytes, under {_WIRE.size}")
    kind_n, epoch, view_epoch, mask, value = _WIRE.unpack_from(raw)
    want = _WIRE.size + (_AGE.size * len(voters) if kind_n == Kind.PROMISE else 0)
    if len(raw) != want:
        raise MembershipError(f"membership message of kind {kind_n} in {len(raw)} bytes, "
                              f"not {want}")
    try:
        kind = Kind(kind_n)
    except ValueError:
        raise MembershipError(f"unknown membership message kind {kind_n}") from None
    if kind not in _HAS_VIEW:
        if view_epoch or mask:
            raise MembershipError(f"{kind.name} carries a view")
        return Message(kind, epoch, None, value)
    if mask == 0 or mask >> len(voters):
        raise MembershipError(f"{kind.name} names members {mask:#x} of {len(voters)} nodes")
    if view_epoch > epoch or (kind in (Kind.ACCEPT, Kind.COMMIT) and view_epoch != epoch) \
            or (kind is Kind.LINKS and epoch != 0):
        raise MembershipError(f"{kind.name} for epoch {epoch} carries view epoch {view_epoch}")
    members = frozenset(v for i, v in enumerate(voters) if mask >> i & 1)
    ages = tuple(a for (a,) in _AGE.iter_unpack(raw[_WIRE.size:]))
    return Message(kind, epoch, View(view_epoch, members), value, ages)


# ---------------------------------------------------------------------- actions
@dataclass(frozen=True, slots=True)
class Persist:
    record: VoteRecord


@dataclass(frozen=True, slots=True)
class Send:
    to: str
    msg: Message


Action = Persist | Send


@dataclass
class _Round:
    epoch: int
    started: float
    promises: dict[str, Message] = field(default_factory=dict)
    heard: dict[str, float] = field(default_factory=dict)  # local time of each promise
    accepted: set[str] = field(default_factory=set)
    proposal: View | None = None
    fence: float = -math.inf  # local time before which the new view must not serve


class Membership:
    """One node's part: voter, lease holder and (when it must) coordinator.

    Times are seconds on this node's monotonic clock.  The driver reports links
    (``link_up``/``link_down``), the data layer's in-sync peers (``set_in_sync``), messages
    (``receive``) and the passing of time (``tick``); it tags heartbeats with
    ``heartbeat_epoch``, answers them with ``grant``, reports grants with ``granted`` and the
    epoch each heartbeat named with ``peer_epoch``.
    """

    def __init__(self, node: str, voters: list[str], record: VoteRecord, *,
                 peer_timeout: float, now: float) -> None:
        if node not in voters or len(voters) < 3:
            raise ValueError("membership needs three or more voters, this node among them")
        self.node = node
        self.voters = sorted(voters)
        self.majority = len(voters) // 2 + 1
        self.record = record
        self.peer_timeout = peer_timeout
        self.lease_time = lease_for(peer_timeout)
        self.linked: set[str] = set()
        self.in_sync: set[str] = set()
        self.view: View | None = None  # the newest decided view this node knows
        self.serve_at = math.inf
        self.leases = {v: Lease(self.lease_time) for v in self.voters if v != node}
        # When this node last granted each voter a lease.  A node that just started may
        # have granted leases just before it stopped, and that is not on record: its
        # promises count from now.
        self.granted_at = {v: now for v in self.voters}
        self.round: _Round | None = None
        self.highest_seen = record.promised
        self.not_before = -math.inf  # no round of ours before this (we promised, or failed)
        self.want_since: float | None = None
        # The newest view this node has heard of, accepted here or not: a node that learns
        # it was left out stops coordinating (its rounds would only hold up the members').
        self.newest = record.accepted
        self._retold: dict[str, float] = {}
        # What each peer last said it is linked to: a view needs every pair of its members
        # linked (each write goes from its origin to every member), so a cut between two
        # others counts too.
        self.links_of: dict[str, frozenset[str]] = {}
        self._links_told = -math.inf
        self._links_sent: frozenset[str] | None = None
        self.last_change = ""
        self.wanted = ""  # the data layer asked for a round (``request_round``)

    # ------------------------------------------------------------------ inputs
    def link_up(self, peer: str) -> None:
        self.linked.add(peer)

    def link_down(self, peer: str) -> None:
        self.linked.discard(peer)
        self.in_sync.discard(peer)
        self.links_of.pop(peer, None)

    def set_in_sync(self, peers: set[str]) -> None:
        self.in_sync = set(peers) - {self.node}

    def request_round(self, reason: str) -> None:
        """The data layer needs the view decided again (a peer it reported in sync fell
        behind after a proposal may have named it): a member runs a round even if nothing
        else changed.  Cleared when a view is decided."""
        self.wanted = reason

    def heartbeat_epoch(self) -> int:
        return self.view.epoch if self.view is not None else self.record.accepted.epoch

    def grant(self, member: str, epoch: int, now: float) -> bool:
        """Whether this node's vote backs ``member`` in ``epoch`` (a heartbeat's answer)."""
        rec = self.record
        if rec.promised == epoch == rec.accepted.epoch and member in rec.accepted.members:
            self.granted_at[member] = now
            return True
        return False

    def peer_epoch(self, peer: str, epoch: int, now: float) -> list[Action]:
        """A heartbeat from ``peer`` named ``epoch``: tell it a newer decided view it missed
        (its COMMIT was lost), at most once a peer timeout."""
        view = self.view
        if view is None or epoch >= view.epoch or self.record.promised != view.epoch:
            return []
        if now < self._retold.get(peer, -math.inf) + self.peer_timeout:
            return []
        self._retold[peer] = now
        wait = max(0.0, self.serve_at - now)
        return [Send(peer, Message(Kind.COMMIT, view.epoch, view, math.ceil(wait * 1000)))]

    def granted(self, voter: str, epoch: int, sent_at: float) -> None:
        if self.view is not None and epoch == self.view.epoch and voter in self.leases:
            self.leases[voter].renewed(sent_at)

    def serving(self, now: float) -> bool:
        view, rec = self.view, self.record
        if view is None or self.node not in view.members or now < self.serve_at:
            return False
        if rec.promised != view.epoch or rec.accepted.epoch != view.epoch:
            return False
        votes = 1 + sum(1 for lease in self.leases.values() if lease.valid(now))
        return votes >= self.majority

    # ------------------------------------------------------------------ messages
    def receive(self, peer: str, msg: Message, now: float) -> list[Action]:
        if peer not in self.leases:
            raise MembershipError(f"membership message from {peer!r}, not a voter")
        self.highest_seen = max(self.highest_seen, msg.epoch)
        if msg.kind is Kind.PREPARE:
            return self._prepare(peer, msg.epoch, now)
        if msg.kind is Kind.ACCEPT:
            assert msg.view is not None
            return self._accept(peer, msg.view, now)
        if msg.kind is Kind.COMMIT:
            assert msg.view is not None
            return self._commit(peer, msg.view, msg.value / 1000, now)
        if msg.kind is Kind.LINKS:
            assert msg.view is not None
            self.links_of[peer] = msg.view.members
            return []
        rnd = self.round
        if rnd is None or msg.epoch != rnd.epoch:
            return []  # an answer to a round given up
        if msg.kind is Kind.PROMISE:
            return self._promised(rnd, peer, msg, now)
        if msg.kind is Kind.ACCEPTED:
            return self._accepted(rnd, peer, now)
        # A refusal means another coordinator's epoch is at least as high: give way to it
        # (and come back with a higher epoch if it does not finish).
        self.highest_seen = max(self.highest_seen, msg.value)
        return self._give_up(now, f"epoch {rnd.epoch} refused by {peer}, who promised "
                                  f"epoch {msg.value}")

    def _prepare(self, coordinator: str, epoch: int, now: float) -> list[Action]:
        ok, rec = self.record.promise(coordinator, epoch)
        if not ok:
            return [Send(coordinator, Message(Kind.REFUSE, epoch, value=self.record.promised))]
        out: list[Action] = self._store(rec)
        self._wait_for_round(now)
        out.append(Send(coordinator, self._promise(epoch, now)))
        return out

    def _promise(self, epoch: int, now: float) -> Message:
        ages = tuple(min(NEVER, int((now - self.granted_at[v]) * 1000)) for v in self.voters)
        return Message(Kind.PROMISE, epoch, self.record.accepted, min(ages), ages)

    def _accept(self, coordinator: str, view: View, now: float) -> list[Action]:
        ok, rec = self.record.accept(coordinator, view)
        if not ok:
            return [Send(coordinator, Message(Kind.REFUSE, view.epoch,
                                              value=self.record.promised))]
        out = self._store(rec)
        self._wait_for_round(now)
        return out + [Send(coordinator, Message(Kind.ACCEPTED, view.epoch))]

    def _commit(self, coordinator: str, view: View, wait: float, now: float) -> list[Action]:
        # A decided view may be adopted by a node that missed the ACCEPT, or that promised
        # the same epoch to a rival coordinator (who cannot win it now): a majority accepted
        # it, so it is the only value epoch ``view.epoch`` can have.
        self._learn(view)
        if view.epoch < self.record.promised:
            return []
        if self.round is not None and self.round.epoch <= view.epoch:
            self.round = None
        out = self._store(VoteRecord(view.epoch, coordinator, view))
        self._decided(view, now + wait)
        return out

    def _wait_for_round(self, now: float) -> None:
        self.not_before = max(self.not_before, now + ROUND_TIMEOUT * self.peer_timeout)
        if self.round is not None and self.record.promised > self.round.epoch:
            self.round = None

    def _store(self, rec: VoteRecord) -> list[Action]:
        self._learn(rec.accepted)
        if rec == self.record:
            return []
        self.record = rec
        return [Persist(rec)]

    def _learn(self, view: View) -> None:
        if view.epoch > self.newest.epoch:
            self.newest = view

    def _decided(self, view: View, serve_at: float) -> None:
        if view != self.view:
            self.last_change = f"epoch {view.epoch}: in sync {', '.join(sorted(view.members))}"
        self.view = view
        self.serve_at = serve_at
        for lease in self.leases.values():
            lease.drop()
        self.want_since = None
        self.wanted = ""

    # ------------------------------------------------------------------ the coordinator
    def tick(self, now: float) -> list[Action]:
        out = self._tell_links(now)
        rnd = self.round
        if rnd is not None:
            if now - rnd.started > ROUND_TIMEOUT * self.peer_timeout:
                return out + self._give_up(now, f"epoch {rnd.epoch} got no majority in time")
            return out
        return out + self._maybe_start(now)

    def _tell_links(self, now: float) -> list[Action]:
        links = frozenset(self.linked)
        if not links or (links == self._links_sent
                         and now < self._links_told + self.peer_timeout / 2):
            return []
        self._links_sent, self._links_told = links, now
        msg = Message(Kind.LINKS, 0, View(0, links))
        return [Send(p, msg) for p in sorted(links)]

    def _maybe_start(self, now: float) -> list[Action]:
        reason = self.why_change(now)
        if reason is None:
            self.want_since = None
            return []
        if len(self.linked) + 1 < self.majority:
            self.want_since = None  # a round could not succeed; the rank counts from links
            return []
        if self.want_since is None:
            self.want_since = now
        if now < self.not_before or now < self.want_since + self._rank() * self.peer_timeout:
            return []
        return self._start(now, reason)

    def why_change(self, now: float) -> str | None:
        """Why this node, a member of the newest view it accepted, should run a round."""
        base = self.record.accepted
        if self.node not in base.members or self.node not in self.newest.members:
            return None
        if self.view is None or self.view.epoch != self.record.promised:
            return "no decided view"
        if now > self.serve_at + self.peer_timeout and not self.serving(now):
            # The others promised a round that did not finish: their votes are for an epoch
            # that was never decided, so only a new round brings them back.
            return "no majority grants this view its votes"
        target = self._viable(base)
        lost = base.members - target
        if lost:
            return f"lost {', '.join(sorted(lost))}"
        joiners = target - base.members
        if joiners:
            return f"{', '.join(sorted(joiners))} caught up"
        return self.wanted or None

    def _linked(self, x: str, y: str) -> bool:
        if x == self.node or y == self.node:
            return (y if x == self.node else x) in self.linked
        return y in self.links_of.get(x, ()) and x in self.links_of.get(y, ())

    def _viable(self, newest: View) -> frozenset[str]:
        """The members to propose after ``newest``: this node, then the members of
        ``newest`` and then other nodes the data layer reports in sync with this node, each
        only if linked to every one chosen before it (members first, lower names first).
        Joiners only while this node knows ``newest`` to be decided (it serves in it): a
        node in sync with an older view may have missed what a newer one acknowledged."""
        ready = self.linked & self.in_sync
        joiners = ready - newest.members if newest == self.view else set()
        chosen = [self.node]
        for x in sorted(newest.members & ready) + sorted(joiners):
            if all(self._linked(x, y) for y in chosen):
                chosen.append(x)
        return frozenset(chosen)

    def _rank(self) -> int:
        """How many reachable members would coordinate before this node."""
        return sum(1 for m in self.record.accepted.members & self.linked if m < self.node)

    def _start(self, now: float, reason: str) -> list[Action]:
        epoch = max(self.record.promised, self.highest_seen) + 1
        rnd = self.round = _Round(epoch, now)
        self.last_change = f"epoch {epoch}: round started ({reason})"
        ok, rec = self.record.promise(self.node, epoch)
        assert ok
        out = self._store(rec)
        out += [Send(p, Message(Kind.PREPARE, epoch)) for p in sorted(self.linked)]
        return out + self._promised(rnd, self.node, self._promise(epoch, now), now)

    def _promised(self, rnd: _Round, voter: str, msg: Message, now: float) -> list[Action]:
        if rnd.proposal is not None or msg.view is None:
            return []
        if len(msg.ages) != len(self.voters):
            return []  # malformed: as if lost
        rnd.promises[voter] = msg
        rnd.heard[voter] = now
        if len(rnd.promises) < self.majority:
            return []
        # Only a node outside the promisers may still serve an older view (a promiser stops
        # at its promise), and only on a lease one of them granted it: wait those out.
        for p, promise in rnd.promises.items():
            for v, ms in zip(self.voters, promise.ages):
                if v not in rnd.promises:
                    since = math.inf if ms == NEVER else ms / 1000
                    rnd.fence = max(rnd.fence,
                                    rnd.heard[p] + FENCE_FACTOR * self.lease_time - since)
        newest = max((p.view for p in rnd.promises.values() if p.view is not None),
                     key=lambda v: v.epoch)
        self._learn(newest)
        if self.node not in newest.members:
            return self._give_up(now, f"not a member of epoch {newest.epoch}'s view")
        view = rnd.proposal = View(rnd.epoch, self._viable(newest))
        ok, rec = self.record.accept(self.node, view)
        assert ok
        out = self._store(rec)
        out += [Send(p, Message(Kind.ACCEPT, rnd.epoch, view)) for p in sorted(self.linked)]
        return out + self._accepted(rnd, self.node, now)

    def _accepted(self, rnd: _Round, voter: str, now: float) -> list[Action]:
        if rnd.proposal is None:
            return []
        rnd.accepted.add(voter)
        if len(rnd.accepted) < self.majority:
            return []
        self.round = None
        wait = max(0.0, rnd.fence - now)
        self._decided(rnd.proposal, now + wait)
        msg = Message(Kind.COMMIT, rnd.epoch, rnd.proposal, math.ceil(wait * 1000))
        return [Send(p, msg) for p in sorted(self.linked)]

    def _give_up(self, now: float, why: str) -> list[Action]:
        self.round = None
        self.last_change = f"round given up: {why}"
        self.not_before = now + self.peer_timeout * (1 + self._rank())
        return []
