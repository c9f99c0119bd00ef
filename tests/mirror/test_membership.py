"""Membership of three data nodes: the vote record, the codec, the rounds, and a simulated
cluster of three under random cuts, crashes, pauses and clock drift."""

from __future__ import annotations

import functools
import heapq
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vsand.mirror.membership import (
    FENCE_FACTOR,
    NEVER,
    Kind,
    Membership,
    MembershipError,
    Message,
    Persist,
    Send,
    View,
    VoteRecord,
    decode,
    encode,
)

VOTERS = ["a", "b", "c"]
ALL = frozenset(VOTERS)


def test_one_coordinator_per_epoch_and_accepts_follow_promises() -> None:
    r = VoteRecord.initial(VOTERS)
    ok, r = r.promise("a", 1)
    assert ok
    assert not r.promise("b", 1)[0]  # epoch 1 is a's
    assert r.promise("a", 1)[0]  # a's retry
    assert not r.accept("b", View(1, frozenset("bc")))[0]
    ok, r = r.accept("a", View(1, frozenset("ab")))
    assert ok and r.accepted == View(1, frozenset("ab"))
    ok, r = r.promise("c", 2)
    assert ok and r.accepted.epoch == 1  # a promise keeps what was accepted
    assert not r.accept("a", View(1, frozenset("ab")))[0]


@given(st.integers(0, 2**63), st.integers(0, 2**63), st.sampled_from(["", "a", "node-b"]),
       st.sets(st.sampled_from(["a", "node-b", "ç"]), min_size=1))
def test_record_round_trips(p: int, e: int, coord: str, members: set[str]) -> None:
    rec = VoteRecord(max(p, e), coord, View(min(p, e), frozenset(members)))
    assert VoteRecord.from_bytes(rec.to_bytes()) == rec


@given(st.binary(max_size=80))
def test_damaged_records_are_refused(raw: bytes) -> None:
    try:  # arbitrary bytes: a record, or the record's own error, never anything else
        VoteRecord.from_bytes(raw)
    except MembershipError:
        pass
    good = VoteRecord(3, "a", View(2, ALL)).to_bytes()
    for damaged in (good[:-1], good[:10] + bytes([good[10] ^ 1]) + good[11:]):
        with pytest.raises(MembershipError):
            VoteRecord.from_bytes(damaged)


MESSAGES = [Message(Kind.PREPARE, 5),
            Message(Kind.PROMISE, 5, View(3, frozenset("ab")), 250, (250, 0, 4000)),
            Message(Kind.PROMISE, 5, View(0, ALL), NEVER, (NEVER,) * 3),
            Message(Kind.REFUSE, 5, value=9),
            Message(Kind.ACCEPT, 5, View(5, frozenset("bc"))), Message(Kind.ACCEPTED, 5),
            Message(Kind.COMMIT, 5, View(5, frozenset("a")), 1800),
            Message(Kind.LINKS, 0, View(0, frozenset("bc")))]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.kind.name)
def test_messages_round_trip(msg: Message) -> None:
    assert decode(encode(msg, VOTERS), VOTERS) == msg


@given(st.binary(min_size=28, max_size=42))
def test_decode_either_parses_or_refuses(raw: bytes) -> None:
    try:
        msg = decode(raw, VOTERS)
    except MembershipError:
        return
    assert encode(msg, VOTERS) == raw


def test_decode_refuses_members_that_are_no_voters_and_views_out_of_place() -> None:
    good = encode(Message(Kind.ACCEPT, 5, View(5, frozenset("c"))), VOTERS)
    with pytest.raises(MembershipError, match="members"):
        decode(good, ["a", "b"])  # a voter this node does not know
    with pytest.raises(MembershipError, match="view epoch"):
        decode(encode(Message(Kind.COMMIT, 5, View(4, frozenset("a"))), VOTERS), VOTERS)
    with pytest.raises(MembershipError, match="carries a view"):
        decode(bytes([Kind.PREPARE]) + good[1:], VOTERS)
    with pytest.raises(MembershipError, match="bytes"):
        decode(good + b"\0", VOTERS)


# ---------------------------------------------------------------------- one round by hand
def _node(name: str, record: VoteRecord | None = None) -> Membership:
    m = Membership(name, VOTERS, record or VoteRecord.initial(VOTERS), peer_timeout=2.0,
                   now=-100.0)
    for p in VOTERS:
        if p != name:
            m.link_up(p)
    m.set_in_sync(set(VOTERS))
    m.links_of = {p: frozenset(VOTERS) - {p} for p in VOTERS if p != name}
    return m


def _rounds(actions: list[object]) -> list[object]:
    return [a for a in actions if not (isinstance(a, Send) and a.msg.kind is Kind.LINKS)]


def _deliver(nodes: dict[str, Membership], sender: str, actions: list[object],
             now: float) -> None:
    queue = [(sender, a) for a in actions]
    while queue:
        frm, action = queue.pop(0)
        if isinstance(action, Send) and action.to in nodes:
            wire = decode(encode(action.msg, VOTERS), VOTERS)
            queue += [(action.to, a) for a in nodes[action.to].receive(frm, wire, now)]


def test_a_cluster_starts_in_one_round_and_serves_with_leases() -> None:
    nodes = {n: _node(n) for n in VOTERS}
    assert _rounds(nodes["b"].tick(0.0)) == []  # b waits for a, the lowest
    actions = _rounds(nodes["a"].tick(0.0))
    assert isinstance(actions[0], Persist) and actions[0].record.promised == 1
    _deliver(nodes, "a", actions, 0.0)
    assert all(m.view == View(1, ALL) for m in nodes.values())
    # Nobody granted a lease before: no wait.  Votes come from answered heartbeats.
    assert not nodes["b"].serving(0.1)
    assert nodes["a"].grant("b", 1, 0.1)
    nodes["b"].granted("a", 1, sent_at=0.1)
    assert nodes["b"].serving(0.1) and nodes["b"].serving(0.1 + 1.59)
    assert not nodes["b"].serving(0.1 + 1.6)  # the lease is 0.8 peer timeouts


def test_a_lost_member_is_dropped_by_the_two_others_after_its_lease() -> None:
    nodes = {n: _node(n) for n in VOTERS}
    _deliver(nodes, "a", nodes["a"].tick(0.0), 0.0)
    # c keeps b's vote until 1.0 + 1.6; then a-c and b-c go quiet.
    assert nodes["b"].grant("c", 1, 1.0)
    nodes["c"].granted("b", 1, sent_at=1.0)
    for m in ("a", "b"):
        nodes[m].link_down("c")
    del nodes["c"]
    now = 3.0
    actions = nodes["a"].tick(now)
    _deliver(nodes, "a", actions, now)
    assert nodes["a"].view == View(2, frozenset("ab"))
    # b granted c's lease 2 s before promising: the new view waits out the rest with margin.
    assert nodes["a"].serve_at == pytest.approx(now + FENCE_FACTOR * 1.6 - 2.0)
    assert not nodes["a"].record.accept("c", View(2, frozenset("c")))[0]


def test_a_cut_between_two_members_is_settled_by_the_third() -> None:
    nodes = {n: _node(n) for n in VOTERS}
    _deliver(nodes, "a", nodes["a"].tick(0.0), 0.0)
    assert nodes["a"].grant("c", 1, 0.9)  # c holds a's vote until 0.9 + 1.6
    nodes["b"].link_down("c")
    nodes["c"].link_down("b")
    # Both tell a what they still reach; a, which reaches both, drops the higher name.
    for n in "bc":
        _deliver(nodes, n, [a for a in nodes[n].tick(1.0) if isinstance(a, Send)
                            and a.msg.kind is Kind.LINKS and a.to == "a"], 1.0)
    assert nodes["a"].why_change(1.0) == "lost c"
    nodes["c"].not_before = nodes["b"].not_before = 99.0  # a acts before either of them
    _deliver({n: nodes[n] for n in "ab"}, "a", nodes["a"].tick(1.0), 1.0)
    assert nodes["a"].view == nodes["b"].view == View(2, frozenset("ab"))
    # c kept the lease from a it renewed at 0.9: the new view waits it out, with margin.
    assert nodes["a"].serve_at == pytest.approx(1.0 + FENCE_FACTOR * 1.6 - 0.1, abs=0.002)


def test_a_restarted_node_promises_as_if_it_had_just_granted_a_lease() -> None:
    # Before it crashed, b may have renewed a lease it has no record of: its promises say
    # "granted just now" until a lease has passed since it started.
    b = Membership("b", VOTERS, VoteRecord(3, "b", View(3, frozenset("bc"))),
                   peer_timeout=2.0, now=10.0)
    sends = [a for a in b.receive("a", Message(Kind.PREPARE, 4), 10.25)
             if isinstance(a, Send)]
    assert sends[0].msg.kind is Kind.PROMISE and sends[0].msg.ages == (250, 250, 250)


def test_a_node_outside_the_newest_view_does_not_coordinate() -> None:
    rec = VoteRecord(4, "a", View(4, frozenset("ab")))
    c = _node("c", rec)
    assert c.why_change(100.0) is None and _rounds(c.tick(100.0)) == []


def test_a_stale_coordinator_gives_up_when_the_promises_show_a_newer_view() -> None:
    # c thinks it is a member of epoch 3's view; a and b decided epoch 4 without it.
    nodes = {"c": _node("c", VoteRecord(3, "a", View(3, ALL))),
             "a": _node("a", VoteRecord(4, "a", View(4, frozenset("ab"))))}
    nodes["c"].view = View(3, ALL)  # its last decided view
    nodes["c"].linked = {"a"}
    actions = nodes["c"].tick(0.0) + nodes["c"].tick(10.0)
    _deliver(nodes, "c", actions, 10.0)
    assert nodes["c"].round is None and "a, who promised epoch 4" in nodes["c"].last_change
    _deliver(nodes, "c", nodes["c"].tick(20.0), 20.0)  # epoch 5: a promises, with its view
    assert nodes["c"].round is None and "not a member" in nodes["c"].last_change
    assert nodes["a"].record.accepted == View(4, frozenset("ab"))


# ---------------------------------------------------------------------- a simulated cluster
PEER_TIMEOUT = 1.0
HEARTBEAT = 0.2


@dataclass
class SimNode:
    name: str
    rate: float
    offset: float
    store: VoteRecord
    m: Membership
    data: set[int] = field(default_factory=set)
    alive: bool = True
    paused: bool = False
    inbox: list[Callable[[], None]] = field(default_factory=list)
    heard: dict[str, float] = field(default_factory=dict)

    def clock(self, t: float) -> float:
        return self.offset + self.rate * t


class Sim:
    """Three nodes on a network of directed links with delays; real time ``t``."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.t = 0.0
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.cut: set[tuple[str, str]] = set()
        self.acked: set[int] = set()
        self.decided: dict[int, frozenset[str]] = {}
        self.writes = 0
        self.nodes = {}
        for name in VOTERS:
            rate = self.rng.uniform(0.92, 1.08)
            rec = VoteRecord.initial(VOTERS)
            offset = self.rng.uniform(0, 1000)
            n = SimNode(name, rate, offset, rec,
                        Membership(name, VOTERS, rec, peer_timeout=PEER_TIMEOUT, now=offset))
            self.nodes[name] = n
        for name in VOTERS:
            self.every(0.05, functools.partial(self.tick, name))
            self.every(HEARTBEAT, functools.partial(self.heartbeats, name))
        self.every(0.01, self.write)

    # -- event machinery
    def at(self, t: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, fn))

    def every(self, period: float, fn: Callable[[], None]) -> None:
        def run() -> None:
            fn()
            self.at(self.t + period * self.rng.uniform(0.8, 1.2), run)
        self.at(self.t + self.rng.uniform(0, period), run)

    def run_until(self, end: float) -> None:
        while self.events and self.events[0][0] <= end:
            self.t, _, fn = heapq.heappop(self.events)
            fn()
            self.check()
        self.t = end

    def on(self, name: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` at node ``name`` now, later if paused, never if dead."""
        n = self.nodes[name]
        if not n.alive:
            return
        if n.paused:
            n.inbox.append(fn)
        else:
            fn()

    def send(self, src: str, dst: str, fn: Callable[[], None]) -> None:
        if (src, dst) in self.cut:
            return
        delay = self.rng.uniform(0.0005, 0.015)
        if self.rng.random() < 0.02:
            delay = self.rng.uniform(0.05, 0.4)

        def arrive() -> None:
            if (src, dst) not in self.cut:
                self.nodes[dst].heard[src] = self.t
                self.on(dst, fn)
        self.at(self.t + delay, arrive)

    # -- what the driver does
    def act(self, name: str, actions: list[object]) -> None:
        n = self.nodes[name]
        for a in actions:
            if isinstance(a, Persist):
                n.store = a.record
            elif isinstance(a, Send):
                self.send(name, a.to, functools.partial(self.deliver, name, a.to,
                                                        encode(a.msg, VOTERS)))

    def deliver(self, src: str, dst: str, raw: bytes) -> None:
        n = self.nodes[dst]
        self.act(dst, n.m.receive(src, decode(raw, VOTERS), n.clock(self.t)))

    def heartbeats(self, name: str) -> None:
        def beat() -> None:
            n = self.nodes[name]
            sent, epoch = n.clock(self.t), n.m.heartbeat_epoch()
            for peer in VOTERS:
                if peer != name:
                    self.send(name, peer, functools.partial(self.answer, peer, name, epoch, sent))
        self.on(name, beat)

    def answer(self, voter: str, member: str, epoch: int, sent: float) -> None:
        v = self.nodes[voter]
        ok = v.m.grant(member, epoch, v.clock(self.t))
        self.act(voter, v.m.peer_epoch(member, epoch, v.clock(self.t)))
        self.send(voter, member, lambda: self.nodes[member].m.granted(voter, epoch, sent)
                  if ok else None)

    def tick(self, name: str) -> None:
        def run() -> None:
            n = self.nodes[name]
            now = n.clock(self.t)
            for peer in VOTERS:
                if peer == name:
                    continue
                if self.t - n.heard.get(peer, -1e9) < PEER_TIMEOUT / n.rate:
                    n.m.link_up(peer)
                else:
                    n.m.link_down(peer)
            n.m.set_in_sync({p for p in n.m.linked if self.nodes[p].data >= n.data})
            if n.m.serving(now):  # the data layer resyncs a linked node that is behind
                for p in n.m.linked:
                    if n.m.view is not None and p not in n.m.view.members \
                            and self.nodes[p].alive:
                        self.nodes[p].data |= n.data
            self.act(name, n.m.tick(now))
        self.on(name, run)

    def reachable(self, a: str, b: str) -> bool:
        return (a, b) not in self.cut and (b, a) not in self.cut and self.nodes[b].alive \
            and not self.nodes[b].paused

    def write(self) -> None:
        x = self.nodes[self.rng.choice(VOTERS)]
        if not x.alive or x.paused or not x.m.serving(x.clock(self.t)):
            return
        view = x.m.view
        assert view is not None
        for y in view.members - {x.name}:
            rec = self.nodes[y].store
            if not self.reachable(x.name, y) or rec.promised != view.epoch \
                    or rec.accepted.epoch != view.epoch:
                return  # the write waits (and in the real thing, the view changes)
        self.writes += 1
        self.acked.add(self.writes)
        for y in view.members:
            self.nodes[y].data.add(self.writes)
            # A node reported in sync gets every write, or is reported out of sync first.
            for f in list(self.nodes[y].m.in_sync - view.members):
                if self.reachable(y, f):
                    self.nodes[f].data.add(self.writes)
                else:
                    self.nodes[y].m.in_sync.discard(f)

    def check(self) -> None:
        epochs = set()
        for n in self.nodes.values():
            if n.alive and not n.paused and n.m.serving(n.clock(self.t)):
                assert n.data >= self.acked, \
                    f"t={self.t:.3f}: {n.name} serves without {sorted(self.acked - n.data)[:5]}"
                assert n.m.view is not None
                epochs.add(n.m.view.epoch)
            if n.m.view is not None and n.m.view.epoch > 0:
                seen = self.decided.setdefault(n.m.view.epoch, n.m.view.members)
                assert seen == n.m.view.members, f"epoch {n.m.view.epoch} decided twice"
        assert len(epochs) <= 1, f"t={self.t:.3f}: views of epochs {epochs} serve at once"

    # -- faults
    def fault(self) -> str:
        kind = self.rng.choice(["cut", "one-way", "isolate", "crash", "pause", "none"])
        x, y = self.rng.sample(VOTERS, 2)
        length = self.rng.uniform(0.2, 4.0)
        end = self.t + length
        if kind == "cut":
            pairs = {(x, y), (y, x)}
        elif kind == "one-way":
            pairs = {(x, y)}
        elif kind == "isolate":
            pairs = {(x, p) for p in VOTERS if p != x} | {(p, x) for p in VOTERS if p != x}
        else:
            pairs = set()
        self.cut |= pairs
        self.at(end, lambda: self.cut.difference_update(pairs))
        n = self.nodes[x]
        if kind == "crash":
            n.alive = False
            self.at(end, lambda: self.restart(x))
        elif kind == "pause":
            n.paused = True
            self.at(end, lambda: self.resume(x))
        return f"{kind} {x},{y} {length:.2f}s"

    def restart(self, name: str) -> None:
        n = self.nodes[name]
        n.m = Membership(name, VOTERS, n.store, peer_timeout=PEER_TIMEOUT,
                         now=n.clock(self.t))
        n.heard.clear()
        n.inbox.clear()
        n.alive = True

    def resume(self, name: str) -> None:
        n = self.nodes[name]
        n.paused = False
        inbox, n.inbox = n.inbox, []
        for fn in inbox:
            fn()


SEEDS = int(os.environ.get("VSAND_MEMBERSHIP_SEEDS", "24"))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_simulated_cluster_never_serves_stale_data_and_heals(seed: int) -> None:
    sim = Sim(seed)
    sim.run_until(5.0)
    assert all(n.m.serving(n.clock(sim.t)) for n in sim.nodes.values()), "no start"
    faults = []
    for _ in range(12):
        faults.append(f"t={sim.t:.1f} {sim.fault()}")
        sim.run_until(sim.t + sim.rng.uniform(0.3, 3.0))
    sim.run_until(sim.t + 5.0)  # every fault has ended
    sim.run_until(sim.t + 6.0)  # the cluster heals
    serving = [n.name for n in sim.nodes.values() if n.m.serving(n.clock(sim.t))]
    views = {n.name: n.m.view for n in sim.nodes.values()}
    assert serving == VOTERS, f"seed {seed}: not healed: {views} after {faults}"
    assert sim.writes > 100
