"""Activity log: the bounded set of regions writes may be in flight on, kept on stable storage.

Theory of operation
-------------------
A crash while writes are in flight leaves this node's disk and its peers' disks possibly
different in the regions being written: the local write may have landed and the replicated one
not, or the reverse.  None of those writes was acknowledged, but the replicas must still be made
identical again, and a peer that was out of sync must not lose track of a region it lacks.
Marking a bitmap on disk before every write would cost a synchronous metadata write per I/O.
Instead, as in DRBD, the log records a few hundred *hot* regions:

* ``begin_write`` puts the write's regions in the log.  If they are all already recorded on
  stable storage it returns None and the write proceeds at once, which is the common case
  under locality.  Otherwise it returns the ``Transaction`` that will record them; the caller
  must wait until that transaction is committed before issuing the write.
* Transactions are written one at a time, in order: the owner loops on ``next_transaction``,
  writes ``tx.data`` to the store under the log's name (``persist``, blocking, so an asyncio
  owner runs it in a thread), then calls ``commit``.  Every write that needs a new region while a
  transaction is being written joins the *next* one, so a burst of writes to new regions costs
  at most two metadata writes in sequence, and writes to regions already pending share the
  pending transaction instead of causing another.
* When the log is full, the least recently used region with no write in flight is evicted to
  make room.  Eviction only takes effect when the next transaction lands, and
  ``tx.evicted`` lists what it drops.  **Before writing such a transaction the owner must flush
  every bitmap that holds unflushed marks**, so a region that a peer lacks is on disk in a bitmap
  before it leaves the log.  If no region is evictable (every slot has a write in flight),
  ``begin_write`` raises ``ActivityLogFull`` without changing anything; the owner queues the write
  and retries after an ``end_write``.
* After a crash, ``recover`` returns the regions of the last durable log image.  The owner marks
  them dirty in the bitmap of *every* peer (including peers that were in sync: the crash may have
  left them different), flushes those bitmaps, and only then starts a new log with
  ``on_disk=<recovered regions>``.  Its first transaction drops them, through the same eviction
  rule as above.

The invariant this serves (DESIGN.md invariants 1 and 2):

    A region is on stable storage, in the activity log or in a flushed bitmap, before any write
    to it is issued to the local disk, and so before it is acknowledged.  It stays there while
    the write is in flight, and for as long as a peer that was out of sync lacks it.

"Before the write is issued", not only "before the ack": a crash after the local write landed
but before the peer got it leaves a difference that only the log can reveal.  Every write a node
applies goes through its log, including writes received from a peer.

Memory is bounded by ``slots``: the log holds at most ``slots`` regions, and at most two
transactions (one being written, one collecting) exist at a time.  The store holds one record
per log: the whole image, not a journal.  ``MetaStore.write`` replaces it atomically, so there
is no torn record to repair; the CRC guards against a lying disk only.
"""

from __future__ import annotations

import enum
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable

from .bitmap import DirtyBitmap
from .metastore import MetaStore
from .record import seal, unseal

DEFAULT_SLOTS = 257
DEFAULT_REGION_SIZE = 4 << 20

_MAGIC = b"VSAL"
_VERSION = 1
# magic, version, reserved, sequence number, region size, region count
_HEADER = struct.Struct("<4sHHQQI")


class ActivityLogFull(Exception):
    """Every slot holds a region with a write in flight: retry after an ``end_write``."""


class ActivityLogCorrupt(ValueError):
    """The stored log failed validation: the caller must treat the whole LUN as dirty."""


class TxState(enum.Enum):
    OPEN = "open"  # collecting regions; not yet sealed
    WRITING = "writing"  # sealed: ``data`` is being written to the store
    COMMITTED = "committed"  # durable: waiters may issue their writes
    ABORTED = "aborted"  # the store write failed: waiters must fail their writes


class Transaction:
    """One change of the log's image on stable storage.

    Returned by ``begin_write`` while still OPEN; ``regions``, ``added``, ``evicted`` and
    ``data`` are known once ``next_transaction`` has sealed it.  Identity is what matters: all
    writes waiting for the same transaction get the same object, so an asyncio owner can map it
    to one future.
    """

    __slots__ = ("seq", "state", "regions", "added", "evicted", "_data")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.state = TxState.OPEN
        self.regions: frozenset[int] = frozenset()
        self.added: frozenset[int] = frozenset()
        self.evicted: frozenset[int] = frozenset()
        self._data: bytes | None = None

    @property
    def data(self) -> bytes:
        if self._data is None:
            raise RuntimeError(f"transaction {self.seq} is not sealed yet")
        return self._data

    @property
    def committed(self) -> bool:
        return self.state is TxState.COMMITTED

    def __repr__(self) -> str:
        return (
            f"Transaction(seq={self.seq}, {self.state.value}, regions={len(self.regions)}, "
            f"added={sorted(self.added)}, evicted={sorted(self.evicted)})"
        )


class ActivityLog:
    """The activity log of one LUN on this node; see the module docstring for the protocol."""

    def __init__(
        self,
        store: MetaStore,
        name: str,
        slots: int = DEFAULT_SLOTS,
        region_size: int = DEFAULT_REGION_SIZE,
        on_disk: Iterable[int] = (),
    ) -> None:
        if slots < 1:
            raise ValueError(f"an activity log needs at least one slot, not {slots}")
        if region_size <= 0:
            raise ValueError(f"region size must be positive, not {region_size}")
        self.store = store
        self.name = name
        self.slots = slots
        self.region_size = region_size
        # region -> writes in flight on it; order = least recently used first.
        self._entries: OrderedDict[int, int] = OrderedDict()
        # What a crash would recover right now: the image of the last committed transaction.
        self._durable: frozenset[int] = frozenset(on_disk)
        self._writing: Transaction | None = None
        self._open: Transaction | None = None
        self._seq = 0

    # ----------------------------------------------------------------------------- writes

    def begin_write(self, offset: int, length: int) -> Transaction | None:
        """Enter a write's regions in the log.

        None: they are all on stable storage, issue the write now.  A ``Transaction``: issue it
        once that transaction is committed.  Raises ``ActivityLogFull`` (state unchanged) when
        no slot can be freed now, ``ValueError`` when the write spans more regions than the log
        has slots (the owner must split it, or mark and flush the bitmap instead).
        """
        regions = self._regions(offset, length)
        if not regions:
            return None
        if len(regions) > self.slots:
            raise ValueError(
                f"write spans {len(regions)} regions, the activity log has {self.slots} slots"
            )
        entries = self._entries
        new = [r for r in regions if r not in entries]
        shortfall = len(entries) + len(new) - self.slots
        if shortfall > 0:
            victims = self._victims(shortfall, set(regions))
            for victim in victims:
                del entries[victim]
        for region in regions:
            entries[region] = entries.get(region, 0) + 1
            entries.move_to_end(region)
        uncovered = [r for r in regions if not self._covered(r)]
        if not uncovered:
            return None
        writing = self._writing
        if writing is not None and all(r in writing.regions for r in uncovered):
            # Already on its way to disk: share that transaction rather than start another.
            return writing
        if self._open is None:
            self._seq += 1
            self._open = Transaction(self._seq)
        return self._open

    def end_write(self, offset: int, length: int) -> None:
        """The write is complete (acknowledged or failed); its regions stay hot until evicted."""
        regions = self._regions(offset, length)
        for region in regions:
            if self._entries.get(region, 0) <= 0:
                raise ValueError(f"end_write on region {region} with no write in flight")
        for region in regions:
            self._entries[region] -= 1

    def covers(self, offset: int, length: int) -> bool:
        """True if every region of the range is on stable storage and will stay there while a
        write is in flight on it: the precondition for issuing a write."""
        return all(
            r in self._entries and self._covered(r) for r in self._regions(offset, length)
        )

    def evict_idle(self) -> None:
        """Drop every region with no write in flight (before a clean shutdown: the next
        transaction then writes an empty log, after the owner has flushed its bitmaps)."""
        for region in [r for r, n in self._entries.items() if n == 0]:
            del self._entries[region]

    # ----------------------------------------------------------------------------- transactions

    def next_transaction(self) -> Transaction | None:
        """Seal and return the transaction to write now, or None if there is nothing to write
        or one is already being written (they go to disk one at a time, in order)."""
        if self._writing is not None:
            return None
        image = frozenset(self._entries)
        if self._open is None:
            if image == self._durable:
                return None
            # Evictions only, or a retry after an aborted write: still worth writing.
            self._seq += 1
            self._open = Transaction(self._seq)
        tx, self._open = self._open, None
        tx.regions = image
        tx.added = image - self._durable
        tx.evicted = self._durable - image
        tx._data = _encode(tx.seq, self.region_size, image)
        tx.state = TxState.WRITING
        self._writing = tx
        return tx

    def persist(self, tx: Transaction) -> None:
        """Write a sealed transaction to the store.  Blocking; touches no mutable state of the
        log, so it may run in a worker thread while the event loop goes on."""
        self.store.write(self.name, tx.data)

    def commit(self, tx: Transaction) -> None:
        """``tx`` is durable: writes waiting for it may be issued."""
        if tx is not self._writing:
            raise ValueError(f"{tx!r} is not the transaction being written")
        self._durable = tx.regions
        tx.state = TxState.COMMITTED
        self._writing = None

    def abort(self, tx: Transaction) -> None:
        """The store write of ``tx`` failed.  Its waiters must fail their writes (and call
        ``end_write``); the next transaction writes the log's image again."""
        if tx is not self._writing:
            raise ValueError(f"{tx!r} is not the transaction being written")
        tx.state = TxState.ABORTED
        self._writing = None

    def persist_pending(self, before_write: Callable[[Transaction], None] | None = None) -> int:
        """For synchronous owners and tests: write and commit every pending transaction.
        ``before_write`` runs before each store write (flush bitmaps there when ``tx.evicted``).
        Returns the number of transactions written."""
        written = 0
        while (tx := self.next_transaction()) is not None:
            if before_write is not None:
                before_write(tx)
            try:
                self.persist(tx)
            except BaseException:
                self.abort(tx)
                raise
            self.commit(tx)
            written += 1
        return written

    # ----------------------------------------------------------------------------- inspection

    @property
    def durable_regions(self) -> frozenset[int]:
        return self._durable

    def active_regions(self) -> frozenset[int]:
        return frozenset(self._entries)

    def in_flight(self, region: int) -> int:
        return self._entries.get(region, 0)

    def __len__(self) -> int:
        return len(self._entries)

    # ----------------------------------------------------------------------------- recovery

    @staticmethod
    def recover(store: MetaStore, name: str, region_size: int = DEFAULT_REGION_SIZE) -> set[int]:
        """Regions (of ``region_size``) that were in the log when the node stopped: after a
        crash, every one of them must be treated as dirty towards every peer.

        A log recorded with another region size is converted by byte range, so changing the
        configured size never loses a region.  A corrupt record raises ``ActivityLogCorrupt``:
        the owner must then treat the whole LUN as dirty.
        """
        data = store.read(name)
        if data is None:
            return set()
        _seq, recorded_size, regions = _decode(data)
        if recorded_size == region_size:
            return set(regions)
        out: set[int] = set()
        for region in regions:
            start = region * recorded_size
            end = start + recorded_size
            out.update(range(start // region_size, -(-end // region_size)))
        return out

    # ----------------------------------------------------------------------------- internals

    def _regions(self, offset: int, length: int) -> range:
        if offset < 0 or length < 0:
            raise ValueError(f"bad range offset={offset} length={length}")
        if length == 0:
            return range(0)
        return range(offset // self.region_size, (offset + length - 1) // self.region_size + 1)

    def _covered(self, region: int) -> bool:
        # On disk now, and not about to be dropped by the transaction being written.
        if region not in self._durable:
            return False
        return self._writing is None or region in self._writing.regions

    def _victims(self, needed: int, keep: set[int]) -> list[int]:
        victims: list[int] = []
        # Oldest first: the OrderedDict is kept in least-recently-used order.
        for region, in_flight in self._entries.items():
            if in_flight == 0 and region not in keep:
                victims.append(region)
                if len(victims) == needed:
                    return victims
        raise ActivityLogFull(
            f"activity log full: {len(self._entries)} regions, "
            f"{len(self._entries) - len(victims)} with writes in flight"
        )


def mark_regions(bitmap: DirtyBitmap, regions: Iterable[int], region_size: int) -> None:
    """Mark activity-log regions (of ``region_size``) in a bitmap, clipped to the LUN's end:
    what the owner does with ``recover``'s result, for every peer's bitmap."""
    for region in regions:
        start = region * region_size
        if start >= bitmap.size_bytes:
            continue
        bitmap.mark(start, min(region_size, bitmap.size_bytes - start))


def _encode(seq: int, region_size: int, regions: frozenset[int]) -> bytes:
    ordered = sorted(regions)
    body = _HEADER.pack(_MAGIC, _VERSION, 0, seq, region_size, len(ordered)) + struct.pack(
        f"<{len(ordered)}Q", *ordered
    )
    return seal(body)


def _decode(data: bytes) -> tuple[int, int, list[int]]:
    body, fields = unseal(data, _HEADER, _MAGIC, _VERSION, "activity log record",
                          ActivityLogCorrupt)
    _, _, _reserved, seq, region_size, count = fields
    if region_size <= 0 or len(body) != _HEADER.size + 8 * count:
        raise ActivityLogCorrupt("activity log record length or geometry mismatch")
    regions = list(struct.unpack_from(f"<{count}Q", body, _HEADER.size))
    return seq, region_size, regions
