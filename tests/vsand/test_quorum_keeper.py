"""QuorumKeeper: when this node's lease counts, and how fast a lapsed one fences the LUNs."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from vsand.config_cluster import ClusterConfig, ClusterNode
from vsand.mirror.messages import Control, ControlKind, Message
from vsand.mirror.metastore import MemoryMetaStore
from vsand.quorum import QuorumKeeper

PEER_TIMEOUT = 1.0


def _config() -> ClusterConfig:
    return ClusterConfig(
        cluster_id="c", secret=b"s" * 32, secret_file="", listen_host="127.0.0.1",
        listen_port=1, nodes=(ClusterNode("a", "127.0.0.1", 1), ClusterNode("b", "127.0.0.1", 2)),
        heartbeat_interval=0.1, peer_timeout=PEER_TIMEOUT,
        witness=ClusterNode("witness", "127.0.0.1", 3))


class Harness:
    def __init__(self, witness_answer: int | None = 0) -> None:
        self.sent: list[tuple[str, Message]] = []
        self.changes: list[tuple[bool, bool]] = []  # (serving, fenced)
        self.witness_answer = witness_answer
        self.keeper = QuorumKeeper(_config(), "a", MemoryMetaStore(), self.send,
                                   self.run_blocking,
                                   lambda ok, fenced: self.changes.append((ok, fenced)))

    def send(self, peer: str, msg: Message) -> bool:
        self.sent.append((peer, msg))
        if (peer == "witness" and self.witness_answer is not None and type(msg) is Control
                and msg.kind is ControlKind.VOTE):
            rid, status = msg.request_id, self.witness_answer
            asyncio.get_running_loop().call_soon(self.keeper.reply, rid, status)
        return True

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        return fn(*args)

    def answered_now(self) -> None:
        self.keeper.heartbeat_answered(time.monotonic_ns())

    def serving_joined(self) -> None:
        """Witness and peer linked, every LUN in sync, a heartbeat just answered."""
        k = self.keeper
        k.link_up("witness")
        k.link_up("b")
        k.peer_joined()
        self.answered_now()
        k._evaluate()


async def test_answers_after_a_lost_peer_count_only_once_it_joined_again() -> None:
    h = Harness(witness_answer=1)  # the witness refuses: the peer moved on without this node
    k = h.keeper
    h.serving_joined()
    assert k.serving_now
    k.link_lost("b", asyncio.get_running_loop().time())
    assert not await k.may_go_alone()
    assert not k.serving_now and h.changes == [(True, False), (False, True)]  # refused: fenced
    # The peer dials this node again: heartbeats on the new link are answered at once, but
    # this node's LUNs are still behind: the answers must not make it serve its old data.
    k.link_up("b")
    for _ in range(3):
        h.answered_now()
        k._evaluate()
        assert not k.serving() and not k.serving_now
    k.peer_joined()  # every LUN in sync again: the latest answer is the lease
    assert k.serving() and k.serving_now and h.changes[-1] == (True, False)


async def test_a_survivor_keeps_serving_across_the_peers_return() -> None:
    h = Harness(witness_answer=0)
    k = h.keeper
    h.serving_joined()
    k.link_lost("b", asyncio.get_running_loop().time() - PEER_TIMEOUT)
    assert await k.may_go_alone()
    assert k.granted and k.epoch == 1 and k.serving_now
    k.link_up("b")
    h.answered_now()
    k.peer_joined()  # the grant is given up for the next loss; the lease carries on
    assert not k.granted and k.serving() and k.serving_now
    assert all(ok for ok, _ in h.changes)


async def test_check_fences_at_once_when_the_lease_ran_out_unnoticed() -> None:
    h = Harness()
    k = h.keeper
    k.link_up("witness")
    k.link_up("b")
    k.peer_joined()
    k.heartbeat_answered(time.monotonic_ns() - int(0.79 * PEER_TIMEOUT * 1e9))
    k._evaluate()
    assert k.serving_now
    # A stopped process wakes up: its watch has not run yet, commands wait in its sockets.
    await asyncio.sleep(0.02)
    k.check()
    # Not fenced yet: nobody asked the witness; the paths turn transitioning, not unavailable.
    assert not k.serving_now and h.changes == [(True, False), (False, False)]


async def test_check_leaves_a_valid_lease_alone() -> None:
    h = Harness()
    k = h.keeper
    k.link_up("b")
    k.peer_joined()
    h.answered_now()
    k._evaluate()
    k.check()
    assert k.serving_now and h.changes == [(True, False)]


async def test_a_node_that_starts_counts_no_lease_before_its_luns_are_in_sync() -> None:
    """Restarted behind its peer: the peer answers its heartbeats at once, but until every
    LUN has caught up the node serves nothing, and it learns no newer epoch either."""
    h = Harness()
    k = h.keeper
    k.link_up("b")
    k.peer_epoch(7)
    h.answered_now()
    k._evaluate()
    assert not k.serving() and k.epoch == 0
    k.peer_joined()
    assert k.serving_now and k.epoch == 7


async def test_a_vote_won_after_the_peer_joined_again_is_shared_not_kept() -> None:
    """A vote request still out when the peer came back and joined: the witness's grant
    spends the epoch, so this node adopts it without the grant and tells the peer, and the
    peer, joined, adopts it from that news at once."""
    h = Harness(witness_answer=None)
    k = h.keeper
    told: list[int] = []
    k.on_epoch = told.append
    k.link_up("witness")
    k.link_lost("b", asyncio.get_running_loop().time() - PEER_TIMEOUT)
    vote = asyncio.ensure_future(k.may_go_alone())
    await asyncio.sleep(0.01)
    ((_, request),) = [(p, m) for p, m in h.sent if p == "witness"]
    k.link_up("b")
    h.answered_now()
    k.peer_joined()  # the peer is back and in sync before the witness answers
    k.reply(request.request_id, 0)
    assert await vote
    assert k.epoch == 1 and not k.granted and told == [1]
    peer = Harness().keeper  # the other node, joined: hears of epoch 1 through INFO
    peer.link_up("a")
    peer.peer_joined()
    peer.peer_epoch(1)
    assert peer.epoch == 1


async def test_every_epoch_won_is_told_and_a_resyncing_peer_adopts_it_when_in_sync() -> None:
    """The survivor wins epoch 1 while its peer is already linked again but still resyncing:
    the peer hears of it at once and takes it when its LUNs are in sync, so that its next
    request asks for epoch 2, not for the spent epoch 1."""
    h = Harness(witness_answer=0)
    k = h.keeper
    told: list[int] = []
    k.on_epoch = told.append
    k.link_up("witness")
    k.link_up("b")
    k.peer_joined()
    k.link_lost("b", asyncio.get_running_loop().time() - PEER_TIMEOUT)
    k.link_up("b")  # back, not in sync yet
    assert await k.may_go_alone()
    assert k.epoch == 1 and k.granted and told == [1]
    peer = Harness().keeper
    peer.link_up("a")
    peer.peer_epoch(1)  # the INFO, while it resyncs
    assert peer.epoch == 0
    peer.peer_joined()
    assert peer.epoch == 1


def _keeper_without_witness(node: str, changes: list[tuple[bool, bool]]) -> QuorumKeeper:
    cfg = dataclasses.replace(_config(), witness=None)

    async def run_blocking(fn: Any, *args: Any) -> Any:
        return fn(*args)
    k = QuorumKeeper(cfg, node, MemoryMetaStore(), lambda *_: True, run_blocking,
                     lambda ok, fenced: changes.append((ok, fenced)))
    k.multipath = True
    return k


async def test_without_witness_the_higher_node_stands_aside_if_the_peer_comes_back() -> None:
    """Several networks, no witness: a lost active link must not leave both going on."""
    changes: list[tuple[bool, bool]] = []
    low, high = _keeper_without_witness("a", []), _keeper_without_witness("b", changes)
    for k, peer in ((low, "b"), (high, "a")):
        k.link_up(peer)
        k.peer_joined()
        k.link_lost(peer, asyncio.get_running_loop().time())
    t0 = time.monotonic()
    assert await low.may_go_alone()  # the lower node never waits
    assert time.monotonic() - t0 < 0.1
    waiting = asyncio.ensure_future(high.may_go_alone())
    await asyncio.sleep(0.2)
    assert not waiting.done()  # waits for the peer over another network ...
    high.link_up("a")  # ... which comes back: it went on, so this node stands aside
    assert await asyncio.wait_for(waiting, 1) is False
    assert not high.serving() and changes[-1] == (False, True)
    high.peer_joined()  # caught up: serving again
    assert high.serving() and changes[-1] == (True, False)
    # Lost again and the peer stays away for the peer timeout: it is gone, go on alone.
    high.link_lost("a", asyncio.get_running_loop().time())
    t0 = time.monotonic()
    assert await high.may_go_alone()
    assert PEER_TIMEOUT - 0.05 <= time.monotonic() - t0 < PEER_TIMEOUT + 0.5
    assert high.serving()
