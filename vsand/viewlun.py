"""A mirrored LUN in a cluster of three or more nodes: the replication follows the views that
``mirror.membership`` decides by majority.

Theory of operation
-------------------
The view (an epoch and its members) says who is in sync; its lowest member is the LUN's
*source*: the sequencer of its writes, the node that brings the others level when an epoch
starts, and the resync source of every node outside the view.  Within a view the LUN runs in
*data epochs*, each with one ordering engine whose replicas are the view's members plus the
source's *followers* (nodes caught up and fed every write while a round adds them to the view).

Starting a data epoch (``_reconcile``, run by the source; CONTROL RECONCILE steps):

1. The source stops its old epoch and sends ASK (with the view's epoch) to every replica-to-be.
   Each stops its old epoch too, waits for the writes it is applying, and answers REPORT with
   its bitmap for the source: where it may hold data the source lacks.
2. The source copies its version of every region that any member reported, or that it holds
   for any member, over every member; a follower gets also what the source holds for it.
3. Everyone is level: the source starts the new engine and sends READY (the new data epoch and
   its replicas); each clears its bitmaps for the replicas and starts its engine.  Writes that
   were in flight at the stop run again in the new epoch (COMPARE AND WRITE and reservation
   changes fail with a retryable NOT READY instead: they must not run twice).

What makes a bitmap complete: every change of a node's data that a peer does not get in the same
order is marked in that node's bitmap for the peer (``bm[n][p]``):

- writes applied while ``p`` is not a replica (``_applied``);
- copies received from a source, for every peer but the source (``_store_copy``);
- writes applied in an epoch that ended before every replica was known to have applied them:
  replicas tell each other every ``STABLE_INTERVAL`` up to which sequence number they applied
  everything (CONTROL STABLE); what is not yet known applied everywhere is marked for every
  peer when the epoch stops, or when its activity-log region is about to be evicted;
- after a crash, the activity log's regions, for every peer (as with two nodes).

So between the source and a member, ``bm[source][member] | bm[member][source]`` covers every
region where they may differ, and copying the source's version of all of them leaves every
member identical to the source.

Stopping an epoch: when this node promises a newer view epoch (before the promise is sent:
nothing is acknowledged in a view once a round began to replace it), when a view is decided,
or when the link to a replica is lost.  Losing a member changes the view (the membership's
business); losing a follower needs a round too, since a proposal may already name it: the
source takes it out of what it reports in sync, asks for one and starts no epoch before a
view is decided (a view that names the follower finds it holding every acknowledged write).
A member that lost a replica tells the source (LOST): the source's own link may be fine, and
this one may come back before anything else changes.

Resync of a node outside the view: the source sends SYNC, the node stops and answers REPORT
(its bitmap for the source), and the source copies ``bm[source][node] | report`` while serving,
as with two nodes.  When little is left it starts a data epoch with the node as a follower
(the final pass is step 2) and reports it in sync; the membership then adds it to the view.

The membership's rules make the source hold every acknowledged write: it is a member of a
decided view, and a member or follower receives every write before it is acknowledged.

A new cluster: every node starts as a member of epoch 0's view, but only nodes whose backing
stores were never written hold the same data.  A node that has taken part in an epoch says so
in its REPORTs (HISTORY), one that has not says whether its store is blank (BLANK).  The first
epoch copies the source's whole LUN over every member without history that holds data, or is
blank while the source is not; if a member without history holds data the source (or another
member without history) lacks, nothing says whose data is right: no epoch starts, and the log
names the nodes, until an operator empties the stores that must not win.  A cluster that began
on blank stores remembers it (BLANK_ORIGIN): every write since is in some bitmap, so a blank
node joining later gets those regions only; any other node without history gets the whole LUN.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .backends.base import release_buffer
from .mirror import messages as wire
from .mirror.activity_log import DEFAULT_REGION_SIZE as AL_REGION_SIZE
from .mirror.bitmap import DirtyBitmap
from .mirror.membership import View
from .mirror.ordering import Apply, OrderingEngine
from .mirror.resync import ResyncPlan
from .protocol.block import BlockOp, BlockRequest
from .replication import FINAL_PASS_BYTES, MirroredLun, Role, _Local, _SERVING

log = logging.getLogger("vsand.mirror")

STABLE_INTERVAL = 0.05  # how often replicas tell each other how far they applied
RETRY_S = 0.5  # between attempts to start an epoch, while the view stands
ASK, REPORT, READY, LOST, SYNC = 1, 2, 3, 4, 5  # CONTROL RECONCILE steps (``value``)
# A REPORT's flags (``value >> 8``): the node took part in an epoch before (its data is the
# cluster's), or it never did and its backing store was never written (zeroes); the cluster
# began on blank stores (then its bitmaps hold every write since: a blank node needs only
# those).  READY carries the last one too.
HISTORY, BLANK, BLANK_ORIGIN = 0x1, 0x2, 0x4
_VIEW_EPOCH = struct.Struct("!Q")
_NOT_TWICE = frozenset((BlockOp.COMPARE_AND_WRITE, BlockOp.STATE))


def _replicas_body(view_epoch: int, replicas: frozenset[str]) -> bytes:
    return _VIEW_EPOCH.pack(view_epoch) + "\0".join(sorted(replicas)).encode()


class ViewedLun(MirroredLun):
    """One mirrored LUN's replica on a node of a three-node cluster; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.view: View | None = None
        self.promised = 0  # the newest view epoch this node promised
        self.ready = False  # this node's part of the running data epoch is set up
        self.replicas: frozenset[str] = frozenset()
        self.followers: frozenset[str] = frozenset()
        self.source = ""
        self._copies_from = ""  # the node whose RESYNC_DATA this node stores now
        # Per peer asked: (exchange id, its REPORT: data epoch, flags, bitmap; None if lost).
        self._reports: dict[str, tuple[int, asyncio.Future[tuple[int, int, bytes] | None]]] = {}
        self._deferred: dict[str, wire.Control] = {}  # ASK/SYNC of a view not yet known here
        self._resync_task: asyncio.Task[None] | None = None
        self._next_resync = 0.0
        self._reconciling = False
        # A follower was lost: no epoch without it before a view is decided (one proposed
        # already may name it, and it must then hold every acknowledged write).
        self._await_view = False
        self._last_try = 0.0  # when this node last tried to start an epoch
        self._refused = False  # the first epoch's data conflict was logged
        self.blank_origin = False  # the cluster began on blank stores (BLANK_ORIGIN)
        # Writes applied in this epoch, not yet known applied by every replica.
        self._recent: deque[tuple[int, int, int]] = deque()  # (seq, offset, length)
        self._prefix = -1  # every sequence number up to this one is applied here
        self._above: set[int] = set()
        self._peer_prefix: dict[str, int] = {}
        self._told = -1
        self._loop_task: asyncio.Task[None] | None = None
        # Set by the cluster: the peers this LUN counts in sync changed; ask for a round.
        self.on_followers: Callable[[], None] | None = None
        self.request_round: Callable[[str], None] | None = None

    async def attach(self) -> None:
        await super().attach()
        self.blank_origin = self.store.read(self.name + ".origin") == b"blank\n"
        self._loop_task = asyncio.ensure_future(self._tend())

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._stop("shutting down")
        await super().close()

    def go_alone(self) -> None:
        """Only a view lets a node of three serve."""

    # ------------------------------------------------------------------ the membership
    def view_decided(self, view: View) -> None:
        self.view = view
        self._await_view = False
        self._last_try = 0.0  # the new view's source starts its epoch at once
        self._stop(f"view of epoch {view.epoch} decided")
        if self.node not in view.members:
            self._set_role(Role.CONNECTING, f"not in the view of epoch {view.epoch}")
        deferred, self._deferred = self._deferred, {}
        for peer, msg in deferred.items():
            self._control(peer, msg)

    def promise(self, epoch: int) -> None:
        """This node promised view epoch ``epoch``: no write of an older one is applied or
        acknowledged here any more."""
        self.promised = max(self.promised, epoch)
        self._stop(f"a round for epoch {epoch} began")

    # ------------------------------------------------------------------ the I/O path
    def _serving(self) -> bool:
        return self.ready and self.quorum_ok and self.role in _SERVING

    async def _until_serving(self, timeout: float) -> None:
        """While an epoch change that keeps this node is under way (it lasts a round and
        the wait for old leases), requests wait rather than fail."""
        end = time.monotonic() + timeout
        while not self._serving() and time.monotonic() < end:
            await asyncio.sleep(0.01)

    async def submit(self, req: BlockRequest) -> Any:
        view = self.view
        if not self._serving() and view is not None and self.node in view.members:
            await self._until_serving(self.join_timeout)
        return await super().submit(req)

    async def _ordered(self, engine: OrderingEngine, req: BlockRequest) -> Any:
        deadline = time.monotonic() + 2 * self.join_timeout
        while True:
            local = await self._order_once(engine, req)
            if not local.retry:
                if local.error is not None:
                    raise local.error
                return local.result
            if req.op in _NOT_TWICE:
                raise OSError(errno.ENOLINK, f"{self.label}: the epoch changed while this "
                                             "request was in flight; run it again")
            await self._until_serving(deadline - time.monotonic())
            if self.engine is None or not self._serving():
                raise OSError(errno.ENOLINK, f"{self.label} is {self.role.value} on this node")
            engine = self.engine

    async def _apply_alone(self, req: BlockRequest) -> Any:
        raise OSError(errno.ENOLINK, f"{self.label}: no epoch running on this node")

    def _live(self, engine: OrderingEngine) -> bool:
        return engine is self.engine

    def _applied(self, engine: OrderingEngine, action: Apply) -> list[Any]:
        data = action.data
        req = data.req if type(data) is _Local else data
        off, length = self._bytes(req)
        if engine is not self.engine:
            # Applied after its epoch stopped: any peer may lack it.
            if length:
                for bm in self.bitmaps.values():
                    bm.mark(off, length)
            return []
        if length:
            for peer, bm in self.bitmaps.items():
                if peer not in self.replicas:
                    bm.mark(off, length)
                    if self.plan is not None and self.plan_peer == peer:
                        self.plan.redirty(off, length)
            if len(self.replicas) > 1:
                self._recent.append((action.seq, off, length))
        seq = action.seq
        if seq == self._prefix + 1:
            self._prefix = seq
            while self._prefix + 1 in self._above:
                self._prefix += 1
                self._above.discard(self._prefix)
        else:
            self._above.add(seq)
        return engine.applied(seq)

    def _accepts(self, peer: str, msg: wire.Message) -> bool:
        return self.ready and msg.epoch == self.epoch and peer in self.replicas

    def _before_evict(self, regions: frozenset[int]) -> None:
        for _, off, length in self._recent:
            first, last = off // AL_REGION_SIZE, (off + length - 1) // AL_REGION_SIZE
            if any(r in regions for r in range(first, last + 1)):
                for bm in self.bitmaps.values():
                    bm.mark(off, length)

    # ------------------------------------------------------------------ epochs
    def _stop(self, why: str) -> None:
        if self.plan is not None:
            self.plan.cancel()
            self.plan = None
        if self.engine is None and not self.ready:
            return
        self.engine = None
        self.ready = False
        for local in self._locals.values():
            local.retry = True
            if not local.done.done():
                local.done.set_result(None)
        self._locals.clear()
        self._mark_unsettled()
        self._set_role(Role.CONNECTING, f"epoch {self.epoch} stopped: {why}")

    def _mark_unsettled(self) -> None:
        for _, off, length in self._recent:
            for bm in self.bitmaps.values():
                bm.mark(off, length)
        self._recent.clear()

    async def _settle(self) -> bool:
        """Wait for the stopped epoch's writes being applied here (each marks itself)."""
        deadline = time.monotonic() + self.join_timeout
        while self._applying and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        return not self._applying

    def _start(self, view: View, epoch: int, replicas: frozenset[str]) -> None:
        self.epoch = epoch
        self.replicas = replicas
        self.followers = replicas - view.members
        self.source = min(view.members)
        self.engine = OrderingEngine(self.node, set(replicas), self.source)
        self._recent.clear()
        self._prefix, self._above, self._peer_prefix, self._told = -1, set(), {}, -1
        self._copies_from = ""
        self.ready = True
        if self.node in view.members:
            full = len(view.members) == len(self.nodes)
            self._set_role(Role.IN_SYNC if full else Role.DEGRADED,
                           f"epoch {epoch} of view {view.epoch}: replicas "
                           f"{', '.join(sorted(replicas))}")
        else:
            self._set_role(Role.SYNC_TARGET, f"following node {self.source} in epoch {epoch} "
                                             f"until the view takes this node in")

    def _is_source(self) -> bool:
        view = self.view
        return (view is not None and min(view.members) == self.node
                and self.promised <= view.epoch)

    async def _tend(self) -> None:
        """Start an epoch whenever this node is the source and none runs; tell the replicas
        how far this node applied."""
        while True:
            await asyncio.sleep(STABLE_INTERVAL)
            try:
                if self.ready and len(self.replicas) > 1:
                    self._tell_stable()
                now = time.monotonic()
                if (self._is_source() and not self.ready and not self._reconciling
                        and not self._await_view and now - self._last_try >= RETRY_S):
                    self._last_try = now
                    assert self.view is not None
                    self._spawn(self._reconcile(self.view, self.followers))
                elif (self._is_source() and self.ready and now >= self._next_resync
                      and (self._resync_task is None or self._resync_task.done())):
                    self._maybe_resync(now)
            except Exception:
                log.exception("%s: internal error", self.label)

    def _tell_stable(self) -> None:
        if self._prefix != self._told:
            self._told = self._prefix
            for peer in self.replicas - {self.node}:
                self.send(peer, wire.Control(self.lun_id, wire.ControlKind.STABLE, 0,
                                             self.epoch, self._prefix + 1))
        stable = min([self._prefix] + [self._peer_prefix.get(p, -1)
                                       for p in self.replicas if p != self.node])
        recent = self._recent
        while recent and recent[0][0] <= stable:
            recent.popleft()

    # ------------------------------------------------------------------ the source's side
    async def _reconcile(self, view: View, followers: frozenset[str]) -> None:
        if self._reconciling:
            return
        self._reconciling = True
        try:
            async with self._transition:
                ok = await self._reconcile_once(view, followers)
            if not ok:
                log.info("%s: epoch of view %d not started yet; trying again", self.label,
                         view.epoch)
        finally:
            self._reconciling = False

    def _current(self, view: View) -> bool:
        return self.view == view and self.promised <= view.epoch and not self._closed

    async def _reconcile_once(self, view: View, followers: frozenset[str]) -> bool:
        if not self._current(view):
            return True
        if self._await_view:
            return False
        followers = frozenset(f for f in followers if f in self._linked)
        replicas = view.members | followers
        others = sorted(replicas - {self.node})
        self._stop(f"starting an epoch of view {view.epoch}")
        if not await self._settle() or not all(p in self._linked for p in others):
            return False
        reports = await self._gather_reports(others, ASK, view.epoch)
        if reports is None or not self._current(view):
            return False
        epoch = max([self.epoch] + [e for e, _, _ in reports.values()]) + 1
        whole = self._new_members(view, {p: flags for p, (_, flags, _) in reports.items()})
        if whole is None:
            return False
        size = self.lun.backend.size
        level = DirtyBitmap(size)
        for peer in view.members - {self.node}:
            level.merge(self.bitmaps[peer])
            level.merge(self._decode(peer, reports[peer][2]))
        copies = {p: level for p in view.members - {self.node}}
        for f in followers:
            extra = DirtyBitmap(size)
            extra.merge(level)
            extra.merge(self.bitmaps[f])
            extra.merge(self._decode(f, reports[f][2]))
            copies[f] = extra
        for p in whole:
            copies[p] = DirtyBitmap(size)
            copies[p].mark_all()
        if not await self._copy_regions(copies, view):
            return False
        for peer in others:
            self.bitmaps[peer].clear_all()
        await self._flush_bitmaps()
        blank_origin = self.blank_origin if self.gens.current else bool(self.fresh)
        await self._keep_history(blank_origin)
        if not self._current(view) or not all(p in self._linked for p in others):
            return False
        self._start(view, epoch, replicas)
        body = _replicas_body(view.epoch, replicas)
        ready = READY | (BLANK_ORIGIN << 8 if blank_origin else 0)
        for peer in others:
            self.send(peer, wire.Control(self.lun_id, wire.ControlKind.RECONCILE, 0, epoch,
                                         ready, body))
        if followers and self.on_followers is not None:
            self.on_followers()
        return True

    def _origin_flags(self) -> int:
        if self.gens.current:
            return HISTORY | (BLANK_ORIGIN if self.blank_origin else 0)
        return BLANK if self.fresh else 0

    async def _keep_history(self, blank_origin: bool) -> None:
        """From its first epoch on, this node's data is the cluster's (``HISTORY``)."""
        if not self.gens.current:
            await self.run_blocking(self.store.write, self.name + ".origin",
                                    b"blank\n" if blank_origin else b"data\n")
            self.blank_origin = blank_origin
            self.gens = self.gens.new_current(os.urandom)
            await self._persist_gens()

    def _new_members(self, view: View, flags: dict[str, int]) -> list[str] | None:
        """The peers that get the whole LUN copied (their data is not the cluster's), or None
        if nobody can tell whose data is right (see the module docstring)."""
        mine = self._origin_flags()
        strangers = sorted(p for p, f in flags.items() if not f & HISTORY)
        if not strangers:
            return []
        holding = [p for p in strangers if not flags[p] & BLANK]
        if mine & HISTORY:
            if holding:
                log.warning("%s: node %s holds data that never was the cluster's; it is "
                            "overwritten with this node's", self.label, ", ".join(holding))
            return strangers if not mine & BLANK_ORIGIN else holding
        if holding:
            if not self._refused:
                self._refused = True
                log.error("%s: a new cluster, and node %s holds data%s: nothing says whose is "
                          "right, so the LUN stays offline; empty the backing store of every "
                          "node whose data must not win (a new sparse file, or blkdiscard), or "
                          "move the data to node %s first", self.label, ", ".join(holding),
                          "" if mine & BLANK else " as does this node", self.node)
            return None
        return [] if mine & BLANK else strangers

    def _decode(self, peer: str, raw: bytes) -> DirtyBitmap:
        try:
            bm = DirtyBitmap.from_bytes(raw)
            if (bm.size_bytes, bm.region_size) != (self.lun.backend.size,
                                                  self.bitmaps[peer].region_size):
                raise ValueError(f"geometry {bm.size_bytes}/{bm.region_size}")
            return bm
        except ValueError as e:
            log.warning("%s: node %s reported an unusable bitmap (%s): every region is "
                        "copied", self.label, peer, e)
            bm = DirtyBitmap(self.lun.backend.size)
            bm.mark_all()
            return bm

    async def _gather_reports(self, peers: list[str], step: int,
                              view_epoch: int) -> dict[str, tuple[int, int, bytes]] | None:
        """Send ``step`` (ASK or SYNC) to ``peers``; their REPORTs, or None."""
        if not peers:
            return {}  # a view of one
        loop = asyncio.get_running_loop()
        xid = self._new_rid()
        waits = {}
        for peer in peers:
            fut: asyncio.Future[tuple[int, int, bytes] | None] = loop.create_future()
            self._reports[peer] = (xid, fut)
            waits[peer] = fut
            self.send(peer, wire.Control(self.lun_id, wire.ControlKind.RECONCILE, xid,
                                         view_epoch, step))
        try:
            await asyncio.wait(list(waits.values()), timeout=self.join_timeout)
        finally:
            for peer in peers:
                if self._reports.get(peer, (None,))[0] == xid:
                    del self._reports[peer]
        late = [p for p, f in waits.items() if not f.done()]
        if late:
            log.warning("%s: node %s did not report in time", self.label, ", ".join(late))
            return None
        got = {p: f.result() for p, f in waits.items()}
        if any(r is None for r in got.values()):
            return None  # a link went away meanwhile
        return {p: r for p, r in got.items() if r is not None}

    async def _copy_regions(self, copies: dict[str, DirtyBitmap], view: View) -> bool:
        """Copy this node's version of each marked region to the peers that need it."""
        bs = self.lun.block_size
        wanted: dict[int, list[str]] = {}
        for peer, bm in copies.items():
            for region in bm.dirty_regions():
                wanted.setdefault(region, []).append(peer)
        any_bm = next(iter(copies.values()), None)
        if any_bm is None:
            return True
        for region in sorted(wanted):
            offset, length = any_bm.region_extent(region)
            lba, blocks = offset // bs, length // bs
            buf = await self.lun.apply_block(BlockRequest(BlockOp.READ, lba, blocks))
            try:
                for peer in wanted[region]:
                    rid = self._new_rid()
                    reply = self._expect(rid, peer)
                    self.send(peer, wire.ResyncData(self.lun_id, rid, 0, lba, blocks, buf))
                    status = await self._answer_of(reply)
                    if status:
                        log.warning("%s: node %s did not store region %d (%s)", self.label,
                                    peer, region, errno.errorcode.get(status, status))
                        return False
                    self.resync_bytes += length
            finally:
                release_buffer(buf)
            if not self._current(view):
                return False
        return True

    def _maybe_resync(self, now: float) -> None:
        view = self.view
        assert view is not None
        for peer in sorted(self._linked - self.replicas):
            self._next_resync = now + RETRY_S
            self._resync_task = self._spawn(self._resync_node(view, peer))
            return

    async def _resync_node(self, view: View, peer: str) -> None:
        gen = self._link_gen.get(peer, 0)
        async with self._transition:
            if self.plan is not None or not self.ready or not self._current(view):
                return
            reports = await self._gather_reports([peer], SYNC, view.epoch)
            if reports is None or not self.ready or self._stale(peer, gen, "a resync"):
                return
            _, flags, raw = reports[peer]
            if flags & HISTORY:
                self.bitmaps[peer].merge(self._decode(peer, raw))
            elif not (flags & BLANK and self.blank_origin):
                # Its data never was the cluster's, and the cluster's is not zeroes plus
                # what the bitmaps hold: all of it.
                self.bitmaps[peer].mark_all()
            await self._flush_bitmaps()
        begun: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        begun.set_result(0)
        log.info("%s: resyncing %d bytes to node %s", self.label,
                 self.bitmaps[peer].dirty_bytes, peer)
        try:
            await self._resync(peer, begun, gen)
        finally:
            self.plan = None

    def _resyncing(self, peer: str, plan: ResyncPlan, gen: int) -> bool:
        return (self.plan is plan and self.ready and peer not in self.replicas
                and not self._stale(peer, gen, "the resync"))

    async def _join(self, peer: str, plan: ResyncPlan, gen: int) -> bool:
        """Little left: start an epoch with ``peer`` as a follower (its final pass)."""
        view = self.view
        if view is None or self.bitmaps[peer].dirty_bytes > FINAL_PASS_BYTES:
            return False
        async with self._transition:
            if self._stale(peer, gen, "joining"):
                return True
            self._reconciling = True
            try:
                ok = await self._reconcile_once(view, self.followers | {peer})
            finally:
                self._reconciling = False
        if ok:
            log.info("%s: node %s follows this node's writes; the view will take it in",
                     self.label, peer)
        return ok

    # ------------------------------------------------------------------ links
    def link_up(self, peer: str) -> None:
        self._linked.add(peer)

    def peer_lost(self, peer: str) -> None:
        self._forget_link(peer)
        waiting = self._reports.pop(peer, None)
        if waiting is not None and not waiting[1].done():
            waiting[1].set_result(None)
        if self._copies_from == peer:
            self._copies_from = ""
        if peer not in self.replicas:
            return
        self._stop(f"node {peer} lost")
        if peer in self.followers:
            self._follower_lost(peer)
        if self.source not in (peer, self.node, ""):
            # The source starts the next epoch (or, for a lost follower, asks for a round):
            # its own link to ``peer`` may be fine, and this node's may come back before the
            # view changes.
            self._tell_lost(peer, self.source)

    def _tell_lost(self, peer: str, source: str) -> None:
        self.send(source, wire.Control(self.lun_id, wire.ControlKind.RECONCILE, 0,
                                            self.epoch, LOST, peer.encode()))

    def _follower_lost(self, peer: str) -> None:
        if peer not in self.followers:
            return
        self.followers -= {peer}
        self._await_view = True
        if self.on_followers is not None:
            self.on_followers()
        if self.request_round is not None and self.source == self.node:
            # A proposal may name it already: only a decided view may leave it out.
            self.request_round(f"follower {peer} lost")

    def in_sync_peers(self) -> frozenset[str]:
        return self.followers if self.source == self.node else frozenset()

    # ------------------------------------------------------------------ messages in
    def _control(self, peer: str, msg: wire.Control) -> None:
        kind = msg.kind
        if kind is wire.ControlKind.STABLE:
            if msg.epoch == self.epoch and peer in self.replicas:
                self._peer_prefix[peer] = msg.value - 1
        elif kind is wire.ControlKind.RECONCILE:
            self._reconcile_step(peer, msg)
        elif kind in (wire.ControlKind.STATE, wire.ControlKind.SYNC_BEGIN,
                      wire.ControlKind.JOIN):
            raise wire.PeerProtocolError(f"CONTROL {kind.name} in a cluster of three or more")
        else:
            super()._control(peer, msg)

    def _reconcile_step(self, peer: str, msg: wire.Control) -> None:
        step = msg.value & 0xFF
        if step == REPORT:
            waiting = self._reports.get(peer)
            if waiting is not None and waiting[0] == msg.request_id and not waiting[1].done():
                waiting[1].set_result((msg.epoch, msg.value >> 8, msg.body))
        elif step in (ASK, SYNC):
            view = self.view
            if view is None or msg.epoch > view.epoch:
                self._deferred[peer] = msg  # its COMMIT is on the way
            elif msg.epoch == view.epoch and peer == min(view.members) \
                    and self.promised <= view.epoch:
                self._spawn(self._report(peer, msg, view))
        elif step == READY:
            self._ready_from(peer, msg)
        elif step == LOST:
            if self.source == self.node:
                lost = msg.body.decode(errors="replace")
                if lost in self.followers:
                    self._stop(f"node {peer} lost follower {lost}")
                    self._follower_lost(lost)
                elif lost in self.replicas:
                    self._stop(f"node {peer} lost node {lost}")
        else:
            raise wire.PeerProtocolError(f"CONTROL RECONCILE step {step}")

    async def _report(self, peer: str, msg: wire.Control, view: View) -> None:
        self._stop(f"node {peer} starts an epoch of view {view.epoch}")
        if not await self._settle() or self.view != view:
            return
        self._copies_from = peer
        if msg.value == SYNC:
            self._set_role(Role.SYNC_TARGET, f"node {peer} resyncs this node")
        self.send(peer, wire.Control(self.lun_id, wire.ControlKind.RECONCILE, msg.request_id,
                                     self.epoch, REPORT | self._origin_flags() << 8,
                                     self.bitmaps[peer].to_bytes()))

    def _ready_from(self, peer: str, msg: wire.Control) -> None:
        body = msg.body
        if len(body) < _VIEW_EPOCH.size:
            raise wire.PeerProtocolError("CONTROL RECONCILE READY too short")
        (view_epoch,) = _VIEW_EPOCH.unpack_from(body)
        replicas = frozenset(body[_VIEW_EPOCH.size:].decode(errors="replace").split("\0"))
        view = self.view
        if (view is None or view.epoch != view_epoch or peer != min(view.members)
                or self._copies_from != peer or self.promised > view_epoch):
            log.info("%s: READY for view %d from node %s ignored", self.label, view_epoch, peer)
            return
        if self.node not in replicas or not replicas <= set(self.nodes):
            raise wire.PeerProtocolError(f"READY naming {sorted(replicas)}")
        unlinked = sorted(replicas - self._linked - {self.node})
        if unlinked:
            # Every write goes from its origin to every replica: not without these links.
            log.info("%s: epoch %d needs node %s, not linked here", self.label, msg.epoch,
                     unlinked[0])
            self._tell_lost(unlinked[0], peer)
            return
        for p in replicas - {self.node}:
            self.bitmaps[p].clear_all()
        self._spawn(self._flush_bitmaps())
        self._spawn(self._keep_history(bool(msg.value >> 8 & BLANK_ORIGIN)))
        self._start(view, msg.epoch, replicas)

    def _takes_copies_from(self, peer: str) -> bool:
        return peer == self._copies_from

    async def _store_copy(self, peer: str, req: BlockRequest) -> None:
        off, length = self._bytes(req)
        for p, bm in self.bitmaps.items():
            if p != peer:
                bm.mark(off, length)
        await self._apply_logged(req)
        # Where the source's version now covers whole regions, this node holds nothing the
        # source lacks.
        bm = self.bitmaps[peer]
        region = -(-off // bm.region_size)
        while region < bm.regions:
            start, size = bm.region_extent(region)
            if start + size > off + length:
                break
            bm.clear(region)
            region += 1

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        st = super().status()
        view = self.view
        st.update({"view": None if view is None else {"epoch": view.epoch,
                                                      "members": sorted(view.members)},
                   "ready": self.ready, "source": self.source or None,
                   "replicas": sorted(self.replicas), "followers": sorted(self.followers)})
        if self.engine is None:
            st["in_sync"] = [self.node]
        return st
