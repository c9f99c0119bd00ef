"""MirroredLun pairs in one process: real backends, real frames, a link that can be cut."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vsand.backends import FileBackend
from vsand.lun import Lun
from vsand.metafiles import FileMetaStore
from vsand.mirror.messages import Message, MessageReader, encode
from vsand.protocol.block import BlockOp, BlockRequest
from vsand.protocol.scsi.types import LunParams
from vsand.replication import MirroredLun, Role

BS = 512
MiB = 1 << 20
SIZE = 16 * MiB


class Wire:
    """Two nodes' links: frames are encoded, delivered in order on the loop, decoded."""

    def __init__(self) -> None:
        self.nodes: dict[str, MirroredLun] = {}
        self.up = False
        self.readers: dict[str, MessageReader] = {}
        self.delay = 0.0
        self.gen = 0  # which TCP connection: bytes of an older one are never delivered

    def sender(self, me: str) -> Any:
        def send(peer: str, msg: Message) -> bool:
            if not self.up:
                return False
            data = b"".join(bytes(b) for b in encode(msg))
            loop = asyncio.get_running_loop()
            loop.call_later(self.delay, self._deliver, me, peer, data, self.gen) \
                if self.delay else loop.call_soon(self._deliver, me, peer, data, self.gen)
            return True
        return send

    def _deliver(self, src: str, dst: str, data: bytes, gen: int) -> None:
        if not self.up or gen != self.gen:
            return  # sent on a link that is gone
        reader = self.readers.setdefault(f"{src}>{dst}", MessageReader())
        reader.feed(data)
        while (msg := reader.next_message()) is not None:
            self.nodes[dst].receive(src, msg)

    def connect(self) -> None:
        self.up = True
        self.readers.clear()
        for name, m in self.nodes.items():
            m.link_up(next(n for n in self.nodes if n != name))

    def cut(self) -> None:
        self.up = False
        for name, m in self.nodes.items():
            m.peer_lost(next(n for n in self.nodes if n != name))


async def _blocking(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def _node(tmp: Path, name: str, wire: Wire) -> MirroredLun:
    d = tmp / name
    (d / "meta").mkdir(parents=True, exist_ok=True)
    path = str(d / "lun.img")
    if not os.path.exists(path):
        FileBackend.create_sparse(path, SIZE)
    be = FileBackend(path, block_size=BS)
    be.open()
    lun = Lun.from_params(0, LunParams(block_size=BS, blocks=SIZE // BS, serial="MIRROR0",
                                       naa_id=bytes(16)), be)
    m = MirroredLun(lun, 7, name, ["a", "b"], FileMetaStore(str(d / "meta")),
                    wire.sender(name), cluster_id="t", run_blocking=_blocking,
                    join_timeout=5.0)
    await m.attach()
    wire.nodes[name] = m
    return m


async def _close(m: MirroredLun) -> None:
    await m.close()
    m.lun.backend.close()


def _digest(m: MirroredLun) -> str:
    with open(m.lun.backend.path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


async def _until(cond: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[MirroredLun, MirroredLun, Wire]]:
    wire = Wire()
    a = await _node(tmp_path, "a", wire)
    b = await _node(tmp_path, "b", wire)
    wire.connect()
    await _until(lambda: a.role is Role.IN_SYNC and b.role is Role.IN_SYNC)
    yield a, b, wire
    await _close(a)
    await _close(b)


def _write(lba: int, blocks: int, fill: int) -> BlockRequest:
    return BlockRequest(BlockOp.WRITE, lba, blocks, bytes([fill]) * (blocks * BS))


async def test_fresh_pair_goes_in_sync_and_mirrors_every_op(pair: Any) -> None:
    a, b, _ = pair
    assert a.gens.current == b.gens.current != 0
    with pytest.raises(ValueError):
        a.choose_survivor(["b"])  # nothing to decide while in sync
    assert a.engine.sequencer == b.engine.sequencer == "a"
    await a.lun.execute_block(_write(0, 8, 1))
    await b.lun.execute_block(_write(100, 8, 2))
    await b.lun.execute_block(BlockRequest(BlockOp.WRITE_SAME, 200, 16, bytes([3]) * BS))
    await a.lun.execute_block(BlockRequest(BlockOp.UNMAP, ranges=((0, 4), (104, 2))))
    await b.lun.execute_block(BlockRequest(BlockOp.FLUSH))
    assert _digest(a) == _digest(b)


async def test_compare_and_write_exactly_one_wins_across_nodes(pair: Any) -> None:
    a, b, _ = pair
    await a.lun.execute_block(_write(50, 1, 0))
    old = bytes(BS)
    for round_ in range(20):
        ra = BlockRequest(BlockOp.COMPARE_AND_WRITE, 50, 1, old + bytes([10 + round_]) * BS)
        rb = BlockRequest(BlockOp.COMPARE_AND_WRITE, 50, 1, old + bytes([100 + round_]) * BS)
        res = await asyncio.gather(a.lun.execute_block(ra), b.lun.execute_block(rb))
        assert sorted(r == -1 for r in res) == [False, True], res
        winner = bytes([10 + round_]) * BS if res[0] == -1 else bytes([100 + round_]) * BS
        assert bytes(await a.lun.apply_block(BlockRequest(BlockOp.READ, 50, 1))) == winner
        assert bytes(await b.lun.apply_block(BlockRequest(BlockOp.READ, 50, 1))) == winner
        old = winner
    assert _digest(a) == _digest(b)


async def test_overlapping_writes_from_both_nodes_leave_identical_replicas(pair: Any) -> None:
    a, b, wire = pair
    rng = random.Random(7)
    wire.delay = 0.0005
    for _ in range(10):
        reqs = []
        for i in range(40):
            lba = rng.randrange(0, 64)
            node = a if rng.random() < 0.5 else b
            reqs.append(node.lun.execute_block(_write(lba, rng.randrange(1, 16), i)))
        await asyncio.gather(*reqs)
    assert _digest(a) == _digest(b)


async def test_cut_link_degrades_then_resyncs_only_dirty_regions(pair: Any) -> None:
    a, b, wire = pair
    await a.lun.execute_block(_write(0, 64, 9))
    wire.cut()
    await _until(lambda: a.role is Role.DEGRADED and b.role is Role.DEGRADED)
    # Only a writes while apart: b's history is an ancestor of a's.
    for lba in (0, 5000, 9000):
        await a.lun.execute_block(_write(lba, 8, 7))
    assert a.bitmaps["b"].dirty_bytes == 3 * MiB
    assert _digest(a) != _digest(b)
    wire.connect()
    await _until(lambda: a.role is Role.IN_SYNC and b.role is Role.IN_SYNC)
    assert a.resync_bytes == 3 * MiB
    assert _digest(a) == _digest(b)
    assert a.gens.current == b.gens.current
    await b.lun.execute_block(_write(1, 1, 5))
    assert _digest(a) == _digest(b)


async def test_both_write_while_apart_is_split_brain(pair: Any) -> None:
    a, b, wire = pair
    wire.cut()
    await _until(lambda: a.role is Role.DEGRADED and b.role is Role.DEGRADED)
    await a.lun.execute_block(_write(0, 1, 1))
    await b.lun.execute_block(_write(0, 1, 2))
    wire.connect()
    await _until(lambda: a.role is Role.SPLIT_BRAIN and b.role is Role.SPLIT_BRAIN)
    assert "split-brain" in a.last_decision
    # Both keep serving what they had; an operator picks b's data.
    b.choose_survivor(["a"])
    await _until(lambda: a.role is Role.IN_SYNC and b.role is Role.IN_SYNC)
    assert _digest(a) == _digest(b)
    assert bytes(await a.lun.apply_block(BlockRequest(BlockOp.READ, 0, 1))) == bytes([2]) * BS
    assert b.resync_bytes == SIZE


async def test_not_serving_node_refuses_writes(tmp_path: Path) -> None:
    wire = Wire()
    a = await _node(tmp_path, "a", wire)
    try:
        assert a.role is Role.CONNECTING
        with pytest.raises(OSError) as e:
            await a.lun.execute_block(_write(0, 1, 1))
        assert e.value.errno == errno.ENOLINK
        a.go_alone()
        await _until(lambda: a.role is Role.DEGRADED)
        await a.lun.execute_block(_write(0, 1, 1))
        assert a.bitmaps["b"].dirty_bytes == MiB
    finally:
        await _close(a)


async def test_restart_after_crash_marks_activity_log_regions(tmp_path: Path) -> None:
    wire = Wire()
    a = await _node(tmp_path, "a", wire)
    b = await _node(tmp_path, "b", wire)
    wire.connect()
    await _until(lambda: a.role is Role.IN_SYNC and b.role is Role.IN_SYNC)
    await a.lun.execute_block(_write(0, 8, 1))
    await a.lun.execute_block(_write(20000, 8, 1))
    # A crash: no clean close, so the activity log keeps its regions.
    wire.up = False
    for m in (a, b):
        if m._flusher is not None:
            m._flusher.cancel()
        m.lun.backend.close()
    wire2 = Wire()
    a2 = await _node(tmp_path, "a", wire2)
    b2 = await _node(tmp_path, "b", wire2)
    try:
        assert a2.bitmaps["b"].dirty_bytes > 0
        wire2.connect()
        await _until(lambda: a2.role is Role.IN_SYNC and b2.role is Role.IN_SYNC)
        assert _digest(a2) == _digest(b2)
        # Only the log's regions were copied, not the LUN.
        assert 0 < a2.resync_bytes + b2.resync_bytes <= 2 * 4 * MiB
    finally:
        await _close(a2)
        await _close(b2)


def _pr_out(sa: int, rtype: int = 0) -> bytes:
    return bytes([0x5F, sa, rtype, 0, 0, 0, 0, 0, 24, 0])


async def test_reservation_taken_at_one_node_is_enforced_at_the_other(pair: Any) -> None:
    from vsand.lun import run_scsi
    from vsand.protocol.scsi.target import ScsiTarget
    from vsand.protocol.scsi.types import ScsiCommand, Status
    a, b, _ = pair
    dev_a, dev_b = ScsiTarget({0: a.lun.unit}), ScsiTarget({0: b.lun.unit})
    na, nb = "iqn.x:host-a,i,0x1,t,1", "iqn.x:host-b,i,0x2,t,2"
    for dev, n in ((dev_a, na), (dev_b, nb)):
        dev.attach(n)
    key = (0xAB).to_bytes(8, "big")

    async def run(dev: ScsiTarget, lun: Lun, nexus: str, cdb: bytes, data: bytes = b"") -> Any:
        return await run_scsi(dev, ScsiCommand(cdb, 0, nexus, data, len(data)), {0: lun})

    register = bytes(8) + key + bytes(8)
    r = await run(dev_a, a.lun, na, _pr_out(0), register)
    assert r.status == Status.GOOD, r
    # WRITE EXCLUSIVE (type 1) held by host-a through node a.
    r = await run(dev_a, a.lun, na, _pr_out(1, 1), key + bytes(16))
    assert r.status == Status.GOOD, r
    write10 = bytes([0x2A, 0, 0, 0, 0, 9, 0, 0, 1, 0])
    r = await run(dev_b, b.lun, nb, write10, bytes(BS))
    assert r.status == Status.RESERVATION_CONFLICT
    r = await run(dev_a, a.lun, na, write10, bytes([1]) * BS)
    assert r.status == Status.GOOD
    assert a.lun.unit.pr.to_bytes() == b.lun.unit.pr.to_bytes()
    assert _digest(a) == _digest(b)


async def test_lu_reset_at_one_node_raises_the_unit_attention_at_both(pair: Any) -> None:
    from vsand.protocol.scsi import shared
    a, b, _ = pair
    na, nb = "iqn.x:host-a,i,0x1,t,1", "iqn.x:host-b,i,0x2,t,2"
    a.lun.unit.attach(na)
    b.lun.unit.attach(nb)
    b.lun.unit.attach("iqn.x:host-c,i,0x3,t,2")
    await b.lun.execute_block(BlockRequest(BlockOp.STATE, data=shared.encode_lu_reset(nb)))
    assert a.lun.unit.pop_ua(na) == (0x29, 0x03)
    assert b.lun.unit.pop_ua("iqn.x:host-c,i,0x3,t,2") == (0x29, 0x03)
    assert b.lun.unit.pop_ua(nb) == (0x29, 0x03)


@pytest.mark.parametrize("late", [0.0, 0.05])
async def test_one_exchange_whoever_starts_it(tmp_path: Path, late: float) -> None:
    """b learns of the link after a's state arrived (or while it is being answered): each
    side still sends its state once and both reach the same decision."""
    wire = Wire()
    a = await _node(tmp_path, "a", wire)
    b = await _node(tmp_path, "b", wire)
    sent: list[str] = []
    send_a, send_b = a.send, b.send
    a.send = lambda p, m: (sent.append("a:" + m.TYPE.name), send_a(p, m))[1]  # type: ignore
    b.send = lambda p, m: (sent.append("b:" + m.TYPE.name), send_b(p, m))[1]  # type: ignore
    try:
        wire.up = True
        a.link_up("b")
        await asyncio.sleep(late)
        b.link_up("a")
        await _until(lambda: a.role is Role.IN_SYNC and b.role is Role.IN_SYNC)
        await asyncio.sleep(0.05)
        assert sent.count("a:CONTROL") == 1 and sent.count("b:CONTROL") == 1, sent
        assert a.gens.current == b.gens.current and a.epoch == b.epoch
    finally:
        await _close(a)
        await _close(b)


async def test_online_verify_finds_a_region_that_differs(pair: Any) -> None:
    a, b, _ = pair
    await a.lun.execute_block(_write(0, 64, 4))
    a.start_verify()
    await asyncio.wait_for(a.verify_task, 10)
    st = a.verify_status()
    assert st is not None and st["regions_checked"] == SIZE // MiB and st["mismatches"] == 0
    # Corrupt one block of b behind the mirror's back; verify again while writes run.
    await b.lun.apply_block(_write(5 * MiB // BS + 3, 1, 0xEE))
    b.start_verify()
    writes = [a.lun.execute_block(_write((i * 7919) % (SIZE // BS - 8), 8, i % 256))
              for i in range(200)]
    await asyncio.gather(b.verify_task, *writes)
    st = b.verify_status()
    assert st["mismatches"] == 1 and st["differing_regions"] == [5], st


async def test_verify_repair_copies_the_trusted_copy_while_both_nodes_write(pair: Any) -> None:
    a, b, _ = pair
    for region in (2, 5, 9):  # three regions of b changed behind the mirror's back
        await b.lun.apply_block(_write(region * MiB // BS + 7, 1, 0xEE))
    a.start_verify(repair=True)
    last = {}
    writes = []
    for i in range(300):
        lba = (i * 7919) % (SIZE // BS - 8)
        node = (a, b)[i % 2]
        writes.append(node.lun.execute_block(_write(lba, 8, i % 256)))
        last[lba] = i % 256
    await asyncio.gather(a.verify_task, *writes)
    st = a.verify_status()
    assert st["mismatches"] == 3 and st["repaired_regions"] == 3 and st["repair"], st
    assert _digest(a) == _digest(b)
    for lba, fill in last.items():  # no write lost to a copy of older data
        if all(not (o < lba + 8 and lba < o + 8) for o in last if o != lba):
            assert _read(b, lba) == bytes([fill]) * BS
    b.start_verify()
    await asyncio.wait_for(b.verify_task, 10)
    assert b.verify_status()["mismatches"] == 0


async def test_repair_hold_ends_when_the_source_is_lost(pair: Any) -> None:
    a, b, wire = pair
    await b.lun.apply_block(_write(3 * MiB // BS, 1, 0xEE))
    wire.delay = 0.01
    a.start_verify(repair=True)
    await _until(lambda: b._repair_from == "a")
    wire.cut()  # the source goes away mid-repair: b's writes must not stay held
    await _until(lambda: not b._paused)
    assert b._repair_from == ""
    await asyncio.wait_for(a.verify_task, 10)


@pytest.mark.parametrize("turns", [0, 1, 2, 3, 5, 8, 13, 30])
async def test_link_replaced_during_the_exchange(tmp_path: Path, turns: int) -> None:
    """Both nodes dial at once and one connection replaces the other while the states are
    being exchanged or decided: the nodes still agree (same generation, same epoch)."""
    wire = Wire()
    a = await _node(tmp_path, "a", wire)
    b = await _node(tmp_path, "b", wire)
    try:
        wire.up = True
        a.link_up("b")
        b.link_up("a")
        for _ in range(turns):
            await asyncio.sleep(0)
        wire.gen += 1
        wire.readers.clear()
        for m, peer in ((a, "b"), (b, "a")):
            m.peer_lost(peer)
        for m, peer in ((a, "b"), (b, "a")):
            m.link_up(peer)
        await _until(lambda: a.role is Role.IN_SYNC and b.role is Role.IN_SYNC)
        assert a.gens.current == b.gens.current and a.epoch == b.epoch
        await a.lun.execute_block(_write(0, 8, 1))
        await b.lun.execute_block(_write(4, 8, 2))
        assert _digest(a) == _digest(b)
    finally:
        await _close(a)
        await _close(b)


async def test_preempt_and_abort_at_one_node_aborts_at_the_other(pair: Any) -> None:
    from vsand.lun import run_scsi
    from vsand.protocol.scsi.target import ScsiTarget
    from vsand.protocol.scsi.types import ScsiCommand, Status
    a, b, _ = pair
    dev_a, dev_b = ScsiTarget({0: a.lun.unit}), ScsiTarget({0: b.lun.unit})
    # The form vsand.session gives a nexus: initiator, ISID, target, portal group.
    na = "iqn.x:host-a,i,0x000000000001,iqn.x:t,t,0x0001"
    nb = "iqn.x:host-b,i,0x000000000002,iqn.x:t,t,0x0002"
    dev_a.attach(na)
    dev_b.attach(nb)
    aborted: list[set[str]] = []
    b.on_preempt_abort = aborted.append
    ka, kb = (0xA1).to_bytes(8, "big"), (0xB2).to_bytes(8, "big")

    async def run(dev: ScsiTarget, lun: Lun, nexus: str, cdb: bytes, data: bytes) -> Any:
        return await run_scsi(dev, ScsiCommand(cdb, 0, nexus, data, len(data)), {0: lun})

    assert (await run(dev_a, a.lun, na, _pr_out(0), bytes(8) + ka + bytes(8))).status == 0
    assert (await run(dev_b, b.lun, nb, _pr_out(0), bytes(8) + kb + bytes(8))).status == 0
    assert (await run(dev_b, b.lun, nb, _pr_out(1, 1), kb + bytes(16))).status == 0
    # host-a preempts host-b's reservation and aborts its commands, through node a.
    r = await run(dev_a, a.lun, na, _pr_out(5, 1), ka + kb + bytes(8))
    assert r.status == Status.GOOD, r
    assert aborted == [{nb}]
    assert a.lun.unit.pr.to_bytes() == b.lun.unit.pr.to_bytes()


@pytest.mark.parametrize("failing", ["replica", "origin"])
async def test_a_write_that_fails_on_one_node_takes_it_out_of_sync(pair: Any,
                                                                    failing: str) -> None:
    """One node's backend refuses a replicated write (the write goes through a): that node
    leaves the in-sync set (here: drops the link) and steps aside in the vote, the region is
    tracked, and the resync that follows makes the replicas equal again."""
    a, b, wire = pair
    bad = b if failing == "replica" else a
    dropped: list[str] = []
    stepped_aside: list[str] = []
    for m in (a, b):
        m.drop_link = lambda peer, why, m=m: dropped.append(m.node)
        m.on_storage_failure = lambda m=m: stepped_aside.append(m.node)
    real = bad.lun.backend

    class Refusing:  # this node's disk refuses writes at one offset
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def try_write(self, offset: int, data: Any) -> bool:
            if offset == 4096 * BS:
                raise OSError(errno.ENOSPC, "no space left")
            return bool(real.try_write(offset, data))

        async def write(self, offset: int, data: Any, fua: bool = False) -> None:
            if offset == 4096 * BS:
                raise OSError(errno.ENOSPC, "no space left")
            await real.write(offset, data, fua)

    bad.lun.backend = Refusing()  # type: ignore[assignment]
    write = asyncio.ensure_future(a.lun.execute_block(_write(4096, 8, 7)))
    await _until(lambda: stepped_aside == [bad.node])
    # A failing replica drops the link, and its origin too on the error; a failing origin
    # drops it itself.
    assert set(dropped) == ({"a", "b"} if failing == "replica" else {"a"})
    bad.lun.backend = real
    wire.cut()  # what the dropped link does
    await _until(lambda: a.role is Role.DEGRADED and b.role is Role.DEGRADED)
    if failing == "origin":
        with pytest.raises(OSError):
            await write
    else:  # a has it and goes on without b: the write completes as with a lost peer
        await write
        assert _read(a, 4096) == bytes([7]) * BS
    assert bad.bitmaps["b" if bad is a else "a"].is_dirty(4096 * BS, 8 * BS)
    if failing == "origin":  # the replica applied it: the replicas differ until the resync
        assert _read(a, 4096) != _read(b, 4096)
    wire.connect()
    await _until(lambda: a.role is Role.IN_SYNC and b.role is Role.IN_SYNC)
    assert _digest(a) == _digest(b)


def _read(m: MirroredLun, lba: int) -> bytes:
    with open(m.lun.backend.path, "rb") as f:
        f.seek(lba * BS)
        return f.read(BS)


async def test_a_join_whose_link_went_away_meanwhile_does_not_count(pair: Any) -> None:
    """The JOIN reaches the target, the link dies while the target is flushing for it, and
    the source (already in the new epoch) completes a write alone meanwhile: the target must
    not become in sync on that JOIN, or that write would never reach it."""
    a, b, wire = pair
    wire.cut()
    await _until(lambda: a.role is Role.DEGRADED and b.role is Role.DEGRADED)
    await b.lun.execute_block(_write(300, 8, 5))  # b is ahead: b will be the source
    real = a.lun.backend
    joining = asyncio.Event()
    release = asyncio.Event()

    class SlowFlush:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        async def flush(self) -> None:
            joining.set()
            await release.wait()
            await real.flush()

    a.lun.backend = SlowFlush()  # type: ignore[assignment]
    wire.connect()
    await asyncio.wait_for(joining.wait(), 10)
    assert a.role is Role.SYNC_TARGET and b.role is Role.IN_SYNC
    late = asyncio.ensure_future(b.lun.execute_block(_write(400, 8, 6)))
    await asyncio.sleep(0.05)  # its frame reaches a, which is not in sync yet: dropped
    wire.cut()
    await late  # b completes it alone (no quorum configured here)
    release.set()
    await _until(lambda: b.role is Role.DEGRADED)
    await asyncio.sleep(0.05)
    assert a.role is not Role.IN_SYNC
    a.lun.backend = real
    wire.connect()
    await _until(lambda: a.role is Role.IN_SYNC and b.role is Role.IN_SYNC)
    assert _read(a, 400) == bytes([6]) * BS
    assert _digest(a) == _digest(b)


async def test_a_join_adopted_but_unanswered_leaves_the_source_a_new_generation(pair: Any) -> None:
    """The target adopts the source's identifiers for a JOIN and the link dies before its
    answer arrives: the source cannot tell whether it joined, so its next write alone must
    carry a new generation, and the next exchange must copy that write."""
    a, b, wire = pair
    wire.cut()
    await _until(lambda: a.role is Role.DEGRADED and b.role is Role.DEGRADED)
    await b.lun.execute_block(_write(300, 8, 5))  # b is ahead: b will be the source
    real_flush = a._flush_bitmaps
    adopted = asyncio.Event()

    async def flush_then_lose_the_link() -> None:
        await real_flush()
        if a.role is Role.SYNC_TARGET and not adopted.is_set():
            adopted.set()
            wire.cut()  # after a persisted what it adopted, before its answer leaves

    a._flush_bitmaps = flush_then_lose_the_link  # type: ignore[method-assign]
    wire.connect()
    await asyncio.wait_for(adopted.wait(), 10)
    assert a.gens.current and not a.gens.inconsistent and a.role is not Role.IN_SYNC
    await _until(lambda: b.role is Role.DEGRADED)
    assert b.gens.current != a.gens.current
    await b.lun.execute_block(_write(400, 8, 6))  # alone, under the new generation
    a._flush_bitmaps = real_flush  # type: ignore[method-assign]
    wire.connect()
    await _until(lambda: a.role is Role.IN_SYNC and b.role is Role.IN_SYNC)
    assert _read(a, 400) == bytes([6]) * BS
    assert _digest(a) == _digest(b)
