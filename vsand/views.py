"""The in-sync view of a cluster of three or more nodes: the asyncio driver of
``mirror.membership``.

The rules and the timing argument are ``mirror/membership.py``'s.  Here: the vote record lives
in the node's metadata store and is written (and fsynced, by the store) before any message
that follows from it leaves, so one actor task does both in order; membership messages travel
as CONTROL VIEW frames (LUN 0) on the peer links; a heartbeat from a member is answered with
this node's grant for the epoch it named (the answer's epoch: that epoch, or 0 for none), and
an answer renews the lease of the node that sent the heartbeat; a loop ticks the membership a
few times per heartbeat interval and tells the LUNs when serving starts or stops and when a
new view is decided.

The LUNs (``vsand/viewlun.py``) hear of three things: a promise of a newer epoch (they stop
the old one's writes at once, before the promise leaves), a decided view, and whether this node
may serve.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .config_cluster import ClusterConfig
from .mirror import membership as mb
from .mirror.messages import Control, ControlKind, Message
from .mirror.metastore import MetaStore

log = logging.getLogger("vsand.views")

RECORD = "membership.record"


class ViewKeeper:
    def __init__(self, config: ClusterConfig, node: str, store: MetaStore,
                 send: Callable[[str, Message], bool], run_blocking: Callable[..., Any],
                 on_change: Callable[[bool], None],
                 on_view: Callable[[mb.View], None] | None = None,
                 on_promise: Callable[[int], None] | None = None) -> None:
        self.config = config
        self.node = node
        self.voters = [n.name for n in config.nodes]
        self.store = store
        self.send = send
        self.run_blocking = run_blocking
        self.on_change = on_change
        self.on_view = on_view
        self.on_promise = on_promise
        raw = store.read(RECORD)
        try:
            record = (mb.VoteRecord.from_bytes(raw) if raw is not None
                      else mb.VoteRecord.initial(self.voters))
        except mb.MembershipError as e:
            raise ValueError(f"membership record {RECORD} is damaged: {e}") from None
        unknown = (record.accepted.members | ({record.coordinator} - {""})) - set(self.voters)
        if unknown:
            raise ValueError(f"membership record {RECORD} names nodes no longer configured: "
                             f"{', '.join(sorted(unknown))}")
        self.m = mb.Membership(node, self.voters, record, peer_timeout=config.peer_timeout,
                               now=time.monotonic())
        self.serving_now = False
        self._view: mb.View | None = None
        self._promised = record.promised
        self._outbox: deque[mb.Action] = deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._logged = ""

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._watch()), asyncio.ensure_future(self._pump())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ events from links
    def link_up(self, peer: str) -> None:
        self.m.link_up(peer)

    def link_lost(self, peer: str) -> None:
        self.m.link_down(peer)

    def set_in_sync(self, peers: set[str]) -> None:
        """The peers every mirrored LUN is in sync with (the data layer's promise)."""
        self.m.set_in_sync(peers)

    def heartbeat_epoch(self) -> int:
        return self.m.heartbeat_epoch()

    def request_round(self, reason: str) -> None:
        self.m.request_round(reason)
        self._wake.set()

    def answer_heartbeat(self, peer: str, epoch: int) -> int:
        """The epoch to put in the answer to ``peer``'s heartbeat: granted, or 0."""
        now = time.monotonic()
        self._queue(self.m.peer_epoch(peer, epoch, now))
        return epoch if self.m.grant(peer, epoch, now) else 0

    def heartbeat_answered(self, peer: str, epoch: int, sent_ns: int) -> None:
        if epoch:
            self.m.granted(peer, epoch, sent_ns / 1e9)

    def receive(self, peer: str, msg: Control) -> None:
        """A CONTROL VIEW frame.  A malformed one is logged and dropped: the round it belonged
        to times out like one whose message was lost."""
        try:
            decoded = mb.decode(msg.body, self.voters)
            actions = self.m.receive(peer, decoded, time.monotonic())
        except mb.MembershipError as e:
            log.warning("node %s sent a bad membership message: %s", peer, e)
            return
        self._queue(actions)
        self._evaluate()

    def serving(self) -> bool:
        return self.m.serving(time.monotonic())

    def check(self) -> None:
        """Called before commands are executed: leases that ran out while this node could not
        notice (a stopped process, a starved event loop) fence the LUNs now, before the
        commands that waited in the sockets meanwhile are answered."""
        if self.serving_now and not self.serving():
            self._evaluate()

    # ------------------------------------------------------------------ the actor
    def _queue(self, actions: list[mb.Action]) -> None:
        if actions:
            self._outbox.extend(actions)
            self._wake.set()

    async def _pump(self) -> None:
        """Persist, then send, in the order the membership asked: a promise or acceptance
        reaches nobody before it is on stable storage."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                action = self._outbox.popleft()
                if isinstance(action, mb.Persist):
                    await self.run_blocking(self.store.write, RECORD, action.record.to_bytes())
                else:
                    body = mb.encode(action.msg, self.voters)
                    self.send(action.to, Control(0, ControlKind.VIEW, 0, action.msg.epoch,
                                                 0, body))

    async def _watch(self) -> None:
        step = self.config.heartbeat_interval / 4
        while True:
            self._queue(self.m.tick(time.monotonic()))
            self._evaluate()
            await asyncio.sleep(step)

    def _evaluate(self) -> None:
        # A promise stops the old epoch's writes here before it is sent (the pump sends it
        # after this returns): none of them may be acknowledged once a round began.
        promised = self.m.record.promised
        if promised > self._promised:
            self._promised = promised
            view = self.m.view
            if self.on_promise is not None and (view is None or promised > view.epoch):
                self.on_promise(promised)
        change = self.m.last_change
        if change != self._logged:
            self._logged = change
            log.info("membership: %s", change)
        view = self.m.view
        if view is not None and view != self._view:
            self._view = view
            if self.on_view is not None:
                self.on_view(view)
        ok = self.serving()
        if ok != self.serving_now:
            self.serving_now = ok
            if ok:
                log.info("quorum held: serving in epoch %d", self.m.heartbeat_epoch())
            else:
                log.warning("quorum lost: serving nothing until a majority decides a view "
                            "with this node")
            self.on_change(ok)

    def status(self) -> dict[str, Any]:
        view = self.m.view
        return {"enabled": False, "serving": self.serving_now,  # enabled: by a witness
                "epoch": view.epoch if view else 0,
                "serve_in_s": round(max(0.0, self.m.serve_at - time.monotonic()), 2)
                if view is not None and self.m.serve_at != float("inf") else None,
                "leases": sorted(v for v, lease in self.m.leases.items()
                                 if lease.valid(time.monotonic())),
                "members": sorted(view.members) if view else [],
                "promised": self.m.record.promised, "last_change": self.m.last_change}
