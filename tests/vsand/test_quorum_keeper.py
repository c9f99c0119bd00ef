"""QuorumKeeper: when this node's lease counts, and how fast a lapsed one fences the LUNs."""

from __future__ import annotations

import asyncio
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
        self.changes: list[bool] = []
        self.witness_answer = witness_answer
        self.keeper = QuorumKeeper(_config(), "a", MemoryMetaStore(), self.send,
                                   self.run_blocking, self.changes.append)

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


async def test_answers_after_a_lost_peer_count_only_once_it_joined_again() -> None:
    h = Harness(witness_answer=1)  # the witness refuses: the peer moved on without this node
    k = h.keeper
    k.link_up("witness")
    k.link_up("b")
    h.answered_now()
    k._evaluate()
    assert k.serving_now
    k.link_lost("b", asyncio.get_running_loop().time())
    assert not await k.may_go_alone()
    assert not k.serving_now and h.changes == [True, False]
    # The peer dials this node again: heartbeats on the new link are answered at once, but
    # this node's LUNs are still behind: the answers must not make it serve its old data.
    k.link_up("b")
    for _ in range(3):
        h.answered_now()
        k._evaluate()
        assert not k.serving() and not k.serving_now
    k.peer_joined()  # every LUN in sync again: the latest answer is the lease
    assert k.serving() and k.serving_now and h.changes[-1] is True


async def test_a_survivor_keeps_serving_across_the_peers_return() -> None:
    h = Harness(witness_answer=0)
    k = h.keeper
    k.link_up("witness")
    k.link_up("b")
    h.answered_now()
    k._evaluate()
    k.link_lost("b", asyncio.get_running_loop().time() - PEER_TIMEOUT)
    assert await k.may_go_alone()
    assert k.granted and k.epoch == 1 and k.serving_now
    k.link_up("b")
    h.answered_now()
    k.peer_joined()  # the grant is given up for the next loss; the lease carries on
    assert not k.granted and k.serving() and k.serving_now
    assert h.changes[-1] is True and False not in h.changes


async def test_check_fences_at_once_when_the_lease_ran_out_unnoticed() -> None:
    h = Harness()
    k = h.keeper
    k.link_up("witness")
    k.link_up("b")
    k.heartbeat_answered(time.monotonic_ns() - int(0.79 * PEER_TIMEOUT * 1e9))
    k._evaluate()
    assert k.serving_now
    # A stopped process wakes up: its watch has not run yet, commands wait in its sockets.
    await asyncio.sleep(0.02)
    k.check()
    assert not k.serving_now and h.changes == [True, False]


async def test_check_leaves_a_valid_lease_alone() -> None:
    h = Harness()
    k = h.keeper
    k.link_up("b")
    h.answered_now()
    k._evaluate()
    k.check()
    assert k.serving_now and h.changes == [True]
