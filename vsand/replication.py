"""A mirrored LUN on this node: the asyncio driver of the mirror's sans-IO pieces.

Theory of operation
-------------------
Every request that changes data (WRITE, WRITE SAME, UNMAP, SYNCHRONIZE CACHE, COMPARE AND
WRITE) reaches ``MirroredLun.submit`` instead of the backend; reads stay local.  What happens
next depends on the replica's role:

``in-sync``
    The request goes through ``mirror.ordering.OrderingEngine``: the sequencer (the lowest
    node id of the in-sync set) numbers it, every replica applies overlapping requests in
    number order, and the request completes when every in-sync replica has applied it.  The
    engine's messages become peer frames (``_frame``) and back (``_engine_message``); a
    request id carries its origin node in its top bits, so a frame names who must be acked.
    COMPARE AND WRITE is replicated as itself: every replica compares and writes at the same
    point of the order, on identical data, so all reach the origin's outcome.  A FLUSH covers
    the whole LUN in the order, so it runs after every earlier request on every replica.
``degraded`` / ``sync-source``
    A peer is away: requests are applied locally, their regions marked in that peer's dirty
    bitmap first.  The first write after a peer left draws a new data generation, persisted
    before the write is acknowledged (``mirror.generations``).  A sync source also copies the
    dirty regions to the returning peer (``mirror.resync.ResyncPlan``), redirtying regions
    that foreground writes touch while they are copied.  When the bitmap is empty it pauses
    new requests, drains the ones in flight, and sends JOIN: from then on both are in sync.
``connecting`` / ``sync-target``
    Not serving: the ALUA state is transitioning, so initiators use another path; a request
    that slips through is refused with NOT READY (ENOLINK).  A sync target writes what the
    source sends (with FUA, so that a region the source then clears is stable here).

Durability without a metadata write per I/O: every write this node applies, in any role,
first enters the activity log (``mirror.activity_log``), which is persisted only when a new
region becomes hot; bitmaps are flushed lazily (every second, before a region leaves the log,
and at shutdown).  After a crash, the log's regions are marked dirty for every peer.

When a link comes up, both nodes pause new requests on the LUN, drain those in flight, and
exchange their generation identifiers and dirty bitmaps (CONTROL STATE).  Both run the same
``decide`` on the same two states, so they agree without further messages: in sync (a new
epoch starts, with a new ordering engine), one is the source of a bitmap or full resync, or
the histories diverged (split brain: logged, left to the operator; each side goes on as it
was).  Messages of an older epoch are dropped.

Storage that fails a replicated write, at the origin or at a replica, leaves the replicas
different in that region: the failing node marks it for every peer, closes the link (so both
sides leave the in-sync set, as on a lost peer) and steps aside in the vote that follows, so
that the node whose storage works goes on and later resyncs it.  An origin whose peer failed
does not pass the peer's error on: the write completes as those waiting for a lost peer do,
once the quorum let this node go on.

Two nodes are the case this handles fully.  With three, writes are mirrored to all in-sync
replicas, but changing the in-sync set of three needs the agreement the quorum layer brings.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import functools
import hashlib
import logging
import os
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .backends.base import release_buffer
from .lun import NOT_DONE, Lun
from .mirror import messages as wire
from .mirror.activity_log import (DEFAULT_REGION_SIZE as AL_REGION_SIZE, ActivityLog,
                                  ActivityLogFull, TxState, mark_regions)
from .mirror.bitmap import DirtyBitmap
from .mirror.generations import Decision, Generations, Outcome, SyncKind, decide
from .mirror.metastore import MetaStore
from .mirror.ordering import Ack, Apply, Complete, Forward, OrderingEngine, Repl, Send
from .mirror.ratelimit import ResyncThrottle, TokenBucket
from .mirror.resync import ResyncPlan
from .mirror.verify import RepairJob, VerifyPlan, region_checksum
from .protocol.block import BlockOp, BlockRequest
from .protocol.scsi import alua
from .protocol.scsi.unit import ALUA_ACTIVE_OPTIMIZED, ALUA_TRANSITIONING, ALUA_UNAVAILABLE

log = logging.getLogger("vsand.mirror")

REQ_SHIFT = 48  # request id = (origin node index + 1) << REQ_SHIFT | counter
BITMAP_FLUSH_INTERVAL = 1.0
RESYNC_CHUNK = 1 << 20
RESYNC_IN_FLIGHT = 4
RESYNC_MAX_RATE = 4 << 30  # bytes/s when the config sets no cap
RESYNC_TARGET_LATENCY = 0.005  # mean foreground latency above which resync backs off
RESYNC_RETRY_S = (0.05, 5.0)  # first and longest wait after the target failed a copy
FINAL_PASS_BYTES = 8 << 20  # copied with writes held at the end of a resync (~40 ms)
VERIFY_IN_FLIGHT = 4
REPAIR_BATCH = 8  # regions copied per hold by a verify's repair (8 MiB, as a final pass)
_STATE = struct.Struct("!I")
_T = TypeVar("_T")
_FRESH, _SURVIVOR, _REPLY = 0x1, 0x2, 0x4  # CONTROL STATE value flags


class Role(enum.Enum):
    CONNECTING = "connecting"
    DEGRADED = "degraded"
    SYNC_SOURCE = "sync-source"
    SYNC_TARGET = "sync-target"
    IN_SYNC = "in-sync"
    SPLIT_BRAIN = "split-brain"


_SERVING = frozenset((Role.DEGRADED, Role.SYNC_SOURCE, Role.IN_SYNC))
# Decisions only an operator can settle (``vsanctl resolve``).
_UNDECIDED = frozenset((Outcome.SPLIT_BRAIN, Outcome.UNRELATED, Outcome.NO_SOURCE))
_SEQUENCED = (wire.Write, wire.WriteSame, wire.Unmap, wire.Flush, wire.CompareAndWrite,
              wire.State, wire.VerifyRequest)
# Requests that order against the whole LUN but change no block: no activity log, no bitmap.
_NO_DATA = frozenset((BlockOp.FLUSH, BlockOp.STATE))
# ... and requests that change no block either, but order against their own blocks.
_READS_ONLY = frozenset((BlockOp.FLUSH, BlockOp.STATE, BlockOp.VERIFY))


class _Local:
    """A request that arrived at this node: what the engine carries as its data."""
    __slots__ = ("req", "done", "result", "error", "retry")

    def __init__(self, req: BlockRequest, done: asyncio.Future[None]) -> None:
        self.req = req
        self.done = done
        self.result: Any = None
        self.error: OSError | None = None
        self.retry = False  # its epoch ended before it completed: run it in the next one


def _extent(req: BlockRequest, total_blocks: int) -> tuple[int, int]:
    """The blocks a request orders against: its own, an UNMAP's span, everything for FLUSH."""
    op = req.op
    if op is BlockOp.UNMAP:
        lo = min(lba for lba, _ in req.ranges)
        return lo, max(lba + n for lba, n in req.ranges) - lo
    if op in _NO_DATA:
        return 0, total_blocks
    return req.lba, req.blocks


def _frame(lun_id: int, epoch: int, seq: int, rid: int, req: BlockRequest) -> wire.Message:
    op, data = req.op, req.data
    if op is BlockOp.WRITE:
        assert data is not None
        return wire.Write(lun_id, epoch, seq, rid, req.lba, req.blocks, data, req.fua)
    if op is BlockOp.WRITE_SAME:
        assert data is not None
        return wire.WriteSame(lun_id, epoch, seq, rid, req.lba, req.blocks, data, req.fua,
                              req.unmap)
    if op is BlockOp.UNMAP:
        return wire.Unmap(lun_id, epoch, seq, rid, req.ranges)
    if op is BlockOp.FLUSH:
        return wire.Flush(lun_id, epoch, seq, rid)
    if op is BlockOp.STATE:
        assert data is not None
        return wire.State(lun_id, epoch, seq, rid, data)
    if op is BlockOp.VERIFY:
        return wire.VerifyRequest(lun_id, rid, seq, req.lba, req.blocks, epoch)
    assert data is not None and op is BlockOp.COMPARE_AND_WRITE
    return wire.CompareAndWrite(lun_id, epoch, seq, rid, req.lba, req.blocks, data, req.fua)


def _request(msg: wire.Message) -> BlockRequest:
    if isinstance(msg, wire.Write):
        return BlockRequest(BlockOp.WRITE, msg.lba, msg.blocks, msg.data, msg.fua)
    if isinstance(msg, wire.WriteSame):
        return BlockRequest(BlockOp.WRITE_SAME, msg.lba, msg.blocks, msg.data, msg.fua,
                            unmap=msg.unmap)
    if isinstance(msg, wire.Unmap):
        return BlockRequest(BlockOp.UNMAP, ranges=msg.ranges)
    if isinstance(msg, wire.Flush):
        return BlockRequest(BlockOp.FLUSH)
    if isinstance(msg, wire.State):
        return BlockRequest(BlockOp.STATE, data=msg.record)
    if isinstance(msg, wire.VerifyRequest):
        return BlockRequest(BlockOp.VERIFY, msg.lba, msg.blocks)
    assert isinstance(msg, wire.CompareAndWrite)
    return BlockRequest(BlockOp.COMPARE_AND_WRITE, msg.lba, msg.blocks, msg.data, msg.fua)


def _serialized(method: Callable[..., Awaitable[_T]]) -> Callable[..., Awaitable[_T]]:
    """Run a change of replication state under the replica's transition lock."""
    @functools.wraps(method)
    async def run(self: MirroredLun, *args: Any) -> _T:
        async with self._transition:
            return await method(self, *args)
    return run


class MirroredLun:
    """One mirrored LUN's replica on this node; see the module docstring."""

    def __init__(self, lun: Lun, lun_id: int, node: str, nodes: list[str], store: MetaStore,
                 send: Callable[[str, wire.Message], bool], *, cluster_id: str,
                 run_blocking: Callable[..., Any], resync_rate: int = 0,
                 join_timeout: float = 6.0) -> None:
        self.lun = lun
        self.lun_id = lun_id
        self.node = node
        self.nodes = sorted(nodes)
        self.index = {name: i for i, name in enumerate(self.nodes)}
        self.peers = [n for n in self.nodes if n != node]
        self.store = store
        self.send = send
        self.cluster_id = cluster_id
        self.run_blocking = run_blocking  # (fn, *args) -> awaitable, for fsyncing writes
        self.resync_rate = resync_rate
        self.join_timeout = join_timeout
        self.name = f"mirror-{lun_id:04x}"
        self.label = f"LUN {lun.unit.params.serial}"
        self.role = Role.CONNECTING
        self.epoch = 0
        self.engine: OrderingEngine | None = None
        self.gens = Generations()
        self.fresh = False
        self.bitmaps: dict[str, DirtyBitmap] = {}
        self.al: ActivityLog | None = None
        self.plan: ResyncPlan | None = None
        self.plan_peer = ""
        self.throttle: ResyncThrottle | None = None
        self.survivor = False  # an operator chose this replica's data over diverged peers
        # Set by the daemon: abort this node's commands of nexuses a PREEMPT AND ABORT
        # applied through the mirror preempted.
        self.on_preempt_abort: Callable[[set[str]], None] | None = None
        # Quorum (vsand/quorum.py): whether this node may serve at all, whether it may go on
        # without a lost peer (the witness's vote), and news that the peer is in sync.
        self.quorum_ok = True
        self.quorum_fenced = False  # refused by the witness: unavailable, not transitioning
        self.may_go_alone: Callable[[], Awaitable[bool]] | None = None
        self.on_in_sync: Callable[[str], None] | None = None
        self.drop_link: Callable[[str, str], None] | None = None
        self.on_storage_failure: Callable[[], None] | None = None
        self.resync_bytes = 0  # copied as source, for the status and the tests
        self._resync_retry = 0.0  # seconds to wait before copying again after a failure
        # Requests through submit (data-changing, on every in-sync replica): plain ints for
        # the metrics collector; histogram bucket i counts requests under 2**i * 1024 ns.
        self.ops = 0
        self.ns = 0
        self.errors = 0
        self.hist = [0] * 64
        self.last_decision = ""
        self._req_base = (self.index[node] + 1) << REQ_SHIFT
        self._next_req = 1
        self._locals: dict[int, _Local] = {}
        self._apply_errors: dict[int, int] = {}  # seq -> errno of a failed apply here
        # CONTROL/RESYNC request id -> (the peer asked, its status)
        self._replies: dict[int, tuple[str, asyncio.Future[int]]] = {}
        self._decided: dict[str, int] = {}  # peer -> link generation of its last decision
        self._epoch_link = 0  # link generation the current epoch started on
        # id() of a VERIFY request from a peer -> (its origin, request id), until applied.
        self._verify_origins: dict[int, tuple[str, int]] = {}
        self._verify_sums: dict[int, dict[str, bytes]] = {}  # local verify rid -> checksums
        self.verify: VerifyPlan | None = None
        self.verify_task: asyncio.Task[None] | None = None
        self.verify_finished_unix: float | None = None
        self.repaired_regions = 0  # by this node's last verify with repair
        # A peer copying a verify's repair here while this node holds its writes.
        self._repair_from = ""
        self._repair_end: asyncio.Event | None = None
        self._repair_writes = 0
        # Per peer, this node's pending request for the peer's state: (exchange id, future).
        self._asked: dict[str, tuple[int, asyncio.Future[Any]]] = {}
        self._incoming: set[str] = set()  # peers whose request for our state awaits answer
        self._linked: set[str] = set()  # peers whose link's first exchange has started
        # Bumped when a peer's link is lost: a decision or resync begun over the old link
        # must not act (or send) over the next one.
        self._link_gen: dict[str, int] = {}
        self._paused = False
        self._resume: asyncio.Event = asyncio.Event()
        self._resume.set()
        self._inflight = 0
        self._applying = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tx_done: dict[object, asyncio.Future[None]] = {}
        self._al_task: asyncio.Task[None] | None = None
        self._al_room: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gens_lock = asyncio.Lock()
        # One change of replication state at a time (exchange and decision, leaving the
        # in-sync set, joining): a link that flaps queues its changes instead of mixing them.
        self._transition = asyncio.Lock()
        # Metadata files are replaced whole: one write per file at a time, in order, so an
        # older image can never land after a newer one.
        self._gens_io = asyncio.Lock()
        self._bitmap_io = asyncio.Lock()
        self._closed = False
        self._flusher: asyncio.Task[None] | None = None
        lun.mirror = self
        lun.unit.shared = True  # reservations and resets travel through the order too

    # ------------------------------------------------------------------ start, stop
    async def attach(self) -> None:
        """Load (or create) this replica's metadata; recover the activity log after a crash."""
        size = self.lun.backend.size
        raw = self.store.read(self.name + ".gen")
        if raw is None:
            extents = await self.lun.backend.lba_status(0, size)
            self.fresh = not any(mapped for _, _, mapped in extents)
        else:
            self.gens = Generations.from_bytes(raw)
        for peer in self.peers:
            self.bitmaps[peer] = DirtyBitmap.load(self.store, f"{self.name}.bm-{peer}", size)
        hot = ActivityLog.recover(self.store, self.name + ".al")
        if hot:
            log.warning("%s: recovering after a crash: %d active region(s) marked dirty for "
                        "every peer", self.label, len(hot))
            for bm in self.bitmaps.values():
                mark_regions(bm, hot, AL_REGION_SIZE)
            await self._flush_bitmaps()
            if self.gens.current:
                for peer in self.peers:
                    self.gens = self.gens.start_tracking(self.index[peer])
                await self._persist_gens()
        self.al = ActivityLog(self.store, self.name + ".al", on_disk=hot)
        self._set_alua(False)
        self._flusher = asyncio.ensure_future(self._bitmap_flusher())

    def go_alone(self) -> None:
        """No peer answered in time: serve alone, tracking every peer (if the data is whole)."""
        if self.role is not Role.CONNECTING or self._closed:
            return
        if self.gens.inconsistent:
            log.error("%s: this replica was interrupted as a resync target and holds mixed "
                      "data; it will not serve until a peer completes the resync", self.label)
            return
        self._spawn(self._become_degraded(self.peers, "no peer reachable at start-up"))

    async def close(self) -> None:
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._al_task is not None:
            await asyncio.gather(self._al_task, return_exceptions=True)
        await self._flush_bitmaps()
        al = self.al
        if al is not None and self._inflight == 0 and self._applying == 0:
            al.evict_idle()  # a clean stop leaves an empty log: no dirty regions at restart
            await self.run_blocking(al.persist_pending)
        self.lun.mirror = None
        self.lun.unit.shared = False

    # ------------------------------------------------------------------ the I/O path
    async def submit(self, req: BlockRequest) -> Any:
        """Execute a data-changing request on every in-sync replica; its result here."""
        while self._paused:
            await self._resume.wait()
        if not self.quorum_ok or (self.role not in _SERVING and not (
                self.role is Role.SPLIT_BRAIN and self._was_serving)):
            state = self.role.value if self.quorum_ok else "without quorum"
            raise OSError(errno.ENOLINK, f"{self.label} is {state} on this node")
        self._inflight += 1
        self._idle.clear()
        t0 = time.perf_counter_ns()
        try:
            engine = self.engine
            if engine is None:
                return await self._apply_alone(req)
            return await self._ordered(engine, req)
        except BaseException:
            self.errors += 1
            raise
        finally:
            dt = time.perf_counter_ns() - t0
            self.ops += 1
            self.ns += dt
            self.hist[(dt >> 10).bit_length()] += 1
            self._inflight -= 1
            if not self._inflight and not self._applying:
                self._idle.set()

    async def _ordered(self, engine: OrderingEngine, req: BlockRequest) -> Any:
        """Run ``req`` through the ordering engine: its result once every replica applied it."""
        local = await self._order_once(engine, req)
        if local.error is not None:
            raise local.error
        return local.result

    async def _order_once(self, engine: OrderingEngine, req: BlockRequest) -> _Local:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        local = _Local(req, done)
        rid = self._req_base | self._next_req
        self._next_req += 1
        self._locals[rid] = local
        verify = req.op is BlockOp.VERIFY
        if verify:
            self._verify_sums[rid] = {}
        lba, blocks = _extent(req, self.lun.unit.params.blocks)
        try:
            self._run(engine, engine.local_write(rid, lba, blocks, local))
            await done
        finally:
            sums = self._verify_sums.pop(rid, {}) if verify else {}
        if verify and local.error is None:
            local.result = {**sums, self.node: local.result}
        return local

    @property
    def _was_serving(self) -> bool:
        return self.lun.unit.alua_state == ALUA_ACTIVE_OPTIMIZED

    def _generation_ready(self) -> bool:
        """Every absent peer is tracked and none may hold ``current``: writes may go alone."""
        g = self.gens
        return bool(g.current) and not g.needs_new_current() and all(
            g.bitmap_for(self.index[p]) for p in self.peers)

    async def _apply_alone(self, req: BlockRequest) -> Any:
        if not self._generation_ready():
            # Persisted before the write: a peer that was in sync holds ``current``, and
            # this write makes the data differ from it (DESIGN invariant 4).
            async with self._gens_lock:
                if not self._generation_ready():
                    g = self.gens if self.gens.current else self.gens.new_current(os.urandom)
                    for p in self.peers:
                        g = g.start_tracking(self.index[p])
                    self.gens = g.new_current(os.urandom)
                    await self._persist_gens()
                    log.info("%s: new data generation %016x (peers away: %s)", self.label,
                             self.gens.current, ", ".join(self.peers))
        off, length = self._bytes(req)
        if length:
            for bm in self.bitmaps.values():
                bm.mark(off, length)
        result = await self._apply_logged(req)
        plan = self.plan
        if plan is not None and length:
            plan.redirty(off, length)
        return result

    def _bytes(self, req: BlockRequest) -> tuple[int, int]:
        """The bytes a request may change; (0, 0) for FLUSH, STATE and VERIFY."""
        if req.op in _READS_ONLY:
            return 0, 0
        lba, blocks = _extent(req, self.lun.unit.params.blocks)
        bs = self.lun.block_size
        return lba * bs, blocks * bs

    async def _apply_logged(self, req: BlockRequest) -> Any:
        """Apply on the local backend, inside the activity log."""
        if req.op is BlockOp.VERIFY:
            buf = await self.lun.apply_block(BlockRequest(BlockOp.READ, req.lba, req.blocks))
            try:
                return region_checksum(buf)
            finally:
                release_buffer(buf)
        off, length = self._bytes(req)
        if not length:
            return await self.lun.apply_block(req)
        await self._al_begin(off, length)
        try:
            return await self.lun.apply_block(req)
        finally:
            self._al_end(off, length)

    # ------------------------------------------------------------------ engine plumbing
    def _live(self, engine: OrderingEngine) -> bool:
        """Whether what ``engine`` asks for may still happen (its epoch has not ended)."""
        return True

    def _applied(self, engine: OrderingEngine, action: Apply) -> list[Any]:
        """This replica applied ``action``: what the engine does next."""
        return engine.applied(action.seq)

    def _run(self, engine: OrderingEngine, actions: list[Any]) -> None:
        if not self._live(engine):
            return
        todo = deque(actions)
        sent = False
        while todo:
            action = todo.popleft()
            kind = type(action)
            if kind is Apply:
                if sent:
                    # Peer output leaves at the end of this pass of the loop: applying here
                    # first would hold the replicas' copies back for the local write's time.
                    # The next pass applies it, after the flush (call_soon runs in order).
                    self._applying += 1
                    self._idle.clear()
                    asyncio.get_running_loop().call_soon(self._apply_later, engine, action)
                    continue
                if self._apply_now(action):
                    todo.extend(self._applied(engine, action))
                    continue
                self._applying += 1
                self._idle.clear()
                self._spawn(self._apply_sequenced(engine, action))
            elif kind is Send:
                self._send_engine(engine, action)
                sent = True
            elif kind is Complete:
                local = self._locals.pop(action.req, None)
                if local is not None and not local.done.done():
                    local.done.set_result(None)

    def _apply_later(self, engine: OrderingEngine, action: Apply) -> None:
        if not self._live(engine):
            self._applying -= 1
            if not self._inflight and not self._applying:
                self._idle.set()
            return
        try:
            done = self._apply_now(action)
        except Exception:  # the async path applies it again and reports what fails
            log.exception("%s: applying sequence %d inline failed", self.label, action.seq)
            done = False
        if not done:
            self._spawn(self._apply_sequenced(engine, action))  # counted already
            return
        self._applying -= 1
        self._run(engine, self._applied(engine, action))
        if not self._inflight and not self._applying:
            self._idle.set()

    def _apply_now(self, action: Apply) -> bool:
        """Apply a plain WRITE without a task when the activity log already holds its regions
        and the page cache takes it at once (the common case); False: use the async path."""
        data = action.data
        local = data if type(data) is _Local else None
        req = local.req if local is not None else data
        if req.op is not BlockOp.WRITE:
            return False
        al = self.al
        assert al is not None
        off, length = self._bytes(req)
        if not al.covers(off, length):
            return False
        al.begin_write(off, length)  # covered: no transaction; keeps the regions recent
        try:
            done = self.lun.try_apply_write(req)
        except OSError:
            return False  # the async path reports it
        finally:
            al.end_write(off, length)
        if done is NOT_DONE:
            return False
        if local is not None:
            local.result = None
        return True

    async def _apply_sequenced(self, engine: OrderingEngine, action: Apply) -> None:
        if not self._live(engine):  # its epoch ended before it started
            self._applying -= 1
            if not self._inflight and not self._applying:
                self._idle.set()
            return
        data = action.data
        local = data if type(data) is _Local else None
        req = local.req if local is not None else data
        try:
            result = await self._apply_logged(req)
            if local is not None:
                local.result = result
            elif req.op is BlockOp.STATE:
                # A PREEMPT AND ABORT that arrived elsewhere ends this node's commands of the
                # preempted nexuses too (where it arrived, the transport does it).
                pending = self.lun.unit.pr.pending_aborts
                if pending:
                    victims = set(pending)
                    pending.clear()
                    if self.on_preempt_abort is not None:
                        self.on_preempt_abort(victims)
            elif req.op is BlockOp.VERIFY:
                # To the origin before this replica's ACK, on the same ordered stream.
                origin, rid = self._verify_origins.pop(id(req))
                self.send(origin, wire.VerifyResult(self.lun_id, rid, action.seq, req.lba,
                                                    req.blocks, result))
        except Exception as e:  # the order must go on whatever happened to one request
            if isinstance(e, OSError):
                log.error("%s: applying sequence %d failed: %s", self.label, action.seq, e)
            else:
                log.exception("%s: internal error applying sequence %d", self.label,
                              action.seq)
                e = OSError(errno.EIO, f"internal error: {e!r}")
            if local is not None:
                local.error = e
            else:
                self._apply_errors[action.seq] = e.errno or errno.EIO
            if req.op not in _READS_ONLY:
                self._write_failed_here(req, e)
        finally:
            self._applying -= 1
        self._run(engine, self._applied(engine, action))
        if not self._inflight and not self._applying:
            self._idle.set()

    def _write_failed_here(self, req: BlockRequest, e: OSError) -> None:
        """A write the other replicas apply (or applied) failed on this node's storage, as
        origin or as replica: the region may differ now.  Keep it for the resync, whichever
        way that goes, and leave the in-sync set rather than let both sides believe they
        hold the same data.  The node steps aside in the vote that follows, so that the peer
        whose storage works goes on."""
        off, length = self._bytes(req)
        if length:
            for peer in self.peers:
                self.bitmaps[peer].mark(off, length)
        if self.on_storage_failure is not None:
            self.on_storage_failure()
        if self.drop_link is not None:
            for peer in self.peers:
                self.drop_link(peer, f"{self.label}: a replicated write failed here: {e}")

    def _send_engine(self, engine: OrderingEngine, action: Send) -> None:
        msg = action.message
        epoch, lun_id = self.epoch, self.lun_id
        out: wire.Message
        if type(msg) is Forward:
            req = msg.data.req
            lba, blocks = (req.lba, req.blocks) if req.op not in (BlockOp.UNMAP,
                                                                 BlockOp.FLUSH) else (0, 0)
            data = b"" if req.data is None else req.data
            out = wire.Forward(lun_id, epoch, msg.req, req.op, lba, blocks, data, req.ranges,
                               req.fua, req.unmap)
        elif type(msg) is Repl:
            if msg.data is None:
                out = wire.Ordered(lun_id, epoch, msg.seq, msg.req)
            else:
                data = msg.data
                req = data.req if type(data) is _Local else data
                out = _frame(lun_id, epoch, msg.seq, msg.req, req)
        else:
            assert type(msg) is Ack
            status = self._apply_errors.pop(msg.seq, 0)
            out = wire.Ack(lun_id, epoch, msg.seq, msg.req, status)
        self.send(action.to, out)  # a lost link's messages go nowhere; peer_lost settles it

    def _origin(self, rid: int) -> str | None:
        i = (rid >> REQ_SHIFT) - 1
        return self.nodes[i] if 0 <= i < len(self.nodes) else None

    def _engine_message(self, peer: str, msg: wire.Message) -> None:
        engine = self.engine
        # The epoch lives on the link it started on: once that link is gone, what the peer
        # still sends for it over a new link (before it noticed) may follow a message lost
        # with the old one, and would leave the engine waiting for it forever.
        if engine is None or not self._accepts(peer, msg):
            log.debug("%s: dropped %s of epoch %d from node %s (epoch %d, %s)", self.label,
                      msg.TYPE.name, msg.epoch, peer, self.epoch, self.role.value)
            return
        total = self.lun.unit.params.blocks
        if isinstance(msg, wire.Forward):
            if self._origin(msg.request_id) != peer:
                raise wire.PeerProtocolError(f"FORWARD with request id {msg.request_id:#x} "
                                             f"not of node {peer}")
            req = msg.to_request()
            lba, blocks = self._checked(req, total)
            if req.op is BlockOp.VERIFY:
                self._verify_origins[id(req)] = (peer, msg.request_id)
            actions = engine.receive(peer, Forward(peer, msg.request_id, lba, blocks, req))
        elif isinstance(msg, wire.Ordered):
            if msg.status:
                raise wire.PeerProtocolError(f"ORDERED with status {msg.status}")
            actions = engine.receive(peer, Repl(msg.seq, self.node, msg.request_id, 0, 0, None))
        elif isinstance(msg, wire.Ack):
            if msg.status:
                local = self._locals.get(msg.request_id)
                if local is not None:
                    # The peer lacks what this node applied: keep the region for its resync.
                    off, length = self._bytes(local.req)
                    if length:
                        self.bitmaps[peer].mark(off, length)
                    if self.drop_link is not None:
                        # The peer leaves the in-sync set (it drops the link too): this write
                        # completes as every one that waited for a lost peer does, once the
                        # quorum let this node go on, not with the peer's error.
                        why = errno.errorcode.get(msg.status, msg.status)
                        self.drop_link(peer, f"{self.label}: node {peer} failed a "
                                             f"replicated write ({why})")
                        return
                    if local.error is None:
                        why = errno.errorcode.get(msg.status, msg.status)
                        local.error = OSError(msg.status, f"node {peer}: {why}")
            actions = engine.receive(peer, Ack(msg.seq, msg.request_id, peer))
        else:
            origin = self._origin(msg.request_id)
            if origin is None or origin == self.node:
                raise wire.PeerProtocolError(f"{msg.TYPE.name} with request id "
                                             f"{msg.request_id:#x}")
            req = _request(msg)
            lba, blocks = self._checked(req, total)
            if req.op is BlockOp.VERIFY:
                self._verify_origins[id(req)] = (origin, msg.request_id)
            actions = engine.receive(peer, Repl(msg.seq, origin, msg.request_id, lba, blocks,
                                                req))
        self._run(engine, actions)

    def _accepts(self, peer: str, msg: wire.Message) -> bool:
        """Whether an ordering message from ``peer`` belongs to the running epoch."""
        return (self.role is Role.IN_SYNC and msg.epoch == self.epoch
                and self._link_gen.get(peer, 0) == self._epoch_link)

    def _checked(self, req: BlockRequest, total: int) -> tuple[int, int]:
        bs = self.lun.block_size
        lba, blocks = _extent(req, total)
        if lba + blocks > total:
            raise wire.PeerProtocolError(f"{req.op.name} of blocks {lba}+{blocks} beyond the "
                                         f"LUN's {total}")
        if req.data is not None and req.op is not BlockOp.STATE:
            n = len(req.data)
            want = {BlockOp.WRITE_SAME: bs, BlockOp.COMPARE_AND_WRITE: 2 * blocks * bs}.get(
                req.op, blocks * bs)
            if n != want:
                raise wire.PeerProtocolError(f"{req.op.name} with {n} bytes, expected {want}")
        return lba, blocks

    # ------------------------------------------------------------------ messages in
    def receive(self, peer: str, msg: wire.Message) -> None:
        """A message for this LUN from ``peer``; PeerProtocolError drops the link."""
        if isinstance(msg, (wire.Forward, wire.Ordered, *_SEQUENCED)):
            self._engine_message(peer, msg)
        elif isinstance(msg, wire.Ack):
            asked = self._replies.get(msg.request_id)
            if asked is not None and asked[0] == peer:
                del self._replies[msg.request_id]
                fut = asked[1]
                if not fut.done():
                    fut.set_result(msg.status)
            else:
                self._engine_message(peer, msg)
        elif isinstance(msg, wire.Control):
            self._control(peer, msg)
        elif isinstance(msg, wire.ResyncData):
            self._spawn(self._resync_data(peer, msg))
        elif isinstance(msg, wire.VerifyResult):
            sums = self._verify_sums.get(msg.request_id)
            if sums is not None:
                sums[peer] = msg.checksum
        else:
            log.debug("%s: ignored %s from node %s", self.label, msg.TYPE.name, peer)

    def _control(self, peer: str, msg: wire.Control) -> None:
        kind = msg.kind
        if kind is wire.ControlKind.STATE:
            body = msg.body
            if len(body) < _STATE.size:
                raise wire.PeerProtocolError("CONTROL STATE too short")
            (n,) = _STATE.unpack_from(body)
            try:
                gens = Generations.from_bytes(body[_STATE.size:_STATE.size + n])
            except ValueError as e:
                raise wire.PeerProtocolError(f"CONTROL STATE generations: {e}") from None
            state = (msg.epoch, msg.value, gens, body[_STATE.size + n:])
            xid = msg.request_id
            if msg.value & _REPLY:
                waiting = self._asked.get(peer)
                if waiting is not None and waiting[0] == xid and not waiting[1].done():
                    waiting[1].set_result(state)
                return  # else a reply to an exchange given up: ignored
            mine = self._asked.get(peer)
            if mine is not None and not mine[1].done():
                if self.node < peer:
                    return  # both asked at once: the lower node's exchange goes on
                mine[1].set_result(None)  # ours gives way; answer theirs
            self._linked.add(peer)
            self._incoming.add(peer)
            self._spawn(self._answer(peer, xid, state, self._link_gen.get(peer, 0)))
        elif kind is wire.ControlKind.SYNC_BEGIN:
            self._spawn(self._sync_begin(peer, msg))
        elif kind is wire.ControlKind.JOIN:
            self._spawn(self._join_as_target(peer, msg, self._link_gen.get(peer, 0)))
        elif kind is wire.ControlKind.REPAIR:
            if msg.value:
                self._spawn(self._repair_hold(peer, msg, time.monotonic()))
            elif self._repair_from == peer and self._repair_end is not None:
                self._repair_end.set()

    # ------------------------------------------------------------------ links
    def link_up(self, peer: str) -> None:
        # The peer's STATE may have come first and been answered already: one exchange per
        # link (an operator's choice starts another through choose_survivor).  The lower
        # node asks; the other asks only if nothing was decided a moment later: two requests
        # crossing could be decided twice, on states of different moments, once the first
        # exchange ended before the second request arrived.
        if peer not in self._linked:
            self._linked.add(peer)
            if self.node < peer:
                self._start_exchange(peer)
            else:
                self._spawn(self._retry_exchange(peer, self._link_gen.get(peer, 0)))

    def _stale(self, peer: str, gen: int, what: str) -> bool:
        """The link ``gen`` named is gone: what was being decided over it is void."""
        if self._link_gen.get(peer, 0) == gen:
            return False
        log.info("%s: %s with node %s abandoned: its link went away", self.label, what, peer)
        return True

    def peer_lost(self, peer: str) -> None:
        self._forget_link(peer)
        if self.role is Role.SYNC_TARGET:
            self._set_role(Role.CONNECTING, f"resync source node {peer} lost")
        elif self.role in (Role.IN_SYNC, Role.SYNC_SOURCE):
            self._spawn(self._become_degraded([peer], f"node {peer} lost"))

    def _forget_link(self, peer: str) -> None:
        """What was under way over the link to ``peer`` is void."""
        self._link_gen[peer] = self._link_gen.get(peer, 0) + 1
        self._linked.discard(peer)
        self._incoming.discard(peer)
        asked = self._asked.pop(peer, None)
        if asked is not None and not asked[1].done():
            asked[1].set_result(None)
        for rid, (who, fut) in list(self._replies.items()):
            if who == peer:
                del self._replies[rid]
                if not fut.done():
                    fut.set_result(errno.ENOTCONN)
        if self._repair_from == peer and self._repair_end is not None:
            self._repair_end.set()

    def choose_survivor(self, peers: list[str]) -> None:
        """An operator's decision: this replica's data wins over diverged or unrelated data
        at ``peers`` (the nodes linked now), which get a full resync from here."""
        if self.role not in (Role.SPLIT_BRAIN, Role.CONNECTING, Role.DEGRADED):
            raise ValueError(f"{self.label} is {self.role.value}: nothing to decide")
        if self.gens.inconsistent:
            raise ValueError(f"{self.label} holds a partial resync here; it cannot survive")
        self.survivor = True
        log.warning("%s: operator's choice: this node's data survives; %s get a full resync",
                    self.label, ", ".join(peers) or "peers (when they connect)")
        for peer in peers:
            self._start_exchange(peer)

    # ------------------------------------------------------------------ exchange of states
    # One node asks (STATE, a fresh exchange id), the other answers (STATE with the REPLY flag
    # and the same id); each sends its state with new requests held and every request in
    # flight finished, and keeps holding them until it has decided on the pair.  Both decide
    # on the same two states, so they decide the same.  Two nodes asking at once: the lower
    # node's exchange goes on, the other gives way and answers it.
    def _start_exchange(self, peer: str) -> None:
        self._spawn(self._ask(peer, self._link_gen.get(peer, 0)))

    def _my_state(self, peer: str, reply: bool) -> tuple[bytes, int]:
        body = self.gens.to_bytes()
        flags = ((_FRESH if self.fresh else 0) | (_SURVIVOR if self.survivor else 0)
                 | (_REPLY if reply else 0))
        return _STATE.pack(len(body)) + body + self.bitmaps[peer].to_bytes(), flags

    @_serialized
    async def _ask(self, peer: str, gen: int) -> None:
        if self._stale(peer, gen, "asking for the state") or peer in self._incoming:
            return  # the peer's own request, queued behind this, is answered instead
        if not await self._hold():
            self._spawn(self._retry_exchange(peer, gen))
            return
        if peer in self._incoming:  # its request came while ours waited: answer that
            self._unpause()
            return
        try:
            xid = self._new_rid()
            got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._asked[peer] = (xid, got)
            state, flags = self._my_state(peer, reply=False)
            if not self.send(peer, wire.Control(self.lun_id, wire.ControlKind.STATE, xid,
                                                self.epoch, flags, state)):
                return
            try:
                theirs = await asyncio.wait_for(asyncio.shield(got), 2 * self.join_timeout)
            except asyncio.TimeoutError:
                theirs = None
                log.warning("%s: node %s did not answer the state exchange; retried",
                            self.label, peer)
                self._spawn(self._retry_exchange(peer, gen))
            if theirs is not None and not self._stale(peer, gen, "the state exchange"):
                await self._decide(peer, theirs, gen)
        finally:
            if self._asked.get(peer, (None,))[0] == xid:
                del self._asked[peer]
            self._unpause()

    @_serialized
    async def _answer(self, peer: str, xid: int, theirs: Any, gen: int) -> None:
        self._incoming.discard(peer)
        if self._stale(peer, gen, "answering the state exchange"):
            return
        if not await self._hold():
            return  # the asker times out and asks again
        try:
            state, flags = self._my_state(peer, reply=True)
            if self.send(peer, wire.Control(self.lun_id, wire.ControlKind.STATE, xid,
                                            self.epoch, flags, state)):
                await self._decide(peer, theirs, gen)
        finally:
            self._unpause()

    async def _hold(self) -> bool:
        """Hold new requests and let those in flight finish; False (released) if they do
        not within the join timeout: they wait for something an exchange cannot give."""
        try:
            await self._pause(timeout=self.join_timeout)
        except asyncio.TimeoutError:
            log.warning("%s: requests in flight did not finish in %g s; state exchange "
                        "postponed", self.label, self.join_timeout)
            self._unpause()
            return False
        return True

    async def _retry_exchange(self, peer: str, gen: int) -> None:
        await asyncio.sleep(1.0)
        # An exchange (the peer's, or ours retried) may have been decided on this link
        # meanwhile: asking again then would start a second one over a resync or an epoch
        # already under way.
        if (peer in self._linked and self._decided.get(peer) != gen
                and not self._stale(peer, gen, "a retried state exchange")):
            self._start_exchange(peer)

    async def _decide(self, peer: str, state: Any, gen: int) -> None:
        """Both states known: both nodes reach the same decision (``decide`` is symmetric)."""
        self._decided[peer] = gen
        peer_epoch, flags, peer_gens, peer_bitmap = state
        peer_fresh, peer_survivor = bool(flags & _FRESH), bool(flags & _SURVIVOR)
        d = decide(self.gens, peer_gens, self.index[self.node], self.index[peer])
        outcome = d.outcome
        if outcome in _UNDECIDED and self.survivor != peer_survivor:
            outcome = Outcome.LOCAL_IS_SOURCE if self.survivor else Outcome.PEER_IS_SOURCE
            d = Decision(outcome, SyncKind.FULL, "operator's choice")
        elif outcome is Outcome.NO_SOURCE and self.fresh and peer_fresh:
            # Two never-written sparse files hold the same zeroes: one generation for both,
            # derived from what both know, so that neither needs to tell the other.
            seed = hashlib.sha256(f"{self.cluster_id}/{self.lun.unit.params.serial}"
                                  .encode()).digest()
            self.gens = self.gens.adopt_current(int.from_bytes(seed[:8], "big") or 1)
            outcome = Outcome.IN_SYNC
        self.last_decision = f"{outcome.value} ({d.sync.value}, rule {d.rule})"
        log.info("%s: node %s: %s", self.label, peer, self.last_decision)
        if outcome is Outcome.IN_SYNC:
            self.gens = self.gens.sync_finished(self.index[peer])
            await self._persist_gens()
            self.bitmaps[peer].clear_all()
            await self._flush_bitmaps()
            if not self._stale(peer, gen, "joining"):
                self._start_epoch(max(self.epoch, peer_epoch) + 1, peer)
        elif outcome is Outcome.LOCAL_IS_SOURCE:
            await self._begin_source(peer, d.sync, peer_bitmap, gen)
        elif outcome is Outcome.PEER_IS_SOURCE:
            self._set_role(Role.SYNC_TARGET, f"node {peer} is the resync source")
        else:
            log.error("%s: node %s and this node hold diverged or unrelated data (%s); "
                      "replication stays off until an operator picks the survivor",
                      self.label, peer, self.last_decision)
            if self.role is not Role.SPLIT_BRAIN:
                self.role = Role.SPLIT_BRAIN

    def _start_epoch(self, epoch: int, peer: str) -> None:
        members = {self.node, peer}
        self.epoch = epoch
        self._epoch_link = self._link_gen.get(peer, 0)
        self.engine = OrderingEngine(self.node, members, min(members))
        self.fresh = False
        self._set_role(Role.IN_SYNC, f"in sync with node {peer}, epoch {epoch}")
        if self.on_in_sync is not None:
            self.on_in_sync(peer)

    @_serialized
    async def _become_degraded(self, lost: list[str], why: str) -> None:
        """Leave the in-sync set (or start alone): track ``lost`` peers from now on."""
        await self._pause(drain=False)
        try:
            # The quorum decides first (the witness's vote, mirror/quorum.py): requests that
            # waited for the lost peer are acknowledged only by a node that may go on alone.
            alone = True if self.may_go_alone is None else await self.may_go_alone()
            if not alone:
                self.quorum_ok = False
                self.quorum_fenced = True
                for local in self._locals.values():
                    local.error = local.error or OSError(errno.ENOLINK, "no quorum")
            engine = self.engine
            redo: list[tuple[int, Any]] = []
            if engine is not None:
                actions: list[Any] = []
                for peer in lost:
                    actions += engine.peer_lost(peer)[0]
                redo = engine.abandon_unsequenced()
            # Every local request in flight may be missing at the lost peers (a superset of
            # the engine's list, which cannot tell a FLUSH from a write of the whole LUN).
            for local in self._locals.values():
                off, length = self._bytes(local.req)
                if length:
                    for peer in lost:
                        self.bitmaps[peer].mark(off, length)
            if not self.gens.current and alone:
                self.gens = self.gens.new_current(os.urandom)
            if self.gens.current:
                for peer in lost:
                    self.gens = self.gens.start_tracking(self.index[peer])
            await self._persist_gens()  # before any write that waited for them completes
            if engine is not None:
                self.engine = None
                self._set_role(Role.DEGRADED, why)
                self._run(engine, actions)
                for rid, local in redo:
                    if alone:
                        self._spawn(self._redo_alone(rid, local))
                    else:
                        local.error = local.error or OSError(errno.ENOLINK, "no quorum")
                        self._locals.pop(rid, None)
                        if not local.done.done():
                            local.done.set_result(None)
                # Writes already ordered finish locally before new ones may overlap them.
                deadline = time.monotonic() + 30
                while not engine.idle and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
            else:
                self._set_role(Role.DEGRADED, why)
            if not alone:
                self._set_alua(False)
            if self.plan is not None:
                self.plan.cancel()
                self.plan = None
        finally:
            self._unpause()

    async def _redo_alone(self, rid: int, local: _Local) -> None:
        try:
            local.result = await self._apply_alone(local.req)
        except OSError as e:
            local.error = e
        self._locals.pop(rid, None)
        if not local.done.done():
            local.done.set_result(None)

    # ------------------------------------------------------------------ resync
    async def _begin_source(self, peer: str, kind: SyncKind, peer_bitmap: bytes,
                            gen: int) -> None:
        bm = self.bitmaps[peer]
        if kind is SyncKind.FULL:
            bm.mark_all()
        elif peer_bitmap:
            try:
                bm.merge(DirtyBitmap.from_bytes(peer_bitmap))
            except ValueError as e:
                log.warning("%s: node %s sent an unusable bitmap (%s): full resync",
                            self.label, peer, e)
                bm.mark_all()
        await self._flush_bitmaps()
        self.gens, handle = self.gens.begin_sync_source(self.index[peer])
        await self._persist_gens()
        if self._stale(peer, gen, "starting a resync"):
            return  # the bitmap keeps every region for the next link
        rid = self._new_rid()
        reply = self._expect(rid, peer)
        self.send(peer, wire.Control(self.lun_id, wire.ControlKind.SYNC_BEGIN, rid, self.epoch,
                                     handle))
        self._set_role(Role.SYNC_SOURCE, f"resyncing {bm.dirty_bytes} bytes to node {peer}")
        self._spawn(self._resync(peer, reply, gen))

    async def _resync(self, peer: str, begun: asyncio.Future[int], gen: int) -> None:
        status = await self._answer_of(begun)
        if status != 0:
            log.warning("%s: node %s did not start the resync (%s)", self.label, peer,
                        errno.errorcode.get(status, status))
            return
        bm = self.bitmaps[peer]
        bs = self.lun.block_size
        plan = self.plan = ResyncPlan(bm, block_size=bs, chunk_bytes=RESYNC_CHUNK,
                                      max_in_flight=RESYNC_IN_FLIGHT)
        self.plan_peer = peer
        loop = asyncio.get_running_loop()
        # Foreground I/O first: the rate backs off while requests on this LUN slow down
        # (AIMD on their mean latency), up to the configured cap.
        cap = self.resync_rate or RESYNC_MAX_RATE
        throttle = self.throttle = ResyncThrottle(cap, max(cap / 64, 1 << 20),
                                                  target_latency=RESYNC_TARGET_LATENCY,
                                                  now=loop.time())
        seen_ops, seen_ns = self.ops, self.ns
        running: set[asyncio.Task[None]] = set()
        started, copied = time.monotonic(), self.resync_bytes
        while self._resyncing(peer, plan, gen):
            # Writes keep dirtying what was copied: once little is left, stop sweeping and
            # copy the rest with new requests held (_join), or a hot region never converges.
            closing = bm.dirty_bytes <= FINAL_PASS_BYTES
            for job in ([] if closing else plan.next_jobs(loop.time())):
                ops, ns = self.ops - seen_ops, self.ns - seen_ns
                seen_ops, seen_ns = self.ops, self.ns
                throttle.foreground(ops, ns / ops / 1e9 if ops else None, loop.time(),
                                    self._inflight)
                wait = throttle.take(job.length, loop.time())
                if wait > 0:
                    await asyncio.sleep(wait)
                running.add(asyncio.ensure_future(self._copy(peer, plan, job)))
            if running:
                _, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                continue
            if not plan.finished and not closing:
                await asyncio.sleep(0.01)  # every dirty region has a pass running elsewhere
                continue
            if not await self._join(peer, plan, gen):
                if self._resync_retry:
                    await asyncio.sleep(self._resync_retry)  # the last pass failed there
                continue
            dt = time.monotonic() - started
            n = self.resync_bytes - copied
            log.info("%s: resync to node %s done: %d bytes in %.2f s (%.1f MiB/s)",
                     self.label, peer, n, dt, n / max(dt, 1e-6) / (1 << 20))
            return

    def _resyncing(self, peer: str, plan: ResyncPlan, gen: int) -> bool:
        return (self.role is Role.SYNC_SOURCE and self.plan is plan
                and not self._stale(peer, gen, "the resync"))

    async def _final_pass(self, peer: str, gen: int) -> bool:
        """Copy every region still dirty for ``peer``, nothing being written meanwhile."""
        bm = self.bitmaps[peer]
        bs = self.lun.block_size
        for region in list(bm.dirty_regions()):
            offset, length = bm.region_extent(region)
            lba, blocks = offset // bs, length // bs
            buf = await self.lun.apply_block(BlockRequest(BlockOp.READ, lba, blocks))
            try:
                rid = self._new_rid()
                reply = self._expect(rid, peer)
                self.send(peer, wire.ResyncData(self.lun_id, rid, 0, lba, blocks, buf))
                status = await self._answer_of(reply)
            finally:
                release_buffer(buf)
            if status != 0:
                if status != errno.ENOTCONN:
                    self._copy_failed(peer, lba, status)
                return False
            if self._stale(peer, gen, "the last resync pass"):
                return False
            self._resync_retry = 0.0
            self.resync_bytes += length
            bm.clear(region)
        return True

    async def _copy(self, peer: str, plan: ResyncPlan, job: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            buf = await self.lun.apply_block(BlockRequest(BlockOp.READ, job.lba, job.blocks))
        except OSError as e:
            log.error("%s: resync read at block %d: %s", self.label, job.lba, e)
            status = e.errno or errno.EIO
        else:
            try:
                rid = self._new_rid()
                reply = self._expect(rid, peer)
                self.send(peer, wire.ResyncData(self.lun_id, rid, 0, job.lba, job.blocks, buf))
                status = await reply
            finally:
                release_buffer(buf)
        if status == 0:
            self._resync_retry = 0.0
            self.resync_bytes += job.length
            plan.job_done(job, loop.time())
        else:
            if status == errno.ENOTCONN:
                plan.cancel()
            else:
                # The region stays in flight meanwhile: not copied again before the wait.
                await asyncio.sleep(self._copy_failed(peer, job.lba, status))
            plan.job_failed(job, loop.time())

    def _copy_failed(self, peer: str, lba: int, status: int) -> float:
        """A copy the target could not store (full or failing storage, most likely): wait
        longer each time, up to RESYNC_RETRY_S[1], rather than flood it and both logs."""
        first, longest = RESYNC_RETRY_S
        if not self._resync_retry:
            log.warning("%s: node %s failed to store resync data at block %d (%s); retrying "
                        "with waits up to %g s", self.label, peer, lba,
                        errno.errorcode.get(status, status), longest)
        self._resync_retry = min(longest, max(first, 2 * self._resync_retry))
        return self._resync_retry

    @_serialized
    async def _join(self, peer: str, plan: ResyncPlan, gen: int) -> bool:
        """Little or nothing left: with new requests held, copy what remains, then make the
        peer an in-sync replica.  The hold lasts FINAL_PASS_BYTES of copying at most."""
        await self._pause()
        try:
            if self.plan is not plan or self.bitmaps[peer].dirty_bytes > FINAL_PASS_BYTES:
                return False
            if self._stale(peer, gen, "joining"):
                return True
            if not await self._final_pass(peer, gen):
                return self._stale(peer, gen, "joining")
            after = self.gens.sync_finished(self.index[peer])
            rid = self._new_rid()
            reply = self._expect(rid, peer)
            epoch = self.epoch + 1
            self.plan = None
            # The engine exists before JOIN leaves: the peer may forward as soon as it joins.
            self._start_epoch(epoch, peer)
            self.send(peer, wire.Control(self.lun_id, wire.ControlKind.JOIN, rid, epoch, 0,
                                         after.to_bytes()))
            status = await self._answer_of(reply)
            if status != 0:
                log.warning("%s: node %s did not join (%s)", self.label, peer,
                            errno.errorcode.get(status, status))
                # The peer may have adopted ``after`` before its answer was lost with the
                # link: it may hold ``current`` now, so no write here may carry that name.
                # A new one (the old bitmap, still kept, covers both cases at the next
                # exchange: the peer at ``current`` or still at the resync handle).
                self.gens = self.gens.new_current(os.urandom)
                await self._persist_gens()
                if status != errno.ENOTCONN:
                    # Still linked but not joined: track it again and start over.
                    self._spawn(self._rejoin(peer))
                return True
            self.gens = after
            self.survivor = False
            await self._persist_gens()
            self.bitmaps[peer].clear_all()
            await self._flush_bitmaps()
            return True
        finally:
            self._unpause()

    async def _rejoin(self, peer: str) -> None:
        await self._become_degraded([peer], f"node {peer} did not join")
        self._start_exchange(peer)

    @_serialized
    async def _sync_begin(self, peer: str, msg: wire.Control) -> None:
        status = 0
        if self.role is not Role.SYNC_TARGET or not msg.value:
            status = errno.EPROTO
        else:
            self.gens = self.gens.begin_sync_target(msg.value)
            await self._persist_gens()
        self.send(peer, wire.Ack(self.lun_id, 0, 0, msg.request_id, status))

    async def _resync_data(self, peer: str, msg: wire.ResyncData) -> None:
        status = 0
        repair = self._repair_from == peer and self.role is Role.IN_SYNC
        if not repair and not self._takes_copies_from(peer):
            status = errno.EPROTO
        else:
            self._repair_writes += repair
            try:
                self._checked(BlockRequest(BlockOp.WRITE, msg.lba, msg.blocks, msg.data),
                              self.lun.unit.params.blocks)
                await self._store_copy(peer, BlockRequest(BlockOp.WRITE, msg.lba, msg.blocks,
                                                          msg.data, fua=True))
            except (OSError, wire.PeerProtocolError) as e:
                log.error("%s: resync data at block %d: %s", self.label, msg.lba, e)
                status = getattr(e, "errno", None) or errno.EIO
            finally:
                self._repair_writes -= repair
        self.send(peer, wire.Ack(self.lun_id, 0, 0, msg.request_id, status))

    def _takes_copies_from(self, peer: str) -> bool:
        return self.role is Role.SYNC_TARGET

    async def _store_copy(self, peer: str, req: BlockRequest) -> None:
        await self.lun.apply_block(req)

    @_serialized
    async def _join_as_target(self, peer: str, msg: wire.Control, gen: int) -> None:
        # The JOIN counts only on the link it came by: once that is gone, the source has seen
        # ENOTCONN, kept its bitmap and tracks this node again (writes of the new epoch may
        # never have reached it), so joining anyway would lose them.  Whatever was adopted
        # before the loss is harmless: the next exchange finds the source still tracking.
        status = 0
        try:
            if self.role is not Role.SYNC_TARGET or self._stale(peer, gen, "joining"):
                raise OSError(errno.EPROTO, f"JOIN while {self.role.value}")
            source = Generations.from_bytes(msg.body)
            await self.lun.backend.flush()
            if self._stale(peer, gen, "joining"):
                return
            self.gens = self.gens.adopt(source)
            await self._persist_gens()
            for bm in self.bitmaps.values():
                bm.clear_all()
            await self._flush_bitmaps()
            if self._stale(peer, gen, "joining"):
                return
            self._start_epoch(msg.epoch, peer)
        except (OSError, ValueError) as e:
            log.error("%s: cannot join node %s: %s", self.label, peer, e)
            status = getattr(e, "errno", None) or errno.EPROTO
        self.send(peer, wire.Ack(self.lun_id, 0, 0, msg.request_id, status))

    # ------------------------------------------------------------------ online verify
    def start_verify(self, repair: bool = False) -> None:
        """Compare every region's checksum across the in-sync replicas, while I/O runs: each
        region is checksummed everywhere at the same point of the LUN's order (VERIFY).
        ``repair``: this node's data is right (the operator's word); every region that
        differs is copied from here over the other replicas when the walk ends."""
        if self.role is not Role.IN_SYNC:
            raise ValueError(f"{self.label} is {self.role.value}: only replicas in sync can "
                             "be compared")
        if self.verify_task is not None and not self.verify_task.done():
            raise ValueError(f"a verify of {self.label} is running")
        plan = self.verify = VerifyPlan(self.lun.backend.size, block_size=self.lun.block_size,
                                        source=self.node if repair else None)
        self.verify_finished_unix = None
        self.repaired_regions = 0
        log.info("%s: verify of %d regions started", self.label, plan.regions)
        self.verify_task = self._spawn(self._verify_run(plan))

    async def _verify_run(self, plan: VerifyPlan) -> None:
        loop = asyncio.get_running_loop()
        running: dict[asyncio.Future[Any], Any] = {}
        bucket = TokenBucket(self.resync_rate, self.resync_rate) if self.resync_rate else None
        try:
            while not plan.finished:
                if self.role is Role.IN_SYNC:
                    for job in plan.next_batch(VERIFY_IN_FLIGHT - len(running), loop.time()):
                        if bucket is not None:
                            wait = bucket.take(job.length, loop.time())
                            if wait > 0:
                                await asyncio.sleep(wait)
                        req = BlockRequest(BlockOp.VERIFY, job.lba, job.blocks)
                        running[asyncio.ensure_future(self.submit(req))] = job
                if not running:
                    log.warning("%s: verify stopped: the replica is %s", self.label,
                                self.role.value)
                    return
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    job = running.pop(fut)
                    sums = None if fut.exception() is not None else fut.result()
                    if not isinstance(sums, dict):  # failed, or answered by this node alone
                        plan.abandon(job.region, loop.time())
                        continue
                    mismatch = plan.compare(job.region, sums, loop.time())
                    if mismatch is not None:
                        log.error("%s: verify: region %d (blocks %d+%d) differs: %s",
                                  self.label, mismatch.region, mismatch.lba, mismatch.blocks,
                                  ", ".join(f"{n} {c.hex()[:12]}" for n, c in
                                            sorted(sums.items())))
        finally:
            for fut in running:
                fut.cancel()
        st = plan.status(loop.time())
        log.info("%s: verify done: %d regions compared, %d skipped, %d differ", self.label,
                 st.regions_checked, st.regions_skipped, st.mismatch_count)
        if plan.source == self.node:
            await self._repair(plan.repair_jobs())
        self.verify_finished_unix = time.time()

    async def _repair(self, jobs: list[RepairJob]) -> None:
        """Copy this node's version of every region the verify found different over the
        other replicas', a batch at a time with new writes held and drained on every node
        involved: no write can land between the read here and the copy there."""
        for i in range(0, len(jobs), REPAIR_BATCH):
            batch = jobs[i:i + REPAIR_BATCH]
            if not await self._repair_batch(batch, sorted({p for j in batch for p in j.targets})):
                log.error("%s: repair stopped: %d region(s) copied, %d not", self.label,
                          self.repaired_regions, len(jobs) - self.repaired_regions)
                return
        if jobs:
            log.warning("%s: repair done: %d region(s) copied from this node over the "
                        "other replicas", self.label, self.repaired_regions)

    @_serialized
    async def _repair_batch(self, batch: list[RepairJob], peers: list[str]) -> bool:
        if self.role is not Role.IN_SYNC or not await self._hold():
            return False
        held: list[str] = []
        try:
            for peer in peers:
                rid = self._new_rid()
                reply = self._expect(rid, peer)
                if not self.send(peer, wire.Control(self.lun_id, wire.ControlKind.REPAIR, rid,
                                                    self.epoch, 1)):
                    return False
                status = await self._answer_of(reply)
                if status:
                    log.warning("%s: node %s did not hold its writes for the repair (%s)",
                                self.label, peer, errno.errorcode.get(status, status))
                    return False
                held.append(peer)
            for job in batch:
                buf = await self.lun.apply_block(BlockRequest(BlockOp.READ, job.lba,
                                                              job.blocks))
                try:
                    for peer in job.targets:
                        rid = self._new_rid()
                        reply = self._expect(rid, peer)
                        self.send(peer, wire.ResyncData(self.lun_id, rid, 0, job.lba,
                                                        job.blocks, buf))
                        status = await self._answer_of(reply)
                        if status:
                            log.warning("%s: node %s did not store repaired region %d (%s)",
                                        self.label, peer, job.region,
                                        errno.errorcode.get(status, status))
                            return False
                finally:
                    release_buffer(buf)
                self.repaired_regions += 1
            return True
        except OSError as e:
            log.error("%s: repair read at block %d: %s", self.label, batch[0].lba, e)
            return False
        finally:
            for peer in held:
                self.send(peer, wire.Control(self.lun_id, wire.ControlKind.REPAIR, 0,
                                             self.epoch, 0))
            self._unpause()

    @_serialized
    async def _repair_hold(self, peer: str, msg: wire.Control, arrived: float) -> None:
        """The peer repairs regions here: hold and drain new writes until it is done (or
        gone, or out of time: a hung source must not hold this node's writes forever)."""
        if self.role is not Role.IN_SYNC or msg.epoch != self.epoch:
            self.send(peer, wire.Ack(self.lun_id, 0, 0, msg.request_id, errno.EPROTO))
            return
        if time.monotonic() - arrived > self.join_timeout / 2:
            # Queued behind another change (the peer's own repair, both at once): the source
            # gives up waiting soon, and a hold it no longer uses would stall writes here.
            self.send(peer, wire.Ack(self.lun_id, 0, 0, msg.request_id, errno.EBUSY))
            return
        if not await self._hold() or time.monotonic() - arrived > 0.75 * self.join_timeout:
            self._unpause()
            self.send(peer, wire.Ack(self.lun_id, 0, 0, msg.request_id, errno.EBUSY))
            return
        end = self._repair_end = asyncio.Event()
        self._repair_from = peer
        try:
            self.send(peer, wire.Ack(self.lun_id, 0, 0, msg.request_id, 0))
            try:
                await asyncio.wait_for(end.wait(), 2 * self.join_timeout)
            except asyncio.TimeoutError:
                log.warning("%s: node %s held this node's writes too long for a repair; "
                            "released", self.label, peer)
        finally:
            self._repair_from = ""
            self._repair_end = None
            # A copy still being written would race the writes released now.
            deadline = time.monotonic() + self.join_timeout
            while self._repair_writes and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            self._unpause()

    def _resync_progress(self) -> dict[str, Any] | None:
        plan = self.plan
        if plan is None:
            return None
        p = plan.progress(asyncio.get_running_loop().time())
        return {"to": self.plan_peer, "bytes_done": p.bytes_done,
                "bytes_remaining": p.bytes_remaining,
                "rate_mib_s": None if p.rate is None else round(p.rate / (1 << 20), 1),
                "eta_s": None if p.eta is None else round(p.eta, 1),
                "throttle_mib_s": None if self.throttle is None
                else round(self.throttle.rate / (1 << 20), 1)}

    def verify_status(self) -> dict[str, Any] | None:
        plan = self.verify
        if plan is None:
            return None
        st = plan.status(asyncio.get_running_loop().time())
        return {"running": self.verify_task is not None and not self.verify_task.done(),
                "regions_total": st.regions_total, "regions_checked": st.regions_checked,
                "regions_skipped": st.regions_skipped, "mismatches": st.mismatch_count,
                "differing_regions": [m.region for m in st.mismatches],
                "eta_s": None if st.eta is None else round(st.eta, 1),
                "finished_unix": self.verify_finished_unix,
                "repair": plan.source == self.node, "repaired_regions": self.repaired_regions}

    # ------------------------------------------------------------------ helpers
    def _new_rid(self) -> int:
        rid = self._req_base | self._next_req
        self._next_req += 1
        return rid

    async def _answer_of(self, reply: asyncio.Future[int]) -> int:
        """The peer's status for a request (ETIMEDOUT if it does not come in time)."""
        try:
            return await asyncio.wait_for(reply, self.join_timeout)
        except asyncio.TimeoutError:
            return errno.ETIMEDOUT

    def _expect(self, rid: int, peer: str) -> asyncio.Future[int]:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._replies[rid] = (peer, fut)
        return fut

    async def _pause(self, drain: bool = True, timeout: float | None = None) -> None:
        self._paused = True
        self._resume.clear()
        if drain:
            await asyncio.wait_for(self._idle.wait(), timeout)

    def _unpause(self) -> None:
        self._paused = False
        self._resume.set()

    def _set_role(self, role: Role, why: str) -> None:
        if role is not self.role:
            log.info("%s: %s -> %s: %s", self.label, self.role.value, role.value, why)
            self.role = role
        self._set_alua(role in _SERVING)

    def _set_alua(self, serving: bool) -> None:
        if not self.quorum_ok:
            # Fenced: initiators use the other node's paths.  Still deciding (a lease ran out,
            # the witness has not answered yet): transitioning, which initiators retry on the
            # same path, so that the node that wins does not lose its paths meanwhile.
            state = ALUA_UNAVAILABLE if self.quorum_fenced else ALUA_TRANSITIONING
        else:
            state = ALUA_ACTIVE_OPTIMIZED if serving else ALUA_TRANSITIONING
        alua.set_state(self.lun.unit, state)

    def set_quorum(self, ok: bool, fenced: bool = False) -> None:
        """The node gained or lost quorum: serve (as the role allows) or nothing at all."""
        self.quorum_ok = ok
        self.quorum_fenced = fenced and not ok
        self._set_alua(self.role in _SERVING or (self.role is Role.SPLIT_BRAIN
                                                 and self._was_serving))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: internal error", self.label, exc_info=task.exception())

    async def _persist_gens(self) -> None:
        async with self._gens_io:
            await self.run_blocking(self.store.write, self.name + ".gen", self.gens.to_bytes())
        self.fresh = False  # a record exists now: only two never-used files count as equal

    async def _flush_bitmaps(self) -> None:
        async with self._bitmap_io:
            await self._flush_bitmaps_locked()

    async def _flush_bitmaps_locked(self) -> None:
        for peer, bm in self.bitmaps.items():
            if bm.changed:
                data = bm.to_bytes()
                bm.changed = False
                try:
                    await self.run_blocking(self.store.write, f"{self.name}.bm-{peer}", data)
                except BaseException:
                    bm.changed = True
                    raise

    async def _bitmap_flusher(self) -> None:
        while True:
            await asyncio.sleep(BITMAP_FLUSH_INTERVAL)
            try:
                await self._flush_bitmaps()
            except OSError as e:
                log.error("%s: cannot write a dirty bitmap: %s", self.label, e)

    # ------------------------------------------------------------------ activity log
    async def _al_begin(self, off: int, length: int) -> None:
        al = self.al
        assert al is not None
        while True:
            try:
                tx = al.begin_write(off, length)
                break
            except ActivityLogFull:
                room: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._al_room.append(room)
                await room
        if tx is None:
            return
        fut = self._tx_done.get(tx)
        if fut is None:
            fut = self._tx_done[tx] = asyncio.get_running_loop().create_future()
        if self._al_task is None:
            self._al_task = asyncio.ensure_future(self._al_writer())
        await asyncio.shield(fut)
        if tx.state is TxState.ABORTED:
            self._al_end(off, length)
            raise OSError(errno.EIO, "the activity log could not be written")

    def _al_end(self, off: int, length: int) -> None:
        assert self.al is not None
        self.al.end_write(off, length)
        if self._al_room:
            rooms, self._al_room = self._al_room, []
            for room in rooms:
                if not room.done():
                    room.set_result(None)

    def _before_evict(self, regions: frozenset[int]) -> None:
        """``regions`` (activity-log regions) leave the log once the bitmaps are flushed."""

    async def _al_writer(self) -> None:
        al = self.al
        assert al is not None
        try:
            while (tx := al.next_transaction()) is not None:
                try:
                    if tx.evicted:
                        self._before_evict(tx.evicted)
                        await self._flush_bitmaps()  # a region leaves the log only when safe
                    await self.run_blocking(al.persist, tx)
                except OSError as e:
                    log.error("%s: activity log write failed: %s", self.label, e)
                    al.abort(tx)
                else:
                    al.commit(tx)
                fut = self._tx_done.pop(tx, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
        finally:
            self._al_task = None

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        return {
            "lun_id": self.lun_id, "role": self.role.value, "epoch": self.epoch,
            "generation": f"{self.gens.current:016x}",
            "inconsistent": self.gens.inconsistent,
            "sequencer": self.engine.sequencer if self.engine else None,
            "in_sync": sorted(self.engine.in_sync) if self.engine else [self.node],
            "dirty_bytes": {p: bm.dirty_bytes for p, bm in self.bitmaps.items()},
            "resync_bytes": self.resync_bytes,
            "resync_remaining_bytes": self.bitmaps[self.plan_peer].dirty_bytes
            if self.plan is not None and self.plan_peer else 0,
            "resync": self._resync_progress(),
            "last_decision": self.last_decision,
            "in_flight": self._inflight,
            "verify": self.verify_status(),
        }
