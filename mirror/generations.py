"""Data generation identifiers: which replica holds which history of a LUN's data.

Theory of operation
-------------------
DESIGN.md invariant 4: the sync direction is never guessed.  Each replica of a LUN keeps, on
stable storage, a few 64-bit random identifiers (the scheme follows DRBD's generation UUIDs):

``current``
    Names the data generation this replica holds.  Replicas in sync hold the same ``current``.
    A new one is drawn whenever the data may start to differ from a peer that could still claim
    the old one: before the first write acknowledged after a peer left the in-sync set
    (``needs_new_current`` says when).  Zero means "no data": a new or replaced disk.
``bitmaps``
    Per peer node: the generation at which this replica's dirty bitmap for that peer started
    tracking (``start_tracking``, when the peer leaves the in-sync set).  Zero/absent: no
    tracking.  Per peer, because with three nodes one peer may be away while another is in sync.
``history``
    The previous ``current`` values, newest first (``HISTORY_LEN`` kept): the lineage.
``inconsistent``
    Set on a resync target from the start of the resync to its end: its data is a mix, so it
    can never be a source.

Changes, each persisted before anything relies on it:

* peer leaves the in-sync set: ``start_tracking(peer)`` (bitmap uuid := current, unless an
  older one is kept: the older bitmap covers more);
* first write acknowledged after that: ``new_current(random_bytes)`` on the node that orders
  writes, ``adopt_current(value)`` on the other in-sync nodes, so that replicas in sync keep one
  ``current`` (two independent draws would later look like a split brain);
* restart after a crash with a non-empty activity log: ``start_tracking`` for every peer (the
  log's regions are marked in every peer's bitmap: they may differ from every peer);
* resync: the source calls ``begin_sync_source(peer)`` and sends the returned handle; the target
  calls ``begin_sync_target(handle)``.  At the end the target ``adopt``s the source's identifiers
  and the source calls ``sync_finished(peer)``.  An interrupted resync resumes as a bitmap resync
  because the target's ``current`` is the source's bitmap uuid for it.

Decision rules (``decide``), first match wins; L = local, P = peer, Lb = L's bitmap uuid for P,
Pb = P's bitmap uuid for L.  "Has data" = current != 0 and not inconsistent.  Every rule is
symmetric, so ``decide(P, L)`` is the mirror image of ``decide(L, P)``.

====  ==============================================  ================  ======  =============
 #    condition                                       outcome           sync    why safe
====  ==============================================  ================  ======  =============
 1    neither has data                                NO_SOURCE         none    a
 2    only P has data, L.current is 0                 PEER_IS_SOURCE    full    b
 3    only P has data, L inconsistent, lineages meet  PEER_IS_SOURCE    bm|full c
 4    only P has data, L inconsistent, no common gen  UNRELATED         full    d
 5    L.current == P.current, neither tracks other    IN_SYNC           none    e
      at that generation (Lb != current, Pb != cur.)
 6    same current, only L tracks P at it             PEER_IS_SOURCE    bitmap  f
 7    same current, both track                        lower node id     bitmap  f
                                                      is the source
 8    P.current is in L's lineage AND in P's lineage  SPLIT_BRAIN       full    g
      L.current (each claims the other is older)
 9    P.current == Lb, or P.current in L's lineage    LOCAL_IS_SOURCE   bitmap  h
      and Lb is no newer than it
10    P.current in L.history otherwise                LOCAL_IS_SOURCE   full    h
11    Lb == Pb != 0                                   SPLIT_BRAIN       bitmap  i
12    any common non-zero generation                  SPLIT_BRAIN       full    i
13    nothing in common                               UNRELATED         full    d
====  ==============================================  ================  ======  =============
(2, 3, 4, 6, 9, 10 have mirror rules with L and P swapped.)

a. Nothing consistent on either side: no direction exists.  A brand-new LUN gets its first
   ``current`` from the creating node and the others adopt it only when their disks are known
   identical (fresh zeroed files); otherwise the operator names the initial source.
b. A disk with no generation holds no acknowledged data of this LUN.
c. An inconsistent disk cannot serve as a source; the consistent peer is the only candidate.
   The bitmap suffices when P's bitmap for L covers L's generation (an interrupted resync).
   Whether P itself is current enough to serve I/O is the quorum layer's question (an outdated
   node must not serve), not this table's.
d. No shared generation: the disks may belong to different LUNs or clusters.  Syncing either way
   would destroy data that may be the only copy; only the operator may order a full sync.
e. Same generation and neither wrote without the other since: identical, except for regions
   of writes in flight at a failure, which the activity logs put in the bitmaps (rule 6/7).
f. Same generation, but a side tracks the other at it: that side restarted after a crash (its
   activity-log regions are in its bitmap) or lost the peer without writing.  No acknowledged
   write differs (an ack needs every in-sync replica), so either direction is correct; the side
   without unsynced changes is chosen because its data is what was served meanwhile (reads of
   unacknowledged data stay stable).  Both tracking: the fixed node-id order picks, the same
   on both sides.  The resync set is always the union of both bitmaps.
g. Contradictory lineage (each an ancestor of the other) means damaged or forged metadata.
h. P's current is a generation L went through: P stopped there and wrote nothing since (it
   would have drawn a new current), and L holds everything after it.  L's bitmap for P lists
   every region L changed since Lb; if Lb is no newer than P's generation, that covers every
   region P lacks, otherwise only a full sync does.
i. Both wrote since a common generation: each side holds acknowledged writes the other lacks.
   Never auto-merged; the operator picks the survivor, whose writes win.  When both bitmaps
   started at the same generation their union covers every difference, so the resync that
   follows the operator's choice can be a bitmap resync.

Preconditions the owner must keep for these rules to be true: write only under a ``current``
that no absent peer can hold (``needs_new_current``), persist identifiers before acknowledging
writes that depend on them, and for a FULL resync mark the whole source bitmap and flush it
before sending the handle (the target's ``current`` := handle makes the resync resumable from
that bitmap).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

from .record import seal, unseal

HISTORY_LEN = 8
MAX_TRACKED = 255
_UUID_MAX = (1 << 64) - 1

_MAGIC = b"VSGI"
_VERSION = 1
_FLAG_INCONSISTENT = 0x0001
# magic, version, flags, current, history count, bitmap count
_HEADER = struct.Struct("<4sHHQBB")
_BITMAP_ENTRY = struct.Struct("<IQ")

RandomBytes = Callable[[int], bytes]


class GenerationsCorrupt(ValueError):
    """A stored generation record failed validation."""


class Outcome(enum.Enum):
    IN_SYNC = "in-sync"
    LOCAL_IS_SOURCE = "local-is-source"
    PEER_IS_SOURCE = "peer-is-source"
    SPLIT_BRAIN = "split-brain"  # both wrote since a common generation: operator chooses
    UNRELATED = "unrelated"  # no common history: operator only, full sync
    NO_SOURCE = "no-source"  # neither side holds consistent data


class SyncKind(enum.Enum):
    NONE = "none"
    BITMAP = "bitmap"  # copy the union of both sides' dirty bitmaps
    FULL = "full"  # copy everything


_MIRROR = {
    Outcome.LOCAL_IS_SOURCE: Outcome.PEER_IS_SOURCE,
    Outcome.PEER_IS_SOURCE: Outcome.LOCAL_IS_SOURCE,
}


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    sync: SyncKind
    rule: str  # which row of the table matched: for logs and the operator

    def mirrored(self) -> Decision:
        """The same decision seen from the other side."""
        return Decision(_MIRROR.get(self.outcome, self.outcome), self.sync, self.rule)


@dataclass(frozen=True, slots=True)
class Generations:
    """One replica's identifiers for one LUN.  Immutable: every change returns a new value,
    which the owner persists (``to_bytes``) before relying on it."""

    current: int = 0
    bitmaps: tuple[tuple[int, int], ...] = ()  # (peer node id, uuid), sorted, uuid != 0
    history: tuple[int, ...] = ()  # newest first, non-zero, distinct
    inconsistent: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.current <= _UUID_MAX:
            raise ValueError(f"current {self.current:#x} is not a 64-bit value")
        if len(self.history) > HISTORY_LEN:
            raise ValueError(f"history longer than {HISTORY_LEN}")
        if any(not 0 < h <= _UUID_MAX for h in self.history):
            raise ValueError("history entries must be non-zero 64-bit values")
        if len(set(self.history)) != len(self.history):
            raise ValueError("history entries must be distinct")
        if len(self.bitmaps) > MAX_TRACKED:
            raise ValueError(f"more than {MAX_TRACKED} tracked peers")
        nodes = [node for node, _ in self.bitmaps]
        if nodes != sorted(set(nodes)):
            raise ValueError("bitmap entries must be sorted by node id, one per node")
        for node, uuid in self.bitmaps:
            if not 0 <= node < 1 << 32 or not 0 < uuid <= _UUID_MAX:
                raise ValueError(f"bad bitmap entry ({node}, {uuid:#x})")

    # ----------------------------------------------------------------------------- queries

    @property
    def has_data(self) -> bool:
        return self.current != 0 and not self.inconsistent

    def bitmap_for(self, peer: int) -> int:
        for node, uuid in self.bitmaps:
            if node == peer:
                return uuid
        return 0

    def needs_new_current(self) -> bool:
        """True if an absent peer may still hold ``current``: a write acknowledged now would
        make two different data sets carry one name.  Draw (or adopt) a new current first."""
        return any(uuid == self.current for _, uuid in self.bitmaps)

    def lineage(self) -> frozenset[int]:
        """Every generation this replica's data went through (as far as it remembers)."""
        known = {self.current, *self.history, *(uuid for _, uuid in self.bitmaps)}
        known.discard(0)
        return frozenset(known)

    # ----------------------------------------------------------------------------- changes

    def new_current(self, random_bytes: RandomBytes) -> Generations:
        """A fresh random current; the old one goes to the history."""
        known = self.lineage()
        for _ in range(16):
            value = int.from_bytes(random_bytes(8), "little")
            # 0 means "no data"; a repeat would merge two generations' names.
            if value != 0 and value not in known:
                return self.adopt_current(value)
        raise RuntimeError("random_bytes keeps returning zero or known values")

    def adopt_current(self, value: int) -> Generations:
        """Take ``value`` (drawn by the node that orders writes) as the new current."""
        if not 0 < value <= _UUID_MAX:
            raise ValueError(f"generation {value:#x} must be a non-zero 64-bit value")
        if value == self.current:
            return self
        return replace(self, current=value, history=_pushed(self.history, self.current))

    def start_tracking(self, peer: int) -> Generations:
        """``peer`` left the in-sync set: its bitmap tracks changes from the current generation.
        An existing bitmap uuid is kept: that bitmap started earlier and covers more."""
        if self.current == 0:
            raise ValueError("a replica with no data generation has nothing to track")
        if self.bitmap_for(peer):
            return self
        return replace(self, bitmaps=tuple(sorted((*self.bitmaps, (peer, self.current)))))

    def sync_finished(self, peer: int) -> Generations:
        """``peer`` holds our data now (resync done as source, or found IN_SYNC): forget the
        bitmap uuid; the owner discards that peer's dirty bitmap too."""
        return replace(self, bitmaps=tuple(e for e in self.bitmaps if e[0] != peer))

    def begin_sync_source(self, peer: int) -> tuple[Generations, int]:
        """Start a resync to ``peer``: returns the new identifiers and the handle to send.

        The handle is our bitmap uuid for the peer, which the peer takes as its ``current``
        while it is inconsistent: if the resync is interrupted, rule 3/9 resumes it from the
        bitmap.  For a FULL resync, mark the bitmap entirely and flush it before sending.
        """
        tracked = self.start_tracking(peer)
        return tracked, tracked.bitmap_for(peer)

    def begin_sync_target(self, handle: int) -> Generations:
        """Start receiving a resync: the data becomes a mix until ``adopt``."""
        if not 0 < handle <= _UUID_MAX:
            raise ValueError(f"sync handle {handle:#x} must be a non-zero 64-bit value")
        return replace(self, current=handle, inconsistent=True)

    def adopt(self, source: Generations) -> Generations:
        """End of a resync as target: our data is the source's now, and so is our history.
        Our own bitmap uuids are dropped: the dirty bitmaps described our old data (the owner
        discards them); differences to other peers are found again by handshake."""
        if not source.has_data:
            raise ValueError("cannot adopt the identifiers of a replica without consistent data")
        return Generations(current=source.current, history=source.history)

    # ----------------------------------------------------------------------------- persistence

    def to_bytes(self) -> bytes:
        flags = _FLAG_INCONSISTENT if self.inconsistent else 0
        parts = [
            _HEADER.pack(
                _MAGIC, _VERSION, flags, self.current, len(self.history), len(self.bitmaps)
            ),
            struct.pack(f"<{len(self.history)}Q", *self.history),
        ]
        parts.extend(_BITMAP_ENTRY.pack(node, uuid) for node, uuid in self.bitmaps)
        return seal(b"".join(parts))

    @classmethod
    def from_bytes(cls, data: bytes) -> Generations:
        body, fields = unseal(data, _HEADER, _MAGIC, _VERSION, "generation record",
                              GenerationsCorrupt)
        _, _, flags, current, nhist, nbm = fields
        if flags & ~_FLAG_INCONSISTENT:
            raise GenerationsCorrupt(f"unknown generation flags {flags:#x}")
        if len(body) != _HEADER.size + 8 * nhist + _BITMAP_ENTRY.size * nbm:
            raise GenerationsCorrupt("generation record length mismatch")
        history = struct.unpack_from(f"<{nhist}Q", body, _HEADER.size)
        offset = _HEADER.size + 8 * nhist
        bitmaps = tuple(
            _BITMAP_ENTRY.unpack_from(body, offset + i * _BITMAP_ENTRY.size) for i in range(nbm)
        )
        try:
            return cls(current, bitmaps, history, bool(flags & _FLAG_INCONSISTENT))
        except ValueError as exc:
            raise GenerationsCorrupt(f"generation record invalid: {exc}") from exc

    def __str__(self) -> str:
        bitmaps = ",".join(f"{node}:{uuid:016X}" for node, uuid in self.bitmaps)
        history = ",".join(f"{h:016X}" for h in self.history)
        flag = " inconsistent" if self.inconsistent else ""
        return f"{self.current:016X} bm[{bitmaps}] hist[{history}]{flag}"


# --------------------------------------------------------------------------------- decision


def decide(local: Generations, peer: Generations, local_node: int, peer_node: int) -> Decision:
    """Compare two replicas' identifiers at a handshake: see the module docstring's table."""
    if local_node == peer_node:
        raise ValueError("a replica cannot decide against itself")
    lb, pb = local.bitmap_for(peer_node), peer.bitmap_for(local_node)

    # Rules 1-4: a side without consistent data can only receive.
    if not local.has_data and not peer.has_data:
        return Decision(Outcome.NO_SOURCE, SyncKind.NONE, "1 neither-has-consistent-data")
    if not local.has_data:
        return _receive(local, peer, pb, Outcome.PEER_IS_SOURCE)
    if not peer.has_data:
        return _receive(peer, local, lb, Outcome.LOCAL_IS_SOURCE)

    # Rules 5-7: same generation.
    if local.current == peer.current:
        local_tracks, peer_tracks = lb == local.current, pb == peer.current
        if not local_tracks and not peer_tracks:
            return Decision(Outcome.IN_SYNC, SyncKind.NONE, "5 same-generation")
        if local_tracks and peer_tracks:
            outcome = Outcome.LOCAL_IS_SOURCE if local_node < peer_node else Outcome.PEER_IS_SOURCE
            return Decision(outcome, SyncKind.BITMAP, "7 same-generation-both-unsynced")
        # The side with unsynced changes receives (reason f).
        outcome = Outcome.PEER_IS_SOURCE if local_tracks else Outcome.LOCAL_IS_SOURCE
        return Decision(outcome, SyncKind.BITMAP, "6 same-generation-one-unsynced")

    # Rules 8-10: one side is an ancestor of the other.
    local_ahead = _ahead(local, lb, peer.current)
    peer_ahead = _ahead(peer, pb, local.current)
    if local_ahead is not None and peer_ahead is not None:
        return Decision(Outcome.SPLIT_BRAIN, SyncKind.FULL, "8 contradictory-lineage")
    if local_ahead is not None:
        rule = "9 peer-behind-bitmap" if local_ahead is SyncKind.BITMAP else "10 peer-behind"
        return Decision(Outcome.LOCAL_IS_SOURCE, local_ahead, rule)
    if peer_ahead is not None:
        rule = "9 peer-behind-bitmap" if peer_ahead is SyncKind.BITMAP else "10 peer-behind"
        return Decision(Outcome.PEER_IS_SOURCE, peer_ahead, rule)

    # Rules 11-13: both moved on, or strangers.
    if lb != 0 and lb == pb:
        return Decision(Outcome.SPLIT_BRAIN, SyncKind.BITMAP, "11 diverged-both-tracking")
    if local.lineage() & peer.lineage():
        return Decision(Outcome.SPLIT_BRAIN, SyncKind.FULL, "12 diverged-common-ancestor")
    return Decision(Outcome.UNRELATED, SyncKind.FULL, "13 no-common-history")


def _receive(target: Generations, source: Generations, source_bm: int, outcome: Outcome) -> Decision:
    """Rules 2-4: ``target`` has no consistent data, ``source`` does."""
    if target.current == 0:
        return Decision(outcome, SyncKind.FULL, "2 no-data")
    if not target.lineage() & source.lineage():
        # A resync target of some other LUN or cluster: do not overwrite it on our own.
        return Decision(Outcome.UNRELATED, SyncKind.FULL, "4 inconsistent-unrelated")
    kind = SyncKind.BITMAP if _covers(source, source_bm, target.current) else SyncKind.FULL
    return Decision(outcome, kind, "3 inconsistent")


def _position(gens: Generations, uuid: int) -> int | None:
    """How far back ``uuid`` is in ``gens``'s lineage: 0 = current, 1 = newest history..."""
    if uuid == gens.current:
        return 0
    try:
        return 1 + gens.history.index(uuid)
    except ValueError:
        return None


def _covers(source: Generations, bitmap_uuid: int, target_current: int) -> bool:
    """Does ``source``'s bitmap (started at ``bitmap_uuid``) list every region a replica at
    ``target_current`` lacks?  Yes when tracking started at or before that generation."""
    if bitmap_uuid == 0:
        return False
    if bitmap_uuid == target_current:
        return True
    target_pos = _position(source, target_current)
    bitmap_pos = _position(source, bitmap_uuid)
    return target_pos is not None and bitmap_pos is not None and bitmap_pos >= target_pos


def _ahead(source: Generations, bitmap_uuid: int, other_current: int) -> SyncKind | None:
    """Rules 9-10: is ``other_current`` a generation ``source`` went through?"""
    if _covers(source, bitmap_uuid, other_current):
        return SyncKind.BITMAP
    if other_current in source.history:
        return SyncKind.FULL
    return None


def _pushed(history: tuple[int, ...], old: int) -> tuple[int, ...]:
    if old == 0:
        return history
    return ((old,) + tuple(h for h in history if h != old))[:HISTORY_LEN]
