"""ViewedLun: three replicas in one process, real backends and frames, views decided by the
test (the membership's part is tested on its own): epochs start level, a lost follower holds
writes until a view is decided, in-flight writes run again in the next epoch."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vsand.backends import FileBackend
from vsand.lun import Lun
from vsand.metafiles import FileMetaStore
from vsand.mirror.membership import View
from vsand.mirror.messages import Message, MessageReader, encode
from vsand.protocol.block import BlockOp, BlockRequest
from vsand.protocol.scsi.types import LunParams
from vsand.replication import Role
from vsand.viewlun import ViewedLun

BS = 512
MiB = 1 << 20
SIZE = 16 * MiB
NODES = ("a", "b", "c")
ALL = frozenset(NODES)


class Net:
    """Links between every pair, each one cuttable; frames encoded and delivered in order."""

    def __init__(self) -> None:
        self.nodes: dict[str, ViewedLun] = {}
        self.up: set[frozenset[str]] = set()
        self.gen: dict[frozenset[str], int] = {}
        self.readers: dict[tuple[str, str, int], MessageReader] = {}
        self.rounds: list[str] = []

    def sender(self, me: str) -> Any:
        def send(peer: str, msg: Message) -> bool:
            pair = frozenset((me, peer))
            if pair not in self.up:
                return False
            data = b"".join(bytes(b) for b in encode(msg))
            asyncio.get_running_loop().call_soon(self._deliver, me, peer, data,
                                                 self.gen.get(pair, 0))
            return True
        return send

    def _deliver(self, src: str, dst: str, data: bytes, gen: int) -> None:
        pair = frozenset((src, dst))
        if pair not in self.up or gen != self.gen.get(pair, 0):
            return
        reader = self.readers.setdefault((src, dst, gen), MessageReader())
        reader.feed(data)
        while (msg := reader.next_message()) is not None:
            self.nodes[dst].receive(src, msg)

    def connect(self, x: str, y: str) -> None:
        self.up.add(frozenset((x, y)))
        self.nodes[x].link_up(y)
        self.nodes[y].link_up(x)

    def cut(self, x: str, y: str) -> None:
        pair = frozenset((x, y))
        self.up.discard(pair)
        self.gen[pair] = self.gen.get(pair, 0) + 1
        self.nodes[x].peer_lost(y)
        self.nodes[y].peer_lost(x)

    def decide(self, view: View, among: frozenset[str] = ALL) -> None:
        for n in sorted(among):
            self.nodes[n].promise(view.epoch)
        for n in sorted(among):
            self.nodes[n].view_decided(view)


async def _blocking(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def _node(tmp: Path, name: str, net: Net) -> ViewedLun:
    d = tmp / name
    (d / "meta").mkdir(parents=True, exist_ok=True)
    path = str(d / "lun.img")
    if not os.path.exists(path):
        FileBackend.create_sparse(path, SIZE)
    be = FileBackend(path, block_size=BS)
    be.open()
    lun = Lun.from_params(0, LunParams(block_size=BS, blocks=SIZE // BS, serial="VIEW0",
                                       naa_id=bytes(16)), be)
    m = ViewedLun(lun, 9, name, list(NODES), FileMetaStore(str(d / "meta")),
                  net.sender(name), cluster_id="t", run_blocking=_blocking, join_timeout=2.0)
    m.request_round = net.rounds.append
    await m.attach()
    m.set_quorum(True)
    net.nodes[name] = m
    return m


async def _until(cond: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def _write(lba: int, blocks: int, fill: int) -> BlockRequest:
    return BlockRequest(BlockOp.WRITE, lba, blocks, bytes([fill]) * (blocks * BS))


def _digest(m: ViewedLun) -> str:
    with open(m.lun.backend.path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _serving(*nodes: ViewedLun) -> bool:
    return all(m.ready and m.role in (Role.IN_SYNC, Role.DEGRADED) for m in nodes)


@pytest.fixture
async def three(tmp_path: Path) -> AsyncIterator[Net]:
    net = Net()
    for n in NODES:
        await _node(tmp_path, n, net)
    for x, y in (("a", "b"), ("a", "c"), ("b", "c")):
        net.connect(x, y)
    net.decide(View(1, ALL))
    await _until(lambda: _serving(*net.nodes.values()))
    yield net
    for m in net.nodes.values():
        await m.close()
        m.lun.backend.close()


async def test_writes_from_every_node_land_on_every_replica(three: Net) -> None:
    a, b, c = (three.nodes[n] for n in NODES)
    assert a.source == "a" and a.replicas == ALL and a.role is Role.IN_SYNC
    await asyncio.gather(*(m.submit(_write(i * 64, 64, 0x10 + i)) for i, m in
                           enumerate((a, b, c)) for _ in range(3)))
    # Overlapping writes from all three: identical replicas whatever the order.
    await asyncio.gather(*(m.submit(_write(32, 64, 0x40 + i)) for i, m in enumerate((a, b, c))))
    await _until(lambda: not any(m._applying for m in (a, b, c)))
    assert _digest(a) == _digest(b) == _digest(c)


async def test_a_lost_member_leaves_and_returns_by_resync(three: Net) -> None:
    a, b, c = (three.nodes[n] for n in NODES)
    await a.submit(_write(0, 8, 0x11))
    three.cut("a", "c")
    three.cut("b", "c")
    # A write through b while the view has not changed yet: held, then run again.
    pending = asyncio.ensure_future(b.submit(_write(2048, 64, 0x22)))
    await asyncio.sleep(0.05)
    assert not pending.done()
    three.decide(View(2, frozenset("ab")), frozenset("ab"))
    await asyncio.wait_for(pending, 5)
    assert a.role is Role.DEGRADED and a.replicas == frozenset("ab")
    for i in range(8):
        await a.submit(_write(4096 + i * 2048, 16, 0x30 + i))
    assert a.bitmaps["c"].dirty_bytes >= 8 * MiB // 8
    three.connect("a", "c")
    three.connect("b", "c")
    c.view_decided(View(2, frozenset("ab")))  # what its keeper hears again from a or b
    # a resyncs c, then feeds it every write as a follower until the view takes it in.
    await _until(lambda: c.ready and "c" in a.followers)
    assert c.role is Role.SYNC_TARGET and a.in_sync_peers() == frozenset("c")
    await a.submit(_write(8, 8, 0x44))
    three.decide(View(3, ALL))
    await _until(lambda: _serving(a, b, c) and c.role is Role.IN_SYNC)
    await _until(lambda: not any(m._applying for m in (a, b, c)))
    assert _digest(a) == _digest(b) == _digest(c)


async def test_a_lost_follower_holds_writes_until_a_view_is_decided(three: Net) -> None:
    a, b, c = (three.nodes[n] for n in NODES)
    three.cut("a", "c")
    three.cut("b", "c")
    three.decide(View(2, frozenset("ab")), frozenset("ab"))
    await _until(lambda: _serving(a, b))
    three.connect("a", "c")
    three.connect("b", "c")
    c.view_decided(View(2, frozenset("ab")))
    await _until(lambda: "c" in a.followers)
    # A proposal may name c already: without it, no epoch starts before a view is decided.
    three.cut("b", "c")
    await _until(lambda: three.rounds == ["follower c lost"])
    held = asyncio.ensure_future(a.submit(_write(0, 8, 0x55)))
    await asyncio.sleep(0.6)
    assert not a.ready and not held.done() and "c" not in a.followers
    three.decide(View(3, frozenset("ab")), frozenset("ab"))
    await asyncio.wait_for(held, 5)
    assert a.replicas == frozenset("ab")


async def test_a_promise_stops_the_old_epoch_at_once(three: Net) -> None:
    a, b, c = (three.nodes[n] for n in NODES)
    b.promise(2)  # a round began: b acknowledges nothing of epoch 1 any more
    write = asyncio.ensure_future(a.submit(_write(0, 8, 0x66)))
    await asyncio.sleep(0.2)
    assert not write.done() and not b.ready
    three.decide(View(2, ALL))
    await asyncio.wait_for(write, 5)
    await _until(lambda: not any(m._applying for m in (a, b, c)))
    assert _digest(a) == _digest(b) == _digest(c)


async def test_stable_writes_are_forgotten_unstable_ones_marked_at_the_stop(three: Net) -> None:
    a, b, c = (three.nodes[n] for n in NODES)
    for i in range(4):
        await a.submit(_write(i * 2048, 8, 0x70 + i))
    # Every replica tells the others how far it applied: a forgets what all three hold.
    await _until(lambda: not a._recent, 3.0)
    # An unstable write (c never heard of it) is marked for every peer when the epoch stops.
    a._recent.append((99, 5 * MiB, 4096))
    three.cut("a", "c")
    assert a.bitmaps["b"].dirty_bytes and a.bitmaps["c"].dirty_bytes


async def _new_cluster(tmp: Path, holding: str) -> Net:
    """Three nodes that never took part in an epoch; ``holding``'s store already has data."""
    d = tmp / holding
    d.mkdir(parents=True)
    FileBackend.create_sparse(str(d / "lun.img"), SIZE)
    with open(d / "lun.img", "r+b") as f:
        f.seek(3 * MiB)
        f.write(b"\x5a" * MiB)
    net = Net()
    for n in NODES:
        await _node(tmp, n, net)
    for x, y in (("a", "b"), ("a", "c"), ("b", "c")):
        net.connect(x, y)
    net.decide(View(1, ALL))
    return net


async def _close_all(net: Net) -> None:
    for m in net.nodes.values():
        await m.close()
        m.lun.backend.close()


async def test_a_new_cluster_copies_the_only_data_there_is(tmp_path: Path) -> None:
    net = await _new_cluster(tmp_path, "a")
    try:
        a, b, c = (net.nodes[n] for n in NODES)
        await _until(lambda: _serving(a, b, c))
        assert _digest(a) == _digest(b) == _digest(c)
        assert a.resync_bytes == 2 * SIZE  # the whole LUN, to each of the two others
        # Their data is the cluster's now (the members record it just after READY).
        await _until(lambda: all(m.gens.current for m in (a, b, c)), 2.0)
    finally:
        await _close_all(net)


async def test_a_new_cluster_with_data_elsewhere_than_at_its_source_stays_offline(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    net = await _new_cluster(tmp_path, "b")
    try:
        a, b, c = (net.nodes[n] for n in NODES)
        await asyncio.sleep(1.5)
        assert not any(m.ready for m in (a, b, c)) and a.resync_bytes == 0
        assert "node b holds data" in caplog.text
        with open(b.lun.backend.path, "rb") as f:
            f.seek(3 * MiB)
            assert f.read(MiB) == b"\x5a" * MiB  # nothing overwrote it
    finally:
        await _close_all(net)


async def test_a_blank_node_joining_a_cluster_that_began_blank_gets_the_writes_only(
        tmp_path: Path) -> None:
    net = Net()
    for n in NODES:
        await _node(tmp_path, n, net)
    try:
        a, b, c = (net.nodes[n] for n in NODES)
        net.connect("a", "b")
        net.decide(View(1, frozenset("ab")), frozenset("ab"))
        await _until(lambda: _serving(a, b))
        await a.submit(_write(4096, 2048, 0x61))  # 1 MiB while c was never there
        net.connect("a", "c")
        net.connect("b", "c")
        c.view_decided(View(1, frozenset("ab")))
        await _until(lambda: "c" in a.followers)
        assert 1 * MiB <= a.resync_bytes <= 2 * MiB, a.resync_bytes
        net.decide(View(2, ALL))
        await _until(lambda: _serving(a, b, c))
        assert _digest(a) == _digest(b) == _digest(c)
        assert b.blank_origin and c.blank_origin
    finally:
        await _close_all(net)


async def test_a_view_of_one_serves_and_resyncs_the_others(three: Net) -> None:
    a, b, c = (three.nodes[n] for n in NODES)
    three.decide(View(2, frozenset("a")))  # b and c still vote, and grant a their leases
    await _until(lambda: _serving(a))
    assert a.replicas == frozenset("a") and a.role is Role.DEGRADED
    await a.submit(_write(0, 64, 0x71))
    await _until(lambda: "b" in a.followers)  # one at a time, the lower name first


async def test_verify_finds_and_repairs_a_damaged_replica_among_three(three: Net) -> None:
    a, b, c = (three.nodes[n] for n in NODES)
    await b.submit(_write(0, 16384, 0x3c))  # the first 8 MiB
    with open(c.lun.backend.path, "r+b") as f:  # behind the mirror's back
        f.seek(5 * MiB + 512)
        f.write(b"\xee" * 4096)
    a.start_verify(repair=True)
    assert a.verify_task is not None
    await asyncio.wait_for(asyncio.shield(a.verify_task), 30)
    st = a.verify_status()
    assert st is not None and st["differing_regions"] == [5] and st["repaired_regions"] == 1
    await _until(lambda: not any(m._applying for m in (a, b, c)))
    assert _digest(a) == _digest(b) == _digest(c)
