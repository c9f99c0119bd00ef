"""This node's votes: its peer's (a lease renewed by heartbeats) or the witness's (per epoch).

The rules and the timing argument are ``mirror/quorum.py``'s.  Here: the lease is renewed by
every HEARTBEAT_ACK from the peer (from the time that heartbeat was sent); when the peer is
lost, ``may_go_alone`` asks the witness for the next epoch (one request shared by every LUN)
and records a grant before anyone relies on it; a loop re-evaluates ``serving`` a few times per
heartbeat interval and tells the LUNs when it changes, so that a node whose lease ran out
stops serving reads as well as writes: its ALUA state turns transitioning while the witness
has not decided (initiators retry the path) and unavailable once it is fenced (initiators
move to the other node).  A refused node
asks again every few seconds while its peer stays away: if the peer never got the vote (the
witness was down when they lost each other), the next request may succeed.

The peer's answers count only while this node is joined to it: every LUN in sync with it
(``peer_joined``) and no loss since, from the start on.  Otherwise a node coming back, or
starting behind, would serve its old data on the new link's heartbeats while its LUNs still
wait for the witness's refusal or their resync.  Every epoch change is told to a linked peer
(``on_epoch``), which adopts it once joined.  And since a stopped or starved process cannot
notice its lease running out, the connections call ``check`` before executing what they
received, so that commands that waited in a socket meet the fence, not the old ALUA state.

Without a configured witness there is no third vote: the node trusts its peer timeout alone
(the behaviour of earlier versions), and says so at start.  With several networks between
the nodes it can do better when only the network that carried the replication failed: the
node with the higher name waits a peer timeout for the peer to come back over another one
before going on alone.  If it does, the peer is alive and going on (it lost the link too,
and the lower node never waits), so this node stands aside, serving nothing, until it has
caught up (``peer_joined``): both going on alone would be a split brain at the reconnection.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from .config_cluster import ClusterConfig
from .mirror.messages import Control, ControlKind, Message
from .mirror.metastore import MetaStore
from .mirror.quorum import Lease, lease_for

log = logging.getLogger("vsand.quorum")

STATE = "quorum.state"
RETRY_INTERVAL = 2.0  # seconds between vote requests of a fenced node


class QuorumKeeper:
    def __init__(self, config: ClusterConfig, node: str, store: MetaStore,
                 send: Callable[[str, Message], bool], run_blocking: Callable[..., Any],
                 on_change: Callable[[bool, bool], None]) -> None:
        self.config = config
        self.node = node
        self.store = store
        self.send = send
        self.run_blocking = run_blocking
        self.on_change = on_change
        self.enabled = config.witness is not None
        self.lease = Lease(lease_for(config.peer_timeout))
        self.epoch = 0
        self.granted = False  # the witness's vote for ``epoch`` is ours
        self.peer_up = False
        self.witness_up = False
        self.serving_now = not self.enabled
        # The witness refused (or could not be asked) and the lease is gone: fenced, until this
        # node serves again.  Not serving but not fenced: the decision is still out.
        self.fenced = False
        self._told_fenced = False
        self.on_epoch: Callable[[int], None] | None = None  # tells the peer a new epoch
        self._vote: asyncio.Future[bool] | None = None
        self._replies: dict[int, asyncio.Future[int]] = {}
        self._next_rid = 1
        self._last_request = float("-inf")
        self._peer_epoch = 0
        self._peer_heard = float("-inf")  # loop time the lost peer was last heard from
        # The peer's answers renew the lease only while this node is joined to it: every LUN
        # in sync with it (``peer_joined``) and no loss since.  A node that was cut off (or
        # paused) and comes back must not serve its old data on a lease from the new link
        # while its LUNs still wait for the witness's refusal, nor a node that starts behind.
        # The newest answer is kept for the moment it joins.
        self._joined = False
        self._not_before = float("-inf")  # no vote request before (monotonic): step_aside
        self._answered_unjoined = float("-inf")
        self.closing = False
        # No witness, several networks: the peer came back over another one after a loss,
        # and this node (the higher name) let it go on alone (``_alone_without_witness``).
        self.multipath = False
        self._aside = False
        peers = [n.name for n in config.nodes if n.name != node]
        self._peer_name = peers[0] if peers else ""
        self._task: asyncio.Task[None] | None = None
        raw = store.read(STATE)
        if raw:
            try:
                saved = json.loads(raw)
                self.epoch, self.granted = int(saved["epoch"]), bool(saved["granted"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"quorum state {STATE} is damaged: {e}") from None

    def start(self) -> None:
        if not self.enabled:
            log.warning("no witness configured: a node that loses its peer goes on alone after "
                        "%g s, so a network partition leaves both nodes writing (split brain); "
                        "set cluster.witness", self.config.peer_timeout)
            return
        self._task = asyncio.ensure_future(self._watch())

    async def close(self) -> None:
        self.closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # ------------------------------------------------------------------ events from links
    def link_up(self, peer: str) -> None:
        if peer == "witness":
            self.witness_up = True
        else:
            self.peer_up = True

    def link_lost(self, peer: str, last_heard: float) -> None:
        """``last_heard``: loop time the link last received anything (t_r)."""
        if peer == "witness":
            self.witness_up = False
            for fut in self._replies.values():
                if not fut.done():
                    fut.set_result(errno.ENOTCONN)
        else:
            # The lease stays: it is time, not the link, that ends it (the peer keeps its own
            # until then too, and neither completes a write alone before the witness votes).
            self.peer_up = False
            self._peer_heard = last_heard
            self._joined = False

    def heartbeat_answered(self, sent_ns: int) -> None:
        """The peer answered a heartbeat this node sent at ``sent_ns`` (monotonic)."""
        if not self._joined:
            self._answered_unjoined = max(self._answered_unjoined, sent_ns / 1e9)
        else:
            self.lease.renewed(sent_ns / 1e9)

    def reply(self, request_id: int, status: int) -> bool:
        fut = self._replies.pop(request_id, None)
        if fut is None:
            return False
        if not fut.done():
            fut.set_result(status)
        return True

    def peer_epoch(self, epoch: int) -> None:
        """What the peer said its epoch is; adopted only once every LUN is in sync
        (``peer_joined``): a node still behind must not learn it, so that it can never win
        a vote against the node that holds the newer data.  Joined already, it is the
        epoch of a vote the peer won late (``_request``): shared at once."""
        self._peer_epoch = epoch
        if self._joined and self.peer_up and epoch > self.epoch and not self.granted:
            self.epoch = epoch
            asyncio.ensure_future(self._persist())

    # ------------------------------------------------------------------ decisions
    def serving(self) -> bool:
        if not self.enabled:
            return not self._aside
        return self.lease.valid(time.monotonic()) or self.granted

    def check(self) -> None:
        """Called before commands are executed: a lease that ran out while this node could
        not notice (a stopped process, a starved event loop) fences the LUNs now, before the
        commands that waited in the sockets meanwhile are answered."""
        if self.serving_now and not self.granted and not self.lease.valid(time.monotonic()):
            self._evaluate()

    async def may_go_alone(self) -> bool:
        """Whether this node may serve without its peer: the witness's vote for the next
        epoch (or, restarting, for the epoch it already won).  One request at a time."""
        if not self.enabled:
            return await self._alone_without_witness()
        if self.closing:
            return False  # shutting down: nothing waits for an answer any more
        if self.granted and self.serving_now:
            # Serving on the witness's vote already (a link that came and went again): the
            # peer cannot hold a lease since, as it counts none before it is in sync again.
            return True
        if self._vote is None or self._vote.done():
            self._vote = asyncio.ensure_future(self._request())
        return await asyncio.shield(self._vote)

    async def _alone_without_witness(self) -> bool:
        """No third vote: go on alone, unless several networks link the nodes, this node has
        the higher name, and the peer comes back within a peer timeout (module docstring)."""
        if not self.multipath or self.node < self._peer_name or self.closing:
            self._set_aside(False)
            return True
        deadline = time.monotonic() + self.config.peer_timeout
        while not self.peer_up and not self.closing and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if not self.peer_up:
            self._set_aside(False)
            return True
        log.warning("node %s is back over another network and goes on: this node serves "
                    "nothing until it has caught up (no witness to choose; both going on "
                    "would split the brain)", self._peer_name)
        self._set_aside(True)
        return False

    def _set_aside(self, aside: bool) -> None:
        if aside != self._aside:
            self._aside = aside
            self.fenced = aside
            self._evaluate()

    def step_aside(self) -> None:
        """This node's storage failed a replicated write and it is leaving its peer: the
        peer, whose storage works, should win the vote that follows, so this node asks only
        half a peer timeout later (the peer, seeing the link close, asks at once)."""
        self._not_before = time.monotonic() + self.config.peer_timeout / 2

    async def _request(self) -> bool:
        wait = self._not_before - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        epoch = self.epoch if self.granted else self.epoch + 1
        self._last_request = time.monotonic()
        deadline = time.monotonic() + self.config.peer_timeout
        while not self.witness_up and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        rid = self._next_rid
        self._next_rid += 1
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._replies[rid] = fut
        if not self.send("witness", Control(0, ControlKind.VOTE, rid, epoch=epoch)):
            self._replies.pop(rid, None)
            log.error("no quorum: the witness is unreachable and node's peer is away")
            self.fenced = True
            self._evaluate()
            return False
        try:
            status = await asyncio.wait_for(fut, self.config.peer_timeout)
        except asyncio.TimeoutError:
            status = errno.ETIMEDOUT
        finally:
            self._replies.pop(rid, None)
        if self.peer_up and self._joined:
            # The peer came back and every LUN is in sync again while the request was out: the
            # answer changes nothing here.  But an epoch granted is spent, and a grant kept
            # while joined would let this node serve on it while the peer wins the next one:
            # adopt the epoch without the grant, and tell the peer.
            if status == 0 and epoch > self.epoch:
                self.epoch, self.granted = epoch, False
                await self._persist()
                self._tell_epoch()
            return True
        if status != 0:
            log.error("no quorum: the witness refused its vote for epoch %d (%s): the other "
                      "node has it, or the witness cannot be reached; serving nothing", epoch,
                      errno.errorcode.get(status, status))
            self.lease.drop()
            self.fenced = True
            self._evaluate()
            return False
        self.epoch, self.granted = epoch, True
        await self._persist()
        self._tell_epoch()  # a peer linked again (resyncing) adopts it once it is in sync
        # The lost peer's lease may run until t_r + lease (mirror/quorum.py): a loss seen at
        # once (a reset connection) must still wait that long before serving alone.
        loop = asyncio.get_running_loop()
        wait = self._peer_heard + self.lease.duration - loop.time()
        if wait > 0:
            self.granted = False
            await asyncio.sleep(wait)
            if self.peer_up and self._joined:
                return True  # joined again meanwhile: the grant is spent (peer_joined)
            self.granted = True
        log.warning("quorum: the witness's vote for epoch %d: this node serves without its "
                    "peer", epoch)
        self._evaluate()
        return True

    async def _persist(self) -> None:
        data = json.dumps({"epoch": self.epoch, "granted": self.granted}).encode()
        await self.run_blocking(self.store.write, STATE, data)

    def peer_joined(self) -> None:
        """Every mirrored LUN is in sync with the peer again: both share the newest epoch, and
        the next loss asks the witness for a fresh one (a kept grant would let this node win
        an epoch the peer may win too)."""
        if not self._joined:
            self._joined = True
            self.lease.renewed(self._answered_unjoined)
        self._aside = False
        epoch = max(self.epoch, self._peer_epoch)
        if (epoch, False) != (self.epoch, self.granted):
            moved = epoch != self.epoch
            self.epoch, self.granted = epoch, False
            asyncio.ensure_future(self._persist())
            if moved:
                self._tell_epoch()
        self._evaluate()

    def _tell_epoch(self) -> None:
        """Every epoch change goes to the peer (INFO) if it is linked: a peer that never
        hears of an epoch this node won would ask the witness for it, in vain, forever."""
        if self.on_epoch is not None:
            self.on_epoch(self.epoch)

    # ------------------------------------------------------------------ the watch
    def _evaluate(self) -> None:
        ok = self.serving()
        if ok:
            self.fenced = False
        if ok != self.serving_now or (not ok and self.fenced != self._told_fenced):
            self.serving_now = ok
            self._told_fenced = self.fenced
            if ok:
                log.info("quorum held: serving")
            elif self.fenced:
                log.warning("quorum lost: fenced, serving nothing (ALUA unavailable)")
            else:
                log.warning("quorum lease ran out: serving nothing until the witness decides "
                            "(ALUA transitioning)")
            self.on_change(ok, self.fenced)

    async def _watch(self) -> None:
        step = self.config.heartbeat_interval / 4
        while True:
            await asyncio.sleep(step)
            self._evaluate()
            if (not self.serving_now and not self.peer_up and self.witness_up
                    and time.monotonic() - self._last_request > RETRY_INTERVAL
                    and (self._vote is None or self._vote.done())):
                self._vote = asyncio.ensure_future(self._request())

    def status(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "serving": self.serving_now, "epoch": self.epoch,
                "witness_vote": self.granted, "witness": "up" if self.witness_up else "down",
                "lease_s": round(max(0.0, self.lease.until - time.monotonic()), 2)}
