"""ViewKeeper: three keepers over an in-process network decide views, persist before they
speak, fence a cut-off node and take a returning one back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from vsand.config_cluster import ClusterConfig, ClusterNode
from vsand.mirror.membership import View, VoteRecord
from vsand.mirror.messages import Control, ControlKind, Message
from vsand.mirror.metastore import MemoryMetaStore
from vsand.views import RECORD, ViewKeeper

NODES = ("a", "b", "c")
PEER_TIMEOUT = 0.5


def _config() -> ClusterConfig:
    return ClusterConfig(
        cluster_id="c", secret=b"s" * 32, secret_file="", listen_host="127.0.0.1",
        listen_port=1, nodes=tuple(ClusterNode(n, "127.0.0.1", i + 1)
                                   for i, n in enumerate(NODES)),
        heartbeat_interval=0.05, peer_timeout=PEER_TIMEOUT)


class RecordingStore(MemoryMetaStore):
    """Notes each write in the cluster's shared log, to check it came before the sends."""

    def __init__(self, name: str, log: list[tuple[str, str, int]]) -> None:
        super().__init__()
        self.name, self.log = name, log

    def write(self, name: str, data: bytes) -> None:
        super().write(name, data)
        self.log.append((self.name, "persist", VoteRecord.from_bytes(data).promised))


class Net:
    def __init__(self) -> None:
        self.cut: set[tuple[str, str]] = set()
        self.log: list[tuple[str, str, int]] = []
        self.serving: dict[str, list[bool]] = {n: [] for n in NODES}
        self.stores = {n: RecordingStore(n, self.log) for n in NODES}
        self.keepers = {n: self.keeper(n) for n in NODES}
        self.linked = {(a, b) for a in NODES for b in NODES if a != b}
        self.tasks: list[asyncio.Task[None]] = []

    def keeper(self, n: str) -> ViewKeeper:
        async def run_blocking(fn: Any, *args: Any) -> Any:
            return fn(*args)
        return ViewKeeper(_config(), n, self.stores[n], lambda to, msg: self.send(n, to, msg),
                          run_blocking, lambda ok: self.serving[n].append(ok))

    def send(self, src: str, dst: str, msg: Message) -> bool:
        assert type(msg) is Control and msg.kind is ControlKind.VIEW and msg.lun == 0
        self.log.append((src, "send", msg.epoch))
        if (src, dst) not in self.cut:
            asyncio.get_running_loop().call_later(0.002, self.deliver, src, dst, msg)
        return True

    def deliver(self, src: str, dst: str, msg: Control) -> None:
        if (src, dst) not in self.cut:
            self.keepers[dst].receive(src, msg)

    async def heartbeats(self, n: str) -> None:
        """What the peer links do: heartbeat every peer, answer with a grant, notice loss."""
        heard = {p: time.monotonic() for p in NODES if p != n}
        while True:
            me = self.keepers[n]
            for p in heard:
                if (p, n) not in self.cut:
                    heard[p] = time.monotonic()
                    epoch = self.keepers[p].answer_heartbeat(n, me.heartbeat_epoch())
                    if (n, p) not in self.cut:
                        me.heartbeat_answered(p, epoch, time.monotonic_ns())
                up = time.monotonic() - heard[p] < PEER_TIMEOUT
                if up and (n, p) not in self.linked:
                    self.linked.add((n, p))
                    me.link_up(p)
                elif not up and (n, p) in self.linked:
                    self.linked.discard((n, p))
                    me.link_lost(p)
            me.set_in_sync({p for p in heard if (n, p) in self.linked})
            await asyncio.sleep(0.05)

    async def watch(self) -> None:
        """Never two views served at once: every 5 ms, the epochs of the serving nodes."""
        while True:
            epochs = {k.m.view.epoch for k in self.keepers.values()
                      if k.serving() and k.m.view is not None}
            assert len(epochs) <= 1, f"epochs {epochs} served at once"
            await asyncio.sleep(0.005)

    def start(self) -> None:
        self.tasks.append(asyncio.ensure_future(self.watch()))
        for n in NODES:
            k = self.keepers[n]
            for p in NODES:
                if p != n:
                    k.link_up(p)
            k.set_in_sync(set(NODES) - {n})
            k.start()
            self.tasks.append(asyncio.ensure_future(self.heartbeats(n)))

    async def stop(self) -> None:
        watch = self.tasks[0]
        assert not watch.done(), watch.exception()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for k in self.keepers.values():
            await k.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Net]:
        """Started, with the first view decided and served by all three; stopped after."""
        self.start()
        try:
            await self.until("first view",
                             lambda: all(k.serving() for k in self.keepers.values()))
            yield self
        finally:
            await self.stop()

    async def until(self, what: str, cond: Any, timeout: float = 6.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"no {what}: " + str(
                {n: k.status() for n, k in self.keepers.items()})
            await asyncio.sleep(0.02)


async def test_three_keepers_decide_serve_fence_and_rejoin() -> None:
    async with Net().running() as net:
        first = net.keepers["a"].status()
        assert first["members"] == list(NODES) and first["serving"]
        # Every node persisted its promise before anything it sent in that epoch.
        for n in NODES:
            events = [(what, e) for who, what, e in net.log if who == n and e == first["epoch"]]
            if ("send", first["epoch"]) in events:
                assert events.index(("persist", first["epoch"])) < events.index(
                    ("send", first["epoch"]))

        # c is cut off both ways: a and b decide a view without it; c stops serving.
        net.cut |= {(x, "c") for x in "ab"} | {("c", x) for x in "ab"}
        await net.until("view without c", lambda: net.keepers["a"].serving()
                        and net.keepers["a"].status()["members"] == ["a", "b"])
        assert not net.keepers["c"].serving()
        assert net.serving["c"][-1] is False

        # c comes back (the data layer reports it in sync): it is taken back in.
        net.cut.clear()
        await net.until("c back", lambda: all(k.serving() for k in net.keepers.values())
                        and net.keepers["c"].status()["members"] == list(NODES))
        assert VoteRecord.from_bytes(net.stores["c"].read(RECORD) or b"").accepted.members \
            == frozenset(NODES)


async def test_a_cut_between_two_nodes_leaves_the_one_both_others_reach() -> None:
    async with Net().running() as net:
        # b and c lose each other; a reaches both.  No view may hold both b and c (a write
        # must reach every member), so a drops the higher name, c, after c's lease from a
        # ran out (the watch checks that no two views serve at once meanwhile).
        net.cut |= {("b", "c"), ("c", "b")}
        await net.until("view without c", lambda: net.keepers["a"].serving()
                        and net.keepers["a"].status()["members"] == ["a", "b"])
        await asyncio.sleep(3 * PEER_TIMEOUT)  # and it stays so: no round after round
        assert net.keepers["a"].status()["members"] == ["a", "b"]
        epoch = net.keepers["a"].status()["epoch"]
        await asyncio.sleep(3 * PEER_TIMEOUT)
        assert net.keepers["a"].status()["epoch"] == epoch
        assert not net.keepers["c"].serving()


async def test_a_node_restarts_from_its_record_and_the_cluster_goes_on() -> None:
    async with Net().running() as net:
        epoch = net.keepers["a"].status()["epoch"]
        await net.keepers["b"].close()
        net.keepers["b"] = net.keeper("b")  # same store: the record survives
        assert net.keepers["b"].m.record.accepted.epoch == epoch
        for p in ("a", "c"):
            net.keepers["b"].link_up(p)
        net.keepers["b"].start()
        await net.until("b back", lambda: all(k.serving() for k in net.keepers.values()))
        assert net.keepers["b"].status()["epoch"] > epoch  # a restart needs a new round


def test_a_damaged_or_foreign_record_is_refused_with_its_name() -> None:
    store = MemoryMetaStore()
    store.write(RECORD, b"garbage")
    with pytest.raises(ValueError, match=f"membership record {RECORD} is damaged"):
        ViewKeeper(_config(), "a", store, lambda *_: True, None, lambda ok: None)
    store.write(RECORD, VoteRecord(3, "z", View(3, frozenset("az"))).to_bytes())
    with pytest.raises(ValueError, match="no longer configured: z"):
        ViewKeeper(_config(), "a", store, lambda *_: True, None, lambda ok: None)
