"""Peer links over real loopback sockets: handshake, message flow, duplicates, liveness,
reconnection, garbage input and clean shutdown.  Every wait is bounded."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import uvloop

from vsand.mirror.handshake import LunInfo, NodeIdentity
from vsand.mirror.messages import (
    Ack, Forward, Goodbye, Heartbeat, HeartbeatAck, Message, MessageReader, Write,
)
from vsand.peer import HIGH_WATER, LinkState, PeerEndpoint, PeerLink
from vsand.protocol.block import BlockOp

SECRET = b"correct horse battery staple"
L1 = LunInfo(1, "naa.600-one", 512, 2048)
L2 = LunInfo(2, "naa.600-two", 4096, 100)
L3 = LunInfo(3, "naa.600-three", 4096, 100)
A = NodeIdentity("prod", "a", (L1, L2))
B = NodeIdentity("prod", "b", (L1, L3))
HOST = "127.0.0.1"
# Fast liveness for the failure tests: detection within timeout + interval = 0.35 s.
FAST = dict(heartbeat_interval=0.05, heartbeat_timeout=0.3, handshake_timeout=1.0,
            backoff_min=0.05, backoff_max=0.2)
QUIET = dict(heartbeat_interval=10.0, heartbeat_timeout=30.0)  # no periodic heartbeats


def _owned(msg: Message) -> Message:
    """The callback contract: payload views are copied before the callback returns."""
    if isinstance(msg, (Write, Forward)):
        return dataclasses.replace(msg, data=bytes(msg.data))
    return msg


class Node:
    """An endpoint and a record of its callbacks."""

    def __init__(self, ident: NodeIdentity, secret: bytes = SECRET,
                 allowed: tuple[str, ...] = ("a", "b", "c"), **kw: float) -> None:
        self.ups: list[PeerLink] = []
        self.msgs: list[Message] = []
        self.losts: list[tuple[PeerLink, str]] = []
        self.changed = asyncio.Event()
        self.ep = PeerEndpoint(ident, secret, allowed, random_bytes=os.urandom,
                               on_up=self._up, on_message=self._msg, on_lost=self._lost, **kw)
        self.port = 0

    def _up(self, link: PeerLink) -> None:
        self.ups.append(link)
        self.changed.set()

    def _msg(self, link: PeerLink, msg: Message) -> None:
        self.msgs.append(_owned(msg))
        self.changed.set()

    def _lost(self, link: PeerLink, reason: str) -> None:
        self.losts.append((link, reason))
        self.changed.set()

    async def listen(self, port: int = 0) -> int:
        server = await self.ep.listen(HOST, port)
        self.port = server.sockets[0].getsockname()[1]
        return self.port

    def app_msgs(self) -> list[Message]:
        """Received messages less the links' own periodic heartbeats and their acks."""
        return [m for m in self.msgs
                if not isinstance(m, HeartbeatAck) and not (isinstance(m, Heartbeat)
                                                            and m.seq < 1000)]


async def until(pred: Callable[[], bool], timeout: float = 3.0) -> None:
    async def poll() -> None:
        while not pred():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(poll(), timeout)


class Cluster:
    """Makes Nodes and closes them all at the end."""

    def __init__(self) -> None:
        self.made: list[Node] = []

    def __call__(self, ident: NodeIdentity, **kw: object) -> Node:
        node = Node(ident, **kw)  # type: ignore[arg-type]
        self.made.append(node)
        return node

    async def aclose(self) -> None:
        for node in self.made:
            await asyncio.wait_for(node.ep.close(), 5)


@pytest.fixture
async def nodes() -> AsyncIterator[Cluster]:
    cluster = Cluster()
    yield cluster
    await cluster.aclose()


async def pair(nodes: Cluster, **kw: object) -> tuple[Node, Node]:
    """a listens, b dials a; both links up."""
    a, b = nodes(A, **kw), nodes(B, **kw)
    port = await a.listen()
    b.ep.connect("a", HOST, port)
    await until(lambda: "b" in a.ep.links and "a" in b.ep.links)
    return a, b


def _write(i: int, data: bytes, block: int = 512) -> Write:
    return Write(lun=1, epoch=3, seq=i, request_id=10_000 + i, lba=i * 8,
                 blocks=len(data) // block, data=data, fua=bool(i & 1))


def _socket_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


# ---------------------------------------------------------------- happy path
async def test_handshake_and_messages_both_ways(nodes: Cluster) -> None:
    a, b = await pair(nodes, **QUIET)
    la, lb = a.ep.links["b"], b.ep.links["a"]
    assert la.common_luns == {1: L1} and lb.common_luns == {1: L1}
    assert not la.dialled and lb.dialled
    assert la.rtt_last is not None and lb.rtt_last is not None  # measured in the handshake
    assert [link.peer_id for link in a.ups] == ["b"] and [link.peer_id for link in b.ups] == ["a"]

    rnd = random.Random(7)
    big = rnd.randbytes(64 * 1024)
    fwd = rnd.randbytes(8 * 4096)

    def batch(tag: int) -> list[Message]:
        return [_write(tag, big), Ack(1, 3, tag, 10_000 + tag),
                Forward(1, 3, 77 + tag, BlockOp.WRITE, lba=16, blocks=8, data=fwd),
                Heartbeat(1000 + tag, 123_456_789 + tag, epoch=3),
                Forward(1, 3, 78 + tag, BlockOp.UNMAP, ranges=((0, 8), (64, 8))),
                Ack(1, 3, tag + 1, 10_001 + tag, status=5)]

    to_b, to_a = batch(1), batch(2)
    for msg in to_b:
        la.send(msg)
    for msg in to_a:
        lb.send(msg)
    await until(lambda: len(b.app_msgs()) == len(to_b) and len(a.app_msgs()) == len(to_a))
    assert b.app_msgs() == to_b and a.app_msgs() == to_a
    # Each side answered the other's HEARTBEAT, echoing its timestamp.
    await until(lambda: any(isinstance(m, HeartbeatAck) and m.seq == 1002 for m in b.msgs))
    ack = next(m for m in b.msgs if isinstance(m, HeartbeatAck) and m.seq == 1002)
    assert ack.echo_ns == 123_456_791


async def test_thousand_pipelined_writes_arrive_intact_in_order(
        nodes: Cluster) -> None:
    a, b = await pair(nodes, **QUIET)
    la = a.ep.links["b"]
    rnd = random.Random(1)
    sent = [_write(i, rnd.randbytes(4096 * (1 + i % 4))) for i in range(1000)]
    for msg in sent:
        la.send(msg)  # one pass of the loop: a single writelines
    await asyncio.wait_for(la.drain(), 5)
    await until(lambda: len(b.app_msgs()) == 1000, timeout=10)
    assert b.app_msgs() == sent


async def test_heartbeats_measure_rtt(nodes: Cluster) -> None:
    a, b = await pair(nodes, heartbeat_interval=0.02, heartbeat_timeout=1.0)
    la = a.ep.links["b"]
    await until(lambda: la.heartbeats_sent >= 5 and la.rtt_avg is not None)
    await asyncio.sleep(0.1)
    assert la.rtt_last is not None and 0 <= la.rtt_last < 0.5
    assert la.state is LinkState.UP and not a.losts and not b.losts


async def test_drain_waits_for_a_peer_that_does_not_read(nodes: Cluster) -> None:
    a, b = await pair(nodes, heartbeat_interval=0.5, heartbeat_timeout=3.0)
    la, lb = a.ep.links["b"], b.ep.links["a"]
    assert lb.transport is not None
    lb.transport.pause_reading()
    chunk = bytes(256 * 1024)

    async def writer() -> int:
        for i in range(400):  # 100 MiB: far beyond socket buffers and HIGH_WATER
            la.send(_write(i, chunk))
            await la.drain()
        return 400

    task = asyncio.create_task(writer())
    await asyncio.sleep(0.3)
    assert not task.done()
    assert la.transport is not None and la.transport.get_write_buffer_size() >= HIGH_WATER
    lb.transport.resume_reading()
    assert await asyncio.wait_for(task, 10) == 400
    await until(lambda: len(b.app_msgs()) == 400, timeout=10)


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("who, secret, expect", [
    (B, b"not the right secret at all", "authentication failed"),
    (NodeIdentity("staging", "b", (L1,)), SECRET, "wrong cluster id"),
    (NodeIdentity("prod", "c", (L1,)), SECRET, "unknown node id 'c'"),
])
async def test_refused_link(nodes: Cluster, caplog: pytest.LogCaptureFixture,
                            who: NodeIdentity, secret: bytes, expect: str) -> None:
    caplog.set_level(logging.INFO, logger="vsand.peer")
    a = nodes(A, allowed=("b",), **FAST)
    other = nodes(who, secret=secret, **FAST)
    port = await a.listen()
    other.ep.connect("a", HOST, port)
    await until(lambda: sum(expect in r.getMessage() for r in caplog.records) >= 2)
    assert not a.ups and not other.ups and not a.ep.links and not other.ep.links
    # Both ends log it: the refusing one with its reason, the refused one as told by GOODBYE
    # (or, for a bad secret, by its own check of the other's mac).
    assert any("handshake failed" in r.getMessage() and expect in r.getMessage()
               for r in caplog.records)


async def test_silent_caller_gets_goodbye_at_deadline(nodes: Cluster,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    a = nodes(A, handshake_timeout=0.2)
    port = await a.listen()
    reader, writer = await asyncio.open_connection(HOST, port)
    data = await asyncio.wait_for(reader.read(), 3)  # until EOF
    writer.close()
    await writer.wait_closed()
    mr = MessageReader()
    mr.feed(data)
    msg = mr.next_message()
    # The accepting side said nothing before the caller's HELLO: only the GOODBYE.
    assert isinstance(msg, Goodbye) and "handshake not completed" in msg.reason
    assert mr.next_message() is None
    assert any("handshake not completed" in r.getMessage() for r in caplog.records)


async def test_garbage_is_dropped_and_endpoint_keeps_working(
        nodes: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    a = nodes(A, **FAST)
    port = await a.listen()
    rnd = random.Random(3)
    for garbage in (b"XX" + rnd.randbytes(8190), b"VM\x01" + rnd.randbytes(500),
                    rnd.randbytes(10)):  # too short to parse: the deadline closes it
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(garbage)
        await asyncio.wait_for(reader.read(), 3)  # the endpoint closes the connection
        writer.close()
        await writer.wait_closed()
    assert any("bad magic" in r.getMessage() for r in caplog.records)
    assert not a.ups
    b = nodes(B, **FAST)
    b.ep.connect("a", HOST, port)
    await until(lambda: "b" in a.ep.links and "a" in b.ep.links)


async def test_protocol_error_after_handshake_loses_link(nodes: Cluster) -> None:
    a, b = await pair(nodes, **FAST)
    lb = b.ep.links["a"]
    assert lb.transport is not None
    lb.transport.write(b"\x00" * 64)  # a zeroed header: bad magic
    await until(lambda: bool(a.losts))
    assert "protocol error" in a.losts[0][1]


# ---------------------------------------------------------------- one link per peer
def _same_connection(la: PeerLink, lb: PeerLink) -> bool:
    assert la.transport is not None and lb.transport is not None
    ta, tb = la.transport, lb.transport
    return bool(ta.get_extra_info("sockname") == tb.get_extra_info("peername")
                and ta.get_extra_info("peername") == tb.get_extra_info("sockname"))


async def test_simultaneous_dial_keeps_one_link(nodes: Cluster) -> None:
    a, b = nodes(A, **FAST), nodes(B, **FAST)
    pa, pb = await a.listen(), await b.listen()
    a.ep.connect("b", HOST, pb)
    b.ep.connect("a", HOST, pa)

    def settled() -> bool:
        la, lb = a.ep.links.get("b"), b.ep.links.get("a")
        return la is not None and lb is not None and _same_connection(la, lb)
    await until(settled)
    await asyncio.sleep(0.3)  # several dial and heartbeat periods: nothing changes
    la, lb = a.ep.links["b"], b.ep.links["a"]
    assert settled() and list(a.ep.links) == ["b"] and list(b.ep.links) == ["a"]
    assert la.dialled and not lb.dialled  # a has the lower id: its dialled link wins
    assert len(a.ups) - len(a.losts) == 1 and len(b.ups) - len(b.losts) == 1
    assert all(reason.endswith("duplicate link") for _, reason in a.losts + b.losts)


@pytest.mark.parametrize("incumbent", ["a", "b"])
async def test_duplicate_link_rule(nodes: Cluster, incumbent: str) -> None:
    """A second link completes while one is up: both ends keep the one a dialled."""
    a, b = nodes(A, **FAST), nodes(B, **FAST)
    pa, pb = await a.listen(), await b.listen()
    first, second = (a, b) if incumbent == "a" else (b, a)
    first.ep.connect("b" if first is a else "a", HOST, pb if first is a else pa)
    await until(lambda: "b" in a.ep.links and "a" in b.ep.links)
    old_a = a.ep.links["b"]
    kept = await asyncio.wait_for(
        second.ep.dial_once("b" if second is a else "a", HOST, pb if second is a else pa), 3)
    if incumbent == "a":  # b's newcomer loses at both ends
        assert kept is None
        await asyncio.sleep(0.2)
        assert a.ep.links["b"] is old_a and not a.losts and not b.losts
    else:  # a's newcomer replaces b's link at both ends
        assert kept is not None and a.ep.links["b"] is kept
        await until(lambda: b.ep.links.get("a") is not None
                    and _same_connection(a.ep.links["b"], b.ep.links["a"]))
        await until(lambda: len(a.losts) == 1 and len(b.losts) == 1)
        assert all("duplicate link" in reason for _, reason in a.losts + b.losts)
        assert a.losts[0][0] is old_a
    assert a.ep.links["b"].dialled and not b.ep.links["a"].dialled
    assert len(a.ups) - len(a.losts) == 1 and len(b.ups) - len(b.losts) == 1


# ---------------------------------------------------------------- peer failure
async def test_crashed_peer_is_lost_and_link_returns(nodes: Cluster) -> None:
    a, b = await pair(nodes, **FAST)
    port = a.port
    for link in list(a.ep.links.values()):
        link.abort()  # as the kernel does for a killed process: no GOODBYE
    await a.ep.close()
    await until(lambda: bool(b.losts), timeout=1)
    assert "said goodbye" not in b.losts[0][1]
    assert not b.ep.links
    a2 = nodes(A, **FAST)
    await a2.listen(port)  # the node restarts on its port; b's reconnect loop finds it
    await until(lambda: "a" in b.ep.links and "b" in a2.ep.links)
    assert len(b.ups) == 2 and len(a2.ups) == 1


class Proxy:
    """A TCP relay that can freeze (forward nothing, like a hung peer or a partition) and
    thaw (drop the frozen connections, relay new ones)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.pumps: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, HOST, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(HOST, self.target)
        except OSError:
            w.close()
            return
        self.writers += [w, uw]
        for src, dst in ((r, uw), (ur, w)):
            task = asyncio.create_task(self._pump(src, dst))
            self.pumps.add(task)
            task.add_done_callback(self.pumps.discard)

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                await self.flowing.wait()
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    def freeze(self) -> None:
        self.flowing.clear()

    async def _drop_all(self) -> None:
        for task in list(self.pumps):
            task.cancel()
        await asyncio.gather(*self.pumps, return_exceptions=True)
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()

    async def thaw(self) -> None:
        await self._drop_all()
        self.flowing.set()

    async def close(self) -> None:
        self.server.close()
        await self._drop_all()
        await self.server.wait_closed()


async def test_hung_peer_is_lost_within_timeout_and_link_returns(
        nodes: Cluster) -> None:
    loop = asyncio.get_running_loop()
    a, b = nodes(A, **FAST), nodes(B, **FAST)
    proxy = Proxy(await a.listen())
    try:
        b.ep.connect("a", HOST, await proxy.start())
        await until(lambda: "b" in a.ep.links and "a" in b.ep.links)
        await asyncio.sleep(0.2)  # heartbeats flowing, nothing lost
        assert not a.losts and not b.losts
        t0 = loop.time()
        proxy.freeze()
        await until(lambda: bool(a.losts) and bool(b.losts), timeout=2)
        elapsed = loop.time() - t0
        bound = FAST["heartbeat_timeout"] + FAST["heartbeat_interval"]
        assert elapsed <= bound + 0.1, elapsed  # timeout + interval, plus scheduling slack
        assert all("nothing received" in reason for _, reason in a.losts + b.losts)
        await proxy.thaw()
        await until(lambda: len(a.ups) == 2 and len(b.ups) == 2, timeout=5)
        assert "b" in a.ep.links and "a" in b.ep.links
    finally:
        await b.ep.close()
        await a.ep.close()
        await proxy.close()


async def test_stopped_reader_loses_the_link(nodes: Cluster) -> None:
    """A side that stops reading hears nothing, so it declares the peer dead in time."""
    loop = asyncio.get_running_loop()
    a, b = await pair(nodes, **FAST)
    lb = b.ep.links["a"]
    assert lb.transport is not None
    t0 = loop.time()
    lb.transport.pause_reading()
    await until(lambda: bool(b.losts), timeout=2)
    assert loop.time() - t0 <= FAST["heartbeat_timeout"] + FAST["heartbeat_interval"] + 0.1
    assert "nothing received" in b.losts[0][1]
    await until(lambda: bool(a.losts), timeout=2)  # b's abort reaches a as a reset or EOF
    await until(lambda: "a" in b.ep.links and "b" in a.ep.links)  # and b redials


# ---------------------------------------------------------------- several networks
HOST2 = "127.0.0.2"  # a second loopback address: a second network between the same nodes


async def two_link_pair(nodes: Cluster) -> tuple[Node, Node]:
    """a and b, each listening on the wildcard and reachable at 127.0.0.1 (link 0) and
    127.0.0.2 (link 1); both dial both of the other's addresses."""
    a, b = nodes(A, **FAST), nodes(B, **FAST)
    for node in (a, b):
        server = await node.ep.listen("0.0.0.0", 0)
        node.port = server.sockets[0].getsockname()[1]
        node.ep.local_addresses = ((HOST, node.port), (HOST2, node.port))
    a.ep.multipath, b.ep.multipath = {"b"}, {"a"}
    for node, other, name in ((a, b, "b"), (b, a, "a")):
        node.ep.connect(name, HOST, other.port, 0)
        node.ep.connect(name, HOST2, other.port, 1)
    await until(lambda: len(a.ep.links_of("b")) == 2 and len(b.ep.links_of("a")) == 2
                and "b" in a.ep.links and "a" in b.ep.links)
    return a, b


async def test_every_network_gets_a_link_and_one_carries_the_replication(
        nodes: Cluster) -> None:
    a, b = await two_link_pair(nodes)
    await asyncio.sleep(0.3)  # duplicates settle (both ends dialled every network)
    assert [link.path for link in a.ep.links_of("b")] == [0, 1]
    assert sorted(link.path for link in b.ep.links_of("a")) == [0, 1]
    for la, lb in zip(a.ep.links_of("b"), b.ep.links_of("a")):
        assert _same_connection(la, lb)  # both ends agree which connection is which link
    # The caller saw one link come up per peer (and one more per duplicate that replaced
    # it), never a standby one.
    assert len(a.ups) - len(a.losts) == 1 and len(b.ups) - len(b.losts) == 1
    assert a.ep.links["b"] in a.ep.links_of("b")
    # Both ends agree which link carries the replication (a, the lower id, chose it).
    assert _same_connection(a.ep.links["b"], b.ep.links["a"])
    # Heartbeats count on every link; anything else only on the active one.
    for i, link in enumerate(a.ep.links_of("b")):
        link.send(Heartbeat(5000 + i, 0, 0))
        link.send(Ack(1, 3, 6000 + i, 0) if link is a.ep.links["b"] else Ack(1, 3, 7000, 0))
    await until(lambda: {m.seq for m in b.msgs if isinstance(m, Heartbeat)} >= {5000, 5001})
    await until(lambda: any(isinstance(m, Ack) and m.seq >= 6000 for m in b.msgs))
    await asyncio.sleep(0.1)
    assert [m.seq for m in b.msgs if isinstance(m, Ack)] in ([6000], [6001])


async def test_a_lost_standby_link_is_not_a_lost_peer(nodes: Cluster) -> None:
    a, b = await two_link_pair(nodes)
    await asyncio.sleep(0.3)
    ups, losts, losts_b = len(a.ups), len(a.losts), len(b.losts)
    active = a.ep.links["b"]
    (standby,) = [link for link in a.ep.links_of("b") if link is not active]
    standby.abort()
    await until(lambda: len(a.ep.links_of("b")) == 1)
    assert a.ep.links["b"] is active and (len(a.ups), len(a.losts)) == (ups, losts)
    await until(lambda: len(a.ep.links_of("b")) == 2)  # redialled
    assert a.ep.links["b"] is active and len(a.losts) == losts and len(b.losts) == losts_b


async def test_a_lost_active_link_restarts_every_link_at_both_ends(nodes: Cluster) -> None:
    a, b = await two_link_pair(nodes)
    await asyncio.sleep(0.3)
    ups_a, ups_b, losts_a, losts_b = len(a.ups), len(b.ups), len(a.losts), len(b.losts)
    active = a.ep.links["b"]
    others = [link for link in a.ep.links_of("b") if link is not active]
    active.abort()
    # Both ends lose the peer once (b too, even if it had picked the other link) ...
    await until(lambda: len(a.losts) == losts_a + 1 and len(b.losts) == losts_b + 1)
    assert all(link.state is LinkState.CLOSED for link in others)
    # ... and have it back, on every network.
    def whole() -> bool:
        return ("b" in a.ep.links and "a" in b.ep.links and len(a.ep.links_of("b")) == 2
                and len(b.ep.links_of("a")) == 2)
    await until(lambda: len(a.ups) > ups_a and len(b.ups) > ups_b and whole())
    await asyncio.sleep(0.3)  # links that both ends dialled at once settle
    await until(whole)
    assert a.ep.links["b"] is not active
    assert len(a.ups) - len(a.losts) == 1 and len(b.ups) - len(b.losts) == 1


async def test_the_higher_node_follows_a_move_it_did_not_notice(nodes: Cluster) -> None:
    """a (the lower id) loses the active link while b has not noticed (one-way: b reads
    nothing more on it and its timeout is far off): a's word on the next link moves b over,
    with the loss of the old one, so both ends again use one and the same connection."""
    a, b = await two_link_pair(nodes)
    await asyncio.sleep(0.3)
    losts_a, losts_b = len(a.losts), len(b.losts)
    old_b = b.ep.links["a"]
    # a gives the link up as its endpoint does when it stops hearing b on it, while the
    # connection itself stays open: b hears nothing that would tell it.
    old_a = a.ep.links["b"]
    old_a.on_lost(old_a, "nothing received (simulated: a one-way cut)")
    await until(lambda: len(b.losts) > losts_b and b.ep.links.get("a") not in (None, old_b)
                and "b" in a.ep.links)
    assert "moved the replication" in b.losts[losts_b][1]  # no timeout: the word moved it
    assert old_b.state is LinkState.CLOSED
    await asyncio.sleep(0.3)  # (a link both ends dialled at once may replace it once more)
    await until(lambda: "b" in a.ep.links and "a" in b.ep.links)
    assert _same_connection(a.ep.links["b"], b.ep.links["a"])
    assert len(a.losts) > losts_a
    assert len(a.ups) - len(a.losts) == 1 and len(b.ups) - len(b.losts) == 1


# ---------------------------------------------------------------- shutdown
async def test_close_leaves_no_tasks_and_no_sockets(nodes: Cluster) -> None:
    before = _socket_fds()
    a, b = nodes(A, **FAST), nodes(B, **FAST)
    pa, pb = await a.listen(), await b.listen()
    a.ep.connect("b", HOST, pb)
    b.ep.connect("a", HOST, pa)
    b.ep.connect("c", HOST, 1)  # a dial loop that keeps failing
    await until(lambda: "b" in a.ep.links and "a" in b.ep.links)
    a.ep.links["b"].send(_write(1, bytes(4096)))
    await asyncio.wait_for(a.ep.close(), 3)
    await asyncio.wait_for(b.ep.close(), 3)
    assert not a.ep.links and not b.ep.links
    assert any(reason == "node shutting down" for _, reason in a.losts)
    assert len(a.ups) == len(a.losts) and len(b.ups) == len(b.losts)
    assert asyncio.all_tasks() == {asyncio.current_task()}
    await asyncio.sleep(0)  # transports drop their sockets in callbacks already scheduled
    assert _socket_fds() == before


# ---------------------------------------------------------------- the daemon's loop
UVLOOP_SCENARIOS: list[Callable[[Cluster], Awaitable[None]]] = [
    test_handshake_and_messages_both_ways, test_thousand_pipelined_writes_arrive_intact_in_order,
    test_heartbeats_measure_rtt, test_drain_waits_for_a_peer_that_does_not_read,
    test_protocol_error_after_handshake_loses_link, test_simultaneous_dial_keeps_one_link,
    functools.partial(test_duplicate_link_rule, incumbent="a"),
    functools.partial(test_duplicate_link_rule, incumbent="b"),
    test_crashed_peer_is_lost_and_link_returns,
    test_hung_peer_is_lost_within_timeout_and_link_returns, test_stopped_reader_loses_the_link,
    test_close_leaves_no_tasks_and_no_sockets,
    test_every_network_gets_a_link_and_one_carries_the_replication,
    test_a_lost_standby_link_is_not_a_lost_peer,
    test_a_lost_active_link_restarts_every_link_at_both_ends,
    test_the_higher_node_follows_a_move_it_did_not_notice,
]


@pytest.mark.parametrize("scenario", UVLOOP_SCENARIOS, ids=lambda f: getattr(
    f, "__name__", None) or f.func.__name__ + "-" + f.keywords["incumbent"])
def test_on_uvloop(scenario: Callable[[Cluster], Awaitable[None]]) -> None:
    """The same scenarios on uvloop, which the daemon runs on (its transports differ)."""
    async def run() -> None:
        cluster = Cluster()
        async with asyncio.timeout(20):  # not wait_for: no extra task to trip the task check
            try:
                await scenario(cluster)
            finally:
                await cluster.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
