"""The authenticated handshake that opens every peer link.

Theory of operation
-------------------
Both ends run the same machine; there is no client or server side, and it works whether one
end or both send HELLO first::

    each side:  HELLO(cluster, node, versions, nonce, role, LUN table)
    each side, once it has the peer's HELLO:    CHALLENGE_RESPONSE(mac)
    each side, once the peer's mac verifies:    WELCOME(version)
    done when our WELCOME is sent and the peer's has arrived.

A HELLO's body is a ``HelloBody``, encoded here; messages.Hello carries it as bytes.  A side's
mac is HMAC-SHA256(secret, "vsand-peer-v1" || own nonce || peer nonce || own node id || peer
node id || own HELLO body || peer HELLO body), each part length-prefixed, the bodies as the
bytes that travelled.  "Own" always comes first, so:

* replay: the peer's nonce is fresh in every session, so a mac recorded in another session
  does not verify;
* reflection: a node only ever computes macs with its own id in the sender's place, and
  refuses a peer that claims that id, so it can never be made to compute the mac it expects
  to receive.

The HELLO checks that need no secret (cluster id, node ids, version, link role) run when the
HELLO arrives; the LUN tables are compared only after the peer has proven it knows the secret,
so configuration errors are reported for real peers only.  A LUN configured on one side only
is not an error: it is just not mirrored on this link (``common_luns`` holds those both sides
agree on, ``lun_notes`` says what was left out).  The same serial with a different size,
block size or LUN id is a configuration error that fails the handshake.

A failure sets ``failed`` to the reason and ``receive`` returns a GOODBYE carrying it, which
the caller sends before closing.  A bad mac is reported as "authentication failed" and
nothing more.  The caller owns the deadline: a handshake not done in a few seconds should be
abandoned.  Once ``done``, the messages that follow on the link belong to the replicator.

This module reads no entropy and no clock: the caller passes ``random_bytes`` (os.urandom).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass

from .messages import (
    FRAME_VERSION, MAX_REASON, ChallengeResponse, Goodbye, Hello, Message, MsgType, Welcome,
)

LABEL = b"vsand-peer-v1"
MIN_SECRET = 16  # bytes; a shorter shared secret is refused at construction
AUTH_FAILED = "authentication failed"
NONCE_LEN = 32
MAX_NAME = 255  # bytes of UTF-8 in a cluster id, node id or LUN serial

RandomBytes = Callable[[int], bytes]


class LinkRole(enum.IntEnum):
    SYNC = 1  # replicated I/O, resync, verify
    HEARTBEAT = 2  # liveness only, on its own connection so bulk data cannot delay it


@dataclass(frozen=True, slots=True)
class LunInfo:
    """One mirrored LUN as a node announces it."""
    lun_id: int  # the id frames carry in their LUN field: the same on every node
    serial: str  # cluster-wide identity (VPD 0x80)
    block_size: int
    blocks: int


_HELLO_FIXED = struct.Struct("!BBB32s")
_LUN_FIXED = struct.Struct("!HIQ")
_COUNT = struct.Struct("!H")


class HelloError(ValueError):
    """A HELLO body that cannot be decoded or is inconsistent."""


@dataclass(frozen=True, slots=True)
class HelloBody:
    """What a HELLO message carries (messages.Hello holds it encoded).

    Layout: u8 min version, u8 max version, u8 link role, 32-byte nonce, cluster id, node id
    (each a u8 length and UTF-8), u16 LUN count, then per LUN: u16 id, u32 block size,
    u64 blocks, serial (u8 length and UTF-8).  Big-endian.
    """
    cluster_id: str
    node_id: str
    min_version: int
    max_version: int
    nonce: bytes
    role: LinkRole
    luns: tuple[LunInfo, ...]

    def encode(self) -> bytes:
        problem = self.problem()
        if problem:
            raise HelloError(problem)
        out = [_HELLO_FIXED.pack(self.min_version, self.max_version, self.role, self.nonce)]
        for name in (self.cluster_id, self.node_id):
            out += _name(name)
        out.append(_COUNT.pack(len(self.luns)))
        for lun in self.luns:
            out.append(_LUN_FIXED.pack(lun.lun_id, lun.block_size, lun.blocks))
            out += _name(lun.serial)
        return b"".join(out)

    @classmethod
    def decode(cls, raw: bytes) -> HelloBody:
        if len(raw) < _HELLO_FIXED.size:
            raise HelloError("HELLO too short")
        lo, hi, role_value, nonce = _HELLO_FIXED.unpack_from(raw)
        try:
            role = LinkRole(role_value)
        except ValueError:
            raise HelloError(f"unknown link role {role_value}") from None
        at = _HELLO_FIXED.size
        cluster_id, at = _take_name(raw, at, "cluster id")
        node_id, at = _take_name(raw, at, "node id")
        if at + _COUNT.size > len(raw):
            raise HelloError("HELLO ends before its LUN count")
        (count,) = _COUNT.unpack_from(raw, at)
        at += _COUNT.size
        luns = []
        for _ in range(count):
            if at + _LUN_FIXED.size > len(raw):
                raise HelloError("HELLO ends inside its LUN table")
            lun_id, block_size, blocks = _LUN_FIXED.unpack_from(raw, at)
            serial, at = _take_name(raw, at + _LUN_FIXED.size, "LUN serial")
            luns.append(LunInfo(lun_id, serial, block_size, blocks))
        if at != len(raw):
            raise HelloError("HELLO has trailing bytes")
        body = cls(cluster_id, node_id, lo, hi, nonce, role, tuple(luns))
        problem = body.problem()
        if problem:
            raise HelloError(problem)
        return body

    def problem(self) -> str | None:
        """What makes this body unfit to send or accept, or None."""
        if not 1 <= self.min_version <= self.max_version <= 255:
            return f"version range {self.min_version}-{self.max_version}"
        if len(self.nonce) != NONCE_LEN:
            return f"nonce of {len(self.nonce)} bytes"
        names = [("cluster id", self.cluster_id), ("node id", self.node_id)]
        names += [("LUN serial", lun.serial) for lun in self.luns]
        for what, name in names:
            if not 1 <= len(name.encode()) <= MAX_NAME:
                return f"{what} of {len(name.encode())} bytes"
        if len(self.luns) > 0xFFFF:
            return "too many LUNs"
        if len({lun.serial for lun in self.luns}) != len(self.luns):
            return "a LUN serial listed twice"
        if len({lun.lun_id for lun in self.luns}) != len(self.luns):
            return "a LUN id listed twice"
        for lun in self.luns:
            bs = lun.block_size
            if not (512 <= bs <= 65536 and not bs & (bs - 1)) or lun.blocks < 1:
                return f"LUN {lun.serial} of {lun.blocks} blocks of {bs} bytes"
        return None


def _name(name: str) -> list[bytes]:
    raw = name.encode()
    return [bytes([len(raw)]), raw]


def _take_name(raw: bytes, at: int, what: str) -> tuple[str, int]:
    if at >= len(raw):
        raise HelloError(f"HELLO ends before its {what}")
    end = at + 1 + raw[at]
    if end > len(raw):
        raise HelloError(f"HELLO ends inside its {what}")
    try:
        return raw[at + 1:end].decode(), end
    except UnicodeDecodeError:
        raise HelloError(f"{what} is not UTF-8") from None


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """What this node announces about itself on every link."""
    cluster_id: str
    node_id: str
    luns: tuple[LunInfo, ...]
    min_version: int = FRAME_VERSION
    max_version: int = FRAME_VERSION


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The peer as its HELLO described it."""
    cluster_id: str
    node_id: str
    role: LinkRole
    min_version: int
    max_version: int
    luns: tuple[LunInfo, ...]


class State(enum.Enum):
    IDLE = "idle"  # nothing sent yet
    HELLO_SENT = "hello sent"  # waiting for the peer's HELLO
    RESPONDED = "responded"  # our mac sent; waiting for the peer's
    WELCOMED = "welcomed"  # the peer's mac verified, our WELCOME sent; waiting for its WELCOME
    DONE = "done"
    FAILED = "failed"


def _lp(data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + data


def compute_mac(secret: bytes, sender: bytes, receiver: bytes) -> bytes:
    """The CHALLENGE_RESPONSE mac that the sender of HELLO body ``sender`` sends to the sender
    of ``receiver`` (both as they travelled)."""
    s, r = HelloBody.decode(sender), HelloBody.decode(receiver)
    material = b"".join((
        LABEL,
        _lp(s.nonce), _lp(r.nonce),
        _lp(s.node_id.encode()), _lp(r.node_id.encode()),
        _lp(sender), _lp(receiver),
    ))
    return hmac.new(secret, material, hashlib.sha256).digest()


class Handshake:
    """One link's handshake; see the module docstring.

    ``role`` is the link's purpose.  The side that connects names it; an accepting side that
    serves both roles on one port passes None, waits for the peer's HELLO and adopts its role.
    Two sides that both pass None never start.
    """

    def __init__(self, local: NodeIdentity, secret: bytes, peers_allowed: Collection[str],
                 random_bytes: RandomBytes, role: LinkRole | None = LinkRole.SYNC) -> None:
        if len(secret) < MIN_SECRET:
            raise ValueError(f"the peer secret must be at least {MIN_SECRET} bytes")
        if not 1 <= local.min_version <= local.max_version <= FRAME_VERSION:
            raise ValueError(f"local versions {local.min_version}-{local.max_version} are not "
                             f"all spoken here (1-{FRAME_VERSION})")
        problem = HelloBody(local.cluster_id, local.node_id, local.min_version,
                            local.max_version, bytes(NONCE_LEN), LinkRole.SYNC,
                            local.luns).problem()
        if problem:
            raise ValueError(f"local identity: {problem}")
        self.local = local
        self._secret = secret
        self._allowed = frozenset(peers_allowed)
        self._random = random_bytes
        self.role = role
        self.state = State.IDLE
        self.failed: str | None = None
        self.version = 0  # agreed once the peer's HELLO is accepted
        self.common_luns: dict[int, LunInfo] = {}  # by LUN id, once done
        self.lun_notes: tuple[str, ...] = ()  # LUNs left out of common_luns, and why
        self._ours: Hello | None = None  # as sent
        self._theirs: Hello | None = None  # as received, once accepted
        self._peer: HelloBody | None = None  # decoded from _theirs
        self._nonce = b""  # ours, once _hello() has drawn it

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    @property
    def peer(self) -> PeerIdentity:
        """The peer; available once its HELLO has been accepted (trusted once ``done``)."""
        h = self._peer
        if h is None:
            raise RuntimeError("the peer's HELLO has not been accepted")
        return PeerIdentity(h.cluster_id, h.node_id, h.role, h.min_version, h.max_version,
                            h.luns)

    def start(self) -> list[Message]:
        """Messages to send as soon as the connection is up (HELLO, unless role is None)."""
        if self.state is not State.IDLE or self.role is None:
            return []
        self.state = State.HELLO_SENT
        return [self._hello()]

    def receive(self, msg: Message) -> list[Message]:
        """Messages to send in answer to ``msg`` (a GOODBYE when the handshake fails)."""
        if self.state in (State.DONE, State.FAILED):
            raise RuntimeError(f"handshake is {self.state.value}; route messages elsewhere")
        if isinstance(msg, Goodbye):
            who = f"node {self._peer.node_id}" if self._peer else "the peer"
            self.state = State.FAILED
            self.failed = f"refused by {who}: {msg.reason or 'no reason given'}"
            return []
        handler = _TRANSITIONS.get((self.state, msg.TYPE))
        if handler is None:
            return self._fail(f"unexpected {msg.TYPE.name} while {self.state.value}")
        return handler(self, msg)

    # --- transitions --------------------------------------------------------------------------

    def _on_hello(self, msg: Message) -> list[Message]:
        assert isinstance(msg, Hello)
        try:
            body = HelloBody.decode(msg.body)
        except HelloError as e:
            return self._fail(f"malformed HELLO: {e}")
        if self.role is None:
            self.role = body.role  # an accepting side adopts the connector's purpose
        problem = self._check_hello(body)
        if problem:
            # An accepting side that has not spoken yet tells a refused peer nothing more.
            return self._fail(problem)
        out: list[Message] = [self._hello()] if self.state is State.IDLE else []
        self._theirs, self._peer = msg, body
        self.version = min(self.local.max_version, body.max_version)
        self.state = State.RESPONDED
        mac = compute_mac(self._secret, self._hello().body, msg.body)
        out.append(ChallengeResponse(mac))
        return out

    def _on_response(self, msg: Message) -> list[Message]:
        assert isinstance(msg, ChallengeResponse)
        assert self._theirs is not None and self._peer is not None
        expected = compute_mac(self._secret, self._theirs.body, self._hello().body)
        if not hmac.compare_digest(expected, msg.mac):
            return self._fail(AUTH_FAILED)
        problem = self._compare_luns(self._peer)
        if problem:
            return self._fail(problem)
        self.state = State.WELCOMED
        return [Welcome(self.version)]

    def _on_welcome(self, msg: Message) -> list[Message]:
        assert isinstance(msg, Welcome)
        if msg.version != self.version:
            return self._fail(f"node {self.peer.node_id} welcomed version {msg.version}, "
                              f"agreed {self.version}")
        self.state = State.DONE
        return []

    # --- checks -------------------------------------------------------------------------------

    def _hello(self) -> Hello:
        if self._ours is None:
            assert self.role is not None
            nonce = self._random(NONCE_LEN)
            if len(nonce) != NONCE_LEN:
                raise ValueError(f"random_bytes gave {len(nonce)} bytes, not {NONCE_LEN}")
            me = self.local
            self._nonce = nonce
            self._ours = Hello(HelloBody(me.cluster_id, me.node_id, me.min_version,
                                         me.max_version, nonce, self.role, me.luns).encode())
        return self._ours

    def _check_hello(self, h: HelloBody) -> str | None:
        me = self.local
        if h.cluster_id != me.cluster_id:
            return (f"wrong cluster id: {h.cluster_id!r} at node {h.node_id}, "
                    f"{me.cluster_id!r} here")
        if h.node_id == me.node_id:
            return f"node id {h.node_id!r} is this node's own"
        if h.node_id not in self._allowed:
            return f"unknown node id {h.node_id!r}"
        if max(h.min_version, me.min_version) > min(h.max_version, me.max_version):
            return (f"no common protocol version: {me.min_version}-{me.max_version} here, "
                    f"{h.min_version}-{h.max_version} at node {h.node_id}")
        if h.role != self.role:
            assert self.role is not None
            return (f"link role mismatch: {self.role.name.lower()} here, "
                    f"{h.role.name.lower()} at node {h.node_id}")
        self._hello()
        if h.nonce == self._nonce:
            return "the peer's nonce is ours"  # a reflected HELLO
        return None

    def _compare_luns(self, h: HelloBody) -> str | None:
        """Fill common_luns and lun_notes; a reason when a shared LUN is inconsistent."""
        peer = h.node_id
        theirs = {lun.serial: lun for lun in h.luns}
        mine = {lun.serial: lun for lun in self.local.luns}
        errors: list[str] = []
        notes: list[str] = []
        common: dict[int, LunInfo] = {}
        for serial in sorted(mine.keys() | theirs.keys()):
            a, b = mine.get(serial), theirs.get(serial)
            if b is None:
                notes.append(f"LUN {serial}: configured here, not at node {peer}")
            elif a is None:
                notes.append(f"LUN {serial}: configured at node {peer}, not here")
            elif a.blocks != b.blocks:
                errors.append(f"LUN {serial}: {a.blocks} blocks here, {b.blocks} at node {peer}")
            elif a.block_size != b.block_size:
                errors.append(f"LUN {serial}: block size {a.block_size} here, "
                              f"{b.block_size} at node {peer}")
            elif a.lun_id != b.lun_id:
                errors.append(f"LUN {serial}: id {a.lun_id} here, {b.lun_id} at node {peer}")
            else:
                common[a.lun_id] = a
        # One id naming different serials on the two sides would send one LUN's writes to
        # another; the serial checks above cannot see it when neither serial is shared.
        their_ids = {lun.lun_id: lun.serial for lun in h.luns}
        for lun in self.local.luns:
            other = their_ids.get(lun.lun_id)
            if other is not None and other != lun.serial:
                errors.append(f"LUN id {lun.lun_id}: serial {lun.serial} here, {other} at "
                              f"node {peer}")
        if errors:
            return "; ".join(errors)
        self.common_luns = common
        self.lun_notes = tuple(notes)
        return None

    def _fail(self, reason: str) -> list[Message]:
        self.state = State.FAILED
        self.failed = reason
        # The peer's copy is cut to what GOODBYE carries; our log keeps the whole reason.
        short = reason.encode()[:MAX_REASON].decode(errors="ignore")
        return [Goodbye(short)]


_Handler = Callable[[Handshake, Message], list[Message]]

# Everything that moves the machine: (state, message received) -> handler.  Anything not
# listed (other than GOODBYE, accepted in every state) fails the handshake.
_TRANSITIONS: dict[tuple[State, MsgType], _Handler] = {
    (State.IDLE, MsgType.HELLO): Handshake._on_hello,
    (State.HELLO_SENT, MsgType.HELLO): Handshake._on_hello,
    (State.RESPONDED, MsgType.CHALLENGE_RESPONSE): Handshake._on_response,
    (State.WELCOMED, MsgType.WELCOME): Handshake._on_welcome,
}
