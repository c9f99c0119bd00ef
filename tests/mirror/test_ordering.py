"""The ordering engine under randomized concurrency: overlapping writes arriving at every node,
messages delayed (in order per link, like TCP) and local applies finishing in any order.
After every run the replicas are identical, and when a write is answered every replica already
holds it or a later write on each of its blocks."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from vsand.mirror.ordering import (Ack, Apply, Complete, Forward, OrderingEngine, Repl, Send)

BLOCKS = 16


@dataclass
class Node:
    name: str
    engine: OrderingEngine
    disk: list[int] = field(default_factory=lambda: [-1] * BLOCKS)  # block -> seq applied
    applying: list[Apply] = field(default_factory=list)


class Cluster:
    def __init__(self, names: list[str], rng: random.Random) -> None:
        self.rng = rng
        self.nodes = {n: Node(n, OrderingEngine(n, set(names), names[0])) for n in names}
        self.links: dict[tuple[str, str], list[object]] = {
            (a, b): [] for a in names for b in names if a != b}
        self.seq_of: dict[tuple[str, int], int] = {}
        self.completed: list[tuple[str, int]] = []
        self.writes: dict[tuple[str, int], tuple[int, int]] = {}

    def act(self, node: Node, actions: list[object]) -> None:
        for a in actions:
            if isinstance(a, Send):
                self.links[(node.name, a.to)].append(a.message)
            elif isinstance(a, Apply):
                origin, req = a.data
                self.seq_of[(origin, req)] = a.seq
                # No two overlapping applies may be outstanding at once on one replica.
                for other in node.applying:
                    assert not (other.lba < a.lba + a.blocks and a.lba < other.lba + other.blocks)
                node.applying.append(a)
            elif isinstance(a, Complete):
                self.check_completion(node.name, a.req)
            else:
                raise AssertionError(a)

    def check_completion(self, origin: str, req: int) -> None:
        seq = self.seq_of[(origin, req)]
        lba, blocks = self.writes[(origin, req)]
        for n in self.nodes.values():
            for b in range(lba, lba + blocks):
                assert n.disk[b] >= seq, (origin, req, seq, n.name, b, n.disk[b])
        self.completed.append((origin, req))

    def step(self) -> bool:
        choices = []
        choices += [("link", k) for k, q in self.links.items() if q]
        choices += [("apply", n) for n in self.nodes.values() if n.applying]
        if not choices:
            return False
        kind, what = self.rng.choice(choices)
        if kind == "link":
            src, dst = what
            msg = self.links[what].pop(0)
            self.act(self.nodes[dst], self.nodes[dst].engine.receive(src, msg))
        else:
            node = what
            a = node.applying.pop(self.rng.randrange(len(node.applying)))
            for b in range(a.lba, a.lba + a.blocks):
                node.disk[b] = a.seq
            self.act(node, node.engine.applied(a.seq))
        return True

    def write(self, name: str, req: int) -> None:
        lba = self.rng.randrange(BLOCKS)
        blocks = self.rng.randint(1, min(4, BLOCKS - lba))
        self.writes[(name, req)] = (lba, blocks)
        node = self.nodes[name]
        self.act(node, node.engine.local_write(req, lba, blocks, (name, req)))


@pytest.mark.parametrize("names", [["a", "b"], ["a", "b", "c"]], ids=["2-nodes", "3-nodes"])
@pytest.mark.parametrize("seed", range(150))
def test_replicas_identical_and_acked_writes_visible(names: list[str], seed: int) -> None:
    rng = random.Random(seed)
    cl = Cluster(names, rng)
    issued = 0
    for req in range(120):
        cl.write(rng.choice(names), req)
        issued += 1
        for _ in range(rng.randrange(4)):
            cl.step()
    steps = 0
    while cl.step():
        steps += 1
        assert steps < 100_000
    assert len(cl.completed) == issued
    disks = [n.disk for n in cl.nodes.values()]
    assert all(d == disks[0] for d in disks), f"seed {seed}: replicas differ"
    assert all(n.engine.outstanding == 0 for n in cl.nodes.values())


def test_forward_goes_to_the_sequencer_and_repl_to_origin_carries_no_data() -> None:
    a = OrderingEngine("a", {"a", "b"}, "a")
    b = OrderingEngine("b", {"a", "b"}, "a")
    out = b.local_write(7, 0, 2, b"payload")
    assert out == [Send("a", Forward("b", 7, 0, 2, b"payload"))]
    actions = a.receive("b", out[0].message)
    sends = [x for x in actions if isinstance(x, Send)]
    assert sends == [Send("b", Repl(0, "b", 7, 0, 2, None))]
    assert [x for x in actions if isinstance(x, Apply)] == [Apply(0, 0, 2, b"payload")]
    # b applies its own data when the number arrives, and answers once both replicas have.
    b_actions = b.receive("a", sends[0].message)
    assert b_actions == [Apply(0, 0, 2, b"payload")]
    assert b.applied(0) == []
    assert a.applied(0) == [Send("b", Ack(0, 7, "a"))]
    assert b.receive("a", Ack(0, 7, "a")) == [Complete(7)]


def test_peer_lost_completes_waiting_writes_and_names_their_dirty_ranges() -> None:
    a = OrderingEngine("a", {"a", "b"}, "a")
    actions = a.local_write(1, 4, 2, b"x")
    assert any(isinstance(x, Send) for x in actions)
    assert a.applied(0) == []  # still waiting for b
    done, dirty = a.peer_lost("b")
    assert done == [Complete(1)] and dirty == [(4, 2)]
    # Later writes no longer wait for b.
    assert a.local_write(2, 0, 1, b"y") == [Apply(1, 0, 1, b"y")]
    assert a.applied(1) == [Complete(2)]


def test_numbers_after_a_gap_wait_for_it() -> None:
    b = OrderingEngine("b", {"a", "b"}, "a")
    assert b.receive("a", Repl(1, "a", 11, 0, 1, b"second")) == []
    actions = b.receive("a", Repl(0, "a", 10, 0, 1, b"first"))
    assert actions == [Apply(0, 0, 1, b"first")]  # 1 overlaps 0: it waits for 0 to land
    assert b.applied(0) == [Send("a", Ack(0, 10, "b")), Apply(1, 0, 1, b"second")]
