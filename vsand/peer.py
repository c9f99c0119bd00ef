"""Peer links: the asyncio side of the mirror's node-to-node connections.

Theory of operation.  A ``PeerLink`` is one TCP connection to one peer node.  Received bytes
land straight in a ``MessageReader`` (BufferedProtocol); each whole message first drives the
sans-IO ``Handshake`` (under a deadline), and once that is done goes to ``on_message``.
Output is queued as encoded buffers and written with one ``writelines`` per pass of the loop,
never a syscall per message.  Heartbeats run on loop timers: a HEARTBEAT every ``interval``,
answered at once with HEARTBEAT_ACK; a link that receives nothing at all for ``timeout`` is
declared dead.  Any loss (silence, EOF, reset, GOODBYE, malformed frame, local close) is
reported exactly once through ``on_lost``, and only for a link that was reported up.

A ``PeerEndpoint`` owns all of a node's links: it accepts on a port, dials peers with a
reconnect loop, and keeps at most one link per peer and network (link index: the i-th
address of every node).  When two links to the same peer over the same network complete
their handshakes (both nodes dialled at once), both ends apply the same rule and so keep the
same TCP connection: the link dialled by the node with the lower node id wins.

Several networks (peers in ``multipath``): every link heartbeats (a dead network shows as a
down link while the others still work), and one link per peer is *active*: it alone carries
anything but heartbeats, and the caller sees only it (``on_up``/``on_lost``, ``links``).
Both ends must agree which link that is, and both must lose it when either end does: the
node with the lower id picks the first link up and says so on it (CONTROL ACTIVE, its first
message there); the other node makes that link its active one when the word arrives,
dropping the one it had (a loss, if the first node lost it without this end noticing: a
one-way cut).  When an active link is lost, every other link to that peer is closed too, so
that the peer loses its active link as well, whichever it was, and both ends start over
together on the next link that comes up.  Other messages on a link that is not active are
dropped: they belong to a stream the receiver has given up or not yet taken.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Collection, Sequence
from typing import cast

from .mirror.handshake import Handshake, LinkRole, LunInfo, NodeIdentity, RandomBytes
from .mirror.messages import (
    MAX_REASON, Buffer, ChallengeResponse, Control, ControlKind, Goodbye, Heartbeat,
    HeartbeatAck, Hello, Message, MessageReader, PeerProtocolError, Welcome, encode,
)

log = logging.getLogger("vsand.peer")

HIGH_WATER = 4 << 20  # bytes in the transport's buffer before drain() makes senders wait
RTT_ALPHA = 0.125  # EWMA weight of a new RTT sample (TCP's SRTT gain)
MAX_RTT_NS = 60 * 10**9  # an echoed timestamp older than this is a peer's bug, not an RTT
DUPLICATE = "duplicate link"


class LinkState(enum.Enum):
    HANDSHAKE = "handshake"
    UP = "up"
    CLOSED = "closed"


OnUp = Callable[["PeerLink"], None]
OnReady = Callable[["PeerLink"], bool]
OnMessage = Callable[["PeerLink", Message], None]
OnLost = Callable[["PeerLink", str], None]


def _ignore(*_: object) -> None:
    pass


class PeerLink(asyncio.BufferedProtocol):
    """One connection to one peer node.

    ``on_message(link, msg)`` receives every message after the handshake except GOODBYE
    (which ends the link); HEARTBEAT and HEARTBEAT_ACK are answered and measured here and
    passed on too, since they carry the sender's epoch.  Bulk payloads (WRITE, WRITE_SAME,
    FORWARD, RESYNC_DATA ``data``) are memoryviews into the receive buffer: the callback must
    copy them or drop them promptly, since a held view pins that buffer.

    When the handshake completes, ``on_ready(link)`` decides whether to keep the link (the
    endpoint refuses duplicates there), then ``on_up(link)`` runs with the link ``UP``;
    ``on_lost(link, reason)`` runs once when an ``UP`` link goes away, whoever closed it.
    """

    def __init__(self, handshake: Handshake, *, dialled: bool,
                 on_message: OnMessage = _ignore, on_lost: OnLost = _ignore,
                 on_up: OnUp | None = None, on_ready: OnReady | None = None,
                 expected_peer: str | None = None, heartbeat_interval: float = 0.5, heartbeat_timeout: float = 3.0,
                 handshake_timeout: float = 5.0) -> None:
        self.handshake = handshake
        self.dialled = dialled
        self.expected_peer = expected_peer  # the node a dialled link was meant to reach
        self.on_message = on_message
        self.on_lost = on_lost
        self.on_up = on_up
        self.on_ready = on_ready
        self.interval = heartbeat_interval
        self.timeout = heartbeat_timeout
        self.handshake_timeout = handshake_timeout
        self.state = LinkState.HANDSHAKE
        self.lost_reason: str | None = None
        self.transport: asyncio.Transport | None = None
        self.address = "?"
        self.epoch = 0  # put in our heartbeats; the quorum layer sets it
        # Three or more nodes: the membership's epoch for our heartbeats, and its grant (the
        # epoch, or 0) for the peer's, asked per heartbeat (vsand/views.py).
        self.beat_epoch: Callable[[], int] | None = None
        self.grant: Callable[[str, int], int] | None = None
        self.rtt_last: float | None = None  # seconds
        self.rtt_avg: float | None = None
        self.last_rx = 0.0  # loop.time() of the last received bytes
        self.heartbeats_sent = 0
        self.path = 0  # which network: the index of the address it was dialled at
        self._loop = asyncio.get_running_loop()
        self._reader = MessageReader()
        self._out: list[Buffer] = []
        self._flush_scheduled = False
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._deadline: asyncio.TimerHandle | None = None
        self._beat: asyncio.TimerHandle | None = None
        self._rtt_from: float | None = None  # when our last handshake batch went out
        self._settled = asyncio.Event()  # up, or closed before getting there
        self._down = asyncio.Event()  # closed (logically: no more messages either way)
        self._gone: asyncio.Future[None] = self._loop.create_future()  # socket closed
        self._frozen = False  # a failover drill: silent until it drops the link

    # ---------------------------------------------------------------- identity
    @property
    def peer_id(self) -> str | None:
        """The peer's node id once its HELLO was accepted (authenticated once UP)."""
        try:
            return self.handshake.peer.node_id
        except RuntimeError:
            return self.expected_peer

    @property
    def dialler_id(self) -> str | None:
        return self.handshake.local.node_id if self.dialled else self.peer_id

    @property
    def common_luns(self) -> dict[int, LunInfo]:
        return self.handshake.common_luns

    def _name(self) -> str:
        peer = self.peer_id
        return f"node {peer} ({self.address})" if peer else self.address

    # ---------------------------------------------------------------- asyncio protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        self.address = f"{peername[0]}:{peername[1]}" if peername else "?"
        transport.set_write_buffer_limits(high=HIGH_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:  # small acks and heartbeats must not wait for Nagle
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
        self.last_rx = self._loop.time()
        self._deadline = self._loop.call_later(self.handshake_timeout, self._handshake_expired)
        first = self.handshake.start()  # empty on an accepting side: it waits for a HELLO
        for msg in first:
            self._queue(msg)
        if first:
            self._rtt_from = self.last_rx
            self.flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.writable()

    def buffer_updated(self, nbytes: int) -> None:
        self._reader.commit(nbytes)
        self._process()

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is LinkState.HANDSHAKE:
            reason = self.handshake.failed or "connection closed during the handshake"
            log.warning("peer link %s: handshake failed: %s", self._name(), reason)
        self._lose(f"connection lost: {exc}" if exc else "connection closed by the peer")
        self._out.clear()
        if not self._gone.done():
            self._gone.set_result(None)

    def pause_writing(self) -> None:
        # Reading goes on: pausing it would starve heartbeats and make a slow peer look dead.
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drainers(None)

    # ---------------------------------------------------------------- input
    def _process(self) -> None:
        now = self.last_rx = self._loop.time()
        try:
            while self.state is not LinkState.CLOSED:
                msg = self._reader.next_message()
                if msg is None:
                    break
                if self.state is LinkState.HANDSHAKE:
                    self._handshake_step(msg, now)
                else:
                    self._dispatch(msg)
        except PeerProtocolError as e:
            log.warning("peer link %s: protocol error: %s; closing", self._name(), e.reason)
            self._lose(f"protocol error: {e.reason}", goodbye=e.reason)
        except Exception:
            log.exception("peer link %s: internal error handling a message; closing",
                          self._name())
            self._lose("internal error", goodbye="internal error")
        # Everything answered during this read goes out in one writelines.
        if self._out:
            self.flush()

    def _handshake_step(self, msg: Message, now: float) -> None:
        hs = self.handshake
        if self._rtt_from is not None and self.rtt_last is None:
            # The first answer to our first handshake batch: a round trip, plus an HMAC.
            self._sample_rtt(now - self._rtt_from)
        self._rtt_from = None
        out = hs.receive(msg)
        for reply in out:
            self._queue(reply)
        if out:
            self._rtt_from = now
        if hs.failed is not None:
            log.warning("peer link %s: handshake failed: %s", self._name(), hs.failed)
            self._lose(hs.failed)  # the GOODBYE is queued already; _lose flushes it
        elif hs.done:
            self._established()

    def _established(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self.on_ready is not None and not self.on_ready(self):
            self._lose("refused by this node", goodbye="refused")  # no-op if on_ready closed it
            self._settled.set()
            return
        self.state = LinkState.UP
        self._settled.set()
        rtt = f"{self.rtt_last * 1e3:.2f} ms" if self.rtt_last is not None else "unknown"
        log.info("peer link up: node %s (%s, %s), rtt %s, common LUNs %s", self.peer_id,
                 self.address, "dialled" if self.dialled else "accepted", rtt,
                 sorted(self.common_luns) or "none")
        self._heartbeat()
        if self.on_up is not None:
            try:
                self.on_up(self)
            except Exception:
                log.exception("peer link %s: on_up failed", self._name())

    def _dispatch(self, msg: Message) -> None:
        t = type(msg)
        if t is Heartbeat:
            assert isinstance(msg, Heartbeat)
            grant = self.grant
            epoch = self.epoch if grant is None else grant(self.peer_id or "", msg.epoch)
            self._queue(HeartbeatAck(msg.seq, msg.sent_ns, epoch))
        elif t is HeartbeatAck:
            assert isinstance(msg, HeartbeatAck)
            rtt_ns = time.monotonic_ns() - msg.echo_ns
            if 0 <= rtt_ns < MAX_RTT_NS:
                self._sample_rtt(rtt_ns / 1e9)
        elif t is Goodbye:
            assert isinstance(msg, Goodbye)
            self._lose(f"node {self.peer_id} said goodbye: {msg.reason or 'no reason given'}")
            return
        elif t in (Hello, ChallengeResponse, Welcome):
            raise PeerProtocolError(f"{msg.TYPE.name} after the handshake")
        self.on_message(self, msg)

    def _sample_rtt(self, seconds: float) -> None:
        self.rtt_last = seconds
        avg = self.rtt_avg
        self.rtt_avg = seconds if avg is None else avg + RTT_ALPHA * (seconds - avg)

    # ---------------------------------------------------------------- timers
    def _handshake_expired(self) -> None:
        if self.state is LinkState.HANDSHAKE:
            reason = f"handshake not completed within {self.handshake_timeout:g} s"
            log.warning("peer link %s: handshake failed: %s", self._name(), reason)
            self._lose(reason, goodbye=reason)

    def freeze(self, seconds: float) -> None:
        """A failover drill: behave as a hung node for ``seconds`` (read nothing, send nothing,
        no heartbeats: the peer sees silence, as from a frozen process), then drop the
        connection so that both ends reconnect afresh."""
        if self.state is not LinkState.UP or self.transport is None:
            return
        log.warning("peer link %s: frozen for %g s (failover drill)", self._name(), seconds)
        self._frozen = True
        self._out.clear()
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None
        self.transport.pause_reading()
        self._loop.call_later(seconds, self._lose, "failover drill over", None, True, True)

    def _heartbeat(self) -> None:
        self._beat = None
        if self.state is not LinkState.UP or self._frozen:
            return
        silent = self._loop.time() - self.last_rx
        if silent >= self.timeout:
            # The peer may be frozen with a full window: abort, as close() would wait on it.
            self._lose(f"nothing received for {silent:.2f} s (timeout {self.timeout:g} s)",
                       abort=True)
            return
        self.heartbeats_sent += 1
        epoch = self.epoch if self.beat_epoch is None else self.beat_epoch()
        self._queue(Heartbeat(self.heartbeats_sent, time.monotonic_ns(), epoch))
        self._beat = self._loop.call_later(self.interval, self._heartbeat)

    # ---------------------------------------------------------------- output
    def send(self, msg: Message) -> None:
        """Queue ``msg``; it goes out with everything else queued in this pass of the loop.

        A payload buffer is referenced, not copied, until it is written.  On a closed link the
        message is dropped: its loss has been (or is being) reported through ``on_lost``.
        """
        if self.state is not LinkState.UP:
            if self.state is LinkState.CLOSED:
                return
            raise RuntimeError("the link is not up yet")
        self._queue(msg)

    def _queue(self, msg: Message) -> None:
        if self._frozen:
            return
        self._out += encode(msg)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        transport = self.transport
        if self._out and transport is not None and not transport.is_closing():
            out, self._out = self._out, []
            transport.writelines(out)

    async def drain(self) -> None:
        """Write what is queued; wait while the transport holds more than HIGH_WATER bytes.

        Raises ConnectionError once the link is closed.
        """
        self.flush()
        if self.state is LinkState.CLOSED:
            raise ConnectionError(f"peer link {self._name()} is closed: {self.lost_reason}")
        if not self._paused:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._drain_waiters:
                self._drain_waiters.remove(waiter)

    def _wake_drainers(self, exc: Exception | None) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)

    # ---------------------------------------------------------------- closing
    def close(self, reason: str = "closed by this node") -> None:
        """Send GOODBYE(reason) after what is queued, then close."""
        self._lose(reason, goodbye=reason, local=True)

    def abort(self) -> None:
        """Drop the connection at once, unannounced (as a crashed process would)."""
        self._lose("aborted by this node", abort=True, local=True)

    def _lose(self, reason: str, goodbye: str | None = None, abort: bool = False,
              local: bool = False) -> None:
        if self.state is LinkState.CLOSED:
            return
        was_up = self.state is LinkState.UP
        self.state = LinkState.CLOSED
        self.lost_reason = reason
        for handle in (self._deadline, self._beat):
            if handle is not None:
                handle.cancel()
        transport = self.transport
        if transport is not None:
            if abort:
                transport.abort()
            else:
                if goodbye is not None:
                    short = goodbye.encode()[:MAX_REASON].decode(errors="ignore")
                    self._out += encode(Goodbye(short))
                self.flush()
                transport.close()  # after the buffered bytes, GOODBYE included
        self._wake_drainers(ConnectionError(reason))
        self._settled.set()
        self._down.set()
        if was_up:
            # A loss this node chose (shutdown, duplicate) is routine; any other is a warning.
            log.log(logging.INFO if local else logging.WARNING, "peer link lost: node %s (%s): %s",
                    self.peer_id, self.address, reason)
            try:
                self.on_lost(self, reason)
            except Exception:
                log.exception("peer link %s: on_lost failed", self._name())

    async def wait_settled(self) -> None:
        """Until the link is up or closed."""
        await self._settled.wait()

    async def wait_down(self) -> None:
        """Until the link is closed (as far as messages go)."""
        await self._down.wait()


class PeerEndpoint:
    """This node's side of all its peer links; see the module docstring.

    ``on_up(link)`` and ``on_lost(link, reason)`` come in pairs, one pair per link that was
    kept; when a duplicate replaces a link that was already up, the old one's ``on_lost``
    (reason "duplicate link") comes before the new one's ``on_up``.  ``close()`` reports the
    links it closes through ``on_lost`` too.
    """

    def __init__(self, local: NodeIdentity, secret: bytes, peers_allowed: Collection[str], *,
                 random_bytes: RandomBytes = os.urandom, on_up: OnUp | None = None,
                 on_message: OnMessage = _ignore, on_lost: OnLost = _ignore,
                 heartbeat_interval: float = 0.5, heartbeat_timeout: float = 3.0,
                 handshake_timeout: float = 5.0, backoff_min: float = 0.1,
                 backoff_max: float = 2.0) -> None:
        self.local = local
        self._secret = secret
        self.peers_allowed = frozenset(peers_allowed)
        self._random = random_bytes
        self.on_up = on_up
        self.on_message = on_message
        self.on_lost = on_lost
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.handshake_timeout = handshake_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.links: dict[str, PeerLink] = {}  # the active link per peer node id
        self.paths: dict[tuple[str, int], PeerLink] = {}  # every UP link, by (peer, path)
        # This node's addresses, one per network: an accepted link's path is the index of
        # the address it was dialled at.
        self.local_addresses: Sequence[tuple[str, int]] = ()
        self.multipath: set[str] = set()  # peers linked over several networks
        self.beat_epoch: Callable[[], int] | None = None  # given to every link (PeerLink)
        self.grant: Callable[[str, int], int] | None = None
        self._all: set[PeerLink] = set()  # every link with a socket, handshaking ones too
        self._servers: list[asyncio.Server] = []
        self._dialers: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._closed = False
        self._handshake(LinkRole.SYNC)  # a bad secret or identity fails here, not per link

    def _handshake(self, role: LinkRole | None) -> Handshake:
        return Handshake(self.local, self._secret, self.peers_allowed, self._random, role=role)

    def _new_link(self, dialled: bool, expected: str | None = None) -> PeerLink:
        # Prune links whose sockets are gone; the set only serves close().
        self._all = {link for link in self._all if not link._gone.done()}
        # An accepting side passes no role: it says nothing until the caller's HELLO.
        link = PeerLink(self._handshake(LinkRole.SYNC if dialled else None), dialled=dialled,
                        on_up=self._link_up, on_message=self._link_message,
                        on_lost=self._link_lost,
                        on_ready=self._link_ready, expected_peer=expected,
                        heartbeat_interval=self.heartbeat_interval,
                        heartbeat_timeout=self.heartbeat_timeout,
                        handshake_timeout=self.handshake_timeout)
        link.beat_epoch, link.grant = self.beat_epoch, self.grant
        self._all.add(link)
        return link

    async def listen(self, host: str, port: int) -> asyncio.Server:
        """Accept peer connections on (host, port); port 0 picks a free one (see sockets)."""
        if self._closed:
            raise RuntimeError("endpoint is closed")
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: self._new_link(dialled=False), host, port)
        self._servers.append(server)
        return server

    def connect(self, peer: str, host: str, port: int, path: int = 0) -> None:
        """Keep a link to ``peer`` at (host, port), its address on network ``path``: dial
        now and again whenever it is lost."""
        if self._closed:
            raise RuntimeError("endpoint is closed")
        if peer not in self.peers_allowed:
            raise ValueError(f"node {peer!r} is not an allowed peer")
        if (peer, path) in self._dialers:
            raise ValueError(f"already dialling node {peer!r} on link {path}")
        self._dialers[(peer, path)] = asyncio.create_task(
            self._redial(peer, host, port, path), name=f"vsand-peer-dial-{peer}-{path}")

    def links_of(self, peer: str) -> list[PeerLink]:
        """Every link up to ``peer``, by path."""
        return [link for (p, _), link in sorted(self.paths.items(), key=lambda kv: kv[0])
                if p == peer]

    async def dial_once(self, peer: str, host: str, port: int,
                        path: int = 0) -> PeerLink | None:
        """One attempt: the link if it came up and was kept, else None."""
        loop = asyncio.get_running_loop()
        link = self._new_link(dialled=True, expected=peer)
        link.path = path
        try:
            await asyncio.wait_for(loop.create_connection(lambda: link, host, port),
                                   self.handshake_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            self._all.discard(link)
            log.debug("peer link to node %s at %s:%d: cannot connect: %s", peer, host, port,
                      e or type(e).__name__)
            return None
        await link.wait_settled()  # bounded by the link's handshake deadline
        return link if self.paths.get((peer, path)) is link else None

    async def _redial(self, peer: str, host: str, port: int, path: int) -> None:
        delay = self.backoff_min
        failures = 0
        while not self._closed:
            try:
                link = (self.paths.get((peer, path))
                        or await self.dial_once(peer, host, port, path))
            except Exception:  # e.g. a bad address: keep trying rather than die unseen
                log.exception("peer link to node %s at %s:%d: dial failed", peer, host, port)
                link = None
            if link is not None:
                failures = 0
                delay = self.backoff_min
                await link.wait_down()
            else:
                failures += 1
                if failures == 1:  # one line when a peer becomes unreachable, not one per try
                    log.info("peer link to node %s at %s:%d: not up; retrying every %g-%g s",
                             peer, host, port, self.backoff_min, self.backoff_max)
            await asyncio.sleep(delay)
            if link is None:
                delay = min(delay * 2, self.backoff_max)

    def _link_ready(self, link: PeerLink) -> bool:
        peer = link.peer_id
        assert peer is not None
        if self._closed:
            link.close("node shutting down")
            return False
        if link.handshake.role is not LinkRole.SYNC:
            log.warning("peer link %s: refused: a %s link; only sync links are served",
                        link._name(), link.handshake.role)
            link.close("only sync links are served on this port")
            return False
        if link.expected_peer is not None and peer != link.expected_peer:
            log.warning("peer link %s: dialled node %s but node %s answered; closing",
                        link.address, link.expected_peer, peer)
            link.close(f"dialled node {link.expected_peer}, reached node {peer}")
            return False
        if not link.dialled:
            link.path = self._path_of(link)
        old = self.paths.get((peer, link.path))
        if old is not None:
            keep = _preferred(old, link)
            lose = link if keep is old else old
            log.info("peer link: node %s has two links; keeping the one dialled by node %s "
                     "(%s), closing %s", peer, keep.dialler_id, keep.address, lose.address)
            lose.close(DUPLICATE)  # reports old's loss first if old loses
            if keep is old:
                return False
        self.paths[(peer, link.path)] = link
        if peer not in self.multipath or self._leads(peer):
            self.links.setdefault(peer, link)
        return True

    def _leads(self, peer: str) -> bool:
        """This node picks the active link to ``peer``."""
        return self.local.node_id < peer

    def _path_of(self, link: PeerLink) -> int:
        """The network an accepted link came by: which of this node's addresses was dialled
        (0 when none matches, e.g. behind address translation)."""
        sockname = link.transport.get_extra_info("sockname") if link.transport else None
        if not sockname or len(self.local_addresses) < 2:
            return 0
        try:
            local = ipaddress.ip_address(sockname[0])
            if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped:
                local = local.ipv4_mapped
        except ValueError:
            return 0
        for i, (host, _) in enumerate(self.local_addresses):
            try:
                if ipaddress.ip_address(host) == local:
                    return i
            except ValueError:
                continue  # a host name: not comparable with the socket's address
        return 0

    def _link_up(self, link: PeerLink) -> None:
        peer = link.peer_id
        if peer is not None and self.links.get(peer) is link:
            if peer in self.multipath:
                log.info("peer link %d to node %s carries the replication", link.path, peer)
                link.send(Control(0, ControlKind.ACTIVE, 0))
            if self.on_up is not None:
                self.on_up(link)
        else:
            log.info("peer link %d to node %s up (standby)", link.path, peer)

    def _link_message(self, link: PeerLink, msg: Message) -> None:
        # Every replicated write passes here: one network costs one truth test.
        if self.multipath and type(msg) not in (Heartbeat, HeartbeatAck):
            peer = link.peer_id
            if peer in self.multipath:
                if type(msg) is Control and msg.kind is ControlKind.ACTIVE:  # type: ignore[union-attr]
                    if not self._leads(peer):  # type: ignore[arg-type]
                        self._follow(link)
                    return
                if self.links.get(peer) is not link:  # type: ignore[arg-type]
                    log.debug("peer link %d to node %s: %s dropped: not the active link",
                              link.path, peer, msg.TYPE.name)
                    return
        self.on_message(link, msg)

    def _follow(self, link: PeerLink) -> None:
        """The peer chose ``link`` to carry the replication: make it the active one here."""
        peer = link.peer_id
        assert peer is not None
        old = self.links.get(peer)
        if old is link:
            return
        if old is not None:
            # The peer gave up the old link (it lost it: one way, or this end would have
            # noticed too): so does this end, as a loss, like any lost active link.
            self._drop_active(peer, old, f"node {peer} moved the replication to link "
                                         f"{link.path}", keep=link)
            old.close(f"replaced by link {link.path}")
        self.links[peer] = link
        log.info("peer link %d to node %s carries the replication (its choice)", link.path,
                 peer)
        if self.on_up is not None:
            self.on_up(link)

    def _link_lost(self, link: PeerLink, reason: str) -> None:
        peer = link.peer_id
        if peer is None:
            return
        if self.paths.get((peer, link.path)) is link:
            del self.paths[(peer, link.path)]
        if self.links.get(peer) is not link:
            return  # a standby link: its dialer brings it back
        self._drop_active(peer, link, reason)

    def _drop_active(self, peer: str, link: PeerLink, reason: str,
                     keep: PeerLink | None = None) -> None:
        """The active link to ``peer`` is gone: every other one but ``keep`` is closed (the
        peer then loses its active link too, whichever it was), then the caller hears of
        the loss."""
        del self.links[peer]
        others = [o for o in self.links_of(peer) if o is not link and o is not keep]
        # The peer's votes and leases may have come over any link: its silence counts from
        # the last thing any of them received.
        link.last_rx = max([link.last_rx, *(o.last_rx for o in self.links_of(peer))])
        for other in others:
            other.close(f"link {link.path}, which carried the replication, was lost: every "
                        "link starts over")
        try:
            self.on_lost(link, reason)
        except Exception:
            log.exception("peer link %s: on_lost failed", link._name())

    async def close(self, grace: float = 1.0) -> None:
        """Stop accepting and dialling, say GOODBYE on every link, wait for the sockets."""
        if self._closed:
            return
        self._closed = True
        for server in self._servers:
            server.close()
        dialers = list(self._dialers.values())
        self._dialers.clear()
        for task in dialers:
            task.cancel()
        await asyncio.gather(*dialers, return_exceptions=True)
        for link in list(self._all):
            link.close("node shutting down")
        for server in self._servers:
            await server.wait_closed()
        gone = [link._gone for link in self._all if link.transport is not None]
        if gone:
            await asyncio.wait(gone, timeout=grace)
        for link in self._all:
            if link.transport is not None and not link._gone.done():
                link.transport.abort()  # a peer that does not read its GOODBYE
        if gone:
            await asyncio.wait(gone, timeout=grace)
        self._all.clear()


def _preferred(a: PeerLink, b: PeerLink) -> PeerLink:
    """Which of two links to one peer both ends keep: the lower dialler id's, so both ends
    choose the same connection.  Two links dialled by the same node: the newer, since a node
    dials only when it has no link, so the older one is stale at this end."""
    da, db = a.dialler_id or "", b.dialler_id or ""
    if da == db:
        return b
    return a if da < db else b
